#![allow(dead_code)] // each test file uses its own part of the harness

//! Shared by the architecture tests: a batched run driven as the scheduler drives it
//! (chunked prefill, then greedy decoding, sequences joining at different steps), a
//! run of candle's reference model, and their comparison.

use candle_core::{Device, Tensor};
use lynx_host::engine::arch::{Architecture, Entry};
use lynx_host::engine::kv_cache::KvCache;

/// Logits may differ from the reference's by this share of the row's largest logit
/// (or absolutely, below 1): last-bit differences of the quantized matmuls, amplified
/// by requantization.
pub const TOLERANCE: f32 = 1e-3;

/// A candle reference model: `forward(tokens [1, t], position) -> logits [1, vocab]`.
pub type Reference = Box<dyn FnMut(&Tensor, usize) -> candle_core::Result<Tensor>>;

/// The reference's logits after the prompt (fed `chunk` tokens at a time, as the
/// scheduler does) and after each of `steps` greedy decode steps.
pub fn reference_run(
    mut model: Reference,
    prompt: &[u32],
    chunk: usize,
    steps: usize,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut logits = None;
    for (i, part) in prompt.chunks(chunk).enumerate() {
        let input = Tensor::new(part, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = Some(model(&input, i * chunk).unwrap());
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
        logits = model(&input, pos).unwrap().squeeze(0).unwrap();
    }
    (all, tokens)
}

/// Ours against the reference: every logit within `tolerance` (share of the row's
/// largest logit), the same greedy tokens.
pub fn check(what: &str, ours: &Seq, theirs: &(Vec<Vec<f32>>, Vec<u32>), tolerance: f32) {
    assert_eq!(ours.logits.len(), theirs.0.len(), "{what}");
    for (i, (a, b)) in ours.logits.iter().zip(&theirs.0).enumerate() {
        let d = max_diff(a, b);
        let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
        assert!(
            d < tolerance * scale,
            "{what}, step {i}: max |Δlogit| = {d} (largest |logit| {scale})"
        );
    }
    assert_eq!(ours.tokens, theirs.1, "{what}: greedy tokens");
}

/// Each prompt alone (prefilled in each of `chunks`), then all of them together in
/// scrambled slots, joining at different steps, prefilled `batch_chunk` tokens a step
/// while the others decode: every run must match the reference's, alone within
/// [`TOLERANCE`], batched within `batch_tolerance`.
pub fn alone_and_batched(
    model: &dyn Architecture,
    reference: &dyn Fn() -> Reference,
    prompts: &[Vec<u32>],
    steps: usize,
    (chunks, batch_chunk): (&[usize], usize),
    batch_tolerance: f32,
) {
    for (k, prompt) in prompts.iter().enumerate() {
        for &chunk in chunks {
            let expected = reference_run(reference(), prompt, chunk, steps);
            let cache = model.kv_cache(1, 512).unwrap();
            let out = batched_run(
                model,
                &cache,
                vec![(0, seq(0, prompt.clone()))],
                chunk,
                steps,
            );
            check(
                &format!("prompt {k} alone, chunk {chunk}"),
                &out[0],
                &expected,
                TOLERANCE,
            );
        }
    }
    let chunk = batch_chunk;
    let n = prompts.len();
    let cache = model.kv_cache(n, 512).unwrap();
    let seqs = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| ((i * 5) / 2, seq(n - 1 - i, p.clone())))
        .collect();
    let out = batched_run(model, &cache, seqs, chunk, steps);
    for (k, s) in out.iter().enumerate() {
        let expected = reference_run(reference(), &prompts[k], chunk, steps);
        check(
            &format!("prompt {k} in a batch"),
            s,
            &expected,
            batch_tolerance,
        );
    }
}

pub fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
        )
        .0 as u32
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A sequence as the scheduler drives it: chunked prefill, then greedy decoding.
pub struct Seq {
    pub slot: usize,
    pub prompt: Vec<u32>,
    pub prefilled: usize,
    pub pos: usize,
    pub next: u32,
    pub logits: Vec<Vec<f32>>,
    pub tokens: Vec<u32>,
}

/// Runs the sequences together, one batched step at a time, `chunk` prompt tokens a
/// step, each joining at its `start` step, until each has `steps + 1` logits.
pub fn batched_run(
    model: &dyn Architecture,
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
            let out = model.forward(cache, &entries).unwrap();
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

pub fn seq(slot: usize, prompt: Vec<u32>) -> Seq {
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
