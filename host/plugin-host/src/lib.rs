//! WebAssembly plugins: the wasmtime component host that runs lynx's request
//! pre/post-processing in sandboxed components implementing `lynx:plugin@0.3.0` (or a
//! released older version).
//!
//! One module per released WIT version owns that version's `bindgen!`
//! ([`since_v0_1`], [`since_v0_2`], [`since_v0_3`], the current one, also [`latest`]);
//! [`versions`] is their table and the traits they implement, and [`types`] are the
//! host's own types every other layer sees; [`runtime`] compiles, checks and
//! pre-instantiates plugins ([`cache`] keeps them compiled by sha256, authenticated);
//! [`session`] is one request's sandbox, and [`exec`] the bounded pool its calls run on,
//! off the async workers; [`state`] is what a plugin can reach (the tokenizer, the log,
//! the event ledger, and [`wasi`]'s deny-by-default WASI); [`registry`] is the plugin
//! folder ([`files`] reads it as untrusted input) and the active plugin, which
//! [`watch`] keeps in line with the files and [`probation`] rolls back when a new
//! version fails.

pub mod cache;
pub mod check;
pub mod constraint;
pub mod exec;
pub mod files;
mod glue;
pub mod prepare;
pub mod probation;
pub mod registry;
pub mod runtime;
pub mod session;
mod since_v0_1;
mod since_v0_2;
mod since_v0_3;
pub mod state;
pub mod types;
mod versions;
pub mod wasi;
pub mod watch;

/// The version this host implements; plugins of the older released ones load too.
/// The version modules stay private: no generated type leaves this crate.
use since_v0_3 as latest;

pub use exec::{PluginExec, PooledSession};
pub use registry::Plugins;
pub use runtime::{LoadedPlugin, PluginLimits, PluginRuntime};
pub use session::PluginSession;

/// Errors of the plugin layer. The HTTP layer answers 500 `plugin_error` naming the
/// plugin; the details stay in the log.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{plugin}` trapped: {detail}")]
    Trap { plugin: String, detail: String },
    #[error("plugin `{plugin}` ran past its {millis} ms deadline")]
    Timeout { plugin: String, millis: u64 },
    #[error("plugin `{plugin}` ran past its {millis} ms budget for one request")]
    BudgetExceeded { plugin: String, millis: u64 },
    #[error("every one of the {instances} plugin instances is in use")]
    PoolExhausted { instances: usize },
    #[error("the prompt is at least {at_least} tokens long; the context holds {limit}")]
    PromptTooLong { at_least: usize, limit: usize },
    #[error("plugin `{plugin}` exceeded its {mib} MiB memory limit")]
    OutOfMemory { plugin: String, mib: u64 },
    #[error("plugin `{plugin}` broke the interface contract: {detail}")]
    Misbehaved { plugin: String, detail: String },
    #[error("plugin `{plugin}` could not be instantiated: {detail}")]
    Instantiate { plugin: String, detail: String },
    #[error(
        "plugin {file} was built for lynx:plugin@{found}; this host implements lynx:plugin@{expected}"
    )]
    IncompatibleVersion {
        file: String,
        found: String,
        expected: String,
    },
    #[error("plugin {file} is not a lynx plugin: {detail}")]
    Invalid { file: String, detail: String },
    #[error("plugin {file} failed its smoke call: {detail}")]
    SmokeFailed { file: String, detail: String },
    #[error("plugin engine: {0}")]
    Engine(String),
    /// What the client sent cost the plugin more than its deadline: the client's 400.
    #[error("{what} took the plugin longer than its {millis} ms deadline")]
    ClientCost { what: String, millis: u64 },
}

impl PluginError {
    /// What a client is told: which plugin failed and how, without the trap's details
    /// (those go to the log), and a stable error code.
    pub fn public(&self) -> (String, &'static str) {
        let plugin = self.plugin().unwrap_or("?");
        match self {
            PluginError::Trap { .. } => (
                format!("The plugin `{plugin}` trapped while processing this request."),
                "plugin_trap",
            ),
            PluginError::Timeout { millis, .. } => (
                format!("The plugin `{plugin}` ran past its {millis} ms deadline."),
                "plugin_timeout",
            ),
            PluginError::BudgetExceeded { millis, .. } => (
                format!("The plugin `{plugin}` ran past its {millis} ms budget for one request."),
                "plugin_budget_exceeded",
            ),
            PluginError::OutOfMemory { mib, .. } => (
                format!("The plugin `{plugin}` exceeded its {mib} MiB memory limit."),
                "plugin_out_of_memory",
            ),
            PluginError::Misbehaved { .. } => (
                format!("The plugin `{plugin}` returned an invalid result."),
                "plugin_invalid_result",
            ),
            _ => (
                format!("The plugin `{plugin}` could not serve this request."),
                "plugin_unavailable",
            ),
        }
    }

    /// The plugin's name, when the error is about one plugin's run.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            PluginError::Trap { plugin, .. }
            | PluginError::Timeout { plugin, .. }
            | PluginError::BudgetExceeded { plugin, .. }
            | PluginError::OutOfMemory { plugin, .. }
            | PluginError::Misbehaved { plugin, .. }
            | PluginError::Instantiate { plugin, .. } => Some(plugin),
            _ => None,
        }
    }
}
