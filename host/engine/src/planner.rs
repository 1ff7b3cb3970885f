//! What the scheduler does in one step, decided apart from doing it: which waiting
//! requests start and in which slot (with what cached prefix), which choices of an `n`
//! request wait for their first, and what each running sequence feeds the forward pass
//! (its decode input, a prompt chunk, or nothing this step). [`plan`] reads plain views
//! of the queue and the slots, so every rule here is tested without a model; the
//! scheduler (`scheduler.rs`) carries the plan out.
//!
//! The only state a plan changes is the prefix index's bookkeeping ([`PrefixCache`]):
//! each placement records what its slot will hold once the scheduler has copied the
//! prefix, so the next placement in the same step sees it.

use super::arch::Logits;
use super::prefill::{self, Pending};
use super::prefix::{Placement, PrefixCache};

/// A waiting request, as the planner sees it (its client is still there).
#[derive(Debug, Clone, Copy)]
pub struct Waiting<'a> {
    pub prompt: &'a [u32],
    /// `echo`: every prompt position's logits are needed, so nothing cached is reused.
    pub echo: bool,
    /// `(group, index)` for one of a request's `n` choices.
    pub choice: Option<(u64, usize)>,
    /// The prefix-cache space the request may reuse.
    pub space: u64,
}

/// A running sequence, as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    pub slot: usize,
    pub choice: Option<(u64, usize)>,
    /// Prompt tokens not yet in the cache (0: decoding).
    pub remaining: usize,
    /// Decode input for this step: the sampled token and any tokens forced after it.
    pub input: usize,
    /// Steps in a row its prefill was passed over.
    pub passed_over: u32,
    pub echo: bool,
}

impl Running {
    fn decoding(&self) -> bool {
        self.remaining == 0
    }
}

/// The scheduler's settings the plan depends on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Whether prompts may reuse other requests' prefixes (a request's own choices
    /// always share theirs).
    pub prefix_cache: bool,
    /// Prompt tokens per prefill chunk.
    pub chunk: usize,
    /// Most prompt tokens prefilled per step.
    pub budget: usize,
}

/// One entry of the step's forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Index into the running sequences, those admitted this step appended in order.
    pub seq: usize,
    /// Tokens it feeds.
    pub tokens: usize,
    pub logits: Logits,
    /// Whether the tokens are a prompt chunk (else decode input).
    pub prompt: bool,
}

/// What one step does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Waiting requests to start, in this order: (index into the queue, where).
    pub admit: Vec<(usize, Placement)>,
    /// The forward pass's entries, in batch order.
    pub work: Vec<Work>,
    /// Sequences (indexed as in [`Work::seq`]) whose prefill waits this step.
    pub passed_over: Vec<usize>,
}

/// Plans a step. Waiting requests start in arrival order while slots are free, each
/// where its longest cached prefix is; a choice after its request's first waits,
/// without holding up the requests behind it, until the first has its prompt in the
/// cache. Then every decoding sequence gets its token, and `prefill.rs` picks the
/// prompt chunks within the budget.
pub fn plan(
    waiting: &[Waiting<'_>],
    running: &[Running],
    free: &[usize],
    prefix: &mut PrefixCache,
    limits: Limits,
) -> StepPlan {
    let mut free = free.to_vec();
    let mut running = running.to_vec();
    let mut admit = Vec::new();
    for (i, req) in waiting.iter().enumerate() {
        if free.is_empty() {
            break;
        }
        if !may_start(req, i, waiting, &admit, &running) {
            continue;
        }
        // Without the prefix cache, only a request's own choices share a prefix.
        let follows = req.choice.is_some_and(|(_, index)| index > 0);
        let cold = req.echo || !(limits.prefix_cache || follows);
        let busy: Vec<usize> = running.iter().map(|r| r.slot).collect();
        let place = prefix.place((req.prompt, cold, req.space), (&free, &busy));
        free.retain(|&s| s != place.slot);
        running.push(Running {
            slot: place.slot,
            choice: req.choice,
            remaining: req.prompt.len() - place.reused,
            input: 0,
            passed_over: 0,
            echo: req.echo,
        });
        admit.push((i, place));
    }

    let pending: Vec<Pending> = running
        .iter()
        .filter(|r| !r.decoding())
        .map(|r| Pending {
            remaining: r.remaining,
            passed_over: r.passed_over,
        })
        .collect();
    let mut takes = prefill::choose(&pending, limits.chunk, limits.budget).into_iter();
    let mut work = Vec::new();
    let mut passed_over = Vec::new();
    for (seq, r) in running.iter().enumerate() {
        if r.decoding() {
            work.push(Work {
                seq,
                tokens: r.input,
                logits: Logits::Last,
                prompt: false,
            });
            continue;
        }
        let tokens = takes.next().unwrap_or(0);
        if tokens == 0 {
            passed_over.push(seq);
            continue;
        }
        let logits = if r.echo {
            Logits::Every
        } else if tokens == r.remaining {
            Logits::Last
        } else {
            Logits::None
        };
        work.push(Work {
            seq,
            tokens,
            logits,
            prompt: true,
        });
    }
    StepPlan {
        admit,
        work,
        passed_over,
    }
}

/// Whether waiting request `i` may start: a choice after its request's first only once
/// the first has its prompt in the cache (or is gone).
fn may_start(
    req: &Waiting<'_>,
    i: usize,
    waiting: &[Waiting<'_>],
    admitted: &[(usize, Placement)],
    running: &[Running],
) -> bool {
    let Some((group, index)) = req.choice else {
        return true;
    };
    if index == 0 {
        return true;
    }
    let first = Some((group, 0));
    let first_waits = waiting
        .iter()
        .enumerate()
        .any(|(j, w)| j != i && w.choice == first && !admitted.iter().any(|&(a, _)| a == j));
    let first_prefills = running.iter().any(|r| r.choice == first && !r.decoding());
    !first_waits && !first_prefills
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
