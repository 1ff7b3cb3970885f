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

/// MemAvailable from /proc/meminfo, in bytes.
pub fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
