//! Hot-swap benchmark (prints figures; not a test): starts the real `lynx-host` on the
//! real model with the `swap` test plugin, then measures, in one run:
//!
//! 1. rename → first request served by the new version, over 20 swaps alternating two
//!    versions. The probe is the plugin's `lynx:version` prompt, which its policy
//!    answers without the model, polled every 2 ms.
//! 2. completed streaming requests per second from 8 clients for `--seconds` without
//!    swapping, then as long with a swap every 500 ms: the ratio is the cost of swapping.
//!
//! `cargo run --release -p lynx-tests --bin swap_bench [-- SECONDS]` (needs
//! `scripts/build-plugins.sh`, the model, and `target/release/lynx-host`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lynx_tests::swap::{version, PluginDir};
use lynx_tests::{plugins_dist, Server};
use serde_json::json;

/// Completed streams per second from 8 clients over `secs`, swapping every 500 ms if
/// `swap` holds the two versions.
async fn throughput(server: &Server, secs: u64, swap: Option<(&PluginDir, &[u8], &[u8])>) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, done) = (stop.clone(), done.clone());
        let (client, url) = (server.client.clone(), server.url("/v1/completions"));
        clients.push(tokio::spawn(async move {
            let body = json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": true});
            while !stop.load(Ordering::Relaxed) {
                let r = client.post(&url).json(&body).send().await.expect("request");
                assert_eq!(r.status(), 200);
                let text = r.text().await.expect("body");
                assert!(text.contains("[DONE]"), "{text}");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let t0 = Instant::now();
    let mut i = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some((dir, a, b)) = swap {
            dir.install("swap", if i % 2 == 0 { b } else { a });
            i += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    n as f64 / elapsed
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let test = plugins_dist().join("test");
    let v1 = std::fs::read(test.join("swap-v1.wasm")).expect("swap-v1.wasm");
    let v2 = std::fs::read(test.join("swap-v2.wasm")).expect("swap-v2.wasm");
    let dir = PluginDir::new();
    dir.install("swap", &v1);
    let server = Server::start_with(&["--plugins-dir", dir.path(), "--plugin", "swap"]).await;

    let mut latencies = Vec::new();
    for i in 0..20 {
        let (bytes, want) = if i % 2 == 0 {
            (&v2, "version-v2")
        } else {
            (&v1, "version-v1")
        };
        let t0 = Instant::now();
        dir.install("swap", bytes);
        while version(&server).await != want {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "swap {i} never served"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "rename → first request on the new version, 20 swaps: median {:.1} ms, min {:.1} ms, max {:.1} ms (debounce {} ms; first swap to v2 includes its compile)",
        ms(latencies[10]),
        ms(latencies[0]),
        ms(latencies[19]),
        100
    );

    let steady = throughput(&server, secs, None).await;
    let swapping = throughput(&server, secs, Some((&dir, &v1, &v2))).await;
    println!(
        "8 streaming clients, 8-token completions: {steady:.2} req/s without swapping, {swapping:.2} req/s swapping every 500 ms: ratio {:.3}",
        swapping / steady
    );
}
