//! Watches the plugin folder (`notify`) and reloads what changed. The watch is armed
//! before the folder's first scan, so a file landing during start-up is not missed.
//!
//! Events are debounced per file: a file being written fires many events, and is
//! reloaded once they stop for [`DEBOUNCE`], or at the latest [`MAX_WAIT`] after its
//! first event, so a file touched without end is still reloaded (and cannot hold back
//! another file's swap). A file caught half-written is refused and reloaded again when
//! its writing ends, so the result is always the complete file.
//!
//! The active plugin reloads on the watcher's thread; a standby file reloads on a
//! thread of its own (one at a time per name), so a candidate that takes its smoke
//! calls' full deadlines (a plugin sleeping in `prepare` gets a minute) holds up
//! neither the active plugin's swap nor another file's.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use notify::RecommendedWatcher;
use notify::{RecursiveMode, Watcher};

use super::files::plugin_name;
use super::{PluginError, Plugins};

/// Quiet time after a file's last event before it is reloaded.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// The longest a file's reload waits after its first event, however busy it is.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

type Events = mpsc::Receiver<notify::Result<notify::Event>>;

/// A watch armed on a folder, whose events queue until [`Armed::start`].
pub struct Armed {
    watcher: RecommendedWatcher,
    events: Events,
}

/// Arms the watch on `dir`; events queue from now on.
pub fn arm(dir: &Path) -> Result<Armed, PluginError> {
    let (tx, events) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(tx)
        .map_err(|e| PluginError::Engine(format!("watching the plugin folder: {e}")))?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| {
            PluginError::Engine(format!("watching the plugin folder {}: {e}", dir.display()))
        })?;
    Ok(Armed { watcher, events })
}

impl Armed {
    /// Starts acting on the events (those queued since [`arm`] first); the watch lasts
    /// as long as the returned watcher is kept.
    pub fn start(self, plugins: Arc<Plugins>) -> Result<RecommendedWatcher, PluginError> {
        let events = self.events;
        std::thread::Builder::new()
            .name("lynx-plugin-watch".into())
            .spawn(move || run(&plugins, &events))
            .map_err(|e| PluginError::Engine(format!("starting the plugin watcher: {e}")))?;
        tracing::info!("watching the plugin folder");
        Ok(self.watcher)
    }
}

/// A file's pending reload: when its first and its last event came.
struct Pending {
    first: Instant,
    last: Instant,
}

impl Pending {
    fn due(&self) -> Instant {
        (self.last + DEBOUNCE).min(self.first + MAX_WAIT)
    }
}

/// Standby files being reloaded apart: whether each must be reloaded once more.
type Loading = Arc<Mutex<HashMap<String, bool>>>;

/// Reloads the standby file `name` on a thread of its own; a reload asked for while one
/// runs makes it run once more when it ends (the file may have changed again).
fn reload_apart(plugins: &Arc<Plugins>, loading: &Loading, name: String) {
    if let Ok(mut l) = loading.lock() {
        if let Some(again) = l.get_mut(&name) {
            *again = true;
            return;
        }
        l.insert(name.clone(), false);
    }
    let (p, l) = (plugins.clone(), loading.clone());
    let key = name.clone();
    let spawned = std::thread::Builder::new()
        .name("lynx-plugin-load".into())
        .spawn(move || loop {
            p.reload(&name);
            let Ok(mut loading) = l.lock() else { return };
            if loading.get(&name) == Some(&true) {
                loading.insert(name.clone(), false);
                continue;
            }
            loading.remove(&name);
            return;
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread for a standby reload; reloading inline");
        if let Ok(mut l) = loading.lock() {
            l.remove(&key);
        }
        plugins.reload(&key);
    }
}

fn run(plugins: &Arc<Plugins>, events: &Events) {
    let loading: Loading = Arc::default();
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    loop {
        let now = Instant::now();
        let due: Vec<String> = pending
            .iter()
            .filter(|(_, p)| p.due() <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            pending.remove(&name);
            if name == plugins.active_name() {
                plugins.reload(&name);
            } else {
                reload_apart(plugins, &loading, name);
            }
        }
        let wait = pending
            .values()
            .map(|p| p.due().saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(Duration::from_secs(3600));
        match events.recv_timeout(wait) {
            Ok(Ok(event)) => {
                let now = Instant::now();
                for name in event.paths.iter().filter_map(|p| plugin_name(p)) {
                    tracing::debug!(kind = ?event.kind, %name, "plugin folder event");
                    pending
                        .entry(name)
                        .and_modify(|p| p.last = now)
                        .or_insert(Pending {
                            first: now,
                            last: now,
                        });
                }
            }
            Ok(Err(e)) => {
                // Events may have been lost (e.g. an overflowed queue): look at everything.
                tracing::warn!(error = %e, "plugin folder watch error; reloading the folder");
                plugins.reload_all();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}
