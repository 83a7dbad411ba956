//! Applying a render through HAProxy's runtime API instead of a reload (`runtime_api` in a
//! resource), with proxyctl's library doing the HAProxy side.
//!
//! For a render that differs from the destination, [`Runtime::attempt`]:
//!
//! 1. parses both files and asks proxyctl whether they differ in `server` lines of the same
//!    backends only (servers added or removed, an address, a weight). Anything else — a new
//!    backend or frontend, a global or defaults change, a host name, a file it cannot read — is
//!    [`Attempt::Skip`]: the caller takes the reload path (check, swap, verified reload);
//! 2. stages the new file beside the destination, then runs `check_cmd` on it **and** applies
//!    the server lines to the running HAProxy at the same time (the check, a fork of
//!    `haproxy -c`, takes tens to hundreds of milliseconds; the runtime commands take a few);
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
//! finishes whatever was interrupted.
//!
//! A socket that refuses, is missing or does not answer within `runtime_timeout` makes that
//! change fall back to a reload, logs one warning naming the socket, and skips the runtime path
//! (straight to reloads) with a backoff until the socket answers again.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use flotilla_registry::backoff::Backoff;
use proxyctl::{apply_servers, Config, RuntimeApi, Scope, SyncError, SyncOptions, SyncReport};
use tracing::{debug, info, warn};

use crate::apply;
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
        staged: tempfile::NamedTempFile,
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
        /// The error with the path.
        error: String,
        /// Whether the running servers equal the destination (false: reload it).
        reverted: bool,
    },
}

impl Runtime {
    /// The runtime API of `res`, if it has one.
    pub fn for_resource(res: &Resource) -> Option<Runtime> {
        let socket = res.runtime_api.clone()?;
        Some(Runtime {
            api: RuntimeApi::new(&socket).with_timeout(res.runtime_timeout),
            options: SyncOptions {
                drain_timeout: res.runtime_timeout,
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
    pub async fn attempt(&mut self, res: &Resource, rendered: &[u8], metrics: &Metrics) -> Attempt {
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
            // First look since start: the running HAProxy may differ from the file (a run
            // killed in the middle of an apply). Make it equal.
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
            return match self.note(res, result) {
                Ok(report) => {
                    self.compared = true;
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
            };
        }
        let Some(old) = current.as_deref() else {
            return skip("structural", "no destination file yet".into());
        };
        let old = match Config::parse(&String::from_utf8_lossy(old)) {
            Ok(c) => c,
            Err(e) => return skip("unparseable", format!("{}: {e}", res.dest.display())),
        };
        let new = match Config::parse(&String::from_utf8_lossy(rendered)) {
            Ok(c) => c,
            Err(e) => return skip("unparseable", format!("the render: {e}")),
        };
        let changes = match old.server_changes(&new) {
            Ok(c) => c,
            Err(s) => return skip("structural", s.detail),
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
        // The runtime commands go first: staging (a write and an fsync of the whole file) and
        // the check run beside them, on other threads.
        let staging = tokio::task::spawn_blocking({
            let (res, rendered) = (res.clone(), rendered.to_vec());
            move || apply::stage(&res, &rendered)
        });
        let started = Instant::now();
        let (staged, result) = tokio::join!(
            async {
                let staged = staging
                    .await
                    .map_err(|e| Err(format!("staging task failed: {e}")))?
                    .map_err(Err)?;
                match apply::check_staged(res, staged.path()).await {
                    Ok(()) => Ok(staged),
                    Err(output) => Err(Ok(output)),
                }
            },
            async {
                let r = apply_servers(&self.api, &changes, scope, &self.options).await;
                metrics
                    .runtime_apply_seconds
                    .observe(started.elapsed().as_secs_f64());
                (r, Instant::now())
            }
        );
        let (result, applied_at) = result;
        let result = self.note(res, result);
        if result.is_ok() {
            self.compared = true;
            self.last_fallback = None;
        }
        // Err(Ok(output)): the check failed; Err(Err(error)): staging failed.
        let staged = match staged {
            Ok(staged) => staged,
            Err(failure) => {
                // The running servers may be ahead of the file that stays: bring them back
                // (through the socket if it answers; else the caller reloads the file).
                let back = match &result {
                    Err(SyncError::Unreachable(_)) => None,
                    _ => new.server_changes(&old).ok(),
                };
                let reverted = match back {
                    Some(back) => {
                        let r =
                            apply_servers(&self.api, &back, Scope::Changed, &self.options).await;
                        match self.note(res, r) {
                            Ok(_) => true,
                            Err(e) => {
                                warn!(resource = %res.name, error = %e, "cannot revert the servers applied with a render that was not written; reloading the current file");
                                false
                            }
                        }
                    }
                    None => false,
                };
                return match failure {
                    Ok(output) => Attempt::CheckFailed { output, reverted },
                    Err(error) => Attempt::WriteFailed { error, reverted },
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
