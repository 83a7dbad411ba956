//! Helpers for presence's end-to-end tests: the presence binary as a child process, a view of
//! etcd, containers labelled for one test only, and a cuttable proxy in front of the Docker socket.
//!
//! Isolation: every test uses its own etcd, its own node name and a unique label value
//! (`flotilla.test=<label>`) on its containers, and runs presence with
//! `--label-filter flotilla.test=<label>`, so parallel tests never see each other's containers.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use flotilla_harness::docker::{busybox_image, unique_name, Container};
use flotilla_harness::{free_port, wait_for, KillOnDrop};
use flotilla_registry::{Endpoint, EtcdArgs, Keys};

/// A name unique to this test process and `tag`, usable as a node name and label value.
pub fn uniq(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

/// The presence binary under test, killed (SIGKILL) on drop.
pub struct Presence {
    pub child: KillOnDrop,
    pub log: PathBuf,
    pub metrics: SocketAddr,
    pub node: String,
}

/// Command-line arguments for one test's presence.
#[derive(Clone)]
pub struct Args {
    pub node: String,
    pub label: String,
    pub etcd: Vec<String>,
    pub ttl: &'static str,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `--advertise-ip` (default 127.0.0.1: tests publish on loopback).
    pub advertise_ip: String,
    /// Pass `--allow-loopback` (default: yes, the single-host setup these tests are).
    pub allow_loopback: bool,
}

impl Args {
    pub fn new(node: &str, label: &str, etcd: Vec<String>) -> Args {
        Args {
            node: node.into(),
            label: label.into(),
            etcd,
            ttl: "3s",
            extra: Vec::new(),
            env: Vec::new(),
            advertise_ip: "127.0.0.1".into(),
            allow_loopback: true,
        }
    }
    /// A multi-host setup: advertises `ip` and does not pass `--allow-loopback`.
    pub fn multi_host(mut self, ip: &str) -> Args {
        self.advertise_ip = ip.into();
        self.allow_loopback = false;
        self
    }
    pub fn arg(mut self, a: impl Into<String>) -> Args {
        self.extra.push(a.into());
        self
    }
    pub fn ttl(mut self, ttl: &'static str) -> Args {
        self.ttl = ttl;
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Args {
        self.env.push((k.into(), v.into()));
        self
    }
}

impl Presence {
    /// Starts presence with its log in `dir` (appended, so restarts keep history).
    pub fn start(args: &Args, dir: &Path) -> Presence {
        let log = dir.join(format!("presence-{}.log", args.node));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // ("WATCHDOG_PID", "self"): presence's own pid, as systemd sets it (through a shell
        // that execs presence, so the pid is known before it starts).
        let own_pid = args
            .env
            .iter()
            .any(|(k, v)| k == "WATCHDOG_PID" && v == "self");
        let mut cmd = if own_pid {
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
                .arg(env!("CARGO_BIN_EXE_presence"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_presence"))
        };
        cmd.arg("--node")
            .arg(&args.node)
            .arg("--advertise-ip")
            .arg(&args.advertise_ip)
            .args(args.allow_loopback.then_some("--allow-loopback"))
            .arg("--ttl")
            .arg(args.ttl)
            .arg("--etcd-endpoints")
            .arg(args.etcd.join(","))
            .arg("--label-filter")
            .arg(format!("flotilla.test={}", args.label))
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(&args.extra)
            .env("RUST_LOG", "presence=debug,info")
            .env("NO_COLOR", "1")
            .envs(
                args.env
                    .iter()
                    .filter(|(k, _)| k != "WATCHDOG_PID")
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = cmd.spawn().expect("spawn presence");
        Presence {
            child: KillOnDrop(Some(child)),
            log,
            metrics,
            node: args.node.clone(),
        }
    }

    /// The log so far, without ANSI colours.
    pub fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        strip_ansi(&raw)
    }

    /// Waits for "initial sync done" in the log (the first full sync with etcd).
    pub fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        while !self.log().contains("initial sync done") {
            if let Some(child) = self.child.0.as_ref() {
                assert!(
                    nix::sys::wait::waitpid(
                        nix::unistd::Pid::from_raw(child.id() as i32),
                        Some(nix::sys::wait::WaitPidFlag::WNOHANG)
                    )
                    .map(|s| s == nix::sys::wait::WaitStatus::StillAlive)
                    .unwrap_or(true),
                    "presence exited early; log:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "presence not ready after {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        self.child.signal(sig);
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.0.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "presence did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `/metrics` as name → value (labels kept in the name).
    /// Panics if /metrics cannot be fetched (a metric that is absent reads as 0, a failed
    /// fetch must not).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let body = (0..3)
            .find_map(|_| {
                http_get(self.metrics, "/metrics")
                    .filter(|b| b.contains("# EOF"))
                    .or_else(|| {
                        std::thread::sleep(Duration::from_millis(100));
                        None
                    })
            })
            .unwrap_or_else(|| panic!("cannot fetch /metrics; log:\n{}", self.log()));
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.metrics().get(name).copied().unwrap_or(0.0)
    }

    /// `/healthz`: (status line, body).
    pub fn healthz(&self) -> Option<(String, String)> {
        let mut s = std::net::TcpStream::connect(self.metrics).ok()?;
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.lines().next()?.to_owned();
        let body = text.split("\r\n\r\n").nth(1)?.to_owned();
        Some((status, body))
    }
}

/// The body of `GET path` from the daemon's /metrics + /healthz listener (on loopback).
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    assert!(
        addr.ip().is_loopback(),
        "tests talk to loopback only: {addr}"
    );
    flotilla_harness::haproxy::http_get_host(addr.port(), "127.0.0.1", path, Duration::from_secs(5))
        .ok()
        .map(|(_, body)| body)
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A synchronous view of etcd for assertions.
pub struct EtcdView {
    rt: tokio::runtime::Runtime,
    client: Client,
    pub keys: Keys,
}

/// One endpoint as stored, with its lease and revisions.
#[derive(Debug, Clone)]
pub struct Stored {
    pub endpoint: Endpoint,
    pub lease: i64,
    /// Revision of the put that created the key (changes only if it is deleted and created
    /// again).
    pub create_revision: i64,
    /// Revision of the last put to the key: every put bumps it, also one with the same value and
    /// lease (a rewrite keeps `create_revision` but not this).
    pub mod_revision: i64,
}

/// Every key under a prefix as etcd holds it, read in one request, with the store's revision at
/// that moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The header revision: it moves with every write anywhere in the store.
    pub revision: i64,
    pub keys: BTreeMap<String, KeyState>,
}

/// One key's metadata in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    pub create_revision: i64,
    pub mod_revision: i64,
    /// Puts since creation.
    pub version: i64,
    pub lease: i64,
}

impl EtcdView {
    pub fn plain(endpoints: Vec<String>) -> EtcdView {
        EtcdView::connect(EtcdArgs {
            endpoints,
            ..EtcdArgs::default()
        })
    }

    pub fn connect(args: EtcdArgs) -> EtcdView {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let keys = args.keys().unwrap();
        let client = wait_for("etcd view connects", Duration::from_secs(30), || {
            rt.block_on(args.connect()).ok()
        });
        EtcdView { rt, client, keys }
    }

    /// Every endpoint of `node` by instance (each validated by the registry's decoder).
    pub fn endpoints(&self, node: &str) -> Result<BTreeMap<String, Stored>, String> {
        let mut c = self.client.clone();
        let prefix = self.keys.endpoints_of(node);
        let resp = self
            .rt
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(3),
                    c.get(prefix, Some(GetOptions::new().with_prefix())),
                )
                .await
            })
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let mut out = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let ep = Endpoint::decode(&self.keys, &key, kv.value())
                .unwrap_or_else(|e| panic!("presence wrote an invalid record: {e}"));
            assert!(
                out.insert(
                    ep.instance.clone(),
                    Stored {
                        endpoint: ep,
                        lease: kv.lease(),
                        create_revision: kv.create_revision(),
                        mod_revision: kv.mod_revision(),
                    }
                )
                .is_none(),
                "duplicate instance"
            );
        }
        Ok(out)
    }

    /// The instances of `node`, or `None` while etcd does not answer.
    pub fn instances(&self, node: &str) -> Option<BTreeSet<String>> {
        self.endpoints(node).ok().map(|m| m.into_keys().collect())
    }

    /// Revokes lease `id` (as an operator's `etcdctl lease revoke` would).
    pub fn revoke(&self, id: i64) {
        let mut c = self.client.clone();
        self.rt
            .block_on(async { c.lease_revoke(id).await })
            .expect("lease revoke");
    }

    /// Value and lease of one key.
    pub fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, String> {
        let mut c = self.client.clone();
        let key = key.to_owned();
        let resp = self
            .rt
            .block_on(async { c.get(key, None).await })
            .map_err(|e| e.to_string())?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.lease())))
    }

    /// Every key under `prefix` and the store's revision, from one read (so they agree).
    pub fn snapshot(&self, prefix: &str) -> Snapshot {
        let mut c = self.client.clone();
        let prefix = prefix.to_owned();
        let resp = self
            .rt
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(3),
                    c.get(prefix, Some(GetOptions::new().with_prefix())),
                )
                .await
            })
            .expect("snapshot: etcd did not answer within 3 s")
            .expect("snapshot");
        Snapshot {
            revision: resp.header().expect("header").revision(),
            keys: resp
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        KeyState {
                            create_revision: kv.create_revision(),
                            mod_revision: kv.mod_revision(),
                            version: kv.version(),
                            lease: kv.lease(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let mut c = self.client.clone();
        let resp = self
            .rt
            .block_on(async { c.get("/", Some(GetOptions::new().with_count_only())).await })
            .expect("revision");
        resp.header().expect("header").revision()
    }

    /// The revisions in `from..=to` at which `key` existed (etcd keeps every revision here:
    /// nothing compacts the test etcd).
    pub fn revisions_with_key(&self, key: &str, from: i64, to: i64) -> Vec<i64> {
        let mut out = Vec::new();
        for rev in from..=to {
            let mut c = self.client.clone();
            let key = key.to_owned();
            let resp = self
                .rt
                .block_on(async {
                    c.get(
                        key,
                        Some(GetOptions::new().with_revision(rev).with_count_only()),
                    )
                    .await
                })
                .expect("get at revision");
            if resp.count() > 0 {
                out.push(rev);
            }
        }
        out
    }

    /// Remaining TTL of a lease (-1 when it does not exist).
    pub fn lease_ttl(&self, id: i64) -> i64 {
        let mut c = self.client.clone();
        self.rt
            .block_on(async { c.lease_time_to_live(id, None).await })
            .map(|r| r.ttl())
            .unwrap_or(-1)
    }
}

/// One sample of etcd's own `/metrics` (on the client URL `endpoint`, plain http), e.g.
/// `etcd_debugging_lease_renewed_total`: lease renewals the leader accepted. Panics if the page
/// cannot be read or has no such sample.
pub fn etcd_metric(endpoint: &str, name: &str) -> f64 {
    let addr: SocketAddr = endpoint
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("etcd_metric needs http://IP:PORT, not {endpoint}"));
    // HTTP/1.0: the answer is not chunked, so every line arrives whole.
    let fetch = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    };
    let text = fetch().unwrap_or_else(|e| panic!("GET {endpoint}/metrics: {e}"));
    text.lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("etcd's /metrics has no {name}"))
}

