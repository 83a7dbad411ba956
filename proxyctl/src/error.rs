//! The one error type of the library. Every variant carries the path, socket or pid it is about,
//! so a caller can print one line that tells the operator what to fix.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::check::CheckReport;
use crate::master::ProcList;

/// What went wrong, with the file, socket or process it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file does not exist.
    #[error("{path}: no such configuration file", path = .path.display())]
    ConfigMissing {
        /// The path that was given.
        path: PathBuf,
    },

    /// The configuration file exists but cannot be read (permissions, a directory, …).
    #[error("{path}: cannot read the configuration: {source}", path = .path.display())]
    ConfigUnreadable {
        /// The path that was given.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The configuration file cannot be read as HAProxy configuration (an unmatched quote, a
    /// `server` line without an address, …).
    #[error("{path}:{line}: {message}", path = .path.display())]
    ConfigSyntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },

    /// The server state could not be saved for the new workers (`server-state-file`).
    #[error("{path}: cannot save the servers' state for the reload: {reason}", path = .path.display())]
    StateFile {
        /// The state file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// The proxy's own check (`haproxy -c`, `nginx -t`) rejected the configuration. Nothing was
    /// reloaded.
    #[error("{path}: {proxy} rejected the configuration: {first}",
        path = .report.config.display(), proxy = .report.proxy, first = .report.first_error())]
    CheckFailed {
        /// Every message the check printed, parsed.
        report: Box<CheckReport>,
    },

    /// The proxy binary could not be started.
    #[error("cannot run {program}: {source}", program = .program.display())]
    Spawn {
        /// The program that was run.
        program: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The configuration check did not finish in time. Nothing was reloaded.
    #[error("{what} did not finish within {timeout}", timeout = Human(*.timeout))]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The bound that was exceeded.
        timeout: Duration,
    },

    /// A socket path does not exist.
    #[error("{socket}: no such socket", socket = .socket.display())]
    SocketMissing {
        /// The socket path.
        socket: PathBuf,
    },

    /// A socket path exists but nothing accepts connections on it (a stale socket file).
    #[error("{socket}: connection refused (nothing is listening on it)", socket = .socket.display())]
    SocketRefused {
        /// The socket path.
        socket: PathBuf,
    },

    /// The socket or a directory above it may not be opened by this user.
    #[error("{socket}: permission denied", socket = .socket.display())]
    SocketPermission {
        /// The socket path.
        socket: PathBuf,
    },

    /// The path exists but is not a Unix socket.
    #[error("{socket}: not a Unix socket", socket = .socket.display())]
    NotASocket {
        /// The path.
        socket: PathBuf,
    },

    /// The socket answered nothing within the deadline.
    #[error("{socket}: no answer within {timeout}", socket = .socket.display(), timeout = Human(*.timeout))]
    SocketTimeout {
        /// The socket path.
        socket: PathBuf,
        /// The deadline.
        timeout: Duration,
    },

    /// Any other I/O error while talking to a socket.
    #[error("{socket}: {source}", socket = .socket.display())]
    SocketIo {
        /// The socket path.
        socket: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// HAProxy answered a runtime command with an error message (no such backend, permission
    /// denied at this socket's level, …).
    #[error("{socket}: HAProxy refused `{command}`: {message}", socket = .socket.display())]
    CommandRejected {
        /// The socket path.
        socket: PathBuf,
        /// The command that was sent.
        command: String,
        /// HAProxy's answer, trimmed.
        message: String,
    },

    /// HAProxy's answer could not be understood.
    #[error("{socket}: unexpected answer to `{command}`: {message}", socket = .socket.display())]
    Protocol {
        /// The socket path.
        socket: PathBuf,
        /// The command that was sent.
        command: String,
        /// What did not parse.
        message: String,
    },

    /// A backend, server or other name that cannot be sent to HAProxy safely.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// What the name is (backend, server, …).
        what: &'static str,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// The configuration passed the check but the master could not load it (a port in use, a
    /// missing certificate, …). The previous workers keep serving.
    #[error("{socket}: HAProxy's master could not load the new configuration ({failed} failed \
             reload(s) counted); the previous workers {old:?} keep serving; the reason is in \
             HAProxy's log", socket = .socket.display(), old = .old_workers)]
    ReloadFailed {
        /// The master socket.
        socket: PathBuf,
        /// The master's failed-reload counter after the attempt.
        failed: u32,
        /// Workers that were serving before and still are.
        old_workers: Vec<u32>,
        /// Startup logs, when the master returned them (HAProxy ≥ 3.0).
        log: Option<String>,
    },

    /// No new worker generation answered before the deadline. The previous workers keep serving
    /// until the master finishes loading, if it ever does.
    #[error("{socket}: no new worker generation answered within {timeout} after the reload; \
             the previous workers keep serving until the master finishes loading it (see \
             `show proc`){last}",
        socket = .socket.display(), timeout = Human(*.timeout),
        last = .last.as_ref().map(|p| format!(" (last `show proc`: {p})")).unwrap_or_default())]
    ReloadTimeout {
        /// The master socket.
        socket: PathBuf,
        /// The deadline.
        timeout: Duration,
        /// The last process list seen, if any.
        last: Option<Box<ProcList>>,
    },

    /// The running proxy loads a different configuration than the one given, so a reload would
    /// not apply the file that was checked.
    #[error("{config}: the running {proxy} (pid {pid}) loads {running} instead",
        config = .config.display(), running = join_paths(.running))]
    ConfigMismatch {
        /// `haproxy` or `nginx`.
        proxy: &'static str,
        /// The configuration that was given.
        config: PathBuf,
        /// The master's pid.
        pid: u32,
        /// The configuration paths on the master's command line.
        running: Vec<PathBuf>,
    },

    /// nginx's pid file is missing, unreadable or names no running nginx master.
    #[error("{path}: {reason}", path = .path.display())]
    PidFile {
        /// The pid file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A signal could not be delivered.
    #[error("cannot send {signal} to pid {pid}: {source}")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// The target pid.
        pid: u32,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },

    /// nginx's master started no new worker before the deadline (it rejected the configuration
    /// at reload time, or is still busy). The previous workers keep serving.
    #[error("nginx master {pid}: no new worker within {timeout} after SIGHUP; the previous \
             workers keep serving; the reason is in nginx's error log", timeout = Human(*.timeout))]
    NginxReloadTimeout {
        /// The master's pid.
        pid: u32,
        /// The deadline.
        timeout: Duration,
    },
}

