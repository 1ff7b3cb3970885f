//! Command-line and environment configuration: every flag also reads `LYNX_…`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lynx_engine::kv_cache::KvDtype;
use lynx_engine::qmatmul::cpu::SimdChoice;

pub use lynx_engine::files::DEFAULT_MODEL_FILE;
use lynx_engine::files::{cache_dir, default_model_path};

/// lynx: an LLM serving host with an OpenAI-compatible API, Prometheus metrics, and
/// request processing in sandboxed WebAssembly plugins.
#[derive(Debug, Clone, Parser)]
#[command(name = "lynx-host", version)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Plugin tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum PluginCommand {
    /// Validates a plugin offline as the server would load it (compile, WIT version,
    /// linking, smoke call) and prints what it exports and imports.
    Check {
        /// The plugin's .wasm file.
        file: PathBuf,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address of the public listener (API, /health, /metrics).
    #[arg(long, env = "LYNX_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// GGUF model to serve (architecture llama, qwen2, qwen3 or gemma3). Default: the
    /// SmolLM2-135M-Instruct that scripts/fetch-model.sh puts in the cache folder.
    #[arg(long, env = "LYNX_MODEL")]
    pub model: Option<PathBuf>,

    /// Chat template (Jinja, Hugging Face style) to render conversations with, instead
    /// of the model's own `tokenizer.chat_template`. Handed to the policy plugin.
    #[arg(long, env = "LYNX_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,

    /// Name of the served model: the `model` field of requests and responses and the
    /// `model_name` metric label.
    #[arg(long, env = "LYNX_MODEL_NAME", default_value = "smollm2-135m-instruct")]
    pub model_name: String,

    /// SIMD level of the matmul kernels: `auto` picks the integer kernels over repacked
    /// weights at AVX-512 VNNI or else AVX2 (with FMA and F16C), both giving the same
    /// bits, and portable kernels elsewhere; `avx2-candle` keeps candle's arithmetic bit
    /// for bit; a named level refuses to start on a CPU without it.
    #[arg(long, env = "LYNX_SIMD", value_enum, default_value_t = SimdChoice::Auto)]
    pub simd: SimdChoice,

    /// KV cache slots: how many sequences run at once.
    #[arg(long, env = "LYNX_KV_SLOTS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub kv_slots: u16,

    /// Positions per KV slot: the longest prompt + completion served. Default: the
    /// model's context, at most 4096, and at most what fits in half the available memory
    /// at the model's KV shape (layers, KV heads, head size) and `--kv-dtype`.
    #[arg(long, env = "LYNX_MAX_SEQ_LEN", value_parser = clap::value_parser!(u32).range(16..))]
    pub max_seq_len: Option<u32>,

    /// How the KV cache stores keys and values: `f16` (half the memory of `f32`, so twice
    /// the slots fit) or `f32` (bit for bit candle's reference models).
    #[arg(long, env = "LYNX_KV_DTYPE", value_enum, default_value_t = KvDtype::F16)]
    pub kv_dtype: KvDtype,

    /// Automatic prefix caching: a prompt reuses the keys and values of the longest
    /// prefix a slot holds from earlier requests and prefills only the rest (reported
    /// as `usage.prompt_tokens_details.cached_tokens`). Results are the same either way.
    #[arg(long, env = "LYNX_PREFIX_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,

    /// Who shares cached prefixes. `isolated`: a request reuses only prefixes computed
    /// for requests with the same `cache_salt`, and one without a salt shares with
    /// nobody (its own `n` choices excepted), so neither `cached_tokens` nor timing can
    /// tell one client what another sent. `shared`: requests without a salt share one
    /// space (one tenant, or clients that trust each other); salted ones stay apart.
    #[arg(long, env = "LYNX_PREFIX_CACHE_SHARING", value_enum, default_value_t = CacheSharing::Isolated)]
    pub prefix_cache_sharing: CacheSharing,

    /// Requests that may wait for a slot; past this, requests get 503 with Retry-After.
    #[arg(long, env = "LYNX_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// The plugin folder.
    #[arg(long, env = "LYNX_PLUGINS_DIR", default_value = "plugins/dist")]
    pub plugins_dir: PathBuf,

    /// The plugin that serves requests: `<plugins-dir>/<plugin>.wasm`.
    #[arg(long, env = "LYNX_PLUGIN", default_value = "default")]
    pub plugin: String,

    /// The longest one call into a plugin may run, in milliseconds; past it the call is
    /// stopped and its request fails.
    #[arg(long, env = "LYNX_PLUGIN_TIMEOUT_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
    pub plugin_timeout_ms: u64,

    /// The longest all of one request's plugin calls may run together, in milliseconds,
    /// time in host imports (such as encoding the prompt) included; past it the request
    /// fails with a plugin error.
    #[arg(long, env = "LYNX_PLUGIN_BUDGET_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub plugin_budget_ms: u64,

    /// Plugin instances alive at once: one per request between its body and its last
    /// token. Past it, requests get 503 with Retry-After. Default: twice the requests
    /// the scheduler holds (KV slots + queue), at least 16. Each reserves address space
    /// for two linear memories; the total is logged at start, and refused when this
    /// process cannot reserve it.
    #[arg(long, env = "LYNX_PLUGIN_INSTANCES", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub plugin_instances: Option<u32>,

    /// The most memory one constraint instance (structured outputs) may use, in MiB. It
    /// holds an index of the whole vocabulary: about 30 MiB for a 49,152-token
    /// vocabulary, 150 MiB for gemma's 262,144.
    #[arg(long, env = "LYNX_PLUGIN_CONSTRAINT_MEMORY_MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub plugin_constraint_memory_mib: u64,

    /// Constraint instances kept prepared between requests: a structured-output request
    /// that finds none prepares one on its path (0.3 s for SmolLM2's vocabulary, 2 s for
    /// gemma's). Each holds up to `--plugin-constraint-memory-mib`.
    #[arg(long, env = "LYNX_PLUGIN_WARM_CONSTRAINTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub plugin_warm_constraints: u32,

    /// The longest all of one request's constraint calls (structured outputs) may run
    /// together, in milliseconds; past it the request fails, as its plugin's fault.
    #[arg(long, env = "LYNX_PLUGIN_CONSTRAINT_BUDGET_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub plugin_constraint_budget_ms: u64,

    /// The largest plugin file loaded, in bytes; larger files in the plugin folder are
    /// refused (the reason shows in `/admin/plugins`).
    #[arg(long, env = "LYNX_PLUGIN_MAX_BYTES", default_value_t = 32 << 20, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub plugin_max_bytes: u64,

    /// Requests a newly swapped-in plugin version is judged on. If more than
    /// `--plugin-rollback-share` of them fail (trap, deadline, invalid result), the host
    /// returns to the last good version and quarantines the new one until its file
    /// changes. 0 turns rollback off.
    #[arg(long, env = "LYNX_PLUGIN_ROLLBACK_WINDOW", default_value_t = 20)]
    pub plugin_rollback_window: u32,

    /// The share of a new version's first requests that may fail before it is rolled
    /// back (0 to 1).
    #[arg(long, env = "LYNX_PLUGIN_ROLLBACK_SHARE", default_value_t = 0.2, value_parser = share)]
    pub plugin_rollback_share: f64,

    /// What a request meets when the plugin's post-processing fails mid-generation:
    /// `closed` ends it with an error; `open` carries it on with the host's own
    /// post-processing (the default plugin's: UTF-8 assembly and stop sequences) and
    /// logs it. Routing always fails open (the request is labelled `unmatched`); the
    /// prompt policy always fails closed (it is what the operator relies on to refuse).
    #[arg(long, env = "LYNX_PLUGIN_FAILURE_POLICY", value_enum, default_value_t = FailurePolicy::Closed)]
    pub plugin_failure_policy: FailurePolicy,

    /// Threads that run plugin calls (default: one per core). Calls past them wait;
    /// the async workers never run plugin code.
    #[arg(long, env = "LYNX_PLUGIN_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub plugin_threads: Option<u16>,

    /// The most memory one plugin instance may use, in MiB.
    #[arg(long, env = "LYNX_PLUGIN_MEMORY_MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub plugin_memory_mib: u64,

    /// Where compiled plugins are cached by sha256 (default: `plugins` in the lynx cache
    /// folder). It must be owned by the host's user, writable by no one else, and
    /// outside the plugin folder, or the host refuses to start: artifacts are native
    /// code (each is authenticated with a key kept in the folder).
    #[arg(long, env = "LYNX_PLUGIN_CACHE_DIR")]
    pub plugin_cache_dir: Option<PathBuf>,

    /// Address of the admin listener (`/admin/plugins`). Beyond loopback it requires
    /// a token (`--admin-token-file`).
    #[arg(long, env = "LYNX_ADMIN_LISTEN", default_value = "127.0.0.1:9000")]
    pub admin_listen: SocketAddr,

    /// Bearer token the admin API requires (always, when set). Prefer
    /// `--admin-token-file`: a flag shows in `ps`.
    #[arg(
        long,
        env = "LYNX_ADMIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    pub admin_token: Option<String>,

    /// File holding the admin API's bearer token (surrounding whitespace ignored).
    #[arg(long, env = "LYNX_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Open connections to the admin listener at most.
    #[arg(long, env = "LYNX_ADMIN_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub admin_max_connections: u32,

    /// The largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, env = "LYNX_MAX_BODY_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub max_body_bytes: u64,

    /// The largest `max_tokens` a request may ask for; more gets 400 naming this cap.
    /// A request without `max_tokens` gets at most this many.
    #[arg(long, env = "LYNX_MAX_TOKENS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,

    /// The longest a request may take, in seconds, from arrival to its last token; past
    /// it the slot is freed and the answer ends with a timeout error (504, or an error
    /// event in a stream).
    #[arg(long, env = "LYNX_REQUEST_TIMEOUT", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout: u64,

    /// How long a client may take to send a request's headers (on a new connection:
    /// its first request, HTTP/2 preface included), and then its whole body, in
    /// seconds; slower connections are closed (headers) or answered 408 (body).
    #[arg(long, env = "LYNX_CLIENT_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_timeout: u64,

    /// Open connections to the public listener at most; past it, new connections wait
    /// in the listen backlog until one closes.
    #[arg(long, env = "LYNX_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// How long a connection may stay open with no request in flight, in seconds
    /// (HTTP/1 keep-alive, HTTP/2 with no open stream); then it is closed.
    #[arg(long, env = "LYNX_KEEP_ALIVE_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_alive_timeout: u64,

    /// How long a response's ready bytes may wait for its client to take them, in
    /// seconds: a client that takes none for this long (an HTTP/2 window left at 0, an
    /// HTTP/1 socket not read) loses its connection, and everything its requests held
    /// is freed.
    #[arg(long, env = "LYNX_WRITE_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout: u64,

    /// Bytes of a streamed answer held for a client that has not read them yet, in KiB;
    /// generation goes on into it whether the client reads or not, and pauses when it
    /// is full.
    #[arg(long, env = "LYNX_STREAM_BUFFER_KIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(4..=65536))]
    pub stream_buffer_kib: u64,

    /// Plugin instances the requests of one connection may hold at once (a choice of
    /// `n` holds one, two with a structured output); past it, 429.
    #[arg(long, env = "LYNX_MAX_INSTANCES_PER_CONNECTION", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_instances_per_connection: u32,

    /// The most text a plugin may release for one answer, all its choices together, in
    /// bytes; past it the request fails as the plugin's fault.
    #[arg(long, env = "LYNX_MAX_ANSWER_BYTES", default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(1024..=1 << 32))]
    pub max_answer_bytes: u64,

    /// The most messages one chat request may hold; more gets 400.
    #[arg(long, env = "LYNX_MAX_CHAT_MESSAGES", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_chat_messages: u32,

    /// Host names the public API answers (comma-separated; a port is ignored; `*` is
    /// any). Default: when listening on loopback, its own names (`localhost`,
    /// `127.0.0.1`, `::1`), so a web page cannot reach it through DNS rebinding; on any
    /// other address, any name.
    #[arg(long, env = "LYNX_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Browser origins allowed to call the public API (comma-separated, e.g.
    /// `https://app.example.com`; `*` is any). Default: none, so a request carrying an
    /// `Origin` header (a browser's, from a page) is refused; clients that send no
    /// `Origin` (curl, SDKs) are not affected.
    #[arg(long, env = "LYNX_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Streams one HTTP/2 connection may have open at once.
    #[arg(long, env = "LYNX_HTTP2_MAX_STREAMS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_streams: u32,

    /// On SIGTERM/SIGINT, how long in-flight requests may run on, in seconds, before
    /// they are ended with an error event. New connections are refused at once.
    #[arg(long, env = "LYNX_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,

    /// Testing only: prompts `lynx-fault:handler` and `lynx-fault:scheduler` make the
    /// request's handler, or the scheduler while sampling it, panic, to prove a panic
    /// costs only its own request.
    /// Only in a build with the `fault-injection` feature (scripts/test.sh's).
    #[cfg(feature = "fault-injection")]
    #[arg(long, env = "LYNX_FAULT_INJECTION", hide = true)]
    pub fault_injection: bool,

    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info`, `lynx_engine=debug`).
    #[arg(long, env = "LYNX_LOG", default_value = "info")]
    pub log: String,
}

/// Who shares cached prefixes (`--prefix-cache-sharing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheSharing {
    Isolated,
    Shared,
}

/// Whether a failing stage of a plugin fails its request (closed) or is bypassed (open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    Closed,
    Open,
}

