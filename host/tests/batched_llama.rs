//! The batched llama forward pass against candle's reference quantized llama, on the
//! real SmolLM2 GGUF: the same logits, alone or batched with other sequences, with
//! prompts prefilled in chunks.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failure is a test failure

#[path = "support/batched.rs"]
mod batched;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use candle_transformers::models::quantized_llama::ModelWeights;
use clap::Parser;
use lynx_host::config::Cli;
use lynx_host::engine::arch::{self, Architecture, Entry};
use lynx_host::engine::tokenizer::Tokenizer;

fn load() -> (Box<dyn Architecture>, Tokenizer, std::path::PathBuf) {
    let path = Cli::parse_from(["lynx-host"]).config.model_path();
    let mut file = std::fs::File::open(&path).expect("the default model (scripts/fetch-model.sh)");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let tokenizer = Tokenizer::from_gguf(&content).expect("tokenizer");
    let ours = arch::load(&content, &mut file, 512).expect("llama");
    assert_eq!(ours.name(), "llama");
    (ours, tokenizer, path)
}

#[test]
fn batched_logits_match_the_reference_alone_and_in_a_batch() {
    let (ours, tokenizer, path) = load();
    let prompts: Vec<Vec<u32>> = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "Once upon a time",
        "The quick brown fox jumps over the lazy dog. Then the dog",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    ]
    .iter()
    .map(|p| tokenizer.encode(p, true).unwrap())
    .collect();
    let reference = || -> batched::Reference {
        let mut file = std::fs::File::open(&path).expect("model");
        let content = gguf_file::Content::read(&mut file).expect("gguf");
        let mut m = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("reference");
        Box::new(move |x, pos| m.forward(x, pos))
    };
    batched::alone_and_batched(
        ours.as_ref(),
        &reference,
        &prompts,
        6,
        (&[1024, 5], 7),
        batched::TOLERANCE,
    );
}

#[test]
fn out_of_bounds_entries_are_refused_not_panicked() {
    let (ours, _, _) = load();
    let cache = ours.kv_cache(1, 16).unwrap();
    let tokens = vec![1u32; 17];
    let too_long = [Entry {
        slot: 0,
        pos: 0,
        tokens: &tokens,
        logits: true,
    }];
    assert!(ours.forward(&cache, &too_long).is_err());
    let bad_slot = [Entry {
        slot: 1,
        pos: 0,
        tokens: &tokens[..2],
        logits: true,
    }];
    assert!(ours.forward(&cache, &bad_slot).is_err());
}
