//! Simulated hosts: a fleet of network namespaces, each a host with its own dockerd, presence,
//! confgen and HAProxy, and a 3-member etcd cluster whose members live in namespaces of their
//! own, all wired to one virtual switch ([`crate::netns`]), so faults can be cut between them.
//!
//! ```text
//!   etcd m0 10.99.0.1   etcd m1 10.99.0.2   etcd m2 10.99.0.3        client 10.99.0.250
//!        │ e0                │ e1                │ e2                   │ cl   (the test's
//!   ─────┴───────────────────┴──── br0 (switch namespace) ──────────────┴───── requests)
//!        │ h0                │ h1                │ h2
//!   host-0 10.99.0.11   host-1 10.99.0.12   host-2 10.99.0.13
//!   dockerd (own socket, data-root, exec-root), presence --advertise-ip = the host's IP,
//!   confgen --node host-N with the shipped HAProxy template, HAProxy master-worker on :80
//! ```
//!
//! Every host's confgen renders the shipped `haproxy.cfg.tmpl` with the shipped resource
//! settings (`wait = "20ms:1s"`, `max_drop = "50%"`, `check_cmd = haproxy -c`, reload through
//! `proxyctl reload`), only `dest` and the sockets moved into the host's directory. The template's
//! settings are etcd keys shared by every host: `http_bind` is `:80` (each host has its own
//! port space) and `stats_socket` is the relative `unix@admin.sock`, which each HAProxy creates in its
//! own working directory (the host's directory).
//!
//! Faults: [`Fleet::cut_from_etcd`] (iptables in the host's namespace drops everything to and
//! from the etcd members), [`Fleet::unplug`] (the host's switch port down: a dead host, as far
//! as the network can tell), [`Fleet::kill_etcd`] / [`Fleet::restart_etcd`],
//! [`Host::kill_presence`] / [`Host::kill_confgen`] (SIGKILL) and their restarts,
//! [`Host::restart_dockerd`], and [`Host::fill_dest_disk`] (confgen's destination directory is a
//! small tmpfs, see [`HostSpec::dest_tmpfs`]).
//!
//! Traffic only flows between the fleet's own namespaces: nothing is added to the machine's
//! network namespace, and the test reaches the hosts from a thread inside the client namespace.
//! Drop stops everything: containers (`docker rm -f`), every daemon, dockerd's containerd and
//! shims, mounts, dockerd's directory, the namespaces (with any process left in them) and the
//! temp dir — also when the test panics. Leftovers of a test process killed outright are swept
//! by the next fleet ([`crate::netns::sweep_stale`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{self, Netns, Switch};
use crate::{require, run, wait_for, KillOnDrop};

/// dockerd data roots are `/var/lib/flotilla-hosts-<netns name>` (overlay2 needs a real file
/// system, not tmpfs or overlayfs).
pub const DOCKERD_ROOT_PREFIX: &str = "flotilla-hosts-";

/// The etcd prefix every daemon of a fleet uses.
pub const PREFIX: &str = "/flotilla";

/// HAProxy's HTTP port on every host.
pub const HTTP_PORT: u16 = 80;

/// Address of etcd member `i`.
pub fn etcd_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 1 + i as u8)
}

/// Address of host `i`.
pub fn host_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 11 + i as u8)
}

/// Address of the client namespace (the test's own requests and etcdctl).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 250);

/// Node name of host `i`, as given to presence and confgen (`--node`).
pub fn node_name(i: usize) -> String {
    format!("host-{i}")
}

/// The project's binaries and shipped templates the fleet runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `presence`.
    pub presence: PathBuf,
    /// `confgen`.
    pub confgen: PathBuf,
    /// `proxyctl` (confgen's reload command).
    pub proxyctl: PathBuf,
    /// The repository's `templates/templates` (the shipped HAProxy template and its fragments).
    pub templates: PathBuf,
}

/// What runs on one simulated host.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Its own dockerd and presence (`None`: neither; a proxy-only host).
    pub docker: Option<DockerSpec>,
    /// HAProxy, with confgen checking (`haproxy -c`) and reloading it (`proxyctl reload`).
    /// Without it, confgen renders the HAProxy template to its destination with no check and no
    /// reload (for simulations where only confgen's output is measured).
    pub haproxy: bool,
    /// confgen (with the shipped HAProxy resource).
    pub confgen: bool,
    /// Mount a tmpfs of this many bytes on confgen's destination directory.
    pub dest_tmpfs: Option<u64>,
}

/// A host's dockerd.
#[derive(Debug, Clone)]
pub struct DockerSpec {
    /// `--live-restore`: containers keep running while dockerd is down.
    pub live_restore: bool,
}

impl HostSpec {
    /// dockerd (live-restore on), presence, confgen and HAProxy.
    pub fn full() -> HostSpec {
        HostSpec {
            docker: Some(DockerSpec { live_restore: true }),
            haproxy: true,
            confgen: true,
            dest_tmpfs: None,
        }
    }

    /// Only confgen, rendering without check or reload (a simulated proxy host).
    pub fn confgen_only() -> HostSpec {
        HostSpec {
            docker: None,
            haproxy: false,
            confgen: true,
            dest_tmpfs: None,
        }
    }

    /// Sets dockerd's `--live-restore`.
    pub fn live_restore(mut self, on: bool) -> HostSpec {
        if let Some(d) = self.docker.as_mut() {
            d.live_restore = on;
        }
        self
    }

