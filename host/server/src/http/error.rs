//! The one mapping from errors to HTTP: every error a client can see becomes a status and
//! an OpenAI error body `{"error":{"message","type","param","code"}}`. Internal details
//! go to the log, never to the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use lynx_engine::EngineError;
use lynx_plugin_host::PluginError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<String>,
    },
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("No route for {0}.")]
    NotFound(String),
    #[error("Method {0} is not allowed here.")]
    MethodNotAllowed(String),
    #[error("A valid `Authorization: Bearer` admin token is required.")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("This connection's requests already hold its {0} plugin instances; wait for one of them to end, or open another connection.")]
    ConnectionBusy(u32),
    #[error("The request body must be {0}.")]
    UnsupportedMediaType(&'static str),
    #[error("The request body is larger than the {0}-byte limit.")]
    PayloadTooLarge(usize),
    #[error("The request body was not received within {0} seconds.")]
    BodyTimeout(u64),
    #[error("The request did not complete within the server's {0}-second limit.")]
    Timeout(u64),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.status_and_type().0
    }

    fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => {
                (StatusCode::NOT_FOUND, "invalid_request_error")
            }
            ApiError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error")
            }
            ApiError::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error")
            }
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "authentication_error"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "permission_error"),
            ApiError::ConnectionBusy(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error")
            }
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "invalid_request_error"),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
            ApiError::Engine(EngineError::ShuttingDown) => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error")
            }
            ApiError::Engine(EngineError::Overloaded(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
            }
            ApiError::Engine(EngineError::Constraint(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "plugin_error")
            }
            ApiError::Engine(_) | ApiError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error")
            }
            // What the plugin refused on the client's behalf, or could not take on, is
            // not the plugin's fault.
            ApiError::Plugin(PluginError::PromptTooLong { .. })
            | ApiError::Plugin(PluginError::ClientCost { .. }) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            ApiError::Plugin(PluginError::PoolExhausted { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
            }
            ApiError::Plugin(_) => (StatusCode::INTERNAL_SERVER_ERROR, "plugin_error"),
        }
    }

    /// The OpenAI error object, also sent as the last event of a failed stream.
    pub fn body(&self) -> ErrorBody {
        let (status, kind) = self.status_and_type();
        let (message, code) = match self {
            ApiError::Plugin(PluginError::PromptTooLong { at_least, limit }) => (
                format!(
                    "This model's maximum context length is {limit} tokens; the prompt has at least {at_least} tokens."
                ),
                Some("context_length_exceeded".to_string()),
            ),
            ApiError::Plugin(e @ PluginError::ClientCost { .. }) => {
                (format!("{e}; send less."), Some("request_too_costly".to_string()))
            }
            ApiError::Plugin(PluginError::PoolExhausted { .. }) => (
                "The server is at capacity (every plugin instance is in use); retry shortly."
                    .to_string(),
                Some("overloaded".to_string()),
            ),
            ApiError::Plugin(e) => {
                tracing::error!(plugin = e.plugin().unwrap_or("?"), error = %e, "plugin failed a request");
                let (message, code) = e.public();
                (message, Some(code.to_string()))
            }
            ApiError::Engine(EngineError::Overloaded(_)) => {
                (self.to_string(), Some("overloaded".to_string()))
            }
            ApiError::Engine(EngineError::ShuttingDown) => (
                "The server is shutting down; retry on another instance.".to_string(),
                Some("shutting_down".to_string()),
            ),
            ApiError::Timeout(_) => (self.to_string(), Some("request_timeout".to_string())),
            ApiError::Engine(EngineError::Constraint(e)) => {
                tracing::error!(error = %e, "a constraint failed a request");
                (
                    format!("The request's constraint plugin gave an invalid rule: {e}."),
                    Some("plugin_invalid_result".to_string()),
                )
            }
            _ if status.is_server_error() => {
                tracing::error!(error = %self, "request failed");
                (
                    "The server had an error while processing your request.".to_string(),
                    None,
                )
            }
            ApiError::InvalidRequest { code, .. } => (self.to_string(), code.clone()),
            ApiError::ModelNotFound(_) => (self.to_string(), Some("model_not_found".into())),
            ApiError::PayloadTooLarge(_) => (self.to_string(), Some("payload_too_large".into())),
            ApiError::BodyTimeout(_) => (self.to_string(), Some("request_timeout".into())),
            ApiError::Unauthorized => (self.to_string(), Some("invalid_admin_token".into())),
            ApiError::ConnectionBusy(_) => (
                self.to_string(),
                Some("too_many_instances_per_connection".into()),
            ),
            _ => (self.to_string(), None),
        };
        let param = match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::Plugin(PluginError::PromptTooLong { .. }) => Some("prompt".to_string()),
            ApiError::ModelNotFound(_) => Some("model".to_string()),
            _ => None,
        };
        ErrorBody {
            error: ErrorObject {
                message,
                kind,
                param,
                code,
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Serialize)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    /// Seconds a client should wait before trying again, where waiting helps: a full
    /// queue drains within a step or two; every plugin instance in use means long
    /// requests hold them, so sooner is unlikely to help; a busy connection waits for
    /// its own requests. A server shutting down says none: retrying it will not help,
    /// another instance will.
    fn retry_after(&self) -> Option<&'static str> {
        match self {
            ApiError::Engine(EngineError::Overloaded(_)) => Some("1"),
            ApiError::Plugin(PluginError::PoolExhausted { .. }) => Some("5"),
            ApiError::ConnectionBusy(_) => Some("2"),
            ApiError::Engine(EngineError::ShuttingDown) => None,
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some("1"),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_type();
        let retry = self.retry_after();
        let mut response = (status, Json(self.body())).into_response();
        if let Some(seconds) = retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }
}
