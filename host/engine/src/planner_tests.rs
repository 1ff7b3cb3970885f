//! The planner's rules, step by step, without a model: admission order and placement,
//! the prefill budget, `n`-choice gating, and what the prefix index gives each prompt.

use super::*;
use crate::kv_cache::KvDtype;

const LIMITS: Limits = Limits {
    prefix_cache: true,
    chunk: 128,
    budget: 256,
};

fn waiting(prompt: &[u32]) -> Waiting<'_> {
    Waiting {
        prompt,
        echo: false,
        choice: None,
        space: 0,
    }
}

fn choice(prompt: &[u32], group: u64, index: usize) -> Waiting<'_> {
    Waiting {
        choice: Some((group, index)),
        ..waiting(prompt)
    }
}

fn decoding(slot: usize) -> Running {
    Running {
        slot,
        choice: None,
        remaining: 0,
        input: 1,
        passed_over: 0,
        echo: false,
    }
}

fn prefilling(slot: usize, remaining: usize) -> Running {
    Running {
        remaining,
        input: 0,
        ..decoding(slot)
    }
}

/// A sequence in `slot` prefilled `prompt` and generated `out`, then ended.
fn ran(p: &mut PrefixCache, slot: usize, prompt: &[u32], out: &[u32]) {
    p.wrote(slot, 0, Some(prompt), true);
    p.wrote(slot, prompt.len(), Some(out), false);
    p.tick();
}

fn index(slots: usize) -> PrefixCache {
    PrefixCache::new(slots, KvDtype::F16)
}

fn admitted(plan: &StepPlan) -> Vec<(usize, usize, usize)> {
    plan.admit
        .iter()
        .map(|&(i, p)| (i, p.slot, p.reused))
        .collect()
}

#[test]
fn requests_start_in_arrival_order_while_slots_are_free() {
    let (a, b, c) = ([1u32, 2], [3u32, 4], [5u32, 6]);
    let mut p = index(4);
    // Slot 2 was used most recently, slot 0 longest ago: fresh prompts take the free
    // slots least recently used first.
    ran(&mut p, 0, &[9], &[]);
    ran(&mut p, 2, &[8], &[]);
    let queue = [waiting(&a), waiting(&b), waiting(&c)];
    let plan = plan(&queue, &[decoding(1)], &[0, 2], &mut p, LIMITS);
    assert_eq!(
        admitted(&plan),
        [(0, 0, 0), (1, 2, 0)],
        "c waits for a slot"
    );
    // The running sequence decodes; each admitted prompt prefills whole (short), with
    // the logits of its last token.
    let seqs: Vec<(usize, usize, Logits, bool)> = plan
        .work
        .iter()
        .map(|w| (w.seq, w.tokens, w.logits, w.prompt))
        .collect();
    assert_eq!(
        seqs,
        [
            (0, 1, Logits::Last, false),
            (1, 2, Logits::Last, true),
            (2, 2, Logits::Last, true)
        ]
    );
    assert!(plan.passed_over.is_empty());
}

#[test]
fn nothing_starts_without_a_free_slot_and_decoding_goes_on() {
    let a = [1u32, 2, 3];
    let mut p = index(2);
    let plan = plan(
        &[waiting(&a)],
        &[decoding(0), decoding(1)],
        &[],
        &mut p,
        LIMITS,
    );
    assert!(plan.admit.is_empty());
    assert_eq!(plan.work.len(), 2);
    assert!(plan.work.iter().all(|w| !w.prompt && w.tokens == 1));
}

#[test]
fn a_step_prefills_whole_chunks_within_the_budget_shortest_first() {
    let mut p = index(4);
    let running = [
        prefilling(0, 600),
        decoding(1),
        prefilling(2, 300),
        prefilling(3, 40),
    ];
    let plan = plan(&[], &running, &[], &mut p, LIMITS);
    let work: Vec<(usize, usize, Logits)> = plan
        .work
        .iter()
        .map(|w| (w.seq, w.tokens, w.logits))
        .collect();
    // The 40-token prompt finishes (its logits are wanted); one chunk of 128 fits the
    // 216 tokens left of the budget; the longest waits this step.
    assert_eq!(
        work,
        [
            (1, 1, Logits::Last),
            (2, 128, Logits::None),
            (3, 40, Logits::Last)
        ]
    );
    assert_eq!(plan.passed_over, [0]);
}

#[test]
fn a_prompt_passed_over_long_enough_goes_first() {
    let mut p = index(3);
    let mut starved = prefilling(0, 600);
    starved.passed_over = prefill::STARVED;
    let running = [starved, prefilling(1, 100), prefilling(2, 100)];
    let plan = plan(&[], &running, &[], &mut p, LIMITS);
    let seqs: Vec<(usize, usize)> = plan.work.iter().map(|w| (w.seq, w.tokens)).collect();
    assert_eq!(seqs, [(0, 128), (1, 100)]);
    assert_eq!(plan.passed_over, [2]);
}

