//! `/metrics` parsed, not grepped: the six families with their labels and buckets, and
//! counts that move by exactly what a known sequence of requests implies.

use std::collections::BTreeSet;

use lynx_tests::Server;
use serde_json::json;

const MODEL: &str = "smollm2-135m-instruct";
const LLM_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];
const TTFT_BUCKETS: [f64; 8] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0];

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn exactly_the_six_families_with_their_labels_and_buckets() {
    let server = Server::start().await;
    let (status, _) = server
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
    let m = server.metrics().await;
    assert_eq!(
        m.families(),
        set(&[
            "request_total",
            "request_duration_seconds",
            "tokens_total",
            "time_to_first_token_seconds",
            "kv_cache_slots_used",
            "queue_depth"
        ])
    );
    assert_eq!(m.type_of("request_total").as_deref(), Some("counter"));
    assert_eq!(
        m.type_of("request_duration_seconds").as_deref(),
        Some("histogram")
    );
    assert_eq!(m.type_of("tokens_total").as_deref(), Some("counter"));
    assert_eq!(
        m.type_of("time_to_first_token_seconds").as_deref(),
        Some("histogram")
    );
    assert_eq!(m.type_of("kv_cache_slots_used").as_deref(), Some("gauge"));
    assert_eq!(m.type_of("queue_depth").as_deref(), Some("gauge"));

    assert_eq!(
        m.label_names("request_total"),
        set(&["endpoint", "method", "status"])
    );
    assert_eq!(
        m.label_names("request_duration_seconds"),
        set(&["endpoint", "method"])
    );
    assert_eq!(m.label_names("tokens_total"), set(&["kind", "model_name"]));
    assert_eq!(
        m.label_values("tokens_total", "kind"),
        set(&["completion", "prompt"])
    );
    assert_eq!(
        m.label_names("time_to_first_token_seconds"),
        set(&["model_name"])
    );
    assert!(m.label_names("kv_cache_slots_used").is_empty());
    assert!(m.label_names("queue_depth").is_empty());

    let endpoint = [("endpoint", "/v1/completions"), ("method", "POST")];
    assert_eq!(
        m.buckets("request_duration_seconds", &endpoint),
        LLM_BUCKETS
    );
    assert_eq!(
        m.buckets("time_to_first_token_seconds", &[("model_name", MODEL)]),
        TTFT_BUCKETS
    );
}

#[tokio::test]
async fn counts_move_by_exactly_what_the_requests_imply() {
    let server = Server::start().await;
    let before = server.metrics().await;
    assert_eq!(
        before.value("tokens_total", &[("kind", "prompt"), ("model_name", MODEL)]),
        0.0
    );

    let mut prompt_tokens = 0.0;
    let mut completion_tokens = 0.0;
    for max_tokens in [3, 5] {
        let (status, body) = server
            .post(
                "/v1/completions",
                &json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0}),
            )
            .await;
        assert_eq!(status, 200);
        prompt_tokens += body["usage"]["prompt_tokens"].as_f64().unwrap();
        completion_tokens += body["usage"]["completion_tokens"].as_f64().unwrap();
    }
    let events = server
        .stream("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}))
        .await;
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    prompt_tokens += usage["usage"]["prompt_tokens"].as_f64().unwrap();
    completion_tokens += usage["usage"]["completion_tokens"].as_f64().unwrap();
    let (status, _) = server
        .post("/v1/completions", &json!({"prompt": "x", "max_tokens": 0}))
        .await;
    assert_eq!(status, 400);

    let m = server.metrics().await;
    let ok = [
        ("endpoint", "/v1/completions"),
        ("method", "POST"),
        ("status", "200"),
    ];
    let bad = [
        ("endpoint", "/v1/completions"),
        ("method", "POST"),
        ("status", "400"),
    ];
    let chat = [
        ("endpoint", "/v1/chat/completions"),
        ("method", "POST"),
        ("status", "200"),
    ];
    assert_eq!(m.value("request_total", &ok), 2.0);
    assert_eq!(m.value("request_total", &bad), 1.0);
    assert_eq!(m.value("request_total", &chat), 1.0);
    let completions = [("endpoint", "/v1/completions"), ("method", "POST")];
    assert_eq!(
        m.histogram_count("request_duration_seconds", &completions),
        3
    );
    assert_eq!(
        m.value("tokens_total", &[("kind", "prompt"), ("model_name", MODEL)]),
        prompt_tokens
    );
    assert_eq!(
        m.value(
            "tokens_total",
            &[("kind", "completion"), ("model_name", MODEL)]
        ),
        completion_tokens
    );
    assert_eq!(
        completion_tokens,
        3.0 + 5.0 + usage["usage"]["completion_tokens"].as_f64().unwrap()
    );
    // One first token per request that generated.
    assert_eq!(
        m.histogram_count("time_to_first_token_seconds", &[("model_name", MODEL)]),
        3
    );
    assert_eq!(m.value("kv_cache_slots_used", &[]), 0.0);
    assert_eq!(m.value("queue_depth", &[]), 0.0);
    // The earlier scrapes were counted too: the /metrics route is its own endpoint.
    assert!(
        m.value(
            "request_total",
            &[("endpoint", "/metrics"), ("status", "200")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn random_paths_do_not_grow_the_endpoint_label() {
    let server = Server::start().await;
    let before = server
        .metrics()
        .await
        .label_values("request_total", "endpoint")
        .len();
    let methods = [
        reqwest::Method::GET,
        reqwest::Method::POST,
        reqwest::Method::DELETE,
    ];
    for i in 0..1000u32 {
        let path = format!(
            "/{:x}/{}/v1/{}",
            i.wrapping_mul(2654435761),
            i,
            "x".repeat((i % 7) as usize)
        );
        let method = methods[(i % 3) as usize].clone();
        let r = server
            .client
            .request(method, server.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
    }
    // An extension method is folded too.
    let r = server
        .client
        .request(
            reqwest::Method::from_bytes(b"BREW").unwrap(),
            server.url("/v1/completions"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let m = server.metrics().await;
    let endpoints = m.label_values("request_total", "endpoint");
    assert!(
        endpoints.len() <= before + 3,
        "endpoint values grew to {endpoints:?}"
    );
    assert!(endpoints.contains("unmatched"));
    assert!(m.label_values("request_total", "method").len() <= 5);
    assert_eq!(
        m.value(
            "request_total",
            &[("endpoint", "unmatched"), ("status", "404")]
        ),
        1000.0
    );
}
