//! A rootful Podman engine of the test's own: `podman system service` on a socket in a temp dir,
//! with its own storage (`--root`), run state (`--runroot`, `--tmpdir`) and network config dir,
//! so it shares nothing with `/var/lib/containers` or another test's engine. It speaks the
//! Docker-compatible API on that socket, which is what presence is pointed at
//! (`--docker-host unix://…`).
//!
//! - Start is bounded: the socket's `/_ping` is polled until it answers `OK` (30 s), and a
//!   service that exits early fails the test with its log.
//! - The busybox test image is built into this engine's storage from Debian's static busybox,
//!   the same `FROM scratch` image as [`crate::docker`] (nothing is pulled).
//! - Drop removes every container (`podman rm -f -a -t 0`), stops the service (SIGTERM, then
//!   SIGKILL), kills whatever is left that names the temp dir (conmon, `podman container
//!   cleanup`), unmounts the storage's mounts and removes the dir, also when the test panics.
//!   A test process killed outright cannot drop: [`sweep_stale`] (called by every start) cleans
//!   up the dirs of harness runs whose process is gone.
//!
//! Machine specifics the engine is set up for (Podman 4.3, Debian 12, no systemd as pid 1):
//!
//! - `CONTAINERS_CONF` points at a containers.conf of its own: `events_logger = "file"` (no
//!   journald here; the log lives under `--tmpdir`), `cgroup_manager = "cgroupfs"`.
//! - Podman gives every container `nofile` and `nproc` limits of 1048576 unless containers.conf
//!   names others, and runc cannot raise a limit above what the service has where the
//!   machine lacks CAP_SYS_RESOURCE (`error setting rlimit type 7: operation not permitted`).
//!   Podman also lowered its own `nproc` to 32768 when started with more. So the service is
//!   started under `prlimit` with exactly the limits its containers get (this process's hard
//!   limits, `nproc` at most 32768), and they are checked in `/proc/<pid>/limits`.
//! - Containers join Podman's default CNI network (`podman`, bridge `cni-podman0`,
//!   10.88.0.0/16), whose bridge and firewall chains (`CNI-*`) Podman adds next to Docker's;
//!   Docker's `docker0` and chains are not touched.
//! - `podman --remote build` keeps a client-side blob cache in `/var/lib/containers/cache`
//!   (the only thing outside the temp dir besides CNI's `/var/lib/cni` and `cni-podman0`).
//! - Health checks: Podman schedules them with systemd timers; without systemd none run
//!   (the service logs `unable to get systemd connection to add healthchecks`) and a container
//!   with a HEALTHCHECK stays `starting` until a check is run by hand:
//!   [`Podman::healthcheck_run`].

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{require, run, KillOnDrop};

/// Name of the busybox test image (stored by Podman as `localhost/flotilla-busybox:test`).
pub const IMAGE: &str = "flotilla-busybox:test";

/// The name Podman stores [`IMAGE`] under, and reports as a container's `Config.Image`.
pub const IMAGE_STORED: &str = "localhost/flotilla-busybox:test";

/// Prefix of every temp dir of this harness: `/tmp/flotilla-podman-<pid>-…`.
const DIR_PREFIX: &str = "flotilla-podman-";

/// How long the service may take to answer `/_ping`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one `podman` client command may take (a stuck one fails the test, not hangs it).
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// The `podman` binary, or a failed test saying to run `scripts/setup`.
pub fn require_podman() -> PathBuf {
    require("podman", "podman")
}

/// A running `podman system service` with storage of its own; everything is removed on drop.
#[derive(Debug)]
pub struct Podman {
    dir: tempfile::TempDir,
    sock: PathBuf,
    service: KillOnDrop,
    bin: PathBuf,
    image: OnceLock<()>,
}

