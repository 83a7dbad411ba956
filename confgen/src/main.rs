//! confgen: etcd watch → Tera templates → checked, atomic, coalesced reloads.
//!
//! `main` parses flags and wires the parts; see docs/CONFGEN.md for the behaviour.

use confgen::{admit, convert, daemon, metrics, template, view};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};
use flotilla_registry::daemon::{self as plumbing, ObsArgs};
use flotilla_registry::shutdown::{Hangups, Shutdown};
use flotilla_registry::{CacheState, EtcdArgs, Keys, WatchCache};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

/// Exit codes (also in `--help`).
const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_HELD: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "confgen",
    version,
    about = "Renders configuration files from the Flotilla registry (etcd) with Tera templates, \
             checks them, replaces them atomically and reloads their service.",
    after_help = "Exit codes: 0 ok; 1 a template failed (render, check, write or reload; \
                  --onetime and render); 2 bad flags or resources; 3 etcd not reachable \
                  within --sync-timeout (--onetime, dump); 4 the drop guard held a resource and \
                  nothing failed (--onetime: its file keeps its content).\n\
                  Docs: docs/CONFGEN.md (operators), docs/TEMPLATES.md (template authors)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Watch the registry and keep every template resource of --confdir applied.
    Run(RunArgs),
    #[command(flatten)]
    Doc(flotilla_clidoc::DocCommand),
    /// Render one template offline from a snapshot file (see `dump`) to stdout.
    Render(RenderArgs),
    /// Print the current registry (everything under --prefix) as a snapshot file for `render`.
    Dump(DumpArgs),
    /// Convert a confd template (Go text/template) into a confgen (Tera) template; every
    /// construct that could not be converted is reported with its line (exit 1).
    Convert(ConvertArgs),
}

