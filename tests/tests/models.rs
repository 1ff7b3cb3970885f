//! The real binary serving the second model, gemma-3-270m (Q4_K_M; a base model with
//! no chat template; scripts/fetch-model.sh gemma3): greedy completions, whole and
//! streamed alike, exact token metrics, the same answers alone and batched, a stream
//! whose client left freeing its slot, a clear 400 for chat without a template, and chat
//! through `--chat-template`.

use futures_util::StreamExt;
use lynx_tests::{cached_model, Server};
use serde_json::{json, Value};

const NAME: &str = "gemma-3-270m";

async fn gemma(extra: &[&str]) -> Server {
    let model = cached_model("gemma-3-270m-q4_k_m.gguf", "scripts/fetch-model.sh gemma3");
    let mut args = vec![
        "--model",
        model.to_str().expect("utf-8"),
        "--model-name",
        NAME,
        "--kv-slots",
        "4",
        "--max-seq-len",
        "1024",
    ];
    args.extend(extra);
    Server::start_with(&args).await
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn gemma_completes_greedily_and_streams_the_same_text() {
    let server = gemma(&[]).await;
    let before = server.metrics().await;
    let body = json!({
        "model": NAME,
        "prompt": "The Eiffel Tower is located in",
        "max_tokens": 12,
        "temperature": 0,
    });
    let (status, whole) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    let answer = text(&whole);
    assert!(answer.contains("Paris"), "{whole}");
    assert_eq!(whole["usage"]["completion_tokens"], 12);
    assert_eq!(whole["usage"]["prompt_tokens"], 7, "BOS + 6 tokens");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/completions", &streamed).await;
    let joined: String = events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| {
            let v: Value = serde_json::from_str(e).expect("event json");
            text(&v)
        })
        .collect();
    assert_eq!(joined, answer);

    let after = server.metrics().await;
    let labels = [("model_name", NAME), ("kind", "completion")];
    assert_eq!(
        after.value("tokens_total", &labels) - before.value("tokens_total", &labels),
        24.0
    );
}

#[tokio::test]
async fn chat_without_a_template_is_a_clear_client_error_and_completions_still_work() {
    let server = gemma(&[]).await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": NAME, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "chat_template_missing", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--chat-template"), "{message}");
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"model": NAME, "prompt": "Hello", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn chat_uses_the_template_given_on_the_command_line() {
    let dir = std::env::temp_dir().join(format!("lynx-gemma-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("gemma.jinja");
    // Gemma's turn format; a system message has no role of its own.
    std::fs::write(
        &file,
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}\
         {{ raise_exception('System role not supported') }}{% endif %}\
         {{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') \
         + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
    )
    .expect("template");
    let server = gemma(&["--chat-template", file.to_str().expect("utf-8")]).await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({
                "model": NAME,
                "messages": [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "What is the capital of France?"}
                ],
                "max_tokens": 8,
                "temperature": 0,
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // <bos> <start_of_turn> user \n (system \n user text) <end_of_turn> \n
    // <start_of_turn> model \n: the turn markers are single tokens.
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    assert!((20..=30).contains(&prompt_tokens), "{body}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn gemma_answers_the_same_alone_and_batched() {
    let server = gemma(&[]).await;
    let prompts = [
        "The Eiffel Tower is located in",
        "Once upon a time",
        "def fibonacci(n):",
        "The three primary colors are",
    ];
    let body = |p: &str| json!({"model": NAME, "prompt": p, "max_tokens": 16, "temperature": 0});
    let mut alone = Vec::new();
    for p in prompts {
        let (status, v) = server.post("/v1/completions", &body(p)).await;
        assert_eq!(status, 200, "{v}");
        alone.push(text(&v));
    }
    let bodies: Vec<Value> = prompts.iter().map(|p| body(p)).collect();
    let together =
        futures_util::future::join_all(bodies.iter().map(|b| server.post("/v1/completions", b)))
            .await;
    for ((status, v), want) in together.iter().zip(&alone) {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(&text(v), want, "batched vs alone");
    }
}

#[tokio::test]
async fn a_disconnected_gemma_stream_frees_its_slot_and_stops_generating() {
    let server = gemma(&[]).await;
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(
            &json!({"model": NAME, "prompt": "Write a very long essay about the sea.",
                      "max_tokens": 900, "temperature": 0.8, "stream": true}),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("chunk");
    assert!(!first.is_empty());
    drop(body);

    // Within a moment the slot is free and the completion-token count stops moving.
    let labels = [("model_name", NAME), ("kind", "completion")];
    let mut settled = None;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let m = server.metrics().await;
        if m.value("kv_cache_slots_used", &[]) == 0.0 {
            settled = Some(m.value("tokens_total", &labels));
            break;
        }
    }
    let settled = settled.expect("the slot was not freed within 5 s");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        server.metrics().await.value("tokens_total", &labels),
        settled
    );
    assert!(settled < 900.0, "the whole answer was generated: {settled}");
}
