//! Log-probabilities as clients read them (`logprobs`, `top_logprobs`, `echo`): the
//! model's own distribution over the vocabulary, from the raw logits of the forward
//! pass, before the request's temperature, penalties, bias or constraint (vLLM's
//! default, "raw" log-probabilities). A prompt token and the same token generated get
//! the same value, since both come from the same row of the same computation.

/// One token's log-probability, and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    pub token: u32,
    pub logprob: f32,
    /// The `top` most likely tokens, most likely first (ties by lower id).
    pub top: Vec<(u32, f32)>,
}

/// The most alternatives a request may ask for (OpenAI's chat limit).
pub const MAX_TOP: usize = 20;

/// `token`'s log-probability under `row`'s softmax, with the `top` most likely tokens.
pub fn of(row: &[f32], token: u32, top: usize) -> Logprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // The normalizer in f64: a 262,144-token sum in f32 loses digits clients compare.
    let sum: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let lp = |l: f32| (f64::from(l) - log_z) as f32;
    let logprob = row
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| lp(l));
    let top = top.min(MAX_TOP).min(row.len());
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in row.iter().enumerate() {
            if best.len() == top && best.last().is_some_and(|&(_, b)| l <= b) {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    Logprob {
        token,
        logprob,
        top: best.into_iter().map(|(i, l)| (i, lp(l))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_a_normalized_log_softmax_with_the_top_tokens_in_order() {
        let row = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let lp = of(&row, 2, 3);
        let z: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((lp.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2], "most likely first, ties by lower id");
        let total: f64 = row
            .iter()
            .enumerate()
            .map(|(i, _)| f64::from(of(&row, i as u32, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(of(&row, 0, 0).top.is_empty());
        assert_eq!(of(&row, 9, 0).logprob, f32::NEG_INFINITY);
    }
}
