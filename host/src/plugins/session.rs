//! One request's sandbox: a fresh store (memory cap, per-call epoch deadline) and an
//! instance of the plugin. A call that traps poisons the session: a trapped instance is
//! never called again.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use wasmtime::{Store, Trap};

use super::runtime::{LoadedPlugin, PluginRuntime};
use super::state::{EventSink, HostState};
use super::world::{Plugin, PolicyRequest, PostConfig, Rejection, Released};
use super::PluginError;

pub struct PluginSession {
    store: Store<HostState>,
    bindings: Plugin,
    name: Arc<str>,
    deadline_ticks: u64,
    timeout_ms: u64,
    memory_mib: u64,
    poisoned: bool,
    plugin: Arc<LoadedPlugin>,
}

impl PluginSession {
    pub fn new(runtime: &PluginRuntime, plugin: &Arc<LoadedPlugin>) -> Result<Self, PluginError> {
        let state = HostState::new(
            plugin.name.clone(),
            runtime.tokenizer().clone(),
            runtime.limits.memory_bytes,
        );
        let mut store = Store::new(runtime.engine(), state);
        store.limiter(|s| s);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(runtime.deadline_ticks());
        let bindings =
            plugin
                .pre
                .instantiate(&mut store)
                .map_err(|e| PluginError::Instantiate {
                    plugin: plugin.name.to_string(),
                    detail: format!("{e:#}"),
                })?;
        Ok(Self {
            store,
            bindings,
            name: plugin.name.clone(),
            deadline_ticks: runtime.deadline_ticks(),
            timeout_ms: runtime.limits.call_timeout.as_millis() as u64,
            memory_mib: runtime.limits.memory_mib(),
            poisoned: false,
            plugin: plugin.clone(),
        })
    }

    pub fn plugin_name(&self) -> &str {
        &self.name
    }

    /// The sha256 of the plugin version this request runs on.
    pub fn version(&self) -> &str {
        &self.plugin.sha256
    }

    pub fn set_sink(&mut self, sink: EventSink) {
        self.store.data_mut().sink = Some(sink);
    }

    pub fn state(&self) -> &HostState {
        self.store.data()
    }

    pub fn state_mut(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    fn call<R>(
        &mut self,
        f: impl FnOnce(&Plugin, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        if self.poisoned {
            return Err(PluginError::Trap {
                plugin: self.name.to_string(),
                detail: "called again after a trap".into(),
            });
        }
        self.store.set_epoch_deadline(self.deadline_ticks);
        f(&self.bindings, &mut self.store).map_err(|e| {
            self.poisoned = true;
            self.plugin.traps.fetch_add(1, Ordering::Relaxed);
            let plugin = self.name.to_string();
            if self.store.data().memory_refused {
                PluginError::OutOfMemory {
                    plugin,
                    mib: self.memory_mib,
                }
            } else if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                PluginError::Timeout {
                    plugin,
                    millis: self.timeout_ms,
                }
            } else {
                PluginError::Trap {
                    plugin,
                    detail: format!("{e:#}"),
                }
            }
        })
    }

    /// The `endpoint` label of a request.
    pub fn normalize(&mut self, method: &str, path: &str) -> Result<String, PluginError> {
        self.call(|p, s| p.lynx_plugin_router().call_normalize(s, method, path))
    }

    pub fn tokenize(
        &mut self,
        request: &PolicyRequest,
    ) -> Result<Result<Vec<u32>, Rejection>, PluginError> {
        self.call(|p, s| p.lynx_plugin_policy().call_tokenize(s, request))
    }

    pub fn start(&mut self, config: &PostConfig) -> Result<(), PluginError> {
        self.call(|p, s| p.lynx_plugin_postprocess().call_start(s, config))
    }

    pub fn push(&mut self, token: u32) -> Result<Released, PluginError> {
        self.store.data_mut().ledger.pushed += 1;
        self.call(|p, s| p.lynx_plugin_postprocess().call_push(s, token))
    }

    pub fn finish(&mut self) -> Result<String, PluginError> {
        self.call(|p, s| p.lynx_plugin_postprocess().call_finish(s))
    }
}
