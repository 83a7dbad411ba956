//! The whole chain on one machine, with real parts: Docker containers → presence → etcd →
//! confgen (shipped haproxy template) → proxyctl reload → HAProxy (master-worker) → HTTP.
//!
//! Deadlines here are generous multiples of the goals; the goals themselves are measured by
//! `scripts/bench` (docs/BENCHMARKS.md).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{bin, http_get, Daemon, Proxy};
use flotilla_harness::docker::{busybox_image, unique_name, Container};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::{free_port, wait_for};

const TTL: &str = "3s";

/// One chain: etcd, HAProxy, confgen and presence, in a temp dir; everything stops on drop.
struct Chain {
    // Drop order: daemons first, then HAProxy, etcd, the dir.
    presence: Option<Daemon>,
    confgen: Daemon,
    proxy: Proxy,
    etcd: Etcd,
    http_port: u16,
    node: String,
    test_label: String,
    dir: tempfile::TempDir,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Chain {
    fn start(tag: &str) -> Chain {
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
        std::fs::write(
            confdir.join("conf.d/haproxy.toml"),
            format!(
                r#"[template]
src = "haproxy.cfg.tmpl"
dest = "{cfg}"
prefix = "/flotilla"
keys = ["/endpoints", "/config/haproxy"]
check_cmd = "{haproxy} -c -q -f {{{{src}}}}"
reload_cmd = "{proxyctl} reload --config {cfg} --master-socket {master} --haproxy-bin {haproxy} --timeout 10s"
wait = "20ms:200ms"
max_drop = "100%"
"#,
                cfg = cfg.display(),
                haproxy = haproxy.display(),
                proxyctl = bin("proxyctl").display(),
                master = master.display(),
            ),
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
        let confgen = Daemon::start(
            "confgen",
            &bin("confgen"),
            &[
                "run".into(),
                "--confdir".into(),
                confdir.display().to_string(),
                "--etcd-endpoints".into(),
                endpoints,
            ],
            d,
        );
        let node = format!("e2e-{tag}-{}", std::process::id());
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

    fn start_presence(&mut self) {
        let state = self.dir.path().join("presence.state");
        let args: Vec<String> = [
            "--node",
            &self.node,
            "--advertise-ip",
            "127.0.0.1",
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

    /// Starts a busybox httpd container for `service` that answers with its own name and keeps
    /// serving for 2 s after SIGTERM (like a real app draining).
    fn container(&self, service: &str, name: &str) -> Container {
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

    fn get(&self, service: &str) -> std::io::Result<(u16, String)> {
        http_get(
            self.http_port,
            &format!("{service}.localhost"),
            "/",
            Duration::from_secs(3),
        )
    }

    fn config(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.cfg")).unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
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
    fn wait_served_by(&self, service: &str, names: &[&str], timeout: Duration) {
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

fn svc(tag: &str) -> String {
    format!("e2e{}{tag}", std::process::id())
}

#[test]
fn a_new_container_is_served_and_a_stopped_one_drains_without_failed_requests() {
    let chain = Chain::start("serve");
    let service = svc("a");
    let names: Vec<String> = (0..3).map(|i| unique_name(&format!("serve{i}"))).collect();

    let t0 = Instant::now();
    let first = chain.container(&service, &names[0]);
    chain.wait_served_by(&service, &[&names[0]], Duration::from_secs(20));
    eprintln!(
        "first container served {} ms after docker run returned",
        t0.elapsed().as_millis()
    );

    let second = chain.container(&service, &names[1]);
    let _third = chain.container(&service, &names[2]);
    chain.wait_served_by(
        &service,
        &[&names[0], &names[1], &names[2]],
        Duration::from_secs(20),
    );

    // Stop one of three while a bounded request loop runs: no request may fail.
    let stopper = std::thread::spawn({
        let name = second.name.clone();
        move || {
            std::thread::sleep(Duration::from_millis(300));
            let out = std::process::Command::new("docker")
                .args(["stop", "-t", "10", &name])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "docker stop: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
    let (mut ok, mut failed, mut answers) = (
        0,
        Vec::new(),
        std::collections::BTreeMap::<String, u32>::new(),
    );
    let loop_start = Instant::now();
    while loop_start.elapsed() < Duration::from_secs(6) && ok + failed.len() < 3000 {
        match chain.get(&service) {
            Ok((200, body)) => {
                ok += 1;
                *answers.entry(body.trim().to_string()).or_default() += 1;
            }
            other => failed.push(format!("{other:?}")),
        }
    }
    stopper.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during docker stop: {:?}\n{}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)],
        chain.diagnostics()
    );
    assert!(
        ok > 50,
        "the loop made too few requests to mean anything: {ok}"
    );
    chain.wait_served_by(&service, &[&names[0], &names[2]], Duration::from_secs(20));
    drop(first);
}

#[test]
fn presence_killed_removes_its_endpoints_and_etcd_restart_recovers() {
    let mut chain = Chain::start("faults");
    let service = svc("b");
    let name = unique_name("faults0");
    let _c = chain.container(&service, &name);
    chain.wait_served_by(&service, &[&name], Duration::from_secs(20));

    // kill -9 presence: the lease expires after TTL and HAProxy stops routing to the container.
    chain.presence.as_mut().unwrap().proc.kill();
    let killed = Instant::now();
    wait_for(
        "the dead host's endpoint to leave HAProxy",
        Duration::from_secs(3 + 3 + 20),
        || matches!(chain.get(&service), Ok((503, _))).then_some(()),
    );
    let gone_after = killed.elapsed();
    eprintln!(
        "endpoint left HAProxy {} ms after kill -9 of presence (TTL {TTL})",
        gone_after.as_millis()
    );
    assert!(
        !chain.config().contains(&chain.node),
        "the rendered config still names the dead node:\n{}",
        chain.config()
    );

    // presence back: served again.
    chain.start_presence();
    chain.wait_served_by(&service, &[&name], Duration::from_secs(20));

    // etcd restarted: the chain recovers by itself, and a container started afterwards is served.
    chain.etcd.kill();
    std::thread::sleep(Duration::from_secs(1));
    chain.etcd.restart();
    let later = unique_name("faults1");
    let _c2 = chain.container(&service, &later);
    chain.wait_served_by(&service, &[&name, &later], Duration::from_secs(40));
    chain.confgen.assert_running();
    chain.presence.as_mut().unwrap().assert_running();
}
