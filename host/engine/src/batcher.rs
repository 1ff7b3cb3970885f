//! The scheduler: a task on its own thread that owns the KV cache's slots and the
//! waiting queue, reached only through a channel (continuous batching).
//!
//! Each step it drops sequences whose client left, admits waiting requests into free
//! slots, and runs ONE batched forward pass ([`super::arch::Architecture::forward`]) holding a
//! token for every decoding sequence plus chunks of prompts being prefilled, so a long
//! prompt never stalls the streams already running. A prompt is always split into
//! [`PREFILL_CHUNK`]-token chunks from its start, whatever else runs, and each sequence
//! samples with its own RNG: its output does not depend on what else is in the batch.
//! Which prompts a step prefills is `prefill.rs`'s policy (shortest remaining first,
//! none passed over for long), so a short request is never stuck behind long prompts.
//!
//! Slots keep their keys and values after their sequence ends (automatic prefix
//! caching, `prefix.rs`): a new request starts in the slot that shares the longest
//! prefix with its prompt, or gets that prefix copied from a running one, and prefills
//! only the rest. A request's `n` choices fork the same way from the first.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use rayon::prelude::*;
use tokio::sync::mpsc;

use super::arch::{Entry, Logits};
use super::constraint::TokenConstraint;
use super::kv_cache::{KvCache, KvDtype};
use super::logprobs::{self, Logprob};
use super::prefill::{self, Pending};
use super::prefix::{Placement, PrefixCache};
use super::sequence::{advance, sampler, Sequence, Step};
use super::shaping::{Seen, Shaping};
use super::{EngineError, Model};

/// The prompt tokens of one prefill chunk.
pub const PREFILL_CHUNK: usize = 128;
/// The most prompt tokens prefilled in one step (whole chunks; the first always runs;
/// which prompts, `prefill.rs` decides).
pub const PREFILL_BUDGET: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    pub kv_slots: usize,
    pub max_queue: usize,
    /// Positions per slot: the longest prompt + completion served.
    pub max_seq_len: usize,
    /// How the KV cache stores keys and values.
    pub kv_dtype: KvDtype,
    /// Prompts reuse prefixes that earlier requests left in the slots.
    pub prefix_cache: bool,
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
    /// The request's own changes to its logits (penalties, bias, top-k, ...).
    pub shaping: Shaping,
    /// Rules each next token (structured outputs), when the request has one.
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Each generated token's log-probability, with this many alternatives.
    pub logprobs: Option<usize>,
    /// The prompt's own log-probabilities too (`echo`): such a prompt is prefilled
    /// whole, since a cached prefix has no logits.
    pub echo: bool,
    /// `(group, index)` when the request is one of `n` choices: the choices after the
    /// first start once the first has prefilled the prompt, and copy its keys and values.
    pub choice: Option<(u64, usize)>,
    /// The prefix-cache space: a request reuses only prefixes computed in its own.
    pub cache_space: u64,
    /// Testing only (`--fault-injection`).
    pub fault: Option<Fault>,
}

/// Faults a test can inject into the scheduler (`--fault-injection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Panic while sampling this request: a panic must cost only its own request.
    PanicWhileSampling,
    /// Stop the scheduler thread, as a bug past every catch would: `/health` must say.
    StopScheduler,
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
    /// The request has a slot; `cached` prompt tokens were found in the prefix cache.
    Started {
        cached: usize,
    },
    /// Log-probabilities of prompt tokens (`echo`), from the second on, a chunk at a time.
    Prompt(Vec<Logprob>),
    /// A generated token, with its log-probability when asked for.
    Token(u32, Option<Logprob>),
    Finished(FinishReason),
    Failed(EngineError),
}

/// Live scheduler figures, read at scrape time.
#[derive(Debug, Default)]
pub struct BatcherStats {
    slots_used: AtomicUsize,
    /// Requests accepted and not yet gone: waiting, in the channel, or running.
    in_system: AtomicUsize,
    /// Set at shutdown: new requests are refused, and the scheduler ends every
    /// request it holds with [`EngineError::ShuttingDown`].
    closing: AtomicBool,
    /// What the prefix cache did, for the admin API.
    prefix: PrefixStats,
}

