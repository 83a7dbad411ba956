//! `unitgen rollout` end to end, with real parts only: a Debian systemd booted with
//! systemd-nspawn runs the units (`unitgen apply` talks to it over D-Bus), the units run
//! containers on the real Docker engine, presence registers them in a real etcd, confgen renders
//! HAProxy's config from etcd and reloads it, and HTTP load goes through HAProxy the whole time.
//!
//! Each test gets its own machines (two hosts for the main rollout, one for the others), etcd,
//! HAProxy, confgen (tests/common/chain.rs), one presence per host, its own service name and
//! container label, and removes everything on drop, also on failure.
//! Every wait has a deadline.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::chain::{Chain, TTL};
use common::{bin, http_get, Daemon};
use flotilla_harness::docker::busybox_image;
use flotilla_harness::machine::{Bind, Machine};
use flotilla_harness::{run, wait_for};
use flotilla_registry::{EtcdArgs, Health, Keys};

const OLD: &str = "git-aaaaaaa";
const NEW: &str = "git-bbbbbbb";
const BAD: &str = "git-ccccccc";
const REPO: &str = "flotilla-busybox";

/// The test image under the three tags; `BAD` has `/broken`, which makes the container never
/// serve (so its health check never passes).
fn images() {
    let base = busybox_image();
    let docker = flotilla_harness::require("docker", "docker.io");
    let lock = std::fs::File::create("/tmp/flotilla-rollout-images.lock").expect("lock file");
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    for tag in [OLD, NEW] {
        run(Command::new(&docker).args(["tag", base, &format!("{REPO}:{tag}")])).unwrap();
    }
    let bad = format!("{REPO}:{BAD}");
    if run(Command::new(&docker).args(["image", "inspect", &bad])).is_err() {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(ctx.path().join("broken"), "").unwrap();
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM {base}\nCOPY broken /broken\n"),
        )
        .unwrap();
        run(Command::new(&docker)
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &bad])
            .arg(ctx.path()))
        .unwrap();
    }
}

/// One or more systemd hosts with the whole chain around them.
struct Rig {
    machines: Vec<Machine>,
    hosts: Vec<String>,
    presences: Vec<Daemon>,
    chain: Chain,
    service: String,
    instances: u32,
    dir: PathBuf,
}

/// The docker CLI the units use inside each machine. All machines share the test host's
/// engine; this wrapper labels the containers a machine starts with its name, so that each
/// host's presence registers only its own containers, as it would with an engine per host.
const DOCKER_IN_MACHINE: &str = "/usr/local/bin/docker";

/// Consecutive failed checks before Docker calls an instance unhealthy, in the tests that assert
/// the service never drops below what the rollout allows. presence deregisters an instance at
/// its first `unhealthy`; with 1, a single check stalled past its timeout on a loaded machine
/// took an untouched instance out of the registry for 1.4 s (seen: 2 of 3 healthy in a surge
/// rollout), which is the check's verdict, not the rollout's doing. Operators run with 3.
const STEADY_RETRIES: u32 = 3;

fn services_yaml(
    service: &str,
    label: &str,
    instances: u32,
    rollout: &str,
    retries: u32,
) -> String {
    format!(
        r#"services:
  {service}:
    image: {REPO}
    tag: {OLD}
    instances: {instances}
    ports: ["127.0.0.1::8080"]
    labels:
      com.example.e2e: {label}
    command:
      - sh
      - -c
      - >-
        mkdir -p /www && echo ok > /www/index.html;
        if [ -e /broken ]; then trap 'exit 0' TERM; sleep 100000 & wait; exit 0; fi;
        trap 'sleep 2; exit 0' TERM; httpd -f -p 8080 -h /www & wait; wait
    stop_timeout: 5
    health:
      cmd: wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1
      interval: 1s
      # A noisy 2-core machine can stall a check's exec past a second: a slow check must not
      # count as the service going down (seen with 1s: all three instances 'unhealthy' for
      # 0.7 s).
      timeout: 3s
      retries: {retries}
    constraints:
      max_per_host: {per_host}
    rollout: {rollout}
"#,
        per_host = instances
    )
}

