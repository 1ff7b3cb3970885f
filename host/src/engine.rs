//! The inference engine: the model and its tokenizer, the batched llama forward pass
//! and its slot KV cache, and the scheduler task that owns the slots and the queue.
//! Prompt building and text post-processing are the plugins' (see `crate::plugins`).

pub mod batcher;
pub mod kv_cache;
pub mod llama;
pub mod model;
pub mod qmatmul;
mod sequence;
pub mod tokenizer;

pub use batcher::{Batcher, BatcherConfig, FinishReason, GenEvent, GenerateRequest, Sampling};
pub use model::Model;

/// Errors of the engine layer; the HTTP layer maps each to one status and OpenAI type.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the request queue is full ({0} waiting)")]
    Overloaded(usize),
    #[error("the scheduler has stopped")]
    Stopped,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("model: {0}")]
    Model(String),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(e.to_string())
    }
}
