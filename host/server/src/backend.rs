//! The seam between the HTTP layer and what generates: the [`Backend`] trait the
//! handlers call, and [`Engine`], the real one (the model's tokenizer and the
//! scheduler). The handlers never see a model or a KV cache, so a test can serve the
//! whole HTTP layer from a scripted backend that emits generation events.

use std::sync::Arc;

use lynx_engine::scheduler::SchedulerStats;
use lynx_engine::tokenizer::Tokenizer;
use lynx_engine::{EngineError, GenerateRequest, Model, Scheduler, SchedulerConfig};

/// What serving needs from the engine.
pub trait Backend: Send + Sync + 'static {
    /// The served model's tokenizer (the plugins encode with it too).
    fn tokenizer(&self) -> &Arc<Tokenizer>;
    /// Queues a request's choices together: all of them, or none
    /// ([`EngineError::Overloaded`], [`EngineError::ShuttingDown`], ...). Each request's
    /// events arrive on its own channel; dropping the receiver cancels it.
    fn submit_all(&self, requests: Vec<GenerateRequest>) -> Result<(), EngineError>;
    /// Slots, queue and context length.
    fn config(&self) -> SchedulerConfig;
    /// Live figures, for `/health`, `/metrics` and the admin API.
    fn stats(&self) -> &SchedulerStats;
    /// Ends every request held and refuses new ones (the end of a shutdown's grace).
    fn cancel_all(&self);
    /// Whether generation still runs (`/health` says `scheduler_stopped` otherwise).
    fn is_running(&self) -> bool;
}

/// The real backend: the model and the scheduler running it.
pub struct Engine {
    pub model: Arc<Model>,
    pub scheduler: Scheduler,
}

impl Backend for Engine {
    fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.model.tokenizer
    }

    fn submit_all(&self, requests: Vec<GenerateRequest>) -> Result<(), EngineError> {
        self.scheduler.submit_all(requests)
    }

    fn config(&self) -> SchedulerConfig {
        self.scheduler.config()
    }

    fn stats(&self) -> &SchedulerStats {
        self.scheduler.stats()
    }

    fn cancel_all(&self) {
        self.scheduler.cancel_all()
    }

    fn is_running(&self) -> bool {
        self.scheduler.is_running()
    }
}
