//! Batched quantized matmul, the kernel continuous batching runs on: one trait
//! ([`Format`]) with a file per family of block formats (`block32.rs`: Q4_0, Q4_1,
//! Q5_0, Q8_0; `kquants.rs`: Q4_K, Q5_K, Q6_K), the step's quantized activations
//! (`acts.rs`), and the SIMD level chosen at run time (`cpu.rs`).
//!
//! candle's CPU kernel dots each activation row against the whole weight matrix in
//! turn, so a step of 8 rows costs 8 single-row steps: batching would buy nothing.
//! Here each weight block is unpacked once and dotted against a tile of up to eight
//! activation rows, so adding rows to a step costs a fraction of a single-row step,
//! and the weights (most of a decode step's memory traffic) are read once per step.
//!
//! The math is candle's exactly (see each format's file): activations quantized as
//! candle's `from_float` does, the same integer dots, the same float steps. Each output
//! depends only on its own row and column, never on how many rows share the step.
//! Weights stay in the GGUF's own block layout, f16 scales included. Other formats
//! (Q2_K, Q3_K, Q5_1, F16, F32, ...) and the K-quants without AVX2 run through
//! candle's `QMatMul`, one sequence at a time so that stays batch invariant too.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};
use rayon::prelude::*;

use super::EngineError;

/// Calls the kernel instance for the tile's height (1 to 8 rows), each with its row loop
/// unrolled at compile time.
#[cfg(target_arch = "x86_64")]
macro_rules! by_height {
    ($m:ident :: $k:ident :: <$f:ident>, $col:expr, $acts:expr, $r0:expr, $out:expr) => {
        match $out.len() {
            1 => $m::$k::<$f, 1>($col, $acts, $r0, $out),
            2 => $m::$k::<$f, 2>($col, $acts, $r0, $out),
            3 => $m::$k::<$f, 3>($col, $acts, $r0, $out),
            4 => $m::$k::<$f, 4>($col, $acts, $r0, $out),
            5 => $m::$k::<$f, 5>($col, $acts, $r0, $out),
            6 => $m::$k::<$f, 6>($col, $acts, $r0, $out),
            7 => $m::$k::<$f, 7>($col, $acts, $r0, $out),
            _ => $m::$k::<$f, 8>($col, $acts, $r0, $out),
        }
    };
}

mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod block32;
pub mod cpu;
mod joined;
mod kquants;
pub mod repack;
mod tiles;
#[cfg(target_arch = "x86_64")]
mod vnni;

pub use acts::{ActKind, Acts};
use cpu::Simd;
pub use joined::Joined;

/// Values per block of the 32-value formats.
pub const QK: usize = 32;
/// Values per K-quant super-block.
pub const QK_K: usize = 256;
/// Output columns per parallel task.
const TILE_COLS: usize = 64;
/// Activation rows dotted against one unpacked weight block.
pub const TILE_ROWS: usize = 8;

/// A weight block format lynx has its own kernels for.
pub trait Format: Send + Sync {
    fn dtype(&self) -> GgmlDType;
    /// Values and bytes per block.
    fn block(&self) -> (usize, usize);
    /// The activations' quantization.
    fn acts(&self) -> ActKind;
    /// One column's blocks (`col`) dotted with activation rows `r0..r0 + out.len()`
    /// (at most [`TILE_ROWS`]).
    fn dot(&self, simd: Simd, col: &[u8], acts: &Acts, r0: usize, out: &mut [f32]);
    /// Activation row `r` dotted with consecutive columns (`cols`, `row_bytes` each),
    /// one output per column: the single-sequence step, where a format can work on
    /// several columns at once.
    fn dot_row(
        &self,
        simd: Simd,
        (cols, row_bytes): (&[u8], usize),
        acts: &Acts,
        r: usize,
        out: &mut [f32],
    ) {
        each_column(self, simd, (cols, row_bytes), acts, r, out)
    }
}

/// [`Format::dot_row`] one column at a time through [`Format::dot`]: the default, and
/// what a format's own `dot_row` falls back to.
fn each_column<F: Format + ?Sized>(
    format: &F,
    simd: Simd,
    (cols, row_bytes): (&[u8], usize),
    acts: &Acts,
    r: usize,
    out: &mut [f32],
) {
    for (c, o) in out.iter_mut().enumerate() {
        let col = &cols[c * row_bytes..(c + 1) * row_bytes];
        format.dot(simd, col, acts, r, std::slice::from_mut(o));
    }
}

/// The kernels for `dtype` at SIMD level `simd`, if lynx has them.
fn format_for(dtype: GgmlDType, simd: Simd) -> Option<&'static dyn Format> {
    Some(match (dtype, simd) {
        (GgmlDType::Q4_0, _) => &block32::FORMAT_Q4_0,
        (GgmlDType::Q4_1, _) => &block32::FORMAT_Q4_1,
        (GgmlDType::Q5_0, _) => &block32::FORMAT_Q5_0,
        (GgmlDType::Q8_0, _) => &block32::FORMAT_Q8_0,
        (GgmlDType::Q4K, s) if s.avx2() => &kquants::FORMAT_Q4K,
        (GgmlDType::Q5K, s) if s.avx2() => &kquants::FORMAT_Q5K,
        (GgmlDType::Q6K, s) if s.avx2() => &kquants::FORMAT_Q6K,
        _ => return None,
    })
}