    /// Puts confgen's destination on a tmpfs of `bytes`.
    pub fn dest_tmpfs(mut self, bytes: u64) -> HostSpec {
        self.dest_tmpfs = Some(bytes);
        self
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// The binaries under test.
    pub bins: Binaries,
    /// etcd members (each in its own namespace).
    pub etcd_members: usize,
    /// The hosts.
    pub hosts: Vec<HostSpec>,
    /// presence `--ttl`.
    pub ttl: Duration,
    /// `RUST_LOG` of the daemons.
    pub rust_log: String,
}

impl FleetSpec {
    /// `n` full hosts, 3 etcd members, TTL 3 s.
    pub fn new(bins: Binaries, n: usize) -> FleetSpec {
        FleetSpec {
            bins,
            etcd_members: 3,
            hosts: vec![HostSpec::full(); n],
            ttl: Duration::from_secs(3),
            rust_log: "info".into(),
        }
    }
}

/// A process started in a namespace, its output appended to a log file; SIGKILLed on drop.
#[derive(Debug)]
pub struct NsProcess {
    name: String,
    proc: KillOnDrop,
    log: PathBuf,
}

impl NsProcess {
    fn start(name: &str, mut cmd: Command, log: &Path) -> NsProcess {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        NsProcess {
            name: name.into(),
            proc: KillOnDrop(Some(child)),
            log: log.to_owned(),
        }
    }

    /// The process's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Whether it is still running (not exited, not killed).
    pub fn running(&mut self) -> bool {
        match self.proc.0.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        self.proc.signal(sig);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM, then SIGKILL after `grace`; reaped either way.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.proc.0.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, named.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "--- {} ({})\n{}",
            self.name,
            self.log.display(),
            tail(&self.log(), n)
        )
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One etcd member in its own namespace.
#[derive(Debug)]
pub struct EtcdMember {
    /// `m0`, `m1`, …
    pub name: String,
    /// Its address (client port 2379, peer port 2380).
    pub ip: Ipv4Addr,
    proc: Option<NsProcess>,
    data: PathBuf,
    log: PathBuf,
    initial_cluster: String,
    token: String,
    started_once: bool,
    ns: Netns,
}

impl EtcdMember {
    /// `http://IP:2379`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:2379", self.ip)
    }

    /// Whether its process runs.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(NsProcess::running)
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(NsProcess::pid)
    }

    fn launch(&mut self) {
        assert!(self.proc.is_none(), "etcd {} already runs", self.name);
        let mut cmd = self.ns.command(require("etcd", "etcd-server"));
        let client = self.endpoint();
        let peer = format!("http://{}:2380", self.ip);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg(if self.started_once { "existing" } else { "new" })
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .env("ETCD_UNSUPPORTED_ARCH", "");
        self.proc = Some(NsProcess::start(
            &format!("etcd {}", self.name),
            cmd,
            &self.log,
        ));
        self.started_once = true;
    }

    /// The last lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "--- etcd {}\n{}",
            self.name,
            tail(&fs::read_to_string(&self.log).unwrap_or_default(), n)
        )
    }
}

/// A container started on a host's dockerd.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Web {
    /// Index of its host.
    pub host: usize,
    /// Container name.
    pub name: String,
    /// Full container id.
    pub id: String,
    /// The instance id presence gives its port 8080 (`host-N-<id12>-8080`), which is also its
    /// HAProxy server name.
    pub instance: String,
}

/// A host's own Docker engine in the host's namespace: containerd as a service of its own and
/// dockerd on it (`--containerd`, as Debian's docker.service runs it), each with its own socket,
/// state and data directories under one root. Because containerd is not dockerd's child, dockerd
/// can be killed (`kill -9`) and started again while containerd and the containers go on.
#[derive(Debug)]
pub struct Dockerd {
    root: PathBuf,
    live_restore: bool,
    proc: Option<NsProcess>,
    containerd: Option<NsProcess>,
}

impl Dockerd {
    /// `unix://ROOT/docker.sock`.
    pub fn url(&self) -> String {
        format!("unix://{}/docker.sock", self.root.display())
    }

    /// `docker -H <this engine> args…`, trimmed stdout.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(require("docker", "docker.io"))
            .arg("-H")
            .arg(self.url())
            .args(args))
        .map(|s| s.trim().to_owned())
    }

    fn containerd_socket(&self) -> PathBuf {
        self.root.join("containerd/containerd.sock")
    }

    fn launch_containerd(&mut self, ns: &Netns) {
        let r = self.root.display().to_string();
        let config = self.root.join("containerd.toml");
        fs::create_dir_all(self.root.join("containerd")).expect("containerd dir");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{r}/containerd-root\"\nstate = \"{r}/containerd/state\"\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                sock = self.containerd_socket().display()
            ),
        )
        .expect("containerd config");
        let mut cmd = ns.command(require("containerd", "containerd"));
        cmd.arg("--config").arg(&config);
        self.containerd = Some(NsProcess::start(
            "containerd",
            cmd,
            &self.root.join("containerd.log"),
        ));
        let socket = self.containerd_socket();
        wait_for("containerd's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| ())
        });
    }

    fn launch(&mut self, ns: &Netns) {
        assert!(self.proc.is_none(), "dockerd already runs");
        if self.containerd.is_none() {
            self.launch_containerd(ns);
        }
        let r = self.root.display().to_string();
        // A dockerd killed with SIGKILL leaves its pid file, which the next one refuses.
        let _ = fs::remove_file(self.root.join("docker.pid"));
        let mut cmd = ns.command(require("dockerd", "docker.io"));
        cmd.arg(format!("--host={}", self.url()))
            .arg(format!(
                "--containerd={}",
                self.containerd_socket().display()
            ))
            .arg(format!("--data-root={r}/data"))
            .arg(format!("--exec-root={r}/exec"))
            .arg(format!("--pidfile={r}/docker.pid"))
            // iptables on, as in production: published ports are DNAT rules, which keep working
            // while dockerd is down (live-restore); docker-proxy alone dies with dockerd. The
            // rules go into the host's namespace's own tables.
            .args(["--ip6tables=false"]);
        if self.live_restore {
            cmd.arg("--live-restore");
        }
        self.proc = Some(NsProcess::start(
            "dockerd",
            cmd,
            &self.root.join("dockerd.log"),
        ));
    }

    fn wait_up(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(p) = self.proc.as_mut() {
                if !p.running() {
                    panic!("dockerd exited during start-up\n{}", p.log_tail(30));
                }
            }
            if self
                .docker(&["version", "-f", "{{.Server.APIVersion}}"])
                .is_ok()
            {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "dockerd does not answer after {timeout:?}\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "--- dockerd {}\n{}",
            self.root.display(),
            tail(
                &fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default(),
                n
            )
        )
    }

    fn cleanup(&mut self, ns: &Netns) {
        if self.proc.is_none() {
            // Containers may still run (live-restore): start the engine to remove them.
            self.launch(ns);
            let up = Instant::now();
            while self.docker(&["version"]).is_err() && up.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(20));
        }
        if let Some(mut p) = self.containerd.take() {
            p.stop(Duration::from_secs(10));
        }
        // Shims and anything else left (found by the directory in their command lines).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            netns::kill_processes_naming(&self.root);
            std::thread::sleep(Duration::from_millis(100));
            let left = fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    String::from_utf8_lossy(&fs::read(e.path().join("cmdline")).unwrap_or_default())
                        .contains(&format!("{}/", self.root.display()))
                });
            if !left || Instant::now() > deadline {
                break;
            }
        }
        netns::unmount_under(&self.root);
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// `docker -H <a host's engine>` for the test's threads.
#[derive(Debug, Clone)]
pub struct DockerClient {
    /// The host's index.
    pub index: usize,
    /// The host's node name.
    pub node: String,
    /// `unix://…/docker.sock`.
    pub url: String,
}

