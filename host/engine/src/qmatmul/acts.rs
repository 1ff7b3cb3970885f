//! A step's activations quantized for the weights' integer dot: 8-bit blocks of 32
//! (what Q4_0/Q4_1/Q5_0/Q8_0 weights are dotted with) or of 256 (Q8_K, for the
//! K-quants). Each is bit for bit what candle's `from_float` writes, so the integer
//! dots are candle's.

use half::f16;
use rayon::prelude::*;

use super::{QK, QK_K, TILE_ROWS};

/// Which quantization a weight format is dotted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActKind {
    /// Blocks of 32: `x ≈ d * q`, `d` rounded to f16, with `s = d * Σq` (Q8_0 and Q8_1).
    Q8,
    /// Blocks of 256: `x ≈ d * q`, f32 `d`, sums of each 16 quants (Q8_K).
    Q8K,
    /// For the repacked weights (`repack.rs`): blocks of 32, `x ≈ d * q` with f32 `d`
    /// (no f16 rounding), row-major, with `d * Σq` of each 32 and each 16 values.
    Q8x,
}

/// One row's block of 256 as candle's `BlockQ8K`.
#[derive(Clone)]
pub struct Q8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// A step's quantized activations, `m` rows of `k` values.
pub struct Acts {
    pub kind: ActKind,
    pub k: usize,
    pub m: usize,
    /// Blocks per row.
    pub nb: usize,
    /// Rows rounded up to whole tiles: the `[block][row]` arrays' row stride.
    pub stride: usize,
    /// Q8: per block, each row's quants, `[block][row]`, so a tile's eight rows of one
    /// block sit side by side.
    pub qs_t: Vec<[i8; QK]>,
    pub d_t: Vec<f32>,
    pub s_t: Vec<f32>,
    /// Q8, eight rows or more: the same quants interleaved for the Q4_1 tile kernel.
    /// Per block and tile of eight rows, eight vectors `g`; in vector `g`, 128-bit half
    /// `h` holds each row's pair of values `16h + 2g`, `16h + 2g + 1`, row after row.
    /// One broadcast weight pair then multiplies eight rows at once.
    pub qs_x: Vec<[i8; QK]>,
    /// Q8: the scales again, `[row][block]`, so one row's scales of consecutive blocks
    /// load as one vector (the single-row kernels).
    pub d_r: Vec<f32>,
    pub s_r: Vec<f32>,
    /// Q8K: `[row][block]`.
    pub kb: Vec<Q8K>,
    /// Q8x: `[row][k]` quants, `[row][block]` scales, `[row][block]` `d * Σq`, and
    /// `[row][half block]` `d * Σq` of each 16.
    pub xq: Vec<i8>,
    pub xd: Vec<f32>,
    pub xs32: Vec<f32>,
    pub xs16: Vec<f32>,
    /// Q8x, two rows or more: the same quants per tile of [`TILE_ROWS`] rows and block,
    /// [`XT_BYTES`] each, chunk-major: chunk `j` (values `4j..4j + 4`), then row, four
    /// bytes each. A many-row VNNI tile then finds every broadcast at a constant offset
    /// from one pointer (rows past `m` are zero).
    pub xt: Vec<i8>,
    /// Q8x, two rows or more: per tile and block [`XT_FLOATS`] floats, each row's `d`,
    /// then its `d * Σq` of the 32 values, then of the first 16, then of the last 16.
    pub xt_f: Vec<f32>,
}

/// Bytes of one tile's block in [`Acts::xt`].
pub const XT_BYTES: usize = TILE_ROWS * QK;
/// Floats of one tile's block in [`Acts::xt_f`].
pub const XT_FLOATS: usize = 4 * TILE_ROWS;

/// Rows from which the Q4_1 matmuls use the interleaved tile kernel: it always
/// computes eight rows, which costs more than the plain kernel's one or two.
pub const X8_MIN_ROWS: usize = 3;

/// `v` rounded half away from zero, as `f32::round`, for `|v|` well inside `i32`
/// (quantized activations are at most 127 or so). `f32::round` is a libm call on baseline
/// x86-64, which has no `roundps`: 2.5% of a 16-sequence step; this is a truncating
/// conversion and two compares. NaN gives 0, as `round(NaN) as i8` does.
#[inline]
fn round(v: f32) -> i32 {
    let i = v as i32;
    let f = v - i as f32;
    if f >= 0.5 {
        i.saturating_add(1)
    } else if f <= -0.5 {
        i.saturating_sub(1)
    } else {
        i
    }
}

