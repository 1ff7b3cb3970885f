//! Building the server from its configuration, and running it: the model and the
//! scheduler, the plugin runtime and folder, the metrics, the public and admin
//! listeners. [`Server::build`] is everything `lynx-host` does before it serves;
//! `main` adds only the command line and the signals.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use lynx_engine::model::DEFAULT_MAX_SEQ_LEN;
use lynx_engine::{Model, Scheduler, SchedulerConfig};
use lynx_plugin_host::cache::ComponentCache;
use lynx_plugin_host::types::ModelInfo;
use lynx_plugin_host::{watch, PluginExec, PluginRuntime, Plugins};
use tokio::net::TcpListener;

use crate::backend::{Backend, Engine};
use crate::config::Config;
use crate::http::admin::admin_app;
use crate::http::serve;
use crate::http::site::SitePolicy;
use crate::{app, metrics, AppState};

/// A server built and bound, not yet serving.
pub struct Server {
    state: Arc<AppState>,
    listener: TcpListener,
    admin: TcpListener,
    admin_app: Router,
    admin_max_connections: usize,
    grace: Duration,
    /// Kept for the life of the server: dropping it ends the folder watch.
    watcher: watch::RecommendedWatcher,
}

impl Server {
    /// Loads the model, starts the scheduler, loads the plugins, and binds both
    /// listeners: every way the configuration can fail, it fails here.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let checked = preflight(&config)?;
        let simd = lynx_engine::qmatmul::cpu::init(config.simd)
            .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
        tracing::info!(
            kernels = ?simd,
            cpu = %lynx_engine::qmatmul::cpu::features(),
            "matmul kernels chosen at run time"
        );
        let path = model_path(&config)?;
        let t0 = Instant::now();
        let model = tokio::task::spawn_blocking(move || Model::load(&path))
            .await
            .context("model loading task")??;
        tracing::info!(
            context = model.context_len,
            vocab = model.tokenizer.vocab_size(),
            seconds = t0.elapsed().as_secs_f64(),
            "model loaded"
        );
        let model = Arc::new(model);
        let scheduler_config = SchedulerConfig {
            kv_slots: usize::from(config.kv_slots),
            max_queue: config.max_queue,
            max_seq_len: max_seq_len(&config, &model),
            kv_dtype: config.kv_dtype,
            prefix_cache: config.prefix_cache,
        };
        let scheduler = Scheduler::start(model.clone(), scheduler_config)?;
        let max_seq_len = scheduler.config().max_seq_len;
        tracing::info!(
            kv_slots = config.kv_slots,
            max_seq_len,
            kv_dtype = ?config.kv_dtype,
            kv_cache_mib = (config.kv_slots as usize
                * max_seq_len
                * model.arch.kv_bytes_per_position(config.kv_dtype))
                >> 20,
            "KV cache allocated"
        );
        let chat_template = match &config.chat_template {
            Some(file) => Some(read_template(file)?),
            None => model.chat_template.clone(),
        };
        let special = |id: Option<u32>| {
            id.and_then(|id| model.tokenizer.piece(id).ok())
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let model_info = ModelInfo {
            architecture: model.architecture.clone(),
            bos_token: special(model.tokenizer.bos_id),
            eos_token: special(Some(model.tokenizer.eos_id)),
            chat_template,
        };
        let engine = Arc::new(Engine { model, scheduler });
        Self::assemble(config, checked, engine, model_info).await
    }

    /// A server over another backend (a test's scripted one): everything
    /// [`Server::build`] does but loading the model.
    pub async fn with_backend(
        config: Config,
        backend: Arc<dyn Backend>,
        model_info: ModelInfo,
    ) -> anyhow::Result<Self> {
        let checked = preflight(&config)?;
        Self::assemble(config, checked, backend, model_info).await
    }

