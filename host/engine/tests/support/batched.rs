#![allow(dead_code)] // each test file uses its own part of the harness

//! Shared by the architecture tests: a batched run driven as the scheduler drives it
//! (chunked prefill, then greedy decoding, sequences joining at different steps), a
//! run of candle's reference model, and their comparison.

use candle_core::{Device, Tensor};
use lynx_engine::arch::{Architecture, Entry, Logits};
use lynx_engine::kv_cache::KvCache;

/// Logits may differ from the reference's by this share of the row's largest logit
/// (or absolutely, below 1): last-bit differences of the quantized matmuls, amplified
/// by requantization.
pub const TOLERANCE: f32 = 1e-3;

/// The same for models with K-quant tensors. lynx's Q4_K/Q6_K kernels are bit for bit
/// candle's `vec_dot` (checked in `qmatmul`), but candle's `QMatMul` switches kernels
/// by the number of rows in a call (repacked tiles for Q4_K at any height and for
/// Q6_K above one row, `vec_dot` otherwise), each with its own float order, and 8-bit
/// requantization at every layer amplifies those last bits. candle does not agree with
/// itself across chunkings by more than [`TOLERANCE`] either. On a CPU with
/// AVX-512 VNNI, candle also quantizes the activations of Q8_0 weights as Q8_K (256
/// values a block) where lynx, like candle's own `vec_dot`, uses Q8_0 blocks of 32.
pub const KQUANT_TOLERANCE: f32 = 6e-2;

/// The tolerance against candle's reference at the kernels in use: `base` where lynx's
/// kernels keep candle's arithmetic (`avx2-candle`, portable); at the integer kernels
/// over repacked weights (AVX-512 VNNI, AVX2), which quantize activations with f32 scales (candle rounds them to f16, and uses Q8_K for
/// K-quants) and sum in their own canonical order, the K-quant bound for every format:
/// their accuracy is held to an f64 reference in `qmatmul`'s tests and to the text's
/// likelihood (`nll`) instead.
pub fn tolerance(base: f32) -> f32 {
    use lynx_engine::qmatmul::cpu;
    if cpu::simd().repacks() {
        KQUANT_TOLERANCE.max(base)
    } else {
        base
    }
}

/// Mean negative log-likelihood of `ids[1..]`, each token predicted from those before,
/// by `forward(token, position) -> logits`.
pub fn nll(ids: &[u32], mut forward: impl FnMut(u32, usize) -> Vec<f32>) -> f64 {
    let mut total = 0f64;
    for (pos, pair) in ids.windows(2).enumerate() {
        let row = forward(pair[0], pos);
        let max = row.iter().fold(f32::MIN, |m, &x| m.max(x));
        let log_sum = f64::from(row.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max);
        total += log_sum - f64::from(row[pair[1] as usize]);
    }
    total / (ids.len() - 1) as f64
}

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
/// largest logit), and each greedy token ours picked the reference's, or one the
/// reference ranks within that tolerance of its own (a near tie). Both ran on the
/// reference's tokens (see [`Seq::forced`]).
pub fn check(what: &str, ours: &Seq, theirs: &(Vec<Vec<f32>>, Vec<u32>), tolerance: f32) {
    assert_eq!(ours.logits.len(), theirs.0.len(), "{what}");
    for (i, (a, b)) in ours.logits.iter().zip(&theirs.0).enumerate() {
        let d = max_diff(a, b);
        let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
        if d > TOLERANCE * scale {
            eprintln!("{what}, step {i}: max |Δlogit| {d} of {scale}");
        }
        assert!(
            d < tolerance * scale,
            "{what}, step {i}: max |Δlogit| = {d} (largest |logit| {scale})"
        );
    }
    for (i, (a, b)) in ours.logits.iter().zip(&theirs.0).enumerate() {
        let (mine, best) = (argmax(a) as usize, argmax(b) as usize);
        let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
        assert!(
            b[best] - b[mine] <= tolerance * scale,
            "{what}, step {i}: greedy token {mine} where the reference has {best} ({} vs {})",
            b[mine],
            b[best]
        );
    }
}

/// Each prompt alone (prefilled in each of `chunks`), then all of them together in
/// scrambled slots, joining at different steps, prefilled `batch_chunk` tokens a step
/// while the others decode: every run must match the reference's within `tolerance`,
/// and each batched sequence's logits must be bit for bit those of the same sequence
/// run alone with the same chunking (batch invariance).
pub fn alone_and_batched(
    model: &dyn Architecture,
    reference: &dyn Fn() -> Reference,
    prompts: &[Vec<u32>],
    steps: usize,
    (chunks, batch_chunk): (&[usize], usize),
    tolerance: f32,
) {
    for (k, prompt) in prompts.iter().enumerate() {
        for &chunk in chunks {
            let expected = reference_run(reference(), prompt, chunk, steps);
            let cache = model.kv_cache(1, 512).unwrap();
            let out = batched_run(
                model,
                &cache,
                vec![(0, forced(seq(0, prompt.clone()), &expected.1))],
                chunk,
                steps,
            );
            check(
                &format!("prompt {k} alone, chunk {chunk}"),
                &out[0],
                &expected,
                tolerance,
            );
        }
    }
    let chunk = batch_chunk;
    let n = prompts.len();
    let cache = model.kv_cache(n, 512).unwrap();
    let expected: Vec<_> = prompts
        .iter()
        .map(|p| reference_run(reference(), p, chunk, steps))
        .collect();
    let seqs = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                (i * 5) / 2,
                forced(seq(n - 1 - i, p.clone()), &expected[i].1),
            )
        })
        .collect();
    let out = batched_run(model, &cache, seqs, chunk, steps);
    for (k, (s, expected)) in out.iter().zip(&expected).enumerate() {
        check(&format!("prompt {k} in a batch"), s, expected, tolerance);
        let alone_cache = model.kv_cache(1, 512).unwrap();
        let alone = batched_run(
            model,
            &alone_cache,
            vec![(0, forced(seq(0, prompts[k].clone()), &expected.1))],
            chunk,
            steps,
        );
        for (i, (a, b)) in alone[0].logits.iter().zip(&s.logits).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "prompt {k}, step {i}: batched logits differ from alone by {}",
                max_diff(a, b)
            );
        }
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
    /// Tokens to decode instead of our own greedy choices (the reference's), so a
    /// near tie cannot send the two runs down different texts.
    pub forced: Vec<u32>,
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
                logits: if *logits { Logits::Last } else { Logits::None },
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
                    s.next = s.forced.get(s.tokens.len()).copied().unwrap_or(argmax(&r));
                    s.tokens.push(s.next);
                    s.logits.push(r);
                }
            }
        }
        step += 1;
    }
    seqs.into_iter().map(|(_, s)| s).collect()
}

/// `s`, decoding `tokens` instead of its own greedy choices.
pub fn forced(mut s: Seq, tokens: &[u32]) -> Seq {
    s.forced = tokens.to_vec();
    s
}

pub fn seq(slot: usize, prompt: Vec<u32>) -> Seq {
    Seq {
        slot,
        prompt,
        prefilled: 0,
        pos: 0,
        next: 0,
        forced: Vec::new(),
        logits: Vec::new(),
        tokens: Vec::new(),
    }
}
