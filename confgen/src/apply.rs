//! Applying a render: compare → stage in the destination's directory → check → fsync + atomic
//! rename (keeping `<dest>.bak`) → reload once per distinct command → roll back on failure.
//!
//! A destination is never written in place: readers (and a `kill -9` at any moment) see either
//! the old file or the new one. Commands run through `/bin/sh -c` with only `{{src}}` substituted,
//! by a path confgen generated and shell-quoted; nothing from the registry reaches a shell.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, Instant};

use flotilla_registry::atomic::{self, AtomicError, Options, Staged};
use tokio::io::AsyncReadExt;

use crate::resource::{substitute_src, Resource};
use crate::template::TemplateError;

/// How applying one resource's render ended.
#[derive(Debug)]
pub enum Outcome {
    /// The render equals the destination: nothing written, nothing reloaded.
    Unchanged,
    /// Written; the resource has no reload command.
    Written,
    /// Written and the reload command succeeded.
    Reloaded,
    /// Written and applied to the running proxy through its runtime API (no reload); the
    /// running state was read back and equals the file.
    Applied {
        /// What changed (servers added, removed, moved, reweighted).
        summary: String,
        /// Milliseconds from confgen seeing the change to the running servers verified (before
        /// the file was renamed into place).
        servers_ms: Option<u64>,
    },
    /// `--noop`: checked but not written; the unified diff against the destination with `--diff`.
    Planned {
        /// Unified diff (`--diff`).
        diff: Option<String>,
    },
    /// The drop guard holds this render (too many endpoints vanished at once).
    Held {
        /// Endpoints in the last applied render (or bytes in the current file, see `unit`).
        had: usize,
        /// Endpoints (or bytes) in this render.
        now: usize,
        /// What `had` and `now` count.
        unit: DropUnit,
    },
    /// The template failed to render; the destination is untouched.
    RenderFailed(TemplateError),
    /// `check_cmd` rejected the staged file; the destination is untouched, nothing reloaded.
    CheckFailed {
        /// What the command said (and how it ended).
        output: String,
    },
    /// Staging, renaming or setting owner/mode failed; the destination is untouched.
    WriteFailed {
        /// The step, the path and the I/O error.
        error: WriteError,
    },
    /// The reload command failed; the previous file was restored (`rolled_back`) and the
    /// reload run again.
    ReloadFailed {
        /// What the command said (and how it ended).
        output: String,
        /// True if the previous destination was restored.
        rolled_back: bool,
    },
}

/// What the drop guard compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropUnit {
    /// Endpoints the template sees, against the count recorded at the last apply (`.D.endpoints`).
    Endpoints,
    /// Bytes of the render against the current destination: the baseline when the destination
    /// exists but no count was recorded (written by another tool or an older confgen).
    Bytes,
}

impl DropUnit {
    /// The unit's name in logs and `/healthz`.
    pub fn name(self) -> &'static str {
        match self {
            DropUnit::Endpoints => "endpoints",
            DropUnit::Bytes => "bytes",
        }
    }
}

