//! The `lynx-host` binary: the command line, the log, and the signals. Everything it
//! serves is built by [`Server::build`]; `plugin check` validates a plugin offline.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use lynx_engine::Model;
use lynx_plugin_host::{check::check, Plugins};
use lynx_server::config::{Cli, Command, PluginCommand};
use lynx_server::http::serve::shutdown_signal;
use lynx_server::server::{model_path, Server};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    lynx_engine::configure_threads();
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
        None => {
            let server = Server::build(config).await?;
            reload_on_sighup(server.plugins().clone())?;
            server.run(shutdown_signal()).await
        }
    }
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
