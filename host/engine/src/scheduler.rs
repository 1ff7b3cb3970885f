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
use super::generation::{Fault, GenEvent, GenerateRequest};
use super::kv_cache::{KvCache, KvDtype};
use super::logprobs::{self, Logprob};
use super::planner::{self, Work};
use super::prefix::{Placement, PrefixCache};
use super::sequence::{advance, sampler, Sequence, Step};
use super::shaping::Seen;
use super::{EngineError, Model};

/// The prompt tokens of one prefill chunk.
pub const PREFILL_CHUNK: usize = 128;
/// The most prompt tokens prefilled in one step (whole chunks; the first always runs;
/// which prompts, `prefill.rs` decides).
pub const PREFILL_BUDGET: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub kv_slots: usize,
    pub max_queue: usize,
    /// Positions per slot: the longest prompt + completion served.
    pub max_seq_len: usize,
    /// How the KV cache stores keys and values.
    pub kv_dtype: KvDtype,
    /// Prompts reuse prefixes that earlier requests left in the slots.
    pub prefix_cache: bool,
}

/// Live scheduler figures, read at scrape time.
#[derive(Debug, Default)]
pub struct SchedulerStats {
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

impl SchedulerStats {
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
pub struct Scheduler {
    tx: mpsc::UnboundedSender<GenerateRequest>,
    stats: Arc<SchedulerStats>,
    config: SchedulerConfig,
}

impl Scheduler {
    pub fn start(model: Arc<Model>, config: SchedulerConfig) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(SchedulerStats {
            prefix: PrefixStats {
                slots: (0..config.kv_slots).map(|_| AtomicUsize::new(0)).collect(),
                ..PrefixStats::default()
            },
            ..SchedulerStats::default()
        });
        let cache = model
            .arch
            .kv_cache_as(config.kv_slots, config.max_seq_len, config.kv_dtype)?;
        let config = SchedulerConfig {
            max_seq_len: cache.capacity,
            ..config
        };
        let task = Task {
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
            .spawn(move || task.run())
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

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }
}

struct Task {
    model: Arc<Model>,
    cache: KvCache,
    rx: mpsc::UnboundedReceiver<GenerateRequest>,
    stats: Arc<SchedulerStats>,
    config: SchedulerConfig,
    waiting: VecDeque<GenerateRequest>,
    running: Vec<Sequence>,
    free: Vec<usize>,
    /// What each slot's cache holds, for reuse by the next prompts.
    prefix: PrefixCache,
}

impl Task {
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
            if cfg!(feature = "fault-injection")
                && self
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
            let finished = self.plan_and_step();
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

    /// Requests whose client went away leave before another token is computed, and
    /// waiting ones before they take a slot.
    fn leave_abandoned(&mut self) {
        let queued = self.waiting.len();
        self.waiting.retain(|req| !req.events.is_closed());
        self.gone(queued - self.waiting.len());
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

    /// Asks the planner what this step does, starts the requests it admits, and runs
    /// the step when anything runs; returns the sequences that ended.
    fn plan_and_step(&mut self) -> Vec<Sequence> {
        let views: Vec<planner::Waiting<'_>> = self
            .waiting
            .iter()
            .map(|r| planner::Waiting {
                prompt: &r.prompt,
                echo: r.echo,
                choice: r.choice,
                space: r.cache_space,
            })
            .collect();
        let running: Vec<planner::Running> = self
            .running
            .iter()
            .map(|seq| planner::Running {
                slot: seq.slot,
                choice: seq.choice,
                remaining: seq.prompt.len() - seq.prefilled,
                input: seq.input.len(),
                passed_over: seq.passed_over,
                echo: seq.echo,
            })
            .collect();
        let limits = planner::Limits {
            prefix_cache: self.config.prefix_cache,
            chunk: PREFILL_CHUNK,
            budget: PREFILL_BUDGET,
        };
        let plan = planner::plan(&views, &running, &self.free, &mut self.prefix, limits);
        drop(views);
        let cold = self.admit(&plan.admit);
        // A sequence whose prefix copy failed starts from position 0: the chunk the plan
        // gave it (sized, and its logits chosen, for the prefix it was to have) waits for
        // the next step's plan.
        let work: Vec<Work> = plan
            .work
            .into_iter()
            .filter(|w| !cold.contains(&w.seq))
            .collect();
        if self.running.is_empty() {
            return Vec::new();
        }
        for &i in &plan.passed_over {
            let seq = &mut self.running[i];
            seq.passed_over = seq.passed_over.saturating_add(1);
        }
        // The step runs on a rayon worker, so its serial candle ops and the kernels'
        // parallel tiles share the pool's threads (one per core) instead of this
        // thread competing with the workers for the cores.
        let step =
            std::panic::catch_unwind(AssertUnwindSafe(|| rayon::scope(|_| self.step(&work))));
        step.unwrap_or_else(|_| {
            // Not reachable by design; if it happens, the step's sequences fail and
            // the scheduler serves on.
            tracing::error!("a scheduler step panicked");
            let all = vec![true; self.running.len()];
            self.fail(&all, || {
                EngineError::Model("the scheduler step panicked".into())
            })
        })
    }

    /// Starts the requests the plan admits, in its order: copies each one's cached
    /// prefix into its slot where the plan says, and tells its client it has started.
    /// Returns the running indices of those whose copy failed (they prefill cold).
    fn admit(&mut self, admit: &[(usize, Placement)]) -> Vec<usize> {
        let mut cold = Vec::new();
        if admit.is_empty() {
            return cold;
        }
        let mut queue: Vec<Option<GenerateRequest>> = std::mem::take(&mut self.waiting)
            .into_iter()
            .map(Some)
            .collect();
        // Slots a copy failed into hold nothing reliable: copies from them fail too.
        let mut failed: Vec<usize> = Vec::new();
        for &(i, mut place) in admit {
            let Some(req) = queue.get_mut(i).and_then(Option::take) else {
                continue;
            };
            if let Some(from) = place.copy_from {
                let copy = if failed.contains(&from) {
                    Err(EngineError::Model("its source slot's copy failed".into()))
                } else {
                    self.cache.copy_prefix(from, place.slot, place.reused)
                };
                if let Err(e) = copy {
                    tracing::warn!(error = %e, "copying a cached prefix failed; prefilling cold");
                    self.prefix.forget(place.slot);
                    failed.push(place.slot);
                    cold.push(self.running.len());
                    place.reused = 0;
                    place.copy_from = None;
                }
            }
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
                inject_panic: cfg!(feature = "fault-injection")
                    && req.fault == Some(Fault::PanicWhileSampling),
            });
        }
        self.waiting = queue.into_iter().flatten().collect();
        self.publish_slots();
        cold
    }

