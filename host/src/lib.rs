//! lynx-host: an LLM serving host. The engine (model, tokenizer, scheduler) is in
//! [`engine`], the HTTP API in [`http`], the six Prometheus metrics in [`metrics`], and
//! the WebAssembly plugin host in [`plugins`].

pub mod config;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod plugins;
pub mod telemetry;

pub use http::{app, AppState};
