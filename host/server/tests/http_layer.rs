//! The HTTP layer in process, over a scripted backend (`support/scripted.rs`): the real
//! router, handlers, plugin host and default plugin, no model. What the handlers make of
//! generation events: response and stream shapes, usage, log-probabilities, `n`
//! interleaving, errors before and during a stream, capacity, and clients that leave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/scripted.rs"]
mod scripted;

use std::time::Duration;

use scripted::{reply, server};
use serde_json::{json, Value};

async fn post(path: &str, body: Value) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::Client::new()
        .post(server().url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

/// The `data:` payloads of a stream, `[DONE]` included.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn json_events(body: &str) -> Vec<Value> {
    events(body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn assert_openai_error(body: &str, kind: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap();
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    v
}

#[tokio::test]
async fn a_completion_carries_the_generated_text_finish_reason_and_usage() {
    let (status, _, body) = post(
        "/v1/completions",
        json!({"prompt": "plain one", "max_tokens": 50}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["text"], reply(0));
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let asked = server().submitted("plain one");
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].prompt, "plain one", "the byte tokenizer's ids");
    assert_eq!(v["usage"]["prompt_tokens"], "plain one".len());
    assert_eq!(v["usage"]["completion_tokens"], reply(0).len());
    assert_eq!(
        v["usage"]["total_tokens"],
        "plain one".len() + reply(0).len()
    );
}

#[tokio::test]
async fn max_tokens_cuts_the_text_and_says_length() {
    let (status, _, body) = post(
        "/v1/completions",
        json!({"prompt": "short one", "max_tokens": 5}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], &reply(0)[..5]);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(server().submitted("short one")[0].max_tokens, 5);
}

#[tokio::test]
async fn a_stream_is_text_deltas_then_the_finish_then_usage_then_done() {
    let (status, headers, body) = post(
        "/v1/completions",
        json!({"prompt": "streamed one", "max_tokens": 50, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let all = events(&body);
    assert_eq!(all.last().unwrap(), "[DONE]");
    let chunks = json_events(&body);
    let (usage, rest) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], reply(0).len());
    let text: String = rest
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, reply(0));
    let last = rest.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert!(rest[..rest.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert!(rest.iter().all(|c| c["usage"].is_null()));
}

#[tokio::test]
async fn a_chat_is_rendered_with_the_template_and_answered_as_the_assistant() {
    let (status, _, body) = post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "chat one"}], "max_tokens": 50}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], reply(0));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let asked = server().submitted("chat one");
    assert_eq!(
        asked[0].prompt,
        "<|im_start|>user\nchat one<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[tokio::test]
async fn a_chat_stream_opens_with_the_role_and_ends_with_an_empty_delta() {
    let (status, _, body) = post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "chat streamed"}], "max_tokens": 50,
               "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body).last().unwrap(), "[DONE]");
    let chunks = json_events(&body);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let ids: std::collections::HashSet<&str> =
        chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, reply(0));
    let last = &chunks.last().unwrap()["choices"][0];
    assert_eq!(last["delta"], json!({}));
    assert_eq!(last["finish_reason"], "stop");
}

#[tokio::test]
async fn completion_logprobs_have_openai_s_legacy_shape() {
    let (status, _, body) = post(
        "/v1/completions",
        json!({"prompt": "scored one", "max_tokens": 4, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(server().submitted("scored one")[0].logprobs, Some(2));
    let v: Value = serde_json::from_str(&body).unwrap();
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, ["H", "e", "l", "l"]);
    assert_eq!(lp["token_logprobs"], json!([-0.5, -0.5, -0.5, -0.5]));
    assert_eq!(lp["text_offset"], json!([0, 1, 2, 3]));
    let top = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 4);
    assert_eq!(top[0], json!({"H": -0.5, "I": -1.5}));
}

#[tokio::test]
async fn chat_logprobs_have_the_content_shape_with_bytes() {
    let (status, _, body) = post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "chat scored"}], "max_tokens": 2,
               "logprobs": true, "top_logprobs": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 2);
    assert_eq!(content[0]["token"], "H");
    assert_eq!(content[0]["logprob"], -0.5);
    assert_eq!(content[0]["bytes"], json!([72]));
    assert_eq!(
        content[0]["top_logprobs"],
        json!([{"token": "H", "logprob": -0.5, "bytes": [72]}])
    );
}

