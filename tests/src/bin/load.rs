//! Load generator for continuous batching (prints figures; not a test).
//!
//! Runs streaming `/v1/completions` of up to 128 tokens at concurrency 1, 2, 4, 8 and 16,
//! one level after the other against one server, and prints per level: aggregate
//! completion tokens/s (all tokens received / wall time of the level), TTFT p50/p95 as
//! the client sees it (request sent → first token chunk), and each level's throughput as
//! a ratio of concurrency 1's.
//!
//! ```text
//! cargo run --release -p lynx-tests --bin load -- [--requests N] [--base URL]
//!     [--levels 1,8,16,32] [--greedy] [--model NAME]
//! ```
//!
//! Without `--base` it starts `target/release/lynx-host` on the default model with
//! `--kv-slots 16` (needs the model, the plugins and the built binary: `scripts/test.sh`
//! leaves all three). `--requests N` (default 3) is how many requests each client sends
//! back to back. `--greedy` sends temperature 0 and counting prompts ("1, 2, 3, ..."),
//! which no model ends early, so every request runs its full 128 tokens: the form used
//! to compare servers side by side (any OpenAI-compatible server, llama.cpp's
//! `llama-server` included; `--model` names the model in the body).
//!
//! `--prefill N` instead sends N cold prompts of about 400 words (each different from
//! its first word, so no server can reuse a cached prefix), one at a time, each for a
//! single token, and prints their prompt tokens and TTFT (median and worst): prefill
//! speed as a user waits for it.
//!
//! `--schema FILE` constrains every answer to the JSON schema in FILE (sent both as
//! OpenAI's `response_format` and as llama-server's `json_schema`; each server reads its
//! own and ignores the other), and `--max-tokens N` caps answers at N tokens (default
//! 128): with the same counting prompts, a constrained run and an unconstrained one of
//! the constrained answers' length compare the cost of the constraint side by side.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lynx_tests::{sse_data, Server};
use serde_json::{json, Value};

const LEVELS: [usize; 5] = [1, 2, 4, 8, 16];
const MAX_TOKENS: u64 = 128;
/// What a request asks for.
#[derive(Clone)]
struct Ask {
    greedy: bool,
    model: Option<String>,
    schema: Option<Value>,
    max_tokens: u64,
    /// A cold prompt of about 400 words instead of the usual ones.
    cold: bool,
}

/// About 400 words of prose, different from the first word for each `i`.
fn cold_prompt(i: usize) -> String {
    const WORDS: [&str; 24] = [
        "river", "stone", "market", "lantern", "winter", "harbor", "signal", "orchard", "engine",
        "valley", "letter", "copper", "meadow", "thunder", "bridge", "candle", "forest", "mirror",
        "garden", "silver", "island", "machine", "shadow", "window",
    ];
    let mut out = format!("Report {i}:");
    for w in 0..400 {
        let word = WORDS[(w * 7 + i * 13 + w / 24) % WORDS.len()];
        out.push(' ');
        out.push_str(word);
        if w % 12 == 11 {
            out.push('.');
        }
    }
    out
}

const PROMPTS: [&str; 4] = [
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "Here is a detailed recipe for bread. First,",
    "Dear diary, today was the strangest day of my life because",
];

struct Sample {
    ttft: Duration,
    tokens: u64,
    prompt_tokens: u64,
}

