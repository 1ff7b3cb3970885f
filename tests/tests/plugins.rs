//! Plugins on the real host: hostile components fail only their own request, a plugin
//! for another WIT version is refused, `plugin check` reports what a plugin exports,
//! the strict policy rejects long prompts, and the token metrics come from plugin
//! events, guarded against a plugin that reports nonsense.

use std::time::{Duration, Instant};

use lynx_tests::{counts, plugins_dist, run_host, Server};
use serde_json::{json, Value};

const MODEL: &str = "smollm2-135m-instruct";
const DEADLINE_MS: u64 = 200;
const MEMORY_MIB: u64 = 32;

async fn hostile_server() -> Server {
    hostile_server_with(&[]).await
}

async fn hostile_server_with(extra: &[&str]) -> Server {
    let dir = plugins_dist().join("test");
    let deadline = DEADLINE_MS.to_string();
    let memory = MEMORY_MIB.to_string();
    let mut args = vec![
        "--plugins-dir",
        dir.to_str().expect("utf-8 path"),
        "--plugin",
        "hostile",
        "--plugin-timeout-ms",
        &deadline,
        "--plugin-memory-mib",
        &memory,
    ];
    args.extend_from_slice(extra);
    Server::start_with(&args).await
}

fn completion(prompt: &str) -> Value {
    json!({"prompt": prompt, "max_tokens": 8, "temperature": 0})
}

fn assert_plugin_error(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 500, "{what}: {body}");
    let error = &body["error"];
    assert_eq!(error["type"], "plugin_error", "{what}: {body}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("hostile"),
        "{what}: names no plugin: {body}"
    );
    for key in ["param", "code"] {
        assert!(error.get(key).is_some(), "{what}: no `{key}`: {body}");
    }
}

/// A request that must succeed: the server kept serving after a hostile one.
async fn assert_serves(server: &Server, after: &str) {
    let (status, body) = server
        .post("/v1/completions", &completion("Once upon a time"))
        .await;
    assert_eq!(status, 200, "after {after}: {body}\n{}", server.log());
    assert!(
        !body["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "after {after}: {body}"
    );
}

#[tokio::test]
async fn each_hostile_plugin_fails_only_its_own_request() {
    let server = hostile_server().await;
    assert_serves(&server, "start-up").await;
    let before = server.metrics().await;

    for (trigger, message_part) in [
        ("TRAP", "trapped"),
        ("SPIN", "deadline"),
        ("HOG", "memory limit"),
    ] {
        let t0 = Instant::now();
        let (status, body) = server
            .post("/v1/completions", &completion(&format!("please {trigger}")))
            .await;
        let took = t0.elapsed();
        assert_plugin_error(status, &body, trigger);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(message_part), "{trigger}: {body}");
        // The sandbox grants nothing: no file, no environment leaks into the answer.
        assert!(!body.to_string().contains("root:"), "{trigger}: {body}");
        if trigger == "SPIN" {
            // Stopped by the epoch deadline, not left running: generous slack for a
            // loaded machine, far below "forever".
            assert!(took < Duration::from_secs(5), "SPIN took {took:?}");
        }
        assert_serves(&server, trigger).await;
    }

    // WASI is linked, deny by default: reading a file and the environment get errors,
    // which the plugin reports in its rejection; no data, no trap.
    let (status, body) = server
        .post("/v1/completions", &completion("please SNOOP"))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "snooped", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("read 0 bytes and HOME=\"\""), "{body}");
    assert!(!body.to_string().contains("root:"), "{body}");
    assert_serves(&server, "SNOOP").await;

    // The chat route goes through the same policy.
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "TRAP"}], "max_tokens": 4}),
        )
        .await;
    assert_plugin_error(status, &body, "chat TRAP");

    let after = server.metrics().await;
    let failed = |m: &lynx_tests::Metrics, endpoint: &str| {
        m.value(
            "request_total",
            &[
                ("endpoint", endpoint),
                ("method", "POST"),
                ("status", "500"),
            ],
        )
    };
    assert_eq!(
        failed(&after, "/v1/completions") - failed(&before, "/v1/completions"),
        3.0
    );
    assert_eq!(failed(&after, "/v1/chat/completions"), 1.0);
    let log = server.log();
    assert!(
        log.contains("plugin=\"hostile\"") || log.contains("plugin=hostile"),
        "failures are logged with the plugin's name:\n{log}"
    );
}

