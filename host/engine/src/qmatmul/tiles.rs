//! What the integer kernels over repacked weights share (`vnni.rs` at AVX-512 VNNI,
//! `avx2.rs` at AVX2): the canonical order of a sum, the split of a matmul into tiles
//! and parallel tasks, and the store of each tile into the outputs of joined parts.
//!
//! One canonical order, whatever the batch and whichever of the two kernels: output
//! `(row, column)` is one f32, updated once per group of values (32, or 16 for Q6_K),
//! in group order:
//!
//! ```text
//! i   = Σ q_w * q_x                (exact integer, summed in any order)
//! acc = fma(dw * dx, float(i), acc)
//! acc = fma(mw, dx * Σq_x, acc)
//! ```
//!
//! A kernel's tiles do that for some columns ("units") and rows at a time; every
//! `(row, column)` goes through the same operations at any tile shape, so the
//! single-row GEMV and the many-row GEMM give the same bits, and a sequence's logits
//! depend neither on what else is in the step nor on which of the two kernels the CPU
//! runs ([`canonical`] is the order in plain Rust, for the tests).

use super::acts::Acts;
use super::repack::Repacked;

/// The format constants a kernel needs, read once per matmul.
#[derive(Clone, Copy)]
pub struct Shape {
    pub q_bytes: usize,
    pub block_bytes: usize,
    pub mins: bool,
    pub offset: f32,
}

impl Shape {
    fn of(w: &Repacked) -> Self {
        Self {
            q_bytes: w.spec.q_bytes(),
            block_bytes: w.spec.block_bytes(),
            mins: w.spec.mins,
            offset: w.spec.offset,
        }
    }
}

/// Where a tile's results go: `(unit, row, the unit's columns)`.
pub type Put<'a> = dyn FnMut(usize, usize, &[f32]) + 'a;

/// A family of tiles over repacked weights.
pub trait Kernel {
    /// Columns of a unit (a vector of f32 lanes).
    const WIDTH: usize;
    /// Units of the single-row tile.
    const GEMV_UNITS: usize;
    /// Most rows of a many-row tile.
    const ROWS: usize;

    /// Units `u0..u0 + units` against rows `r0..r0 + rows`, each result handed to
    /// `put`: `units` is [`Self::GEMV_UNITS`] or 1, `rows` at most [`Self::ROWS`]. `B`:
    /// bits of the values; `G`: groups per block of 32.
    ///
    /// # Safety
    /// The CPU has the kernel's features.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles<const B: u8, const G: usize>(
        w: &Repacked,
        shape: Shape,
        acts: &Acts,
        u0: usize,
        units: usize,
        r0: usize,
        rows: usize,
        put: &mut Put<'_>,
    );
}

/// The body of a [`Kernel::tiles`]: the single-row tile of `GEMV_UNITS` (4) units, or a
/// one-unit tile of `rows` rows, chosen among the heights the kernel compiles. `$tile`
/// is the kernel's `tile::<B, G, C, R>` and `$lanes` turns one of its registers into
/// the unit's columns.
macro_rules! dispatch_tiles {
    ($tile:ident, $lanes:expr, ($w:ident, $shape:ident, $acts:ident, $u0:ident, $units:ident,
     $r0:ident, $rows:ident, $put:ident), $($h:literal)*) => {{
        const { assert!(Self::GEMV_UNITS == 4) };
        let lanes = $lanes;
        if $units == 4 && $rows == 1 {
            let o = $tile::<B, G, 4, 1>($w, $shape, $u0, $acts, $r0);
            (0..4).for_each(|c| $put($u0 + c, $r0, &lanes(o[c][0])));
            return;
        }
        match $rows {
            $(
                $h => {
                    let o = $tile::<B, G, 1, $h>($w, $shape, $u0, $acts, $r0);
                    (0..$h).for_each(|r| $put($u0, $r0 + r, &lanes(o[0][r])));
                }
            )*
            _ => unreachable!("a tile height the kernel does not compile"),
        }
    }};
}
pub(super) use dispatch_tiles;

/// A raw pointer to the output, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements (each its own columns) of one live buffer.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

/// `[m, k]` activations times the weight, into `outs`: the weight's columns split in
/// consecutive parts of whole column groups (joined projections), part `i` written
/// `[m, n_i]` row-major to `outs[i]`; one part is a plain matmul.
///
/// # Safety
/// The CPU has `K`'s features.
pub unsafe fn matmul<K: Kernel>(w: &Repacked, acts: &Acts, outs: &mut [&mut [f32]]) {
    let m = acts.m;
    let mut parts = Vec::with_capacity(outs.len());
    let mut start = 0;
    for out in outs.iter_mut() {
        let n = out.len() / m.max(1);
        parts.push((start, n, Out(out.as_mut_ptr())));
        start += n;
    }
    let lanes = super::repack::LANES;
    let whole = parts
        .iter()
        .all(|&(s, n, _)| s % lanes == 0 && (n % lanes == 0 || s + n == w.n));
    assert!(
        start == w.n && whole,
        "parts of whole column groups covering the weight"
    );
    // SAFETY (each): the caller's CPU has `K`'s features.
    unsafe {
        match (w.spec.bits, w.spec.groups) {
            (4, _) => by_bits::<K, 4, 1>(w, acts, &parts),
            (5, _) => by_bits::<K, 5, 1>(w, acts, &parts),
            (6, _) => by_bits::<K, 6, 2>(w, acts, &parts),
            _ => by_bits::<K, 8, 1>(w, acts, &parts),
        }
    }
}

