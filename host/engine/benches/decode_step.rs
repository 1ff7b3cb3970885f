//! One decode step of the real model with 1, 2, 4, 8 and 16 sequences in the batch,
//! side by side: what continuous batching buys before any HTTP or sampling. Each
//! sequence has 64 tokens of history in its own slot and decodes one token; criterion's
//! throughput is sequences (= tokens) per second, so the 8-sequence figure over the
//! 1-sequence one is the step's batching gain.
//!
//! `cargo bench -p lynx-engine --bench decode_step` (needs the model:
//! `scripts/fetch-model.sh`).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark's set-up may panic

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lynx_engine::arch::{Entry, Logits};
use lynx_engine::kv_cache::KvDtype;
use lynx_engine::model::Model;

const HISTORY: usize = 64;
const BATCHES: [usize; 5] = [1, 2, 4, 8, 16];

fn decode_step(c: &mut Criterion) {
    lynx_engine::configure_threads();
    let path = lynx_engine::files::model_path_from_env();
    let model = Model::load(&path).expect("the default model (scripts/fetch-model.sh)");
    let slots = BATCHES.iter().copied().max().unwrap_or(1);
    // The serving default: an f16 cache.
    let cache = model
        .arch
        .kv_cache_as(slots, 2 * HISTORY, KvDtype::F16)
        .expect("cache");
    // Different prompts per slot, as a real batch has.
    let prompts: Vec<Vec<u32>> = (0..slots)
        .map(|s| {
            (0..HISTORY)
                .map(|i| (100 + 37 * s + 11 * i) as u32)
                .collect()
        })
        .collect();
    let prefill: Vec<Entry> = prompts
        .iter()
        .enumerate()
        .map(|(slot, tokens)| Entry {
            slot,
            pos: 0,
            tokens,
            logits: Logits::None,
        })
        .collect();
    model.arch.forward(&cache, &prefill).expect("prefill");

    let next: Vec<[u32; 1]> = (0..slots).map(|s| [200 + s as u32]).collect();
    let mut group = c.benchmark_group("decode_step");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(6));
    for n in BATCHES {
        // Each iteration rewrites position HISTORY of the first n slots.
        let entries: Vec<Entry> = next[..n]
            .iter()
            .enumerate()
            .map(|(slot, tokens)| Entry {
                slot,
                pos: HISTORY,
                tokens,
                logits: Logits::Last,
            })
            .collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("{n}"), |b| {
            // On a rayon worker, as the scheduler runs its steps: the calling thread
            // would otherwise compete with the pool's threads for the cores.
            b.iter(|| {
                rayon::scope(|_| black_box(model.arch.forward(&cache, &entries).expect("step")))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
