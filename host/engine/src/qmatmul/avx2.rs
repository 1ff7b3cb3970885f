//! The AVX2 kernels over repacked weights (`repack.rs`, [`Layout::Bytes`]) and `Q8x`
//! activations, in the canonical order of `tiles.rs`, so they give the AVX-512 VNNI
//! kernels' bits on a CPU without AVX-512.
//!
//! AVX2 has no `vpdpbusd`: `vpmaddubsw` multiplies unsigned weight bytes by signed
//! activation bytes and adds pairs into i16, and `vpmaddwd` by ones widens pairs of
//! those into i32. The i16 sums are exact while they cannot pass 32767: two chunks of
//! four 6-bit values against one activation each are at most `4 · 63 · 128 = 32256`,
//! so a pair of chunks adds up in i16 before one widening. 8-bit values would overflow
//! even one pair (`2 · 255 · 128`), so their nibbles are dotted apart and the high
//! one's sum widened by 16 instead of 1.
//!
//! A unit is one half of a repacked column group: eight columns, one per f32 lane of a
//! 256-bit register. The single-row tile takes four units (32 columns), the many-row
//! tile one unit and up to four rows, what sixteen registers hold.
//!
//! [`Layout::Bytes`]: super::repack::Layout::Bytes

use std::arch::x86_64::*;

use super::acts::Acts;
use super::repack::{Repacked, BLOCK, LANES};
use super::tiles::{dispatch_tiles, Kernel, Put, Shape};

/// Columns of a unit.
const WIDTH: usize = 8;

/// The AVX2 tiles: units of eight columns.
pub struct Avx2;

impl Kernel for Avx2 {
    const WIDTH: usize = WIDTH;
    const GEMV_UNITS: usize = 4;
    const ROWS: usize = 4;

    unsafe fn tiles<const B: u8, const G: usize>(
        w: &Repacked,
        shape: Shape,
        acts: &Acts,
        u0: usize,
        units: usize,
        r0: usize,
        rows: usize,
        put: &mut Put<'_>,
    ) {
        // SAFETY: the caller's CPU has the features `tile` enables.
        unsafe {
            dispatch_tiles!(
                tile,
                // SAFETY: `__m256` is eight f32, every bit pattern a valid array.
                |v: __m256| std::mem::transmute::<__m256, [f32; WIDTH]>(v),
                (w, shape, acts, u0, units, r0, rows, put),
                1 2 3 4
            )
        }
    }
}

/// The first 32 bytes of `p` (any alignment): the one load of every AVX2 kernel.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load<T: Copy>(p: &[T]) -> __m256i {
    assert!(size_of_val(p) >= 32);
    // SAFETY: 32 readable bytes (asserted); the load is unaligned.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

/// Bit `i` of every byte of `p` moved to bit `t` (4 or 5), the others cleared.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn plane_bit(p: __m256i, i: usize, t: u32) -> __m256i {
    // Shifts of 16-bit lanes: what crosses from one byte into the next is masked off.
    let s = match t as i32 - i as i32 {
        5 => _mm256_slli_epi16::<5>(p),
        4 => _mm256_slli_epi16::<4>(p),
        3 => _mm256_slli_epi16::<3>(p),
        2 => _mm256_slli_epi16::<2>(p),
        1 => _mm256_slli_epi16::<1>(p),
        0 => p,
        -1 => _mm256_srli_epi16::<1>(p),
        -2 => _mm256_srli_epi16::<2>(p),
        _ => _mm256_srli_epi16::<3>(p),
    };
    _mm256_and_si256(s, _mm256_set1_epi8((1u8 << t) as i8))
}

/// Chunks `2l` and `2l + 1` (four values of each column) of a block's half `h`, `B`
/// bits (4 to 6).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn chunks<const B: u8>(block: &[u8], h: usize, l: usize) -> (__m256i, __m256i) {
    let v = load(&block[64 * l + 32 * h..]);
    let m4 = _mm256_set1_epi8(0x0F);
    let mut lo = _mm256_and_si256(v, m4);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
    for plane in 0..usize::from(B - 4) {
        let p = load(&block[256 + 64 * plane + 32 * h..]);
        let t = 4 + plane as u32;
        lo = _mm256_or_si256(lo, plane_bit(p, 2 * l, t));
        hi = _mm256_or_si256(hi, plane_bit(p, 2 * l + 1, t));
    }
    (lo, hi)
}

/// Eight f16 scales at `at`, widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scales(block: &[u8], at: usize) -> __m256 {
    assert!(block.len() >= at + 16);
    // SAFETY: 16 readable bytes (asserted); the load is unaligned.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(block[at..].as_ptr().cast()) })
}

/// Four activation bytes at `p`, broadcast to every lane.
///
/// # Safety
/// `p..p + 4` is readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bcast(p: *const i8) -> __m256i {
    // SAFETY: the caller's. A broadcast from memory is a load, not a shuffle.
    _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(p.cast::<i32>()) })
}

