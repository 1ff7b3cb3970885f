//! The `lynx-host` binary: reads the configuration, loads the model and the plugin,
//! starts the scheduler and serves HTTP until interrupted; or runs a subcommand.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use lynx_engine::model::DEFAULT_MAX_SEQ_LEN;
use lynx_engine::{Batcher, BatcherConfig, Model};
use lynx_plugin_host::cache::ComponentCache;
use lynx_plugin_host::types::ModelInfo;
use lynx_plugin_host::{check::check, watch, PluginExec, PluginRuntime, Plugins};
use lynx_server::config::{Cli, Command, Config, PluginCommand};
use lynx_server::http::admin::admin_app;
use lynx_server::http::serve;
use lynx_server::http::site::SitePolicy;
use lynx_server::{app, metrics, AppState};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    lynx_engine::fix_thread_count();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).context("--log is not a valid filter")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // A panic is a bug, but it costs one request, not the server (see the handlers'
    // and the scheduler's catch); it goes to the log as one line like any error.
    std::panic::set_hook(Box::new(|panic| tracing::error!(%panic, "panic")));
    match cli.command {
        Some(Command::Plugin {
            command: PluginCommand::Check { file },
        }) => {
            let path = model_path(&config)?;
            let (tokenizer, context) = Model::read_tokenizer(&path)?;
            let report = check(
                &file,
                Arc::new(tokenizer),
                context as u32,
                config.plugin_limits(),
            )?;
            print!("{report}");
            Ok(())
        }
        None => serve(config).await,
    }
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

/// SIGHUP reloads the plugin folder, as the admin API's reload does.
fn reload_on_sighup(plugins: Arc<Plugins>) -> anyhow::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading plugins");
            let p = plugins.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || p.reload_all()).await {
                tracing::error!(error = %e, "plugin reload failed");
            }
        }
    });
    Ok(())
}

fn model_path(config: &Config) -> anyhow::Result<std::path::PathBuf> {
    let path = config.model_path();
    if !path.exists() {
        anyhow::bail!(
            "model file {} not found: run scripts/fetch-model.sh for the default model, or pass --model",
            path.display()
        );
    }
    Ok(path)
}

async fn serve(config: Config) -> anyhow::Result<()> {
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
    let batcher_config = BatcherConfig {
        kv_slots: usize::from(config.kv_slots),
        max_queue: config.max_queue,
        max_seq_len: max_seq_len(&config, &model),
        kv_dtype: config.kv_dtype,
        prefix_cache: config.prefix_cache,
    };
    let batcher = Batcher::start(model.clone(), batcher_config)?;
    let max_seq_len = batcher.config().max_seq_len;
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
    tracing::info!(
        architecture = %model_info.architecture,
        chat_template = model_info.chat_template.is_some(),
        "model info for plugins"
    );
    let runtime = PluginRuntime::new(
        model.tokenizer.clone(),
        max_seq_len as u32,
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
    let plugins = tokio::task::spawn_blocking(move || Plugins::start(runtime, exec, &dir, &name))
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
    let _watcher = armed.start(plugins.clone())?;
    lynx_plugin_host::constraint::spawn_prewarmer(&plugins)
        .context("starting the constraint prewarmer")?;
    plugins.guard()?;
    reload_on_sighup(plugins.clone())?;
    metrics::init(&config.model_name);
    let limits = config.limits();
    if limits.fault_injection {
        tracing::warn!("--fault-injection is on: for tests only, never in production");
    }
    let state = Arc::new(
        AppState::new(
            model,
            config.model_name.clone(),
            batcher,
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

    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
    tracing::info!(addr = %admin.local_addr()?, auth = admin_token.is_some(), "admin API");
    let admin_app = admin_app(state.clone(), admin_token);
    tokio::spawn(serve::serve_admin(
        admin,
        admin_app,
        state.clone(),
        config.admin_max_connections as usize,
    ));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, model = %config.model_name, "serving");
    let grace = Duration::from_secs(config.shutdown_grace);
    serve::serve(
        listener,
        app(state.clone()),
        state,
        grace,
        serve::shutdown_signal(),
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}
