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

/// One chain and what was measured on it.
struct Side {
    name: &'static str,
    chain: Chain,
    service: String,
    base_name: String,
    _base: flotilla_harness::docker::Container,
    up: Vec<Duration>,
    down: Vec<Duration>,
    reloads_before: u32,
}

impl Side {
    fn start(name: &'static str, runtime_api: bool) -> Side {
        let chain = Chain::start_with(name, runtime_api);
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
            reloads_before,
        }
    }

    fn round(&mut self, i: usize) {
        let poll = Duration::from_millis(2);
        let deadline = Duration::from_secs(30);
        let name = unique_name(&format!("{}-s{i}", self.name));
        let c = self.chain.container(&self.service, &name);
        let t0 = Instant::now();
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
}
