//! Per-request observation: the `endpoint` label (named by the router plugin once the
//! handler has read the body), the RED metrics and the one info log line per request.
//! The duration ends when the body's last byte has been handed to the connection (or
//! the client went away), so streamed responses are timed in full, not to their headers.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::body::Guarded;
use super::AppState;
use crate::metrics;
pub use crate::telemetry::RequestInfo;
use lynx_plugin_host::LoadedPlugin;

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

/// The plugin version serving a request, fixed at its arrival: routing and the
/// handler's session both run on it. It is a reference, not an instance: no sandbox is
/// held while the request's body is still arriving.
#[derive(Clone)]
pub struct ServingPlugin(pub Arc<LoadedPlugin>);

pub async fn observe(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let plugin = state.plugins.active();
    tracing::debug!(plugin = %plugin.name, sha256 = %plugin.sha256, %path, "plugin version serving the request");
    let info = Arc::new(RequestInfo::new(start));
    req.extensions_mut().insert(info.clone());
    req.extensions_mut().insert(ServingPlugin(plugin.clone()));
    let response = next.run(req).await;
    // Named once the handler is done with the body, from the version it arrived on.
    let label = state
        .plugins
        .label(&plugin, metrics::method_label(&method), &path)
        .await
        .unwrap_or_else(|| metrics::UNMATCHED_ENDPOINT.to_string());
    let done = Done {
        endpoint: state.endpoints.admit(label),
        method,
        status: response.status().as_str().to_string(),
        info,
    };
    response.map(|inner| Body::new(Guarded::new(inner, done)))
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
        tracing::info!(
            route = %self.endpoint,
            method = %self.method,
            status = %self.status,
            prompt_tokens = self.info.prompt_tokens(),
            cached_tokens = self.info.cached_tokens(),
            completion_tokens = self.info.completion_tokens(),
            ttft_ms = self.info.ttft().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}
