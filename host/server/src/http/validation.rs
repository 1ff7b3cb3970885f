//! What a request's fields may hold, and the request they validate into
//! ([`Validated`]): ranges, caps, one output format, the served model's name, and the
//! token ids a request names. Every refusal is a 400 naming the parameter.

use super::error::ApiError;
use super::requests::{ChatRequest, CommonParams, CompletionRequest, Content, Stop};
use super::Limits;
use lynx_engine::shaping::Shaping;
use lynx_engine::tokenizer::Tokenizer;
use lynx_plugin_host::types::{ChatMessage, OutputFormat};

/// What a route asks of log-probabilities, read from its own fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scoring {
    /// Each generated token's log-probability, with this many alternatives.
    pub logprobs: Option<usize>,
    /// The prompt's too (completions' `echo`).
    pub echo: bool,
}

/// The most alternatives per token: OpenAI's limits for each route.
pub const MAX_COMPLETION_LOGPROBS: i64 = 5;
pub const MAX_TOP_LOGPROBS: i64 = 20;

impl CompletionRequest {
    pub fn scoring(&self) -> Result<Scoring, ApiError> {
        let logprobs = match self.logprobs {
            None => None,
            Some(k) if (0..=MAX_COMPLETION_LOGPROBS).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::invalid(
                    format!(
                        "`logprobs` must be between 0 and {MAX_COMPLETION_LOGPROBS} (got {k})."
                    ),
                    Some("logprobs"),
                ))
            }
        };
        Ok(Scoring {
            logprobs,
            echo: self.echo.unwrap_or(false),
        })
    }
}

impl ChatRequest {
    pub fn scoring(&self) -> Result<Scoring, ApiError> {
        let top = match self.top_logprobs {
            None => 0,
            Some(_) if self.logprobs != Some(true) => {
                return Err(ApiError::invalid(
                    "`top_logprobs` needs `logprobs` to be true.",
                    Some("top_logprobs"),
                ))
            }
            Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS} (got {k})."),
                    Some("top_logprobs"),
                ))
            }
        };
        Ok(Scoring {
            logprobs: (self.logprobs == Some(true)).then_some(top),
            echo: false,
        })
    }
}

/// What a validated request asks of generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// `None`: as many as the context allows.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// What the output must be, and the field that asked for it.
    pub format: Option<(OutputFormat, &'static str)>,
    /// Penalties, bias, top-k, min-p, end-token rules.
    pub shaping: Shaping,
    /// Choices to generate from the one prompt.
    pub n: usize,
    pub scoring: Scoring,
    /// The prefix-cache space the request's choices share (`cache_salt`), if any.
    pub cache_salt: Option<String>,
}

/// The longest `cache_salt`, in bytes.
pub const MAX_CACHE_SALT_BYTES: usize = 1024;

/// The most choices (`n`) one request may ask for.
pub const MAX_N: i64 = 16;

/// The most stop sequences a request may give (as OpenAI).
pub const MAX_STOPS: usize = 4;
/// The longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// The most choices `guided_choice` may give, and the longest one, in bytes.
pub const MAX_CHOICES: usize = 1024;
pub const MAX_CHOICE_BYTES: usize = 4096;

