//! presence benchmark (not a timed test): real dockerd, real etcd, the release binary.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-presence cargo bench -p presence --bench presence_bench
//! PRESENCE_BENCH_N=50 …   # fewer containers
//! PRESENCE_BENCH_SYNC_RUNS=10 …   # initial-sync runs (default 5)
//! PRESENCE_BENCH_DIR=/tmp/pb PRESENCE_BENCH_RUST_LOG=presence=debug …
//!                          # keep per-start samples (CSV) and presence's log there
//! ```
//!
//! Measures, and prints as a Markdown table:
//! 1. event → etcd: Docker's `start` event time (`timeNano`) → the endpoint's PUT seen by an etcd
//!    watcher, over N sequential container starts (each waits for its key before the next), and
//!    `docker run -d` returning → key seen. Also presence's own histogram.
//! 2. `docker stop` issued → key deleted (the `kill` event deregisters before the exit).
//! 3. initial sync: presence started with N containers running → all N keys in etcd, 5 runs
//!    (PRESENCE_BENCH_SYNC_RUNS).
//! 4. peak RSS (VmHWM) of presence after each phase.
//! 5. etcd away for 2 × TTL (3 s TTL) with one container stopped and one started meanwhile:
//!    etcd back → exact state in etcd, 3 runs; and `kill -9` of presence → entries gone.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::query_parameters::EventsOptionsBuilder;
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use flotilla_harness::docker::busybox_image;
use flotilla_harness::etcd::Etcd;
use flotilla_harness::{free_port, run};
use futures::StreamExt;

