//! Log-probabilities, `echo` and `n` against the real binary, in OpenAI's shapes: on
//! completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and chat
//! (`content[]`), whole and streamed; echoed prompt log-probabilities equal the ones
//! the same tokens got when generated (both are the model's own, bit for bit); `n`
//! choices each with their own index and sampler, reproducible with a seed.

use lynx_tests::Server;
use serde_json::{json, Value};

async fn post(server: &Server, path: &str, body: &Value) -> Value {
    let (status, answer) = server.post(path, body).await;
    assert_eq!(status, 200, "{body} -> {answer}");
    answer
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array()
        .expect("array")
        .iter()
        .map(Value::as_f64)
        .collect()
}

/// Completions' shape, checked field by field: one entry per token, offsets counting
/// the text, the chosen token scored at most its best alternative.
fn check_completion_shape(choice: &Value, top: usize) {
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("token text"))
        .collect();
    assert_eq!(tokens.concat(), choice["text"].as_str().expect("text"));
    let values = floats(&lp["token_logprobs"]);
    let tops = lp["top_logprobs"].as_array().expect("top_logprobs");
    let offsets = lp["text_offset"].as_array().expect("text_offset");
    assert_eq!(values.len(), tokens.len());
    assert_eq!(tops.len(), tokens.len());
    assert_eq!(offsets.len(), tokens.len());
    let mut at = 0;
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(offsets[i], at, "offset of token {i}");
        at += token.chars().count();
        let Some(value) = values[i] else { continue };
        assert!(value <= 0.0, "{value}");
        let alternatives = tops[i].as_object().expect("top dict");
        assert!(alternatives.len() <= top && !alternatives.is_empty());
        let best = alternatives
            .values()
            .filter_map(Value::as_f64)
            .fold(f64::MIN, f64::max);
        assert!(
            value <= best,
            "token {i} scored {value} above the best {best}"
        );
    }
}

#[tokio::test]
async fn completion_logprobs_and_echo_give_the_model_s_own_values() {
    let server = Server::start().await;
    let prompt = "The capital of France is";
    let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3});
    let answer = post(&server, "/v1/completions", &body).await;
    let choice = &answer["choices"][0];
    check_completion_shape(choice, 3);
    let generated = floats(&choice["logprobs"]["token_logprobs"]);
    assert_eq!(generated.len(), 8);
    // Greedy: each chosen token is its position's most likely one.
    for (i, top) in choice["logprobs"]["top_logprobs"]
        .as_array()
        .expect("tops")
        .iter()
        .enumerate()
    {
        let best = top
            .as_object()
            .expect("dict")
            .values()
            .filter_map(Value::as_f64);
        assert_eq!(
            Some(best.fold(f64::MIN, f64::max)),
            generated[i],
            "token {i}"
        );
    }
    // The prompt and the completion scored in one forward over their tokens.
    let text = choice["text"].as_str().expect("text");
    let mut tokens = server.tokenize(prompt, true).await;
    let completion = server.tokenize(text, false).await;
    assert_eq!(
        completion.len(),
        8,
        "{text:?} tokenizes back to its 8 tokens"
    );
    tokens.extend(&completion);
    let echo = json!({"prompt": tokens, "max_tokens": 0, "echo": true, "logprobs": 3});
    let answer = post(&server, "/v1/completions", &echo).await;
    let choice = &answer["choices"][0];
    assert_eq!(
        choice["text"].as_str(),
        Some(format!("{prompt}{text}").as_str())
    );
    check_completion_shape(choice, 3);
    let echoed = floats(&choice["logprobs"]["token_logprobs"]);
    assert_eq!(echoed.len(), tokens.len());
    assert_eq!(echoed[0], None, "nothing predicts the first token");
    assert!(echoed[1..].iter().all(Option::is_some));
    assert_eq!(
        &echoed[tokens.len() - 8..],
        &generated[..],
        "echoed log-probabilities are the generated ones, exactly"
    );
    assert_eq!(answer["usage"]["completion_tokens"], 0);
    assert_eq!(answer["usage"]["prompt_tokens"], tokens.len());
    // Echo with a completion: the prompt first, then the new text, scored throughout.
    let more =
        json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": true, "logprobs": 0});
    let answer = post(&server, "/v1/completions", &more).await;
    let choice = &answer["choices"][0];
    let text = choice["text"].as_str().expect("text");
    assert!(
        text.starts_with(prompt) && text.len() > prompt.len(),
        "{text:?}"
    );
    let n = server.tokenize(prompt, true).await.len();
    assert_eq!(floats(&choice["logprobs"]["token_logprobs"]).len(), n + 4);
}