    /// The plugins, the metrics, the state and the listeners, over a backend.
    async fn assemble(
        config: Config,
        (admin_token, cache): Preflight,
        backend: Arc<dyn Backend>,
        model_info: ModelInfo,
    ) -> anyhow::Result<Self> {
        tracing::info!(
            architecture = %model_info.architecture,
            chat_template = model_info.chat_template.is_some(),
            "model info for plugins"
        );
        let max_seq_len = backend.config().max_seq_len;
        let runtime = PluginRuntime::new(
            backend.tokenizer().clone(),
            u32::try_from(max_seq_len).unwrap_or(u32::MAX),
            config.plugin_limits(),
            cache,
        )?
        .with_model_info(model_info);
        let exec = PluginExec::new(config.plugin_threads());
        tracing::info!(threads = exec.threads(), "plugin call pool");
        // Armed before the folder is read, so a file landing meanwhile is not missed.
        let armed = watch::arm(&config.plugins_dir)?;
        // Loading compiles and smoke-calls plugins (WASI blocks on its own): off the
        // async workers.
        let (dir, name) = (config.plugins_dir.clone(), config.plugin.clone());
        let plugins =
            tokio::task::spawn_blocking(move || Plugins::start(runtime, exec, &dir, &name))
                .await
                .context("plugin loading task")?
                .with_context(|| {
                    format!(
                "loading plugin `{}` from {} (scripts/build-plugins.sh builds the default plugins)",
                config.plugin,
                config.plugins_dir.display()
            )
                })?;
        let plugins = Arc::new(plugins);
        // Kept for the life of the server: dropping it ends the watch.
        let watcher = armed.start(plugins.clone())?;
        lynx_plugin_host::constraint::spawn_prewarmer(&plugins)
            .context("starting the constraint prewarmer")?;
        plugins.guard()?;
        metrics::init(&config.model_name);
        let limits = config.limits();
        if limits.fault_injection {
            tracing::warn!("--fault-injection is on: for tests only, never in production");
        }
        let state = Arc::new(
            AppState::new(
                backend,
                config.model_name.clone(),
                plugins,
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                limits,
            )
            .with_site(SitePolicy::new(
                config.listen,
                &config.allowed_hosts,
                &config.cors_origins,
            )),
        );

        let admin = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
        tracing::info!(addr = %admin.local_addr()?, auth = admin_token.is_some(), "admin API");
        let admin_app = admin_app(state.clone(), admin_token);
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        Ok(Self {
            state,
            listener,
            admin,
            admin_app,
            admin_max_connections: config.admin_max_connections as usize,
            grace: Duration::from_secs(config.shutdown_grace),
            watcher,
        })
    }

    /// The address the public API listens on.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The address the admin API listens on.
    pub fn admin_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.admin.local_addr()
    }

    /// The plugin folder and its active plugin (for SIGHUP's reload).
    pub fn plugins(&self) -> &Arc<Plugins> {
        &self.state.plugins
    }

    /// Serves both listeners until `shutdown` resolves, then drains for the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::spawn(serve::serve_admin(
            self.admin,
            self.admin_app,
            self.state.clone(),
            self.admin_max_connections,
        ));
        tracing::info!(
            addr = %self.listener.local_addr()?,
            model = %self.state.model_name,
            "serving"
        );
        let router = app(self.state.clone());
        serve::serve(self.listener, router, self.state, self.grace, shutdown).await;
        tracing::info!("stopped");
        drop(self.watcher);
        Ok(())
    }
}

/// What is checked before anything loads: the admin token, and the compile cache.
type Preflight = (Option<String>, ComponentCache);

fn preflight(config: &Config) -> anyhow::Result<Preflight> {
    let admin_token = config
        .admin_token()
        .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
    if !config.admin_listen.ip().is_loopback() && admin_token.is_none() {
        anyhow::bail!(
            "refusing to start: the admin API would listen on {} (beyond loopback) without a token; set LYNX_ADMIN_TOKEN_FILE (--admin-token-file) or listen on loopback",
            config.admin_listen
        );
    }
    let cache = ComponentCache::on_disk(&config.plugin_cache_dir(), &config.plugins_dir)
        .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
    Ok((admin_token, cache))
}

/// The `--chat-template` file: UTF-8, at most 1 MiB.
fn read_template(file: &std::path::Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(file)
        .with_context(|| format!("reading the chat template {}", file.display()))?;
    anyhow::ensure!(
        bytes.len() <= 1 << 20,
        "the chat template {} is over 1 MiB",
        file.display()
    );
    String::from_utf8(bytes)
        .with_context(|| format!("the chat template {} is not UTF-8", file.display()))
}

/// Positions per slot: `--max-seq-len`, else the model's context capped at
/// [`DEFAULT_MAX_SEQ_LEN`] and to half the available memory.
fn max_seq_len(config: &Config, model: &Model) -> usize {
    if let Some(n) = config.max_seq_len {
        return n as usize;
    }
    let mut n = model.context_len.min(DEFAULT_MAX_SEQ_LEN);
    let per_position =
        usize::from(config.kv_slots) * model.arch.kv_bytes_per_position(config.kv_dtype);
    if let Some(available) = lynx_engine::files::available_memory() {
        let fits = (available / 2) / per_position.max(1);
        if fits < n {
            tracing::warn!(
                max_seq_len = fits,
                "KV cache capped to half the available memory"
            );
            n = fits.max(16);
        }
    }
    n
}

pub fn model_path(config: &Config) -> anyhow::Result<std::path::PathBuf> {
    let path = config.model_path();
    if !path.exists() {
        anyhow::bail!(
            "model file {} not found: run scripts/fetch-model.sh for the default model, or pass --model",
            path.display()
        );
    }
    Ok(path)
}