/// A weight `[n, k]` in its GGUF blocks, row after row.
pub struct Packed {
    format: &'static dyn Format,
    simd: Simd,
    /// Output features (weight rows).
    n: usize,
    /// Input features.
    k: usize,
    /// Bytes of one weight row.
    row_bytes: usize,
    blocks: Vec<u8>,
}

/// A linear layer over GGUF weights `[n, k]`: `y = x Wᵀ`.
pub enum Linear {
    /// Repacked for the integer kernels (`Simd::Avx512Vnni`, `Simd::Avx2`).
    Repacked(Box<repack::Repacked>),
    Packed(Box<Packed>),
    Candle(QMatMul),
}

impl Linear {
    pub fn from_qtensor(t: QTensor) -> Result<Self, EngineError> {
        Self::with_simd(t, cpu::simd())
    }

    fn with_simd(t: QTensor, simd: Simd) -> Result<Self, EngineError> {
        if let Some(layout) = simd
            .layout()
            .filter(|_| repack::Spec::of(t.dtype()).is_some())
        {
            let (n, k) = t.shape().dims2()?;
            if let Some(r) = repack::Repacked::new(t.dtype(), layout, (n, k), &t.data()?) {
                return Ok(Linear::Repacked(Box::new(r)));
            }
        }
        let Some(format) = format_for(t.dtype(), simd) else {
            return Ok(Linear::Candle(QMatMul::from_qtensor(t)?));
        };
        let (n, k) = t.shape().dims2()?;
        let (values, bytes) = format.block();
        if k % values != 0 {
            return Ok(Linear::Candle(QMatMul::from_qtensor(t)?));
        }
        let blocks = t.data()?.into_owned();
        let row_bytes = k / values * bytes;
        if blocks.len() != n * row_bytes {
            return Err(EngineError::Model(format!(
                "weight of {n}x{k} has {} bytes, expected {}",
                blocks.len(),
                n * row_bytes
            )));
        }
        Ok(Linear::Packed(Box::new(Packed {
            format,
            simd,
            n,
            k,
            row_bytes,
            blocks,
        })))
    }

    /// Several layers applied to the same input (q/k/v, gate/up): the input is
    /// quantized once for all layers that share a quantization (its kind and width).
    /// `spans` are the step's sequences' row counts (see [`Linear::forward`]).
    pub fn forward_all<const N: usize>(
        layers: [&Linear; N],
        x: &Tensor,
        spans: &[usize],
    ) -> Result<[Tensor; N], EngineError> {
        let mut cached: Vec<Acts> = Vec::new();
        let mut out = Vec::with_capacity(N);
        for layer in layers {
            let Some((kind, k)) = layer.acts() else {
                out.push(layer.forward(x, spans)?);
                continue;
            };
            let at = match cached.iter().position(|a| a.kind == kind && a.k == k) {
                Some(at) => at,
                None => {
                    cached.push(quantize(x, kind, k)?);
                    cached.len() - 1
                }
            };
            out.push(layer.forward_quantized(x, &cached[at])?);
        }
        out.try_into()
            .map_err(|_| EngineError::Model("forward_all: a layer gave no output".into()))
    }

    /// `x`: `[1, rows, k]` f32 → `[1, rows, n]`. `spans` split the rows into the step's
    /// sequences (their counts, in order). Our kernels are row-independent; candle's
    /// `QMatMul` picks its kernel by the number of rows, so there each sequence's rows
    /// go through it on their own: a row's result depends on its own sequence's chunk,
    /// never on what else shares the step, and equals candle's reference fed the same
    /// chunk.
    pub fn forward(&self, x: &Tensor, spans: &[usize]) -> Result<Tensor, EngineError> {
        match self {
            Linear::Repacked(r) => self.forward_quantized(x, &quantize(x, ActKind::Q8x, r.k)?),
            Linear::Packed(p) => p.forward(x, &p.quantize(x)?),
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
                Ok(Tensor::cat(&parts, 1)?)
            }
        }
    }

    /// The activations' quantization this layer takes, and their width; `None` for
    /// candle's layers.
    fn acts(&self) -> Option<(ActKind, usize)> {
        match self {
            Linear::Repacked(r) => Some((ActKind::Q8x, r.k)),
            Linear::Packed(p) => Some((p.format.acts(), p.k)),
            Linear::Candle(_) => None,
        }
    }

    /// `x` already quantized as [`Linear::acts`] says.
    fn forward_quantized(&self, x: &Tensor, acts: &Acts) -> Result<Tensor, EngineError> {
        match self {
            Linear::Packed(p) => p.forward(x, acts),
            Linear::Repacked(r) => {
                if acts.kind != ActKind::Q8x || acts.k != r.k {
                    return Err(EngineError::Model(
                        "matmul: activations quantized for another format".into(),
                    ));
                }
                let [out] = run_repacked(r, x, acts, [r.n])?;
                Ok(out)
            }
            Linear::Candle(_) => self.forward(x, &[]),
        }
    }

    /// The block format the weights are in, and whether lynx's kernels run them.
    pub fn describe(&self) -> (String, bool) {
        match self {
            Linear::Repacked(r) => (format!("{:?}", r.spec.dtype), true),
            Linear::Packed(p) => (format!("{:?}", p.format.dtype()), true),
            Linear::Candle(QMatMul::QTensor(t)) => (format!("{:?}", t.dtype()), false),
            Linear::Candle(_) => ("float".into(), false),
        }
    }
}

