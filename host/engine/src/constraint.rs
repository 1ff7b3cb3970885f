//! Token-level control of one sequence's output: what a request's constraint (a
//! plugin's, through the plugin host, `lynx-plugin-host`) rules for its next token, and how the scheduler
//! applies that rule to the logits before temperature, top-p and sampling.
//!
//! The engine sees only [`TokenConstraint`]: it never knows a plugin is behind it.

/// A failure of a constraint: its request fails with it, the step's other sequences go
/// on. The HTTP layer downcasts it to tell the client which plugin failed and how.
pub type ConstraintError = Box<dyn std::error::Error + Send + Sync>;

/// What the next token may be.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// The model's own distribution.
    Any,
    /// Only the tokens whose bit is set: 32 tokens a word, token `t` in bit `t % 32` of
    /// word `t / 32`.
    Allowed(Vec<u32>),
    /// Added to these tokens' logits.
    Biases(Vec<(u32, f32)>),
    /// These tokens come next, unsampled: appended in one chunk.
    Forced(Vec<u32>),
    /// The output is complete.
    Stop,
}

/// A request's token-level control, called from the scheduler's step: `next` before a
/// token is chosen, `taken` with what was appended.
pub trait TokenConstraint: Send {
    fn next(&mut self) -> Result<Rule, ConstraintError>;
    fn taken(&mut self, tokens: &[u32]) -> Result<(), ConstraintError>;
}

/// The most tokens one `Forced` rule may append: a plugin cannot make one step
/// arbitrarily long.
pub const MAX_FORCED: usize = 256;

/// Why a rule cannot be applied: the plugin's fault, its request fails.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("the constraint allowed no token")]
    NothingAllowed,
    #[error("the constraint biased token {0}, outside the vocabulary of {1}")]
    OutOfVocabulary(u32, usize),
    #[error("the constraint gave a bias that is not a number")]
    NotANumber,
}

/// Applies an `Allowed` or `Biases` rule to `logits` in place (other rules leave them).
/// Allowing any of `ends` allows them all: a plugin allows "the end of the answer", and
/// the model ends it with whichever end token it prefers.
pub fn apply(rule: &Rule, logits: &mut [f32], ends: &[u32]) -> Result<(), RuleError> {
    match rule {
        Rule::Allowed(mask) => {
            let bit = |t: usize| mask.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1);
            // The end tokens keep the model's own logits if any of them is allowed.
            let kept_ends: Vec<(usize, f32)> = if ends.iter().any(|&e| bit(e as usize)) {
                ends.iter()
                    .filter_map(|&e| Some((e as usize, *logits.get(e as usize)?)))
                    .collect()
            } else {
                Vec::new()
            };
            let mut any = !kept_ends.is_empty();
            // A word at a time: most words of a mask are all zero or all one.
            for (w, chunk) in logits.chunks_mut(32).enumerate() {
                // Bits past the vocabulary's end allow nothing.
                let valid = u32::MAX >> (32 - chunk.len());
                match mask.get(w).copied().unwrap_or(0) & valid {
                    0 => chunk.fill(f32::NEG_INFINITY),
                    word if word == valid => any = true,
                    word => {
                        any = true;
                        for (b, logit) in chunk.iter_mut().enumerate() {
                            if word >> b & 1 == 0 {
                                *logit = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
            }
            for (e, logit) in kept_ends {
                logits[e] = logit;
            }
            if any {
                Ok(())
            } else {
                Err(RuleError::NothingAllowed)
            }
        }
        Rule::Biases(biases) => {
            let vocab = logits.len();
            for &(t, b) in biases {
                if !b.is_finite() && b != f32::NEG_INFINITY {
                    return Err(RuleError::NotANumber);
                }
                let l = logits
                    .get_mut(t as usize)
                    .ok_or(RuleError::OutOfVocabulary(t, vocab))?;
                *l += b;
            }
            Ok(())
        }
        Rule::Any | Rule::Forced(_) | Rule::Stop => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(allowed: &[u32], vocab: usize) -> Vec<u32> {
        let mut m = vec![0u32; vocab.div_ceil(32)];
        for &t in allowed {
            m[t as usize / 32] |= 1 << (t % 32);
        }
        m
    }

    #[test]
    fn a_mask_keeps_exactly_its_tokens_and_every_end_token_with_one() {
        let mut logits: Vec<f32> = (0..70).map(|i| i as f32).collect();
        apply(&Rule::Allowed(mask(&[3, 33, 64], 70)), &mut logits, &[1, 2]).unwrap();
        let kept: Vec<usize> = (0..70).filter(|&t| logits[t].is_finite()).collect();
        assert_eq!(kept, vec![3, 33, 64]);
        assert_eq!(logits[33], 33.0);

        let mut logits: Vec<f32> = (0..70).map(|i| i as f32).collect();
        apply(&Rule::Allowed(mask(&[5, 2], 70)), &mut logits, &[1, 2]).unwrap();
        let kept: Vec<usize> = (0..70).filter(|&t| logits[t].is_finite()).collect();
        assert_eq!(
            kept,
            vec![1, 2, 5],
            "allowing one end token allows the other"
        );
        assert_eq!(logits[1], 1.0, "with the model's own logit");
    }

    #[test]
    fn a_short_or_empty_mask_allows_nothing_past_it_and_an_empty_one_fails() {
        let mut logits = vec![0.0f32; 100];
        apply(&Rule::Allowed(vec![1]), &mut logits, &[]).unwrap();
        assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 1);
        let mut logits = vec![0.0f32; 100];
        assert!(matches!(
            apply(&Rule::Allowed(vec![]), &mut logits, &[]),
            Err(RuleError::NothingAllowed)
        ));
        // Only bits past the vocabulary's end (token 100 of 100) set: nothing allowed.
        let mut logits = vec![0.0f32; 100];
        assert!(matches!(
            apply(&Rule::Allowed(mask(&[100, 101], 128)), &mut logits, &[]),
            Err(RuleError::NothingAllowed)
        ));
    }

    #[test]
    fn biases_add_and_bad_ones_are_refused() {
        let mut logits = vec![1.0f32; 10];
        apply(
            &Rule::Biases(vec![(2, 5.0), (3, f32::NEG_INFINITY)]),
            &mut logits,
            &[],
        )
        .unwrap();
        assert_eq!(logits[2], 6.0);
        assert_eq!(logits[3], f32::NEG_INFINITY);
        assert!(apply(&Rule::Biases(vec![(10, 1.0)]), &mut logits, &[]).is_err());
        assert!(apply(&Rule::Biases(vec![(1, f32::NAN)]), &mut logits, &[]).is_err());
        assert!(apply(&Rule::Biases(vec![(1, f32::INFINITY)]), &mut logits, &[]).is_err());
    }
}
