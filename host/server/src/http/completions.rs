//! `POST /v1/completions` and `POST /v1/chat/completions`: parse and validate, let the
//! policy plugin turn the prompt into tokens, then queue a generation per choice and
//! answer (`answer.rs`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::future::try_join_all;

use super::answer::{self, Api, Delivery, Shape};
use super::conn::Connection;
use super::error::ApiError;
use super::generate::{Generation, Prepared};
use super::observe::{RequestInfo, ServingPlugin};
use super::requests::{fields, parse_body, ChatRequest, CommonParams, CompletionRequest, Prompt};
use super::tools;
use super::validation::{known_tokens, Validated};
use super::AppState;
use lynx_engine::constraint::TokenConstraint;
use lynx_engine::{EngineError, Fault};
use lynx_plugin_host::types::{self as plugin, PolicyRequest};
use lynx_plugin_host::{LoadedPlugin, PluginError, PooledSession};

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(info): Extension<Arc<RequestInfo>>,
    Extension(serving): Extension<ServingPlugin>,
    connection: Option<Extension<Connection>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = body_bytes(&state, body).and_then(|b| {
        let body = parse_body(&b)?;
        let req: CompletionRequest = fields(&body)?;
        let scoring = req.scoring()?;
        let params =
            fields::<CommonParams>(&body)?.validate(&state.model_name, &state.limits, scoring)?;
        let prompt = completion_prompt(&state, req.prompt)?;
        Ok((prompt, params))
    });
    let connection = connection.map(|Extension(c)| c);
    respond(state, info, serving, connection, Api::Completion, parsed).await
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(info): Extension<Arc<RequestInfo>>,
    Extension(serving): Extension<ServingPlugin>,
    connection: Option<Extension<Connection>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = body_bytes(&state, body).and_then(|b| {
        let body = parse_body(&b)?;
        let req: ChatRequest = fields(&body)?;
        if let Some(param) = tools::needs_tools(&body, &req.messages)? {
            return Err(tools::unsupported(&serving.0, &param));
        }
        let scoring = req.scoring()?;
        let params =
            fields::<CommonParams>(&body)?.validate(&state.model_name, &state.limits, scoring)?;
        Ok((
            plugin::Prompt::Chat(req.chat_messages(state.limits.max_chat_messages)?),
            params,
        ))
    });
    let connection = connection.map(|Extension(c)| c);
    respond(state, info, serving, connection, Api::Chat, parsed).await
}

pub(super) fn body_bytes(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(state.limits.max_body_bytes)
        } else if is_timeout(&rejection) {
            ApiError::BodyTimeout(state.limits.client_timeout.as_secs())
        } else {
            ApiError::invalid(
                format!("The request body could not be read: {rejection}"),
                None,
            )
        }
    })
}

