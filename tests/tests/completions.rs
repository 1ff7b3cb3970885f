//! The OpenAI API on the real model: answers, streaming, usage, errors, disconnects.

use std::time::Duration;

use futures_util::StreamExt;
use lynx_tests::{counts, Server};
use serde_json::{json, Value};

const MODEL: &str = "smollm2-135m-instruct";

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"]
        .as_str()
        .or_else(|| v["choices"][0]["text"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
}

/// The kernels are chosen at run time: forced to the portable ones (what a CPU without
/// AVX2 gets), the same binary serves, says so in its log, and answers the same
/// question with the same fact.
#[tokio::test]
async fn the_portable_kernels_serve_where_a_cpu_lacks_avx2() {
    let server = Server::start_with(&["--simd", "portable"]).await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France?"}
                ],
                "temperature": 0,
                "max_tokens": 40
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(content(&body).contains("Paris"), "{body}");
    let log = server.log();
    assert!(log.contains("kernels=Portable"), "{log}");
}

#[tokio::test]
async fn greedy_chat_answers_the_capital_of_france() {
    let server = Server::start().await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({
                "model": MODEL,
                // The model's own template adds a long default system prompt when there
                // is none, with which this 135M model rambles; a short one keeps it on
                // topic. Asked bare ("What is the capital of France?"), its first token
                // is a near-tie ("The" -1.63, "La" -1.74 with the f32 cache) that the f16
                // cache's rounding flips into French; asked for a sentence, "The" leads
                // by 1.5 nats with either cache.
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
                ],
                "temperature": 0,
                "max_tokens": 40
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(content(&body).contains("Paris"), "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
}

/// Streamed text, the finish reason and the usage chunk of one stream.
fn read_stream(events: &[String], chat: bool) -> (String, String, Value) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).expect("chunk is JSON");
        assert_eq!(
            chunk["object"],
            if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            }
        );
        if let Some(choice) = chunk["choices"].get(0) {
            let piece = if chat {
                &choice["delta"]["content"]
            } else {
                &choice["text"]
            };
            text.push_str(piece.as_str().unwrap_or(""));
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    (text, finish, usage)
}

#[tokio::test]
async fn streaming_and_whole_responses_agree_for_the_same_seed() {
    let server = Server::start().await;
    for (path, chat) in [("/v1/completions", false), ("/v1/chat/completions", true)] {
        let mut req = if chat {
            json!({"messages": [{"role": "user", "content": "Tell me a story about a fox."}]})
        } else {
            json!({"prompt": "Once upon a time"})
        };
        req["temperature"] = json!(0.9);
        req["top_p"] = json!(0.95);
        req["seed"] = json!(1234);
        req["max_tokens"] = json!(24);
        let (status, whole) = server.post(path, &req).await;
        assert_eq!(status, 200, "{whole}");
        // The same seed gives the same text again: sampling is reproducible.
        let (_, again) = server.post(path, &req).await;
        assert_eq!(content(&again), content(&whole));

        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
        let events = server.stream(path, &req).await;
        let (text, finish, usage) = read_stream(&events, chat);
        assert_eq!(text, content(&whole), "{path}");
        assert_eq!(
            finish,
            whole["choices"][0]["finish_reason"].as_str().unwrap()
        );
        assert_eq!(counts(&usage), counts(&whole["usage"]), "{path}");
    }
}

#[tokio::test]
async fn usage_counts_the_tokens_produced() {
    let server = Server::start().await;
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // "Once upon a time" is four tokens; greedy runs to max_tokens here.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    // A streamed answer carries one text chunk per token when no stop is held back.
    let events = server
        .stream(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": true}),
        )
        .await;
    let (text, _, usage) = read_stream(&events, false);
    assert_eq!(text, content(&body));
    assert!(
        usage.is_null(),
        "usage only when stream_options.include_usage"
    );
}

#[tokio::test]
async fn stop_sequences_cut_the_text_and_end_generation() {
    let server = Server::start().await;
    let req = json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0});
    let (_, full) = server.post("/v1/completions", &req).await;
    let full_text = content(&full).to_string();
    // Stop at the first space-separated word after the first few characters.
    let cut = full_text[3..]
        .find(' ')
        .map(|i| i + 3)
        .expect("a space in the text");
    let stop = &full_text[cut..cut + 2];
    let mut with_stop = req.clone();
    with_stop["stop"] = json!([stop]);
    let (status, body) = server.post("/v1/completions", &with_stop).await;
    assert_eq!(status, 200, "{body}");
    let expected = &full_text[..full_text.find(stop).unwrap()];
    assert_eq!(content(&body), expected);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    with_stop["stream"] = json!(true);
    let (text, finish, _) = read_stream(&server.stream("/v1/completions", &with_stop).await, false);
    assert_eq!(text, expected);
    assert_eq!(finish, "stop");
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start().await;
    let long_prompt = "word ".repeat(5000);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("/v1/completions", json!({"prompt": ""}), 400, "empty"),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": -3}),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": "many"}),
            400,
            "max_tokens",
        ),
        ("/v1/completions", json!({"prompt": 42}), 400, "prompt"),
        ("/v1/completions", json!({"max_tokens": 3}), 400, "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 17}),
            400,
            "`n`",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": 5}),
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": long_prompt}),
            400,
            "context length",
        ),
        (
            "/v1/completions",
            // Within the --max-tokens cap (4096), past the context with the prompt.
            json!({"prompt": "x y z", "max_tokens": 4096}),
            400,
            "context length",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 100000}),
            400,
            "at most 4096",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "model": "gpt-4"}),
            404,
            "gpt-4",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            "role",
        ),
    ];
    for (path, body, want_status, needle) in cases {
        let (status, err) = server.post(path, &body).await;
        assert_eq!(status, want_status, "{body} -> {err}");
        let e = &err["error"];
        let message = e["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message in {err}"));
        assert!(
            message.contains(needle),
            "{message:?} should name {needle:?}"
        );
        assert!(
            e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(),
            "{err}"
        );
    }
    let (status, err) = server
        .post_raw("/v1/completions", "{\"prompt\": \"x\",")
        .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{err}"
    );
    assert_eq!(err["error"]["type"], "invalid_request_error");

    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn models_and_health() {
    let server = Server::start().await;
    let models: Value = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    let r = server
        .client
        .get(server.url(&format!("/v1/models/{MODEL}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = server
        .client
        .get(server.url("/v1/models/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let health: Value = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
}

#[tokio::test]
async fn a_disconnected_stream_stops_generating() {
    let server = Server::start().await;
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "Write a very long essay about the sea.", "max_tokens": 2000, "temperature": 0.8, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first chunk").unwrap();
    assert!(!first.is_empty());
    drop(body);

    // Within a moment the slot is free and no more tokens are computed.
    let mut settled = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = server.metrics().await;
        if m.value("kv_cache_slots_used", &[]) == 0.0 {
            settled = Some(m.value("tokens_total", &[("kind", "completion")]));
            break;
        }
    }
    let settled = settled.expect("the slot was freed after the client left");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = server
        .metrics()
        .await
        .value("tokens_total", &[("kind", "completion")]);
    assert_eq!(later, settled, "tokens were computed for nobody");
    assert!(
        settled < 1000.0,
        "generation ran on after the disconnect: {settled} tokens"
    );
}