impl Podman {
    /// Starts the service and waits (bounded) until its socket answers `/_ping`.
    pub fn start() -> Podman {
        let bin = require_podman();
        let prlimit = require("prlimit", "util-linux");
        sweep_stale();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir_in("/tmp")
            .expect("podman temp dir");
        for sub in ["root", "runroot", "tmp", "net"] {
            fs::create_dir(dir.path().join(sub)).expect("podman dir");
        }
        let nofile = own_hard_limit("Max open files").min(1_048_576);
        let nproc = own_hard_limit("Max processes").min(32_768);
        // File locks (under the service's own --tmpdir), not the default shared-memory ones:
        // those live in one machine-wide /dev/shm/libpod_lock, and two services starting at
        // once (tests run on two threads) failed with "failed to open 2048 locks in
        // /libpod_lock: bad file descriptor".
        fs::write(
            dir.path().join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
                 [engine]\nevents_logger = \"file\"\ncgroup_manager = \"cgroupfs\"\nlock_type = \"file\"\n"
            ),
        )
        .expect("containers.conf");
        let sock = dir.path().join("podman.sock");
        let log = fs::File::create(dir.path().join("service.log")).expect("service log");
        let mut cmd = Command::new(prlimit);
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg(format!("--nproc={nproc}:{nproc}"))
            .arg("--")
            .arg(&bin)
            .args(global_flags(dir.path()))
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", sock.display()))
            .env("CONTAINERS_CONF", dir.path().join("containers.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn podman system service");
        let mut podman = Podman {
            dir,
            sock,
            service: KillOnDrop(Some(child)),
            bin,
            image: OnceLock::new(),
        };
        podman.wait_answering();
        podman.check_limits(nofile, nproc);
        podman
    }

    fn wait_answering(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(&self.sock) {
                return;
            }
            if let Some(child) = self.service.0.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "podman system service exited ({status}) before answering; log:\n{}",
                        self.log()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "podman system service did not answer /_ping on {} within {START_TIMEOUT:?}; log:\n{}",
                self.sock.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The limits its containers are given must be the service's own (runc cannot raise them).
    fn check_limits(&self, nofile: u64, nproc: u64) {
        let pid = self.service.pid().expect("service running");
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        for (what, want) in [("Max open files", nofile), ("Max processes", nproc)] {
            let got = hard_limit(&limits, what);
            assert_eq!(
                got,
                Some(want),
                "podman system service runs with {what} {got:?}, its containers are configured \
                 with {want}: runc would fail to start them"
            );
        }
    }

    /// The service's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// `unix://<socket>`, for `--docker-host`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// A `podman --remote` command talking to this service.
    pub fn command(&self) -> Command {
        remote(&self.bin, &self.docker_host())
    }

    /// Runs `podman --remote ARGS…` (bounded) and returns its stdout.
    pub fn podman(&self, args: &[&str]) -> anyhow::Result<String> {
        run_bounded(self.command().args(args), CMD_TIMEOUT)
    }

    /// The Podman server version (`podman version`'s `Server.Version`, e.g. `4.3.1`).
    pub fn version(&self) -> String {
        self.podman(&["version", "-f", "{{.Server.Version}}"])
            .expect("podman version")
            .trim()
            .to_owned()
    }

    /// `GET path` on the API socket (HTTP/1.0): (status code, body).
    pub fn api_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        api_get(&self.sock, path)
    }

