//! Kernels for the K-quants of Q4_K_M and Q5_K_M files: Q4_K, Q5_K and Q6_K,
//! super-blocks of 256 values read straight from the GGUF's blocks, dotted against Q8_K
//! activations.
//!
//! Each reproduces candle's AVX2 kernel for its format (ggml's): the same integer
//! partial sums in the same eight lanes, the same FMA per super-block, the same final
//! horizontal sums, so results are candle's bit for bit. What differs is the loop
//! order: a super-block is unpacked once and dotted with every row of the tile, where
//! candle unpacks it again for each row.
//!
//! Without AVX2 these formats run through candle's own kernels (`Linear::Candle`).

use candle_core::quantized::GgmlDType;

use super::acts::{ActKind, Acts};
use super::cpu::Simd;
use super::{Format, QK_K};

pub const Q4K: u8 = 10;
pub const Q6K: u8 = 11;
pub const Q5K: u8 = 12;

/// One of the two formats; `F` is its constant above.
pub struct KQuant<const F: u8>;

pub static FORMAT_Q4K: KQuant<Q4K> = KQuant;
pub static FORMAT_Q6K: KQuant<Q6K> = KQuant;
pub static FORMAT_Q5K: KQuant<Q5K> = KQuant;

const fn block_bytes(f: u8) -> usize {
    match f {
        // d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
        Q4K => 144,
        // Q4_K's fields, with 32 bytes of fifth bits between the scales and the nibbles.
        Q5K => 176,
        // 128 bytes of low nibbles, 64 of high bit pairs, 16 i8 scales, d (f16).
        _ => 210,
    }
}

impl<const F: u8> Format for KQuant<F> {
    fn dtype(&self) -> GgmlDType {
        match F {
            Q4K => GgmlDType::Q4K,
            Q5K => GgmlDType::Q5K,
            _ => GgmlDType::Q6K,
        }
    }

    fn block(&self) -> (usize, usize) {
        (QK_K, block_bytes(F))
    }

    fn acts(&self) -> ActKind {
        ActKind::Q8K
    }

    fn dot(&self, simd: Simd, col: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd.avx2() {
            // SAFETY: the `avx2()` levels are only ever chosen on a CPU with AVX2, FMA and F16C.
            unsafe {
                match F {
                    Q4K => by_height!(avx2::q4k::<F>, col, acts, r0, out),
                    Q5K => by_height!(avx2::q5k::<F>, col, acts, r0, out),
                    _ => by_height!(avx2::q6k::<F>, col, acts, r0, out),
                }
            }
            return;
        }
        // `available` offers these formats to the AVX2 level alone.
        let _ = (simd, col, acts, r0);
        out.fill(f32::NAN);
    }
}