#[tokio::test]
async fn a_plugin_trap_mid_stream_ends_that_stream_and_frees_its_slot() {
    let server = hostile_server().await;
    let body = json!({"prompt": "LATE", "max_tokens": 32, "temperature": 0, "stream": true});
    let events = server.stream("/v1/completions", &body).await;
    let last = events.last().cloned().unwrap_or_default();
    let error: Value = serde_json::from_str(&last).unwrap_or(Value::Null);
    assert_eq!(error["error"]["type"], "plugin_error", "{events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");

    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "LATE", "max_tokens": 32}),
        )
        .await;
    assert_plugin_error(status, &body, "LATE");

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = server.metrics().await;
        if m.value("kv_cache_slots_used", &[]) == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot still held after a plugin trap"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_serves(&server, "LATE").await;
}

#[tokio::test]
async fn under_the_fail_open_policy_the_host_carries_on_a_failed_post_processing() {
    let server = hostile_server_with(&["--plugin-failure-policy", "open"]).await;
    let reference = Server::start().await;
    let body = json!({"prompt": "LATE", "max_tokens": 12, "temperature": 0});
    let (status, expected) = reference.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{expected}");
    let before = server.metrics().await;
    let (status, got) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{got}");
    // The hostile plugin traps on its third token; the host's post-processing (the
    // default plugin's) takes over, so the answer is the default plugin's, whole.
    assert_eq!(got["choices"][0]["text"], expected["choices"][0]["text"]);
    assert_eq!(counts(&got["usage"]), counts(&expected["usage"]));
    let after = server.metrics().await;
    let counted = |m: &lynx_tests::Metrics| m.value("tokens_total", &[("kind", "completion")]);
    assert_eq!(
        counted(&after) - counted(&before),
        got["usage"]["completion_tokens"].as_f64().unwrap_or(-1.0),
        "every token counted once"
    );
    assert!(
        server
            .log()
            .contains("the host's own carries the request on"),
        "{}",
        server.log()
    );
    let events = server
        .stream(
            "/v1/completions",
            &json!({"prompt": "LATE", "max_tokens": 12, "temperature": 0, "stream": true}),
        )
        .await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    // The policy stage stays fail-closed.
    let (status, body) = server.post("/v1/completions", &completion("TRAP")).await;
    assert_plugin_error(status, &body, "TRAP");
}

#[tokio::test]
async fn a_router_trap_falls_back_to_the_unmatched_label() {
    let server = hostile_server().await;
    let (status, body) = server.post("/v1/TRAP/x", &completion("Hi")).await;
    assert_eq!(status, 404, "{body}");
    let m = server.metrics().await;
    assert_eq!(
        m.value(
            "request_total",
            &[
                ("endpoint", "unmatched"),
                ("method", "POST"),
                ("status", "404")
            ]
        ),
        1.0
    );
    assert!(!m
        .label_values("request_total", "endpoint")
        .iter()
        .any(|e| e.contains("TRAP")));
    assert_serves(&server, "a router trap").await;
}

#[tokio::test]
async fn hostile_plugins_do_not_grow_the_process() {
    let server = hostile_server().await;
    // Warm up: the model's buffers and the first instances are allocated once.
    for _ in 0..3 {
        assert_serves(&server, "warm-up").await;
        let (status, _) = server.post("/v1/completions", &completion("HOG")).await;
        assert_eq!(status, 500);
    }
    let before = server.rss_kib();
    for i in 0..30 {
        let trigger = ["HOG", "TRAP", "SPIN"][i % 3];
        if trigger == "SPIN" && i > 10 {
            continue; // a few are enough; each costs a deadline
        }
        let (status, body) = server.post("/v1/completions", &completion(trigger)).await;
        assert_plugin_error(status, &body, trigger);
    }
    assert_serves(&server, "the hostile run").await;
    let after = server.rss_kib();
    let grown_mib = after.saturating_sub(before) / 1024;
    // 20 instances each refused at the 32 MiB cap: kept, that would be 640 MiB.
    assert!(
        grown_mib < MEMORY_MIB,
        "RSS grew by {grown_mib} MiB ({before} → {after} KiB)"
    );
}

