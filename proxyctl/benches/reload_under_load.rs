//! Reloads under load: how many requests fail or time out while HAProxy is reloaded 50 times in
//! 10 s, for (a) a control run without reloads, (b) raw `kill -USR2` of the master and
//! (c) `proxyctl reload`; with keep-alive and `Connection: close` clients; for a plain
//! configuration and for the reload-safe settings of docs/PROXYCTL.md. Then the latency from
//! `proxyctl reload` to a new backend serving.
//!
//! Run (release build; about 10 minutes with the defaults):
//!
//! ```text
//! cargo bench -p proxyctl --bench reload_under_load -- [--rounds 3]
//!     [--profiles plain,safe (also: idleclose, spread2s, spreadinf)]
//!     [--modes control,usr2,proxyctl] [--clients keepalive,close] [--latency-samples 30]
//! ```
//!
//! Load: `wrk -t2 -c50` on loopback for 13 s, each connection pausing 10 ms between requests
//! (a Lua `delay`), so at most ~5k req/s. Reloads start at second 1, one every 200 ms (back to
//! back when a `proxyctl reload` takes longer; the `span` column shows how long the 50 took),
//! each to a configuration that differs from the last (a server added or removed). Backends are
//! a tiny Tokio HTTP/1.1 server inside this program, so the control run shows no errors of its
//! own. Prints one line per run and a Markdown table of medians at the end.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_harness::haproxy::{http_get, Haproxy};
use flotilla_harness::{free_port, require};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: u32 = 50;
const LOAD_SECS: u64 = 13;
const RELOADS: u32 = 50;
const RELOAD_WINDOW: Duration = Duration::from_secs(10);

/// A configuration profile: extra `global` lines and the `defaults` section. `plain` is a
/// template without reload-specific settings; `safe` is the recommendation of docs/PROXYCTL.md;
/// the others isolate one setting each. The harness's `global` section always has
/// `stats socket … expose-fd listeners` and `hard-stop-after 10s`.
struct Profile {
    name: &'static str,
    global: &'static str,
    defaults: &'static str,
}

const PROFILES: &[Profile] = &[
    Profile {
        name: "plain",
        global: "",
        defaults: "\
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
",
    },
    Profile {
        name: "idleclose",
        global: "",
        defaults: "\
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    option idle-close-on-response
",
    },
    Profile {
        name: "spread2s",
        global: "    close-spread-time 2s\n",
        defaults: "\
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    option idle-close-on-response
",
    },
    Profile {
        name: "spreadinf",
        global: "    close-spread-time infinite\n",
        defaults: "\
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    option idle-close-on-response
",
    },
    Profile {
        name: "safe",
        global: "",
        defaults: "\
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout client-fin 1s
    option idle-close-on-response
    retries 3
    option redispatch
    retry-on all-retryable-errors
",
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Control,
    Usr2,
    Proxyctl,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Control => "control",
            Mode::Usr2 => "usr2",
            Mode::Proxyctl => "proxyctl",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Client {
    KeepAlive,
    Close,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::KeepAlive => "keepalive",
            Client::Close => "close",
        }
    }
}

struct Opts {
    rounds: usize,
    profiles: Vec<&'static Profile>,
    modes: Vec<Mode>,
    clients: Vec<Client>,
    latency_samples: usize,
}

