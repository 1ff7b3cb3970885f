//! One generation as the HTTP layer sees it: submits the prompt to the scheduler and
//! hands each generated token to the plugin's post-processing, which releases text and
//! reports the token events the metrics come from. What a plugin fails to report, the
//! host records itself, so the metrics stay exact. Streaming and non-streaming responses
//! both read this, so they cannot differ.
//!
//! A request with `n` choices has a generation per choice, each with its own plugin
//! instance for post-processing, submitted to the scheduler together.
//!
//! Under `--plugin-failure-policy open`, a post-processing failure mid-generation does
//! not end the request: the default plugin's post-processing, run by the host, carries
//! on from the failed token (text the plugin held back is lost), and it is logged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lynx_plugin_core::stream::TextStream;
use rand::Rng;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::responses::{PromptTokensDetails, Usage};
use super::validation::{known_tokens, Validated};
use super::AppState;
use crate::metrics;
use crate::telemetry::{RequestInfo, TokenEvents};
use lynx_engine::constraint::TokenConstraint;
use lynx_engine::logprobs::Logprob;
use lynx_engine::tokenizer::Tokenizer;
use lynx_engine::{EngineError, Fault, FinishReason, GenEvent, GenerateRequest, Sampling};
use lynx_plugin_host::state::TokenSink;
use lynx_plugin_host::types::PostConfig;
use lynx_plugin_host::{PluginError, PooledSession};

#[derive(Debug)]
pub enum Piece {
    /// Log-probabilities of the prompt's tokens from the second on (`echo`).
    Prompt(Vec<Logprob>),
    /// Text released, with the log-probabilities of the tokens it came from (when asked
    /// for; a token whose text is held back goes with the text that releases it).
    Text(String, Vec<Logprob>),
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(ApiError),
}

/// What a request's choices share once the policy has run: the prompt, and a plugin
/// instance and constraint for each choice.
pub struct Prepared {
    pub prompt: Vec<u32>,
    /// The prompt length the plugin reported.
    pub reported: Option<u32>,
    pub choices: Vec<(PooledSession, Option<Box<dyn TokenConstraint>>)>,
}

pub struct Generation {
    info: Arc<RequestInfo>,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    session: PooledSession,
    prompt_tokens: usize,
    /// Prompt tokens the prefix cache gave.
    cached_tokens: usize,
    /// The request's first choice (the others fork from it).
    first: bool,
    completion_tokens: usize,
    /// Log-probabilities of tokens whose text is not released yet.
    pending: Vec<Logprob>,
    /// The prompt's scores (`echo`), gathered over its chunks and given as one piece.
    prompt_scores: Vec<Logprob>,
    ready: VecDeque<Piece>,
    done: bool,
    /// The plugin ended generation: waiting for the scheduler to release the slot.
    stopping: bool,
    /// `--request-timeout` after the request arrived.
    deadline: tokio::time::Instant,
    timeout_secs: u64,
    /// Who post-processes the tokens.
    post: Post,
    /// Text released for the whole answer so far, every choice's, and its cap.
    answer_bytes: Arc<AtomicUsize>,
    max_answer_bytes: usize,
}

/// Who post-processes a generation's tokens.
enum Post {
    /// The plugin, and nobody if it fails (fail-closed).
    Plugin,
    /// The plugin, and the host if it fails (fail-open).
    PluginOrHost(HostPost),
    /// The host, since the plugin failed.
    Host(HostPost),
}

/// The host's own post-processing (the default plugin's, as plain Rust), for a request
/// whose plugin failed under the fail-open policy.
struct HostPost {
    tokenizer: Arc<Tokenizer>,
    events: TokenEvents,
    text: TextStream,
}

impl HostPost {
    /// One token's text, and whether a stop sequence ended the answer. `counted`: the
    /// token's events are already recorded (the one the plugin failed on was, for it).
    fn push(&mut self, id: u32, counted: bool) -> (String, bool) {
        if !counted {
            self.events.completion_token();
        }
        let released = self.text.push(self.tokenizer.piece(id).unwrap_or_default());
        (released.text, released.stop)
    }
}

