//! What a plugin can reach: the model's tokenizer, the host log (rate-limited and
//! escaped), its deny-by-default WASI context ([`super::wasi`]), and the event ledger
//! that turns its reports into metrics. Reports that contradict what the host generated
//! (a second first token, more completion tokens than generated, a second prompt count)
//! are ignored and logged once per request.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::types::{LogLevel, ModelInfo, Vocabulary};
use lynx_engine::tokenizer::{Tokenizer, TokenizerError};

/// The most text a plugin may ask the host to encode in one call: far above any prompt
/// the body limit admits, far below what would stall the host.
pub const MAX_ENCODE_BYTES: usize = 4 << 20;
/// The longest plugin log line kept, in characters.
const MAX_LOG_CHARS: usize = 2000;
/// Log lines a plugin may write in a burst, and per second after it.
const LOG_BURST: f64 = 50.0;
const LOG_PER_SECOND: f64 = 10.0;

/// `host.encode` was asked for a text that provably cannot fit the context: the
/// request is the client's mistake (400 `context_length_exceeded`), not the plugin's.
#[derive(Debug, thiserror::Error)]
#[error("the text is at least {at_least} tokens long; the context holds {limit}")]
pub struct PromptTooLong {
    pub at_least: usize,
    pub limit: usize,
}

/// One plugin version's log allowance (a token bucket), shared by its instances.
#[derive(Debug)]
pub struct LogLimiter(Mutex<LogBucket>);

#[derive(Debug)]
struct LogBucket {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self(Mutex::new(LogBucket {
            tokens: LOG_BURST,
            last: Instant::now(),
            dropped: 0,
        }))
    }
}

impl LogLimiter {
    /// Whether a line may be written now, and how many were dropped before it.
    fn admit(&self) -> Option<u64> {
        let mut b = self.0.lock().ok()?;
        let now = Instant::now();
        let refill = now.duration_since(b.last).as_secs_f64() * LOG_PER_SECOND;
        b.tokens = (b.tokens + refill).min(LOG_BURST);
        b.last = now;
        if b.tokens < 1.0 {
            b.dropped += 1;
            return None;
        }
        b.tokens -= 1.0;
        Some(std::mem::take(&mut b.dropped))
    }
}

/// A plugin's log line as the host writes it: cut to [`MAX_LOG_CHARS`], control
/// characters escaped, so a plugin can neither forge log lines nor flood them.
pub(crate) fn escape_log(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_LOG_CHARS));
    for c in message.chars().take(MAX_LOG_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes one line of `plugin`'s log, under its rate limit: the `host.log` import,
/// and the plugin's stdout and stderr.
pub(crate) fn write_log(plugin: &str, limiter: &LogLimiter, level: LogLevel, message: &str) {
    let Some(dropped) = limiter.admit() else {
        return;
    };
    if dropped > 0 {
        tracing::warn!(plugin, dropped, "plugin log lines dropped (rate limit)");
    }
    let message = escape_log(message);
    match level {
        LogLevel::Trace => tracing::trace!(plugin, "{message}"),
        LogLevel::Debug => tracing::debug!(plugin, "{message}"),
        LogLevel::Info => tracing::info!(plugin, "{message}"),
        LogLevel::Warn => tracing::warn!(plugin, "{message}"),
        LogLevel::Error => tracing::error!(plugin, "{message}"),
    }
}

/// The events of one request, as reported and as accepted.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The prompt length the plugin reported (checked by the host against the prompt).
    pub prompt_tokens: Option<u32>,
    /// Tokens the host handed to `push`.
    pub pushed: u32,
    /// Completion-token reports accepted (never more than `pushed`).
    pub completion_tokens: u32,
    pub first_token: bool,
    warned: bool,
}

/// Where a session's token events go. The server records them (the token metrics
/// and the request's log record); the plugin host only says when they happen.
pub trait TokenSink: Send + Sync {
    /// One completion token reached the client.
    fn completion_token(&self);
    /// The first token reached the client.
    fn first_token(&self);
}

pub struct HostState {
    pub plugin: Arc<str>,
    pub tokenizer: Arc<Tokenizer>,
    /// What `host.model` answers.
    pub model: Arc<ModelInfo>,
    /// What `host.vocabulary` answers.
    pub vocabulary: Arc<Vocabulary>,
    /// Positions per slot: a text provably longer is refused unencoded.
    pub context_length: usize,
    pub ledger: Ledger,
    pub sink: Option<Arc<dyn TokenSink>>,
    pub memory_cap: usize,
    /// Set when a memory growth was refused, to tell an out-of-memory trap from others.
    pub memory_refused: bool,
    /// The most linear memory the instance was granted, in bytes.
    pub memory_peak: usize,
    pub log: Arc<LogLimiter>,
    /// When the running call must end: every blocking WASI wait ends by then.
    pub call_deadline: Option<Instant>,
    /// A wait of the running call was cut at its deadline: the call ran out of time,
    /// whatever the guest does next.
    pub deadline_cut: bool,
    /// Bytes `host.encode` was asked for in the running call, and the time it took.
    pub encoded: (usize, std::time::Duration),
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    pub fn new(
        plugin: Arc<str>,
        (tokenizer, model, vocabulary): (Arc<Tokenizer>, Arc<ModelInfo>, Arc<Vocabulary>),
        context_length: usize,
        memory_cap: usize,
        log: Arc<LogLimiter>,
    ) -> Self {
        let (wasi, table) = super::wasi::context(plugin.clone(), log.clone());
        Self {
            plugin,
            tokenizer,
            model,
            vocabulary,
            context_length,
            ledger: Ledger::default(),
            sink: None,
            memory_cap,
            memory_refused: false,
            memory_peak: 0,
            log,
            call_deadline: None,
            deadline_cut: false,
            encoded: (0, std::time::Duration::ZERO),
            wasi,
            table,
        }
    }

