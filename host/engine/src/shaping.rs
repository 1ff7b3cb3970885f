//! A request's own changes to the logits before sampling, as vLLM names and orders
//! them: end tokens held back (`min_tokens`, `ignore_eos`), `logit_bias`, the
//! repetition, frequency and presence penalties, then `top_k` and `min_p` (applied on
//! logits, so the sampler after them, and its seeded draws, stay as they are).
//!
//! A request that sets none of them never reaches this module: its sampling is
//! unchanged, draw for draw.

use std::collections::HashMap;

/// What one request asks of its logits; the default changes nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shaping {
    /// Added to these tokens' logits (OpenAI's `logit_bias`, -100 to 100).
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's: logits of tokens seen in the prompt or the output are divided (if
    /// positive) or multiplied (if negative) by it; 1 is none.
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted once per occurrence in the output so far.
    pub frequency_penalty: f32,
    /// OpenAI's: subtracted once if the token occurs in the output so far.
    pub presence_penalty: f32,
    /// Only the k most likely tokens; 0 is all.
    pub top_k: usize,
    /// Only tokens at least this share of the most likely one's probability; 0 is all.
    pub min_p: f32,
    /// The end tokens are never chosen: generation runs to `max_tokens`.
    pub ignore_eos: bool,
    /// The end tokens are not chosen before this many completion tokens.
    pub min_tokens: usize,
}

impl Shaping {
    /// Whether it changes anything: if not, the logits go to the sampler untouched.
    pub fn is_identity(&self) -> bool {
        self.logit_bias.is_empty()
            && self.repetition_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
            && self.top_k == 0
            && self.min_p == 0.0
            && !self.ignore_eos
            && self.min_tokens == 0
    }

    /// The neutral settings (a penalty of 1 is none), for building one field by field.
    pub fn none() -> Self {
        Self {
            repetition_penalty: 1.0,
            ..Self::default()
        }
    }
}

/// What a sequence has produced so far, as the penalties need it.
#[derive(Debug, Default)]
pub struct Seen {
    /// How often each token occurs in the output.
    output: HashMap<u32, u32>,
    /// Every token of the prompt.
    prompt: std::collections::HashSet<u32>,
}

impl Seen {
    pub fn new(prompt: &[u32]) -> Self {
        Self {
            prompt: prompt.iter().copied().collect(),
            ..Self::default()
        }
    }

    pub fn push(&mut self, token: u32) {
        *self.output.entry(token).or_default() += 1;
    }
}

