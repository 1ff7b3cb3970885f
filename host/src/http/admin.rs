//! The admin API, on its own listener (`--admin-listen`, loopback by default), never on
//! the public port: the plugins' state, and a reload. Beyond loopback it requires
//! `Authorization: Bearer <LYNX_ADMIN_TOKEN>`; the host refuses to start without one.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;

/// The admin router; `token`, when set, is required of every request but `/health`
/// (the public one's, still answering while the public listener is closed for a
/// shutdown, so health checks see `draining`).
pub fn admin_app(state: Arc<AppState>, token: Option<String>) -> Router {
    let health = Router::new()
        .route("/health", get(super::health))
        .with_state(state.clone());
    let router = Router::new()
        .route("/admin/plugins", get(list))
        .route("/admin/plugins/reload", post(reload))
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::NotFound(uri.path().chars().take(200).collect())
        })
        .with_state(state);
    let router = match token {
        Some(token) => router.layer(middleware::from_fn_with_state(
            Arc::<str>::from(token),
            bearer,
        )),
        None => router,
    };
    health.merge(router)
}

async fn bearer(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        next.run(req).await
    } else {
        axum::response::IntoResponse::into_response(ApiError::Unauthorized)
    }
}

/// Compares without an early exit, so response timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn view(state: &AppState) -> Value {
    json!({
        "active": state.plugins.active_name(),
        "dir": state.plugins.dir.display().to_string(),
        "plugins": state.plugins.status(),
    })
}

async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(view(&state))
}

async fn reload(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let s = state.clone();
    tokio::task::spawn_blocking(move || s.plugins.reload_all())
        .await
        .map_err(|e| ApiError::Internal(format!("reload: {e}")))?;
    tracing::info!("plugins reloaded by the admin API");
    Ok(Json(view(&state)))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
