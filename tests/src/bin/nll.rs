//! lynx's side of `scripts/nll-vs-llama.sh` (prints figures; not a test): for each GGUF
//! given, starts the real `lynx-host` on it and prints the mean negative log-likelihood
//! of `tests/data/nll_text.txt` as `llama-perplexity -c 128` scores it, with the PPL that
//! tool would print.
//!
//! `cargo run --release -p lynx-tests --bin nll -- GGUF...` (needs
//! `target/release/lynx-host` and the plugins).

use lynx_tests::nll::{mean_nll, text};
use lynx_tests::Server;

#[tokio::main]
async fn main() {
    let text = text();
    for file in std::env::args().skip(1) {
        let name = std::path::Path::new(&file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        let server = Server::start_with(&[
            "--model",
            &file,
            "--model-name",
            &name,
            "--max-seq-len",
            "512",
        ])
        .await;
        let (nll, count) = mean_nll(&server, &text).await;
        println!(
            "{name}: lynx mean NLL {nll:.5} over {count} tokens (PPL = {:.4})",
            nll.exp()
        );
    }
}
