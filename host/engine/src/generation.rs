//! What a request asks of the scheduler ([`GenerateRequest`]) and what it hears back
//! on its own channel ([`GenEvent`]): the engine's whole contract with its callers.

use tokio::sync::mpsc;

use super::constraint::TokenConstraint;
use super::logprobs::Logprob;
use super::shaping::Shaping;
use super::EngineError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Dropping the receiver cancels the generation: its slot is freed before the next
    /// token is computed.
    pub events: mpsc::UnboundedSender<GenEvent>,
    /// The request's own changes to its logits (penalties, bias, top-k, ...).
    pub shaping: Shaping,
    /// Rules each next token (structured outputs), when the request has one.
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Each generated token's log-probability, with this many alternatives.
    pub logprobs: Option<usize>,
    /// The prompt's own log-probabilities too (`echo`): such a prompt is prefilled
    /// whole, since a cached prefix has no logits.
    pub echo: bool,
    /// `(group, index)` when the request is one of `n` choices: the choices after the
    /// first start once the first has prefilled the prompt, and copy its keys and values.
    pub choice: Option<(u64, usize)>,
    /// The prefix-cache space: a request reuses only prefixes computed in its own.
    pub cache_space: u64,
    /// Testing only: inert unless the engine is built with `fault-injection`.
    pub fault: Option<Fault>,
}

/// Faults a test can inject into the scheduler (`--fault-injection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Panic while sampling this request: a panic must cost only its own request.
    PanicWhileSampling,
    /// Stop the scheduler thread, as a bug past every catch would: `/health` must say.
    StopScheduler,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn (EOS or an end-of-turn token), or a stop sequence matched.
    Stop,
    /// `max_tokens` or the context limit was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug)]
pub enum GenEvent {
    /// The request has a slot; `cached` prompt tokens were found in the prefix cache.
    Started {
        cached: usize,
    },
    /// Log-probabilities of prompt tokens (`echo`), from the second on, a chunk at a time.
    Prompt(Vec<Logprob>),
    /// A generated token, with its log-probability when asked for.
    Token(u32, Option<Logprob>),
    Finished(FinishReason),
    Failed(EngineError),
}
