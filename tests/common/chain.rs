//! One whole chain on one machine for the end-to-end tests and the start-to-serve benchmark:
//! etcd, HAProxy (master-worker), confgen with the shipped template, presence, in a temp dir.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{bin, http_get, Daemon, Proxy};
use flotilla_harness::docker::{busybox_image, unique_name, Container};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::{free_port, wait_for};

pub const TTL: &str = "3s";

/// One chain: etcd, HAProxy, confgen and presence, in a temp dir; everything stops on drop.
pub struct Chain {
    // Drop order: daemons first, then HAProxy, etcd, the dir.
    pub presence: Option<Daemon>,
    pub confgen: Daemon,
    pub proxy: Proxy,
    pub etcd: Etcd,
    pub http_port: u16,
    pub node: String,
    pub test_label: String,
    pub dir: tempfile::TempDir,
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped `templates/conf.d/haproxy.toml` with this chain's paths (destination, HAProxy
/// and proxyctl binaries, sockets); every other setting as shipped (`wait`, `max_drop`,
/// `drop_grace`, timeouts, mode), so the chain tests run what operators run. Without
/// `runtime_api` the runtime lines are left out (every change reloads).
fn shipped_resource(
    cfg: &Path,
    haproxy: &Path,
    master: &Path,
    runtime_api: Option<&Path>,
    overrides: &[(&str, &str)],
) -> String {
    let shipped = std::fs::read_to_string(repo().join("templates/conf.d/haproxy.toml"))
        .expect("the shipped templates/conf.d/haproxy.toml");
    let proxyctl = bin("proxyctl");
    let mut seen = Vec::new();
    let mut out = String::new();
    for line in shipped.lines() {
        let key = line.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
        let line = match key {
            "dest" => format!("dest = \"{}\"", cfg.display()),
            "check_cmd" => format!("check_cmd = \"{} -c -f {{{{src}}}}\"", haproxy.display()),
            "reload_cmd" => format!(
                "reload_cmd = \"{} reload --config {} --master-socket {} --haproxy-bin {} --timeout 10s\"",
                proxyctl.display(),
                cfg.display(),
                master.display(),
                haproxy.display()
            ),
            "runtime_api" | "runtime_timeout" if runtime_api.is_none() => continue,
            "runtime_api" => format!("runtime_api = \"{}\"", runtime_api.unwrap().display()),
            _ => match overrides.iter().find(|(k, _)| *k == key) {
                Some((k, v)) => {
                    seen.push(*k);
                    format!("{k} = {v}")
                }
                None => line.to_string(),
            },
        };
        out.push_str(&line);
        out.push('\n');
    }
    for (k, _) in overrides {
        assert!(
            seen.contains(k),
            "override {k}: not a setting of the shipped resource"
        );
    }
    for k in [
        "dest",
        "check_cmd",
        "reload_cmd",
        "max_drop",
        "drop_grace",
        "wait",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{k} ="))),
            "the shipped resource has no {k}: update the chain\n{out}"
        );
    }
    out
}

impl Chain {
    pub fn start(tag: &str) -> Chain {
        Chain::start_opts(tag, false, &[], &[])
    }

    /// Like [`Chain::start`], with extra `confgen run` flags (e.g. `--allow-loopback` when
    /// several simulated hosts on this machine all announce 127.0.0.1).
    pub fn start_with(tag: &str, confgen_extra: &[&str]) -> Chain {
        Chain::start_opts(tag, false, confgen_extra, &[])
    }

    /// Like [`Chain::start`]; with `runtime_api`, confgen's resource applies server-line
    /// changes through HAProxy's runtime socket (`runtime_api`) instead of reloading.
    /// `overrides` replace settings of the shipped resource (`("max_drop", "\"100%\"")`): each
    /// caller says why.
    pub fn start_runtime(tag: &str, runtime_api: bool, overrides: &[(&str, &str)]) -> Chain {
        Chain::start_opts(tag, runtime_api, &[], overrides)
    }

