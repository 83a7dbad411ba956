//! The master CLI of HAProxy's master-worker mode (`haproxy -W -S <socket>`): the process list,
//! and reloads verified through it.
//!
//! HAProxy 2.6's `reload` command answers nothing (the master re-executes itself and drops the
//! connection), so success is judged from `show proc` afterwards: the master's reload counter
//! moved, its failed-reload counter did not, and a worker that was not there before answers.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::socket::{exchange, Answer};
use crate::Error;

/// The master process, as `show proc` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MasterProc {
    /// Its pid (stable across reloads: the master re-executes in place).
    pub pid: u32,
    /// Reloads since start.
    pub reloads: u32,
    /// Failed reloads (HAProxy 2.6 resets it to 0 on a successful reload).
    pub failed_reloads: u32,
    /// Uptime as printed (`0d00h00m04s`).
    pub uptime: String,
    /// HAProxy version.
    pub version: String,
}

/// A worker (or external program) process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerProc {
    /// Its pid.
    pub pid: u32,
    /// `worker`, or the program's name in the programs section.
    pub kind: String,
    /// How many reloads it has survived: 0 for the current generation, more for old workers
    /// still finishing their connections.
    pub reloads: u32,
    /// Uptime as printed.
    pub uptime: String,
    /// HAProxy version it runs.
    pub version: String,
}

/// The parsed answer to `show proc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcList {
    /// The master.
    pub master: MasterProc,
    /// Current and old workers.
    pub workers: Vec<WorkerProc>,
    /// External programs (`program` sections).
    pub programs: Vec<WorkerProc>,
}

impl ProcList {
    /// Workers of the current generation (that survived no reload).
    pub fn current_workers(&self) -> impl Iterator<Item = &WorkerProc> {
        self.workers.iter().filter(|w| w.reloads == 0)
    }

    /// Workers left from earlier generations, still finishing their connections.
    pub fn old_workers(&self) -> impl Iterator<Item = &WorkerProc> {
        self.workers.iter().filter(|w| w.reloads > 0)
    }

    /// Parses HAProxy's `show proc` output. Accepts the 2.5+ layout
    /// (`<PID> <type> <reloads> <uptime> <version>`) and the older one with a relative pid
    /// column; unknown `#` lines are ignored.
    pub fn parse(text: &str) -> Result<ProcList, String> {
        #[derive(PartialEq)]
        enum Section {
            Master,
            Workers,
            Programs,
        }
        let mut section = Section::Master;
        let mut master = None;
        let mut workers = Vec::new();
        let mut programs = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(header) = line.strip_prefix('#') {
                let header = header.trim().to_ascii_lowercase();
                if header.contains("program") {
                    section = Section::Programs;
                } else if header.contains("worker") {
                    section = Section::Workers;
                }
                continue;
            }
            let tokens: Vec<&str> = line.split_whitespace().collect();
            if tokens.len() < 3 {
                return Err(format!("short line {line:?}"));
            }
            let pid: u32 = tokens[0]
                .parse()
                .map_err(|_| format!("no pid at the start of {line:?}"))?;
            let kind = tokens[1];
            let rest = &tokens[2..];
            let uptime_at = rest.iter().position(|t| is_uptime(t));
            let before_uptime = &rest[..uptime_at.unwrap_or(rest.len())];
            let uptime = uptime_at.map(|i| rest[i].to_string()).unwrap_or_default();
            let version = match uptime_at {
                Some(i) if i + 1 < rest.len() => rest[rest.len() - 1].to_string(),
                _ => String::new(),
            };
            if kind == "master" && section == Section::Master {
                let reloads = before_uptime
                    .first()
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| format!("no reload counter in {line:?}"))?;
                let failed_reloads = before_uptime
                    .iter()
                    .position(|t| *t == "[failed:")
                    .and_then(|i| before_uptime.get(i + 1))
                    .map(|t| t.trim_end_matches(']'))
                    .map(|t| {
                        t.parse()
                            .map_err(|_| format!("bad failed-reload counter in {line:?}"))
                    })
                    .transpose()?
                    .unwrap_or(0);
                master = Some(MasterProc {
                    pid,
                    reloads,
                    failed_reloads,
                    uptime,
                    version,
                });
                continue;
            }
            // Integers between the type and the uptime: `[relative pid] reloads`.
            let reloads = before_uptime
                .iter()
                .filter_map(|t| t.parse::<u32>().ok())
                .next_back()
                .ok_or_else(|| format!("no reload counter in {line:?}"))?;
            let proc = WorkerProc {
                pid,
                kind: kind.to_string(),
                reloads,
                uptime,
                version,
            };
            if section == Section::Programs || kind != "worker" {
                programs.push(proc);
            } else {
                workers.push(proc);
            }
        }
        let master = master.ok_or_else(|| "no master line".to_string())?;
        Ok(ProcList {
            master,
            workers,
            programs,
        })
    }
}

