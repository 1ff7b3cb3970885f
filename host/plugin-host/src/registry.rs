//! The plugin folder as the host serves it: every `.wasm` file in it loaded and
//! validated, and the active plugin (`--plugin NAME`, the file `NAME.wasm`) swapped
//! atomically when its file changes, so a request keeps the version it started with.
//!
//! Load → validate → publish: a file that fails any step is refused and the version
//! already serving keeps serving. Removing the active plugin's file keeps its last good
//! version serving (state `removed`) until a new file arrives: an operator's mistake
//! never takes the server down.
//!
//! A version swapped in is on probation ([`super::probation`]): if it fails on more
//! than the allowed share of its first requests, the registry returns to the last good
//! version on its own and quarantines the bad one's sha256 until the file changes.
//! Requests already running keep the version they started with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;

use super::files::{plugin_name, read_capped, FileRefusal};
use super::prepare::Preparer;
use super::probation::{Probation, ProbationStatus, Verdict};
use super::{LoadedPlugin, PluginError, PluginExec, PluginRuntime, PluginSession};

/// What a plugin file is to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginState {
    /// Serving requests.
    Active,
    /// Loaded and valid, not the one serving.
    Standby,
    /// No valid version was ever loaded from it.
    Refused,
    /// Its file is gone; the active plugin's last good version keeps serving.
    Removed,
}

#[derive(Default)]
struct Entry {
    plugin: Option<Arc<LoadedPlugin>>,
    removed: bool,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    quarantined: Option<Quarantine>,
}

/// A version rolled back by its probation: refused until its file changes.
#[derive(Debug, Clone, Serialize)]
pub struct Quarantine {
    pub sha256: String,
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// One plugin as the admin view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub file: String,
    pub state: PluginState,
    pub wit_version: Option<String>,
    pub sha256: Option<String>,
    /// Seconds since the Unix epoch.
    pub loaded_at: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    pub requests: u64,
    pub traps: u64,
    /// The serving version's probation after a swap.
    pub probation: Option<ProbationStatus>,
    /// A version that was rolled back, refused until the file changes.
    pub quarantined: Option<Quarantine>,
    /// Whether it serves structured outputs (its constraint compiled a JSON object at
    /// load).
    pub structured_outputs: bool,
    /// Its constraint instances prepared and idle now.
    pub warm_constraints: usize,
}

pub struct Plugins {
    pub runtime: PluginRuntime,
    /// Where every plugin call runs.
    pub exec: PluginExec,
    /// Where constraint instances a request needs, and no warm one is left for, are
    /// prepared: off `exec`, so other requests' calls never wait behind them.
    pub preparer: Preparer,
    pub dir: PathBuf,
    active_name: String,
    active: ArcSwap<LoadedPlugin>,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// One reload at a time: the watcher, SIGHUP and the admin API may ask together.
    reloading: Mutex<()>,
    /// The active plugin's version to return to if the serving one fails its probation.
    last_good: Mutex<Option<Arc<LoadedPlugin>>>,
}

