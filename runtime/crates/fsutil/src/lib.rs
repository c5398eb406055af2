//! The agent's two ways of touching files. Writes are crash-safe replacements, so a
//! reader sees the old file or the new one, never a torn write. Reads are bounded and
//! never block: every file the agent reads (bundles, state files, cache entries, keys,
//! the config file) may have been swapped for a FIFO, a device or a huge file, and a read
//! that hangs or exhausts memory would take the agent down with it.
//!
//! It is a bottom layer of the runtime: it must not depend on tokio, async-nats, wasmtime,
//! sysinfo, clap or any other collector crate (the layering of ARCHITECTURE.md, checked
//! by `cargo xtask test`).

use std::fs::File;
use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};

pub mod private;

/// Largest state file (`bundle-versions.json`, `agent-state.json`) read back, in bytes
/// (4 MiB). Both hold a few hundred bytes per module; anything near this size is not a
/// state file.
pub const MAX_STATE_FILE_LEN: u64 = 4 * 1024 * 1024;

/// Whether the last component of a path read may be a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Follow it: for paths an operator gives (`--guest`, `--config`, `--trust`, the
    /// files of `--modules`), where a link is a normal way to deploy.
    Follow,
    /// Refuse it: for files the agent itself writes in its state directory, where a link
    /// can only have been planted.
    Refuse,
}

/// A file that could not be read: which one, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct ReadError {
    /// The path as the caller gave it.
    pub path: PathBuf,
    /// What went wrong with it.
    pub problem: ReadProblem,
}

impl ReadError {
    /// Whether the file does not exist (often not an error for the caller).
    pub fn is_not_found(&self) -> bool {
        self.problem.is_not_found()
    }
}

