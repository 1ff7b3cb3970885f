//! What lynx answers with, typed: completions and chat answers and their stream chunks,
//! usage, the model objects and `/health`.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    /// A request's usage from its choices' own: the prompt counted once (with the
    /// first choice's cached tokens), the completions summed.
    pub fn of_choices(choices: &[Usage]) -> Option<Usage> {
        let first = choices.first()?;
        let completion_tokens = choices.iter().map(|u| u.completion_tokens).sum();
        Some(Usage {
            completion_tokens,
            total_tokens: first.prompt_tokens + completion_tokens,
            ..*first
        })
    }
}

/// A whole answer, or one chunk of a stream: the envelope every choice shares.
#[derive(Debug, Serialize)]
pub struct Answer<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<Choice>,
    /// A whole answer always says its usage (`null` when none); a chunk only when it is
    /// the stream's usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice of an answer or a chunk, in its route's shape.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Choice {
    /// Completions, whole or streamed.
    Text {
        index: usize,
        text: String,
        logprobs: serde_json::Value,
        finish_reason: Option<&'static str>,
    },
    /// A whole chat answer.
    Message {
        index: usize,
        message: Message,
        logprobs: serde_json::Value,
        finish_reason: Option<&'static str>,
    },
    /// A streamed chat chunk.
    Delta {
        index: usize,
        delta: Delta,
        logprobs: serde_json::Value,
        finish_reason: Option<&'static str>,
    },
}

#[derive(Debug, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

/// What a chat chunk adds; a finishing chunk adds nothing (`{}`).
#[derive(Debug, Serialize)]
pub struct Delta {
    /// `assistant` in each choice's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A model object (`/v1/models`).
#[derive(Debug, Serialize)]
pub struct ModelObject<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// The list `/v1/models` answers.
#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelObject<'a>>,
}

/// What `/health` says.
#[derive(Debug, Serialize)]
pub struct Health<'a> {
    pub status: &'static str,
    pub model: &'a str,
    pub kv_cache_slots_used: usize,
    pub kv_cache_slots: usize,
    pub queue_depth: usize,
    pub plugin_instances: usize,
    pub plugin_instances_max: usize,
}

/// What `/tokenize` answers (vLLM's shape).
#[derive(Debug, Serialize)]
pub struct Tokenized {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

/// What `/detokenize` answers (vLLM's shape).
#[derive(Debug, Serialize)]
pub struct Detokenized {
    pub prompt: String,
}
