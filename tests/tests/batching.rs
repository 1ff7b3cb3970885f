//! Continuous batching on the real model: outputs do not depend on the batch, slots and
//! the queue are bounded and drain, overflow is refused with 503, disconnected streams
//! free their slots, and a request that cannot fit a slot is refused naming the limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lynx_tests::{counts, Server};
use serde_json::{json, Value};
use tokio::sync::RwLock;

const LONG: Duration = Duration::from_secs(300);

/// The disconnect test bounds wall time, so it runs with the CPU to itself: it takes
/// this lock to write, the other tests (each a server on the model) take it to read.
static CPU: RwLock<()> = RwLock::const_new(());

#[tokio::test]
async fn greedy_output_is_the_same_alone_and_in_a_changing_batch() {
    let _shared = CPU.read().await;
    let server = Arc::new(Server::start().await);
    let probe = json!({
        "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
        "max_tokens": 40, "temperature": 0
    });
    let (status, alone) = server.post("/v1/chat/completions", &probe).await;
    assert_eq!(status, 200, "{alone}");
    // Seeded sampling draws from the request's own RNG, so it is batch-independent too.
    let sampled = json!({"prompt": "My favourite animal is", "max_tokens": 30, "temperature": 0.9, "top_p": 0.95, "seed": 42});
    let (status, sampled_alone) = server.post("/v1/completions", &sampled).await;
    assert_eq!(status, 200, "{sampled_alone}");

    // Seven other requests of different lengths join and leave around it.
    let others = [
        ("Once upon a time", 12, 0),
        ("The capital of Italy is", 30, 0),
        ("List five fruits:", 50, 150),
        ("def add(a, b):", 8, 300),
        ("In 1492,", 60, 450),
        ("The weather today", 20, 600),
        ("Dear Sir or Madam,", 35, 900),
    ];
    let mut tasks = Vec::new();
    for (i, (prompt, max_tokens, delay)) in others.into_iter().enumerate() {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let body =
                json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": i});
            let (status, body) = server.post("/v1/completions", &body).await;
            assert_eq!(status, 200, "{body}");
        }));
    }
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (sampled_batched, (status, batched)) = tokio::join!(
        server.post("/v1/completions", &sampled),
        server.post("/v1/chat/completions", &probe)
    );
    assert_eq!(status, 200, "{batched}");
    assert_eq!(sampled_batched.0, 200, "{}", sampled_batched.1);
    for t in tasks {
        t.await.expect("other request");
    }
    assert_eq!(
        batched["choices"][0]["message"]["content"],
        alone["choices"][0]["message"]["content"]
    );
    // The same counts (the batched run's prompt may also have come from the cache).
    assert_eq!(counts(&batched["usage"]), counts(&alone["usage"]));
    assert_eq!(
        sampled_batched.1["choices"][0]["text"],
        sampled_alone["choices"][0]["text"]
    );
}

#[tokio::test]
async fn twenty_requests_share_eight_slots_and_everything_drains() {
    let _shared = CPU.read().await;
    let server = Arc::new(Server::start_with(&["--kv-slots", "8"]).await);
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (server, watching) = (server.clone(), watching.clone());
        tokio::spawn(async move {
            let (mut max_slots, mut max_queue) = (0.0f64, 0.0f64);
            while watching.load(Ordering::Relaxed) {
                let m = server.metrics().await;
                max_slots = max_slots.max(m.value("kv_cache_slots_used", &[]));
                max_queue = max_queue.max(m.value("queue_depth", &[]));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (max_slots, max_queue)
        })
    };
    let mut tasks = Vec::new();
    for i in 0..20 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let body =
                json!({"prompt": format!("Story number {i}:"), "max_tokens": 16, "temperature": 0});
            server.post("/v1/completions", &body).await
        }));
    }
    let results = tokio::time::timeout(LONG, futures_util::future::join_all(tasks))
        .await
        .expect("all 20 complete");
    for r in results {
        let (status, body) = r.expect("task");
        assert_eq!(status, 200, "{body}");
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0);
    }
    watching.store(false, Ordering::Relaxed);
    let (max_slots, max_queue) = watcher.await.expect("watcher");
    assert!(max_slots <= 8.0, "{max_slots} slots used");
    assert!(
        max_slots >= 2.0,
        "requests were not batched: at most {max_slots} slots"
    );
    assert!(max_queue > 0.0, "the queue never rose");
    let m = server.metrics().await;
    assert_eq!(m.value("kv_cache_slots_used", &[]), 0.0);
    assert_eq!(m.value("queue_depth", &[]), 0.0);
}

