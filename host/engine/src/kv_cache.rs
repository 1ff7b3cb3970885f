//! The slot KV cache and the attention that reads it.
//!
//! Every slot holds, per layer, keys and values `[kv_heads, capacity, head_dim]`,
//! allocated once at start-up, in f16 (llama.cpp's default: half the memory, so twice
//! the slots fit) or f32 (bit for bit candle's reference, which the architecture
//! tests hold us to).
//!
//! Attention reads a slot's history in place. With f32, each query head is multiplied
//! against a view of its key/value head by the gemm calls candle's llama makes (same
//! shapes, same strides), so results stay candle's bit for bit: 8-bit requantization
//! of each layer's input would turn any last-bit difference into visibly different
//! logits. candle's llama also copies the history twice per layer (contiguous, then
//! repeated for the grouped-query heads), which at 8 sequences and a few hundred
//! positions was most of a decode step's attention time; here it is not copied. With
//! f16, lynx's own kernel (`kv_cache/half.rs`) attends straight from the f16 rows, one
//! query row at a time with the same operations for a decoding token as for a prompt
//! chunk's rows: a position's result never depends on how the prompt was split into
//! steps, which is what prefix caching and `echo` rest on.

mod half;

use std::sync::RwLock;

use candle_core::{DType, Device, Tensor};
use candle_transformers::utils::build_causal_mask;
use rayon::prelude::*;

use super::EngineError;

/// How cached keys and values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvDtype {
    /// Half precision: half the memory of f32 (llama.cpp's default).
    F16,
    /// Single precision: bit for bit candle's reference models.
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

/// One layer's keys or values of one slot in f16, `[kv_heads][capacity][head_dim]`.
type Rows16 = RwLock<Vec<::half::f16>>;

enum Slot {
    F32 { k: Vec<Tensor>, v: Vec<Tensor> },
    F16 { k: Vec<Rows16>, v: Vec<Rows16> },
}

/// Keys and values of `slots` sequences of up to `capacity` positions, every layer.
pub struct KvCache {
    slots: Vec<Slot>,
    kv_heads: usize,
    head_dim: usize,
    pub capacity: usize,
    pub dtype: KvDtype,
}

fn poisoned<T>(_: T) -> EngineError {
    EngineError::Model("a KV cache lock was poisoned by a panicked step".into())
}

