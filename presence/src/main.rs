//! presence: Docker events → endpoints in etcd under one node lease.
//!
//! Wiring only: the event reader ([`events`]) feeds the reconciler ([`reconcile`]), which feeds
//! the etcd writer ([`writer`]); none waits on the next. See docs/PRESENCE.md.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use flotilla_registry::backoff::Backoff;
use flotilla_registry::daemon::{self, HealthFn};
use flotilla_registry::record::now_rfc3339;
use flotilla_registry::retry::Retry;
use flotilla_registry::shutdown::{Hangups, Shutdown};
use flotilla_registry::{EtcdError, Node};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use presence::cli::{Cli, Config};
use presence::docker::{DockerApi, Engine};
use presence::metrics::{render_health, Metrics, SharedStatus, Status};
use presence::reconcile::{Reconciler, Trigger};
use presence::spec::{decide_noting, Decision, SpecConfig};
use presence::writer::{Writer, WriterConfig};
use presence::{events, state_file, state_lock};

/// How long a clean shutdown may take before presence gives up on revoking.
const GRACE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    if let Some(code) = flotilla_clidoc::intercept(<Cli as clap::CommandFactory>::command) {
        return code;
    }
    let cli = Cli::parse();
    daemon::init_logging(cli.obs.log_format);
    let cfg = match cli.validate() {
        Ok(cfg) => cfg,
        Err(errors) => {
            for e in errors {
                eprintln!("presence: {e}");
            }
            return ExitCode::from(2);
        }
    };
    let state_file = cfg
        .state_file
        .as_deref()
        .map_or("none".into(), |p| p.display().to_string());
    info!(
        node = %cfg.node,
        docker_host = %cfg.docker_host,
        docker_host_from = %cfg.docker_host_from,
        ttl = %humantime::format_duration(cfg.ttl),
        resync = %humantime::format_duration(cfg.resync),
        %state_file,
        dry_run = cli.dry_run,
        "presence starting"
    );
    // One presence per state file, checked before anything touches Docker or etcd: a second
    // one would revoke the first's lease as its "predecessor's" (state_lock.rs). Held until
    // exit. --dry-run neither reads nor writes the state file.
    let _state_lock = match cfg.state_file.as_deref().filter(|_| !cli.dry_run) {
        Some(path) => match state_lock::acquire(path) {
            Ok(lock) => {
                debug!(lock = %lock.path.display(), "state file locked");
                Some(lock)
            }
            Err(e) => {
                eprintln!("presence: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("presence: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = if cli.dry_run {
        rt.block_on(dry_run(&cfg))
    } else {
        rt.block_on(run(cli, cfg))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("presence: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn spec_config(cfg: &Config) -> SpecConfig {
    SpecConfig {
        node: cfg.node.clone(),
        advertise_ip: cfg.advertise_ip,
        internal: cfg.internal,
        explicit: cfg.explicit,
        allow_loopback: cfg.allow_loopback,
        keys: cfg.keys.clone(),
    }
}

/// `--dry-run`: one list, printed as JSON lines `{"key": …, "endpoint": {…}}`.
async fn dry_run(cfg: &Config) -> anyhow::Result<()> {
    let engine = tokio::time::timeout(
        Duration::from_secs(10),
        Engine::connect(&cfg.docker_host, cfg.label_filter.clone()),
    )
    .await
    .with_context(|| format!("--docker-host {}: no answer within 10s", cfg.docker_host))?;
    let spec = spec_config(cfg);
    let ids = engine.list().await.map_err(anyhow::Error::msg)?;
    let mut infos = Vec::new();
    for id in ids {
        if let Some(info) = engine.inspect(&id).await.map_err(anyhow::Error::msg)? {
            infos.push(info);
        }
    }
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    for info in infos {
        let decided = decide_noting(&info, &spec).map(|(d, local)| {
            for b in local {
                warn!(container = %info.name, port = %format!("{}/{}", b.port, b.proto), binding = %b,
                    "would not announce a port bound to a loopback or link-local address only (--allow-loopback)");
            }
            d
        });
        match decided {
            Ok(Decision::Register(eps)) => {
                for ep in eps {
                    let line = serde_json::json!({ "key": ep.key(&cfg.keys), "endpoint": ep });
                    println!("{line}");
                }
            }
            Ok(Decision::Skip(reason)) => {
                info!(container = %info.name, %reason, "would not register")
            }
            Err(e) => {
                warn!(container = %e.container, id = %e.short_id, field = %e.field, reason = %e.reason,
                "container skipped: invalid label or env value")
            }
        }
    }
    Ok(())
}

/// Connects to etcd, retrying while it is unreachable; wrong credentials or files are fatal.
async fn connect_etcd(cli: &Cli) -> anyhow::Result<etcd_client::Client> {
    let mut retry = Retry::new(
        "etcd",
        Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(5),
        ),
    );
    loop {
        match cli.etcd.connect().await {
            Ok(c) => {
                retry.succeeded();
                return Ok(c);
            }
            Err(e @ EtcdError::Unreachable { .. }) | Err(e @ EtcdError::Request { .. }) => {
                retry.failed_then_wait(&e).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Builds the metrics and serves them with /healthz (`--metrics-addr`), and starts the systemd
/// watchdog ping.
async fn observe(cli: &Cli, status: &SharedStatus) -> anyhow::Result<Metrics> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    if let Some(addr) = cli.obs.metrics_addr {
        let st = status.clone();
        let health: HealthFn = Arc::new(move || render_health(&st.lock().expect("status")));
        daemon::spawn_observability(addr, Arc::new(Mutex::new(registry)), health).await?;
        info!(%addr, "serving /metrics and /healthz");
    }
    {
        // The ping vouches that every loop still comes round (liveness.rs), not merely that
        // the process exists.
        let liveness = metrics.pulse.liveness.clone();
        daemon::spawn_watchdog(Arc::new(move || liveness.alive()));
    }
    Ok(metrics)
}

/// The lease a predecessor of this node left in `--state-file`, to revoke after the first sync.
fn predecessor(cfg: &Config) -> Option<i64> {
    match cfg.state_file.as_deref().map(state_file::read).transpose() {
        Ok(Some(Some(st))) if st.node == cfg.node => {
            info!(lease = %format!("{:x}", st.lease), pid = st.pid, "found the predecessor's lease in the state file; it is revoked after the first sync");
            Some(st.lease)
        }
        Ok(Some(Some(st))) => {
            warn!(state_node = %st.node, node = %cfg.node, "the state file belongs to another node name; ignoring it");
            None
        }
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, "ignoring the state file");
            None
        }
    }
}

/// The etcd writer of this node's record and endpoints.
fn writer(
    cfg: &Config,
    client: etcd_client::Client,
    predecessor: Option<i64>,
    metrics: Metrics,
    status: SharedStatus,
) -> Writer<flotilla_registry::store::EtcdStore> {
    let node = Node {
        node: cfg.node.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: now_rfc3339(),
        advertise_ip: cfg.advertise_ip,
        labels: cfg.node_labels.clone(),
    };
    Writer::new(
        flotilla_registry::store::EtcdStore::new(client),
        WriterConfig {
            keys: cfg.keys.clone(),
            node,
            ttl: cfg.ttl,
            state_file: cfg.state_file.clone(),
            predecessor,
            max_txn_bytes: cfg.max_txn_bytes,
        },
        metrics,
        status,
    )
}

async fn run(cli: Cli, cfg: Config) -> anyhow::Result<()> {
    // Before any work: the first SIGTERM/SIGINT starts a clean shutdown, a second forces exit.
    let mut hup = Hangups::install().context("installing the SIGHUP handler")?;
    let mut signals = Shutdown::install().context("installing the SIGTERM/SIGINT handlers")?;

    let status: SharedStatus = Arc::new(Mutex::new(Status::default()));
    let metrics = observe(&cli, &status).await?;
    let predecessor = predecessor(&cfg);

    // Docker first: events queue up while etcd is being reached.
    let engine = tokio::select! {
        e = Engine::connect(&cfg.docker_host, cfg.label_filter.clone()) => e,
        sig = signals.next() => {
            info!(signal = sig, "shutting down before Docker answered");
            return Ok(());
        }
    };
    let (reader_tx, reader_rx) = mpsc::unbounded_channel();
    let (writer_tx, writer_rx) = mpsc::unbounded_channel();
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel();
    let reconnects = metrics.docker_reconnects.clone();
    tokio::spawn(events::run_reader(
        engine.clone(),
        reader_tx,
        events::reader_backoff(),
        metrics.pulse.clone(),
        move || {
            reconnects.inc();
        },
    ));
    let reconciler = Reconciler::new(
        Arc::new(engine),
        spec_config(&cfg),
        writer_tx,
        metrics.clone(),
        status.clone(),
    );
    tokio::spawn(reconciler.run(reader_rx, trigger_rx, cfg.resync));

    let client = tokio::select! {
        c = connect_etcd(&cli) => c?,
        sig = signals.next() => {
            info!(signal = sig, "shutting down before etcd answered");
            return Ok(());
        }
    };
    let writer = writer(&cfg, client, predecessor, metrics, status);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut writer_task = tokio::spawn(writer.run(writer_rx, stop_rx));
    info!(node = %cfg.node, advertise_ip = %cfg.advertise_ip, ttl = %humantime::format_duration(cfg.ttl), "presence running");

    loop {
        tokio::select! {
            sig = signals.next() => {
                info!(signal = sig, "shutting down: revoking the lease");
                break;
            }
            _ = hup.next() => {
                let _ = trigger_tx.send(Trigger::Reconcile);
            }
            r = &mut writer_task => {
                anyhow::bail!("the etcd writer stopped unexpectedly: {r:?}");
            }
        }
    }
    let _ = stop_tx.send(true);
    tokio::select! {
        r = &mut writer_task => {
            r.context("the etcd writer failed while shutting down")?;
            Ok(())
        }
        _ = signals.next() => anyhow::bail!("second signal: exiting without waiting for the revoke"),
        _ = tokio::time::sleep(GRACE) => anyhow::bail!("shutdown took longer than {GRACE:?}; exiting"),
    }
}

#[cfg(test)]
mod cli_tests {
    use clap::CommandFactory;

    #[test]
    fn every_flag_reads_its_documented_environment_variable() {
        let doc = include_str!("../../docs/OPERATIONS.md");
        let problems = flotilla_registry::cli::env_var_mismatches_with_docs(
            &presence::cli::Cli::command(),
            "presence",
            "FLOTILLA_",
            doc,
        );
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn completions_and_man_pages_mention_every_subcommand_and_flag() {
        let problems = flotilla_clidoc::missing_mentions(
            &<presence::cli::Cli as clap::CommandFactory>::command(),
        );
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
