//! Endpoint churn through HAProxy's runtime API (`runtime_api` in the resource): real etcd, real
//! HAProxy 2.6 in master-worker mode, the shipped template, traffic through HAProxy.
//!
//! What is proven: server-line changes reach HAProxy without a reload and with no failed
//! request (keep-alive and `Connection: close` clients), the running state equals the file
//! server by server afterwards, a structural change still reloads, a drain survives both paths,
//! a `kill -9` in the middle of an apply converges after a restart, and a socket that refuses
//! or hangs falls back to a reload within the timeout. Deadlines are several times the goals
//! (the benchmark measures the goals); everything is polled, not slept.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::setup::Setup;
use common::{confgen, read, tail};
use flotilla_harness::haproxy::{Haproxy, StaticBackend};
use flotilla_harness::wait_for;

/// The shipped resource's `wait` would batch for up to 1 s; these tests want each change applied
/// on its own as far as possible.
const WAIT: &str = "wait = \"20ms:200ms\"";

fn runtime_resource(socket: &Path, timeout: &str) -> String {
    format!(
        "{WAIT}\nruntime_api = \"{}\"\nruntime_timeout = \"{timeout}\"\n",
        socket.display()
    )
}

/// A server as the file or the running HAProxy has it: address, port, weight.
type Servers = BTreeMap<(String, String), (String, u16, u32)>;

/// Every server line of the file (backend, name) → (address, port, weight).
fn file_servers(path: &Path) -> Servers {
    let cfg = proxyctl::Config::parse(&read(path)).expect("the file parses");
    cfg.backends()
        .flat_map(|b| {
            let be = b.name.clone().unwrap_or_default();
            b.servers.iter().map(move |s| {
                let (ip, port) = s.endpoint.expect("IP literal");
                (
                    (be.clone(), s.name.clone()),
                    (ip.to_string(), port, s.effective_weight()),
                )
            })
        })
        .collect()
}

/// Every running server, from `show servers state`, for the backends the file has.
fn running_servers(hx: &Haproxy, file: &Servers) -> Servers {
    let text = hx.runtime_cli("show servers state");
    let backends: std::collections::BTreeSet<&String> = file.keys().map(|(b, _)| b).collect();
    proxyctl::parse_servers_state(&text)
        .unwrap_or_else(|e| panic!("show servers state: {e}: {text}"))
        .into_iter()
        .filter(|s| backends.contains(&s.backend))
        .map(|s| ((s.backend, s.name), (s.addr, s.port, s.weight)))
        .collect()
}

/// The master's workers (the master CLI refuses for a moment while it re-executes at a reload).
fn worker_pids(hx: &Haproxy) -> Vec<u32> {
    wait_for("the master CLI", Duration::from_secs(10), || {
        hx.try_master_cli("show proc")
            .ok()
            .map(|p| flotilla_harness::haproxy::worker_pids(&p))
    })
}

fn admin_state(hx: &Haproxy, backend: &str, server: &str) -> u32 {
    let text = hx.runtime_cli(&format!("show servers state {backend}"));
    proxyctl::parse_servers_state(&text)
        .unwrap()
        .into_iter()
        .find(|s| s.name == server)
        .unwrap_or_else(|| panic!("{backend}/{server} is not running: {text}"))
        .admin_state
}

