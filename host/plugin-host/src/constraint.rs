//! Token-level control by a plugin (`lynx:plugin@0.3.0`'s `constraint`): a request's
//! constraint runs in an instance of its own, apart from the one that tokenizes and
//! post-processes it, because the scheduler calls it from its step while the HTTP
//! layer calls the other.
//!
//! Instances are kept warm: `prepare` (a plugin indexes the vocabulary there, which
//! takes far longer than a token's deadline) runs once per instance, when the plugin
//! loads, and an instance that served a request without fault serves the next one.
//! A faulted instance is dropped, never reused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::runtime::{idle_priority, LoadedPlugin, PluginRuntime};
use super::session::PluginSession;
use super::types::{OutputFormat, Rejection};
use super::PluginError;
use super::Plugins;
use lynx_engine::constraint::{ConstraintError, Rule, TokenConstraint};

/// The deadline of `prepare`: once per instance, off every request's path.
pub const PREPARE_DEADLINE: Duration = Duration::from_secs(60);
/// How often the prewarmer looks at the active plugin's warm instances.
const PREWARM_EVERY: Duration = Duration::from_millis(200);

/// Keeps `--plugin-warm-constraints` instances of the active plugin prepared, on a
/// thread of its own under `SCHED_IDLE`: it prepares on CPU time the forward pass does
/// not want, one instance at a time, and tops the pool up again as requests take
/// instances from it and after a swap. It ends with the plugins.
pub fn spawn_prewarmer(plugins: &Arc<Plugins>) -> std::io::Result<()> {
    let plugins = Arc::downgrade(plugins);
    std::thread::Builder::new()
        .name("lynx-prewarm".into())
        .spawn(move || {
            idle_priority();
            loop {
                std::thread::sleep(PREWARM_EVERY);
                let Some(plugins) = plugins.upgrade() else {
                    return;
                };
                let active = plugins.active();
                if let Err(e) = plugins.runtime.top_up(&active) {
                    tracing::warn!(plugin = %active.name, error = %e, "preparing a constraint instance failed");
                }
            }
        })
        .map(|_| ())
}

/// Warm constraint instances, by plugin version (sha256), reused request after
/// request. At most `max` are kept in all; past it, those of the version used least
/// recently go first, so a version swapped out loses its instances to the new one.
#[derive(Default)]
pub struct WarmPool {
    /// Most recently used version first.
    inner: Mutex<Vec<(String, Vec<PluginSession>)>>,
    /// Constraint instances serving requests now: they come back when the requests end,
    /// so the prewarmer counts them as ready.
    busy: std::sync::atomic::AtomicUsize,
}

impl WarmPool {
    /// A warm instance of the version `sha256`, with its place in the live count.
    fn take(&self, sha256: &str) -> Option<PluginSession> {
        let mut session = {
            let mut warm = self.inner.lock().ok()?;
            let i = warm.iter().position(|(sha, _)| sha == sha256)?;
            front(&mut warm, i).pop()?
        };
        session.retake_slot().ok()?;
        Some(session)
    }

    /// Keeps `session` for the version `sha256`, unless a call of it failed; past `max`
    /// in all, the least recently used version's go first.
    fn give_back(&self, sha256: &str, mut session: PluginSession, max: usize) {
        if session.poisoned() {
            return;
        }
        session.release_slot();
        let Ok(mut warm) = self.inner.lock() else {
            return;
        };
        let i = match warm.iter().position(|(sha, _)| sha == sha256) {
            Some(i) => i,
            None => {
                warm.push((sha256.to_string(), Vec::new()));
                warm.len() - 1
            }
        };
        front(&mut warm, i).push(session);
        let mut total: usize = warm.iter().map(|(_, s)| s.len()).sum();
        while total > max {
            let Some(last) = warm.last_mut() else { break };
            if last.1.pop().is_some() {
                total -= 1;
            }
            if last.1.is_empty() {
                warm.pop();
            }
        }
    }

    /// Warm instances held now of the version `sha256`.
    fn len_of(&self, sha256: &str) -> usize {
        self.inner.lock().map_or(0, |w| {
            w.iter()
                .find(|(sha, _)| sha == sha256)
                .map_or(0, |(_, s)| s.len())
        })
    }
}

/// Moves the `i`th version to the front (most recently used) and gives its sessions.
fn front(warm: &mut Vec<(String, Vec<PluginSession>)>, i: usize) -> &mut Vec<PluginSession> {
    let entry = warm.remove(i);
    warm.insert(0, entry);
    &mut warm[0].1
}

/// One request's constraint: a plugin instance the scheduler calls at every step.
pub struct Constrained {
    session: Option<PluginSession>,
    sha256: String,
    pool: Arc<WarmPool>,
    max_warm: usize,
}

