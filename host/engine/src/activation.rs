//! The gated feed-forward activations lynx computes itself, `act(gate) * up` in one
//! vectorized pass: SiLU (llama, qwen2) and gemma's `gelu_pytorch_tanh`.
//!
//! candle calls libm per value (`expf` for SiLU, `tanhf` for GELU: 18% of a gemma
//! prefill) and multiplies by `up` in a second op. Here GELU's `0.5 x (1 + tanh(u))` is
//! its exact identity `x / (1 + e^(-2u))`, `u = sqrt(2/pi) (x + 0.044715 x^3)`, and SiLU
//! is `x / (1 + e^-x)`, both on `expf.rs`'s `e^x`, whose AVX2 and scalar paths give the
//! same bits. (At `--simd avx2-candle`, the level that is candle's arithmetic bit for
//! bit, candle's own ops run instead.) Every value goes through the same operations wherever it sits, so the
//! result depends neither on the batch nor on a value's position in it.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::expf;
use super::EngineError;

/// Values per parallel task.
const CHUNK: usize = 4096;
const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// Which activation gates the up projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Silu,
    GeluTanh,
}

/// `act(gate) * up`, elementwise, for two f32 tensors of one shape.
pub fn gated(act: Gate, gate: &Tensor, up: &Tensor) -> Result<Tensor, EngineError> {
    if gate.shape() != up.shape() || gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return Err(EngineError::Model(format!(
            "gated activation over {:?} {:?} and {:?} {:?}",
            gate.shape(),
            gate.dtype(),
            up.shape(),
            up.dtype()
        )));
    }
    if crate::qmatmul::cpu::simd() == crate::qmatmul::cpu::Simd::Avx2Candle {
        // The level that is candle's arithmetic bit for bit keeps candle's ops here too.
        let a = match act {
            Gate::Silu => candle_nn::ops::silu(gate)?,
            Gate::GeluTanh => gate.gelu()?,
        };
        return Ok(a.mul(up)?);
    }
    let shape = gate.shape().clone();
    let g = gate.flatten_all()?.to_vec1::<f32>()?;
    let u = up.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; g.len()];
    let avx2 = crate::qmatmul::cpu::has_avx2();
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| apply(act, avx2, g, u, o));
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
}

/// One value, as every lane of [`apply_avx2`] computes it.
fn one(act: Gate, x: f32, u: f32) -> f32 {
    let e = match act {
        Gate::Silu => expf::exp(-x),
        Gate::GeluTanh => {
            let t = (SQRT_TWO_OVER_PI * x) * GELU_CUBIC.mul_add(x * x, 1.0);
            expf::exp(-2.0 * t)
        }
    };
    x / (1.0 + e) * u
}

/// `o = act(g) * u` over one chunk.
fn apply(act: Gate, avx2: bool, g: &[f32], u: &[f32], o: &mut [f32]) {
    let n = if avx2 { g.len() / 8 * 8 } else { 0 };
    #[cfg(target_arch = "x86_64")]
    if n > 0 {
        // SAFETY: the CPU has AVX2 and FMA (the caller checked).
        unsafe { apply_avx2(act, &g[..n], &u[..n], &mut o[..n]) };
    }
    for ((o, &x), &u) in o[n..].iter_mut().zip(&g[n..]).zip(&u[n..]) {
        *o = one(act, x, u);
    }
}

