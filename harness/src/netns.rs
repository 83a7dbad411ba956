//! Network namespaces and a virtual switch between them, for simulated hosts
//! ([`crate::hosts`]).
//!
//! A [`Netns`] is created with `ip netns add` and its processes are started with
//! `nsenter --net=/var/run/netns/NAME` (not `ip netns exec`, which remounts /sys and hides the
//! cgroups dockerd needs). A [`Switch`] is a namespace holding one Linux bridge; each attached
//! namespace gets a veth pair whose switch end is a bridge port and whose other end is `eth0`
//! in that namespace. Both ends are created inside those namespaces, so nothing is ever added
//! to the machine's own network namespace: several fleets (in parallel tests, or other
//! people's runs) can use the same addresses without meeting, and nothing can leak out.
//!
//! The test process itself stays in the machine's namespace. To talk to a simulated host it
//! runs a closure on a thread that has entered a namespace ([`Netns::spawn`], [`Netns::enter`],
//! via setns(2)): sockets created there belong to that namespace.
//!
//! Drop kills every process still in the namespace and deletes it, also when the test panics.
//! A test process killed outright (SIGKILL) cannot run drops: [`sweep_stale`] removes the
//! namespaces and directories of harness runs whose process is gone (called by every new fleet).

use std::ffi::OsStr;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{require, run};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Name prefix of every namespace this harness creates: `flh<pid>x<seq>-<role>`.
pub const NAME_PREFIX: &str = "flh";

/// A fresh `flh<pid>x<seq>` prefix, unique in this process and among live processes.
pub fn unique_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "{NAME_PREFIX}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

fn ip_bin() -> PathBuf {
    require("ip", "iproute2")
}

/// One network namespace, deleted (with every process left in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME` (a leftover of the same name is removed first) and `lo` up.
    pub fn create(name: &str) -> Netns {
        require("nsenter", "util-linux");
        let _ = Command::new(ip_bin()).args(["netns", "del", name]).output();
        run(Command::new(ip_bin()).args(["netns", "add", name]))
            .unwrap_or_else(|e| panic!("ip netns add {name}: {e}"));
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])
            .unwrap_or_else(|e| panic!("lo up in {name}: {e}"));
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `nsenter --net=PATH -- program`: add arguments, then spawn or run it. nsenter execs the
    /// program, so the child's pid is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(require("nsenter", "util-linux"));
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args…` in the namespace to completion: its stdout, or an error with stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run(self.command(program).args(args))
    }

    /// `ip -n NAME args…`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(ip_bin()).args(["-n", &self.name]).args(args))
    }

    /// `iptables -w args…` in the namespace (its own tables: nothing outside it is touched).
    pub fn iptables(&self, args: &[&str]) -> anyhow::Result<String> {
        let iptables = require("iptables", "iptables");
        run(self.command(iptables).arg("-w").args(args))
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it creates belong here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                enter_thread(&path);
                f()
            })
            .expect("spawn a thread")
    }

    /// Runs `f` in this namespace (on a thread of its own) and returns its result; a panic in
    /// `f` is raised here.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Pids of every process whose network namespace this is.
    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.name)
    }

    /// SIGKILLs every process in the namespace, and waits (bounded) until none is left.
    pub fn kill_all(&self) {
        kill_all_in(&self.name);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        let _ = Command::new(ip_bin())
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the network namespace at `path` (setns(2)). Panics on failure:
/// a thread left in the wrong namespace would send traffic where it must not go.
pub fn enter_thread(path: &Path) {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
}

fn pids_in(name: &str) -> Vec<i32> {
    let out = Command::new(ip_bin())
        .args(["netns", "pids", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill_all_in(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_in(name);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A namespace with one bridge (`br0`): the wire between simulated hosts. Namespaces are
/// attached with a veth pair each; [`Switch::set_port`] unplugs and plugs one back.
#[derive(Debug)]
pub struct Switch {
    ns: Netns,
}

impl Switch {
    /// Creates namespace `name` with bridge `br0` up.
    pub fn create(name: &str) -> Switch {
        let ns = Netns::create(name);
        ns.ip(&["link", "add", "br0", "type", "bridge"])
            .and_then(|_| ns.ip(&["link", "set", "br0", "up"]))
            .unwrap_or_else(|e| panic!("bridge in {name}: {e}"));
        Switch { ns }
    }

    /// The switch's own namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Connects `host` to the bridge: a veth pair `port` (a bridge port here) ↔ `eth0` (in
    /// `host`, with `ip/24`, up). `port` is an interface name (≤ 15 chars), unique per switch.
    pub fn attach(&self, host: &Netns, port: &str, ip: Ipv4Addr) {
        let res = self
            .ns
            .ip(&[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.name(),
            ])
            .and_then(|_| self.ns.ip(&["link", "set", port, "master", "br0", "up"]))
            .and_then(|_| host.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]))
            .and_then(|_| host.ip(&["link", "set", "eth0", "up"]));
        if let Err(e) = res {
            panic!("attaching {} to the switch as {port}: {e}", host.name());
        }
    }

    /// Sets bridge port `port` up (plugged) or down (unplugged: nothing reaches the host).
    pub fn set_port(&self, port: &str, up: bool) {
        self.ns
            .ip(&["link", "set", port, if up { "up" } else { "down" }])
            .unwrap_or_else(|e| panic!("switch port {port}: {e}"));
    }
}

/// Removes what harness runs whose process is gone left behind: namespaces named
/// `flh<pid>x…` (their processes killed first) and dockerd directories
/// `/var/lib/flotilla-hosts-flh<pid>x…` (unmounted first). Runs of live processes are left alone.
pub fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            return false;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        match pid.parse::<u32>() {
            Ok(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
            Err(_) => false,
        }
    };
    for entry in fs::read_dir(NETNS_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            kill_all_in(&name);
            let _ = Command::new(ip_bin())
                .args(["netns", "del", &name])
                .output();
        }
    }
    for entry in fs::read_dir("/var/lib").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(run_name) = name.strip_prefix(crate::hosts::DOCKERD_ROOT_PREFIX) {
            if dead(run_name) {
                kill_processes_naming(&entry.path());
                unmount_under(&entry.path());
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// SIGKILLs every process whose command line names `dir` (a dockerd's containerd and shims).
pub(crate) fn kill_processes_naming(dir: &Path) {
    let needle = format!("{}/", dir.display());
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Unmounts (lazily, deepest first) every mount point at or under `dir`.
pub(crate) fn unmount_under(dir: &Path) {
    let root = dir.display().to_string();
    let prefix = format!("{root}/");
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&prefix) || *p == root)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(p).output();
    }
}
