//! Batched quantized matmul for the block formats of the default model (Q4_1 weights,
//! Q8_0 embeddings/output), the kernel continuous batching runs on.
//!
//! candle's CPU kernel dots each activation row against the whole weight matrix in turn,
//! and for Q4_1 only has a scalar path, so a step of 8 rows costs 8 single-row steps:
//! batching would buy nothing. Here each weight block is unpacked once and dotted
//! against a tile of activation rows (AVX2, ggml's integer formulation), so adding rows
//! to a step costs a fraction of a single-row step.
//!
//! The math is candle's (and ggml's) exactly: activations quantized per 32-value block to
//! 8 bits as candle's `BlockQ8_1::from_float` does; integer dot per block; one float
//! scale per block. Only the float summation order differs. Each output depends only on
//! its own row and column, never on how many rows share the step. Other block formats
//! fall back to candle's `QMatMul`.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};
use half::f16;
use rayon::prelude::*;

use super::EngineError;

const QK: usize = 32;

/// Calls the kernel instance for the tile's height (1 to 8 rows), each with its row loop
/// unrolled at compile time.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
macro_rules! by_height {
    ($($kernel:ident)::+, $q:expr, $scales:expr, $acts:expr, $r0:expr, $out:expr) => {
        match $out.len() {
            1 => $($kernel)::+::<1>($q, $scales, $acts, $r0, $out),
            2 => $($kernel)::+::<2>($q, $scales, $acts, $r0, $out),
            3 => $($kernel)::+::<3>($q, $scales, $acts, $r0, $out),
            4 => $($kernel)::+::<4>($q, $scales, $acts, $r0, $out),
            5 => $($kernel)::+::<5>($q, $scales, $acts, $r0, $out),
            6 => $($kernel)::+::<6>($q, $scales, $acts, $r0, $out),
            7 => $($kernel)::+::<7>($q, $scales, $acts, $r0, $out),
            _ => $($kernel)::+::<8>($q, $scales, $acts, $r0, $out),
        }
    };
}
/// Output columns per parallel task.
const TILE_COLS: usize = 64;
/// Activation rows dotted against one unpacked weight block.
const TILE_ROWS: usize = 8;
/// Rows from which a step's Q4_1 matmuls use the interleaved tile kernel: it always
/// computes eight rows, which costs more than the plain kernel's one or two.
const X8_MIN_ROWS: usize = 3;

/// Quantizes one block of 32 activations as candle's `BlockQ8_1::from_float` does,
/// values and f16 rounding of the scales included: `(q, d, s)` with `x ≈ d * q` and
/// `s = d * Σq`.
fn quantize_block(block: &[f32]) -> ([i8; QK], f32, f32) {
    let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, x) in qs.iter_mut().zip(block) {
        *q = (x * id).round() as i8;
        sum += i32::from(*q);
    }
    let d16 = f16::from_f32(d);
    (qs, d16.to_f32(), (f16::from_f32(sum as f32) * d16).to_f32())
}

/// A step's activations, quantized: `m` rows of `nb` blocks, each block's quants and
/// scales stored `[block][row]` (rows padded with zeros to a whole tile), so a tile's
/// eight rows of one block sit side by side and its scales load as one vector.
pub struct Acts {
    nb: usize,
    m: usize,
    stride: usize,
    qs_t: Vec<[i8; QK]>,
    d_t: Vec<f32>,
    s_t: Vec<f32>,
    /// The same quants interleaved for the Q4_1 tile kernel (empty below
    /// `X8_MIN_ROWS` rows): per
    /// block and tile of eight rows, eight vectors `g`; in vector `g`, 128-bit half `h`
    /// holds each row's pair of values `16h + 2g`, `16h + 2g + 1`, row after row. One
    /// broadcast weight pair then multiplies eight rows at once, and a block's sums
    /// build up in vertical adds instead of horizontal ones.
    qs_x: Vec<[i8; QK]>,
}

impl Acts {
    /// A tensor `[.., k]` quantized, or an error if its last dimension is not `k`.
    fn from_tensor(x: &Tensor, k: usize) -> Result<Self, EngineError> {
        let features = x.dims().last().copied().unwrap_or(0);
        if features != k || !k.is_multiple_of(QK) {
            return Err(EngineError::Model(format!(
                "matmul: input has {features} features, the weight {k}"
            )));
        }
        Ok(Self::quantize(&x.flatten_all()?.to_vec1::<f32>()?, k))
    }