const NODE: &str = "bench";

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn docker(args: &[&str]) -> String {
    run(Command::new("docker").args(args)).unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

/// Containers of this run, removed in one `docker rm -f` on drop.
struct Containers {
    names: Vec<String>,
}

impl Drop for Containers {
    fn drop(&mut self) {
        for chunk in self.names.chunks(50) {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(chunk)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

struct Presence {
    child: Option<Child>,
    metrics: String,
}

impl Presence {
    fn start(etcd: &str, label: &str, ttl: &str, log: &Path) -> Presence {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_presence"))
            .args(["--node", NODE, "--advertise-ip", "127.0.0.1", "--ttl", ttl])
            // One host: the bench publishes on 127.0.0.1.
            .arg("--allow-loopback")
            .args(["--etcd-endpoints", etcd, "--metrics-addr", &metrics])
            .arg("--label-filter")
            .arg(format!("flotilla.test={label}"))
            .env(
                "RUST_LOG",
                std::env::var("PRESENCE_BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn presence");
        Presence {
            child: Some(child),
            metrics,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn rss_kib(&self, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn metrics_text(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut t = String::new();
        s.read_to_string(&mut t).unwrap();
        t
    }

    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(&self.metrics) else {
            return false;
        };
        let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
        let mut t = String::new();
        let _ = s.read_to_string(&mut t);
        // An HTTP/1.0 request is answered in HTTP/1.0 (hyper): look at the status code only.
        t.split_whitespace().nth(1) == Some("200")
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Percentiles, and for up to 20 samples every run in the order measured.
fn summary(v: Vec<f64>) -> String {
    let mut sorted = v.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = format!(
        "n={} p50={:.1} p90={:.1} p99={:.1} max={:.1}",
        sorted.len(),
        pct(&sorted, 0.5),
        pct(&sorted, 0.9),
        pct(&sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
    if v.len() <= 20 {
        let runs: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
        out.push_str(&format!(" (runs: {})", runs.join(", ")));
    }
    out
}

/// Histogram quantile estimate from Prometheus buckets (upper bound of the bucket).
fn histogram_quantile(metrics: &str, name: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|b| b.0)
        .unwrap_or(f64::NAN)
}

type Seen = Arc<Mutex<HashMap<String, (Option<i64>, Option<i64>)>>>;

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    let n: usize = std::env::var("PRESENCE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let image = busybox_image();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let label = format!("bench-{}", std::process::id());
    let prefix = format!("/flotilla/endpoints/{NODE}/");

    // etcd watcher: key → (put seen, delete seen), wall-clock ns.
    let seen: Seen = Arc::default();
    {
        let seen = seen.clone();
        let endpoint = endpoint.clone();
        let prefix = prefix.clone();
        rt.spawn(async move {
            let mut c = Client::connect([endpoint], None).await.unwrap();
            let mut ws = c
                .watch(prefix, Some(WatchOptions::new().with_prefix()))
                .await
                .unwrap();
            while let Ok(Some(resp)) = ws.message().await {
                let t = now_ns();
                let mut map = seen.lock().unwrap();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let entry = map.entry(key).or_default();
                    match ev.event_type() {
                        EventType::Put => entry.0 = Some(t),
                        EventType::Delete => entry.1 = Some(t),
                    }
                }
            }
        });
    }
    // Docker events: container id → (start time, kill time) as Docker stamps them.
    let docker_events: Seen = Arc::default();
    {
        let de = docker_events.clone();
        let label = label.clone();
        rt.spawn(async move {
            let d = bollard::Docker::connect_with_local_defaults()
                .unwrap()
                .negotiate_version()
                .await
                .unwrap();
            let filters: HashMap<String, Vec<String>> = [
                ("type".to_owned(), vec!["container".to_owned()]),
                ("label".to_owned(), vec![format!("flotilla.test={label}")]),
            ]
            .into();
            let mut s = d.events(Some(
                EventsOptionsBuilder::default().filters(&filters).build(),
            ));
            while let Some(Ok(ev)) = s.next().await {
                let (Some(actor), Some(t)) = (ev.actor, ev.time_nano) else {
                    continue;
                };
                let id = actor.id.unwrap_or_default();
                let mut map = de.lock().unwrap();
                let e = map.entry(id).or_default();
                match ev.action.as_deref() {
                    Some("start") => e.0 = Some(t),
                    Some("kill") if e.1.is_none() => e.1 = Some(t),
                    _ => {}
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(500));

    let log = dir.path().join("presence.log");
    let mut p = Presence::start(&endpoint, &label, "15s", &log);
    wait("presence ready", Duration::from_secs(30), || {
        p.healthy().then_some(())
    });
    let rss_idle = p.rss_kib("VmRSS");

    // 1. event → etcd over N starts.
    let mut containers = Containers { names: Vec::new() };
    let mut ev_ms = Vec::new();
    let mut run_ms = Vec::new();
    let mut ids = Vec::new();
    let mut samples = String::from("container,docker_start_ns,run_returned_ns,put_seen_ns\n");
    let test_label = format!("flotilla.test={label}");
    for i in 0..n {
        let name = format!("flotilla-bench-{}-{i}", std::process::id());
        containers.names.push(name.clone());
        let out = docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "-l",
            &test_label,
            "-l",
            "flotilla.service=web",
            "-p",
            "127.0.0.1::8080",
            image,
            "httpd",
            "-f",
            "-p",
            "8080",
        ]);
        let returned = now_ns();
        let id = out.trim().to_owned();
        let key = format!("{prefix}web/{NODE}-{}-8080", &id[..12]);
        let put = wait("key present", Duration::from_secs(20), || {
            seen.lock().unwrap().get(&key).and_then(|e| e.0)
        });
        let start_ev = wait("start event", Duration::from_secs(20), || {
            docker_events.lock().unwrap().get(&id).and_then(|e| e.0)
        });
        ev_ms.push((put - start_ev) as f64 / 1e6);
        run_ms.push((put - returned) as f64 / 1e6);
        samples.push_str(&format!("{id},{start_ev},{returned},{put}\n"));
        ids.push((id, name, key));
    }
    let metrics = p.metrics_text();
    let internal_p50 = histogram_quantile(&metrics, "presence_event_to_etcd_seconds", 0.5);
    let internal_p99 = histogram_quantile(&metrics, "presence_event_to_etcd_seconds", 0.99);
    let rss_after_starts = p.rss_kib("VmRSS");
    let hwm_after_starts = p.rss_kib("VmHWM");

    // 2. initial sync with N running, 5 runs.
    p.terminate();
    let count = |c: &mut Client| -> i64 {
        rt.block_on(async {
            c.get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map(|r| r.count())
            .unwrap_or(-1)
        })
    };
    let mut client = rt
        .block_on(Client::connect([endpoint.clone()], None))
        .unwrap();
    wait("revoked", Duration::from_secs(10), || {
        (count(&mut client) == 0).then_some(())
    });
    let mut sync_ms = Vec::new();
    let mut hwm_sync = 0;
    let sync_runs: usize = std::env::var("PRESENCE_BENCH_SYNC_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    for _ in 0..sync_runs {
        let t0 = Instant::now();
        let mut q = Presence::start(&endpoint, &label, "15s", &log);
        wait("all keys", Duration::from_secs(60), || {
            (count(&mut client) == n as i64).then_some(())
        });
        sync_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        hwm_sync = hwm_sync.max(q.rss_kib("VmHWM"));
        q.terminate();
        wait("revoked", Duration::from_secs(10), || {
            (count(&mut client) == 0).then_some(())
        });
    }

    // 3. docker stop → key gone, 20 containers.
    let mut p = Presence::start(&endpoint, &label, "15s", &log);
    wait("all keys", Duration::from_secs(60), || {
        (count(&mut client) == n as i64).then_some(())
    });
    let mut stop_ms = Vec::new();
    let mut kill_ms = Vec::new();
    for (id, name, key) in ids.iter().take(20.min(n)) {
        // The initial-sync runs above revoked (deleted) every key: forget those deletions.
        if let Some(e) = seen.lock().unwrap().get_mut(key) {
            e.1 = None;
        }
        let issued = now_ns();
        let mut stop = Command::new("docker")
            .args(["stop", "-t", "2", name])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let del = wait("key deleted", Duration::from_secs(20), || {
            seen.lock().unwrap().get(key).and_then(|e| e.1)
        });
        let kill = wait("kill event", Duration::from_secs(20), || {
            docker_events.lock().unwrap().get(id).and_then(|e| e.1)
        });
        stop_ms.push((del - issued) as f64 / 1e6);
        kill_ms.push((del - kill) as f64 / 1e6);
        stop.wait().unwrap();
    }
    let hwm_final = p.rss_kib("VmHWM");
    p.terminate();

    // 4. etcd away for 2 × TTL (3 s), 3 runs; kill -9 expiry, 3 runs.
    let live: Vec<&(String, String, String)> = ids.iter().skip(20).take(3).collect();
    let mut p = Presence::start(&endpoint, &label, "3s", &log);
    wait("all keys", Duration::from_secs(60), || {
        (count(&mut client) == (n - 20.min(n)) as i64).then_some(())
    });
    let mut outage_ms = Vec::new();
    let mut extra = Vec::new();
    for round in 0..3.min(live.len()) {
        etcd.stop();
        let down = Instant::now();
        // One stops, one starts while etcd is away.
        docker(&["stop", "-t", "1", &live[round].1]);
        let name = format!("flotilla-bench-{}-outage{round}", std::process::id());
        containers.names.push(name.clone());
        let out = docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "-l",
            &test_label,
            "-l",
            "flotilla.service=web",
            "-p",
            "127.0.0.1::8080",
            image,
            "httpd",
            "-f",
            "-p",
            "8080",
        ]);
        extra.push(out.trim()[..12].to_owned());
        std::thread::sleep(Duration::from_secs(6).saturating_sub(down.elapsed()));
        etcd.restart();
        let back = Instant::now();
        // One stopped and one started per round: the count stays the same.
        let want = (n - 20.min(n)) as i64;
        let mut c = rt
            .block_on(Client::connect([endpoint.clone()], None))
            .unwrap();
        let gone_key = &live[round].2;
        let new_key = format!("{prefix}web/{NODE}-{}-8080", extra[round]);
        wait("state after outage", Duration::from_secs(60), || {
            let ok = rt.block_on(async {
                let total = c
                    .get(
                        prefix.clone(),
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                    .ok()?
                    .count();
                let gone = c.get(gone_key.clone(), None).await.ok()?.kvs().is_empty();
                let new = !c.get(new_key.clone(), None).await.ok()?.kvs().is_empty();
                Some(total == want && gone && new)
            });
            (ok == Some(true)).then_some(())
        });
        outage_ms.push(back.elapsed().as_secs_f64() * 1e3);
        client = c;
    }
    let mut expiry_ms = Vec::new();
    for _ in 0..3 {
        wait("presence ready", Duration::from_secs(30), || {
            p.healthy().then_some(())
        });
        p.kill9();
        let t0 = Instant::now();
        wait("expiry", Duration::from_secs(30), || {
            (count(&mut client) == 0).then_some(())
        });
        expiry_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        p = Presence::start(&endpoint, &label, "3s", &log);
    }
    p.terminate();

    // One line per figure for scripts/bench's summary table: figure | target | measured.
    let quantile = |v: &[f64], q: f64| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        pct(&v, q)
    };
    let summaries = [
        format!(
            "summary: presence, Docker `start` event → key in etcd, p50 / p99 over {n} | ≤ 10 ms p50 | {:.1} ms / {:.1} ms",
            quantile(&ev_ms, 0.5),
            quantile(&ev_ms, 0.99)
        ),
        format!(
            "summary: presence, `docker run -d` returned → key in etcd, p99 over {n} | ≤ 1 s | {:.0} ms",
            quantile(&run_ms, 0.99)
        ),
        format!(
            "summary: presence, `docker stop` → key deleted (before the container exits), p50 | before exit | {:.0} ms",
            quantile(&stop_ms, 0.5)
        ),
        format!(
            "summary: presence, initial sync of {n} running containers, median | ≤ 2 s | {:.0} ms",
            quantile(&sync_ms, 0.5)
        ),
        format!(
            "summary: presence, etcd down 2 × TTL → exact state again, median (max) | ≤ 2 s | {:.0} ms ({:.0} ms)",
            quantile(&outage_ms, 0.5),
            quantile(&outage_ms, 1.0)
        ),
        format!(
            "summary: presence, `kill -9` → every entry gone (TTL 3 s), median (max) | ≤ TTL + 2 s | {:.0} ms ({:.0} ms)",
            quantile(&expiry_ms, 0.5),
            quantile(&expiry_ms, 1.0)
        ),
        format!(
            "summary: presence, peak RSS | ≤ 15 MB | {:.1} MiB",
            [hwm_after_starts, hwm_sync, hwm_final]
                .into_iter()
                .max()
                .unwrap_or(0) as f64
                / 1024.0
        ),
    ];
    let date = run(Command::new("date").args(["-u", "+%Y-%m-%d"])).unwrap();
    println!("## presence benchmark ({}, N = {n})\n", date.trim());
    println!("| measure | result (ms) |\n| --- | --- |");
    println!(
        "| Docker `start` event → key seen by an etcd watcher | {} |",
        summary(ev_ms)
    );
    println!(
        "| `docker run -d` returned → key seen (negative: before the CLI returned) | {} |",
        summary(run_ms)
    );
    println!(
        "| presence's own histogram, event read → etcd ack (bucket upper bounds) | p50 ≤ {:.1} p99 ≤ {:.1} |",
        internal_p50 * 1e3,
        internal_p99 * 1e3
    );
    println!(
        "| `docker stop` issued → key deleted (container still draining) | {} |",
        summary(stop_ms)
    );
    println!(
        "| Docker `kill` event → key deletion seen | {} |",
        summary(kill_ms)
    );
    println!(
        "| initial sync, {n} running: presence spawned → all {n} keys in etcd | {} |",
        summary(sync_ms)
    );
    println!(
        "| etcd stopped 6 s (2 × TTL 3 s), 1 stop + 1 start meanwhile: etcd back → exact state | {} |",
        summary(outage_ms)
    );
    println!(
        "| `kill -9` of presence (TTL 3 s) → every entry gone | {} |",
        summary(expiry_ms)
    );
    println!(
        "\nRSS (KiB): idle {rss_idle}; after {n} starts {rss_after_starts} (peak {hwm_after_starts}); peak during initial syncs {hwm_sync}; peak after stops {hwm_final}"
    );
    if let Ok(keep) = std::env::var("PRESENCE_BENCH_DIR") {
        let keep = Path::new(&keep);
        fs::create_dir_all(keep).unwrap();
        fs::write(keep.join("samples.csv"), samples).unwrap();
        fs::copy(&log, keep.join("presence.log")).unwrap();
        println!(
            "\nper-start samples and presence's log in {}",
            keep.display()
        );
    }
    println!();
    for line in summaries {
        println!("{line}");
    }
    drop(containers);
}
