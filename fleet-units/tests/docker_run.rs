//! One generated unit really runs: unitgen writes a systemd unit for a service using the local
//! busybox image, and this test executes its `ExecStartPre=`/`ExecStart=` lines in order (parsed
//! from the unit file with systemd's splitting rules, `-` prefix honoured, no pull thanks to
//! `--no-pull`), checks the container with `docker inspect` (the `flotilla.*` labels presence
//! reads, the environment, `--rm`, no restart policy, the health check) and over HTTP, then runs
//! `ExecStop=` and sees the container stop and disappear. A guard removes the container and kills
//! the `docker run` process even when an assertion fails.
//!
//! Needs the Docker engine (`scripts/setup` starts it); nothing is pulled from a registry: the
//! image `flotilla-busybox:test` is built locally if missing (`FROM scratch` + Debian's static
//! busybox, the same name and recipe as the shared test harness, so either build serves both).

mod common;

use common::*;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const IMAGE: &str = "flotilla-busybox:test";

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    } else {
        Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn require_engine() {
    if let Err(e) = docker(&["version", "--format", "{{.Server.APIVersion}}"]) {
        panic!("the Docker engine does not answer ({e}); run scripts/setup first: this test needs it and does not skip");
    }
}

/// Builds the test image unless it exists. Builds under a unique tag and then tags it, so two
/// test processes building at once cannot trip over each other.
fn ensure_image() {
    if docker(&["image", "inspect", "-f", "{{.Id}}", IMAGE]).is_ok() {
        return;
    }
    let busybox = Path::new("/usr/bin/busybox");
    assert!(
        busybox.is_file(),
        "/usr/bin/busybox is missing: run scripts/setup (Debian busybox-static)"
    );
    let ctx = tempfile::tempdir().unwrap();
    let bin = ctx.path().join("bin");
    fs::create_dir(&bin).unwrap();
    fs::copy(busybox, bin.join("busybox")).unwrap();
    let list = output(Command::new(busybox).arg("--list"));
    assert!(list.status.success(), "busybox --list failed");
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim) {
        if !applet.is_empty() && applet != "busybox" {
            symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY bin /bin\nCMD [\"/bin/sh\"]\n",
    )
    .unwrap();
    let temp_tag = format!("flotilla-busybox:build-{}", unique());
    let out = output(
        Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &temp_tag])
            .arg(ctx.path()),
    );
    assert!(
        out.status.success(),
        "building {IMAGE}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    docker(&["tag", &temp_tag, IMAGE]).unwrap();
    let _ = docker(&["rmi", &temp_tag]);
}

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}x{}", std::process::id(), nanos % 1_000_000)
}

