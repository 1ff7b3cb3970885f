//! Per-request observation: the `endpoint` label (named by the router plugin), the RED
//! metrics and the one info log line per request. The duration ends when the body's last
//! byte has been handed to the connection (or the client went away), so streamed
//! responses are timed in full, not to their headers.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::AppState;
use crate::metrics;
use crate::plugins::PluginSession;

/// The most distinct `endpoint` values the host keeps: past it, new values from the
/// router plugin fold into the unmatched value, so even a faulty plugin cannot grow the
/// label set without bound.
pub const MAX_ENDPOINT_LABELS: usize = 64;
/// The longest `endpoint` value kept.
const MAX_ENDPOINT_LEN: usize = 128;

#[derive(Default)]
pub struct EndpointLabels {
    seen: Mutex<HashSet<String>>,
}

impl EndpointLabels {
    /// `label` if it is known or there is room for it; else the unmatched value.
    pub fn admit(&self, label: String) -> String {
        if label.len() > MAX_ENDPOINT_LEN {
            return metrics::UNMATCHED_ENDPOINT.to_string();
        }
        let Ok(mut seen) = self.seen.lock() else {
            return metrics::UNMATCHED_ENDPOINT.to_string();
        };
        if seen.contains(&label) {
            return label;
        }
        if seen.len() >= MAX_ENDPOINT_LABELS {
            tracing::warn!(%label, "endpoint label refused: the label set is full");
            return metrics::UNMATCHED_ENDPOINT.to_string();
        }
        seen.insert(label.clone());
        label
    }
}

/// The plugin sandbox the middleware opened for a request, for its handler to take.
#[derive(Clone, Default)]
pub struct PluginSlot(Arc<Mutex<Option<PluginSession>>>);

impl PluginSlot {
    pub fn take(&self) -> Option<PluginSession> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }
}

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

pub async fn observe(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let (endpoint, session) = route(&state, &method, req.uri().path());
    let info = Arc::new(RequestInfo::new(start));
    req.extensions_mut().insert(info.clone());
    req.extensions_mut()
        .insert(PluginSlot(Arc::new(Mutex::new(session))));
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

/// The request's `endpoint` label from the router plugin, and the session for its
/// handler. A router that fails yields the unmatched value, never a failed request.
fn route(state: &AppState, method: &str, path: &str) -> (String, Option<PluginSession>) {
    let mut session = match state.plugins.session() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no plugin session for routing");
            return (metrics::UNMATCHED_ENDPOINT.to_string(), None);
        }
    };
    tracing::debug!(
        plugin = session.plugin_name(),
        sha256 = session.version(),
        path,
        "plugin version serving the request"
    );
    match session.normalize(metrics::method_label(method), path) {
        Ok(label) => (state.endpoints.admit(label), Some(session)),
        Err(e) => {
            tracing::warn!(error = %e, "route normalization failed");
            (metrics::UNMATCHED_ENDPOINT.to_string(), None)
        }
    }
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
