//! Kernels for the formats of 32-value blocks: Q4_0, Q4_1, Q5_0 and Q8_0, read straight
//! from the GGUF's blocks (f16 scales beside the quants, as the file has them).
//!
//! Each reproduces the float steps of candle's kernel for its format, so results are
//! candle's bit for bit: Q4_1 and Q5_0 as candle's scalar kernel (`sum += sumi * d_w *
//! d_x [+ m_w * s_x]`, block after block), Q4_0 and Q8_0 as its AVX2 kernel (an FMA per
//! block into eight lanes, one horizontal sum at the end). The integer dot of a block
//! is exact in any order. The AVX2 versions carry a tile of up to eight rows per weight
//! block, so one unpacking serves every row of the step.

use candle_core::quantized::GgmlDType;

use super::acts::{ActKind, Acts, X8_MIN_ROWS};
use super::cpu::Simd;
use super::{each_column, Format, QK};

pub const Q4_0: u8 = 0;
pub const Q4_1: u8 = 1;
pub const Q5_0: u8 = 2;
pub const Q8_0: u8 = 3;

/// One of the four formats; `F` is its constant above.
pub struct Block32<const F: u8>;

pub static FORMAT_Q4_0: Block32<Q4_0> = Block32;
pub static FORMAT_Q4_1: Block32<Q4_1> = Block32;
pub static FORMAT_Q5_0: Block32<Q5_0> = Block32;
pub static FORMAT_Q8_0: Block32<Q8_0> = Block32;

/// Bytes of one block.
const fn block_bytes(f: u8) -> usize {
    match f {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        _ => 34,
    }
}

pub(super) fn half_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Value `i` of a block, as the integer the dot uses.
fn value<const F: u8>(block: &[u8], i: usize) -> i32 {
    let nibble = |qs: &[u8]| {
        if i < 16 {
            i32::from(qs[i] & 0x0F)
        } else {
            i32::from(qs[i - 16] >> 4)
        }
    };
    match F {
        Q4_0 => nibble(&block[2..18]) - 8,
        Q4_1 => nibble(&block[4..20]),
        Q5_0 => {
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            (nibble(&block[6..22]) | (((qh >> i) & 1) << 4) as i32) - 16
        }
        _ => i32::from(block[2 + i] as i8),
    }
}

impl<const F: u8> Format for Block32<F> {
    fn dtype(&self) -> GgmlDType {
        match F {
            Q4_0 => GgmlDType::Q4_0,
            Q4_1 => GgmlDType::Q4_1,
            Q5_0 => GgmlDType::Q5_0,
            _ => GgmlDType::Q8_0,
        }
    }

    fn block(&self) -> (usize, usize) {
        (QK, block_bytes(F))
    }

    fn acts(&self) -> ActKind {
        ActKind::Q8
    }

    fn dot(&self, simd: Simd, col: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd.avx2() {
            // SAFETY: the `avx2()` levels are only ever chosen on a CPU with AVX2, FMA and F16C
            // (`cpu::init`/`cpu::simd` detect them at run time).
            unsafe {
                match F {
                    Q4_1 | Q5_0 if out.len() == 1 => {
                        [out[0]] = avx2::lanes_row::<F, 1>(col, col.len(), acts, r0)
                    }
                    Q4_1 | Q5_0 if acts.m >= X8_MIN_ROWS => {
                        by_height!(avx2::lanes_x8::<F>, col, acts, r0, out)
                    }
                    Q4_1 | Q5_0 => by_height!(avx2::lanes::<F>, col, acts, r0, out),
                    _ => by_height!(avx2::fma::<F>, col, acts, r0, out),
                }
            }
            return;
        }
        let _ = simd;
        scalar::<F>(col, acts, r0, out)
    }

