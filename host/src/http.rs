//! The HTTP server: the OpenAI-compatible API, `/health`, `/metrics`, and the shared
//! state handlers reach through `State<Arc<AppState>>`.

pub mod admin;
pub mod completions;
pub mod error;
pub mod generate;
pub mod observe;
pub mod types;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde_json::json;

use crate::engine::{Batcher, Model};
use crate::metrics;
use crate::plugins::Plugins;
use error::ApiError;
use observe::EndpointLabels;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct AppState {
    pub model: Arc<Model>,
    /// The `model` field of responses and the `model_name` metric label.
    pub model_name: Arc<str>,
    pub batcher: Batcher,
    pub plugins: Arc<Plugins>,
    /// The `endpoint` label values seen, capped whatever the router plugin returns.
    pub endpoints: EndpointLabels,
    /// When the server started, as `created` of the model object.
    pub started: u64,
}

impl AppState {
    pub fn new(
        model: Arc<Model>,
        model_name: String,
        batcher: Batcher,
        plugins: Arc<Plugins>,
        started: u64,
    ) -> Self {
        Self {
            model,
            model_name: model_name.into(),
            batcher,
            plugins,
            endpoints: EndpointLabels::default(),
            started,
        }
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}

fn model_object(state: &AppState) -> serde_json::Value {
    json!({"id": &*state.model_name, "object": "model", "created": state.started, "owned_by": "lynx"})
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [model_object(&state)]}))
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if *id == *state.model_name {
        Ok(Json(model_object(&state)))
    } else {
        Err(ApiError::ModelNotFound(id))
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let stats = state.batcher.stats();
    Json(json!({
        "status": "ok",
        "model": &*state.model_name,
        "kv_cache_slots_used": stats.slots_used(),
        "kv_cache_slots": state.batcher.config().kv_slots,
        "queue_depth": stats.queue_depth(),
    }))
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    match metrics::render(state.batcher.stats()) {
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
