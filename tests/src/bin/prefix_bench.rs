//! Prefix-caching workloads (prints figures; not a test): time to first token when
//! requests share a long prefix, against any OpenAI-compatible server that streams chat
//! (lynx, or llama.cpp's `llama-server`, which caches prompts per slot).
//!
//! ```text
//! cargo run --release -p lynx-tests --bin prefix_bench -- --base URL
//!     [--model NAME] [--requests 20] [--turns 10] [--system-words 1100]
//! ```
//!
//! - **shared**: one long system prompt (about 1,500 tokens for SmolLM2 at the default
//!   size) and a different short question in each of `--requests` chat requests, one
//!   after the other, 16 greedy tokens each. Prints the first request's TTFT, the
//!   others' median and p95, and their ratio to the first.
//! - **chat**: a conversation of `--turns` turns that resends its whole history (the
//!   server's own answers included) every turn, 32 greedy tokens an answer. Prints each
//!   turn's prompt length and TTFT, and the last turn's ratio to the first.
//!
//! Prefill speed is prompt tokens over TTFT: with the cache (the shared requests after
//! the first) and without (the first). The `cached` column is lynx's
//! `usage.prompt_tokens_details.cached_tokens`, when the server reports it.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lynx_tests::sse_data;
use serde_json::{json, Value};

struct Turn {
    ttft: Duration,
    text: String,
    prompt_tokens: u64,
    cached: Option<u64>,
}

/// One streamed greedy chat request: TTFT, the answer, and its usage.
async fn chat(
    client: &reqwest::Client,
    (base, model): (&str, Option<&str>),
    messages: &[Value],
    max_tokens: u64,
) -> Result<Turn, String> {
    let mut body = json!({
        "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}, "cache_prompt": true,
    });
    if let Some(model) = model {
        body["model"] = json!(model);
    }
    let sent = Instant::now();
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!(
            "status {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let mut ttft = None;
    let mut buf = Vec::new();
    let mut chunks = r.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        if ttft.is_none()
            && sse_data(&String::from_utf8_lossy(&buf))
                .iter()
                .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                .any(|e| {
                    e["choices"][0]["delta"]["content"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty())
                })
        {
            ttft = Some(sent.elapsed());
        }
    }
    let events: Vec<Value> = sse_data(&String::from_utf8_lossy(&buf))
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .collect();
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    let usage = events
        .iter()
        .find(|e| e["usage"].is_object())
        .map(|e| e["usage"].clone())
        .ok_or("no usage in the stream")?;
    Ok(Turn {
        ttft: ttft.ok_or("no token")?,
        text,
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
        cached: usage["prompt_tokens_details"]["cached_tokens"].as_u64(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_p95(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.95))
}

/// A system prompt of about `words` words, varied so that it tokenizes as prose does.
fn system_prompt(words: usize) -> String {
    let topics = [
        "harbour",
        "ferries",
        "tides",
        "lighthouse",
        "fishing",
        "weather",
        "cargo",
    ];
    let mut s = String::from("You are the assistant of the port authority. Follow these rules.\n");
    let mut i = 0;
    while s.split_whitespace().count() < words {
        let t = topics[i % topics.len()];
        s.push_str(&format!(
            "{}. When asked about the {t}, answer in one sentence, cite rule {} and never guess about schedule {}.\n",
            i + 1,
            i + 1,
            (i * 37) % 101
        ));
        i += 1;
    }
    s
}

const QUESTIONS: [&str; 10] = [
    "When does the first ferry leave?",
    "Who keeps the lighthouse?",
    "How deep is the harbour at low tide?",
    "What colour are the pilot boats?",
    "Can I fish from the north pier?",
    "Where is the cargo office?",
    "Is there a storm warning today?",
    "How long is the breakwater?",
    "What time does the fish market open?",
    "Where can I park a trailer?",
];

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let base = arg("--base").unwrap_or_else(|| "http://127.0.0.1:8000".into());
    let model = arg("--model");
    let num =
        |name: &str, default: usize| arg(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    let (requests, turns, words) = (
        num("--requests", 20),
        num("--turns", 10),
        num("--system-words", 1100),
    );
    // A fresh connection per request: llama-server closes idle keep-alive connections,
    // which a pooled client would find dead on its next request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_else(|e| panic!("HTTP client: {e}"));
    let server = (base.as_str(), model.as_deref());

    println!("# shared: a {words}-word system prompt, {requests} requests one after the other");
    let system = json!({"role": "system", "content": system_prompt(words)});
    let mut shared = Vec::new();
    for i in 0..requests {
        let q = format!("{} (ticket {i})", QUESTIONS[i % QUESTIONS.len()]);
        let messages = [system.clone(), json!({"role": "user", "content": q})];
        match chat(&client, server, &messages, 16).await {
            Ok(t) => {
                println!(
                    "request {:>2}: prompt {:>5} tokens, cached {:>5}, TTFT {:>8.1} ms, prefill {:>8.0} tok/s",
                    i + 1,
                    t.prompt_tokens,
                    t.cached.map_or("-".into(), |c| c.to_string()),
                    ms(t.ttft),
                    t.prompt_tokens as f64 / t.ttft.as_secs_f64()
                );
                shared.push(t);
            }
            Err(e) => {
                eprintln!("request {}: {e}", i + 1);
                std::process::exit(1);
            }
        }
    }
    let first = shared[0].ttft;
    let (p50, p95) = median_p95(shared[1..].iter().map(|t| t.ttft).collect());
    println!(
        "shared: first {:.1} ms; the others p50 {:.1} ms, p95 {:.1} ms: p50 {:.1}% of the first, p95 {:.1}%",
        ms(first),
        ms(p50),
        ms(p95),
        100.0 * p50.as_secs_f64() / first.as_secs_f64(),
        100.0 * p95.as_secs_f64() / first.as_secs_f64()
    );

    println!("# chat: {turns} turns, the history resent every turn");
    let mut history = vec![
        json!({"role": "system", "content": "You are a helpful assistant of the port authority."}),
    ];
    let mut ttfts = Vec::new();
    for turn in 0..turns {
        history.push(json!({"role": "user", "content": QUESTIONS[turn % QUESTIONS.len()]}));
        let t = match chat(&client, server, &history, 32).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("turn {}: {e}", turn + 1);
                std::process::exit(1);
            }
        };
        println!(
            "turn {:>2}: prompt {:>5} tokens, cached {:>5}, TTFT {:>8.1} ms",
            turn + 1,
            t.prompt_tokens,
            t.cached.map_or("-".into(), |c| c.to_string()),
            ms(t.ttft)
        );
        history.push(json!({"role": "assistant", "content": t.text}));
        ttfts.push(t.ttft);
    }
    if let (Some(first), Some(last)) = (ttfts.first(), ttfts.last()) {
        println!(
            "chat: turn 1 {:.1} ms, turn {turns} {:.1} ms: {:.2}x",
            ms(*first),
            ms(*last),
            last.as_secs_f64() / first.as_secs_f64()
        );
    }
}
