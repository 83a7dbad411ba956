//! etcd connection options shared by every binary, and the connection itself.
//!
//! Every daemon flattens [`EtcdArgs`] into its clap command line, so the flags and their
//! `FLOTILLA_*` environment variables are the same everywhere. Connections always set
//! `require_leader`: a member cut off from the quorum answers with an error instead of stale
//! data, and watches on it are cancelled so they can be re-opened on a healthy member.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::keys::{Keys, PrefixError, DEFAULT_PREFIX};

/// etcd options, flattened into each binary's CLI.
#[derive(Debug, Clone, clap::Args)]
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

    /// etcd user name (etcd auth).
    #[arg(long = "etcd-user", env = "FLOTILLA_ETCD_USER", requires = "password")]
    pub user: Option<String>,

    /// etcd password of --etcd-user. Prefer the environment variable over the flag.
    #[arg(
        long = "etcd-password",
        env = "FLOTILLA_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,

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
            prefix: DEFAULT_PREFIX.into(),
            dial_timeout: Duration::from_secs(3),
        }
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
    #[error("etcd at {endpoints} rejected user {user:?}: {detail} (check --etcd-user / --etcd-password)")]
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
        if self.user.is_some() != self.password.is_some() {
            return Err(EtcdError::Option {
                flag: "--etcd-user/--etcd-password",
                reason: "give both or neither".into(),
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
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
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
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            opts = opts.with_user(user.clone(), password.clone());
        }
        Ok(opts)
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