#[test]
fn a_cached_prefix_is_reused_and_only_the_rest_prefilled() {
    let mut p = index(3);
    let history: Vec<u32> = (0..200).collect();
    ran(&mut p, 1, &history, &[7, 7]);
    let mut next = history.clone();
    next.extend([7, 7, 1, 2, 3]);
    let plan = plan(&[waiting(&next)], &[], &[0, 1, 2], &mut p, LIMITS);
    assert_eq!(admitted(&plan), [(0, 1, 202)]);
    assert_eq!(plan.admit[0].1.copy_from, None, "reused in place");
    assert_eq!(
        plan.work,
        [Work {
            seq: 0,
            tokens: 3,
            logits: Logits::Last,
            prompt: true
        }]
    );
}

#[test]
fn echo_reuses_nothing_and_wants_every_position() {
    let mut p = index(2);
    let prompt = [1u32, 2, 3, 4];
    ran(&mut p, 0, &prompt, &[]);
    let req = Waiting {
        echo: true,
        ..waiting(&prompt)
    };
    let plan = plan(&[req], &[], &[0, 1], &mut p, LIMITS);
    assert_eq!(plan.admit[0].1.reused, 0);
    assert_eq!(plan.work[0].logits, Logits::Every);
    assert_eq!(plan.work[0].tokens, 4);
}

#[test]
fn a_request_s_choices_wait_for_the_first_then_fork_from_it() {
    let prompt: Vec<u32> = (0..50).collect();
    let other = [9u32, 9];
    let mut p = index(4);
    let queue = [
        choice(&prompt, 7, 0),
        choice(&prompt, 7, 1),
        choice(&prompt, 7, 2),
        waiting(&other),
    ];
    // Step 1: the first choice starts; the others wait without holding up `other`.
    let first = plan(&queue, &[], &[0, 1, 2, 3], &mut p, LIMITS);
    let started: Vec<usize> = first.admit.iter().map(|&(i, _)| i).collect();
    assert_eq!(started, [0, 3]);
    let slot = first.admit[0].1.slot;
    p.wrote(slot, 0, Some(&prompt), true);
    p.tick();

    // Step 2: the first is still prefilling (as when its prompt spans chunks).
    let free: Vec<usize> = (0..4)
        .filter(|&s| s != slot && s != first.admit[1].1.slot)
        .collect();
    let mut running = [prefilling(slot, 10), decoding(first.admit[1].1.slot)];
    running[0].choice = Some((7, 0));
    let rest = [choice(&prompt, 7, 1), choice(&prompt, 7, 2)];
    assert!(plan(&rest, &running, &free, &mut p, LIMITS)
        .admit
        .is_empty());

    // Step 3: it decodes; both copy its prompt (all but the last token) and fork.
    running[0].remaining = 0;
    running[0].input = 1;
    let fork = plan(&rest, &running, &free, &mut p, LIMITS);
    assert_eq!(fork.admit.len(), 2);
    for (_, place) in &fork.admit {
        assert_eq!(place.copy_from, Some(slot));
        assert_eq!(place.reused, prompt.len() - 1);
    }
}

#[test]
fn without_the_prefix_cache_only_a_request_s_own_choices_share() {
    let limits = Limits {
        prefix_cache: false,
        ..LIMITS
    };
    let prompt = [1u32, 2, 3, 4, 5];
    let mut p = index(3);
    ran(&mut p, 0, &prompt, &[]);
    let plan_a = plan(&[waiting(&prompt)], &[], &[0, 1, 2], &mut p, limits);
    assert_eq!(plan_a.admit[0].1.reused, 0, "another request's prefix");
    let slot = plan_a.admit[0].1.slot;
    p.wrote(slot, 0, Some(&prompt), true);
    p.tick();
    let free: Vec<usize> = (0..3).filter(|&s| s != slot).collect();
    let mut first = decoding(slot);
    first.choice = Some((3, 0));
    let plan_b = plan(&[choice(&prompt, 3, 1)], &[first], &free, &mut p, limits);
    assert_eq!(plan_b.admit[0].1.reused, 4, "its own first choice's prompt");
    assert_eq!(plan_b.admit[0].1.copy_from, Some(slot));
}

#[test]
fn two_prompts_admitted_together_share_what_the_first_is_given() {
    let mut p = index(3);
    let system: Vec<u32> = (100..180).collect();
    ran(&mut p, 0, &system, &[]);
    let (mut a, mut b) = (system.clone(), system.clone());
    a.extend([1, 1]);
    b.extend([2, 2]);
    let plan = plan(&[waiting(&a), waiting(&b)], &[], &[0, 1, 2], &mut p, LIMITS);
    // `a` extends slot 0's prompt in place; `b` must not take slot 0 from it, and gets
    // the shared prefix copied from the slot `a` now runs in.
    assert_eq!(admitted(&plan), [(0, 0, 80), (1, 1, 80)]);
    assert_eq!(plan.admit[1].1.copy_from, Some(0));
}

#[test]
fn prefixes_never_cross_cache_spaces() {
    let mut p = index(2);
    let prompt = [5u32, 6, 7, 8];
    ran(&mut p, 0, &prompt, &[]);
    let stranger = Waiting {
        space: 1,
        ..waiting(&prompt)
    };
    let plan = plan(&[stranger], &[], &[0, 1], &mut p, LIMITS);
    assert_eq!(plan.admit[0].1.reused, 0);
    assert_eq!(plan.admit[0].1.copy_from, None);
    assert_eq!(plan.work[0].tokens, 4);
}
