//! Encoding throughput of the real SmolLM2 tokenizer on four shapes of text, each
//! `LYNX_BENCH_BYTES` long (default 1 MiB): English prose, one repeated letter (a
//! single word), base64 of random bytes, and source code. Criterion reports MB/s.
//!
//! `cargo bench -p lynx-engine --bench tokenize`. The same file builds against older
//! heads (it uses only `Model::read_tokenizer` and `Tokenizer::encode`), for side-by-side
//! runs (`LYNX_BENCH_ROOT` points both at the same texts); their hand-written BPE needs
//! a small `LYNX_BENCH_BYTES`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark: failures abort it

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lynx_engine::Model;

/// `text` repeated and cut (at a character boundary) to `len` bytes.
fn fill(text: &str, len: usize) -> String {
    let mut out = String::with_capacity(len + text.len());
    while out.len() < len {
        out.push_str(text);
    }
    let mut cut = len;
    while !out.is_char_boundary(cut) {
        cut -= 1;
    }
    out.truncate(cut);
    out
}

/// Base64 of `len * 3 / 4` pseudo-random bytes (a fixed xorshift stream).
fn base64_random(len: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(ALPHABET[(state >> 58) as usize])
        })
        .collect()
}

/// Every `.rs` file under `dir`, concatenated.
fn sources(dir: &Path, out: &mut String) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read source dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).expect("read source"));
        }
    }
}

fn bench(c: &mut Criterion) {
    let len: usize = std::env::var("LYNX_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    let (tokenizer, _) = Model::read_tokenizer(&lynx_engine::files::model_path_from_env())
        .expect("scripts/fetch-model.sh fetches the model");
    // `LYNX_BENCH_ROOT` (a `host/engine` folder) gives another tree's texts, so that runs of
    // two heads side by side encode the very same bytes.
    let root = std::env::var_os("LYNX_BENCH_ROOT")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let prose =
        std::fs::read_to_string(root.join("../../docs/security.md")).expect("docs/security.md");
    let mut code = String::new();
    sources(&root.join("src"), &mut code);
    let shapes = [
        ("english", fill(&prose, len)),
        ("one_letter", "a".repeat(len)),
        ("base64", base64_random(len)),
        ("source_code", fill(&code, len)),
    ];
    let mut group = c.benchmark_group("encode");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for (name, text) in &shapes {
        let tokens = tokenizer.encode(text, false).map(|ids| ids.len());
        eprintln!("{name}: {} bytes -> {tokens:?} tokens", text.len());
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| {
                black_box(
                    tokenizer
                        .encode(black_box(text), false)
                        .map(|ids| ids.len()),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
