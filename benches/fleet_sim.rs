//! Scale by simulation (not a timed test): 100 hosts × 100 endpoints against a 3-member etcd,
//! followed by several confgen processes, each on a simulated proxy host.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p flotilla --bench fleet_sim -- [--hosts 100] [--per-host 100] [--proxies 5]
//!     [--ttl 5s] [--steady 30s] [--deaths 3] [--changes 50]
//! ```
//!
//! The fleet (`flotilla_harness::hosts`): 3 etcd members, each in a network namespace of its own,
//! and `--proxies` proxy hosts, each a namespace running the release `confgen` with the shipped
//! HAProxy template and resource settings (`wait = "20ms:1s"`, drop guard 50 %), writing its
//! file with no check and no reload (the figures are the registry's and confgen's; `haproxy -c`
//! and a reload add their own time, see the confgen and proxyctl sections of BENCHMARKS.md).
//!
//! The simulated hosts are registry writers in this process (no Docker): each grants its own
//! lease (`--ttl`), writes its node record and `--per-host` endpoints on it (as presence does:
//! one node record, endpoints `<node>-<container>-<port>` with the host's address), then keeps
//! the lease alive every TTL/3 with its own keep-alive stream, as presence does. 500 services of
//! 20 endpoints each, every service spread over 20 hosts. The writers run on tokio threads that
//! entered the fleet's client namespace.
//!
//! Measured:
//! 1. **load**: the 100 writers start together → every proxy's file has every endpoint.
//! 2. **steady state** (`--steady`, keep-alives only): etcd revisions, key puts and deletes per
//!    second (member m0's `/metrics`: `etcd_mvcc_put_total`, `etcd_mvcc_delete_total`), raft
//!    proposals committed, keep-alives sent; confgen renders and writes; CPU of etcd (3 members)
//!    and of each confgen (utime + stime from /proc, in % of one core).
//! 3. **a host dies** (`--deaths` times, a different host each time): its keep-alives stop (no
//!    revoke, as in a crash) → its keys deleted in etcd (a watch on its prefix: when, how many
//!    keys, in how many revisions) → every proxy's file without it; renders and writes per
//!    confgen, CPU of etcd and of the confgens for the event.
//! 4. **change → file on every proxy** (`--changes` times): one endpoint's port changes (one
//!    put on its host's lease) → the file of the first and of the last proxy holds the new address
//!    (stat polled every 1 ms; the file is read when it changed).
//!
//! Prints `summary: figure|target|measured` lines for `scripts/bench`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use flotilla_harness::hosts::{metric, metric_sum, Binaries, Fleet, FleetSpec, HostSpec};
use flotilla_registry::{Endpoint, EtcdArgs, Health, Keys, Node, Proto};

const SERVICES: usize = 500;
const TXN_OPS: usize = 128;

struct Opts {
    hosts: usize,
    per_host: usize,
    proxies: usize,
    ttl: Duration,
    steady: Duration,
    deaths: usize,
    changes: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        hosts: 100,
        per_host: 100,
        proxies: 5,
        ttl: Duration::from_secs(5),
        steady: Duration::from_secs(30),
        deaths: 3,
        changes: 50,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        let dur = |v: String| {
            parse_duration(&v).unwrap_or_else(|| panic!("{v}: a duration like 5s or 500ms"))
        };
        match a.as_str() {
            "--hosts" => o.hosts = val().parse().expect("--hosts N"),
            "--per-host" => o.per_host = val().parse().expect("--per-host N"),
            "--proxies" => o.proxies = val().parse().expect("--proxies N"),
            "--ttl" => o.ttl = dur(val()),
            "--steady" => o.steady = dur(val()),
            "--deaths" => o.deaths = val().parse().expect("--deaths N"),
            "--changes" => o.changes = val().parse().expect("--changes N"),
            "--bench" => {}
            other => panic!("unknown argument {other} (see the header of benches/fleet_sim.rs)"),
        }
    }
    assert!(
        o.hosts <= 250 && o.per_host <= 1000,
        "addresses are 10.100.<host>.1:<20000+k>"
    );
    o
}