#[tokio::test]
async fn logprobs_stream_as_they_come_and_add_up_to_the_whole_answer() {
    let server = Server::start().await;
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "logprobs": 2, "echo": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        ),
    ] {
        let whole = post(&server, path, &body).await;
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = server.stream(path, &streamed).await;
        let mut values = Vec::new();
        for e in events.iter().filter(|e| *e != "[DONE]") {
            let chunk: Value = serde_json::from_str(e).expect("chunk");
            let lp = &chunk["choices"][0]["logprobs"];
            if path == "/v1/completions" {
                if !lp.is_null() {
                    values.extend(floats(&lp["token_logprobs"]));
                }
            } else if let Some(content) = lp["content"].as_array() {
                values.extend(content.iter().map(|c| c["logprob"].as_f64()));
            }
        }
        let want: Vec<Option<f64>> = if path == "/v1/completions" {
            floats(&whole["choices"][0]["logprobs"]["token_logprobs"])
        } else {
            let content = whole["choices"][0]["logprobs"]["content"]
                .as_array()
                .expect("content")
                .clone();
            for c in &content {
                assert!(c["token"].is_string() && c["bytes"].is_array(), "{c}");
                let top = c["top_logprobs"].as_array().expect("top");
                assert_eq!(top.len(), 2, "{c}");
                assert_eq!(
                    top[0]["logprob"], c["logprob"],
                    "greedy takes the best: {c}"
                );
                let bytes: Vec<u8> = c["bytes"]
                    .as_array()
                    .expect("bytes")
                    .iter()
                    .map(|b| b.as_u64().expect("byte") as u8)
                    .collect();
                assert_eq!(
                    String::from_utf8_lossy(&bytes),
                    c["token"].as_str().expect("token")
                );
            }
            content.iter().map(|c| c["logprob"].as_f64()).collect()
        };
        assert_eq!(
            want.len() as u64,
            whole["usage"]["completion_tokens"].as_u64().expect("usage")
                + if path == "/v1/completions" {
                    whole["usage"]["prompt_tokens"].as_u64().expect("usage")
                } else {
                    0
                },
            "{whole}"
        );
        assert_eq!(
            values, want,
            "{path}: streamed scores differ from the whole answer's"
        );
    }
}

#[tokio::test]
async fn n_choices_have_their_own_index_and_sampler_and_reproduce_with_a_seed() {
    let server = Server::start().await;
    let body = json!({
        "messages": [{"role": "user", "content": "Write one word about the sea."}],
        "max_tokens": 10, "temperature": 1.0, "seed": 11, "n": 4
    });
    let texts = |answer: &Value| -> Vec<String> {
        let choices = answer["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 4, "{answer}");
        choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i, "{answer}");
                c["message"]["content"]
                    .as_str()
                    .expect("content")
                    .to_string()
            })
            .collect()
    };
    let first = post(&server, "/v1/chat/completions", &body).await;
    let again = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(
        texts(&first),
        texts(&again),
        "the same seed, the same choices"
    );
    let distinct: std::collections::BTreeSet<String> = texts(&first).into_iter().collect();
    assert!(
        distinct.len() > 1,
        "sampled choices all alike: {distinct:?}"
    );
    let usage = &first["usage"];
    assert!(
        usage["completion_tokens"].as_u64().expect("usage") >= 4,
        "four choices' tokens counted: {usage}"
    );
    // Streamed, the choices interleave; each one's text is the whole answer's.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = server.stream("/v1/chat/completions", &streamed).await;
    let mut parts = vec![String::new(); 4];
    let mut finished = 0;
    let mut usage_seen = None;
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(e).expect("chunk");
        if let Some(u) = chunk.get("usage") {
            usage_seen = Some(u.clone());
        }
        for c in chunk["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            parts[i].push_str(c["delta"]["content"].as_str().unwrap_or_default());
            finished += usize::from(c["finish_reason"].is_string());
        }
    }
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(finished, 4);
    assert_eq!(parts, texts(&first));
    let usage_seen = usage_seen.expect("a usage chunk");
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage_seen[field], usage[field], "one usage for the request");
    }
    // Greedy choices are all the one greedy answer.
    let greedy = json!({"prompt": "The sea is", "max_tokens": 6, "temperature": 0, "n": 3});
    let answer = post(&server, "/v1/completions", &greedy).await;
    let all: Vec<&Value> = answer["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| &c["text"])
        .collect();
    assert!(all.iter().all(|t| *t == all[0]), "{answer}");
    let (status, err) = server
        .post("/v1/completions", &json!({"prompt": "x", "n": 17}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["param"], "n");
}

/// A constraint's forced tokens are scored too: with log-probabilities asked for, each
/// goes through a forward of its own instead of being fast-forwarded unscored.
#[tokio::test]
async fn structured_outputs_score_every_token_forced_ones_included() {
    let server = Server::start().await;
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}}, "required": ["city", "rank"]});
    let body = json!({
        "prompt": "A city and its rank, as JSON:", "max_tokens": 40, "temperature": 0,
        "logprobs": 1, "guided_json": schema
    });
    let plain = {
        let mut b = body.clone();
        b.as_object_mut().expect("object").remove("logprobs");
        post(&server, "/v1/completions", &b).await
    };
    let answer = post(&server, "/v1/completions", &body).await;
    let choice = &answer["choices"][0];
    assert_eq!(
        choice["text"], plain["choices"][0]["text"],
        "scoring does not change the answer"
    );
    let tokens = choice["logprobs"]["tokens"].as_array().expect("tokens");
    assert_eq!(
        tokens.len() as u64,
        answer["usage"]["completion_tokens"]
            .as_u64()
            .expect("usage")
    );
    let values = floats(&choice["logprobs"]["token_logprobs"]);
    assert!(
        values.iter().all(|v| v.is_some_and(|v| v <= 0.0)),
        "{values:?}"
    );
    let text = choice["text"].as_str().expect("text");
    let parsed: Value = serde_json::from_str(text).expect("JSON");
    assert!(
        parsed["city"].is_string() && parsed["rank"].is_i64(),
        "{parsed}"
    );
}