    fn start_opts(
        tag: &str,
        runtime_api: bool,
        confgen_extra: &[&str],
        overrides: &[(&str, &str)],
    ) -> Chain {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-e2e-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let etcd = Etcd::start();
        let http_port = free_port();
        let admin = d.join("admin.sock");
        let master = d.join("master.sock");
        let cfg = d.join("haproxy.cfg");
        for (k, v) in [
            ("http_bind", format!("127.0.0.1:{http_port}")),
            ("stats_socket", admin.display().to_string()),
            ("hard_stop_after", "5s".to_string()),
            ("maxconn", "1000".to_string()),
            // Each chain its own (the default is one file for the whole host).
            (
                "server_state_file",
                d.join("server-state").display().to_string(),
            ),
        ] {
            etcd.etcdctl(&["put", &format!("/flotilla/config/haproxy/{k}"), &v])
                .unwrap();
        }

        // The shipped template, with a resource pointing into the temp dir.
        let confdir = d.join("confdir");
        std::fs::create_dir_all(confdir.join("templates")).unwrap();
        std::fs::create_dir_all(confdir.join("conf.d")).unwrap();
        // The main template and its per-service fragments.
        for f in std::fs::read_dir(repo().join("templates/templates")).unwrap() {
            let f = f.unwrap().path();
            if f.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("haproxy")
            {
                std::fs::copy(&f, confdir.join("templates").join(f.file_name().unwrap()))
                    .expect("the shipped haproxy templates");
            }
        }
        let haproxy = flotilla_harness::require("haproxy", "haproxy");
        let runtime = runtime_api.then_some(admin.as_path());
        std::fs::write(
            confdir.join("conf.d/haproxy.toml"),
            shipped_resource(&cfg, &haproxy, &master, runtime, overrides),
        )
        .unwrap();

        // HAProxy starts on a bootstrap config; confgen's first apply replaces and reloads it.
        std::fs::write(
            &cfg,
            format!(
                "global\n    master-worker\n    stats socket {} mode 600 level admin expose-fd listeners\n\
                 defaults\n    mode http\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\
                 frontend http\n    bind 127.0.0.1:{http_port}\n",
                admin.display()
            ),
        )
        .unwrap();
        let proxy = Proxy::start(&cfg, &master, d);
        wait_for("HAProxy to listen", Duration::from_secs(15), || {
            std::net::TcpStream::connect(("127.0.0.1", http_port))
                .ok()
                .map(|_| ())
        });

        let endpoints = etcd.endpoint();
        let node = format!("e2e-{tag}-{}", std::process::id());
        // confgen runs on the same host as presence: `--node` lets it route the loopback
        // addresses this host's presence announces (from any other node they are refused).
        let confgen = Daemon::start(
            "confgen",
            &bin("confgen"),
            &[
                "run".to_string(),
                "--confdir".into(),
                confdir.display().to_string(),
                "--etcd-endpoints".into(),
                endpoints,
                "--node".into(),
                node.clone(),
            ]
            .into_iter()
            .chain(confgen_extra.iter().map(|s| s.to_string()))
            .collect::<Vec<String>>(),
            d,
        );
        let test_label = unique_name(tag);
        let mut chain = Chain {
            presence: None,
            confgen,
            proxy,
            etcd,
            http_port,
            node,
            test_label,
            dir,
        };
        chain.start_presence();
        // confgen has applied the template once HAProxy runs its stats socket from the template.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !chain.config().contains("Generated by confgen") {
            chain.confgen.assert_running();
            assert!(
                Instant::now() < deadline,
                "confgen did not apply the template within 30 s\n{}",
                chain.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        chain
    }

    pub fn start_presence(&mut self) {
        let state = self.dir.path().join("presence.state");
        let args: Vec<String> = [
            "--node",
            &self.node,
            "--advertise-ip",
            "127.0.0.1",
            // One host: the containers publish on 127.0.0.1 and HAProxy runs beside them.
            "--allow-loopback",
            "--ttl",
            TTL,
            "--resync",
            "5s",
            "--label-filter",
            &format!("flotilla.test={}", self.test_label),
            "--state-file",
            &state.display().to_string(),
            "--etcd-endpoints",
            &self.etcd.endpoint(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.presence = Some(Daemon::start(
            "presence",
            &bin("presence"),
            &args,
            self.dir.path(),
        ));
    }

    /// Registers `count` endpoints of `service` for another host `node`, with its node record,
    /// without a lease (they stay until the test ends): the rest of a real registry, so that a
    /// test's own container is not every endpoint the template sees (the shipped drop guard
    /// holds a render that removes more than half of them). They point at closed ports on
    /// 127.0.0.1, so confgen must run with `--allow-loopback`, and HAProxy's checks mark them
    /// down; nothing requests `service`.
    pub fn register_other_host(&self, node: &str, service: &str, count: u16) {
        let keys = flotilla_registry::Keys::new("/flotilla").unwrap();
        let record = flotilla_registry::Node {
            node: node.into(),
            version: "0.1.0".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            advertise_ip: "127.0.0.1".parse().unwrap(),
            labels: Default::default(),
        };
        let value = record.encode(&keys).expect("a valid node record");
        self.etcd
            .etcdctl(&[
                "put",
                &keys.node(node),
                std::str::from_utf8(&value).unwrap(),
            ])
            .unwrap();
        for i in 0..count {
            let container = format!("{:012x}", 0x5eadc0de0000u64 + u64::from(i));
            let ep = flotilla_registry::Endpoint {
                service: service.into(),
                instance: format!("{node}-{container}-8080"),
                node: node.into(),
                host: "127.0.0.1".into(),
                port: free_port(),
                proto: flotilla_registry::Proto::Tcp,
                container,
                image: "flotilla/steady:1".into(),
                tags: vec![],
                meta: Default::default(),
                health: flotilla_registry::Health::None,
                registered_at: "2026-01-01T00:00:00Z".into(),
            };
            let value = ep.encode(&keys).expect("a valid endpoint record");
            self.etcd
                .etcdctl(&["put", &ep.key(&keys), std::str::from_utf8(&value).unwrap()])
                .unwrap();
        }
    }

    /// Starts a busybox httpd container for `service` that answers with its own name and keeps
    /// serving for 2 s after SIGTERM (like a real app draining).
    pub fn container(&self, service: &str, name: &str) -> Container {
        let script = "mkdir -p /www && echo \"$NAME\" > /www/index.html && \
                      trap 'sleep 2; exit 0' TERM; httpd -f -p 8080 -h /www & wait; wait";
        Container::run(
            name,
            &[
                "-p",
                "127.0.0.1::8080",
                "-e",
                &format!("NAME={name}"),
                "--label",
                &format!("flotilla.service={service}"),
                "--label",
                &format!("flotilla.test={}", self.test_label),
                "--stop-timeout",
                "10",
                busybox_image(),
                "sh",
                "-c",
                script,
            ],
        )
    }

    pub fn get(&self, service: &str) -> std::io::Result<(u16, String)> {
        http_get(
            self.http_port,
            &format!("{service}.localhost"),
            "/",
            Duration::from_secs(3),
        )
    }

    /// The master's reload counter (`show proc`), retried while the master re-executes.
    pub fn reloads(&self) -> u32 {
        use std::io::{Read, Write};
        wait_for("the master CLI", Duration::from_secs(10), || {
            let mut c = std::os::unix::net::UnixStream::connect(&self.proxy.master_socket).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            c.write_all(b"show proc\n").ok()?;
            c.shutdown(std::net::Shutdown::Write).ok()?;
            let mut answer = String::new();
            c.read_to_string(&mut answer).ok()?;
            proxyctl::ProcList::parse(&answer)
                .ok()
                .map(|p| p.master.reloads)
        })
    }

    pub fn config(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.cfg")).unwrap_or_default()
    }

    pub fn diagnostics(&self) -> String {
        let presence = self.presence.as_ref().map(Daemon::log).unwrap_or_default();
        let tail = |s: String| {
            s.lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "--- haproxy.cfg\n{}\n--- confgen\n{}\n--- presence\n{}\n--- haproxy\n{}",
            self.config(),
            tail(self.confgen.log()),
            tail(presence),
            tail(self.proxy.log())
        )
    }

    /// Waits until requests for `service` are answered by exactly the containers in `names`.
    pub fn wait_served_by(&self, service: &str, names: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut seen = std::collections::BTreeSet::new();
        loop {
            if let Ok((200, body)) = self.get(service) {
                seen.insert(body.trim().to_string());
                if names.iter().all(|n| seen.contains(*n))
                    && seen.iter().all(|s| names.contains(&s.as_str()))
                {
                    return;
                }
                if !seen.iter().all(|s| names.contains(&s.as_str())) {
                    seen.clear(); // a stale backend answered: start over
                }
            }
            if Instant::now() > deadline {
                panic!("{service} not served by exactly {names:?} within {timeout:?} (seen {seen:?})\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
