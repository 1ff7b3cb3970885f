//! What a plugin can reach: the model's tokenizer, the host log, and the event ledger
//! that turns its reports into metrics. Reports that contradict what the host generated
//! (a second first token, more completion tokens than generated, a second prompt count)
//! are ignored and logged once per request.

use std::sync::Arc;

use wasmtime::ResourceLimiter;

use super::world::lynx::plugin::{events, host, types};
use super::world::LogLevel;
use crate::engine::tokenizer::Tokenizer;
use crate::http::observe::RequestInfo;
use crate::metrics;

/// The most text a plugin may ask the host to encode in one call: far above any prompt
/// the body limit admits, far below what would stall the host.
pub const MAX_ENCODE_BYTES: usize = 4 << 20;

/// Where a request's events go: its metrics labels and its log record.
pub struct EventSink {
    pub model_name: Arc<str>,
    pub info: Arc<RequestInfo>,
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

pub struct HostState {
    pub plugin: Arc<str>,
    pub tokenizer: Arc<Tokenizer>,
    pub ledger: Ledger,
    pub sink: Option<EventSink>,
    pub memory_cap: usize,
    /// Set when a memory growth was refused, to tell an out-of-memory trap from others.
    pub memory_refused: bool,
}

impl HostState {
    pub fn new(plugin: Arc<str>, tokenizer: Arc<Tokenizer>, memory_cap: usize) -> Self {
        Self {
            plugin,
            tokenizer,
            ledger: Ledger::default(),
            sink: None,
            memory_cap,
            memory_refused: false,
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
            metrics::record_completion_token(&sink.model_name);
        }
    }

    /// The first token reached the client: time to first token.
    pub fn mark_first_token(&mut self) {
        self.ledger.first_token = true;
        if let Some(sink) = &self.sink {
            let ttft = sink.info.start.elapsed();
            sink.info.set_ttft(ttft);
            metrics::record_ttft(&sink.model_name, ttft.as_secs_f64());
        }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn encode(&mut self, text: String, parse_special: bool) -> wasmtime::Result<Vec<u32>> {
        if text.len() > MAX_ENCODE_BYTES {
            wasmtime::bail!(
                "encode of {} bytes refused (limit {MAX_ENCODE_BYTES})",
                text.len()
            );
        }
        Ok(self.tokenizer.encode(&text, parse_special)?)
    }

    fn token_bytes(&mut self, token: u32) -> wasmtime::Result<Vec<u8>> {
        Ok(self
            .tokenizer
            .piece(token)
            .map(<[u8]>::to_vec)
            .unwrap_or_default())
    }

    fn bos_token(&mut self) -> wasmtime::Result<Option<u32>> {
        let t = &self.tokenizer;
        Ok(t.bos_id.filter(|_| t.add_bos))
    }

    fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        let message: String = message.chars().take(2000).collect();
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }
}

impl events::Host for HostState {
    fn prompt_tokens(&mut self, count: u32) -> wasmtime::Result<()> {
        if self.ledger.prompt_tokens.is_some() {
            self.nonsense("a second prompt length");
        } else {
            self.ledger.prompt_tokens = Some(count);
        }
        Ok(())
    }

    fn completion_token(&mut self) -> wasmtime::Result<()> {
        if self.ledger.completion_tokens >= self.ledger.pushed {
            self.nonsense("more completion tokens than were generated");
        } else {
            self.count_completion();
        }
        Ok(())
    }

    fn first_token(&mut self) -> wasmtime::Result<()> {
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
