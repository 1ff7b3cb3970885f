//! Reading the plugin folder as untrusted input: which names are plugins, and reading
//! one without following a symlink, blocking on a FIFO or device, or reading past the
//! size cap.
//!
//! Symlink policy: a plugin file must be the file itself. A symlink named `NAME.wasm`
//! is refused (the kernel refuses to follow it: `O_NOFOLLOW`), so nobody who can make
//! a link in the folder can point the host at `/dev/zero`, a FIFO, or a file outside
//! the folder. Deploy tools that stage files elsewhere copy or rename them in.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a file of the plugin folder was not read.
#[derive(Debug, thiserror::Error)]
pub enum FileRefusal {
    #[error("the file is gone")]
    Missing,
    #[error("it is a symlink; plugin files must be regular files (symlinks are never followed)")]
    Symlink,
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("it is {size} bytes; the cap is {cap} bytes (--plugin-max-bytes)")]
    TooLarge { size: u64, cap: u64 },
    #[error("reading it: {0}")]
    Io(std::io::Error),
}

/// The plugin name of a path in the folder, if it is named as a plugin file
/// (`NAME.wasm`, not hidden). Its type is checked when it is read.
pub fn plugin_name(path: &Path) -> Option<String> {
    if path.extension()? != "wasm" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    // A name reaches logs, the admin view and the `--plugin` flag: letters, digits,
    // `-`, `_` and `.` only, so none can forge a log line or a terminal sequence.
    let plain = stem
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    (plain && !stem.is_empty() && stem.len() <= MAX_NAME_BYTES && !stem.starts_with('.'))
        .then(|| stem.to_string())
}

/// The longest plugin name (a file's stem).
pub const MAX_NAME_BYTES: usize = 64;

fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a file"
    }
}

/// Opens the regular file at `path` for reading. Opening never blocks (a FIFO opens
/// at once with `O_NONBLOCK`, then is refused by its type) and never follows a final
/// symlink; the type is checked on the open file, so it cannot be swapped in between.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), FileRefusal> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match (e.kind(), e.raw_os_error()) {
            (std::io::ErrorKind::NotFound, _) => FileRefusal::Missing,
            (_, Some(libc::ELOOP)) => FileRefusal::Symlink,
            _ => FileRefusal::Io(e),
        })?;
    let meta = file.metadata().map_err(FileRefusal::Io)?;
    if !meta.file_type().is_file() {
        return Err(FileRefusal::NotRegular(kind(meta.file_type())));
    }
    Ok((file, meta))
}

/// Reads the regular file at `path`, at most `cap` bytes ([`open_regular`]).
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, FileRefusal> {
    let (file, meta) = open_regular(path)?;
    read_open(file, &meta, cap)
}

/// Reads an opened file to the end, refusing one over `cap`, or that grew past it while
/// being read.
pub fn read_open(file: File, meta: &Metadata, cap: u64) -> Result<Vec<u8>, FileRefusal> {
    if meta.len() > cap {
        return Err(FileRefusal::TooLarge {
            size: meta.len(),
            cap,
        });
    }
    let mut bytes = Vec::new();
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(FileRefusal::Io)?;
    if bytes.len() as u64 > cap {
        return Err(FileRefusal::TooLarge {
            size: bytes.len() as u64,
            cap,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("lynx-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        d
    }

    #[test]
    fn names() {
        assert_eq!(
            plugin_name(Path::new("/p/default.wasm")).as_deref(),
            Some("default")
        );
        assert_eq!(plugin_name(Path::new("/p/.default.wasm.part")), None);
        assert_eq!(plugin_name(Path::new("/p/.hidden.wasm")), None);
        assert_eq!(plugin_name(Path::new("/p/readme.txt")), None);
    }

    #[test]
    fn refuses_symlinks_fifos_directories_and_oversized_files() {
        let d = dir("refuse");
        let regular = d.join("ok.wasm");
        std::fs::write(&regular, b"0123456789").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_capped(&regular, 10).ok(), Some(b"0123456789".to_vec()));
        assert!(matches!(
            read_capped(&regular, 9),
            Err(FileRefusal::TooLarge { size: 10, cap: 9 })
        ));

        let link = d.join("zero.wasm");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            read_capped(&link, 1 << 20),
            Err(FileRefusal::Symlink)
        ));

        let fifo = d.join("fifo.wasm");
        let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap_or_default();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_capped(&fifo, 1 << 20),
            Err(FileRefusal::NotRegular("a FIFO"))
        ));

        let sub = d.join("sub.wasm");
        std::fs::create_dir(&sub).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            read_capped(&sub, 1 << 20),
            Err(FileRefusal::NotRegular("a directory"))
        ));
        assert!(matches!(
            read_capped(&d.join("none.wasm"), 1),
            Err(FileRefusal::Missing)
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