impl Generation {
    /// Checks the prompt against the context, then queues each choice with its
    /// constraint, if any, all together.
    pub async fn start(
        state: Arc<AppState>,
        info: Arc<RequestInfo>,
        prepared: Prepared,
        params: &Validated,
        fault: Option<Fault>,
    ) -> Result<Vec<Self>, ApiError> {
        let Prepared {
            prompt,
            reported,
            choices,
        } = prepared;
        let n = prompt.len();
        let max_tokens = check(&state, n, params)?;
        let config = PostConfig {
            stops: params.stops.clone(),
        };
        let sink = TokenEvents {
            model_name: state.model_name.clone(),
            info: info.clone(),
        };
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let group = (choices.len() > 1).then(|| rand::rng().random::<u64>());
        let space = cache_space(params.cache_salt.as_deref(), state.limits.shared_cache);
        let answer_bytes = Arc::new(AtomicUsize::new(0));
        let deadline = tokio::time::Instant::from_std(info.start) + state.limits.request_timeout;
        let mut requests = Vec::with_capacity(choices.len());
        let mut generations = Vec::with_capacity(choices.len());
        for (index, (mut session, constraint)) in choices.into_iter().enumerate() {
            let post = if state.limits.postprocess_fail_open {
                Post::PluginOrHost(HostPost {
                    tokenizer: state.backend.tokenizer().clone(),
                    events: sink.clone(),
                    text: TextStream::new(params.stops.clone()),
                })
            } else {
                Post::Plugin
            };
            let (config, sink) = (config.clone(), sink.clone());
            session
                .call(move |s| {
                    s.set_sink(Arc::new(sink));
                    s.start(&config)
                })
                .await?;
            let (tx, rx) = mpsc::unbounded_channel();
            requests.push(GenerateRequest {
                prompt: prompt.clone(),
                max_tokens,
                sampling: Sampling {
                    temperature: params.temperature,
                    top_p: params.top_p,
                    // Each choice its own stream, reproducible from the request's seed.
                    seed: seed.wrapping_add(index as u64),
                },
                events: tx,
                shaping: params.shaping.clone(),
                constraint,
                logprobs: params.scoring.logprobs,
                // The first choice scores the prompt (`echo` needs every position's
                // logits, so it prefills cold); the others copy its keys and values, and
                // the answer gives them its scores.
                echo: params.scoring.echo && index == 0,
                choice: group.map(|g| (g, index)),
                cache_space: space,
                fault,
            });
            generations.push(Self {
                info: info.clone(),
                rx,
                session,
                prompt_tokens: n,
                cached_tokens: 0,
                first: index == 0,
                completion_tokens: 0,
                pending: Vec::new(),
                prompt_scores: Vec::new(),
                ready: VecDeque::new(),
                done: false,
                stopping: false,
                deadline,
                timeout_secs: state.limits.request_timeout.as_secs(),
                post,
                answer_bytes: answer_bytes.clone(),
                max_answer_bytes: state.limits.max_answer_bytes,
            });
        }
        state.backend.submit_all(requests)?;
        if reported != u32::try_from(n).ok() {
            tracing::warn!(
                plugin = generations.first().map_or("", |g| g.session.plugin_name()),
                ?reported,
                actual = n,
                "plugin misreported the prompt length; recording the actual length"
            );
        }
        metrics::record_prompt_tokens(&state.model_name, n);
        info.set_prompt_tokens(n);
        Ok(generations)
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self.cached_tokens,
            },
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
            match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
                Ok(event) => self.on_event(event).await,
                // Closing the channel (in `fail`) frees the slot within one step.
                Err(_) => self.fail(ApiError::Timeout(self.timeout_secs)),
            }
        }
    }

    async fn on_event(&mut self, event: Option<GenEvent>) {
        if self.stopping {
            // Tokens computed before the scheduler saw the stop are not part of the
            // answer; the channel's end means the slot is free, and the answer complete.
            if event.is_none() {
                self.finish(FinishReason::Stop);
            }
            return;
        }
        match event {
            Some(GenEvent::Started { cached }) => {
                if self.first {
                    self.info.set_cached_tokens(cached);
                }
                self.cached_tokens = cached;
            }
            Some(GenEvent::Prompt(values)) => self.prompt_scores.extend(values),
            Some(GenEvent::Token(id, logprob)) => {
                self.flush_prompt();
                self.completion_tokens += 1;
                self.info.add_completion_token();
                self.pending.extend(logprob);
                let released = match &mut self.post {
                    Post::Host(host) => Ok(host.push(id, false)),
                    _ => self
                        .session
                        .call(move |s| s.push(id))
                        .await
                        .map(|r| (r.text, r.stop)),
                };
                let released =
                    released.or_else(|e| self.fail_over(e).map(|host| host.push(id, true)));
                let released = released.and_then(|(text, stop)| self.within_answer(text, stop));
                match released {
                    Ok((text, stop)) => {
                        self.release(text);
                        if stop {
                            // Closing the channel makes the scheduler free the slot
                            // before another token is computed; the answer ends when
                            // it has.
                            self.rx.close();
                            self.stopping = true;
                        }
                    }
                    Err(e) => self.fail(e.into()),
                }
            }
            Some(GenEvent::Finished(reason)) => {
                self.flush_prompt();
                let tail = match &mut self.post {
                    Post::Host(host) => Ok(host.text.finish()),
                    _ => self.session.call(|s| s.finish()).await,
                };
                let tail = tail
                    .or_else(|e| self.fail_over(e).map(|_| String::new()))
                    .and_then(|t| self.within_answer(t, false).map(|(t, _)| t));
                match tail {
                    Ok(tail) => {
                        self.release(tail);
                        self.finish(reason);
                    }
                    Err(e) => self.fail(e.into()),
                }
            }
            Some(GenEvent::Failed(e)) => {
                let e = engine_failure(e);
                if matches!(e, ApiError::Plugin(_)) {
                    // The request's constraint failed: its version answers for it, as
                    // for any fault of its own in this request.
                    self.session.mark_faulted();
                }
                self.ready.push_back(Piece::Failed(e));
                self.done = true;
            }
            None => {
                self.ready
                    .push_back(Piece::Failed(EngineError::Stopped.into()));
                self.done = true;
            }
        }
    }

    /// The plugin's post-processing failed: under the fail-open policy the host's takes
    /// over (text the plugin held back is lost); otherwise the error stands.
    fn fail_over(&mut self, error: PluginError) -> Result<&mut HostPost, PluginError> {
        if matches!(self.post, Post::PluginOrHost(_)) {
            if let Post::PluginOrHost(host) = std::mem::replace(&mut self.post, Post::Plugin) {
                tracing::warn!(plugin = self.session.plugin_name(), error = %error, "plugin post-processing failed; the host's own carries the request on (--plugin-failure-policy open)");
                self.post = Post::Host(host);
            }
        }
        match &mut self.post {
            Post::Host(host) => Ok(host),
            _ => Err(error),
        }
    }

    /// The prompt's scores, once its prefill is over.
    fn flush_prompt(&mut self) {
        if !self.prompt_scores.is_empty() {
            let values = std::mem::take(&mut self.prompt_scores);
            self.ready.push_back(Piece::Prompt(values));
        }
    }

    /// Counts `text` against the answer's cap (every choice's released text together):
    /// a plugin that releases more than the cap fails the request as its own fault.
    fn within_answer(&mut self, text: String, stop: bool) -> Result<(String, bool), PluginError> {
        let total = self.answer_bytes.fetch_add(text.len(), Ordering::AcqRel) + text.len();
        if total > self.max_answer_bytes {
            self.session.mark_faulted();
            return Err(PluginError::Misbehaved {
                plugin: self.session.plugin_name().to_string(),
                detail: format!(
                    "released {total} bytes for one answer (cap {}, --max-answer-bytes)",
                    self.max_answer_bytes
                ),
            });
        }
        Ok((text, stop))
    }

    fn fail(&mut self, error: ApiError) {
        self.rx.close();
        self.ready.push_back(Piece::Failed(error));
        self.done = true;
    }

    fn release(&mut self, text: String) {
        if !text.is_empty() {
            let logprobs = std::mem::take(&mut self.pending);
            self.ready.push_back(Piece::Text(text, logprobs));
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        if !self.pending.is_empty() {
            let logprobs = std::mem::take(&mut self.pending);
            self.ready.push_back(Piece::Text(String::new(), logprobs));
        }
        let usage = self.usage();
        self.ready.push_back(Piece::Finished { reason, usage });
        self.done = true;
    }
}

