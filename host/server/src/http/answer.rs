//! A generation's answer as the OpenAI API shapes it: one JSON body, or server-sent
//! events ending in `[DONE]`; every choice of `n` with its own index; log-probabilities
//! in each route's own shape (completions' `tokens`/`token_logprobs`/`top_logprobs`/
//! `text_offset`, chat's `content[]`), streamed with the text they belong to.
//! A stream is generated whether or not its client reads ([`stream`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::join_all;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::generate::{Generation, Piece};
use super::responses::{Answer, Choice, Delta, Message, Usage};
use super::validation::Validated;
use super::AppState;
use lynx_engine::logprobs::Logprob;
use lynx_engine::tokenizer::Tokenizer;
use lynx_engine::{EngineError, FinishReason};

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
    let mut wholes = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(w) => wholes.push(w),
            Err(e) => return e.into_response(),
        }
    }
    // Only the first choice scored the prompt; every choice echoes its scores.
    let prompt_scores = wholes.first().map(|w| w.prompt.clone()).unwrap_or_default();
    for (index, w) in wholes.into_iter().enumerate() {
        usages.push(w.usage);
        let mut scores = Scores {
            api: shape.api,
            tokenizer: state.backend.tokenizer().clone(),
            offset: 0,
        };
        let mut entries: Vec<(u32, Option<&Logprob>)> = Vec::new();
        let mut text = w.text;
        if let Some((prompt, first)) = &shape.echo {
            text.insert_str(0, prompt);
            entries.push((*first, None));
            entries.extend(prompt_scores.iter().map(|l| (l.token, Some(l))));
        }
        entries.extend(w.tokens.iter().map(|(id, l)| (*id, Some(l))));
        let logprobs = if shape.logprobs {
            scores.render(&entries)
        } else {
            Value::Null
        };
        let finish_reason = Some(w.reason.as_str());
        choices.push(match shape.api {
            Api::Completion => Choice::Text {
                index,
                text,
                logprobs,
                finish_reason,
            },
            Api::Chat => Choice::Message {
                index,
                message: Message {
                    role: "assistant",
                    content: text,
                },
                logprobs,
                finish_reason,
            },
        });
    }
    Json(Answer {
        id: &new_id(shape.api),
        object: object(shape.api, false),
        created: created(),
        model: &state.model_name,
        choices,
        usage: Some(Usage::of_choices(&usages)),
    })
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
        finish_reason: Option<&'static str>,
    ) -> Choice {
        match self.shape.api {
            Api::Completion => Choice::Text {
                index,
                text: text.unwrap_or("").to_string(),
                logprobs,
                finish_reason,
            },
            Api::Chat => Choice::Delta {
                index,
                delta: Delta {
                    role: None,
                    content: text.map(str::to_string),
                },
                logprobs,
                finish_reason,
            },
        }
    }

    fn event(&self, choices: Vec<Choice>, usage: Option<Usage>) -> String {
        let chunk = Answer {
            id: &self.id,
            object: object(self.shape.api, true),
            created: self.created,
            model: &self.model,
            choices,
            usage: usage.map(Some),
        };
        // Plain structs with string keys: serializing them cannot fail.
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    /// A chunk of choice `index`'s text, with its tokens' scores when asked for.
    fn text(&mut self, index: usize, text: &str, entries: &[(u32, Option<&Logprob>)]) -> String {
        let scores = if self.shape.logprobs {
            self.scores[index].render(entries)
        } else {
            Value::Null
        };
        let c = self.choice(index, Some(text), scores, None);
        self.event(vec![c], None)
    }

    /// The events one piece of choice `index` becomes; `true` once the stream ends.
    fn on(&mut self, index: usize, piece: Piece) -> (Vec<String>, bool) {
        match piece {
            Piece::Prompt(values) => {
                // Completions only (`echo`): the prompt's text and scores come first,
                // for every choice, from the first choice's prefill (the others copy
                // its prefix and start after it).
                let Some((text, first)) = self.shape.echo.clone() else {
                    return (vec![], false);
                };
                let mut entries = vec![(first, None)];
                entries.extend(values.iter().map(|l| (l.token, Some(l))));
                let choices = if index == 0 {
                    0..self.scores.len()
                } else {
                    index..index + 1
                };
                let events = choices.map(|i| self.text(i, &text, &entries)).collect();
                (events, false)
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
                    out.push("[DONE]".to_string());
                    return (out, true);
                }
                (out, false)
            }
            Piece::Failed(e) => (vec![json!(e.body()).to_string()], true),
        }
    }
}