impl Rig {
    /// A rig with `hosts` systemd machines whose service has `instances` (spread evenly with
    /// max_per_host) and the `rollout:` settings `rollout` (YAML flow). Its health check needs
    /// [`STEADY_RETRIES`] consecutive failures to call an instance unhealthy.
    fn start(tag: &str, hosts: usize, instances: u32, rollout: &str) -> Rig {
        Rig::start_with_retries(tag, hosts, instances, rollout, STEADY_RETRIES)
    }

    /// Like [`Rig::start`], with the health check's `retries`.
    fn start_with_retries(
        tag: &str,
        hosts: usize,
        instances: u32,
        rollout: &str,
        retries: u32,
    ) -> Rig {
        images();
        // Every simulated host announces 127.0.0.1 (they all run on this machine).
        let mut chain = Chain::start_with(tag, &["--allow-loopback"]);
        chain.presence = None; // one presence per machine instead, below
        let service = format!("ro{}{tag}", std::process::id());
        let dir = chain.dir.path().to_path_buf();
        let label = chain.test_label.clone();
        let names: Vec<String> = (0..hosts)
            .map(|h| format!("{}-{}", chain.node, (b'a' + h as u8) as char))
            .collect();
        let per_host = instances.div_ceil(hosts as u32);
        std::fs::write(
            dir.join("services.yaml"),
            services_yaml(&service, &label, instances, rollout, retries).replace(
                &format!("max_per_host: {instances}"),
                &format!("max_per_host: {per_host}"),
            ),
        )
        .unwrap();
        let mut hosts_yaml = String::from("hosts:\n");
        for n in &names {
            hosts_yaml.push_str(&format!("  {n}: {{address: 127.0.0.1}}\n"));
        }
        std::fs::write(dir.join("hosts.yaml"), hosts_yaml).unwrap();
        // `--via DIR/via {host}`: runs the rest of the command inside that host's machine.
        let via = dir.join("via");
        std::fs::write(
            &via,
            format!(
                "#!/bin/sh\nset -e\nleader=$(cat \"{}/$1.leader\")\nshift\nexec nsenter --target \"$leader\" --mount --pid -- \"$@\"\n",
                dir.display()
            ),
        )
        .unwrap();
        run(Command::new("chmod").arg("755").arg(&via)).unwrap();

        let mut rig = Rig {
            machines: Vec::new(),
            hosts: names.clone(),
            presences: Vec::new(),
            chain,
            service,
            instances,
            dir: dir.clone(),
        };
        for n in &names {
            let machine = Machine::boot(
                n,
                &[Bind {
                    host: bin("unitgen"),
                    inside: "/usr/local/bin/unitgen".into(),
                    read_only: true,
                }],
                &dir,
            );
            machine.write_file(
                DOCKER_IN_MACHINE,
                &format!(
                    "#!/bin/sh\nif [ \"$1\" = run ]; then shift; exec /usr/bin/docker run --label com.example.e2e.host={n} \"$@\"; fi\nexec /usr/bin/docker \"$@\"\n"
                ),
            );
            machine.exec(&["chmod", "755", DOCKER_IN_MACHINE]).unwrap();
            std::fs::write(
                dir.join(format!("{n}.leader")),
                machine.leader().to_string(),
            )
            .unwrap();
            rig.machines.push(machine);
            let args: Vec<String> = [
                "--node",
                n,
                "--advertise-ip",
                "127.0.0.1",
                "--ttl",
                TTL,
                "--resync",
                "5s",
                "--label-filter",
                &format!("com.example.e2e={label}"),
                "--label-filter",
                &format!("com.example.e2e.host={n}"),
                "--state-file",
                &dir.join(format!("presence-{n}.state"))
                    .display()
                    .to_string(),
                "--etcd-endpoints",
                &rig.chain.etcd.endpoint(),
                // Every simulated host announces 127.0.0.1 (one machine).
                "--allow-loopback",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            rig.presences.push(Daemon::start(
                &format!("presence-{n}"),
                &bin("presence"),
                &args,
                &dir,
            ));
        }
        // Deploy the old tag: generate, then apply on each host, as an operator would.
        rig.unitgen_ok(&[
            "services.yaml",
            "--format",
            "systemd",
            "--hosts",
            "hosts.yaml",
            "--no-pull",
            "--docker",
            DOCKER_IN_MACHINE,
            "-o",
            "units",
        ]);
        let units = rig.unitgen_ok(&[
            "services.yaml",
            "--format",
            "systemd",
            "--hosts",
            "hosts.yaml",
            "--no-pull",
            "--docker",
            DOCKER_IN_MACHINE,
            "--lock",
            "units/placement.lock",
        ]);
        for h in &names {
            let mut apply = rig.via(
                h,
                &[
                    "/usr/local/bin/unitgen",
                    "apply",
                    "--host",
                    h,
                    "--units",
                    "-",
                ],
            );
            pipe(&mut apply, &units);
        }
        rig.wait_healthy(instances, OLD, Duration::from_secs(60));
        wait_for(
            "HAProxy to serve the service",
            Duration::from_secs(30),
            || matches!(rig.get(), Ok((200, _))).then_some(()),
        );
        rig
    }

    fn via(&self, host: &str, args: &[&str]) -> Command {
        let mut c = Command::new(self.dir.join("via"));
        c.arg(host).args(args);
        c
    }

    fn unitgen(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("unitgen"));
        c.args(args).current_dir(&self.dir);
        for (k, _) in std::env::vars() {
            if k.starts_with("FLOTILLA_") {
                c.env_remove(k);
            }
        }
        c
    }

