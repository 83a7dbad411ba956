//! `proxyctl`: check and reload HAProxy (or nginx) safely, show live status, drain servers.
//! The work is done by the `proxyctl` library; this file parses flags, prints and picks the exit
//! code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod ls;
use proxyctl::{
    AdminState, CheckReport, Error, ErrorKind, Haproxy, MasterSocket, Nginx, RuntimeApi, ServerRef,
    StatRow,
};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the configuration check failed or did not finish (haproxy -c / nginx -t); nothing was
     reloaded. For `ls SERVICE`: the service has no endpoints
  2  usage: bad flags, a missing or unreadable --config, a bad BACKEND/SERVER, or a --config that
     is not the file the running proxy loads
  3  the reload failed, or was not verified within --timeout; the old workers keep serving
     (after a timeout, until the master finishes loading the new generation, if it does)
  4  cannot reach the proxy: socket missing, refusing, permission denied, not a socket, no answer;
     or the nginx pid file names no running master. For `ls`: etcd cannot be reached or read
  5  HAProxy refused a runtime command (no such backend/server, socket level below admin)
  6  the haproxy/nginx binary cannot be run (see --haproxy-bin / --nginx-bin; run scripts/setup)

Every flag can also be set through the environment variable shown in its help.";

/// Check and reload HAProxy (or nginx) safely, show live status, drain and enable servers.
///
/// A reload is: check the file with `haproxy -c`; reload through the master CLI of HAProxy's
/// master-worker mode (`haproxy -W -S <master socket> -f <config>`); verify with `show proc`
/// that a new worker generation answers and the master counts no failed reload. On any failure
/// the old workers keep serving.
#[derive(Debug, Parser)]
#[command(name = "proxyctl", version, after_help = EXIT_CODES)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=proxyctl=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FLOTILLA_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Doc(flotilla_clidoc::DocCommand),
    /// Validate a configuration (haproxy -c / nginx -t) and print its messages with file and line.
    #[command(after_help = EXIT_CODES)]
    Check(CheckArgs),
    /// Check, then reload gracefully and verify that a new worker generation serves.
    ///
    /// HAProxy: reloads through the master socket and polls `show proc` until a new worker
    /// answers (exit 3 if the master counts a failed reload or --timeout passes). nginx: sends
    /// SIGHUP to the master from the pid file and waits for a new worker process.
    #[command(after_help = EXIT_CODES)]
    Reload(ReloadArgs),
    /// Frontends, backends and servers with state, sessions and last check, from `show stat`.
    #[command(after_help = EXIT_CODES)]
    Status(StatusArgs),
    /// Put a server in DRAIN: no new sessions, existing ones finish (`set server … state drain`).
    #[command(after_help = EXIT_CODES)]
    Drain(ServerArgs),
    /// Put a server back in service (`set server … state ready`).
    #[command(after_help = EXIT_CODES)]
    Enable(ServerArgs),
    /// The registry: services, their endpoints, node, health and age, read from etcd.
    ///
    /// Records are validated exactly as confgen reads them; invalid ones are listed as warnings
    /// on stderr (and under "rejected" with --json). Exit 1 if SERVICE is given and has no
    /// endpoints, 4 if etcd cannot be reached.
    #[command(after_help = EXIT_CODES)]
    Ls(ls::LsArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProxyKind {
    Haproxy,
    Nginx,
}

#[derive(Debug, Args)]
struct ProxyArgs {
    /// Which proxy the configuration is for.
    #[arg(long, value_enum, default_value_t = ProxyKind::Haproxy, env = "FLOTILLA_PROXY")]
    proxy: ProxyKind,

    /// The configuration file (for a reload: the file the running proxy was started with).
    #[arg(long, value_name = "FILE", env = "FLOTILLA_PROXY_CONFIG")]
    config: PathBuf,

    /// The haproxy binary.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "haproxy",
        env = "FLOTILLA_HAPROXY_BIN"
    )]
    haproxy_bin: PathBuf,

    /// The nginx binary.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "nginx",
        env = "FLOTILLA_NGINX_BIN"
    )]
    nginx_bin: PathBuf,

    /// Print the result as JSON on stdout.
    #[arg(long, env = "FLOTILLA_JSON")]
    json: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    proxy: ProxyArgs,
}

