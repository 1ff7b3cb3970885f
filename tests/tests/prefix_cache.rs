//! Automatic prefix caching against the real binary: a prompt that shares a prefix
//! with what a slot holds (an idle slot's earlier request, or a running one's) reuses
//! it, says so in `usage.prompt_tokens_details.cached_tokens`, and gets the same
//! completion and log-probabilities, bit for bit, as a server without the cache, alone
//! and batched. Idle slots are evicted least recently used first.

use futures_util::future::join_all;
use lynx_tests::Server;
use serde_json::{json, Value};

/// A long shared prefix: a system-prompt-sized text, different for each `seed`.
fn preamble(seed: &str, sentences: usize) -> String {
    (0..sentences)
        .map(|i| format!("Rule {i} of the {seed} handbook: answer briefly, cite the section, and never guess. "))
        .collect()
}

fn common(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// What a completion said: its text and every token's log-probability.
#[derive(Debug, PartialEq)]
struct Said {
    text: String,
    logprobs: Vec<Value>,
}

async fn ask(server: &Server, prompt: &str, max_tokens: u64) -> (Said, u64, u64) {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1});
    let (status, answer) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    let said = Said {
        text: choice["text"].as_str().expect("text").to_string(),
        logprobs: choice["logprobs"]["token_logprobs"]
            .as_array()
            .expect("logprobs")
            .clone(),
    };
    let usage = &answer["usage"];
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens");
    (
        said,
        cached,
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
    )
}

#[tokio::test]
async fn cached_prefixes_give_bit_identical_completions_alone_and_batched() {
    let cached = Server::start_with(&["--kv-slots", "4", "--prefix-cache-sharing", "shared"]).await;
    let cold = Server::start_with(&["--kv-slots", "4", "--prefix-cache", "false"]).await;
    let shared = preamble("harbour", 40);
    let questions = [
        "Question: when does the ferry leave? Answer:",
        "Question: who keeps the lighthouse? Answer:",
        "Question: how deep is the harbour? Answer:",
        "Question: what colour are the boats? Answer:",
    ];
    let prompts: Vec<String> = questions.iter().map(|q| format!("{shared}{q}")).collect();
    let mut reference = Vec::new();
    for p in &prompts {
        let (said, hit, _) = ask(&cold, p, 16).await;
        assert_eq!(hit, 0, "the cache is off");
        reference.push(said);
    }
    // One at a time: each after the first reuses the shared part.
    let first = cached.tokenize(&prompts[0], true).await;
    assert!(first.len() > 600, "{} tokens", first.len());
    let (said, hit, _) = ask(&cached, &prompts[0], 16).await;
    assert_eq!(hit, 0, "nothing cached yet");
    assert_eq!(said, reference[0]);
    for (p, want) in prompts.iter().zip(&reference).skip(1) {
        let ids = cached.tokenize(p, true).await;
        let (said, hit, n) = ask(&cached, p, 16).await;
        assert!(
            hit as usize >= common(&first, &ids) && hit < n,
            "cached {hit} of {n}, {} shared",
            common(&first, &ids)
        );
        assert_eq!(&said, want, "cached run differs from the cold one");
    }
    // The same prompt again: all of it but the token whose logits are needed.
    let (said, hit, n) = ask(&cached, &prompts[2], 16).await;
    assert_eq!(hit, n - 1);
    assert_eq!(said, reference[2]);
    // Batched: all four at once, each from the cache, in one batch.
    let together = join_all(prompts.iter().map(|p| ask(&cached, p, 16))).await;
    for ((said, hit, _), want) in together.iter().zip(&reference) {
        assert!(*hit > 0);
        assert_eq!(said, want, "cached and batched differs from cold and alone");
    }
}

