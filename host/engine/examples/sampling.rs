//! The cost of choosing a token at gemma's vocabulary (262,144): lynx's sampler against
//! candle's `LogitsProcessor` it replaced, same logits, same seeds (so the same
//! tokens), best-of-N time per draw.
//!
//! ```text
//! cargo run --release -p lynx-engine --example sampling
//! ```

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark's set-up may panic

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use lynx_engine::sampling::Sampler;

fn main() {
    let vocab = 262_144;
    // A peaked distribution, as a model's usually is: a few likely tokens, a long tail.
    let logits: Vec<f32> = (0..vocab)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0 + if i % 4099 == 0 { 12.0 } else { 0.0 })
        .collect();
    let logits = Tensor::new(logits, &Device::Cpu).unwrap();
    for (name, temperature, top_p) in [
        ("greedy", 0.0, 1.0),
        ("t=0.8", 0.8, 1.0),
        ("t=0.8 top_p=0.9", 0.8, 0.9),
    ] {
        let sampling = if temperature <= 0.0 {
            Sampling::ArgMax
        } else if top_p < 1.0 {
            Sampling::TopP {
                p: top_p,
                temperature,
            }
        } else {
            Sampling::All { temperature }
        };
        let mut ours = Sampler::new(7, temperature, top_p);
        let mut theirs = LogitsProcessor::from_sampling(7, sampling);
        let (mut best_ours, mut best_theirs) = (f64::MAX, f64::MAX);
        for _ in 0..30 {
            let t0 = Instant::now();
            let a = ours.sample(&logits).unwrap();
            best_ours = best_ours.min(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            let b = theirs.sample(&logits).unwrap();
            best_theirs = best_theirs.min(t0.elapsed().as_secs_f64());
            assert_eq!(a, b, "{name}: the same draw");
        }
        println!(
            "{name:<16} lynx {:>7.3} ms   candle {:>7.3} ms   ({:.1}x)",
            best_ours * 1e3,
            best_theirs * 1e3,
            best_theirs / best_ours
        );
    }
}