/// Q4_K's twelve bytes of packed 6-bit scales and mins, unpacked (ggml's `utmp` steps).
pub fn q4k_scales(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let mut utmp = [word(0), word(1), word(2), 0];
    utmp[3] = ((utmp[2] >> 4) & KMASK2) | (((utmp[1] >> 6) & KMASK3) << 4);
    let uaux = utmp[1] & KMASK1;
    utmp[1] = (utmp[2] & KMASK2) | (((utmp[0] >> 6) & KMASK3) << 4);
    utmp[2] = uaux;
    utmp[0] &= KMASK1;
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    scales[..4].copy_from_slice(&utmp[0].to_le_bytes());
    scales[4..].copy_from_slice(&utmp[1].to_le_bytes());
    mins[..4].copy_from_slice(&utmp[2].to_le_bytes());
    mins[4..].copy_from_slice(&utmp[3].to_le_bytes());
    (scales, mins)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{block_bytes, q4k_scales, Acts};
    use crate::qmatmul::acts::Q8K;
    use crate::qmatmul::avx2::load;
    use crate::qmatmul::TILE_ROWS;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn half_at(block: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([block[at], block[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// candle's `hsum_float_8`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(x: __m256) -> f32 {
        let res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    fn check(col: &[u8], bytes: usize, acts: &Acts, r0: usize, n: usize, out: &[f32]) {
        assert!(n <= TILE_ROWS && out.len() == n && r0 + n <= acts.m);
        assert!(acts.kb.len() >= acts.m * acts.nb && col.len() >= acts.nb * bytes);
    }

    /// A K-quant super-block's eight 6-bit mins as 16-bit lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn widen_mins(mins: [u8; 8]) -> __m128i {
        let mut mins8 = [0u8; 16];
        mins8[..8].copy_from_slice(&mins);
        // SAFETY: `mins8` is 16 readable bytes; the load is unaligned.
        _mm_cvtepu8_epi16(unsafe { _mm_loadu_si128(mins8.as_ptr().cast()) })
    }

    /// Each sub-block's min times its 32 activations' sum (pairs of `bsums`), as four
    /// i32 lanes of pair sums: ggml's mins term before scaling.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn mins_dot(mins16: __m128i, y: &Q8K) -> __m128i {
        // SAFETY: `bsums` is 16 i16, 32 readable bytes; the load is unaligned.
        let q8sums = unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) };
        let q8s = _mm_hadd_epi16(
            _mm256_extracti128_si256(q8sums, 0),
            _mm256_extracti128_si256(q8sums, 1),
        );
        _mm_madd_epi16(mins16, q8s)
    }

    /// Q4_K × Q8_K for up to eight rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q4k<const F: u8, const N: usize>(col: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
        let bytes = block_bytes(F);
        check(col, bytes, acts, r0, N, out);
        let m4 = _mm256_set1_epi8(0xF);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut acc_m = [_mm_setzero_ps(); N];
        for (b, block) in col.chunks_exact(bytes).take(acts.nb).enumerate() {
            let (xd, xdmin) = (half_at(block, 0), half_at(block, 2));
            let (scales, mins) = q4k_scales(&block[4..16]);
            let mins16 = widen_mins(mins);
            // Sub-block 2j is the low nibbles of bytes 32j.., 2j + 1 the high ones.
            let mut q = [_mm256_setzero_si256(); 8];
            let mut sc = [_mm256_setzero_si256(); 8];
            for j in 0..4 {
                let bits = load(&block[16 + 32 * j..]);
                q[2 * j] = _mm256_and_si256(bits, m4);
                q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            }
            for (sc, &s) in sc.iter_mut().zip(&scales) {
                *sc = _mm256_set1_epi16(i16::from(s));
            }
            for r in 0..N {
                let y = &acts.row_k(r0 + r)[b];
                let d = y.d * xd;
                let dmin = -y.d * xdmin;
                let prod = mins_dot(mins16, y);
                acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r]);
                let mut sumi = _mm256_setzero_si256();
                for (i, (q, sc)) in q.iter().zip(&sc).enumerate() {
                    let p16 = _mm256_maddubs_epi16(*q, load(&y.qs[32 * i..]));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(*sc, p16));
                }
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[r]);
            }
        }
        for r in 0..N {
            let m = _mm_add_ps(acc_m[r], _mm_movehl_ps(acc_m[r], acc_m[r]));
            let m = _mm_add_ss(m, _mm_movehdup_ps(m));
            out[r] = hsum(acc[r]) + _mm_cvtss_f32(m);
        }
    }

    /// Bit 0 of each byte of `h` moved to bit 4 (a Q5_K value's fifth bit).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fifth(h: __m256i, one: __m256i) -> __m256i {
        _mm256_slli_epi16(_mm256_and_si256(h, one), 4)
    }

    /// Q5_K × Q8_K for up to eight rows: Q4_K's scales and mins, a fifth bit per value,
    /// and candle's float steps (the mins' term summed as a scalar per super-block).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q5k<const F: u8, const N: usize>(col: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
        let bytes = block_bytes(F);
        check(col, bytes, acts, r0, N, out);
        let m4 = _mm256_set1_epi8(0xF);
        let one = _mm256_set1_epi8(1);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut summs = [0f32; N];
        for (b, block) in col.chunks_exact(bytes).take(acts.nb).enumerate() {
            let (xd, xdmin) = (half_at(block, 0), half_at(block, 2));
            let (scales, mins) = q4k_scales(&block[4..16]);
            let mins16 = widen_mins(mins);
            let high = load(&block[16..48]);
            // Sub-block i: nibbles (low for even i, high for odd) plus bit i of `qh`.
            let mut q = [_mm256_setzero_si256(); 8];
            let mut sc = [_mm256_setzero_si256(); 8];
            for j in 0..4 {
                let bits = load(&block[48 + 32 * j..]);
                let low = _mm256_and_si256(bits, m4);
                let up = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                let (h0, h1) = match j {
                    0 => (_mm256_srli_epi16(high, 0), _mm256_srli_epi16(high, 1)),
                    1 => (_mm256_srli_epi16(high, 2), _mm256_srli_epi16(high, 3)),
                    2 => (_mm256_srli_epi16(high, 4), _mm256_srli_epi16(high, 5)),
                    _ => (_mm256_srli_epi16(high, 6), _mm256_srli_epi16(high, 7)),
                };
                q[2 * j] = _mm256_add_epi8(low, fifth(h0, one));
                q[2 * j + 1] = _mm256_add_epi8(up, fifth(h1, one));
            }
            for (sc, &s) in sc.iter_mut().zip(&scales) {
                *sc = _mm256_set1_epi16(i16::from(s));
            }
            for (r, (acc, summs)) in acc.iter_mut().zip(summs.iter_mut()).enumerate() {
                let y = &acts.row_k(r0 + r)[b];
                let d = y.d * xd;
                let dmin = -y.d * xdmin;
                let prod = mins_dot(mins16, y);
                let zero = _mm_setzero_si128();
                let total = _mm_hadd_epi32(_mm_hadd_epi32(prod, zero), zero);
                *summs += dmin * _mm_cvtsi128_si32(total) as f32;
                let mut sumi = _mm256_setzero_si256();
                for (i, (q, sc)) in q.iter().zip(&sc).enumerate() {
                    let p16 = _mm256_maddubs_epi16(*q, load(&y.qs[32 * i..]));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(*sc, p16));
                }
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), *acc);
            }
        }
        for ((o, acc), summs) in out.iter_mut().zip(acc).zip(summs) {
            *o = hsum(acc) + summs;
        }
    }

    /// Q6_K × Q8_K for up to eight rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q6k<const F: u8, const N: usize>(col: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
        let bytes = block_bytes(F);
        check(col, bytes, acts, r0, N, out);
        let m4 = _mm256_set1_epi8(0xF);
        let m2 = _mm256_set1_epi8(3);
        let m32s = _mm256_set1_epi8(32);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, block) in col.chunks_exact(bytes).take(acts.nb).enumerate() {
            let xd = half_at(block, 208);
            // Sub-block 4j + i (32 values) of half j: six-bit values 0..64.
            let mut q = [_mm256_setzero_si256(); 8];
            let mut sc = [_mm256_setzero_si256(); 8];
            for j in 0..2 {
                let bits1 = load(&block[64 * j..]);
                let bits2 = load(&block[64 * j + 32..]);
                let high = load(&block[128 + 32 * j..]);
                let h0 = _mm256_slli_epi16(_mm256_and_si256(high, m2), 4);
                let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 2), m2), 4);
                let h4 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 4), m2), 4);
                let h6 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 6), m2), 4);
                q[4 * j] = _mm256_or_si256(_mm256_and_si256(bits1, m4), h0);
                q[4 * j + 1] = _mm256_or_si256(_mm256_and_si256(bits2, m4), h2);
                q[4 * j + 2] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4), h4);
                q[4 * j + 3] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4), h6);
            }
            // Each sub-block's two scales (16 values each) over its 16-bit lanes.
            for (i, sc) in sc.iter_mut().enumerate() {
                let (lo, hi) = (block[192 + 2 * i] as i8, block[193 + 2 * i] as i8);
                *sc =
                    _mm256_set_m128i(_mm_set1_epi16(i16::from(hi)), _mm_set1_epi16(i16::from(lo)));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let y = &acts.row_k(r0 + r)[b];
                let d = y.d * xd;
                let mut sumi = _mm256_setzero_si256();
                for j in 0..2 {
                    let mut p = [_mm256_setzero_si256(); 4];
                    for (i, p) in p.iter_mut().enumerate() {
                        let y8 = load(&y.qs[128 * j + 32 * i..]);
                        let p16 = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(q[4 * j + i], y8),
                            _mm256_maddubs_epi16(m32s, y8),
                        );
                        *p = _mm256_madd_epi16(sc[4 * j + i], p16);
                    }
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[0], p[1]));
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[2], p[3]));
                }
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), *acc);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            *o = hsum(acc);
        }
    }
}
