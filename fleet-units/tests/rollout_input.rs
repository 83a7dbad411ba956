//! `unitgen rollout`, `status` and `apply` refuse bad input before they touch etcd, a host or
//! systemd: each error names the file, line and field, or the flag.

mod common;

use common::{output, unitgen};
use std::fs;
use std::path::Path;

const HOSTS: &str = "hosts:\n  h1: {address: 127.0.0.1}\n";

fn setup(services: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("services.yaml"), services).unwrap();
    fs::write(tmp.path().join("hosts.yaml"), HOSTS).unwrap();
    let out = output(
        unitgen()
            .args([
                "services.yaml",
                "--format",
                "systemd",
                "--hosts",
                "hosts.yaml",
                "-o",
                "units",
            ])
            .current_dir(tmp.path()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tmp
}

fn rollout(dir: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = output(
        unitgen()
            .args([
                "rollout",
                "services.yaml",
                "--hosts",
                "hosts.yaml",
                "-o",
                "units",
            ])
            .args(extra)
            // Nothing listens here: every case must fail before connecting.
            .args(["--etcd-endpoints", "http://127.0.0.1:9"])
            .current_dir(dir),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const WEB: &str = "services:\n  web:\n    image: web:git-aaaaaaa\n    instances: 2\n    ports: [\"8080\"]\n    health: {cmd: \"true\"}\n";

#[test]
fn a_service_without_a_health_check_cannot_be_rolled_out() {
    let tmp = setup("services:\n  web:\n    image: web:git-aaaaaaa\n    ports: [\"8080\"]\n");
    let (code, err) = rollout(tmp.path(), &["--service", "web", "--tag", "git-bbbbbbb"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("error: services.yaml:3:5: services.web.health: web has no health check: a rollout moves on only when presence registers new instances as healthy"),
        "{err}"
    );
}

#[test]
fn tags_services_and_the_lock_are_checked_first() {
    let tmp = setup(WEB);
    let (code, err) = rollout(tmp.path(), &["--service", "web", "--tag", "latest"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--tag: tag `latest` of image `web:latest` moves"),
        "{err}"
    );
    let (code, err) = rollout(tmp.path(), &["--service", "web", "--tag", "-x"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = rollout(tmp.path(), &["--service", "api", "--tag", "git-bbbbbbb"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--service api: services.yaml has no such service (services: web)"),
        "{err}"
    );
    fs::remove_file(tmp.path().join("units/placement.lock")).unwrap();
    let (code, err) = rollout(tmp.path(), &["--service", "web", "--tag", "git-bbbbbbb"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("units/placement.lock: no such lock file"),
        "{err}"
    );
}

#[test]
fn rollout_settings_are_validated_with_locations() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(
        tmp.path().join("services.yaml"),
        "defaults:\n  rollout: {max_surge: 150%}\nservices:\n  web:\n    image: web:1.0.0\n    rollout:\n      max_unavailable: 0\n      max_surge: 0\n      progress_deadline: soon\n",
    )
    .unwrap();
    let out = output(
        unitgen()
            .args(["services.yaml", "--check"])
            .current_dir(tmp.path()),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "error: services.yaml:2:24: defaults.rollout.max_surge: `150%` is not a percentage from 0% to 100% (or a whole number of instances)",
            "error: services.yaml:7:7: services.web.rollout: max_unavailable and max_surge are both 0, so a rollout could never replace an instance; allow at least one",
            "error: services.yaml:9:26: services.web.rollout.progress_deadline: `soon` is not a duration: write seconds (`30`) or units ms, s, m, h (`1m30s`, `500ms`)",
            "unitgen: 3 errors; nothing written",
        ],
        "{err}"
    );
}

#[test]
fn a_surge_needs_a_service_without_fixed_host_ports() {
    let tmp = setup("services:\n  web:\n    image: web:1.0.0\n    ports: [\"8080:80\"]\n    health: {cmd: \"true\"}\n    rollout: {max_surge: 1}\n");
    let (code, err) = rollout(tmp.path(), &["--service", "web", "--tag", "1.0.1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("services.yaml:6:14: services.web.rollout: web publishes a fixed host port"),
        "{err}"
    );
}

#[test]
fn apply_refuses_before_touching_systemd() {
    let tmp = setup(WEB);
    let listing = output(
        unitgen()
            .args([
                "services.yaml",
                "--format",
                "systemd",
                "--hosts",
                "hosts.yaml",
            ])
            .current_dir(tmp.path()),
    );
    let apply = |host: &str, unit_dir: &Path| {
        use std::io::Write;
        let mut child = unitgen()
            .args(["apply", "--host", host, "--units", "-", "--unit-dir"])
            .arg(unit_dir)
            // An address where no bus is: reaching it would be an error of its own (exit 6).
            .args(["--dbus-address", "unix:path=/nonexistent/bus"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&listing.stdout)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let units = tmp.path().join("etc");
    fs::create_dir_all(&units).unwrap();
    let (code, err) = apply("h2", &units);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the units name no file for host h2 (hosts present: h1)"),
        "{err}"
    );
    fs::write(units.join("web@1.service"), "[Unit]\nDescription=mine\n").unwrap();
    let (code, err) = apply("h1", &units);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("web@1.service: exists and was not written by unitgen"),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(units.join("web@1.service")).unwrap(),
        "[Unit]\nDescription=mine\n",
        "a unit unitgen did not write is left alone"
    );
    fs::remove_file(units.join("web@1.service")).unwrap();
    let (code, err) = apply("h1", &units);
    assert_eq!(code, Some(6), "{err}");
    assert!(
        err.contains("cannot reach systemd over D-Bus at unix:path=/nonexistent/bus"),
        "{err}"
    );
}