    fn dot_row(
        &self,
        simd: Simd,
        (cols, row_bytes): (&[u8], usize),
        acts: &Acts,
        r: usize,
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        // Q8_0 stays a column at a time: its 34-byte blocks from four rows at once ran
        // slower than one (`cargo bench --bench kernels`).
        if simd.avx2() && F != Q8_0 {
            let lanes = matches!(F, Q4_1 | Q5_0);
            let quads = out.len() / 4 * 4;
            let (four, rest) = out.split_at_mut(quads);
            for (q, o) in four.chunks_exact_mut(4).enumerate() {
                let cols = &cols[4 * q * row_bytes..(4 * q + 4) * row_bytes];
                // SAFETY: the `avx2()` levels are only ever chosen on a CPU with AVX2, FMA, F16C.
                o.copy_from_slice(&unsafe {
                    if lanes {
                        avx2::lanes_row::<F, 4>(cols, row_bytes, acts, r)
                    } else {
                        avx2::fma_row::<F, 4>(cols, row_bytes, acts, r)
                    }
                });
            }
            for (c, o) in rest.iter_mut().enumerate() {
                let at = (quads + c) * row_bytes;
                let col = &cols[at..at + row_bytes];
                // SAFETY: as above.
                [*o] = unsafe {
                    if lanes {
                        avx2::lanes_row::<F, 1>(col, row_bytes, acts, r)
                    } else {
                        avx2::fma_row::<F, 1>(col, row_bytes, acts, r)
                    }
                };
            }
            return;
        }
        each_column(self, simd, (cols, row_bytes), acts, r, out)
    }
}

/// The portable kernel, candle's scalar float order for every format; also the
/// reference the SIMD ones are tested against.
pub fn scalar<const F: u8>(col: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        *o = scalar_blocks::<F>(col, acts, r0 + r, 0, 0f32);
    }
}

