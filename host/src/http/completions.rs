//! `POST /v1/completions` and `POST /v1/chat/completions`: parse and validate, let the
//! policy plugin turn the prompt into tokens, then answer as one JSON body or as
//! server-sent events ending in `[DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

use super::error::ApiError;
use super::generate::{Generation, Piece};
use super::observe::{RequestInfo, ServingPlugin};
use super::types::{
    fields, parse_body, ChatRequest, CommonParams, CompletionRequest, Prompt, Usage, Validated,
};
use super::AppState;
use crate::engine::constraint::TokenConstraint;
use crate::engine::{EngineError, Fault};
use crate::plugins::types::{self as plugin, PolicyRequest};
use crate::plugins::{LoadedPlugin, PluginError, Session};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Completion,
    Chat,
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(info): Extension<Arc<RequestInfo>>,
    Extension(serving): Extension<ServingPlugin>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = body_bytes(&state, body).and_then(|b| {
        let body = parse_body(&b)?;
        let req: CompletionRequest = fields(&body)?;
        let params = fields::<CommonParams>(&body)?.validate(&state.model_name, &state.limits)?;
        let prompt = completion_prompt(&state, req.prompt)?;
        Ok((prompt, params))
    });
    respond(state, info, serving, Api::Completion, parsed).await
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(info): Extension<Arc<RequestInfo>>,
    Extension(serving): Extension<ServingPlugin>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = body_bytes(&state, body).and_then(|b| {
        let body = parse_body(&b)?;
        let req: ChatRequest = fields(&body)?;
        let params = fields::<CommonParams>(&body)?.validate(&state.model_name, &state.limits)?;
        Ok((plugin::Prompt::Chat(req.chat_messages()?), params))
    });
    respond(state, info, serving, Api::Chat, parsed).await
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
            let vocab = state.model.tokenizer.vocab_size();
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(ApiError::invalid(
                    format!("`prompt` holds token id {bad}, outside the vocabulary of {vocab}."),
                    Some("prompt"),
                ));
            }
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
    session: &mut Session,
    prompt: plugin::Prompt,
    max_tokens: Option<usize>,
) -> Result<(Vec<u32>, Option<u32>), ApiError> {
    let request = PolicyRequest {
        prompt,
        context_length: u32::try_from(state.batcher.config().max_seq_len).unwrap_or(u32::MAX),
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
    let vocab = state.model.tokenizer.vocab_size();
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(PluginError::Misbehaved {
            plugin: session.plugin_name().to_string(),
            detail: format!("policy returned token id {bad}, outside the vocabulary of {vocab}"),
        }
        .into());
    }
    Ok((ids, reported))
}

async fn respond(
    state: Arc<AppState>,
    info: Arc<RequestInfo>,
    serving: ServingPlugin,
    api: Api,
    parsed: Result<(plugin::Prompt, Validated), ApiError>,
) -> Response {
    match start(state.clone(), info, serving, parsed).await {
        Err(e) => e.into_response(),
        Ok((generation, params)) if params.stream => stream(state, api, generation, params),
        Ok((generation, _)) => whole(state, api, generation).await,
    }
}

/// From a parsed request to a queued generation: a sandbox on the version the request
/// arrived on, the policy's prompt, the queue. The request's deadline covers all of it.
async fn start(
    state: Arc<AppState>,
    info: Arc<RequestInfo>,
    serving: ServingPlugin,
    parsed: Result<(plugin::Prompt, Validated), ApiError>,
) -> Result<(Generation, Validated), ApiError> {
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
        let mut session = Session::open(&state.plugins, plugin.clone()).await?;
        // The constraint starts (its grammar compiles) in its own instance while the
        // policy tokenizes the prompt: neither waits for the other.
        let constraint = async {
            match &params.format {
                Some((format, param)) => constrain(&state, &plugin, format, param).await.map(Some),
                None => Ok(None),
            }
        };
        let (policy, constraint) = tokio::join!(
            apply_policy(&state, &mut session, prompt, params.max_tokens),
            constraint
        );
        let ((ids, reported), constraint) = (policy?, constraint?);
        let start = (ids, reported, constraint);
        Generation::start(state.clone(), info, session, start, &params, fault).await
    };
    let generation = tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_| ApiError::Timeout(state.limits.request_timeout.as_secs()))??;
    Ok((generation, params))
}

