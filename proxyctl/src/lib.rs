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
mod error;
mod master;
mod nginx;
mod runtime;
mod socket;

use std::path::Path;
use std::time::Duration;

pub use check::{
    parse_haproxy_output, parse_nginx_output, CheckReport, Diagnostic, Haproxy, Severity,
};
pub use error::{Error, ErrorKind};
pub use master::{MasterProc, MasterSocket, ProcList, ReloadOutcome, WorkerProc};
pub use nginx::{Nginx, NginxReloadOutcome};
pub use runtime::{parse_show_stat, AdminState, RuntimeApi, ServerRef, StatKind, StatRow};

/// A check followed by a verified reload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckedReload {
    /// The check's report (warnings included).
    pub check: CheckReport,
    /// What the reload did.
    pub reload: ReloadOutcome,
}

impl Haproxy {
    /// The whole reload procedure: `haproxy -c` on `config`; make sure the master runs `config`
    /// (when `/proc` shows its command line); reload through the master CLI; verify a new worker
    /// generation answers within `timeout`. On any failure the running workers keep serving.
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
        let reload = master.reload_and_verify(timeout).await?;
        Ok(CheckedReload { check, reload })
    }
}
