//! Applying a render through HAProxy's runtime API instead of a reload (`runtime_api` in a
//! resource), with proxyctl's library doing the HAProxy side.
//!
//! For a render that differs from the destination, [`Runtime::attempt`]:
//!
//! 1. parses both files and asks proxyctl whether they differ in `server` lines of the same
//!    backends only (servers added or removed, an address, a weight). Anything else — a new
//!    backend or frontend, a global or defaults change, a host name, a file it cannot read — is
//!    [`Attempt::Skip`]: the caller takes the reload path (check, swap, verified reload);
//! 2. applies the server lines to the running HAProxy while the new file is staged beside the
//!    destination (on another thread), then runs `check_cmd` on it: the runtime commands take a
//!    few milliseconds and are in effect before the check (a fork of `haproxy -c`, tens to
//!    hundreds of milliseconds) starts;
//! 3. reads the running state back (`show servers state`) and compares it with the file, server
//!    by server;
//! 4. hands the staged file back: the caller renames it into place, and reloads only if the
//!    runtime apply did not complete ([`Attempt::Staged`] with an error). A check that fails
//!    after the servers were applied has them reverted to the current destination first.
//!
//! The file is renamed only after the running state was proven equal to it, so a `kill -9` at
//! any moment leaves the file at the old content or the new one, and the running state
//! somewhere between the old file and the new one. The next run compares every backend's
//! running servers with the file and its render (not with what it thinks it did), which
//! finishes whatever was interrupted. The one thing the running state cannot tell is whether a
//! server in maintenance was put there by an operator or by a removal that was interrupted; the
//! servers an apply removes are therefore noted beside the destination
//! (`.<dest>.runtime-removing`) for the time of the apply, and the next run enables those the
//! file has again.
//!
//! A socket that refuses, is missing or does not answer within `runtime_timeout` makes that
//! change fall back to a reload, logs one warning naming the socket, and skips the runtime path
//! (straight to reloads) with a backoff until the socket answers again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_registry::atomic::Staged;
use flotilla_registry::backoff::Backoff;
use proxyctl::{apply_servers, Config, RuntimeApi, Scope, SyncError, SyncOptions, SyncReport};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::apply::{self, CommandFailure, Commands, WriteError};
use crate::metrics::Metrics;
use crate::resource::Resource;

/// The runtime API of one resource, and what confgen knows about it.
#[derive(Debug)]
pub struct Runtime {
    socket: PathBuf,
    api: RuntimeApi,
    options: SyncOptions,
    /// Every backend's running servers were compared with the destination since start (or
    /// since the socket came back).
    compared: bool,
    down: Option<Down>,
    /// The reason of the last fallback since the last runtime apply that completed: the same
    /// reason again is logged at debug, not as a new warning.
    last_fallback: Option<&'static str>,
}

#[derive(Debug)]
struct Down {
    retry_at: Instant,
    backoff: Backoff,
}

/// What [`Runtime::attempt`] did.
#[derive(Debug)]
pub enum Attempt {
    /// The runtime path does not apply to this render: take the reload path.
    Skip {
        /// Metric label.
        reason: &'static str,
        /// For the log.
        detail: String,
    },
    /// The render equals the destination (and the running servers equal it).
    Unchanged,
    /// The render equals the destination but the running HAProxy differs from it in a way the
    /// runtime API could not fix: reload the current file.
    ReloadCurrent {
        /// Metric label.
        reason: &'static str,
        /// For the log.
        detail: String,
    },
    /// The check passed; the staged file is ready to be renamed into place. `Ok`: the running
    /// servers equal it (no reload needed); `Err`: the runtime apply did not complete, reload.
    Staged {
        /// The checked file, beside the destination.
        staged: Staged,
        /// The destination's content before.
        current: Option<Vec<u8>>,
        /// How the runtime apply went.
        result: Result<SyncReport, SyncError>,
        /// When it ended (the servers were verified, or it failed).
        applied_at: Instant,
    },
    /// `check_cmd` rejected the staged file; the destination is untouched. `reverted`: the
    /// servers that were applied at the same time are back at the destination's (false: a
    /// reload of the destination is needed to bring them back).
    CheckFailed {
        /// The check's output.
        output: String,
        /// Whether the running servers equal the destination again.
        reverted: bool,
    },
    /// Reading the destination or staging the new file failed.
    WriteFailed {
        /// The step, the path and the I/O error.
        error: WriteError,
        /// Whether the running servers equal the destination (false: reload it).
        reverted: bool,
    },
}

