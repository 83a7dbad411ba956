//! Container start → first 200 through HAProxy, and `docker stop` → out of rotation, over the
//! whole chain, with confgen's runtime-API path and its reload path side by side (not a timed
//! test).
//!
//! ```text
//! cargo build --release --workspace --bins && cargo bench -p flotilla --bench start_to_serve -- [--starts 50]
//! ```
//!
//! Two chains as in `tests/pipeline.rs` (etcd, HAProxy master-worker, confgen with the shipped
//! template and `wait = "20ms:1s"`, presence with a 3 s TTL), with the release binaries: one
//! whose resource has `runtime_api` (server-line changes through HAProxy's runtime socket) and
//! one without (every change reloads). Rounds alternate between them, so both see the same
//! machine. A first container of each service keeps serving throughout. Each round starts one
//! more busybox httpd container and measures from `docker run -d` returning until a request
//! through HAProxy (every 2 ms, `Connection: close`, round robin) is answered by it; once
//! confgen has written the file, it runs `docker stop` (the container keeps serving 2 s after
//! SIGTERM, as a draining app does) and measures until the last request HAProxy routed to it
//! (its last answer). Prints p50/p90/p99/max of each, and the reloads each chain's HAProxy
//! counted during the rounds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::chain::Chain;
use flotilla_harness::docker::unique_name;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn row(label: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "| {label} | {} | {} | {} | {} | {} | {} |",
        v.len(),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.9)),
        ms(percentile(&v, 0.99)),
        ms(v[0]),
        ms(*v.last().unwrap())
    )
}

/// Seconds since midnight UTC (log lines carry a UTC time of day).
fn day_secs(t: std::time::SystemTime) -> f64 {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap();
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// A log line without its ANSI colours.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in line.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// A tracing line's time of day (`2026-12-02T14:35:12.285701Z …`).
fn line_secs(line: &str) -> Option<f64> {
    let line = plain(line);
    let t = line.split_whitespace().next()?;
    let time = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + sec)
}

/// The value of `name=` in a log line.
fn field(line: &str, name: &str) -> Option<String> {
    let line = plain(line);
    let pat = format!(" {name}=");
    let at = line.find(&pat)? + pat.len();
    line[at..].split_whitespace().next().map(str::to_string)
}

/// One stop (or start): wall time of `docker stop` issued (`docker run -d` returned), the
/// container, and for a start the time to its first 200.
struct Stop {
    issued: f64,
    id: String,
    short: String,
    served: Duration,
}

/// One chain and what was measured on it.
struct Side {
    name: &'static str,
    chain: Chain,
    service: String,
    base_name: String,
    _base: flotilla_harness::docker::Container,
    up: Vec<Duration>,
    down: Vec<Duration>,
    stops: Vec<Stop>,
    starts: Vec<Stop>,
    reloads_before: u32,
}

impl Side {
    fn start(name: &'static str, runtime_api: bool) -> Side {
        let chain = Chain::start_runtime(name, runtime_api, &[]);
        let service = format!("{name}{}", std::process::id());
        let base_name = unique_name(&format!("{name}-base"));
        let base = chain.container(&service, &base_name);
        chain.wait_served_by(&service, &[&base_name], Duration::from_secs(30));
        let reloads_before = chain.reloads();
        Side {
            name,
            chain,
            service,
            base_name,
            _base: base,
            up: Vec::new(),
            down: Vec::new(),
            stops: Vec::new(),
            starts: Vec::new(),
            reloads_before,
        }
    }

    fn round(&mut self, i: usize) {
        let poll = Duration::from_millis(2);
        let deadline = Duration::from_secs(30);
        let name = unique_name(&format!("{}-s{i}", self.name));
        let c = self.chain.container(&self.service, &name);
        let t0 = Instant::now();
        let started_wall = day_secs(std::time::SystemTime::now());
        loop {
            if let Ok((200, body)) = self.chain.get(&self.service) {
                if body.trim() == name {
                    break;
                }
            }
            assert!(
                t0.elapsed() < deadline,
                "{} round {i}: {name} not served within {deadline:?}\n{}",
                self.name,
                self.chain.diagnostics()
            );
            std::thread::sleep(poll);
        }
        let up = t0.elapsed();
        self.up.push(up);
        self.starts.push(Stop {
            issued: started_wall,
            id: c.id.clone(),
            short: c.short_id().to_string(),
            served: up,
        });

        // Steady state before the stop: the change is in the file (confgen is done with it).
        let short = c.short_id().to_string();
        let settle = Instant::now();
        while !self.chain.config().contains(&short) {
            assert!(settle.elapsed() < deadline, "{name} never in the file");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));

