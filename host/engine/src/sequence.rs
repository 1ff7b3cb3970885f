//! One running sequence as the scheduler holds it, and how it advances after a forward
//! pass: each sequence has its own [`Sampler`] (temperature, top-p, seed), so what it
//! samples never depends on what else shares the step, and may have a
//! [`TokenConstraint`] that rules each next token.
//!
//! A constrained sequence asks its constraint for the next rule right after a token is
//! taken, in the same parallel phase as the sampling: forced tokens are then known
//! before the next forward and go into it as one chunk (fast-forward), and the mask for
//! the next sampled token is ready when its logits are.

use candle_core::Tensor;
use tokio::sync::mpsc;

use super::constraint::{self, Rule, TokenConstraint, MAX_FORCED};
use super::generation::{FinishReason, GenEvent, Sampling};
use super::logprobs::{self, Logprob};
use super::sampling::Sampler;
use super::scheduler::SchedulerConfig;
use super::shaping::{self, Seen, Shaping};
use super::{EngineError, Model};

pub(super) struct Sequence {
    pub(super) slot: usize,
    pub(super) prompt: Vec<u32>,
    /// Prompt tokens already in the cache; prefill is done when it reaches the prompt.
    pub(super) prefilled: usize,
    /// Steps in a row that took none of the prompt (`prefill.rs`).
    pub(super) passed_over: u32,
    /// Tokens in the slot's cache.
    pub(super) pos: usize,
    /// What the next decode step feeds: the token sampled, and any forced after it.
    pub(super) input: Vec<u32>,
    pub(super) generated: usize,
    pub(super) max_tokens: usize,
    pub(super) sampler: Sampler,
    /// The request's own changes to its logits, and what it has produced so far: only
    /// when it asked for any.
    pub(super) shaping: Option<(Shaping, Seen)>,
    pub(super) constraint: Option<Box<dyn TokenConstraint>>,
    /// The constraint's rule for the next sampled token, asked for ahead.
    pub(super) rule: Option<Rule>,
    /// Each generated token's log-probability, with this many alternatives. Forced
    /// tokens then go one a forward, so each has the logits it is scored by.
    pub(super) logprobs: Option<usize>,
    /// The prompt's own log-probabilities are wanted (`echo`).
    pub(super) echo: bool,
    /// `(group, index)` of one of a request's `n` choices.
    pub(super) choice: Option<(u64, usize)>,
    /// Forward passes this sequence was part of.
    pub(super) forwards: usize,
    pub(super) events: mpsc::UnboundedSender<GenEvent>,
    /// The sequence's last event (finished or failed), sent only once its slot is
    /// released: a client that has its answer never sees its slot still counted.
    pub(super) last: Option<GenEvent>,
    pub(super) inject_panic: bool,
}

impl Sequence {
    pub(super) fn decoding(&self) -> bool {
        self.prefilled == self.prompt.len()
    }

    pub(super) fn close(self) {
        // Forwards per completion token: what fast-forward saves, in the log.
        tracing::debug!(
            generated = self.generated,
            forwards = self.forwards,
            constrained = self.constraint.is_some(),
            "sequence ended"
        );
        if let Some(event) = self.last {
            let _ = self.events.send(event);
        }
    }

    /// Reports `token` as generated and queues it as input; `Done` when the client left
    /// or a limit is reached.
    fn append(
        &mut self,
        config: &SchedulerConfig,
        token: u32,
        logprob: Option<Logprob>,
    ) -> Option<Step> {
        if self.events.send(GenEvent::Token(token, logprob)).is_err() {
            return Some(Step::Done);
        }
        self.generated += 1;
        self.input.push(token);
        if let Some((_, seen)) = &mut self.shaping {
            seen.push(token);
        }
        (self.generated >= self.max_tokens || self.pos + self.input.len() > config.max_seq_len)
            .then(|| self.finish(FinishReason::Length))
    }

    fn finish(&mut self, reason: FinishReason) -> Step {
        self.last = Some(GenEvent::Finished(reason));
        Step::Done
    }
}

pub(super) enum Step {
    Continue,
    Done,
}