#[derive(clap::Args, Debug)]
struct ConvertArgs {
    /// The confd template (`-` for stdin).
    input: PathBuf,
    /// Write the Tera template here instead of stdout (written even when some constructs
    /// could not be converted: they are left in it as comments).
    #[arg(short, long, env = "FLOTILLA_CONVERT_OUTPUT")]
    output: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Directory holding conf.d/*.toml (template resources) and templates/ (Tera templates).
    #[arg(long, env = "FLOTILLA_CONFDIR")]
    confdir: PathBuf,
    /// Render and apply once, then exit (0 if every resource applied, 1 if one failed, 4 if
    /// the drop guard held one).
    #[arg(long, env = "FLOTILLA_ONETIME")]
    onetime: bool,
    /// The first apply of each resource skips the drop guard: for a bootstrap or restart after
    /// an intended scale-down (with --onetime: write a render the guard would hold).
    #[arg(long, env = "FLOTILLA_ALLOW_DROP")]
    allow_drop: bool,
    /// Render and run check_cmd, but write nothing and reload nothing.
    #[arg(long, env = "FLOTILLA_NOOP")]
    noop: bool,
    /// Print a unified diff (against the current destination) of every change to stdout.
    #[arg(long, env = "FLOTILLA_DIFF")]
    diff: bool,
    /// Check and write, but run no reload_cmd: for writing the first config before the proxy
    /// starts (e.g. `--onetime --no-reload` as the proxy unit's ExecStartPre), when a reload
    /// can only fail and its rollback would take the new file away again.
    #[arg(long, env = "FLOTILLA_NO_RELOAD")]
    no_reload: bool,
    /// With --onetime: give up (exit 3) if etcd has not answered a full list by then.
    #[arg(long, env = "FLOTILLA_SYNC_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    sync_timeout: Duration,
    #[command(flatten)]
    admit: admit::AdmitArgs,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    obs: ObsArgs,
}

#[derive(clap::Args, Debug)]
struct RenderArgs {
    /// The template (its directory is searched for templates it includes, imports or extends).
    #[arg(long, env = "FLOTILLA_TEMPLATE")]
    template: PathBuf,
    /// Snapshot file as printed by `confgen dump` (`-` for stdin).
    #[arg(long, env = "FLOTILLA_DATA")]
    data: PathBuf,
    /// Key prefixes the template sees (like a resource's `keys`, absolute). Default: all.
    #[arg(long = "keys", value_delimiter = ',', env = "FLOTILLA_KEYS")]
    keys: Vec<String>,
    /// Prefix prepended to the keys templates read with getv & co. (a resource's `prefix`).
    #[arg(long = "key-prefix", default_value = "", env = "FLOTILLA_KEY_PREFIX")]
    key_prefix: String,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", env = "FLOTILLA_LOG_FORMAT")]
    log_format: plumbing::LogFormat,
    /// The admission rules, as for `run` (so an offline render shows what the daemon renders).
    #[command(flatten)]
    admit: admit::AdmitArgs,
}

#[derive(clap::Args, Debug)]
struct DumpArgs {
    /// Give up (exit 3) if etcd has not answered a full list by then.
    #[arg(long, env = "FLOTILLA_SYNC_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    sync_timeout: Duration,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", env = "FLOTILLA_LOG_FORMAT")]
    log_format: plumbing::LogFormat,
}

/// The snapshot file of `dump` and `render --data`.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    /// The --prefix the registry uses.
    prefix: String,
    /// etcd revision of the snapshot.
    #[serde(default)]
    revision: i64,
    /// Every key under the prefix with its value.
    kvs: BTreeMap<String, String>,
    /// Records that failed validation (informational; `render` re-validates).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    rejected: BTreeMap<String, String>,
}

fn main() -> ExitCode {
    // First, before any thread: one malloc arena (re-executes once; see the module's doc).
    flotilla_registry::malloc::use_one_arena();
    // confd's flags (`-onetime`, `-node URL`, …) for `run`: see convert::confd_run_args.
    let own: convert::OwnFlags = Cli::command()
        .find_subcommand("run")
        .map(|run| {
            run.get_arguments()
                .filter_map(|a| Some((a.get_long()?.to_string(), a.get_action().takes_values())))
                .collect()
        })
        .unwrap_or_default();
    // An argument that is not UTF-8 (a path) is left to clap as it is: no confd flag is.
    let Ok(argv) = std::env::args_os()
        .map(|a| a.into_string())
        .collect::<Result<Vec<String>, _>>()
    else {
        return run_cli(Cli::parse());
    };
    let rewritten = match convert::confd_run_args(argv, &own, &|k| std::env::var(k).ok()) {
        Ok(r) => r,
        Err(e) => {
            for line in e.lines() {
                eprintln!("confgen: error: {line}");
            }
            eprintln!("confgen: confd's flags and their Flotilla equivalents: docs/MIGRATING.md");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    for n in &rewritten.notes {
        eprintln!("confgen: note: confd flag {n}");
    }
    if let Some(level) = &rewritten.rust_log {
        // Before any thread exists (the runtime is built below).
        std::env::set_var("RUST_LOG", level);
    }
    run_cli(Cli::parse_from(rewritten.args))
}

fn run_cli(cli: Cli) -> ExitCode {
    if let Command::Doc(d) = &cli.command {
        return d.run(Cli::command());
    }
    // One worker: the main loop renders on it and the watch and /metrics are light; commands
    // and staging run on the blocking pool. A second worker bought no speed and cost memory
    // (glibc keeps an arena per thread: VmHWM 37.9 → 35.4 MB at 10,000 endpoints, 48 → 38 MB
    // after a burst of 10,000 puts; docs/BENCHMARKS.md).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(a) => run(a).await,
            Command::Render(a) => render(a),
            Command::Dump(a) => dump(a).await,
            Command::Convert(a) => convert_template(a),
            Command::Doc(_) => unreachable!("handled above"),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("confgen: error: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

async fn run(a: RunArgs) -> anyhow::Result<u8> {
    plumbing::init_logging(a.obs.log_format);
    // Before any work, so an early signal gets the clean shutdown, not the default action.
    let signals = Shutdown::install().context("installing the SIGTERM/SIGINT handlers")?;
    let hangups = Hangups::install().context("installing the SIGHUP handler")?;
    a.etcd.validate()?;
    let keys = a.etcd.keys()?;
    let (metrics, registry) = metrics::Metrics::new();
    let health = Arc::new(Mutex::new(daemon::Health::default()));
    let modes = daemon::Modes {
        onetime: a.onetime,
        noop: a.noop,
        diff: a.diff,
        no_reload: a.no_reload,
        allow_drop: a.allow_drop,
    };
    let mut daemon = match daemon::Daemon::new(
        &a.confdir,
        &keys,
        a.admit.clone(),
        modes,
        metrics,
        health.clone(),
    ) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("confgen: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    // Template and conf.d files: a save re-reads them (as SIGHUP does). Watched before
    // /healthz answers, so a client that saw /healthz knows a save is noticed.
    let (file_tx, file_rx) = tokio::sync::mpsc::channel(16);
    let _watcher = if a.onetime {
        None
    } else {
        Some(watch_files(&daemon.watch_dirs(), file_tx)?)
    };
    if let Some(addr) = a.obs.metrics_addr {
        let h = health.clone();
        let f: plumbing::HealthFn = Arc::new(move || h.lock().expect("health lock").report());
        plumbing::spawn_observability(addr, registry, f).await?;
    }
    // --prefix's root and every resource key outside it (confd's absolute keys), in one view.
    let cache = Arc::new(WatchCache::spawn_prefixes(
        a.etcd.clone(),
        keys.clone(),
        daemon.watch_prefixes(),
    ));
    let updates = cache.updates();
    let follower = cache.clone();
    daemon.follow_prefixes(Box::new(move |p| follower.set_prefixes(p)));
    if a.onetime && !current_within(&cache, a.sync_timeout).await {
        return Ok(EXIT_UNREACHABLE);
    }
    let heartbeat = daemon.heartbeat();
    let _watchdog = plumbing::spawn_watchdog(Arc::new(move || {
        let last = heartbeat.load(Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        now.saturating_sub(last) < 60
    }));
    // A second signal forces the exit (a command may be running under its timeout).
    let first_signal = signals.drain_then_force("confgen", 130);
    let shutdown = async {
        first_signal.await;
        plumbing::notify_stopping();
    };
    let end = daemon
        .run(updates, cache.status(), file_rx, hangups, shutdown)
        .await;
    info!("stopped");
    let code = match end {
        daemon::RunEnd::Ok => 0,
        daemon::RunEnd::Failed => EXIT_FAILED,
        daemon::RunEnd::Held => EXIT_HELD,
    };
    if a.onetime {
        // Everything is written and fsynced: exit without freeing the registry mirror and
        // joining the runtime's threads one by one (tens of ms at 10,000 endpoints, all of it
        // in the ExecStartPre that a proxy's start waits for). Files, locks and sockets are
        // the kernel's to close; stdout and stderr are flushed by `exit`.
        std::process::exit(i32::from(code));
    }
    Ok(code)
}

/// Waits until the cache holds a complete view and watches from it (`--onetime`); false, said
/// on stderr, if `--sync-timeout` passes first.
async fn current_within(cache: &WatchCache, sync_timeout: std::time::Duration) -> bool {
    let mut status = cache.status();
    let mut snaps = cache.subscribe();
    let current = async {
        let _ = snaps.wait_for(|s| s.complete).await;
        let _ = status.wait_for(|s| s.state == CacheState::Watching).await;
    };
    if tokio::time::timeout(sync_timeout, current).await.is_err() {
        let state = cache.status().borrow().state.clone();
        eprintln!(
            "confgen: error: no complete registry view within --sync-timeout {} ({state:?}); nothing was written",
            humantime::format_duration(sync_timeout)
        );
        return false;
    }
    true
}

/// Watches `dirs` (recursively) and sends a unit per relevant event.
fn watch_files(
    dirs: &[PathBuf],
    tx: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            // Reads (ours included) are not changes.
            if matches!(ev.kind, EventKind::Access(_)) {
                return;
            }
            let _ = tx.try_send(());
        }
    })
    .context("cannot start the file watcher")?;
    for d in dirs {
        watcher
            .watch(d, RecursiveMode::Recursive)
            .with_context(|| format!("cannot watch {}", d.display()))?;
    }
    Ok(watcher)
}

fn render(a: RenderArgs) -> anyhow::Result<u8> {
    plumbing::init_logging(a.log_format);
    let text = if a.data == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(&a.data)
            .with_context(|| format!("--data {}: cannot read", a.data.display()))?
    };
    let file: SnapshotFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "--data {}: not a confgen snapshot (as printed by `confgen dump`)",
            a.data.display()
        )
    })?;
    let keys = Keys::new(&file.prefix).with_context(|| format!("--data {}", a.data.display()))?;
    let update = view::update_from_kvs(
        &keys,
        file.revision,
        file.kvs
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect(),
    );
    for (key, reason) in update.snapshot.rejected.iter() {
        tracing::warn!(key, reason, "skipping an invalid record");
    }
    let scope = view::Scope {
        keys: a.keys.clone(),
        prefix: a.key_prefix.clone(),
    };
    let scope = if scope.keys.is_empty() {
        view::Scope {
            prefix: scope.prefix,
            ..view::Scope::everything()
        }
    } else {
        scope
    };
    let mut v = view::View::new(keys, a.admit.clone());
    let mut data = view::TemplateData::new(scope.clone());
    let changes = v.sync(&update);
    data.apply(&v, &changes);
    let engine = match template::Engine::load_file(&a.template, v.store(), scope) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("confgen: error: {e}");
            return Ok(EXIT_FAILED);
        }
    };
    data.want_json(engine.needs_json());
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let result = engine.render(&mut data, &mut out);
    tracing::debug!(took = ?started.elapsed(), bytes = out.len(), "rendered");
    if let Err(e) = result {
        eprintln!("confgen: error: {e}");
        return Ok(EXIT_FAILED);
    }
    std::io::stdout()
        .write_all(&out)
        .context("writing stdout")?;
    Ok(0)
}

fn convert_template(a: ConvertArgs) -> anyhow::Result<u8> {
    let name = a.input.display().to_string();
    let src = if a.input == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(&a.input).with_context(|| format!("{name}: cannot read"))?
    };
    let c = convert::convert(&src);
    for p in &c.notes {
        eprintln!(
            "{name}:{}:{}: note: {} ({})",
            p.line, p.col, p.reason, p.construct
        );
    }
    for p in &c.problems {
        eprintln!(
            "{name}:{}:{}: not converted: {} ({})",
            p.line, p.col, p.reason, p.construct
        );
    }
    match &a.output {
        Some(path) => std::fs::write(path, &c.output)
            .with_context(|| format!("{}: cannot write", path.display()))?,
        None => std::io::stdout()
            .write_all(c.output.as_bytes())
            .context("writing stdout")?,
    }
    if c.problems.is_empty() {
        Ok(0)
    } else {
        eprintln!(
            "confgen: {name}: {} construct(s) not converted; they are left as comments in the output",
            c.problems.len()
        );
        Ok(EXIT_FAILED)
    }
}

async fn dump(a: DumpArgs) -> anyhow::Result<u8> {
    plumbing::init_logging(a.log_format);
    a.etcd.validate()?;
    let keys = a.etcd.keys()?;
    let cache = WatchCache::spawn(a.etcd.clone(), keys.clone(), keys.root());
    let mut snaps = cache.subscribe();
    let snap = match tokio::time::timeout(a.sync_timeout, snaps.wait_for(|s| s.complete)).await {
        Ok(Ok(s)) => s.clone(),
        _ => {
            let state = cache.status().borrow().state.clone();
            error!(?state, "no complete registry view within --sync-timeout");
            eprintln!(
                "confgen: error: no complete registry view within --sync-timeout {} ({state:?})",
                humantime::format_duration(a.sync_timeout)
            );
            return Ok(EXIT_UNREACHABLE);
        }
    };
    let file = SnapshotFile {
        prefix: keys.prefix().to_string(),
        revision: snap.revision,
        kvs: snap
            .kvs
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect(),
        rejected: snap.rejected.clone().into_iter().collect(),
    };
    let mut text = serde_json::to_string_pretty(&file).context("encoding the snapshot")?;
    text.push('\n');
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing stdout")?;
    Ok(0)
}

#[cfg(test)]
mod cli_tests {
    use clap::CommandFactory;

    #[test]
    fn every_flag_reads_its_documented_environment_variable() {
        let doc = include_str!("../../docs/OPERATIONS.md");
        let problems = flotilla_registry::cli::env_var_mismatches_with_docs(
            &super::Cli::command(),
            "confgen",
            "FLOTILLA_",
            doc,
        );
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn completions_and_man_pages_mention_every_subcommand_and_flag() {
        let problems =
            flotilla_clidoc::missing_mentions(&<super::Cli as clap::CommandFactory>::command());
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
