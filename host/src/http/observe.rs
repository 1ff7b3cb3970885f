//! Per-request observation: the RED metrics and the one info log line per request. The
//! duration ends when the body's last byte has been handed to the connection (or the
//! client went away), so streamed responses are timed in full, not to their headers.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::metrics;

/// What a handler learns about its request, for the log line.
#[derive(Debug)]
pub struct RequestInfo {
    pub start: Instant,
    prompt_tokens: AtomicUsize,
    completion_tokens: AtomicUsize,
    /// Microseconds; 0 until the first token.
    ttft_us: AtomicU64,
}

impl RequestInfo {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            prompt_tokens: AtomicUsize::new(0),
            completion_tokens: AtomicUsize::new(0),
            ttft_us: AtomicU64::new(0),
        }
    }
    pub fn set_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.store(n, Ordering::Relaxed);
    }
    pub fn set_completion_tokens(&self, n: usize) {
        self.completion_tokens.store(n, Ordering::Relaxed);
    }
    pub fn set_ttft(&self, d: Duration) {
        self.ttft_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }
}

pub async fn observe(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(metrics::UNMATCHED_ENDPOINT, MatchedPath::as_str)
        .to_string();
    let method = req.method().to_string();
    let info = Arc::new(RequestInfo::new(start));
    req.extensions_mut().insert(info.clone());
    let response = next.run(req).await;
    let status = response.status();
    let done = Done {
        endpoint,
        method,
        status: status.as_str().to_string(),
        info,
    };
    response.map(|inner| {
        Body::new(MeteredBody {
            inner,
            done: Some(done),
        })
    })
}

/// Recorded once, when the body ends or is dropped.
struct Done {
    endpoint: String,
    method: String,
    status: String,
    info: Arc<RequestInfo>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let elapsed = self.info.start.elapsed();
        metrics::record_request(
            &self.endpoint,
            &self.method,
            &self.status,
            elapsed.as_secs_f64(),
        );
        let ttft_us = self.info.ttft_us.load(Ordering::Relaxed);
        tracing::info!(
            route = %self.endpoint,
            method = %self.method,
            status = %self.status,
            prompt_tokens = self.info.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens = self.info.completion_tokens.load(Ordering::Relaxed),
            ttft_ms = ttft_us as f64 / 1000.0,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

pin_project_lite::pin_project! {
    struct MeteredBody {
        #[pin]
        inner: Body,
        done: Option<Done>,
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.done.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
