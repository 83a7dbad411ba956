//! A real systemd host for the tests: a Debian bookworm rootfs (built once with `mmdebstrap`
//! from Debian's packages and cached), booted with `systemd-nspawn --boot` as PID 1 of its own
//! PID namespace, with a volatile overlay so every boot starts clean and tests never write to
//! the cache.
//!
//! The machine shares the host's network namespace (loopback included: etcd, HAProxy and the
//! published container ports are the host's) and gets the host's Docker socket and docker CLI,
//! so units inside it run containers on the host's engine, where presence watches them. Its
//! systemd is reached the way an operator's tools reach a host's: `nsenter --mount` into it and
//! run the command there (`unitgen apply` talks D-Bus to the machine's own dbus-daemon).
//!
//! Why not Docker: no image can be pulled here, and a locally built systemd image would need
//! the same rootfs anyway; nspawn boots a directory directly. Why `--keep-unit --register=no`:
//! systemd is not PID 1 on the test host, so there is no host manager or machined to register
//! with.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{require, run, KillOnDrop};

/// Where the rootfs is cached. Bump the suffix when the package list changes.
pub const ROOTFS: &str = "/var/cache/flotilla/rootfs-bookworm-systemd-v1";

/// Debian packages in the rootfs (on top of `--variant=minbase`).
pub const PACKAGES: &str = "systemd,systemd-sysv,dbus";

