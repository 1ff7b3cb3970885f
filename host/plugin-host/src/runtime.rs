//! The wasmtime host: one engine (component model, epoch interruption driven by a ticker
//! thread, pooling allocator whose totals are computed, logged and checked against the
//! machine at start), one linker holding the lynx imports and deny-by-default WASI, and
//! loading: compile (on an idle-priority thread of its own, never the scheduler's pool) →
//! check the WIT version → link (a plugin importing anything else is refused) →
//! pre-instantiate → smoke call. Only a plugin that passes every step is served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::cache::{sha256_hex, ComponentCache, Source};
use super::constraint::WarmPool;
use super::files::read_capped;
use super::latest::WIT_VERSION;
use super::probation::{Probation, Verdict};
use super::session::PluginSession;
use super::state::{HostState, LogLimiter};
use super::types::{
    ChatMessage, ModelInfo, OutputFormat, PolicyRequest, PostConfig, Prompt, Vocabulary,
};
use super::versions::{self, Linked, WIT_PACKAGE};
use super::PluginError;
use lynx_engine::tokenizer::Tokenizer;

/// How often the epoch advances: the granularity of call deadlines.
const TICK: Duration = Duration::from_millis(5);
/// Epoch ticks in `d` (at least one): a deadline as the engine counts it.
pub(crate) fn epoch_ticks(d: Duration) -> u64 {
    (d.as_nanos() / TICK.as_nanos()).max(1) as u64
}

/// Router labels kept per plugin version: past it, labels are computed, not cached.
const MAX_CACHED_LABELS: usize = 1024;
/// The longest path (and label) a version's label cache keeps.
const MAX_CACHED_PATH_BYTES: usize = 512;
/// Guard pages after each linear memory.
const GUARD_BYTES: usize = 64 << 10;
/// What one plugin component may hold: a Rust component has one memory (two with a
/// WASI adapter module), a handful of core instances (its module, shims, adapters)
/// and tables. More is refused at instantiation.
const MEMORIES_PER_COMPONENT: u32 = 2;
const TABLES_PER_COMPONENT: u32 = 4;
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;
/// Elements one table may hold (each a pointer in the reservation).
const TABLE_ELEMENTS: usize = 20_000;
/// The most address space the pool may reserve: half the 47-bit user space of
/// x86-64 and aarch64 Linux.
const MAX_RESERVATION: u64 = 1 << 46;

#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    /// The longest one call into a plugin may run.
    pub call_timeout: Duration,
    /// The longest all of one request's plugin calls may run together, host imports
    /// included.
    pub request_budget: Duration,
    /// The most linear memory one plugin instance may have.
    pub memory_bytes: usize,
    /// Plugin instances alive at once (one per request being processed, and one more
    /// per request with a constraint).
    pub instances: u32,
    /// The most linear memory one constraint instance may have: it holds an index of
    /// the whole vocabulary.
    pub constraint_memory_bytes: usize,
    /// Constraint instances kept prepared between requests (beyond `instances`).
    pub warm_constraints: u32,
    /// The time all of one request's constraint calls may take together.
    pub constraint_budget: Duration,
    /// The largest plugin file read.
    pub max_file_bytes: u64,
    /// Requests a swapped-in version is judged on, and the share of them that may fail
    /// before the host returns to the last good version.
    pub rollback_window: u32,
    pub rollback_share: f64,
}

/// The address space the instance pool reserves for `limits`, in bytes.
fn pool_reservation(limits: &PluginLimits) -> u64 {
    let instances = u64::from(limits.pool_instances());
    let memories = instances * u64::from(MEMORIES_PER_COMPONENT);
    let tables = instances * u64::from(TABLES_PER_COMPONENT);
    memories.saturating_mul((limits.slot_memory_bytes() + GUARD_BYTES) as u64)
        + tables * (TABLE_ELEMENTS * std::mem::size_of::<usize>()) as u64
}

