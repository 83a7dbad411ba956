//! etcd connection options shared by every binary, and the connection itself.
//!
//! Every daemon flattens [`EtcdArgs`] into its clap command line, so the flags and their
//! `FLOTILLA_*` environment variables are the same everywhere. Connections always set
//! `require_leader`: a member cut off from the quorum answers with an error instead of stale
//! data, and watches on it are cancelled so they can be re-opened on a healthy member.
//!
//! The password: `--etcd-password-file` (or `FLOTILLA_ETCD_PASSWORD_FILE`) is preferred; the
//! environment variable `FLOTILLA_ETCD_PASSWORD` next; the `--etcd-password` flag is visible to
//! every local user in `ps` and `/proc/<pid>/cmdline`. `Debug` never prints the password.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::keys::{Keys, PrefixError, DEFAULT_PREFIX};

/// etcd options, flattened into each binary's CLI.
#[derive(Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd client URLs, comma separated (all members of the cluster).
    #[arg(
        long = "etcd-endpoints",
        env = "FLOTILLA_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,

    /// CA certificate (PEM) that signed the etcd server certificates; enables TLS.
    #[arg(long = "etcd-cacert", env = "FLOTILLA_ETCD_CACERT")]
    pub cacert: Option<PathBuf>,

    /// Client certificate (PEM) for etcd client-certificate authentication.
    #[arg(long = "etcd-cert", env = "FLOTILLA_ETCD_CERT", requires = "key")]
    pub cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(long = "etcd-key", env = "FLOTILLA_ETCD_KEY", requires = "cert")]
    pub key: Option<PathBuf>,

    /// etcd user name (etcd auth); needs --etcd-password-file or FLOTILLA_ETCD_PASSWORD.
    #[arg(long = "etcd-user", env = "FLOTILLA_ETCD_USER")]
    pub user: Option<String>,

    /// etcd password of --etcd-user. Avoid the flag: every local user sees it in `ps`. Prefer
    /// --etcd-password-file, or the environment variable.
    #[arg(
        long = "etcd-password",
        env = "FLOTILLA_ETCD_PASSWORD",
        hide_env_values = true,
        conflicts_with = "password_file"
    )]
    pub password: Option<String>,

    /// File holding the etcd password of --etcd-user (its first line; mode 0600, owned by the
    /// daemon's user). Read at each connect, so a rotated password is picked up on reconnect.
    #[arg(long = "etcd-password-file", env = "FLOTILLA_ETCD_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,

    /// Key prefix under which Flotilla stores everything.
    #[arg(long, env = "FLOTILLA_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,

    /// Timeout for establishing a connection to an etcd member.
    #[arg(long = "etcd-dial-timeout", env = "FLOTILLA_ETCD_DIAL_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,
}

impl Default for EtcdArgs {
    fn default() -> Self {
        EtcdArgs {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            cacert: None,
            cert: None,
            key: None,
            user: None,
            password: None,
            password_file: None,
            prefix: DEFAULT_PREFIX.into(),
            dial_timeout: Duration::from_secs(3),
        }
    }
}

impl std::fmt::Debug for EtcdArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArgs")
            .field("endpoints", &self.endpoints)
            .field("cacert", &self.cacert)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("prefix", &self.prefix)
            .field("dial_timeout", &self.dial_timeout)
            .finish()
    }
}