/// # Safety
/// As [`matmul`].
unsafe fn by_bits<K: Kernel, const B: u8, const G: usize>(
    w: &Repacked,
    acts: &Acts,
    parts: &[(usize, usize, Out)],
) {
    use rayon::prelude::*;
    let (n, m) = (w.n, acts.m);
    assert!(acts.k == w.k);
    assert_eq!(
        w.spec.groups, G,
        "6-bit formats have groups of 16, the others of 32"
    );
    let shape = Shape::of(w);
    let units = n.div_ceil(K::WIDTH);
    // Enough tasks for every thread to take several, at most 128 columns each.
    let threads = rayon::current_num_threads().max(1);
    let per = (units / (3 * threads)).clamp(1, 128 / K::WIDTH);
    (0..units.div_ceil(per)).into_par_iter().for_each(|t| {
        let (u0, u1) = (t * per, ((t + 1) * per).min(units));
        // A unit's outputs of row `r` (fewer in the last unit), into the part that
        // holds the unit.
        let mut put = |u: usize, r: usize, lanes: &[f32]| {
            let j0 = u * K::WIDTH;
            let Some(&(start, pn, ptr)) = parts.iter().rev().find(|p| p.0 <= j0) else {
                return;
            };
            let len = (n - j0).min(lanes.len()).min(start + pn - j0);
            debug_assert!(r < m && j0 + len <= start + pn);
            // SAFETY: row `r < m`, columns `j0 - start..` (`len` of them) of the part's
            // `pn`: inside its buffer of `m * pn`; each task writes only its own units,
            // so no two tasks write one element.
            let dst = unsafe { ptr.0.add(r * pn + j0 - start) };
            // A whole unit is a copy of known length (vector moves); only the last,
            // narrower one is left to `memcpy`, which costs a call per tile row.
            match (
                len,
                <&[f32; 16]>::try_from(lanes),
                <&[f32; 8]>::try_from(lanes),
            ) {
                // SAFETY (each): `dst` has `len` writable elements (above).
                (16, Ok(v), _) => unsafe { dst.cast::<[f32; 16]>().write_unaligned(*v) },
                (8, _, Ok(v)) => unsafe { dst.cast::<[f32; 8]>().write_unaligned(*v) },
                _ => unsafe { std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, len) },
            }
        };
        // SAFETY (every call below): the caller's CPU has `K`'s features.
        unsafe {
            if m == 1 {
                let mut u = u0;
                while u + K::GEMV_UNITS <= u1 {
                    K::tiles::<B, G>(w, shape, acts, u, K::GEMV_UNITS, 0, 1, &mut put);
                    u += K::GEMV_UNITS;
                }
                for u in u..u1 {
                    K::tiles::<B, G>(w, shape, acts, u, 1, 0, 1, &mut put);
                }
                return;
            }
            for u in u0..u1 {
                let mut r0 = 0;
                while r0 < m {
                    let h = (m - r0).min(K::ROWS);
                    K::tiles::<B, G>(w, shape, acts, u, 1, r0, h, &mut put);
                    r0 += h;
                }
            }
        }
    });
}

/// The canonical order for one output in plain Rust: the bits the kernels must give.
#[cfg(test)]
pub fn canonical(w: &Repacked, acts: &Acts, r: usize, j: usize) -> f32 {
    let spec = &w.spec;
    let mut acc = 0f32;
    for b in 0..w.blocks {
        let q = w.values(j, b);
        let x = &acts.xq[r * w.k + b * super::repack::BLOCK..];
        let dx = acts.xd[r * w.blocks + b];
        for g in 0..spec.groups {
            let values = g * spec.group()..(g + 1) * spec.group();
            let i: i32 = values
                .map(|v| i32::from(q[v]) * i32::from(x[v]))
                .sum::<i32>();
            let (dw, mw) = w.scales(j, b, g);
            let sx = if spec.groups == 1 {
                acts.xs32[r * w.blocks + b]
            } else {
                acts.xs16[2 * (r * w.blocks + b) + g]
            };
            acc = (dw * dx).mul_add(i as f32, acc);
            acc = mw.mul_add(sx, acc);
        }
    }
    acc
}

/// The same sum for one output in f64, group by group (the tests' check of the
/// kernels' indexing).
#[cfg(test)]
pub fn reference(w: &Repacked, acts: &Acts, r: usize, j: usize) -> f64 {
    let spec = &w.spec;
    let mut sum = 0f64;
    for b in 0..w.blocks {
        let q = w.values(j, b);
        let dx = f64::from(acts.xd[r * w.blocks + b]);
        for (v, q) in q.iter().enumerate() {
            let (dw, mw) = w.scales(j, b, v / spec.group());
            let x = f64::from(acts.xq[r * w.k + b * super::repack::BLOCK + v]);
            sum += (f64::from(dw) * f64::from(*q) + f64::from(mw)) * dx * x;
        }
    }
    sum
}