fn share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("a share between 0 and 1".into())
    }
}

impl Config {
    /// The model path: `--model`, else the default model in the cache folder.
    pub fn model_path(&self) -> PathBuf {
        if let Some(path) = &self.model {
            return path.clone();
        }
        default_model_path()
    }

    /// The compiled-plugin cache folder.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.plugin_cache_dir
            .clone()
            .unwrap_or_else(|| cache_dir().join("plugins"))
    }
}

impl Config {
    /// What a request may ask and how long it may take.
    pub fn limits(&self) -> crate::http::Limits {
        crate::http::Limits {
            max_body_bytes: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            max_tokens: self.max_tokens as usize,
            request_timeout: std::time::Duration::from_secs(self.request_timeout),
            client_timeout: std::time::Duration::from_secs(self.client_timeout),
            keep_alive_timeout: std::time::Duration::from_secs(self.keep_alive_timeout),
            max_connections: self.max_connections as usize,
            http2_max_streams: self.http2_max_streams,
            write_timeout: std::time::Duration::from_secs(self.write_timeout),
            stream_buffer_bytes: (self.stream_buffer_kib as usize) << 10,
            instances_per_connection: self.max_instances_per_connection,
            max_answer_bytes: usize::try_from(self.max_answer_bytes).unwrap_or(usize::MAX),
            max_chat_messages: self.max_chat_messages as usize,
            shared_cache: self.prefix_cache_sharing == CacheSharing::Shared,
            postprocess_fail_open: self.plugin_failure_policy == FailurePolicy::Open,
            fault_injection: self.fault_injection(),
        }
    }