/// Removes the container and kills `docker run` on drop, whatever happened.
struct Cleanup {
    container: String,
    child: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn inspect(name: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, name]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn generated_unit_runs_the_container_with_presence_labels() {
    require_engine();
    ensure_image();

    let svc = format!("rt{}", unique());
    let tmp = tempfile::tempdir().unwrap();
    let label_value = "yes, 100% \"real\" $HOME";
    let greeting = "hi there; 50% off, $5 'today'";
    let health = "wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1";
    let yaml = |s: &str| serde_norway::to_string(s).unwrap().trim_end().to_string();
    let (greeting_yaml, label_yaml, health_yaml) =
        (yaml(greeting), yaml(label_value), yaml(health));
    fs::write(
        tmp.path().join("services.yaml"),
        format!(
            r#"services:
  {svc}:
    image: {IMAGE}
    command: [httpd, -f, -p, "8080", -h, /]
    ports:
      - container: 8080
        service: {svc}-http
    env:
      GREETING: {greeting_yaml}
    labels:
      com.example.test: {label_yaml}
    memory: 64m
    health:
      cmd: {health_yaml}
      interval: 1s
    stop_timeout: 5
    flotilla:
      tags: [e2e, t-{svc}]
"#
        ),
    )
    .unwrap();
    fs::write(
        tmp.path().join("hosts.yaml"),
        "hosts:\n  local: {address: 127.0.0.1}\n",
    )
    .unwrap();
    unitgen_ok(
        &[
            "services.yaml",
            "--format",
            "systemd",
            "--hosts",
            "hosts.yaml",
            "--no-pull",
            "-o",
            "out",
        ],
        tmp.path(),
    );
    let unit_path = tmp.path().join(format!("out/local/{svc}@1.service"));
    let unit = fs::read_to_string(&unit_path).unwrap();
    let container = format!("{svc}-1");

    let lines = exec_lines(&unit, None);
    let keys: Vec<&str> = lines.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(
        keys,
        ["ExecStartPre", "ExecStart", "ExecStop"],
        "no pull with --no-pull:\n{unit}"
    );
    assert!(
        lines[0].ignore_failure,
        "docker rm -f may fail when there is nothing to remove"
    );
    assert_eq!(
        lines[0].argv,
        ["/usr/bin/docker", "rm", "-f", container.as_str()]
    );
    let run = &lines[1].argv;
    assert_eq!(
        &run[..5],
        [
            "/usr/bin/docker",
            "run",
            "--rm",
            "--name",
            container.as_str()
        ]
    );
    assert!(
        !run.iter()
            .any(|a| a == "-d" || a == "--detach" || a.starts_with("--restart")),
        "{run:?}"
    );

    let mut guard = Cleanup {
        container: container.clone(),
        child: None,
    };

    // ExecStartPre lines, in order.
    for line in lines.iter().filter(|l| l.key == "ExecStartPre") {
        let status = Command::new(&line.argv[0])
            .args(&line.argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(
            line.ignore_failure || status.success(),
            "{:?} failed: {status}",
            line.argv
        );
    }
    // ExecStart: the main process stays in the foreground, as under systemd.
    let log = tmp.path().join("run.log");
    let log_file = fs::File::create(&log).unwrap();
    guard.child = Some(
        Command::new(&run[0])
            .args(&run[1..])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap(),
    );
    wait_until("the container to run", Duration::from_secs(30), || {
        if let Some(status) = guard.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "docker run exited early ({status}): {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        (docker(&["inspect", "-f", "{{.State.Running}}", &container]).ok()? == "true").then_some(())
    });

    // The labels presence reads, and the rest of the run line, as Docker recorded them.
    let label = |k: &str| inspect(&container, &format!("{{{{index .Config.Labels \"{k}\"}}}}"));
    assert_eq!(label("flotilla.service"), svc);
    assert_eq!(label("flotilla.service.8080"), format!("{svc}-http"));
    assert_eq!(label("flotilla.tags"), format!("e2e,t-{svc}"));
    assert_eq!(label("com.example.test"), label_value);
    let env = inspect(&container, "{{range .Config.Env}}{{println .}}{{end}}");
    assert!(
        env.lines().any(|l| l == format!("GREETING={greeting}")),
        "{env}"
    );
    assert_eq!(inspect(&container, "{{.Config.Image}}"), IMAGE);
    assert_eq!(inspect(&container, "{{.HostConfig.AutoRemove}}"), "true");
    assert!(matches!(
        inspect(&container, "{{.HostConfig.RestartPolicy.Name}}").as_str(),
        "" | "no"
    ));
    assert_eq!(
        inspect(&container, "{{.HostConfig.Memory}}"),
        (64 * 1024 * 1024).to_string()
    );
    assert_eq!(
        inspect(&container, "{{json .Config.Healthcheck.Test}}"),
        format!("[\"CMD-SHELL\",\"{health}\"]")
    );

    // The command really runs: busybox httpd answers on the published port.
    let binding = inspect(
        &container,
        "{{(index (index .NetworkSettings.Ports \"8080/tcp\") 0).HostPort}}",
    );
    let port: u16 = binding
        .parse()
        .unwrap_or_else(|_| panic!("no host port published: {binding:?}"));
    let reply = wait_until("httpd to answer", Duration::from_secs(20), || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        buf.starts_with("HTTP/1.").then_some(buf)
    });
    assert!(reply.starts_with("HTTP/1."), "{reply}");

    // ExecStop stops it; docker run returns and --rm removes the container.
    let stop = &lines[2];
    assert_eq!(
        stop.argv,
        ["/usr/bin/docker", "stop", "-t", "5", container.as_str()]
    );
    let status = Command::new(&stop.argv[0])
        .args(&stop.argv[1..])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "ExecStop failed: {status}");
    let child = guard.child.as_mut().unwrap();
    wait_until("docker run to return", Duration::from_secs(20), || {
        child.try_wait().unwrap()
    });
    wait_until(
        "the container to be removed",
        Duration::from_secs(20),
        || {
            docker(&["inspect", "-f", "{{.Id}}", &container])
                .is_err()
                .then_some(())
        },
    );
}
