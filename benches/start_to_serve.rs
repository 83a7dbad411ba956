//! Container start → first 200 through HAProxy, over the whole chain (not a timed test).
//!
//! ```text
//! cargo build --release --workspace --bins && cargo bench -p flotilla --bench start_to_serve -- [--starts 50]
//! ```
//!
//! One chain as in `tests/pipeline.rs` (etcd, HAProxy master-worker, confgen with the shipped
//! template and `wait = "20ms:1s"`, presence with a 3 s TTL), with the release binaries. A first
//! container of the service keeps serving throughout. Each round starts one more busybox httpd
//! container of the same service and measures from `docker run -d` returning until a request
//! through HAProxy is answered by that container (requests every 5 ms, round robin); then it
//! removes the container with `docker rm -f` and measures until HAProxy no longer sends it
//! traffic (every answer for 1 s comes from the first container). Prints p50/p90/p99/max of both.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::chain::Chain;
use flotilla_harness::docker::unique_name;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(label: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
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
    let chain = Chain::start("bench");
    let service = format!("bench{}", std::process::id());
    let base_name = unique_name("base");
    let _base = chain.container(&service, &base_name);
    chain.wait_served_by(&service, &[&base_name], Duration::from_secs(30));

    let poll = Duration::from_millis(5);
    let deadline = Duration::from_secs(30);
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for i in 0..starts {
        let name = unique_name(&format!("s{i}"));
        let c = chain.container(&service, &name);
        let t0 = Instant::now();
        loop {
            if let Ok((200, body)) = chain.get(&service) {
                if body.trim() == name {
                    break;
                }
            }
            assert!(
                t0.elapsed() < deadline,
                "round {i}: {name} not served within {deadline:?}\n{}",
                chain.diagnostics()
            );
            std::thread::sleep(poll);
        }
        up.push(t0.elapsed());

        // Removal: until the new container has not answered for a whole second.
        let t1 = Instant::now();
        drop(c);
        let mut last_seen = Instant::now();
        while last_seen.elapsed() < Duration::from_secs(1) {
            match chain.get(&service) {
                Ok((200, body)) if body.trim() == base_name => {}
                _ => last_seen = Instant::now(),
            }
            assert!(
                t1.elapsed() < deadline,
                "round {i}: {name} still answered {deadline:?} after docker rm -f\n{}",
                chain.diagnostics()
            );
            std::thread::sleep(poll);
        }
        down.push(last_seen - t1);
        eprintln!(
            "round {i}: served after {} ms, out of rotation {} ms after docker rm -f",
            up[i].as_millis(),
            down[i].as_millis()
        );
    }
    let ms = |v: &[Duration], p: f64| {
        let mut v = v.to_vec();
        v.sort();
        percentile(&v, p).as_millis()
    };
    println!(
        "summary: container start → first 200 through HAProxy, p50 / p99 over {starts} | ≤ 3 s | {} ms / {} ms",
        ms(&up, 0.5),
        ms(&up, 0.99)
    );
    println!(
        "summary: `docker rm -f` → last answer from it, p50 / p99 over {starts} | — | {} ms / {} ms",
        ms(&down, 0.5),
        ms(&down, 0.99)
    );
    println!("| figure | n | p50 ms | p90 ms | p99 ms | min ms | max ms |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "{}",
        summary("`docker run -d` returned → first 200 from it", up)
    );
    println!(
        "{}",
        summary(
            "`docker rm -f` issued → its last answer (or a failed request)",
            down
        )
    );
}
