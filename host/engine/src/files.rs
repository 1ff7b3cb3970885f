//! Where lynx keeps what its scripts fetch: the cache folder and the default model's
//! file in it. The server's `--model` and `--plugin-cache-dir` default to these; tests
//! and benches that load a model without the binary find it here too.

use std::path::PathBuf;

/// The file name `scripts/fetch-model.sh` stores the default model under.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The lynx cache folder: `LYNX_CACHE_DIR`, else `$XDG_CACHE_HOME/lynx`, else
/// `~/.cache/lynx` (where scripts/fetch-model.sh puts the model).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("LYNX_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("lynx")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lynx")))
        .unwrap_or_else(|| PathBuf::from(".cache/lynx"))
}

/// The default model in the cache folder.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// The model a test or bench loads without the binary: `LYNX_MODEL` (what the binary's
/// `--model` reads too), else the default model.
pub fn model_path_from_env() -> PathBuf {
    std::env::var_os("LYNX_MODEL").map_or_else(default_model_path, PathBuf::from)
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
