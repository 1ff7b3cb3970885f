//! No plugin can outlast its limits (issue 25), on the real binary with the test
//! plugins: a plugin that sleeps (a blocking WASI poll) in `push`, in its constraint or
//! in its smoke call is stopped at its deadline; one that releases 64 KiB a token is
//! stopped at the answer's cap; a slow constraint at its request's budget; and a
//! structured request with `n` = 16 prepares its constraint instances without stalling
//! another client's stream.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lynx_tests::swap::{admin, admin_until, entry, served_by, test_plugin, PluginDir, V2};
use lynx_tests::{plugins_dist, sse_data, Server};
use serde_json::{json, Value};

async fn hostile(extra: &[&str]) -> Server {
    let dir = plugins_dist().join("test");
    let mut args = vec![
        "--plugins-dir",
        dir.to_str().expect("utf-8 path"),
        "--plugin",
        "hostile",
    ];
    args.extend_from_slice(extra);
    Server::start_with(&args).await
}

fn completion(prompt: &str) -> Value {
    json!({"prompt": prompt, "max_tokens": 8, "temperature": 0})
}

#[tokio::test]
async fn a_plugin_that_sleeps_is_stopped_at_its_deadline() {
    let server = hostile(&["--plugin-timeout-ms", "250"]).await;
    for body in [
        completion("SLEEP now"),
        json!({"prompt": "Hello", "max_tokens": 8, "temperature": 0, "guided_regex": "SLEEP"}),
    ] {
        let start = Instant::now();
        let (status, answer) = server.post("/v1/completions", &body).await;
        let took = start.elapsed();
        assert_eq!(status, 500, "{answer}");
        assert_eq!(answer["error"]["code"], "plugin_timeout", "{answer}");
        // It asked for 30 s; its call deadline is 250 ms.
        assert!(
            took < Duration::from_secs(10),
            "the sleep held on for {took:?}"
        );
        eprintln!("a 30 s sleep in {body} ended after {took:?}");
    }
    // Nothing is held; everyone else is served.
    let (status, answer) = server.post("/v1/completions", &completion("Hello")).await;
    assert_eq!(status, 200, "{answer}");
    // The failed constraint's instance goes back when the scheduler drops its sequence
    // (2.5-5.5 s later when this file's five servers share two cores).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, health) = server.health().await;
        if health["plugin_instances"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still held: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_sleeping_smoke_call_holds_up_no_swap() {
    let dir = PluginDir::new();
    dir.install("swap", &test_plugin("swap-v1.wasm"));
    let server = lynx_tests::swap::start(&dir, &[]).await;
    // A standby file whose smoke call sleeps 60 s: refused at its deadline.
    let started = Instant::now();
    dir.install("sleepy", &test_plugin("swap-smoke-sleep.wasm"));
    let e = admin_until(&server, "sleepy", |e| !e["last_error"].is_null()).await;
    assert!(
        e["last_error"]
            .as_str()
            .is_some_and(|m| m.contains("smoke call")),
        "{e}"
    );
    // The active plugin swaps while another sleepy version loads.
    dir.install("sleepy2", &test_plugin("swap-smoke-sleep.wasm"));
    dir.install("swap", &test_plugin("swap-v2.wasm"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while served_by(&server).await != V2 {
        assert!(Instant::now() < deadline, "the swap never went through");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "sleepy smoke refused and v2 swapped in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn released_text_is_capped_per_answer() {
    let server = hostile(&["--max-answer-bytes", "1048576"]).await;
    let rss_before = server.rss_kib();
    let (status, answer) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "WIDE", "max_tokens": 64, "n": 16, "ignore_eos": true,
                    "temperature": 0.8}),
        )
        .await;
    assert_eq!(
        status,
        500,
        "{}",
        answer.to_string().chars().take(300).collect::<String>()
    );
    assert_eq!(answer["error"]["code"], "plugin_invalid_result");
    // Streamed, the stream ends with the error event.
    let events = server
        .stream(
            "/v1/completions",
            &json!({"prompt": "WIDE", "max_tokens": 64, "ignore_eos": true, "stream": true}),
        )
        .await;
    let last = events.last().expect("events");
    assert!(
        last.contains("plugin_invalid_result"),
        "{}",
        &last[..last.len().min(300)]
    );
    let grown = server.rss_kib().saturating_sub(rss_before);
    eprintln!("RSS grew {grown} KiB over the two capped answers");
    assert!(grown < 512 << 10, "RSS grew {grown} KiB");
    let (status, _) = server.post("/v1/completions", &completion("Hello")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_slow_constraint_fails_its_own_request_at_its_budget() {
    let server = hostile(&["--plugin-constraint-budget-ms", "1000"]).await;
    let slow = json!({"prompt": "Hello", "max_tokens": 100, "ignore_eos": true,
                      "temperature": 0, "guided_regex": "SLOW"});
    let start = Instant::now();
    let (status, answer) = server.post("/v1/completions", &slow).await;
    let took = start.elapsed();
    assert_eq!(status, 500, "{answer}");
    assert_eq!(
        answer["error"]["code"], "plugin_budget_exceeded",
        "{answer}"
    );
    // 100 tokens at 100 ms would take 10 s; the budget is 1 s.
    assert!(took < Duration::from_secs(6), "{took:?}");
    eprintln!("a constraint taking 100 ms a token failed its request after {took:?}");
    let view = admin(&server).await;
    let hostile = entry(&view, "hostile");
    assert!(
        hostile["traps"].as_u64().is_some_and(|t| t >= 1),
        "not the plugin's fault: {hostile}"
    );
    let (status, _) = server.post("/v1/completions", &completion("Hello")).await;
    assert_eq!(status, 200);
}

/// The largest gap between the chunks of a streamed answer.
async fn largest_gap(server: &Server, tokens: u32) -> Duration {
    let r = server
        .client
        .post(server.url("/v1/completions"))
        .json(
            &json!({"prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": true,
                      "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .expect("bystander");
    assert_eq!(r.status(), 200);
    let mut chunks = r.bytes_stream();
    let mut last: Option<Instant> = None;
    let mut gap = Duration::ZERO;
    let mut buf = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let now = Instant::now();
        if let Some(t) = last {
            gap = gap.max(now - t);
        }
        last = Some(now);
        buf.extend_from_slice(&chunk.expect("chunk"));
    }
    assert!(sse_data(&String::from_utf8_lossy(&buf))
        .last()
        .is_some_and(|e| e == "[DONE]"));
    gap
}

#[tokio::test]
async fn structured_requests_with_n_16_stall_no_other_stream() {
    let server = Server::start_with(&["--plugin-warm-constraints", "2", "--kv-slots", "20"]).await;
    let alone = largest_gap(&server, 100).await;
    let structured = json!({
        "messages": [{"role": "user", "content": "A JSON object with a name."}],
        "n": 16, "max_tokens": 12, "temperature": 0.7,
        "response_format": {"type": "json_object"}
    });
    let (gap, (status, answer)) = tokio::join!(largest_gap(&server, 300), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.post("/v1/chat/completions", &structured).await
    });
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"].as_array().map(Vec::len), Some(16));
    eprintln!(
        "largest gap between a bystander's chunks: {alone:?} alone, {gap:?} beside n=16 structured"
    );
    // Before, one such request held the shared plugin pool for 2.5-2.9 s.
    assert!(
        gap < Duration::from_millis(1500),
        "the bystander stalled for {gap:?}"
    );
}
