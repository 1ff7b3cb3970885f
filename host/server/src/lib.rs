//! lynx's server: the OpenAI-compatible HTTP API and the admin API ([`http`]), the
//! configuration ([`config`]), the six Prometheus metrics ([`metrics`]) and what a
//! request's log line records ([`telemetry`]). The engine is `lynx-engine`, the
//! WebAssembly plugin host `lynx-plugin-host`; this crate puts them together.

pub mod backend;
pub mod config;
pub mod http;
pub mod metrics;
pub mod server;
pub mod telemetry;

pub use http::{app, AppState};
