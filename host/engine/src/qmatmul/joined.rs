//! Projections of one input joined into one matmul (q, k and v; gate and up): where
//! their weights repacked to the same format and width, their columns are laid side
//! by side at load, so a step runs one parallel dispatch over all of them instead of
//! one each, and each part's outputs land in its own tensor. A column's result is the
//! same bits joined or not (each column's sum is its own); layers that cannot join run
//! one after the other on activations quantized once (`Linear::forward_all`).

use candle_core::Tensor;

use super::repack::{Repacked, LANES};
use super::{quantize, run_repacked, ActKind, Linear};
use crate::EngineError;

/// `N` layers applied to one input.
pub enum Joined<const N: usize> {
    /// One weight, the parts' columns in order, and each part's width.
    One(Box<Repacked>, [usize; N]),
    Apart([Linear; N]),
}

impl<const N: usize> Joined<N> {
    /// The layers joined when every one is repacked in one format and width, each of
    /// whole column groups; else kept apart.
    pub fn new(parts: [Linear; N]) -> Self {
        let joinable = {
            let reps: Vec<&Repacked> = parts
                .iter()
                .filter_map(|l| match l {
                    Linear::Repacked(r) => Some(&**r),
                    _ => None,
                })
                .collect();
            reps.len() == N
                && reps.iter().all(|r| {
                    r.spec == reps[0].spec
                        && r.layout == reps[0].layout
                        && r.k == reps[0].k
                        && r.n.is_multiple_of(LANES)
                })
        };
        if !joinable {
            return Joined::Apart(parts);
        }
        let mut widths = [0; N];
        let mut data = Vec::new();
        let mut first: Option<Repacked> = None;
        for (i, part) in parts.into_iter().enumerate() {
            let Linear::Repacked(r) = part else {
                unreachable!("checked above: every part is repacked")
            };
            widths[i] = r.n;
            data.extend_from_slice(&r.data);
            first.get_or_insert(*r);
        }
        let Some(mut joined) = first else {
            unreachable!("N > 0 parts")
        };
        joined.n = widths.iter().sum();
        joined.data = data;
        Joined::One(Box::new(joined), widths)
    }

    /// Every part of `x` (`[1, rows, k]`): `[1, rows, n_i]` each.
    pub fn forward(&self, x: &Tensor, spans: &[usize]) -> Result<[Tensor; N], EngineError> {
        match self {
            Joined::Apart(parts) => {
                Linear::forward_all(std::array::from_fn(|i| &parts[i]), x, spans)
            }
            Joined::One(w, widths) => run_repacked(w, x, &quantize(x, ActKind::Q8x, w.k)?, *widths),
        }
    }
}