/// Why a render beside a runtime apply is not staged and checked.
enum NotStaged {
    /// `check_cmd` rejected it: its output.
    CheckFailed(String),
    /// Staging it failed.
    WriteFailed(WriteError),
}

impl Runtime {
    /// The runtime API of `res`, if it has one.
    pub fn for_resource(res: &Resource) -> Option<Runtime> {
        let socket = res.runtime_api.clone()?;
        // Servers an interrupted run was removing (see `removing_journal`).
        let release = read_journal(&res.dest);
        if !release.is_empty() {
            info!(resource = %res.name, servers = release.len(), "an earlier run was removing servers when it stopped; those the file still has are enabled again at the first apply");
        }
        Some(Runtime {
            api: RuntimeApi::new(&socket).with_timeout(res.runtime_timeout),
            options: SyncOptions {
                drain_timeout: res.runtime_timeout,
                release,
            },
            socket,
            compared: false,
            down: None,
            last_fallback: None,
        })
    }

    /// For `/healthz`: why changes are reloaded instead, while the socket does not answer.
    pub fn status(&self) -> Option<String> {
        self.down.as_ref().map(|_| {
            format!(
                "runtime API {} unreachable, reloading instead",
                self.socket.display()
            )
        })
    }

    /// True the first time in a row a runtime apply falls back for `reason` (log a warning),
    /// false while the same reason repeats (log at debug).
    pub fn first_fallback(&mut self, reason: &'static str) -> bool {
        self.last_fallback.replace(reason) != Some(reason)
    }

    /// Applies `rendered` (see the module docs).
    pub async fn attempt(
        &mut self,
        cmds: &dyn Commands,
        res: &Resource,
        rendered: &[u8],
        metrics: &Metrics,
    ) -> Attempt {
        let current = match apply::read_dest(res) {
            Ok(c) => c,
            Err(error) => {
                return Attempt::WriteFailed {
                    error,
                    reverted: true,
                }
            }
        };
        let skip = |reason, detail: String| Attempt::Skip { reason, detail };
        if current.as_deref() == Some(rendered) {
            if self.compared || self.backing_off() {
                return Attempt::Unchanged;
            }
            return self.make_running_equal(res, rendered, metrics).await;
        }
        let (old, new, changes) = match plan(res, current.as_deref(), rendered) {
            Ok(p) => p,
            Err((reason, detail)) => return skip(reason, detail),
        };
        if self.backing_off() {
            return skip(
                "unreachable",
                format!("{} failed recently", self.socket.display()),
            );
        }
        let scope = if self.compared {
            Scope::Changed
        } else {
            Scope::All
        };
        let removing = self.journal_removals(res, &changes);
        // The runtime commands go first; the new file is staged (a write and an fsync of the
        // whole file) on another thread meanwhile, and checked once the commands are done: the
        // check is a fork of `haproxy -c` that needs a core for tens of milliseconds, which on
        // a busy machine slows the commands down if it runs beside them.
        let staging = tokio::task::spawn_blocking({
            let (res, rendered) = (res.clone(), rendered.to_vec());
            move || apply::stage(&res, &rendered)
        });
        let started = Instant::now();
        let (staged, result) = tokio::join!(
            async {
                staging
                    .await
                    .map_err(WriteError::StagingTask)
                    .and_then(|r| r)
            },
            async {
                let r = apply_servers(&self.api, &changes, scope, &self.options).await;
                metrics
                    .runtime_apply_seconds
                    .observe(started.elapsed().as_secs_f64());
                (r, Instant::now())
            }
        );
        let staged: Result<Staged, NotStaged> = match staged {
            Ok(staged) => match apply::check_staged(cmds, res, staged.path()).await {
                Ok(()) => Ok(staged),
                Err(CommandFailure(output)) => Err(NotStaged::CheckFailed(output)),
            },
            Err(error) => Err(NotStaged::WriteFailed(error)),
        };
        let (result, applied_at) = result;
        let result = self.note(res, result);
        if result.is_ok() {
            self.compared = true;
            self.last_fallback = None;
            self.released(res);
        } else if !removing.is_empty() {
            // The fallback reloads the file, which has none of them; nothing to release.
            self.options.release.clear();
            remove_journal(&res.dest);
        }
        let staged = match staged {
            Ok(staged) => staged,
            Err(failure) => {
                let reverted = self.revert(res, &result, &old, &new).await;
                return match failure {
                    NotStaged::CheckFailed(output) => Attempt::CheckFailed { output, reverted },
                    NotStaged::WriteFailed(error) => Attempt::WriteFailed { error, reverted },
                };
            }
        };
        Attempt::Staged {
            staged,
            current,
            result,
            applied_at,
        }
    }