/// Waits until the instances of `node` are exactly `want`; returns how long it took.
pub fn wait_instances(view: &EtcdView, node: &str, want: &[String], timeout: Duration) -> Duration {
    let want: BTreeSet<String> = want.iter().cloned().collect();
    let start = Instant::now();
    let mut last = None;
    let deadline = start + timeout;
    loop {
        let got = view.instances(node);
        if got.as_ref() == Some(&want) {
            return start.elapsed();
        }
        last = got.or(last);
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?}: node {node} has {last:?}, want {want:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An IPv4 address of this host that is neither loopback nor link-local (what a real host
/// advertises), from `ip -4 -o addr show scope global`.
pub fn host_ip() -> String {
    let out = flotilla_harness::run(
        Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]),
    )
    .expect("ip addr");
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .find(|ip| {
            ip.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| !a.is_loopback() && !a.is_link_local())
        })
        .unwrap_or_else(|| panic!("this host has no global IPv4 address:\n{out}"))
        .to_owned()
}

/// The instance id presence gives a container's private port.
pub fn instance(node: &str, c: &Container, port: u16) -> String {
    format!("{node}-{}-{port}", c.short_id())
}

/// `httpd` on 8080 published on 127.0.0.1, labelled for this test, with `labels` (KEY=VALUE)
/// and extra `docker run` options.
pub fn web(tag: &str, label: &str, labels: &[&str], extra: &[&str]) -> Container {
    let image = busybox_image();
    let name = unique_name(tag);
    let test_label = format!("flotilla.test={label}");
    let mut args: Vec<&str> = vec!["-l", &test_label, "-p", "127.0.0.1::8080"];
    for l in labels {
        args.push("-l");
        args.push(l);
    }
    args.extend_from_slice(extra);
    args.extend_from_slice(&[image, "httpd", "-f", "-p", "8080"]);
    Container::run(&name, &args)
}

