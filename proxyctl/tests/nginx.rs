//! `proxyctl check|reload --proxy nginx` against a real nginx master with its workers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use flotilla_harness::KillOnDrop;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// nginx in the foreground (`daemon off`, master + 1 worker) in a temp dir; stopped on drop.
struct NginxUnderTest {
    master: KillOnDrop,
    dir: tempfile::TempDir,
    port: u16,
}

impl NginxUnderTest {
    fn config_text(dir: &Path, port: u16, body: &str) -> String {
        let d = dir.display();
        format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log notice;\nevents {{ worker_connections 64; }}\nhttp {{\n    \
             access_log off;\n    client_body_temp_path {d}/body;\n    \
             proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    \
             uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    \
             server {{\n        listen 127.0.0.1:{port};\n        \
             location / {{ return 200 \"{body}\"; }}\n    }}\n}}\n"
        )
    }

    fn start(body: &str) -> NginxUnderTest {
        let nginx = flotilla_harness::require("nginx", "nginx-light");
        let dir = tempfile::Builder::new()
            .prefix("flotilla-nginx-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let config = dir.path().join("nginx.conf");
        std::fs::write(&config, Self::config_text(dir.path(), port, body)).unwrap();
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let n = NginxUnderTest {
            master: KillOnDrop(Some(child)),
            dir,
            port,
        };
        wait_for("nginx to serve", Duration::from_secs(10), || {
            http_get(port, "/", Duration::from_secs(1))
                .ok()
                .filter(|(_, b)| b == body)
        });
        n
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    fn write(&self, body: &str) {
        std::fs::write(
            self.config(),
            Self::config_text(self.dir.path(), self.port, body),
        )
        .unwrap();
    }

    fn worker_pids(&self) -> Vec<u32> {
        let master = self.master.pid().unwrap();
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let after = &stat[stat.rfind(')').unwrap() + 1..];
            if after.split_whitespace().nth(1) == Some(&master.to_string()) {
                out.push(pid);
            }
        }
        out
    }

    fn reload(&self, config: &Path) -> Run {
        Run::of(
            proxyctl()
                .args(["reload", "--proxy", "nginx", "--timeout", "8s", "--config"])
                .arg(config),
        )
    }
}

impl Drop for NginxUnderTest {
    fn drop(&mut self) {
        // SIGKILL on the master would orphan its workers: ask for a fast shutdown first.
        let workers = self.worker_pids();
        if let Some(pid) = self.master.pid() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let gone = self
                .master
                .0
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if gone {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.master.kill();
        for pid in workers {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

#[test]
fn nginx_reload_starts_new_workers_that_serve_the_new_config() {
    let n = NginxUnderTest::start("one");
    let before = n.worker_pids();
    assert_eq!(before.len(), 1, "{before:?}");

    n.write("two");
    let run = n.reload(&n.config()).expect_code(0);
    assert!(run.stdout.starts_with("reloaded "), "{}", run.stdout);
    wait_for("the new config to serve", Duration::from_secs(5), || {
        (get(n.port) == "two").then_some(())
    });
    let now = n.worker_pids();
    let fresh: Vec<u32> = now
        .iter()
        .copied()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(!fresh.is_empty(), "no new worker: {before:?} → {now:?}");
    assert!(
        fresh.iter().any(|p| run.stdout.contains(&p.to_string())),
        "new workers {fresh:?} not reported: {}",
        run.stdout
    );
}

#[test]
fn a_broken_nginx_config_fails_the_check_and_nothing_is_reloaded() {
    let n = NginxUnderTest::start("one");
    let before = n.worker_pids();
    let mut text = std::fs::read_to_string(n.config()).unwrap();
    text = text.replace(
        "access_log off;",
        "access_log off;\n    bogus_directive on;",
    );
    std::fs::write(n.config(), &text).unwrap();
    let line = line_of(&text, "bogus_directive");

    let run = n.reload(&n.config()).expect_code(1);
    assert!(
        run.stderr.contains(&format!(
            "{}:{line}: error: unknown directive \"bogus_directive\"",
            n.config().display()
        )),
        "{}",
        run.stderr
    );
    assert_eq!(run.error_lines().len(), 1, "{}", run.stderr);
    let run = Run::of(
        proxyctl()
            .args(["check", "--proxy", "nginx", "--config"])
            .arg(n.config()),
    )
    .expect_code(1);
    assert!(run.stderr.contains("bogus_directive"), "{}", run.stderr);
    assert_eq!(get(n.port), "one");
    assert_eq!(n.worker_pids(), before);
}

#[test]
fn nginx_reload_refuses_a_config_the_master_does_not_run() {
    let n = NginxUnderTest::start("one");
    let before = n.worker_pids();
    let other = n.dir.path().join("other.conf");
    std::fs::write(&other, std::fs::read_to_string(n.config()).unwrap()).unwrap();
    let run = n.reload(&other).expect_code(2);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(
        errors[0].contains(&path_str(&other)) && errors[0].contains(&path_str(&n.config())),
        "{}",
        errors[0]
    );
    assert_eq!(n.worker_pids(), before);

    // A pid file that names no nginx: exit 4 with the file and the flag.
    let stale = n.dir.path().join("stale.pid");
    std::fs::write(&stale, "999999999\n").unwrap();
    let run = Run::of(
        proxyctl()
            .args(["reload", "--proxy", "nginx", "--config"])
            .arg(n.config())
            .arg("--pid-file")
            .arg(&stale),
    )
    .expect_code(4);
    assert!(
        run.stderr.contains("--pid-file") && run.stderr.contains(&path_str(&stale)),
        "{}",
        run.stderr
    );
}