impl fmt::Display for ProcList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "master {} reloads {} failed {}; workers",
            self.master.pid, self.master.reloads, self.master.failed_reloads
        )?;
        if self.workers.is_empty() {
            write!(f, " none")?;
        }
        for w in &self.workers {
            write!(f, " {}(reloads {})", w.pid, w.reloads)?;
        }
        Ok(())
    }
}

fn is_uptime(token: &str) -> bool {
    // `0d00h00m04s`
    let mut rest = token;
    for unit in ['d', 'h', 'm', 's'] {
        let Some(i) = rest.find(unit) else {
            return false;
        };
        if i == 0 || !rest[..i].bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        rest = &rest[i + 1..];
    }
    rest.is_empty()
}

/// What a verified reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    /// The master's pid.
    pub master_pid: u32,
    /// The master's reload counter after the reload.
    pub reloads: u32,
    /// Pids of the new worker generation (each answered a command).
    pub new_workers: Vec<u32>,
    /// Pids of earlier workers still finishing their connections.
    pub old_workers: Vec<u32>,
    /// From sending `reload` to the new generation answering.
    #[serde(rename = "elapsed_ms", with = "millis")]
    pub elapsed: Duration,
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }
}

/// The master CLI socket (`-S <path>` on HAProxy's command line).
#[derive(Debug, Clone)]
pub struct MasterSocket {
    path: PathBuf,
    io_timeout: Duration,
}