impl Opts {
    fn parse() -> Opts {
        let mut opts = Opts {
            rounds: 3,
            profiles: PROFILES
                .iter()
                .filter(|p| p.name == "plain" || p.name == "safe")
                .collect(),
            modes: vec![Mode::Control, Mode::Usr2, Mode::Proxyctl],
            clients: vec![Client::KeepAlive, Client::Close],
            latency_samples: 30,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        while i < args.len() {
            let value = args.get(i + 1).cloned().unwrap_or_default();
            match args[i].as_str() {
                "--rounds" => opts.rounds = value.parse().expect("--rounds N"),
                "--latency-samples" => {
                    opts.latency_samples = value.parse().expect("--latency-samples N")
                }
                "--profiles" => {
                    opts.profiles = value
                        .split(',')
                        .map(|n| {
                            PROFILES
                                .iter()
                                .find(|p| p.name == n)
                                .unwrap_or_else(|| panic!("unknown profile {n}"))
                        })
                        .collect()
                }
                "--modes" => {
                    opts.modes = value
                        .split(',')
                        .map(|m| match m {
                            "control" => Mode::Control,
                            "usr2" => Mode::Usr2,
                            "proxyctl" => Mode::Proxyctl,
                            other => panic!("unknown mode {other}"),
                        })
                        .collect()
                }
                "--clients" => {
                    opts.clients = value
                        .split(',')
                        .map(|c| match c {
                            "keepalive" => Client::KeepAlive,
                            "close" => Client::Close,
                            other => panic!("unknown client {other}"),
                        })
                        .collect()
                }
                // `cargo bench` passes `--bench`; ignore flags we do not know.
                _ => {
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
        opts
    }
}

/// A minimal HTTP/1.1 server answering every request with `body`, keep-alive unless the client
/// asks to close.
fn start_backend(rt: &tokio::runtime::Runtime, body: &'static str) -> u16 {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind backend");
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = conn.set_nodelay(true);
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break Some(i + 4);
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => break None,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let Some(end) = end else { return };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end);
                    let close = head.contains("\r\nconnection: close");
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
                        body.len(),
                        if close { "Connection: close\r\n" } else { "" }
                    );
                    if conn.write_all(response.as_bytes()).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn sections(profile: &Profile, port: u16, servers: &[(&str, u16)]) -> String {
    let mut s = format!(
        "{}\nfrontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n\nbackend be\n    \
         balance roundrobin\n",
        profile.defaults
    );
    for (name, p) in servers {
        s.push_str(&format!("    server {name} 127.0.0.1:{p}\n"));
    }
    s
}

#[derive(Debug, Default, Clone)]
struct WrkResult {
    requests: u64,
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
    non2xx: u64,
}

impl WrkResult {
    fn failed(&self) -> u64 {
        self.connect + self.read + self.write + self.non2xx
    }

    fn parse(out: &str) -> WrkResult {
        let mut r = WrkResult::default();
        for line in out.lines().map(str::trim) {
            if line.contains(" requests in ") {
                r.requests = line
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                for part in rest.split(',') {
                    let mut words = part.split_whitespace();
                    let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match kind {
                        "connect" => r.connect = n,
                        "read" => r.read = n,
                        "write" => r.write = n,
                        "timeout" => r.timeout = n,
                        _ => {}
                    }
                }
            } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.non2xx = rest.trim().parse().unwrap_or(0);
            }
        }
        r
    }
}

struct RunResult {
    wrk: WrkResult,
    reloads: u32,
    reload_failures: u32,
    median_reload: Duration,
    max_reload: Duration,
    span: Duration,
}

fn write_lua(dir: &Path, client: Client) -> std::path::PathBuf {
    let path = dir.join(format!("{}.lua", client.name()));
    let mut script = String::from("function delay()\n  return 10\nend\n");
    if client == Client::Close {
        script.push_str("wrk.headers[\"Connection\"] = \"close\"\n");
    }
    std::fs::write(&path, script).expect("write wrk script");
    path
}

fn run_once(
    wrk: &Path,
    lua: &Path,
    profile: &Profile,
    mode: Mode,
    servers: &[(&str, u16)],
) -> RunResult {
    let port = free_port();
    let hx = Haproxy::start_with_global(&sections(profile, port, &servers[..2]), profile.global);
    let wrk_child = Command::new(wrk)
        .args(["-t2", &format!("-c{CONNECTIONS}")])
        .arg(format!("-d{LOAD_SECS}s"))
        .args(["--timeout", "2s", "-s"])
        .arg(lua)
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start wrk");
    let start = Instant::now();
    let mut reloads = 0;
    let mut reload_failures = 0;
    let mut max_reload = Duration::ZERO;
    let mut durations = Vec::new();
    let mut span = Duration::ZERO;
    if mode != Mode::Control {
        let interval = RELOAD_WINDOW / RELOADS;
        for i in 0..RELOADS {
            let at = Duration::from_secs(1) + interval * i;
            if let Some(wait) = at.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            // Alternate between two and three servers, so every reload changes the config.
            let n = if i % 2 == 0 { 3 } else { 2 };
            hx.write_config(&sections(profile, port, &servers[..n]));
            let t = Instant::now();
            match mode {
                Mode::Usr2 => hx.signal_master(nix::sys::signal::Signal::SIGUSR2),
                Mode::Proxyctl => {
                    let out = Command::new(env!("CARGO_BIN_EXE_proxyctl"))
                        .arg("reload")
                        .arg("--config")
                        .arg(hx.config_path())
                        .arg("--master-socket")
                        .arg(hx.master_socket())
                        .args(["--timeout", "5s"])
                        .output()
                        .expect("run proxyctl");
                    if !out.status.success() {
                        reload_failures += 1;
                        eprintln!(
                            "proxyctl reload failed: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                }
                Mode::Control => unreachable!(),
            }
            max_reload = max_reload.max(t.elapsed());
            durations.push(t.elapsed());
            reloads += 1;
        }
        // From the first reload's start to the last one's end: must lie inside the load.
        span = start.elapsed() - Duration::from_secs(1);
    }
    let out = wrk_child.wait_with_output().expect("wait for wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let wrk = WrkResult::parse(&text);
    if wrk.requests == 0 {
        panic!(
            "wrk did not report requests:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if mode != Mode::Control {
        // Every reload (raw or not) must have been taken: the master counts them.
        let procs = proxyctl::ProcList::parse(&hx.master_cli("show proc")).expect("show proc");
        if procs.master.reloads != reloads || procs.master.failed_reloads != 0 {
            eprintln!(
                "note: the master counted {} reloads ({} failed) for {reloads} sent",
                procs.master.reloads, procs.master.failed_reloads
            );
        }
    }
    RunResult {
        wrk,
        reloads,
        reload_failures,
        median_reload: if durations.is_empty() {
            Duration::ZERO
        } else {
            median_duration(durations)
        },
        max_reload,
        span,
    }
}

/// The runs of one (profile, client, mode) cell.
#[derive(Default)]
struct Summary {
    label: String,
    failed: Vec<u64>,
    timeouts: Vec<u64>,
    requests: Vec<u64>,
    reload_ms: Vec<u64>,
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    if v.is_empty() {
        0
    } else {
        v[v.len() / 2]
    }
}

fn median_duration(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Latency from the start of a reload (config already written) to the first request answered
/// by the new backend, measured `samples` times, for raw USR2 and for proxyctl.
fn reload_to_serve(servers: &[(&str, u16)], samples: usize) -> Vec<(&'static str, Vec<Duration>)> {
    let profile = PROFILES.iter().find(|p| p.name == "safe").unwrap();
    let port = free_port();
    let hx = Haproxy::start_with_global(&sections(profile, port, &servers[3..4]), profile.global);
    let mut results = Vec::new();
    for mode in [Mode::Usr2, Mode::Proxyctl] {
        let mut times = Vec::new();
        for i in 0..samples {
            // Flip between backends `x` and `y`; the body says which one answered.
            let (target, body) = if i % 2 == 0 {
                (&servers[4..5], "y")
            } else {
                (&servers[3..4], "x")
            };
            hx.write_config(&sections(profile, port, target));
            let t = Instant::now();
            match mode {
                Mode::Usr2 => hx.signal_master(nix::sys::signal::Signal::SIGUSR2),
                _ => {
                    let status = Command::new(env!("CARGO_BIN_EXE_proxyctl"))
                        .arg("reload")
                        .arg("--config")
                        .arg(hx.config_path())
                        .arg("--master-socket")
                        .arg(hx.master_socket())
                        .stdout(std::process::Stdio::null())
                        .status()
                        .expect("run proxyctl");
                    assert!(status.success(), "proxyctl reload failed");
                }
            }
            let deadline = t + Duration::from_secs(10);
            loop {
                if let Ok((200, b)) = http_get(port, "/", Duration::from_secs(2)) {
                    if b == body {
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "new backend not serving after 10 s"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            times.push(t.elapsed());
            // Let the previous generation finish before the next sample.
            std::thread::sleep(Duration::from_millis(300));
        }
        results.push((mode.name(), times));
    }
    results
}

fn main() {
    let opts = Opts::parse();
    let wrk = require("wrk", "wrk");
    require("haproxy", "haproxy");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("backend runtime");
    let names = ["b1", "b2", "b3", "x", "y"];
    let servers: Vec<(&str, u16)> = names.iter().map(|n| (*n, start_backend(&rt, n))).collect();
    let dir = tempfile::tempdir().expect("temp dir");

    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let version = Command::new("haproxy")
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    println!("# reload_under_load, {date}, {version}");
    println!(
        "# wrk -t2 -c{CONNECTIONS} -d{LOAD_SECS}s --timeout 2s, 10 ms pause per connection; \
         {RELOADS} reloads in {}s; {} round(s)",
        RELOAD_WINDOW.as_secs(),
        opts.rounds
    );
    println!(
        "{:<9} {:<10} {:<9} {:>5} {:>9} {:>7} {:>5} {:>5} {:>5} {:>7} {:>7} {:>8} {:>10} {:>10} {:>7}",
        "profile",
        "client",
        "mode",
        "round",
        "requests",
        "connect",
        "read",
        "write",
        "non2xx",
        "failed",
        "timeout",
        "reloads",
        "med_reload",
        "max_reload",
        "span"
    );
    let mut table: Vec<Summary> = Vec::new();
    for profile in &opts.profiles {
        for client in &opts.clients {
            let lua = write_lua(dir.path(), *client);
            for mode in &opts.modes {
                let mut summary = Summary {
                    label: format!("| {} | {} | {} |", profile.name, client.name(), mode.name()),
                    ..Summary::default()
                };
                for round in 0..opts.rounds {
                    let r = run_once(&wrk, &lua, profile, *mode, &servers);
                    println!(
                        "{:<9} {:<10} {:<9} {:>5} {:>9} {:>7} {:>5} {:>5} {:>6} {:>7} {:>7} {:>8} {:>8}ms {:>8}ms {:>6.1}s",
                        profile.name,
                        client.name(),
                        mode.name(),
                        round + 1,
                        r.wrk.requests,
                        r.wrk.connect,
                        r.wrk.read,
                        r.wrk.write,
                        r.wrk.non2xx,
                        r.wrk.failed(),
                        r.wrk.timeout,
                        if r.reload_failures > 0 {
                            format!("{}({}!)", r.reloads, r.reload_failures)
                        } else {
                            r.reloads.to_string()
                        },
                        r.median_reload.as_millis(),
                        r.max_reload.as_millis(),
                        r.span.as_secs_f64()
                    );
                    let _ = std::io::stdout().flush();
                    summary.failed.push(r.wrk.failed());
                    summary.timeouts.push(r.wrk.timeout);
                    summary.requests.push(r.wrk.requests);
                    summary.reload_ms.push(r.median_reload.as_millis() as u64);
                }
                table.push(summary);
            }
        }
    }

    println!(
        "\nMedians over {} round(s) (failed = connect + read + write errors + non-2xx):\n",
        opts.rounds
    );
    println!(
        "| profile | client | mode | requests | failed | timed out | failed per round | reload time (median) |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | --- | ---: |");
    // One line per figure for scripts/bench's summary table: figure | target | measured.
    let mut summaries = Vec::new();
    for s in &table {
        let target = if s.label.contains("| control |") {
            "0 (control)"
        } else {
            "0"
        };
        summaries.push(format!(
            "summary: failed requests, 50 reloads in 10 s under load {} | {target} | {} (rounds {:?})",
            s.label.trim_matches(|c| c == '|' || c == ' ').replace(" | ", ", "),
            median(s.failed.clone()),
            s.failed
        ));
        println!(
            "{} {} | {} | {} | {:?} | {} ms |",
            s.label,
            median(s.requests.clone()),
            median(s.failed.clone()),
            median(s.timeouts.clone()),
            s.failed,
            median(s.reload_ms.clone()),
        );
    }

    if opts.latency_samples > 0 {
        println!(
            "\nReload → new backend serving ({} samples each, `safe` profile, no load):\n",
            opts.latency_samples
        );
        println!("| reload | median | p90 | max |");
        println!("| --- | ---: | ---: | ---: |");
        for (mode, times) in reload_to_serve(&servers, opts.latency_samples) {
            let mut sorted = times.clone();
            sorted.sort_unstable();
            let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
            println!(
                "| {mode} | {} ms | {} ms | {} ms |",
                median_duration(times.clone()).as_millis(),
                p90.as_millis(),
                sorted.last().unwrap().as_millis()
            );
            summaries.push(format!(
                "summary: {mode} reload → new backend serving, median (p90) | ≤ 1 s | {} ms ({} ms)",
                median_duration(times).as_millis(),
                p90.as_millis()
            ));
        }
    }
    println!();
    for line in summaries {
        println!("{line}");
    }
}