/// Bound on building the rootfs (downloads about 60 MB of packages).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// Returns the cached rootfs, building it first if needed. Serialised across test processes
/// with a lock file; a half-built tree is never used (built beside, then renamed).
pub fn rootfs() -> PathBuf {
    let root = PathBuf::from(ROOTFS);
    let ready = root.join("usr/lib/systemd/systemd");
    if ready.is_file() {
        return root;
    }
    let parent = root.parent().expect("rootfs parent");
    fs::create_dir_all(parent).expect("create /var/cache/flotilla");
    let lock = fs::File::create(parent.join("rootfs.lock")).expect("rootfs lock file");
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    if ready.is_file() {
        return root;
    }
    let mmdebstrap = require("mmdebstrap", "mmdebstrap");
    let timeout = require("timeout", "coreutils");
    let tmp = parent.join(format!(
        "{}.building",
        root.file_name().unwrap().to_string_lossy()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let started = Instant::now();
    let out = Command::new(timeout)
        .arg(BUILD_TIMEOUT.as_secs().to_string())
        .arg(mmdebstrap)
        .args(["--variant=minbase", "--include", PACKAGES, "bookworm"])
        .arg(&tmp)
        .stdin(Stdio::null())
        .output()
        .expect("run mmdebstrap");
    assert!(
        out.status.success(),
        "mmdebstrap (building the systemd rootfs {ROOTFS}, bounded by {BUILD_TIMEOUT:?}) failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // A machine id is generated at each boot (the overlay is volatile).
    let _ = fs::write(tmp.join("etc/machine-id"), "");
    fs::rename(&tmp, &root).expect("move the rootfs into place");
    eprintln!(
        "built the systemd rootfs {ROOTFS} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    root
}

/// A bind mount into the machine.
#[derive(Clone, Debug)]
pub struct Bind {
    /// Path on the test host.
    pub host: PathBuf,
    /// Path inside the machine.
    pub inside: String,
    /// Read-only.
    pub read_only: bool,
}

/// A booted systemd machine; powered off (then killed) on drop.
#[derive(Debug)]
pub struct Machine {
    /// Its name (also its hostname).
    pub name: String,
    nspawn: KillOnDrop,
    leader: u32,
    /// Its console log.
    pub log: PathBuf,
}

impl Machine {
    /// Boots a machine named `name` with the host's Docker socket and CLI plus `binds`, and
    /// waits (at most 60 s) until its systemd reports `running` or `degraded`.
    pub fn boot(name: &str, binds: &[Bind], dir: &Path) -> Machine {
        let nspawn = require("systemd-nspawn", "systemd-container");
        require("nsenter", "util-linux");
        let docker = require("docker", "docker.io");
        let root = rootfs();
        let log = dir.join(format!("{name}.console.log"));
        let file = fs::File::create(&log).expect("console log");
        let mut cmd = Command::new(nspawn);
        cmd.args([
            "--quiet",
            "--keep-unit",
            "--register=no",
            "--boot",
            "--volatile=overlay",
            "--console=passive",
        ])
        .arg(format!("--machine={name}"))
        .arg("--directory")
        .arg(&root)
        .arg("--bind=/var/run/docker.sock")
        .arg(format!("--bind-ro={}:/usr/bin/docker", docker.display()));
        for b in binds {
            let flag = if b.read_only { "--bind-ro" } else { "--bind" };
            cmd.arg(format!("{flag}={}:{}", b.host.display(), b.inside));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("start systemd-nspawn");
        let nspawn_pid = child.id();
        let mut machine = Machine {
            name: name.into(),
            nspawn: KillOnDrop(Some(child)),
            leader: 0,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let children = format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children");
        let mut state = String::new();
        loop {
            if let Some(c) = machine.nspawn.0.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "systemd-nspawn for {name} exited ({status}):\n{}",
                        machine.console()
                    );
                }
            }
            if machine.leader == 0 {
                // nspawn forks helpers before the container's init; the leader is the child
                // that runs systemd.
                machine.leader = fs::read_to_string(&children)
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    .find(|p| {
                        fs::read_to_string(format!("/proc/{p}/comm"))
                            .is_ok_and(|c| c.trim() == "systemd")
                    })
                    .unwrap_or(0);
            }
            if machine.leader != 0 {
                if let Ok(out) = machine
                    .exec_cmd(&["systemctl", "is-system-running"])
                    .output()
                {
                    state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if state == "running" || state == "degraded" {
                        break;
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "machine {name} did not boot within 60 s (systemd says {state:?}):\n{}",
                    machine.console()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Generated units require docker.service. Here the engine is the test host's (its
        // socket is bound in), so docker.service stands for it: active once it answers.
        machine.write_file(
            "/etc/systemd/system/docker.service",
            "[Unit]\nDescription=The test host's Docker engine, reached through its socket\n\n\
             [Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/docker version\n",
        );
        machine
            .exec(&["systemctl", "daemon-reload"])
            .expect("daemon-reload");
        machine
            .exec(&["systemctl", "start", "docker.service"])
            .unwrap_or_else(|e| panic!("docker.service in {name}: {e}"));
        machine
    }

    /// Writes a file inside the machine (in its volatile overlay).
    pub fn write_file(&self, path: &str, content: &str) {
        use std::io::Write;
        let mut child = self
            .exec_cmd(&["sh", "-c", "cat > \"$0\"", path])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nsenter");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(content.as_bytes())
            .expect("write");
        let status = child.wait().expect("wait");
        assert!(
            status.success(),
            "writing {path} in {}: {status}",
            self.name
        );
    }

    /// PID of the machine's systemd (PID 1 inside).
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The command prefix that runs a command inside the machine's mount namespace:
    /// `nsenter --target PID --mount --pid --`.
    pub fn prefix(&self) -> Vec<String> {
        vec![
            require("nsenter", "util-linux").display().to_string(),
            "--target".into(),
            self.leader.to_string(),
            "--mount".into(),
            // systemctl refuses a manager outside its own PID namespace.
            "--pid".into(),
            "--".into(),
        ]
    }

    /// A command that runs `args` inside the machine.
    pub fn exec_cmd(&self, args: &[&str]) -> Command {
        let p = self.prefix();
        let mut cmd = Command::new(&p[0]);
        cmd.args(&p[1..]).args(args);
        cmd
    }

    /// Runs `args` inside the machine and returns stdout.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&mut self.exec_cmd(args))
    }

    /// Powers the machine off (systemd stops every unit), waiting at most `grace`, then kills
    /// whatever is left.
    pub fn shutdown(&mut self, grace: Duration) {
        let Some(mut child) = self.nspawn.0.take() else {
            return;
        };
        if self.leader != 0 {
            // SIGRTMIN+4: systemd's "poweroff".
            let rtmin4 = libc_sigrtmin() + 4;
            let _ = Command::new("kill")
                .args([format!("-{rtmin4}"), self.leader.to_string()])
                .status();
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.leader != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.leader as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// SIGRTMIN on Linux with glibc (34; glibc reserves two realtime signals).
fn libc_sigrtmin() -> i32 {
    34
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(20));
    }
}
