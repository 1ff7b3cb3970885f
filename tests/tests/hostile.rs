//! A bounded hostile-traffic run against the real binary (about 60 s, loopback only;
//! `LYNX_HOSTILE_SECS` changes the length): 16 valid streams without pause, mixed with
//! malformed JSON, oversized bodies, random paths, invalid parameters, prompts of one
//! long word, clients that disconnect mid-stream, slow readers, bodies that never
//! finish, HTTP/2 prefaces cut in half, HTTP/2 clients that never open their window,
//! cross-site requests and chats of too many messages. Afterwards every valid request had its 200
//! and a complete answer, every bad one its 4xx, nothing is held, memory stopped
//! growing once the whole mix had run, and `request_total` agrees with what the
//! clients sent, status by status.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lynx_tests::attack::zero_window_client;
use lynx_tests::{assert_complete, read_until_closed, sse_data, Server};
use serde_json::{json, Value};

/// What the clients sent and got: (endpoint label, status) → count.
#[derive(Default, Clone)]
struct Tally(Arc<Mutex<BTreeMap<(String, u16), u64>>>);

impl Tally {
    fn add(&self, endpoint: &str, status: u16) {
        let mut t = self.0.lock().expect("tally");
        *t.entry((endpoint.to_string(), status)).or_default() += 1;
    }
    fn snapshot(&self) -> BTreeMap<(String, u16), u64> {
        self.0.lock().expect("tally").clone()
    }
}

const PROMPTS: [&str; 4] = [
    "Once upon a time",
    "The three primary colors are",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
];

fn valid_body(i: usize) -> Value {
    json!({
        "prompt": PROMPTS[i % PROMPTS.len()],
        "max_tokens": 24,
        "temperature": 0.8,
        "seed": i,
        "stream": true,
    })
}

/// Sends valid streamed request `i`, tallied by its status.
async fn open_stream(server: &Server, tally: &Tally, i: usize) -> reqwest::Response {
    let r = server
        .client
        .post(server.url("/v1/completions"))
        .json(&valid_body(i))
        .send()
        .await
        .expect("valid request");
    tally.add("/v1/completions", r.status().as_u16());
    r
}

