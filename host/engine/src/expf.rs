//! One `e^x` for the engine's own elementwise work (the gated activations in
//! `activation.rs`, attention's softmax in `kv_cache.rs`), eight lanes at a time with
//! AVX2 and one at a time without, giving the same bits either way.
//!
//! libm's `expf` is a call per value: 6% of a SmolLM2 prefill and 4% of a 32-stream
//! decode step. Here `e^x = 2^n p(r)`, `n = round(x log2 e)` (ties to even), `r = x -
//! n ln 2` with ln 2 split in two so that the product is exact, `p` the degree-6 Taylor
//! polynomial by Horner's rule in FMAs (error below 2^-23 on `|r| <= ln2 / 2`). Each step
//! is one correctly rounded IEEE operation in both paths, so they agree bit for bit, and
//! what a value gives depends on nothing but the value.
//!
//! Below -87 (where `e^x` leaves the normal range) and for NaN the result is 0; above
//! 88 it is `e^88`: the callers only ever add 1 to it or normalize by a sum.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

const LOW: f32 = -87.0;
const HIGH: f32 = 88.0;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// `1/k!` for the polynomial's coefficients, highest first.
const TAYLOR: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    1.0 / 2.0,
    1.0,
    1.0,
];

/// `e^x`, one value: the bits [`exp8`] gives in each lane.
pub fn exp(x: f32) -> f32 {
    if x.is_nan() || x < LOW {
        return 0.0;
    }
    let x = if x < HIGH { x } else { HIGH };
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = TAYLOR[0];
    for c in &TAYLOR[1..] {
        p = p.mul_add(r, *c);
    }
    // `n` is in [-126, 127] here: a normal power of two.
    p * f32::from_bits((((n as i32) + 127) << 23) as u32)
}

/// `e^x` in eight lanes.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp8(x: __m256) -> __m256 {
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(LOW));
    let x = _mm256_min_ps(x, _mm256_set1_ps(HIGH));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(TAYLOR[0]);
    for c in &TAYLOR[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(pow)), keep)
}

/// Softmax's numerator in place, `xs[i] = e^(xs[i] - max)`, and its sum: lane `i % 8`
/// of eight partial sums, the lanes then added in order, in both paths.
pub fn exp_sub_sum(xs: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; 8];
    // The values the AVX2 lanes take: whole vectors of eight; the rest one by one.
    let whole = if crate::qmatmul::cpu::has_avx2() {
        xs.len() / 8 * 8
    } else {
        0
    };
    #[cfg(target_arch = "x86_64")]
    if whole > 0 {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        unsafe { exp_sub_sum_avx2(&mut xs[..whole], max, &mut lanes) };
    }
    for (i, x) in xs.iter_mut().enumerate().skip(whole) {
        *x = exp(*x - max);
        lanes[i % 8] += *x;
    }
    lanes.iter().fold(0.0, |s, l| s + l)
}

/// # Safety
/// The CPU has AVX2 and FMA; `xs` holds a multiple of 8 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(xs: &mut [f32], max: f32, lanes: &mut [f32; 8]) {
    assert!(xs.len().is_multiple_of(8));
    let m = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    for i in (0..xs.len()).step_by(8) {
        // SAFETY: `i + 8 <= xs.len()` (asserted multiple of 8); unaligned access.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(xs.as_ptr().add(i)), m));
            _mm256_storeu_ps(xs.as_mut_ptr().add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
    }
    // SAFETY: `lanes` has room for 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) / 200.0).collect();
        xs.extend([0.0, -0.0, LOW, HIGH, -87.01, 88.5, f32::NAN, f32::INFINITY]);
        xs.push(f32::NEG_INFINITY);
        xs
    }

    #[test]
    fn exp_holds_to_f64_within_two_ulps_in_its_range() {
        for x in grid() {
            let got = exp(x);
            if x.is_nan() || x < LOW {
                assert_eq!(got, 0.0, "{x}");
                continue;
            }
            let want = f64::from(x.min(HIGH)).exp();
            let ulp = f64::from(f32::EPSILON) * want;
            assert!(
                (f64::from(got) - want).abs() <= 2.0 * ulp,
                "e^{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn the_avx2_lanes_give_the_scalar_bits() {
        if !crate::qmatmul::cpu::has_avx2() {
            eprintln!("no AVX2 here: only the scalar exp runs");
            return;
        }
        let xs = grid();
        for chunk in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: AVX2 checked above; 8 values each way.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(chunk.as_ptr()))) };
            for (x, g) in chunk.iter().zip(got) {
                assert_eq!(g.to_bits(), exp(*x).to_bits(), "e^{x}");
            }
        }
        // The softmax sum: the same bits through both paths, tail included.
        let scores: Vec<f32> = (0..203).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let (mut a, mut b) = (scores.clone(), scores.clone());
        let sa = exp_sub_sum(&mut a, 9.0);
        let mut lanes = [0f32; 8];
        for (i, x) in b.iter_mut().enumerate() {
            *x = exp(*x - 9.0);
            lanes[i % 8] += *x;
        }
        let sb = lanes.iter().fold(0.0, |s, l| s + l);
        assert_eq!(sa.to_bits(), sb.to_bits());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