/// Quantizes one block of 32 activations as candle's `BlockQ8_1::from_float` does,
/// values and f16 rounding of the scales included: `(q, d, s)` with `x ≈ d * q` and
/// `s = d * Σq`. `BlockQ8_0::from_float` writes the same `q` and `d`.
fn quantize_block(block: &[f32]) -> ([i8; QK], f32, f32) {
    let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, x) in qs.iter_mut().zip(block) {
        *q = round(x * id).clamp(-128, 127) as i8;
        sum += i32::from(*q);
    }
    let d16 = f16::from_f32(d);
    (qs, d16.to_f32(), (f16::from_f32(sum as f32) * d16).to_f32())
}

/// One block of 256 as candle's `BlockQ8K::from_float`: scaled by the signed value of
/// largest magnitude, so that one maps to -127.
fn quantize_block_k(xs: &[f32]) -> Q8K {
    let mut out = Q8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    let (mut max, mut amax) = (0f32, 0f32);
    for &x in xs {
        if amax < x.abs() {
            amax = x.abs();
            max = x;
        }
    }
    if amax == 0.0 {
        return out;
    }
    let iscale = -127f32 / max;
    for (q, x) in out.qs.iter_mut().zip(xs) {
        *q = round(iscale * x).clamp(-128, 127) as i8;
    }
    for (sum, qs) in out.bsums.iter_mut().zip(out.qs.chunks_exact(16)) {
        *sum = qs.iter().map(|&q| i16::from(q)).sum();
    }
    out.d = 1.0 / iscale;
    out
}