/// Whether the body could not be read because the client sent it too slowly.
fn is_timeout(rejection: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = source {
        if e.is::<super::body::BodyDeadlineElapsed>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// The client's prompt as the policy plugin receives it. Token ids are checked here:
/// what the client sent is the client's error, whatever the plugin does with it.
fn completion_prompt(state: &AppState, prompt: Prompt) -> Result<plugin::Prompt, ApiError> {
    let text = match prompt {
        Prompt::Text(t) => t,
        Prompt::Texts(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Texts(v) => {
            return Err(ApiError::invalid(
                format!(
                    "`prompt` must be one prompt (got {}): batch prompts are not served.",
                    v.len()
                ),
                Some("prompt"),
            ))
        }
        Prompt::Tokens(ids) => {
            known_tokens(state.backend.tokenizer(), ids.iter().copied(), "prompt")?;
            if ids.is_empty() {
                return Err(ApiError::invalid(
                    "`prompt` must not be empty.",
                    Some("prompt"),
                ));
            }
            return Ok(plugin::Prompt::Tokens(ids));
        }
    };
    if text.is_empty() {
        return Err(ApiError::invalid(
            "`prompt` must not be empty.",
            Some("prompt"),
        ));
    }
    Ok(plugin::Prompt::Text(text))
}

/// The policy plugin's verdict: the prompt's token ids and the length the plugin
/// reported, or its rejection as a 400. Ids outside the vocabulary are the plugin's
/// fault, not the client's.
pub(super) async fn apply_policy(
    state: &AppState,
    session: &mut PooledSession,
    prompt: plugin::Prompt,
    max_tokens: Option<usize>,
) -> Result<(Vec<u32>, Option<u32>), ApiError> {
    let request = PolicyRequest {
        prompt,
        context_length: u32::try_from(state.backend.config().max_seq_len).unwrap_or(u32::MAX),
        max_tokens: max_tokens.map(|m| u32::try_from(m).unwrap_or(u32::MAX)),
    };
    let (verdict, reported) = session
        .call(move |s| {
            let verdict = s.tokenize(&request)?;
            Ok((verdict, s.state().ledger.prompt_tokens))
        })
        .await?;
    let ids = verdict.map_err(|rejection| {
        let code = if rejection.code.is_empty() {
            "rejected_by_policy".to_string()
        } else {
            rejection.code
        };
        ApiError::InvalidRequest {
            message: format!(
                "{} (policy plugin `{}`)",
                rejection.message,
                session.plugin_name()
            ),
            param: Some("prompt".into()),
            code: Some(code),
        }
    })?;
    let tokenizer = state.backend.tokenizer();
    if let Some(bad) = tokenizer.first_unknown(ids.iter().copied()) {
        return Err(PluginError::Misbehaved {
            plugin: session.plugin_name().to_string(),
            detail: format!(
                "policy returned token id {bad}, outside the vocabulary of {}",
                tokenizer.vocab_size()
            ),
        }
        .into());
    }
    Ok((ids, reported))
}

async fn respond(
    state: Arc<AppState>,
    info: Arc<RequestInfo>,
    serving: ServingPlugin,
    connection: Option<Connection>,
    api: Api,
    parsed: Result<(plugin::Prompt, Validated), ApiError>,
) -> Response {
    let text = match &parsed {
        Ok((plugin::Prompt::Text(t), _)) => Some(t.clone()),
        _ => None,
    };
    // The plugin instances the request will hold, counted against its connection's.
    let permit = match (&parsed, &connection) {
        (Ok((_, params)), Some(c)) => {
            let per_choice = 1 + u32::from(params.format.is_some());
            let n = u32::try_from(params.n).unwrap_or(u32::MAX);
            match c.instances(n.saturating_mul(per_choice)) {
                Ok(p) => Some(p),
                Err(cap) => return ApiError::ConnectionBusy(cap).into_response(),
            }
        }
        _ => None,
    };
    match start(state.clone(), info, serving, parsed).await {
        Err(e) => e.into_response(),
        Ok((generations, params, prompt)) => {
            let echo = params
                .scoring
                .echo
                .then(|| answer::echo_of(text.as_deref(), state.backend.tokenizer(), &prompt));
            let shape = Shape {
                api,
                logprobs: params.scoring.logprobs.is_some(),
                echo: echo.flatten(),
            };
            if params.stream {
                let delivery = Delivery {
                    buffer_bytes: state.limits.stream_buffer_bytes,
                    permit,
                };
                answer::stream(state, shape, generations, &params, delivery)
            } else {
                let answer = answer::whole(state, shape, generations).await;
                drop(permit);
                answer
            }
        }
    }
}

/// From a parsed request to a queued generation: a sandbox on the version the request
/// arrived on, the policy's prompt, the queue. The request's deadline covers all of it.
async fn start(
    state: Arc<AppState>,
    info: Arc<RequestInfo>,
    serving: ServingPlugin,
    parsed: Result<(plugin::Prompt, Validated), ApiError>,
) -> Result<(Vec<Generation>, Validated, Vec<u32>), ApiError> {
    let (prompt, params) = parsed?;
    if state.draining() {
        return Err(EngineError::ShuttingDown.into());
    }
    let fault = fault(&state, &prompt);
    let deadline = tokio::time::Instant::from_std(info.start) + state.limits.request_timeout;
    let plugin = serving.0;
    if let Some((_, param)) = &params.format {
        if !plugin.has_constraint() {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "`{param}` needs a plugin with token-level control (lynx:plugin@0.3.0 `constraint`); the active plugin `{}` (lynx:plugin@{}) has none.",
                    plugin.name, plugin.wit_version
                ),
                param: Some((*param).to_string()),
                code: Some("response_format_unsupported".into()),
            });
        }
    }
    let work = async {
        let mut session = PooledSession::open(&state.plugins, plugin.clone()).await?;
        // Each constraint starts (its grammar compiles) in its own instance while the
        // policy tokenizes the prompt: neither waits for the other. Choices after the
        // first post-process in instances of their own.
        let constraints = async {
            try_join_all((0..params.n).map(|_| async {
                match &params.format {
                    Some((format, param)) => {
                        constrain(&state, &plugin, format, param).await.map(Some)
                    }
                    None => Ok(None),
                }
            }))
            .await
        };
        let others = try_join_all(
            (1..params.n).map(|_| PooledSession::open(&state.plugins, plugin.clone())),
        );
        let (policy, constraints, others) = tokio::join!(
            apply_policy(&state, &mut session, prompt, params.max_tokens),
            constraints,
            others
        );
        let ((ids, reported), constraints) = (policy?, constraints?);
        let sessions = std::iter::once(session).chain(others?);
        let prepared = Prepared {
            prompt: ids.clone(),
            reported,
            choices: sessions.zip(constraints).collect(),
        };
        let generations = Generation::start(state.clone(), info, prepared, &params, fault).await?;
        Ok::<_, ApiError>((generations, ids))
    };
    let (generations, ids) = tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_| ApiError::Timeout(state.limits.request_timeout.as_secs()))??;
    Ok((generations, params, ids))
}

