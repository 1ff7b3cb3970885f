//! Watches the plugin folder (`notify`) and reloads what changed. Events are debounced:
//! a file being written fires many events, and is reloaded once they stop. A file
//! caught half-written is refused and reloaded again when its writing ends, so the
//! result is always the complete file.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use super::registry::plugin_name;
use super::{PluginError, Plugins};

/// Quiet time after a file's last event before it is reloaded.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Starts watching; the watch lasts as long as the returned watcher is kept.
pub fn watch(plugins: Arc<Plugins>) -> Result<RecommendedWatcher, PluginError> {
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(tx)
        .map_err(|e| PluginError::Engine(format!("watching the plugin folder: {e}")))?;
    watcher
        .watch(&plugins.dir, RecursiveMode::NonRecursive)
        .map_err(|e| {
            PluginError::Engine(format!(
                "watching the plugin folder {}: {e}",
                plugins.dir.display()
            ))
        })?;
    std::thread::Builder::new()
        .name("lynx-plugin-watch".into())
        .spawn(move || run(&plugins, &rx))
        .map_err(|e| PluginError::Engine(format!("starting the plugin watcher: {e}")))?;
    tracing::info!("watching the plugin folder");
    Ok(watcher)
}

fn run(plugins: &Plugins, rx: &mpsc::Receiver<notify::Result<notify::Event>>) {
    let mut pending = BTreeSet::new();
    let mut due = Instant::now();
    loop {
        let wait = if pending.is_empty() {
            Duration::from_secs(3600)
        } else {
            due.saturating_duration_since(Instant::now())
        };
        match rx.recv_timeout(wait) {
            Ok(Ok(event)) => {
                let names: Vec<String> =
                    event.paths.iter().filter_map(|p| plugin_name(p)).collect();
                if !names.is_empty() {
                    tracing::debug!(kind = ?event.kind, ?names, "plugin folder event");
                    pending.extend(names);
                    due = Instant::now() + DEBOUNCE;
                }
            }
            Ok(Err(e)) => {
                // Events may have been lost (e.g. an overflowed queue): look at everything.
                tracing::warn!(error = %e, "plugin folder watch error; reloading the folder");
                plugins.reload_all();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                for name in std::mem::take(&mut pending) {
                    plugins.reload(&name);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}
