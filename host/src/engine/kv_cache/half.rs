//! The f16 cache's decode kernels: a query row dotted with f16 keys, and f16 values
//! accumulated with softmax weights, widened to f32 on the fly (F16C where the CPU has
//! it, chosen at run time like the matmul kernels).

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::engine::qmatmul::cpu::{self, Simd};

/// `Σ q[i] * k[i]` with `k` widened from f16.
pub fn dot(q: &[f32], k: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu::simd() == Simd::Avx2 {
        // SAFETY: `Simd::Avx2` is only ever chosen on a CPU with AVX2, FMA and F16C.
        return unsafe { avx2::dot(q, k) };
    }
    q.iter().zip(k).map(|(q, k)| q * k.to_f32()).sum()
}

/// `out[i] += p * v[i]` with `v` widened from f16.
pub fn axpy(p: f32, v: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu::simd() == Simd::Avx2 {
        // SAFETY: as in `dot`.
        return unsafe { avx2::axpy(p, v, out) };
    }
    for (o, v) in out.iter_mut().zip(v) {
        *o += p * v.to_f32();
    }
}

/// `src` rounded to f16 into `dst` (same length).
pub fn store(dst: &mut [f16], src: &[f32]) {
    dst.convert_from_f32_slice(src);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot(q: &[f32], k: &[f16]) -> f32 {
        let n = q.len().min(k.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n` elements of both are readable; the loads are unaligned.
            let (qv, kv) = unsafe {
                (
                    _mm256_loadu_ps(q[i..].as_ptr()),
                    _mm256_cvtph_ps(_mm_loadu_si128(k[i..].as_ptr().cast())),
                )
            };
            acc = _mm256_fmadd_ps(qv, kv, acc);
            i += 8;
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let mut sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        for j in i..n {
            sum += q[j] * k[j].to_f32();
        }
        sum
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn axpy(p: f32, v: &[f16], out: &mut [f32]) {
        let n = out.len().min(v.len());
        let pv = _mm256_set1_ps(p);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n` elements of both are in bounds; unaligned accesses.
            unsafe {
                let vv = _mm256_cvtph_ps(_mm_loadu_si128(v[i..].as_ptr().cast()));
                let o = _mm256_loadu_ps(out[i..].as_ptr());
                _mm256_storeu_ps(out[i..].as_mut_ptr(), _mm256_fmadd_ps(pv, vv, o));
            }
            i += 8;
        }
        for j in i..n {
            out[j] += p * v[j].to_f32();
        }
    }
}
