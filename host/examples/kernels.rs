//! The batched matmul kernels alone, format by format: best-of-N time of one call at
//! 1, 8 and 16 rows on a 1536 x 576 weight (SmolLM2's MLP shape, 8 layers' worth so the
//! weights do not sit in cache), as weight bytes per second. At one row that is the
//! single-stream ceiling to read against the machine's bandwidth (`--example membw`).
//!
//! ```text
//! cargo run --release -p lynx-host --example kernels          # the best level here
//! LYNX_SIMD=avx2 cargo run --release -p lynx-host --example kernels
//! ```
//!
//! Besides bytes per second, each height gives GMAC/s (multiply-adds of the integer
//! dots, `m * n * k` a call): the figure to read against the CPU's int8 peak.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark's set-up may panic

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use lynx_host::engine::qmatmul::Linear;

fn main() {
    lynx_host::engine::fix_thread_count();
    let choice = std::env::var("LYNX_SIMD").unwrap_or_else(|_| "auto".into());
    let choice =
        <lynx_host::engine::qmatmul::cpu::SimdChoice as clap::ValueEnum>::from_str(&choice, true)
            .expect("LYNX_SIMD: auto, avx512-vnni, avx2, avx2-candle or portable");
    let level = lynx_host::engine::qmatmul::cpu::init(choice).expect("SIMD level");
    println!(
        "kernels: {level:?}; cpu: {}",
        lynx_host::engine::qmatmul::cpu::features()
    );
    let (n, k, copies) = (1536, 768, 16);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1)
        .collect();
    let t = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&t, dtype).unwrap();
        let bytes = q.storage_size_in_bytes();
        let layers: Vec<Linear> = (0..copies)
            .map(|_| Linear::from_qtensor(QTensor::quantize(&t, dtype).unwrap()).unwrap())
            .collect();
        let mut line = format!("{:<5} {:>6} KiB", format!("{dtype:?}"), bytes >> 10);
        for m in [1, 8, 16, 32] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let x = Tensor::from_slice(&x, (1, m, k), &Device::Cpu).unwrap();
            let mut best = f64::MAX;
            for _ in 0..40 {
                let t0 = Instant::now();
                rayon::scope(|_| {
                    for l in &layers {
                        std::hint::black_box(l.forward(&x, &[m]).unwrap());
                    }
                });
                best = best.min(t0.elapsed().as_secs_f64() / copies as f64);
            }
            line += &format!(
                "  m={m}: {:>6.1} us {:>5.1} GB/s {:>5.1} GMAC/s",
                best * 1e6,
                bytes as f64 / best / 1e9,
                (m * n * k) as f64 / best / 1e9
            );
        }
        println!("{line}");
    }
}
