//! What prefix caching and `echo` rest on, on the real models with the f16 cache: a
//! row's logits and its keys and values do not depend on how the text before it was
//! split into steps. A prompt prefilled in 128-token chunks, in odd splits, one token a
//! step, or continued in another slot after its prefix was copied there gives the same
//! logits at every position, bit for bit.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failure is a test failure

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use lynx_engine::arch::{self, Architecture, Entry, Logits};
use lynx_engine::kv_cache::{KvCache, KvDtype};
use lynx_engine::tokenizer::Tokenizer;

fn load(path: PathBuf, capacity: usize) -> (Box<dyn Architecture>, Tokenizer) {
    let mut file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-model.sh)", path.display()));
    let content = gguf_file::Content::read(&mut file).unwrap();
    let tokenizer = Tokenizer::from_gguf(&content).unwrap();
    (
        arch::load(&content, &mut file, capacity).unwrap(),
        tokenizer,
    )
}

/// Feeds `tokens` into `slot` from `start`, in parts of the given sizes (the last size
/// repeats), and returns the logits after every token fed.
fn run(
    model: &dyn Architecture,
    cache: &KvCache,
    slot: usize,
    (tokens, start): (&[u32], usize),
    sizes: &[usize],
) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    let mut pos = start;
    let mut k = 0;
    while pos < tokens.len() {
        let size = sizes[k.min(sizes.len() - 1)];
        k += 1;
        let part = &tokens[pos..(pos + size).min(tokens.len())];
        let entry = Entry {
            slot,
            pos,
            tokens: part,
            logits: Logits::Every,
        };
        let out = model.forward(cache, &[entry]).unwrap().unwrap();
        rows.extend(out.to_vec2::<f32>().unwrap());
        pos += part.len();
    }
    rows
}

fn text(tokenizer: &Tokenizer, words: usize) -> Vec<u32> {
    let sentence = "The committee met on Tuesday to review the budget, and after a long \
                    discussion about schools, roads and the harbour, it voted to delay. ";
    let mut ids: Vec<u32> = tokenizer.bos_id.into_iter().collect();
    let mut s = String::new();
    while s.split_whitespace().count() < words {
        s.push_str(sentence);
    }
    ids.extend(tokenizer.encode(&s, false).unwrap());
    ids
}

fn check(path: PathBuf, words: usize) {
    let (model, tokenizer) = load(path, 1024);
    let model = model.as_ref();
    let tokens = text(&tokenizer, words);
    assert!(tokens.len() > 300, "{} tokens", tokens.len());
    let cache = model.kv_cache_as(3, 1024, KvDtype::F16).unwrap();
    let cold = run(model, &cache, 0, (&tokens, 0), &[128]);
    assert_eq!(cold.len(), tokens.len());
    let odd = run(
        model,
        &cache,
        1,
        (&tokens, 0),
        &[37, 1, 1, 1, 1, 1, 90, 128],
    );
    for (i, (a, b)) in cold.iter().zip(&odd).enumerate() {
        assert!(
            a == b,
            "position {i}: odd splits differ from 128-token chunks"
        );
    }
    // A prefix reused: slot 2 gets slot 0's first 201 positions, then goes on alone.
    cache.copy_prefix(0, 2, 201).unwrap();
    let resumed = run(model, &cache, 2, (&tokens, 201), &[128]);
    for (i, (a, b)) in cold[201..].iter().zip(&resumed).enumerate() {
        assert!(a == b, "position {}: after a copied prefix", 201 + i);
    }
}

#[test]
fn smollm2_logits_do_not_depend_on_the_split_or_the_slot() {
    check(lynx_engine::files::model_path_from_env(), 260);
}

/// gemma3 also has sliding-window layers (512 positions): the prompt runs past them.
#[test]
fn gemma3_logits_do_not_depend_on_the_split_or_the_slot() {
    let dir = lynx_engine::files::model_path_from_env();
    let path = dir.with_file_name("gemma-3-270m-q4_k_m.gguf");
    check(path, 480);
}
