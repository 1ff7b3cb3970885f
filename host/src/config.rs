//! Command-line and environment configuration: every flag also reads `LYNX_…`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// The file name `scripts/fetch-model.sh` stores the default model under.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// lynx: an LLM serving host with an OpenAI-compatible API and Prometheus metrics.
#[derive(Debug, Clone, Parser)]
#[command(name = "lynx-host", version)]
pub struct Config {
    /// Address of the public listener (API, /health, /metrics).
    #[arg(long, env = "LYNX_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// Llama-family GGUF model to serve. Default: the SmolLM2-135M-Instruct that
    /// scripts/fetch-model.sh puts in the cache folder.
    #[arg(long, env = "LYNX_MODEL")]
    pub model: Option<PathBuf>,

    /// Name of the served model: the `model` field of requests and responses and the
    /// `model_name` metric label.
    #[arg(long, env = "LYNX_MODEL_NAME", default_value = "smollm2-135m-instruct")]
    pub model_name: String,

    /// KV cache slots: how many sequences run at once.
    #[arg(long, env = "LYNX_KV_SLOTS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub kv_slots: u16,

    /// Requests that may wait for a slot; past this, requests get 503 with Retry-After.
    #[arg(long, env = "LYNX_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info`, `lynx_host=debug`).
    #[arg(long, env = "LYNX_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// The model path: `--model`, else the default model in the cache folder.
    pub fn model_path(&self) -> PathBuf {
        if let Some(path) = &self.model {
            return path.clone();
        }
        let cache = std::env::var_os("LYNX_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("lynx")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lynx")))
            .unwrap_or_else(|| PathBuf::from(".cache/lynx"));
        cache.join("models").join(DEFAULT_MODEL_FILE)
    }
}