    /// `--fault-injection`, in a build that has it.
    fn fault_injection(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.fault_injection;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    pub fn plugin_limits(&self) -> lynx_plugin_host::PluginLimits {
        lynx_plugin_host::PluginLimits {
            call_timeout: std::time::Duration::from_millis(self.plugin_timeout_ms),
            request_budget: std::time::Duration::from_millis(self.plugin_budget_ms),
            memory_bytes: (self.plugin_memory_mib as usize) << 20,
            instances: self.plugin_instances(),
            constraint_memory_bytes: (self.plugin_constraint_memory_mib as usize) << 20,
            warm_constraints: self.plugin_warm_constraints,
            constraint_budget: std::time::Duration::from_millis(self.plugin_constraint_budget_ms),
            max_file_bytes: self.plugin_max_bytes,
            rollback_window: self.plugin_rollback_window,
            rollback_share: self.plugin_rollback_share,
        }
    }

    /// `--plugin-instances`, else twice the requests the scheduler holds.
    pub fn plugin_instances(&self) -> u32 {
        self.plugin_instances.unwrap_or_else(|| {
            let queue = u32::try_from(self.max_queue).unwrap_or(u32::MAX);
            let held = u32::from(self.kv_slots).saturating_add(queue);
            held.saturating_mul(2).clamp(16, 65536)
        })
    }

    /// The admin token, from `--admin-token` or `--admin-token-file`; an empty one is
    /// refused.
    pub fn admin_token(&self) -> Result<Option<String>, String> {
        let token = match (&self.admin_token, &self.admin_token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("reading the admin token file {}: {e}", file.display()))?
                .trim()
                .to_string(),
            // clap reads an empty variable as unset; an operator who set it meant a token.
            (None, None) if std::env::var_os("LYNX_ADMIN_TOKEN").is_some() => String::new(),
            (None, None) => return Ok(None),
        };
        if token.trim().is_empty() {
            return Err(
                "the admin token is empty: set a real one (--admin-token-file) or none at all"
                    .into(),
            );
        }
        if token.len() < 16 {
            tracing::warn!("the admin token is shorter than 16 characters");
        }
        Ok(Some(token))
    }

    /// Threads for plugin calls: `--plugin-threads`, else one per core.
    pub fn plugin_threads(&self) -> usize {
        self.plugin_threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            usize::from,
        )
    }
}
