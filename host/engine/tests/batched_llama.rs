//! The batched llama forward pass against candle's reference quantized llama, on the
//! real SmolLM2 GGUF: the same logits, alone or batched with other sequences, with
//! prompts prefilled in chunks.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failure is a test failure

#[path = "support/batched.rs"]
mod batched;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use candle_transformers::models::quantized_llama::ModelWeights;
use lynx_engine::arch::{self, Architecture, Entry, Logits};
use lynx_engine::kv_cache::KvDtype;
use lynx_engine::tokenizer::Tokenizer;

fn load() -> (Box<dyn Architecture>, Tokenizer, std::path::PathBuf) {
    let path = lynx_engine::files::model_path_from_env();
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
        batched::tolerance(batched::TOLERANCE),
    );
}

/// Whatever kernels run, the served model predicts real text as well as candle's
/// reference (f32 activations into candle's kernels): mean NLL within 0.5%.
#[test]
fn the_served_model_predicts_text_as_well_as_the_reference() {
    let (ours, tokenizer, path) = load();
    let text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, \
                France. It is named after the engineer Gustave Eiffel, whose company designed \
                and built the tower from 1887 to 1889. Locally nicknamed the Iron Lady, it was \
                constructed as the centrepiece of the 1889 World's Fair, and to crown the \
                centennial anniversary of the French Revolution. Although initially criticised \
                by some of France's leading artists and intellectuals for its design, it has \
                since become a global cultural icon of France and one of the most recognisable \
                structures in the world. The tower received 5,889,000 visitors in 2022. The \
                Eiffel Tower is the most visited monument with an entrance fee in the world. \
                The tower is 330 metres tall, about the same height as an 81-storey building, \
                and the tallest structure in Paris. Its base is square, measuring 125 metres on \
                each side. During its construction, the Eiffel Tower surpassed the Washington \
                Monument to become the tallest human-made structure in the world, a title it \
                held for 41 years until the Chrysler Building in New York City was finished in \
                1930. It was the first structure in the world to surpass both the 200-metre and \
                300-metre mark in height. Due to the addition of a broadcasting aerial at the \
                top of the tower in 1957, it is now taller than the Chrysler Building by 5.2 \
                metres. Excluding transmitters, the Eiffel Tower is the second tallest \
                free-standing structure in France after the Millau Viaduct.";
    let ids = tokenizer.encode(text, true).unwrap();
    let cache = ours.kv_cache(1, 512).unwrap();
    let mine = batched::nll(&ids, |token, pos| {
        let tokens = [token];
        let entry = [Entry {
            slot: 0,
            pos,
            tokens: &tokens,
            logits: Logits::Last,
        }];
        let logits = ours.forward(&cache, &entry).unwrap().unwrap();
        logits.get(0).unwrap().to_vec1().unwrap()
    });
    let mut file = std::fs::File::open(&path).expect("model");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let mut m = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("reference");
    let theirs = batched::nll(&ids, |token, pos| {
        let x = candle_core::Tensor::new(&[token], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.forward(&x, pos).unwrap();
        logits.squeeze(0).unwrap().to_vec1().unwrap()
    });
    eprintln!(
        "SmolLM2 mean NLL over {} tokens: lynx {mine:.4}, candle {theirs:.4}",
        ids.len() - 1
    );
    assert!(mine.is_finite() && mine < 4.0, "NLL {mine}");
    assert!(
        (mine - theirs).abs() <= 0.005 * theirs,
        "lynx {mine} vs candle {theirs}"
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
        logits: Logits::Last,
    }];
    assert!(ours.forward(&cache, &too_long).is_err());
    let bad_slot = [Entry {
        slot: 1,
        pos: 0,
        tokens: &tokens[..2],
        logits: Logits::Last,
    }];
    assert!(ours.forward(&cache, &bad_slot).is_err());
}

/// The f16 cache (the serving default): each sequence's logits stay within 6% of the
/// row's largest logit of the f32 cache's, and its greedy choice is the f32 run's or a
/// near tie there (both decode the f32 run's tokens; prompts are prefilled in chunks
/// of 5, so later chunks read the f16 history). f16 rounding of keys and values is
/// about 5e-4 relative; the 8-bit requantization of every layer's input amplifies it,
/// as it does the matmul kernels' last bits (`KQUANT_TOLERANCE`). Batched, the logits
/// are bit for bit the same sequence's alone.
#[test]
fn the_f16_cache_stays_with_the_f32_one_and_is_batch_invariant() {
    let (ours, tokenizer, _) = load();
    let prompts: Vec<Vec<u32>> = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "The quick brown fox jumps over the lazy dog. Then the dog",
    ]
    .iter()
    .map(|p| tokenizer.encode(p, true).unwrap())
    .collect();
    let model = ours.as_ref();
    let run = |dtype: KvDtype, seqs: Vec<(usize, batched::Seq)>| {
        let cache = model.kv_cache_as(seqs.len(), 512, dtype).unwrap();
        batched::batched_run(model, &cache, seqs, 5, 12)
    };
    let exact: Vec<batched::Seq> = prompts
        .iter()
        .map(|p| run(KvDtype::F32, vec![(0, batched::seq(0, p.clone()))]).remove(0))
        .collect();
    let alone: Vec<batched::Seq> = prompts
        .iter()
        .zip(&exact)
        .map(|(p, e)| {
            let s = batched::forced(batched::seq(0, p.clone()), &e.tokens);
            run(KvDtype::F16, vec![(0, s)]).remove(0)
        })
        .collect();
    for (k, (a, e)) in alone.iter().zip(&exact).enumerate() {
        let reference = (e.logits.clone(), e.tokens.clone());
        batched::check(
            &format!("prompt {k}, f16 cache"),
            a,
            &reference,
            batched::KQUANT_TOLERANCE,
        );
    }
    let together: Vec<(usize, batched::Seq)> = prompts
        .iter()
        .zip(&exact)
        .enumerate()
        .map(|(i, (p, e))| {
            (
                2 * i,
                batched::forced(batched::seq(1 - i, p.clone()), &e.tokens),
            )
        })
        .collect();
    for (k, (b, a)) in run(KvDtype::F16, together).iter().zip(&alone).enumerate() {
        assert_eq!(b.logits, a.logits, "prompt {k}: f16 batched vs alone");
    }
}
