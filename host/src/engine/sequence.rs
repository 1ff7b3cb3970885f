//! One running sequence as the scheduler holds it, and its sampling: each sequence has
//! its own [`Sampler`] (temperature, top-p, seed), so what it samples never depends on
//! what else shares the step.

use candle_core::Tensor;
use tokio::sync::mpsc;

use super::batcher::{BatcherConfig, FinishReason, GenEvent, Sampling};
use super::sampling::Sampler;
use super::{EngineError, Model};

pub(super) struct Sequence {
    pub(super) slot: usize,
    pub(super) prompt: Vec<u32>,
    /// Prompt tokens already in the cache; prefill is done when it reaches the prompt.
    pub(super) prefilled: usize,
    /// Tokens in the slot's cache.
    pub(super) pos: usize,
    pub(super) next_input: u32,
    pub(super) generated: usize,
    pub(super) max_tokens: usize,
    pub(super) sampler: Sampler,
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
        if let Some(event) = self.last {
            let _ = self.events.send(event);
        }
    }
}

pub(super) enum Step {
    Continue,
    Done,
}

/// Samples the next token of `seq` from its logits and reports it.
pub(super) fn advance(
    model: &Model,
    config: &BatcherConfig,
    seq: &mut Sequence,
    logits: &Tensor,
) -> Result<Step, EngineError> {
    if seq.inject_panic {
        panic!("fault injected by --fault-injection");
    }
    let token = seq.sampler.sample(logits)?;
    let finish = if model.tokenizer.is_end(token) {
        Some(FinishReason::Stop)
    } else {
        if seq.events.send(GenEvent::Token(token)).is_err() {
            return Ok(Step::Done);
        }
        seq.generated += 1;
        seq.next_input = token;
        (seq.generated >= seq.max_tokens || seq.pos >= config.max_seq_len)
            .then_some(FinishReason::Length)
    };
    match finish {
        Some(reason) => {
            seq.last = Some(GenEvent::Finished(reason));
            Ok(Step::Done)
        }
        None => Ok(Step::Continue),
    }
}

pub(super) fn sampler(s: Sampling) -> Sampler {
    Sampler::new(s.seed, s.temperature, s.top_p)
}
