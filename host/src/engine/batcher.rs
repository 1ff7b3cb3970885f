//! The scheduler: a task on its own thread that owns the KV slots and the waiting queue,
//! reached only through a channel. Each step it admits waiting requests into free slots
//! (prefill) and advances every running sequence by one token.
//!
//! Today a step runs one forward pass per running sequence; batching them into one pass
//! is the batcher issue's work and changes nothing behind this interface.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use tokio::sync::mpsc;

use super::{EngineError, Model};

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    pub kv_slots: usize,
    pub max_queue: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Dropping the receiver cancels the generation: its slot is freed before the next
    /// token is computed.
    pub events: mpsc::UnboundedSender<GenEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn (EOS or an end-of-turn token), or a stop sequence matched.
    Stop,
    /// `max_tokens` or the context limit was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug)]
pub enum GenEvent {
    Token(u32),
    Finished(FinishReason),
    Failed(String),
}

/// Live scheduler figures, read at scrape time.
#[derive(Debug, Default)]
pub struct BatcherStats {
    queued: AtomicUsize,
    slots_used: AtomicUsize,
}

impl BatcherStats {
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
    pub fn slots_used(&self) -> usize {
        self.slots_used.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<GenerateRequest>,
    stats: Arc<BatcherStats>,
    config: BatcherConfig,
}

impl Batcher {
    pub fn start(model: Arc<Model>, config: BatcherConfig) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(BatcherStats::default());
        let scheduler = Scheduler {
            model,
            rx,
            stats: stats.clone(),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
        };
        std::thread::Builder::new()
            .name("lynx-scheduler".into())
            .spawn(move || scheduler.run())
            .map_err(|e| EngineError::Model(format!("spawning the scheduler: {e}")))?;
        Ok(Self { tx, stats, config })
    }

    /// Queues a request; refused when `max_queue` requests are already waiting.
    pub fn submit(&self, req: GenerateRequest) -> Result<(), EngineError> {
        let max = self.config.max_queue;
        self.stats
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < max).then_some(q + 1)
            })
            .map_err(EngineError::Overloaded)?;
        self.tx.send(req).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            EngineError::Stopped
        })
    }

    pub fn stats(&self) -> &BatcherStats {
        &self.stats
    }

    pub fn config(&self) -> BatcherConfig {
        self.config
    }
}

struct Sequence {
    weights: ModelWeights,
    /// Tokens already in the KV cache.
    pos: usize,
    next_input: u32,
    generated: usize,
    max_tokens: usize,
    sampler: LogitsProcessor,
    events: mpsc::UnboundedSender<GenEvent>,
    /// The sequence's last event (finished or failed), sent only once its slot is
    /// released: a client that has its answer never sees its slot still counted.
    last: Option<GenEvent>,
}

impl Sequence {
    fn close(self) {
        if let Some(event) = self.last {
            let _ = self.events.send(event);
        }
    }
}

enum Step {
    Continue,
    Done,
}

struct Scheduler {
    model: Arc<Model>,
    rx: mpsc::UnboundedReceiver<GenerateRequest>,
    stats: Arc<BatcherStats>,
    config: BatcherConfig,
    waiting: VecDeque<GenerateRequest>,
    running: Vec<Sequence>,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.blocking_recv() {
                    Some(req) => self.waiting.push_back(req),
                    None => return,
                }
            }
            while let Ok(req) = self.rx.try_recv() {
                self.waiting.push_back(req);
            }
            self.admit();
            let mut finished = Vec::new();
            for mut seq in std::mem::take(&mut self.running) {
                match self.step(&mut seq, None) {
                    Step::Continue => self.running.push(seq),
                    Step::Done => finished.push(seq),
                }
            }
            self.publish_slots();
            finished.into_iter().for_each(Sequence::close);
        }
    }

    fn publish_slots(&self) {
        self.stats
            .slots_used
            .store(self.running.len(), Ordering::Relaxed);
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.kv_slots {
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            let mut seq = Sequence {
                weights: self.model.new_sequence(),
                pos: 0,
                next_input: 0,
                generated: 0,
                max_tokens: req.max_tokens,
                sampler: sampler(req.sampling),
                events: req.events,
                last: None,
            };
            let step = self.step(&mut seq, Some(&req.prompt));
            if let Step::Continue = step {
                self.running.push(seq);
                self.publish_slots();
            } else {
                self.publish_slots();
                seq.close();
            }
        }
    }

    /// Advances one sequence by one token (prefilling `prompt` first, if given). An
    /// error or a panic fails that sequence only; the scheduler goes on.
    fn step(&self, seq: &mut Sequence, prompt: Option<&[u32]>) -> Step {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.advance(seq, prompt)));
        let message = match outcome {
            Ok(Ok(step)) => return step,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "generation failed");
                e.to_string()
            }
            Err(_) => {
                tracing::error!("generation panicked; its sequence was dropped");
                "internal error".to_string()
            }
        };
        seq.last = Some(GenEvent::Failed(message));
        Step::Done
    }

    fn advance(&self, seq: &mut Sequence, prompt: Option<&[u32]>) -> Result<Step, EngineError> {
        if seq.events.is_closed() {
            return Ok(Step::Done);
        }
        let logits = match prompt {
            Some(prompt) => {
                let logits = self.model.forward(&mut seq.weights, prompt, 0)?;
                seq.pos = prompt.len();
                logits
            }
            None => {
                let logits = self
                    .model
                    .forward(&mut seq.weights, &[seq.next_input], seq.pos)?;
                seq.pos += 1;
                logits
            }
        };
        let token = seq.sampler.sample(&logits)?;
        let finish = if self.model.tokenizer.is_end(token) {
            Some(FinishReason::Stop)
        } else {
            if seq.events.send(GenEvent::Token(token)).is_err() {
                return Ok(Step::Done);
            }
            seq.generated += 1;
            seq.next_input = token;
            (seq.generated >= seq.max_tokens || seq.pos >= self.model.context_len)
                .then_some(FinishReason::Length)
        };
        match finish {
            Some(reason) => {
                seq.last = Some(GenEvent::Finished(reason));
                Ok(Step::Done)
            }
            None => Ok(Step::Continue),
        }
    }
}

fn sampler(s: Sampling) -> LogitsProcessor {
    let sampling = if s.temperature <= 0.0 {
        CandleSampling::ArgMax
    } else if s.top_p < 1.0 {
        CandleSampling::TopP {
            p: s.top_p,
            temperature: s.temperature,
        }
    } else {
        CandleSampling::All {
            temperature: s.temperature,
        }
    };
    LogitsProcessor::from_sampling(s.seed, sampling)
}