/// A valid stream read to its end: it must be 200 and complete.
async fn valid_stream(server: &Server, tally: &Tally, i: usize, slow: bool) {
    let r = open_stream(server, tally, i).await;
    assert_eq!(r.status().as_u16(), 200, "a valid request was refused");
    let mut chunks = r.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = chunks.next().await {
        buf.extend_from_slice(&chunk.expect("a valid stream was cut"));
        if slow {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    assert_complete(&sse_data(&String::from_utf8_lossy(&buf)));
}

/// A stream abandoned after its first chunk.
async fn disconnecting_stream(server: &Server, tally: &Tally, i: usize) {
    let r = open_stream(server, tally, i).await;
    let mut chunks = r.bytes_stream();
    let _ = chunks.next().await;
    drop(chunks);
}

/// The client timeout of the run's server: unfinished bodies are cut after it.
const CLIENT_TIMEOUT_S: u64 = 3;

/// `n` connections that send headers and one byte of a 100-byte body, then wait: each
/// must be answered 408 and closed at the client deadline.
fn unfinished_bodies(addr: &str, n: usize) -> Vec<Option<String>> {
    let mut conns: Vec<std::net::TcpStream> = (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            std::io::Write::write_all(
                &mut s,
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
            )
            .expect("write");
            s
        })
        .collect();
    let within = Duration::from_secs(CLIENT_TIMEOUT_S + 10);
    conns
        .iter_mut()
        .map(|s| read_until_closed(s, within))
        .collect()
}

/// One bad request of kind `i % 8`; it must get its 4xx in the OpenAI error shape.
async fn bad_request(server: &Server, tally: &Tally, i: usize) {
    // A body sent as it is, labelled JSON.
    let raw = |path: &str, body: Vec<u8>| {
        server
            .client
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(body)
    };
    let (endpoint, want, request) = match i % 8 {
        0 => (
            "/v1/completions",
            400,
            raw(
                "/v1/completions",
                format!("{{\"prompt\": \"unterminated {i}").into_bytes(),
            ),
        ),
        1 => (
            "/v1/chat/completions",
            413,
            raw("/v1/chat/completions", vec![b' '; 65536 + 1 + i % 1000]),
        ),
        2 => (
            "unmatched",
            404,
            server
                .client
                .get(server.url(&format!("/random/{i}/x{}", i * 7919))),
        ),
        3 => (
            "/v1/completions",
            400,
            server
                .client
                .post(server.url("/v1/completions"))
                .json(&json!({"prompt": "Hi", "temperature": 7, "max_tokens": 4})),
        ),
        4 => (
            "/v1/completions",
            400,
            raw(
                "/v1/completions",
                vec![b'{', b'"', 0xFF, 0xFE, b'"', b':', b'1', b'}'],
            ),
        ),
        // A web page's cross-site POST.
        6 => (
            "/v1/completions",
            403,
            server
                .client
                .post(server.url("/v1/completions"))
                .header("content-type", "text/plain")
                .header("origin", "https://evil.example")
                .body(r#"{"prompt": "Hi", "max_tokens": 2}"#),
        ),
        // More messages than a chat may hold.
        7 => (
            "/v1/chat/completions",
            400,
            server
                .client
                .post(server.url("/v1/chat/completions"))
                .json(&json!({
                    "messages": vec![json!({"role": "user", "content": "a"}); 1500],
                    "max_tokens": 2
                })),
        ),
        // One word far past the context.
        _ => (
            "/v1/completions",
            400,
            server
                .client
                .post(server.url("/v1/completions"))
                .json(&json!({"prompt": "z".repeat(60_000), "max_tokens": 4})),
        ),
    };
    let r = request.send().await.expect("bad request sent");
    let status = r.status().as_u16();
    tally.add(endpoint, status);
    assert_eq!(status, want, "bad request kind {}", i % 8);
    let body: Value = r.json().await.expect("an OpenAI error body");
    assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string());
    if i % 8 == 5 {
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_traffic_leaves_the_server_whole_and_the_metrics_exact() {
    let secs: u64 = std::env::var("LYNX_HOSTILE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    // A 64 KiB body limit: oversized bodies still fit the loopback socket buffers, so
    // the client reads its 413 instead of failing mid-upload.
    let client_timeout = CLIENT_TIMEOUT_S.to_string();
    let server = Arc::new(
        Server::start_with(&[
            "--max-body-bytes",
            "65536",
            "--client-timeout",
            &client_timeout,
            "--write-timeout",
            "3",
        ])
        .await,
    );
    let warm_up = Tally::default();
    // Warm-up: every slot used once, so the KV cache pages a run touches are resident
    // before the baseline is read.
    futures_util::future::join_all((0..16).map(|i| valid_stream(&server, &warm_up, i, false)))
        .await;
    let base = server.metrics().await;

    let tally = Tally::default();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    // The memory baseline is read a third into the run: by then the whole mix has run,
    // so pooled plugin instances and allocator arenas are at their working size, and
    // what grows after it grows with the traffic (a leak), not with the first peak of
    // concurrency.
    let baseline = {
        let server = server.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs / 3)).await;
            server.rss_kib()
        })
    };
    for w in 0..16 {
        let (server, tally) = (server.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < until {
                valid_stream(&server, &tally, i, w % 4 == 0).await;
                i += 16;
            }
        }));
    }
    for w in 0..3 {
        let (server, tally) = (server.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < until {
                bad_request(&server, &tally, i).await;
                i += 3;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    {
        let (server, tally) = (server.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < until {
                disconnecting_stream(&server, &tally, i).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    {
        // Bodies that never finish, eight at a time: each answered 408 and closed.
        let (addr, tally) = (server.addr(), tally.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let addr = addr.clone();
                let answers = tokio::task::spawn_blocking(move || unfinished_bodies(&addr, 8))
                    .await
                    .expect("join");
                for answer in answers {
                    let answer = answer.expect("an unfinished body kept its connection");
                    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
                    tally.add("/v1/completions", 408);
                }
            }
        }));
    }
    {
        // HTTP/2 clients that never open their window: 4 streams of n=4 each, pinning
        // nothing; the write timeout cuts each connection, its requests counted.
        let (addr, tally) = (server.addr(), tally.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let (statuses, connection) = zero_window_client(&addr, 4, 4).await;
                for s in statuses {
                    assert!(s == 200 || s == 429, "zero-window stream got {s}");
                    tally.add("/v1/completions", s);
                }
                let cut = tokio::time::timeout(Duration::from_secs(30), connection).await;
                assert!(cut.is_ok(), "a zero-window connection was never cut");
            }
        }));
    }
    {
        // HTTP/2 prefaces cut in half: closed at the client deadline, never a request.
        let addr = server.addr();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let addr = addr.clone();
                tokio::task::spawn_blocking(move || {
                    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
                    std::io::Write::write_all(&mut s, b"PRI * HTTP/2.0\r\n").expect("write");
                    let within = Duration::from_secs(CLIENT_TIMEOUT_S + 10);
                    assert!(
                        read_until_closed(&mut s, within).is_some(),
                        "a half preface kept its connection"
                    );
                })
                .await
                .expect("join");
            }
        }));
    }
    for task in tasks {
        task.await.expect("a client task failed");
    }

    // Nothing is held once the traffic stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let m = server.metrics().await;
        if m.value("kv_cache_slots_used", &[]) == 0.0 && m.value("queue_depth", &[]) == 0.0 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "slots or queue still held:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // request_total moved by exactly what the clients sent, status by status.
    let sent = tally.snapshot();
    let mut counted = BTreeMap::new();
    for sample in &after.scrape.samples {
        if sample.metric != "request_total" {
            continue;
        }
        let endpoint = sample
            .labels
            .get("endpoint")
            .unwrap_or_default()
            .to_string();
        if endpoint == "/metrics" {
            continue; // this test's own scrapes
        }
        let status: u16 = sample
            .labels
            .get("status")
            .unwrap_or_default()
            .parse()
            .expect("status");
        let labels = [
            ("endpoint", endpoint.as_str()),
            ("status", &*status.to_string()),
        ];
        let moved = after.value("request_total", &labels) - base.value("request_total", &labels);
        if moved > 0.0 {
            counted.insert((endpoint.clone(), status), moved as u64);
        }
    }
    let sent_total: u64 = sent.values().sum();
    assert_eq!(
        counted, sent,
        "request_total vs what the clients sent ({sent_total} requests)"
    );
    let valid = sent
        .get(&("/v1/completions".to_string(), 200))
        .copied()
        .unwrap_or(0);
    assert!(valid >= 32, "too few valid requests in {secs} s: {sent:?}");
    for status in [400, 403, 404, 408, 413] {
        assert!(
            sent.keys().any(|(_, s)| *s == status),
            "no {status} was exercised: {sent:?}"
        );
    }

    let rss_before = baseline.await.expect("baseline");
    let rss_after = server.rss_kib();
    let grown_mib = (rss_after.saturating_sub(rss_before)) as f64 / 1024.0;
    eprintln!(
        "hostile run: {secs} s, {sent_total} requests ({sent:?}), RSS over the last two thirds {} → {} MiB (+{grown_mib:.1})",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(
        grown_mib < 32.0,
        "RSS grew {grown_mib:.1} MiB over the last two thirds of the run"
    );
    assert_eq!(server.health_status().await, 200);
}
