//! Compiled plugins, kept by the sha256 of their file: in memory, and on disk as
//! wasmtime's serialized artifacts, so restarting, or swapping back to a plugin already
//! seen, does not compile it again.
//!
//! An artifact is native code the host will run, so the disk cache is trusted no more
//! than it proves itself:
//! - the folder must be owned by the host's user, writable by nobody else (nor any
//!   folder above it, unless sticky), and outside the plugin folder (which operators
//!   mount writable for hot-swap), or the host refuses to start, as OpenSSH's
//!   StrictModes refuses a loose `~/.ssh`;
//! - every artifact carries an HMAC-SHA256 over the plugin's sha256 and the artifact,
//!   keyed by a secret in the folder (mode 0600) that only the host's user can read; an
//!   artifact that fails it is never deserialized, but recompiled and replaced;
//! - artifacts are read into memory and deserialized from there: no writable path is
//!   ever mapped, so editing a cached file cannot change code that is running;
//! - files are created with `create_new`, mode 0600, under unpredictable names.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::files::{open_regular, read_capped, read_open, FileRefusal};

/// Compiled components kept in memory: enough for every plugin of a folder and its
/// recent versions.
const MEMORY_ENTRIES: usize = 32;
/// Artifacts kept on disk, newest first; older ones are deleted.
const DISK_ENTRIES: usize = 64;
/// What starts every artifact file: the format, then the 32-byte tag.
const MAGIC: &[u8; 8] = b"LYNXCW01";
const TAG_BYTES: usize = 32;
/// The largest artifact read back; a plugin is capped far below its compiled size.
const MAX_ARTIFACT_BYTES: u64 = 1 << 30;
const KEY_FILE: &str = "artifact.key";

type HmacSha256 = Hmac<Sha256>;

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

/// Why the cache folder is not trusted.
#[derive(Debug, thiserror::Error)]
#[error("the plugin cache folder {dir} {why}")]
pub struct UntrustedCache {
    pub dir: String,
    pub why: String,
}

pub struct ComponentCache {
    disk: Option<DiskCache>,
    memory: Mutex<Memory>,
}

