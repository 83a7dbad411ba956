//! Plumbing every Flotilla daemon shares: logging, the `/metrics` + `/healthz` endpoint and
//! systemd notification. Kept small; a daemon's own logic lives in its crate.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging and observability options shared by the daemons.
#[derive(Debug, Clone, clap::Args)]
pub struct ObsArgs {
    /// Log format on stderr. Filter with RUST_LOG (e.g. `info`, `presence=debug`).
    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics at /metrics and readiness at /healthz on this address
    /// (e.g. 127.0.0.1:9180). Off when not given.
    #[arg(long, env = "FLOTILLA_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// Installs the tracing subscriber: stderr, `RUST_LOG` filter (default `info`).
///
/// Text logs have colour only when stderr is a terminal (never in a pipe, a file or the
/// journal). Under systemd with stderr connected to the journal (`JOURNAL_STREAM` names stderr's
/// device and inode), lines carry no timestamp (the journal has its own) and start with the
/// syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), so `journalctl -p
/// warning` works.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text if stderr_is_journal() => builder
            .with_ansi(false)
            .event_format(Journald(
                tracing_subscriber::fmt::format::Format::default().without_time(),
            ))
            .try_init(),
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// True if stderr is the journal stream systemd gave this process (`JOURNAL_STREAM` is
/// `<device>:<inode>` of it; a child whose stderr was redirected elsewhere inherits the variable
/// but not the stream).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// The default text format (without time) behind a syslog priority prefix, for the journal.
struct Journald(tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Full, ()>);

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Journald
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// What `/healthz` reports: healthy (200) or not (503), with a one-line-per-check body.
pub type HealthFn = Arc<dyn Fn() -> (bool, String) + Send + Sync>;

/// Hyper's smallest read buffer: a [`ListenerLimits::max_head_bytes`] below it is raised to it.
pub const MIN_HEAD_BYTES: usize = 8192;

/// Bounds of the `/metrics` + `/healthz` listener, so a client (or many) cannot exhaust the
/// daemon's tasks, memory or file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections served at once; more are closed at once (with a 503 when possible).
    pub max_connections: usize,
    /// Connections served at once for one peer address, so one client cannot starve a scraper
    /// elsewhere.
    pub max_per_peer: usize,
    /// Largest request head (request line and headers): hyper's read buffer for the head
    /// (`max_buf_size`). A larger head gets a 431 (no body) and the connection is closed. Hyper
    /// accepts no buffer below [`MIN_HEAD_BYTES`] (8 KiB), so a smaller value is raised to it.
    pub max_head_bytes: usize,
    /// Time for the whole request head to arrive, counted from the accept (hyper's
    /// `header_read_timeout`): idle and slow clients are dropped without an answer.
    pub head_timeout: Duration,
    /// Time to write the answer. A connection lives at most `head_timeout + write_timeout`, then
    /// it is dropped whatever it is doing (a client that does not read its answer).
    pub write_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 64,
            max_per_peer: 8,
            max_head_bytes: MIN_HEAD_BYTES,
            head_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Connections being served, in total and per peer address.
#[derive(Default)]
struct Open {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One admitted connection; releases its slot when dropped.
struct Slot {
    open: Arc<Mutex<Open>>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        o.total -= 1;
        if let Some(n) = o.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                o.per_peer.remove(&self.peer);
            }
        }
    }
}

/// A slot for a new connection from `peer`, or `None` when `limits` allow no more (in total or
/// from that address).
fn admit(open: &Arc<Mutex<Open>>, peer: IpAddr, limits: &ListenerLimits) -> Option<Slot> {
    let mut o = open.lock().unwrap_or_else(PoisonError::into_inner);
    let mine = o.per_peer.get(&peer).copied().unwrap_or(0);
    if o.total >= limits.max_connections || mine >= limits.max_per_peer {
        return None;
    }
    o.total += 1;
    *o.per_peer.entry(peer).or_insert(0) += 1;
    Some(Slot {
        open: open.clone(),
        peer,
    })
}

/// Serves `/metrics` (Prometheus text from `registry`) and `/healthz` (from `health`) on
/// `listener` until the task is dropped, within [`ListenerLimits::default`]. HTTP/1.0 and 1.1
/// (hyper), one request per connection (`Connection: close`).
pub async fn serve_observability(
    listener: TcpListener,
    registry: Arc<Mutex<Registry>>,
    health: HealthFn,
) {
    serve_observability_with(listener, registry, health, ListenerLimits::default()).await
}

