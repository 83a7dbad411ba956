//! nginx: `nginx -t -c <config>` and a graceful reload (SIGHUP to the master named by the pid
//! file), verified by watching the master's children: a reload is done when a worker that was not
//! there before runs, and the old ones are shutting down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::check::{parse_nginx_output, proxy_binary, run_check, CheckReport, ConfigCheck};
use crate::master::config_is_running;
use crate::Error;

/// The nginx binary.
#[derive(Debug, Clone)]
pub struct Nginx {
    binary: PathBuf,
    timeout: Duration,
}

proxy_binary!(
    Nginx,
    "nginx",
    "Bounds how long `nginx -t` may run (default 30 s)."
);

/// What a verified nginx reload did.
#[derive(Debug, Clone, Serialize)]
pub struct NginxReloadOutcome {
    /// The master's pid (unchanged by a reload).
    pub master_pid: u32,
    /// Workers started by the reload.
    pub new_workers: Vec<u32>,
    /// Workers from before, shutting down once their connections finish.
    pub old_workers: Vec<u32>,
    /// From SIGHUP to the first new worker.
    #[serde(skip)]
    pub elapsed: Duration,
}

impl Nginx {
    /// Runs `nginx -t -c <config>`. [`Error::CheckFailed`] carries nginx's messages.
    pub async fn check(&self, config: &Path) -> Result<CheckReport, Error> {
        let check = ConfigCheck {
            proxy: "nginx",
            what: "nginx -t",
            flags: ["-t", "-c"],
            parse: parse_nginx_output,
        };
        check.run(&self.binary, config, self.timeout).await
    }

    /// Finds the master through `pid_file` (or the `pid` directive of `config`, or nginx's
    /// compiled-in default), checks that it runs `config`, sends SIGHUP and waits at most
    /// `timeout` for a new worker. Check the configuration first ([`Nginx::check`]).
    pub async fn reload_and_verify(
        &self,
        config: &Path,
        pid_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<NginxReloadOutcome, Error> {
        let defaults = self.compiled_defaults().await;
        let pid_file = match pid_file {
            Some(p) => p.to_path_buf(),
            None => pid_directive(config, &defaults)
                .or_else(|| defaults.pid_path.clone())
                .unwrap_or_else(|| PathBuf::from("/run/nginx.pid")),
        };
        let pid = read_master_pid(&pid_file)?;
        if let Some(running) = running_config(pid, &defaults) {
            if !config_is_running(config, std::slice::from_ref(&running)) {
                return Err(Error::ConfigMismatch {
                    proxy: "nginx",
                    config: config.to_path_buf(),
                    pid,
                    running: vec![running],
                });
            }
        }
        let old: Vec<u32> = children(pid).into_iter().map(|(p, _)| p).collect();
        let start = Instant::now();
        kill(Pid::from_raw(pid as i32), Signal::SIGHUP).map_err(|source| Error::Signal {
            signal: "SIGHUP",
            pid,
            source,
        })?;
        let deadline = start + timeout;
        loop {
            let now_children = children(pid);
            let new_workers: Vec<u32> = now_children
                .iter()
                .filter(|(p, title)| !old.contains(p) && title == "nginx: worker process")
                .map(|(p, _)| *p)
                .collect();
            if !new_workers.is_empty() {
                return Ok(NginxReloadOutcome {
                    master_pid: pid,
                    new_workers,
                    old_workers: now_children
                        .iter()
                        .filter(|(p, _)| old.contains(p))
                        .map(|(p, _)| *p)
                        .collect(),
                    elapsed: start.elapsed(),
                });
            }
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Err(Error::PidFile {
                    path: pid_file,
                    reason: format!("nginx master {pid} exited during the reload"),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::NginxReloadTimeout { pid, timeout });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn compiled_defaults(&self) -> CompiledDefaults {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.arg("-V");
        match run_check(&self.binary, &mut cmd, self.timeout, "nginx -V").await {
            Ok((_, output)) => CompiledDefaults::parse(&output),
            Err(_) => CompiledDefaults::default(),
        }
    }
}

/// Paths compiled into nginx (`nginx -V`).
#[derive(Debug, Default, Clone, PartialEq)]
struct CompiledDefaults {
    prefix: Option<PathBuf>,
    conf_path: Option<PathBuf>,
    pid_path: Option<PathBuf>,
}

impl CompiledDefaults {
    fn parse(output: &str) -> Self {
        let mut d = CompiledDefaults::default();
        for word in output.split_whitespace() {
            if let Some(v) = word.strip_prefix("--prefix=") {
                d.prefix = Some(v.into());
            } else if let Some(v) = word.strip_prefix("--conf-path=") {
                d.conf_path = Some(v.into());
            } else if let Some(v) = word.strip_prefix("--pid-path=") {
                d.pid_path = Some(v.into());
            }
        }
        d
    }
}

/// The `pid` directive of the main context of `config`, if it has one.
fn pid_directive(config: &Path, defaults: &CompiledDefaults) -> Option<PathBuf> {
    let text = std::fs::read_to_string(config).ok()?;
    let value = top_level_directive(&text, "pid")?;
    let path = PathBuf::from(value);
    Some(if path.is_absolute() {
        path
    } else {
        defaults
            .prefix
            .clone()
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(path)
    })
}

/// The argument of the first `name arg;` statement outside any block.
fn top_level_directive(text: &str, name: &str) -> Option<String> {
    let mut depth = 0usize;
    let mut statement = String::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        for c in line.chars().chain(std::iter::once(' ')) {
            match c {
                '{' => {
                    depth += 1;
                    statement.clear();
                }
                '}' => {
                    depth = depth.saturating_sub(1);
                    statement.clear();
                }
                ';' => {
                    if depth == 0 {
                        let mut words = statement.split_whitespace();
                        if words.next() == Some(name) {
                            if let Some(arg) = words.next() {
                                return Some(arg.trim_matches(['"', '\'']).to_string());
                            }
                        }
                    }
                    statement.clear();
                }
                c => statement.push(c),
            }
        }
    }
    None
}

fn read_master_pid(pid_file: &Path) -> Result<u32, Error> {
    let err = |reason: String| Error::PidFile {
        path: pid_file.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(pid_file).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => err("no such pid file (is nginx running?)".into()),
        _ => err(format!("cannot read the pid file: {e}")),
    })?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| err(format!("does not hold a pid: {:?}", text.trim())))?;
    let title = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .map_err(|_| err(format!("pid {pid} is not running (stale pid file)")))?;
    if !title.starts_with("nginx: master process") {
        return Err(err(format!(
            "pid {pid} is not an nginx master ({:?})",
            title.trim()
        )));
    }
    Ok(pid)
}

/// The configuration the master runs: its `-c` argument, else the compiled-in path. `None` when
/// unknown (a relative `-c`, which nginx resolves against its prefix; unreadable `/proc`).
fn running_config(pid: u32, defaults: &CompiledDefaults) -> Option<PathBuf> {
    let title = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // nginx rewrites its title to one string: `nginx: master process /usr/sbin/nginx -c F …`.
    let title = String::from_utf8_lossy(&title).replace('\0', " ");
    let args: Vec<&str> = title.split_whitespace().collect();
    match args.iter().position(|a| *a == "-c") {
        Some(i) => args
            .get(i + 1)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute()),
        None => defaults.conf_path.clone(),
    }
}

