//! The plugins a host serves with: the runtime, and the active plugin, swapped
//! atomically so a request keeps the version it started with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{LoadedPlugin, PluginError, PluginRuntime, PluginSession};

pub struct Plugins {
    pub runtime: PluginRuntime,
    pub dir: PathBuf,
    active: ArcSwap<LoadedPlugin>,
}

impl Plugins {
    /// Loads `DIR/NAME.wasm` as the active plugin.
    pub fn start(runtime: PluginRuntime, dir: &Path, name: &str) -> Result<Self, PluginError> {
        let path = dir.join(format!("{name}.wasm"));
        let plugin = runtime.load(&path)?;
        tracing::info!(plugin = %plugin.name, path = %path.display(), wit = %plugin.wit_version, "plugin loaded");
        Ok(Self {
            runtime,
            dir: dir.to_path_buf(),
            active: ArcSwap::new(plugin),
        })
    }

    pub fn active(&self) -> Arc<LoadedPlugin> {
        self.active.load_full()
    }

    /// Publishes a plugin that passed loading; requests already started keep theirs.
    pub fn publish(&self, plugin: Arc<LoadedPlugin>) {
        self.active.store(plugin);
    }

    /// A fresh sandbox on the active plugin, for one request.
    pub fn session(&self) -> Result<PluginSession, PluginError> {
        self.runtime.session(&self.active())
    }
}