impl CommonParams {
    /// The one output format the request asks for, if any; asking for two is refused.
    fn format(&self) -> Result<Option<(OutputFormat, &'static str)>, ApiError> {
        let mut asked: Vec<(OutputFormat, &'static str)> = Vec::new();
        if let Some(rf) = &self.response_format {
            match rf.kind.as_str() {
                "text" => {}
                "json_object" => asked.push((OutputFormat::JsonObject, "response_format")),
                "json_schema" => {
                    let param = "response_format.json_schema";
                    let js = rf.json_schema.as_ref().ok_or_else(|| {
                        ApiError::invalid(
                            "`response_format.json_schema` is required when its type is `json_schema`.",
                            Some(param),
                        )
                    })?;
                    let schema = js.schema.as_ref().ok_or_else(|| {
                        ApiError::invalid(
                            "`response_format.json_schema.schema` is required.",
                            Some("response_format.json_schema.schema"),
                        )
                    })?;
                    asked.push((
                        OutputFormat::JsonSchema {
                            name: js.name.clone().unwrap_or_else(|| "schema".into()),
                            schema: schema_text(schema, "response_format.json_schema.schema")?,
                            strict: js.strict.unwrap_or(false),
                        },
                        param,
                    ));
                }
                other => {
                    return Err(ApiError::invalid(
                        format!("`response_format.type` must be text, json_object or json_schema (got {other:?})."),
                        Some("response_format.type"),
                    ))
                }
            }
        }
        if let Some(schema) = &self.guided_json {
            let schema = match schema {
                serde_json::Value::String(text) => {
                    let parsed: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                        ApiError::invalid(
                            format!("`guided_json` is not valid JSON: {e}"),
                            Some("guided_json"),
                        )
                    })?;
                    schema_text(&parsed, "guided_json")?
                }
                other => schema_text(other, "guided_json")?,
            };
            asked.push((
                OutputFormat::JsonSchema {
                    name: "guided_json".into(),
                    schema,
                    strict: true,
                },
                "guided_json",
            ));
        }
        if let Some(regex) = &self.guided_regex {
            if regex.is_empty() {
                return Err(ApiError::invalid(
                    "`guided_regex` must not be empty.",
                    Some("guided_regex"),
                ));
            }
            asked.push((OutputFormat::Regex(regex.clone()), "guided_regex"));
        }
        if let Some(choices) = &self.guided_choice {
            if choices.is_empty()
                || choices.len() > MAX_CHOICES
                || choices
                    .iter()
                    .any(|c| c.is_empty() || c.len() > MAX_CHOICE_BYTES)
            {
                return Err(ApiError::invalid(
                    format!("`guided_choice` must hold 1 to {MAX_CHOICES} non-empty strings of at most {MAX_CHOICE_BYTES} bytes."),
                    Some("guided_choice"),
                ));
            }
            asked.push((OutputFormat::Choice(choices.clone()), "guided_choice"));
        }
        if asked.len() > 1 {
            let fields: Vec<&str> = asked.iter().map(|(_, p)| *p).collect();
            return Err(ApiError::invalid(
                format!(
                    "Only one output format may be asked for (got {}).",
                    fields.join(", ")
                ),
                Some(fields[1]),
            ));
        }
        Ok(asked.pop())
    }
}

/// A request naming a model other than the one served is a 404.
pub fn check_model(asked: Option<&str>, served: &str) -> Result<(), ApiError> {
    match asked {
        Some(m) if m != served => Err(ApiError::ModelNotFound(m.to_string())),
        _ => Ok(()),
    }
}

/// The most entries `logit_bias` may hold.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// `value` unless it is outside `range`: then a 400 naming `param`.
fn within(
    value: Option<f64>,
    range: std::ops::RangeInclusive<f64>,
    param: &str,
) -> Result<Option<f64>, ApiError> {
    match value {
        Some(v) if !range.contains(&v) => Err(ApiError::invalid(
            format!(
                "`{param}` must be between {} and {} (got {v}).",
                range.start(),
                range.end()
            ),
            Some(param),
        )),
        v => Ok(v),
    }
}

impl CommonParams {
    /// The request's changes to its logits; a value out of range is a 400 naming it.
    fn shaping(&self, max_tokens: Option<usize>) -> Result<Shaping, ApiError> {
        let mut s = Shaping::none();
        if let Some(bias) = &self.logit_bias {
            if bias.len() > MAX_LOGIT_BIAS {
                return Err(ApiError::invalid(
                    format!(
                        "`logit_bias` may hold at most {MAX_LOGIT_BIAS} tokens (got {}).",
                        bias.len()
                    ),
                    Some("logit_bias"),
                ));
            }
            for (token, &b) in bias {
                let id: u32 = token.parse().map_err(|_| {
                    ApiError::invalid(
                        format!("`logit_bias` keys must be token ids (got {token:?})."),
                        Some("logit_bias"),
                    )
                })?;
                within(Some(b), -100.0..=100.0, "logit_bias")?;
                s.logit_bias.push((id, b as f32));
            }
        }
        if let Some(p) = within(self.presence_penalty, -2.0..=2.0, "presence_penalty")? {
            s.presence_penalty = p as f32;
        }
        if let Some(p) = within(self.frequency_penalty, -2.0..=2.0, "frequency_penalty")? {
            s.frequency_penalty = p as f32;
        }
        if let Some(p) = within(self.repetition_penalty, 0.01..=10.0, "repetition_penalty")? {
            s.repetition_penalty = p as f32;
        }
        if let Some(p) = within(self.min_p, 0.0..=1.0, "min_p")? {
            s.min_p = p as f32;
        }
        match self.top_k {
            None | Some(-1) | Some(0) => {}
            Some(k) if k > 0 => s.top_k = usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("`top_k` must be -1 (all tokens) or at least 1 (got {k})."),
                    Some("top_k"),
                ))
            }
        }
        s.ignore_eos = self.ignore_eos.unwrap_or(false);
        if let Some(m) = self.min_tokens {
            let fits = m >= 0 && max_tokens.is_none_or(|max| m as usize <= max);
            if !fits {
                return Err(ApiError::invalid(
                    format!("`min_tokens` must be between 0 and `max_tokens` (got {m})."),
                    Some("min_tokens"),
                ));
            }
            s.min_tokens = m as usize;
        }
        Ok(s)
    }
}