    /// The destination already holds `rendered`, first look since start: the running HAProxy
    /// may differ from the file (a run killed in the middle of an apply). Makes it equal.
    async fn make_running_equal(
        &mut self,
        res: &Resource,
        rendered: &[u8],
        metrics: &Metrics,
    ) -> Attempt {
        let Ok(cfg) = Config::parse(&String::from_utf8_lossy(rendered)) else {
            return Attempt::Unchanged;
        };
        let Ok(changes) = cfg.server_changes(&cfg) else {
            return Attempt::Unchanged;
        };
        let started = Instant::now();
        let result = apply_servers(&self.api, &changes, Scope::All, &self.options).await;
        metrics
            .runtime_apply_seconds
            .observe(started.elapsed().as_secs_f64());
        match self.note(res, result) {
            Ok(report) => {
                self.compared = true;
                self.released(res);
                if !report.is_noop() {
                    metrics
                        .runtime_applies
                        .get_or_create(&crate::metrics::resource(&res.name))
                        .inc();
                    warn!(resource = %res.name, socket = %self.socket.display(), changed = %report, "the running HAProxy differed from the destination (an earlier run was interrupted); its servers now equal the file");
                }
                Attempt::Unchanged
            }
            Err(e) => Attempt::ReloadCurrent {
                reason: e.reason(),
                detail: e.to_string(),
            },
        }
    }

    /// After a render that was applied but not written: brings the running servers back to
    /// the file that stays; false if that is not possible (the caller reloads the file).
    async fn revert(
        &mut self,
        res: &Resource,
        result: &Result<SyncReport, SyncError>,
        old: &Config,
        new: &Config,
    ) -> bool {
        // The running servers may be ahead of the file that stays: bring them back
        // (through the socket if it answers; else the caller reloads the file).
        let back = match result {
            Err(SyncError::Unreachable(_)) => None,
            _ => new.server_changes(old).ok(),
        };
        match back {
            Some(back) => {
                let r = apply_servers(&self.api, &back, Scope::Changed, &self.options).await;
                match self.note(res, r) {
                    Ok(_) => true,
                    Err(e) => {
                        warn!(resource = %res.name, error = %e, "cannot revert the servers applied with a render that was not written; reloading the current file");
                        false
                    }
                }
            }
            None => false,
        }
    }

    /// Servers this apply puts in maintenance to remove them, noted beside `dest` until the
    /// apply is over: a run killed in between cannot tell them from an operator's maintenance
    /// otherwise, and one that comes back to the file would stay out.
    fn journal_removals(
        &self,
        res: &Resource,
        changes: &proxyctl::config::ServerChanges,
    ) -> BTreeSet<(String, String)> {
        let removing: BTreeSet<(String, String)> = changes
            .changed()
            .flat_map(|b| b.removed().map(|s| (b.backend.clone(), s.clone())))
            .collect();
        if !removing.is_empty() {
            let all: BTreeSet<_> = self.options.release.union(&removing).cloned().collect();
            write_journal(&res.dest, &all);
        }
        removing
    }