#[tokio::test]
async fn a_running_sequence_s_prefix_is_copied_to_a_new_request() {
    let server = Server::start_with(&["--kv-slots", "4", "--prefix-cache-sharing", "shared"]).await;
    let cold = Server::start_with(&["--kv-slots", "4", "--prefix-cache", "false"]).await;
    let shared = preamble("orchard", 30);
    let long = format!("{shared}Now recite every rule again, in full:");
    let short = format!("{shared}Question: which tree fruits first? Answer:");
    let (want, _, _) = ask(&cold, &short, 12).await;
    // The long request is prefilled and decoding when the short one arrives.
    let mut body = json!({"prompt": long, "max_tokens": 200, "temperature": 0, "stream": true, "ignore_eos": true});
    body["stream_options"] = json!({"include_usage": true});
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("stream");
    let mut bytes = futures_util::StreamExt::boxed(response.bytes_stream());
    let first = futures_util::StreamExt::next(&mut bytes).await;
    assert!(first.is_some_and(|c| c.is_ok()), "the long request streams");
    let (said, hit, n) = ask(&server, &short, 12).await;
    let shared_ids = common(
        &server.tokenize(&long, true).await,
        &server.tokenize(&short, true).await,
    );
    assert!(
        hit as usize >= shared_ids && hit < n,
        "cached {hit}, {shared_ids} shared"
    );
    assert_eq!(
        said, want,
        "a prefix copied from a running slot changed the answer"
    );
    let health = server.health().await.1;
    assert!(
        health["kv_cache_slots_used"]
            .as_u64()
            .is_some_and(|u| u >= 1),
        "{health}"
    );
}

#[tokio::test]
async fn idle_slots_are_evicted_least_recently_used_first() {
    let server = Server::start_with(&["--kv-slots", "2", "--prefix-cache-sharing", "shared"]).await;
    let [a, b, c] = ["atlas", "beacon", "compass"]
        .map(|s| format!("{}Question: and then? Answer:", preamble(s, 8)));
    let (mut cached, mut prompt) = (0, 0);
    let mut tally = |(_, hit, n): (Said, u64, u64)| {
        cached += hit;
        prompt += n;
        hit
    };
    for p in [&a, &b, &a] {
        tally(ask(&server, p, 4).await);
    }
    // `a` was used last: `c` takes `b`'s slot.
    tally(ask(&server, &c, 4).await);
    let hit_a = tally(ask(&server, &a, 4).await);
    assert!(hit_a > 0, "the recently used prefix survived");
    let answer = ask(&server, &b, 4).await;
    let n = answer.2;
    let hit_b = tally(answer);
    // The admin API counts the same.
    let view = server.admin_get("/admin/cache").await;
    assert_eq!(view["enabled"], true, "{view}");
    assert_eq!(view["requests"], 6, "{view}");
    assert_eq!(view["cached_tokens"], cached, "{view}");
    assert_eq!(view["prompt_tokens"], prompt, "{view}");
    assert!(view["hits"].as_u64().is_some_and(|h| h >= 2), "{view}");
    let slots = view["slots"].as_array().expect("slots");
    assert_eq!(slots.len(), 2, "{view}");
    assert!(
        slots.iter().all(|s| s.as_u64().is_some_and(|n| n > 0)),
        "{view}"
    );
    let with_a = common(
        &server.tokenize(&b, true).await,
        &server.tokenize(&a, true).await,
    );
    let with_c = common(
        &server.tokenize(&b, true).await,
        &server.tokenize(&c, true).await,
    );
    assert!(
        hit_b as usize <= with_a.max(with_c),
        "b was evicted, yet {hit_b} of {n} tokens were cached"
    );
}

/// The f32 cache attends by candle's gemm, whose float order depends on the chunk:
/// only whole 128-token prompt chunks are reused, so results stay exact there too.
#[tokio::test]
async fn the_f32_cache_reuses_whole_prompt_chunks_and_stays_exact() {
    let server =
        Server::start_with(&["--kv-dtype", "f32", "--prefix-cache-sharing", "shared"]).await;
    let prompt = format!("{}Question: is it late? Answer:", preamble("clock", 20));
    let (want, hit, n) = ask(&server, &prompt, 12).await;
    assert_eq!(hit, 0);
    assert!(n > 300, "{n} tokens");
    let (said, hit, _) = ask(&server, &prompt, 12).await;
    assert!(hit > 0 && hit % 128 == 0, "cached {hit}: whole chunks only");
    assert!(n - hit < 129 + 1, "at most one chunk prefilled again");
    assert_eq!(said, want);
}