    fn unitgen_ok(&self, args: &[&str]) -> String {
        run(&mut self.unitgen(args)).unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    fn rollout(&self, tag: &str, holder: &str) -> Command {
        let via = format!("{} {{host}}", self.dir.join("via").display());
        self.unitgen(&[
            "rollout",
            "services.yaml",
            "--hosts",
            "hosts.yaml",
            "-o",
            "units",
            "--no-pull",
            "--docker",
            DOCKER_IN_MACHINE,
            "--service",
            &self.service,
            "--tag",
            tag,
            "--via",
            &via,
            "--remote-unitgen",
            "/usr/local/bin/unitgen",
            "--holder",
            holder,
            "--etcd-endpoints",
            &self.chain.etcd.endpoint(),
        ])
    }

    fn get(&self) -> std::io::Result<(u16, String)> {
        http_get(
            self.chain.http_port,
            &format!("{}.localhost", self.service),
            "/",
            Duration::from_secs(3),
        )
    }

    /// Healthy endpoints of the service: (container name, image).
    fn healthy(&self) -> Vec<(String, String)> {
        registry_healthy(&self.chain.etcd.endpoint(), &self.service)
    }

    fn wait_healthy(&self, n: u32, tag: &str, timeout: Duration) {
        let image = format!("{REPO}:{tag}");
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.healthy();
            if h.len() == n as usize && h.iter().all(|(_, i)| *i == image) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not {n} healthy instances on {tag} within {timeout:?}: {h:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The unit file of instance `i`, from whichever machine has it installed.
    fn installed_unit(&self, i: u32) -> String {
        let path = format!("/etc/systemd/system/{}@{i}.service", self.service);
        self.machines
            .iter()
            .find_map(|m| m.exec(&["cat", &path]).ok())
            .unwrap_or_else(|| panic!("no machine has {path}"))
    }

    fn diagnostics(&self) -> String {
        let mut out = self.chain.diagnostics();
        for p in &self.presences {
            let log = p.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            out.push_str(&format!(
                "\n--- {} (last lines)\n{}",
                p.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        for m in &self.machines {
            let console = m.console();
            let tail: Vec<&str> = console.lines().rev().take(20).collect();
            out.push_str(&format!(
                "\n--- machine {} console (last lines)\n{}",
                m.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        out
    }

    /// Runs HTTP load through HAProxy and samples the registry every 50 ms while `f` runs.
    fn under_load<T>(&self, f: impl FnOnce() -> T) -> (T, Load) {
        let stop = Arc::new(AtomicBool::new(false));
        let port = self.chain.http_port;
        let host = format!("{}.localhost", self.service);
        let load = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let (mut ok, mut failed) = (0u64, Vec::new());
                let start = Instant::now();
                // Bounded in time and count.
                while !stop.load(Ordering::SeqCst)
                    && start.elapsed() < Duration::from_secs(240)
                    && ok + (failed.len() as u64) < 200_000
                {
                    match http_get(port, &host, "/", Duration::from_secs(3)) {
                        Ok((200, _)) => ok += 1,
                        other => {
                            failed.push(format!("{:.1}s: {other:?}", start.elapsed().as_secs_f64()))
                        }
                    }
                }
                (ok, failed)
            }
        });
        let views = Arc::new(Mutex::new(Vec::<View>::new()));
        let sampler = std::thread::spawn({
            let stop = stop.clone();
            let views = views.clone();
            let endpoint = self.chain.etcd.endpoint();
            let service = self.service.clone();
            let admin = self.chain.dir.path().join("admin.sock");
            move || {
                let start = Instant::now();
                while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(240) {
                    let t = Instant::now();
                    let seen = registry_view(&endpoint, &service);
                    let proxy = proxy_servers(&admin, &service);
                    views.lock().unwrap().push(View {
                        at: start.elapsed().as_secs_f64(),
                        seen,
                        proxy,
                    });
                    if let Some(rest) = Duration::from_millis(50).checked_sub(t.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            }
        });
        let out = f();
        stop.store(true, Ordering::SeqCst);
        let (ok, failed) = load.join().unwrap();
        sampler.join().unwrap();
        let views = views.lock().unwrap().clone();
        let samples = views
            .iter()
            .filter_map(|v| v.seen.as_ref().map(|s| healthy_count(s)))
            .collect();
        (
            out,
            Load {
                ok,
                failed,
                samples,
                views,
            },
        )
    }
}

struct Load {
    ok: u64,
    failed: Vec<String>,
    /// Healthy instances per registry sample that could be read.
    samples: Vec<usize>,
    views: Vec<View>,
}

/// One registry sample: seconds since the load started, and the service's records (None when
/// etcd could not be read; such a sample says nothing about the instances).
#[derive(Clone)]
struct View {
    at: f64,
    seen: Option<Vec<Seen>>,
    /// HAProxy's servers for the service at the same moment (`show servers state`, abridged).
    proxy: String,
}

/// The service's servers as the running HAProxy has them: name, address:port, operational
/// and administrative state (or the error reading them).
fn proxy_servers(admin: &Path, service: &str) -> String {
    let servers = flotilla_harness::haproxy::cli_command(admin, "show servers state")
        .map_err(|e| e.to_string())
        .and_then(|text| proxyctl::parse_servers_state(&text));
    match servers {
        Ok(servers) => servers
            .iter()
            .filter(|s| s.backend.contains(service))
            .map(|s| {
                format!(
                    "{}={}:{} op{} adm{}",
                    s.name, s.addr, s.port, s.op_state, s.admin_state
                )
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(e) => format!("({e})"),
    }
}

/// Distinct healthy instances (container, image) in one sample, sorted.
fn healthy(seen: &[Seen]) -> BTreeSet<(String, String)> {
    seen.iter()
        .filter(|r| r.health == Health::Healthy)
        .map(|r| (r.container.clone(), r.image.clone()))
        .collect()
}

/// How many distinct healthy instances one sample has.
fn healthy_count(seen: &[Seen]) -> usize {
    healthy(seen).len()
}

impl Load {
    /// The samples with fewer than `min` healthy instances, with the one before each run of
    /// them, as text: what an operator needs to see which instance went and why.
    fn dips(&self, min: usize) -> String {
        let mut out = String::new();
        let unread = self.views.iter().filter(|v| v.seen.is_none()).count();
        if unread > 0 {
            out.push_str(&format!("{unread} samples could not read etcd\n"));
        }
        let mut prev: Option<&View> = None;
        let mut shown = 0;
        for v in &self.views {
            let Some(seen) = &v.seen else { continue };
            if healthy_count(seen) < min && shown < 40 {
                if let Some(p) =
                    prev.filter(|p| p.seen.as_ref().is_some_and(|s| healthy_count(s) >= min))
                {
                    out.push_str(&format!("  before: {}\n", describe(p)));
                }
                out.push_str(&format!("  dip:    {}\n", describe(v)));
                shown += 1;
            }
            prev = Some(v);
        }
        out
    }
}

impl Load {
    /// When requests failed (first, last) and what the registry and HAProxy showed from 1 s
    /// before the first failure to its end (every 5th sample).
    fn failures(&self) -> String {
        let times: Vec<f64> = self
            .failed
            .iter()
            .filter_map(|f| f.split('s').next()?.parse().ok())
            .collect();
        let (Some(first), Some(last)) = (
            times.iter().copied().reduce(f64::min),
            times.iter().copied().reduce(f64::max),
        ) else {
            return String::new();
        };
        let mut out = format!("failures from {first:.1}s to {last:.1}s\n");
        for (i, v) in self
            .views
            .iter()
            .filter(|v| v.at >= first - 1.0 && v.at <= last + 0.5)
            .enumerate()
        {
            if i % 5 == 0 {
                out.push_str(&format!("  {}\n", describe(v)));
            }
        }
        out
    }
}

fn describe(v: &View) -> String {
    let recs: Vec<String> = v
        .seen
        .iter()
        .flatten()
        .map(|r| {
            format!(
                "{}@{} {} {:?}",
                r.container,
                r.node,
                r.image.rsplit(':').next().unwrap_or(""),
                r.health
            )
        })
        .collect();
    format!("{:.2}s [{}] haproxy: {}", v.at, recs.join(", "), v.proxy)
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Power the machine off (systemd stops every unit: docker stop, and --rm removes the
        // containers), then remove whatever a failure left behind.
        for m in &mut self.machines {
            m.shutdown(Duration::from_secs(30));
        }
        let docker = flotilla_harness::require("docker", "docker.io");
        for i in 1..=self.instances {
            for name in [
                format!("{}-{i}", self.service),
                format!("{}-{i}-surge", self.service),
            ] {
                let _ = Command::new(&docker).args(["rm", "-f", &name]).output();
            }
        }
    }
}

fn pipe(cmd: &mut Command, input: &str) -> String {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = wait_output(child, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for a child with a deadline; kills it when the deadline passes.
fn wait_output(mut child: std::process::Child, timeout: Duration) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "command did not finish within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Healthy endpoints of `service` in etcd, read with the registry crate: (container, image).
fn registry_healthy(endpoint: &str, service: &str) -> Vec<(String, String)> {
    healthy(&registry_view(endpoint, service).unwrap_or_default())
        .into_iter()
        .collect()
}

/// One endpoint record of the service as the registry holds it.
#[derive(Clone, Debug)]
struct Seen {
    container: String,
    image: String,
    health: Health,
    node: String,
}

/// Every endpoint record of `service` in etcd, or None when etcd could not be read.
fn registry_view(endpoint: &str, service: &str) -> Option<Vec<Seen>> {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    }
    let args = EtcdArgs {
        endpoints: vec![endpoint.to_string()],
        ..EtcdArgs::default()
    };
    let keys = Keys::new("/flotilla").unwrap();
    RT.with(|rt| {
        rt.block_on(async {
            let mut client = args.connect().await.ok()?;
            let snap = flotilla_registry::fetch_snapshot(&mut client, &keys, &keys.endpoints())
                .await
                .ok()?;
            Some(
                snap.services()
                    .get(service)
                    .into_iter()
                    .flatten()
                    .map(|e| Seen {
                        container: e.meta.get("container_name").cloned().unwrap_or_default(),
                        image: e.image.clone(),
                        health: e.health,
                        node: e.node.clone(),
                    })
                    .collect(),
            )
        })
    })
}

fn lock_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("units/placement.lock")).unwrap()
}

#[test]
fn a_rollout_under_load_replaces_every_instance_one_at_a_time_without_failed_requests() {
    let t0 = Instant::now();
    let rig = Rig::start(
        "roll",
        2,
        4,
        "{max_unavailable: 1, max_surge: 0, progress_deadline: 60s}",
    );
    eprintln!("rig up in {:.1} s", t0.elapsed().as_secs_f64());
    let t1 = Instant::now();
    let (out, load) = rig.under_load(|| {
        let child = rig
            .rollout(NEW, "driver-one")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, Duration::from_secs(240))
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "rollout took {:.1} s:\n{stderr}",
        t1.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "rollout failed ({}):\n{stderr}\n{}",
        out.status,
        rig.diagnostics()
    );
    // Two instances on each host, and each host's systemd replaced its own.
    for h in &rig.hosts {
        assert_eq!(
            stderr
                .matches(&format!("host {h}: 0 installed, 1 changed"))
                .count(),
            2,
            "{stderr}"
        );
    }
    assert!(
        load.failed.is_empty(),
        "{} of {} requests failed: {:?}\n{}\n{}",
        load.failed.len(),
        load.ok + load.failed.len() as u64,
        &load.failed[..load.failed.len().min(5)],
        load.failures(),
        rig.diagnostics()
    );
    assert!(
        load.ok > 100,
        "too few requests to mean anything: {}",
        load.ok
    );
    let min = load.samples.iter().copied().min().unwrap_or(0);
    assert!(
        load.samples.len() > 20 && min >= 3,
        "healthy instances in etcd fell to {min} (samples every 50 ms: {:?})\n{}\n{}",
        load.samples,
        load.dips(3),
        rig.diagnostics()
    );
    eprintln!(
        "{} requests, 0 failed; {} registry samples, min {min} healthy",
        load.ok,
        load.samples.len()
    );
    rig.wait_healthy(4, NEW, Duration::from_secs(10));

    // The lock records the deployed tag, so generating again reproduces what runs.
    let lock = lock_text(&rig.dir);
    for i in 1..=4 {
        assert!(lock.contains(&format!("      {i}: \"{NEW}\"")), "{lock}");
    }
    let again = rig.unitgen_ok(&[
        "services.yaml",
        "--format",
        "systemd",
        "--hosts",
        "hosts.yaml",
        "--no-pull",
        "--docker",
        DOCKER_IN_MACHINE,
        "--lock",
        "units/placement.lock",
    ]);
    for i in 1..=4 {
        let installed = rig.installed_unit(i);
        assert!(installed.contains(&format!("{REPO}:{NEW}")), "{installed}");
        assert!(
            again.contains(&installed),
            "generated units differ from what runs in the machine:\n{installed}\n---\n{again}"
        );
    }
    // A second rollout to the same tag has nothing to do.
    let out = rig.rollout(NEW, "driver-one").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to do"));
    let status = rig.unitgen_ok(&[
        "status",
        "services.yaml",
        "--hosts",
        "hosts.yaml",
        "-o",
        "units",
        "--etcd-endpoints",
        &rig.chain.etcd.endpoint(),
    ]);
    assert!(status.contains("rollouts in progress: none"), "{status}");
    assert!(
        status.contains(&format!("tag {NEW} (deployed by rollout)")),
        "{status}"
    );
}

#[test]
fn a_tag_that_never_becomes_healthy_stops_after_the_first_batch_and_rolls_it_back() {
    // One failed check marks the broken instance unhealthy at once, so the rollout names its
    // health within the deadline; this test asserts no strength figure a flap could break.
    let rig = Rig::start_with_retries(
        "bad",
        1,
        4,
        "{max_unavailable: 1, max_surge: 0, progress_deadline: 12s}",
        1,
    );
    let (out, load) = rig.under_load(|| {
        let child = rig
            .rollout(BAD, "driver-bad")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, Duration::from_secs(180))
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("rollout output:\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{stderr}\n{}",
        rig.diagnostics()
    );
    let first = format!("{}@1 on {}", rig.service, rig.hosts[0]);
    assert!(stderr.contains(&first), "names the instance: {stderr}");
    assert!(
        stderr.contains("health unhealthy"),
        "names its health: {stderr}"
    );
    assert!(stderr.contains("rolled back"), "{stderr}");
    assert!(
        !stderr.contains("batch 2"),
        "stops after the first batch: {stderr}"
    );
    assert!(
        load.failed.is_empty(),
        "{} requests failed: {:?}\n{}\n{}",
        load.failed.len(),
        &load.failed[..load.failed.len().min(5)],
        load.failures(),
        rig.diagnostics()
    );
    rig.wait_healthy(4, OLD, Duration::from_secs(20));
    assert!(rig.installed_unit(1).contains(&format!("{REPO}:{OLD}")));
    assert!(!lock_text(&rig.dir).contains(BAD));
}

#[test]
fn a_second_concurrent_rollout_is_refused_naming_the_holder() {
    let rig = Rig::start(
        "twice",
        1,
        2,
        "{max_unavailable: 1, progress_deadline: 60s}",
    );
    // This rollout's hosts apply through systemctl instead of D-Bus (apply's fallback).
    let first = rig
        .rollout(NEW, "driver-first")
        .arg("--apply-arg=--systemctl")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let key = format!("/flotilla/rollouts/{}", rig.service);
    wait_for(
        "the first rollout's lock in etcd",
        Duration::from_secs(30),
        || {
            rig.chain
                .etcd
                .etcdctl(&["get", &key, "--print-value-only"])
                .ok()
                .filter(|v| v.contains("driver-first"))
        },
    );
    let status = rig.unitgen_ok(&[
        "status",
        "services.yaml",
        "--hosts",
        "hosts.yaml",
        "-o",
        "units",
        "--etcd-endpoints",
        &rig.chain.etcd.endpoint(),
    ]);
    assert!(
        status.contains(&format!(
            "rollouts in progress:\n  {} to {NEW} by driver-first",
            rig.service
        )),
        "{status}"
    );
    let second = rig.rollout(NEW, "driver-second").output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("refused") && stderr.contains("driver-first"),
        "{stderr}"
    );
    let out = wait_output(first, Duration::from_secs(180));
    assert!(
        out.status.success(),
        "the first rollout goes on: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rig.wait_healthy(2, NEW, Duration::from_secs(10));
    // The lock is released at the end.
    assert_eq!(
        rig.chain
            .etcd
            .etcdctl(&["get", &key, "--print-value-only"])
            .unwrap()
            .trim(),
        ""
    );
}

#[test]
fn a_surge_rollout_never_drops_below_full_strength() {
    let rig = Rig::start(
        "surge",
        1,
        3,
        "{max_unavailable: 0, max_surge: 1, progress_deadline: 60s}",
    );
    let (out, load) = rig.under_load(|| {
        let child = rig
            .rollout(NEW, "driver-surge")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, Duration::from_secs(240))
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("rollout output:\n{stderr}");
    assert!(out.status.success(), "{stderr}\n{}", rig.diagnostics());
    assert!(stderr.contains("surge: [1]"), "{stderr}");
    assert!(
        load.failed.is_empty(),
        "{} requests failed: {:?}\n{}\n{}",
        load.failed.len(),
        &load.failed[..load.failed.len().min(5)],
        load.failures(),
        rig.diagnostics()
    );
    let min = load.samples.iter().copied().min().unwrap_or(0);
    assert!(
        load.samples.len() > 20 && min >= 3,
        "healthy instances in etcd fell to {min} with max_unavailable 0: {:?}\n{}\n{}",
        load.samples,
        load.dips(3),
        rig.diagnostics()
    );
    rig.wait_healthy(3, NEW, Duration::from_secs(10));
    // The surge units are gone.
    let units = rig.machines[0]
        .exec(&["ls", "/etc/systemd/system"])
        .unwrap();
    assert!(!units.contains("-surge.service"), "{units}");
}
