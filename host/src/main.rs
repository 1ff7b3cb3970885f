//! The `lynx-host` binary: reads the configuration, loads the model and the plugin,
//! starts the scheduler and serves HTTP until interrupted; or runs a subcommand.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use lynx_host::config::{Cli, Command, Config, PluginCommand};
use lynx_host::engine::{Batcher, BatcherConfig, Model};
use lynx_host::plugins::{check::check, PluginRuntime, Plugins};
use lynx_host::{app, metrics, AppState};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).context("--log is not a valid filter")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
    let runtime = PluginRuntime::new(
        model.tokenizer.clone(),
        model.context_len as u32,
        config.plugin_limits(),
    )?;
    let plugins =
        Plugins::start(runtime, &config.plugins_dir, &config.plugin).with_context(|| {
            format!(
                "loading plugin `{}` from {} (scripts/build-plugins.sh builds the default plugins)",
                config.plugin,
                config.plugins_dir.display()
            )
        })?;
    let batcher = Batcher::start(
        model.clone(),
        BatcherConfig {
            kv_slots: usize::from(config.kv_slots),
            max_queue: config.max_queue,
        },
    )?;
    metrics::init(&config.model_name);
    let state = Arc::new(AppState::new(
        model,
        config.model_name.clone(),
        batcher,
        plugins,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    ));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, model = %config.model_name, "serving");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