        // `docker stop` blocks until the container exits (~2 s after SIGTERM); measure the last
        // answer from it while it still serves.
        self.stops.push(Stop {
            issued: day_secs(std::time::SystemTime::now()),
            id: c.id.clone(),
            short: c.short_id().to_string(),
            served: Duration::ZERO,
        });
        let t1 = Instant::now();
        let stopper = std::thread::spawn({
            let c = c.name.clone();
            move || {
                let _ = std::process::Command::new("docker")
                    .args(["stop", "-t", "10", &c])
                    .output();
            }
        });
        let mut last = None;
        while !stopper.is_finished() {
            match self.chain.get(&self.service) {
                Ok((200, body)) if body.trim() == self.base_name => {}
                Ok((200, body)) if body.trim() == name => last = Some(t1.elapsed()),
                _ => last = Some(t1.elapsed()),
            }
            assert!(t1.elapsed() < deadline, "docker stop {name} hangs");
            std::thread::sleep(poll);
        }
        stopper.join().unwrap();
        let down = last.unwrap_or_default();
        self.down.push(down);
        drop(c);
        eprintln!(
            "{} round {i}: served {} ms after docker run; out of rotation {} ms after docker stop",
            self.name,
            up.as_millis(),
            down.as_millis()
        );
    }
}

