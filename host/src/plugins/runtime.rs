//! The wasmtime host: one engine (component model, epoch interruption driven by a ticker
//! thread, pooling allocator), one linker holding only the lynx imports, and loading:
//! compile → check the WIT version → link (any other import traps when called) →
//! pre-instantiate → smoke call. Only a plugin that passes every step is served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::cache::{sha256_hex, ComponentCache, Source};
use super::session::PluginSession;
use super::state::{HostState, LogLimiter};
use super::world::{ChatMessage, Plugin, PluginPre, PolicyRequest, PostConfig, Prompt};
use super::world::{WIT_PACKAGE, WIT_VERSION};
use super::PluginError;
use crate::engine::tokenizer::Tokenizer;

/// How often the epoch advances: the granularity of call deadlines.
const TICK: Duration = Duration::from_millis(5);
/// Epoch ticks in `d` (at least one): a deadline as the engine counts it.
pub(crate) fn epoch_ticks(d: Duration) -> u64 {
    (d.as_nanos() / TICK.as_nanos()).max(1) as u64
}

/// Router labels kept per plugin version: past it, labels are computed, not cached.
const MAX_CACHED_LABELS: usize = 1024;
/// Guard pages after each linear memory.
const GUARD_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    /// The longest one call into a plugin may run.
    pub call_timeout: Duration,
    /// The longest all of one request's plugin calls may run together, host imports
    /// included.
    pub request_budget: Duration,
    /// The most linear memory one plugin instance may have.
    pub memory_bytes: usize,
    /// Plugin instances alive at once (one per request being processed).
    pub instances: u32,
}

impl PluginLimits {
    pub fn memory_mib(&self) -> u64 {
        (self.memory_bytes >> 20) as u64
    }
}

pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    tokenizer: Arc<Tokenizer>,
    pub limits: PluginLimits,
    /// The model's context (positions per slot): told to policies, and the limit past
    /// which `host.encode` refuses a text unencoded.
    context_length: u32,
    cache: ComponentCache,
    /// Instances alive now, of `limits.instances`.
    live: Arc<AtomicUsize>,
}

/// Router labels by (method, path): a router is a pure function of its arguments (an
/// instance is fresh per request and reaches no clock or randomness), so one version's
/// answers can be kept.
#[derive(Default)]
pub struct LabelCache(Mutex<HashMap<(String, String), String>>);

impl LabelCache {
    pub fn get(&self, method: &str, path: &str) -> Option<String> {
        let labels = self.0.lock().ok()?;
        labels.get(&(method.to_string(), path.to_string())).cloned()
    }

    pub fn put(&self, method: &str, path: &str, label: &str) {
        if let Ok(mut labels) = self.0.lock() {
            if labels.len() < MAX_CACHED_LABELS {
                labels.insert((method.to_string(), path.to_string()), label.to_string());
            }
        }
    }
}

/// A plugin that passed loading, ready to instantiate per request.
pub struct LoadedPlugin {
    pub name: Arc<str>,
    pub path: PathBuf,
    pub wit_version: String,
    /// The sha256 of the file it was loaded from: its version.
    pub sha256: String,
    /// Whether it was compiled or came from a cache.
    pub source: Source,
    pub loaded_at: SystemTime,
    pub requests: AtomicU64,
    pub traps: AtomicU64,
    pub labels: LabelCache,
    pub(crate) log: Arc<LogLimiter>,
    pub(crate) pre: PluginPre<HostState>,
    pub(crate) component: Component,
}

fn engine_error(e: impl std::fmt::Display) -> PluginError {
    PluginError::Engine(e.to_string())
}