/// `x` (`[.., k]`, quantized as `acts`) through a repacked weight whose columns are
/// parts of `widths` (one part: a plain matmul): `[.., n_i]` each.
fn run_repacked<const N: usize>(
    w: &repack::Repacked,
    x: &Tensor,
    acts: &Acts,
    widths: [usize; N],
) -> Result<[Tensor; N], EngineError> {
    let mut outs: Vec<Vec<f32>> = widths.iter().map(|n| vec![0f32; acts.m * n]).collect();
    let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    match w.layout {
        #[cfg(target_arch = "x86_64")]
        repack::Layout::Masks if cpu::has_avx512_vnni() => {
            // SAFETY: the CPU has the features the VNNI tiles need (just checked).
            unsafe { tiles::matmul::<vnni::Vnni>(w, acts, &mut views) }
        }
        #[cfg(target_arch = "x86_64")]
        repack::Layout::Bytes if cpu::has_avx2() => {
            // SAFETY: the CPU has the features the AVX2 tiles need (just checked).
            unsafe { tiles::matmul::<avx2::Avx2>(w, acts, &mut views) }
        }
        _ => {
            return Err(EngineError::Model(format!(
                "matmul: weights repacked for {:?} kernels this CPU cannot run",
                w.layout
            )))
        }
    }
    drop(views);
    let mut dims = x.dims().to_vec();
    dims.pop();
    let mut tensors = Vec::with_capacity(N);
    for (out, n) in outs.into_iter().zip(widths) {
        let mut d = dims.clone();
        d.push(n);
        tensors.push(Tensor::from_vec(out, d, x.device())?);
    }
    tensors
        .try_into()
        .map_err(|_| EngineError::Model("matmul: a part gave no output".into()))
}

/// `x` (`[.., k]`) quantized as `kind`, or an error if its last dimension is not `k`.
fn quantize(x: &Tensor, kind: ActKind, k: usize) -> Result<Acts, EngineError> {
    let features = x.dims().last().copied().unwrap_or(0);
    if features != k {
        return Err(EngineError::Model(format!(
            "matmul: input has {features} features, the weight {k}"
        )));
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(Acts::quantize(kind, &xs, k))
}

impl Packed {
    fn quantize(&self, x: &Tensor) -> Result<Acts, EngineError> {
        quantize(x, self.format.acts(), self.k)
    }

    /// `x` (`[.., k]`, already quantized as `acts`) → `[.., n]`.
    fn forward(&self, x: &Tensor, acts: &Acts) -> Result<Tensor, EngineError> {
        if acts.kind != self.format.acts() || acts.k != self.k {
            return Err(EngineError::Model(
                "matmul: activations quantized for another format".into(),
            ));
        }
        let mut dims = x.dims().to_vec();
        dims.pop();
        dims.push(self.n);
        Ok(Tensor::from_vec(self.matmul(acts), dims, x.device())?)
    }

    /// `[m, k]` activations → `[m, n]` row-major.
    fn matmul(&self, acts: &Acts) -> Vec<f32> {
        if acts.m == 1 {
            let mut out = vec![0f32; self.n];
            let rb = self.row_bytes;
            out.par_chunks_mut(TILE_COLS)
                .enumerate()
                .for_each(|(tile, out)| {
                    let j0 = tile * TILE_COLS;
                    let cols = &self.blocks[j0 * rb..(j0 + out.len()) * rb];
                    self.format.dot_row(self.simd, (cols, rb), acts, 0, out);
                });
            return out;
        }
        let m = acts.m.max(1);
        // Column tiles in parallel, each written column-major, then transposed.
        let mut out_t = vec![0f32; self.n * acts.m];
        out_t
            .par_chunks_mut(TILE_COLS * m)
            .enumerate()
            .for_each(|(tile, out)| {
                for (c, col_out) in out.chunks_exact_mut(m).enumerate() {
                    let j = tile * TILE_COLS + c;
                    let col = &self.blocks[j * self.row_bytes..(j + 1) * self.row_bytes];
                    for (t, rows_out) in col_out.chunks_mut(TILE_ROWS).enumerate() {
                        self.format
                            .dot(self.simd, col, acts, t * TILE_ROWS, rows_out);
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
}

#[cfg(test)]
mod tests;