/// [`serve_observability`] within `limits`. Connections over a limit are closed at once and
/// counted in `metrics_listener_refused_connections_total` (registered in `registry`), with
/// one warning per burst. Registers `flotilla_build_info` and the process metrics
/// ([`crate::process`]) in `registry` too, so every daemon's `/metrics` has them.
///
/// Each admitted connection is its own task, served by hyper's HTTP/1 server: a client that
/// sends garbage, too large a head or nothing at all ends its own connection (400, 431 or a
/// close; logged at debug level), never the listener. Accept errors (e.g. out of descriptors)
/// are logged and retried after 100 ms.
pub async fn serve_observability_with(
    listener: TcpListener,
    registry: Arc<Mutex<Registry>>,
    health: HealthFn,
    limits: ListenerLimits,
) {
    let refused = Counter::<u64>::default();
    {
        let mut reg = registry.lock().unwrap_or_else(PoisonError::into_inner);
        reg.register(
            "metrics_listener_refused_connections",
            "Connections to the /metrics + /healthz listener closed because too many were open (in total or from one address)",
            refused.clone(),
        );
        crate::process::register(&mut reg);
    }
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(limits.max_head_bytes.max(MIN_HEAD_BYTES))
        // One request per connection, as before hyper: the connection's lifetime is bounded by
        // the head and write timeouts alone, with no idle keep-alive state to bound.
        .keep_alive(false)
        // A client may shut down its sending side once the request is out (`nc -N`); it still
        // gets its answer.
        .half_close(true);
    let lifetime = limits.head_timeout.saturating_add(limits.write_timeout);
    let open: Arc<Mutex<Open>> = Arc::default();
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = admit(&open, peer.ip(), &limits) else {
            refused.inc();
            if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                warn!(%peer, max_connections = limits.max_connections, max_per_peer = limits.max_per_peer,
                    "metrics listener: too many connections; closing new ones (warned at most once a minute)");
                warned_at = Some(tokio::time::Instant::now());
            }
            // Best effort, never waiting: the socket buffer of a new connection has room.
            let _ = sock.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            continue;
        };
        let registry = registry.clone();
        let health = health.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let resp = answer(req.uri().path(), &registry, &health);
            debug!(%peer, method = %req.method(), uri = %req.uri(), status = resp.status().as_u16(), "served");
            std::future::ready(Ok::<_, Infallible>(resp))
        });
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(sock), service);
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(lifetime, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics listener: connection failed"),
                Err(_) => {
                    debug!(%peer, ?lifetime, "metrics listener: connection outlived the head + write timeouts; dropped")
                }
            }
        });
    }
}

/// The answer to a request for `path` (any method; hyper leaves out the body for `HEAD`):
/// `/metrics`, `/healthz` or a 404. The query string plays no part.
fn answer(path: &str, registry: &Mutex<Registry>, health: &HealthFn) -> Response<String> {
    let (status, ctype, body) = match path {
        "/metrics" => {
            let mut text = String::new();
            let reg = registry.lock().unwrap_or_else(PoisonError::into_inner);
            // Writing to a String cannot fail; a metric that fails to encode is cut off.
            let _ = prometheus_client::encoding::text::encode(&mut text, &reg);
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        "/healthz" => {
            let (ok, text) = health();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "text/plain; charset=utf-8", text)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /healthz\n".to_string(),
        ),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

/// Binds `addr` and serves observability in a background task; errors name the flag.
pub async fn spawn_observability(
    addr: SocketAddr,
    registry: Arc<Mutex<Registry>>,
    health: HealthFn,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: cannot listen: {e}"))?;
    Ok(tokio::spawn(serve_observability(
        listener, registry, health,
    )))
}

/// Tells systemd the daemon is ready (no-op outside systemd).
pub fn notify_ready() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// Tells systemd the daemon is stopping (no-op outside systemd).
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// If systemd set `WatchdogSec`, pings WATCHDOG=1 at half the interval while `alive()` holds;
/// when it stops holding, pings stop and systemd restarts the daemon.
pub fn spawn_watchdog(
    alive: Arc<dyn Fn() -> bool + Send + Sync>,
) -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled().filter(|d| !d.is_zero())?;
    let period = interval / 2;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if alive() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }))
}