impl Outcome {
    /// True for outcomes that count as applied (the revision may advance).
    pub fn is_success(&self) -> bool {
        matches!(
            self,
            Outcome::Unchanged
                | Outcome::Written
                | Outcome::Reloaded
                | Outcome::Applied { .. }
                | Outcome::Planned { .. }
        )
    }

    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Written => "written",
            Outcome::Reloaded => "reloaded",
            Outcome::Applied { .. } => "applied",
            Outcome::Planned { .. } => "planned",
            Outcome::Held { .. } => "held",
            Outcome::RenderFailed(_) => "render",
            Outcome::CheckFailed { .. } => "check",
            Outcome::WriteFailed { .. } => "write",
            Outcome::ReloadFailed { .. } => "reload",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Unchanged => f.write_str("unchanged"),
            Outcome::Written => f.write_str("written"),
            Outcome::Reloaded => f.write_str("written and reloaded"),
            Outcome::Applied { summary, .. } => {
                write!(f, "written and applied through the runtime API: {summary}")
            }
            Outcome::Planned { .. } => f.write_str("would be written (--noop)"),
            Outcome::Held {
                had,
                now,
                unit: DropUnit::Endpoints,
            } => write!(
                f,
                "held by the drop guard: {now} endpoints instead of {had}"
            ),
            Outcome::Held {
                had,
                now,
                unit: DropUnit::Bytes,
            } => write!(
                f,
                "held by the drop guard: a render of {now} bytes would replace the current {had} \
                 (no record of the endpoints that file was rendered from)"
            ),
            Outcome::RenderFailed(e) => write!(f, "render failed: {e}"),
            Outcome::CheckFailed { output } => write!(f, "check_cmd failed: {output}"),
            Outcome::WriteFailed { error } => write!(f, "write failed: {error}"),
            Outcome::ReloadFailed {
                output,
                rolled_back,
            } => write!(
                f,
                "reload_cmd failed: {output}; {}",
                if *rolled_back {
                    "the previous file was restored and reloaded"
                } else {
                    "the previous file could not be restored"
                }
            ),
        }
    }
}

/// A command that failed: exit status or timeout, with its output.
#[derive(Debug, Clone)]
pub struct CommandFailure(pub String);

/// Why confgen could not read, stage, keep, put in place or restore a destination: the step,
/// the path and the I/O error (the source). The message is the one logged and shown on
/// `/healthz` after `write failed: `.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Reading the current destination failed (other than: there is none yet).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The destination.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A step of an atomic write: creating, writing or fsyncing the staged file, renaming it
    /// into place, fsyncing the directory.
    #[error(transparent)]
    Atomic(#[from] AtomicError),
    /// Renaming the link to the current destination onto `<dest>.bak`.
    #[error("cannot rename {} to {}: {source}", from.display(), to.display())]
    KeepBak {
        /// The staged link to the current destination.
        from: PathBuf,
        /// `<dest>.bak`.
        to: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Removing a destination that had no previous content (a rollback).
    #[error("cannot remove {}: {source}", path.display())]
    Remove {
        /// The destination.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The thread that stages a file beside a runtime apply panicked or was cancelled.
    #[error("staging task failed: {0}")]
    StagingTask(#[source] tokio::task::JoinError),
}

/// A reload command that failed (see [`reload_group`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadFailure {
    /// What the command said (and how it ended), then what failed in the rollback and the
    /// reload after it.
    pub output: String,
    /// True if every destination of the batch was restored.
    pub rolled_back: bool,
}

/// Runs `check_cmd` and `reload_cmd` (already substituted). The daemon holds one: [`Shell`]
/// ([`run_command`]). Its unit tests hold one that records each command and answers at once:
/// on tokio's paused clock, a real child's timeout would fire while the runtime waits for it.
pub trait Commands: Send + Sync {
    /// Runs `cmd` within `timeout`: its output, or why it failed.
    fn run<'a>(&'a self, cmd: &'a str, timeout: Duration) -> CommandFuture<'a>;
}

/// What [`Commands::run`] returns.
pub type CommandFuture<'a> =
    Pin<Box<dyn Future<Output = Result<String, CommandFailure>> + Send + 'a>>;

/// The [`Commands`] of the daemon: `/bin/sh -c` through [`run_command`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Shell;

impl Commands for Shell {
    fn run<'a>(&'a self, cmd: &'a str, timeout: Duration) -> CommandFuture<'a> {
        Box::pin(run_command(cmd, timeout))
    }
}

/// True for the variables a command must not inherit: `FLOTILLA_ETCD_*` (the etcd password,
/// user, password file, client key and certificate, endpoints). A command that needs etcd is
/// given its own credentials.
pub fn is_etcd_variable(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b"FLOTILLA_ETCD_")
}

/// Runs `cmd` through `/bin/sh -c`, killing its process group after `timeout`. Returns the
/// combined output (last 4 KiB) or why it failed. The command gets confgen's environment
/// without the `FLOTILLA_ETCD_*` variables.
pub async fn run_command(cmd: &str, timeout: Duration) -> Result<String, CommandFailure> {
    let mut command = tokio::process::Command::new("/bin/sh");
    for (name, _) in std::env::vars_os().filter(|(k, _)| is_etcd_variable(k)) {
        command.env_remove(name);
    }
    let mut child = command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CommandFailure(format!("cannot run /bin/sh -c {cmd:?}: {e}")))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let work = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (_, _, status) = tokio::join!(
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err),
            child.wait()
        );
        out.extend_from_slice(&err);
        (status, out)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok((Ok(status), out)) => {
            let text = tail(&out);
            if status.success() {
                Ok(text)
            } else {
                Err(CommandFailure(format!(
                    "`{cmd}` {status}{}",
                    if text.is_empty() {
                        String::new()
                    } else {
                        format!(": {text}")
                    }
                )))
            }
        }
        Ok((Err(e), _)) => Err(CommandFailure(format!("`{cmd}`: {e}"))),
        Err(_) => {
            if let Some(pid) = pid {
                // The command runs in its own process group: end all of it.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(CommandFailure(format!(
                "`{cmd}` did not finish within {} and was killed",
                humantime::format_duration(timeout)
            )))
        }
    }
}