/// Chooses the next token of `seq` from its logits and reports it, with the tokens its
/// constraint forces after it.
pub(super) fn advance(
    model: &Model,
    config: &SchedulerConfig,
    seq: &mut Sequence,
    logits: &Tensor,
) -> Result<Step, EngineError> {
    if seq.inject_panic {
        panic!("fault injected by --fault-injection");
    }
    seq.input.clear();
    if seq.max_tokens == 0 {
        // `echo` with nothing to generate: the prompt's log-probabilities were the answer.
        return Ok(seq.finish(FinishReason::Length));
    }
    let rule = match (&mut seq.constraint, seq.rule.take()) {
        (None, _) => Rule::Any,
        (Some(_), Some(rule)) => rule,
        (Some(c), None) => c.next().map_err(EngineError::Constraint)?,
    };
    let mut rest = None;
    let token = match rule {
        Rule::Stop => return Ok(seq.finish(FinishReason::Stop)),
        Rule::Forced(tokens) if seq.logprobs.is_none() => return force(model, config, seq, tokens),
        Rule::Forced(mut tokens) => {
            // Scored one at a time: the first now, the rest after the next forwards.
            check_forced(model, &tokens)?;
            let first = tokens.remove(0);
            rest = (!tokens.is_empty()).then_some(Rule::Forced(tokens));
            first
        }
        // Nothing to change: candle's tensor goes straight to the sampler.
        Rule::Any if seq.shaping.is_none() => seq.sampler.sample(logits)?,
        rule => {
            let ends = model.tokenizer.end_ids();
            let mut row = logits.to_vec1::<f32>()?;
            constraint::apply(&rule, &mut row, ends)
                .map_err(|e| EngineError::Constraint(e.into()))?;
            if let Some((shaping, seen)) = &seq.shaping {
                let (temperature, generated) = (seq.sampler.temperature(), seq.generated);
                shaping::apply(shaping, &mut row, (seen, generated), ends, temperature);
            }
            if row.iter().all(|l| *l == f32::NEG_INFINITY) {
                return Err(EngineError::Model(
                    "the request's settings allow no token here".into(),
                ));
            }
            let n = row.len();
            seq.sampler
                .sample(&Tensor::from_vec(row, n, logits.device())?)?
        }
    };
    if model.tokenizer.is_end(token) {
        return Ok(seq.finish(FinishReason::Stop));
    }
    let logprob = match seq.logprobs {
        Some(top) => Some(logprobs::of(&logits.to_vec1::<f32>()?, token, top)),
        None => None,
    };
    if let Some(step) = seq.append(config, token, logprob) {
        return Ok(step);
    }
    match &mut seq.constraint {
        Some(c) => {
            c.taken(&[token]).map_err(EngineError::Constraint)?;
            if rest.is_some() {
                seq.rule = rest;
                return Ok(Step::Continue);
            }
            ask_ahead(model, config, seq)
        }
        None => Ok(Step::Continue),
    }
}

/// Refuses a forced run that is empty, too long, or outside the vocabulary.
fn check_forced(model: &Model, tokens: &[u32]) -> Result<(), EngineError> {
    if tokens.is_empty() || tokens.len() > MAX_FORCED {
        return Err(EngineError::Constraint(
            format!(
                "the constraint forced {} tokens (1 to {MAX_FORCED} allowed)",
                tokens.len()
            )
            .into(),
        ));
    }
    let vocab = model.tokenizer.vocab_size();
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::Constraint(
            format!("the constraint forced token {bad}, outside the vocabulary of {vocab}").into(),
        ));
    }
    Ok(())
}

/// Appends the tokens a constraint forced, then asks it what follows them.
fn force(
    model: &Model,
    config: &SchedulerConfig,
    seq: &mut Sequence,
    tokens: Vec<u32>,
) -> Result<Step, EngineError> {
    check_forced(model, &tokens)?;
    let mut taken = Vec::with_capacity(tokens.len());
    for &token in &tokens {
        if model.tokenizer.is_end(token) {
            return Ok(seq.finish(FinishReason::Stop));
        }
        taken.push(token);
        if let Some(step) = seq.append(config, token, None) {
            return Ok(step);
        }
    }
    if let Some(c) = &mut seq.constraint {
        c.taken(&taken).map_err(EngineError::Constraint)?;
    }
    ask_ahead(model, config, seq)
}

/// Asks the constraint for the next rule now: forced tokens join this step's input,
/// a stop ends the sequence, any other rule waits for the next logits.
fn ask_ahead(
    model: &Model,
    config: &SchedulerConfig,
    seq: &mut Sequence,
) -> Result<Step, EngineError> {
    let Some(c) = &mut seq.constraint else {
        return Ok(Step::Continue);
    };
    if seq.input.len() >= MAX_FORCED {
        // A long forced run: the rest is asked for after this chunk's forward.
        return Ok(Step::Continue);
    }
    match c.next().map_err(EngineError::Constraint)? {
        Rule::Stop => Ok(seq.finish(FinishReason::Stop)),
        Rule::Forced(tokens) if seq.logprobs.is_none() => force(model, config, seq, tokens),
        rule => {
            seq.rule = Some(rule);
            Ok(Step::Continue)
        }
    }
}

pub(super) fn sampler(s: Sampling) -> Sampler {
    Sampler::new(s.seed, s.temperature, s.top_p)
}
