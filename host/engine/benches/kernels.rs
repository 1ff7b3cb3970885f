//! The batched matmul kernels alone, format by format, at 1, 8, 16 and 32 rows on a
//! 1536 x 768 weight, as many copies a call as make 64 MiB, so the weights come from
//! memory and not from the last-level cache: what the kernels give before any model
//! around them.
//!
//! Two views of the same calls. `weights/<format>` (one row, throughput in weight bytes
//! per second) is the single-stream ceiling, to read against the machine's read
//! bandwidth (`cargo run --release -p lynx-engine --example membw`). `macs/<format>/<rows>`
//! (throughput in multiply-adds of the integer dots, `m * n * k` a layer) is to read
//! against the CPU's int8 peak: cores x clock x 32 byte-MACs per `vpmaddubsw` (AVX2) or
//! 64 per `vpdpbusd` (AVX-512-VNNI) x the instructions a cycle issues.
//!
//! `cargo bench -p lynx-engine --bench kernels`; `LYNX_SIMD=avx2|avx2-candle|avx512-vnni|
//! portable` picks the level (default: the best this CPU has), so two levels compare in
//! two runs on the same machine.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark's set-up may panic

use std::hint::black_box;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use lynx_engine::qmatmul::repack::FORMATS;
use lynx_engine::qmatmul::{cpu, Linear};

const N: usize = 1536;
const K: usize = 768;
/// Weight bytes a call reads: past the last-level cache of the CPUs these run on.
const FOOTPRINT: usize = 64 << 20;
const ROWS: [usize; 4] = [1, 8, 16, 32];

fn layers(dtype: GgmlDType) -> (Vec<Linear>, usize) {
    let w: Vec<f32> = (0..N * K)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1)
        .collect();
    let t = Tensor::from_slice(&w, (N, K), &Device::Cpu).unwrap();
    let bytes = QTensor::quantize(&t, dtype)
        .unwrap()
        .storage_size_in_bytes();
    let layers = (0..FOOTPRINT.div_ceil(bytes))
        .map(|_| Linear::from_qtensor(QTensor::quantize(&t, dtype).unwrap()).unwrap())
        .collect();
    (layers, bytes)
}

fn input(m: usize) -> Tensor {
    let x: Vec<f32> = (0..m * K).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
    Tensor::from_slice(&x, (1, m, K), &Device::Cpu).unwrap()
}

fn run(layers: &[Linear], x: &Tensor, m: usize) {
    rayon::scope(|_| {
        for l in layers {
            black_box(l.forward(x, &[m]).unwrap());
        }
    });
}

fn kernels(c: &mut Criterion) {
    lynx_engine::configure_threads();
    let choice = std::env::var("LYNX_SIMD").unwrap_or_else(|_| "auto".into());
    let choice = <cpu::SimdChoice as clap::ValueEnum>::from_str(&choice, true)
        .expect("LYNX_SIMD: auto, avx512-vnni, avx2, avx2-candle or portable");
    let level = cpu::init(choice).expect("SIMD level");
    eprintln!("kernels: {level:?}; cpu: {}", cpu::features());
    for dtype in FORMATS {
        let name = format!("{dtype:?}");
        let (layers, bytes) = layers(dtype);
        let copies = layers.len();
        let one = input(1);
        let mut g = c.benchmark_group("weights");
        g.sampling_mode(SamplingMode::Flat);
        g.throughput(Throughput::Bytes((bytes * copies) as u64));
        g.bench_function(&name, |b| b.iter(|| run(&layers, &one, 1)));
        g.finish();
        let mut g = c.benchmark_group(format!("macs/{name}"));
        g.sampling_mode(SamplingMode::Flat);
        for m in ROWS {
            let x = input(m);
            g.throughput(Throughput::Elements((m * N * K * copies) as u64));
            g.bench_with_input(BenchmarkId::from_parameter(m), &m, |b, &m| {
                b.iter(|| run(&layers, &x, m))
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = kernels
}
criterion_main!(benches);