impl DockerClient {
    /// `docker -H URL args…`, trimmed stdout.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(require("docker", "docker.io"))
            .arg("-H")
            .arg(&self.url)
            .args(args))
        .map(|s| s.trim().to_owned())
    }

    /// Starts an HTTP container for `service` (busybox httpd on 8080, published on a random
    /// port of the host) answering with its container name; it keeps serving for 2 s after
    /// SIGTERM, as an application draining its connections would. `restart` is Docker's
    /// restart policy (`no`, `always`).
    pub fn try_run_web(&self, service: &str, name: &str, restart: &str) -> anyhow::Result<Web> {
        let script = "mkdir -p /www && echo \"$NAME\" > /www/index.html && \
                      trap 'sleep 2; exit 0' TERM; httpd -f -p 8080 -h /www & wait; wait";
        let id = self
            .docker(&[
                "run",
                "-d",
                "--name",
                name,
                "--restart",
                restart,
                "-p",
                "8080",
                "-e",
                &format!("NAME={name}"),
                "-l",
                &format!("flotilla.service={service}"),
                "--stop-timeout",
                "10",
                crate::docker::IMAGE,
                "sh",
                "-c",
                script,
            ])
            .map_err(|e| anyhow::anyhow!("docker run {name} on {}: {e}", self.node))?;
        Ok(Web {
            host: self.index,
            name: name.into(),
            instance: format!("{}-{}-8080", self.node, &id[..12]),
            id,
        })
    }

    /// The address (`host IP:published port`) the container's port 8080 has now, as presence
    /// announces it.
    pub fn addr(&self, web: &Web, host_ip: Ipv4Addr) -> anyhow::Result<String> {
        let out = self.docker(&["port", &web.name, "8080/tcp"])?;
        let port = out
            .lines()
            .next()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.trim().parse::<u16>().ok())
            .ok_or_else(|| anyhow::anyhow!("no published port for {}: {out}", web.name))?;
        Ok(format!("{host_ip}:{port}"))
    }

    /// `docker rm -f` of one container.
    /// `docker stop` (SIGTERM: the web container drains for 2 s, presence deregisters it at
    /// the `kill` event), then `docker rm`: how a deploy or a scale-down removes a container.
    pub fn try_stop_and_remove(&self, web: &Web) -> anyhow::Result<()> {
        anyhow::ensure!(
            web.host == self.index,
            "{} is not on {}",
            web.name,
            self.node
        );
        self.docker(&["stop", "-t", "5", &web.name])
            .map_err(|e| anyhow::anyhow!("docker stop {} on {}: {e}", web.name, self.node))?;
        self.try_remove(web)
    }

    pub fn try_remove(&self, web: &Web) -> anyhow::Result<()> {
        anyhow::ensure!(
            web.host == self.index,
            "{} is not on {}",
            web.name,
            self.node
        );
        self.docker(&["rm", "-f", &web.name])
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("docker rm -f {} on {}: {e}", web.name, self.node))
    }
}

/// One simulated host.
#[derive(Debug)]
pub struct Host {
    /// Its index in the fleet.
    pub index: usize,
    /// Its node name (`host-N`).
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    // Drop order: daemons, HAProxy, dockerd (containers), mounts, the namespace.
    presence: Option<NsProcess>,
    confgen: Option<NsProcess>,
    haproxy: Option<NsProcess>,
    dockerd: Option<Dockerd>,
    spec: HostSpec,
    dir: PathBuf,
    dest: PathBuf,
    confdir: PathBuf,
    etcd_endpoints: String,
    ttl: Duration,
    rust_log: String,
    bins: Binaries,
    filler: Option<PathBuf>,
    tmpfs: Option<PathBuf>,
    cut_chain: bool,
    presence_starts: usize,
    ns: Netns,
}

impl Host {
    /// The host's namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The host's directory (logs, sockets, confdir; HAProxy's working directory).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// confgen's destination (HAProxy's configuration file).
    pub fn config_path(&self) -> &Path {
        &self.dest
    }

    /// The HAProxy runtime API socket (`admin.sock` in the host's directory).
    pub fn stats_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// The HAProxy master CLI socket.
    pub fn master_socket(&self) -> PathBuf {
        self.dir.join("master.sock")
    }