impl MasterSocket {
    /// A client for the master CLI at `path`. Nothing is connected until a method is called.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        MasterSocket {
            path: path.into(),
            io_timeout: Duration::from_secs(5),
        }
    }

    /// Bounds each single exchange with the master (default 5 s).
    pub fn with_io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `show proc`: the master and its workers.
    pub async fn show_proc(&self) -> Result<ProcList, Error> {
        self.show_proc_within(self.io_timeout).await
    }

    async fn show_proc_within(&self, timeout: Duration) -> Result<ProcList, Error> {
        let text = exchange(&self.path, "show proc", timeout, Answer::Required).await?;
        ProcList::parse(&text).map_err(|message| Error::Protocol {
            socket: self.path.clone(),
            command: "show proc".into(),
            message,
        })
    }

    /// Sends `command` to one worker through the master (`@!<pid> <command>`) and returns its
    /// answer.
    pub async fn worker_command(&self, pid: u32, command: &str) -> Result<String, Error> {
        self.worker_command_within(pid, command, self.io_timeout)
            .await
    }

    async fn worker_command_within(
        &self,
        pid: u32,
        command: &str,
        timeout: Duration,
    ) -> Result<String, Error> {
        if command.contains(['\n', ';']) {
            return Err(Error::InvalidName {
                what: "command",
                value: command.to_string(),
                reason: "one command per call, without `;` or a newline",
            });
        }
        let line = format!("@!{pid} {command}");
        let answer = exchange(&self.path, &line, timeout, Answer::Required).await?;
        if answer.starts_with("Can't find the target PID") {
            return Err(Error::CommandRejected {
                socket: self.path.clone(),
                command: line,
                message: answer.trim().to_string(),
            });
        }
        Ok(answer)
    }

    /// The configuration files the master was started with (`-f` arguments, made absolute
    /// against its working directory), read from `/proc`. `None` when `/proc` cannot vouch for
    /// them: unreadable, or the process there is not a HAProxy whose `-S` names this socket (a
    /// master in another pid namespace, e.g. a container, has a pid that means something else
    /// here).
    pub fn running_configs(&self, pid: u32) -> Option<Vec<PathBuf>> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let sockets: Vec<PathBuf> = config_args(&args, "-S", &cwd)
            .into_iter()
            .map(|s| {
                // `-S [unix@]<path>[,<bind options>]`, made absolute by `config_args`.
                let s = s.to_string_lossy().replacen("unix@", "", 1);
                PathBuf::from(s.split(',').next().unwrap_or_default())
            })
            .collect();
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let ours = canonical(&self.path);
        if !sockets.iter().any(|s| canonical(s) == ours) {
            tracing::debug!(pid, ?args, "master command line does not name this socket");
            return None;
        }
        Some(config_args(&args, "-f", &cwd))
    }

    /// Triggers a reload and waits, at most `timeout`, until a new worker generation answers.
    ///
    /// Fails with [`Error::ReloadFailed`] when the master counts a failed reload (the
    /// configuration passed `haproxy -c` but could not be loaded, e.g. a port in use) and with
    /// [`Error::ReloadTimeout`] when no new worker answered in time. After a failure the previous
    /// workers keep serving; after a timeout the master may still bring the new generation up
    /// late (`show proc` tells). Check the configuration first ([`crate::Haproxy::check`]): the
    /// master reloads whatever file it was started with.
    pub async fn reload_and_verify(&self, timeout: Duration) -> Result<ReloadOutcome, Error> {
        let before = self.show_proc().await?;
        let old_pids: Vec<u32> = before.workers.iter().map(|w| w.pid).collect();
        tracing::debug!(before = %before, "reloading through the master CLI");
        // `timeout` bounds the wait for the new generation, from the moment `reload` is sent.
        let start = Instant::now();
        let deadline = start + timeout;
        let answer = exchange(&self.path, "reload", self.io_timeout, Answer::Optional).await?;
        // HAProxy ≥ 3.0 answers `Success=0|1` followed by the startup logs.
        if answer.trim_start().starts_with("Success=0") {
            return Err(Error::ReloadFailed {
                socket: self.path.clone(),
                failed: before.master.failed_reloads + 1,
                old_workers: old_pids,
                log: Some(answer),
            });
        }
        let mut last = None;
        // The master is back after ~40-80 ms here; poll finely, it is one local round trip.
        let mut pause = Duration::from_millis(5);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::ReloadTimeout {
                    socket: self.path.clone(),
                    timeout,
                    last,
                });
            }
            let step = remaining.min(self.io_timeout);
            match self.show_proc_within(step).await {
                Ok(now) => {
                    let reloaded = now.master.reloads > before.master.reloads
                        || now.master.pid != before.master.pid;
                    if reloaded && now.master.failed_reloads > before.master.failed_reloads {
                        return Err(Error::ReloadFailed {
                            socket: self.path.clone(),
                            failed: now.master.failed_reloads,
                            old_workers: now.workers.iter().map(|w| w.pid).collect(),
                            log: None,
                        });
                    }
                    if reloaded {
                        let fresh: Vec<u32> = now
                            .current_workers()
                            .map(|w| w.pid)
                            .filter(|pid| !old_pids.contains(pid))
                            .collect();
                        if !fresh.is_empty() && self.all_answer(&fresh, step).await {
                            let outcome = ReloadOutcome {
                                master_pid: now.master.pid,
                                reloads: now.master.reloads,
                                old_workers: now.old_workers().map(|w| w.pid).collect(),
                                new_workers: fresh,
                                elapsed: start.elapsed(),
                            };
                            tracing::debug!(?outcome, "reload verified");
                            return Ok(outcome);
                        }
                    }
                    last = Some(Box::new(now));
                }
                // The master re-executes itself: for a moment its socket refuses or is absent.
                Err(e) if e.is_transient() => tracing::trace!(error = %e, "master not back yet"),
                Err(e) => return Err(e),
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 3 / 2).min(Duration::from_millis(20));
        }
    }

    /// True when every worker in `pids` answers `show info` through the master, i.e. runs its
    /// event loop and serves its listeners.
    async fn all_answer(&self, pids: &[u32], timeout: Duration) -> bool {
        for &pid in pids {
            match self.worker_command_within(pid, "show info", timeout).await {
                Ok(answer) if answer.contains("Pid:") || answer.contains("Name:") => {}
                _ => return false,
            }
        }
        true
    }
}