/// One streamed completion: time to the first token chunk and completion tokens.
async fn one(client: &reqwest::Client, base: &str, i: usize, ask: &Ask) -> Result<Sample, String> {
    let (prompt, temperature) = if ask.cold {
        (cold_prompt(i), 0.0)
    } else if ask.greedy {
        let start = 1 + 7 * i;
        let counting: Vec<String> = (start..start + 12).map(|n| n.to_string()).collect();
        (format!("{},", counting.join(", ")), 0.0)
    } else {
        (PROMPTS[i % PROMPTS.len()].to_string(), 0.8)
    };
    let mut body = json!({
        "prompt": prompt,
        "max_tokens": ask.max_tokens,
        "temperature": temperature,
        "seed": i,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(model) = &ask.model {
        body["model"] = json!(model);
    }
    if let Some(schema) = &ask.schema {
        body["response_format"] =
            json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}});
        body["json_schema"] = schema.clone();
    }
    let sent = Instant::now();
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let mut ttft = None;
    let mut buf = Vec::new();
    let mut chunks = r.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        // The first event carrying text marks the first token.
        if ttft.is_none()
            && sse_data(&String::from_utf8_lossy(&buf))
                .iter()
                .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                .any(|e| {
                    e["choices"][0]["text"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty())
                })
        {
            ttft = Some(sent.elapsed());
        }
    }
    let events = sse_data(&String::from_utf8_lossy(&buf));
    let events: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .collect();
    let tokens = events
        .iter()
        .find_map(|e| e["usage"]["completion_tokens"].as_u64())
        .ok_or("no usage in the stream")?;
    let prompt_tokens = events
        .iter()
        .find_map(|e| e["usage"]["prompt_tokens"].as_u64())
        .unwrap_or(0);
    Ok(Sample {
        ttft: ttft.ok_or("no token")?,
        tokens,
        prompt_tokens,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Level {
    concurrency: usize,
    requests: usize,
    tokens: u64,
    wall: Duration,
    ttft_p50: Duration,
    ttft_p95: Duration,
}

async fn level(
    client: &reqwest::Client,
    base: &str,
    (concurrency, per): (usize, usize),
    ask: &Ask,
) -> Level {
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for c in 0..concurrency {
        let (client, base, ask) = (client.clone(), base.to_string(), ask.clone());
        clients.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            for r in 0..per {
                match one(&client, &base, c * per + r, &ask).await {
                    Ok(s) => samples.push(s),
                    Err(e) => panic!("request failed: {e}"),
                }
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for c in clients {
        samples.extend(c.await.expect("client"));
    }
    let wall = t0.elapsed();
    let mut ttfts: Vec<Duration> = samples.iter().map(|s| s.ttft).collect();
    ttfts.sort();
    Level {
        concurrency,
        requests: samples.len(),
        tokens: samples.iter().map(|s| s.tokens).sum(),
        wall,
        ttft_p50: percentile(&ttfts, 0.5),
        ttft_p95: percentile(&ttfts, 0.95),
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let per: usize = arg("--requests").map_or(3, |n| n.parse().expect("--requests N"));
    let levels: Vec<usize> = arg("--levels").map_or(LEVELS.to_vec(), |l| {
        l.split(',')
            .map(|n| n.trim().parse().expect("--levels 1,8,16"))
            .collect()
    });
    let ask = Ask {
        greedy: args.iter().any(|a| a == "--greedy"),
        model: arg("--model"),
        schema: arg("--schema").map(|f| {
            let text = std::fs::read_to_string(&f).expect("--schema FILE");
            serde_json::from_str(&text).expect("--schema FILE holds JSON")
        }),
        max_tokens: arg("--max-tokens").map_or(MAX_TOKENS, |n| n.parse().expect("--max-tokens N")),
        cold: false,
    };
    let prefill: Option<usize> = arg("--prefill").map(|n| n.parse().expect("--prefill N"));
    let server;
    let base = match arg("--base") {
        Some(base) => base,
        None => {
            server = Server::start_with(&["--kv-slots", "16"]).await;
            server.base.clone()
        }
    };
    // A fresh connection per request: llama-server closes a streamed response's
    // connection, and a pooled one would then fail the next request.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    // Warm-up: the first request pays for page faults and allocator growth.
    one(&client, &base, 0, &ask).await.expect("warm-up");

    println!("machine: {}", machine());
    if let Some(n) = prefill {
        let cold = Ask {
            cold: true,
            max_tokens: 1,
            ..ask.clone()
        };
        let mut ttfts = Vec::new();
        let mut tokens = 0;
        for i in 0..n {
            let s = one(&client, &base, 1000 + i, &cold)
                .await
                .expect("prefill request");
            tokens = s.prompt_tokens;
            ttfts.push(s.ttft);
        }
        ttfts.sort();
        println!(
            "prefill: {n} cold prompts of {tokens} tokens, one token each, c=1: TTFT p50 {:.3} s, max {:.3} s ({:.0} prompt tok/s at p50)",
            percentile(&ttfts, 0.5).as_secs_f64(),
            percentile(&ttfts, 1.0).as_secs_f64(),
            tokens as f64 / percentile(&ttfts, 0.5).as_secs_f64()
        );
        return;
    }
    println!(
        "{per} streamed requests per client, up to {} completion tokens, {}{}",
        ask.max_tokens,
        if ask.greedy {
            "greedy, counting prompts"
        } else {
            "temperature 0.8"
        },
        if ask.schema.is_some() {
            ", JSON schema"
        } else {
            ""
        }
    );
    println!("concurrency  requests  tokens  tok/req  wall s  tok/s  vs c=1  TTFT p50  TTFT p95");
    let mut base_rate = None;
    for c in levels {
        let l = level(&client, &base, (c, per), &ask).await;
        let rate = l.tokens as f64 / l.wall.as_secs_f64();
        let base_rate = *base_rate.get_or_insert(rate);
        println!(
            "{:>11}  {:>8}  {:>6}  {:>7.1}  {:>6.1}  {:>5.1}  {:>5.2}x  {:>6.1}ms  {:>6.1}ms",
            l.concurrency,
            l.requests,
            l.tokens,
            l.tokens as f64 / l.requests as f64,
            l.wall.as_secs_f64(),
            rate,
            rate / base_rate,
            l.ttft_p50.as_secs_f64() * 1e3,
            l.ttft_p95.as_secs_f64() * 1e3,
        );
    }
}
