//! One request's sandbox: a fresh store (memory cap, per-call epoch deadline, a time
//! budget for the whole request) and an instance of the plugin, counted against the
//! instance pool while it lives. A call that traps poisons the session: a trapped
//! instance is never called again. What a plugin returns is checked against caps before
//! the host uses it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{PoolConcurrencyLimitError, Store, Trap};

use super::runtime::{epoch_ticks, LoadedPlugin, PluginRuntime, VerdictReport};
use super::state::{HostState, PromptTooLong};
use super::types::{OutputFormat, PolicyRequest, PostConfig, Rejection, Released};
use super::versions::Instance;
use super::PluginError;
use lynx_engine::constraint::Rule;

/// The most text one `push` or `finish` may release.
pub const MAX_RELEASED_BYTES: usize = 64 << 10;
/// The longest rejection code and message a policy may return.
pub const MAX_REJECTION_CODE: usize = 64;
pub const MAX_REJECTION_MESSAGE: usize = 1024;

/// The bytes of text a policy request holds.
fn prompt_bytes(request: &PolicyRequest) -> usize {
    match &request.prompt {
        super::types::Prompt::Text(t) => t.len(),
        super::types::Prompt::Chat(messages) => messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum(),
        super::types::Prompt::Tokens(ids) => ids.len(),
    }
}

/// What the client sent that a call works on: a call that runs out of time on it may
/// be the client's cost, not the plugin's fault ([`PluginSession::clients_cost`]).
#[derive(Debug, Clone, Copy)]
enum Sent {
    /// A prompt of this many bytes, for the policy to encode.
    Prompt(usize),
    /// A response format, for the constraint to compile.
    Format,
}

/// A live instance of the pool, given back when the session ends.
struct InstanceSlot(Arc<AtomicUsize>);

impl InstanceSlot {
    fn take(live: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Self(live.clone()))
    }
}

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct PluginSession {
    store: Store<HostState>,
    bindings: Instance,
    name: Arc<str>,
    call_timeout: Duration,
    budget: Duration,
    spent: Duration,
    memory_mib: u64,
    poisoned: bool,
    /// A plugin fault (not the client's prompt) happened in this session.
    faulted: bool,
    /// What the client sent that the running call works on, if anything.
    sent: Option<Sent>,
    /// Set for a request's session, whose end counts toward the version's probation
    /// (not a smoke call's or a router label's): where a verdict is reported.
    verdicts: Option<std::sync::mpsc::Sender<VerdictReport>>,
    plugin: Arc<LoadedPlugin>,
    /// Held while the session serves a request; a warm constraint instance between
    /// requests holds none (the pool has room for those beyond `--plugin-instances`).
    slot: Option<InstanceSlot>,
    live: Arc<AtomicUsize>,
    max_live: usize,
}

impl Drop for PluginSession {
    fn drop(&mut self) {
        let Some(verdicts) = &self.verdicts else {
            return;
        };
        if let Some(verdict) = self.plugin.probation.record(self.faulted) {
            let _ = verdicts.send((self.plugin.clone(), verdict));
        }
    }
}

impl PluginSession {
    pub fn new(runtime: &PluginRuntime, plugin: &Arc<LoadedPlugin>) -> Result<Self, PluginError> {
        Self::with_memory(runtime, plugin, runtime.limits.memory_bytes, true)
    }