/// Refuses limits whose reservation this process cannot make: past `RLIMIT_AS` (half
/// of it: the model and the KV cache need the rest) or past [`MAX_RESERVATION`].
fn check_reservation(limits: &PluginLimits) -> Result<u64, PluginError> {
    let reserved = pool_reservation(limits);
    let mut rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rlimit) } == 0;
    let cap = if ok && rlimit.rlim_cur != libc::RLIM_INFINITY {
        (rlimit.rlim_cur / 2).min(MAX_RESERVATION)
    } else {
        MAX_RESERVATION
    };
    if reserved > cap {
        return Err(PluginError::Engine(format!(
            "the plugin instance pool would reserve {} GiB of address space ({} instances x {} memories x {} MiB), more than this process can ({} GiB); lower --plugin-instances, --plugin-memory-mib or --plugin-constraint-memory-mib",
            reserved >> 30,
            limits.pool_instances(),
            MEMORIES_PER_COMPONENT,
            limits.slot_memory_bytes() >> 20,
            cap >> 30
        )));
    }
    Ok(reserved)
}

/// Puts the calling thread under `SCHED_IDLE` (nice 19 where that cannot be set).
pub(crate) fn idle_priority() {
    // SAFETY: these calls take plain values (and a parameter struct that outlives them)
    // and only change this thread's scheduling; on Linux, pid 0 and a thread id name
    // this thread alone.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
    }
}

/// Runs a compile on a thread of its own under `SCHED_IDLE`: it runs only on CPU time
/// that nothing else wants, so the model's forward pass (on its own pool) is never
/// slowed by it; under full load a compile takes longer instead. Where the policy cannot
/// be set, the thread runs at nice 19.
fn compile_apart<T: Send>(f: impl FnOnce() -> wasmtime::Result<T> + Send) -> wasmtime::Result<T> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("lynx-compile".into())
            .spawn_scoped(scope, || {
                idle_priority();
                f()
            })
            .map_err(|e| wasmtime::Error::msg(format!("starting a compile thread: {e}")))?;
        handle
            .join()
            .map_err(|_| wasmtime::Error::msg("the compile thread panicked"))?
    })
}

impl PluginLimits {
    pub fn memory_mib(&self) -> u64 {
        (self.memory_bytes >> 20) as u64
    }

    /// The largest memory any instance may have: what each pool slot reserves.
    fn slot_memory_bytes(&self) -> usize {
        self.memory_bytes.max(self.constraint_memory_bytes)
    }

    /// Pool slots: the live instances, the warm constraint instances, and the one the
    /// prewarmer may be preparing.
    fn pool_instances(&self) -> u32 {
        self.instances
            .max(1)
            .saturating_add(self.warm_constraints)
            .saturating_add(1)
    }
}

/// A version's probation verdict, as a request session reports it.
pub(crate) type VerdictReport = (Arc<LoadedPlugin>, Verdict);

pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    tokenizer: Arc<Tokenizer>,
    model_info: Arc<ModelInfo>,
    vocabulary: Arc<Vocabulary>,
    /// Constraint instances kept warm between requests.
    pub(super) warm: Arc<WarmPool>,
    pub limits: PluginLimits,
    /// The model's context (positions per slot): told to policies, and the limit past
    /// which `host.encode` refuses a text unencoded.
    context_length: u32,
    cache: ComponentCache,
    /// Instances alive now, of `limits.instances`.
    live: Arc<AtomicUsize>,
    /// Where request sessions report a probation's verdict.
    verdicts: std::sync::mpsc::Sender<VerdictReport>,
    verdicts_rx: Mutex<Option<std::sync::mpsc::Receiver<VerdictReport>>>,
    /// Each plugin name's log allowance (names are capped by the plugin folder's cap).
    log_limiters: Mutex<HashMap<String, Arc<LogLimiter>>>,
}

/// Router labels by (method, path): a router is a pure function of its arguments (the
/// WIT says so; an instance is fresh per request), so one version's answers can be
/// kept.
#[derive(Default)]
pub struct LabelCache(Mutex<HashMap<(String, String), String>>);

impl LabelCache {
    pub fn get(&self, method: &str, path: &str) -> Option<String> {
        let labels = self.0.lock().ok()?;
        labels.get(&(method.to_string(), path.to_string())).cloned()
    }

