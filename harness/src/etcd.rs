//! Real etcd for tests: a single member, a member with TLS client certificates and password
//! users with roles, and a 3-member cluster whose members can be killed and restarted one by
//! one. Each runs on free loopback ports with its data in a temp dir (on /dev/shm when present,
//! so fsync is cheap), and is killed and removed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{free_port, require, run, wait_for, KillOnDrop};

fn tempdir(prefix: &str) -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    if Path::new("/dev/shm").is_dir() {
        b.tempdir_in("/dev/shm").expect("tempdir in /dev/shm")
    } else {
        b.tempdir().expect("tempdir")
    }
}

/// TLS material for a TLS etcd.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A client certificate (CN `flotilla-client`) and its key.
    pub client_cert: PathBuf,
    /// Key of `client_cert`.
    pub client_key: PathBuf,
    /// A client certificate with CN `root`, for administration through etcdctl.
    pub root_cert: PathBuf,
    /// Key of `root_cert`.
    pub root_key: PathBuf,
    /// A CA that signed nothing here: using it must fail the handshake.
    pub other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// One etcd member (alone, or part of a [`EtcdCluster`]).
#[derive(Debug)]
pub struct Etcd {
    name: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    initial_cluster: String,
    cluster_token: String,
    tls: Option<TlsFiles>,
    proc: KillOnDrop,
    started_once: bool,
    extra_args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Etcd {
    /// Starts a single-member etcd and waits until it answers.
    pub fn start() -> Etcd {
        Etcd::start_with(&[])
    }

    /// Like [`Etcd::start`], with extra etcd flags, e.g. `["--max-request-bytes", "32768"]`
    /// (etcd refuses a larger request with "etcdserver: request is too large").
    pub fn start_with(extra_args: &[&str]) -> Etcd {
        let tmp = tempdir("flotilla-etcd-");
        let mut e = Etcd::member(
            "solo",
            tmp.path().to_owned(),
            free_port(),
            free_port(),
            None,
        );
        e.initial_cluster = format!("solo=http://127.0.0.1:{}", e.peer_port);
        e.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        e._tmp = Some(tmp);
        e.launch();
        e.wait_healthy();
        e
    }

    fn member(
        name: &str,
        dir: PathBuf,
        client_port: u16,
        peer_port: u16,
        tls: Option<TlsFiles>,
    ) -> Etcd {
        require("etcd", "etcd-server");
        require("etcdctl", "etcd-client");
        Etcd {
            name: name.into(),
            dir,
            client_port,
            peer_port,
            initial_cluster: String::new(),
            cluster_token: format!("flotilla-test-{}", std::process::id()),
            tls,
            proc: KillOnDrop(None),
            started_once: false,
            extra_args: Vec::new(),
            _tmp: None,
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The client URL (`http://127.0.0.1:PORT`, or https for the TLS variant).
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    /// This member's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where etcd writes its log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// The last lines of the member's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn launch(&mut self) {
        assert!(
            self.proc.0.is_none(),
            "etcd {} is already running",
            self.name
        );
        let data = self.dir.join(format!("{}.data", self.name));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let mut cmd = Command::new(require("etcd", "etcd-server"));
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.cluster_token)
            .arg("--initial-cluster-state")
            .arg(if self.started_once { "existing" } else { "new" })
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .args(&self.extra_args);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        cmd.env("ETCD_UNSUPPORTED_ARCH", "")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn etcd");
        self.proc = KillOnDrop(Some(child));
        self.started_once = true;
    }

    /// `etcdctl` against this member (as root over TLS for the TLS variant).
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(require("etcdctl", "etcd-client"));
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint());
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.root_cert)
                .arg("--key")
                .arg(&tls.root_key);
        }
        cmd.args(args);
        run(&mut cmd)
    }

    /// True when the member answers a health check with a leader.
    pub fn healthy(&self) -> bool {
        self.etcdctl(&[
            "endpoint",
            "health",
            "--command-timeout=1s",
            "--dial-timeout=500ms",
        ])
        .is_ok()
    }

    fn wait_healthy(&self) {
        let deadline = Duration::from_secs(30);
        let start = std::time::Instant::now();
        while !self.healthy() {
            if start.elapsed() > deadline {
                panic!(
                    "etcd {} did not become healthy within {deadline:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the member with SIGKILL (a crash), keeping its data.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Stops the member with SIGTERM and waits for it to exit, keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.proc.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    /// Starts a stopped or killed member again with the same data and ports. For a single
    /// member, waits until it is healthy.
    pub fn restart(&mut self) {
        self.launch();
        if !self.initial_cluster.contains(',') {
            self.wait_healthy();
        }
    }

    /// Whether the process is running (started and not killed/stopped).
    pub fn running(&self) -> bool {
        self.proc.0.is_some()
    }

    /// The member's etcd id (hex), from `endpoint status`.
    pub fn member_id(&self) -> Option<u64> {
        let out = self
            .etcdctl(&["endpoint", "status", "-w", "json", "--command-timeout=2s"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v[0]["Status"]["header"]["member_id"].as_u64()
    }

    /// The leader's id as this member sees it.
    pub fn leader_id(&self) -> Option<u64> {
        let out = self
            .etcdctl(&["endpoint", "status", "-w", "json", "--command-timeout=2s"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v[0]["Status"]["leader"].as_u64().filter(|l| *l != 0)
    }
}

/// An etcd with TLS (server cert, client-cert auth) and auth enabled: users `root`
/// (password `rootpw`), `reader` (read on `/flotilla/`), and `node-a` (read-write on
/// `/flotilla/endpoints/node-a/` and `/flotilla/nodes/node-a`), passwords as in [`TlsEtcd::USERS`].
#[derive(Debug)]
pub struct TlsEtcd {
    /// The member.
    pub etcd: Etcd,
    /// Certificates and keys.
    pub tls: TlsFiles,
}

impl TlsEtcd {
    /// `(user, password)` pairs created by [`TlsEtcd::start`].
    ///
    /// - `reader`: read `/flotilla/` (confgen, `proxyctl ls`);
    /// - `node-a`, `node-b`: readwrite their own endpoints and node key (presence);
    /// - `config-admin`: readwrite `/flotilla/config/` (template settings and service settings:
    ///   root-equivalent on proxy hosts, see docs/OPERATIONS.md);
    /// - `policy-admin`: readwrite `/flotilla/policy/` (service claim policies).
    pub const USERS: [(&'static str, &'static str); 6] = [
        ("root", "rootpw"),
        ("reader", "reader-secret"),
        ("node-a", "node-a-secret"),
        ("node-b", "node-b-secret"),
        ("config-admin", "config-admin-secret"),
        ("policy-admin", "policy-admin-secret"),
    ];

    /// Generates certificates, starts etcd with TLS, creates users and roles and enables auth.
    pub fn start() -> TlsEtcd {
        let tmp = tempdir("flotilla-etcd-tls-");
        let tls = make_certs(tmp.path());
        let mut e = Etcd::member(
            "tls",
            tmp.path().to_owned(),
            free_port(),
            free_port(),
            Some(tls.clone()),
        );
        e.initial_cluster = format!("tls=http://127.0.0.1:{}", e.peer_port);
        e._tmp = Some(tmp);
        e.launch();
        e.wait_healthy();
        let ctl = |args: &[&str]| {
            e.etcdctl(args)
                .unwrap_or_else(|err| panic!("etcdctl {args:?}: {err}\n{}", e.log_tail()));
        };
        for (user, pw) in Self::USERS {
            ctl(&["user", "add", user, "--new-user-password", pw]);
        }
        ctl(&["role", "add", "flotilla-read"]);
        ctl(&[
            "role",
            "grant-permission",
            "flotilla-read",
            "read",
            "/flotilla/",
            "--prefix=true",
        ]);
        ctl(&["user", "grant-role", "reader", "flotilla-read"]);
        for node in ["node-a", "node-b"] {
            ctl(&["role", "add", node]);
            ctl(&[
                "role",
                "grant-permission",
                node,
                "readwrite",
                &format!("/flotilla/endpoints/{node}/"),
                "--prefix=true",
            ]);
            ctl(&[
                "role",
                "grant-permission",
                node,
                "readwrite",
                &format!("/flotilla/nodes/{node}"),
            ]);
            ctl(&["user", "grant-role", node, node]);
        }
        for (user, prefix) in [
            ("config-admin", "/flotilla/config/"),
            ("policy-admin", "/flotilla/policy/"),
        ] {
            ctl(&["role", "add", user]);
            ctl(&[
                "role",
                "grant-permission",
                user,
                "readwrite",
                prefix,
                "--prefix=true",
            ]);
            ctl(&["user", "grant-role", user, user]);
        }
        ctl(&["user", "grant-role", "root", "root"]);
        ctl(&["auth", "enable"]);
        TlsEtcd { etcd: e, tls }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new(require("openssl", "openssl"));
    cmd.current_dir(dir).args(args);
    run(&mut cmd).unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
}

fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

fn make_leaf(dir: &Path, ca: &str, name: &str, cn: &str) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    let ext = dir.join(format!("{name}.ext"));
    fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

fn make_certs(dir: &Path) -> TlsFiles {
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    make_leaf(dir, "ca", "server", "etcd-server");
    make_leaf(dir, "ca", "client", "flotilla-client");
    make_leaf(dir, "ca", "root", "root");
    TlsFiles {
        ca: dir.join("ca.crt"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
        root_cert: dir.join("root.crt"),
        root_key: dir.join("root.key"),
        other_ca: dir.join("other-ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
    }
}

/// A 3-member etcd cluster on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members; kill and restart them one by one.
    pub members: Vec<Etcd>,
    _tmp: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one is healthy.
    pub fn start(n: usize) -> EtcdCluster {
        let tmp = tempdir("flotilla-etcd-cluster-");
        let mut members: Vec<Etcd> = (0..n)
            .map(|i| {
                Etcd::member(
                    &format!("m{i}"),
                    tmp.path().to_owned(),
                    free_port(),
                    free_port(),
                    None,
                )
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = initial.clone();
            m.launch();
        }
        let cluster = EtcdCluster { members, _tmp: tmp };
        cluster.wait_healthy(Duration::from_secs(60));
        cluster
    }

    /// All client URLs, for `--etcd-endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }

    /// Waits until every running member is healthy and they agree on a leader.
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_for(
            "every running etcd member to be healthy with one leader",
            timeout,
            || {
                let running: Vec<&Etcd> = self.members.iter().filter(|m| m.running()).collect();
                let leaders: Vec<Option<u64>> = running.iter().map(|m| m.leader_id()).collect();
                let agreed = leaders.iter().all(|l| l.is_some() && *l == leaders[0]);
                (agreed && running.iter().all(|m| m.healthy())).then_some(())
            },
        );
    }

    /// Index of the current leader.
    pub fn leader(&self) -> usize {
        wait_for("an etcd leader", Duration::from_secs(30), || {
            let leader = self
                .members
                .iter()
                .filter(|m| m.running())
                .find_map(|m| m.leader_id())?;
            self.members
                .iter()
                .position(|m| m.running() && m.member_id() == Some(leader))
        })
    }
}