    /// A session whose instance may have `memory_cap` bytes of linear memory, counted
    /// among the live instances or not (one prepared to be kept warm is not).
    pub(super) fn with_memory(
        runtime: &PluginRuntime,
        plugin: &Arc<LoadedPlugin>,
        memory_cap: usize,
        counted: bool,
    ) -> Result<Self, PluginError> {
        let max = runtime.limits.instances as usize;
        let slot = match counted {
            true => Some(
                InstanceSlot::take(runtime.live_instances(), max)
                    .ok_or(PluginError::PoolExhausted { instances: max })?,
            ),
            false => None,
        };
        let state = HostState::new(
            plugin.name.clone(),
            (
                runtime.tokenizer().clone(),
                runtime.model_info().clone(),
                runtime.vocabulary().clone(),
            ),
            runtime.context_length(),
            memory_cap,
            plugin.log.clone(),
        );
        let mut store = Store::new(runtime.engine(), state);
        store.limiter(|s| s);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(epoch_ticks(runtime.limits.call_timeout));
        let bindings = plugin.pre.instantiate(&mut store).map_err(|e| {
            if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
                PluginError::PoolExhausted { instances: max }
            } else {
                PluginError::Instantiate {
                    plugin: plugin.name.to_string(),
                    detail: super::state::escape_log(&format!("{e:#}")),
                }
            }
        })?;
        Ok(Self {
            store,
            bindings,
            name: plugin.name.clone(),
            call_timeout: runtime.limits.call_timeout,
            budget: runtime.limits.request_budget,
            spent: Duration::ZERO,
            memory_mib: (memory_cap >> 20) as u64,
            poisoned: false,
            faulted: false,
            sent: None,
            verdicts: None,
            plugin: plugin.clone(),
            slot,
            live: runtime.live_instances().clone(),
            max_live: max,
        })
    }

    /// This session is a request's: its end counts toward the version's probation,
    /// whose verdict goes to `verdicts`.
    pub(crate) fn judged(mut self, verdicts: std::sync::mpsc::Sender<VerdictReport>) -> Self {
        self.verdicts = Some(verdicts);
        self
    }

    pub fn plugin_name(&self) -> &str {
        &self.name
    }

    pub fn set_sink(&mut self, sink: Arc<dyn crate::state::TokenSink>) {
        self.store.data_mut().sink = Some(sink);
    }

    pub fn state(&self) -> &HostState {
        self.store.data()
    }

    fn fail(&mut self, error: PluginError) -> PluginError {
        self.poisoned = true;
        if !matches!(
            error,
            PluginError::PromptTooLong { .. } | PluginError::ClientCost { .. }
        ) {
            self.faulted = true;
            self.plugin.traps.fetch_add(1, Ordering::Relaxed);
        }
        error
    }

    fn call<R>(
        &mut self,
        f: impl FnOnce(&Instance, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        self.call_within(self.call_timeout, f)
    }

    /// A call under its own deadline (`call_timeout` for every ordinary call).
    fn call_within<R>(
        &mut self,
        call_timeout: Duration,
        f: impl FnOnce(&Instance, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let plugin = self.name.to_string();
        if self.poisoned {
            return Err(PluginError::Trap {
                plugin,
                detail: "called again after a trap".into(),
            });
        }
        let left = self.budget.saturating_sub(self.spent);
        if left.is_zero() {
            let millis = self.budget.as_millis() as u64;
            return Err(self.fail(PluginError::BudgetExceeded { plugin, millis }));
        }
        let by_budget = left < call_timeout;
        let limit = left.min(call_timeout);
        self.store.set_epoch_deadline(epoch_ticks(limit));
        let t0 = Instant::now();
        self.store.data_mut().call_deadline = Some(t0 + limit);
        self.store.data_mut().encoded = (0, Duration::ZERO);
        self.store.data_mut().deadline_cut = false;
        let mut result = f(&self.bindings, &mut self.store);
        self.store.data_mut().call_deadline = None;
        if result.is_ok() && self.store.data().deadline_cut {
            // It waited past its deadline (a sleep cut short): out of time, as if the
            // epoch had interrupted it.
            result = Err(wasmtime::Error::new(Trap::Interrupt));
        }
        self.spent += t0.elapsed();
        result.map_err(|e| {
            let error = if let Some(long) = e.downcast_ref::<PromptTooLong>() {
                PluginError::PromptTooLong {
                    at_least: long.at_least,
                    limit: long.limit,
                }
            } else if self.store.data().memory_refused {
                PluginError::OutOfMemory {
                    plugin,
                    mib: self.memory_mib,
                }
            } else if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                let millis = if by_budget { self.budget } else { call_timeout }.as_millis() as u64;
                match self.clients_cost(by_budget) {
                    Some(what) => PluginError::ClientCost {
                        what: what.into(),
                        millis,
                    },
                    None if by_budget => PluginError::BudgetExceeded { plugin, millis },
                    None => PluginError::Timeout { plugin, millis },
                }
            } else {
                PluginError::Trap {
                    plugin,
                    detail: super::state::escape_log(&format!("{e:#}")),
                }
            };
            self.fail(error)
        })
    }

    fn misbehaved(&mut self, detail: String) -> PluginError {
        let plugin = self.name.to_string();
        self.fail(PluginError::Misbehaved { plugin, detail })
    }

    /// The `endpoint` label of a request.
    pub fn normalize(&mut self, method: &str, path: &str) -> Result<String, PluginError> {
        self.call(|p, s| p.normalize(s, method, path))
    }

    /// The policy's verdict on a prompt. A rejection's code and message are capped.
    pub fn tokenize(
        &mut self,
        request: &PolicyRequest,
    ) -> Result<Result<Vec<u32>, Rejection>, PluginError> {
        let sent = Sent::Prompt(prompt_bytes(request));
        let verdict = self.call_on(sent, |p, s| p.tokenize(s, request))?;
        if let Err(r) = &verdict {
            self.check_rejection(r)?;
        }
        Ok(verdict)
    }

    /// An ordinary call on what the client sent.
    fn call_on<R>(
        &mut self,
        sent: Sent,
        f: impl FnOnce(&Instance, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        self.sent = Some(sent);
        let result = self.call(f);
        self.sent = None;
        result
    }

    /// What the client sent that the call which just ran out spent its time on, if it
    /// did: a response format the plugin could not compile within its deadline; or a
    /// prompt, when most of the call went to `host.encode` on no more than twice the
    /// prompt's own bytes (a plugin that encodes far more than it was sent spends its
    /// own time).
    fn clients_cost(&self, by_budget: bool) -> Option<&'static str> {
        match self.sent? {
            Sent::Format => (!by_budget).then_some("the response format"),
            Sent::Prompt(prompt_bytes) => {
                let (bytes, took) = self.store.data().encoded;
                (bytes > 0
                    && bytes <= 2 * prompt_bytes + 4096
                    && took * 2 >= self.call_timeout.min(self.budget))
                .then_some("encoding the prompt")
            }
        }
    }

    pub fn start(&mut self, config: &PostConfig) -> Result<(), PluginError> {
        self.call(|p, s| p.start(s, config))
    }

    /// One generated token through post-processing; the events the plugin failed to
    /// report are recorded for it.
    pub fn push(&mut self, token: u32) -> Result<Released, PluginError> {
        self.store.data_mut().ledger.pushed += 1;
        let released = self.call(|p, s| p.push(s, token));
        self.store.data_mut().reconcile_events();
        let released = released?;
        self.check_released(&released.text)?;
        Ok(released)
    }

    pub fn finish(&mut self) -> Result<String, PluginError> {
        let text = self.call(|p, s| p.finish(s))?;
        self.check_released(&text)?;
        Ok(text)
    }

    /// Gives the session's place in the live count back: it waits, warm, for a request.
    pub(super) fn release_slot(&mut self) {
        self.slot = None;
    }

    /// Takes a place in the live count again for a request; refused when every place
    /// is taken.
    pub(super) fn retake_slot(&mut self) -> Result<(), PluginError> {
        if self.slot.is_none() {
            self.slot = Some(InstanceSlot::take(&self.live, self.max_live).ok_or(
                PluginError::PoolExhausted {
                    instances: self.max_live,
                },
            )?);
        }
        Ok(())
    }

    /// Whether a call of this session failed: a poisoned session is never reused.
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// A session without a budget (to be prepared under a deadline of its own).
    pub(super) fn unbudgeted(mut self) -> Self {
        self.budget = Duration::MAX;
        self
    }

    /// The time all of one request's calls may take together.
    pub(super) fn set_budget(&mut self, budget: Duration) {
        self.budget = budget;
    }

    /// Counts a fault of this request that happened elsewhere (its constraint's
    /// instance) against this session's version, as its own would be.
    pub fn mark_faulted(&mut self) {
        self.faulted = true;
    }

    /// This session's end does not count toward its version's probation: requests
    /// that serve no generation (`/tokenize`, `/detokenize`) cannot vouch for it.
    pub(crate) fn unjudged(mut self) -> Self {
        self.verdicts = None;
        self
    }

    /// Builds what the plugin's constraint shares between requests, under `deadline`.
    pub fn prepare(&mut self, deadline: Duration) -> Result<(), PluginError> {
        self.call_within(deadline, |p, s| p.prepare(s))
    }

    /// Starts constraining a request's output to `format`; a rejection is the client's.
    pub fn constrain(
        &mut self,
        format: &OutputFormat,
    ) -> Result<Result<(), Rejection>, PluginError> {
        self.spent = Duration::ZERO;
        // The format is what the client sent: one the plugin cannot compile within its
        // deadline is the client's 400, not the plugin's fault.
        let verdict = self.call_on(Sent::Format, |p, s| p.constrain(s, format))?;
        if let Err(r) = &verdict {
            self.check_rejection(r)?;
        }
        Ok(verdict)
    }

    pub fn next_token(&mut self) -> Result<Rule, PluginError> {
        self.call(|p, s| p.next_token(s))
    }

    pub fn taken(&mut self, tokens: &[u32]) -> Result<(), PluginError> {
        match self.call(|p, s| p.taken(s, tokens))? {
            Ok(()) => Ok(()),
            Err(detail) => {
                let detail: String = detail.chars().take(MAX_REJECTION_MESSAGE).collect();
                Err(self.misbehaved(format!("its constraint refused a token: {detail}")))
            }
        }
    }

    fn check_rejection(&mut self, r: &Rejection) -> Result<(), PluginError> {
        if r.code.len() > MAX_REJECTION_CODE || r.message.len() > MAX_REJECTION_MESSAGE {
            return Err(self.misbehaved(format!(
                "a rejection of {} + {} bytes (caps {MAX_REJECTION_CODE} + {MAX_REJECTION_MESSAGE})",
                r.code.len(),
                r.message.len()
            )));
        }
        Ok(())
    }

    fn check_released(&mut self, text: &str) -> Result<(), PluginError> {
        if text.len() > MAX_RELEASED_BYTES {
            return Err(self.misbehaved(format!(
                "released {} bytes at once (cap {MAX_RELEASED_BYTES})",
                text.len()
            )));
        }
        Ok(())
    }
}