/// Waits until the running servers equal the file's, server by server, and the file's servers
/// of `backend` are `want` (name → port).
fn wait_converged(s: &Setup, backend: &str, want: &BTreeMap<String, u16>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let file = file_servers(&s.dest());
        let ours: BTreeMap<String, u16> = file
            .iter()
            .filter(|((b, _), _)| b == backend)
            .map(|((_, n), (_, port, _))| (n.clone(), *port))
            .collect();
        let running = running_servers(&s.haproxy, &file);
        if &ours == want && running == file {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not converged within {timeout:?}:\nwant {want:?}\nfile {ours:?}\nfile servers {file:?}\nrunning {running:?}\n{}",
            s.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The instance name the test registry gives endpoint `n` of `node`.
fn instance(node: &str, n: u32) -> String {
    format!("{node}-{:012x}-8080", 0xc0ffee000000u64 + u64::from(n))
}

fn runtime_metric(s: &Setup, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.confgen.as_ref().unwrap().metric(name, labels)
}

/// HTTP load through HAProxy on a few threads: keep-alive clients (one connection reused until
/// HAProxy answers `Connection: close`) and `Connection: close` clients. Bounded in requests;
/// counts every failure (connection error, reset, short answer, status other than 200).
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    bodies: Arc<Mutex<BTreeMap<String, usize>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, host: &str, keepalive: usize, close: usize) -> Load {
        let mut load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            failed: Arc::new(AtomicUsize::new(0)),
            done: Arc::new(AtomicUsize::new(0)),
            errors: Arc::default(),
            bodies: Arc::default(),
            threads: Vec::new(),
        };
        for i in 0..keepalive + close {
            let keep = i < keepalive;
            let (stop, failed, done, errors, bodies) = (
                load.stop.clone(),
                load.failed.clone(),
                load.done.clone(),
                load.errors.clone(),
                load.bodies.clone(),
            );
            let host = host.to_string();
            load.threads.push(std::thread::spawn(move || {
                let mut conn: Option<BufReader<TcpStream>> = None;
                // Bounded: at most 20,000 requests per thread (~100 s at 5 ms).
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match request(&mut conn, port, &host, keep) {
                        Ok((200, body)) => {
                            *bodies.lock().unwrap().entry(body).or_default() += 1;
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let mut e = errors.lock().unwrap();
                            if e.len() < 20 {
                                e.push(format!(
                                    "{}: {other:?}",
                                    if keep { "keep-alive" } else { "close" }
                                ));
                            }
                            conn = None;
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        load
    }

    fn requests(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops; returns (requests, failed, answers by body).
    fn stop(mut self) -> (usize, usize, BTreeMap<String, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let failed = self.failed.load(Ordering::Relaxed);
        if failed > 0 {
            eprintln!("failed requests: {:?}", self.errors.lock().unwrap());
        }
        (
            self.done.load(Ordering::Relaxed),
            failed,
            self.bodies.lock().unwrap().clone(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One GET; reuses `conn` for keep-alive and leaves it open unless HAProxy said
/// `Connection: close`.
fn request(
    conn: &mut Option<BufReader<TcpStream>>,
    port: u16,
    host: &str,
    keep: bool,
) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        *conn = Some(BufReader::new(s));
    }
    let c = conn.as_mut().unwrap();
    let close = if keep { "" } else { "Connection: close\r\n" };
    c.get_mut()
        .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n{close}\r\n").as_bytes())?;
    let mut status_line = String::new();
    if c.read_line(&mut status_line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before an answer",
        ));
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let (mut length, mut closing) = (None, !keep);
    loop {
        let mut h = String::new();
        c.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        } else if lower.starts_with("connection:") && lower.contains("close") {
            closing = true;
        }
    }
    let mut body = vec![0; length.unwrap_or(0)];
    c.read_exact(&mut body)?;
    if length.is_none() {
        // No length: the body runs to the end of the connection.
        c.read_to_end(&mut body)?;
        closing = true;
    }
    if closing {
        *conn = None;
    }
    Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
}

/// A Unix socket between confgen and HAProxy's runtime socket that forwards each command and
/// can be told to hold one (never answer it), so a test can kill confgen in the middle of an
/// apply.
struct Relay {
    path: PathBuf,
    hold: Arc<Mutex<Option<String>>>,
    held: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(path: PathBuf, target: PathBuf) -> Relay {
        let listener = UnixListener::bind(&path).expect("bind the relay socket");
        listener.set_nonblocking(true).unwrap();
        let hold: Arc<Mutex<Option<String>>> = Arc::default();
        let held: Arc<Mutex<Option<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (hold, held, stop) = (hold.clone(), held.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut client = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        Err(e) => panic!("relay accept: {e}"),
                    };
                    client.set_nonblocking(false).unwrap();
                    client
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let mut command = String::new();
                    if client.read_to_string(&mut command).is_err() {
                        continue;
                    }
                    let matches = hold
                        .lock()
                        .unwrap()
                        .as_ref()
                        .is_some_and(|h| command.starts_with(h.as_str()));
                    if matches {
                        *hold.lock().unwrap() = None;
                        *held.lock().unwrap() = Some(command.trim().to_string());
                        // Never answered: the connection stays open until released.
                        while held.lock().unwrap().is_some() && !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        continue;
                    }
                    let answer = (|| -> std::io::Result<String> {
                        let mut up = UnixStream::connect(&target)?;
                        up.write_all(command.as_bytes())?;
                        up.shutdown(std::net::Shutdown::Write)?;
                        let mut a = String::new();
                        up.read_to_string(&mut a)?;
                        Ok(a)
                    })()
                    .unwrap_or_default();
                    let _ = client.write_all(answer.as_bytes());
                }
            }
        });
        Relay {
            path,
            hold,
            held,
            stop,
            thread: Some(thread),
        }
    }

    /// Holds the next command that starts with `prefix`.
    fn hold(&self, prefix: &str) {
        *self.hold.lock().unwrap() = Some(prefix.to_string());
    }

    /// The command being held, if one is.
    fn held(&self) -> Option<String> {
        self.held.lock().unwrap().clone()
    }

    /// Lets go of the held command's connection (closed without an answer).
    fn release(&self) {
        *self.held.lock().unwrap() = None;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `confgen run --onetime --noop --diff`: the diff between the destination and a full render of
/// the registry (empty when they are equal).
fn diff_against_a_full_render(s: &Setup) -> String {
    let out = confgen(&[
        "run",
        "--confdir",
        s.confdir.path().to_str().unwrap(),
        "--onetime",
        "--noop",
        "--diff",
        "--etcd-endpoints",
        &s.etcd.endpoint(),
    ]);
    assert!(
        out.status.success(),
        "confgen --onetime --noop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_hundred_endpoint_changes_under_load_need_no_reload_and_a_new_service_still_reloads() {
    let mut s = Setup::start_with(|hx, _| runtime_resource(hx.stats_socket(), "2s"));
    // Six live backends for the whole test: an endpoint is added, removed or moved between
    // them, so any failed request is the proxy's, not a backend's.
    let pool: Vec<StaticBackend> = (0..6)
        .map(|i| StaticBackend::start(&format!("b{i}")))
        .collect();
    let mut live: BTreeMap<u32, usize> = BTreeMap::new();
    for n in 1..=3u32 {
        s.reg
            .put_endpoint("node-a", "web", n, pool[n as usize].port());
        live.insert(n, n as usize);
    }
    s.start_confgen();
    s.wait_served_by("web", &["b1", "b2", "b3"], Duration::from_secs(30));
    let want = |live: &BTreeMap<u32, usize>| -> BTreeMap<String, u16> {
        live.iter()
            .map(|(n, b)| (instance("node-a", *n), pool[*b].port()))
            .collect()
    };
    wait_converged(&s, "svc_web", &want(&live), Duration::from_secs(10));
    let reloads = s.reloads();
    let load = Load::start(s.http_port, "web.localhost", 2, 2);
    wait_for("the load to run", Duration::from_secs(10), || {
        (load.requests() > 20).then_some(())
    });

    // 100 changes: adds, removes and moves in turn (and every tenth a weight), 30 ms apart.
    let mut next = 4u32;
    let mut rng = 0x2545f491u64;
    let mut pick = |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let started = Instant::now();
    for i in 0..100u32 {
        match i % 3 {
            0 => {
                let b = pick(pool.len());
                s.reg.put_endpoint("node-a", "web", next, pool[b].port());
                live.insert(next, b);
                next += 1;
            }
            1 if live.len() > 2 => {
                let n = *live.keys().nth(pick(live.len())).unwrap();
                let (key, _) = s.reg.endpoint("node-a", "web", n, 1);
                s.reg.delete(&key);
                live.remove(&n);
            }
            _ => {
                let n = *live.keys().nth(pick(live.len())).unwrap();
                let b = (live[&n] + 1 + pick(pool.len() - 1)) % pool.len();
                if i % 10 == 2 {
                    let w = (1 + pick(5)).to_string();
                    let (k, v) =
                        s.reg
                            .endpoint_meta("node-a", "web", n, pool[b].port(), &[("weight", &w)]);
                    s.reg.put(&k, v);
                } else {
                    s.reg.put_endpoint("node-a", "web", n, pool[b].port());
                }
                live.insert(n, b);
            }
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let put = started.elapsed();
    // The last change reaches HAProxy without a reload: the file has exactly the live
    // endpoints and the running servers equal the file, server by server.
    wait_converged(&s, "svc_web", &want(&live), Duration::from_secs(20));
    eprintln!(
        "100 changes put in {put:?}; converged {:?} after the first",
        started.elapsed()
    );
    assert_eq!(
        s.reloads(),
        reloads,
        "endpoint churn reloaded HAProxy\n{}",
        s.diagnostics()
    );
    let applies = runtime_metric(&s, "confgen_runtime_applies_total", &[]);
    let fallbacks = runtime_metric(&s, "confgen_runtime_fallbacks_total", &[]);
    eprintln!("runtime applies {applies}, fallbacks {fallbacks}");
    assert!(applies >= 10.0, "only {applies} runtime applies");

    // A structural change in the same run: a new service reloads, the load sees no failure.
    let api = StaticBackend::start("api");
    s.reg.put_endpoint("node-b", "api", 900, api.port());
    wait_for("api served", Duration::from_secs(30), || {
        s.get("api")
            .ok()
            .filter(|(c, b)| *c == 200 && b.trim() == "api")
    });
    assert_eq!(s.reloads(), reloads + 1, "{}", s.diagnostics());
    assert!(
        runtime_metric(
            &s,
            "confgen_runtime_fallbacks_total",
            &[("reason", "structural")]
        ) >= 1.0
    );
    // Keep the load on through the reload's aftermath (old workers finishing).
    let after = load.requests();
    wait_for("load after the reload", Duration::from_secs(10), || {
        (load.requests() > after + 100).then_some(())
    });
    let (requests, failed, bodies) = load.stop();
    eprintln!("{requests} requests, {failed} failed, by backend {bodies:?}");
    assert_eq!(failed, 0, "failed requests during the churn and the reload");
    assert!(bodies.keys().all(|b| b.starts_with('b')), "{bodies:?}");
    let file = file_servers(&s.dest());
    assert_eq!(running_servers(&s.haproxy, &file), file);
    s.confgen().assert_running();
}

#[test]
fn a_drain_set_with_proxyctl_survives_a_runtime_apply_and_a_reload() {
    let mut s = Setup::start_with(|hx, _| runtime_resource(hx.stats_socket(), "2s"));
    let alpha = StaticBackend::start("alpha");
    let beta = StaticBackend::start("beta");
    s.reg.put_endpoint("node-a", "web", 1, alpha.port());
    s.reg.put_endpoint("node-a", "web", 2, beta.port());
    s.start_confgen();
    s.wait_served_by("web", &["alpha", "beta"], Duration::from_secs(30));
    let alpha_srv = instance("node-a", 1);
    let drain = std::process::Command::new(common::workspace_bin("proxyctl"))
        .args(["drain", &format!("svc_web/{alpha_srv}"), "--socket"])
        .arg(s.haproxy.stats_socket())
        .output()
        .unwrap();
    assert!(drain.status.success(), "{drain:?}");
    s.wait_served_by("web", &["beta"], Duration::from_secs(10));
    let reloads = s.reloads();

    // A runtime apply (a new endpoint) keeps the drain.
    let gamma = StaticBackend::start("gamma");
    s.reg.put_endpoint("node-a", "web", 3, gamma.port());
    s.wait_served_by("web", &["beta", "gamma"], Duration::from_secs(10));
    assert_eq!(s.reloads(), reloads, "{}", s.diagnostics());
    assert_eq!(
        admin_state(&s.haproxy, "svc_web", &alpha_srv) & proxyctl::ServerState::ADMIN_FDRAIN,
        proxyctl::ServerState::ADMIN_FDRAIN
    );

    // A reload (a new service) keeps it too: the new workers load the saved state.
    let workers = worker_pids(&s.haproxy);
    let api = StaticBackend::start("api");
    s.reg.put_endpoint("node-b", "api", 9, api.port());
    wait_for("the reload", Duration::from_secs(30), || {
        (s.reloads() == reloads + 1).then_some(())
    });
    wait_for("api served", Duration::from_secs(30), || {
        s.get("api")
            .ok()
            .filter(|(c, b)| *c == 200 && b.trim() == "api")
    });
    assert_ne!(worker_pids(&s.haproxy), workers, "no new worker generation");
    assert_eq!(
        admin_state(&s.haproxy, "svc_web", &alpha_srv) & proxyctl::ServerState::ADMIN_FDRAIN,
        proxyctl::ServerState::ADMIN_FDRAIN,
        "the drain was lost at the reload\n{}",
        s.diagnostics()
    );
    s.wait_served_by("web", &["beta", "gamma"], Duration::from_secs(10));
    assert_eq!(
        read(&s.haproxy.dir().join("server-state")),
        "1\n",
        "the state file is emptied after the reload"
    );
    let file = file_servers(&s.dest());
    assert_eq!(running_servers(&s.haproxy, &file), file);

    // Undone by the operator: alpha serves again.
    let enable = std::process::Command::new(common::workspace_bin("proxyctl"))
        .args(["enable", &format!("svc_web/{alpha_srv}"), "--socket"])
        .arg(s.haproxy.stats_socket())
        .output()
        .unwrap();
    assert!(enable.status.success(), "{enable:?}");
    s.wait_served_by("web", &["alpha", "beta", "gamma"], Duration::from_secs(10));
    s.confgen().assert_running();
}

#[test]
fn kill_9_in_the_middle_of_a_runtime_apply_then_a_restart_converges() {
    let mut relay_path = None;
    let mut s = Setup::start_with(|_, confdir| {
        let p = confdir.path().join("relay.sock");
        relay_path = Some(p.clone());
        // A long timeout: the held command must not time out before the kill.
        runtime_resource(&p, "20s")
    });
    let relay = Relay::start(relay_path.unwrap(), s.haproxy.stats_socket().to_owned());
    let pool: Vec<StaticBackend> = (0..4)
        .map(|i| StaticBackend::start(&format!("b{i}")))
        .collect();
    for n in 0..2u32 {
        s.reg
            .put_endpoint("node-a", "web", n, pool[n as usize].port());
    }
    s.start_confgen();
    s.wait_served_by("web", &["b0", "b1"], Duration::from_secs(30));
    let reloads = s.reloads();

    // 1. Killed after `add server` of a new endpoint, before it was enabled: the running
    //    HAProxy has it in maintenance, the file does not have it.
    relay.hold("enable health");
    s.reg.put_endpoint("node-a", "web", 2, pool[2].port());
    wait_for(
        "confgen at `enable health`",
        Duration::from_secs(20),
        || relay.held(),
    );
    s.confgen = None; // SIGKILL
    relay.release();
    let gamma = instance("node-a", 2);
    assert!(admin_state(&s.haproxy, "svc_web", &gamma) & proxyctl::ServerState::ADMIN_FMAINT != 0);
    assert!(!read(&s.dest()).contains(&gamma));
    // While confgen is down the registry moves on: b1 moves to pool[3].
    s.reg.put_endpoint("node-a", "web", 1, pool[3].port());

    s.start_confgen();
    let want: BTreeMap<String, u16> = [
        (instance("node-a", 0), pool[0].port()),
        (instance("node-a", 1), pool[3].port()),
        (gamma.clone(), pool[2].port()),
    ]
    .into();
    wait_converged(&s, "svc_web", &want, Duration::from_secs(20));
    s.wait_served_by("web", &["b0", "b3", "b2"], Duration::from_secs(20));
    assert_eq!(admin_state(&s.haproxy, "svc_web", &gamma), 0);
    assert_eq!(s.reloads(), reloads, "{}", s.diagnostics());
    // The restarted confgen finished the interrupted add (and applied the move).
    let log = s.confgen().log();
    assert!(
        log.contains("0 added, 0 removed, 1 moved, 0 reweighted, 1 repaired"),
        "{}",
        tail(&log, 20)
    );
    assert_eq!(diff_against_a_full_render(&s), "");

    // 2. Killed at `del server` of a removed endpoint: it is in maintenance, still running,
    //    and already gone from the registry.
    relay.hold("del server");
    let (key, _) = s.reg.endpoint("node-a", "web", 0, 1);
    s.reg.delete(&key);
    wait_for("confgen at `del server`", Duration::from_secs(20), || {
        relay.held()
    });
    s.confgen = None;
    relay.release();
    s.wait_served_by("web", &["b3", "b2"], Duration::from_secs(10));
    s.start_confgen();
    let want: BTreeMap<String, u16> = [
        (instance("node-a", 1), pool[3].port()),
        (gamma.clone(), pool[2].port()),
    ]
    .into();
    wait_converged(&s, "svc_web", &want, Duration::from_secs(20));
    assert_eq!(s.reloads(), reloads, "{}", s.diagnostics());
    assert_eq!(diff_against_a_full_render(&s), "");

    // 3. Killed at `del server` again, and the endpoint comes back before the restart: the
    //    server is in the file and in maintenance, which an operator's `maint` would look like;
    //    confgen noted that it was removing it, so it is enabled again.
    relay.hold("del server");
    let (key, value) = s.reg.endpoint("node-a", "web", 2, pool[2].port());
    s.reg.delete(&key);
    wait_for("confgen at `del server`", Duration::from_secs(20), || {
        relay.held()
    });
    s.confgen = None;
    relay.release();
    assert!(admin_state(&s.haproxy, "svc_web", &gamma) & proxyctl::ServerState::ADMIN_FMAINT != 0);
    s.reg.put(&key, value);
    s.start_confgen();
    s.wait_served_by("web", &["b3", "b2"], Duration::from_secs(20));
    wait_converged(&s, "svc_web", &want, Duration::from_secs(20));
    assert_eq!(admin_state(&s.haproxy, "svc_web", &gamma), 0);
    assert_eq!(s.reloads(), reloads, "{}", s.diagnostics());
    assert_eq!(diff_against_a_full_render(&s), "");
    let leftovers: Vec<String> = s
        .haproxy
        .dir()
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".confgen-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staged files left behind: {leftovers:?}"
    );
    s.confgen().assert_running();
}

/// A runtime socket that accepts and never answers (`hang`) or refuses (`refuse`): the change
/// is reloaded within the timeout, with one log line naming the socket.
fn unreachable_socket_falls_back(hang: bool) {
    let mut sock_path = None;
    let mut s = Setup::start_with(|_, confdir| {
        let p = confdir.path().join("broken.sock");
        sock_path = Some(p.clone());
        runtime_resource(&p, "500ms")
    });
    let sock = sock_path.unwrap();
    let listener = UnixListener::bind(&sock).unwrap();
    let _hang = if hang {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let t = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((c, _)) = listener.accept() {
                        held.push(c);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Some((stop, t))
    } else {
        // Nothing listens on a socket file left behind: connections are refused.
        drop(listener);
        None
    };
    let alpha = StaticBackend::start("alpha");
    s.reg.put_endpoint("node-a", "web", 1, alpha.port());
    s.start_confgen();
    s.wait_served_by("web", &["alpha"], Duration::from_secs(30));
    let reloads = s.reloads();

    let beta = StaticBackend::start("beta");
    let put = Instant::now();
    s.reg.put_endpoint("node-a", "web", 2, beta.port());
    wait_for("the fallback reload", Duration::from_secs(10), || {
        (s.reloads() == reloads + 1).then_some(())
    });
    let took = put.elapsed();
    s.wait_served_by("web", &["alpha", "beta"], Duration::from_secs(10));
    eprintln!("put → fallback reload started: {took:?}");
    // The timeout is 500 ms; the fallback (timeout + check + reload start) well within 5 s.
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A second change while it is still broken: reloaded as well, no second warning.
    let gamma = StaticBackend::start("gamma");
    s.reg.put_endpoint("node-a", "web", 3, gamma.port());
    s.wait_served_by("web", &["alpha", "beta", "gamma"], Duration::from_secs(15));
    assert_eq!(s.reloads(), reloads + 2);
    let log = s.confgen().log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(&*sock.to_string_lossy()) && (l.contains("WARN") || l.contains("ERROR"))
        })
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one warning naming the socket:\n{}",
        tail(&log, 30)
    );
    assert!(lines[0].contains("runtime API unreachable"), "{}", lines[0]);
    assert!(
        runtime_metric(
            &s,
            "confgen_runtime_fallbacks_total",
            &[("reason", "unreachable")]
        ) >= 2.0
    );
    // Healthy (the changes are applied, by reloads), and /healthz says why it reloads.
    let (code, body) = s.confgen.as_ref().unwrap().healthz().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(&format!(
            "runtime API {} unreachable, reloading instead",
            sock.display()
        )),
        "{body}"
    );
    if let Some((stop, t)) = _hang {
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }
    s.confgen().assert_running();
}

#[test]
fn a_hanging_runtime_socket_falls_back_to_a_reload_within_the_timeout() {
    unreachable_socket_falls_back(true);
}

#[test]
fn a_refusing_runtime_socket_falls_back_to_a_reload() {
    unreachable_socket_falls_back(false);
}

#[test]
fn servers_applied_with_a_render_whose_check_fails_are_reverted() {
    let mut s = Setup::start_with(|hx, _| runtime_resource(hx.stats_socket(), "2s"));
    // The check fails for a file with beta's server while a marker file exists (the check and
    // the runtime apply run at the same time, so the servers are applied before the verdict).
    // Only for beta: a check that fails for every file is not blamed on an endpoint.
    let marker = s.confdir.path().join("fail-check");
    let beta_instance = instance("node-a", 2);
    let toml = s.confdir.path().join("conf.d/haproxy.toml");
    let text = read(&toml);
    let line = text
        .lines()
        .find(|l| l.starts_with("check_cmd"))
        .unwrap()
        .to_string();
    let check = line
        .trim_start_matches("check_cmd = \"")
        .trim_end_matches('"');
    s.confdir.resource(
        "haproxy",
        &text.replace(
            &line,
            &format!(
                "check_cmd = \"(test ! -e {} || ! grep -q {beta_instance} {{{{src}}}}) && {check}\"",
                marker.display()
            ),
        ),
    );
    let alpha = StaticBackend::start("alpha");
    s.reg.put_endpoint("node-a", "web", 1, alpha.port());
    s.start_confgen();
    s.wait_served_by("web", &["alpha"], Duration::from_secs(30));
    let reloads = s.reloads();

    std::fs::write(&marker, "").unwrap();
    let beta = StaticBackend::start("beta");
    s.reg.put_endpoint("node-a", "web", 2, beta.port());
    // The check fails with beta, and without it (the current file) it needs none: beta is
    // quarantined, and it was taken out of the running HAProxy again.
    s.confgen().wait_log(
        "endpoint left out of this resource",
        Duration::from_secs(20),
    );
    let file = file_servers(&s.dest());
    assert!(!read(&s.dest()).contains(&instance("node-a", 2)));
    wait_for(
        "the running servers back at the file",
        Duration::from_secs(10),
        || (running_servers(&s.haproxy, &file) == file).then_some(()),
    );
    s.wait_served_by("web", &["alpha"], Duration::from_secs(10));
    assert_eq!(s.reloads(), reloads, "{}", s.diagnostics());

    // The check passes again and beta's record changes (a quarantined endpoint is tried again
    // then): it goes through, still without a reload.
    std::fs::remove_file(&marker).unwrap();
    let (k, v) = s
        .reg
        .endpoint_meta("node-a", "web", 2, beta.port(), &[("weight", "2")]);
    s.reg.put(&k, v);
    let want: BTreeMap<String, u16> = [
        (instance("node-a", 1), alpha.port()),
        (instance("node-a", 2), beta.port()),
    ]
    .into();
    wait_converged(&s, "svc_web", &want, Duration::from_secs(20));
    s.wait_served_by("web", &["alpha", "beta"], Duration::from_secs(10));
    assert_eq!(s.reloads(), reloads, "{}", s.diagnostics());
    s.confgen().assert_running();
}