/// A schema as the JSON text a plugin receives: an object, or `true`/`false`.
fn schema_text(schema: &serde_json::Value, param: &str) -> Result<String, ApiError> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(ApiError::invalid(
            format!("`{param}` must be a JSON schema: an object."),
            Some(param),
        ));
    }
    Ok(schema.to_string())
}

impl CommonParams {
    pub fn validate(
        &self,
        served_model: &str,
        limits: &Limits,
        scoring: Scoring,
    ) -> Result<Validated, ApiError> {
        check_model(self.model.as_deref(), served_model)?;
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid(
                format!("`n` must be between 1 and {MAX_N} (got {n})."),
                Some("n"),
            ));
        }
        let (max_tokens, param) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, m) => (m, "max_tokens"),
        };
        let max_tokens = match max_tokens {
            // With `echo`, the prompt's log-probabilities alone are an answer.
            Some(0) if scoring.echo => Some(0),
            Some(m) if m <= 0 => {
                return Err(ApiError::invalid(
                    format!("`{param}` must be at least 1 (got {m})."),
                    Some(param),
                ))
            }
            Some(m) if m > limits.max_tokens as i64 => {
                return Err(ApiError::InvalidRequest {
                    message: format!(
                        "`{param}` may be at most {} on this server (got {m}).",
                        limits.max_tokens
                    ),
                    param: Some(param.into()),
                    code: Some("max_tokens_exceeded".into()),
                })
            }
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("`temperature` must be between 0 and 2 (got {temperature})."),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("`top_p` must be greater than 0 and at most 1 (got {top_p})."),
                Some("top_p"),
            ));
        }
        let stops = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                format!(
                    "`stop` may hold at most {MAX_STOPS} sequences (got {}).",
                    stops.len()
                ),
                Some("stop"),
            ));
        }
        if let Some((i, s)) = stops
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > MAX_STOP_BYTES)
        {
            return Err(ApiError::invalid(
                format!(
                    "`stop[{i}]` may be at most {MAX_STOP_BYTES} bytes long (got {}).",
                    s.len()
                ),
                Some("stop"),
            ));
        }
        let format = self.format()?;
        let shaping = self.shaping(max_tokens)?;
        if let Some(salt) = &self.cache_salt {
            if salt.is_empty() || salt.len() > MAX_CACHE_SALT_BYTES {
                return Err(ApiError::invalid(
                    format!("`cache_salt` must be 1 to {MAX_CACHE_SALT_BYTES} bytes long."),
                    Some("cache_salt"),
                ));
            }
        }
        Ok(Validated {
            cache_salt: self.cache_salt.clone(),
            format,
            shaping,
            n: n as usize,
            scoring,
            max_tokens,
            temperature,
            top_p,
            seed: self.seed,
            stops,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

impl ChatRequest {
    /// The conversation, at most `max` messages (`--max-chat-messages`).
    pub fn chat_messages(&self, max: usize) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "`messages` must not be empty.",
                Some("messages"),
            ));
        }
        if self.messages.len() > max {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "`messages` may hold at most {max} messages on this server (got {}).",
                    self.messages.len()
                ),
                param: Some("messages".into()),
                code: Some("too_many_messages".into()),
            });
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                    return Err(ApiError::invalid(
                        format!(
                            "`messages[{i}].role` must be system, user or assistant (got {:?}).",
                            m.role
                        ),
                        Some(&format!("messages[{i}].role")),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        format!("`messages[{i}].content[{j}]`: only text parts are supported."),
                                        Some(&format!("messages[{i}].content[{j}]")),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                Ok(ChatMessage { role: m.role.clone(), content })
            })
            .collect()
    }
}

/// The token ids a request names in `param` (`prompt`, `tokens`, `logit_bias`): 400
/// for the first outside the vocabulary.
pub fn known_tokens(
    tokenizer: &Tokenizer,
    ids: impl IntoIterator<Item = u32>,
    param: &'static str,
) -> Result<(), ApiError> {
    match tokenizer.first_unknown(ids) {
        None => Ok(()),
        Some(bad) => Err(ApiError::invalid(
            format!(
                "`{param}` holds token id {bad}, outside the vocabulary of {}.",
                tokenizer.vocab_size()
            ),
            Some(param),
        )),
    }
}

#[cfg(test)]
#[path = "validation_tests.rs"]
mod tests;