/// The children of `parent`: (pid, process title).
fn children(parent: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let ppid = after.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        if ppid != Some(parent) {
            continue;
        }
        let title = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .replace('\0', " ")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        out.push((pid, title));
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_top_level_pid_directive() {
        let conf = "# pid /wrong.pid;\nworker_processes 1; pid  /tmp/x/nginx.pid ;\n\
                    events { pid /nested.pid; }\nhttp { server { listen 80; } }\n";
        assert_eq!(
            top_level_directive(conf, "pid").as_deref(),
            Some("/tmp/x/nginx.pid")
        );
        assert_eq!(top_level_directive("events {}\n", "pid"), None);
        assert_eq!(top_level_directive("http { pid /x; }", "pid"), None);
    }

    #[test]
    fn relative_pid_paths_use_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("n.conf");
        std::fs::write(&conf, "pid run/n.pid;\n").unwrap();
        let defaults = CompiledDefaults::parse(
            "nginx version: nginx/1.22.1\nconfigure arguments: --prefix=/usr/share/nginx \
             --conf-path=/etc/nginx/nginx.conf --pid-path=/run/nginx.pid --with-debug",
        );
        assert_eq!(defaults.pid_path, Some("/run/nginx.pid".into()));
        assert_eq!(defaults.conf_path, Some("/etc/nginx/nginx.conf".into()));
        assert_eq!(
            pid_directive(&conf, &defaults),
            Some(PathBuf::from("/usr/share/nginx/run/n.pid"))
        );
    }

    #[test]
    fn pid_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pid");
        let err = read_master_pid(&missing).unwrap_err();
        assert!(err.to_string().contains("none.pid"), "{err}");
        let garbage = dir.path().join("garbage.pid");
        std::fs::write(&garbage, "abc\n").unwrap();
        let err = read_master_pid(&garbage).unwrap_err();
        assert!(err.to_string().contains("does not hold a pid"), "{err}");
        let not_nginx = dir.path().join("self.pid");
        std::fs::write(&not_nginx, format!("{}\n", std::process::id())).unwrap();
        let err = read_master_pid(&not_nginx).unwrap_err();
        assert!(err.to_string().contains("not an nginx master"), "{err}");
    }
}
