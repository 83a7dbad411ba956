//! `unitgen apply`: make one host's systemd run exactly the units generated for it.
//!
//! The desired units are the files under `<host>/` of a generated tree (or of a listing on
//! stdin, the `==> path <==` format `unitgen` prints). Units are files in `--unit-dir`
//! (`/etc/systemd/system`); a file there belongs to unitgen only when it starts with
//! [`GENERATED_MARK`], and no other file is ever written, stopped or removed.
//!
//! The sequence: check everything first (a unit file in the way that unitgen did not write is an
//! error before anything changes); stop units that are changed or no longer placed here; write
//! the new and changed files and remove the stale ones (disabled first); `daemon-reload`; enable
//! and start every desired unit (starting one that runs is a no-op), each job waited for.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::app::OutFile;
use crate::output::write_atomic;
use crate::render::GENERATED_MARK;
use crate::systemd::{Systemd, SystemdError, UnitState, Verb};

/// What went wrong in `apply`.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A file is in the way, or the input is wrong; nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// systemd refused or timed out.
    #[error(transparent)]
    Systemd(#[from] SystemdError),
}

/// What `apply` did, by unit name. Printed as JSON with `--json` (what `unitgen rollout` reads).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    /// The host.
    pub host: String,
    /// Units that were not installed before.
    pub installed: Vec<String>,
    /// Units whose file changed (stopped, rewritten, started again).
    pub changed: Vec<String>,
    /// Units no longer placed here (stopped, disabled, removed).
    pub removed: Vec<String>,
    /// Units already as generated.
    pub unchanged: Vec<String>,
    /// Every desired unit's state after the run.
    pub states: BTreeMap<String, UnitState>,
}

impl ApplyReport {
    /// One line for the operator.
    pub fn summary(&self) -> String {
        let not_active: Vec<String> = self
            .states
            .iter()
            .filter(|(_, s)| s.active != "active")
            .map(|(u, s)| format!("{u} is {}", s.active))
            .collect();
        let mut line = format!(
            "host {}: {} installed, {} changed, {} removed, {} unchanged",
            self.host,
            self.installed.len(),
            self.changed.len(),
            self.removed.len(),
            self.unchanged.len()
        );
        if !not_active.is_empty() {
            line.push_str(&format!("; not active: {}", not_active.join(", ")));
        }
        line
    }
}

/// Options of one apply.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Where unit files go (`/etc/systemd/system`).
    pub unit_dir: PathBuf,
    /// Deadline for each start or stop job.
    pub job_timeout: Duration,
    /// Apply even when the input has no unit for this host (which stops and removes every
    /// unit unitgen installed here).
    pub allow_empty: bool,
}

/// Parses the `==> path <==` listing that `unitgen` prints without `-o`.
pub fn parse_listing(text: &str) -> Result<Vec<OutFile>, ApplyError> {
    let mut files: Vec<OutFile> = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end_matches('\n');
        if let Some(path) = trimmed
            .strip_prefix("==> ")
            .and_then(|r| r.strip_suffix(" <=="))
        {
            // The blank line `listing` puts between two files belongs to neither.
            if let Some(prev) = files.last_mut() {
                if prev.content.ends_with("\n\n") {
                    prev.content.pop();
                }
            }
            files.push(OutFile {
                path: path.to_string(),
                content: String::new(),
            });
        } else if let Some(f) = files.last_mut() {
            f.content.push_str(line);
        } else if !trimmed.trim().is_empty() {
            return Err(ApplyError::Refused(format!(
                "(stdin):{}: expected a `==> host/unit.service <==` line (the output of `unitgen services.yaml --format systemd`), found {trimmed:?}",
                n + 1
            )));
        }
    }
    Ok(files)
}