    /// `xs`: `m` rows of `k` values, `k` a multiple of 32.
    pub fn quantize(xs: &[f32], k: usize) -> Self {
        let m = xs.len() / k;
        let nb = k / QK;
        let stride = m.div_ceil(TILE_ROWS).max(1) * TILE_ROWS;
        let (mut d_t, mut s_t) = (vec![0f32; nb * stride], vec![0f32; nb * stride]);
        let mut qs_t = vec![[0i8; QK]; nb * stride];
        for (r, row) in xs.chunks_exact(k).enumerate() {
            for (b, block) in row.chunks_exact(QK).enumerate() {
                let i = b * stride + r;
                (qs_t[i], d_t[i], s_t[i]) = quantize_block(block);
            }
        }
        let mut qs_x = Vec::new();
        if m >= X8_MIN_ROWS {
            qs_x = vec![[0i8; QK]; nb * stride];
            // A tile of one block: `qs_t[c * 8..][..8]` becomes `qs_x[c * 8..][..8]`.
            for (c, tile) in qs_t.chunks_exact(TILE_ROWS).enumerate() {
                for (r, qs) in tile.iter().enumerate() {
                    for (g, v) in qs_x[c * TILE_ROWS..][..TILE_ROWS].iter_mut().enumerate() {
                        for h in 0..2 {
                            let (dst, src) = (16 * h + 2 * r, 16 * h + 2 * g);
                            v[dst..dst + 2].copy_from_slice(&qs[src..src + 2]);
                        }
                    }
                }
            }
        }
        Self {
            nb,
            m,
            stride,
            qs_t,
            d_t,
            s_t,
            qs_x,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Format {
    /// `w = d * q + m`, `q` in 0..16, 16 bytes of nibbles: low nibbles are values 0..16.
    Q4_1,
    /// `w = d * q`, `q` an i8.
    Q8_0,
}

/// Weight blocks repacked for the kernel: scales as f32 beside the quants.
struct Packed {
    format: Format,
    /// Output features (weight rows).
    n: usize,
    /// Input features.
    k: usize,
    /// Per block: `(d, m)` (m = 0 for Q8_0).
    scales: Vec<(f32, f32)>,
    /// Per block: 16 bytes (Q4_1) or 32 bytes (Q8_0).
    quants: Vec<u8>,
}

/// A linear layer over GGUF weights `[n, k]`: `y = x Wᵀ`.
pub enum Linear {
    Packed(Box<PackedLinear>),
    Candle(QMatMul),
}

pub struct PackedLinear(Packed);

impl Linear {
    pub fn from_qtensor(t: QTensor) -> Result<Self, EngineError> {
        let format = match t.dtype() {
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => return Ok(Linear::Candle(QMatMul::from_qtensor(t)?)),
        };
        let (n, k) = t.shape().dims2()?;
        if k % QK != 0 {
            return Ok(Linear::Candle(QMatMul::from_qtensor(t)?));
        }
        let raw = t.data()?;
        let (block_bytes, quant_bytes) = match format {
            Format::Q4_1 => (20, 16),
            Format::Q8_0 => (34, 32),
        };
        let blocks = n * k / QK;
        if raw.len() != blocks * block_bytes {
            return Err(EngineError::Model(format!(
                "weight of {n}x{k} has {} bytes, expected {}",
                raw.len(),
                blocks * block_bytes
            )));
        }
        let mut scales = Vec::with_capacity(blocks);
        let mut quants = Vec::with_capacity(blocks * quant_bytes);
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        for block in raw.chunks_exact(block_bytes) {
            match format {
                Format::Q4_1 => {
                    scales.push((half(&block[0..2]), half(&block[2..4])));
                    quants.extend_from_slice(&block[4..20]);
                }
                Format::Q8_0 => {
                    scales.push((half(&block[0..2]), 0.0));
                    quants.extend_from_slice(&block[2..34]);
                }
            }
        }
        Ok(Linear::Packed(Box::new(PackedLinear(Packed {
            format,
            n,
            k,
            scales,
            quants,
        }))))
    }

    /// Several layers applied to the same input (q/k/v, gate/up): the input is
    /// quantized once for all of them. `spans` are the step's sequences' row counts
    /// (see [`Linear::forward`]).
    pub fn forward_all<const N: usize>(
        layers: [&Linear; N],
        x: &Tensor,
        spans: &[usize],
    ) -> Result<[Tensor; N], EngineError> {
        let mut acts: Option<(usize, Acts)> = None;
        let mut out = Vec::with_capacity(N);
        for layer in layers {
            let Linear::Packed(p) = layer else {
                out.push(layer.forward(x, spans)?);
                continue;
            };
            let k = p.0.k;
            if acts.as_ref().is_none_or(|(ak, _)| *ak != k) {
                acts = Some((k, Acts::from_tensor(x, k)?));
            }
            if let Some((_, a)) = &acts {
                out.push(p.0.forward(x, a)?);
            }
        }
        out.try_into()
            .map_err(|_| EngineError::Model("forward_all: a layer gave no output".into()))
    }

    /// `x`: `[1, rows, k]` f32 → `[1, rows, n]`. `spans` split the rows into the step's
    /// sequences (their counts, in order). Our kernels are row-independent; candle's
    /// `QMatMul` (K-quants, Q5_0, ...) picks its kernel by the number of rows, so there
    /// each sequence's rows go through it on their own: a row's result depends on its
    /// own sequence's chunk, never on what else shares the step, and equals candle's
    /// reference fed the same chunk.
    pub fn forward(&self, x: &Tensor, spans: &[usize]) -> Result<Tensor, EngineError> {
        let p = match self {
            Linear::Packed(p) => &p.0,
            Linear::Candle(m) => {
                if spans.len() <= 1 {
                    return Ok(m.forward(x)?);
                }
                let mut parts = Vec::with_capacity(spans.len());
                let mut start = 0;
                for &n in spans {
                    parts.push(m.forward(&x.narrow(1, start, n)?)?);
                    start += n;
                }
                return Ok(Tensor::cat(&parts, 1)?);
            }
        };
        p.forward(x, &Acts::from_tensor(x, p.k)?)
    }
}

impl Packed {
    /// `x` (`[.., k]`, already quantized as `acts`) → `[.., n]`.
    fn forward(&self, x: &Tensor, acts: &Acts) -> Result<Tensor, EngineError> {
        let mut dims = x.dims().to_vec();
        dims.pop();
        dims.push(self.n);
        Ok(Tensor::from_vec(self.matmul(acts), dims, x.device())?)
    }

    /// `[m, k]` activations → `[m, n]` row-major.
    fn matmul(&self, acts: &Acts) -> Vec<f32> {
        let m = acts.m.max(1);
        // Column tiles in parallel, each written column-major, then transposed.
        let mut out_t = vec![0f32; self.n * acts.m];
        out_t
            .par_chunks_mut(TILE_COLS * m)
            .enumerate()
            .for_each(|(tile, out)| {
                for (c, col_out) in out.chunks_exact_mut(m).enumerate() {
                    let j = tile * TILE_COLS + c;
                    for (t, rows_out) in col_out.chunks_mut(TILE_ROWS).enumerate() {
                        self.dot_tile(j, acts, t * TILE_ROWS, rows_out);
                    }
                }
            });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; self.n * acts.m];
        for (j, col) in out_t.chunks_exact(m).enumerate() {
            for (r, v) in col.iter().enumerate() {
                out[r * self.n + j] = *v;
            }
        }
        out
    }

    /// Column `j` dotted with activation rows `r0..r0 + out.len()`.
    fn dot_tile(&self, j: usize, acts: &Acts, r0: usize, out: &mut [f32]) {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        {
            let nb = acts.nb;
            let scales = &self.scales[j * nb..(j + 1) * nb];
            // SAFETY: this build's target has AVX2 and FMA (the cfg above).
            unsafe {
                match self.format {
                    Format::Q4_1 if acts.m >= X8_MIN_ROWS => by_height!(
                        avx2::q4_1_x8,
                        &self.quants[j * nb * 16..],
                        scales,
                        acts,
                        r0,
                        out
                    ),
                    Format::Q4_1 => by_height!(
                        avx2::q4_1,
                        &self.quants[j * nb * 16..],
                        scales,
                        acts,
                        r0,
                        out
                    ),
                    Format::Q8_0 => by_height!(
                        avx2::q8_0,
                        &self.quants[j * nb * 32..],
                        scales,
                        acts,
                        r0,
                        out
                    ),
                }
            }
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        )))]
        {
            self.dot_tile_scalar(j, acts, r0, out)
        }
    }

    /// The portable kernel; also the reference the SIMD one is tested against.
    #[cfg_attr(
        all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ),
        allow(dead_code)
    )]
    fn dot_tile_scalar(&self, j: usize, acts: &Acts, r0: usize, out: &mut [f32]) {
        let nb = acts.nb;
        for (r, o) in out.iter_mut().enumerate() {
            let mut sum = 0f32;
            for b in 0..nb {
                let at = b * acts.stride + r0 + r;
                let (qs, xd, xs) = (&acts.qs_t[at], acts.d_t[at], acts.s_t[at]);
                let (d, m) = self.scales[j * nb + b];
                let sumi: i32 = match self.format {
                    Format::Q4_1 => {
                        let q = &self.quants[(j * nb + b) * 16..][..16];
                        (0..16)
                            .map(|i| {
                                i32::from(q[i] & 0x0F) * i32::from(qs[i])
                                    + i32::from(q[i] >> 4) * i32::from(qs[i + 16])
                            })
                            .sum()
                    }
                    Format::Q8_0 => {
                        let q = &self.quants[(j * nb + b) * 32..][..32];
                        (0..32)
                            .map(|i| i32::from(q[i] as i8) * i32::from(qs[i]))
                            .sum()
                    }
                };
                sum += sumi as f32 * d * xd + m * xs;
            }
            *o = sum;
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    //! ggml's AVX2 formulation: bytes multiplied and pair-summed with `maddubs`, widened
    //! with `madd`, scaled per block with one FMA.

    use std::arch::x86_64::*;

    use super::{Acts, TILE_ROWS};

    const _: () = assert!(TILE_ROWS == 8, "q4_1 sums eight rows in AVX lanes");

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot_u8_i8(w: __m256i, y: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(w, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load32(p: &[i8; 32]) -> __m256i {
        // SAFETY: `p` is 32 readable bytes; the load is unaligned.
        unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
    }

    /// A Q4_1 block's 16 bytes as 32 values: low nibbles (values 0..16) in the low half,
    /// high nibbles (16..32) in the high half.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn unpack_q4(q: &[u8]) -> __m256i {
        assert!(q.len() >= 16);
        // SAFETY: `q` is at least 16 readable bytes; the load is unaligned.
        let tmp = unsafe { _mm_loadu_si128(q.as_ptr().cast()) };
        let low = _mm256_set1_epi8(0x0F);
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp), low)
    }

    /// One Q4_1 block's float step for eight rows, in candle's order:
    /// `sum + (sumi * d * d_x + m * s_x)`. `h` holds each row's integer dot as two 16-bit
    /// halves, lane r of each 128-bit half; `at` is the block's first row in `acts`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn add_block(sum: __m256, h: __m256i, (d, m): (f32, f32), acts: &Acts, at: usize) -> __m256 {
        let sumi = _mm256_add_epi32(
            _mm256_cvtepi16_epi32(_mm256_castsi256_si128(h)),
            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(h, 1)),
        );
        let (xd, xs) = (&acts.d_t[at..at + 8], &acts.s_t[at..at + 8]);
        // SAFETY: `xd` and `xs` are 8 readable f32 each; the loads are unaligned.
        let (xd, xs) = unsafe { (_mm256_loadu_ps(xd.as_ptr()), _mm256_loadu_ps(xs.as_ptr())) };
        let t = _mm256_mul_ps(
            _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d)),
            xd,
        );
        let u = _mm256_mul_ps(_mm256_set1_ps(m), xs);
        _mm256_add_ps(sum, _mm256_add_ps(t, u))
    }

    /// The first `out.len()` lanes of `sum` into `out`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store_rows(sum: __m256, out: &mut [f32]) {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is 32 writable bytes; the store is unaligned.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        out.copy_from_slice(&lanes[..out.len()]);
    }

    /// Q4_1 × Q8_1, bit for bit what candle's (scalar) kernel computes: the integer dot
    /// of a block is exact whatever the order, and the float steps per block,
    /// `sum += sumi * d_w * d_x + m_w * s_x`, run in candle's order, eight rows at a
    /// time in AVX lanes (separate multiplies and adds, no FMA, as Rust compiles the
    /// scalar). Exactness matters: 8-bit requantization of every layer's input turns
    /// last-bit differences into visibly different logits.
    #[target_feature(enable = "avx2,fma")]
    pub fn q4_1<const N: usize>(
        quants: &[u8],
        scales: &[(f32, f32)],
        acts: &Acts,
        r0: usize,
        out: &mut [f32],
    ) {
        let (nb, stride) = (acts.nb, acts.stride);
        assert!(N <= TILE_ROWS && out.len() == N && r0 + TILE_ROWS <= stride);
        assert!(acts.qs_t.len() >= nb * stride);
        assert!(quants.len() >= nb * 16 && scales.len() == nb);
        let mut sum = _mm256_setzero_ps();
        for (b, &(d, m)) in scales.iter().enumerate() {
            let w = unpack_q4(&quants[b * 16..b * 16 + 16]);
            let rows = &acts.qs_t[b * stride + r0..b * stride + r0 + TILE_ROWS];
            let mut p = [_mm256_setzero_si256(); TILE_ROWS];
            for r in 0..N {
                p[r] = _mm256_maddubs_epi16(w, load32(&rows[r]));
            }
            // Each 16-bit lane is at most 2 * 15 * 127 = 3810 in size, so three rounds of
            // pairwise sums (8 lanes: at most 30480) stay exact in 16 bits, and leave in
            // each half of `h` one partial sum per row, in row order. Widened and added,
            // lane r of `sumi` is row r0 + r's integer dot.
            let h = _mm256_hadd_epi16(
                _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3])),
                _mm256_hadd_epi16(_mm256_hadd_epi16(p[4], p[5]), _mm256_hadd_epi16(p[6], p[7])),
            );
            sum = add_block(sum, h, (d, m), acts, b * stride + r0);
        }
        store_rows(sum, out);
    }

    /// [`q4_1`] for a whole tile of eight rows, on the interleaved quants: each weight
    /// pair is broadcast with one shuffle and multiplies eight rows in one `maddubs`, so
    /// a block takes eight shuffles, eight multiplies and vertical adds where `q4_1`
    /// needs a tree of seven horizontal adds (four micro-ops each). The integer dots and
    /// the float steps are the same, so are the bits.
    #[target_feature(enable = "avx2,fma")]
    pub fn q4_1_x8<const N: usize>(
        quants: &[u8],
        scales: &[(f32, f32)],
        acts: &Acts,
        r0: usize,
        out: &mut [f32],
    ) {
        let (nb, stride) = (acts.nb, acts.stride);
        assert!(N <= TILE_ROWS && out.len() == N && r0 + TILE_ROWS <= stride);
        assert!(r0.is_multiple_of(TILE_ROWS) && acts.qs_x.len() >= nb * stride);
        assert!(quants.len() >= nb * 16 && scales.len() == nb);
        let mut sum = _mm256_setzero_ps();
        for (b, &(d, m)) in scales.iter().enumerate() {
            let w = unpack_q4(&quants[b * 16..b * 16 + 16]);
            let v = &acts.qs_x[b * stride + r0..b * stride + r0 + TILE_ROWS];
            let mut p = [_mm256_setzero_si256(); TILE_ROWS];
            for (g, (p, v)) in p.iter_mut().zip(v).enumerate() {
                // Bytes 2g and 2g + 1 of each half, repeated over the half.
                let pair = _mm256_set1_epi16(0x0100 + 0x0202 * g as i16);
                *p = _mm256_maddubs_epi16(_mm256_shuffle_epi8(w, pair), load32(v));
            }
            // Each lane is at most 2 * 15 * 127 = 3810 in size, eight of them 30480:
            // exact in 16 bits. Lane r of each half is row r0 + r's sum over that half.
            let h = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7])),
            );
            sum = add_block(sum, h, (d, m), acts, b * stride + r0);
        }
        store_rows(sum, out);
    }

    /// Q8_0 × Q8_0 as candle's AVX kernel computes it (FMA per block, one final sum).
    #[target_feature(enable = "avx2,fma")]
    pub fn q8_0<const N: usize>(
        quants: &[u8],
        scales: &[(f32, f32)],
        acts: &Acts,
        r0: usize,
        out: &mut [f32],
    ) {
        let (nb, stride) = (acts.nb, acts.stride);
        assert!(N <= TILE_ROWS && out.len() == N && r0 + TILE_ROWS <= stride);
        assert!(acts.qs_t.len() >= nb * stride && acts.d_t.len() >= nb * stride);
        assert!(quants.len() >= nb * 32 && scales.len() == nb);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, &(d, _)) in scales.iter().enumerate() {
            let q = &quants[b * 32..b * 32 + 32];
            // SAFETY: `q` is 32 readable bytes; the load is unaligned.
            let w = unsafe { _mm256_loadu_si256(q.as_ptr().cast()) };
            // maddubs wants its first operand unsigned: |w| and y carrying w's sign.
            let aw = _mm256_sign_epi8(w, w);
            let rows = &acts.qs_t[b * stride + r0..b * stride + r0 + TILE_ROWS];
            let xd = &acts.d_t[b * stride + r0..b * stride + r0 + TILE_ROWS];
            for r in 0..N {
                let p = dot_u8_i8(aw, _mm256_sign_epi8(load32(&rows[r]), w));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[r]), p, acc[r]);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            *o = hsum(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn weights(n: usize, k: usize, dtype: GgmlDType) -> (QTensor, Linear) {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1)
            .collect();
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let q2 = QTensor::quantize(&t, dtype).unwrap();
        (q, Linear::from_qtensor(q2).unwrap())
    }

    fn values(t: Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn input(m: usize, k: usize) -> Tensor {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104729 % 997) as f32 / 498.0 - 1.0) * 2.0)
            .collect();
        Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap()
    }

    #[test]
    fn packed_matmul_matches_candle_bit_for_bit_for_q4_1_and_q8_0() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q, ours) = weights(200, 576, dtype);
            assert!(matches!(ours, Linear::Packed(_)), "{dtype:?} not packed");
            let candle = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 3, 8, 9, 17] {
                let x = input(m, 576);
                let want = values(candle.forward(&x).unwrap());
                let got = values(ours.forward(&x, &[]).unwrap());
                assert_eq!(want.len(), got.len());
                for (w, g) in want.iter().zip(&got) {
                    // Bit for bit: last-bit differences grow through the layers.
                    assert_eq!(w.to_bits(), g.to_bits(), "{dtype:?} m={m}: {w} vs {g}");
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_whatever_else_is_in_the_step() {
        let (_, ours) = weights(130, 576, GgmlDType::Q4_1);
        let x = input(7, 576);
        let all = values(ours.forward(&x, &[]).unwrap());
        for r in 0..7 {
            let one = values(ours.forward(&x.narrow(0, r, 1).unwrap(), &[]).unwrap());
            assert_eq!(one, all[r * 130..(r + 1) * 130], "row {r}");
        }
    }

    #[test]
    fn the_simd_kernel_matches_the_portable_one() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (_, ours) = weights(70, 1536, dtype);
            let Linear::Packed(p) = &ours else {
                panic!("not packed")
            };
            let p = &p.0;
            let x = input(5, 1536);
            let acts = Acts::quantize(&values(x), 1536);
            let fast = p.matmul(&acts);
            for j in 0..70 {
                let mut slow = [0f32; 5];
                p.dot_tile_scalar(j, &acts, 0, &mut slow);
                for r in 0..5 {
                    let f = fast[r * 70 + j];
                    assert!(
                        (f - slow[r]).abs() <= 1e-4 * f.abs().max(1.0),
                        "{dtype:?}: {f} vs {}",
                        slow[r]
                    );
                }
            }
        }
    }
}
