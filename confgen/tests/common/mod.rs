//! Shared pieces of confgen's integration tests: a confdir in a temp dir, the confgen binary as
//! a daemon (killed on drop) or a one-shot command, endpoint records written to a real etcd
//! through `flotilla_registry`'s encoding, and small HTTP helpers.
#![allow(dead_code)]

pub mod setup;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla_harness::etcd::Etcd;
use flotilla_harness::{free_port, KillOnDrop};
use flotilla_registry::{Endpoint, Health, Keys, Proto};

/// The confgen binary under test.
pub fn confgen_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_confgen"))
}

/// Another workspace binary from the same target dir (`target/debug/<name>`).
pub fn workspace_bin(name: &str) -> PathBuf {
    // target/debug/deps/<test> -> target/debug/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --bins`, as scripts/test \
         does)",
        path.display()
    );
    path
}

/// The repository root (the workspace).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// A confdir (`conf.d/`, `templates/`) plus an `out/` directory for destinations, in a temp dir
/// removed on drop.
pub struct Confdir {
    pub dir: tempfile::TempDir,
}

impl Confdir {
    pub fn new() -> Confdir {
        let dir = tempfile::Builder::new()
            .prefix("confgen-it-")
            .tempdir()
            .expect("tempdir");
        for sub in ["conf.d", "templates", "out"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        Confdir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `out/<name>`.
    pub fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name)
    }

    pub fn template_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("templates").join(name)
    }

    /// Writes `templates/<name>` atomically (as an editor that saves by rename does).
    pub fn template(&self, name: &str, text: &str) {
        write_atomic(&self.template_path(name), text.as_bytes());
    }

    /// Copies every shipped `templates/templates/haproxy*.tmpl` (main template and fragments).
    pub fn shipped_haproxy_templates(&self) {
        for f in std::fs::read_dir(repo().join("templates/templates")).expect("templates dir") {
            let f = f.expect("dir entry").path();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("haproxy") {
                std::fs::copy(&f, self.template_path(&name)).expect("copy shipped template");
            }
        }
    }

    /// Writes `conf.d/<name>.toml`.
    pub fn resource(&self, name: &str, toml: &str) {
        write_atomic(
            &self.dir.path().join("conf.d").join(format!("{name}.toml")),
            toml.as_bytes(),
        );
    }
}

/// Replaces `path` by a rename of a file written beside it.
pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let staged = path.with_extension("it-staged");
    std::fs::write(&staged, bytes).expect("write staged");
    std::fs::rename(&staged, path).expect("rename staged");
}

/// (inode, mtime in ns) of a file: tells whether it was replaced or rewritten.
pub fn identity(path: &Path) -> Option<(u64, i128)> {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    ))
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Lines of a reload log (one line per reload the `reload_cmd` ran).
pub fn count_lines(path: &Path) -> usize {
    read(path).lines().count()
}