/// Coarse classes of [`Error`], for callers that decide what to do next (roll back, retry, exit
/// with a code) without matching every variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input is wrong: a missing or unreadable file, a bad name, a config that is not the one
    /// the proxy runs.
    Usage,
    /// The configuration check failed; nothing was reloaded.
    CheckFailed,
    /// The reload was attempted and failed or could not be verified; the old workers serve.
    ReloadFailed,
    /// The socket (or process) could not be reached.
    Unreachable,
    /// The proxy refused or garbled a command.
    Rejected,
    /// The proxy binary could not be run.
    Environment,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::ConfigMissing { .. }
            | Error::ConfigUnreadable { .. }
            | Error::ConfigSyntax { .. }
            | Error::InvalidName { .. }
            | Error::ConfigMismatch { .. } => ErrorKind::Usage,
            // A check that does not finish (e.g. `resolvers` that never answer) is a failed check.
            Error::CheckFailed { .. } | Error::Timeout { .. } => ErrorKind::CheckFailed,
            Error::ReloadFailed { .. }
            | Error::ReloadTimeout { .. }
            | Error::NginxReloadTimeout { .. } => ErrorKind::ReloadFailed,
            Error::SocketMissing { .. }
            | Error::SocketRefused { .. }
            | Error::SocketPermission { .. }
            | Error::NotASocket { .. }
            | Error::SocketTimeout { .. }
            | Error::SocketIo { .. }
            | Error::PidFile { .. }
            | Error::Signal { .. } => ErrorKind::Unreachable,
            Error::StateFile { .. } => ErrorKind::Environment,
            Error::CommandRejected { .. } | Error::Protocol { .. } => ErrorKind::Rejected,
            Error::Spawn { .. } => ErrorKind::Environment,
        }
    }

    /// The socket this error is about, if it is about one.
    pub fn socket(&self) -> Option<&std::path::Path> {
        match self {
            Error::SocketMissing { socket }
            | Error::SocketRefused { socket }
            | Error::SocketPermission { socket }
            | Error::NotASocket { socket }
            | Error::SocketTimeout { socket, .. }
            | Error::SocketIo { socket, .. }
            | Error::CommandRejected { socket, .. }
            | Error::Protocol { socket, .. }
            | Error::ReloadFailed { socket, .. }
            | Error::ReloadTimeout { socket, .. } => Some(socket),
            _ => None,
        }
    }

    /// True for socket errors that are expected for a moment while HAProxy's master re-executes
    /// itself during a reload.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::SocketMissing { .. }
                | Error::SocketRefused { .. }
                | Error::SocketTimeout { .. }
                | Error::SocketIo { .. }
        )
    }
}

/// Durations printed the way an operator writes them (`1s 500ms`).
pub(crate) struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Millisecond precision is plenty for deadlines and latencies.
        let ms = Duration::from_millis(self.0.as_millis() as u64);
        write!(f, "{}", humantime::format_duration(ms))
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no -f/-c file".to_string();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
