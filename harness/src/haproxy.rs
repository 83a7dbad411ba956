//! HAProxy in master-worker mode for tests, and small loopback HTTP helpers.
//!
//! [`Haproxy::start`] runs `haproxy -W -db -S <dir>/master.sock,mode,600 -f <dir>/haproxy.cfg`
//! in a temp dir. The harness owns the `global` section (a runtime socket
//! `<dir>/stats.sock … level admin expose-fd listeners`, a bounded `maxconn`, `hard-stop-after`);
//! the test supplies everything after it (`defaults`, frontends, backends), typically built from
//! [`TEST_DEFAULTS`] and ports from [`crate::free_port`]. [`Haproxy::write_config`] replaces the
//! file atomically with new sections, for reload tests. Drop stops the master and every worker
//! (also old ones still draining) and removes the temp dir, also when the test panics.
//!
//! [`StaticBackend`] is a `busybox httpd` serving a fixed body; [`http_get`] is a one-shot
//! `Connection: close` GET that says which backend answered.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, require, wait_for, KillOnDrop};

/// A `defaults` section for test configs: HTTP mode, bounded timeouts, and the reload-safe
/// settings proxyctl's docs recommend.
pub const TEST_DEFAULTS: &str = "\
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout client-fin 1s
    option idle-close-on-response
    retries 3
    option redispatch
    retry-on all-retryable-errors
";

/// A running HAProxy master with its workers.
#[derive(Debug)]
pub struct Haproxy {
    // Field order matters for drop: the processes go before the directory.
    child: KillOnDrop,
    config: PathBuf,
    master_socket: PathBuf,
    stats_socket: PathBuf,
    log: PathBuf,
    global_extra: String,
    dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy with the harness's `global` section followed by `sections`, and waits
    /// (at most 15 s) until the master lists a worker and the worker answers on the runtime
    /// socket. Panics with HAProxy's log if it does not come up.
    pub fn start(sections: &str) -> Haproxy {
        Haproxy::start_with_global(sections, "")
    }

