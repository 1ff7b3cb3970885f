//! One generation as the HTTP layer sees it: submits the prompt to the scheduler, turns
//! token events into released text (incremental UTF-8 decoding, stop sequences), and
//! records the token metrics and TTFT as tokens arrive. Streaming and non-streaming
//! responses both read it, so they cannot differ.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::Rng;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::observe::RequestInfo;
use super::types::{Usage, Validated};
use super::AppState;
use crate::engine::stops::StopMatcher;
use crate::engine::tokenizer::DecodeStream;
use crate::engine::{EngineError, FinishReason, GenEvent, GenerateRequest, Sampling};
use crate::metrics;

#[derive(Debug)]
pub enum Piece {
    Text(String),
    Finished { reason: FinishReason, usage: Usage },
    Failed(ApiError),
}

pub struct Generation {
    state: Arc<AppState>,
    info: Arc<RequestInfo>,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    decoder: DecodeStream,
    stops: StopMatcher,
    prompt_tokens: usize,
    completion_tokens: usize,
    ready: VecDeque<Piece>,
    done: bool,
}

impl Generation {
    /// Checks the prompt against the context, then queues it.
    pub fn start(
        state: Arc<AppState>,
        info: Arc<RequestInfo>,
        prompt: Vec<u32>,
        params: &Validated,
    ) -> Result<Self, ApiError> {
        let context = state.model.context_len;
        let n = prompt.len();
        if n == 0 {
            return Err(ApiError::invalid("The prompt is empty.", Some("prompt")));
        }
        if n >= context {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "This model's maximum context length is {context} tokens; the prompt has {n} tokens, leaving no room for a completion."
                ),
                param: Some("prompt".into()),
                code: Some("context_length_exceeded"),
            });
        }
        let max_tokens = match params.max_tokens {
            Some(m) if n.saturating_add(m) > context => {
                return Err(ApiError::InvalidRequest {
                    message: format!(
                        "This model's maximum context length is {context} tokens; you requested {} tokens ({n} in the prompt, {m} for the completion).",
                        n.saturating_add(m)
                    ),
                    param: Some("max_tokens".into()),
                    code: Some("context_length_exceeded"),
                })
            }
            Some(m) => m,
            None => context - n,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let sampling = Sampling {
            temperature: params.temperature,
            top_p: params.top_p,
            seed: params.seed.unwrap_or_else(|| rand::rng().random()),
        };
        state.batcher.submit(GenerateRequest {
            prompt,
            max_tokens,
            sampling,
            events: tx,
        })?;
        metrics::record_prompt_tokens(&state.model_name, n);
        info.set_prompt_tokens(n);
        Ok(Self {
            state,
            info,
            rx,
            decoder: DecodeStream::default(),
            stops: StopMatcher::new(params.stops.clone()),
            prompt_tokens: n,
            completion_tokens: 0,
            ready: VecDeque::new(),
            done: false,
        })
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
        }
    }

    /// The next piece of output; `None` after `Finished` or `Failed`.
    pub async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(piece) = self.ready.pop_front() {
                return Some(piece);
            }
            if self.done {
                return None;
            }
            let event = self.rx.recv().await;
            self.on_event(event);
        }
    }

    fn on_event(&mut self, event: Option<GenEvent>) {
        match event {
            Some(GenEvent::Token(id)) => {
                self.completion_tokens += 1;
                self.info.set_completion_tokens(self.completion_tokens);
                metrics::record_completion_token(&self.state.model_name);
                if self.completion_tokens == 1 {
                    let ttft = self.info.start.elapsed();
                    self.info.set_ttft(ttft);
                    metrics::record_ttft(&self.state.model_name, ttft.as_secs_f64());
                }
                let piece = self.state.model.tokenizer.piece(id).unwrap_or_default();
                let text = self.decoder.push(piece);
                let released = self.stops.push(&text);
                self.release(released.text);
                if released.stopped {
                    // Closing the channel frees the slot before another token is computed.
                    self.rx.close();
                    self.finish(FinishReason::Stop);
                }
            }
            Some(GenEvent::Finished(reason)) => {
                let tail = self.decoder.finish();
                let released = self.stops.push(&tail);
                self.release(released.text);
                if !released.stopped {
                    let held = self.stops.finish();
                    self.release(held);
                }
                self.finish(if released.stopped {
                    FinishReason::Stop
                } else {
                    reason
                });
            }
            Some(GenEvent::Failed(message)) => {
                self.ready
                    .push_back(Piece::Failed(EngineError::Model(message).into()));
                self.done = true;
            }
            None => {
                self.ready
                    .push_back(Piece::Failed(EngineError::Stopped.into()));
                self.done = true;
            }
        }
    }

    fn release(&mut self, text: String) {
        if !text.is_empty() {
            self.ready.push_back(Piece::Text(text));
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        let usage = self.usage();
        self.ready.push_back(Piece::Finished { reason, usage });
        self.done = true;
    }
}