impl KvCache {
    pub fn new(
        slots: usize,
        layers: usize,
        (kv_heads, head_dim): (usize, usize),
        capacity: usize,
        dtype: KvDtype,
    ) -> Result<Self, EngineError> {
        let device = Device::Cpu;
        let shape = (1, kv_heads, capacity, head_dim);
        let mut all = Vec::with_capacity(slots);
        for _ in 0..slots {
            let slot = match dtype {
                KvDtype::F32 => {
                    let zeros = || Tensor::zeros(shape, DType::F32, &device);
                    Slot::F32 {
                        k: (0..layers).map(|_| zeros()).collect::<Result<_, _>>()?,
                        v: (0..layers).map(|_| zeros()).collect::<Result<_, _>>()?,
                    }
                }
                KvDtype::F16 => {
                    let len = kv_heads * capacity * head_dim;
                    let zeros = || RwLock::new(vec![::half::f16::ZERO; len]);
                    Slot::F16 {
                        k: (0..layers).map(|_| zeros()).collect(),
                        v: (0..layers).map(|_| zeros()).collect(),
                    }
                }
            };
            all.push(slot);
        }
        Ok(Self {
            slots: all,
            kv_heads,
            head_dim,
            capacity,
            dtype,
        })
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Stores new keys and values (`[1, kv_heads, t, head_dim]`) at `pos..pos + t`.
    pub fn write(
        &self,
        (slot, layer, pos): (usize, usize, usize),
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), EngineError> {
        match &self.slots[slot] {
            Slot::F32 { k: ks, v: vs } => {
                ks[layer].slice_set(k, 2, pos)?;
                vs[layer].slice_set(v, 2, pos)?;
            }
            Slot::F16 { k: ks, v: vs } => {
                let (_, heads, t, hd) = k.dims4()?;
                if heads != self.kv_heads || hd != self.head_dim || pos + t > self.capacity {
                    return Err(EngineError::Model(format!(
                        "KV write of {t} positions at {pos} does not fit the cache"
                    )));
                }
                for (rows, x) in [(&ks[layer], k), (&vs[layer], v)] {
                    let x = x.flatten_all()?.to_vec1::<f32>()?;
                    let mut rows = rows.write().map_err(poisoned)?;
                    for (h, head) in x.chunks_exact(t * hd).enumerate() {
                        let at = (h * self.capacity + pos) * hd;
                        half::store(&mut rows[at..at + t * hd], head);
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies the first `len` positions of slot `from` into slot `to`, every layer: a
    /// cached prefix reused in another slot (prefix caching, `n` > 1).
    pub fn copy_prefix(&self, from: usize, to: usize, len: usize) -> Result<(), EngineError> {
        if from == to || len == 0 {
            return Ok(());
        }
        if len > self.capacity || from.max(to) >= self.slots.len() {
            return Err(EngineError::Model(format!(
                "KV copy of {len} positions from slot {from} to {to} does not fit the cache"
            )));
        }
        match (&self.slots[from], &self.slots[to]) {
            (Slot::F32 { k: fk, v: fv }, Slot::F32 { k: tk, v: tv }) => {
                for (src, dst) in fk.iter().zip(tk).chain(fv.iter().zip(tv)) {
                    dst.slice_set(&src.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
            }
            (Slot::F16 { k: fk, v: fv }, Slot::F16 { k: tk, v: tv }) => {
                let span = len * self.head_dim;
                for (src, dst) in fk.iter().zip(tk).chain(fv.iter().zip(tv)) {
                    let src = src.read().map_err(poisoned)?;
                    let mut dst = dst.write().map_err(poisoned)?;
                    for h in 0..self.kv_heads {
                        let at = h * self.capacity * self.head_dim;
                        dst[at..at + span].copy_from_slice(&src[at..at + span]);
                    }
                }
            }
            _ => return Err(EngineError::Model("slots of mixed KV types".into())),
        }
        Ok(())
    }

    /// One sequence's attention at one layer, over its slot's first `pos + t`
    /// positions: `q` holds its `t` new roped queries, `[1, n_head, t, head_dim]`, whose
    /// keys and values are already written. With a `window`, a query sees only the
    /// last `window` positions up to its own (llama.cpp's sliding window). Returns
    /// `[1, t, n_head * head_dim]`.
    pub fn attend(
        &self,
        (slot, layer, pos): (usize, usize, usize),
        q: &Tensor,
        window: Option<usize>,
    ) -> Result<Tensor, EngineError> {
        let t = q.dim(2)?;
        let len = pos + t;
        // Keys no query of the chunk can see are left out of the product altogether.
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        match &self.slots[slot] {
            Slot::F32 { k, v } => {
                let keys = k[layer].narrow(2, first, len - first)?;
                let values = v[layer].narrow(2, first, len - first)?;
                self.attend_views((&keys, &values), q, (pos, first), window)
            }
            Slot::F16 { k, v } => {
                let (k, v) = (
                    k[layer].read().map_err(poisoned)?,
                    v[layer].read().map_err(poisoned)?,
                );
                self.rows16((&k, &v), q, pos, window)
            }
        }
    }

    /// Attention by candle's gemm over `keys`/`values` `[1, kv_heads, len - first,
    /// head_dim]`, the positions `first..pos + t`.
    fn attend_views(
        &self,
        (keys, values): (&Tensor, &Tensor),
        q: &Tensor,
        (pos, first): (usize, usize),
        window: Option<usize>,
    ) -> Result<Tensor, EngineError> {
        let (_, n_head, t, hd) = q.dims4()?;
        let n_rep = n_head / self.kv_heads.max(1);
        let per_head = |h: usize| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((
                keys.narrow(1, h / n_rep, 1)?,
                values.narrow(1, h / n_rep, 1)?,
            ))
        };
        let heads = (0..n_head).map(per_head).collect::<Result<Vec<_>, _>>()?;
        let scores = heads
            .iter()
            .enumerate()
            .map(|(h, (k, _))| q.narrow(1, h, 1)?.matmul(&k.t()?))
            .collect::<Result<Vec<_>, _>>()?;
        let att = (Tensor::cat(&scores, 1)? / (hd as f64).sqrt())?;
        let att = if t > 1 {
            let device = q.device();
            let mask = match window {
                None => build_causal_mask(t, pos, device)?,
                Some(w) => window_mask(t, pos, first, w, device)?,
            }
            .broadcast_as(att.shape())?;
            let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as(att.shape())?;
            mask.where_cond(&neg_inf, &att)?
        } else {
            att
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let ys = heads
            .iter()
            .enumerate()
            .map(|(h, (_, v))| att.narrow(1, h, 1)?.matmul(v))
            .collect::<Result<Vec<_>, _>>()?;
        let y = Tensor::cat(&ys, 1)?; // [1, n_head, t, head_dim]
        Ok(y.transpose(1, 2)?.reshape((1, t, n_head * hd))?)
    }

    /// Queries `[1, n_head, t, head_dim]` at positions `pos..pos + t` over f16 rows,
    /// one query row at a time: scores, softmax, weighted values, per head.
    ///
    /// A row's result depends only on its position and the cached rows before it, never
    /// on how many rows share the chunk. So a prompt computed in any split (a cached
    /// prefix, a chunk, one decoded token at a time) gives the same keys, values and
    /// logits bit for bit, which is what lets prefix caching reuse any cached prefix.
    fn rows16(
        &self,
        (k, v): (&[::half::f16], &[::half::f16]),
        q: &Tensor,
        pos: usize,
        window: Option<usize>,
    ) -> Result<Tensor, EngineError> {
        let (_, n_head, t, hd) = q.dims4()?;
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let n_rep = (n_head / self.kv_heads.max(1)).max(1);
        let scale = (hd as f32).sqrt();
        let capacity = self.capacity;
        let mut out = vec![0f32; t * n_head * hd];
        let base = |kv_head: usize| kv_head * capacity * hd;
        let row = |(i, out): (usize, &mut [f32])| {
            let at = pos + i;
            let first = window.map_or(0, |w| (at + 1).saturating_sub(w));
            let mut scores = Vec::with_capacity(at + 1 - first);
            for (h, o) in out.chunks_exact_mut(hd).enumerate() {
                let q = &q[(h * t + i) * hd..(h * t + i + 1) * hd];
                let rows = base(h / n_rep) + first * hd..base(h / n_rep) + (at + 1) * hd;
                scores.clear();
                scores.resize(at + 1 - first, 0.0);
                half::scores(q, &k[rows.clone()], scale, &mut scores);
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = crate::expf::exp_sub_sum(&mut scores, max);
                for s in scores.iter_mut() {
                    *s /= sum;
                }
                half::weighted_sum(&scores, &v[rows], o);
            }
        };
        if t == 1 {
            out.chunks_exact_mut(n_head * hd).enumerate().for_each(row);
        } else {
            out.par_chunks_exact_mut(n_head * hd)
                .enumerate()
                .for_each(row);
        }
        Ok(Tensor::from_vec(out, (1, t, n_head * hd), &Device::Cpu)?)
    }
}

/// `[t, len - first]`, 1 where query `pos + i` must not see key `first + j`: a later
/// position, or one `window` or more positions back.
fn window_mask(
    t: usize,
    pos: usize,
    first: usize,
    window: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let len = pos + t;
    let mask: Vec<u8> = (0..t)
        .flat_map(|i| {
            let query = pos + i;
            (first..len).map(move |key| u8::from(key > query || key + window <= query))
        })
        .collect();
    Tensor::from_slice(&mask, (t, len - first), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values f16 holds exactly, so both caches store the same numbers and only the
    /// attention code differs.
    fn exact(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 101) % 97) as f32 - 48.0) / 32.0)
            .collect()
    }

    #[test]
    fn the_f16_cache_attends_as_the_f32_one_on_values_f16_holds_exactly() {
        let (kv_heads, hd, n_head, cap) = (2, 64, 6, 40);
        let caches = [KvDtype::F32, KvDtype::F16]
            .map(|d| KvCache::new(1, 1, (kv_heads, hd), cap, d).unwrap());
        // A prompt of 13 positions in one write, then decoding at 13, 14, 15.
        for (pos, t) in [(0, 13), (13, 1), (14, 1), (15, 1)] {
            let k = Tensor::from_vec(
                exact(kv_heads * t * hd, pos),
                (1, kv_heads, t, hd),
                &Device::Cpu,
            )
            .unwrap();
            let v = Tensor::from_vec(
                exact(kv_heads * t * hd, pos + 7),
                (1, kv_heads, t, hd),
                &Device::Cpu,
            )
            .unwrap();
            let q = Tensor::from_vec(
                exact(n_head * t * hd, pos + 3),
                (1, n_head, t, hd),
                &Device::Cpu,
            )
            .unwrap();
            for window in [None, Some(4)] {
                let outs: Vec<Vec<f32>> = caches
                    .iter()
                    .map(|c| {
                        c.write((0, 0, pos), &k, &v).unwrap();
                        let y = c.attend((0, 0, pos), &q, window).unwrap();
                        y.flatten_all().unwrap().to_vec1().unwrap()
                    })
                    .collect();
                for (a, b) in outs[0].iter().zip(&outs[1]) {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "pos {pos} window {window:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_copied_prefix_attends_as_the_original_in_both_dtypes() {
        let (kv_heads, hd, n_head, cap) = (2, 16, 4, 12);
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let c = KvCache::new(2, 1, (kv_heads, hd), cap, dtype).unwrap();
            let x = |n, seed| {
                Tensor::from_vec(exact(n, seed), (1, kv_heads, 9, hd), &Device::Cpu).unwrap()
            };
            c.write(
                (0, 0, 0),
                &x(kv_heads * 9 * hd, 1),
                &x(kv_heads * 9 * hd, 2),
            )
            .unwrap();
            c.copy_prefix(0, 1, 7).unwrap();
            let q =
                Tensor::from_vec(exact(n_head * hd, 5), (1, n_head, 1, hd), &Device::Cpu).unwrap();
            let a = c.attend((0, 0, 6), &q, None).unwrap();
            let b = c.attend((1, 0, 6), &q, None).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(a, b, "{dtype:?}");
            assert!(c.copy_prefix(0, 1, cap + 1).is_err());
        }
    }

    #[test]
    fn a_write_past_the_capacity_is_refused() {
        let c = KvCache::new(1, 1, (1, 8), 4, KvDtype::F16).unwrap();
        let x = Tensor::zeros((1, 1, 2, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(c.write((0, 0, 3), &x, &x).is_err());
    }
}
