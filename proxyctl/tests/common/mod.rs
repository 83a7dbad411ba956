//! Helpers shared by proxyctl's integration tests: run the built binary, build test configs.

#![allow(dead_code, unused_imports)] // each test binary uses a different subset

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

pub use flotilla_harness::haproxy::{http_get, Haproxy, StaticBackend, TEST_DEFAULTS};
pub use flotilla_harness::{free_port, wait_for};

/// The proxyctl binary under test.
pub fn proxyctl() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_proxyctl"));
    // Tests must not pick up an operator's environment.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLOTILLA_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A finished proxyctl run with readable accessors.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(cmd: &mut Command) -> Run {
        let Output {
            status,
            stdout,
            stderr,
        } = cmd.output().expect("run proxyctl");
        Run {
            code: status.code().expect("proxyctl exited by a signal"),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// Asserts the exit code, printing both streams when it differs.
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "unexpected exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// The `proxyctl: error: …` lines of stderr.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("proxyctl: error:"))
            .collect()
    }
}

/// `proxyctl reload --config <hx config> --master-socket <hx master>` with a bounded timeout.
pub fn reload(hx: &Haproxy) -> Run {
    Run::of(
        proxyctl()
            .arg("reload")
            .arg("--config")
            .arg(hx.config_path())
            .arg("--master-socket")
            .arg(hx.master_socket())
            .args(["--timeout", "8s"]),
    )
}

/// One frontend on `port` sending everything to backend `be` with the given servers
/// (`(name, addr)`), round-robin.
pub fn site(port: u16, servers: &[(&str, &str)]) -> String {
    let mut s = format!(
        "{TEST_DEFAULTS}\nfrontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n\n\
         backend be\n    balance roundrobin\n"
    );
    for (name, addr) in servers {
        s.push_str(&format!("    server {name} {addr}\n"));
    }
    s
}

/// The body served on `port`, or panics with the error.
pub fn get(port: u16) -> String {
    let (status, body) = http_get(port, "/", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET 127.0.0.1:{port}: {e}"));
    assert_eq!(
        status, 200,
        "GET 127.0.0.1:{port} answered {status}: {body}"
    );
    body
}

/// 1-based number of the first line of `text` that contains `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the text"))
        + 1
}

/// Parses the master's `show proc` with the library under test.
/// `show proc` through the master CLI. Right after a reload the master re-executes itself and
/// its socket refuses connections for a moment, so a refused connection is retried (≤ 5 s).
pub fn show_proc(hx: &Haproxy) -> proxyctl::ProcList {
    let answer =
        flotilla_harness::wait_for("the master CLI to answer", Duration::from_secs(5), || {
            hx.try_master_cli("show proc").ok()
        });
    proxyctl::ProcList::parse(&answer).expect("show proc parses")
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