/// The values of `flag` in `args` (`-f a -f b`, also `-fa`), absolute against `cwd`.
pub(crate) fn config_args(args: &[String], flag: &str, cwd: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if a == flag {
            it.next().cloned()
        } else {
            a.strip_prefix(flag)
                .filter(|v| !v.is_empty() && !v.starts_with('-'))
                .map(str::to_string)
        };
        if let Some(v) = value {
            out.push(cwd.join(v));
        }
    }
    out
}

/// Whether `config` is, or lies in a directory that is, one of `running`.
pub(crate) fn config_is_running(config: &Path, running: &[PathBuf]) -> bool {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let config = canonical(config);
    running.iter().any(|r| {
        let r = canonical(r);
        config == r || (r.is_dir() && config.starts_with(&r))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Verbatim HAProxy 2.6.12 answers.
    const FRESH: &str = "\
#<PID>          <type>          <reloads>       <uptime>        <version>      
6573            master          0 [failed: 0]   0d00h00m01s     2.6.12-1+deb12u4
# workers
6588            worker          0               0d00h00m01s     2.6.12-1+deb12u4
# programs

";
    const AFTER_FAILED: &str = "\
#<PID>          <type>          <reloads>       <uptime>        <version>      
6573            master          2 [failed: 1]   0d00h00m04s     2.6.12-1+deb12u4
# workers
7017            worker          1               0d00h00m01s     2.6.12-1+deb12u4
# programs
";

    #[test]
    fn parses_the_26_layout() {
        let p = ProcList::parse(FRESH).unwrap();
        assert_eq!(p.master.pid, 6573);
        assert_eq!(p.master.reloads, 0);
        assert_eq!(p.master.failed_reloads, 0);
        assert_eq!(p.master.uptime, "0d00h00m01s");
        assert_eq!(p.master.version, "2.6.12-1+deb12u4");
        assert_eq!(p.workers.len(), 1);
        assert_eq!(p.workers[0].pid, 6588);
        assert_eq!(p.current_workers().count(), 1);

        let p = ProcList::parse(AFTER_FAILED).unwrap();
        assert_eq!((p.master.reloads, p.master.failed_reloads), (2, 1));
        assert_eq!(p.workers[0].reloads, 1);
        assert_eq!(p.current_workers().count(), 0);
        assert_eq!(p.old_workers().count(), 1);
    }

    #[test]
    fn parses_the_older_layout_with_relative_pids_and_programs() {
        let text = "\
#<PID>          <type>          <relative PID>  <reloads>       <uptime>        <version>
1162            master          0               5               0d00h02m07s     2.0.0
# workers
1271            worker          1               0               0d00h00m00s     2.0.0
1200            worker          1               3               0d00h00m40s     2.0.0
# programs
1244            dataplane       -               2               0d00h00m00s     -
";
        let p = ProcList::parse(text).unwrap();
        assert_eq!(p.master.pid, 1162);
        assert_eq!(p.workers.len(), 2);
        assert_eq!(p.workers[0].reloads, 0);
        assert_eq!(p.workers[1].reloads, 3);
        assert_eq!(p.programs.len(), 1);
        assert_eq!(p.programs[0].kind, "dataplane");
        assert_eq!(p.programs[0].reloads, 2);
    }

    #[test]
    fn rejects_answers_that_are_not_a_process_list() {
        assert!(ProcList::parse("Unknown command.\n").is_err());
        assert!(ProcList::parse("").is_err());
        assert!(ProcList::parse("# workers\n12 worker 0 0d00h00m01s 2.6\n").is_err());
    }

    #[test]
    fn uptime_tokens() {
        assert!(is_uptime("0d00h00m04s"));
        assert!(is_uptime("12d23h59m59s"));
        assert!(!is_uptime("2.6.12"));
        assert!(!is_uptime("0d00h00m"));
        assert!(!is_uptime("[failed:"));
    }

    #[test]
    fn config_args_are_made_absolute() {
        let args: Vec<String> = [
            "haproxy",
            "-W",
            "-f",
            "h.cfg",
            "-f/etc/b.cfg",
            "-S",
            "m.sock",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            config_args(&args, "-f", Path::new("/srv")),
            vec![PathBuf::from("/srv/h.cfg"), PathBuf::from("/etc/b.cfg")]
        );
    }
}