/// # Safety
/// The CPU has AVX2 and FMA; the three slices hold the same multiple of 8 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_avx2(act: Gate, g: &[f32], u: &[f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(g.len() == u.len() && g.len() == o.len() && g.len().is_multiple_of(8));
    let (c, a) = (_mm256_set1_ps(SQRT_TWO_OVER_PI), _mm256_set1_ps(GELU_CUBIC));
    let (one, minus_two) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-2.0));
    let neg = _mm256_set1_ps(-0.0);
    for i in (0..g.len()).step_by(8) {
        // SAFETY: `i + 8 <= len` for all three slices (asserted); unaligned access.
        unsafe {
            let (x, up) = (
                _mm256_loadu_ps(g.as_ptr().add(i)),
                _mm256_loadu_ps(u.as_ptr().add(i)),
            );
            let arg = match act {
                Gate::Silu => _mm256_xor_ps(x, neg),
                Gate::GeluTanh => {
                    let t = _mm256_mul_ps(
                        _mm256_mul_ps(c, x),
                        _mm256_fmadd_ps(a, _mm256_mul_ps(x, x), one),
                    );
                    _mm256_mul_ps(minus_two, t)
                }
            };
            let e = expf::exp8(arg);
            let y = _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), up);
            _mm256_storeu_ps(o.as_mut_ptr().add(i), y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(act: Gate, x: f32, u: f32) -> f64 {
        let x = f64::from(x);
        let a = match act {
            Gate::Silu => x / (1.0 + (-x).exp()),
            Gate::GeluTanh => {
                let t = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + t.tanh())
            }
        };
        a * f64::from(u)
    }

    /// Both paths hold to an f64 reference over the range activations take, give the
    /// same bits as each other, and give a value the same bits at any position.
    #[test]
    fn gated_activations_hold_to_f64_and_do_not_depend_on_path_or_position() {
        let xs: Vec<f32> = (0..20_003).map(|i| (i as f32 - 10_000.0) / 700.0).collect();
        let ups: Vec<f32> = (0..xs.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        for act in [Gate::Silu, Gate::GeluTanh] {
            let mut scalar = vec![0f32; xs.len()];
            apply(act, false, &xs, &ups, &mut scalar);
            for ((&x, &u), &y) in xs.iter().zip(&ups).zip(&scalar) {
                let want = reference(act, x, u);
                // `e^arg` of an f32-rounded argument carries a relative error of about
                // `|arg|` ulps: the function's condition, not the kernel's (libm's of
                // the same f32 argument has it too).
                let arg = match act {
                    Gate::Silu => f64::from(x).abs(),
                    Gate::GeluTanh => {
                        2.0 * 0.8 * f64::from(x).abs() * (1.0 + 0.045 * f64::from(x * x))
                    }
                };
                let tol = 4e-7 * (1.0 + arg) * want.abs().max(f64::from(u) * 1e-3) + 1e-30;
                assert!(
                    (f64::from(y) - want).abs() <= tol,
                    "{act:?} x={x}: {y} vs {want}"
                );
            }
            if crate::qmatmul::cpu::has_avx2() {
                let mut simd = vec![0f32; xs.len()];
                apply(act, true, &xs, &ups, &mut simd);
                assert!(simd
                    .iter()
                    .zip(&scalar)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
                // The same values one place further on (a different tail).
                let mut shifted = vec![0f32; xs.len() - 1];
                apply(act, true, &xs[1..], &ups[1..], &mut shifted);
                assert!(shifted
                    .iter()
                    .zip(&scalar[1..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn the_tensor_op_is_candles_within_rounding() {
        let g = Tensor::new(&[[-3.0f32, -0.5, 0.0, 0.5, 2.0]], &Device::Cpu).unwrap();
        let u = Tensor::new(&[[1.0f32, 2.0, 3.0, 4.0, 5.0]], &Device::Cpu).unwrap();
        let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let cases = [
            (Gate::GeluTanh, g.gelu().unwrap()),
            (Gate::Silu, candle_nn::ops::silu(&g).unwrap()),
        ];
        for (act, candle) in cases {
            let got = flat(gated(act, &g, &u).unwrap());
            let want = flat(candle.mul(&u).unwrap());
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{act:?}: {a} vs {b}"
                );
            }
        }
        assert!(
            gated(Gate::Silu, &g, &g.t().unwrap()).is_err(),
            "shapes must agree"
        );
    }
}