/// Reads a generated tree: `DIR/<host>/*.service`.
pub fn read_tree(dir: &Path, host: &str) -> Result<Vec<OutFile>, ApplyError> {
    let hdir = dir.join(host);
    let mut out = Vec::new();
    let entries = match fs::read_dir(&hdir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => return Err(ApplyError::Io { path: hdir, source }),
    };
    for e in entries {
        let p = e
            .map_err(|source| ApplyError::Io {
                path: hdir.clone(),
                source,
            })?
            .path();
        if p.extension().is_some_and(|x| x == "container") {
            return Err(ApplyError::Refused(quadlet_refusal(
                &p.display().to_string(),
            )));
        }
        if p.extension().is_some_and(|x| x == "service") {
            let content = fs::read_to_string(&p).map_err(|source| ApplyError::Io {
                path: p.clone(),
                source,
            })?;
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            out.push(OutFile {
                path: format!("{host}/{name}"),
                content,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn quadlet_refusal(path: &str) -> String {
    format!(
        "{path}: a Podman Quadlet unit (--format quadlet); unitgen apply installs --format systemd units only: copy the .container files into /etc/containers/systemd/ and run `systemctl daemon-reload`"
    )
}

fn is_unit_name(name: &str) -> bool {
    name.ends_with(".service")
        && name.len() > ".service".len()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._-".contains(c))
}

/// The units for `host` in `files`, by unit name.
pub fn desired_units(
    host: &str,
    files: &[OutFile],
    allow_empty: bool,
) -> Result<BTreeMap<String, String>, ApplyError> {
    let mut out = BTreeMap::new();
    let mut hosts = BTreeSet::new();
    for f in files {
        let Some((h, name)) = f.path.split_once('/') else {
            return Err(ApplyError::Refused(format!(
                "{}: not a `host/unit.service` path; apply needs --format systemd output",
                f.path
            )));
        };
        hosts.insert(h.to_string());
        if h != host {
            continue;
        }
        if name.ends_with(".container") {
            return Err(ApplyError::Refused(quadlet_refusal(&f.path)));
        }
        if !is_unit_name(name) {
            return Err(ApplyError::Refused(format!(
                "{}: `{name}` is not a unit file name",
                f.path
            )));
        }
        if !f.content.starts_with(GENERATED_MARK) {
            return Err(ApplyError::Refused(format!(
                "{}: does not start with `{GENERATED_MARK}`; apply installs only units unitgen generated",
                f.path
            )));
        }
        out.insert(name.to_string(), f.content.clone());
    }
    if out.is_empty() && !allow_empty {
        let known: Vec<String> = hosts.into_iter().collect();
        return Err(ApplyError::Refused(format!(
            "the units name no file for host {host} (hosts present: {}); check --host, or pass --allow-empty to remove every unit unitgen installed here",
            if known.is_empty() { "none".into() } else { known.join(", ") }
        )));
    }
    Ok(out)
}

/// The units in `dir` that unitgen wrote, with their content.
pub fn installed_units(dir: &Path) -> Result<BTreeMap<String, String>, ApplyError> {
    let mut out = BTreeMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => {
            return Err(ApplyError::Io {
                path: dir.into(),
                source,
            })
        }
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !is_unit_name(&name) || !p.is_file() || p.is_symlink() {
            continue;
        }
        if let Ok(text) = fs::read_to_string(&p) {
            if text.starts_with(GENERATED_MARK) {
                out.insert(name, text);
            }
        }
    }
    Ok(out)
}

/// What apply is going to do (computed before anything changes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// New units.
    pub installed: Vec<String>,
    /// Units whose file differs.
    pub changed: Vec<String>,
    /// Units to remove.
    pub removed: Vec<String>,
    /// Units as they should be.
    pub unchanged: Vec<String>,
}

/// Compares desired and installed units; refuses when a desired unit's file exists but was not
/// written by unitgen.
pub fn plan(
    unit_dir: &Path,
    desired: &BTreeMap<String, String>,
    installed: &BTreeMap<String, String>,
) -> Result<Changes, ApplyError> {
    let mut c = Changes::default();
    for (name, content) in desired {
        match installed.get(name) {
            Some(old) if old == content => c.unchanged.push(name.clone()),
            Some(_) => c.changed.push(name.clone()),
            None => {
                let p = unit_dir.join(name);
                if p.exists() || p.is_symlink() {
                    return Err(ApplyError::Refused(format!(
                        "{}: exists and was not written by unitgen (it does not start with `{GENERATED_MARK}`); refusing to replace it",
                        p.display()
                    )));
                }
                c.installed.push(name.clone());
            }
        }
    }
    c.removed = installed
        .keys()
        .filter(|n| !desired.contains_key(*n))
        .cloned()
        .collect();
    Ok(c)
}

/// Everything `apply` checks before it changes anything (and before it connects to systemd):
/// what it would do.
pub fn preflight(
    host: &str,
    files: &[OutFile],
    opts: &ApplyOptions,
) -> Result<Changes, ApplyError> {
    let desired = desired_units(host, files, opts.allow_empty)?;
    let installed = installed_units(&opts.unit_dir)?;
    plan(&opts.unit_dir, &desired, &installed)
}

/// Applies `files` (for every host) to this host, `host`.
pub async fn apply(
    host: &str,
    files: &[OutFile],
    opts: &ApplyOptions,
    systemd: &Systemd,
) -> Result<ApplyReport, ApplyError> {
    let desired = desired_units(host, files, opts.allow_empty)?;
    let installed = installed_units(&opts.unit_dir)?;
    let changes = plan(&opts.unit_dir, &desired, &installed)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ApplyError::Io { path, source }
    };

    // Stop what changes or goes, so the old definition stops the old container.
    let to_stop: Vec<&String> = changes.changed.iter().chain(&changes.removed).collect();
    let stops = to_stop
        .iter()
        .map(|u| systemd.job(Verb::Stop, u, opts.job_timeout));
    for r in futures_join_all(stops).await {
        r?;
    }
    if !changes.removed.is_empty() {
        systemd.disable(&changes.removed).await?;
    }
    fs::create_dir_all(&opts.unit_dir).map_err(io(&opts.unit_dir))?;
    for name in changes.installed.iter().chain(&changes.changed) {
        let p = opts.unit_dir.join(name);
        write_atomic(&p, &desired[name]).map_err(|e| match e {
            crate::Error::Io { path, source } => ApplyError::Io { path, source },
            other => ApplyError::Refused(other.to_string()),
        })?;
    }
    for name in &changes.removed {
        let p = opts.unit_dir.join(name);
        fs::remove_file(&p).map_err(io(&p))?;
    }
    systemd.reload().await?;
    let all: Vec<String> = desired.keys().cloned().collect();
    systemd.enable(&all).await?;
    let starts = all
        .iter()
        .map(|u| systemd.job(Verb::Start, u, opts.job_timeout));
    let mut states = BTreeMap::new();
    for (u, r) in all.iter().zip(futures_join_all(starts).await) {
        states.insert(u.clone(), r?);
    }
    Ok(ApplyReport {
        host: host.into(),
        installed: changes.installed,
        changed: changes.changed,
        removed: changes.removed,
        unchanged: changes.unchanged,
        states,
    })
}

async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    // Every job is queued with systemd at once, so a batch of stops takes as long as the slowest.
    futures::future::join_all(futs).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(body: &str) -> String {
        format!("{GENERATED_MARK} from s.yaml\n{body}\n")
    }

    #[test]
    fn listing_round_trips() {
        let files = vec![
            OutFile {
                path: "a/web@1.service".into(),
                content: gen("one"),
            },
            OutFile {
                path: "b/web@2.service".into(),
                content: gen("two\n"),
            },
        ];
        let text = crate::output::listing(&files);
        assert_eq!(parse_listing(&text).unwrap(), files);
    }

    #[test]
    fn listing_garbage_is_located() {
        let err = parse_listing("hello\n").unwrap_err().to_string();
        assert!(
            err.starts_with("(stdin):1: expected a `==> host/unit.service <==` line"),
            "{err}"
        );
    }

    #[test]
    fn plan_refuses_foreign_files_and_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("mine.service"), "[Unit]\n").unwrap();
        fs::write(dir.path().join("old@1.service"), gen("old")).unwrap();
        fs::write(dir.path().join("web@1.service"), gen("v1")).unwrap();
        fs::write(dir.path().join("web@2.service"), gen("v1")).unwrap();
        let installed = installed_units(dir.path()).unwrap();
        assert_eq!(
            installed.keys().collect::<Vec<_>>(),
            ["old@1.service", "web@1.service", "web@2.service"]
        );
        let desired: BTreeMap<String, String> = [
            ("web@1.service".to_string(), gen("v1")),
            ("web@2.service".to_string(), gen("v2")),
            ("web@3.service".to_string(), gen("v2")),
        ]
        .into();
        let c = plan(dir.path(), &desired, &installed).unwrap();
        assert_eq!(c.unchanged, ["web@1.service"]);
        assert_eq!(c.changed, ["web@2.service"]);
        assert_eq!(c.installed, ["web@3.service"]);
        assert_eq!(
            c.removed,
            ["old@1.service"],
            "a hand-written unit is never removed"
        );

        let mut clash = desired.clone();
        clash.insert("mine.service".into(), gen("x"));
        let err = plan(dir.path(), &clash, &installed)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mine.service: exists and was not written by unitgen"),
            "{err}"
        );
    }

    #[test]
    fn desired_units_checks_host_names_and_marks() {
        let files = vec![
            OutFile {
                path: "a/web@1.service".into(),
                content: gen("x"),
            },
            OutFile {
                path: "b/web@2.service".into(),
                content: "[Unit]\n".into(),
            },
        ];
        assert_eq!(desired_units("a", &files, false).unwrap().len(), 1);
        let err = desired_units("c", &files, false).unwrap_err().to_string();
        assert!(
            err.contains("no file for host c (hosts present: a, b)"),
            "{err}"
        );
        assert!(desired_units("c", &files, true).unwrap().is_empty());
        let err = desired_units("b", &files, false).unwrap_err().to_string();
        assert!(
            err.contains("b/web@2.service: does not start with"),
            "{err}"
        );
    }
}