#[tokio::test]
async fn plugin_events_drive_the_token_metrics_and_nonsense_is_ignored() {
    let server = hostile_server().await;
    for prompt in ["Once upon a time", "LIAR: once upon a time"] {
        let before = server.metrics().await;
        let (status, body) = server
            .post(
                "/v1/completions",
                &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}),
            )
            .await;
        assert_eq!(status, 200, "{prompt}: {body}");
        let after = server.metrics().await;
        let tokens = |m: &lynx_tests::Metrics, kind: &str| {
            m.value("tokens_total", &[("kind", kind), ("model_name", MODEL)])
        };
        let usage = &body["usage"];
        assert_eq!(
            tokens(&after, "prompt") - tokens(&before, "prompt"),
            usage["prompt_tokens"].as_f64().unwrap_or(-1.0),
            "{prompt}"
        );
        assert_eq!(
            tokens(&after, "completion") - tokens(&before, "completion"),
            usage["completion_tokens"].as_f64().unwrap_or(-1.0),
            "{prompt}"
        );
        let ttft = |m: &lynx_tests::Metrics| {
            m.histogram_count("time_to_first_token_seconds", &[("model_name", MODEL)])
        };
        assert_eq!(ttft(&after) - ttft(&before), 1, "{prompt}");
    }
    assert!(
        server.log().contains("ignored"),
        "nonsense events are logged:\n{}",
        server.log()
    );
}

#[tokio::test]
async fn the_strict_policy_rejects_long_prompts() {
    let server = Server::start_with(&["--plugin", "strict"]).await;
    let (status, body) = server
        .post("/v1/completions", &completion("Once upon a time"))
        .await;
    assert_eq!(status, 200, "{body}");
    let long = "word ".repeat(100);
    for (path, request) in [
        ("/v1/completions", completion(&long)),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": long}]}),
        ),
    ] {
        let (status, body) = server.post(path, &request).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["code"], "prompt_too_long", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("64") && message.contains("strict"),
            "{body}"
        );
    }
    // The default plugin serves the same long prompt.
    let default = Server::start().await;
    let (status, body) = default.post("/v1/completions", &completion(&long)).await;
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_plugin_for_another_wit_version_is_refused_naming_both_versions() {
    let future = plugins_dist().join("test/future.wasm");
    let (ok, out) = run_host(&["plugin", "check", future.to_str().expect("utf-8")]);
    assert!(!ok, "plugin check accepted it:\n{out}");
    assert!(
        out.contains("0.9.0") && out.contains("0.3.0"),
        "the refusal names both versions:\n{out}"
    );

    let dir = plugins_dist().join("test");
    let (ok, out) = run_host(&[
        "--listen",
        "127.0.0.1:0",
        "--plugins-dir",
        dir.to_str().expect("utf-8"),
        "--plugin",
        "future",
    ]);
    assert!(!ok, "the server started with it:\n{out}");
    assert!(out.contains("0.9.0") && out.contains("0.3.0"), "{out}");
}