#[derive(Debug, Args)]
struct ReloadArgs {
    #[command(flatten)]
    proxy: ProxyArgs,

    /// HAProxy's master CLI socket (the path given to `haproxy -W -S`). Required for HAProxy.
    #[arg(long, value_name = "PATH", env = "FLOTILLA_MASTER_SOCKET")]
    master_socket: Option<PathBuf>,

    /// nginx's pid file (default: the config's `pid` directive, else nginx's compiled-in path).
    #[arg(long, value_name = "PATH", env = "FLOTILLA_NGINX_PID_FILE")]
    pid_file: Option<PathBuf>,

    /// How long to wait for the new worker generation before failing with exit code 3.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration,
          env = "FLOTILLA_RELOAD_TIMEOUT")]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct SocketArgs {
    /// HAProxy's runtime API socket (`stats socket <path> level admin` in the global section).
    #[arg(long, value_name = "PATH", env = "FLOTILLA_STATS_SOCKET")]
    socket: PathBuf,

    /// How long to wait for HAProxy's answer.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration,
          env = "FLOTILLA_SOCKET_TIMEOUT")]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    socket: SocketArgs,

    /// Print the rows as a JSON array on stdout.
    #[arg(long, env = "FLOTILLA_JSON")]
    json: bool,
}

#[derive(Debug, Args)]
struct ServerArgs {
    /// The server, as BACKEND/SERVER (names as in the HAProxy configuration).
    #[arg(value_name = "BACKEND/SERVER")]
    server: String,

    #[command(flatten)]
    socket: SocketArgs,
}

/// Which flags name what, for error messages.
struct Flags {
    socket: &'static str,
    socket_is_master: bool,
}