    /// An apply completed: the servers an earlier run left in maintenance are settled.
    fn released(&mut self, res: &Resource) {
        if !self.options.release.is_empty() {
            self.options.release.clear();
            remove_journal(&res.dest);
        } else if journal_path(&res.dest).exists() {
            remove_journal(&res.dest);
        }
    }

    fn backing_off(&self) -> bool {
        self.down
            .as_ref()
            .is_some_and(|d| Instant::now() < d.retry_at)
    }

    /// Tracks the socket's health from a result: one warning when it stops answering (naming
    /// it), debug while it stays down, info when it is back.
    fn note(
        &mut self,
        res: &Resource,
        result: Result<SyncReport, SyncError>,
    ) -> Result<SyncReport, SyncError> {
        match &result {
            Err(SyncError::Unreachable(e)) => match &mut self.down {
                None => {
                    warn!(
                        resource = %res.name,
                        socket = %self.socket.display(),
                        error = %e,
                        "runtime API unreachable; falling back to reloads until it answers again"
                    );
                    let mut backoff = Backoff::new(
                        Duration::from_secs(1),
                        Duration::from_secs(30),
                        Duration::from_secs(60),
                    );
                    self.down = Some(Down {
                        retry_at: Instant::now() + backoff.next_delay(),
                        backoff,
                    });
                    self.compared = false;
                }
                Some(d) => {
                    debug!(resource = %res.name, socket = %self.socket.display(), error = %e, "runtime API still unreachable");
                    d.retry_at = Instant::now() + d.backoff.next_delay();
                }
            },
            _ => {
                if self.down.take().is_some() {
                    info!(resource = %res.name, socket = %self.socket.display(), "runtime API answers again");
                }
            }
        }
        result
    }
}

/// The two configs and the server changes between them; `Err` is the reason (a metric label)
/// and detail of why the runtime API cannot apply this render (no file yet, a config that does
/// not parse, a structural change).
fn plan(
    res: &Resource,
    current: Option<&[u8]>,
    rendered: &[u8],
) -> Result<(Config, Config, proxyctl::config::ServerChanges), (&'static str, String)> {
    let Some(old) = current else {
        return Err(("structural", "no destination file yet".into()));
    };
    let old = Config::parse(&String::from_utf8_lossy(old))
        .map_err(|e| ("unparseable", format!("{}: {e}", res.dest.display())))?;
    let new = Config::parse(&String::from_utf8_lossy(rendered))
        .map_err(|e| ("unparseable", format!("the render: {e}")))?;
    let changes = old
        .server_changes(&new)
        .map_err(|s| ("structural", s.detail))?;
    Ok((old, new, changes))
}

/// `.<dest name>.runtime-removing` beside the destination: the servers (`backend/server` per
/// line) an apply puts in maintenance to delete them, from before the first command until the
/// apply is over. Not fsynced: it guards against confgen being killed, not against a power
/// loss (which takes HAProxy's runtime state with it).
fn journal_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.runtime-removing"))
}

fn read_journal(dest: &Path) -> BTreeSet<(String, String)> {
    std::fs::read_to_string(journal_path(dest))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().split_once('/'))
        .map(|(b, s)| (b.to_string(), s.to_string()))
        .collect()
}

fn write_journal(dest: &Path, servers: &BTreeSet<(String, String)>) {
    let path = journal_path(dest);
    let staged = path.with_extension("tmp");
    let text: String = servers.iter().map(|(b, s)| format!("{b}/{s}\n")).collect();
    if let Err(e) = std::fs::write(&staged, text).and_then(|()| std::fs::rename(&staged, &path)) {
        warn!(path = %path.display(), error = %e, "cannot note the servers being removed");
    }
}

fn remove_journal(dest: &Path) {
    match std::fs::remove_file(journal_path(dest)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => debug!(dest = %dest.display(), error = %e, "cannot remove the removal journal"),
    }
}
