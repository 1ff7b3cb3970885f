//! The batched llama forward pass against candle's reference quantized llama, on the
//! real SmolLM2 GGUF: the same logits, alone or batched with other sequences, with
//! prompts prefilled in chunks.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failure is a test failure

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use clap::Parser;
use lynx_host::config::Cli;
use lynx_host::engine::kv_cache::KvCache;
use lynx_host::engine::llama::{Entry, Llama};
use lynx_host::engine::tokenizer::Tokenizer;

const TOLERANCE: f32 = 1e-3;

struct Models {
    ours: Llama,
    tokenizer: Tokenizer,
    path: std::path::PathBuf,
}

fn load() -> Models {
    let path = Cli::parse_from(["lynx-host"]).config.model_path();
    let mut file = std::fs::File::open(&path).expect("the default model (scripts/fetch-model.sh)");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let tokenizer = Tokenizer::from_gguf(&content).expect("tokenizer");
    let ours = Llama::from_gguf(&content, &mut file, &Device::Cpu, 512).expect("llama");
    Models {
        ours,
        tokenizer,
        path,
    }
}

fn reference(path: &std::path::Path) -> ModelWeights {
    let mut file = std::fs::File::open(path).expect("model");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("reference")
}

/// The reference's logits after the prompt (fed `chunk` tokens at a time, as the
/// scheduler does) and after each of `steps` greedy decode steps.
fn reference_run(
    path: &std::path::Path,
    prompt: &[u32],
    chunk: usize,
    steps: usize,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut model = reference(path);
    let mut logits = None;
    for (i, part) in prompt.chunks(chunk).enumerate() {
        let input = Tensor::new(part, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = Some(model.forward(&input, i * chunk).unwrap());
    }
    let mut logits = logits.unwrap().squeeze(0).unwrap();
    let mut all = Vec::new();
    let mut tokens = Vec::new();
    for pos in prompt.len()..=prompt.len() + steps {
        let row: Vec<f32> = logits.to_vec1().unwrap();
        let next = argmax(&row);
        all.push(row);
        tokens.push(next);
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = model.forward(&input, pos).unwrap().squeeze(0).unwrap();
    }
    (all, tokens)
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
        )
        .0 as u32
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A sequence as the scheduler drives it: chunked prefill, then greedy decoding.
struct Seq {
    slot: usize,
    prompt: Vec<u32>,
    prefilled: usize,
    pos: usize,
    next: u32,
    logits: Vec<Vec<f32>>,
    tokens: Vec<u32>,
}

/// Runs the sequences together, one batched step at a time, `chunk` prompt tokens a
/// step, each joining at its `start` step, until each has `steps + 1` logits.
fn batched_run(
    llama: &Llama,
    cache: &KvCache,
    mut seqs: Vec<(usize, Seq)>,
    chunk: usize,
    steps: usize,
) -> Vec<Seq> {
    let mut step = 0;
    while seqs.iter().any(|(_, s)| s.logits.len() <= steps) {
        let active: Vec<usize> = seqs
            .iter()
            .enumerate()
            .filter(|(_, (start, s))| *start <= step && s.logits.len() <= steps)
            .map(|(i, _)| i)
            .collect();
        let inputs: Vec<(usize, Vec<u32>, bool)> = active
            .iter()
            .map(|&i| {
                let s = &seqs[i].1;
                if s.prefilled < s.prompt.len() {
                    let n = (s.prompt.len() - s.prefilled).min(chunk);
                    (
                        i,
                        s.prompt[s.prefilled..s.prefilled + n].to_vec(),
                        s.prefilled + n == s.prompt.len(),
                    )
                } else {
                    (i, vec![s.next], true)
                }
            })
            .collect();
        let entries: Vec<Entry> = inputs
            .iter()
            .map(|(i, tokens, logits)| Entry {
                slot: seqs[*i].1.slot,
                pos: seqs[*i].1.pos,
                tokens,
                logits: *logits,
            })
            .collect();
        if !entries.is_empty() {
            let out = llama.forward(cache, &entries).unwrap();
            let mut row = 0;
            for (i, tokens, wants) in &inputs {
                let s = &mut seqs[*i].1;
                if s.prefilled < s.prompt.len() {
                    s.prefilled += tokens.len();
                }
                s.pos += tokens.len();
                if *wants {
                    let r: Vec<f32> = out.as_ref().unwrap().get(row).unwrap().to_vec1().unwrap();
                    row += 1;
                    s.next = argmax(&r);
                    s.tokens.push(s.next);
                    s.logits.push(r);
                }
            }
        }
        step += 1;
    }
    seqs.into_iter().map(|(_, s)| s).collect()
}

fn seq(slot: usize, prompt: Vec<u32>) -> Seq {
    Seq {
        slot,
        prompt,
        prefilled: 0,
        pos: 0,
        next: 0,
        logits: Vec::new(),
        tokens: Vec::new(),
    }
}

#[test]
fn batched_logits_match_the_reference_alone_and_in_a_batch() {
    let m = load();
    let prompts: Vec<Vec<u32>> = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "Once upon a time",
        "The quick brown fox jumps over the lazy dog. Then the dog",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    ]
    .iter()
    .map(|p| m.tokenizer.encode(p, true).unwrap())
    .collect();
    let steps = 6;
    let check = |what: &str, ours: &Seq, theirs: &(Vec<Vec<f32>>, Vec<u32>)| {
        assert_eq!(ours.logits.len(), theirs.0.len(), "{what}");
        for (i, (a, b)) in ours.logits.iter().zip(&theirs.0).enumerate() {
            let d = max_diff(a, b);
            assert!(d < TOLERANCE, "{what}, step {i}: max |Δlogit| = {d}");
        }
        assert_eq!(ours.tokens, theirs.1, "{what}: greedy tokens");
    };

    // Alone: each prompt prefilled in one chunk and in chunks of 5.
    for (k, prompt) in prompts.iter().enumerate() {
        for chunk in [1024, 5] {
            let expected = reference_run(&m.path, prompt, chunk, steps);
            let cache = m.ours.kv_cache(1, 512).unwrap();
            let out = batched_run(
                &m.ours,
                &cache,
                vec![(0, seq(0, prompt.clone()))],
                chunk,
                steps,
            );
            check(
                &format!("prompt {k} alone, chunk {chunk}"),
                &out[0],
                &expected,
            );
        }
    }

    // Together: four sequences in slots 3, 0, 2 and 1, joining at steps 0, 0, 2 and
    // 5, prefilled 7 tokens a step while the others decode.
    let chunk = 7;
    let cache = m.ours.kv_cache(4, 512).unwrap();
    let starts = [0, 0, 2, 5];
    let slots = [3, 0, 2, 1];
    let seqs = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (starts[i], seq(slots[i], p.clone())))
        .collect();
    let out = batched_run(&m.ours, &cache, seqs, chunk, steps);
    for (k, s) in out.iter().enumerate() {
        let expected = reference_run(&m.path, &prompts[k], chunk, steps);
        check(&format!("prompt {k} in a batch"), s, &expected);
    }
}

#[test]
fn out_of_bounds_entries_are_refused_not_panicked() {
    let m = load();
    let cache = m.ours.kv_cache(1, 16).unwrap();
    let tokens = vec![1u32; 17];
    let too_long = [Entry {
        slot: 0,
        pos: 0,
        tokens: &tokens,
        logits: true,
    }];
    assert!(m.ours.forward(&cache, &too_long).is_err());
    let bad_slot = [Entry {
        slot: 1,
        pos: 0,
        tokens: &tokens[..2],
        logits: true,
    }];
    assert!(m.ours.forward(&cache, &bad_slot).is_err());
}