/// One `Q8x` block: `q = round(x / d)` in `[-127, 127]` with `d = amax / 127`, and the
/// integer sums of each half. The AVX2 path gives the scalar one's bits: the same f32
/// multiply, rounding half away from zero, NaN to 0; integer sums are exact in any order.
fn quantize_x(avx2: bool, block: &[f32; QK], qs: &mut [i8; QK]) -> (f32, [i32; 2]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 (the caller checked).
        return unsafe { quantize_x_avx2(block, qs) };
    }
    let _ = avx2;
    let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, x) in qs.iter_mut().zip(block) {
        *q = round(x * id).clamp(-127, 127) as i8;
    }
    let sum = |qs: &[i8]| qs.iter().map(|&q| i32::from(q)).sum::<i32>();
    (d, [sum(&qs[..16]), sum(&qs[16..])])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_x_avx2(block: &[f32; QK], qs: &mut [i8; QK]) -> (f32, [i32; 2]) {
    use std::arch::x86_64::*;
    // SAFETY: each load reads 8 of the block's 32 f32 (offsets 0, 8, 16, 24).
    let x: [__m256; 4] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(block[8 * i..].as_ptr()) });
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    // `max_ps(a, m)` keeps `m` when `a` is NaN, as `f32::max` does.
    let mut m = _mm256_setzero_ps();
    for v in x {
        m = _mm256_max_ps(_mm256_and_ps(v, abs), m);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` has room for 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let amax = lanes.iter().fold(0f32, |m, x| m.max(*x));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let (half, nhalf) = (_mm256_set1_ps(0.5), _mm256_set1_ps(-0.5));
    let (hi, lo) = (_mm256_set1_epi32(127), _mm256_set1_epi32(-127));
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        let v = _mm256_mul_ps(x[i], id);
        let t = _mm256_cvttps_epi32(v);
        let f = _mm256_sub_ps(v, _mm256_cvtepi32_ps(t));
        // A compare's mask is -1: subtract it to add one, add it to subtract one.
        let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half));
        let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(f, nhalf));
        let r = _mm256_add_epi32(_mm256_sub_epi32(t, up), down);
        let r = _mm256_max_epi32(_mm256_min_epi32(r, hi), lo);
        let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
        _mm256_and_si256(r, ordered)
    });
    let sum = |a: __m256i, b: __m256i| {
        let mut l = [0i32; 8];
        // SAFETY: `l` has room for 8 i32.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr().cast(), _mm256_add_epi32(a, b)) };
        l.iter().sum::<i32>()
    };
    let sums = [sum(q[0], q[1]), sum(q[2], q[3])];
    let ab = _mm256_packs_epi32(q[0], q[1]);
    let cd = _mm256_packs_epi32(q[2], q[3]);
    let bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(ab, cd),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    );
    // SAFETY: `qs` has room for 32 bytes.
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes) };
    (d, sums)
}

impl Acts {
    /// `xs`: `m` rows of `k` values, `k` a multiple of the kind's block.
    pub fn quantize(kind: ActKind, xs: &[f32], k: usize) -> Self {
        let m = xs.len() / k.max(1);
        let stride = m.div_ceil(TILE_ROWS).max(1) * TILE_ROWS;
        let mut acts = Self {
            kind,
            k,
            m,
            nb: 0,
            stride,
            qs_t: Vec::new(),
            d_t: Vec::new(),
            s_t: Vec::new(),
            qs_x: Vec::new(),
            d_r: Vec::new(),
            s_r: Vec::new(),
            kb: Vec::new(),
            xq: Vec::new(),
            xd: Vec::new(),
            xs32: Vec::new(),
            xs16: Vec::new(),
            xt: Vec::new(),
            xt_f: Vec::new(),
        };
        match kind {
            ActKind::Q8 => acts.quantize_32(xs),
            ActKind::Q8x => acts.quantize_rows(xs),
            ActKind::Q8K => {
                acts.nb = k / QK_K;
                acts.kb = xs.chunks_exact(QK_K).map(quantize_block_k).collect();
            }
        }
        acts
    }

    fn quantize_32(&mut self, xs: &[f32]) {
        let (k, m, stride) = (self.k, self.m, self.stride);
        let nb = k / QK;
        self.nb = nb;
        self.d_t = vec![0f32; nb * stride];
        self.s_t = vec![0f32; nb * stride];
        self.qs_t = vec![[0i8; QK]; nb * stride];
        self.d_r = vec![0f32; nb * m];
        self.s_r = vec![0f32; nb * m];
        for (r, row) in xs.chunks_exact(k).enumerate() {
            for (b, block) in row.chunks_exact(QK).enumerate() {
                let i = b * stride + r;
                (self.qs_t[i], self.d_t[i], self.s_t[i]) = quantize_block(block);
                (self.d_r[r * nb + b], self.s_r[r * nb + b]) = (self.d_t[i], self.s_t[i]);
            }
        }
        if m < X8_MIN_ROWS {
            return;
        }
        self.qs_x = vec![[0i8; QK]; nb * stride];
        // A tile of one block: `qs_t[c * 8..][..8]` becomes `qs_x[c * 8..][..8]`.
        for (c, tile) in self.qs_t.chunks_exact(TILE_ROWS).enumerate() {
            for (r, qs) in tile.iter().enumerate() {
                for (g, v) in self.qs_x[c * TILE_ROWS..][..TILE_ROWS]
                    .iter_mut()
                    .enumerate()
                {
                    for h in 0..2 {
                        let (dst, src) = (16 * h + 2 * r, 16 * h + 2 * g);
                        v[dst..dst + 2].copy_from_slice(&qs[src..src + 2]);
                    }
                }
            }
        }
    }

    fn quantize_rows(&mut self, xs: &[f32]) {
        let nb = self.k / QK;
        self.nb = nb;
        self.xq = vec![0; self.m * nb * QK];
        self.xd = vec![0.0; self.m * nb];
        self.xs32 = vec![0.0; self.m * nb];
        self.xs16 = vec![0.0; 2 * self.m * nb];
        if nb == 0 {
            return;
        }
        // Rows in parallel: a prefill step quantizes hundreds of rows per layer.
        let k = self.k;
        let avx2 = super::cpu::has_avx2();
        self.xq
            .par_chunks_mut(k)
            .zip(self.xd.par_chunks_mut(nb))
            .zip(self.xs32.par_chunks_mut(nb))
            .zip(self.xs16.par_chunks_mut(2 * nb))
            .zip(xs.par_chunks(k))
            .for_each(|((((xq, xd), xs32), xs16), row)| {
                let blocks = row.chunks_exact(QK).zip(xq.chunks_exact_mut(QK));
                for (i, (block, qs)) in blocks.enumerate() {
                    let (Ok(block), Ok(qs)) = (block.try_into(), qs.try_into()) else {
                        continue;
                    };
                    let (d, sums) = quantize_x(avx2, block, qs);
                    xd[i] = d;
                    xs32[i] = d * (sums[0] + sums[1]) as f32;
                    xs16[2 * i] = d * sums[0] as f32;
                    xs16[2 * i + 1] = d * sums[1] as f32;
                }
            });
        if self.m > 1 {
            self.tiles();
        }
    }

    /// [`Acts::xt`] and [`Acts::xt_f`] from the row-major quants.
    fn tiles(&mut self) {
        let (nb, k, m) = (self.nb, self.k, self.m);
        let tiles = self.stride / TILE_ROWS;
        self.xt = vec![0; tiles * nb * XT_BYTES];
        self.xt_f = vec![0.0; tiles * nb * XT_FLOATS];
        let blocks = self.xt.chunks_exact_mut(XT_BYTES);
        let floats = self.xt_f.chunks_exact_mut(XT_FLOATS);
        for (i, (xt, xf)) in blocks.zip(floats).enumerate() {
            let (t, b) = (i / nb, i % nb);
            for r in 0..TILE_ROWS {
                let row = t * TILE_ROWS + r;
                if row >= m {
                    break;
                }
                let q = &self.xq[row * k + b * QK..row * k + (b + 1) * QK];
                for (j, chunk) in q.chunks_exact(4).enumerate() {
                    xt[j * 4 * TILE_ROWS + 4 * r..][..4].copy_from_slice(chunk);
                }
                let at = row * nb + b;
                xf[r] = self.xd[at];
                xf[TILE_ROWS + r] = self.xs32[at];
                xf[2 * TILE_ROWS + r] = self.xs16[2 * at];
                xf[3 * TILE_ROWS + r] = self.xs16[2 * at + 1];
            }
        }
    }

    /// Row `r`'s Q8K blocks.
    pub fn row_k(&self, r: usize) -> &[Q8K] {
        &self.kb[r * self.nb..(r + 1) * self.nb]
    }
}

#[cfg(test)]
mod tests {
    use super::{quantize_x, round, QK};

    /// The AVX2 quantization gives the scalar one's bits: quants, scale and sums, on
    /// blocks with exact halves, zeros, NaN and infinities among ordinary values.
    #[test]
    fn the_simd_quantization_is_the_scalar_one() {
        if !crate::qmatmul::cpu::has_avx2() {
            eprintln!("no AVX2 here: only the scalar quantization runs");
            return;
        }
        let mut seed = 0x9e37_79b9_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for case in 0..20_000 {
            let mut block = [0f32; QK];
            for x in block.iter_mut() {
                *x = (next() % 2001) as f32 / 1000.0 - 1.0;
            }
            match case % 7 {
                // Values landing exactly on halves once scaled: 127 * v / amax.
                0 => block
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = (i as f32 - 15.5) / 15.5),
                1 => block[3] = f32::NAN,
                2 => block[7] = f32::INFINITY,
                3 => block = [0.0; QK],
                4 => block[0] = -1e-30,
                _ => {}
            }
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let sa = quantize_x(false, &block, &mut a);
            let sb = quantize_x(true, &block, &mut b);
            assert_eq!(a, b, "case {case}: {block:?}");
            assert_eq!(sa.0.to_bits(), sb.0.to_bits(), "case {case}");
            assert_eq!(sa.1, sb.1, "case {case}");
        }
    }

    #[test]
    fn round_is_f32_round_on_every_quantized_range_value() {
        // Every f32 in [-140, 140] on a fine grid, the halves and their neighbours.
        let mut v = -140.0f32;
        while v <= 140.0 {
            for x in [
                v,
                v + 0.5,
                f32::from_bits((v + 0.5).to_bits() + 1),
                f32::from_bits((v + 0.5).to_bits() - 1),
            ] {
                assert_eq!(round(x), x.round() as i32, "{x}");
            }
            v += 0.013;
        }
        assert_eq!(round(f32::NAN), f32::NAN.round() as i8 as i32);
        assert_eq!(round(-0.49999997), 0);
        assert_eq!(round(0.49999997), 0);
        assert_eq!(round(2.5), 3);
        assert_eq!(round(-2.5), -3);
    }
}