    /// Like [`Haproxy::start`], with extra lines for the `global` section (e.g.
    /// `close-spread-time 1s`). They are kept for every later [`Haproxy::write_config`].
    pub fn start_with_global(sections: &str, global_extra: &str) -> Haproxy {
        let binary = require("haproxy", "haproxy");
        let dir = tempfile::Builder::new()
            .prefix("flotilla-haproxy-")
            .tempdir()
            .expect("create a temp dir for HAProxy");
        let config = dir.path().join("haproxy.cfg");
        let master_socket = dir.path().join("master.sock");
        let stats_socket = dir.path().join("stats.sock");
        let log = dir.path().join("haproxy.log");
        let global_extra = global_extra.to_string();
        std::fs::write(&config, render(&stats_socket, &global_extra, sections))
            .expect("write haproxy.cfg");
        let log_file = std::fs::File::create(&log).expect("create haproxy.log");
        let child = Command::new(&binary)
            .arg("-W")
            .arg("-db")
            .arg("-S")
            .arg(format!("{},mode,600", master_socket.display()))
            .arg("-f")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log fd"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut haproxy = Haproxy {
            child: KillOnDrop(Some(child)),
            config,
            master_socket,
            stats_socket,
            log,
            global_extra,
            dir,
        };
        haproxy.wait_ready(Duration::from_secs(15));
        haproxy
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.0.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "HAProxy exited during start-up ({status}); its log:\n{}",
                        self.log()
                    );
                }
            }
            let up = self
                .try_master_cli("show proc")
                .ok()
                .is_some_and(|p| !worker_pids(&p).is_empty())
                && self
                    .try_runtime_cli("show info")
                    .ok()
                    .is_some_and(|i| i.contains("Pid:"));
            if up {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "HAProxy did not come up within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The configuration file the master was started with (`-f`).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The master CLI socket (`-S`).
    pub fn master_socket(&self) -> &Path {
        &self.master_socket
    }

    /// The runtime API socket (`stats socket … level admin`).
    pub fn stats_socket(&self) -> &Path {
        &self.stats_socket
    }

    /// The temp dir holding config, sockets and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The master's pid.
    pub fn master_pid(&self) -> u32 {
        self.child.pid().expect("the master is running")
    }

    /// Sends a signal to the master (e.g. SIGUSR2 for a raw reload).
    pub fn signal_master(&self, signal: nix::sys::signal::Signal) {
        self.child.signal(signal);
    }

    /// The full configuration text for `sections` (harness `global` + extra + sections).
    pub fn render(&self, sections: &str) -> String {
        render(&self.stats_socket, &self.global_extra, sections)
    }

    /// Atomically replaces the configuration file with the harness `global` section and
    /// `sections` (nothing is reloaded).
    pub fn write_config(&self, sections: &str) {
        self.write_raw_config(&self.render(sections));
    }

    /// Atomically replaces the configuration file with `text` as is (for broken configs).
    pub fn write_raw_config(&self, text: &str) {
        let staged = self.dir.path().join(".haproxy.cfg.staged");
        std::fs::write(&staged, text).expect("write staged config");
        std::fs::rename(&staged, &self.config).expect("rename staged config");
    }

    /// HAProxy's stdout + stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one command to the master CLI and returns the answer; panics on socket errors.
    pub fn master_cli(&self, command: &str) -> String {
        self.try_master_cli(command)
            .unwrap_or_else(|e| panic!("master CLI `{command}`: {e}"))
    }

    /// Sends one command to the runtime API and returns the answer; panics on socket errors.
    pub fn runtime_cli(&self, command: &str) -> String {
        self.try_runtime_cli(command)
            .unwrap_or_else(|e| panic!("runtime API `{command}`: {e}"))
    }

    /// Like [`Haproxy::master_cli`], returning socket errors.
    pub fn try_master_cli(&self, command: &str) -> std::io::Result<String> {
        cli(&self.master_socket, command)
    }

    /// Like [`Haproxy::runtime_cli`], returning socket errors.
    pub fn try_runtime_cli(&self, command: &str) -> std::io::Result<String> {
        cli(&self.stats_socket, command)
    }

    /// Pids of every worker the master lists (current and old).
    pub fn worker_pids(&self) -> Vec<u32> {
        worker_pids(&self.master_cli("show proc"))
    }

    /// Stops HAProxy now: SIGTERM to the master (it stops its workers), SIGKILL for whatever
    /// is left after 5 s, including workers the master listed. Idempotent.
    pub fn stop(&mut self) {
        if self.child.0.is_none() {
            return;
        }
        let workers = self
            .try_master_cli("show proc")
            .map(|p| worker_pids(&p))
            .unwrap_or_default();
        self.child.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let exited = self
                .child
                .0
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited
                && workers
                    .iter()
                    .all(|&pid| !is_our_process(pid, &self.config))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill();
        for pid in workers {
            if is_our_process(pid, &self.config) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn render(stats_socket: &Path, global_extra: &str, sections: &str) -> String {
    format!(
        "global\n    \
         stats socket {} mode 600 level admin expose-fd listeners\n    \
         stats timeout 10s\n    \
         maxconn 2000\n    \
         hard-stop-after 10s\n\
         {global_extra}{}\n{sections}",
        stats_socket.display(),
        if global_extra.is_empty() || global_extra.ends_with('\n') {
            ""
        } else {
            "\n"
        },
    )
}

/// True when `pid` is still a HAProxy process started with `config` (guards against pid reuse).
fn is_our_process(pid: u32, config: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("haproxy") && c.contains(&*config.to_string_lossy())
        })
        .unwrap_or(false)
}

/// Pids of the `worker` lines of a `show proc` answer.
pub fn worker_pids(show_proc: &str) -> Vec<u32> {
    show_proc
        .lines()
        .filter_map(|l| {
            let mut t = l.split_whitespace();
            let pid = t.next()?.parse().ok()?;
            (t.next()? == "worker").then_some(pid)
        })
        .collect()
}

/// Sends one command to an HAProxy CLI socket (master or runtime API) and returns the answer.
pub fn cli_command(socket: &Path, command: &str) -> std::io::Result<String> {
    cli(socket, command)
}

fn cli(socket: &Path, command: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    // The master CLI answers but keeps the connection open until the client half-closes it.
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// A `busybox httpd` on a free loopback port serving `body` at `/`; killed on drop.
#[derive(Debug)]
pub struct StaticBackend {
    child: KillOnDrop,
    port: u16,
    _dir: tempfile::TempDir,
}

impl StaticBackend {
    /// Starts it and waits (at most 10 s) until it serves `body`.
    pub fn start(body: &str) -> StaticBackend {
        let busybox = require("busybox", "busybox-static");
        let dir = tempfile::Builder::new()
            .prefix("flotilla-httpd-")
            .tempdir()
            .expect("create a temp dir for httpd");
        std::fs::write(dir.path().join("index.html"), body).expect("write index.html");
        let port = free_port();
        let child = Command::new(busybox)
            .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start busybox httpd");
        let backend = StaticBackend {
            child: KillOnDrop(Some(child)),
            port,
            _dir: dir,
        };
        wait_for(
            &format!("busybox httpd on 127.0.0.1:{port}"),
            Duration::from_secs(10),
            || {
                http_get(port, "/", Duration::from_secs(1))
                    .ok()
                    .filter(|(_, b)| b == body)
            },
        );
        backend
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ip:port`, for a `server` line.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills it now (the port then refuses connections).
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

/// A one-shot `GET <path>` to 127.0.0.1:`port` with `Connection: close`: (status, body).
pub fn http_get(port: u16, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    http_get_host(port, "127.0.0.1", path, timeout)
}

/// `GET path` to 127.0.0.1:port with a `Host` header and `Connection: close`, the request sent
/// in one write: (status, body).
pub fn http_get_host(
    port: u16,
    host: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    http_get_at(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        host,
        path,
        timeout,
    )
}

/// `GET path` to `addr` with a `Host` header and `Connection: close`, the request sent in one
/// write: (status, body). For addresses in a simulated host's namespace, call it on a thread in
/// a namespace connected to it ([`crate::netns::Netns::enter`]).
pub fn http_get_at(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no end of headers in {text:?}"),
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no status in {head:?}"),
            )
        })?;
    Ok((status, body.to_string()))
}