fn parse_duration(v: &str) -> Option<Duration> {
    if let Some(n) = v.strip_suffix("ms") {
        return n.parse().ok().map(Duration::from_millis);
    }
    v.strip_suffix('s')?
        .parse()
        .ok()
        .map(Duration::from_secs_f64)
}

fn node_name(h: usize) -> String {
    format!("sim-{h:03}")
}

fn host_ip(h: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, h as u8, 1)
}

/// Endpoint `k` of simulated host `h` on `port`.
fn endpoint(h: usize, k: usize, port: u16) -> Endpoint {
    let node = node_name(h);
    let container = format!(
        "{:012x}",
        0x51_0000_0000u64 + (h as u64) * 10_000 + k as u64
    );
    Endpoint {
        instance: format!("{node}-{container}-8080"),
        service: format!("svc-{:03}", (h * 100 + k) % SERVICES),
        node,
        host: host_ip(h).to_string(),
        port,
        proto: Proto::Tcp,
        container,
        image: "example/web:1.0".into(),
        tags: vec![],
        meta: BTreeMap::new(),
        health: Health::None,
        registered_at: "2026-12-01T00:00:00Z".into(),
    }
}

fn port(k: usize, generation: usize) -> u16 {
    20000 + (k as u16) + 1000 * (generation as u16 % 40)
}

