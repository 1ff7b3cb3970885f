//! Limits, deadlines and faults, against the real binary: every bad request gets its
//! 4xx in the OpenAI error shape, slow clients and over-long requests are cut off and
//! free what they held, and a panic costs only its own request.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use lynx_tests::{assert_complete, read_until_closed, Server};
use serde_json::{json, Value};

fn assert_error(status: u16, body: &Value, want_status: u16, code: Option<&str>) {
    assert_eq!(status, want_status, "body: {body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    if let Some(code) = code {
        assert_eq!(e["code"], code, "{body}");
    }
}

#[tokio::test]
async fn limits_give_clear_client_errors() {
    let server = Server::start_with(&["--max-body-bytes", "4096", "--max-tokens", "64"]).await;
    let big = format!(r#"{{"prompt": "{}", "max_tokens": 4}}"#, "a".repeat(8000));
    let (status, body) = server.post_raw("/v1/completions", big.into_bytes()).await;
    assert_error(status, &body, 413, Some("payload_too_large"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("4096"));

    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hi", "max_tokens": 65}),
        )
        .await;
    assert_error(status, &body, 400, Some("max_tokens_exceeded"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("64"),
        "{body}"
    );
    assert_eq!(body["error"]["param"], "max_tokens");

    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 1000}),
        )
        .await;
    assert_error(status, &body, 400, Some("max_tokens_exceeded"));

    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hi", "max_tokens": 4, "stop": ["a", "b", "c", "d", "e"]}),
        )
        .await;
    assert_error(status, &body, 400, None);
    assert_eq!(body["error"]["param"], "stop");
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hi", "max_tokens": 4, "stop": "x".repeat(1000)}),
        )
        .await;
    assert_error(status, &body, 400, None);
    assert_eq!(body["error"]["param"], "stop");

    let mut invalid = br#"{"prompt": "caf"#.to_vec();
    invalid.extend_from_slice(&[0xC3, 0x28, 0xFF]);
    invalid.extend_from_slice(br#"", "max_tokens": 4}"#);
    let (status, body) = server.post_raw("/v1/completions", invalid).await;
    assert_error(status, &body, 400, None);

    // Unknown fields are ignored, as OpenAI does; a request without max_tokens gets at
    // most the cap.
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Count: 1, 2, 3,", "temperature": 0, "logit_bias": {}, "user": "u", "x_unknown": [1]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["usage"]["completion_tokens"].as_u64().unwrap_or(0) <= 64,
        "{body}"
    );
}

#[tokio::test]
async fn the_request_deadline_frees_the_slot_and_ends_the_answer() {
    let server = Server::start_with(&["--request-timeout", "2"]).await;
    // Greedy counting does not end by itself before the 4096-token cap.
    let long = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "temperature": 0, "max_tokens": 4000});
    let started = Instant::now();
    let (status, body) = server.post("/v1/completions", &long).await;
    assert_error(status, &body, 504, Some("request_timeout"));
    assert!(started.elapsed() >= Duration::from_secs(2));

    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/completions", &streamed).await;
    let last: Value = serde_json::from_str(events.last().expect("an event")).expect("json");
    assert_eq!(last["error"]["code"], "request_timeout", "{events:?}");
    assert!(
        events.len() > 2,
        "tokens came before the deadline: {events:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = server.metrics().await;
        if m.value("kv_cache_slots_used", &[]) == 0.0 && m.value("queue_depth", &[]) == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slots not freed after the deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = server.metrics().await;
    let timeouts = m.value(
        "request_total",
        &[("endpoint", "/v1/completions"), ("status", "504")],
    );
    assert_eq!(timeouts, 1.0, "the non-streamed timeout is counted as 504");
}

#[tokio::test]
async fn slow_clients_cannot_hold_connections() {
    let server = Server::start_with(&["--client-timeout", "1"]).await;
    let addr = server.addr();
    let (headers, body) = tokio::task::spawn_blocking(move || {
        // Headers that never end.
        let mut slow_headers = TcpStream::connect(&addr).expect("connect");
        slow_headers
            .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .expect("write");
        let headers = read_until_closed(&mut slow_headers, Duration::from_secs(15));
        // Headers, then a body that stops halfway.
        let mut slow_body = TcpStream::connect(&addr).expect("connect");
        slow_body
            .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
            .expect("write");
        let body = read_until_closed(&mut slow_body, Duration::from_secs(15));
        (headers, body)
    })
    .await
    .expect("join");
    assert!(
        headers.is_some(),
        "a client that never finished its headers kept its connection"
    );
    let body = body.expect("a client that never finished its body kept its connection");
    assert!(body.starts_with("HTTP/1.1 408"), "{body}");
    assert!(body.contains("request_timeout"), "{body}");
    // The server serves everyone else.
    let (status, _) = server
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_panic_costs_only_its_own_request() {
    let server = Server::start_with(&["--fault-injection"]).await;
    let normal = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0});
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut body = normal.clone();
        body["stream"] = json!(true);
        streams.push(body);
    }
    let bystanders =
        futures_util::future::join_all(streams.iter().map(|b| server.stream("/v1/completions", b)));
    let faults = async {
        let (handler, body_h) = server
            .post(
                "/v1/completions",
                &json!({"prompt": "lynx-fault:handler", "max_tokens": 4}),
            )
            .await;
        let (scheduler, body_s) = server
            .post(
                "/v1/completions",
                &json!({"prompt": "lynx-fault:scheduler", "max_tokens": 4}),
            )
            .await;
        let streamed = json!({"prompt": "lynx-fault:scheduler", "max_tokens": 4, "stream": true});
        let events = server.stream("/v1/completions", &streamed).await;
        (handler, body_h, scheduler, body_s, events)
    };
    let (bystanders, (handler, body_h, scheduler, body_s, events)) =
        tokio::join!(bystanders, faults);
    assert_error(handler, &body_h, 500, None);
    assert_error(scheduler, &body_s, 500, None);
    let last: Value = serde_json::from_str(events.last().expect("event")).expect("json");
    assert_eq!(last["error"]["type"], "server_error", "{events:?}");
    for events in &bystanders {
        assert_complete(events);
    }
    // The scheduler is still serving, and nothing is held.
    let (status, body) = server.post("/v1/completions", &normal).await;
    assert_eq!(status, 200, "{body}");
    let m = server.metrics().await;
    assert_eq!(m.value("kv_cache_slots_used", &[]), 0.0);
    assert_eq!(
        m.value(
            "request_total",
            &[("endpoint", "/v1/completions"), ("status", "500")]
        ),
        2.0,
        "the two whole answers that failed; the failed stream had started 200"
    );
    assert_eq!(server.health_status().await, 200);
}
