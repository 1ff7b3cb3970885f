//! No client can pin, stall or read another's work (issue 25), against the real binary:
//! - an HTTP/2 client that never opens its flow-control window holds no plugin instance
//!   or slot once its tokens are made, is cut at the write timeout, and is counted;
//! - the prefix cache shares nothing across cache spaces: two salts, or two clients
//!   without one, learn nothing of each other's prompts;
//! - a chat of 28,000 messages is the client's 400, not a plugin fault;
//! - a cross-site request is refused, while curl-style clients are served and allowed
//!   origins get CORS answers.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lynx_tests::attack::zero_window_client;
use lynx_tests::swap::{admin, entry};
use lynx_tests::{assert_complete, sse_data, Server};
use serde_json::{json, Value};

/// A streamed request from a well-behaved client: its time to first token, and the
/// whole answer complete.
async fn bystander(server: &Server) -> Duration {
    let start = Instant::now();
    let r = server
        .client
        .post(server.url("/v1/completions"))
        .json(
            &json!({"prompt": "The three primary colors are", "max_tokens": 8,
                      "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .expect("bystander");
    assert_eq!(r.status(), 200, "the bystander was refused");
    let mut ttft = None;
    let mut buf = Vec::new();
    let mut chunks = r.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.expect("bystander stream");
        if ttft.is_none() && String::from_utf8_lossy(&chunk).contains("\"text\"") {
            ttft = Some(start.elapsed());
        }
        buf.extend_from_slice(&chunk);
    }
    assert_complete(&sse_data(&String::from_utf8_lossy(&buf)));
    ttft.unwrap_or_else(|| start.elapsed())
}

fn completions_total(m: &lynx_tests::Metrics, status: &str) -> f64 {
    m.value(
        "request_total",
        &[
            ("endpoint", "/v1/completions"),
            ("method", "POST"),
            ("status", status),
        ],
    )
}

#[tokio::test]
async fn zero_window_http2_clients_pin_nothing_and_are_cut() {
    let server = Server::start_with(&["--write-timeout", "4"]).await;
    let before = bystander(&server).await;
    let mut attackers = Vec::new();
    let mut statuses = Vec::new();
    // 9 streams on one connection (the attack that filled the pool), and 100 on two more.
    for n in [9, 50, 50] {
        let (s, task) = zero_window_client(&server.addr(), n, 16).await;
        statuses.extend(s);
        attackers.push(task);
    }
    // Served, or refused for the connection's instance cap (429) or the queue (503).
    let count = |code: u16| statuses.iter().filter(|&&s| s == code).count();
    let (ok, busy, full) = (count(200), count(429), count(503));
    assert_eq!(ok + busy + full, statuses.len(), "{statuses:?}");
    assert!(ok >= 3 && busy >= 1, "{statuses:?}");
    eprintln!("zero-window streams: {ok} served, {busy} refused 429, {full} refused 503");
    // Their tokens are made without the clients reading: nothing stays held.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, health) = server.health().await;
        if status == 200 && health["plugin_instances"] == 0 && health["kv_cache_slots_used"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still held: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = bystander(&server).await;
    eprintln!("bystander TTFT: {before:?} alone, {during:?} beside 109 zero-window streams");
    // The write timeout cuts every attacker's connection.
    for task in attackers {
        let ended = tokio::time::timeout(Duration::from_secs(20), task).await;
        assert!(
            ended.is_ok(),
            "a zero-window connection was never cut; log:\n{}",
            server
                .log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Every attacker's request is counted, with the status it was sent (once the cut
    // connection's streams are dropped, a moment after its socket closes).
    let want = ((ok + 2) as f64, busy as f64, full as f64);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = server.metrics().await;
        let got = (
            completions_total(&m, "200"),
            completions_total(&m, "429"),
            completions_total(&m, "503"),
        );
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "request_total {got:?}, sent {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.log().contains("write timeout"), "no cut logged");
}

#[tokio::test]
async fn an_http1_client_that_stops_reading_a_long_stream_is_cut() {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let server = Server::start_with(&["--write-timeout", "3", "--stream-buffer-kib", "16"]).await;
    let mut s = std::net::TcpStream::connect(server.addr()).expect("connect");
    // A 4 KiB receive buffer: the socket holds next to nothing for the host.
    let size: libc::c_int = 4096;
    // SAFETY: the fd is this stream's own, and the value a c_int of the size given.
    let set = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_RCVBUF");
    // About 2 KB of JSON a token (20 alternatives each), for 3,000 tokens.
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                      "max_tokens": 3000, "ignore_eos": true, "logprobs": true,
                      "top_logprobs": 20, "stream": true})
    .to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut first = [0u8; 64];
    let _ = s.read(&mut first).expect("headers");
    // Stop reading; the host keeps generating into its buffer, then cuts the client.
    let deadline = Instant::now() + Duration::from_secs(150);
    while !server.log().contains("write timeout") {
        assert!(
            Instant::now() < deadline,
            "the stalled client was never cut"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, health) = server.health().await;
        if health["kv_cache_slots_used"] == 0 && health["plugin_instances"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut stream still holds: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = server.metrics().await;
    let counted = m.value(
        "request_total",
        &[("endpoint", "/v1/chat/completions"), ("status", "200")],
    );
    assert_eq!(counted, 1.0, "the cut request is counted");
    drop(s);
    // Everyone else is served.
    bystander(&server).await;
}

async fn cached(server: &Server, prompt: &str, salt: Option<&str>) -> u64 {
    let mut body = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0});
    if let Some(salt) = salt {
        body["cache_salt"] = json!(salt);
    }
    let (status, answer) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens")
}

const SECRET_PREFIX: &str = "Internal memo, do not share. The door code for the lab is ";

#[tokio::test]
async fn the_prefix_cache_tells_no_client_what_another_sent() {
    // The default: requests without a salt share with nobody.
    let server = Server::start_with(&["--kv-slots", "4"]).await;
    let victim = format!("{SECRET_PREFIX}417. Remember it.");
    assert_eq!(cached(&server, &victim, None).await, 0);
    // A probe of every candidate code sees the same thing: nothing cached, whatever
    // the code, so the right one is found no better than by chance.
    let mut seen = std::collections::BTreeSet::new();
    for code in ["123", "416", "417", "418", "999"] {
        seen.insert(cached(&server, &format!("{SECRET_PREFIX}{code}"), None).await);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0]);
    // Two salts share nothing; one salt shares with itself.
    assert_eq!(cached(&server, &victim, Some("tenant-a")).await, 0);
    assert_eq!(cached(&server, &victim, Some("tenant-b")).await, 0);
    let again = cached(&server, &victim, Some("tenant-a")).await;
    assert!(again > 10, "a salt shares with itself: {again}");
    // A bad salt is the client's 400.
    let (status, body) = server
        .post("/v1/completions", &json!({"prompt": "x", "cache_salt": ""}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "cache_salt");
}

#[tokio::test]
async fn shared_caching_is_the_operator_s_choice() {
    let server = Server::start_with(&["--prefix-cache-sharing", "shared"]).await;
    let victim = format!("{SECRET_PREFIX}417. Remember it.");
    assert_eq!(cached(&server, &victim, None).await, 0);
    assert!(cached(&server, &victim, None).await > 10);
    // A salted request still shares with no unsalted one.
    assert_eq!(cached(&server, &victim, Some("tenant-a")).await, 0);
}

#[tokio::test]
async fn what_a_client_sends_is_its_own_cost() {
    let server = Server::start_with(&["--max-body-bytes", "4194304"]).await;
    let messages: Vec<Value> = (0..28_000)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "a"}))
        .collect();
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "too_many_messages");
    assert_eq!(body["error"]["param"], "messages");
    // A 600 KB text of mixed classes that cannot fit: a 4xx, never a plugin fault.
    // With the bound summed over its classes, it is refused without being encoded.
    let mixed = "ab1 ,\u{e9}\u{4e2d}".repeat(60_000);
    let start = Instant::now();
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": mixed, "max_tokens": 2}),
        )
        .await;
    eprintln!(
        "600 KB mixed text: {status} {} in {:?}",
        body["error"]["code"],
        start.elapsed()
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    let view = admin(&server).await;
    let active = entry(&view, "default");
    assert_eq!(
        active["traps"], 0,
        "a client's input counted as a plugin fault: {view}"
    );
}

