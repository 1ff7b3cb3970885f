//! Which prompts a step prefills, and how much of each: the scheduler's prefill policy,
//! apart from the step that carries it out, so it is tested without a model.
//!
//! A step takes at most one chunk of each prompt (chunks are cut from the prompt's
//! start, so neither the chunking nor any logit depends on this policy) and at most the
//! budget in prompt tokens, the first prompt chosen always running. Prompts go shortest
//! remaining first: a short request admitted behind long ones gets its first token after
//! a step or two instead of waiting out their whole prefill, which is what keeps the
//! tail of time-to-first-token down under mixed load. A prompt passed over
//! [`STARVED`] steps in a row goes before the rest (in admission order), so a long
//! prompt still advances under a steady stream of short ones.

/// Steps in a row a prompt may be passed over before it goes first.
pub const STARVED: u32 = 4;

/// A prompt still being prefilled, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Prompt tokens not yet in the cache.
    pub remaining: usize,
    /// Steps in a row that took none of it.
    pub passed_over: u32,
}

/// Tokens each of `pending` (in admission order) prefills this step: 0 for those left
/// for a later step.
pub fn choose(pending: &[Pending], chunk: usize, budget: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pending.len()).collect();
    // Starved first, in admission order; then shortest remaining, ties by admission.
    order.sort_by_key(|&i| {
        let p = pending[i];
        if p.passed_over >= STARVED {
            (0, 0, i)
        } else {
            (1, p.remaining, i)
        }
    });
    let mut take = vec![0; pending.len()];
    let mut left = budget;
    let mut chosen = 0;
    for i in order {
        let n = pending[i].remaining.min(chunk);
        if n == 0 {
            continue;
        }
        if chosen == 0 || n <= left {
            take[i] = n;
            left = left.saturating_sub(n);
            chosen += 1;
        }
    }
    take
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 128;
    const BUDGET: usize = 256;

    fn fresh(remaining: &[usize]) -> Vec<Pending> {
        remaining
            .iter()
            .map(|&remaining| Pending {
                remaining,
                passed_over: 0,
            })
            .collect()
    }

    /// Runs the policy step after step as the scheduler does, until every prompt is in;
    /// returns the step at which each one finished.
    fn finish_steps(remaining: &[usize]) -> Vec<usize> {
        let mut pending = fresh(remaining);
        let mut done = vec![0; remaining.len()];
        for step in 1.. {
            if pending.iter().all(|p| p.remaining == 0) {
                break;
            }
            let take = choose(&pending, CHUNK, BUDGET);
            assert!(take.iter().sum::<usize>() <= BUDGET.max(CHUNK));
            for (i, (p, n)) in pending.iter_mut().zip(&take).enumerate() {
                if p.remaining == 0 {
                    continue;
                }
                if *n == 0 {
                    p.passed_over += 1;
                } else {
                    assert!(*n <= CHUNK, "one chunk a step");
                    p.remaining -= n;
                    p.passed_over = 0;
                    if p.remaining == 0 {
                        done[i] = step;
                    }
                }
            }
        }
        done
    }

    #[test]
    fn a_short_prompt_behind_long_ones_goes_in_the_first_step() {
        // Admitted last, behind two prompts of 24 chunks each.
        let take = choose(&fresh(&[3000, 3000, 40]), CHUNK, BUDGET);
        assert_eq!(take, vec![128, 0, 40]);
        assert_eq!(finish_steps(&[3000, 3000, 40])[2], 1);
    }

    #[test]
    fn equal_prompts_go_in_admission_order_within_the_budget() {
        let take = choose(&fresh(&[36; 10]), CHUNK, BUDGET);
        assert_eq!(take, vec![36, 36, 36, 36, 36, 36, 36, 0, 0, 0]);
        assert!(take.iter().sum::<usize>() <= BUDGET);
    }

    #[test]
    fn the_first_prompt_chosen_always_runs_and_takes_one_chunk() {
        assert_eq!(choose(&fresh(&[1000]), CHUNK, BUDGET), vec![128]);
        // A budget smaller than a chunk still moves one prompt.
        assert_eq!(choose(&fresh(&[1000, 1000]), CHUNK, 64), vec![128, 0]);
        assert_eq!(choose(&fresh(&[]), CHUNK, BUDGET), Vec::<usize>::new());
    }

    #[test]
    fn a_long_prompt_under_a_stream_of_short_ones_still_advances() {
        // Four short prompts a step keep arriving; each takes the whole budget with the
        // long one's chunk left out, until the long one has waited STARVED steps.
        let mut long = Pending {
            remaining: 1000,
            passed_over: 0,
        };
        let mut advanced = 0;
        for _ in 0..40 {
            let mut pending = vec![long];
            pending.extend(fresh(&[64, 64, 64, 64]));
            let take = choose(&pending, CHUNK, BUDGET);
            if take[0] == 0 {
                long.passed_over += 1;
            } else {
                long.remaining -= take[0];
                long.passed_over = 0;
                advanced += 1;
            }
            assert!(
                long.passed_over <= STARVED,
                "never passed over more than {STARVED} steps"
            );
        }
        assert!(advanced >= 40 / (STARVED as usize + 1), "{advanced}");
    }

    #[test]
    fn starved_prompts_go_first_in_admission_order() {
        let pending = [
            Pending {
                remaining: 500,
                passed_over: STARVED,
            },
            Pending {
                remaining: 20,
                passed_over: 0,
            },
            Pending {
                remaining: 900,
                passed_over: STARVED + 3,
            },
        ];
        // Both starved ones fit (128 + 128); the short one waits one step.
        assert_eq!(choose(&pending, CHUNK, BUDGET), vec![128, 0, 128]);
    }

    #[test]
    fn mixed_load_finishes_short_prompts_first_and_every_prompt_finishes() {
        let done = finish_steps(&[2000, 50, 700, 30, 2000, 90]);
        // The three short prompts are in within two steps.
        assert!(done[1] <= 2 && done[3] <= 2 && done[5] <= 2, "{done:?}");
        assert!(done.iter().all(|&d| d > 0), "{done:?}");
    }
}
