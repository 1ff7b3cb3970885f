//! The AVX-512 VNNI kernels over repacked weights (`repack.rs`) and `Q8x` activations.
//!
//! One canonical order, whatever the batch: each output `(row, column)` is a sum in 16
//! f32 lanes, one step per pair of 64 values, in pair order,
//!
//! ```text
//! acc = fma(dw * dx, float(vpdpbusd(0, q_w, q_x)), acc)
//! acc = fma(mw, s_x, acc)
//! ```
//!
//! then one fixed tree of adds over the lanes ([`hsum`]). A micro-kernel does that for
//! `C` columns and `R` rows at once, unpacking each pair of a column once for all `R`
//! rows, but every `(row, column)` goes through the same operations on the same lanes
//! at any `C` and `R`: the single-row GEMV (`C = 4, R = 1`) and the many-row GEMM
//! (`C = 2, R ≤ 8`) give the same bits, so a sequence's logits do not depend on what
//! else is in the step. The integer dot of a pair is exact; the float steps are few
//! (two FMAs a pair) and their error is that of f32 over `k / 64` steps.

use std::arch::x86_64::*;

use super::acts::{Acts, Pair};
use super::repack::{Repacked, Spec, PAIR};

/// Rows of a GEMM micro-tile.
pub const ROWS: usize = 8;

/// The kernels' view of a format: bits, 2 or 4 groups a pair, stored mins.
#[derive(Clone, Copy)]
struct Shape {
    q_bytes: usize,
    pair_bytes: usize,
    groups: usize,
    mins: bool,
    offset: f32,
}

impl Shape {
    fn of(spec: &Spec) -> Self {
        Self {
            q_bytes: spec.q_bytes(),
            pair_bytes: spec.pair_bytes(),
            groups: spec.groups,
            mins: spec.mins,
            offset: spec.offset,
        }
    }
}

/// A pair's 64 values as unsigned bytes, `B` bits each.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn unpack<const B: u8>(pair: &[u8]) -> __m512i {
    assert!(pair.len() >= if B == 8 { 64 } else { 32 + 8 * (B as usize - 4) });
    if B == 8 {
        // SAFETY: 64 readable bytes (asserted); the load is unaligned.
        return unsafe { _mm512_loadu_si512(pair.as_ptr().cast()) };
    }
    // SAFETY: 32 readable bytes (asserted); the load is unaligned.
    let v = unsafe { _mm256_loadu_si256(pair.as_ptr().cast()) };
    let m4 = _mm256_set1_epi8(0x0F);
    let lo = _mm256_and_si256(v, m4);
    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    let mut w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    if B >= 5 {
        let plane = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&pair[at..at + 8]);
            _cvtu64_mask64(u64::from_le_bytes(b))
        };
        w = _mm512_mask_add_epi8(w, plane(32), w, _mm512_set1_epi8(16));
        if B >= 6 {
            w = _mm512_mask_add_epi8(w, plane(40), w, _mm512_set1_epi8(32));
        }
    }
    w
}

/// `G` (2 or 4) f16 scales at `at`, each over 16 / G lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn scales<const G: usize>(pair: &[u8], at: usize) -> __m512 {
    let bits = if G == 2 {
        let b: [u8; 4] = [pair[at], pair[at + 1], pair[at + 2], pair[at + 3]];
        i64::from(u32::from_le_bytes(b))
    } else {
        let mut b = [0u8; 8];
        b.copy_from_slice(&pair[at..at + 8]);
        i64::from_le_bytes(b)
    };
    let h = _mm_cvtph_ps(_mm_cvtsi64_si128(bits));
    let idx = if G == 2 {
        _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
    } else {
        _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
    };
    _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(h))
}

/// The lanes' sum, always in this order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub fn hsum(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    let s = _mm256_add_ps(lo, hi);
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn load_pair(p: &Pair) -> (__m512i, __m512, __m512) {
    // SAFETY: a `Pair` is 64 bytes of quants and two arrays of 16 f32.
    unsafe {
        (
            _mm512_loadu_si512(p.q.as_ptr().cast()),
            _mm512_loadu_ps(p.d.as_ptr()),
            _mm512_loadu_ps(p.s.as_ptr()),
        )
    }
}

/// Columns `cols` (`C` of them, consecutive) against rows `r0..r0 + R`: `out[c][r]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn tile<const B: u8, const G: usize, const C: usize, const R: usize>(
    w: &Repacked,
    shape: Shape,
    j0: usize,
    acts: &Acts,
    r0: usize,
) -> [[f32; R]; C] {
    let np = w.pairs;
    assert!(j0 + C <= w.n && r0 + R <= acts.m && acts.np == np);
    assert!(acts.pairs.len() >= acts.m * np);
    let cols: [&[u8]; C] = std::array::from_fn(|c| w.col(j0 + c));
    let rows: [&[Pair]; R] = std::array::from_fn(|r| &acts.pairs[(r0 + r) * np..(r0 + r + 1) * np]);
    let neg_offset = _mm512_set1_ps(-shape.offset);
    let mut acc = [[_mm512_setzero_ps(); R]; C];
    for p in 0..np {
        let mut wq = [_mm512_setzero_si512(); C];
        let mut dw = [_mm512_setzero_ps(); C];
        let mut mw = [_mm512_setzero_ps(); C];
        for c in 0..C {
            let pair = &cols[c][p * shape.pair_bytes..(p + 1) * shape.pair_bytes];
            wq[c] = unpack::<B>(pair);
            dw[c] = scales::<G>(pair, shape.q_bytes);
            mw[c] = if shape.mins {
                scales::<G>(pair, shape.q_bytes + 2 * G)
            } else {
                _mm512_mul_ps(dw[c], neg_offset)
            };
        }
        for r in 0..R {
            let (y, dx, sx) = load_pair(&rows[r][p]);
            for c in 0..C {
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[c], y);
                let scale = _mm512_mul_ps(dw[c], dx);
                let a = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[c][r]);
                acc[c][r] = _mm512_fmadd_ps(mw[c], sx, a);
            }
        }
    }
    let mut out = [[0f32; R]; C];
    for c in 0..C {
        for r in 0..R {
            out[c][r] = hsum(acc[c][r]);
        }
    }
    out
}