#[tokio::test]
async fn cross_site_requests_are_refused_and_curl_is_served() {
    let server = Server::start().await;
    let body = r#"{"prompt": "Hello", "max_tokens": 2}"#;
    // A page's `text/plain` POST (no preflight) from a foreign origin.
    let r = server
        .client
        .post(server.url("/v1/completions"))
        .header("content-type", "text/plain")
        .header("origin", "https://evil.example")
        .body(body)
        .send()
        .await
        .expect("cross-site");
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "permission_error");
    // DNS rebinding: the right address, a foreign Host.
    let r = server
        .client
        .post(server.url("/v1/completions"))
        .header("host", "evil.example:8000")
        .body(body)
        .send()
        .await
        .expect("rebinding");
    assert_eq!(r.status(), 403);
    // curl and the SDKs send no Origin: served, under any of the loopback names.
    let (status, _) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    let r = server
        .client
        .post(server.url("/v1/completions"))
        .header("host", "localhost")
        .body(body)
        .send()
        .await
        .expect("localhost");
    assert_eq!(r.status(), 200);
    let m = server.metrics().await;
    assert_eq!(completions_total(&m, "403"), 2.0, "refusals are counted");
}

#[tokio::test]
async fn allowed_origins_get_cors_answers() {
    let server = Server::start_with(&["--cors-origins", "https://app.example"]).await;
    let r = server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, authorization",
        )
        .send()
        .await
        .expect("preflight");
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(r.headers()["access-control-allow-methods"]
        .to_str()
        .is_ok_and(|m| m.contains("POST")));
    let r = server
        .client
        .post(server.url("/v1/completions"))
        .header("origin", "https://app.example")
        .json(&json!({"prompt": "Hello", "max_tokens": 2}))
        .send()
        .await
        .expect("allowed origin");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let r = server
        .client
        .post(server.url("/v1/completions"))
        .header("origin", "https://other.example")
        .json(&json!({"prompt": "Hello", "max_tokens": 2}))
        .send()
        .await
        .expect("other origin");
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn echo_with_n_prefills_the_prompt_once() {
    let server = Server::start().await;
    let prompt = "The history of the printing press begins in the fifteenth century, when";
    let (status, one) = server
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1}),
        )
        .await;
    assert_eq!(status, 200, "{one}");
    let (status, four) = server
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 2, "echo": true, "logprobs": 1, "n": 4,
                    "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{four}");
    let scores = |c: &Value| {
        c["logprobs"]["token_logprobs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let reference = scores(&one["choices"][0]);
    for c in four["choices"].as_array().expect("choices") {
        let got = scores(c);
        assert_eq!(
            &got[..reference.len()],
            &reference[..],
            "echoed scores differ"
        );
        assert!(c["text"].as_str().is_some_and(|t| t.starts_with(prompt)));
    }
    // One cold prefill; the three others copied it.
    let cache = server.admin_get("/admin/cache").await;
    assert!(cache["copies"].as_u64().is_some_and(|c| c >= 3), "{cache}");
}

#[tokio::test]
async fn tokenize_requests_do_not_vouch_for_a_new_version() {
    use lynx_tests::swap::{self, admin_until, test_plugin, PluginDir};
    let dir = PluginDir::new();
    dir.install("swap", &test_plugin("swap-v1.wasm"));
    let server = swap::start(&dir, &[]).await;
    let v1 = entry(&admin(&server).await, "swap")["sha256"].clone();
    dir.install("swap", &test_plugin("swap-v2.wasm"));
    admin_until(&server, "swap", |e| e["sha256"] != v1).await;
    // A flood of /tokenize and /detokenize generates nothing: the new version's
    // probation has seen none of it.
    for i in 0..30 {
        let (status, _) = server
            .post("/tokenize", &json!({"prompt": format!("hello {i}")}))
            .await;
        assert_eq!(status, 200);
        let (status, _) = server.post("/detokenize", &json!({"tokens": [1, 2]})).await;
        assert_eq!(status, 200);
    }
    let e = entry(&admin(&server).await, "swap").clone();
    assert_eq!(e["probation"]["seen"], 0, "{e}");
    // A completion is judged.
    let (status, _) = server
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
    let e = admin_until(&server, "swap", |e| e["probation"]["seen"] == 1).await;
    assert_eq!(e["probation"]["state"], "pending", "{e}");
}
