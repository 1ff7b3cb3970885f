//! A generation's answer as the OpenAI API shapes it: one JSON body, or server-sent
//! events ending in `[DONE]`; every choice of `n` with its own index; log-probabilities
//! in each route's own shape (completions' `tokens`/`token_logprobs`/`top_logprobs`/
//! `text_offset`, chat's `content[]`), streamed with the text they belong to.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::join_all;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::generate::{Generation, Piece};
use super::types::{Usage, Validated};
use super::AppState;
use crate::engine::logprobs::Logprob;
use crate::engine::tokenizer::Tokenizer;
use crate::engine::{EngineError, FinishReason};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completion,
    Chat,
}

/// What the answer says beyond the generated text.
pub struct Shape {
    pub api: Api,
    /// Log-probabilities are reported.
    pub logprobs: bool,
    /// The prompt's text and first token, returned before the completion (`echo`).
    pub echo: Option<(String, u32)>,
}

/// One choice's log-probabilities in its route's shape, built up piece by piece.
struct Scores {
    api: Api,
    tokenizer: Arc<Tokenizer>,
    /// Characters of text before the next token (completions' `text_offset`).
    offset: usize,
}

impl Scores {
    fn text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self
            .tokenizer
            .piece(id)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// The shape of `entries`, each a token with its log-probability (`None` for a
    /// prompt's first token, which nothing predicts).
    fn render(&mut self, entries: &[(u32, Option<&Logprob>)]) -> Value {
        match self.api {
            Api::Completion => {
                let (mut tokens, mut values, mut tops, mut offsets) =
                    (vec![], vec![], vec![], vec![]);
                for &(id, lp) in entries {
                    let (text, _) = self.text(id);
                    offsets.push(self.offset);
                    self.offset += text.chars().count();
                    tokens.push(text);
                    values.push(lp.map(|l| l.logprob));
                    tops.push(lp.map(|l| {
                        let mut top = Map::new();
                        for &(t, v) in &l.top {
                            top.entry(self.text(t).0).or_insert(json!(v));
                        }
                        Value::Object(top)
                    }));
                }
                json!({"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
            }
            Api::Chat => {
                let item = |id: u32, logprob: f32| {
                    let (token, bytes) = self.text(id);
                    json!({"token": token, "logprob": logprob, "bytes": bytes})
                };
                let content: Vec<Value> = entries
                    .iter()
                    .filter_map(|&(id, lp)| lp.map(|l| (id, l)))
                    .map(|(id, l)| {
                        let mut v = item(id, l.logprob);
                        v["top_logprobs"] = l.top.iter().map(|&(t, p)| item(t, p)).collect();
                        v
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
        }
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

fn object(api: Api, stream: bool) -> &'static str {
    match (api, stream) {
        (Api::Completion, _) => "text_completion",
        (Api::Chat, false) => "chat.completion",
        (Api::Chat, true) => "chat.completion.chunk",
    }
}

/// Everything one choice said, for a whole answer.
struct Whole {
    text: String,
    prompt: Vec<Logprob>,
    tokens: Vec<(u32, Logprob)>,
    reason: FinishReason,
    usage: Usage,
}

async fn collect(mut generation: Generation) -> Result<Whole, ApiError> {
    let (mut text, mut prompt, mut tokens) = (String::new(), Vec::new(), Vec::new());
    loop {
        match generation.next().await {
            Some(Piece::Prompt(values)) => prompt.extend(values),
            Some(Piece::Text(t, values)) => {
                text.push_str(&t);
                tokens.extend(values.into_iter().map(|l| (l.token, l)));
            }
            Some(Piece::Finished { reason, usage }) => {
                return Ok(Whole {
                    text,
                    prompt,
                    tokens,
                    reason,
                    usage,
                })
            }
            Some(Piece::Failed(e)) => return Err(e),
            None => return Err(ApiError::Engine(EngineError::Stopped)),
        }
    }
}

pub async fn whole(state: Arc<AppState>, shape: Shape, generations: Vec<Generation>) -> Response {
    let results = join_all(generations.into_iter().map(collect)).await;
    let mut choices = Vec::new();
    let mut usages = Vec::new();
    for (index, result) in results.into_iter().enumerate() {
        let w = match result {
            Ok(w) => w,
            Err(e) => return e.into_response(),
        };
        usages.push(w.usage);
        let mut scores = Scores {
            api: shape.api,
            tokenizer: state.model.tokenizer.clone(),
            offset: 0,
        };
        let mut entries: Vec<(u32, Option<&Logprob>)> = Vec::new();
        let mut text = w.text;
        if let Some((prompt, first)) = &shape.echo {
            text.insert_str(0, prompt);
            entries.push((*first, None));
            entries.extend(w.prompt.iter().map(|l| (l.token, Some(l))));
        }
        entries.extend(w.tokens.iter().map(|(id, l)| (*id, Some(l))));
        let logprobs = if shape.logprobs {
            scores.render(&entries)
        } else {
            Value::Null
        };
        choices.push(match shape.api {
            Api::Completion => json!({
                "index": index, "text": text, "logprobs": logprobs,
                "finish_reason": w.reason.as_str()
            }),
            Api::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": w.reason.as_str()
            }),
        });
    }
    Json(json!({
        "id": new_id(shape.api),
        "object": object(shape.api, false),
        "created": created(),
        "model": &*state.model_name,
        "choices": choices,
        "usage": Usage::of_choices(&usages),
    }))
    .into_response()
}

/// The streamed answer's state: the envelope its chunks share, each choice's scores,
/// and the usage of the choices that have finished.
struct Chunks {
    shape: Shape,
    id: String,
    created: u64,
    model: String,
    scores: Vec<Scores>,
    usages: Vec<Option<Usage>>,
    include_usage: bool,
}

impl Chunks {
    fn choice(
        &self,
        index: usize,
        text: Option<&str>,
        logprobs: Value,
        finish: Option<&str>,
    ) -> Value {
        match self.shape.api {
            Api::Completion => json!({
                "index": index, "text": text.unwrap_or(""), "logprobs": logprobs,
                "finish_reason": finish
            }),
            Api::Chat => {
                let mut delta = Map::new();
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    fn event(&self, choices: Vec<Value>, usage: Option<Usage>) -> Event {
        let mut chunk = json!({
            "id": self.id, "object": object(self.shape.api, true), "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = json!(usage);
        }
        Event::default().data(chunk.to_string())
    }

    /// A chunk of choice `index`'s text, with its tokens' scores when asked for.
    fn text(&mut self, index: usize, text: &str, entries: &[(u32, Option<&Logprob>)]) -> Event {
        let scores = if self.shape.logprobs {
            self.scores[index].render(entries)
        } else {
            Value::Null
        };
        let c = self.choice(index, Some(text), scores, None);
        self.event(vec![c], None)
    }

    /// The events one piece of choice `index` becomes; `true` once the stream ends.
    fn on(&mut self, index: usize, piece: Piece) -> (Vec<Event>, bool) {
        match piece {
            Piece::Prompt(values) => {
                // Completions only (`echo`): the prompt's text and scores come first.
                let Some((text, first)) = self.shape.echo.clone() else {
                    return (vec![], false);
                };
                let mut entries = vec![(first, None)];
                entries.extend(values.iter().map(|l| (l.token, Some(l))));
                (vec![self.text(index, &text, &entries)], false)
            }
            Piece::Text(text, values) => {
                let entries: Vec<(u32, Option<&Logprob>)> =
                    values.iter().map(|l| (l.token, Some(l))).collect();
                (vec![self.text(index, &text, &entries)], false)
            }
            Piece::Finished { reason, usage } => {
                let text = (self.shape.api == Api::Completion).then_some("");
                let c = self.choice(index, text, Value::Null, Some(reason.as_str()));
                let mut out = vec![self.event(vec![c], None)];
                if let Some(u) = self.usages.get_mut(index) {
                    *u = Some(usage);
                }
                if self.usages.iter().all(Option::is_some) {
                    if self.include_usage {
                        let all: Vec<Usage> = self.usages.iter().flatten().copied().collect();
                        out.push(self.event(vec![], Usage::of_choices(&all)));
                    }
                    out.push(Event::default().data("[DONE]"));
                    return (out, true);
                }
                (out, false)
            }
            Piece::Failed(e) => (
                vec![Event::default().data(json!(e.body()).to_string())],
                true,
            ),
        }
    }
}

pub fn stream(
    state: Arc<AppState>,
    shape: Shape,
    generations: Vec<Generation>,
    params: &Validated,
) -> Response {
    let n = generations.len();
    let scores = (0..n)
        .map(|_| Scores {
            api: shape.api,
            tokenizer: state.model.tokenizer.clone(),
            offset: 0,
        })
        .collect();
    let chunks = Chunks {
        id: new_id(shape.api),
        created: created(),
        model: state.model_name.to_string(),
        scores,
        usages: vec![None; n],
        include_usage: params.include_usage,
        shape,
    };
    // The chat API opens each choice with the assistant role.
    let opening: Vec<Event> = if chunks.shape.api == Api::Chat {
        (0..n)
            .map(|i| {
                let mut c = chunks.choice(i, Some(""), Value::Null, None);
                c["delta"]["role"] = json!("assistant");
                chunks.event(vec![c], None)
            })
            .collect()
    } else {
        vec![]
    };
    let pieces = stream::select_all(generations.into_iter().enumerate().map(|(i, g)| {
        stream::unfold(g, move |mut g| async move {
            g.next().await.map(|p| ((i, p), g))
        })
        .boxed()
    }));
    let body = stream::unfold(
        (pieces, chunks, false),
        |(mut pieces, mut chunks, ended)| async move {
            if ended {
                return None;
            }
            let (i, piece) = pieces.next().await?;
            let (events, end) = chunks.on(i, piece);
            Some((
                stream::iter(events.into_iter().map(Ok::<_, Infallible>)),
                (pieces, chunks, end),
            ))
        },
    )
    .flatten();
    let events = stream::iter(opening.into_iter().map(Ok)).chain(body);
    Sse::new(events).into_response()
}

/// The `echo` of a prompt: its text as the client sent it, or its tokens decoded.
pub fn echo_of(text: Option<&str>, tokenizer: &Tokenizer, prompt: &[u32]) -> Option<(String, u32)> {
    let first = *prompt.first()?;
    let text = match text {
        Some(t) => t.to_string(),
        None => tokenizer.decode(prompt, false).ok()?,
    };
    Some((text, first))
}