/// A streamed answer's bytes on their way to the client, and the budget they hold.
type Buffered = (Bytes, OwnedSemaphorePermit);

/// What a streamed answer holds beyond its generations: the most bytes buffered for
/// its client, and the connection's plugin-instance permits, held until generation ends.
pub struct Delivery {
    pub buffer_bytes: usize,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Streams the answer. Generation is not driven by the client's reading: a task of
/// its own pulls every choice's tokens through post-processing as the scheduler makes
/// them, into a buffer of at most `buffer_bytes`, so plugin instances and the slot are
/// held only while tokens are being made, and generation pauses while the buffer is
/// full. A client that stops taking its bytes is cut by its connection at the write
/// timeout ([`super::conn`]): the body is dropped, the task sees it and drops the
/// generations (the scheduler frees their slots before the next token) and their
/// instances, and the request is counted with the status it was sent.
pub fn stream(
    state: Arc<AppState>,
    shape: Shape,
    generations: Vec<Generation>,
    params: &Validated,
    delivery: Delivery,
) -> Response {
    let n = generations.len();
    let scores = (0..n)
        .map(|_| Scores {
            api: shape.api,
            tokenizer: state.backend.tokenizer().clone(),
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
    let budget = Arc::new(Semaphore::new(delivery.buffer_bytes));
    let (tx, rx) = mpsc::unbounded_channel::<Buffered>();
    tokio::spawn(drive(chunks, generations, tx, budget, delivery));
    let body = stream::unfold(rx, |mut rx| async move {
        // The budget a chunk held is given back once it is handed to the connection.
        let (bytes, _permit) = rx.recv().await?;
        Some((Ok::<_, Infallible>(bytes), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| ApiError::Internal("building a stream".into()).into_response())
}

/// One server-sent event holding `data`.
fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// Pulls the generations to their end into the buffer (see [`stream`]).
async fn drive(
    mut chunks: Chunks,
    generations: Vec<Generation>,
    tx: mpsc::UnboundedSender<Buffered>,
    budget: Arc<Semaphore>,
    delivery: Delivery,
) {
    let Delivery {
        buffer_bytes,
        permit,
    } = delivery;
    let n = generations.len();
    // The chat API opens each choice with the assistant role.
    let mut opening = Vec::new();
    if chunks.shape.api == Api::Chat {
        for i in 0..n {
            let opens = Choice::Delta {
                index: i,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: Value::Null,
                finish_reason: None,
            };
            opening.push(chunks.event(vec![opens], None));
        }
    }
    let mut pieces = stream::select_all(generations.into_iter().enumerate().map(|(i, g)| {
        stream::unfold(g, move |mut g| async move {
            g.next().await.map(|p| ((i, p), g))
        })
        .boxed()
    }));
    let mut pending: std::collections::VecDeque<String> = opening.into();
    let mut ended = false;
    loop {
        while let Some(data) = pending.pop_front() {
            let bytes = sse(&data);
            // A chunk larger than the whole buffer waits for all of it.
            let want = u32::try_from(bytes.len().min(buffer_bytes).max(1)).unwrap_or(u32::MAX);
            // A client that leaves, or is cut, while its buffer is full frees
            // everything at once.
            let permit = tokio::select! {
                room = budget.clone().acquire_many_owned(want) => match room {
                    Ok(p) => p,
                    Err(_) => return,
                },
                () = tx.closed() => return,
            };
            if tx.send((bytes, permit)).is_err() {
                // The client is gone: dropping the generations frees their slots.
                return;
            }
        }
        if ended {
            break;
        }
        let next = tokio::select! {
            next = pieces.next() => next,
            () = tx.closed() => return,
        };
        let Some((i, piece)) = next else { break };
        let (events, end) = chunks.on(i, piece);
        pending.extend(events);
        ended = end;
    }
    // Everything is buffered: the instances go back now, whatever the client does.
    drop(pieces);
    drop(permit);
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
