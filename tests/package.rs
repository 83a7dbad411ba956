//! The Debian packages of `scripts/package`, installed with `dpkg -i` on a real systemd host
//! (a Debian bookworm booted with systemd-nspawn, harness/src/machine.rs) and run with
//! `systemctl start`, as an operator would: what lands where (units, man pages, completions,
//! the conffiles in /etc/flotilla, the flotilla-presence user in group docker), presence
//! registering a container of the host's Docker engine in a real etcd as its own user, confgen
//! rendering a resource from /etc/flotilla/confgen, `systemctl stop` taking the endpoint out of
//! etcd, and `dpkg --purge` stopping and removing everything.
//!
//! The packages are built before the tests (`scripts/package --dev`, which scripts/test runs)
//! into `target/debian/dev`, or taken from `$FLOTILLA_DEB_DIR`. Missing packages fail the test
//! with the command that builds them: nothing is skipped.
//!
//! The test has its own machine, etcd, node name, service name and container label, and
//! removes them on drop, also on failure. Every wait has a deadline.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use common::bin;
use flotilla_harness::docker::{busybox_image, unique_name, Container};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::machine::{Bind, Machine};

/// The directory of the packages, when not `target/debian/dev`.
const DEB_DIR_ENV: &str = "FLOTILLA_DEB_DIR";

/// The Debian packages and the binary each ships.
const PACKAGES: [(&str, &str); 4] = [
    ("flotilla-presence", "presence"),
    ("flotilla-confgen", "confgen"),
    ("flotilla-proxyctl", "proxyctl"),
    ("flotilla-unitgen", "unitgen"),
];

/// Where the machine sees the packages.
const DEBS_INSIDE: &str = "/mnt/flotilla-debs";

/// Bound on a unit's start (both are `Type=notify`: `systemctl start` returns at READY=1) and
/// on every wait for the registry or a rendered file.
const LONG: Duration = Duration::from_secs(60);

/// The file the test's confgen resource renders, inside the machine.
const RENDERED: &str = "/srv/flotilla-pkgtest.txt";