    /// `IP:80`, HAProxy's HTTP frontend (reachable from the client namespace).
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, HTTP_PORT))
    }

    /// The current content of confgen's destination.
    pub fn config(&self) -> String {
        fs::read_to_string(&self.dest).unwrap_or_default()
    }

    /// Server names (instance ids) in the current configuration file.
    pub fn config_servers(&self) -> BTreeSet<String> {
        config_servers(&self.config())
    }

    /// Server names of `svc_*` backends in the running HAProxy (runtime API
    /// `show servers state`), or `None` when the socket does not answer.
    pub fn routed(&self) -> Option<BTreeSet<String>> {
        routed_servers(&self.stats_socket())
    }

    /// Server name → `ip:port` in the configuration file.
    pub fn config_addrs(&self) -> BTreeMap<String, String> {
        config_server_addrs(&self.config())
    }

    /// Server name → `ip:port` in the running HAProxy, or `None` when it does not answer.
    pub fn routed_addrs(&self) -> Option<BTreeMap<String, String>> {
        routed_server_addrs(&self.stats_socket())
    }

    /// Whether the host runs its own dockerd (and presence).
    pub fn has_docker(&self) -> bool {
        self.spec.docker.is_some()
    }

    /// The host's dockerd. Panics for a host without one.
    pub fn dockerd(&self) -> &Dockerd {
        self.dockerd.as_ref().expect("this host has no dockerd")
    }

    fn daemon_env(&self, cmd: &mut Command) {
        cmd.env("RUST_LOG", &self.rust_log).env("NO_COLOR", "1");
    }

    /// Starts presence (after a kill, with the same state file: it revokes its predecessor's
    /// lease at once).
    pub fn start_presence(&mut self) {
        assert!(
            self.presence.is_none(),
            "presence already runs on {}",
            self.name
        );
        let d = self.dockerd();
        let mut cmd = self.ns.command(&self.bins.presence);
        cmd.arg("--node")
            .arg(&self.name)
            .arg("--advertise-ip")
            .arg(self.ip.to_string())
            .arg("--ttl")
            .arg(format!("{}ms", self.ttl.as_millis()))
            .arg("--docker-host")
            .arg(d.url())
            .arg("--state-file")
            .arg(self.dir.join("presence.state"))
            .arg("--etcd-endpoints")
            .arg(&self.etcd_endpoints)
            .arg("--metrics-addr")
            .arg("127.0.0.1:9101");
        self.daemon_env(&mut cmd);
        let log = match self.presence_starts {
            0 => self.dir.join("presence.log"),
            n => self.dir.join(format!("presence.{n}.log")),
        };
        self.presence_starts += 1;
        self.presence = Some(NsProcess::start(
            &format!("presence {}", self.name),
            cmd,
            &log,
        ));
    }

    /// SIGKILLs presence (`kill -9`).
    pub fn kill_presence(&mut self) {
        if let Some(mut p) = self.presence.take() {
            p.kill();
        }
    }

    /// Waits until the running presence has logged its initial sync (each start of presence
    /// logs to a file of its own: `presence.log`, `presence.1.log`, …).
    pub fn wait_presence_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let p = self.presence.as_mut().expect("presence runs");
            if !p.running() {
                panic!("presence on {} exited\n{}", self.name, p.log_tail(40));
            }
            if p.log().contains("initial sync done") {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "presence on {} not ready after {timeout:?}\n{}",
                    self.name,
                    p.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts confgen.
    pub fn start_confgen(&mut self) {
        assert!(
            self.confgen.is_none(),
            "confgen already runs on {}",
            self.name
        );
        let mut cmd = self.ns.command(&self.bins.confgen);
        cmd.arg("run")
            .arg("--confdir")
            .arg(&self.confdir)
            .arg("--etcd-endpoints")
            .arg(&self.etcd_endpoints)
            .arg("--node")
            .arg(&self.name)
            .arg("--metrics-addr")
            .arg("127.0.0.1:9102");
        self.daemon_env(&mut cmd);
        self.confgen = Some(NsProcess::start(
            &format!("confgen {}", self.name),
            cmd,
            &self.dir.join("confgen.log"),
        ));
    }

    /// SIGKILLs confgen (`kill -9`).
    pub fn kill_confgen(&mut self) {
        if let Some(mut p) = self.confgen.take() {
            p.kill();
        }
    }

    /// Pid of presence, of confgen.
    pub fn daemon_pids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.presence.as_ref().and_then(NsProcess::pid),
            self.confgen.as_ref().and_then(NsProcess::pid),
        )
    }

    /// Fails with the log of any daemon (presence, confgen, HAProxy master) that exited.
    pub fn assert_running(&mut self) {
        for p in [&mut self.presence, &mut self.confgen, &mut self.haproxy]
            .into_iter()
            .flatten()
        {
            if !p.running() {
                panic!("{} exited\n{}", p.name, p.log_tail(60));
            }
        }
    }

    /// `GET path` on a loopback port of this host (its daemons' `/metrics`, `/healthz`):
    /// (status, body).
    pub fn local_get(&self, port: u16, path: &str) -> std::io::Result<(u16, String)> {
        let path = path.to_string();
        self.ns.enter(move || {
            crate::haproxy::http_get_at(
                SocketAddr::from(([127, 0, 0, 1], port)),
                "127.0.0.1",
                &path,
                Duration::from_secs(5),
            )
        })
    }

    /// The sum of confgen's samples of `family` with `labels` (see [`metric_sum`]).
    pub fn confgen_metric_sum(&self, family: &str, labels: &[&str]) -> f64 {
        let body = self
            .local_get(9102, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        metric_sum(&body, family, labels)
    }

    /// presence's `/metrics` body ("" when it does not answer).
    pub fn presence_metrics(&self) -> String {
        self.local_get(9101, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default()
    }

    /// confgen's `/healthz`: (status, body).
    pub fn confgen_healthz(&self) -> std::io::Result<(u16, String)> {
        self.local_get(9102, "/healthz")
    }

    /// One metric of confgen's `/metrics` (labels included in `name`), 0 when absent.
    pub fn confgen_metric(&self, name: &str) -> f64 {
        metric(
            &self
                .local_get(9102, "/metrics")
                .map(|r| r.1)
                .unwrap_or_default(),
            name,
        )
    }

    /// Starts an HTTP container for `service`: see [`DockerClient::try_run_web`]. Panics on
    /// failure.
    pub fn run_web(&self, service: &str, name: &str, restart: &str) -> Web {
        self.docker_client()
            .try_run_web(service, name, restart)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `docker rm -f` of one container. Panics on failure.
    pub fn remove_web(&self, web: &Web) {
        self.docker_client()
            .try_remove(web)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A client of this host's dockerd that other threads can use.
    pub fn docker_client(&self) -> DockerClient {
        DockerClient {
            index: self.index,
            node: self.name.clone(),
            url: self.dockerd().url(),
        }
    }

    /// Stops dockerd (SIGTERM: with live-restore off it stops the containers first; with it
    /// on they keep running) and starts it again with the same flags; waits until it answers.
    pub fn restart_dockerd(&mut self) {
        self.stop_dockerd();
        self.start_dockerd();
    }

    /// SIGKILLs dockerd (`kill -9`; its containerd and shims stay).
    pub fn kill_dockerd(&mut self) {
        let d = self.dockerd.as_mut().expect("this host has no dockerd");
        if let Some(mut p) = d.proc.take() {
            p.kill();
        }
    }

    /// Stops dockerd (SIGTERM, waits for its exit).
    pub fn stop_dockerd(&mut self) {
        let d = self.dockerd.as_mut().expect("this host has no dockerd");
        if let Some(mut p) = d.proc.take() {
            p.stop(Duration::from_secs(60));
        }
    }

    /// Starts a stopped dockerd again; waits until it answers.
    pub fn start_dockerd(&mut self) {
        let d = self.dockerd.as_mut().expect("this host has no dockerd");
        d.launch(&self.ns);
        d.wait_up(Duration::from_secs(60));
    }

    /// Fills the tmpfs under confgen's destination (a filler file written until ENOSPC).
    /// Panics for a host without [`HostSpec::dest_tmpfs`].
    pub fn fill_dest_disk(&mut self) {
        let dir = self
            .tmpfs
            .clone()
            .expect("this host has no tmpfs destination");
        let filler = dir.join("filler");
        let mut f = fs::File::create(&filler).expect("create the filler file");
        let block = vec![0x5au8; 4096];
        use std::io::Write;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", dir.display()),
            }
        }
        let _ = f.flush();
        self.filler = Some(filler);
    }

    /// Removes the filler file.
    pub fn free_dest_disk(&mut self) {
        if let Some(f) = self.filler.take() {
            fs::remove_file(&f).unwrap_or_else(|e| panic!("rm {}: {e}", f.display()));
        }
    }

    /// Daemon logs (last lines of each), for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("===== {} ({})\n", self.name, self.ip);
        for p in [&self.presence, &self.confgen, &self.haproxy]
            .into_iter()
            .flatten()
        {
            out.push_str(&p.log_tail(25));
            out.push('\n');
        }
        out
    }

    fn stop_all(&mut self) {
        for p in [&mut self.presence, &mut self.confgen]
            .into_iter()
            .flatten()
        {
            p.kill();
        }
        if let Some(mut h) = self.haproxy.take() {
            h.stop(Duration::from_secs(3));
        }
        if let Some(mut d) = self.dockerd.take() {
            d.cleanup(&self.ns);
        }
        // Whatever is left in the namespace (HAProxy's old workers, a reload in flight).
        self.ns.kill_all();
        if let Some(t) = self.tmpfs.take() {
            netns::unmount_under(&t);
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Server names (instance ids) of the `server` lines of an HAProxy configuration.
pub fn config_servers(config: &str) -> BTreeSet<String> {
    config_server_addrs(config).into_keys().collect()
}

/// Server name → address (`ip:port`) of the `server` lines of an HAProxy configuration.
pub fn config_server_addrs(config: &str) -> BTreeMap<String, String> {
    config
        .lines()
        .filter_map(|l| {
            let mut t = l.split_whitespace();
            (t.next()? == "server").then_some(())?;
            Some((t.next()?.to_owned(), t.next()?.to_owned()))
        })
        .collect()
}

/// Server names of the `svc_*` backends of the HAProxy whose runtime API is `socket`.
pub fn routed_servers(socket: &Path) -> Option<BTreeSet<String>> {
    routed_server_addrs(socket)
        .map(BTreeMap::into_keys)
        .map(Iterator::collect)
}

/// Server name → `ip:port` of the `svc_*` backends of the HAProxy whose runtime API is `socket`.
pub fn routed_server_addrs(socket: &Path) -> Option<BTreeMap<String, String>> {
    let answer = crate::haproxy::cli_command(socket, "show servers state").ok()?;
    // "1" (format version), then "# be_id be_name srv_id srv_name srv_addr … srv_port …", then
    // one line per server. An answer without the version line is an error message.
    let mut lines = answer.lines();
    if lines.next()?.trim() != "1" {
        return None;
    }
    let header: Vec<&str> = lines
        .next()?
        .trim_start_matches('#')
        .split_whitespace()
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (name, addr, port, backend) = (
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_port")?,
        col("be_name")?,
    );
    Some(
        lines
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let t: Vec<&str> = l.split_whitespace().collect();
                let ok = t.len() > name.max(addr).max(port) && t[backend].starts_with("svc_");
                ok.then(|| (t[name].to_owned(), format!("{}:{}", t[addr], t[port])))
            })
            .collect(),
    )
}

/// The sum of the samples of metric `family` whose labels contain every one of `labels`
/// (e.g. `kind="write"`) in a Prometheus text answer; 0 when there is none.
pub fn metric_sum(body: &str, family: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            let (name, rest) = n.split_once('{').unwrap_or((n, ""));
            (name == family && labels.iter().all(|want| rest.contains(want)))
                .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// The value of `name` (labels included) in a Prometheus text answer; 0 when absent.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// The whole fleet. Drop stops and removes everything.
#[derive(Debug)]
pub struct Fleet {
    // Drop order: hosts, etcd, the client, the switch, the directory.
    /// The hosts.
    pub hosts: Vec<Host>,
    /// The etcd members.
    pub etcd: Vec<EtcdMember>,
    etcd_data_dir: Option<PathBuf>,
    client: Netns,
    switch: Switch,
    spec: FleetSpec,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts the fleet and waits until every etcd member is healthy, every dockerd answers,
    /// every presence has synced and every confgen has applied its first render.
    pub fn start(spec: FleetSpec) -> Fleet {
        for (program, package) in [
            ("ip", "iproute2"),
            ("nsenter", "util-linux"),
            ("iptables", "iptables"),
            ("etcd", "etcd-server"),
            ("etcdctl", "etcd-client"),
        ] {
            require(program, package);
        }
        netns::sweep_stale();
        let prefix = netns::unique_prefix();
        let dir = tempfile::Builder::new()
            .prefix(&format!("flotilla-{prefix}-"))
            .tempdir()
            .expect("fleet temp dir");
        let switch = Switch::create(&format!("{prefix}-sw"));
        let client = Netns::create(&format!("{prefix}-cl"));
        switch.attach(&client, "cl", CLIENT_IP);

        // etcd: data on /dev/shm when present (fsync is cheap there).
        let shm = Path::new("/dev/shm");
        let etcd_data = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix(&format!("flotilla-{prefix}-etcd-"))
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().tempdir_in(dir.path())
        }
        .expect("etcd data dir")
        .keep();
        let initial = (0..spec.etcd_members)
            .map(|i| format!("m{i}=http://{}:2380", etcd_ip(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut fleet = Fleet {
            hosts: Vec::new(),
            etcd: Vec::new(),
            etcd_data_dir: Some(etcd_data.clone()),
            client,
            switch,
            spec: spec.clone(),
            dir,
        };
        fleet.start_etcd_members(&prefix, &etcd_data, &initial);
        fleet.wait_etcd_healthy(Duration::from_secs(60));
        for (k, v) in [
            ("http_bind", format!(":{HTTP_PORT}")),
            ("stats_socket", "unix@admin.sock".to_string()),
            ("maxconn", "1000".to_string()),
        ] {
            fleet
                .etcdctl(&["put", &format!("{PREFIX}/config/haproxy/{k}"), &v])
                .unwrap_or_else(|e| panic!("etcdctl put: {e}"));
        }

        fleet.start_hosts(&prefix);
        // Everything below waits for the dockerds, which started in parallel.
        let image = crate::docker::busybox_image();
        for host in &mut fleet.hosts {
            if host.spec.docker.is_none() {
                continue;
            }
            let d = host.dockerd.as_mut().unwrap();
            d.wait_up(Duration::from_secs(60));
            run(Command::new("sh").arg("-c").arg(format!(
                "docker save {image} | docker -H {} load -q",
                d.url()
            )))
            .unwrap_or_else(|e| panic!("loading {image} into {}: {e}", host.name));
        }
        for i in 0..fleet.hosts.len() {
            fleet.setup_proxy(i);
        }
        for host in &mut fleet.hosts {
            if host.spec.docker.is_some() {
                host.start_presence();
            }
        }
        for host in &mut fleet.hosts {
            if host.presence.is_some() {
                host.wait_presence_ready(Duration::from_secs(60));
            }
        }
        let fleet_ref = &fleet;
        for host in &fleet_ref.hosts {
            if host.spec.confgen {
                wait_for(
                    &format!("confgen's first render on {}", host.name),
                    Duration::from_secs(60),
                    || host.config().contains("Generated by confgen").then_some(()),
                );
            }
        }
        fleet
    }

    /// Creates and launches the etcd members (`initial` is the initial cluster), data below
    /// `etcd_data`.
    fn start_etcd_members(&mut self, prefix: &str, etcd_data: &Path, initial: &str) {
        for i in 0..self.spec.etcd_members {
            let ns = Netns::create(&format!("{prefix}-e{i}"));
            self.switch.attach(&ns, &format!("e{i}"), etcd_ip(i));
            let mut m = EtcdMember {
                name: format!("m{i}"),
                ip: etcd_ip(i),
                proc: None,
                data: etcd_data.join(format!("m{i}.data")),
                log: self.dir.path().join(format!("etcd-m{i}.log")),
                initial_cluster: initial.to_string(),
                token: prefix.to_string(),
                started_once: false,
                ns,
            };
            m.launch();
            self.etcd.push(m);
        }
    }

    /// Creates the hosts of the spec, each in its own namespace, and launches their dockerds.
    fn start_hosts(&mut self, prefix: &str) {
        let endpoints = self.etcd_endpoints();
        for (i, hs) in self.spec.hosts.clone().iter().enumerate() {
            let ns = Netns::create(&format!("{prefix}-h{i}"));
            self.switch.attach(&ns, &format!("h{i}"), host_ip(i));
            let hdir = self.dir.path().join(format!("host-{i}"));
            fs::create_dir_all(&hdir).expect("host dir");
            let mut host = Host {
                index: i,
                name: node_name(i),
                ip: host_ip(i),
                presence: None,
                confgen: None,
                haproxy: None,
                dockerd: hs.docker.as_ref().map(|d| Dockerd {
                    root: PathBuf::from(format!("/var/lib/{DOCKERD_ROOT_PREFIX}{}", ns.name())),
                    live_restore: d.live_restore,
                    proc: None,
                    containerd: None,
                }),
                spec: hs.clone(),
                dest: PathBuf::new(),
                confdir: hdir.join("confdir"),
                dir: hdir,
                etcd_endpoints: endpoints.clone(),
                ttl: self.spec.ttl,
                rust_log: self.spec.rust_log.clone(),
                bins: self.spec.bins.clone(),
                filler: None,
                tmpfs: None,
                cut_chain: false,
                presence_starts: 0,
                ns,
            };
            if let Some(d) = host.dockerd.as_mut() {
                let _ = fs::remove_dir_all(&d.root);
                fs::create_dir_all(&d.root).expect("dockerd root");
                d.launch(&host.ns);
            }
            self.hosts.push(host);
        }
    }

    fn setup_proxy(&mut self, i: usize) {
        let haproxy_bin = require("haproxy", "haproxy");
        let proxyctl = self.spec.bins.proxyctl.clone();
        let templates = self.spec.bins.templates.clone();
        let host = &mut self.hosts[i];
        if !host.spec.confgen {
            return;
        }
        let dest_dir = host.dir.join("etc");
        fs::create_dir_all(&dest_dir).expect("dest dir");
        if let Some(bytes) = host.spec.dest_tmpfs {
            run(Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={bytes},mode=0755"))
                .arg(format!("flotilla-{}", host.ns.name()))
                .arg(&dest_dir))
            .unwrap_or_else(|e| panic!("mount a tmpfs on {}: {e}", dest_dir.display()));
            host.tmpfs = Some(dest_dir.clone());
        }
        host.dest = dest_dir.join("haproxy.cfg");
        fs::create_dir_all(host.confdir.join("templates")).expect("confdir");
        fs::create_dir_all(host.confdir.join("conf.d")).expect("confdir");
        for f in fs::read_dir(&templates)
            .unwrap_or_else(|e| panic!("{}: {e}", templates.display()))
            .flatten()
        {
            let name = f.file_name();
            if name.to_string_lossy().starts_with("haproxy") {
                fs::copy(f.path(), host.confdir.join("templates").join(&name))
                    .expect("copy a shipped template");
            }
        }
        let dest = host.dest.display().to_string();
        let commands = if host.spec.haproxy {
            format!(
                "check_cmd = \"{haproxy} -c -f {{{{src}}}}\"\n\
                 reload_cmd = \"{proxyctl} reload --config {dest} --master-socket {master} \
                 --haproxy-bin {haproxy} --timeout 10s\"\n\
                 reload_timeout = \"30s\"\n",
                haproxy = haproxy_bin.display(),
                proxyctl = proxyctl.display(),
                master = host.master_socket().display(),
            )
        } else {
            String::new()
        };
        // The shipped conf.d/haproxy.toml with its paths moved into this host.
        fs::write(
            host.confdir.join("conf.d/haproxy.toml"),
            format!(
                "[template]\nsrc = \"haproxy.cfg.tmpl\"\ndest = \"{dest}\"\nprefix = \"{PREFIX}\"\n\
                 keys = [\"/endpoints/\", \"/config/haproxy/\"]\nmode = \"0644\"\n{commands}\
                 wait = \"20ms:1s\"\nmax_drop = \"50%\"\ndrop_grace = \"30s\"\n"
            ),
        )
        .expect("write the resource");
        if host.spec.haproxy {
            // HAProxy starts on a bootstrap config; confgen's first apply replaces and reloads it.
            fs::write(&host.dest, bootstrap_config()).expect("bootstrap config");
            let mut cmd = host.ns.command(&haproxy_bin);
            cmd.arg("-W")
                .arg("-db")
                .arg("-S")
                .arg(format!("{},mode,600", host.master_socket().display()))
                .arg("-f")
                .arg(&host.dest)
                .current_dir(&host.dir);
            host.haproxy = Some(NsProcess::start(
                &format!("haproxy {}", host.name),
                cmd,
                &host.dir.join("haproxy.log"),
            ));
            let socket = host.stats_socket();
            wait_for(
                &format!("HAProxy on {}", host.name),
                Duration::from_secs(30),
                || routed_servers(&socket).map(|_| ()),
            );
        }
        host.start_confgen();
    }

    /// etcd client URLs, comma separated.
    pub fn etcd_endpoints(&self) -> String {
        self.etcd
            .iter()
            .map(EtcdMember::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client namespace (the test's side of the switch).
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The switch.
    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    /// `etcdctl --endpoints <every member> args…` from the client namespace.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.etcdctl_at(&self.etcd_endpoints(), args)
    }

    fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.client.command(require("etcdctl", "etcd-client"));
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg("--dial-timeout=1s")
            .arg("--command-timeout=3s")
            .args(args);
        run(&mut cmd)
    }

    /// (member id, leader id) as member `i` reports them.
    fn member_status(&self, i: usize) -> Option<(u64, u64)> {
        let out = self
            .etcdctl_at(
                &self.etcd[i].endpoint(),
                &["endpoint", "status", "-w", "json"],
            )
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let s = &v[0]["Status"];
        Some((
            s["header"]["member_id"].as_u64()?,
            s["leader"].as_u64().filter(|l| *l != 0)?,
        ))
    }

    /// Waits until every running member answers with the same leader.
    pub fn wait_etcd_healthy(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let running: Vec<usize> = (0..self.etcd.len())
                .filter(|&i| self.etcd[i].running())
                .collect();
            let statuses: Vec<Option<(u64, u64)>> =
                running.iter().map(|&i| self.member_status(i)).collect();
            let ok = statuses.iter().all(Option::is_some)
                && statuses
                    .iter()
                    .flatten()
                    .all(|s| s.1 == statuses[0].unwrap().1);
            if ok {
                return;
            }
            if start.elapsed() > timeout {
                let logs: Vec<String> = self.etcd.iter().map(|m| m.log_tail(15)).collect();
                panic!(
                    "etcd not healthy with one leader after {timeout:?}: {statuses:?}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Index of the current leader (waits, bounded, for one).
    pub fn etcd_leader(&mut self) -> usize {
        let start = Instant::now();
        loop {
            for i in 0..self.etcd.len() {
                if !self.etcd[i].running() {
                    continue;
                }
                if let Some((id, leader)) = self.member_status(i) {
                    if id == leader {
                        return i;
                    }
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!("no etcd leader within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs etcd member `i` (its data stays).
    pub fn kill_etcd(&mut self, i: usize) {
        if let Some(mut p) = self.etcd[i].proc.take() {
            p.kill();
        }
    }

    /// Starts member `i` again with its data (it rejoins the cluster).
    pub fn restart_etcd(&mut self, i: usize) {
        self.etcd[i].launch();
    }

    /// Cuts host `i` off from every etcd member (iptables in the host's namespace drops all
    /// packets to and from them); everything else (clients, other hosts) still reaches it.
    pub fn cut_from_etcd(&mut self, i: usize) {
        let ips: Vec<String> = (0..self.etcd.len())
            .map(|m| etcd_ip(m).to_string())
            .collect();
        let host = &mut self.hosts[i];
        let ns = &host.ns;
        if !host.cut_chain {
            ns.iptables(&["-N", "FLOTILLA-CUT"])
                .and_then(|_| ns.iptables(&["-I", "INPUT", "-j", "FLOTILLA-CUT"]))
                .and_then(|_| ns.iptables(&["-I", "OUTPUT", "-j", "FLOTILLA-CUT"]))
                .unwrap_or_else(|e| panic!("iptables chain in {}: {e}", ns.name()));
            host.cut_chain = true;
        }
        for ip in &ips {
            ns.iptables(&["-A", "FLOTILLA-CUT", "-s", ip, "-j", "DROP"])
                .and_then(|_| ns.iptables(&["-A", "FLOTILLA-CUT", "-d", ip, "-j", "DROP"]))
                .unwrap_or_else(|e| panic!("iptables in {}: {e}", ns.name()));
        }
    }

    /// Undoes [`Fleet::cut_from_etcd`].
    pub fn heal_etcd_cut(&mut self, i: usize) {
        let ns = &self.hosts[i].ns;
        ns.iptables(&["-F", "FLOTILLA-CUT"])
            .unwrap_or_else(|e| panic!("iptables -F in {}: {e}", ns.name()));
    }

    /// Unplugs host `i` from the switch: nothing reaches it and nothing leaves it (to the
    /// rest of the fleet the host is dead).
    pub fn unplug(&self, i: usize) {
        self.switch.set_port(&format!("h{i}"), false);
    }

    /// Plugs host `i` back in.
    pub fn plug(&self, i: usize) {
        self.switch.set_port(&format!("h{i}"), true);
    }

    /// `GET /` with `Host: <service>.localhost` through host `i`'s HAProxy, from the client
    /// namespace: (status, body).
    pub fn get(
        &self,
        i: usize,
        service: &str,
        timeout: Duration,
    ) -> std::io::Result<(u16, String)> {
        let addr = self.hosts[i].http_addr();
        let host = format!("{service}.localhost");
        self.client
            .enter(move || crate::haproxy::http_get_at(addr, &host, "/", timeout))
    }

    /// Every host's and member's log tails, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            out.push_str(&h.diagnostics());
        }
        for m in &self.etcd {
            out.push_str(&m.log_tail(10));
            out.push('\n');
        }
        out
    }

    /// Waits until every proxy host (with HAProxy) routes exactly `want` — in its configuration
    /// file and in the running HAProxy — and returns how long that took.
    pub fn wait_routed(&self, want: &BTreeSet<String>, timeout: Duration) -> Duration {
        self.wait_routed_on(&self.proxy_hosts(), want, timeout)
    }

    /// Like [`Fleet::wait_routed`], on the hosts `on` only.
    pub fn wait_routed_on(
        &self,
        on: &[usize],
        want: &BTreeSet<String>,
        timeout: Duration,
    ) -> Duration {
        self.wait_proxies(on, want, timeout, |h| (h.config_servers(), h.routed()))
    }

    /// Waits until every proxy host routes exactly `want` (server name → `ip:port`), in its
    /// file and in the running HAProxy; returns how long that took.
    pub fn wait_routed_addrs(
        &self,
        want: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Duration {
        self.wait_proxies(&self.proxy_hosts(), want, timeout, |h| {
            (h.config_addrs(), h.routed_addrs())
        })
    }

    /// Polls until `read` (a host's file view and its running HAProxy's, None when unreadable)
    /// gives `want` for both on every host in `on`; panics naming each host's views after
    /// `timeout`.
    fn wait_proxies<T: PartialEq + std::fmt::Debug>(
        &self,
        on: &[usize],
        want: &T,
        timeout: Duration,
        read: impl Fn(&Host) -> (T, Option<T>),
    ) -> Duration {
        let start = Instant::now();
        loop {
            let views: Vec<(&str, T, Option<T>)> = on
                .iter()
                .map(|&i| {
                    let h = &self.hosts[i];
                    let (file, running) = read(h);
                    (h.name.as_str(), file, running)
                })
                .collect();
            if views
                .iter()
                .all(|(_, file, running)| file == want && running.as_ref() == Some(want))
            {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                let mut msg =
                    format!("not every proxy routes exactly {want:?} after {timeout:?}:\n");
                for (name, file, running) in views {
                    msg.push_str(&format!("  {name}: file {file:?}, running {running:?}\n"));
                }
                panic!("{msg}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Indices of the hosts that run HAProxy.
    pub fn proxy_hosts(&self) -> Vec<usize> {
        self.hosts
            .iter()
            .filter(|h| h.spec.haproxy)
            .map(|h| h.index)
            .collect()
    }

    /// The fleet's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The TTL presence runs with.
    pub fn ttl(&self) -> Duration {
        self.spec.ttl
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Hosts first (in parallel would be faster; sequential keeps the logs readable).
        self.hosts.clear();
        self.etcd.clear();
        if let Some(d) = self.etcd_data_dir.take() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// The configuration HAProxy starts with, before confgen's first apply.
pub(crate) fn bootstrap_config() -> String {
    format!(
        "global\n    master-worker\n    stats socket unix@admin.sock mode 600 level admin expose-fd listeners\n\
         defaults\n    mode http\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\
         frontend http\n    bind :{HTTP_PORT}\n"
    )
}