/// The request's constraint, started on its format by a warm instance of the plugin;
/// a format the plugin cannot compile is the client's 400, with the plugin's reason.
async fn constrain(
    state: &Arc<AppState>,
    plugin: &Arc<LoadedPlugin>,
    format: &plugin::OutputFormat,
    param: &str,
) -> Result<Box<dyn TokenConstraint>, ApiError> {
    let plugins = state.plugins.clone();
    // A warm instance is taken at once; a new one is prepared on the preparing threads,
    // never on the pool every request's calls share.
    let session = match plugins.runtime.take_warm(plugin) {
        Some(session) => session,
        None => {
            let (p, runtime) = (plugin.clone(), plugins.clone());
            plugins
                .preparer
                .run(move || runtime.runtime.prepare_for_request(&p))
                .await??
        }
    };
    let (p, f, runtime) = (plugin.clone(), format.clone(), plugins.clone());
    let verdict = plugins
        .exec
        .run(move || runtime.runtime.constraint(&p, session, &f))
        .await??;
    match verdict {
        Ok(constrained) => Ok(Box::new(constrained)),
        Err(rejection) => Err(ApiError::InvalidRequest {
            message: format!("{} (plugin `{}`)", rejection.message, plugin.name),
            param: Some(param.to_string()),
            code: Some(if rejection.code.is_empty() {
                "invalid_response_format".to_string()
            } else {
                rejection.code
            }),
        }),
    }
}

/// Testing only (`--fault-injection`): the prompt `lynx-fault:handler` panics here, in
/// the handler; `lynx-fault:scheduler` asks the scheduler to panic while sampling it,
/// `lynx-fault:scheduler-stop` to stop. Only in a `fault-injection` build.
#[cfg(feature = "fault-injection")]
fn fault(state: &AppState, prompt: &plugin::Prompt) -> Option<Fault> {
    if !state.limits.fault_injection {
        return None;
    }
    match prompt {
        plugin::Prompt::Text(t) if t == "lynx-fault:handler" => {
            panic!("fault injected by --fault-injection")
        }
        plugin::Prompt::Text(t) if t == "lynx-fault:scheduler" => Some(Fault::PanicWhileSampling),
        plugin::Prompt::Text(t) if t == "lynx-fault:scheduler-stop" => Some(Fault::StopScheduler),
        _ => None,
    }
}

#[cfg(not(feature = "fault-injection"))]
fn fault(_: &AppState, _: &plugin::Prompt) -> Option<Fault> {
    None
}
