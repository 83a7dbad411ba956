//! proxyctl: a client for HAProxy (configuration check, master CLI, runtime API) and nginx,
//! used by the `proxyctl` operator CLI and in-process by `confgen`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), proxyctl::Error> {
//! use std::path::Path;
//! use std::time::Duration;
//! use proxyctl::{AdminState, Haproxy, MasterSocket, RuntimeApi};
//!
//! // Check, reload through the master CLI, and verify that a new worker generation serves.
//! let master = MasterSocket::new("/run/haproxy-master.sock");
//! let outcome = Haproxy::default()
//!     .check_and_reload(Path::new("/etc/haproxy/haproxy.cfg"), &master, Duration::from_secs(10))
//!     .await?;
//! println!("new workers {:?}", outcome.reload.new_workers);
//!
//! // Live state through the runtime API.
//! let api = RuntimeApi::new("/run/haproxy.sock");
//! api.set_server_state(&"be_web/web-1".parse()?, AdminState::Drain).await?;
//! for row in api.show_stat().await? {
//!     println!("{}/{} {}", row.proxy, row.name, row.status);
//! }
//! # Ok(()) }
//! ```
//!
//! Every failure is an [`Error`] naming the file, socket or pid concerned; [`Error::kind`] sorts
//! them into what a caller acts on (check failed → keep the old file; reload failed → roll back;
//! unreachable → retry later). A failed check or reload never touches the running workers.

#![warn(missing_docs)]

mod check;
pub mod config;
mod error;
mod master;
mod nginx;
mod runtime;
mod socket;
pub mod state;
pub mod sync;

use std::path::Path;
use std::time::Duration;

pub use check::{
    parse_haproxy_output, parse_nginx_output, CheckReport, Diagnostic, Haproxy, Severity,
};
pub use config::Config;
pub use error::{Error, ErrorKind};
pub use master::{MasterProc, MasterSocket, ProcList, ReloadOutcome, WorkerProc};
pub use nginx::{Nginx, NginxReloadOutcome};
pub use runtime::{
    parse_servers_state, parse_show_stat, AdminState, Removal, RuntimeApi, ServerRef, ServerState,
    StatKind, StatRow,
};
pub use state::SavedState;
pub use sync::{apply_servers, Scope, SyncError, SyncOptions, SyncReport};

/// A check followed by a verified reload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckedReload {
    /// The check's report (warnings included).
    pub check: CheckReport,
    /// What the reload did.
    pub reload: ReloadOutcome,
    /// The servers' state saved for the new workers (the configuration's `server-state-file`).
    pub state: Option<SavedState>,
    /// Why the state could not be saved, if it could not (the reload went ahead without it).
    pub state_warning: Option<String>,
}

impl Haproxy {
    /// The whole reload procedure: `haproxy -c` on `config`; make sure the master runs `config`
    /// (when `/proc` shows its command line); if `config` names a global `server-state-file`,
    /// save the running servers' state to it (see [`state`]); reload through the master CLI;
    /// verify a new worker generation answers within `timeout`; empty the state file again.
    /// On any failure the running workers keep serving.
    pub async fn check_and_reload(
        &self,
        config: &Path,
        master: &MasterSocket,
        timeout: Duration,
    ) -> Result<CheckedReload, Error> {
        let check = self.check(config).await?;
        let procs = master.show_proc().await?;
        if let Some(running) = master.running_configs(procs.master.pid) {
            if !master::config_is_running(config, &running) {
                return Err(Error::ConfigMismatch {
                    proxy: "haproxy",
                    config: config.to_path_buf(),
                    pid: procs.master.pid,
                    running,
                });
            }
        }
        let cwd = std::fs::read_link(format!("/proc/{}/cwd", procs.master.pid)).ok();
        let (state, state_warning) = match Config::read(config) {
            Ok(parsed) => match state::save_for_reload(&parsed, master, cwd.as_deref()).await {
                Ok(saved) => (saved, None),
                Err(e) => (None, Some(e.to_string())),
            },
            Err(e) => (
                None,
                Some(format!("cannot read it for its server-state-file: {e}")),
            ),
        };
        if let Some(w) = &state_warning {
            tracing::warn!(config = %config.display(), warning = %w, "reloading without the servers' state");
        }
        let reload = master.reload_and_verify(timeout).await;
        if let Some(saved) = &state {
            state::clear_after_reload(saved);
        }
        Ok(CheckedReload {
            check,
            reload: reload?,
            state,
            state_warning,
        })
    }
}
