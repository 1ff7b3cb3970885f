//! The mean negative log-likelihood of a text as `llama-perplexity` scores it, through
//! lynx's own API (echoed prompt log-probabilities), for the accuracy test and the
//! `nll` side-by-side tool.
//!
//! llama-perplexity's method (tools/perplexity/perplexity.cpp, `perplexity`): tokenize the
//! whole text with the model's special tokens, cut it into chunks of `n_ctx` tokens, put
//! BOS in each chunk's first place when the vocabulary adds one, and score every token
//! after the middle of the chunk from the ones before it, in a fresh context.

use serde_json::json;

use crate::Server;

/// The fixed text both sides score.
pub fn text() -> String {
    let path = crate::workspace_root().join("tests/data/nll_text.txt");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// llama-perplexity's `-c`.
pub const N_CTX: usize = 128;

/// The mean NLL lynx gives the text's chunks, and how many tokens it scored.
pub async fn mean_nll(server: &Server, text: &str) -> (f64, usize) {
    let with_special = server.tokenize(text, true).await;
    let plain = server.tokenize(text, false).await;
    // The policy puts BOS first exactly when the vocabulary adds one (llama.cpp's
    // `add_bos`); otherwise both encodings are the same ids.
    let bos = (with_special.len() == plain.len() + 1).then(|| with_special[0]);
    if bos.is_none() {
        assert_eq!(with_special, plain, "special tokens other than BOS");
    }
    let chunks = with_special.len() / N_CTX;
    assert!(
        chunks >= 8,
        "the text gives only {} tokens",
        with_special.len()
    );
    let first = N_CTX / 2;
    let (mut nll, mut count) = (0.0f64, 0usize);
    for c in 0..chunks {
        let mut chunk = with_special[c * N_CTX..(c + 1) * N_CTX].to_vec();
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        let body = json!({"prompt": chunk, "max_tokens": 0, "echo": true, "logprobs": 0});
        let (status, answer) = server.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        let scored = answer["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .expect("token_logprobs");
        assert_eq!(scored.len(), N_CTX, "one log-probability per prompt token");
        // llama-perplexity scores tokens first+1 .. n_ctx-1 (each from all before it).
        for lp in &scored[first + 1..] {
            let lp = lp.as_f64().expect("a log-probability");
            assert!(lp.is_finite() && lp <= 0.0, "{lp}");
            nll -= lp;
            count += 1;
        }
    }
    (nll / count as f64, count)
}
