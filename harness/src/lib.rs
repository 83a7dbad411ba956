//! Test-only harness: starts the real components Flotilla's tests run against, each on free
//! loopback ports with its own temp dir, and stops and removes everything on drop (also when the
//! test panics).
//!
//! - [`etcd`]: a single etcd, one with TLS client certs + password users with roles, and a
//!   3-member cluster whose members can be killed and restarted one by one.
//! - [`haproxy`]: HAProxy in master-worker mode with a master socket and a runtime (stats) socket.
//! - [`docker`]: the local `FROM scratch` busybox test image, and containers removed on drop.
//! - [`machine`]: a real systemd host (a cached Debian rootfs booted with systemd-nspawn).
//! - [`netns`]: network namespaces (`ip netns` + `nsenter`) and a virtual switch between them.
//! - [`hosts`]: a fleet of simulated hosts in namespaces (each its own dockerd, presence,
//!   confgen and HAProxy) and a 3-member etcd in namespaces of its own, with faults to cut.
//! - [`observe`]: what a fault test measures on a fleet (stale, lost, partial configs, failed
//!   requests), with request load and container churn.
//!
//! A missing component fails the test with a message saying to run `scripts/setup`; nothing is
//! ever silently skipped.

pub mod docker;
pub mod etcd;
pub mod haproxy;
pub mod hosts;
pub mod machine;
pub mod netns;
pub mod observe;
pub mod podman;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Returns the absolute path of `program` on `PATH`, or panics with a message naming the Debian
/// package and telling the developer to run `scripts/setup`.
pub fn require(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/usr/local/bin"];
    for dir in std::env::split_paths(&path).chain(extra.iter().map(PathBuf::from)) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{program}` is not installed (Debian package `{package}`): run `scripts/setup` first; \
         this test needs the real component and does not skip"
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Ports come from the kernel's ephemeral
/// range, so parallel tests do not collide on them.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Polls `cond` every 20 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion and returns its stdout, or an error carrying stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process that is killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct KillOnDrop(pub Option<std::process::Child>);

impl KillOnDrop {
    /// The child's pid, if it is still owned.
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(|c| c.id())
    }
    /// Sends `sig` to the child without waiting.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }
    /// Kills (SIGKILL) and reaps the child now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}