/// The prefix-cache space of a request: its salt's, else one all unsalted requests
/// share (`--prefix-cache-sharing shared`), else one of its own (its `n` choices share
/// it, nobody else).
fn cache_space(salt: Option<&str>, shared: bool) -> u64 {
    use sha2::{Digest, Sha256};
    match salt {
        Some(salt) => {
            let digest = Sha256::digest(format!("lynx cache salt\0{salt}").as_bytes());
            let mut head = [0u8; 8];
            head.copy_from_slice(&digest[..8]);
            // Never 0, the shared space.
            u64::from_le_bytes(head).max(1)
        }
        None if shared => 0,
        None => rand::rng().random::<u64>().max(1),
    }
}

/// What the client is told of a failure in the scheduler: a constraint plugin's failure
/// names the plugin, as any plugin failure does.
fn engine_failure(e: EngineError) -> ApiError {
    match e {
        EngineError::Constraint(e) => match e.downcast::<PluginError>() {
            Ok(plugin) => ApiError::Plugin(*plugin),
            Err(other) => ApiError::Engine(EngineError::Constraint(other)),
        },
        e => e.into(),
    }
}

/// Checks a prompt of `n` tokens and the request's settings against the model; returns
/// the most tokens to generate.
fn check(state: &AppState, n: usize, params: &Validated) -> Result<usize, ApiError> {
    let context = state.backend.config().max_seq_len;
    if n == 0 {
        return Err(ApiError::invalid("The prompt is empty.", Some("prompt")));
    }
    if n >= context {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "This model's maximum context length is {context} tokens; the prompt has {n} tokens, leaving no room for a completion."
            ),
            param: Some("prompt".into()),
            code: Some("context_length_exceeded".into()),
        });
    }
    let biased = params.shaping.logit_bias.iter().map(|&(t, _)| t);
    known_tokens(state.backend.tokenizer(), biased, "logit_bias")?;
    let cap = state.limits.max_tokens;
    Ok(match params.max_tokens {
        Some(m) if n.saturating_add(m) > context => {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "This model's maximum context length is {context} tokens; you requested {} tokens ({n} in the prompt, {m} for the completion).",
                    n.saturating_add(m)
                ),
                param: Some("max_tokens".into()),
                code: Some("context_length_exceeded".into()),
            })
        }
        Some(m) => m,
        None => (context - n).min(cap),
    })
}
