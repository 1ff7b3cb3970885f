//! The kernels against candle's, format by format.

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::Device;

use super::*;

use super::repack::FORMATS;

fn weights(n: usize, k: usize) -> Vec<f32> {
    (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1 + (i % 7) as f32 * 0.003)
        .collect()
}

fn input(m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| ((i * 104729 % 997) as f32 / 498.0 - 1.0) * 2.0)
        .collect()
}

fn linear(w: &[f32], (n, k): (usize, usize), dtype: GgmlDType, simd: Simd) -> Linear {
    let t = Tensor::from_slice(w, (n, k), &Device::Cpu).unwrap();
    Linear::with_simd(QTensor::quantize(&t, dtype).unwrap(), simd).unwrap()
}

fn run(l: &Linear, x: &[f32], k: usize) -> Vec<f32> {
    let x = Tensor::from_slice(x, (x.len() / k, k), &Device::Cpu).unwrap();
    l.forward(&x, &[])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// candle's own kernel (`GgmlType::vec_dot`, the one its CPU backend calls per row and
/// column), on blocks its own `from_float` wrote.
fn candle_reference<T: GgmlType>(w: &[f32], (n, k): (usize, usize), x: &[f32]) -> Vec<f32> {
    let per_row = k / T::BLCK_SIZE;
    let mut wb: Vec<T> = (0..n * per_row).map(|_| T::zeros()).collect();
    T::from_float(w, &mut wb);
    let mut out = Vec::new();
    for row in x.chunks_exact(k) {
        let mut yb: Vec<T::VecDotType> = (0..k / T::VecDotType::BLCK_SIZE)
            .map(|_| T::VecDotType::zeros())
            .collect();
        T::VecDotType::from_float(row, &mut yb);
        for j in 0..n {
            out.push(T::vec_dot(k, &wb[j * per_row..(j + 1) * per_row], &yb));
        }
    }
    out
}

fn reference(dtype: GgmlDType, w: &[f32], nk: (usize, usize), x: &[f32]) -> Vec<f32> {
    match dtype {
        GgmlDType::Q4_0 => candle_reference::<BlockQ4_0>(w, nk, x),
        GgmlDType::Q4_1 => candle_reference::<BlockQ4_1>(w, nk, x),
        GgmlDType::Q5_0 => candle_reference::<BlockQ5_0>(w, nk, x),
        GgmlDType::Q8_0 => candle_reference::<BlockQ8_0>(w, nk, x),
        GgmlDType::Q4K => candle_reference::<BlockQ4K>(w, nk, x),
        GgmlDType::Q5K => candle_reference::<BlockQ5K>(w, nk, x),
        _ => candle_reference::<BlockQ6K>(w, nk, x),
    }
}

#[test]
fn every_format_matches_candles_kernel_bit_for_bit_at_every_batch_height() {
    // The first AVX2 kernels and the portable ones keep candle's float order (the
    // integer kernels over repacked weights do not: see the test below).
    let simd = if cpu::has_avx2() {
        Simd::Avx2Candle
    } else {
        Simd::Portable
    };
    // 768: whole groups of eight blocks; 576 (SmolLM2's width): 18 blocks, a tail.
    for (n, k) in [(136, 768), (40, 576)] {
        let w = weights(n, k);
        for dtype in FORMATS {
            if !k.is_multiple_of(dtype.block_size()) {
                continue;
            }
            let ours = linear(&w, (n, k), dtype, simd);
            let packed = matches!(ours, Linear::Packed(_));
            assert!(
                packed || format_for(dtype, simd).is_none(),
                "{dtype:?} not packed"
            );
            for m in [1, 2, 3, 8, 9, 17] {
                let x = input(m, k);
                let want = reference(dtype, &w, (n, k), &x);
                let got = run(&ours, &x, k);
                assert_eq!(want.len(), got.len());
                if !packed {
                    continue; // candle's own QMatMul: its choice of kernel, not ours
                }
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    // Bit for bit: last-bit differences grow through the layers.
                    assert_eq!(
                        w.to_bits(),
                        g.to_bits(),
                        "{dtype:?} k={k} m={m} #{i}: {w} vs {g}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_row_gets_the_same_bits_whatever_else_is_in_the_step() {
    let (n, k) = (130, 512);
    let w = weights(n, k);
    for dtype in FORMATS {
        let ours = linear(&w, (n, k), dtype, cpu::simd());
        let x = input(11, k);
        let all = run(&ours, &x, k);
        for r in 0..11 {
            let one = run(&ours, &x[r * k..(r + 1) * k], k);
            assert_eq!(one, all[r * n..(r + 1) * n], "{dtype:?} row {r}");
        }
    }
}

#[test]
fn the_portable_kernels_agree_with_the_simd_ones() {
    if !cpu::has_avx2() {
        return; // nothing to compare: the portable kernels are the ones in use
    }
    let (n, k) = (70, 1536);
    let w = weights(n, k);
    let x = input(5, k);
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
    ] {
        let fast = run(&linear(&w, (n, k), dtype, Simd::Avx2Candle), &x, k);
        let slow = run(&linear(&w, (n, k), dtype, Simd::Portable), &x, k);
        for (f, s) in fast.iter().zip(&slow) {
            // Q4_1 and Q5_0 follow candle's scalar order in both: the same bits.
            if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0) {
                assert_eq!(f.to_bits(), s.to_bits(), "{dtype:?}: {f} vs {s}");
            } else {
                assert!(
                    (f - s).abs() <= 1e-4 * f.abs().max(1.0),
                    "{dtype:?}: {f} vs {s}"
                );
            }
        }
    }
}

#[test]
fn layers_of_different_formats_on_one_input_each_get_their_own_activations() {
    // Q4_K and Q5_0 of the same width want different quantizations of the same input:
    // reusing one for the other would be silently wrong.
    let (n, k) = (64, 512);
    let w = weights(n, k);
    let simd = cpu::simd();
    let a = linear(&w, (n, k), GgmlDType::Q4K, simd);
    let b = linear(&w, (n, k), GgmlDType::Q5_0, simd);
    let c = linear(&w, (n, k), GgmlDType::Q4_1, simd);
    let xs = input(3, k);
    let x = Tensor::from_slice(&xs, (1, 3, k), &Device::Cpu).unwrap();
    let [ya, yb, yc] = Linear::forward_all([&a, &b, &c], &x, &[3]).unwrap();
    for (l, y) in [(&a, ya), (&b, yb), (&c, yc)] {
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, run(l, &xs, k));
    }
}

#[test]
fn a_q4k_weight_narrower_than_a_super_block_goes_to_candle() {
    let (n, k) = (16, 640 - 128);
    let w = weights(n, 640);
    let t = Tensor::from_slice(&w, (n, 640), &Device::Cpu).unwrap();
    // 640 values per row are not whole super-blocks: candle refuses to quantize them,
    // and a GGUF holds such tensors in Q5_0/Q8_0 instead.
    assert!(QTensor::quantize(&t, GgmlDType::Q4K).is_err());
    let ours = linear(&w[..n * k], (n, k), GgmlDType::Q4K, cpu::simd());
    assert_eq!(run(&ours, &input(1, k), k).len(), n);
}

/// The integer kernels over repacked weights (AVX-512 VNNI and AVX2, each where the
/// CPU has it), format by format, at every batch height:
/// - the repacked weights are the GGUF's (exactly for the 32-value formats, within f16
///   rounding of `d * scale` for the K-quants);
/// - each output is within the bound of 8-bit activation quantization of the f64 dot
///   of the dequantized weights with the unquantized input (`|w| * amax / 254` summed
///   over the row, a rigorous bound on rounding to the nearest step), plus 1e-5 of
///   `Σ|w x|` for f32 sums;
/// - each output is the canonical order's bits (`tiles::canonical`), so both kernels
///   give the same bits, and each row's outputs are the same alone (the GEMV tiles) as
///   among 1 to 17 rows (the GEMM tiles).
#[test]
fn the_integer_kernels_hold_to_an_f64_reference_and_give_the_canonical_bits() {
    let mut levels = Vec::new();
    if cpu::has_avx512_vnni() {
        levels.push(Simd::Avx512Vnni);
    } else {
        eprintln!(
            "no AVX-512 VNNI here: its kernels are not run ({})",
            cpu::features()
        );
    }
    if cpu::has_avx2() {
        levels.push(Simd::Avx2);
    }
    assert!(
        !levels.is_empty(),
        "this CPU has neither AVX2 nor AVX-512 VNNI: no integer kernel to test ({})",
        cpu::features()
    );
    for simd in levels {
        for (n, k) in [(70, 1536), (37, 576), (9, 256)] {
            integer_kernel_case(simd, n, k);
        }
    }
}

fn integer_kernel_case(simd: Simd, n: usize, k: usize) {
    let w = weights(n, k);
    for dtype in FORMATS {
        if !k.is_multiple_of(dtype.block_size()) {
            continue;
        }
        let t = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let candle_w: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours = Linear::with_simd(q, simd).unwrap();
        let Linear::Repacked(r) = &ours else {
            panic!("{simd:?} {dtype:?} not repacked");
        };
        let kquant = dtype.block_size() == QK_K;
        let deq: Vec<Vec<f32>> = (0..n).map(|j| r.dequantize(j)).collect();
        for j in 0..n {
            let want = &candle_w[j * k..(j + 1) * k];
            for (i, (a, b)) in deq[j].iter().zip(want).enumerate() {
                // f16 rounding of `d * scale` and `dmin * min` (2^-11 each) of terms
                // no larger than twice the group's largest weight.
                let group = &want[i / 32 * 32..(i / 32 + 1) * 32];
                let wmax = group.iter().fold(0f32, |m, w| m.max(w.abs()));
                let tol = if kquant { wmax * 2.5e-3 } else { 0.0 };
                assert!(
                    (a - b).abs() <= tol,
                    "{simd:?} {dtype:?} w[{j}][{i}]: {a} vs {b}"
                );
            }
        }
        for m in [1, 2, 3, 4, 5, 8, 9, 17] {
            let x = input(m, k);
            let got = run(&ours, &x, k);
            let acts = Acts::quantize(ActKind::Q8x, &x, k);
            for r_ in 0..m {
                let xr = &x[r_ * k..(r_ + 1) * k];
                for j in 0..n {
                    let (mut exact, mut bound, mut size) = (0f64, 0f64, 0f64);
                    for (xs, ws) in xr.chunks(32).zip(deq[j].chunks(32)) {
                        let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
                        for (x, w) in xs.iter().zip(ws) {
                            exact += f64::from(*x) * f64::from(*w);
                            bound += f64::from(w.abs()) * f64::from(amax) / 254.0;
                            size += f64::from((x * w).abs());
                        }
                    }
                    let g = got[r_ * n + j];
                    let case = format!("{simd:?} {dtype:?} k={k} m={m} ({r_},{j})");
                    assert!(
                        (f64::from(g) - exact).abs() <= bound * 1.001 + 1e-5 * size + 1e-6,
                        "{case}: {g} vs {exact} (bound {bound})"
                    );
                    let lanes = tiles::reference(r, &acts, r_, j);
                    assert!(
                        (f64::from(g) - lanes).abs() <= 1e-5 * size + 1e-6,
                        "{case}: {g} vs the lanes' {lanes}"
                    );
                    let canonical = tiles::canonical(r, &acts, r_, j);
                    assert_eq!(
                        g.to_bits(),
                        canonical.to_bits(),
                        "{case}: {g} vs the canonical {canonical}"
                    );
                }
                let alone = run(&ours, xr, k);
                let same = alone
                    .iter()
                    .zip(&got[r_ * n..(r_ + 1) * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{simd:?} {dtype:?} k={k} m={m}: row {r_} alone differs"
                );
            }
        }
    }
}

/// Joined projections give each part the bits its own layer gives, at every height;
/// parts in different formats stay apart and still agree.
#[test]
fn joined_projections_give_each_part_its_own_layers_bits() {
    let simd = cpu::simd();
    let k = 512;
    for (dtypes, widths) in [
        (
            [GgmlDType::Q4K, GgmlDType::Q4K, GgmlDType::Q4K],
            [64, 32, 48],
        ),
        (
            [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q4K],
            [64, 32, 32],
        ),
        (
            [GgmlDType::Q4_1, GgmlDType::Q4_1, GgmlDType::Q4_1],
            [48, 16, 20],
        ),
    ] {
        let make = |i: usize| {
            let w = weights(widths[i], k);
            linear(&w, (widths[i], k), dtypes[i], simd)
        };
        let joined = Joined::new([make(0), make(1), make(2)]);
        let one = matches!(joined, Joined::One(..));
        let same_format = dtypes.iter().all(|d| *d == dtypes[0]);
        let whole = widths.iter().all(|n| n % 16 == 0);
        assert_eq!(
            one,
            simd.repacks() && same_format && whole,
            "{dtypes:?} {widths:?}"
        );
        let apart = [make(0), make(1), make(2)];
        for m in [1, 3, 9] {
            let xs = input(m, k);
            let x = Tensor::from_slice(&xs, (1, m, k), &Device::Cpu).unwrap();
            let parts = joined.forward(&x, &[m]).unwrap();
            for (i, (part, layer)) in parts.iter().zip(&apart).enumerate() {
                assert_eq!(part.dims(), &[1, m, widths[i]]);
                let got: Vec<f32> = part.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got, run(layer, &xs, k), "{dtypes:?} part {i}, m={m}");
            }
        }
    }
}
