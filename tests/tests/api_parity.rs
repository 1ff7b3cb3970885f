//! OpenAI and vLLM request fields beyond the basics, against the real binary:
//! `logit_bias`, the presence, frequency and repetition penalties, `top_k`, `min_p`,
//! `ignore_eos` and `min_tokens` act as documented and keep seeds reproducible; and
//! `/tokenize` and `/detokenize` go through the active plugin, so they agree with
//! generation.

use lynx_tests::{answer_text, Server};
use serde_json::{json, Value};

fn completion(prompt: &str, max_tokens: u64) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

fn with(mut body: Value, fields: Value) -> Value {
    for (k, v) in fields.as_object().expect("fields") {
        body[k] = v.clone();
    }
    body
}

async fn tokenize(server: &Server, body: Value) -> Vec<u64> {
    let (status, answer) = server.post("/tokenize", &body).await;
    assert_eq!(status, 200, "{answer}");
    let tokens: Vec<u64> = answer["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().expect("id"))
        .collect();
    assert_eq!(answer["count"], tokens.len(), "{answer}");
    assert!(
        answer["max_model_len"].as_u64().is_some_and(|m| m > 0),
        "{answer}"
    );
    tokens
}

#[tokio::test]
async fn tokenize_and_detokenize_agree_with_generation_and_move_no_metric() {
    let server = Server::start().await;
    let before = server.metrics().await;
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let chat_ids = tokenize(&server, json!({"messages": messages})).await;
    let text_ids = tokenize(&server, json!({"prompt": "Hello world"})).await;
    let bare = tokenize(
        &server,
        json!({"prompt": "Hello world", "add_special_tokens": false}),
    )
    .await;
    assert!(
        bare.len() <= text_ids.len() && text_ids.ends_with(&bare),
        "{text_ids:?} {bare:?}"
    );

    let (status, text) = server.post("/detokenize", &json!({"tokens": bare})).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text["prompt"], "Hello world");
    let after = server.metrics().await;
    assert_eq!(
        after.value("tokens_total", &[]),
        before.value("tokens_total", &[]),
        "tokenizing is not generating"
    );

    // The chat prompt's ids are the ones a chat completion prefills.
    let (status, answer) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 1, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["prompt_tokens"], chat_ids.len());

    for (path, bad, param) in [
        (
            "/tokenize",
            json!({"prompt": "x", "messages": messages}),
            "prompt",
        ),
        ("/tokenize", json!({}), "prompt"),
        ("/detokenize", json!({"tokens": [u32::MAX]}), "tokens"),
        ("/detokenize", json!({"tokens": "abc"}), "tokens"),
    ] {
        let (status, answer) = server.post(path, &bad).await;
        assert_eq!(status, 400, "{path} {bad}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{answer}");
    }
    let (status, _) = server
        .post("/tokenize", &json!({"model": "other", "prompt": "x"}))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_large_negative_bias_on_the_greedy_token_changes_the_output() {
    let server = Server::start().await;
    let body = completion("The capital of France is", 1);
    let (status, answer) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let greedy = answer_text(&answer);
    let ids = tokenize(
        &server,
        json!({"prompt": greedy, "add_special_tokens": false}),
    )
    .await;
    assert_eq!(ids.len(), 1, "{greedy:?} is one token");
    let biased = with(
        body.clone(),
        json!({"logit_bias": {ids[0].to_string(): -100}}),
    );
    let (status, answer) = server.post("/v1/completions", &biased).await;
    assert_eq!(status, 200, "{answer}");
    assert_ne!(answer_text(&answer), greedy, "the banned token was chosen");
    // A bias towards another token makes it the greedy choice.
    let boosted = with(body, json!({"logit_bias": {"42": 100}}));
    let (_, answer) = server.post("/v1/completions", &boosted).await;
    let (_, text) = server.post("/detokenize", &json!({"tokens": [42]})).await;
    assert_eq!(
        answer_text(&answer),
        text["prompt"].as_str().unwrap_or_default()
    );
}

#[tokio::test]
async fn end_tokens_wait_for_min_tokens_and_never_come_with_ignore_eos() {
    let server = Server::start().await;
    let chat = json!({"messages": [{"role": "user", "content": "Reply with one word: yes or no?"}],
                      "max_tokens": 48, "temperature": 0});
    let (_, plain) = server.post("/v1/chat/completions", &chat).await;
    let plain_tokens = plain["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!(plain_tokens < 20, "the model answers briefly: {plain}");
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");

    let (_, answer) = server
        .post(
            "/v1/chat/completions",
            &with(chat.clone(), json!({"min_tokens": 24})),
        )
        .await;
    assert!(
        answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) >= 24,
        "{answer}"
    );

    let (_, answer) = server
        .post(
            "/v1/chat/completions",
            &with(chat, json!({"ignore_eos": true})),
        )
        .await;
    assert_eq!(answer["usage"]["completion_tokens"], 48, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
}

#[tokio::test]
async fn top_k_min_p_and_penalties_act_as_documented_and_seeds_reproduce() {
    let server = Server::start().await;
    let prompt = "Once upon a time";
    let (_, greedy) = server
        .post("/v1/completions", &completion(prompt, 24))
        .await;
    // Sampling from the single most likely token is greedy, whatever the seed.
    let top1 =
        json!({"prompt": prompt, "max_tokens": 24, "temperature": 1.0, "top_k": 1, "seed": 3});
    let (_, answer) = server.post("/v1/completions", &top1).await;
    assert_eq!(answer_text(&answer), answer_text(&greedy));
    // min_p 1 keeps only the most likely token: greedy too.
    let minp =
        json!({"prompt": prompt, "max_tokens": 24, "temperature": 1.0, "min_p": 1.0, "seed": 4});
    let (_, answer) = server.post("/v1/completions", &minp).await;
    assert_eq!(answer_text(&answer), answer_text(&greedy));

    // Seeded sampling with the extras is reproducible.
    let sampled = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0.9, "top_k": 20,
                         "min_p": 0.02, "presence_penalty": 0.5, "seed": 11});
    let (_, a) = server.post("/v1/completions", &sampled).await;
    let (_, b) = server.post("/v1/completions", &sampled).await;
    assert_eq!(answer_text(&a), answer_text(&b));

    // A repetitive continuation: the frequency and repetition penalties make the model
    // leave it (the presence penalty's flat cost is checked by the unit tests: it does
    // not reorder tokens that all occurred already, as here).
    let counting = completion("1, 1, 1, 1, 1, 1, 1, 1,", 16);
    let (_, plain) = server.post("/v1/completions", &counting).await;
    let ones = |t: &str| t.matches('1').count();
    let plain = answer_text(&plain);
    for penalty in [
        json!({"frequency_penalty": 2.0}),
        json!({"repetition_penalty": 1.8}),
    ] {
        let (status, answer) = server
            .post("/v1/completions", &with(counting.clone(), penalty.clone()))
            .await;
        assert_eq!(status, 200, "{answer}");
        let text = answer_text(&answer);
        assert!(
            ones(&text) < ones(&plain),
            "{penalty}: {text:?} against {plain:?}"
        );
    }

    let (status, answer) = server
        .post(
            "/v1/completions",
            &with(completion(prompt, 4), json!({"top_k": -5})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"]["param"], "top_k");
}
