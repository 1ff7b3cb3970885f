//! Recompile benchmark (prints figures; not a test): decode throughput of 8 concurrent
//! streams while a plugin is recompiled every 2 s, against the same load without
//! recompiles, measured side by side on one server in alternating rounds.
//!
//! Each "recompile" installs the default plugin with one more custom section appended,
//! so its sha256 is new and the host compiles it for real (no cache hit); it is a
//! standby plugin, so serving goes on with the active one, as a hot-swap would.
//!
//! `cargo run --release -p lynx-tests --bin compile_bench [-- SECONDS_PER_ROUND [ROUNDS]]`
//! (needs `scripts/build-plugins.sh`, the model, and `target/release/lynx-host`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lynx_tests::swap::PluginDir;
use lynx_tests::{plugins_dist, Server};
use serde_json::{json, Value};

/// `bytes` with a custom section named `lynx-bench` holding `n` appended: the same
/// component, a different file.
fn variant(bytes: &[u8], n: u64) -> Vec<u8> {
    let name = b"lynx-bench";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(&n.to_le_bytes());
    let mut out = bytes.to_vec();
    out.push(0); // custom section id
    let mut size = payload.len();
    loop {
        let byte = (size & 0x7f) as u8;
        size >>= 7;
        if size == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&payload);
    out
}

/// Completion tokens per second generated for 8 clients over `secs` (the server's own
/// `tokens_total` count, so tokens of requests still running count too); with
/// `recompile`, a new plugin variant is installed every 2 s.
async fn round(
    server: &Server,
    secs: u64,
    recompile: Option<(&PluginDir, &[u8], &mut u64)>,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..8 {
        let stop = stop.clone();
        let (client, url) = (server.client.clone(), server.url("/v1/completions"));
        clients.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("Story {i}: once upon a time"), "max_tokens": 48, "temperature": 0.8, "seed": i});
            while !stop.load(Ordering::Relaxed) {
                let r = client.post(&url).json(&body).send().await.expect("request");
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.expect("body");
                assert!(v["usage"]["completion_tokens"].as_u64().is_some(), "{v}");
            }
        }));
    }
    // Let every client reach the steady state before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counted = |m: &lynx_tests::Metrics| m.value("tokens_total", &[("kind", "completion")]);
    let before = counted(&server.metrics().await);
    let t0 = Instant::now();
    let mut recompile = recompile;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some((dir, base, n)) = recompile.as_mut() {
            **n += 1;
            dir.install("bench", &variant(base, **n));
        }
    }
    let tokens = counted(&server.metrics().await) - before;
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    tokens / elapsed
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let base = std::fs::read(plugins_dist().join("default.wasm")).expect("default.wasm");
    let dir = PluginDir::new();
    dir.install("default", &base);
    let mut n = 0;
    dir.install("bench", &variant(&base, n));
    // A fresh compile cache, so every variant is compiled, never found on disk.
    let apart = PluginDir::new();
    let cache = apart.file("cache");
    let cache_arg = cache.to_str().expect("utf-8").to_string();
    let server = Server::start_with(&[
        "--plugins-dir",
        dir.path(),
        "--plugin-cache-dir",
        &cache_arg,
    ])
    .await;

    let (mut quiet, mut busy) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let q = round(&server, secs, None).await;
        let b = round(&server, secs, Some((&dir, &base, &mut n))).await;
        println!("round {r}: {q:.1} tok/s without recompiles, {b:.1} tok/s recompiling every 2 s: ratio {:.3}", b / q);
        quiet.push(q);
        busy.push(b);
    }
    let compiled = server.log().matches("source=\"compiled\"").count();
    let (q, b) = (
        quiet.iter().sum::<f64>() / rounds as f64,
        busy.iter().sum::<f64>() / rounds as f64,
    );
    println!(
        "8 streams, {rounds} x {secs} s each way: {q:.1} tok/s quiet, {b:.1} tok/s with {compiled} compiles: ratio {:.3}",
        b / q
    );
}
