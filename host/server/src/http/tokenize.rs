//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes. Both go through the active
//! plugin, so a tokenizer client sees exactly what generation sees: its policy turns a
//! prompt (text or chat) into the ids a completion would prefill, and its
//! post-processing turns ids back into the text a completion would stream. Neither
//! moves a metric: no tokens are generated.

use std::sync::Arc;

use super::responses::{Detokenized, Tokenized};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::completions::{apply_policy, body_bytes};
use super::error::ApiError;
use super::observe::ServingPlugin;
use super::requests::{fields, parse_body, ChatRequest, WireMessage};
use super::tools;
use super::validation::{check_model, known_tokens};
use super::AppState;
use lynx_plugin_host::types::{PostConfig, Prompt};
use lynx_plugin_host::PooledSession;

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<WireMessage>>,
    /// vLLM's: without special tokens, the BOS the policy puts before a text is left out.
    add_special_tokens: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    Extension(serving): Extension<ServingPlugin>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match run_tokenize(&state, serving, body).await {
        Ok(tokens) => Json(Tokenized {
            count: tokens.len(),
            max_model_len: state.backend.config().max_seq_len,
            tokens,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn run_tokenize(
    state: &Arc<AppState>,
    serving: ServingPlugin,
    body: Result<Bytes, BytesRejection>,
) -> Result<Vec<u32>, ApiError> {
    let body = parse_body(&body_bytes(state, body)?)?;
    let req: TokenizeRequest = fields(&body)?;
    check_model(req.model.as_deref(), &state.model_name)?;
    let turns = req.messages.as_deref().unwrap_or_default();
    if let Some(param) = tools::needs_tools(&body, turns)? {
        return Err(tools::unsupported(&serving.0, &param));
    }
    let prompt = match (req.prompt, req.messages) {
        (Some(text), None) => Prompt::Text(text),
        (None, Some(messages)) => Prompt::Chat(
            ChatRequest {
                messages,
                logprobs: None,
                top_logprobs: None,
            }
            .chat_messages(state.limits.max_chat_messages)?,
        ),
        _ => {
            return Err(ApiError::invalid(
                "Give exactly one of `prompt` and `messages`.",
                Some("prompt"),
            ))
        }
    };
    let text = matches!(prompt, Prompt::Text(_));
    let mut session = PooledSession::open_unjudged(&state.plugins, serving.0).await?;
    let (mut ids, _) = apply_policy(state, &mut session, prompt, None).await?;
    let tokenizer = state.backend.tokenizer();
    if text && req.add_special_tokens == Some(false) && ids.first() == tokenizer.bos_id.as_ref() {
        ids.remove(0);
    }
    Ok(ids)
}

pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    Extension(serving): Extension<ServingPlugin>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match run_detokenize(&state, serving, body).await {
        Ok(prompt) => Json(Detokenized { prompt }).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn run_detokenize(
    state: &Arc<AppState>,
    serving: ServingPlugin,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    let body = parse_body(&body_bytes(state, body)?)?;
    let req: DetokenizeRequest = fields(&body)?;
    check_model(req.model.as_deref(), &state.model_name)?;
    known_tokens(
        state.backend.tokenizer(),
        req.tokens.iter().copied(),
        "tokens",
    )?;
    let context = state.backend.config().max_seq_len;
    if req.tokens.len() > context {
        return Err(ApiError::invalid(
            format!(
                "`tokens` may hold at most {context} ids (got {}).",
                req.tokens.len()
            ),
            Some("tokens"),
        ));
    }
    let mut session = PooledSession::open_unjudged(&state.plugins, serving.0).await?;
    // No event sink is set: the post-processing's token reports move no metric.
    let text = session
        .call(move |s| {
            s.start(&PostConfig::default())?;
            let mut text = String::new();
            for t in req.tokens {
                text.push_str(&s.push(t)?.text);
            }
            text.push_str(&s.finish()?);
            Ok(text)
        })
        .await?;
    Ok(text)
}