/// Why etcd could not be reached or used. Each variant says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A bad option value.
    #[error("{flag}: {reason}")]
    Option {
        /// The flag to fix.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A certificate or key file could not be read.
    #[error("{flag} {path}: cannot read: {source}")]
    File {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// etcd refused the user name or password.
    #[error("etcd at {endpoints} rejected user {user:?}: {detail} (check --etcd-user / --etcd-password-file / FLOTILLA_ETCD_PASSWORD)")]
    Auth {
        /// The endpoints tried.
        endpoints: String,
        /// The user.
        user: String,
        /// etcd's message.
        detail: String,
    },
    /// Connecting or the TLS handshake failed.
    #[error("cannot reach etcd at {endpoints}: {detail}{hint}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The underlying error, flattened.
        detail: String,
        /// What to check.
        hint: String,
    },
    /// A request failed.
    #[error("etcd request {op} failed: {source}")]
    Request {
        /// What was being done.
        op: String,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
}

impl EtcdArgs {
    /// The key schema for `--prefix`.
    pub fn keys(&self) -> Result<Keys, PrefixError> {
        Keys::new(&self.prefix)
    }

    /// Checks the options without connecting: endpoint URLs, TLS consistency, readable files.
    pub fn validate(&self) -> Result<(), EtcdError> {
        if self.endpoints.is_empty() || self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(EtcdError::Option {
                flag: "--etcd-endpoints",
                reason: "empty endpoint".into(),
            });
        }
        for e in &self.endpoints {
            let scheme_ok = e.starts_with("http://") || e.starts_with("https://");
            if !scheme_ok {
                return Err(EtcdError::Option {
                    flag: "--etcd-endpoints",
                    reason: format!("{e:?} must start with http:// or https://"),
                });
            }
            if self.tls_enabled() && e.starts_with("http://") {
                return Err(EtcdError::Option {
                    flag: "--etcd-endpoints",
                    reason: format!("{e:?} is plain http but TLS options are set; use https://"),
                });
            }
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(EtcdError::Option {
                flag: "--etcd-password/--etcd-password-file",
                reason: "give one of them, not both".into(),
            });
        }
        let has_password = self.password.is_some() || self.password_file.is_some();
        if self.user.is_some() != has_password {
            return Err(EtcdError::Option {
                flag: "--etcd-user/--etcd-password-file",
                reason: "give a user and its password (--etcd-password-file or FLOTILLA_ETCD_PASSWORD), or neither".into(),
            });
        }
        self.keys().map_err(|e| EtcdError::Option {
            flag: "--prefix",
            reason: e.to_string(),
        })?;
        Ok(())
    }

    fn tls_enabled(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some()
    }

    fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
        std::fs::read(path).map_err(|source| EtcdError::File {
            flag,
            path: path.to_owned(),
            source,
        })
    }

    /// The connect options: require_leader, keep-alive pings (so a dead or partitioned member is
    /// noticed within seconds), dial timeout, TLS and user/password.
    pub fn connect_options(&self) -> Result<ConnectOptions, EtcdError> {
        self.validate()?;
        let mut opts = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(self.dial_timeout)
            // etcd refuses pings closer than its --grpc-keepalive-min-time (5 s by default):
            // after two it sends GOAWAY and closes the connection. With 2 s pings every watch
            // was torn down and relisted about every 8 s. 6 s keeps clear of the default and
            // still notices a dead or partitioned member within 10 s.
            .with_keep_alive(Duration::from_secs(6), Duration::from_secs(4))
            .with_keep_alive_while_idle(true)
            .with_tcp_keepalive(Duration::from_secs(10));
        if self.tls_enabled() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.cacert {
                tls = tls.ca_certificate(Certificate::from_pem(Self::read("--etcd-cacert", ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                let cert = Self::read("--etcd-cert", cert)?;
                let key = Self::read("--etcd-key", key)?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        if let (Some(user), Some(password)) = (&self.user, self.password()?) {
            opts = opts.with_user(user.clone(), password);
        }
        Ok(opts)
    }

    /// The password: from `--etcd-password-file` (first line, without the line end) or
    /// `--etcd-password` / `FLOTILLA_ETCD_PASSWORD`.
    pub fn password(&self) -> Result<Option<String>, EtcdError> {
        const FLAG: &str = "--etcd-password-file";
        let Some(path) = &self.password_file else {
            return Ok(self.password.clone());
        };
        let bytes = Self::read(FLAG, path)?;
        let text = String::from_utf8(bytes).map_err(|_| EtcdError::Option {
            flag: FLAG,
            reason: format!("{}: is not UTF-8 text", path.display()),
        })?;
        let first = text.lines().next().unwrap_or_default();
        if first.is_empty() {
            return Err(EtcdError::Option {
                flag: FLAG,
                reason: format!("{}: the first line is empty", path.display()),
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0
                    && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(path = %path.display(), mode = %format!("{:o}", meta.permissions().mode() & 0o777),
                        "--etcd-password-file is readable by other users; make it mode 0600");
                }
            }
        }
        Ok(Some(first.to_owned()))
    }

    /// Connects and proves the connection with one request (a `status` call on the cluster,
    /// which also exercises authentication and TLS), so a wrong password or CA is reported here,
    /// once, with a clear message.
    pub async fn connect(&self) -> Result<Client, EtcdError> {
        let opts = self.connect_options()?;
        let endpoints = self.endpoints.join(",");
        let fut = async {
            // With a user, connect() authenticates (a wrong password fails here). The status
            // call then proves the transport (TLS handshake, reachability). A permission error
            // on it still proves both.
            let mut client = Client::connect(&self.endpoints, Some(opts)).await?;
            match client.status().await {
                Ok(_) => {}
                Err(e) if error_chain(&e).contains("permission denied") => {}
                Err(e) => return Err(e),
            }
            Ok::<_, etcd_client::Error>(client)
        };
        let deadline = self.dial_timeout + Duration::from_secs(2);
        match tokio::time::timeout(deadline, fut).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(self.classify(&endpoints, e)),
            Err(_) => Err(EtcdError::Unreachable {
                endpoints,
                detail: format!("no answer within {}", humantime::format_duration(deadline)),
                hint: self.hint(),
            }),
        }
    }

    fn hint(&self) -> String {
        if self.tls_enabled() {
            " (is etcd running there? does --etcd-cacert hold the CA that signed its certificate, and do --etcd-cert/--etcd-key match?)".into()
        } else {
            " (is etcd running there? check --etcd-endpoints)".into()
        }
    }

    /// Turns a client error into an [`EtcdError`] that says what to fix.
    pub fn classify(&self, endpoints: &str, e: etcd_client::Error) -> EtcdError {
        let detail = error_chain(&e);
        let lower = detail.to_lowercase();
        if lower.contains("authentication failed") || lower.contains("invalid user id or password")
        {
            return EtcdError::Auth {
                endpoints: endpoints.into(),
                user: self.user.clone().unwrap_or_default(),
                detail,
            };
        }
        if lower.contains("permission denied") || lower.contains("user name is empty") {
            return EtcdError::Auth {
                endpoints: endpoints.into(),
                user: self.user.clone().unwrap_or_default(),
                detail,
            };
        }
        let hint = if lower.contains("certificate")
            || lower.contains("tls")
            || lower.contains("handshake")
        {
            " (TLS: does --etcd-cacert hold the CA that signed etcd's certificate, and is the host name/IP in it?)".into()
        } else {
            self.hint()
        };
        EtcdError::Unreachable {
            endpoints: endpoints.into(),
            detail,
            hint,
        }
    }
}

/// How an etcd request failed, by what it means to the caller rather than by its text: a caller
/// matches on the variant (a lease gone is granted again; anything else is retried with
/// backoff), and the message names the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The lease the request names no longer exists (expired or revoked): etcd's `NotFound`
    /// status, or a keep-alive answered with TTL 0.
    #[error("{what}: etcd says the lease is gone ({detail})")]
    LeaseGone {
        /// The request, as a log line names it.
        what: &'static str,
        /// etcd-client's error and its sources, in one line.
        detail: String,
    },
    /// No answer within the caller's bound.
    #[error("{what}: no answer within {}", humantime::format_duration(*.after))]
    Timeout {
        /// The request, as a log line names it.
        what: &'static str,
        /// The bound that passed.
        after: Duration,
    },
    /// No member could be reached, or the connection or stream broke: retrying may help.
    #[error("{what}: etcd unreachable: {detail}")]
    Unreachable {
        /// The request, as a log line names it.
        what: &'static str,
        /// etcd-client's error and its sources, in one line.
        detail: String,
    },
    /// etcd refused the request's size: more bytes than `--max-request-bytes` or more
    /// operations than `--max-txn-ops` (`InvalidArgument`, which etcd also answers for a
    /// malformed request: an empty or duplicated key in one transaction), or a message larger
    /// than gRPC's limit (`ResourceExhausted` from the server, `OutOfRange` from tonic when
    /// encoding).
    #[error("{what}: etcd refused the request as too large ({detail})")]
    TooLarge {
        /// The request, as a log line names it.
        what: &'static str,
        /// etcd-client's error and its sources, in one line.
        detail: String,
    },
    /// etcd answered with another error (permission denied, no leader, ...).
    #[error("{what}: {detail}")]
    Failed {
        /// The request, as a log line names it.
        what: &'static str,
        /// etcd-client's error and its sources, in one line.
        detail: String,
    },
}

impl StoreError {
    /// Classifies an etcd-client error of the request `what`.
    pub fn from_etcd(what: &'static str, e: &etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        let detail = error_chain(e);
        match e {
            // etcd's ErrGRPCLeaseNotFound; no other lease or KV call answers NotFound.
            E::GRpcStatus(status) if status.code() == tonic::Code::NotFound => {
                StoreError::LeaseGone { what, detail }
            }
            E::GRpcStatus(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
                ) =>
            {
                StoreError::Unreachable { what, detail }
            }
            E::GRpcStatus(status)
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::ResourceExhausted
                        | tonic::Code::OutOfRange
                ) =>
            {
                StoreError::TooLarge { what, detail }
            }
            E::GRpcStatus(status) if status.code() == tonic::Code::DeadlineExceeded => {
                StoreError::Unreachable { what, detail }
            }
            // Opening a keep-alive stream: etcd-client sends the first request on a fresh
            // channel (which cannot fail) and turns an answer with TTL <= 0 into this variant.
            E::LeaseKeepAliveError(_) => StoreError::LeaseGone { what, detail },
            E::TransportError(_) | E::IoError(_) | E::WatchError(_) => {
                StoreError::Unreachable { what, detail }
            }
            _ => StoreError::Failed { what, detail },
        }
    }

    /// The same error, for the request `what` (a caller's more precise name).
    pub fn named(self, what: &'static str) -> Self {
        match self {
            StoreError::LeaseGone { detail, .. } => StoreError::LeaseGone { what, detail },
            StoreError::Timeout { after, .. } => StoreError::Timeout { what, after },
            StoreError::Unreachable { detail, .. } => StoreError::Unreachable { what, detail },
            StoreError::TooLarge { detail, .. } => StoreError::TooLarge { what, detail },
            StoreError::Failed { detail, .. } => StoreError::Failed { what, detail },
        }
    }

    /// The lease the request named is gone.
    pub fn is_lease_gone(&self) -> bool {
        matches!(self, StoreError::LeaseGone { .. })
    }
}

