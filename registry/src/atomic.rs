//! Replacing a file atomically: the new content is written to a staged file of its own beside
//! the target (`.<name>.<tag>-<16 hex digits>`, created exclusively), fsynced, renamed over the
//! target, and the directory fsynced. A reader, a concurrent writer or a crash at any moment
//! sees the old file or a whole new one, never a torn or half-written one; two writers of the
//! same target never touch each other's staged file (the last rename wins).
//!
//! [`write_atomic`] does it in one call. [`Staged`] splits it for a caller that inspects the
//! staged file before it replaces the target (confgen runs `check_cmd` on it): create, write,
//! set mode and owner, check [`Staged::path`], then [`Staged::commit`] — or drop it, which
//! removes the staged file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A failed step of an atomic write: what was done to which path, and the I/O error.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {source}", path.display())]
pub struct AtomicError {
    /// The step: `create a staged file in`, `write`, `chmod`, `chown`, `fsync`,
    /// `rename … onto`, `fsync directory`.
    pub op: String,
    /// The path the step acted on (the staged file, the target or the directory).
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: io::Error,
}

impl AtomicError {
    fn new(op: impl Into<String>, path: &Path, source: io::Error) -> Self {
        AtomicError {
            op: op.into(),
            path: path.to_owned(),
            source,
        }
    }
}

impl From<AtomicError> for io::Error {
    /// Keeps the error's kind; the message names the step and the path.
    fn from(e: AtomicError) -> io::Error {
        io::Error::new(e.source.kind(), e.to_string())
    }
}

/// How [`write_atomic`] and [`Staged::new`] write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options<'a> {
    /// Names the writer in staged files (`.<name>.<tag>-…`), so leftovers of a killed process
    /// can be told apart ([`remove_leftovers`]).
    pub tag: &'a str,
    /// Permission bits of the new file, set exactly (the umask does not apply). `None`: as
    /// `File::create` makes a file (0666 less the umask).
    pub mode: Option<u32>,
    /// Owner of the new file; `None` keeps the writer's.
    pub uid: Option<u32>,
    /// Group of the new file; `None` keeps the writer's.
    pub gid: Option<u32>,
}

impl<'a> Options<'a> {
    /// Staged files named with `tag`, default mode and owner.
    pub const fn tagged(tag: &'a str) -> Self {
        Options {
            tag,
            mode: None,
            uid: None,
            gid: None,
        }
    }
}

/// Atomically replaces (or creates) `path` with `bytes`: staged beside it under a unique name,
/// fsynced, renamed over it, directory fsynced. The directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8], options: &Options<'_>) -> Result<(), AtomicError> {
    let mut staged = Staged::new(path, options)?;
    staged.write_all(bytes)?;
    staged.commit()
}

/// The directory a target lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        Some(_) => Path::new("."),
        None => Path::new("/"),
    }
}

/// The prefix of the staged files of `target` written with `tag`: `.<name>.<tag>-`.
pub fn staged_prefix(target: &Path, tag: &str) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.{tag}-")
}

/// Removes the staged files with `tag` that a killed writer left beside `target`; returns how
/// many. Only for a writer that knows no other one writes `target` at the same time (it would
/// remove that one's staged file).
pub fn remove_leftovers(target: &Path, tag: &str) -> usize {
    let prefix = staged_prefix(target, tag);
    let Ok(entries) = std::fs::read_dir(parent_dir(target)) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// fsyncs the directory holding `path`, making a rename or removal in it durable.
pub fn sync_parent(path: &Path) -> Result<(), AtomicError> {
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AtomicError::new("fsync directory", dir, e))
}

/// A staged file beside its target, not yet renamed over it. Write to it (it is [`Write`]),
/// inspect it at [`Staged::path`], then [`Staged::commit`]. Dropped uncommitted, it is removed.
#[derive(Debug)]
pub struct Staged {
    file: File,
    // Boxed: a `Staged` travels inside callers' enums, kept small.
    path: Box<Path>,
    target: Box<Path>,
    synced: bool,
    committed: bool,
}

impl Staged {
    /// Creates an empty staged file for `target` in its directory, with `options`' mode and
    /// owner.
    pub fn new(target: &Path, options: &Options<'_>) -> Result<Staged, AtomicError> {
        let dir = parent_dir(target);
        let prefix = staged_prefix(target, options.tag);
        let (file, path) = loop {
            let path = dir.join(format!("{prefix}{:016x}", fastrand::u64(..)));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o666)
                .open(&path)
            {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(AtomicError::new("create a staged file in", dir, e)),
            }
        };
        let staged = Staged {
            file,
            path: path.into_boxed_path(),
            target: target.into(),
            synced: false,
            committed: false,
        };
        if let Some(mode) = options.mode {
            staged
                .file
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| AtomicError::new("chmod", &staged.path, e))?;
        }
        if options.uid.is_some() || options.gid.is_some() {
            std::os::unix::fs::fchown(&staged.file, options.uid, options.gid)
                .map_err(|e| AtomicError::new("chown", &staged.path, e))?;
        }
        Ok(staged)
    }

    /// The staged file's path (beside the target).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file it will replace.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The open staged file (for metadata calls such as `set_permissions`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes all of `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), AtomicError> {
        self.synced = false;
        self.file
            .write_all(bytes)
            .map_err(|e| AtomicError::new("write", &self.path, e))
    }

    /// fsyncs the staged file now (e.g. on a blocking thread, before a check), so that
    /// [`Staged::commit`] only renames and fsyncs the directory. Optional: `commit` fsyncs a
    /// file written since.
    pub fn sync(&mut self) -> Result<(), AtomicError> {
        self.file
            .sync_all()
            .map_err(|e| AtomicError::new("fsync", &self.path, e))?;
        self.synced = true;
        Ok(())
    }

    /// fsyncs the staged file (unless [`Staged::sync`] did since the last write), renames it
    /// over the target and fsyncs the directory. On an error before the rename the staged file
    /// is removed and the target untouched.
    pub fn commit(mut self) -> Result<(), AtomicError> {
        if !self.synced {
            self.sync()?;
        }
        std::fs::rename(&self.path, &self.target).map_err(|e| {
            AtomicError::new(
                format!("rename {} onto", self.path.display()),
                &self.target,
                e,
            )
        })?;
        self.committed = true;
        sync_parent(&self.target)
    }
}