    /// A wait of `nanos` cut to what is left of the running call's deadline.
    pub fn clamp_to_deadline(&mut self, nanos: u64) -> u64 {
        match self.call_deadline {
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                let left = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
                if nanos > left {
                    self.deadline_cut = true;
                }
                nanos.min(left)
            }
            None => nanos,
        }
    }

    fn nonsense(&mut self, what: &str) {
        if !self.ledger.warned {
            self.ledger.warned = true;
            tracing::warn!(plugin = %self.plugin, "plugin reported {what}; ignored");
        }
    }

    /// A completion token counted: the metric, under the request's model.
    pub fn count_completion(&mut self) {
        self.ledger.completion_tokens += 1;
        if let Some(sink) = &self.sink {
            sink.completion_token();
        }
    }

    /// The first token reached the client: time to first token.
    pub fn mark_first_token(&mut self) {
        self.ledger.first_token = true;
        if let Some(sink) = &self.sink {
            sink.first_token();
        }
    }

    /// Records what the plugin should have reported for the tokens it was given, so
    /// the metrics stay exact whatever it reports.
    pub fn reconcile_events(&mut self) {
        let missing = self.ledger.pushed - self.ledger.completion_tokens;
        if missing > 0 {
            tracing::debug!(plugin = %self.plugin, missing, "plugin did not report completion tokens");
            for _ in 0..missing {
                self.count_completion();
            }
        }
        if !self.ledger.first_token && self.ledger.pushed > 0 {
            tracing::debug!(plugin = %self.plugin, "plugin did not report the first token");
            self.mark_first_token();
        }
    }
}

/// What the `host` and `events` imports do, whichever WIT version called them (each
/// version's bindings module forwards its generated traits here).
impl HostState {
    pub fn encode(&mut self, text: String, parse_special: bool) -> wasmtime::Result<Vec<u32>> {
        if text.len() > MAX_ENCODE_BYTES {
            wasmtime::bail!(
                "encode of {} bytes refused (limit {MAX_ENCODE_BYTES})",
                text.len()
            );
        }
        let started = Instant::now();
        let encoded = self
            .tokenizer
            .encode_bounded(&text, parse_special, self.context_length);
        self.encoded.0 += text.len();
        self.encoded.1 += started.elapsed();
        match encoded {
            Ok(ids) => Ok(ids),
            Err(TokenizerError::TooLong { at_least, limit }) => {
                Err(wasmtime::Error::new(PromptTooLong { at_least, limit }))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn token_bytes(&mut self, token: u32) -> wasmtime::Result<Vec<u8>> {
        Ok(self
            .tokenizer
            .piece(token)
            .map(<[u8]>::to_vec)
            .unwrap_or_default())
    }

    pub fn bos_token(&mut self) -> wasmtime::Result<Option<u32>> {
        let t = &self.tokenizer;
        Ok(t.bos_id.filter(|_| t.add_bos))
    }

    pub fn model_info(&mut self) -> ModelInfo {
        ModelInfo::clone(&self.model)
    }

    pub fn vocabulary(&mut self) -> Arc<Vocabulary> {
        self.vocabulary.clone()
    }

    pub fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        write_log(&self.plugin, &self.log, level, &message);
        Ok(())
    }

    pub fn prompt_tokens(&mut self, count: u32) -> wasmtime::Result<()> {
        if self.ledger.prompt_tokens.is_some() {
            self.nonsense("a second prompt length");
        } else {
            self.ledger.prompt_tokens = Some(count);
        }
        Ok(())
    }

    pub fn completion_token(&mut self) -> wasmtime::Result<()> {
        if self.ledger.completion_tokens >= self.ledger.pushed {
            self.nonsense("more completion tokens than were generated");
        } else {
            self.count_completion();
        }
        Ok(())
    }

    pub fn first_token(&mut self) -> wasmtime::Result<()> {
        if self.ledger.first_token || self.ledger.pushed == 0 {
            self.nonsense("a first token out of place");
        } else {
            self.mark_first_token();
        }
        Ok(())
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_cap;
        self.memory_refused |= !ok;
        if ok {
            self.memory_peak = self.memory_peak.max(desired);
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_escaped_and_cut() {
        assert_eq!(escape_log("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(escape_log(&"x".repeat(5000)).len(), MAX_LOG_CHARS);
    }

    #[test]
    fn log_lines_past_the_burst_are_dropped_and_counted() {
        let limiter = LogLimiter::default();
        let admitted = (0..1000).filter(|_| limiter.admit().is_some()).count();
        // The burst, plus what refilled while the loop ran (well under a second).
        assert!((50..60).contains(&admitted), "{admitted}");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(limiter.admit().is_some_and(|dropped| dropped > 900));
    }
}
