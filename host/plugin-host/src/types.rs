//! The host's own types for what crosses into a plugin and back: the HTTP layer and the
//! engine use these whatever `lynx:plugin` version a plugin implements. Each version's
//! bindings module (`since_vX_Y`) converts them to and from its generated types, which
//! stay inside this crate.

/// One chat message, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The prompt as the client gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

/// What a tokenization policy is asked to decide.
#[derive(Debug, Clone)]
pub struct PolicyRequest {
    pub prompt: Prompt,
    /// The model's context length, in tokens.
    pub context_length: u32,
    /// The completion tokens the client asked for.
    pub max_tokens: Option<u32>,
}

/// A request the policy refuses: the client's 400, with this `code`.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub code: String,
    pub message: String,
}

/// The settings of one generation's post-processing.
#[derive(Debug, Clone, Default)]
pub struct PostConfig {
    pub stops: Vec<String>,
}

/// What post-processing released after one generated token.
#[derive(Debug, Clone)]
pub struct Released {
    pub text: String,
    pub stop: bool,
}

/// The severity of a plugin's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// What plugins (from 0.2.0) are told of the served model.
#[derive(Debug, Clone, Default)]
pub struct ModelInfo {
    pub architecture: String,
    /// `--chat-template`, else the GGUF's `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// What a request's output must be (from 0.3.0): `response_format` and vLLM's
/// `guided_*` extras, as the HTTP layer parsed them.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    JsonObject,
    JsonSchema {
        name: String,
        /// The schema as JSON text.
        schema: String,
        strict: bool,
    },
    Regex(String),
    Choice(Vec<String>),
}

/// The model's vocabulary as plugins receive it (from 0.3.0): every token's bytes end
/// to end, where each ends, the control tokens, and the end-of-turn tokens.
#[derive(Debug, Clone, Default)]
pub struct Vocabulary {
    pub bytes: Vec<u8>,
    pub ends: Vec<u32>,
    pub special: Vec<u32>,
    pub end_tokens: Vec<u32>,
}

impl Vocabulary {
    /// Built once per runtime from the tokenizer.
    pub fn of(tokenizer: &lynx_engine::tokenizer::Tokenizer) -> Self {
        let mut v = Vocabulary::default();
        for id in 0..tokenizer.vocab_size() as u32 {
            v.bytes
                .extend_from_slice(tokenizer.piece(id).unwrap_or_default());
            v.ends
                .push(u32::try_from(v.bytes.len()).unwrap_or(u32::MAX));
            if tokenizer.is_special(id) {
                v.special.push(id);
            }
        }
        v.end_tokens = tokenizer.end_ids().to_vec();
        v
    }
}
