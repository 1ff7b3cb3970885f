//! End-to-end accuracy of each served file against llama.cpp: the mean negative
//! log-likelihood of a fixed text (`tests/data/nll_text.txt`), scored exactly as
//! `llama-perplexity` scores it, through lynx's own API (echoed prompt
//! log-probabilities), must be within 0.5% of the one llama.cpp measured on the same file.
//!
//! The method is `lynx_tests::nll`'s.
//!
//! The references were measured with llama.cpp built from the llama-cpp-python 0.3.36
//! sdist (`scripts/build-llama-cpp.sh`):
//! `llama-perplexity -m <file> -f tests/data/nll_text.txt -c 128 -b 128 -t 2`
//! (its "Final estimate: PPL"; the mean NLL is its natural log). `scripts/nll-vs-llama.sh`
//! measures both sides again, side by side.

use lynx_tests::nll::{mean_nll, text};
use lynx_tests::{cached_model, Server};

/// Relative tolerance on the mean NLL (issue 26's accuracy bound).
const TOLERANCE: f64 = 0.005;

fn check(name: &str, lynx: (f64, usize), llama_ppl: f64, llama_count: usize) {
    let (nll, count) = lynx;
    let reference = llama_ppl.ln();
    let off = (nll - reference).abs() / reference;
    eprintln!(
        "{name}: lynx mean NLL {nll:.5} (PPL {:.4}) over {count} tokens; llama.cpp {reference:.5} (PPL {llama_ppl}) over {llama_count}; {:.3}% apart",
        nll.exp(),
        off * 100.0
    );
    assert_eq!(count, llama_count, "{name}: the same tokens are scored");
    assert!(
        off <= TOLERANCE,
        "{name}: mean NLL {nll:.5} is {:.3}% from llama.cpp's {reference:.5} (bound {:.1}%)",
        off * 100.0,
        TOLERANCE * 100.0
    );
}

#[tokio::test]
async fn smollm2_q4_1_scores_the_text_as_llama_cpp_does() {
    let server = Server::start_with(&["--max-seq-len", "512"]).await;
    // llama-perplexity: "calculating perplexity over 10 chunks", "PPL = 24.9427".
    check(
        "SmolLM2-135M Q4_1",
        mean_nll(&server, &text()).await,
        24.9427,
        10 * 63,
    );
}

#[tokio::test]
async fn gemma_q4_k_m_scores_the_text_as_llama_cpp_does() {
    let model = cached_model("gemma-3-270m-q4_k_m.gguf", "scripts/fetch-model.sh gemma3");
    let server = Server::start_with(&[
        "--model",
        model.to_str().expect("utf-8"),
        "--model-name",
        "gemma-3-270m",
        "--max-seq-len",
        "512",
    ])
    .await;
    // llama-perplexity: "calculating perplexity over 10 chunks", "PPL = 22.3226".
    check(
        "gemma-3-270m Q4_K_M",
        mean_nll(&server, &text()).await,
        22.3226,
        10 * 63,
    );
}
