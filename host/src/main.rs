//! The `lynx-host` binary: reads the configuration, loads the model, starts the
//! scheduler and serves HTTP until interrupted.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use lynx_host::config::Config;
use lynx_host::engine::{Batcher, BatcherConfig, Model};
use lynx_host::{app, metrics, AppState};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).context("--log is not a valid filter")?)
        .init();

    let path = config.model_path();
    if !path.exists() {
        anyhow::bail!(
            "model file {} not found: run scripts/fetch-model.sh for the default model, or pass --model",
            path.display()
        );
    }
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
    let batcher = Batcher::start(
        model.clone(),
        BatcherConfig {
            kv_slots: usize::from(config.kv_slots),
            max_queue: config.max_queue,
        },
    )?;
    metrics::init(&config.model_name);
    let state = Arc::new(AppState {
        model,
        model_name: config.model_name.clone(),
        batcher,
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });

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