/// `haproxy -c` on a file: Ok or HAProxy's complaint.
pub fn haproxy_check(path: &Path) -> Result<(), String> {
    let haproxy = flotilla_harness::require("haproxy", "haproxy");
    let out = Command::new(haproxy)
        .args(["-c", "-q", "-f"])
        .arg(path)
        .output()
        .expect("run haproxy -c");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `confgen run --confdir … --etcd-endpoints … --metrics-addr …` as a daemon; SIGKILLed on drop.
pub struct Confgen {
    pub proc: KillOnDrop,
    pub log: PathBuf,
    pub metrics_port: u16,
}

impl Confgen {
    /// Starts `confgen run` with `extra` flags, logging (RUST_LOG=debug for confgen) to
    /// `<confdir>/confgen.log` (appended, so restarts keep one log).
    pub fn start(confdir: &Confdir, etcd: &str, extra: &[&str]) -> Confgen {
        Confgen::start_with_env(confdir, etcd, extra, &[])
    }

    /// Like [`Confgen::start`], with extra environment variables.
    pub fn start_with_env(
        confdir: &Confdir,
        etcd: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Confgen {
        let log = confdir.path().join("confgen.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let metrics_port = free_port();
        // ("WATCHDOG_PID", "self"): the pid of confgen itself, as systemd sets it (through a
        // shell that execs confgen, so the pid is known before it starts).
        let own_pid = env.contains(&("WATCHDOG_PID", "self"));
        let mut cmd = if own_pid {
            let mut c = clean_env(Command::new("/bin/sh"));
            c.arg("-c")
                .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
                .arg(confgen_bin());
            c
        } else {
            clean_env(Command::new(confgen_bin()))
        };
        let env = env.iter().filter(|(k, _)| *k != "WATCHDOG_PID");
        // Every test endpoint is on 127.0.0.1 (one machine plays every node): loopback
        // addresses are allowed unless a test says otherwise (FLOTILLA_ALLOW_LOOPBACK=false).
        cmd.env("FLOTILLA_ALLOW_LOOPBACK", "true");
        let child = cmd
            .arg("run")
            .arg("--confdir")
            .arg(confdir.path())
            .arg("--etcd-endpoints")
            .arg(etcd)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .args(extra)
            .env("RUST_LOG", "info,confgen=debug")
            .envs(env.copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("start confgen");
        Confgen {
            proc: KillOnDrop(Some(child)),
            log,
            metrics_port,
        }
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        self.proc.signal(sig);
    }

    /// Waits (polling, up to `timeout`) for confgen to exit; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.proc.0.as_mut().expect("confgen was started");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "confgen still running after {timeout:?}; log tail:\n{}",
                tail(&read(&self.log), 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails with the log if confgen has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.proc.0.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("confgen exited ({status}); its log:\n{}", self.log());
            }
        }
    }

    /// Polls until the log contains `needle`; returns the log.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Polls until the log contains `needle` at least `n` times; returns the log.
    pub fn wait_log_count(&mut self, needle: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n {
                return log;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "confgen did not log {needle:?} ({n}×) within {timeout:?}; log tail:\n{}",
                tail(&log, 40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /metrics` (OpenMetrics text); retries for up to 10 s while it does not answer.
    pub fn metrics(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = http_get(
                self.metrics_port,
                "127.0.0.1",
                "/metrics",
                Duration::from_secs(2),
            );
            match got {
                Ok((200, body)) if body.contains("# EOF") => return body,
                other if Instant::now() > deadline => {
                    panic!("GET /metrics on 127.0.0.1:{}: {other:?}", self.metrics_port)
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// `GET /healthz`: (status, body).
    pub fn healthz(&self) -> std::io::Result<(u16, String)> {
        let r = http_get(
            self.metrics_port,
            "127.0.0.1",
            "/healthz",
            Duration::from_secs(2),
        );
        if let Err(e) = &r {
            eprintln!("GET /healthz on 127.0.0.1:{}: {e}", self.metrics_port);
        }
        r
    }

    /// Sum of the samples of metric `name` whose labels contain every `labels` pair.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics(), name, labels)
    }
}

/// Sum of the samples of `name` in an OpenMetrics text whose labels contain every pair.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A command without inherited `FLOTILLA_*` settings, so the developer's environment cannot
/// change what a test runs.
pub fn clean_env(mut cmd: Command) -> Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLOTILLA_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs `confgen args…` to completion (30 s at most; then it is killed and the test fails).
/// Output is read while it runs, so a large stdout cannot fill the pipe and block it.
pub fn confgen(args: &[&str]) -> Output {
    let child = clean_env(Command::new(confgen_bin()))
        .args(args)
        .env("RUST_LOG", "info")
        // As for the daemon: test endpoints are all on 127.0.0.1.
        .env("FLOTILLA_ALLOW_LOOPBACK", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run confgen");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("confgen output"),
        Err(_) => {
            // Not reaped yet (the waiting thread owns it), so the pid is still ours.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let out = rx.recv().expect("confgen output").expect("confgen output");
            panic!(
                "confgen {args:?} did not finish within 30 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Writes records to a real etcd through `flotilla_registry`'s encoding. As presence does, a
/// node record is written before the first endpoint of each node (confgen routes only
/// endpoints whose node has a live record).
pub struct Registry {
    rt: tokio::runtime::Runtime,
    client: etcd_client::Client,
    pub keys: Keys,
    nodes: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Registry {
    pub fn connect(etcd: &Etcd) -> Registry {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = rt
            .block_on(etcd_client::Client::connect([etcd.endpoint()], None))
            .expect("connect to etcd");
        Registry {
            rt,
            client,
            keys: Keys::new("/flotilla").unwrap(),
            nodes: Default::default(),
        }
    }

    /// Connects with `args` (TLS, user and password: the RBAC tests).
    pub fn connect_with(args: &flotilla_registry::EtcdArgs) -> Registry {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = rt
            .block_on(args.connect())
            .unwrap_or_else(|e| panic!("connect to etcd as {:?}: {e}", args.user));
        Registry {
            rt,
            client,
            keys: Keys::new("/flotilla").unwrap(),
            nodes: Default::default(),
        }
    }

    /// Puts `key`, returning etcd's error instead of failing.
    pub fn try_put(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<(), String> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.put(key, value.into(), None))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The node record of `node` (as presence writes it).
    pub fn node_record(&self, node: &str) -> (String, Vec<u8>) {
        let n = flotilla_registry::Node {
            node: node.into(),
            version: "0.1.0".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            advertise_ip: "127.0.0.1".parse().unwrap(),
            labels: Default::default(),
        };
        (
            self.keys.node(node),
            n.encode(&self.keys).expect("valid node"),
        )
    }

    /// Writes the node record of every node of `keys` not written yet by this helper.
    fn ensure_nodes<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let mut todo = Vec::new();
        for k in keys {
            if let Some(flotilla_registry::KeyKind::Endpoint { node, .. }) = self.keys.parse(k) {
                if self.nodes.borrow_mut().insert(node.to_owned()) {
                    todo.push(self.node_record(node));
                }
            }
        }
        for (k, v) in todo {
            let mut c = self.client.clone();
            self.rt
                .block_on(c.put(k.clone(), v, None))
                .unwrap_or_else(|e| panic!("put {k}: {e}"));
        }
    }

    /// Endpoint `n` of `service` on `node` at 127.0.0.1:`port`; the same arguments always give
    /// the same record (and the same bytes).
    pub fn endpoint(&self, node: &str, service: &str, n: u32, port: u16) -> (String, Vec<u8>) {
        self.endpoint_meta(node, service, n, port, &[])
    }

    /// Like [`Registry::endpoint`], with `meta` entries.
    pub fn endpoint_meta(
        &self,
        node: &str,
        service: &str,
        n: u32,
        port: u16,
        meta: &[(&str, &str)],
    ) -> (String, Vec<u8>) {
        let container = format!("{:012x}", 0xc0ffee000000u64 + u64::from(n));
        let ep = Endpoint {
            service: service.into(),
            instance: format!("{node}-{container}-8080"),
            node: node.into(),
            host: "127.0.0.1".into(),
            port,
            proto: Proto::Tcp,
            container,
            image: "flotilla/test:1".into(),
            tags: vec![],
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            health: Health::None,
            registered_at: "2026-01-01T00:00:00Z".into(),
        };
        (
            ep.key(&self.keys),
            ep.encode(&self.keys).expect("valid record"),
        )
    }

    /// Puts `key` as given, without writing a node record first.
    pub fn put_raw(&self, key: &str, value: impl Into<Vec<u8>>) {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.put(key, value.into(), None))
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    pub fn put(&self, key: &str, value: impl Into<Vec<u8>>) {
        self.ensure_nodes([key]);
        let mut c = self.client.clone();
        self.rt
            .block_on(c.put(key, value.into(), None))
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    /// Puts endpoint `n` of `service` and returns its key.
    pub fn put_endpoint(&self, node: &str, service: &str, n: u32, port: u16) -> String {
        let (k, v) = self.endpoint(node, service, n, port);
        self.put(&k, v);
        k
    }

    pub fn delete(&self, key: &str) {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.delete(key, None))
            .unwrap_or_else(|e| panic!("delete {key}: {e}"));
    }

    /// Deletes `keys` in one transaction (one revision: "at once").
    pub fn delete_at_once(&self, keys: &[String]) {
        let ops: Vec<etcd_client::TxnOp> = keys
            .iter()
            .map(|k| etcd_client::TxnOp::delete(k.as_str(), None))
            .collect();
        let mut c = self.client.clone();
        self.rt
            .block_on(c.txn(etcd_client::Txn::new().and_then(ops)))
            .expect("delete txn");
    }

    /// Puts every pair in one transaction (one revision: "at once").
    pub fn put_at_once(&self, kvs: &[(&str, &str)]) {
        self.ensure_nodes(kvs.iter().map(|(k, _)| *k));
        let ops: Vec<etcd_client::TxnOp> = kvs
            .iter()
            .map(|(k, v)| etcd_client::TxnOp::put(*k, *v, None))
            .collect();
        let mut c = self.client.clone();
        self.rt
            .block_on(c.txn(etcd_client::Txn::new().and_then(ops)))
            .expect("put txn");
    }

    /// Puts every pair as its own request (its own revision), `parallel` in flight at a time.
    pub fn put_each(&self, kvs: Vec<(String, Vec<u8>)>, parallel: usize) {
        self.ensure_nodes(kvs.iter().map(|(k, _)| k.as_str()));
        let client = self.client.clone();
        self.rt.block_on(async move {
            use futures::StreamExt;
            futures::stream::iter(kvs)
                .map(|(k, v)| {
                    let mut c = client.clone();
                    async move { c.put(k.clone(), v, None).await.map_err(|e| (k, e)) }
                })
                .buffer_unordered(parallel)
                .for_each(|r| async move {
                    if let Err((k, e)) = r {
                        panic!("put {k}: {e}");
                    }
                })
                .await;
        });
    }

    /// The current revision of the store.
    pub fn revision(&self) -> i64 {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.get("/flotilla/", None))
            .expect("get")
            .header()
            .map(|h| h.revision())
            .unwrap_or(0)
    }
}

/// `GET path` to 127.0.0.1:port with a Host header and `Connection: close`: (status, body).
pub use flotilla_harness::haproxy::http_get_host as http_get;