    /// Builds [`IMAGE`] into this engine's storage (once) and returns its name.
    pub fn busybox_image(&self) -> &'static str {
        self.image.get_or_init(|| {
            let busybox = require("busybox", "busybox-static");
            let ctx = tempfile::tempdir().expect("build context");
            let bin = ctx.path().join("bin");
            fs::create_dir(&bin).expect("mkdir bin");
            fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
            let list = run(Command::new(&busybox).arg("--list")).expect("busybox --list");
            for applet in list
                .lines()
                .map(str::trim)
                .filter(|a| !a.is_empty() && *a != "busybox")
            {
                symlink("busybox", bin.join(applet)).expect("applet symlink");
            }
            fs::write(
                ctx.path().join("Containerfile"),
                "FROM scratch\nCOPY bin /bin\nCMD [\"/bin/sh\"]\n",
            )
            .expect("Containerfile");
            run_bounded(
                self.command()
                    .args(["build", "-q", "-t", IMAGE, "-f"])
                    .arg(ctx.path().join("Containerfile"))
                    .arg(ctx.path()),
                CMD_TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("podman build {IMAGE}: {e}\nservice log:\n{}", self.log()));
        });
        IMAGE
    }

    /// `podman run -d --name NAME ARGS…` (ARGS include the image and command).
    pub fn run_container(&self, name: &str, args: &[&str]) -> PodmanContainer {
        let _ = self.podman(&["rm", "-f", "-t", "0", name]);
        let out = run_bounded(
            self.command()
                .args(["run", "-d", "--name", name])
                .args(args),
            CMD_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("podman run {name}: {e}\nservice log:\n{}", self.log()));
        PodmanContainer {
            id: out.trim().to_owned(),
            name: name.to_owned(),
            bin: self.bin.clone(),
            url: self.docker_host(),
        }
    }

    /// `podman healthcheck run NAME`: runs the container's HEALTHCHECK once (what a systemd
    /// timer would do). Ok(true) when the check passed, Ok(false) when it failed.
    pub fn healthcheck_run(&self, name: &str) -> anyhow::Result<bool> {
        let out = self
            .command()
            .args(["healthcheck", "run", name])
            .output()
            .map_err(|e| anyhow::anyhow!("podman healthcheck run: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match (out.status.code(), text.as_str()) {
            (Some(0), _) => Ok(true),
            (Some(1), "unhealthy") => Ok(false),
            _ => anyhow::bail!(
                "podman healthcheck run {name}: {} {text} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Processes whose command line names this engine's dir (the service, conmon, cleanups).
    fn own_processes(&self) -> Vec<i32> {
        processes_naming(self.dir.path())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let alive = self.service.0.is_some() && ping(&self.sock);
        let rm = if alive {
            run_bounded(
                self.command().args(["rm", "-f", "-a", "-t", "0"]),
                CMD_TIMEOUT,
            )
        } else {
            // The service is gone: remove the containers through the same storage directly.
            run_bounded(
                Command::new(&self.bin)
                    .args(global_flags(self.dir.path()))
                    .args(["rm", "-f", "-a", "-t", "0"])
                    .env("CONTAINERS_CONF", self.dir.path().join("containers.conf")),
                CMD_TIMEOUT,
            )
        };
        if let Err(e) = rm {
            eprintln!("podman harness: removing containers: {e}");
        }
        if let Some(mut child) = self.service.0.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        kill_all(|| self.own_processes());
        unmount_under(self.dir.path());
        // TempDir's own drop removes the (now unmounted) dir.
    }
}

/// A container of one [`Podman`], force-removed on drop.
#[derive(Debug)]
pub struct PodmanContainer {
    /// Full container id.
    pub id: String,
    /// Container name.
    pub name: String,
    bin: PathBuf,
    url: String,
}

impl PodmanContainer {
    /// The 12-hex short id.
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// Runs `podman --remote <verb> <args…> <name>`, e.g. `podman stop -t 5 NAME`.
    pub fn podman(&self, verb: &str, args: &[&str]) -> anyhow::Result<String> {
        run_bounded(
            remote(&self.bin, &self.url)
                .arg(verb)
                .args(args)
                .arg(&self.name),
            CMD_TIMEOUT,
        )
    }

    /// A `podman --remote <verb> <args…> <name>` command, to spawn (a `stop` that takes a while).
    pub fn command(&self, verb: &str, args: &[&str]) -> Command {
        let mut cmd = remote(&self.bin, &self.url);
        cmd.arg(verb).args(args).arg(&self.name);
        cmd
    }

    /// `podman inspect -f FORMAT NAME`.
    pub fn inspect(&self, format: &str) -> anyhow::Result<String> {
        Ok(self.podman("inspect", &["-f", format])?.trim().to_owned())
    }

    /// The host port published for `private` (e.g. `"8080/tcp"`).
    pub fn host_port(&self, private: &str) -> u16 {
        let out = run_bounded(
            remote(&self.bin, &self.url).args(["port", &self.name, private]),
            CMD_TIMEOUT,
        )
        .expect("podman port");
        out.lines()
            .next()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no host port for {private}: {out}"))
    }
}

impl Drop for PodmanContainer {
    fn drop(&mut self) {
        let _ = run_bounded(
            remote(&self.bin, &self.url).args(["rm", "-f", "-t", "0", &self.name]),
            CMD_TIMEOUT,
        );
    }
}

/// Removes what harness runs left behind whose test process is gone (killed before its drops
/// ran): their services and containers' processes, mounts and dirs.
pub fn sweep_stale() {
    let Ok(entries) = fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        kill_all(|| processes_naming(&dir));
        unmount_under(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// The global flags that give a podman its own storage, state and network config under `dir`.
fn global_flags(dir: &Path) -> Vec<String> {
    let p = |sub: &str| dir.join(sub).display().to_string();
    vec![
        "--root".into(),
        p("root"),
        "--runroot".into(),
        p("runroot"),
        "--tmpdir".into(),
        p("tmp"),
        "--network-config-dir".into(),
        p("net"),
        "--events-backend".into(),
        "file".into(),
        "--cgroup-manager".into(),
        "cgroupfs".into(),
    ]
}

fn remote(bin: &Path, url: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["--remote", "--url", url]);
    cmd
}

/// Like [`run`], but the command is killed and an error returned after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {what}: {e}"))?;
    // Read both pipes on threads so a chatty command cannot block on a full pipe.
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    if !status.success() {
        anyhow::bail!("{what} failed ({status}): {err}{out}");
    }
    Ok(out)
}

/// True when the socket answers `GET /_ping` with `OK`.
fn ping(sock: &Path) -> bool {
    matches!(api_get(sock, "/_ping"), Ok((200, body)) if body.trim() == "OK")
}

/// `GET path` over the Unix socket, HTTP/1.0 (not chunked; the answer ends with the
/// connection): (status, body). Bounded at 5 s.
fn api_get(sock: &Path, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: podman\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The hard limit named `what` (`Max open files`) in a `/proc/<pid>/limits` text.
fn hard_limit(limits: &str, what: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with(what))?;
    let hard = line[what.len()..].split_whitespace().nth(1)?;
    Some(if hard == "unlimited" {
        u64::MAX
    } else {
        hard.parse().ok()?
    })
}

fn own_hard_limit(what: &str) -> u64 {
    let limits = fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    hard_limit(&limits, what).unwrap_or_else(|| panic!("no {what} in /proc/self/limits"))
}

/// Pids of processes whose command line contains `dir`.
fn processes_naming(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGTERM to every pid `find` returns for 5 s, then SIGKILL for 5 s more.
fn kill_all(find: impl Fn() -> Vec<i32>) {
    let start = Instant::now();
    loop {
        let left = find();
        if left.is_empty() || start.elapsed() > Duration::from_secs(10) {
            return;
        }
        let sig = if start.elapsed() > Duration::from_secs(5) {
            nix::sys::signal::Signal::SIGKILL
        } else {
            nix::sys::signal::Signal::SIGTERM
        };
        for pid in left {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Unmounts (lazily, deepest first) every mount at or under `dir`: the overlay driver mounts
/// its own `root/overlay` and each container's rootfs.
fn unmount_under(dir: &Path) {
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

#[cfg(test)]
mod tests {
    use super::hard_limit;

    #[test]
    fn reads_hard_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             32768                96362                processes \n\
                    Max open files            1024                 unlimited            files     \n";
        assert_eq!(hard_limit(text, "Max processes"), Some(96362));
        assert_eq!(hard_limit(text, "Max open files"), Some(u64::MAX));
        assert_eq!(hard_limit(text, "Max locked memory"), None);
    }
}