const EXIT_CHECK: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_RELOAD: u8 = 3;
const EXIT_UNREACHABLE: u8 = 4;
const EXIT_REJECTED: u8 = 5;
const EXIT_ENVIRONMENT: u8 = 6;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxyctl: error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ENVIRONMENT);
        }
    };
    runtime.block_on(run(cli.command))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(command: Command) -> ExitCode {
    let (result, flags) = match command {
        Command::Doc(d) => return d.run(<Cli as clap::CommandFactory>::command()),
        Command::Check(args) => (check(args.proxy).await, Flags::stats()),
        Command::Reload(args) => {
            let flags = Flags {
                socket: "--master-socket",
                socket_is_master: true,
            };
            (reload(args).await, flags)
        }
        Command::Status(args) => (status(args).await, Flags::stats()),
        Command::Drain(args) => (set_state(args, AdminState::Drain).await, Flags::stats()),
        Command::Enable(args) => (set_state(args, AdminState::Ready).await, Flags::stats()),
        Command::Ls(args) => {
            return match ls::ls(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(ls::LsError::Usage(m)) => {
                    eprintln!("proxyctl: error: {m}");
                    ExitCode::from(EXIT_USAGE)
                }
                Err(ls::LsError::Unreachable(m)) => {
                    eprintln!("proxyctl: error: {m}");
                    ExitCode::from(EXIT_UNREACHABLE)
                }
                Err(ls::LsError::NoSuchService(s)) => {
                    eprintln!("proxyctl: service {s:?} has no endpoints in the registry");
                    ExitCode::from(EXIT_CHECK)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("proxyctl: error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Proxy(err)) => {
            if let Error::CheckFailed { report } = &err {
                print_diagnostics(report);
            }
            eprintln!("proxyctl: error: {}", describe(&err, &flags));
            ExitCode::from(exit_code(&err))
        }
    }
}

enum Failure {
    Usage(String),
    Proxy(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Proxy(e)
    }
}

impl Flags {
    fn stats() -> Self {
        Flags {
            socket: "--socket",
            socket_is_master: false,
        }
    }
}

async fn check(args: ProxyArgs) -> Result<(), Failure> {
    let result = match args.proxy {
        ProxyKind::Haproxy => Haproxy::new(&args.haproxy_bin).check(&args.config).await,
        ProxyKind::Nginx => Nginx::new(&args.nginx_bin).check(&args.config).await,
    };
    let report = match result {
        Ok(report) => report,
        Err(Error::CheckFailed { report }) if args.json => {
            // Scripts get the parsed messages on stdout; the human summary still goes to stderr.
            print_json(&report);
            return Err(Failure::Proxy(Error::CheckFailed { report }));
        }
        Err(e) => return Err(e.into()),
    };
    print_diagnostics(&report);
    if args.json {
        print_json(&report);
    } else {
        println!(
            "{}: configuration is valid ({} warning(s))",
            report.config.display(),
            report.warnings().count()
        );
    }
    Ok(())
}

async fn reload(args: ReloadArgs) -> Result<(), Failure> {
    let proxy = &args.proxy;
    match proxy.proxy {
        ProxyKind::Haproxy => {
            let Some(socket) = &args.master_socket else {
                return Err(Failure::Usage(
                    "reload needs --master-socket PATH for HAProxy (the socket given to \
                     `haproxy -W -S PATH`)"
                        .into(),
                ));
            };
            let master = MasterSocket::new(socket);
            let done = Haproxy::new(&proxy.haproxy_bin)
                .check_and_reload(&proxy.config, &master, args.timeout)
                .await?;
            print_diagnostics(&done.check);
            if proxy.json {
                print_json(&done);
            } else {
                let r = &done.reload;
                let state = match (&done.state, &done.state_warning) {
                    (Some(s), _) => format!(
                        "; the state of {} server(s) carried over through {}",
                        s.servers,
                        s.path.display()
                    ),
                    (None, Some(w)) => format!("; servers' state NOT carried over: {w}"),
                    (None, None) => String::new(),
                };
                println!(
                    "reloaded {}: master {} reload #{}, new worker(s) {} serving after {} ms; \
                     {} old worker(s) finishing their connections{state}",
                    proxy.config.display(),
                    r.master_pid,
                    r.reloads,
                    pids(&r.new_workers),
                    r.elapsed.as_millis(),
                    r.old_workers.len()
                );
            }
        }
        ProxyKind::Nginx => {
            let nginx = Nginx::new(&proxy.nginx_bin);
            let report = nginx.check(&proxy.config).await?;
            print_diagnostics(&report);
            let r = nginx
                .reload_and_verify(&proxy.config, args.pid_file.as_deref(), args.timeout)
                .await?;
            if proxy.json {
                print_json(&r);
            } else {
                println!(
                    "reloaded {}: nginx master {}, new worker(s) {} after {} ms; {} old \
                     worker(s) shutting down",
                    proxy.config.display(),
                    r.master_pid,
                    pids(&r.new_workers),
                    r.elapsed.as_millis(),
                    r.old_workers.len()
                );
            }
        }
    }
    Ok(())
}

async fn status(args: StatusArgs) -> Result<(), Failure> {
    let api = RuntimeApi::new(&args.socket.socket).with_timeout(args.socket.timeout);
    let rows = api.show_stat().await?;
    if args.json {
        print_json(&rows);
    } else {
        print!("{}", table(&rows));
    }
    Ok(())
}

async fn set_state(args: ServerArgs, state: AdminState) -> Result<(), Failure> {
    let server: ServerRef = args
        .server
        .parse()
        .map_err(|e: Error| Failure::Usage(format!("BACKEND/SERVER argument: {e}")))?;
    let api = RuntimeApi::new(&args.socket.socket).with_timeout(args.socket.timeout);
    api.set_server_state(&server, state).await?;
    let word = match state {
        AdminState::Ready => "ready",
        AdminState::Drain => "drain",
        AdminState::Maint => "maint",
    };
    println!("{server}: {word}");
    Ok(())
}

fn print_diagnostics(report: &CheckReport) {
    let mut printed = false;
    for d in report.errors().chain(report.warnings()) {
        eprintln!("{d}");
        printed = true;
    }
    if !report.valid && !printed {
        // Nothing parsed: show the raw output rather than nothing.
        for line in report.output.lines().filter(|l| !l.trim().is_empty()) {
            eprintln!("{line}");
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("proxyctl: error: cannot encode JSON: {e}"),
    }
}

fn pids(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn table(rows: &[StatRow]) -> String {
    let header = [
        "PROXY", "NAME", "TYPE", "STATUS", "WEIGHT", "CUR", "TOTAL", "CHECK", "ADDR",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.proxy.clone(),
                r.name.clone(),
                r.kind.to_string(),
                r.status.clone(),
                r.weight
                    .map(|w| w.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.current_sessions.to_string(),
                r.total_sessions.to_string(),
                r.check_status.clone().unwrap_or_else(|| "-".into()),
                r.addr.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cols.zip(widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(&format!("{cell:<w$}"));
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &cells {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn exit_code(err: &Error) -> u8 {
    match err.kind() {
        ErrorKind::CheckFailed => EXIT_CHECK,
        ErrorKind::Usage => EXIT_USAGE,
        ErrorKind::ReloadFailed => EXIT_RELOAD,
        ErrorKind::Unreachable => EXIT_UNREACHABLE,
        ErrorKind::Rejected => EXIT_REJECTED,
        ErrorKind::Environment => EXIT_ENVIRONMENT,
        _ => EXIT_ENVIRONMENT,
    }
}

/// One line: what failed, the path, and the flag or setting that fixes it.
fn describe(err: &Error, flags: &Flags) -> String {
    let flag = flags.socket;
    let setup = |path: &Path| {
        if flags.socket_is_master {
            format!(
                "is HAProxy running in master-worker mode with `-W -S {}`?",
                path.display()
            )
        } else {
            format!(
                "is HAProxy running with `stats socket {} level admin` in its global section?",
                path.display()
            )
        }
    };
    match err {
        Error::ConfigMissing { path } => {
            format!("--config {}: no such file", path.display())
        }
        Error::ConfigUnreadable { path, source } => {
            format!("--config {}: cannot read it: {source}", path.display())
        }
        Error::SocketMissing { socket } => format!(
            "{flag} {}: no such socket ({})",
            socket.display(),
            setup(socket)
        ),
        Error::SocketRefused { socket } => format!(
            "{flag} {}: connection refused: nothing listens on it, the file is stale ({})",
            socket.display(),
            setup(socket)
        ),
        Error::SocketPermission { socket } => format!(
            "{flag} {}: permission denied (run proxyctl as a user that may open the socket and \
             its directories, or give the socket a `mode`/`group` that allows it)",
            socket.display()
        ),
        Error::NotASocket { socket } => format!(
            "{flag} {}: not a Unix socket (point {flag} at the socket HAProxy created)",
            socket.display()
        ),
        Error::SocketTimeout { .. } | Error::SocketIo { .. } => format!("{flag} {err}"),
        Error::CommandRejected { message, .. } if message.contains("Permission denied") => {
            format!("{flag} {err} (the socket needs `level admin` for this command)")
        }
        Error::CommandRejected { message, .. }
            if message.starts_with("Unknown command") && !flags.socket_is_master =>
        {
            format!(
                "{flag} {err} (is this the master CLI socket? status, drain and enable need the \
                 runtime socket of `stats socket … level admin`)"
            )
        }
        Error::CommandRejected { .. } => format!("{flag} {err}"),
        Error::ConfigMismatch { .. } => format!(
            "--config {err}; a reload would not apply this file (pass the file the proxy was \
             started with)"
        ),
        Error::PidFile { .. } => format!("--pid-file {err}"),
        Error::Spawn { .. } => format!(
            "{err} (install it with scripts/setup, or point --haproxy-bin/--nginx-bin at it)"
        ),
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod cli_tests {
    use clap::CommandFactory;

    #[test]
    fn every_flag_reads_its_documented_environment_variable() {
        let doc = include_str!("../../docs/OPERATIONS.md");
        let problems = flotilla_registry::cli::env_var_mismatches_with_docs(
            &super::Cli::command(),
            "proxyctl",
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