/// The most plugin files of the folder loaded at once.
pub const MAX_PLUGIN_FILES: usize = 64;

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Plugins {
    /// Loads every plugin of `dir`; `DIR/NAME.wasm` must load, and serves.
    pub fn start(
        runtime: PluginRuntime,
        exec: PluginExec,
        dir: &Path,
        name: &str,
    ) -> Result<Self, PluginError> {
        let path = dir.join(format!("{name}.wasm"));
        let plugin = runtime.load(&path)?;
        tracing::info!(plugin = %plugin.name, path = %path.display(), wit = %plugin.wit_version, sha256 = %plugin.sha256, source = plugin.source.as_str(), "plugin active");
        let mut entries = BTreeMap::new();
        entries.insert(
            name.to_string(),
            Entry {
                plugin: Some(plugin.clone()),
                ..Entry::default()
            },
        );
        let preparer = Preparer::new(1)
            .map_err(|e| PluginError::Engine(format!("starting the preparing thread: {e}")))?;
        let plugins = Self {
            runtime,
            exec,
            preparer,
            dir: dir.to_path_buf(),
            active_name: name.to_string(),
            active: ArcSwap::new(plugin.clone()),
            entries: Mutex::new(entries),
            reloading: Mutex::new(()),
            last_good: Mutex::new(Some(plugin)),
        };
        for other in plugins.files() {
            if other != name {
                plugins.reload(&other);
            }
        }
        Ok(plugins)
    }

    pub fn active(&self) -> Arc<LoadedPlugin> {
        self.active.load_full()
    }

    pub fn active_name(&self) -> &str {
        &self.active_name
    }

    /// The `endpoint` label `plugin`'s router gives a request: from the version's
    /// cache, else from a transient instance on the pool, taken and given back at once.
    /// None when the router fails (or the pool is full): the request is unmatched.
    pub async fn label(
        self: &Arc<Self>,
        plugin: &Arc<LoadedPlugin>,
        method: &str,
        path: &str,
    ) -> Option<String> {
        if let Some(label) = plugin.labels.get(method, path) {
            return Some(label);
        }
        let (p, version) = (self.clone(), plugin.clone());
        let (m, path_owned) = (method.to_string(), path.to_string());
        let routed = self
            .exec
            .run(move || {
                let mut session = PluginSession::new(&p.runtime, &version)?;
                session.normalize(&m, &path_owned)
            })
            .await
            .and_then(|r| r);
        match routed {
            Ok(label) => {
                plugin.labels.put(method, path, &label);
                Some(label)
            }
            Err(e) => {
                tracing::warn!(plugin = %plugin.name, error = %e, "route normalization failed");
                None
            }
        }
    }

    /// The plugin names of the folder's entries, whatever their type: one that is not
    /// a regular file is refused when read, and the refusal shows in the admin view.
    fn files(&self) -> Vec<String> {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            tracing::warn!(dir = %self.dir.display(), "plugin folder unreadable");
            return Vec::new();
        };
        let mut names: Vec<String> = read
            .filter_map(|e| e.ok())
            .filter_map(|e| plugin_name(&e.path()))
            .collect();
        names.sort();
        // Each file is compiled and kept: a folder flooded with files costs at most
        // this many. The active plugin always counts.
        if names.len() > MAX_PLUGIN_FILES {
            tracing::warn!(
                files = names.len(),
                kept = MAX_PLUGIN_FILES,
                "the plugin folder holds too many plugins; the rest are ignored"
            );
            let active = names.iter().position(|n| *n == self.active_name);
            let mut kept: Vec<String> = names
                .iter()
                .filter(|n| **n != self.active_name)
                .take(MAX_PLUGIN_FILES - 1)
                .cloned()
                .collect();
            if let Some(i) = active {
                kept.push(names[i].clone());
            }
            names = kept;
        }
        names
    }

    /// Starts the thread that acts on probation verdicts: a passed version becomes the
    /// one to return to, a failed one is rolled back.
    pub fn guard(self: &Arc<Self>) -> Result<(), PluginError> {
        let Some(verdicts) = self.runtime.take_verdicts() else {
            return Ok(());
        };
        let plugins = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("lynx-plugin-guard".into())
            .spawn(move || {
                while let Ok((plugin, verdict)) = verdicts.recv() {
                    let Some(plugins) = plugins.upgrade() else {
                        return;
                    };
                    plugins.on_verdict(&plugin, verdict);
                }
            })
            .map_err(|e| PluginError::Engine(format!("starting the plugin guard: {e}")))?;
        Ok(())
    }

    fn on_verdict(&self, plugin: &Arc<LoadedPlugin>, verdict: Verdict) {
        let _one_at_a_time = self.reloading.lock();
        let serving = self.active.load_full();
        if *plugin.name != *self.active_name || serving.sha256 != plugin.sha256 {
            return;
        }
        match verdict {
            Verdict::Passed => {
                tracing::info!(plugin = %plugin.name, sha256 = %plugin.sha256, "plugin passed its probation");
                if let Ok(mut good) = self.last_good.lock() {
                    *good = Some(plugin.clone());
                }
            }
            Verdict::Failed { failed, seen } => {
                let good = self.last_good.lock().ok().and_then(|g| g.clone());
                let Some(good) = good.filter(|g| g.sha256 != plugin.sha256) else {
                    tracing::error!(plugin = %plugin.name, sha256 = %plugin.sha256, failed, seen, "plugin failing its probation, with no good version to return to");
                    return;
                };
                let reason = format!(
                    "version {} failed {failed} of its first {seen} requests (traps, deadlines or invalid results); rolled back to {}",
                    plugin.sha256, good.sha256
                );
                self.active.store(good.clone());
                tracing::error!(plugin = %plugin.name, bad = %plugin.sha256, restored = %good.sha256, failed, seen, "plugin rolled back; its version is quarantined until the file changes");
                let now = SystemTime::now();
                self.update(&plugin.name, |e| {
                    e.plugin = Some(good);
                    e.last_error = Some(reason.clone());
                    e.last_error_at = Some(now);
                    e.quarantined = Some(Quarantine {
                        sha256: plugin.sha256.clone(),
                        reason,
                        at: epoch_secs(now),
                    });
                });
            }
        }
    }

    /// Reloads every file of the folder, and notices files that are gone.
    pub fn reload_all(&self) {
        let files = self.files();
        let known: Vec<String> = self
            .entries
            .lock()
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default();
        for name in known.iter().filter(|n| !files.contains(n)) {
            self.reload(name);
        }
        for name in &files {
            self.reload(name);
        }
    }

    /// Brings the plugin `name` in line with its file: loads a new version (publishing it
    /// if it is the active plugin), records a refusal, or marks it removed.
    ///
    /// The reload lock is not held while the new version compiles and runs its smoke
    /// calls (each under its call deadline): a slow or sleeping candidate cannot hold up
    /// another swap, a rollback or a verdict. It is taken again to publish, and only a
    /// version its file still holds is published.
    pub fn reload(&self, name: &str) {
        let one_at_a_time = self.reloading.lock();
        let path = self.dir.join(format!("{name}.wasm"));
        let bytes = match read_capped(&path, self.runtime.limits.max_file_bytes) {
            Ok(bytes) => bytes,
            Err(FileRefusal::Missing) => {
                self.mark_removed(name);
                return;
            }
            Err(e) => {
                self.refuse(name, &format!("{}: {e}", path.display()));
                return;
            }
        };
        let sha = super::cache::sha256_hex(&bytes);
        let quarantined = self.entries.lock().ok().and_then(|e| {
            e.get(name)
                .and_then(|e| e.quarantined.as_ref())
                .filter(|q| q.sha256 == sha)
                .map(|q| q.reason.clone())
        });
        if let Some(reason) = quarantined {
            tracing::debug!(plugin = name, sha256 = %sha, "quarantined version not reloaded");
            self.update(name, |e| e.last_error = Some(reason));
            return;
        }
        let current = self.entry_plugin(name);
        if current.as_ref().is_some_and(|p| p.sha256 == sha) {
            self.update(name, |e| {
                e.removed = false;
                e.last_error = None;
            });
            return;
        }
        let probation = if name == self.active_name {
            self.runtime.probation()
        } else {
            Probation::exempt()
        };
        drop(one_at_a_time);
        let started = std::time::Instant::now();
        let loaded = self
            .runtime
            .load_bytes(name.to_string(), &path, &bytes, probation);
        let load_ms = started.elapsed().as_millis() as u64;
        let _one_at_a_time = self.reloading.lock();
        let still = read_capped(&path, self.runtime.limits.max_file_bytes)
            .ok()
            .map(|b| super::cache::sha256_hex(&b));
        if still.as_deref() != Some(sha.as_str()) {
            tracing::debug!(plugin = name, sha256 = %sha, "the file changed while its version loaded; the newer one is loaded instead");
            return;
        }
        let current = self.entry_plugin(name);
        if current.as_ref().is_some_and(|p| p.sha256 == sha) {
            return;
        }
        match loaded {
            Ok(plugin) => {
                let previous = current.map(|p| p.sha256.clone());
                self.update(name, |e| {
                    e.plugin = Some(plugin.clone());
                    e.removed = false;
                    e.last_error = None;
                    e.last_error_at = None;
                    e.quarantined = None;
                });
                if name == self.active_name {
                    let outgoing = self.active.load_full();
                    if outgoing.probation.passed() {
                        if let Ok(mut good) = self.last_good.lock() {
                            *good = Some(outgoing);
                        }
                    }
                    self.active.store(plugin.clone());
                    tracing::info!(plugin = name, sha256 = %plugin.sha256, ?previous, source = plugin.source.as_str(), load_ms, "plugin swapped in");
                } else {
                    tracing::info!(plugin = name, sha256 = %plugin.sha256, source = plugin.source.as_str(), load_ms, "plugin loaded (standby)");
                }
            }
            Err(e) => self.refuse(name, &e.to_string()),
        }
    }

    fn entry_plugin(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.entries
            .lock()
            .ok()
            .and_then(|e| e.get(name).and_then(|e| e.plugin.clone()))
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Entry)) {
        if let Ok(mut entries) = self.entries.lock() {
            f(entries.entry(name.to_string()).or_default());
        }
    }

    fn refuse(&self, name: &str, reason: &str) {
        let serving = self.entry_plugin(name).map(|p| p.sha256.clone());
        tracing::warn!(plugin = name, reason, still_serving = ?serving, "plugin file refused");
        self.update(name, |e| {
            e.last_error = Some(reason.to_string());
            e.last_error_at = Some(SystemTime::now());
            e.removed = false;
        });
    }

    fn mark_removed(&self, name: &str) {
        if name == self.active_name {
            tracing::warn!(
                plugin = name,
                "active plugin's file removed; its last good version keeps serving"
            );
            self.update(name, |e| e.removed = true);
        } else if let Ok(mut entries) = self.entries.lock() {
            if entries.remove(name).is_some() {
                tracing::info!(plugin = name, "plugin file removed");
            }
        }
    }

    /// Every plugin of the folder, for the admin view.
    pub fn status(&self) -> Vec<PluginStatus> {
        let Ok(entries) = self.entries.lock() else {
            return Vec::new();
        };
        entries
            .iter()
            .map(|(name, e)| {
                let state = match (&e.plugin, name == &self.active_name) {
                    (_, true) if e.removed => PluginState::Removed,
                    (Some(_), true) => PluginState::Active,
                    (Some(_), false) => PluginState::Standby,
                    (None, _) => PluginState::Refused,
                };
                let p = e.plugin.as_ref();
                PluginStatus {
                    name: name.clone(),
                    file: self.dir.join(format!("{name}.wasm")).display().to_string(),
                    state,
                    wit_version: p.map(|p| p.wit_version.clone()),
                    sha256: p.map(|p| p.sha256.clone()),
                    loaded_at: p.map(|p| epoch_secs(p.loaded_at)),
                    last_error: e.last_error.clone(),
                    last_error_at: e.last_error_at.map(epoch_secs),
                    requests: p.map_or(0, |p| p.requests.load(Ordering::Relaxed)),
                    traps: p.map_or(0, |p| p.traps.load(Ordering::Relaxed)),
                    probation: p.map(|p| p.probation.status()).filter(|s| s.window > 0),
                    quarantined: e.quarantined.clone(),
                    structured_outputs: p.is_some_and(|p| p.constrains.load(Ordering::Acquire)),
                    warm_constraints: p.map_or(0, |p| self.runtime.warm_instances(&p.sha256)),
                }
            })
            .collect()
    }
}