/// Like [`web`], but the shell traps SIGTERM and takes `drain_secs` to exit, as a server
/// draining its connections would.
pub fn draining_web(tag: &str, label: &str, service: &str, drain_secs: u32) -> Container {
    let image = busybox_image();
    let name = unique_name(tag);
    let test_label = format!("flotilla.test={label}");
    let service_label = format!("flotilla.service={service}");
    let script = format!("trap 'sleep {drain_secs}; exit 0' TERM; httpd -f -p 8080 & wait");
    Container::run(
        &name,
        &[
            "-l",
            &test_label,
            "-l",
            &service_label,
            "-p",
            "127.0.0.1::8080",
            image,
            "sh",
            "-c",
            &script,
        ],
    )
}

/// A Unix-socket proxy in front of the Docker socket whose connections can be cut, to end
/// presence's event stream without touching the shared Docker engine.
pub struct DockerProxy {
    pub path: PathBuf,
    refusing: Arc<AtomicBool>,
    wedged: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl DockerProxy {
    pub fn start(dir: &Path) -> DockerProxy {
        let path = dir.join("docker-proxy.sock");
        let listener = UnixListener::bind(&path).expect("bind proxy socket");
        listener.set_nonblocking(true).unwrap();
        let refusing = Arc::new(AtomicBool::new(false));
        let wedged = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let (r, w, s, c) = (
            refusing.clone(),
            wedged.clone(),
            stop.clone(),
            conns.clone(),
        );
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if r.load(Ordering::SeqCst) {
                            drop(client);
                            continue;
                        }
                        if w.load(Ordering::SeqCst) {
                            // Accepted and held open, never answered.
                            c.lock().unwrap().push(client);
                            continue;
                        }
                        client.set_nonblocking(false).unwrap();
                        let Ok(upstream) = UnixStream::connect("/var/run/docker.sock") else {
                            continue;
                        };
                        {
                            let mut list = c.lock().unwrap();
                            list.push(client.try_clone().unwrap());
                            list.push(upstream.try_clone().unwrap());
                        }
                        pipe(
                            client.try_clone().unwrap(),
                            upstream.try_clone().unwrap(),
                            w.clone(),
                        );
                        pipe(upstream, client, w.clone());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        DockerProxy {
            path,
            refusing,
            wedged,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    /// `unix://…` for `--docker-host`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Closes every open connection (ending the event stream) and refuses new ones.
    pub fn cut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A wedged engine: new connections are accepted and never answered, and open ones stay
    /// open and silent (requests on them are swallowed).
    pub fn wedge(&self) {
        self.wedged.store(true, Ordering::SeqCst);
    }

    /// Accepts (and forwards) connections again.
    pub fn restore(&self) {
        self.refusing.store(false, Ordering::SeqCst);
        self.wedged.store(false, Ordering::SeqCst);
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Forwards `from` to `to`; while `wedged`, what arrives is swallowed (a request on an open
/// connection is never answered, the event stream goes silent).
fn pipe(mut from: UnixStream, mut to: UnixStream, wedged: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) if wedged.load(Ordering::SeqCst) => {}
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// `docker <args>` and its stdout.
pub fn docker(args: &[&str]) -> String {
    flotilla_harness::run(Command::new("docker").args(args))
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

/// A second Docker engine for this test only: its own socket, data root and exec root, inside
/// its own network namespace (entered with `nsenter --net=/var/run/netns/NAME`; `ip netns exec`
/// would remount /sys and hide the cgroups dockerd needs, and a second dockerd in the host
/// namespace would delete the shared engine's docker0). It can be stopped and restarted without
/// touching the shared engine. It runs with `--live-restore`, so its containers keep running
/// while it is down, and on its return it restarts those with a restart policy that died
/// meanwhile. On drop: its containers are removed, the daemon, its containerd and shims are
/// stopped, its mounts are unmounted, and the directory and namespace are deleted.
pub struct SecondDockerd {
    pub root: PathBuf,
    netns: String,
    proc: Option<std::process::Child>,
}

impl SecondDockerd {
    pub fn start(tag: &str) -> SecondDockerd {
        let require = flotilla_harness::require;
        require("dockerd", "docker.io");
        require("nsenter", "util-linux");
        let ip = require("ip", "iproute2");
        let name = format!("flt-{}-{tag}", std::process::id());
        // On the same file system as /var/lib/docker (overlay2 needs a real one, not overlayfs).
        let root = PathBuf::from(format!("/var/lib/flotilla-test-dockerd-{name}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("second dockerd root");
        let _ = Command::new(&ip).args(["netns", "del", &name]).output();
        flotilla_harness::run(Command::new(&ip).args(["netns", "add", &name]))
            .expect("ip netns add");
        let mut d = SecondDockerd {
            root,
            netns: name,
            proc: None,
        };
        d.nsenter(&[ip.to_str().unwrap(), "link", "set", "lo", "up"]);
        d.launch();
        // The test image, copied from the shared engine (nothing is pulled).
        let image = busybox_image();
        flotilla_harness::run(Command::new("sh").arg("-c").arg(format!(
            "docker save {image} | docker -H {} load -q",
            d.url()
        )))
        .unwrap_or_else(|e| {
            panic!(
                "loading {image} into the second dockerd: {e}\n{}",
                d.log_tail()
            )
        });
        d
    }

    fn nsenter(&self, args: &[&str]) {
        flotilla_harness::run(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", self.netns))
                .args(args),
        )
        .unwrap_or_else(|e| panic!("nsenter {args:?}: {e}"));
    }

    /// `unix://…/docker.sock`, for `--docker-host` and `docker -H`.
    pub fn url(&self) -> String {
        format!("unix://{}/docker.sock", self.root.display())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn launch(&mut self) {
        if let Err(e) = self.try_launch() {
            panic!("{e}");
        }
    }

    fn try_launch(&mut self) -> Result<(), String> {
        if self.proc.is_some() {
            return Err("the second dockerd is already running".into());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("dockerd.log"))
            .map_err(|e| format!("dockerd log: {e}"))?;
        let r = self.root.display().to_string();
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg("dockerd")
            .arg(format!("--host={}", self.url()))
            .arg(format!("--data-root={r}/data"))
            .arg(format!("--exec-root={r}/exec"))
            .arg(format!("--pidfile={r}/docker.pid"))
            .args(["--live-restore", "--iptables=false", "--ip6tables=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn the second dockerd: {e}"))?;
        self.proc = Some(child);
        let url = self.url();
        let start = Instant::now();
        loop {
            if let Some(st) = self.proc.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.proc = None;
                return Err(format!(
                    "the second dockerd exited ({st}):\n{}",
                    self.log_tail()
                ));
            }
            let up = Command::new("docker")
                .args(["-H", &url, "version", "-f", "{{.Server.APIVersion}}"])
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the second dockerd does not answer after 60 s:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `docker -H <this engine> ARGS…`.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        flotilla_harness::run(Command::new("docker").arg("-H").arg(self.url()).args(args))
            .map(|s| s.trim().to_owned())
    }

    /// Stops the daemon (SIGTERM) and waits for it to exit; containers keep running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.proc.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the daemon again with the same data; waits until it answers.
    pub fn restart(&mut self) {
        self.launch();
    }

    /// Processes whose command line names this daemon's directory (its containerd and shims).
    fn own_processes(&self) -> Vec<i32> {
        let needle = self.root.display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for SecondDockerd {
    fn drop(&mut self) {
        if self.proc.is_none() {
            // Its containers kept running while it was down: start it to remove them.
            let _ = self.try_launch();
        }
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        self.stop();
        // Its containerd and shims (started by it, found by its directory), if any remain.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.own_processes();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline + Duration::from_secs(5) {
                break;
            }
            let sig = if Instant::now() > deadline {
                nix::sys::signal::Signal::SIGKILL
            } else {
                nix::sys::signal::Signal::SIGTERM
            };
            for pid in left {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // dockerd bind-mounts its data root and leaves mounts behind: unmount, deepest first.
        let prefix = format!("{}/", self.root.display());
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| p.starts_with(&prefix) || *p == self.root.to_str().unwrap_or_default())
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(p).output();
        }
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}
