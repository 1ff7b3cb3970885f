//! llama.cpp's own tokenizer conformance cases (`models/ggml-vocab-*.gguf` with their
//! `.inp`/`.out` files, fetched by scripts/fetch-conformance.sh), encoded as llama.cpp's
//! `test-tokenizer-0` encodes them: no BOS, special-token text as plain text. Every case
//! of every vocabulary lynx claims must give exactly the expected ids, and the cheap
//! lower bound on token counts must hold for each.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failure is a test failure

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use lynx_engine::tokenizer::Tokenizer;

/// The vocabularies lynx claims (docs/models.md lists them).
const CLAIMED: [&str; 10] = [
    "llama-spm",
    "llama-bpe",
    "qwen2",
    "phi-3",
    "gpt-2",
    "deepseek-llm",
    "starcoder",
    "refact",
    "command-r",
    "mpt",
];

fn conformance_dir() -> PathBuf {
    let cache = std::env::var_os("LYNX_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("lynx")))
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/lynx"));
    let dir = cache.join("conformance/llama.cpp-0.3.36/models");
    assert!(
        dir.is_dir(),
        "{} is missing: run scripts/fetch-conformance.sh",
        dir.display()
    );
    dir
}

/// (failed cases, total cases, the first failures) for one vocabulary.
fn run(name: &str) -> (usize, usize, Vec<String>) {
    let dir = conformance_dir();
    let path = dir.join(format!("ggml-vocab-{name}.gguf"));
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let tokenizer = Tokenizer::from_gguf(&content).unwrap_or_else(|e| panic!("{name}: {e}"));
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let cases: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<&str> = out.split('\n').collect();
    assert!(
        expected.len() >= cases.len(),
        "{name}: .out shorter than .inp"
    );
    let mut failures = Vec::new();
    for (text, want) in cases.iter().zip(&expected) {
        let want: Vec<u32> = want
            .split_whitespace()
            .map(|t| t.parse().expect("id"))
            .collect();
        let got = tokenizer.encode(text, false).expect("encode");
        // The bound the host refuses over-long prompts by must hold on real vocabularies.
        let bound = tokenizer.min_tokens(text, false);
        assert!(
            bound <= got.len(),
            "{name}: {text:?}: bound {bound} over {}",
            got.len()
        );
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    (
        failures.len(),
        cases.len(),
        failures.into_iter().take(3).collect(),
    )
}

#[test]
fn every_claimed_vocabulary_passes_every_case() {
    let mut report = Vec::new();
    let mut failed = false;
    for name in CLAIMED {
        let (bad, total, first) = run(name);
        report.push(format!("{name}: {}/{total} cases pass", total - bad));
        if bad > 0 {
            failed = true;
            report.extend(first.into_iter().map(|f| format!("  {f}")));
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(!failed, "{}", report.join("\n"));
}
