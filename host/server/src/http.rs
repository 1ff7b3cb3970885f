//! The HTTP server: the OpenAI-compatible API, `/health`, `/metrics`, and the shared
//! state handlers reach through `State<Arc<AppState>>`.

pub mod admin;
pub mod answer;
pub mod body;
pub mod completions;
pub mod conn;
pub mod error;
pub mod generate;
pub mod observe;
pub mod requests;
pub mod responses;
pub mod serve;
pub mod site;
pub mod tokenize;
pub mod tools;
pub mod validation;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use tower_http::catch_panic::CatchPanicLayer;

use crate::backend::Backend;
use crate::metrics;
use error::ApiError;
use lynx_plugin_host::Plugins;
use observe::EndpointLabels;
use responses::{Health, ModelList, ModelObject};

/// What a request may ask and how long it may take (`Config::limits`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// The largest `max_tokens`, and the default when a request gives none.
    pub max_tokens: usize,
    pub request_timeout: Duration,
    /// How long a client may take to send headers, then the body.
    pub client_timeout: Duration,
    /// How long a connection may be open with no request in flight.
    pub keep_alive_timeout: Duration,
    pub max_connections: usize,
    pub http2_max_streams: u32,
    /// How long a response's ready bytes may wait for its client (then it is cut).
    pub write_timeout: Duration,
    /// Bytes of a streamed answer held for its client.
    pub stream_buffer_bytes: usize,
    /// Plugin instances one connection's requests may hold at once.
    pub instances_per_connection: u32,
    /// Released text one answer may hold, all choices together.
    pub max_answer_bytes: usize,
    pub max_chat_messages: usize,
    /// Requests without a `cache_salt` share one prefix-cache space.
    pub shared_cache: bool,
    /// When the serving plugin's post-processing fails mid-generation, the host's own
    /// carries the request on (fail-open) instead of ending it with an error.
    pub postprocess_fail_open: bool,
    /// Testing only: fault-injection prompts (see `--fault-injection`).
    pub fault_injection: bool,
}

pub struct AppState {
    /// What generates: the engine, or a test's scripted backend.
    pub backend: Arc<dyn Backend>,
    /// The `model` field of responses and the `model_name` metric label.
    pub model_name: Arc<str>,
    pub plugins: Arc<Plugins>,
    /// The `endpoint` label values seen, capped whatever the router plugin returns.
    pub endpoints: EndpointLabels,
    /// When the server started, as `created` of the model object.
    pub started: u64,
    pub limits: Limits,
    /// Set on SIGTERM/SIGINT: `/health` answers 503 and new generations are refused.
    pub draining: AtomicBool,
    /// Which hosts and browser origins may call the public API.
    pub site: Arc<site::SitePolicy>,
}

impl AppState {
    pub fn new(
        backend: Arc<dyn Backend>,
        model_name: String,
        plugins: Arc<Plugins>,
        started: u64,
        limits: Limits,
    ) -> Self {
        Self {
            backend,
            model_name: model_name.into(),
            plugins,
            endpoints: EndpointLabels::default(),
            started,
            limits,
            draining: AtomicBool::new(false),
            site: Arc::new(site::SitePolicy::new(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                &[],
                &[],
            )),
        }
    }

    /// The public API's site policy (`--allowed-hosts`, `--cors-origins`).
    pub fn with_site(mut self, site: site::SitePolicy) -> Self {
        self.site = Arc::new(site);
        self
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        // Inside the observer: a refused request is answered 403 and counted.
        .layer(middleware::from_fn_with_state(
            state.site.clone(),
            site::guard,
        ))
        // Inside the observer, so a panicking handler is answered (500) and counted.
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("a request handler panicked".into()).into_response()
        }))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}

fn model_object(state: &AppState) -> ModelObject<'_> {
    ModelObject {
        id: &state.model_name,
        object: "model",
        created: state.started,
        owned_by: "lynx",
    }
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    Json(ModelList {
        object: "list",
        data: vec![model_object(&state)],
    })
    .into_response()
}

async fn get_model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if *id == *state.model_name {
        Json(model_object(&state)).into_response()
    } else {
        ApiError::ModelNotFound(id).into_response()
    }
}

/// Ready: 200 `ok`. Not ready, 503, so a load balancer stops sending traffic:
/// `draining` for shutdown, `scheduler_stopped` when the scheduler thread is gone,
/// `plugin_pool_exhausted` while every plugin instance is in use.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.backend.stats();
    let (instances, max_instances) = state.plugins.runtime.instances();
    let (status, word) = if state.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !state.backend.is_running() {
        (StatusCode::SERVICE_UNAVAILABLE, "scheduler_stopped")
    } else if instances >= max_instances {
        (StatusCode::SERVICE_UNAVAILABLE, "plugin_pool_exhausted")
    } else {
        (StatusCode::OK, "ok")
    };
    let body = Json(Health {
        status: word,
        model: &state.model_name,
        kv_cache_slots_used: stats.slots_used(),
        kv_cache_slots: state.backend.config().kv_slots,
        queue_depth: stats.queue_depth(),
        plugin_instances: instances,
        plugin_instances_max: max_instances,
    });
    (status, body).into_response()
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    match metrics::render(state.backend.stats()) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::Internal(format!("metrics: {e}")).into_response(),
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().chars().take(200).collect())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(metrics::method_label(method.as_str()).to_string())
}