#[tokio::test]
async fn n_choices_stream_interleaved_each_under_its_own_index() {
    let (status, _, body) = post(
        "/v1/completions",
        json!({"prompt": "three ways", "max_tokens": 50, "n": 3, "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body).last().unwrap(), "[DONE]");
    let mut texts = vec![String::new(); 3];
    let mut finishes = vec![0; 3];
    let mut order = Vec::new();
    for c in json_events(&body) {
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        texts[i].push_str(choice["text"].as_str().unwrap());
        if !choice["finish_reason"].is_null() {
            finishes[i] += 1;
        }
        order.push(i);
    }
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(*text, reply(i), "choice {i}");
    }
    assert_eq!(finishes, [1, 1, 1]);
    // The choices ran side by side: their chunks are not one after the other.
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches > 2, "interleaved: {order:?}");
    let asked = server().submitted("three ways");
    let mut indices: Vec<usize> = asked.iter().map(|s| s.choice.unwrap().1).collect();
    indices.sort();
    assert_eq!(indices, [0, 1, 2]);
}

#[tokio::test]
async fn a_failure_before_any_token_is_a_500_in_openai_s_shape() {
    let (status, _, body) = post(
        "/v1/completions",
        json!({"prompt": "[fail] whole", "max_tokens": 50}),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    let v = assert_openai_error(&body, "server_error");
    assert!(
        !v["error"]["message"].as_str().unwrap().contains("scripted"),
        "details stay in the log: {body}"
    );
}

#[tokio::test]
async fn a_failure_mid_stream_ends_it_with_an_error_event() {
    let (status, _, body) = post(
        "/v1/completions",
        json!({"prompt": "[fail] streamed", "max_tokens": 50, "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "the stream had started: {body}");
    let all = events(&body);
    assert_ne!(all.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(all.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{body}");
    let text: String = json_events(&body)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "abc", "what was generated before the failure");
}

#[tokio::test]
async fn a_full_queue_is_a_503_with_retry_after() {
    let (status, headers, body) = post(
        "/v1/completions",
        json!({"prompt": "[overloaded]", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["retry-after"], "1");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "overloaded", "{body}");
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_its_generation() {
    let response = reqwest::Client::new()
        .post(server().url("/v1/completions"))
        .json(&json!({"prompt": "[hang] leaving", "max_tokens": 50, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    use futures_util::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let gone = server().backend.cancelled.lock().unwrap().clone();
        if gone.iter().any(|p| p.contains("[hang] leaving")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the generation was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bad_requests_are_400s_naming_the_parameter_and_reach_no_backend() {
    for (body, param) in [
        (json!({"prompt": "bad zero", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "bad n", "n": 17}), "n"),
        (json!({"prompt": "bad lp", "logprobs": 6}), "logprobs"),
        (
            json!({"prompt": "bad temp", "temperature": "hot"}),
            "temperature",
        ),
        (json!({"prompt": "bad cap", "max_tokens": 65}), "max_tokens"),
    ] {
        let (status, _, text) = post("/v1/completions", body.clone()).await;
        assert_eq!(status, 400, "{body}: {text}");
        let v = assert_openai_error(&text, "invalid_request_error");
        assert_eq!(v["error"]["param"], param, "{body}: {text}");
    }
    for marker in ["bad zero", "bad n", "bad lp", "bad temp", "bad cap"] {
        assert!(server().submitted(marker).is_empty(), "{marker}");
    }
    // Token ids outside the vocabulary (259 ids here), wherever a request names them.
    for (path, body, param) in [
        ("/v1/completions", json!({"prompt": [72, 300]}), "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "biased", "logit_bias": {"259": 5}}),
            "logit_bias",
        ),
        ("/detokenize", json!({"tokens": [72, 999]}), "tokens"),
    ] {
        let (status, _, text) = post(path, body.clone()).await;
        assert_eq!(status, 400, "{body}: {text}");
        let v = assert_openai_error(&text, "invalid_request_error");
        assert_eq!(v["error"]["param"], param, "{body}: {text}");
    }
    assert!(server().submitted("biased").is_empty());
    let (status, _, text) = post(
        "/v1/completions",
        json!({"prompt": "wrong model", "model": "nope"}),
    )
    .await;
    assert_eq!(status, 404, "{text}");
    let (status, _, text) = post("/v1/completions", json!({"prompt": "x".repeat(600)})).await;
    assert_eq!(status, 400, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
}

#[tokio::test]
async fn health_and_models_describe_what_is_served() {
    let health: Value = reqwest::get(server().url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["kv_cache_slots"], 4);
    let models: Value = reqwest::get(server().url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2-135m-instruct");
}

/// Moved from the end-to-end `tests/tests/logprobs.rs`: it tests the HTTP layer only.
#[tokio::test]
async fn out_of_range_scoring_fields_are_refused_naming_them() {
    for (path, body, param) in [
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 6}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            "top_logprobs",
        ),
    ] {
        let (status, _, text) = post(path, body.clone()).await;
        let err: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["param"], param, "{body}: {err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
    }
}