/// The request's constraint, started on its format by a warm instance of the plugin;
/// a format the plugin cannot compile is the client's 400, with the plugin's reason.
async fn constrain(
    state: &Arc<AppState>,
    plugin: &Arc<LoadedPlugin>,
    format: &plugin::OutputFormat,
    param: &str,
) -> Result<Box<dyn TokenConstraint>, ApiError> {
    let (p, f, plugins) = (plugin.clone(), format.clone(), state.plugins.clone());
    let verdict = state
        .plugins
        .exec
        .run(move || plugins.runtime.constraint(&p, &f))
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
/// `lynx-fault:scheduler-stop` to stop.
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

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(api: Api) -> String {
    let prefix = match api {
        Api::Completion => "cmpl",
        Api::Chat => "chatcmpl",
    };
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

async fn whole(state: Arc<AppState>, api: Api, mut generation: Generation) -> Response {
    let mut text = String::new();
    let (reason, usage) = loop {
        match generation.next().await {
            Some(Piece::Text(t)) => text.push_str(&t),
            Some(Piece::Finished { reason, usage }) => break (reason, usage),
            Some(Piece::Failed(e)) => return e.into_response(),
            None => return ApiError::Engine(EngineError::Stopped).into_response(),
        }
    };
    let choice = match api {
        Api::Completion => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": reason.as_str()
        }),
        Api::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": reason.as_str()
        }),
    };
    let object = match api {
        Api::Completion => "text_completion",
        Api::Chat => "chat.completion",
    };
    Json(json!({
        "id": new_id(api),
        "object": object,
        "created": created(),
        "model": &*state.model_name,
        "choices": [choice],
        "usage": usage,
    }))
    .into_response()
}

/// The envelope every chunk of one stream shares.
struct Chunks {
    api: Api,
    id: String,
    created: u64,
    model: String,
}

impl Chunks {
    fn object(&self) -> &'static str {
        match self.api {
            Api::Completion => "text_completion",
            Api::Chat => "chat.completion.chunk",
        }
    }

    fn choice(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        match self.api {
            Api::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish
            }),
            Api::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        }
    }

    fn event(&self, choices: Vec<Value>, usage: Option<Usage>) -> Event {
        let mut chunk = json!({
            "id": self.id, "object": self.object(), "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = json!(usage);
        }
        Event::default().data(chunk.to_string())
    }
}

fn stream(state: Arc<AppState>, api: Api, generation: Generation, params: Validated) -> Response {
    let chunks = Chunks {
        api,
        id: new_id(api),
        created: created(),
        model: state.model_name.to_string(),
    };
    let events = sse_events(chunks, generation, params.include_usage);
    Sse::new(events).into_response()
}

fn sse_events(
    chunks: Chunks,
    generation: Generation,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    // The chat API opens with the assistant role; completions go straight to text.
    let first = chunks.api == Api::Chat;
    stream::unfold(
        (chunks, generation, first, false),
        move |(chunks, mut generation, first, ended)| async move {
            if ended {
                return None;
            }
            let mut out = Vec::new();
            if first {
                out.push(chunks.event(vec![chunks.choice(Some(""), None, true)], None));
            }
            let mut ended = false;
            match generation.next().await {
                Some(Piece::Text(t)) => {
                    out.push(chunks.event(vec![chunks.choice(Some(&t), None, false)], None));
                }
                Some(Piece::Finished { reason, usage }) => {
                    let text = (chunks.api == Api::Completion).then_some("");
                    out.push(chunks.event(
                        vec![chunks.choice(text, Some(reason.as_str()), false)],
                        None,
                    ));
                    if include_usage {
                        out.push(chunks.event(vec![], Some(usage)));
                    }
                    out.push(Event::default().data("[DONE]"));
                    ended = true;
                }
                Some(Piece::Failed(e)) => {
                    out.push(Event::default().data(json!(e.body()).to_string()));
                    ended = true;
                }
                None => ended = true,
            }
            Some((
                stream::iter(out.into_iter().map(Ok)),
                (chunks, generation, false, ended),
            ))
        },
    )
    .flatten()
}