impl PluginRuntime {
    /// The engine and linker; compiled plugins are cached under `cache_dir` if given.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        context_length: u32,
        limits: PluginLimits,
        cache_dir: Option<PathBuf>,
    ) -> Result<Self, PluginError> {
        let instances = limits.instances.max(1);
        let memories = instances.saturating_mul(2);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(4))
            .total_memories(memories)
            .total_tables(instances.saturating_mul(4))
            .max_memory_size(limits.memory_bytes);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .memory_reservation(limits.memory_bytes as u64)
            .memory_guard_size(GUARD_BYTES as u64)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(engine_error)?;
        let reserved = (memories as u64) * (limits.memory_bytes + GUARD_BYTES) as u64;
        tracing::info!(
            instances,
            memories,
            memory_mib = limits.memory_mib(),
            reserved_address_space_mib = reserved >> 20,
            "plugin instance pool reserved"
        );

        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("lynx-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(engine_error)?;

        let mut linker = Linker::new(&engine);
        Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(engine_error)?;
        Ok(Self {
            engine,
            linker,
            tokenizer,
            limits,
            context_length,
            cache: ComponentCache::new(cache_dir),
            live: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub(crate) fn live_instances(&self) -> &Arc<AtomicUsize> {
        &self.live
    }

    /// Instances alive now, and the most the pool holds.
    pub fn instances(&self) -> (usize, usize) {
        (
            self.live.load(std::sync::atomic::Ordering::Acquire),
            self.limits.instances as usize,
        )
    }

    pub fn context_length(&self) -> usize {
        self.context_length as usize
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A sandbox for one request on `plugin`.
    pub fn session(&self, plugin: &Arc<LoadedPlugin>) -> Result<PluginSession, PluginError> {
        plugin
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        PluginSession::new(self, plugin)
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Loads the plugin at `path`; its name is the file's stem.
    pub fn load(&self, path: &Path) -> Result<Arc<LoadedPlugin>, PluginError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| PluginError::Invalid {
            file: file.clone(),
            detail: format!("reading it: {e}"),
        })?;
        let name = path
            .file_stem()
            .map_or_else(|| file.clone(), |s| s.to_string_lossy().into_owned());
        self.load_bytes(name, path, &bytes)
    }

    /// Loads a plugin from its bytes; `path` is where they came from, for messages.
    pub fn load_bytes(
        &self,
        name: String,
        path: &Path,
        bytes: &[u8],
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let file = path.display().to_string();
        let sha256 = sha256_hex(bytes);
        let (component, source) =
            self.cache
                .get(&self.engine, &sha256, bytes)
                .map_err(|e| PluginError::Invalid {
                    file: file.clone(),
                    detail: format!("not a valid WebAssembly component: {e}"),
                })?;
        let wit_version = self.check_version(&file, &component)?;
        let mut linker = self.linker.clone();
        // WASI and any other import links, but traps if called: a plugin reaches
        // nothing but the lynx imports.
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(|e| PluginError::Invalid {
                file: file.clone(),
                detail: format!("{e:#}"),
            })?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(PluginPre::new)
            .map_err(|e| PluginError::Invalid {
                file: file.clone(),
                detail: format!("{e:#}"),
            })?;
        let plugin = Arc::new(LoadedPlugin {
            name: name.into(),
            path: path.to_path_buf(),
            wit_version,
            sha256,
            source,
            loaded_at: SystemTime::now(),
            requests: AtomicU64::new(0),
            traps: AtomicU64::new(0),
            labels: LabelCache::default(),
            log: Arc::new(LogLimiter::default()),
            pre,
            component,
        });
        self.smoke(&plugin).map_err(|e| PluginError::SmokeFailed {
            file,
            detail: e.to_string(),
        })?;
        Ok(plugin)
    }

    /// The plugin's `lynx:plugin` version: every lynx interface it uses must be ours.
    fn check_version(&self, file: &str, component: &Component) -> Result<String, PluginError> {
        let ty = component.component_type();
        let names: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .chain(ty.exports(&self.engine).map(|(n, _)| n.to_string()))
            .collect();
        let ours = major_minor(WIT_VERSION);
        let mut found = None;
        for name in &names {
            let Some(rest) = name.strip_prefix(&format!("{WIT_PACKAGE}/")) else {
                continue;
            };
            let version = rest.split_once('@').map_or("", |(_, v)| v);
            if major_minor(version) != ours {
                return Err(PluginError::IncompatibleVersion {
                    file: file.to_string(),
                    found: if version.is_empty() {
                        "(unversioned)".into()
                    } else {
                        version.to_string()
                    },
                    expected: WIT_VERSION.to_string(),
                });
            }
            found = Some(version.to_string());
        }
        found.ok_or_else(|| PluginError::Invalid {
            file: file.to_string(),
            detail: format!("it uses no {WIT_PACKAGE}@{WIT_VERSION} interface"),
        })
    }

    /// One request's worth of calls on a sample conversation.
    fn smoke(&self, plugin: &Arc<LoadedPlugin>) -> Result<(), PluginError> {
        let mut session = PluginSession::new(self, plugin)?;
        session.normalize("GET", "/v1/models")?;
        let request = PolicyRequest {
            prompt: Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "Hello".into(),
            }]),
            context_length: self.context_length,
            max_tokens: Some(16),
        };
        let first = match session.tokenize(&request)? {
            Ok(ids) => ids.first().copied().unwrap_or(0),
            Err(_) => 0,
        };
        session.start(&PostConfig { stops: vec![] })?;
        session.push(first)?;
        session.finish()?;
        Ok(())
    }
}

fn major_minor(version: &str) -> (&str, &str) {
    let mut parts = version.split('.');
    (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
}