    pub fn put(&self, method: &str, path: &str, label: &str) {
        // Long paths are labelled afresh each time rather than kept: the cache stays
        // within 1,024 x 512 bytes per version whatever clients send.
        if path.len() > MAX_CACHED_PATH_BYTES || label.len() > MAX_CACHED_PATH_BYTES {
            return;
        }
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
    /// Its first requests after a swap, judged for a rollback.
    pub probation: Probation,
    pub(crate) log: Arc<LogLimiter>,
    pub(crate) pre: Box<dyn Linked>,
    pub(crate) component: Component,
    /// Its constraint served the smoke call's JSON: instances are worth keeping warm.
    pub(crate) constrains: std::sync::atomic::AtomicBool,
}

impl LoadedPlugin {
    /// Whether it exports token-level control (`constraint`, from 0.3.0): whether it
    /// can serve structured outputs.
    pub fn has_constraint(&self) -> bool {
        self.pre.has_constraint()
    }
}

fn engine_error(e: impl std::fmt::Display) -> PluginError {
    PluginError::Engine(e.to_string())
}

impl PluginRuntime {
    /// The engine and linker; compiled plugins are kept in `cache`. Refuses limits the
    /// process cannot reserve.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        context_length: u32,
        limits: PluginLimits,
        cache: ComponentCache,
    ) -> Result<Self, PluginError> {
        let reserved = check_reservation(&limits)?;
        let instances = limits.pool_instances();
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
            .total_memories(instances.saturating_mul(MEMORIES_PER_COMPONENT))
            .total_tables(instances.saturating_mul(TABLES_PER_COMPONENT))
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .max_tables_per_component(TABLES_PER_COMPONENT)
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
            .table_elements(TABLE_ELEMENTS)
            .max_memory_size(limits.slot_memory_bytes());
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            // Compiles run on the calling (low-priority) thread, not on rayon's global
            // pool, which the model's forward pass uses.
            .parallel_compilation(false)
            .memory_reservation(limits.slot_memory_bytes() as u64)
            .memory_guard_size(GUARD_BYTES as u64)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(engine_error)?;
        let worst_case = u64::from(limits.instances) * limits.memory_bytes as u64
            + u64::from(limits.warm_constraints) * limits.constraint_memory_bytes as u64;
        tracing::info!(
            instances,
            memories_per_instance = MEMORIES_PER_COMPONENT,
            memory_mib = limits.memory_mib(),
            reserved_address_space_mib = reserved >> 20,
            worst_case_resident_mib = worst_case >> 20,
            "plugin instance pool reserved"
        );
        if lynx_engine::files::available_memory().is_some_and(|m| worst_case > m as u64) {
            tracing::warn!(
                worst_case_resident_mib = worst_case >> 20,
                "every plugin instance at its memory cap would not fit in the available memory"
            );
        }

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
        // Every version's imports in one linker: their names differ by version.
        for version in &versions::VERSIONS {
            (version.add_to_linker)(&mut linker).map_err(engine_error)?;
        }
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_error)?;
        super::wasi::add_bounded_clocks(&mut linker).map_err(engine_error)?;
        let (verdicts, verdicts_rx) = std::sync::mpsc::channel();
        Ok(Self {
            engine,
            linker,
            vocabulary: Arc::new(Vocabulary::of(&tokenizer)),
            warm: Arc::default(),
            tokenizer,
            model_info: Arc::new(ModelInfo::default()),
            limits,
            context_length,
            cache,
            live: Arc::new(AtomicUsize::new(0)),
            verdicts,
            verdicts_rx: Mutex::new(Some(verdicts_rx)),
            log_limiters: Mutex::default(),
        })
    }

    /// The log allowance of the plugin `name`, shared by all its versions: a plugin
    /// cannot reset its rate limit by being swapped.
    fn log_limiter(&self, name: &str) -> Arc<LogLimiter> {
        let Ok(mut limiters) = self.log_limiters.lock() else {
            return Arc::new(LogLimiter::default());
        };
        limiters.entry(name.to_string()).or_default().clone()
    }

    /// The verdicts' receiving end, taken once by the registry.
    pub(crate) fn take_verdicts(&self) -> Option<std::sync::mpsc::Receiver<VerdictReport>> {
        self.verdicts_rx.lock().ok().and_then(|mut r| r.take())
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

    /// A sandbox for one request on `plugin`; how it ends counts toward the version's
    /// probation.
    pub fn session(&self, plugin: &Arc<LoadedPlugin>) -> Result<PluginSession, PluginError> {
        plugin
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        PluginSession::new(self, plugin).map(|s| s.judged(self.verdicts.clone()))
    }

    /// What plugins are told of the served model (none of it until set).
    pub fn with_model_info(mut self, info: ModelInfo) -> Self {
        self.model_info = Arc::new(info);
        self
    }

    pub fn model_info(&self) -> &Arc<ModelInfo> {
        &self.model_info
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn vocabulary(&self) -> &Arc<Vocabulary> {
        &self.vocabulary
    }

    /// Loads the plugin at `path` (a regular file within the size cap); its name is
    /// the file's stem. Not on probation: there is nothing to go back to.
    pub fn load(&self, path: &Path) -> Result<Arc<LoadedPlugin>, PluginError> {
        let file = path.display().to_string();
        let bytes =
            read_capped(path, self.limits.max_file_bytes).map_err(|e| PluginError::Invalid {
                file: file.clone(),
                detail: e.to_string(),
            })?;
        let name = path
            .file_stem()
            .map_or_else(|| file.clone(), |s| s.to_string_lossy().into_owned());
        self.load_bytes(name, path, &bytes, Probation::exempt())
    }

    /// A probation for a version swapped in, by the configured window and share.
    pub fn probation(&self) -> Probation {
        Probation::new(self.limits.rollback_window, self.limits.rollback_share)
    }

    /// Loads a plugin from its bytes; `path` is where they came from, for messages.
    pub fn load_bytes(
        &self,
        name: String,
        path: &Path,
        bytes: &[u8],
        probation: Probation,
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let file = path.display().to_string();
        let sha256 = sha256_hex(bytes);
        let (cache, engine) = (&self.cache, &self.engine);
        let (component, source) =
            compile_apart(|| cache.get(engine, &sha256, bytes)).map_err(|e| {
                PluginError::Invalid {
                    file: file.clone(),
                    detail: format!("not a valid WebAssembly component: {e}"),
                }
            })?;
        let wit_version = self.check_version(&file, &component)?;
        // A plugin importing anything beyond the lynx interfaces and WASI is refused
        // here, at load, naming the import: nothing it could reach goes unchecked.
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(|pre| match versions::find(&wit_version) {
                Some(version) => (version.link)(pre),
                None => Err(wasmtime::format_err!(
                    "lynx:plugin@{wit_version} is not loaded"
                )),
            })
            .map_err(|e| PluginError::Invalid {
                file: file.clone(),
                detail: super::state::escape_log(&format!("{e:#}")),
            })?;
        let log = self.log_limiter(&name);
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
            probation,
            log,
            pre,
            component,
            constrains: Default::default(),
        });
        self.smoke(&plugin).map_err(|e| PluginError::SmokeFailed {
            file,
            detail: e.to_string(),
        })?;
        Ok(plugin)
    }

    /// The plugin's `lynx:plugin` version: every lynx interface it uses must be of one
    /// version this host loads (the current one or a released older one).
    fn check_version(&self, file: &str, component: &Component) -> Result<String, PluginError> {
        let ty = component.component_type();
        let names: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .chain(ty.exports(&self.engine).map(|(n, _)| n.to_string()))
            .collect();
        let mut found: Option<&str> = None;
        for name in &names {
            let Some(rest) = name.strip_prefix(&format!("{WIT_PACKAGE}/")) else {
                continue;
            };
            let version = rest.split_once('@').map_or("", |(_, v)| v);
            let known = versions::VERSIONS
                .iter()
                .map(|v| v.wit)
                .find(|v| major_minor(v) == major_minor(version));
            match (known, found) {
                (Some(v), None) => found = Some(v),
                (Some(v), Some(f)) if v == f => {}
                _ => {
                    return Err(PluginError::IncompatibleVersion {
                        file: file.to_string(),
                        found: if version.is_empty() {
                            "(unversioned)".into()
                        } else {
                            version.to_string()
                        },
                        expected: versions::supported().join(" or "),
                    })
                }
            }
        }
        found
            .map(str::to_string)
            .ok_or_else(|| PluginError::Invalid {
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
        if plugin.has_constraint() {
            self.smoke_constraint(plugin)?;
        }
        Ok(())
    }

    /// Prepares a constraint instance and asks it for a JSON object's first token; a
    /// plugin that serves JSON keeps the instance warm for its first request.
    fn smoke_constraint(&self, plugin: &Arc<LoadedPlugin>) -> Result<(), PluginError> {
        let mut session = self.prepared(plugin, false)?;
        if session.constrain(&OutputFormat::JsonObject)?.is_ok() {
            session.next_token()?;
            plugin
                .constrains
                .store(true, std::sync::atomic::Ordering::Release);
            self.keep_warm(plugin, session);
        }
        Ok(())
    }
}

fn major_minor(version: &str) -> (&str, &str) {
    let mut parts = version.split('.');
    (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
}
