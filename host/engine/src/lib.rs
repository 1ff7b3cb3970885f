//! The inference engine: the model and its tokenizer, the batched forward pass of each
//! architecture behind one seam (`arch`), the slot KV cache, and the scheduler task
//! that owns the slots and the queue.
//! Prompt building and text post-processing are the plugins' (see the plugin host, `lynx-plugin-host`).

mod activation;
pub mod arch;
pub mod constraint;
mod expf;
pub mod files;
pub mod gemma3;
pub mod generation;
pub mod kv_cache;
pub mod llama;
pub mod logprobs;
pub mod model;
pub mod planner;
pub mod prefill;
pub mod prefix;
pub mod qmatmul;
pub mod qwen2;
pub mod qwen3;
pub mod sampling;
pub mod scheduler;
mod sequence;
pub mod shaping;
pub mod tokenizer;

pub use generation::{Fault, FinishReason, GenEvent, GenerateRequest, Sampling};
pub use model::Model;
pub use scheduler::{Scheduler, SchedulerConfig};

/// How long candle's pool workers spin for the next op before they park: 1,000
/// `pause`s (tens of microseconds) instead of candle's 25,000 (about half a millisecond
/// on Zen 4). Between two candle ops of a step lynx runs its own kernels on rayon's
/// threads, and with as many pool workers as cores the spinning took those cores: an
/// eighth of a prefill's samples, and a 440-token prefill 0.66 s instead of 0.47 s.
pub const CANDLE_SPIN_LIMIT: u32 = 1_000;

/// Fixes how candle's threads behave: the thread count candle sizes its ops by (candle
/// reads `RAYON_NUM_THREADS` on every op and, without it, counts cores by reading
/// `/proc/cpuinfo` each time: a third of a decode step), and how long its pool workers
/// spin ([`CANDLE_SPIN_LIMIT`]). An operator's own setting of either variable wins.
/// Call it first thing, before any other thread exists (it sets environment variables).
pub fn configure_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var(
            "CANDLE_BARRIER_POOL_SPIN_LIMIT",
            CANDLE_SPIN_LIMIT.to_string(),
        );
    }
}

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
    /// A tensor operation failed; the candle error is kept as the source.
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    /// A request's token-level constraint failed (its plugin trapped, missed its
    /// deadline, or ruled nonsense): that request fails, the others go on.
    #[error("token constraint: {0}")]
    Constraint(constraint::ConstraintError),
}