impl Drop for Constrained {
    fn drop(&mut self) {
        self.pool
            .busy
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if let Some(session) = self.session.take() {
            self.pool.give_back(&self.sha256, session, self.max_warm);
        }
    }
}

impl Constrained {
    fn session(&mut self) -> Result<&mut PluginSession, ConstraintError> {
        self.session
            .as_mut()
            .ok_or_else(|| "the constraint's instance is gone".into())
    }
}

impl TokenConstraint for Constrained {
    fn next(&mut self) -> Result<Rule, ConstraintError> {
        Ok(self.session()?.next_token()?)
    }

    fn taken(&mut self, tokens: &[u32]) -> Result<(), ConstraintError> {
        Ok(self.session()?.taken(tokens)?)
    }
}

impl PluginRuntime {
    /// Warm constraint instances kept (`--plugin-warm-constraints`).
    pub fn max_warm(&self) -> usize {
        self.limits.warm_constraints as usize
    }

    /// A new constraint instance of `plugin`, prepared; `counted` among the live
    /// instances when it is for a request, not when it is to be kept warm.
    pub(super) fn prepared(
        &self,
        plugin: &Arc<LoadedPlugin>,
        counted: bool,
    ) -> Result<PluginSession, PluginError> {
        let started = std::time::Instant::now();
        let mut session =
            PluginSession::with_memory(self, plugin, self.limits.constraint_memory_bytes, counted)?
                .unbudgeted();
        session.prepare(PREPARE_DEADLINE)?;
        // Each request's calls from here on share one budget (`constrain` starts it).
        session.set_budget(self.limits.constraint_budget);
        tracing::info!(
            plugin = %plugin.name,
            ms = started.elapsed().as_millis() as u64,
            memory_mib = session.state().memory_peak >> 20,
            "constraint instance prepared"
        );
        Ok(session)
    }

    /// Prepares one more warm instance of `plugin` if it serves structured outputs and
    /// has fewer than `--plugin-warm-constraints` ready.
    fn top_up(&self, plugin: &Arc<LoadedPlugin>) -> Result<(), PluginError> {
        let busy = self.warm.busy.load(std::sync::atomic::Ordering::Acquire);
        if !plugin.constrains.load(std::sync::atomic::Ordering::Acquire)
            || self.warm.len_of(&plugin.sha256) + busy >= self.max_warm()
        {
            return Ok(());
        }
        let session = self.prepared(plugin, false)?;
        self.keep_warm(plugin, session);
        Ok(())
    }

    /// The prepared, idle constraint instances of the version `sha256`.
    pub fn warm_instances(&self, sha256: &str) -> usize {
        self.warm.len_of(sha256)
    }

    /// Keeps `session` warm for `plugin`'s next constrained request.
    pub(super) fn keep_warm(&self, plugin: &LoadedPlugin, session: PluginSession) {
        self.warm
            .give_back(&plugin.sha256, session, self.max_warm());
    }

    /// A warm constraint instance of `plugin` for a request, if one is left.
    pub fn take_warm(&self, plugin: &Arc<LoadedPlugin>) -> Option<PluginSession> {
        self.warm.take(&plugin.sha256)
    }

    /// A constraint instance prepared for a request, counted among the live ones: for
    /// [`super::Plugins::preparer`]'s threads, never the shared pool.
    pub fn prepare_for_request(
        &self,
        plugin: &Arc<LoadedPlugin>,
    ) -> Result<PluginSession, PluginError> {
        tracing::info!(plugin = %plugin.name, "no warm constraint instance; preparing one for the request");
        self.prepared(plugin, true)
    }

    /// The constraint of one request on `plugin` in `session` (warm or just prepared),
    /// started on `format`; a format the plugin cannot serve is the client's rejection.
    /// The plugin must export the interface ([`LoadedPlugin::has_constraint`]).
    pub fn constraint(
        &self,
        plugin: &Arc<LoadedPlugin>,
        mut session: PluginSession,
        format: &OutputFormat,
    ) -> Result<Result<Constrained, Rejection>, PluginError> {
        let started = std::time::Instant::now();
        let verdict = session.constrain(format)?;
        tracing::debug!(
            plugin = %plugin.name,
            us = started.elapsed().as_micros() as u64,
            "constraint started"
        );
        if let Err(rejection) = verdict {
            self.keep_warm(plugin, session);
            return Ok(Err(rejection));
        }
        self.warm
            .busy
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(Ok(Constrained {
            session: Some(session),
            sha256: plugin.sha256.clone(),
            pool: self.warm.clone(),
            max_warm: self.max_warm(),
        }))
    }
}
