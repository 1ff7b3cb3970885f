//! The f16 cache's attention kernels: a query row dotted with f16 keys, and f16 values
//! accumulated with softmax weights, widened to f32 on the fly (F16C where the CPU has
//! it, chosen at run time like the matmul kernels). The row kernels (`scores`,
//! `weighted_sum`) work on several keys or columns at once for speed, but each value is
//! the single-key `dot` / single-row `axpy` operation for operation.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::qmatmul::cpu;

/// `Σ q[i] * k[i]` with `k` widened from f16.
pub fn dot(q: &[f32], k: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu::simd().avx2() {
        // SAFETY: `avx2()` levels are only ever chosen on a CPU with AVX2, FMA and F16C.
        return unsafe { avx2::dot(q, k) };
    }
    q.iter().zip(k).map(|(q, k)| q * k.to_f32()).sum()
}

/// `out[i] += p * v[i]` with `v` widened from f16.
pub fn axpy(p: f32, v: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu::simd().avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::axpy(p, v, out) };
    }
    for (o, v) in out.iter_mut().zip(v) {
        *o += p * v.to_f32();
    }
}

/// `out[j] = (q · keys[j]) / scale` for each `q.len()`-value row `keys[j]`: a query's
/// scores, each exactly as [`dot`] computes it.
pub fn scores(q: &[f32], keys: &[f16], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu::simd().avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::scores(q, keys, scale, out) };
    }
    for (o, k) in out.iter_mut().zip(keys.chunks_exact(q.len().max(1))) {
        *o = dot(q, k) / scale;
    }
}

/// `out += Σ_j p[j] * values[j]` over the `out.len()`-value rows `values[j]`, in `j`
/// order: each element accumulates exactly as repeated [`axpy`] calls would.
pub fn weighted_sum(p: &[f32], values: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu::simd().avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::weighted_sum(p, values, out) };
    }
    let hd = out.len().max(1);
    for (&p, v) in p.iter().zip(values.chunks_exact(hd)) {
        axpy(p, v, out);
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
        let mut sum = hsum(acc);
        for j in i..n {
            sum += q[j] * k[j].to_f32();
        }
        sum
    }

    /// The horizontal sum `dot` ends with.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn hsum(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn scores(q: &[f32], keys: &[f16], scale: f32, out: &mut [f32]) {
        let hd = q.len();
        if hd == 0 || !hd.is_multiple_of(8) {
            for (o, k) in out.iter_mut().zip(keys.chunks_exact(hd.max(1))) {
                *o = dot(q, k) / scale;
            }
            return;
        }
        // Four keys at a time, each in its own accumulator (four independent chains
        // instead of one): every score is still `dot`'s, operation for operation.
        let mut groups = out.chunks_exact_mut(4).zip(keys.chunks_exact(4 * hd));
        for (o, k) in &mut groups {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < hd {
                // SAFETY: `i + 8 <= hd`: eight values of `q` and of each of the four
                // `hd`-value rows of `k` are readable; unaligned loads.
                unsafe {
                    let qv = _mm256_loadu_ps(q[i..].as_ptr());
                    for (r, a) in acc.iter_mut().enumerate() {
                        let kv = _mm256_cvtph_ps(_mm_loadu_si128(k[r * hd + i..].as_ptr().cast()));
                        *a = _mm256_fmadd_ps(qv, kv, *a);
                    }
                }
                i += 8;
            }
            for (o, a) in o.iter_mut().zip(acc) {
                *o = hsum(a) / scale;
            }
        }
        let done = out.len() / 4 * 4;
        for (o, k) in out[done..]
            .iter_mut()
            .zip(keys[done * hd..].chunks_exact(hd))
        {
            *o = dot(q, k) / scale;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn weighted_sum(p: &[f32], values: &[f16], out: &mut [f32]) {
        let hd = out.len();
        let rows = p.len().min(values.len() / hd.max(1));
        // Columns in registers over all rows, up to 64 at a time (eight independent
        // chains): the same fused multiply-adds, in the same row order, as `axpy`
        // row after row.
        let mut c = 0;
        while c + 64 <= hd {
            // SAFETY: columns `c..c + 64` of `out` and of every row `r < rows` of
            // `values` are in bounds; unaligned accesses.
            unsafe {
                let mut o = [_mm256_setzero_ps(); 8];
                for (b, o) in o.iter_mut().enumerate() {
                    *o = _mm256_loadu_ps(out[c + 8 * b..].as_ptr());
                }
                for (r, &pr) in p.iter().enumerate().take(rows) {
                    let pv = _mm256_set1_ps(pr);
                    for (b, o) in o.iter_mut().enumerate() {
                        let at = r * hd + c + 8 * b;
                        let vv = _mm256_cvtph_ps(_mm_loadu_si128(values[at..].as_ptr().cast()));
                        *o = _mm256_fmadd_ps(pv, vv, *o);
                    }
                }
                for (b, o) in o.iter().enumerate() {
                    _mm256_storeu_ps(out[c + 8 * b..].as_mut_ptr(), *o);
                }
            }
            c += 64;
        }
        while c + 8 <= hd {
            // SAFETY: as above, for columns `c..c + 8`.
            unsafe {
                let mut o = _mm256_loadu_ps(out[c..].as_ptr());
                for (r, &pr) in p.iter().enumerate().take(rows) {
                    let at = r * hd + c;
                    let vv = _mm256_cvtph_ps(_mm_loadu_si128(values[at..].as_ptr().cast()));
                    o = _mm256_fmadd_ps(_mm256_set1_ps(pr), vv, o);
                }
                _mm256_storeu_ps(out[c..].as_mut_ptr(), o);
            }
            c += 8;
        }
        for (r, &pr) in p.iter().enumerate().take(rows) {
            for j in c..hd {
                out[j] += pr * values[r * hd + j].to_f32();
            }
        }
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

#[cfg(test)]
mod row_tests {
    use super::*;

    /// The row kernels are what `dot` and `axpy` compute, bit for bit: decoding (one
    /// query) and a prompt chunk must give the same numbers.
    #[test]
    fn scores_and_weighted_sums_are_dot_and_axpy_exactly() {
        for hd in [8, 12, 64, 72, 256] {
            for rows in [1, 3, 4, 5, 9] {
                let q: Vec<f32> = (0..hd).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
                let kv: Vec<f16> = (0..rows * hd)
                    .map(|i| f16::from_f32(((i * 11 % 17) as f32 - 8.0) / 9.0))
                    .collect();
                let mut got = vec![0f32; rows];
                scores(&q, &kv, 8.0, &mut got);
                let want: Vec<f32> = kv.chunks_exact(hd).map(|k| dot(&q, k) / 8.0).collect();
                assert_eq!(got, want, "scores, hd {hd}, rows {rows}");
                let p: Vec<f32> = (0..rows).map(|r| 1.0 / (r as f32 + 1.5)).collect();
                let mut got = q.clone();
                weighted_sum(&p, &kv, &mut got);
                let mut want = q.clone();
                for (&p, v) in p.iter().zip(kv.chunks_exact(hd)) {
                    axpy(p, v, &mut want);
                }
                assert_eq!(got, want, "weighted sum, hd {hd}, rows {rows}");
            }
        }
    }
}