/// The prefix cache's counters since start-up, and what each slot holds now.
#[derive(Debug, Default)]
pub struct PrefixStats {
    /// Requests started in a slot.
    pub started: AtomicUsize,
    /// Of those, the ones that reused a cached prefix.
    pub hits: AtomicUsize,
    /// Of those, the ones whose prefix was copied from another slot.
    pub copies: AtomicUsize,
    pub prompt_tokens: AtomicUsize,
    pub cached_tokens: AtomicUsize,
    /// Tokens whose keys and values each slot holds.
    pub slots: Vec<AtomicUsize>,
}

impl BatcherStats {
    /// Requests waiting for a slot: those accepted and not running.
    pub fn queue_depth(&self) -> usize {
        self.in_system
            .load(Ordering::Relaxed)
            .saturating_sub(self.slots_used())
    }
    pub fn slots_used(&self) -> usize {
        self.slots_used.load(Ordering::Relaxed)
    }
    pub fn prefix(&self) -> &PrefixStats {
        &self.prefix
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
        let stats = Arc::new(BatcherStats {
            prefix: PrefixStats {
                slots: (0..config.kv_slots).map(|_| AtomicUsize::new(0)).collect(),
                ..PrefixStats::default()
            },
            ..BatcherStats::default()
        });
        let cache = model
            .arch
            .kv_cache_as(config.kv_slots, config.max_seq_len, config.kv_dtype)?;
        let config = BatcherConfig {
            max_seq_len: cache.capacity,
            ..config
        };
        let scheduler = Scheduler {
            model,
            cache,
            rx,
            stats: stats.clone(),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            free: (0..config.kv_slots).rev().collect(),
            prefix: PrefixCache::new(config.kv_slots, config.kv_dtype),
        };
        std::thread::Builder::new()
            .name("lynx-scheduler".into())
            .spawn(move || scheduler.run())
            .map_err(|e| EngineError::Model(format!("spawning the scheduler: {e}")))?;
        Ok(Self { tx, stats, config })
    }

    /// Queues a request; refused when every slot is taken and `max_queue` requests are
    /// already waiting. Counted against slots + queue, not the queue alone: a request
    /// that arrives while the scheduler is mid-step waits for a free slot for a moment,
    /// and must not be refused for it.
    pub fn submit(&self, req: GenerateRequest) -> Result<(), EngineError> {
        self.submit_all(vec![req])
    }

    /// Queues a request's choices together: all of them, or none when they do not fit.
    pub fn submit_all(&self, reqs: Vec<GenerateRequest>) -> Result<(), EngineError> {
        if self.stats.closing.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        let k = reqs.len();
        let capacity = self.config.kv_slots + self.config.max_queue;
        self.stats
            .in_system
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n + k <= capacity).then_some(n + k)
            })
            .map_err(|n| EngineError::Overloaded(n.saturating_sub(self.config.kv_slots)))?;
        for (sent, req) in reqs.into_iter().enumerate() {
            if self.tx.send(req).is_err() {
                self.stats.in_system.fetch_sub(k - sent, Ordering::AcqRel);
                return Err(EngineError::Stopped);
            }
        }
        Ok(())
    }

    /// Ends every request held (running or waiting) with an error, and refuses new ones:
    /// the end of a shutdown's grace period.
    pub fn cancel_all(&self) {
        // The scheduler checks this every step. An idle one holds nothing to cancel, and
        // a request that slips into the channel past `submit`'s check wakes it, to be
        // cancelled at once.
        self.stats.closing.store(true, Ordering::Release);
    }

    /// Whether the scheduler thread is alive (its end of the channel is open).
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    pub fn stats(&self) -> &BatcherStats {
        &self.stats
    }

    pub fn config(&self) -> BatcherConfig {
        self.config
    }
}

