//! What the host learns about one request while serving it, shared by the HTTP layer
//! (which logs it and times the request) and the plugin host (whose event reports feed
//! it): the token counts, the time to first token, and the token metrics they record.
//! Neither layer reaches into the other for it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics;

/// A request's figures, for its log line.
#[derive(Debug)]
pub struct RequestInfo {
    pub start: Instant,
    prompt_tokens: AtomicUsize,
    /// Prompt tokens the prefix cache gave (the first choice's).
    cached_tokens: AtomicUsize,
    completion_tokens: AtomicUsize,
    /// Microseconds; 0 until the first token.
    ttft_us: AtomicU64,
}

impl RequestInfo {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            prompt_tokens: AtomicUsize::new(0),
            cached_tokens: AtomicUsize::new(0),
            completion_tokens: AtomicUsize::new(0),
            ttft_us: AtomicU64::new(0),
        }
    }
    pub fn set_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.store(n, Ordering::Relaxed);
    }
    /// One more completion token, of any of the request's choices.
    pub fn add_completion_token(&self) {
        self.completion_tokens.fetch_add(1, Ordering::Relaxed);
    }
    pub fn set_cached_tokens(&self, n: usize) {
        self.cached_tokens.store(n, Ordering::Relaxed);
    }
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens.load(Ordering::Relaxed)
    }
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens.load(Ordering::Relaxed)
    }
    pub fn completion_tokens(&self) -> usize {
        self.completion_tokens.load(Ordering::Relaxed)
    }
    /// Time to first token, once there is one.
    pub fn ttft(&self) -> Option<Duration> {
        match self.ttft_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
    /// Records the time to first token; false when the request already had one (its
    /// `n` choices each report a first token, and the request has one).
    fn set_ttft(&self, d: Duration) -> bool {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.ttft_us
            .compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// Where a generating request's token events go: its metrics labels and its log record.
#[derive(Debug, Clone)]
pub struct TokenEvents {
    pub model_name: Arc<str>,
    pub info: Arc<RequestInfo>,
}

impl lynx_plugin_host::state::TokenSink for TokenEvents {
    /// One completion token reached the client.
    fn completion_token(&self) {
        metrics::record_completion_token(&self.model_name);
    }

    /// The first token reached the client: time to first token, from arrival.
    fn first_token(&self) {
        let ttft = self.info.start.elapsed();
        if self.info.set_ttft(ttft) {
            metrics::record_ttft(&self.model_name, ttft.as_secs_f64());
        }
    }
}