/// Row `r`'s sum continued from `sum` over blocks `from..` of `col`, one block after
/// the other: `sum += sumi * d_w * d_x [+ m_w * s_x]`.
fn scalar_blocks<const F: u8>(col: &[u8], acts: &Acts, r: usize, from: usize, mut sum: f32) -> f32 {
    let bytes = block_bytes(F);
    for b in from..acts.nb {
        let block = &col[b * bytes..(b + 1) * bytes];
        let at = b * acts.stride + r;
        let (qs, xd) = (&acts.qs_t[at], acts.d_t[at]);
        let sumi: i32 = (0..QK)
            .map(|i| value::<F>(block, i) * i32::from(qs[i]))
            .sum();
        let d = half_at(block, 0);
        sum += if F == Q4_1 {
            sumi as f32 * d * xd + half_at(block, 2) * acts.s_t[at]
        } else {
            sumi as f32 * d * xd
        };
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! ggml's AVX2 formulation: bytes multiplied and pair-summed with `maddubs`, widened
    //! with `madd`, scaled per block.

    use std::arch::x86_64::*;

    use super::{block_bytes, Acts, Q4_0, Q4_1, Q8_0};
    use crate::qmatmul::avx2::load;
    use crate::qmatmul::TILE_ROWS;

    const _: () = assert!(
        TILE_ROWS == 8,
        "the lane kernels sum eight rows in AVX lanes"
    );

    /// The f16 at `at` of `block`, widened (exact).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn half_at(block: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([block[at], block[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 16 bytes of nibbles as 32 values: low nibbles (values 0..16) in the low half,
    /// high nibbles (16..32) in the high half.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn nibbles(q: &[u8]) -> __m256i {
        assert!(q.len() >= 16);
        // SAFETY: `q` is at least 16 readable bytes; the load is unaligned.
        let tmp = unsafe { _mm_loadu_si128(q.as_ptr().cast()) };
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// A block's 32 weights as bytes: unsigned 0..16 for Q4_1, signed otherwise.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn weights<const F: u8>(block: &[u8]) -> __m256i {
        assert!(block.len() >= block_bytes(F));
        match F {
            Q4_0 => _mm256_sub_epi8(nibbles(&block[2..18]), _mm256_set1_epi8(8)),
            Q4_1 => nibbles(&block[4..20]),
            Q8_0 => {
                // SAFETY: `block` holds 34 bytes (asserted); the load is unaligned.
                unsafe { _mm256_loadu_si256(block[2..].as_ptr().cast()) }
            }
            _ => {
                // Q5_0: byte i gets bit i of `qh` as its fifth bit; values are 0..32,
                // minus 16, so a clear bit leaves the nibble with 0xF0 or-ed in.
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(qh as i32),
                    _mm256_set_epi64x(
                        0x0303030303030303,
                        0x0202020202020202,
                        0x0101010101010101,
                        0,
                    ),
                );
                let bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
                let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, bit), _mm256_set1_epi8(-1));
                let high = _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8));
                _mm256_or_si256(nibbles(&block[6..22]), high)
            }
        }
    }

    /// The weights as `maddubs` wants its first operand (unsigned) and the sign to carry
    /// over to the activations (`None`: already unsigned).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn operand<const F: u8>(w: __m256i) -> (__m256i, Option<__m256i>) {
        if F == Q4_1 {
            (w, None)
        } else {
            (_mm256_sign_epi8(w, w), Some(w))
        }
    }

    /// One block's float step for eight rows, in candle's scalar order:
    /// `sum + (sumi * d * d_x [+ m * s_x])`, `d` (and Q4_1's `m`) read from `block`.
    /// `h` holds each row's integer dot as two 16-bit halves, lane r of each 128-bit
    /// half; `at` is the block's first row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn add_block<const F: u8>(
        sum: __m256,
        h: __m256i,
        block: &[u8],
        acts: &Acts,
        at: usize,
    ) -> __m256 {
        let sumi = widen_halves(h);
        let xd = &acts.d_t[at..at + 8];
        // SAFETY: `xd` is 8 readable f32; the load is unaligned.
        let xd = unsafe { _mm256_loadu_ps(xd.as_ptr()) };
        let d = _mm256_set1_ps(half_at(block, 0));
        let t = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sumi), d), xd);
        if F != Q4_1 {
            return _mm256_add_ps(sum, t);
        }
        let xs = &acts.s_t[at..at + 8];
        // SAFETY: `xs` is 8 readable f32; the load is unaligned.
        let xs = unsafe { _mm256_loadu_ps(xs.as_ptr()) };
        let m = _mm256_set1_ps(half_at(block, 2));
        _mm256_add_ps(sum, _mm256_add_ps(t, _mm256_mul_ps(m, xs)))
    }

    /// Eight vectors of 16-bit partial sums reduced by three rounds of pairwise adds:
    /// lane i of each 128-bit half of the result is vector i's sum over that half.
    /// Exact as long as eight lanes' sum fits 16 bits (the callers' bound: 8 * 4064).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hadd8(p: &[__m256i; 8]) -> __m256i {
        _mm256_hadd_epi16(
            _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3])),
            _mm256_hadd_epi16(_mm256_hadd_epi16(p[4], p[5]), _mm256_hadd_epi16(p[6], p[7])),
        )
    }

    /// The two 16-bit halves of each lane of `h` widened and added: eight i32 sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn widen_halves(h: __m256i) -> __m256i {
        _mm256_add_epi32(
            _mm256_cvtepi16_epi32(_mm256_castsi256_si128(h)),
            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(h, 1)),
        )
    }

    /// `y` carrying the weights' signs (`maddubs` wants unsigned weights), if they have.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn signed(y: __m256i, sign: Option<__m256i>) -> __m256i {
        match sign {
            Some(s) => _mm256_sign_epi8(y, s),
            None => y,
        }
    }

    /// The first `out.len()` lanes of `sum` into `out`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn store_rows(sum: __m256, out: &mut [f32]) {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is 32 writable bytes; the store is unaligned.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        out.copy_from_slice(&lanes[..out.len()]);
    }

    fn check(col: &[u8], bytes: usize, acts: &Acts, r0: usize, n: usize, out: &[f32]) {
        let (nb, stride) = (acts.nb, acts.stride);
        assert!(n <= TILE_ROWS && out.len() == n && r0 + TILE_ROWS <= stride);
        assert!(acts.qs_t.len() >= nb * stride && acts.d_t.len() >= nb * stride);
        assert!(acts.s_t.len() >= nb * stride && col.len() >= nb * bytes);
    }

    /// Q4_1 and Q5_0 for up to eight rows, bit for bit candle's scalar kernel: the
    /// float steps per block run in its order, eight rows at a time in AVX lanes
    /// (separate multiplies and adds, no FMA, as Rust compiles the scalar).
    /// Exactness matters: 8-bit requantization of every layer's input turns last-bit
    /// differences into visibly different logits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn lanes<const F: u8, const N: usize>(col: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
        let bytes = block_bytes(F);
        check(col, bytes, acts, r0, N, out);
        let stride = acts.stride;
        let mut sum = _mm256_setzero_ps();
        for (b, block) in col.chunks_exact(bytes).take(acts.nb).enumerate() {
            let (w, sign) = operand::<F>(weights::<F>(block));
            let rows = &acts.qs_t[b * stride + r0..b * stride + r0 + TILE_ROWS];
            let mut p = [_mm256_setzero_si256(); TILE_ROWS];
            for r in 0..N {
                let y = load(&rows[r]);
                p[r] = _mm256_maddubs_epi16(w, signed(y, sign));
            }
            // Each 16-bit lane is at most 2 * 16 * 127 = 4064 in size, so three rounds
            // of pairwise sums (8 lanes: at most 32512) stay exact in 16 bits, and leave
            // in each half of `h` one partial sum per row, in row order.
            let h = hadd8(&p);
            sum = add_block::<F>(sum, h, block, acts, b * stride + r0);
        }
        store_rows(sum, out);
    }

    /// [`lanes`] for a single row and `C` consecutive columns (`cols`, `row_bytes`
    /// each), where the eight lanes carry eight consecutive blocks instead of eight
    /// rows: each block's float step `sumi * d * d_x [+ m * s_x]` is computed in its
    /// lane, and the eight results are then added to the column's sum one after the
    /// other, in block order: candle's scalar steps, the same bits. Those additions are
    /// a chain of dependent adds; the `C` columns' chains interleave, so the core adds
    /// every cycle instead of waiting out each add's latency.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn lanes_row<const F: u8, const C: usize>(
        cols: &[u8],
        row_bytes: usize,
        acts: &Acts,
        r: usize,
    ) -> [f32; C] {
        let (bytes, nb, stride) = (block_bytes(F), acts.nb, acts.stride);
        assert!(row_bytes >= nb * bytes && cols.len() >= C * row_bytes);
        assert!(r < acts.m && acts.d_r.len() >= acts.m * nb && acts.s_r.len() >= acts.m * nb);
        assert!(acts.qs_t.len() >= nb * stride);
        let (xd_row, xs_row) = (
            &acts.d_r[r * nb..(r + 1) * nb],
            &acts.s_r[r * nb..(r + 1) * nb],
        );
        let mut sums = [0f32; C];
        for b0 in (0..nb).step_by(8) {
            // The last group may be short: its extra lanes are not added.
            let len = (nb - b0).min(8);
            let (mut xd, mut xs) = ([0f32; 8], [0f32; 8]);
            xd[..len].copy_from_slice(&xd_row[b0..b0 + len]);
            if F == Q4_1 {
                xs[..len].copy_from_slice(&xs_row[b0..b0 + len]);
            }
            // SAFETY: `xd` and `xs` are 8 readable f32; the loads are unaligned.
            let (xd, xs) = unsafe { (_mm256_loadu_ps(xd.as_ptr()), _mm256_loadu_ps(xs.as_ptr())) };
            let mut steps = [[0f32; 8]; C];
            for (c, steps) in steps.iter_mut().enumerate() {
                let col = &cols[c * row_bytes..c * row_bytes + nb * bytes];
                let mut p = [_mm256_setzero_si256(); 8];
                let (mut d16, mut m16) = ([0u16; 8], [0u16; 8]);
                // Always eight blocks, so the loop unrolls and `p` stays in registers:
                // a short group repeats its last block, whose extra lanes are not added.
                for (i, p) in p.iter_mut().enumerate() {
                    let b = (b0 + i).min(nb - 1);
                    let block = &col[b * bytes..(b + 1) * bytes];
                    let (w, sign) = operand::<F>(weights::<F>(block));
                    let y = load(&acts.qs_t[b * stride + r]);
                    *p = _mm256_maddubs_epi16(w, signed(y, sign));
                    d16[i] = u16::from_le_bytes([block[0], block[1]]);
                    if F == Q4_1 {
                        m16[i] = u16::from_le_bytes([block[2], block[3]]);
                    }
                }
                // Lane i of each half: block b0 + i's partial sums (exact, as in `lanes`).
                let h = hadd8(&p);
                let sumi = widen_halves(h);
                // SAFETY: `d16` is 16 readable bytes; the load is unaligned.
                let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(d16.as_ptr().cast()) });
                let mut t = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sumi), d), xd);
                if F == Q4_1 {
                    // SAFETY: as above.
                    let m = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(m16.as_ptr().cast()) });
                    t = _mm256_add_ps(t, _mm256_mul_ps(m, xs));
                }
                // SAFETY: `steps` is 32 writable bytes; the store is unaligned.
                unsafe { _mm256_storeu_ps(steps.as_mut_ptr(), t) };
            }
            for i in 0..len {
                for (sum, steps) in sums.iter_mut().zip(&steps) {
                    *sum += steps[i];
                }
            }
        }
        sums
    }

    /// [`lanes`] for a whole tile of eight rows, on the interleaved quants: each weight
    /// pair is broadcast with one shuffle and multiplies eight rows in one `maddubs`, so
    /// a block takes eight shuffles, eight multiplies and vertical adds where `lanes`
    /// needs a tree of seven horizontal adds. Same integer dots, same float steps, same
    /// bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn lanes_x8<const F: u8, const N: usize>(
        col: &[u8],
        acts: &Acts,
        r0: usize,
        out: &mut [f32],
    ) {
        let bytes = block_bytes(F);
        check(col, bytes, acts, r0, N, out);
        let stride = acts.stride;
        assert!(r0.is_multiple_of(TILE_ROWS) && acts.qs_x.len() >= acts.nb * stride);
        let mut sum = _mm256_setzero_ps();
        for (b, block) in col.chunks_exact(bytes).take(acts.nb).enumerate() {
            let (w, sign) = operand::<F>(weights::<F>(block));
            let v = &acts.qs_x[b * stride + r0..b * stride + r0 + TILE_ROWS];
            let mut p = [_mm256_setzero_si256(); TILE_ROWS];
            for (g, (p, v)) in p.iter_mut().zip(v).enumerate() {
                // Bytes 2g and 2g + 1 of each half, repeated over the half.
                let pair = _mm256_set1_epi16(0x0100 + 0x0202 * g as i16);
                let y = load(v);
                let sign = sign.map(|s| _mm256_shuffle_epi8(s, pair));
                *p = _mm256_maddubs_epi16(_mm256_shuffle_epi8(w, pair), signed(y, sign));
            }
            // Each lane is at most 4064 in size, eight of them 32512: exact in 16 bits.
            // Lane r of each half is row r0 + r's sum over that half.
            let h = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7])),
            );
            sum = add_block::<F>(sum, h, block, acts, b * stride + r0);
        }
        store_rows(sum, out);
    }

    /// [`fma`] for a single row and `C` consecutive columns: each column's chain of
    /// FMAs is its own (candle's order, the same bits), and the `C` chains interleave
    /// so the core is not waiting out each FMA's latency.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn fma_row<const F: u8, const C: usize>(
        cols: &[u8],
        row_bytes: usize,
        acts: &Acts,
        r: usize,
    ) -> [f32; C] {
        let (bytes, nb, stride) = (block_bytes(F), acts.nb, acts.stride);
        assert!(row_bytes >= nb * bytes && cols.len() >= C * row_bytes);
        assert!(r < acts.m && acts.d_r.len() >= acts.m * nb && acts.qs_t.len() >= nb * stride);
        let xd_row = &acts.d_r[r * nb..(r + 1) * nb];
        let mut acc = [_mm256_setzero_ps(); C];
        for (b, &xd) in xd_row.iter().enumerate() {
            let y = load(&acts.qs_t[b * stride + r]);
            for (c, acc) in acc.iter_mut().enumerate() {
                let block = &cols[c * row_bytes + b * bytes..c * row_bytes + (b + 1) * bytes];
                let w = weights::<F>(block);
                let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(half_at(block, 0) * xd), p, *acc);
            }
        }
        let mut out = [0f32; C];
        for (o, acc) in out.iter_mut().zip(acc) {
            *o = hsum(acc);
        }
        out
    }

    /// Q4_0 and Q8_0 as candle's AVX2 kernel computes them: per block and row, an FMA
    /// of `d_w * d_x` into eight lanes; one horizontal sum at the end.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn fma<const F: u8, const N: usize>(col: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
        let bytes = block_bytes(F);
        check(col, bytes, acts, r0, N, out);
        let stride = acts.stride;
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, block) in col.chunks_exact(bytes).take(acts.nb).enumerate() {
            let w = weights::<F>(block);
            let aw = _mm256_sign_epi8(w, w);
            let d = half_at(block, 0);
            let rows = &acts.qs_t[b * stride + r0..b * stride + r0 + TILE_ROWS];
            let xd = &acts.d_t[b * stride + r0..b * stride + r0 + TILE_ROWS];
            for r in 0..N {
                let p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(load(&rows[r]), w));
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[r]), p, acc[r]);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            *o = hsum(acc);
        }
    }
}
