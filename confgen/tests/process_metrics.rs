//! A running `confgen run` serves `flotilla_build_info` and the standard process metrics on
//! its `/metrics` (issue 17), with values that match the process as the test sees it in /proc.

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{metric, Confdir, Confgen, Registry};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::wait_for;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The labels of the one `flotilla_build_info` sample, and its value.
fn build_info(text: &str) -> (String, String, String) {
    let line = text
        .lines()
        .find(|l| l.starts_with("flotilla_build_info{"))
        .unwrap_or_else(|| panic!("no flotilla_build_info in\n{text}"));
    let label = |k: &str| {
        let start = line
            .find(&format!("{k}=\""))
            .unwrap_or_else(|| panic!("no {k} in {line}"))
            + k.len()
            + 2;
        line[start..].split('"').next().unwrap().to_string()
    };
    let value = line.rsplit_once(' ').unwrap().1.to_string();
    (label("version"), label("commit"), value)
}

#[test]
fn metrics_carry_build_info_and_process_cpu_memory_fds_and_start_time() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    reg.put_endpoint("node-a", "web", 1, 8001);
    let confdir = Confdir::new();
    confdir.template(
        "list.tmpl",
        "{% for name, eps in services %}{% for ep in eps %}server {{ name }} {{ ep.addr }}\n{% endfor %}{% endfor %}",
    );
    let dest = confdir.out("list");
    confdir.resource(
        "list",
        &format!(
            "[template]\nsrc = \"list.tmpl\"\ndest = \"{}\"\nprefix = \"/flotilla\"\nkeys = [\"/endpoints/\"]\n",
            dest.display()
        ),
    );
    let started = now();
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("the first write", Duration::from_secs(30), || {
        c.assert_running();
        dest.exists().then_some(())
    });
    let pid = c.proc.pid().expect("confgen runs");
    let text = c.metrics();

    let (version, commit, value) = build_info(&text);
    assert_eq!(version, env!("CARGO_PKG_VERSION"), "{text}");
    assert_eq!(value, "1");
    // The commit the binary was built from: one this repository has, or "unknown" for a
    // build outside a git checkout.
    if commit != "unknown" {
        assert!(
            commit.len() >= 4 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
            "{commit}"
        );
        let known = Command::new("git")
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status();
        if let Ok(status) = known {
            assert!(
                status.success(),
                "commit {commit} is not in this repository"
            );
        }
    }
    for family in [
        "# TYPE flotilla_build_info gauge",
        "# TYPE process_cpu_seconds counter",
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_open_fds gauge",
        "# TYPE process_start_time_seconds gauge",
    ] {
        assert!(text.contains(family), "{family:?} in\n{text}");
    }

    // Resident memory: more than a MiB, within a factor of two of what /proc says.
    let rss = metric(&text, "process_resident_memory_bytes", &[]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm_rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    assert!(rss > 1024.0 * 1024.0, "rss {rss}");
    assert!(
        rss > vm_rss_kib * 1024.0 / 2.0 && rss < vm_rss_kib * 1024.0 * 2.0,
        "rss {rss} vs VmRSS {vm_rss_kib} kB"
    );

    // Open fds: at least stdin/out/err, the listener and etcd's connection; close to the
    // count in /proc/<pid>/fd (the daemon opens and closes files meanwhile).
    let fds = metric(&text, "process_open_fds", &[]);
    let seen = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    assert!(fds >= 5.0, "open fds {fds}");
    assert!(
        (fds - seen).abs() <= 8.0,
        "open fds {fds} vs {seen} in /proc"
    );
    let max = metric(&text, "process_max_fds", &[]);
    assert!(max >= fds, "max fds {max}");

    // Started when the test started it.
    let start = metric(&text, "process_start_time_seconds", &[]);
    assert!(
        (start - started).abs() < 5.0,
        "start time {start}, spawned at {started}"
    );

    // CPU: computed at each scrape, between what /proc/<pid>/stat says just before and just
    // after it, and growing with work.
    let cpu_in_proc = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let s = flotilla_registry::process::parse_stat(&stat).expect("stat");
        let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .unwrap()
            .unwrap() as f64;
        (s.utime + s.stime) as f64 / tick
    };
    let scrape_cpu = || {
        let before = cpu_in_proc();
        let cpu = c.metric("process_cpu_seconds_total", &[]);
        let after = cpu_in_proc();
        assert!(
            before <= cpu && cpu <= after,
            "cpu {cpu}, /proc said {before} before and {after} after"
        );
        cpu
    };
    let cpu = scrape_cpu();
    for i in 0..200u32 {
        reg.put_endpoint("node-a", "web", 2 + i, 9000 + i as u16);
    }
    wait_for(
        "the 201 endpoints rendered",
        Duration::from_secs(30),
        || (common::read(&dest).lines().count() == 201).then_some(()),
    );
    let later = scrape_cpu();
    assert!(later > cpu, "cpu {cpu} then {later}");
    c.assert_running();
}
