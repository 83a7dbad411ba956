//! The local test image and containers that are removed on drop.
//!
//! The image `flotilla-busybox:test` is `FROM scratch` plus Debian's static busybox and a
//! symlink per applet, built locally from a temp context (nothing is ever pulled). Building is
//! idempotent and serialised with a lock file, so parallel tests share one build.

use std::fs;
use std::os::unix::fs::symlink;
use std::process::Command;
use std::sync::OnceLock;

use crate::{require, run};

/// Name of the local busybox test image.
pub const IMAGE: &str = "flotilla-busybox:test";

fn docker() -> Command {
    Command::new(require("docker", "docker.io"))
}

/// Fails with a clear message when the Docker engine does not answer.
pub fn require_engine() {
    require("docker", "docker.io");
    let ok = docker()
        .args(["version", "-f", "{{.Server.APIVersion}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "the Docker engine does not answer on /var/run/docker.sock: run `scripts/setup` (it starts dockerd)");
}

/// Builds [`IMAGE`] if it is not there yet and returns its name.
pub fn busybox_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        require_engine();
        // Serialise builds across test processes.
        let lock = fs::File::create("/tmp/flotilla-busybox-image.lock").expect("lock file");
        let _guard =
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
        if run(docker().args(["image", "inspect", "-f", "{{.Id}}", IMAGE])).is_ok() {
            return;
        }
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
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY bin /bin\nCMD [\"/bin/sh\"]\n",
        )
        .expect("Dockerfile");
        run(docker()
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", IMAGE])
            .arg(ctx.path()))
        .unwrap_or_else(|e| panic!("building {IMAGE}: {e}"));
    });
    IMAGE
}

/// A container started with `docker run -d`, force-removed on drop.
#[derive(Debug)]
pub struct Container {
    /// Full container id.
    pub id: String,
    /// Container name.
    pub name: String,
}

impl Container {
    /// `docker run -d --name NAME ARGS...` (ARGS includes the image and command).
    pub fn run(name: &str, args: &[&str]) -> Container {
        require_engine();
        let _ = docker().args(["rm", "-f", name]).output();
        let out = run(docker().args(["run", "-d", "--name", name]).args(args))
            .unwrap_or_else(|e| panic!("docker run {name}: {e}"));
        Container {
            id: out.trim().to_owned(),
            name: name.to_owned(),
        }
    }

    /// The 12-hex short id.
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// Runs `docker <verb> <args...> <name>`, e.g. `docker stop -t 5 NAME`.
    pub fn docker(&self, verb: &str, args: &[&str]) -> anyhow::Result<String> {
        run(docker().arg(verb).args(args).arg(&self.name))
    }

    /// `docker inspect -f FORMAT NAME`.
    pub fn inspect(&self, format: &str) -> anyhow::Result<String> {
        Ok(run(docker().args(["inspect", "-f", format, &self.name]))?
            .trim()
            .to_owned())
    }

    /// The host port published for `private` (e.g. `"80/tcp"`).
    pub fn host_port(&self, private: &str) -> u16 {
        let out = run(docker().args(["port", &self.name, private])).expect("docker port");
        let first = out.lines().next().unwrap_or_default();
        first
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no host port for {private}: {out}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker().args(["rm", "-f", "-v", &self.name]).output();
    }
}

/// A unique container name for this test process: `flotilla-test-<pid>-<tag>`.
pub fn unique_name(tag: &str) -> String {
    format!("flotilla-test-{}-{tag}", std::process::id())
}