#[test]
fn plugin_check_validates_and_reports_exports() {
    let default = plugins_dist().join("default.wasm");
    let (ok, out) = run_host(&["plugin", "check", default.to_str().expect("utf-8")]);
    assert!(ok, "{out}");
    for export in [
        "lynx:plugin/router@0.3.0",
        "lynx:plugin/policy@0.3.0",
        "lynx:plugin/postprocess@0.3.0",
        "lynx:plugin/constraint@0.3.0",
    ] {
        assert!(out.contains(export), "no {export} in:\n{out}");
    }
    assert!(out.contains("smoke call"), "{out}");

    let not_wasm =
        std::env::temp_dir().join(format!("lynx-not-a-plugin-{}.wasm", std::process::id()));
    std::fs::write(&not_wasm, b"\0asm but not really").expect("write");
    let (ok, out) = run_host(&["plugin", "check", not_wasm.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&not_wasm);
    assert!(!ok, "{out}");
    assert!(out.contains("not a valid WebAssembly component"), "{out}");
}

/// The hostile plugin with room to misbehave: memory for a 64 MiB answer, a per-call
/// deadline a crawling `push` stays under, and a per-request budget it does not.
async fn roomy_hostile_server() -> Server {
    let dir = plugins_dist().join("test");
    Server::start_with(&[
        "--plugins-dir",
        dir.to_str().expect("utf-8 path"),
        "--plugin",
        "hostile",
        "--plugin-timeout-ms",
        "1500",
        "--plugin-budget-ms",
        "1200",
        "--plugin-memory-mib",
        "160",
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flooding_and_crawling_plugins_fail_alone_while_others_are_served() {
    let server = roomy_hostile_server().await;
    assert_serves(&server, "start-up").await;
    let rss_before = server.rss_kib();
    let hostile = |trigger: &'static str| {
        let server = &server;
        async move {
            let body = json!({"prompt": trigger, "max_tokens": 40, "temperature": 0});
            server.post("/v1/completions", &body).await
        }
    };
    let bystanders = async {
        for i in 0..6 {
            assert_serves(&server, &format!("bystander {i}")).await;
        }
    };
    let polls = async {
        let mut worst = Duration::ZERO;
        for _ in 0..60 {
            let t0 = Instant::now();
            assert_eq!(server.health_status().await, 200);
            worst = worst.max(t0.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worst
    };
    let (flood, crawl, (), worst) =
        tokio::join!(hostile("FLOOD"), hostile("CRAWL"), bystanders, polls);
    assert_plugin_error(flood.0, &flood.1, "FLOOD");
    assert_eq!(
        flood.1["error"]["code"], "plugin_invalid_result",
        "{}",
        flood.1
    );
    assert_plugin_error(crawl.0, &crawl.1, "CRAWL");
    assert_eq!(
        crawl.1["error"]["code"], "plugin_budget_exceeded",
        "{}",
        crawl.1
    );
    assert!(worst < Duration::from_millis(500), "/health took {worst:?}");
    for _ in 0..3 {
        let (status, body) = hostile("FLOOD").await;
        assert_plugin_error(status, &body, "FLOOD again");
    }
    let grown_mib = server.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 200, "RSS grew by {grown_mib} MiB");
    assert_serves(&server, "the flood").await;
}

#[tokio::test]
async fn time_in_host_imports_counts_toward_the_request_budget() {
    let server = roomy_hostile_server().await;
    let t0 = Instant::now();
    let (status, body) = server.post("/v1/completions", &completion("HEAVY")).await;
    let took = t0.elapsed();
    assert_plugin_error(status, &body, "HEAVY");
    assert_eq!(body["error"]["code"], "plugin_budget_exceeded", "{body}");
    assert!(took < Duration::from_secs(5), "HEAVY took {took:?}");
    assert_serves(&server, "HEAVY").await;
}

#[tokio::test]
async fn plugin_log_lines_are_rate_limited_and_escaped() {
    let server = hostile_server().await;
    let (status, body) = server.post("/v1/completions", &completion("CHATTY")).await;
    assert_eq!(status, 200, "{body}");
    let log = server.log();
    let lines = log.lines().filter(|l| l.contains("chatty ")).count();
    assert!(
        (1..=100).contains(&lines),
        "{lines} of 10000 chatty lines logged"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("forged line")),
        "a plugin forged a log line"
    );
    assert!(
        log.contains("chatty 0\\nforged line"),
        "not escaped:\n{log}"
    );
    // The drop count is reported with the next line that gets through: once the
    // limiter lets lines through again, which a fast model's next request may precede.
    let mut reported = log.contains("dropped");
    for _ in 0..10 {
        if reported {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (status, _) = server.post("/v1/completions", &completion("CHATTY")).await;
        assert_eq!(status, 200);
        reported = server.log().contains("dropped");
    }
    assert!(reported, "no drop count logged:\n{}", server.log());
}