/// Applies `s` to one row of logits, `generated` tokens into the answer, at
/// `temperature` (0: greedy), the end tokens being `ends`.
pub fn apply(
    s: &Shaping,
    logits: &mut [f32],
    (seen, generated): (&Seen, usize),
    ends: &[u32],
    temperature: f64,
) {
    if s.ignore_eos || generated < s.min_tokens {
        for &e in ends {
            if let Some(l) = logits.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    for &(t, b) in &s.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
    if s.repetition_penalty != 1.0 {
        let p = s.repetition_penalty;
        // Each token once: the prompt's, then the output's not in the prompt.
        let fresh = seen.output.keys().filter(|t| !seen.prompt.contains(t));
        for &t in seen.prompt.iter().chain(fresh) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
    if s.frequency_penalty != 0.0 || s.presence_penalty != 0.0 {
        for (&t, &n) in &seen.output {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= s.frequency_penalty * n as f32 + s.presence_penalty;
            }
        }
    }
    if s.top_k > 0 && s.top_k < logits.len() {
        let mut sorted: Vec<f32> = logits.to_vec();
        let (_, kth, _) = sorted.select_nth_unstable_by(s.top_k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        // Ties at the k-th logit are kept, as vLLM does.
        for l in logits.iter_mut() {
            if *l < kth {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if s.min_p > 0.0 && temperature > 0.0 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // p / p_max < min_p  <=>  (l - l_max) / T < ln(min_p)
        let floor = max + (temperature as f32) * s.min_p.ln();
        for l in logits.iter_mut() {
            if *l < floor {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shaping(f: impl FnOnce(&mut Shaping)) -> Shaping {
        let mut s = Shaping::none();
        f(&mut s);
        s
    }

    #[test]
    fn the_neutral_settings_change_nothing() {
        assert!(Shaping::none().is_identity());
        assert!(!shaping(|s| s.top_k = 3).is_identity());
    }

    #[test]
    fn end_tokens_are_held_back_until_min_tokens_and_always_with_ignore_eos() {
        let seen = Seen::new(&[]);
        let s = shaping(|s| s.min_tokens = 1);
        let mut l = vec![1.0f32; 4];
        apply(&s, &mut l, (&seen, 0), &[2], 1.0);
        assert_eq!(l[2], f32::NEG_INFINITY);
        let mut l = vec![1.0f32; 4];
        apply(&s, &mut l, (&seen, 1), &[2], 1.0);
        assert_eq!(l[2], 1.0);
        let mut l = vec![1.0f32; 4];
        apply(
            &shaping(|s| s.ignore_eos = true),
            &mut l,
            (&seen, 1),
            &[2, 3],
            1.0,
        );
        assert_eq!(&l[2..], &[f32::NEG_INFINITY; 2]);
    }

    #[test]
    fn penalties_follow_openai_and_vllm() {
        let mut seen = Seen::new(&[1]);
        seen.push(2);
        seen.push(2);
        seen.push(3);
        let s = shaping(|s| {
            s.frequency_penalty = 0.5;
            s.presence_penalty = 0.25;
        });
        let mut l = vec![1.0f32; 5];
        apply(&s, &mut l, (&seen, 3), &[], 1.0);
        // Token 2 twice: 1 - 2*0.5 - 0.25; token 3 once: 1 - 0.5 - 0.25; the prompt's
        // token 1 is not in the output.
        assert_eq!(l, vec![1.0, 1.0, -0.25, 0.25, 1.0]);

        let s = shaping(|s| s.repetition_penalty = 2.0);
        let mut l = vec![4.0f32, 4.0, -4.0, 4.0, 4.0];
        apply(&s, &mut l, (&seen, 3), &[], 1.0);
        // The prompt's and the output's tokens: positive logits halved, negative doubled.
        assert_eq!(l, vec![4.0, 2.0, -8.0, 2.0, 4.0]);
    }

    #[test]
    fn bias_top_k_and_min_p_keep_what_they_say() {
        let seen = Seen::new(&[]);
        let mut l = vec![0.0f32, 1.0, 2.0, 3.0];
        apply(
            &shaping(|s| s.logit_bias = vec![(0, 10.0)]),
            &mut l,
            (&seen, 0),
            &[],
            1.0,
        );
        assert_eq!(l[0], 10.0);

        let mut l = vec![0.0f32, 1.0, 2.0, 3.0];
        apply(&shaping(|s| s.top_k = 2), &mut l, (&seen, 0), &[], 1.0);
        assert_eq!(l, vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 2.0, 3.0]);

        // At T=1, min_p 0.3 keeps tokens with p >= 0.3 p_max: logit >= 3 + ln 0.3 = 1.80.
        let mut l = vec![0.0f32, 1.0, 2.0, 3.0];
        apply(&shaping(|s| s.min_p = 0.3), &mut l, (&seen, 0), &[], 1.0);
        assert_eq!(l, vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 2.0, 3.0]);
        // Greedy: min_p cannot change the choice and is not applied.
        let mut l = vec![0.0f32, 1.0, 2.0, 3.0];
        apply(&shaping(|s| s.min_p = 0.3), &mut l, (&seen, 0), &[], 0.0);
        assert_eq!(l, vec![0.0, 1.0, 2.0, 3.0]);
    }
}
