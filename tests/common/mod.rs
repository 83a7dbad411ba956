//! Shared pieces of the end-to-end tests: locating the built binaries, daemons that are killed
//! on drop, and HTTP through HAProxy.
#![allow(dead_code)]

pub mod chain;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_harness::KillOnDrop;

/// A workspace binary built by `cargo build --bins` (scripts/test does that before the tests).
pub fn bin(name: &str) -> PathBuf {
    // target/debug/deps/<test> -> target/debug/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --bins`, as scripts/test does)",
        path.display()
    );
    path
}

/// A daemon started by a test, its output in a log file; SIGKILLed on drop.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    pub proc: KillOnDrop,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `program args...` with `RUST_LOG=debug`, logging to `<dir>/<name>.log`.
    pub fn start(name: &str, program: &Path, args: &[String], dir: &Path) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "debug,h2=info,tower=info,hyper=info,tonic=info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        Daemon {
            name: name.into(),
            proc: KillOnDrop(Some(child)),
            log,
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        self.proc.signal(sig);
    }

    /// Fails with the log if the daemon has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.proc.0.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{} exited ({status}); its log:\n{}", self.name, self.log());
            }
        }
    }
}

/// HAProxy in master-worker mode on a config file written by confgen; killed on drop.
#[derive(Debug)]
pub struct Proxy {
    pub proc: KillOnDrop,
    pub master_socket: PathBuf,
    pub log: PathBuf,
}

impl Proxy {
    pub fn start(config: &Path, master_socket: &Path, dir: &Path) -> Proxy {
        let haproxy = flotilla_harness::require("haproxy", "haproxy");
        let log = dir.join("haproxy.log");
        let file = std::fs::File::create(&log).expect("haproxy log");
        let child = Command::new(haproxy)
            .arg("-W")
            .arg("-db")
            .arg("-S")
            .arg(format!("{},mode,600", master_socket.display()))
            .arg("-f")
            .arg(config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("start haproxy");
        Proxy {
            proc: KillOnDrop(Some(child)),
            master_socket: master_socket.to_owned(),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Workers left by reloads belong to the master's process group only if it has one; kill
        // every haproxy process using our master socket's directory config to be sure.
        self.proc.signal(nix::sys::signal::Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(50));
        self.proc.kill();
    }
}

/// `GET path` to 127.0.0.1:port with a Host header and `Connection: close`: (status, body).
pub use flotilla_harness::haproxy::http_get_host as http_get;
