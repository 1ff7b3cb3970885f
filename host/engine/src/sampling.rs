//! Choosing the next token from a row of logits: greedy, or seeded sampling with a
//! temperature and an optional top-p.
//!
//! The choices are candle's `LogitsProcessor`'s exactly, seed for seed (the same
//! softmax, the same random stream, the same tie-breaking), so seeded outputs did not
//! change when this replaced it. What changed is the cost at large vocabularies
//! (gemma's 262,144 tokens): candle sorts the whole vocabulary for top-p and builds a
//! cumulative table over all of it; here top-p sorts only the tokens that can be in the
//! nucleus, and the draw runs over the nucleus alone.

use candle_core::{DType, Tensor};
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::EngineError;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Greedy,
    All { temperature: f64 },
    TopP { p: f32, temperature: f64 },
}

/// One sequence's sampler: its own random stream, so what it draws never depends on
/// what else shares the step.
pub struct Sampler {
    rng: StdRng,
    kind: Kind,
}

/// The first probability threshold tried for the nucleus: at most 1,000 tokens can
/// reach it.
const FIRST_THRESHOLD: f32 = 1e-3;

impl Sampler {
    /// `temperature <= 0` is greedy; `top_p` outside `(0, 1)` keeps every token.
    pub fn new(seed: u64, temperature: f64, top_p: f64) -> Self {
        let kind = if temperature <= 0.0 {
            Kind::Greedy
        } else if top_p > 0.0 && top_p < 1.0 {
            Kind::TopP {
                p: top_p as f32,
                temperature,
            }
        } else {
            Kind::All { temperature }
        };
        Self {
            rng: StdRng::seed_from_u64(seed),
            kind,
        }
    }

    /// The temperature it samples at; 0 when greedy.
    pub fn temperature(&self) -> f64 {
        match self.kind {
            Kind::Greedy => 0.0,
            Kind::All { temperature } | Kind::TopP { temperature, .. } => temperature,
        }
    }

    /// The next token from `logits` (`[vocab]`).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32, EngineError> {
        let logits = logits.to_dtype(DType::F32)?;
        match self.kind {
            // candle's own argmax: one pass over the tensor's storage, no copy (a
            // copy and two passes measured slower: `--example sampling`).
            Kind::Greedy => Ok(logits.argmax(candle_core::D::Minus1)?.to_scalar::<u32>()?),
            Kind::All { temperature } => {
                let prs = softmax(&logits, temperature)?;
                let dist = WeightedIndex::new(&prs).map_err(weights)?;
                Ok(dist.sample(&mut self.rng) as u32)
            }
            Kind::TopP { p, temperature } => {
                let prs = softmax(&logits, temperature)?;
                let nucleus = nucleus(&prs, p);
                let dist = WeightedIndex::new(nucleus.iter().map(|&i| prs[i as usize]))
                    .map_err(weights)?;
                nucleus
                    .get(dist.sample(&mut self.rng))
                    .copied()
                    .ok_or_else(|| EngineError::Model("top-p drew outside the nucleus".into()))
            }
        }
    }
}

fn weights(e: rand::distr::weighted::Error) -> EngineError {
    EngineError::Model(format!("sampling weights: {e}"))
}

/// candle's softmax of `logits / temperature`, as its `LogitsProcessor` computes it.
fn softmax(logits: &Tensor, temperature: f64) -> Result<Vec<f32>, EngineError> {
    let scaled = (logits / temperature)?;
    Ok(candle_nn::ops::softmax_last_dim(&scaled)?.to_vec1::<f32>()?)
}

/// The tokens top-p keeps, in vocabulary order: the most probable ones, in order of
/// falling probability (ties by index), while the sum before each stays below `p` —
/// candle's rule and summation order. Only tokens at or above a threshold are sorted;
/// every other token is strictly less probable than all of them, so if the nucleus
/// closes inside that set it is exact, and otherwise the threshold is lowered.
fn nucleus(prs: &[f32], p: f32) -> Vec<u32> {
    let mut threshold = FIRST_THRESHOLD;
    loop {
        let mut candidates: Vec<u32> = prs
            .iter()
            .enumerate()
            .filter(|(_, &x)| x >= threshold)
            .map(|(i, _)| i as u32)
            .collect();
        candidates.sort_by(|&i, &j| prs[j as usize].total_cmp(&prs[i as usize]).then(i.cmp(&j)));
        let mut cumsum = 0f32;
        let mut kept = candidates.len();
        for (n, &i) in candidates.iter().enumerate() {
            if cumsum >= p {
                kept = n;
                break;
            }
            cumsum += prs[i as usize];
        }
        // Closed inside the candidates, or no token is left out of them.
        if kept < candidates.len() || threshold == 0.0 || candidates.len() == prs.len() {
            candidates.truncate(kept.max(1));
            candidates.sort_unstable();
            return candidates;
        }
        threshold = if threshold > 1e-12 {
            threshold / 64.0
        } else {
            0.0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_transformers::generation::{LogitsProcessor, Sampling};

    fn logits(vocab: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let dist = rand::distr::Uniform::new(-8f32, 8f32).unwrap_or_else(|_| unreachable!());
        (0..vocab).map(|_| dist.sample(&mut rng)).collect()
    }

    /// Every draw equals candle's `LogitsProcessor` for the same seed and settings,
    /// token for token over a run of steps, at a small and at gemma's vocabulary.
    #[test]
    fn draws_are_candles_seed_for_seed() {
        for vocab in [50, 49_152, 262_144] {
            for (temperature, top_p) in
                [(0.0, 1.0), (0.7, 1.0), (1.0, 0.9), (1.5, 0.5), (0.3, 0.95)]
            {
                let seed = 42 + vocab as u64;
                let mut ours = Sampler::new(seed, temperature, top_p);
                let sampling = if temperature <= 0.0 {
                    Sampling::ArgMax
                } else if top_p < 1.0 {
                    Sampling::TopP {
                        p: top_p,
                        temperature,
                    }
                } else {
                    Sampling::All { temperature }
                };
                let mut theirs = LogitsProcessor::from_sampling(seed, sampling);
                for step in 0..6 {
                    let l = Tensor::new(logits(vocab, step), &Device::Cpu).unwrap();
                    let (a, b) = (ours.sample(&l).unwrap(), theirs.sample(&l).unwrap());
                    assert_eq!(
                        a, b,
                        "vocab {vocab}, t={temperature}, p={top_p}, step {step}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_peaked_distribution_keeps_one_token_and_a_flat_one_keeps_many() {
        let flat = vec![1.0f32 / 4000.0; 4000];
        assert!(nucleus(&flat, 0.5).len() >= 1999);
        let mut peaked = vec![0.0f32; 100];
        peaked[3] = 0.98;
        peaked[5] = 0.02;
        assert_eq!(nucleus(&peaked, 0.9), vec![3]);
    }
}