struct Scheduler {
    model: Arc<Model>,
    cache: KvCache,
    rx: mpsc::UnboundedReceiver<GenerateRequest>,
    stats: Arc<BatcherStats>,
    config: BatcherConfig,
    waiting: VecDeque<GenerateRequest>,
    running: Vec<Sequence>,
    free: Vec<usize>,
    /// What each slot's cache holds, for reuse by the next prompts.
    prefix: PrefixCache,
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
            if self
                .waiting
                .iter()
                .any(|r| r.fault == Some(Fault::StopScheduler))
            {
                tracing::error!("fault injected: the scheduler thread stops");
                return;
            }
            if self.stats.closing.load(Ordering::Acquire) {
                self.cancel_all();
                continue;
            }
            self.leave_abandoned();
            self.admit();
            if self.running.is_empty() {
                continue;
            }
            // The step runs on a rayon worker, so its serial candle ops and the kernels'
            // parallel tiles share the pool's threads (one per core) instead of this
            // thread competing with the workers for the cores.
            let step = std::panic::catch_unwind(AssertUnwindSafe(|| rayon::scope(|_| self.step())));
            let finished = step.unwrap_or_else(|_| {
                // Not reachable by design; if it happens, the step's sequences fail and
                // the scheduler serves on.
                tracing::error!("a scheduler step panicked");
                let all = vec![true; self.running.len()];
                self.fail(&all, || {
                    EngineError::Model("the scheduler step panicked".into())
                })
            });
            self.release(finished);
        }
    }

    /// Frees the slots of sequences that left, then sends each its last event: a client
    /// that has its answer never sees its slot still counted.
    fn release(&mut self, ended: Vec<Sequence>) {
        for seq in &ended {
            self.free.push(seq.slot);
        }
        self.gone(ended.len());
        self.publish_slots();
        ended.into_iter().for_each(Sequence::close);
    }

    /// `n` accepted requests left the system (finished, failed or abandoned).
    fn gone(&self, n: usize) {
        self.stats.in_system.fetch_sub(n, Ordering::AcqRel);
    }

    fn publish_slots(&self) {
        self.stats
            .slots_used
            .store(self.running.len(), Ordering::Relaxed);
    }

    /// Sequences whose client went away leave before another token is computed.
    fn leave_abandoned(&mut self) {
        let before = self.running.len();
        let free = &mut self.free;
        self.running.retain(|seq| {
            let keep = !seq.events.is_closed();
            if !keep {
                free.push(seq.slot);
            }
            keep
        });
        if self.running.len() != before {
            self.gone(before - self.running.len());
            self.publish_slots();
        }
    }

    /// Starts waiting requests while slots are free, in arrival order, each in the slot
    /// that gives it the longest cached prefix. A choice after a request's first waits
    /// (without holding up the others) until the first has prefilled the prompt.
    fn admit(&mut self) {
        let mut i = 0;
        while !self.free.is_empty() && i < self.waiting.len() {
            if self.waiting[i].events.is_closed() {
                self.waiting.remove(i);
                self.gone(1);
                continue;
            }
            if !self.may_start(&self.waiting[i]) {
                i += 1;
                continue;
            }
            let Some(req) = self.waiting.remove(i) else {
                break;
            };
            let running: Vec<usize> = self.running.iter().map(|s| s.slot).collect();
            // Without the prefix cache, only a request's own choices share a prefix.
            let follows = req.choice.is_some_and(|(_, i)| i > 0);
            let cold = req.echo || !(self.config.prefix_cache || follows);
            let place = self.prefix.place(
                &self.cache,
                (&req.prompt, cold, req.cache_space),
                (&self.free, &running),
            );
            self.free.retain(|&s| s != place.slot);
            self.count_placement(&place, req.prompt.len());
            let _ = req.events.send(GenEvent::Started {
                cached: place.reused,
            });
            let shaping = (!req.shaping.is_identity()).then(|| {
                let seen = Seen::new(&req.prompt);
                (req.shaping, seen)
            });
            self.running.push(Sequence {
                slot: place.slot,
                prompt: req.prompt,
                prefilled: place.reused,
                passed_over: 0,
                pos: place.reused,
                input: Vec::new(),
                generated: 0,
                max_tokens: req.max_tokens,
                sampler: sampler(req.sampling),
                shaping,
                constraint: req.constraint,
                rule: None,
                logprobs: req.logprobs,
                echo: req.echo,
                choice: req.choice,
                forwards: 0,
                events: req.events,
                last: None,
                inject_panic: req.fault == Some(Fault::PanicWhileSampling),
            });
        }
        self.publish_slots();
    }

    fn count_placement(&self, place: &Placement, prompt: usize) {
        let p = &self.stats.prefix;
        p.started.fetch_add(1, Ordering::Relaxed);
        p.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        if place.reused > 0 {
            p.hits.fetch_add(1, Ordering::Relaxed);
            p.cached_tokens.fetch_add(place.reused, Ordering::Relaxed);
        }
        if place.copied {
            p.copies.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a waiting request may start: a choice after its request's first only
    /// once the first has its prompt in the cache (or is gone).
    fn may_start(&self, req: &GenerateRequest) -> bool {
        let Some((group, index)) = req.choice else {
            return true;
        };
        if index == 0 {
            return true;
        }
        let first_waits = self.waiting.iter().any(|r| r.choice == Some((group, 0)));
        let first_prefills = self
            .running
            .iter()
            .any(|s| s.choice == Some((group, 0)) && !s.decoding());
        !first_waits && !first_prefills
    }

    /// One batched forward pass for every running sequence; returns those that ended.
    fn step(&mut self) -> Vec<Sequence> {
        // The prompts still prefilling, in admission order, and what of each this step
        // takes (`prefill::choose`).
        let pending: Vec<Pending> = self
            .running
            .iter()
            .filter(|seq| !seq.decoding())
            .map(|seq| Pending {
                remaining: seq.prompt.len() - seq.prefilled,
                passed_over: seq.passed_over,
            })
            .collect();
        let mut takes = prefill::choose(&pending, PREFILL_CHUNK, PREFILL_BUDGET).into_iter();
        // (index into running, tokens this step, logits wanted)
        let mut plan: Vec<(usize, usize, Logits)> = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            if seq.decoding() {
                // The sampled token, and the tokens a constraint forced after it.
                plan.push((i, seq.input.len(), Logits::Last));
                continue;
            }
            let n = takes.next().unwrap_or(0);
            if n == 0 {
                seq.passed_over = seq.passed_over.saturating_add(1);
                continue;
            }
            seq.passed_over = 0;
            let logits = if seq.echo {
                Logits::Every
            } else if seq.prefilled + n == seq.prompt.len() {
                Logits::Last
            } else {
                Logits::None
            };
            plan.push((i, n, logits));
        }
        let inputs: Vec<Vec<u32>> = plan
            .iter()
            .map(|&(i, n, _)| {
                let seq = &self.running[i];
                if seq.decoding() {
                    seq.input.clone()
                } else {
                    seq.prompt[seq.prefilled..seq.prefilled + n].to_vec()
                }
            })
            .collect();
        let entries: Vec<Entry> = plan
            .iter()
            .zip(&inputs)
            .map(|(&(i, _, logits), tokens)| Entry {
                slot: self.running[i].slot,
                pos: self.running[i].pos,
                tokens,
                logits,
            })
            .collect();
        let started = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.model.arch.forward(&self.cache, &entries)
        }));
        let chunks: Vec<bool> = plan
            .iter()
            .map(|&(i, _, _)| !self.running[i].decoding())
            .collect();
        let wrote = |prefix: &mut PrefixCache, ok: bool| {
            for (e, &chunk) in entries.iter().zip(&chunks) {
                prefix.wrote(e.slot, e.pos, ok.then_some(e.tokens), chunk);
            }
        };
        let logits = match outcome {
            Ok(Ok(logits)) => logits,
            Ok(Err(e)) => {
                wrote(&mut self.prefix, false);
                return self.fail_batch(&plan, &e.to_string());
            }
            Err(_) => {
                wrote(&mut self.prefix, false);
                return self.fail_batch(&plan, "the forward pass panicked");
            }
        };
        wrote(&mut self.prefix, true);
        let forward = started.elapsed();
        // Each sequence that asked for logits gets its rows; sampling (a softmax over
        // the vocabulary each) runs in parallel, every sequence with its own RNG.
        // (first row, rows, whether they are a prompt chunk's every row, to be echoed)
        let mut rows: Vec<Option<(usize, usize, bool)>> = vec![None; self.running.len()];
        let mut row = 0;
        for &(i, n, wants) in &plan {
            let seq = &mut self.running[i];
            if !seq.decoding() {
                seq.prefilled += n;
            }
            seq.pos += n;
            seq.forwards += 1;
            let count = match wants {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::Every => n,
            };
            if count > 0 {
                rows[i] = Some((row, count, wants == Logits::Every));
                row += count;
            }
        }
        let (model, config) = (&self.model, &self.config);
        let done: Vec<bool> = self
            .running
            .par_iter_mut()
            .zip(rows)
            .map(|(seq, rows)| {
                let Some((start, count, every)) = rows else {
                    return false;
                };
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let logits = logits
                        .as_ref()
                        .ok_or_else(|| EngineError::Model("no logits".into()))?;
                    if every {
                        // The chunk's rows end where the sequence now stands.
                        echo(seq, &logits.narrow(0, start, count)?, seq.pos - count)?;
                        if !seq.decoding() {
                            return Ok(Step::Continue);
                        }
                    }
                    advance(model, config, seq, &logits.get(start + count - 1)?)
                }))
                .unwrap_or_else(|_| Err(EngineError::Model("sampling panicked".into())));
                match result {
                    Ok(Step::Continue) => false,
                    Ok(Step::Done) => true,
                    Err(e) => {
                        tracing::error!(error = %e, "sampling failed");
                        seq.last = Some(GenEvent::Failed(e));
                        true
                    }
                }
            })
            .collect();
        // Where a step's time goes, for profiling (`RUST_LOG=lynx_engine=debug`).
        tracing::debug!(
            sequences = plan.len(),
            rows = inputs.iter().map(Vec::len).sum::<usize>(),
            forward_us = forward.as_micros() as u64,
            sample_us = (started.elapsed() - forward).as_micros() as u64,
            "step"
        );
        self.prefix.tick();
        for (slot, held) in self.stats.prefix.slots.iter().enumerate() {
            held.store(self.prefix.held(slot), Ordering::Relaxed);
        }
        self.take_done(&done)
    }

    /// Removes and returns the running sequences marked done.
    fn take_done(&mut self, done: &[bool]) -> Vec<Sequence> {
        let (finished, kept) = std::mem::take(&mut self.running)
            .into_iter()
            .zip(done)
            .partition::<Vec<_>, _>(|(_, done)| **done);
        self.running = kept.into_iter().map(|(seq, _)| seq).collect();
        finished.into_iter().map(|(seq, _)| seq).collect()
    }

    /// A failed forward pass fails the sequences that were in it; the scheduler goes on.
    fn fail_batch(&mut self, plan: &[(usize, usize, Logits)], message: &str) -> Vec<Sequence> {
        tracing::error!(
            error = message,
            sequences = plan.len(),
            "forward pass failed"
        );
        let mut done = vec![false; self.running.len()];
        for &(i, _, _) in plan {
            done[i] = true;
        }
        self.fail(&done, || {
            EngineError::Model("the forward pass failed".into())
        })
    }

    /// Ends the marked sequences with `error()` and removes them.
    fn fail(&mut self, marked: &[bool], error: impl Fn() -> EngineError) -> Vec<Sequence> {
        for (seq, _) in self.running.iter_mut().zip(marked).filter(|(_, m)| **m) {
            seq.last = Some(GenEvent::Failed(error()));
        }
        self.take_done(marked)
    }

    /// Shutdown: every running and waiting request ends with an error event.
    fn cancel_all(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        self.gone(waiting.len());
        for req in waiting {
            let _ = req.events.send(GenEvent::Failed(EngineError::ShuttingDown));
        }
        let all = vec![true; self.running.len()];
        let ended = self.fail(&all, || EngineError::ShuttingDown);
        self.release(ended);
    }
}

/// Sends the log-probabilities of the prompt tokens that the rows of a prompt chunk
/// starting at `first` predict: row `j` predicts the token at `first + j + 1`.
fn echo(seq: &Sequence, rows: &candle_core::Tensor, first: usize) -> Result<(), EngineError> {
    let top = seq.logprobs.unwrap_or(0);
    let rows = rows.to_vec2::<f32>()?;
    let values: Vec<Logprob> = rows
        .iter()
        .enumerate()
        .filter_map(|(j, row)| {
            let token = *seq.prompt.get(first + j + 1)?;
            Some(logprobs::of(row, token, top))
        })
        .collect();
    if !values.is_empty() {
        let _ = seq.events.send(GenEvent::Prompt(values));
    }
    Ok(())
}