impl Side {
    /// Where a stop's time goes, from presence's and confgen's debug logs: `docker stop` →
    /// Docker's `kill` event (CLI and dockerd), → presence read it, → key deleted in etcd; and
    /// confgen's own "change seen → servers verified" (`servers_ms`) or "→ reloaded"
    /// (`latency_ms`) of every apply.
    fn breakdown(&self) -> Vec<(String, Vec<Duration>)> {
        let presence = self
            .chain
            .presence
            .as_ref()
            .map(|p| p.log())
            .unwrap_or_default();
        let secs = |v: f64| Duration::from_secs_f64(v.max(0.0));
        let (mut event, mut read, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
        for st in &self.stops {
            let kill = presence
                .lines()
                .find(|l| l.contains("event read") && l.contains(&st.id) && l.contains("kill"));
            let Some(kill) = kill else { continue };
            let ev = field(kill, "time_nano")
                .and_then(|v| v.parse::<u64>().ok())
                .map(|n| (n / 1_000_000_000 % 86_400) as f64 + (n % 1_000_000_000) as f64 / 1e9);
            let read_at = line_secs(kill);
            let del_at = presence
                .lines()
                .find(|l| l.contains("deregistered") && l.contains(&st.short))
                .and_then(line_secs);
            if let (Some(ev), Some(r), Some(d)) = (ev, read_at, del_at) {
                event.push(secs(ev - st.issued));
                read.push(secs(r - ev));
                deleted.push(secs(d - r));
            }
        }
        let confgen = self.chain.confgen.log();
        let key = if self.name == "runtime" {
            "servers_ms"
        } else {
            "latency_ms"
        };
        let mut applied = Vec::new();
        for l in confgen.lines().filter(|l| l.contains("written and")) {
            if let Some(v) = field(l, key).and_then(|v| v.parse::<u64>().ok()) {
                applied.push(Duration::from_millis(v));
            }
        }
        // Starts: Docker's start event → presence read it → key in etcd → (runtime) confgen
        // verified the running servers → first 200 through HAProxy.
        let verified_at: Vec<(f64, f64)> = confgen
            .lines()
            .filter(|l| l.contains("applied through the runtime API"))
            .filter_map(|l| {
                let at = line_secs(l)?;
                let latency = field(l, "latency_ms")?.parse::<f64>().ok()?;
                let servers = field(l, "servers_ms")?.parse::<f64>().ok()?;
                // The line is logged after the check and the rename; the servers were verified
                // `latency - servers` ms before it.
                Some((at, at - (latency - servers) / 1000.0))
            })
            .collect();
        let (mut s_read, mut s_reg, mut s_conf, mut s_serve) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for st in &self.starts {
            let start = presence
                .lines()
                .find(|l| l.contains("event read") && l.contains(&st.id) && l.contains("start"));
            let Some(start) = start else { continue };
            let (Some(read_at), Some(reg_at)) = (
                line_secs(start),
                presence
                    .lines()
                    .find(|l| l.contains(" registered") && l.contains(&st.short))
                    .and_then(line_secs),
            ) else {
                continue;
            };
            let ev = field(start, "time_nano")
                .and_then(|v| v.parse::<u64>().ok())
                .map(|n| (n / 1_000_000_000 % 86_400) as f64 + (n % 1_000_000_000) as f64 / 1e9);
            if let Some(ev) = ev {
                s_read.push(secs(read_at - ev));
            }
            s_reg.push(secs(reg_at - read_at));
            let served_at = st.issued + st.served.as_secs_f64();
            if let Some((_, verified)) = verified_at.iter().find(|(at, _)| *at >= reg_at) {
                s_conf.push(secs(verified - reg_at));
                s_serve.push(secs(served_at - verified));
            }
        }
        vec![
            (
                format!("{}: start event → presence reads it", self.name),
                s_read,
            ),
            (
                format!("{}: presence reads it → key in etcd", self.name),
                s_reg,
            ),
            (
                format!(
                    "{}: key in etcd → confgen verified the running servers",
                    self.name
                ),
                s_conf,
            ),
            (
                format!(
                    "{}: servers verified → first 200 through HAProxy",
                    self.name
                ),
                s_serve,
            ),
            (
                format!("{}: `docker stop` issued → Docker's kill event", self.name),
                event,
            ),
            (
                format!("{}: kill event → presence reads it", self.name),
                read,
            ),
            (
                format!("{}: presence reads it → key deleted in etcd", self.name),
                deleted,
            ),
            (
                format!(
                    "{}: confgen, change seen → {} (every apply)",
                    self.name,
                    if self.name == "runtime" {
                        "servers verified"
                    } else {
                        "file written and reloaded"
                    }
                ),
                applied,
            ),
        ]
    }
}

fn main() {
    let mut starts = 50usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--starts" => {
                starts = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--starts N")
            }
            "--bench" => {}
            other => panic!("unknown argument {other} (known: --starts N)"),
        }
    }
    let mut sides = [Side::start("runtime", true), Side::start("reload", false)];
    for i in 0..starts {
        for side in sides.iter_mut() {
            side.round(i);
        }
    }
    let pct = |v: &[Duration], p: f64| {
        let mut v = v.to_vec();
        v.sort();
        percentile(&v, p).as_millis()
    };
    let reloads: Vec<u32> = sides
        .iter()
        .map(|s| s.chain.reloads() - s.reloads_before)
        .collect();
    let [rt, rl] = &sides;
    println!(
        "summary: `docker run` returned → first 200 through HAProxy, runtime API, p50 / p99 over {starts} | ≤ 50 ms / ≤ 150 ms | {} ms / {} ms",
        pct(&rt.up, 0.5),
        pct(&rt.up, 0.99)
    );
    println!(
        "summary: same, reload path (measured in the same run) | ≤ 3 s | {} ms / {} ms",
        pct(&rl.up, 0.5),
        pct(&rl.up, 0.99)
    );
    println!(
        "summary: `docker stop` → no request routed to it, runtime API, p50 / p99 over {starts} | ≤ 50 ms p50 | {} ms / {} ms",
        pct(&rt.down, 0.5),
        pct(&rt.down, 0.99)
    );
    println!(
        "summary: same, reload path (measured in the same run) | — | {} ms / {} ms",
        pct(&rl.down, 0.5),
        pct(&rl.down, 0.99)
    );
    println!(
        "summary: HAProxy reloads during the {} container starts and stops, runtime API / reload path | 0 / — | {} / {}",
        starts,
        reloads[0],
        reloads[1]
    );
    println!("| figure | n | p50 ms | p90 ms | p99 ms | min ms | max ms |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &sides {
        println!(
            "{}",
            row(
                &format!("{}: `docker run -d` returned → first 200 from it", s.name),
                s.up.clone()
            )
        );
        println!(
            "{}",
            row(
                &format!("{}: `docker stop` issued → its last answer", s.name),
                s.down.clone()
            )
        );
    }
    for s in &sides {
        for (label, v) in s.breakdown() {
            if !v.is_empty() {
                println!("{}", row(&label, v));
            }
        }
    }
}
