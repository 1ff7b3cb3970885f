//! The kernels against candle's, format by format.

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::Device;

use super::*;

const FORMATS: [GgmlDType; 7] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

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
    let simd = cpu::simd();
    // 768: whole groups of eight blocks; 576 (SmolLM2's width): 18 blocks, a tail.
    for (n, k) in [(136, 768), (40, 576)] {
        let w = weights(n, k);
        for dtype in FORMATS {
            if k % dtype.block_size() != 0 {
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
    if cpu::simd() != Simd::Avx2 {
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
        let fast = run(&linear(&w, (n, k), dtype, Simd::Avx2), &x, k);
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