/// Units `u0..u0 + C` against rows `r0..r0 + R`: `[c][r]`, eight columns a vector.
/// `G`: groups per block (1, or 2 for Q6_K).
///
/// The inner loops run a constant number of times and the integer sums widen into i32
/// after each pair of chunks, so that every
/// accumulator stays in one of the sixteen registers (`C * R` at most 4).
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<const B: u8, const G: usize, const C: usize, const R: usize>(
    w: &Repacked,
    shape: Shape,
    u0: usize,
    acts: &Acts,
    r0: usize,
) -> [[__m256; R]; C] {
    let (k, nb) = (w.k, w.blocks);
    assert!(r0 + R <= acts.m && acts.k == k && acts.nb == nb && nb * BLOCK == k);
    assert!(acts.xq.len() >= acts.m * k && acts.xd.len() >= acts.m * nb);
    assert!(acts.xs32.len() >= acts.m * nb && acts.xs16.len() >= 2 * acts.m * nb);
    let scale_sets = if shape.mins { 2 } else { 1 };
    assert!(shape.block_bytes >= shape.q_bytes + 2 * LANES * G * scale_sets);
    let mut groups = [(&[] as &[u8], 0usize); C];
    for (c, g) in groups.iter_mut().enumerate() {
        *g = (w.group((u0 + c) / 2), 32 * ((u0 + c) % 2));
        assert!(g.0.len() >= nb * shape.block_bytes);
    }
    let xq = acts.xq.as_ptr();
    let neg_offset = _mm256_set1_ps(-shape.offset);
    let ones = _mm256_set1_epi16(1);
    let sixteen = _mm256_set1_epi16(16);
    let m4 = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    let mut acc = [[_mm256_setzero_ps(); R]; C];
    for b in 0..nb {
        // A plain loop: `array::from_fn`'s closure stayed a call per block (7% of a
        // decode step in the profile).
        let mut blocks = [&[] as &[u8]; C];
        for (block, group) in blocks.iter_mut().zip(&groups) {
            *block = &group.0[b * shape.block_bytes..(b + 1) * shape.block_bytes];
        }
        // SAFETY (every `bcast(x(r, at))` below, `at < 32`): row `r0 + r < m`, block
        // `b < nb`, of `xq`'s `m * k` bytes (asserted).
        let x = |r: usize, at: usize| unsafe { xq.add((r0 + r) * k + b * BLOCK + at) };
        for g in 0..G {
            let mut int = [[zero; R]; C];
            if B == 8 {
                for i in 0..8 {
                    for c in 0..C {
                        let v = load(&blocks[c][64 * i + groups[c].1..]);
                        let lo = _mm256_and_si256(v, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                        for (r, sum) in int[c].iter_mut().enumerate() {
                            // SAFETY: as above.
                            let q = unsafe { bcast(x(r, 4 * i)) };
                            let l = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, q), ones);
                            let h = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, q), sixteen);
                            *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(l, h));
                        }
                    }
                }
            } else {
                for p in 0..4 / G {
                    let l = g * (4 / G) + p;
                    for c in 0..C {
                        let (lo, hi) = chunks::<B>(blocks[c], groups[c].1 / 32, l);
                        for (r, sum) in int[c].iter_mut().enumerate() {
                            // SAFETY: as above.
                            let (qa, qb) = unsafe { (bcast(x(r, 8 * l)), bcast(x(r, 8 * l + 4))) };
                            let a = _mm256_maddubs_epi16(lo, qa);
                            let b = _mm256_maddubs_epi16(hi, qb);
                            let wide = _mm256_madd_epi16(_mm256_add_epi16(a, b), ones);
                            *sum = _mm256_add_epi32(*sum, wide);
                        }
                    }
                }
            }
            for c in 0..C {
                let (block, h) = (blocks[c], groups[c].1 / 32);
                let dw = scales(block, shape.q_bytes + 2 * (LANES * g + WIDTH * h));
                let mw = if shape.mins {
                    scales(block, shape.q_bytes + 2 * (LANES * (G + g) + WIDTH * h))
                } else {
                    _mm256_mul_ps(dw, neg_offset)
                };
                for r in 0..R {
                    let row = r0 + r;
                    let dx = _mm256_set1_ps(acts.xd[row * nb + b]);
                    let sx = _mm256_set1_ps(if G == 1 {
                        acts.xs32[row * nb + b]
                    } else {
                        acts.xs16[2 * (row * nb + b) + g]
                    });
                    let scale = _mm256_mul_ps(dw, dx);
                    let a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(int[c][r]), acc[c][r]);
                    acc[c][r] = _mm256_fmadd_ps(mw, sx, a);
                }
            }
        }
    }
    acc
}