impl Write for Staged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.synced = false;
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Content `i` of a writer: 64 KiB (more than one write or page) of one byte, with a
    /// header naming it.
    fn content(i: usize) -> Vec<u8> {
        let mut v = format!("writer {i}\n").into_bytes();
        v.resize(64 * 1024, b'a' + i as u8);
        v
    }

    #[test]
    fn concurrent_writers_never_leave_a_torn_or_foreign_file_nor_fail() {
        const WRITERS: usize = 4;
        const ROUNDS: usize = 200;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.cfg");
        let contents: Arc<Vec<Vec<u8>>> = Arc::new((0..WRITERS).map(content).collect());
        let start = Arc::new(Barrier::new(WRITERS + 1));
        let done = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|i| {
                let (target, contents, start) = (target.clone(), contents.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for round in 0..ROUNDS {
                        write_atomic(&target, &contents[i], &Options::tagged("test"))
                            .unwrap_or_else(|e| panic!("writer {i}, round {round}: {e}"));
                    }
                })
            })
            .collect();
        // A reader all along: whenever the target exists it is one writer's content in full.
        let reader = {
            let (target, contents, done) = (target.clone(), contents.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen = 0usize;
                while !done.load(Ordering::Relaxed) {
                    match std::fs::read(&target) {
                        Ok(got) => {
                            assert!(
                                contents.contains(&got),
                                "torn or foreign file: {} bytes starting {:?}",
                                got.len(),
                                String::from_utf8_lossy(&got[..got.len().min(16)])
                            );
                            seen += 1;
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => panic!("read: {e}"),
                    }
                }
                seen
            })
        };
        start.wait();
        for w in writers {
            w.join().expect("a writer failed");
        }
        done.store(true, Ordering::Relaxed);
        assert!(reader.join().expect("the reader saw a torn file") > 0);
        let last = std::fs::read(&target).unwrap();
        assert!(contents.contains(&last), "final file is one writer's");
        assert_eq!(names(dir.path()), ["out.cfg"], "no staged file is left");
    }

    #[test]
    fn mode_owner_and_default_mode() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state");
        let me = std::fs::metadata(dir.path()).unwrap();
        let options = Options {
            mode: Some(0o640),
            uid: Some(me.uid()),
            gid: Some(me.gid()),
            ..Options::tagged("t")
        };
        write_atomic(&target, b"one\n", &options).unwrap();
        let m = std::fs::metadata(&target).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!((m.uid(), m.gid()), (me.uid(), me.gid()));
        // Default mode: what File::create gives (0666 less the umask), not the old file's.
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        write_atomic(&target, b"two\n", &Options::tagged("t")).unwrap();
        assert_eq!(
            std::fs::metadata(&target).unwrap().mode() & 0o7777,
            std::fs::metadata(&plain).unwrap().mode() & 0o7777
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"two\n");
    }

    #[test]
    fn staged_is_checkable_before_commit_and_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("haproxy.cfg");
        std::fs::write(&target, "old\n").unwrap();
        let mut s = Staged::new(&target, &Options::tagged("confgen")).unwrap();
        s.write_all(b"new\n").unwrap();
        let staged = s.path().to_owned();
        assert!(staged
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".haproxy.cfg.confgen-"));
        assert_eq!(std::fs::read(&staged).unwrap(), b"new\n", "checkable");
        assert_eq!(std::fs::read(&target).unwrap(), b"old\n", "not yet");
        drop(s);
        assert!(!staged.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"old\n");

        let mut s = Staged::new(&target, &Options::tagged("confgen")).unwrap();
        s.write_all(b"new\n").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new\n");
        assert_eq!(names(dir.path()), ["haproxy.cfg"]);
    }

    #[test]
    fn errors_name_the_step_and_path_and_leftovers_go_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/file");
        let e = write_atomic(&missing, b"x", &Options::tagged("t")).unwrap_err();
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
        let text = e.to_string();
        assert!(
            text.starts_with("cannot create a staged file in ") && text.contains("no/such/dir"),
            "{text}"
        );
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);

        let target = dir.path().join("f");
        for name in [".f.t-1", ".f.t-2", ".f.other-1", ".g.t-1"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(remove_leftovers(&target, "t"), 2);
        assert_eq!(names(dir.path()), [".f.other-1", ".g.t-1"]);
        assert_eq!(parent_dir(Path::new("bare")), Path::new("."));
    }
}
