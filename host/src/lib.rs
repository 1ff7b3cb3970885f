//! lynx-host: an LLM serving host. The engine (model, tokenizer, scheduler) is in
//! [`engine`], the HTTP API in [`http`], the six Prometheus metrics in [`metrics`].

pub mod config;
pub mod engine;
pub mod http;
pub mod metrics;

pub use http::{app, AppState};