/// The package directory and the four .deb files in it. Fails with how to build them when one
/// is missing, and when one is older than the dev binary it should hold (a stale package would
/// test other code than the tree's).
fn packages() -> (PathBuf, Vec<PathBuf>) {
    let dir = match std::env::var_os(DEB_DIR_ENV) {
        Some(d) => PathBuf::from(d),
        // target/debug/presence -> target/debian/dev
        None => bin("presence")
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("debian/dev"),
    };
    let how = format!(
        "build them with `scripts/package --dev` (scripts/test does, before the tests; it writes \
         target/debian/dev), or set {DEB_DIR_ENV} to a directory of scripts/package's output"
    );
    let listing: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("no package directory {}: {e}; {how}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut debs = Vec::new();
    for (package, _) in PACKAGES {
        let found: Vec<&String> = listing
            .iter()
            .filter(|f| f.starts_with(&format!("{package}_")) && f.ends_with(".deb"))
            .collect();
        assert!(
            found.len() == 1,
            "expected one {package}_*.deb in {}, found {found:?}; {how}",
            dir.display()
        );
        let deb = dir.join(found[0]);
        if let Some((source, _)) = newest_source().filter(|(_, t)| *t > modified(&deb)) {
            panic!(
                "{} is older than {}: the package holds an older build; {how}",
                deb.display(),
                source.display()
            );
        }
        debs.push(deb);
    }
    (dir, debs)
}

fn modified(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The most recently modified file among what the packages are built from: the sources and
/// manifests of the crates in the binaries, Cargo.lock, packaging/ and templates/. (Not the
/// binaries: `cargo test` may relink them after `scripts/package --dev`, with the features of
/// the tests' dependencies, from the same sources.)
fn newest_source() -> Option<(PathBuf, SystemTime)> {
    fn walk(p: &Path, newest: &mut Option<(PathBuf, SystemTime)>) {
        if p.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), newest);
            }
        } else if p.is_file() {
            let t = modified(p);
            if newest.as_ref().is_none_or(|(_, n)| t > *n) {
                *newest = Some((p.to_path_buf(), t));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut newest = None;
    for c in [
        "registry",
        "clidoc",
        "presence",
        "confgen",
        "proxyctl",
        "fleet-units",
    ] {
        walk(&root.join(c).join("src"), &mut newest);
        walk(&root.join(c).join("Cargo.toml"), &mut newest);
    }
    for p in ["Cargo.toml", "Cargo.lock", "packaging", "templates"] {
        walk(&root.join(p), &mut newest);
    }
    newest
}

/// The lease of `key` in etcd, if the key is there.
fn lease_of(etcd: &Etcd, key: &str) -> Option<i64> {
    let out = etcd.etcdctl(&["get", "-w", "json", key]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v["kvs"][0]["lease"].as_i64()
}

/// The machine, with helpers that put both units' state and journals into failure messages.
struct Host {
    machine: Machine,
}

impl Host {
    /// Runs `args` inside the machine and returns stdout; panics with its output and the
    /// [`Host::diagnostics`] if it fails.
    fn ok(&self, args: &[&str]) -> String {
        self.machine
            .exec(args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    /// [`Host::ok`] of `sh -c script`.
    fn sh(&self, script: &str) -> String {
        self.ok(&["sh", "-c", script])
    }

    /// stdout of `args` inside the machine, trimmed, whatever the exit status.
    fn out(&self, args: &[&str]) -> String {
        let out = self
            .machine
            .exec_cmd(args)
            .output()
            .unwrap_or_else(|e| panic!("nsenter {args:?}: {e}"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A file inside the machine.
    fn file(&self, path: &str) -> String {
        self.ok(&["cat", path])
    }

    /// The state, journal and status of both units, and the console's last lines.
    fn diagnostics(&self) -> String {
        let mut s = String::new();
        for unit in ["presence.service", "confgen.service"] {
            s.push_str(&format!(
                "\n--- {unit}: {}\n{}\n{}",
                self.out(&["systemctl", "is-active", unit]),
                self.out(&["systemctl", "status", "--no-pager", "--lines=0", unit]),
                self.out(&["journalctl", "--no-pager", "-n", "60", "-u", unit])
            ));
        }
        let console = self.machine.console();
        let tail: Vec<&str> = console.lines().rev().take(20).collect();
        s.push_str(&format!(
            "\n--- machine {} console (last lines)\n{}",
            self.machine.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
        s
    }

    /// `systemctl start UNIT`, bounded by [`LONG`], then polls until it is `active`.
    fn start(&self, unit: &str) {
        let t = Instant::now();
        let started = self.machine.exec(&[
            "timeout",
            &LONG.as_secs().to_string(),
            "systemctl",
            "start",
            unit,
        ]);
        if let Err(e) = started {
            panic!("systemctl start {unit}: {e}\n{}", self.diagnostics());
        }
        self.wait_state(unit, "active");
        eprintln!(
            "{unit} active {:.1} s after systemctl start",
            t.elapsed().as_secs_f64()
        );
    }

    /// Polls `systemctl is-active UNIT` until it says `state`.
    fn wait_state(&self, unit: &str, state: &str) {
        let deadline = Instant::now() + LONG;
        loop {
            let now = self.out(&["systemctl", "is-active", unit]);
            if now == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{unit} is {now:?}, not {state:?}, {LONG:?} on{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `cond` holds, or panics naming `what` with the diagnostics.
    fn wait(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + LONG;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out after {LONG:?} waiting for {what}{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `Uid:` and `Groups:` lines of the unit's main process.
    fn main_process_ids(&self, unit: &str) -> (String, String) {
        let pid = self.ok(&["systemctl", "show", "-p", "MainPID", "--value", unit]);
        let pid = pid.trim();
        assert!(
            pid != "0" && !pid.is_empty(),
            "{unit} has no main process{}",
            self.diagnostics()
        );
        let status = self.file(&format!("/proc/{pid}/status"));
        let line = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
                .trim()
                .to_string()
        };
        (line("Uid:"), line("Groups:"))
    }
}

#[test]
fn the_debian_packages_install_with_dpkg_and_their_daemons_run_under_systemd() {
    let t0 = Instant::now();
    let (deb_dir, debs) = packages();
    let image = busybox_image();
    let etcd = Etcd::start();
    let tag = format!("{}", std::process::id());
    let node = format!("pkg-{tag}");
    let service = format!("pkg{tag}");
    let label = format!("com.example.e2e=pkg-{tag}");
    let dir = tempfile::tempdir().expect("tempdir");
    let host = Host {
        machine: Machine::boot(
            &format!("flotilla-pkg-{tag}"),
            &[Bind {
                host: deb_dir.clone(),
                inside: DEBS_INSIDE.into(),
                read_only: true,
            }],
            dir.path(),
        ),
    };
    eprintln!("machine booted after {:.1} s", t0.elapsed().as_secs_f64());

    // On a real host Docker's package has created the group docker that owns its socket; here
    // the socket is the test host's, so the group gets the socket's gid.
    let gid = host.ok(&["stat", "-c", "%g", "/var/run/docker.sock"]);
    let gid = gid.trim();
    let taken = host.out(&["getent", "group", gid]);
    assert!(
        taken.is_empty(),
        "the Docker socket's gid {gid} is the machine's group {taken:?}: the machine cannot \
         have a group docker with that gid"
    );
    host.ok(&["groupadd", "--system", "--gid", gid, "docker"]);

    // --- dpkg -i
    let files: Vec<String> = debs
        .iter()
        .map(|d| format!("{DEBS_INSIDE}/{}", d.file_name().unwrap().to_string_lossy()))
        .collect();
    let mut dpkg = vec!["dpkg", "-i"];
    dpkg.extend(files.iter().map(String::as_str));
    let t = Instant::now();
    host.ok(&dpkg);
    eprintln!("dpkg -i of 4 packages: {:.1} s", t.elapsed().as_secs_f64());

    // --- what landed
    for (package, binary) in PACKAGES {
        let status = host.ok(&["dpkg-query", "-W", "-f=${Status}", package]);
        assert_eq!(status, "install ok installed", "{package}");
        let version = host.ok(&[&format!("/usr/bin/{binary}"), "--version"]);
        assert!(version.starts_with(binary), "{binary} --version: {version}");
        // The man page, gzipped per Debian policy, generated from clap.
        let man = host.sh(&format!("zcat /usr/share/man/man1/{binary}.1.gz"));
        assert!(
            man.contains(&format!(".TH {binary} 1")),
            "{binary}.1: {man}"
        );
        for completion in [
            format!("/usr/share/bash-completion/completions/{binary}"),
            format!("/usr/share/zsh/vendor-completions/_{binary}"),
            format!("/usr/share/fish/vendor_completions.d/{binary}.fish"),
        ] {
            let text = host.file(&completion);
            assert!(text.contains(binary), "{completion}: {text}");
        }
        // The bash completion is valid bash.
        host.ok(&[
            "bash",
            "-n",
            &format!("/usr/share/bash-completion/completions/{binary}"),
        ]);
    }
    // Subcommands have their own pages.
    for page in ["confgen-run", "proxyctl-reload", "unitgen-rollout"] {
        host.ok(&["test", "-f", &format!("/usr/share/man/man1/{page}.1.gz")]);
    }
    let presence_man = host.sh("zcat /usr/share/man/man1/presence.1.gz");
    assert!(presence_man.contains("advertise"), "{presence_man}");

    // The units, installed and neither enabled nor started by the packages.
    for unit in ["presence.service", "confgen.service"] {
        host.ok(&["test", "-f", &format!("/usr/lib/systemd/system/{unit}")]);
        assert_eq!(
            host.out(&["systemctl", "is-enabled", unit]),
            "disabled",
            "{unit}"
        );
        assert_eq!(
            host.out(&["systemctl", "is-active", unit]),
            "inactive",
            "{unit}"
        );
    }
    let unit = host.ok(&["systemctl", "cat", "presence.service"]);
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "User=flotilla-presence",
        "EnvironmentFile=-/etc/flotilla/presence.env",
        "ExecStart=/usr/bin/presence",
    ] {
        assert!(
            unit.contains(line),
            "presence.service lacks {line}:\n{unit}"
        );
    }
    let unit = host.ok(&["systemctl", "cat", "confgen.service"]);
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "EnvironmentFile=-/etc/flotilla/confgen.env",
        "ExecStart=/usr/bin/confgen run",
    ] {
        assert!(unit.contains(line), "confgen.service lacks {line}:\n{unit}");
    }
    assert!(!unit.contains("User="), "confgen runs as root:\n{unit}");
    // systemd finds nothing wrong with them (unknown settings, bad paths, missing users).
    let verify = host
        .machine
        .exec_cmd(&[
            "systemd-analyze",
            "verify",
            // The machine has no man(1) to look the Documentation= pages up with.
            "--man=no",
            "presence.service",
            "confgen.service",
        ])
        .output()
        .expect("systemd-analyze");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // The configuration: conffiles in /etc/flotilla, the env files readable by root only.
    for (package, conffile) in [
        ("flotilla-presence", "/etc/flotilla/presence.env"),
        ("flotilla-confgen", "/etc/flotilla/confgen.env"),
        (
            "flotilla-confgen",
            "/etc/flotilla/confgen/templates/haproxy.cfg.tmpl",
        ),
        (
            "flotilla-confgen",
            "/etc/flotilla/confgen/conf.d/haproxy.toml.example",
        ),
    ] {
        let conffiles = host.ok(&["dpkg-query", "-W", "-f=${Conffiles}", package]);
        assert!(
            conffiles.contains(conffile),
            "{conffile} is not a conffile of {package}: {conffiles}"
        );
    }
    for env in ["/etc/flotilla/presence.env", "/etc/flotilla/confgen.env"] {
        assert_eq!(
            host.ok(&["stat", "-c", "%a %U", env]).trim(),
            "600 root",
            "{env}"
        );
    }

    // The user: a system user without a login shell, in group docker.
    let passwd = host.ok(&["getent", "passwd", "flotilla-presence"]);
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    let uid: u32 = fields[2].parse().expect("uid");
    assert!(
        uid < 1000,
        "flotilla-presence is not a system user: {passwd}"
    );
    assert!(fields[6].ends_with("nologin"), "login shell: {passwd}");
    let groups = host.ok(&["id", "-nG", "flotilla-presence"]);
    assert!(
        groups.split_whitespace().any(|g| g == "docker"),
        "flotilla-presence is not in group docker: {groups}"
    );
    host.ok(&["test", "-f", "/usr/lib/sysusers.d/flotilla-presence.conf"]);

    // --- both unconfigured, as installed (presence.env sets nothing, conf.d has only
    // examples): each fails at once, naming what is missing, and systemd does not restart it
    // (exit 2 is a usage error).
    for (unit, missing) in [
        ("presence.service", "--node"),
        ("confgen.service", "no *.toml template resources found"),
    ] {
        let unconfigured = host.machine.exec(&[
            "timeout",
            &LONG.as_secs().to_string(),
            "systemctl",
            "start",
            unit,
        ]);
        assert!(unconfigured.is_err(), "{unit} started unconfigured");
        host.wait_state(unit, "failed");
        let journal = host.out(&["journalctl", "--no-pager", "-u", unit]);
        assert!(
            journal.contains(missing),
            "{unit}'s journal lacks {missing:?}: {journal}"
        );
        assert_eq!(
            host.out(&["systemctl", "show", "-p", "NRestarts", "--value", unit]),
            "0",
            "{unit} was restarted after a usage error{}",
            host.diagnostics()
        );
    }

    // --- presence, configured through its environment file
    host.machine.write_file(
        "/etc/flotilla/presence.env",
        &format!(
            "FLOTILLA_NODE={node}\nFLOTILLA_ADVERTISE_IP=127.0.0.1\n\
             FLOTILLA_ALLOW_LOOPBACK=true\nFLOTILLA_ETCD_ENDPOINTS={}\n\
             FLOTILLA_LABEL_FILTER={label}\nFLOTILLA_RESYNC=5s\nRUST_LOG=debug,h2=info,tower=info,hyper=info,tonic=info\n",
            etcd.endpoint()
        ),
    );
    host.start("presence.service");
    let node_key = format!("/flotilla/nodes/{node}");
    let etcd_has = |key: &str| {
        etcd.etcdctl(&["get", "--prefix", "--keys-only", key])
            .map(|out| out.lines().any(|l| l.starts_with(key)))
            .unwrap_or(false)
    };
    host.wait("presence's node record in etcd", || etcd_has(&node_key));

    // It runs as flotilla-presence, with the docker group.
    let (uids, groups) = host.main_process_ids("presence.service");
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "presence runs as uids {uids}, not flotilla-presence ({uid})"
    );
    assert!(
        groups.split_whitespace().any(|g| g == gid),
        "presence's groups {groups} lack docker ({gid})"
    );
    // Its state file, in the state directory the unit creates.
    host.wait("presence's state file", || {
        host.machine
            .exec(&["test", "-f", "/var/lib/flotilla/presence/state"])
            .is_ok()
    });

    // `systemctl reload` is a SIGHUP: presence reconciles at once.
    host.ok(&["systemctl", "reload", "presence.service"]);
    host.wait("presence to log the SIGHUP of systemctl reload", || {
        host.out(&["journalctl", "--no-pager", "-u", "presence.service"])
            .contains("SIGHUP: reconciling now")
    });

    // A container on the host's engine, published on loopback (hence FLOTILLA_ALLOW_LOOPBACK).
    let c = Container::run(
        &unique_name("pkg"),
        &[
            "-l",
            &label,
            "-l",
            &format!("flotilla.service={service}"),
            "-p",
            "127.0.0.1::8080",
            image,
            "httpd",
            "-f",
            "-p",
            "8080",
        ],
    );
    let port = c.host_port("8080/tcp");
    let endpoint_key = format!(
        "/flotilla/endpoints/{node}/{service}/{node}-{}-8080",
        c.short_id()
    );
    host.wait(&format!("{endpoint_key} in etcd"), || {
        etcd_has(&endpoint_key)
    });
    let value = etcd
        .etcdctl(&["get", "--print-value-only", &endpoint_key])
        .unwrap();
    assert!(
        value.contains(&format!("\"port\":{port}")),
        "{endpoint_key}: {value}"
    );

    // --- confgen, with a resource and a template in /etc/flotilla/confgen
    host.machine.write_file(
        "/etc/flotilla/confgen/conf.d/pkgtest.toml",
        &format!(
            "[template]\nsrc = \"pkgtest.tmpl\"\ndest = \"{RENDERED}\"\nprefix = \"/flotilla\"\n\
             keys = [\"/endpoints/\"]\nmode = \"0644\"\n\
             # The drop guard would hold the service's removal below for 30 s.\n\
             max_drop = \"100%\"\n"
        ),
    );
    host.machine.write_file(
        "/etc/flotilla/confgen/templates/pkgtest.tmpl",
        "{% for name, eps in services %}{{ name }}:{% for ep in eps %} {{ ep.instance }}={{ ep.addr }}{% endfor %}\n{% endfor %}",
    );
    host.machine.write_file(
        "/etc/flotilla/confgen.env",
        &format!(
            "FLOTILLA_ETCD_ENDPOINTS={}\nFLOTILLA_NODE={node}\nRUST_LOG=debug,h2=info,tower=info,hyper=info,tonic=info\n",
            etcd.endpoint()
        ),
    );
    host.start("confgen.service");
    let line = format!("{service}: {node}-{}-8080=127.0.0.1:{port}", c.short_id());
    host.wait(&format!("{RENDERED} to route {line}"), || {
        host.out(&["cat", RENDERED]).lines().any(|l| l == line)
    });

    // --- an upgrade (the same package again): the edited conffile is kept, the running
    // presence is restarted (postinst's try-restart) and registers the container again.
    let pid_before = host.ok(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "presence.service",
    ]);
    let lease_before = lease_of(&etcd, &endpoint_key);
    let presence_deb = &files[0]; // in the order of PACKAGES
    host.ok(&["dpkg", "-i", presence_deb]);
    assert!(
        host.file("/etc/flotilla/presence.env")
            .contains(&format!("FLOTILLA_NODE={node}")),
        "the upgrade replaced the edited /etc/flotilla/presence.env"
    );
    host.wait_state("presence.service", "active");
    let pid_after = host.ok(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "presence.service",
    ]);
    assert_ne!(
        pid_before, pid_after,
        "the upgrade did not restart presence"
    );
    // Ready (systemctl returned) means registered again, under the new process's lease.
    let lease_after = lease_of(&etcd, &endpoint_key);
    assert!(
        lease_after.is_some() && lease_after != lease_before,
        "{endpoint_key} has lease {lease_after:?} after the upgrade, {lease_before:?} before"
    );

    host.ok(&["systemctl", "reload", "confgen.service"]);
    host.wait("confgen to log the SIGHUP of systemctl reload", || {
        host.out(&["journalctl", "--no-pager", "-u", "confgen.service"])
            .contains("SIGHUP: re-reading conf.d and templates")
    });

    // --- systemctl stop presence: its lease is revoked, the endpoint leaves etcd and confgen
    // renders the service away.
    let t = Instant::now();
    host.ok(&[
        "timeout",
        &LONG.as_secs().to_string(),
        "systemctl",
        "stop",
        "presence.service",
    ]);
    host.wait_state("presence.service", "inactive");
    host.wait(&format!("{endpoint_key} to leave etcd"), || {
        !etcd_has(&endpoint_key) && !etcd_has(&node_key)
    });
    eprintln!(
        "endpoint gone from etcd {:.1} s after systemctl stop",
        t.elapsed().as_secs_f64()
    );
    host.wait(&format!("{RENDERED} to drop {service}"), || {
        !host.out(&["cat", RENDERED]).contains(&service)
    });
    eprintln!(
        "rendered without the service {:.1} s after systemctl stop",
        t.elapsed().as_secs_f64()
    );

    // --- dpkg --purge: stops confgen (prerm), removes the binaries, units and conffiles.
    let mut purge = vec!["dpkg", "--purge"];
    purge.extend(PACKAGES.iter().map(|(p, _)| *p));
    host.ok(&purge);
    host.wait_state("confgen.service", "inactive");
    for gone in [
        "/usr/bin/presence",
        "/usr/bin/confgen",
        "/usr/lib/systemd/system/presence.service",
        "/etc/flotilla/presence.env",
        "/etc/flotilla/confgen/templates/haproxy.cfg.tmpl",
        "/usr/share/man/man1/presence.1.gz",
    ] {
        assert!(
            host.machine.exec(&["test", "-e", gone]).is_err(),
            "{gone} is still there after dpkg --purge"
        );
    }
    drop(c);
    eprintln!("whole test: {:.1} s", t0.elapsed().as_secs_f64());
}