/// Why a file could not be read, without its name (for callers that name it their way).
#[derive(Debug, thiserror::Error)]
pub enum ReadProblem {
    /// Looking at, opening or reading the file failed; [`ReadProblem::is_not_found`]
    /// tells whether it does not exist.
    #[error("cannot read it: {0}")]
    Io(#[from] std::io::Error),
    /// The path is not a regular file; the text says what it is instead, for people
    /// ("a FIFO (named pipe)", "a directory", ...).
    #[error("it is {0}, expected a regular file")]
    NotAFile(&'static str),
    /// The file holds more bytes than the caller's bound.
    #[error("it is {len} bytes, more than the maximum of {max}")]
    TooLarge {
        /// Its size in bytes, from its metadata; `max + 1` when it grew past the bound
        /// while being read.
        len: u64,
        /// The bound the caller gave, in bytes.
        max: u64,
    },
}

impl ReadProblem {
    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Reads a whole regular file of at most `max_len` bytes.
///
/// The file is opened non-blocking (a FIFO without a writer would otherwise block the
/// open forever), without following a final symbolic link when `links` is
/// [`Links::Refuse`], and its type is checked on the opened handle, so a name swapped
/// between the check and the open cannot slip a FIFO or a device through. The read
/// itself stops one byte past `max_len`, so a file that grows meanwhile cannot make it
/// allocate more.
///
/// # Errors
///
/// When the file cannot be opened or read, is not a regular file (FIFO, device,
/// directory, socket, or a link where links are refused), or is larger than `max_len`.
pub fn read_regular(path: &Path, max_len: u64, links: Links) -> Result<Vec<u8>, ReadError> {
    let named = |problem| ReadError {
        path: path.to_path_buf(),
        problem,
    };
    let file = open_regular(path, links)?;
    let len = file.metadata().map_err(|e| named(e.into()))?.len();
    if len > max_len {
        return Err(named(ReadProblem::TooLarge { len, max: max_len }));
    }
    // Bounded by `max_len` just above.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max_len.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| named(e.into()))?;
    let len = bytes.len() as u64;
    if len > max_len {
        return Err(named(ReadProblem::TooLarge { len, max: max_len }));
    }
    Ok(bytes)
}

/// Opens a regular file for reading without ever blocking, as [`read_regular`] does; for
/// callers that read only part of it.
///
/// # Errors
///
/// As [`read_regular`], but for the size.
pub fn open_regular(path: &Path, links: Links) -> Result<File, ReadError> {
    let named = |problem| ReadError {
        path: path.to_path_buf(),
        problem,
    };
    // Looked at before opening too: opening a device can have effects of its own.
    let before = match links {
        Links::Follow => std::fs::metadata(path),
        Links::Refuse => std::fs::symlink_metadata(path),
    }
    .map_err(|e| named(e.into()))?;
    if !before.is_file() {
        return Err(named(ReadProblem::NotAFile(kind(&before.file_type()))));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        let nofollow = match links {
            Links::Follow => 0,
            Links::Refuse => libc::O_NOFOLLOW,
        };
        std::os::unix::fs::OpenOptionsExt::custom_flags(
            &mut options,
            libc::O_NONBLOCK | libc::O_NOCTTY | nofollow,
        );
    }
    // A reparse point (a symbolic link, a junction) swapped in after the look above is
    // opened as itself, not followed: the check below then refuses it.
    #[cfg(windows)]
    if links == Links::Refuse {
        std::os::windows::fs::OpenOptionsExt::custom_flags(
            &mut options,
            windows_sys::Win32::Storage::FileSystem::FILE_FLAG_OPEN_REPARSE_POINT,
        );
    }
    let file = options.open(path).map_err(|e| named(e.into()))?;
    // The name may have been swapped since it was looked at: what counts is what was
    // opened.
    let opened = file.metadata().map_err(|e| named(e.into()))?;
    if !opened.is_file() {
        return Err(named(ReadProblem::NotAFile(kind(&opened.file_type()))));
    }
    Ok(file)
}

/// What a file that is not a regular file is, for error messages.
fn kind(file_type: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link (not followed here)"
    } else {
        "of an unknown type"
    }
}

/// Replaces `path` with `bytes`: write a temporary file beside it, fsync it, rename it
/// over `path`, fsync the directory (on Windows, the rename is written through). `mode`
/// sets Unix permissions on the new file; on Windows, a mode that denies group and others
/// everything (`0o600`) makes the file private ([`private::restrict`]) before any byte is
/// written.
///
/// # Errors
///
/// The failing step, with the path it was about.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    let named = |e: std::io::Error, what: &str, p: &Path| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let write = || -> std::io::Result<()> {
        // A leftover from a crash would keep its old permissions.
        let _ = std::fs::remove_file(&tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if let Some(mode) = mode {
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        }
        let mut f = options.open(&tmp)?;
        #[cfg(not(unix))]
        if mode.is_some_and(|m| m & 0o077 == 0) {
            private::restrict(&tmp)?;
        }
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| named(e, "cannot write", &tmp))?;
    replace(&tmp, path).map_err(|e| named(e, "cannot replace", path))?;
    sync_dir(dir).map_err(|e| named(e, "cannot sync the directory", dir))
}

/// Renames `from` over `to`; on Windows, written through before it returns (the
/// directory cannot be synced there).
fn replace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(windows)]
    {
        use std::os::windows::ffi::OsStrExt as _;
        use windows_sys::Win32::Storage::FileSystem::{
            MOVEFILE_REPLACE_EXISTING, MOVEFILE_WRITE_THROUGH, MoveFileExW,
        };
        let wide = |p: &Path| -> Vec<u16> { p.as_os_str().encode_wide().chain([0]).collect() };
        let (from, to) = (wide(from), wide(to));
        // SAFETY: two NUL-terminated paths that outlive the call.
        let ok = unsafe {
            MoveFileExW(
                from.as_ptr(),
                to.as_ptr(),
                MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH,
            )
        };
        if ok == 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(windows))]
    {
        std::fs::rename(from, to)
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Files that block or never end, planted where the agent reads, for tests.
#[cfg(all(any(test, feature = "test-support"), unix))]
#[doc(hidden)]
pub mod hostile {
    use std::path::Path;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Makes a FIFO at `path`: opening it for reading blocks until a writer comes.
    pub fn fifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt as _;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}", path.display());
    }

    /// Makes `path` a symbolic link to `/dev/zero`, a file that never ends.
    pub fn dev_zero(path: &Path) {
        std::os::unix::fs::symlink("/dev/zero", path).unwrap();
    }

    /// Replaces whatever is at `path` with each hostile file in turn and runs `check`.
    pub fn each(path: &Path, mut check: impl FnMut(&str)) {
        for (what, plant) in [
            ("a FIFO", fifo as fn(&Path)),
            ("a link to /dev/zero", dev_zero),
        ] {
            let _ = std::fs::remove_file(path);
            plant(path);
            check(what);
        }
        let _ = std::fs::remove_file(path);
    }

    /// Runs `f` on its own thread and returns its result, failing the test if it takes
    /// more than 5 s: a read that blocks fails the test instead of hanging it.
    pub fn promptly<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{what}: no answer within 5 s ({e}): the read blocked"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one", None).unwrap();
        write_atomic(&path, b"two", Some(0o600)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("state.json")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn read_regular_reads_up_to_the_bound_and_refuses_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 100]).unwrap();
        assert_eq!(read_regular(&path, 100, Links::Refuse).unwrap(), [7u8; 100]);
        let err = read_regular(&path, 99, Links::Refuse).unwrap_err();
        assert!(
            matches!(err.problem, ReadProblem::TooLarge { len: 100, max: 99 }),
            "{err}"
        );
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "{err}"
        );
        let missing = read_regular(&dir.path().join("missing"), 1, Links::Follow).unwrap_err();
        assert!(missing.is_not_found(), "{missing}");
    }

    #[cfg(unix)]
    #[test]
    fn fifos_devices_directories_and_sockets_are_refused_at_once_naming_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for links in [Links::Follow, Links::Refuse] {
            hostile::each(&path, |what| {
                let p = path.clone();
                let err =
                    hostile::promptly(what, move || read_regular(&p, 1024, links)).expect_err(what);
                let expected = match (what, links) {
                    ("a FIFO", _) => "a FIFO",
                    (_, Links::Follow) => "a character device",
                    (_, Links::Refuse) => "a symbolic link",
                };
                let msg = err.to_string();
                assert!(
                    msg.contains(expected) && msg.contains("expected a regular file"),
                    "{what}, {links:?}: {msg}"
                );
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            });
        }
        let err = read_regular(dir.path(), 1024, Links::Follow).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        let socket_path = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
        let err = read_regular(&socket_path, 1024, Links::Follow).unwrap_err();
        assert!(err.to_string().contains("a socket"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_link_to_a_regular_file_is_followed_only_when_links_are() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"content").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_regular(&link, 100, Links::Follow).unwrap(), b"content");
        let err = read_regular(&link, 100, Links::Refuse).unwrap_err();
        assert!(
            matches!(err.problem, ReadProblem::NotAFile(what) if what.contains("symbolic link")),
            "{err}"
        );
    }
}