struct DiskCache {
    dir: PathBuf,
    key: [u8; 32],
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

fn random_hex() -> String {
    rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl ComponentCache {
    /// A cache in memory only.
    pub fn in_memory() -> Self {
        Self {
            disk: None,
            memory: Mutex::default(),
        }
    }

    /// A cache in memory and on disk under `dir`, which is created (0700) if missing
    /// and must be trustworthy (see the module documentation). `plugins_dir` is the
    /// plugin folder, which the cache must not be inside.
    pub fn on_disk(dir: &Path, plugins_dir: &Path) -> Result<Self, UntrustedCache> {
        let disk = DiskCache::open(dir, plugins_dir)?;
        Ok(Self {
            disk: Some(disk),
            memory: Mutex::default(),
        })
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
        if let Some(component) = self.disk.as_ref().and_then(|d| d.load(engine, sha)) {
            self.remember(sha, &component);
            return Ok((component, Source::Disk));
        }
        let component = Component::new(engine, bytes)?;
        if let Some(disk) = &self.disk {
            disk.store(sha, &component);
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

/// A new file only the host's user can read, at a name nobody holds: never an existing
/// file or a link planted there.
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn untrusted(dir: &Path, why: impl Into<String>) -> UntrustedCache {
    UntrustedCache {
        dir: dir.display().to_string(),
        why: why.into(),
    }
}

/// The checks of a path the host must be the only writer of.
fn check_owned(dir: &Path, meta: &std::fs::Metadata, what: &str) -> Result<(), UntrustedCache> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(untrusted(
            dir,
            format!(
                "has a {what} owned by uid {}, not by the host's user (uid {me})",
                meta.uid()
            ),
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(untrusted(
            dir,
            format!(
                "has a {what} writable by group or others (mode {:o}); run `chmod go-w` on it",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Every folder above the cache must be owned by root or the host's user, and not
/// writable by others unless sticky (as `/tmp` is): otherwise whoever can write there
/// could move the cache folder aside and put their own in its place.
fn check_ancestors(dir: &Path, real: &Path) -> Result<(), UntrustedCache> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for ancestor in real.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)
            .map_err(|e| untrusted(dir, format!("has an unreadable parent: {e}")))?;
        let mode = meta.permissions().mode();
        let sticky = mode & 0o1000 != 0;
        if meta.uid() != 0 && meta.uid() != me {
            return Err(untrusted(
                dir,
                format!(
                    "is below {}, owned by uid {}, neither root nor the host's user",
                    ancestor.display(),
                    meta.uid()
                ),
            ));
        }
        if mode & 0o022 != 0 && !sticky {
            return Err(untrusted(
                dir,
                format!(
                    "is below {}, writable by group or others (mode {:o}) without the sticky bit",
                    ancestor.display(),
                    mode & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

impl DiskCache {
    fn open(dir: &Path, plugins_dir: &Path) -> Result<Self, UntrustedCache> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| untrusted(dir, format!("cannot be created: {e}")))?;
        let meta = std::fs::symlink_metadata(dir)
            .map_err(|e| untrusted(dir, format!("cannot be read: {e}")))?;
        if !meta.is_dir() {
            return Err(untrusted(dir, "is not a directory (symlinks are refused)"));
        }
        check_owned(dir, &meta, "folder")?;
        let real = dir
            .canonicalize()
            .map_err(|e| untrusted(dir, format!("cannot be resolved: {e}")))?;
        check_ancestors(dir, &real)?;
        if let Ok(plugins) = plugins_dir.canonicalize() {
            if real.starts_with(&plugins) {
                return Err(untrusted(
                    dir,
                    format!(
                        "is inside the plugin folder {}, which deployers write to; keep it apart (--plugin-cache-dir)",
                        plugins.display()
                    ),
                ));
            }
        }
        let key = Self::key(dir)?;
        Ok(Self { dir: real, key })
    }

    /// The folder's artifact key: read, or made once (32 random bytes, mode 0600).
    fn key(dir: &Path) -> Result<[u8; 32], UntrustedCache> {
        let path = dir.join(KEY_FILE);
        if !path.exists() {
            let tmp = dir.join(format!(".key.{}", random_hex()));
            let key: [u8; 32] = rand::random();
            let written = create_private(&tmp)
                .and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()));
            // A hard link never replaces: if another host made the key first, both use it.
            let linked = written.and_then(|()| std::fs::hard_link(&tmp, &path));
            let _ = std::fs::remove_file(&tmp);
            if let Err(e) = linked {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(untrusted(dir, format!("cannot hold its key: {e}")));
                }
            }
        }
        // One open file is checked and read: the key cannot be swapped in between.
        let (file, meta) = open_regular(&path)
            .map_err(|e| untrusted(dir, format!("has an unusable {KEY_FILE}: {e}")))?;
        check_owned(dir, &meta, KEY_FILE)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(untrusted(
                dir,
                format!("has a {KEY_FILE} others can read; it must be mode 0600"),
            ));
        }
        let bytes = read_open(file, &meta, 32)
            .map_err(|e| untrusted(dir, format!("has a bad {KEY_FILE}: {e}")))?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| untrusted(dir, format!("has a {KEY_FILE} that is not 32 bytes")))
    }

    fn tag(&self, sha: &str, payload: &[u8]) -> Option<HmacSha256> {
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(MAGIC);
        mac.update(sha.as_bytes());
        mac.update(payload);
        Some(mac)
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.cwasm"))
    }

    /// The cached component of `sha`, if its artifact is there and authentic.
    fn load(&self, engine: &Engine, sha: &str) -> Option<Component> {
        let path = self.path(sha);
        let bytes = match read_capped(&path, MAX_ARTIFACT_BYTES) {
            Ok(bytes) => bytes,
            Err(FileRefusal::Missing) => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "plugin artifact refused; recompiling");
                return None;
            }
        };
        let header = MAGIC.len() + TAG_BYTES;
        let authentic = bytes.len() > header
            && &bytes[..MAGIC.len()] == MAGIC
            && self
                .tag(sha, &bytes[header..])
                .is_some_and(|mac| mac.verify_slice(&bytes[MAGIC.len()..header]).is_ok());
        if !authentic {
            tracing::warn!(path = %path.display(), "plugin artifact failed authentication (not written by this host, or altered); recompiling");
            return None;
        }
        // SAFETY: the bytes are in memory the host owns, and their HMAC proves this
        // host's key wrote them as the compilation of the file with this sha256;
        // wasmtime checks its version and configuration header.
        match unsafe { Component::deserialize(engine, &bytes[header..]) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::info!(path = %path.display(), error = %e, "stale plugin artifact; recompiling");
                None
            }
        }
    }

    /// Writes an artifact under a fresh unpredictable name, then renames it into
    /// place: a reader never sees half a file. Failing to cache only costs a compile.
    fn store(&self, sha: &str, component: &Component) {
        let path = self.path(sha);
        let tmp = self.dir.join(format!(".{sha}.{}.tmp", random_hex()));
        let result = component
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|payload| {
                let tag = self
                    .tag(sha, &payload)
                    .ok_or("no key")?
                    .finalize()
                    .into_bytes();
                let mut file = create_private(&tmp).map_err(|e| e.to_string())?;
                file.write_all(MAGIC)
                    .and_then(|()| file.write_all(&tag))
                    .and_then(|()| file.write_all(&payload))
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %path.display(), error = %e, "could not cache a compiled plugin");
        }
        self.evict();
    }

    /// Keeps the folder to its [`DISK_ENTRIES`] newest artifacts: a plugin folder whose
    /// files keep changing cannot fill the disk with their compilations.
    fn evict(&self) {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut artifacts: Vec<(std::time::SystemTime, PathBuf)> = read
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, e.path()))
            })
            .collect();
        if artifacts.len() <= DISK_ENTRIES {
            return;
        }
        artifacts.sort();
        let excess = artifacts.len() - DISK_ENTRIES;
        for (_, path) in artifacts.into_iter().take(excess) {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "oldest compiled plugin evicted from the cache")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not evict a compiled plugin")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lynx-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn refuses_loose_or_nested_folders_and_makes_a_private_key() {
        let root = temp("trust");
        let plugins = root.join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        let refusal = |d: &Path| {
            ComponentCache::on_disk(d, &plugins)
                .err()
                .unwrap()
                .to_string()
        };
        let err = refusal(&plugins.join("cache"));
        assert!(err.contains("inside the plugin folder"), "{err}");

        let loose = root.join("loose");
        std::fs::create_dir_all(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = refusal(&loose);
        assert!(err.contains("writable by group or others"), "{err}");

        let loose_parent = root.join("open");
        std::fs::create_dir_all(&loose_parent).unwrap();
        std::fs::set_permissions(&loose_parent, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = refusal(&loose_parent.join("cache"));
        assert!(err.contains("without the sticky bit"), "{err}");

        let good = root.join("good");
        assert!(ComponentCache::on_disk(&good, &plugins).is_ok());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&good), 0o700);
        assert_eq!(mode(&good.join(KEY_FILE)), 0o600);
        let key = std::fs::read(good.join(KEY_FILE)).unwrap();
        // Opening again keeps the key, so artifacts stay valid across restarts.
        assert!(ComponentCache::on_disk(&good, &plugins).is_ok());
        assert_eq!(std::fs::read(good.join(KEY_FILE)).unwrap(), key);
        let _ = std::fs::remove_dir_all(&root);
    }
}