    fn count_placement(&self, place: &Placement, prompt: usize) {
        let p = &self.stats.prefix;
        p.started.fetch_add(1, Ordering::Relaxed);
        p.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        if place.reused > 0 {
            p.hits.fetch_add(1, Ordering::Relaxed);
            p.cached_tokens.fetch_add(place.reused, Ordering::Relaxed);
        }
        if place.copy_from.is_some() {
            p.copies.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs the plan's forward pass and samples; returns the sequences that ended.
    fn step(&mut self, work: &[Work]) -> Vec<Sequence> {
        let inputs: Vec<Vec<u32>> = work
            .iter()
            .map(|w| {
                let seq = &self.running[w.seq];
                if w.prompt {
                    seq.prompt[seq.prefilled..seq.prefilled + w.tokens].to_vec()
                } else {
                    seq.input.clone()
                }
            })
            .collect();
        let entries: Vec<Entry> = work
            .iter()
            .zip(&inputs)
            .map(|(w, tokens)| Entry {
                slot: self.running[w.seq].slot,
                pos: self.running[w.seq].pos,
                tokens,
                logits: w.logits,
            })
            .collect();
        let started = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.model.arch.forward(&self.cache, &entries)
        }));
        let wrote = |prefix: &mut PrefixCache, ok: bool| {
            for (e, w) in entries.iter().zip(work) {
                prefix.wrote(e.slot, e.pos, ok.then_some(e.tokens), w.prompt);
            }
        };
        let logits = match outcome {
            Ok(Ok(logits)) => logits,
            Ok(Err(e)) => {
                wrote(&mut self.prefix, false);
                return self.fail_batch(work, &e.to_string());
            }
            Err(_) => {
                wrote(&mut self.prefix, false);
                return self.fail_batch(work, "the forward pass panicked");
            }
        };
        wrote(&mut self.prefix, true);
        let forward = started.elapsed();
        // Each sequence that asked for logits gets its rows; sampling (a softmax over
        // the vocabulary each) runs in parallel, every sequence with its own RNG.
        // (first row, rows, whether they are a prompt chunk's every row, to be echoed)
        let mut rows: Vec<Option<(usize, usize, bool)>> = vec![None; self.running.len()];
        let mut row = 0;
        for w in work {
            let seq = &mut self.running[w.seq];
            if w.prompt {
                seq.prefilled += w.tokens;
                seq.passed_over = 0;
            }
            seq.pos += w.tokens;
            seq.forwards += 1;
            let count = match w.logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::Every => w.tokens,
            };
            if count > 0 {
                rows[w.seq] = Some((row, count, w.logits == Logits::Every));
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
            sequences = work.len(),
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
    fn fail_batch(&mut self, work: &[Work], message: &str) -> Vec<Sequence> {
        tracing::error!(
            error = message,
            sequences = work.len(),
            "forward pass failed"
        );
        let mut done = vec![false; self.running.len()];
        for w in work {
            done[w.seq] = true;
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
