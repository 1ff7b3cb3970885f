//! The OpenAI wire types of completions and chat completions, as clients send them,
//! and reading them out of a body: a field of the wrong type is named in the error.
//! Unknown fields are ignored, as OpenAI does. What each field may hold is
//! `validation.rs`'s.

use serde::Deserialize;

use super::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    /// OpenAI's structured outputs: `{"type": "text" | "json_object" | "json_schema"}`.
    pub response_format: Option<ResponseFormat>,
    /// vLLM's extras: a JSON schema (an object, or its JSON text), a regular
    /// expression, or a list of choices the whole output must be.
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    /// OpenAI's: token id (as a string) to a bias from -100 to 100.
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// vLLM's extras.
    pub repetition_penalty: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    /// vLLM's: a request reuses only cached prefixes computed under the same salt.
    pub cache_salt: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

/// The completions-only fields; the shared ones are read from the same body into
/// [`CommonParams`] (not flattened: serde's flatten loses the path of a bad field).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// 0 to 5: each token's log-probability, with this many alternatives.
    pub logprobs: Option<i64>,
    /// The prompt comes back before the completion, with its log-probabilities.
    pub echo: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<WireMessage>,
    pub logprobs: Option<bool>,
    /// 0 to 20 alternatives per token; needs `logprobs: true`.
    pub top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant turn's calls (`tools.rs` decides what they need).
    pub tool_calls: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// Parses a request body that must be one JSON object.
pub fn parse_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("The request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "The request body must be a JSON object.",
            None,
        ));
    }
    Ok(value)
}

/// Reads `T` out of a parsed body; the error names the field at fault.
pub fn fields<T: serde::de::DeserializeOwned>(body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid(format!("Invalid request: {inner}"), None)
        } else {
            ApiError::invalid(format!("Invalid value for `{path}`: {inner}"), Some(&path))
        }
    })
}
