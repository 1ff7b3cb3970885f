//! Compiled plugins, kept by the sha256 of their file: in memory, and on disk as
//! wasmtime's serialized artifacts, so restarting, or swapping back to a plugin already
//! seen, does not compile it again.
//!
//! The disk cache is trusted like the binary: it must be writable only by the user the
//! host runs as (artifacts are native code). wasmtime refuses an artifact made by
//! another wasmtime version or engine configuration; such a file is recompiled and
//! replaced.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Compiled components kept in memory: enough for every plugin of a folder and its
/// recent versions.
const MEMORY_ENTRIES: usize = 32;

/// Where a component came from, for the log and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Memory,
    Disk,
    Compiled,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Memory => "memory cache",
            Source::Disk => "disk cache",
            Source::Compiled => "compiled",
        }
    }
}

pub struct ComponentCache {
    dir: Option<PathBuf>,
    memory: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    components: HashMap<String, Component>,
    order: VecDeque<String>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl ComponentCache {
    /// A cache in memory, and on disk under `dir` when given.
    pub fn new(dir: Option<PathBuf>) -> Self {
        if let Some(dir) = &dir {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "plugin cache folder unusable; compiling without it");
                return Self {
                    dir: None,
                    memory: Mutex::default(),
                };
            }
        }
        Self {
            dir,
            memory: Mutex::default(),
        }
    }

    /// The component of `bytes` (whose sha256 is `sha`), from a cache or compiled.
    pub fn get(
        &self,
        engine: &Engine,
        sha: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, Source)> {
        if let Some(c) = self
            .memory
            .lock()
            .ok()
            .and_then(|m| m.components.get(sha).cloned())
        {
            return Ok((c, Source::Memory));
        }
        let artifact = self.dir.as_ref().map(|d| d.join(format!("{sha}.cwasm")));
        if let Some(path) = artifact.as_deref().filter(|p| p.exists()) {
            // SAFETY: the artifact was written by `store` below from this engine's own
            // compilation of the file with this sha256, in a folder only the host
            // writes; wasmtime checks its version and configuration header.
            match unsafe { Component::deserialize_file(engine, path) } {
                Ok(c) => {
                    self.remember(sha, &c);
                    return Ok((c, Source::Disk));
                }
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e, "stale plugin artifact; recompiling")
                }
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Some(path) = &artifact {
            store(path, &component);
        }
        self.remember(sha, &component);
        Ok((component, Source::Compiled))
    }

    fn remember(&self, sha: &str, component: &Component) {
        let Ok(mut memory) = self.memory.lock() else {
            return;
        };
        if memory.components.contains_key(sha) {
            return;
        }
        while memory.order.len() >= MEMORY_ENTRIES {
            if let Some(old) = memory.order.pop_front() {
                memory.components.remove(&old);
            }
        }
        memory.order.push_back(sha.to_string());
        memory.components.insert(sha.to_string(), component.clone());
    }
}

/// Writes an artifact under a temporary name, then renames it: a reader never sees
/// half a file. Failing to cache only costs a later compile.
fn store(path: &Path, component: &Component) {
    let result = component
        .serialize()
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "could not cache a compiled plugin");
    }
}