/// Flattens an error and its sources into one line (`a: b: c`), without repeats.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn store_errors_are_classified_by_status_code_and_variant_not_by_text() {
        use etcd_client::Error as E;
        use tonic::Status;
        let class = |e: E| StoreError::from_etcd("write", &e);
        // The code decides, whatever the text says.
        assert!(class(E::GRpcStatus(Status::not_found("anything at all"))).is_lease_gone());
        assert!(class(E::LeaseKeepAliveError("lease not found".into())).is_lease_gone());
        assert!(matches!(
            class(E::GRpcStatus(Status::unavailable("lease not found"))),
            StoreError::Unreachable { what: "write", .. }
        ));
        assert!(matches!(
            class(E::GRpcStatus(Status::permission_denied(
                "etcdserver: permission denied"
            ))),
            StoreError::Failed { .. }
        ));
        assert!(matches!(
            class(E::GRpcStatus(Status::invalid_argument(
                "etcdserver: request is too large"
            ))),
            StoreError::TooLarge { .. }
        ));
        assert!(matches!(
            class(E::GRpcStatus(Status::resource_exhausted(
                "grpc: received message larger than max (600000 vs. 557056)"
            ))),
            StoreError::TooLarge { .. }
        ));
        assert!(matches!(
            class(E::GRpcStatus(Status::out_of_range(
                "Error, encoded message length too large"
            ))),
            StoreError::TooLarge { .. }
        ));
        assert!(matches!(
            class(E::WatchError("stream closed".into())),
            StoreError::Unreachable { .. }
        ));
        let e = class(E::GRpcStatus(Status::not_found(
            "etcdserver: requested lease not found",
        )));
        let text = e.to_string();
        assert!(
            text.starts_with("write: etcd says the lease is gone ("),
            "{text}"
        );
        assert!(
            text.contains("etcdserver: requested lease not found"),
            "{text}"
        );
        let t = StoreError::Timeout {
            what: "lease grant",
            after: Duration::from_millis(1500),
        };
        assert_eq!(t.to_string(), "lease grant: no answer within 1s 500ms");
    }

    fn with_user() -> EtcdArgs {
        EtcdArgs {
            user: Some("node-a".into()),
            ..EtcdArgs::default()
        }
    }

    #[test]
    fn password_file_is_read_first_line_without_line_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\r\nignored\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let a = EtcdArgs {
            password_file: Some(path.clone()),
            ..with_user()
        };
        a.validate().expect("user + password file");
        assert_eq!(a.password().unwrap().as_deref(), Some("s3cret"));
        a.connect_options().expect("options");
        std::fs::write(&path, "\nx\n").unwrap();
        let e = a.password().unwrap_err().to_string();
        assert!(
            e.contains("--etcd-password-file") && e.contains("empty"),
            "{e}"
        );
        let missing = EtcdArgs {
            password_file: Some(dir.path().join("nope")),
            ..with_user()
        };
        let e = missing.connect_options().unwrap_err().to_string();
        assert!(
            e.contains("--etcd-password-file") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn a_user_needs_exactly_one_password_source() {
        let e = with_user().validate().unwrap_err().to_string();
        assert!(e.contains("--etcd-password-file"), "{e}");
        let both = EtcdArgs {
            password: Some("a".into()),
            password_file: Some("/p".into()),
            ..with_user()
        };
        assert!(both
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not both"));
        let no_user = EtcdArgs {
            password_file: Some("/p".into()),
            ..EtcdArgs::default()
        };
        assert!(no_user.validate().is_err());
        let env = EtcdArgs {
            password: Some("from-env".into()),
            ..with_user()
        };
        env.validate().expect("user + password");
        assert_eq!(env.password().unwrap().as_deref(), Some("from-env"));
    }

    #[test]
    fn debug_never_prints_the_password() {
        let a = EtcdArgs {
            password: Some("hunter2".into()),
            ..with_user()
        };
        let text = format!("{a:?}");
        assert!(
            !text.contains("hunter2") && text.contains("<redacted>"),
            "{text}"
        );
    }
}
