//! Reaching a host: `unitgen rollout` runs `unitgen apply` on each host through a command prefix
//! (`--via 'ssh -T root@{address}'`), feeding it that host's units on stdin and reading its JSON
//! report. Without `--via`, the commands run on this machine (one-host setups, or a driver that
//! is the host).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::apply::ApplyReport;

/// How to run a command on a host.
#[derive(Clone, Debug, Default)]
pub struct Via {
    /// Words of the prefix, with `{host}` and `{address}` placeholders. Empty: run locally.
    pub prefix: Vec<String>,
    /// The unitgen program on the hosts.
    pub unitgen: String,
    /// Extra arguments for the remote `unitgen apply` (e.g. `--systemctl`).
    pub apply_args: Vec<String>,
    /// How long one remote command may take.
    pub timeout: Duration,
}

/// A remote command that failed.
#[derive(Debug, thiserror::Error)]
#[error("on host {host}: `{command}`: {detail}")]
pub struct RemoteError {
    /// The host.
    pub host: String,
    /// The command line, for the operator.
    pub command: String,
    /// What happened (exit status and stderr).
    pub detail: String,
}

impl Via {
    /// Splits a `--via` template on whitespace (no shell: quote nothing).
    pub fn parse_prefix(template: &str) -> Vec<String> {
        template.split_whitespace().map(str::to_string).collect()
    }

    fn command(&self, host: &str, address: &str, args: &[String]) -> (Command, String) {
        let mut words: Vec<String> = self
            .prefix
            .iter()
            .map(|w| w.replace("{host}", host).replace("{address}", address))
            .collect();
        words.extend(args.iter().cloned());
        let shown = words.join(" ");
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        (cmd, shown)
    }

    /// Runs `args` on `host`, with `stdin` as its input, and returns its stdout.
    pub fn run(
        &self,
        host: &str,
        address: &str,
        args: &[String],
        stdin: &str,
    ) -> Result<String, RemoteError> {
        let (mut cmd, shown) = self.command(host, address, args);
        let err = |detail: String| RemoteError {
            host: host.into(),
            command: shown.clone(),
            detail,
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("cannot start: {e}")))?;
        let mut input = child.stdin.take().expect("piped stdin");
        let data = stdin.to_owned();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(data.as_bytes());
        });
        // Read both pipes while waiting, so a chatty command never blocks on a full pipe.
        let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = drain(child.stdout.take().map(|s| Box::new(s) as _));
        let stderr = drain(child.stderr.take().map(|s| Box::new(s) as _));
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(err(format!(
                        "did not finish within {:?}; killed",
                        self.timeout
                    )));
                }
                Err(e) => return Err(err(e.to_string())),
            }
        };
        let _ = writer.join();
        let out = std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        if !out.status.success() {
            return Err(err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `unitgen apply --host HOST --units - --json` on `host` with `listing` on stdin.
    pub fn apply(
        &self,
        host: &str,
        address: &str,
        listing: &str,
    ) -> Result<ApplyReport, RemoteError> {
        let mut args = vec![
            self.unitgen.clone(),
            "apply".into(),
            "--host".into(),
            host.into(),
            "--units".into(),
            "-".into(),
            "--json".into(),
        ];
        args.extend(self.apply_args.iter().cloned());
        let out = self.run(host, address, &args, listing)?;
        serde_json::from_str(out.trim()).map_err(|e| RemoteError {
            host: host.into(),
            command: args.join(" "),
            detail: format!("unreadable report ({e}): {}", out.trim()),
        })
    }
}

/// What Docker says about a container, for error messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerHealth {
    /// `running`, `exited`, … or `absent`.
    pub status: String,
    /// `starting`, `healthy`, `unhealthy`, or empty without a HEALTHCHECK.
    pub health: String,
    /// The last health check's exit code and output, trimmed.
    pub last_check: String,
}

impl std::fmt::Display for ContainerHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "container {}", self.status)?;
        if !self.health.is_empty() {
            write!(f, ", health {}", self.health)?;
        }
        if !self.last_check.is_empty() {
            write!(f, " (last check: {})", self.last_check)?;
        }
        Ok(())
    }
}

impl Via {
    /// `docker inspect` of `container` on `host`.
    pub fn container_health(
        &self,
        host: &str,
        address: &str,
        docker: &str,
        container: &str,
    ) -> ContainerHealth {
        let args = vec![
            docker.to_string(),
            "inspect".into(),
            "--format".into(),
            "{{json .State}}".into(),
            container.to_string(),
        ];
        let Ok(out) = self.run(host, address, &args, "") else {
            return ContainerHealth {
                status: "absent".into(),
                ..Default::default()
            };
        };
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let last = v["Health"]["Log"]
            .as_array()
            .and_then(|l| l.last())
            .map(|l| {
                let output: String = s(&l["Output"])
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                let output: String = output.chars().take(160).collect();
                format!("exit {}: {output}", l["ExitCode"])
            })
            .unwrap_or_default();
        ContainerHealth {
            status: s(&v["Status"]),
            health: s(&v["Health"]["Status"]),
            last_check: last,
        }
    }
}