#[tokio::test]
async fn overflow_gets_503_with_retry_after_and_the_rest_complete() {
    let _shared = CPU.read().await;
    let server = Arc::new(Server::start_with(&["--kv-slots", "2", "--max-queue", "2"]).await);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let body =
                json!({"prompt": format!("Count to {i}:"), "max_tokens": 24, "temperature": 0});
            let r = server
                .client
                .post(server.url("/v1/completions"))
                .json(&body)
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            let body: Value = r.json().await.expect("json");
            (status, retry, body)
        }));
    }
    let results = tokio::time::timeout(LONG, futures_util::future::join_all(tasks))
        .await
        .expect("nothing hangs");
    let (mut ok, mut overloaded) = (0, 0);
    for r in results {
        let (status, retry, body) = r.expect("task");
        match status {
            200 => ok += 1,
            503 => {
                overloaded += 1;
                assert!(retry, "503 without Retry-After");
                assert_eq!(body["error"]["type"], "overloaded", "{body}");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    assert!(
        ok >= 4,
        "{ok} completed: two slots and two queue places were free"
    );
    assert!(overloaded >= 1, "nobody was refused");
    let m = server.metrics().await;
    let count = |status| {
        m.value(
            "request_total",
            &[
                ("endpoint", "/v1/completions"),
                ("method", "POST"),
                ("status", status),
            ],
        )
    };
    assert_eq!(count("200"), f64::from(ok));
    assert_eq!(count("503"), f64::from(overloaded));
}

#[tokio::test]
async fn disconnected_streams_free_their_slots_within_a_second() {
    let _alone = CPU.write().await;
    // Greedy counting goes on for far more than 1000 tokens: no stream ends by itself.
    let counting = |i: usize| {
        let n = i * 100 + 1;
        format!("{n}, {}, {}, {},", n + 1, n + 2, n + 3)
    };
    let server = Server::start_with(&["--kv-slots", "10"]).await;
    let mut streams = Vec::new();
    for i in 0..10 {
        let body =
            json!({"prompt": counting(i), "max_tokens": 1000, "temperature": 0, "stream": true});
        let r = server
            .client
            .post(server.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .expect("stream");
        assert_eq!(r.status(), 200);
        streams.push(r.bytes_stream());
    }
    // Every stream is generating: read a chunk of each.
    for s in &mut streams {
        let chunk = tokio::time::timeout(LONG, s.next())
            .await
            .expect("first chunk");
        assert!(chunk.is_some());
    }
    assert_eq!(server.health().await.1["kv_cache_slots_used"], 10);
    drop(streams);
    let gone = Instant::now();
    loop {
        let h = server.health().await.1;
        if h["kv_cache_slots_used"] == 0 && h["queue_depth"] == 0 {
            break;
        }
        assert!(
            gone.elapsed() < Duration::from_secs(1),
            "slots still held {:?} after the clients left: {h}",
            gone.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_request_that_cannot_fit_a_slot_is_refused_naming_the_limit() {
    let _shared = CPU.read().await;
    let server = Server::start_with(&["--max-seq-len", "64"]).await;
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "word ".repeat(40), "max_tokens": 32}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("64"), "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hi", "max_tokens": 16}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}
