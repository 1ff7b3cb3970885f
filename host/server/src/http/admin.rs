//! The admin API, on its own listener (`--admin-listen`, loopback by default), never on
//! the public port: the plugins' state, and a reload; the prefix cache's figures.
//!
//! Who may call it: with a token (`--admin-token-file`), whoever sends
//! `Authorization: Bearer <token>`; the host refuses to listen beyond loopback without
//! one. Without a token, only local clients, and not a web page a local browser
//! opened: the `Host` (and any `Origin`) must name a loopback address, so DNS
//! rebinding gets nothing, and a POST must carry `Content-Type: application/json`,
//! which no cross-site form can send without a CORS preflight (never granted). Every
//! action and every refusal is logged once, with the caller's address.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use lynx_engine::kv_cache::KvDtype;

/// The connection's peer, set by the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

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
        .route("/admin/cache", get(cache))
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::NotFound(uri.path().chars().take(200).collect())
        })
        .with_state(state)
        .layer(middleware::from_fn_with_state(
            token.map(Arc::<str>::from),
            guard,
        ));
    health.merge(router)
}

/// Whether a `Host` or `Origin` value names the loopback interface.
fn is_loopback_authority(value: &str) -> bool {
    super::site::is_loopback_name(&super::site::host_name(value))
}

/// Why a request may not reach the admin API, if it may not.
fn refusal(token: Option<&str>, req: &Request) -> Option<ApiError> {
    let headers = req.headers();
    match token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
                return Some(ApiError::Unauthorized);
            }
        }
        None => {
            let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
            if !host.is_some_and(is_loopback_authority) {
                return Some(ApiError::Forbidden(
                    "Without an admin token, the admin API answers only requests whose Host is a loopback address.".into(),
                ));
            }
            if let Some(origin) = headers.get(header::ORIGIN) {
                if !origin.to_str().is_ok_and(is_loopback_authority) {
                    return Some(ApiError::Forbidden(
                        "Without an admin token, the admin API refuses cross-origin requests."
                            .into(),
                    ));
                }
            }
        }
    }
    if req.method() == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Some(ApiError::UnsupportedMediaType("application/json"));
        }
    }
    None
}

async fn guard(State(token): State<Option<Arc<str>>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().map(|p| p.0.to_string());
    let peer = peer.as_deref().unwrap_or("?");
    let action = format!("{} {}", req.method(), req.uri().path());
    if let Some(error) = refusal(token.as_deref(), &req) {
        tracing::warn!(peer, action, status = error.status().as_u16(), reason = %error, "admin request refused");
        return error.into_response();
    }
    let is_action = req.method() != Method::GET;
    let response = next.run(req).await;
    if is_action {
        tracing::info!(
            peer,
            action,
            status = response.status().as_u16(),
            "admin action"
        );
    }
    response
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

/// The prefix cache: what it has reused since start-up, and what each slot holds now.
async fn cache(State(state): State<Arc<AppState>>) -> Json<Value> {
    let config = state.backend.config();
    let p = state.backend.stats().prefix();
    let n = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed);
    let reuse = match config.kv_dtype {
        KvDtype::F16 => "any prefix",
        KvDtype::F32 => "whole 128-token prompt chunks",
    };
    Json(json!({
        "enabled": config.prefix_cache,
        "reuse": reuse,
        "requests": n(&p.started),
        "hits": n(&p.hits),
        "copies": n(&p.copies),
        "prompt_tokens": n(&p.prompt_tokens),
        "cached_tokens": n(&p.cached_tokens),
        "slots": p.slots.iter().map(n).collect::<Vec<_>>(),
    }))
}

async fn reload(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let s = state.clone();
    tokio::task::spawn_blocking(move || s.plugins.reload_all())
        .await
        .map_err(|e| ApiError::Internal(format!("reload: {e}")))?;
    Ok(Json(view(&state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn loopback_authorities() {
        for ok in [
            "127.0.0.1:9000",
            "localhost:9000",
            "LOCALHOST",
            "[::1]:9000",
            "http://127.0.0.1:9000",
            "127.1.2.3",
        ] {
            assert!(is_loopback_authority(ok), "{ok}");
        }
        for bad in [
            "evil.example:9000",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "http://evil.example",
            "10.0.0.1:9000",
            "null",
            "",
        ] {
            assert!(!is_loopback_authority(bad), "{bad}");
        }
    }
}
