//! The presence binary's command line, run as a process with a clean environment: where the
//! Docker engine address comes from (`--docker-host`, FLOTILLA_DOCKER_HOST, DOCKER_HOST, the
//! default) and Registrator's bare-number durations (`--ttl 30`).
//!
//! No etcd and no Docker engine are needed: presence is pointed at a socket path that does not
//! exist, so it logs its start-up line and the engine it is trying, then waits for Docker
//! forever (it never reaches the etcd step), until the test stops it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flotilla_harness::KillOnDrop;
use nix::sys::signal::Signal;

const DEADLINE: Duration = Duration::from_secs(15);

/// A presence process with a clean environment, its stderr in a file.
struct Run {
    child: KillOnDrop,
    log: PathBuf,
}

fn presence(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_presence"))
        .args(["--node", "cli-test", "--advertise-ip", "192.0.2.10"])
        .args(args)
        .env_clear()
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn presence");
    Run {
        child: KillOnDrop(Some(child)),
        log,
    }
}

impl Run {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first log line containing every one of `needles`; panics if presence exits first
    /// or after [`DEADLINE`].
    fn wait_line(&mut self, needles: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            let child = self.child.0.as_mut().expect("running");
            if let Some(st) = child.try_wait().expect("try_wait") {
                panic!("presence exited ({st}) before logging {needles:?}; log:\n{log}");
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no log line with {needles:?} after {DEADLINE:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for presence to exit by itself.
    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.0.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child.0 = None;
                return st;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "presence still running after {DEADLINE:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the bounded wait for its exit (0: a clean stop before Docker answered).
    /// Call it once presence has logged that it tries the engine: its signal handlers are
    /// installed by then.
    fn stop(&mut self) {
        self.child.signal(Signal::SIGTERM);
        let st = self.wait_exit();
        assert!(st.success(), "{st}; log:\n{}", self.log());
    }
}

fn unix_url(path: &Path) -> String {
    format!("unix://{}", path.display())
}

#[test]
fn docker_host_is_used_when_neither_the_flag_nor_flotilla_docker_host_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let env_sock = dir.path().join("from-docker-host.sock");
    let flotilla_sock = dir.path().join("from-flotilla-docker-host.sock");
    let flag_sock = dir.path().join("from-the-flag.sock");
    let (env_url, flotilla_url, flag_url) = (
        unix_url(&env_sock),
        unix_url(&flotilla_sock),
        unix_url(&flag_sock),
    );
    let env_path = env_sock.display().to_string();
    let flotilla_path = flotilla_sock.display().to_string();
    let flag_path = flag_sock.display().to_string();

    // DOCKER_HOST only: presence says so and actually tries that socket.
    let mut p = presence(dir.path(), "docker-host", &[], &[("DOCKER_HOST", &env_url)]);
    p.wait_line(&["cannot reach the Docker engine", &env_path]);
    p.wait_line(&[
        "presence starting",
        &format!("docker_host={env_url}"),
        "docker_host_from=DOCKER_HOST",
    ]);
    p.stop();

    // FLOTILLA_DOCKER_HOST beats DOCKER_HOST.
    let mut p = presence(
        dir.path(),
        "both",
        &[],
        &[
            ("DOCKER_HOST", &env_url),
            ("FLOTILLA_DOCKER_HOST", &flotilla_url),
        ],
    );
    p.wait_line(&["cannot reach the Docker engine", &flotilla_path]);
    p.stop();
    assert!(!p.log().contains(&env_path), "{}", p.log());

    // The flag beats both.
    let mut p = presence(
        dir.path(),
        "flag",
        &["--docker-host", &flag_url],
        &[
            ("DOCKER_HOST", &env_url),
            ("FLOTILLA_DOCKER_HOST", &flotilla_url),
        ],
    );
    p.wait_line(&["cannot reach the Docker engine", &flag_path]);
    p.stop();
    let log = p.log();
    assert!(
        !log.contains(&env_path) && !log.contains(&flotilla_path),
        "{log}"
    );

    // A DOCKER_HOST presence cannot speak to is refused like a bad flag, naming the variable.
    let mut p = presence(
        dir.path(),
        "ssh",
        &[],
        &[("DOCKER_HOST", "ssh://admin@docker-host")],
    );
    let st = p.wait_exit();
    assert_eq!(st.code(), Some(2), "{}", p.log());
    assert!(
        p.log()
            .contains("presence: DOCKER_HOST \"ssh://admin@docker-host\": must start with unix://"),
        "{}",
        p.log()
    );

    // --help tells a new user about the fallback.
    let help = Command::new(env!("CARGO_BIN_EXE_presence"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("presence --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("$DOCKER_HOST") && help.contains("unix:///var/run/docker.sock"),
        "{help}"
    );
}

#[test]
fn a_bare_number_for_ttl_and_resync_is_seconds_as_in_registrator() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = unix_url(&dir.path().join("no-docker.sock"));

    // Registrator's `-ttl 30 -resync 45` as flags.
    let mut p = presence(
        dir.path(),
        "flags",
        &["--ttl", "30", "--resync", "45", "--docker-host", &bogus],
        &[],
    );
    p.wait_line(&["presence starting", "ttl=30s", "resync=45s"]);
    p.wait_line(&["cannot reach the Docker engine"]);
    p.stop();

    // The same through the environment.
    let mut p = presence(
        dir.path(),
        "env",
        &["--docker-host", &bogus],
        &[("FLOTILLA_TTL", "20"), ("FLOTILLA_RESYNC", "90")],
    );
    p.wait_line(&["presence starting", "ttl=20s", "resync=1m 30s"]);
    p.wait_line(&["cannot reach the Docker engine"]);
    p.stop();

    // The bounds are those of `1s`: refused at once, exit 2, naming the flag.
    let mut p = presence(
        dir.path(),
        "short",
        &["--ttl", "1", "--docker-host", &bogus],
        &[],
    );
    assert_eq!(p.wait_exit().code(), Some(2), "{}", p.log());
    assert!(
        p.log()
            .contains("presence: --ttl 1s: must be whole seconds, at least 2s"),
        "{}",
        p.log()
    );
    for bad in ["1.5", "-5", "30 parsecs"] {
        let mut p = presence(
            dir.path(),
            "bad",
            &[&format!("--ttl={bad}"), "--docker-host", &bogus],
            &[],
        );
        assert_eq!(p.wait_exit().code(), Some(2), "{bad}: {}", p.log());
        assert!(
            p.log()
                .contains(&format!("invalid value '{bad}' for '--ttl")),
            "{bad}: {}",
            p.log()
        );
    }
}
