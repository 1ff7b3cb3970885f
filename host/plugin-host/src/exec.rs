//! Where plugin code runs: a bounded number of blocking threads, never the async
//! workers that serve `/health`, the admin API and every other stream.
//!
//! Why a pool and not wasmtime's async support with epoch yields: the expensive work
//! behind a plugin call is often host code the plugin imports (`host.encode` tokenizes a
//! prompt), which cannot yield, and a guest that yields still burns the same CPU. A
//! fixed number of threads bounds both; calls past it wait their turn asynchronously,
//! holding no thread. The cost is one thread hand-off per call (microseconds).

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{LoadedPlugin, PluginError, PluginSession, Plugins};

/// A bounded pool for plugin calls.
pub struct PluginExec {
    permits: Arc<Semaphore>,
    threads: usize,
}

impl PluginExec {
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        Self {
            permits: Arc::new(Semaphore::new(threads)),
            threads,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on the pool once a thread is free. A panic in `f` is this call's error.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PluginError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PluginError::Engine("the plugin pool is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| PluginError::Engine(format!("plugin call failed: {e}")))
    }
}

/// One request's sandbox, called through the pool. Each call moves the session to a
/// pool thread and back; a call abandoned half-way (its client left) drops it there.
pub struct PooledSession {
    inner: Option<PluginSession>,
    plugins: Arc<Plugins>,
    name: Arc<str>,
}

impl PooledSession {
    /// Instantiates `plugin` (the version the request arrived on) for one request.
    pub async fn open(
        plugins: &Arc<Plugins>,
        plugin: Arc<LoadedPlugin>,
    ) -> Result<Self, PluginError> {
        Self::open_judged(plugins, plugin, true).await
    }

    /// A session whose end does not count toward its version's probation (requests
    /// that generate nothing cannot vouch for a version).
    pub async fn open_unjudged(
        plugins: &Arc<Plugins>,
        plugin: Arc<LoadedPlugin>,
    ) -> Result<Self, PluginError> {
        Self::open_judged(plugins, plugin, false).await
    }

    async fn open_judged(
        plugins: &Arc<Plugins>,
        plugin: Arc<LoadedPlugin>,
        judged: bool,
    ) -> Result<Self, PluginError> {
        let name = plugin.name.clone();
        let p = plugins.clone();
        let session = plugins
            .exec
            .run(move || {
                p.runtime
                    .session(&plugin)
                    .map(|s| if judged { s } else { s.unjudged() })
            })
            .await??;
        Ok(Self {
            inner: Some(session),
            plugins: plugins.clone(),
            name,
        })
    }

    pub fn plugin_name(&self) -> &str {
        &self.name
    }

    /// Counts a fault of this request elsewhere (its constraint) against its version.
    pub fn mark_faulted(&mut self) {
        if let Some(s) = self.inner.as_mut() {
            s.mark_faulted();
        }
    }

    /// Runs `f` on this request's session, on the pool.
    pub async fn call<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut PluginSession) -> Result<R, PluginError> + Send + 'static,
    ) -> Result<R, PluginError> {
        let mut session = self.inner.take().ok_or_else(|| PluginError::Trap {
            plugin: self.name.to_string(),
            detail: "its session was lost to an earlier failure".into(),
        })?;
        let (session, result) = self
            .plugins
            .exec
            .run(move || {
                let result = f(&mut session);
                (session, result)
            })
            .await?;
        self.inner = Some(session);
        result
    }
}