/// A raw pointer to the output, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements (each its own columns) of one live buffer.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

/// `[m, k]` activations times the weight: `out`, `[m, n]` row-major.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C (`Simd::Avx512Vnni`).
pub unsafe fn matmul(w: &Repacked, acts: &Acts, out: &mut [f32]) {
    match w.spec.bits {
        4 => by_bits::<4, 2>(w, acts, out),
        5 => by_bits::<5, 2>(w, acts, out),
        6 => by_bits::<6, 4>(w, acts, out),
        _ => by_bits::<8, 2>(w, acts, out),
    }
}

fn by_bits<const B: u8, const G: usize>(w: &Repacked, acts: &Acts, out: &mut [f32]) {
    use rayon::prelude::*;
    let (n, m) = (w.n, acts.m);
    assert!(out.len() == n * m && acts.np == w.pairs && acts.k == w.k);
    let shape = Shape::of(&w.spec);
    assert_eq!(shape.groups, G, "6-bit formats have groups of 16, the others of 32");
    // Enough tasks for every thread to take several, columns in fours.
    let threads = rayon::current_num_threads().max(1);
    let per = (n / (4 * threads)).clamp(4, 64) / 4 * 4;
    let ptr = Out(out.as_mut_ptr());
    (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
        let (j0, j1) = (t * per, ((t + 1) * per).min(n));
        let put = |j: usize, r: usize, v: f32| {
            let ptr = ptr;
            debug_assert!(j < n && r < m);
            // SAFETY: `j < n`, `r < m`: inside `out`; each task writes only its own
            // columns `j0..j1`, so no two tasks write one element.
            unsafe { *ptr.0.add(r * n + j) = v };
        };
        // SAFETY (every call below): the caller's CPU has the features `tile` enables.
        unsafe {
            if m == 1 {
                let mut j = j0;
                while j + 4 <= j1 {
                    let o = tile::<B, G, 4, 1>(w, shape, j, acts, 0);
                    (0..4).for_each(|c| put(j + c, 0, o[c][0]));
                    j += 4;
                }
                for j in j..j1 {
                    put(j, 0, tile::<B, G, 1, 1>(w, shape, j, acts, 0)[0][0]);
                }
                return;
            }
            let mut j = j0;
            while j < j1 {
                let two = j + 2 <= j1;
                let mut r0 = 0;
                while r0 < m {
                    let h = (m - r0).min(ROWS);
                    macro_rules! run {
                        ($($h:literal)*) => {
                            match (two, h) {
                                $(
                                    (true, $h) => {
                                        let o = tile::<B, G, 2, $h>(w, shape, j, acts, r0);
                                        for c in 0..2 {
                                            (0..$h).for_each(|r| put(j + c, r0 + r, o[c][r]));
                                        }
                                    }
                                    (false, $h) => {
                                        let o = tile::<B, G, 1, $h>(w, shape, j, acts, r0);
                                        (0..$h).for_each(|r| put(j, r0 + r, o[0][r]));
                                    }
                                )*
                                _ => unreachable!("tile heights are 1..=8"),
                            }
                        };
                    }
                    run!(1 2 3 4 5 6 7 8);
                    r0 += h;
                }
                j += if two { 2 } else { 1 };
            }
        }
    });
}

/// The same sums without SIMD, lane for lane (the tests' check of the kernels'
/// indexing; the float steps follow the kernel's order, so it agrees to the last bits
/// or nearly).
#[cfg(test)]
pub fn reference(w: &Repacked, acts: &Acts, r: usize, j: usize) -> f64 {
    let spec = &w.spec;
    let col = w.col(j);
    let mut sum = 0f64;
    for p in 0..w.pairs {
        let pair = &col[p * spec.pair_bytes()..(p + 1) * spec.pair_bytes()];
        let q = super::repack::unpack_pair(spec, pair);
        let x = &acts.pairs[r * acts.np + p];
        let g = PAIR / spec.groups;
        let scale = |i: usize| {
            f64::from(half::f16::from_le_bytes([pair[spec.q_bytes() + 2 * i], pair[spec.q_bytes() + 2 * i + 1]]).to_f32())
        };
        for v in 0..PAIR {
            let dw = scale(v / g);
            let mw = if spec.mins {
                scale(spec.groups + v / g)
            } else {
                -f64::from(spec.offset) * dw
            };
            let dx = f64::from(x.d[v / 4]);
            sum += (dw * f64::from(q[v]) + mw) * dx * f64::from(x.q[v]);
        }
    }
    sum
}