/// One simulated host: its lease and the task keeping it alive.
struct SimHost {
    lease: i64,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn start_host(
    mut client: Client,
    keys: &Keys,
    h: usize,
    per_host: usize,
    ttl: Duration,
    keepalives: Arc<AtomicU64>,
) -> SimHost {
    let lease = client
        .lease_grant(ttl.as_secs() as i64, None)
        .await
        .expect("lease grant")
        .id();
    let opts = || Some(PutOptions::new().with_lease(lease));
    let node = Node {
        node: node_name(h),
        version: "sim".into(),
        started_at: "2026-12-01T00:00:00Z".into(),
        advertise_ip: host_ip(h).into(),
        labels: BTreeMap::new(),
    };
    let mut ops = vec![TxnOp::put(
        keys.node(&node.node),
        node.encode(keys).expect("node record"),
        opts(),
    )];
    for k in 0..per_host {
        let ep = endpoint(h, k, port(k, 0));
        ops.push(TxnOp::put(
            ep.key(keys),
            ep.encode(keys).expect("endpoint"),
            opts(),
        ));
    }
    for chunk in ops.chunks(TXN_OPS) {
        client
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .expect("txn");
    }
    let (mut keeper, mut stream) = client
        .lease_keep_alive(lease)
        .await
        .expect("lease keep-alive stream");
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel();
    let every = ttl / 3;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                _ = tick.tick() => {
                    if keeper.keep_alive().await.is_ok() && stream.message().await.is_ok() {
                        keepalives.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        // Dropping the keeper and the stream sends nothing more: the lease expires on its own.
    });
    SimHost {
        lease,
        stop: Some(stop_tx),
    }
}

/// utime + stime of a process, in seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn vm_hwm_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

struct Procs {
    etcd: Vec<u32>,
    confgen: Vec<u32>,
}

impl Procs {
    fn cpu(&self) -> (f64, Vec<f64>) {
        (
            self.etcd.iter().map(|&p| cpu_seconds(p)).sum(),
            self.confgen.iter().map(|&p| cpu_seconds(p)).collect(),
        )
    }
}

/// Per proxy: (renders, writes) of its haproxy resource.
fn confgen_counts(fleet: &Fleet) -> Vec<(f64, f64)> {
    fleet
        .hosts
        .iter()
        .map(|h| {
            let body = h
                .local_get(9102, "/metrics")
                .map(|r| r.1)
                .unwrap_or_default();
            (
                metric_sum(&body, "confgen_renders_total", &[]),
                metric_sum(&body, "confgen_writes_total", &[]),
            )
        })
        .collect()
}

/// etcd m0's counters: (puts, deletes, proposals committed).
fn etcd_counters(member: SocketAddr) -> (f64, f64, f64) {
    let body =
        flotilla_harness::haproxy::http_get_at(member, "x", "/metrics", Duration::from_secs(5))
            .map(|r| r.1)
            .unwrap_or_default();
    // etcd 3.4 names them etcd_mvcc_*; older releases etcd_debugging_mvcc_*.
    let either = |a: &str, b: &str| metric(&body, a).max(metric(&body, b));
    (
        either("etcd_mvcc_put_total", "etcd_debugging_mvcc_put_total"),
        either("etcd_mvcc_delete_total", "etcd_debugging_mvcc_delete_total"),
        metric(&body, "etcd_server_proposals_committed_total"),
    )
}

/// Watches every proxy file (stat every 1 ms, read on change) until `done(text)` holds for each;
/// returns when each got there, in proxy order.
fn wait_files(paths: &[PathBuf], timeout: Duration, done: impl Fn(&str) -> bool) -> Vec<Duration> {
    let start = Instant::now();
    let mut when: Vec<Option<Duration>> = vec![None; paths.len()];
    let mut stamps: Vec<Option<(u64, i64, i64, u64)>> = vec![None; paths.len()];
    loop {
        for (i, p) in paths.iter().enumerate() {
            if when[i].is_some() {
                continue;
            }
            let Ok(md) = std::fs::metadata(p) else {
                continue;
            };
            let stamp = (md.len(), md.mtime(), md.mtime_nsec(), md.ino());
            if stamps[i] == Some(stamp) {
                continue;
            }
            let t = start.elapsed();
            stamps[i] = Some(stamp);
            if std::fs::read_to_string(p).is_ok_and(|text| done(&text)) {
                when[i] = Some(t);
            }
        }
        if when.iter().all(Option::is_some) {
            return when.into_iter().map(Option::unwrap).collect();
        }
        assert!(
            start.elapsed() < timeout,
            "proxies not updated within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let o = opts();
    let bins = Binaries {
        presence: common::bin("presence"),
        confgen: common::bin("confgen"),
        proxyctl: common::bin("proxyctl"),
        templates: common::chain::repo().join("templates/templates"),
    };
    let mut spec = FleetSpec::new(bins, 0);
    spec.hosts = vec![HostSpec::confgen_only(); o.proxies];
    spec.ttl = o.ttl;
    spec.rust_log = "warn".into();
    let t = Instant::now();
    let fleet = Fleet::start(spec);
    println!(
        "fleet: 3 etcd members, {} confgen proxy hosts, up in {:.1} s; simulating {} hosts × {} endpoints, TTL {:?}",
        o.proxies,
        t.elapsed().as_secs_f64(),
        o.hosts,
        o.per_host,
        o.ttl
    );
    let procs = Procs {
        etcd: fleet.etcd.iter().filter_map(|m| m.pid()).collect(),
        confgen: fleet
            .hosts
            .iter()
            .filter_map(|h| h.daemon_pids().1)
            .collect(),
    };
    let paths: Vec<PathBuf> = fleet
        .hosts
        .iter()
        .map(|h| h.config_path().to_owned())
        .collect();
    let m0: SocketAddr = SocketAddr::from((fleet.etcd[0].ip, 2379));
    let endpoints: Vec<String> = fleet.etcd.iter().map(|m| m.endpoint()).collect();
    let client_ns = fleet.client().path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        // Every runtime thread enters the client namespace (the only way to the etcd members).
        .on_thread_start(move || flotilla_harness::netns::enter_thread(&client_ns))
        .build()
        .expect("tokio runtime");
    let keys = Keys::new("/flotilla").unwrap();
    let args = EtcdArgs {
        endpoints,
        ..EtcdArgs::default()
    };
    let client: Client = rt
        .block_on(rt.spawn(async move { args.connect().await }))
        .unwrap()
        .expect("connect to etcd");
    let keepalives = Arc::new(AtomicU64::new(0));
    let mut summary: Vec<(String, String, String)> = Vec::new();

    // 1. load
    let total = o.hosts * o.per_host;
    let t = Instant::now();
    let (cpu_e0, cpu_c0) = procs.cpu();
    let mut hosts: Vec<SimHost> = {
        let (c, k, ka) = (client.clone(), keys.clone(), keepalives.clone());
        let (n, per, ttl) = (o.hosts, o.per_host, o.ttl);
        rt.block_on(rt.spawn(async move {
            let tasks: Vec<_> = (0..n)
                .map(|h| {
                    let (c, k, ka) = (c.clone(), k.clone(), ka.clone());
                    tokio::spawn(async move { start_host(c, &k, h, per, ttl, ka).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("writer"));
            }
            out
        }))
        .unwrap()
    };
    let written = t.elapsed();
    let loaded = wait_files(&paths, Duration::from_secs(300), |text| {
        text.matches(" check inter").count() == total
    });
    let (cpu_e1, cpu_c1) = procs.cpu();
    let complete = written + *loaded.iter().max().unwrap();
    println!(
        "load: {total} endpoints of {} hosts written in {:.2} s (with their leases and node records); every proxy's file complete {:.2} s after the first write; etcd CPU {:.2} s (3 members), confgen CPU {:.2} s each (median)",
        o.hosts,
        written.as_secs_f64(),
        complete.as_secs_f64(),
        cpu_e1 - cpu_e0,
        median_f(cpu_c1.iter().zip(&cpu_c0).map(|(a, b)| a - b).collect()),
    );
    summary.push((
        format!(
            "fleet sim {}×{}: all writers start → every proxy's file complete",
            o.hosts, o.per_host
        ),
        "—".into(),
        format!(
            "{:.2} s (writes {:.2} s)",
            complete.as_secs_f64(),
            written.as_secs_f64()
        ),
    ));

    // 2. steady state
    std::thread::sleep(Duration::from_secs(2));
    let revision = |c: &Client| -> i64 {
        let mut c = c.clone();
        rt.block_on(rt.spawn(async move {
            c.get("/", Some(etcd_client::GetOptions::new().with_count_only()))
                .await
                .expect("get")
                .header()
                .expect("header")
                .revision()
        }))
        .unwrap()
    };
    let rt_get = |addr: SocketAddr| {
        rt.block_on(rt.spawn(async move { etcd_counters(addr) }))
            .unwrap()
    };
    let rev0 = revision(&client);
    let (put0, del0, prop0) = rt_get(m0);
    let ka0 = keepalives.load(Ordering::Relaxed);
    let counts0 = confgen_counts(&fleet);
    let (ce0, cc0) = procs.cpu();
    let t = Instant::now();
    std::thread::sleep(o.steady);
    let secs = t.elapsed().as_secs_f64();
    let rev1 = revision(&client);
    let (put1, del1, prop1) = rt_get(m0);
    let ka1 = keepalives.load(Ordering::Relaxed);
    let counts1 = confgen_counts(&fleet);
    let (ce1, cc1) = procs.cpu();
    let renders: f64 = counts1.iter().zip(&counts0).map(|(a, b)| a.0 - b.0).sum();
    let writes: f64 = counts1.iter().zip(&counts0).map(|(a, b)| a.1 - b.1).sum();
    let confgen_cpu = median_f(cc1.iter().zip(&cc0).map(|(a, b)| a - b).collect());
    println!(
        "steady state over {secs:.1} s: {} revisions ({:.2}/s), {} puts, {} deletes, {} raft proposals committed ({:.2}/s); {} keep-alives ({:.1}/s); confgen renders {renders}, writes {writes} (all proxies); etcd CPU {:.1} % of a core (3 members), confgen {:.2} % each (median)",
        rev1 - rev0,
        (rev1 - rev0) as f64 / secs,
        put1 - put0,
        del1 - del0,
        prop1 - prop0,
        (prop1 - prop0) / secs,
        ka1 - ka0,
        (ka1 - ka0) as f64 / secs,
        (ce1 - ce0) / secs * 100.0,
        confgen_cpu / secs * 100.0,
    );
    summary.push((
        format!(
            "fleet sim {}×{}: steady-state etcd key writes/s (keep-alives only)",
            o.hosts, o.per_host
        ),
        "~0".into(),
        format!(
            "{:.2} (puts {}, deletes {} in {secs:.0} s; {:.1} keep-alives/s)",
            (put1 - put0 + del1 - del0) / secs,
            put1 - put0,
            del1 - del0,
            (ka1 - ka0) as f64 / secs
        ),
    ));
    summary.push((
        format!(
            "fleet sim {}×{}: steady-state CPU, etcd (3 members) / confgen (each)",
            o.hosts, o.per_host
        ),
        "—".into(),
        format!(
            "{:.1} % / {:.2} % of a core",
            (ce1 - ce0) / secs * 100.0,
            confgen_cpu / secs * 100.0
        ),
    ));

    // 3. a host dies
    let mut to_deleted = Vec::new();
    let mut to_files = Vec::new();
    let mut deleted_to_files = Vec::new();
    for d in 0..o.deaths {
        let h = (7 + d * 13) % o.hosts;
        let node = node_name(h);
        let ip_marker = format!(" {}:", host_ip(h));
        let prefix_ep = keys.endpoints_of(&node);
        let node_key = keys.node(&node);
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, usize, i64)>();
        let mut c = client.clone();
        let want = o.per_host + 1;
        let watcher = rt.spawn(async move {
            let mut s = c
                .watch("/flotilla/", Some(WatchOptions::new().with_prefix()))
                .await
                .expect("watch");
            let mut seen = 0;
            let mut revs = std::collections::BTreeSet::new();
            let mut first = None;
            while let Ok(Some(resp)) = s.message().await {
                for ev in resp.events() {
                    let key = ev
                        .kv()
                        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned());
                    let mine = key
                        .as_deref()
                        .is_some_and(|k| k.starts_with(&prefix_ep) || k == node_key);
                    if ev.event_type() == EventType::Delete && mine {
                        first.get_or_insert(Instant::now());
                        seen += 1;
                        revs.insert(ev.kv().map(|kv| kv.mod_revision()).unwrap_or(0));
                    }
                }
                if seen >= want {
                    let _ = tx.send((first.unwrap(), seen, revs.len() as i64));
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let counts0 = confgen_counts(&fleet);
        let (ce0, cc0) = procs.cpu();
        let (put0, del0, _) = rt_get(m0);
        let died = Instant::now();
        let _ = hosts[h].stop.take().map(|s| s.send(()));
        let files = wait_files(&paths, o.ttl * 3 + Duration::from_secs(60), |text| {
            !text.contains(&ip_marker)
        });
        let (deleted_at, n_deleted, n_revs) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the dead host's keys deleted");
        rt.block_on(watcher).ok();
        std::thread::sleep(Duration::from_millis(1500));
        let counts1 = confgen_counts(&fleet);
        let (ce1, cc1) = procs.cpu();
        let (put1, del1, _) = rt_get(m0);
        let last = *files.iter().max().unwrap();
        let del_after = deleted_at.duration_since(died);
        to_deleted.push(del_after);
        to_files.push(last);
        deleted_to_files.push(last.saturating_sub(del_after));
        let renders: Vec<f64> = counts1
            .iter()
            .zip(&counts0)
            .map(|(a, b)| a.0 - b.0)
            .collect();
        let writes: Vec<f64> = counts1
            .iter()
            .zip(&counts0)
            .map(|(a, b)| a.1 - b.1)
            .collect();
        println!(
            "host {node} died (keep-alives stopped, lease {:x}): {n_deleted} keys deleted in {n_revs} revision(s) {} after; every proxy without it {} after the death = {} after the delete (first proxy {}); etcd puts +{}, deletes +{}; confgen renders {renders:?}, writes {writes:?}; CPU etcd {:.3} s, confgen {:?} s",
            hosts[h].lease,
            ms(del_after),
            ms(last),
            ms(last.saturating_sub(del_after)),
            ms(files.iter().min().unwrap().saturating_sub(del_after)),
            put1 - put0,
            del1 - del0,
            ce1 - ce0,
            cc1.iter().zip(&cc0).map(|(a, b)| ((a - b) * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        );
    }
    if !to_files.is_empty() {
        summary.push((
            format!(
                "fleet sim {}×{}: host death → its keys deleted (TTL {:?}), median (max)",
                o.hosts, o.per_host, o.ttl
            ),
            "≤ TTL".into(),
            format!(
                "{} ({})",
                ms(pct(&to_deleted, 0.5)),
                ms(pct(&to_deleted, 1.0))
            ),
        ));
        summary.push((
            format!("fleet sim {}×{}: keys deleted → every one of {} proxies' files updated, median (max)", o.hosts, o.per_host, o.proxies),
            "—".into(),
            format!("{} ({})", ms(pct(&deleted_to_files, 0.5)), ms(pct(&deleted_to_files, 1.0))),
        ));
    }

    // 4. change → file on every proxy
    let mut first = Vec::new();
    let mut every = Vec::new();
    for i in 0..o.changes {
        let h = (i * 37) % o.hosts;
        if hosts[h].stop.is_none() {
            continue;
        }
        let k = (i * 11) % o.per_host;
        let ep = endpoint(h, k, port(k, i + 1));
        let marker = format!(" {}:{} check", ep.host, ep.port);
        let (key, val) = (ep.key(&keys), ep.encode(&keys).unwrap());
        let lease = hosts[h].lease;
        let mut c = client.clone();
        rt.block_on(rt.spawn(async move {
            c.put(key, val, Some(PutOptions::new().with_lease(lease)))
                .await
                .expect("put")
        }))
        .unwrap();
        let t = wait_files(&paths, Duration::from_secs(30), |text| {
            text.contains(&marker)
        });
        first.push(*t.iter().min().unwrap());
        every.push(*t.iter().max().unwrap());
        std::thread::sleep(Duration::from_millis(100 + (i as u64 * 7) % 50));
    }
    if !every.is_empty() {
        println!(
            "change → file over {} changes: first proxy p50 {} p90 {} max {}; every proxy p50 {} p90 {} max {}",
            every.len(),
            ms(pct(&first, 0.5)),
            ms(pct(&first, 0.9)),
            ms(pct(&first, 1.0)),
            ms(pct(&every, 0.5)),
            ms(pct(&every, 0.9)),
            ms(pct(&every, 1.0)),
        );
        summary.push((
            format!(
                "fleet sim {}×{}: one change → file on every one of {} proxies, p50 / p90 (n = {})",
                o.hosts,
                o.per_host,
                o.proxies,
                every.len()
            ),
            "—".into(),
            format!("{} / {}", ms(pct(&every, 0.5)), ms(pct(&every, 0.9))),
        ));
    }
    let rss: Vec<f64> = procs.confgen.iter().map(|&p| vm_hwm_mb(p)).collect();
    println!("confgen VmHWM per proxy: {rss:.1?} MB");
    for (figure, target, measured) in summary {
        println!("summary: {figure}|{target}|{measured}");
    }
    drop(hosts);
    drop(client);
    drop(rt);
    drop(fleet);
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