fn tail(out: &[u8]) -> String {
    const KEEP: usize = 4096;
    let start = out.len().saturating_sub(KEEP);
    String::from_utf8_lossy(&out[start..])
        .trim()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// What happened to a destination in phase 1 that phase 2 (reload) may need to undo.
#[derive(Debug)]
pub struct Committed {
    /// The destination.
    pub dest: PathBuf,
    /// The content before (None: there was no file).
    pub previous: Option<Vec<u8>>,
}

/// The destination's current content (`None`: no file yet).
pub fn read_dest(resource: &Resource) -> Result<Option<Vec<u8>>, WriteError> {
    match std::fs::read(&resource.dest) {
        Ok(c) => Ok(Some(c)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(WriteError::Read {
            path: resource.dest.clone(),
            source,
        }),
    }
}

/// Runs the resource's `check_cmd` (if any) on a staged file; `Err` carries its output.
pub async fn check_staged(
    cmds: &dyn Commands,
    resource: &Resource,
    staged: &Path,
) -> Result<(), CommandFailure> {
    match &resource.check_cmd {
        Some(check) => {
            let cmd = substitute_src(check, staged);
            cmds.run(&cmd, resource.check_timeout).await.map(|_| ())
        }
        None => Ok(()),
    }
}

/// Puts a staged (and checked) file in place: the current destination is kept as
/// `<dest>.bak`, the staged file renamed onto it, the directory fsynced.
pub fn commit(
    resource: &Resource,
    staged: Staged,
    current: Option<Vec<u8>>,
) -> Result<Committed, WriteError> {
    if let Some(prev) = &current {
        keep_bak(&resource.dest, prev)?;
    }
    staged.commit()?;
    Ok(Committed {
        dest: resource.dest.clone(),
        previous: current,
    })
}

/// Phase 1 for one resource: compare, stage, check, commit. Returns the outcome and, for a
/// written file, what is needed to roll it back.
pub async fn write_checked(
    cmds: &dyn Commands,
    resource: &Resource,
    rendered: &[u8],
    noop: bool,
    want_diff: bool,
) -> (Outcome, Option<Committed>) {
    let current = match read_dest(resource) {
        Ok(c) => c,
        Err(error) => return (Outcome::WriteFailed { error }, None),
    };
    if current.as_deref() == Some(rendered) {
        return (Outcome::Unchanged, None);
    }
    let diff = want_diff.then(|| unified_diff(&resource.dest, current.as_deref(), rendered));
    let staged = match stage(resource, rendered) {
        Ok(s) => s,
        Err(error) => return (Outcome::WriteFailed { error }, None),
    };
    if let Err(CommandFailure(output)) = check_staged(cmds, resource, staged.path()).await {
        return (Outcome::CheckFailed { output }, None);
    }
    if noop {
        return (Outcome::Planned { diff }, None);
    }
    match commit(resource, staged, current) {
        Ok(c) => (Outcome::Written, Some(c)),
        Err(error) => (Outcome::WriteFailed { error }, None),
    }
}

/// Restores what [`write_checked`] replaced: the previous content (atomically), or no file.
pub fn roll_back(c: &Committed) -> Result<(), WriteError> {
    match &c.previous {
        Some(prev) => replace(&c.dest, prev, Some(&c.dest)),
        None => match std::fs::remove_file(&c.dest) {
            Ok(()) => Ok(atomic::sync_parent(&c.dest)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(WriteError::Remove {
                path: c.dest.clone(),
                source,
            }),
        },
    }
}

trait BakPath {
    fn with_extension_bak(&self) -> PathBuf;
}

impl BakPath for Path {
    fn with_extension_bak(&self) -> PathBuf {
        let mut s = self.as_os_str().to_owned();
        s.push(".bak");
        PathBuf::from(s)
    }
}

/// Keeps the current destination as `<dest>.bak`, replacing the previous one atomically.
///
/// The current file is already on disk, so `.bak` is a hard link to it (link to a staged name,
/// rename onto `.bak`): nothing is copied or fsynced, and the directory is fsynced once, after
/// the rename of the new destination that follows. That keeps two fsyncs of the file's size off
/// every change. Where a link is not possible (not a regular file, a file system without links),
/// `current` is written as a copy.
fn keep_bak(dest: &Path, current: &[u8]) -> Result<(), WriteError> {
    let bak = dest.with_extension_bak();
    let regular = std::fs::symlink_metadata(dest).is_ok_and(|m| m.file_type().is_file());
    if regular {
        let staged = atomic::parent_dir(dest).join(format!(
            "{}bak-{:016x}",
            atomic::staged_prefix(dest, TAG),
            fastrand::u64(..)
        ));
        if std::fs::hard_link(dest, &staged).is_ok() {
            return std::fs::rename(&staged, &bak).map_err(|source| {
                let _ = std::fs::remove_file(&staged);
                WriteError::KeepBak {
                    from: staged,
                    to: bak,
                    source,
                }
            });
        }
    }
    replace(&bak, current, Some(dest))
}

/// `<dest>.bak`.
#[cfg(test)]
pub fn bak_path(dest: &Path) -> PathBuf {
    dest.with_extension_bak()
}

/// Names confgen's staged files: `.<dest name>.confgen-…` ([`atomic::staged_prefix`]).
pub const TAG: &str = "confgen";

/// Writes `content` to a staged file beside the destination with the destination's mode and
/// owner (from the resource, else from the current file), fsynced; `check_cmd` runs on it
/// before [`commit`] renames it into place.
pub fn stage(resource: &Resource, content: &[u8]) -> Result<Staged, WriteError> {
    let existing = std::fs::metadata(&resource.dest).ok();
    let options = Options {
        mode: Some(
            resource
                .mode
                .map(|m| m.0)
                .or(existing.as_ref().map(|m| m.mode() & 0o7777))
                .unwrap_or(0o644),
        ),
        uid: resource.uid.or(existing.as_ref().map(|m| m.uid())),
        gid: resource.gid.or(existing.as_ref().map(|m| m.gid())),
        ..Options::tagged(TAG)
    };
    let mut staged = Staged::new(&resource.dest, &options)?;
    staged.write_all(content)?;
    staged.sync()?;
    Ok(staged)
}

/// Removes the staged files a killed confgen left for `path` (a destination, or a file confgen
/// keeps beside one).
pub fn remove_leftovers(path: &Path) -> usize {
    atomic::remove_leftovers(path, TAG)
}

/// Atomically replaces a small file confgen keeps for itself beside a destination (the
/// endpoint count): default mode and owner.
pub fn write_own(path: &Path, content: &[u8]) -> Result<(), atomic::AtomicError> {
    atomic::write_atomic(path, content, &Options::tagged(TAG))
}

/// Atomically replaces `path` with `content`, copying mode and owner from `like` if given (best
/// effort: a rollback or a `.bak` is written even where they cannot be set), else mode 0644.
fn replace(path: &Path, content: &[u8], like: Option<&Path>) -> Result<(), WriteError> {
    let meta = like.and_then(|l| std::fs::metadata(l).ok());
    let mut staged = Staged::new(path, &Options::tagged(TAG))?;
    let mode = meta.as_ref().map_or(0o644, |m| m.mode() & 0o7777);
    let _ = staged
        .file()
        .set_permissions(std::fs::Permissions::from_mode(mode));
    if let Some(m) = &meta {
        let _ = std::os::unix::fs::fchown(staged.file(), Some(m.uid()), Some(m.gid()));
    }
    staged.write_all(content)?;
    Ok(staged.commit()?)
}

/// A unified diff of the destination against the render.
pub fn unified_diff(dest: &Path, old: Option<&[u8]>, new: &[u8]) -> String {
    let old = String::from_utf8_lossy(old.unwrap_or_default());
    let new = String::from_utf8_lossy(new);
    similar::TextDiff::from_lines(old.as_ref(), new.as_ref())
        .unified_diff()
        .context_radius(3)
        .header(
            &dest.display().to_string(),
            &format!("{} (rendered)", dest.display()),
        )
        .to_string()
}

/// Runs a reload command; on failure rolls back every destination written in this batch for it,
/// runs the command again, and reports.
pub async fn reload_group(
    cmds: &dyn Commands,
    cmd: &str,
    timeout: Duration,
    committed: &[Committed],
) -> Result<Duration, ReloadFailure> {
    let started = Instant::now();
    match cmds.run(cmd, timeout).await {
        Ok(_) => Ok(started.elapsed()),
        Err(CommandFailure(output)) => {
            let mut rolled_back = true;
            let mut notes = Vec::new();
            for c in committed {
                if let Err(e) = roll_back(c) {
                    rolled_back = false;
                    notes.push(e.to_string());
                }
            }
            let again = cmds.run(cmd, timeout).await;
            let mut output = output;
            if !notes.is_empty() {
                output.push_str(&format!("; rollback failed: {}", notes.join("; ")));
            }
            if let Err(CommandFailure(o)) = again {
                output.push_str(&format!("; reload after rollback also failed: {o}"));
            }
            Err(ReloadFailure {
                output,
                rolled_back,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Resource, Wait};

    fn resource(dir: &Path, check: Option<&str>) -> Resource {
        Resource {
            name: "t".into(),
            file: dir.join("t.toml"),
            src: dir.join("t.tmpl"),
            src_name: "t.tmpl".into(),
            dest: dir.join("out.cfg"),
            prefix: String::new(),
            keys: vec!["/".into()],
            uid: None,
            gid: None,
            mode: Some(crate::resource::Mode(0o640)),
            check_cmd: check.map(str::to_string),
            reload_cmd: None,
            wait: Wait::default(),
            check_timeout: Duration::from_secs(10),
            reload_timeout: Duration::from_secs(10),
            max_drop: 0.5,
            drop_grace: Duration::from_secs(30),
            runtime_api: None,
            runtime_timeout: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn writes_keeps_bak_and_skips_identical() {
        let dir = tempfile::tempdir().unwrap();
        let r = resource(dir.path(), Some("grep -q new {{src}}"));
        std::fs::write(&r.dest, "old\n").unwrap();
        let (o, c) = write_checked(&Shell, &r, b"new\n", false, false).await;
        assert!(matches!(o, Outcome::Written), "{o:?}");
        assert_eq!(std::fs::read_to_string(&r.dest).unwrap(), "new\n");
        assert_eq!(std::fs::read_to_string(bak_path(&r.dest)).unwrap(), "old\n");
        assert_eq!(
            std::fs::metadata(&r.dest).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(c.unwrap().previous.as_deref(), Some(&b"old\n"[..]));
        let (o, c) = write_checked(&Shell, &r, b"new\n", false, false).await;
        assert!(matches!(o, Outcome::Unchanged), "{o:?}");
        assert!(c.is_none());
        // No staged file is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("confgen-")), "{names:?}");
    }

    #[tokio::test]
    async fn failing_check_leaves_the_destination_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let r = resource(dir.path(), Some("echo bad config >&2; exit 3 # {{src}}"));
        std::fs::write(&r.dest, "old\n").unwrap();
        let (o, c) = write_checked(&Shell, &r, b"new\n", false, false).await;
        match o {
            Outcome::CheckFailed { output } => {
                assert!(output.contains("exit status: 3"), "{output}");
                assert!(output.contains("bad config"), "{output}");
            }
            other => panic!("{other:?}"),
        }
        assert!(c.is_none());
        assert_eq!(std::fs::read_to_string(&r.dest).unwrap(), "old\n");
        assert!(!bak_path(&r.dest).exists());
        assert_eq!(remove_leftovers(&r.dest), 0);
    }

    #[tokio::test]
    async fn noop_with_diff_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = resource(dir.path(), Some("test -s {{src}}"));
        std::fs::write(&r.dest, "a\nb\n").unwrap();
        let (o, _) = write_checked(&Shell, &r, b"a\nc\n", true, true).await;
        match o {
            Outcome::Planned { diff: Some(d) } => {
                assert!(d.contains("-b\n+c\n"), "{d}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read_to_string(&r.dest).unwrap(), "a\nb\n");
    }

    #[tokio::test]
    async fn failed_reload_restores_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = resource(dir.path(), None);
        std::fs::write(&r.dest, "old\n").unwrap();
        let (o, c) = write_checked(&Shell, &r, b"new\n", false, false).await;
        assert!(matches!(o, Outcome::Written), "{o:?}");
        let marker = dir.path().join("reloads");
        let cmd = format!("echo x >> {}; exit 1", marker.display());
        let err = reload_group(&Shell, &cmd, Duration::from_secs(5), &[c.unwrap()])
            .await
            .unwrap_err();
        assert!(err.rolled_back, "rolled back");
        assert_eq!(std::fs::read_to_string(&r.dest).unwrap(), "old\n");
        // Reloaded twice: the failed one and the one after the rollback.
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "x\nx\n");
    }

    #[tokio::test]
    async fn rollback_of_a_new_file_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let r = resource(dir.path(), None);
        let (o, c) = write_checked(&Shell, &r, b"new\n", false, false).await;
        assert!(matches!(o, Outcome::Written), "{o:?}");
        roll_back(&c.unwrap()).unwrap();
        assert!(!r.dest.exists());
    }

    #[test]
    fn etcd_variables_are_recognised() {
        use std::ffi::OsStr;
        for v in [
            "FLOTILLA_ETCD_PASSWORD",
            "FLOTILLA_ETCD_PASSWORD_FILE",
            "FLOTILLA_ETCD_USER",
            "FLOTILLA_ETCD_KEY",
        ] {
            assert!(is_etcd_variable(OsStr::new(v)), "{v}");
        }
        for v in ["FLOTILLA_PREFIX", "PATH", "ETCD_PASSWORD", "FLOTILLA_ETCD"] {
            assert!(!is_etcd_variable(OsStr::new(v)), "{v}");
        }
    }

    #[tokio::test]
    async fn command_timeout_kills_the_whole_group() {
        let started = Instant::now();
        let err = run_command("sleep 30 & sleep 30; wait", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.0.contains("did not finish within 200ms"), "{}", err.0);
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
