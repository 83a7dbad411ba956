//! Makes a running HAProxy's servers equal to a configuration's `server` lines through the
//! runtime API, and proves it by reading the state back.
//!
//! The operations are computed against the running state (`show servers state`), not against
//! the previous file: whatever an earlier, interrupted apply left (a server added but not
//! enabled yet, one in maintenance but not deleted), the next apply finishes it. The previous
//! file is only used to tell which weights the file changed.
//!
//! Order, per apply: every server to remove goes to maintenance first (no new traffic at once),
//! then new servers are added (`add server`, `enable health`, `enable server`: HAProxy 2.6
//! creates dynamic servers in maintenance with health checks off), addresses and weights are
//! set, and last the removed servers are deleted as soon as their sessions have ended. Then the
//! state is read again and compared server by server.
//!
//! What the operator sets at runtime is kept: the administrative state (drain, maintenance) of
//! servers the file keeps is never touched, and a weight is only set when the file changes it
//! (as HAProxy does at a reload with a server-state file: a changed configuration weight wins,
//! otherwise the running weight is kept).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::config::{BackendServers, Server, ServerChanges};
use crate::runtime::{Removal, RuntimeApi, ServerRef, ServerState};
use crate::{Error, ErrorKind};

/// Which backends to compare with the running state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only those whose server lines changed between the two files.
    Changed,
    /// Every backend of the new file (after a restart: the running state may differ anywhere).
    All,
}

/// Bounds of an apply.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// How long a removed server may keep sessions before the apply gives up with
    /// [`SyncError::Busy`].
    pub drain_timeout: Duration,
    /// Servers an interrupted apply put in maintenance to remove them: if the file has them
    /// (again) and they are still in maintenance, they are enabled. Without this an operator's
    /// maintenance and an unfinished removal look the same, and such a server would stay out.
    pub release: BTreeSet<(String, String)>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            drain_timeout: Duration::from_secs(2),
            release: BTreeSet::new(),
        }
    }
}

/// What an apply changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Servers added.
    pub added: Vec<ServerRef>,
    /// Servers deleted.
    pub removed: Vec<ServerRef>,
    /// Servers given a new address or port.
    pub moved: Vec<ServerRef>,
    /// Servers given a new weight.
    pub reweighted: Vec<ServerRef>,
    /// Servers an earlier apply left unfinished (added but still in maintenance or without
    /// health checks), finished now.
    pub repaired: Vec<ServerRef>,
    /// Backends compared.
    pub backends: usize,
    /// Runtime commands sent (reads included).
    pub commands: usize,
    /// Time taken.
    pub elapsed: Duration,
}

impl SyncReport {
    /// True if nothing had to change.
    pub fn is_noop(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.moved.is_empty()
            && self.reweighted.is_empty()
            && self.repaired.is_empty()
    }
}

impl std::fmt::Display for SyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} added, {} removed, {} moved, {} reweighted, {} repaired ({} commands, {} ms)",
            self.added.len(),
            self.removed.len(),
            self.moved.len(),
            self.reweighted.len(),
            self.repaired.len(),
            self.commands,
            self.elapsed.as_millis()
        )
    }
}

/// Why an apply did not complete. After any of them the running state may be partly changed;
/// a reload of the new file (or the next apply) brings it to the file.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The runtime socket refused, is missing, or did not answer in time.
    #[error("{0}")]
    Unreachable(#[source] Error),
    /// HAProxy refused a command (a backend without a dynamic load-balancing algorithm, a
    /// keyword dynamic servers do not support, a server referenced elsewhere, …).
    #[error("{0}")]
    Rejected(#[source] Error),
    /// A removed server still had sessions after the drain timeout.
    #[error("server {server} still has connections after {waited:?}")]
    Busy {
        /// The server.
        server: ServerRef,
        /// How long it was waited for.
        waited: Duration,
    },
    /// After applying, the running state differs from the file.
    #[error("the running state differs from the file: {0}")]
    Mismatch(String),
}

impl SyncError {
    /// A short label for metrics: `unreachable`, `rejected`, `busy`, `mismatch`.
    pub fn reason(&self) -> &'static str {
        match self {
            SyncError::Unreachable(_) => "unreachable",
            SyncError::Rejected(_) => "rejected",
            SyncError::Busy { .. } => "busy",
            SyncError::Mismatch(_) => "mismatch",
        }
    }
}

impl From<Error> for SyncError {
    fn from(e: Error) -> Self {
        match e.kind() {
            ErrorKind::Unreachable => SyncError::Unreachable(e),
            _ => SyncError::Rejected(e),
        }
    }
}

/// What one backend needs.
#[derive(Debug, Default)]
struct Plan<'a> {
    add: Vec<&'a Server>,
    remove: Vec<String>,
    addr: Vec<&'a Server>,
    weight: Vec<&'a Server>,
    enable_health: Vec<&'a Server>,
    enable_server: Vec<&'a Server>,
}

/// Applies `changes` (the new file's servers, see [`crate::Config::server_changes`]) to the
/// HAProxy behind `api`, then reads the state back and compares it with the file.
pub async fn apply_servers(
    api: &RuntimeApi,
    changes: &ServerChanges,
    scope: Scope,
    options: &SyncOptions,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let mut report = SyncReport::default();
    let backends: Vec<&BackendServers> = changes
        .backends
        .iter()
        .filter(|b| scope == Scope::All || b.changed)
        .collect();
    report.backends = backends.len();
    let mut removals = Vec::new();
    let mut touched: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let states = read_state(api, &backends, scope, &mut report).await?;
    for b in &backends {
        let empty = BTreeMap::new();
        let running = states.get(&b.backend).unwrap_or(&empty);
        let plan = plan(b, running, &options.release);
        let repaired = apply_plan(api, &b.backend, &plan, &mut report, &mut removals).await?;
        let t = touched.entry(b.backend.as_str()).or_default();
        t.extend(plan.add.iter().map(|s| s.name.as_str()));
        t.extend(plan.weight.iter().map(|s| s.name.as_str()));
        t.extend(repaired);
    }
    // Deleted last: their sessions had the time the other commands took to end.
    for sr in removals {
        delete_drained(api, sr, options.drain_timeout, &mut report).await?;
    }
    // Read back and compare, server by server.
    let mut differences = Vec::new();
    let states = read_state(api, &backends, scope, &mut report).await?;
    for b in &backends {
        let empty = BTreeMap::new();
        let running = states.get(&b.backend).unwrap_or(&empty);
        let touched = touched.get(b.backend.as_str());
        differences.extend(compare(b, running, |name| {
            touched.is_some_and(|t| t.contains(name))
        }));
    }
    report.elapsed = started.elapsed();
    if differences.is_empty() {
        Ok(report)
    } else {
        Err(mismatch(differences))
    }
}

/// Sends the commands of `plan` for `backend` but its deletions, which are added to `removals`
/// (servers set to maintenance first); returns the servers whose health check or admin state
/// was repaired.
async fn apply_plan<'a>(
    api: &RuntimeApi,
    backend: &str,
    plan: &Plan<'a>,
    report: &mut SyncReport,
    removals: &mut Vec<ServerRef>,
) -> Result<BTreeSet<&'a str>, SyncError> {
    let r = |s: &str| server_ref(backend, s);

    for name in &plan.remove {
        api.set_server_state(&r(name)?, crate::AdminState::Maint)
            .await?;
        report.commands += 1;
        removals.push(r(name)?);
    }
    for s in &plan.add {
        let sr = r(&s.name)?;
        api.add_server(&sr, &s.args).await?;
        report.commands += 1;
        if s.checked() {
            api.enable_health(&sr).await?;
            report.commands += 1;
        }
        if !s.disabled() {
            api.enable_server(&sr).await?;
            report.commands += 1;
        }
        report.added.push(sr);
    }
    for s in &plan.addr {
        let (ip, port) = s.endpoint.expect("checked by server_changes");
        api.set_server_addr(&r(&s.name)?, ip, port).await?;
        report.commands += 1;
        report.moved.push(r(&s.name)?);
    }
    for s in &plan.weight {
        api.set_server_weight(&r(&s.name)?, s.effective_weight())
            .await?;
        report.commands += 1;
        report.reweighted.push(r(&s.name)?);
    }
    let mut repaired = BTreeSet::new();
    for s in &plan.enable_health {
        api.enable_health(&r(&s.name)?).await?;
        report.commands += 1;
        repaired.insert(s.name.as_str());
    }
    for s in &plan.enable_server {
        api.enable_server(&r(&s.name)?).await?;
        report.commands += 1;
        repaired.insert(s.name.as_str());
    }
    for name in &repaired {
        report.repaired.push(r(name)?);
    }
    Ok(repaired)
}

/// Deletes `sr`, retrying while it still has sessions, up to `drain_timeout`.
async fn delete_drained(
    api: &RuntimeApi,
    sr: ServerRef,
    drain_timeout: Duration,
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    let begun = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        report.commands += 1;
        match api.del_server(&sr).await? {
            Removal::Deleted => break,
            Removal::Busy if begun.elapsed() >= drain_timeout => {
                return Err(SyncError::Busy {
                    server: sr,
                    waited: begun.elapsed(),
                })
            }
            Removal::Busy => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
    report.removed.push(sr);
    Ok(())
}

/// The error of a read-back that differs from the file: the first five differences.
fn mismatch(mut differences: Vec<String>) -> SyncError {
    let n = differences.len();
    differences.truncate(5);
    let more = if n > 5 {
        format!(" (and {} more)", n - 5)
    } else {
        String::new()
    };
    SyncError::Mismatch(format!("{}{more}", differences.join("; ")))
}

type Running = BTreeMap<String, BTreeMap<String, ServerState>>;

/// The running servers of `backends`, by backend and name: one `show servers state` per
/// backend for a few changed ones, one for everything otherwise. A backend of the file that the
/// running HAProxy does not have is a mismatch (per-backend reads only; with one read it shows
/// as a failing `add server`).
async fn read_state(
    api: &RuntimeApi,
    backends: &[&BackendServers],
    scope: Scope,
    report: &mut SyncReport,
) -> Result<Running, SyncError> {
    let mut out: Running = BTreeMap::new();
    if scope == Scope::All || backends.len() > 8 {
        report.commands += 1;
        for s in api.show_servers_state(None).await? {
            out.entry(s.backend.clone())
                .or_default()
                .insert(s.name.clone(), s);
        }
        return Ok(out);
    }
    for b in backends {
        report.commands += 1;
        let rows = match api.show_servers_state(Some(&b.backend)).await {
            Ok(rows) => rows,
            Err(Error::CommandRejected { message, .. }) => {
                return Err(SyncError::Mismatch(format!(
                    "backend {} is not in the running HAProxy ({message})",
                    b.backend
                )))
            }
            Err(e) => return Err(e.into()),
        };
        out.insert(
            b.backend.clone(),
            rows.into_iter().map(|s| (s.name.clone(), s)).collect(),
        );
    }
    Ok(out)
}

fn server_ref(backend: &str, server: &str) -> Result<ServerRef, SyncError> {
    ServerRef::new(backend, server).map_err(SyncError::Rejected)
}

fn plan<'a>(
    b: &'a BackendServers,
    running: &BTreeMap<String, ServerState>,
    release: &BTreeSet<(String, String)>,
) -> Plan<'a> {
    let mut p = Plan::default();
    let wanted: BTreeSet<&str> = b.servers.iter().map(|s| s.name.as_str()).collect();
    p.remove = running
        .keys()
        .filter(|name| !wanted.contains(name.as_str()))
        .cloned()
        .collect();
    for s in &b.servers {
        let Some(r) = running.get(&s.name) else {
            p.add.push(s);
            continue;
        };
        if let Some((ip, port)) = s.endpoint {
            if r.ip() != Some(ip) || r.port != port {
                p.addr.push(s);
            }
        }
        let old = b.old.get(&s.name);
        let weight_changed = old.is_none_or(|o| o.effective_weight() != s.effective_weight());
        if weight_changed && r.weight != s.effective_weight() {
            p.weight.push(s);
        }
        if old.is_none() {
            // Not in the previous file but already running: an earlier apply added it and was
            // interrupted. Finish what `add server` left undone.
            if s.checked() && r.health_disabled() {
                p.enable_health.push(s);
            }
            if !s.disabled() && r.in_maintenance() {
                p.enable_server.push(s);
            }
        } else if !s.disabled()
            && r.in_maintenance()
            && release.contains(&(b.backend.clone(), s.name.clone()))
        {
            // An interrupted removal left it in maintenance, and the file wants it again.
            p.enable_server.push(s);
        }
    }
    p
}

/// Differences between the file's servers of `b` and the running ones. Weights, health and
/// maintenance are compared for the servers this apply set (`touched`) only; the others may
/// carry an operator's runtime changes.
fn compare(
    b: &BackendServers,
    running: &BTreeMap<String, ServerState>,
    touched: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let wanted: BTreeSet<&str> = b.servers.iter().map(|s| s.name.as_str()).collect();
    for name in running.keys() {
        if !wanted.contains(name.as_str()) {
            out.push(format!(
                "{}/{name} is running but not in the file",
                b.backend
            ));
        }
    }
    for s in &b.servers {
        let Some(r) = running.get(&s.name) else {
            out.push(format!(
                "{}/{} is in the file but not running",
                b.backend, s.name
            ));
            continue;
        };
        if let Some((ip, port)) = s.endpoint {
            if r.ip() != Some(ip) || r.port != port {
                out.push(format!(
                    "{}/{} runs at {}:{} instead of {}",
                    b.backend, s.name, r.addr, r.port, s.addr
                ));
            }
        }
        if touched(&s.name) {
            if r.weight != s.effective_weight() {
                out.push(format!(
                    "{}/{} has weight {} instead of {}",
                    b.backend,
                    s.name,
                    r.weight,
                    s.effective_weight()
                ));
            }
            if !s.disabled() && r.in_maintenance() {
                out.push(format!("{}/{} is still in maintenance", b.backend, s.name));
            }
            if s.checked() && r.health_disabled() {
                out.push(format!(
                    "{}/{} has its health checks disabled",
                    b.backend, s.name
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::runtime::parse_servers_state;

    const HEADER: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n";

    fn running(lines: &[&str]) -> BTreeMap<String, ServerState> {
        let text = format!("{HEADER}{}\n", lines.join("\n"));
        parse_servers_state(&text)
            .unwrap()
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect()
    }

    fn changes(old: &str, new: &str) -> ServerChanges {
        let cfg = |servers: &str| {
            Config::parse(&format!(
                "defaults\n    mode http\nbackend be\n    balance roundrobin\n{servers}"
            ))
            .unwrap()
        };
        cfg(old).server_changes(&cfg(new)).unwrap()
    }

    #[test]
    fn plan_against_the_running_state() {
        let ch = changes(
            "    server a 10.0.0.1:80 check\n    server b 10.0.0.2:80 check weight 3\n    server x 10.0.0.9:80\n",
            "    server a 10.0.0.1:81 check\n    server b 10.0.0.2:80 check weight 4\n    server c 10.0.0.3:80 check\n    server d 10.0.0.4:80 check\n",
        );
        let b = &ch.backends[0];
        // a: running at the old port; b: operator drained it, weight 3; d: added by an
        // interrupted apply (maintenance, health off); z: runs but is in no file.
        let run = running(&[
            "3 be 1 a 10.0.0.1 2 0 1 1 0 6 3 4 6 0 0 0 - 80 - 0 0 - - 0",
            "3 be 2 b 10.0.0.2 2 8 3 3 0 6 3 4 6 0 0 0 - 80 - 0 0 - - 0",
            "3 be 4 d 10.0.0.4 0 1 1 1 0 1 0 0 2 0 0 0 - 80 - 0 0 - - 0",
            "3 be 5 z 10.0.0.5 2 0 1 1 0 6 3 4 6 0 0 0 - 80 - 0 0 - - 0",
        ]);
        let p = plan(b, &run, &BTreeSet::new());
        let names = |v: &[&Server]| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&p.add), ["c"]);
        assert_eq!(p.remove, ["z"]);
        assert_eq!(names(&p.addr), ["a"]);
        assert_eq!(names(&p.weight), ["b"]);
        assert_eq!(names(&p.enable_health), ["d"]);
        assert_eq!(names(&p.enable_server), ["d"]);
    }

    #[test]
    fn maintenance_is_an_operators_unless_an_interrupted_removal_left_it() {
        let ch = changes("    server a 10.0.0.1:80\n", "    server a 10.0.0.1:80\n");
        let run = running(&["3 be 1 a 10.0.0.1 0 1 1 1 0 6 3 4 6 0 0 0 - 80 - 0 0 - - 0"]);
        assert!(plan(&ch.backends[0], &run, &BTreeSet::new())
            .enable_server
            .is_empty());
        let release = [("be".to_string(), "a".to_string())].into();
        let p = plan(&ch.backends[0], &run, &release);
        assert_eq!(p.enable_server.len(), 1);
    }

    #[test]
    fn an_operator_weight_is_kept_unless_the_file_changes_it() {
        let ch = changes(
            "    server a 10.0.0.1:80 weight 2\n",
            "    server a 10.0.0.1:80 weight 2\n    server b 10.0.0.2:80\n",
        );
        let run = running(&[
            "3 be 1 a 10.0.0.1 2 0 9 2 0 6 3 4 6 0 0 0 - 80 - 0 0 - - 0",
            "3 be 2 b 10.0.0.2 2 0 1 1 0 6 3 4 6 0 0 0 - 80 - 0 0 - - 0",
        ]);
        let p = plan(&ch.backends[0], &run, &BTreeSet::new());
        assert!(p.weight.is_empty() && p.add.is_empty() && p.remove.is_empty());
        // The comparison does not hold the operator's weight against the file either.
        assert!(compare(&ch.backends[0], &run, |_| false).is_empty());
        let d = compare(&ch.backends[0], &run, |n| n == "a");
        assert_eq!(d, ["be/a has weight 9 instead of 2"]);
    }

    #[test]
    fn comparison_names_every_difference() {
        let ch = changes(
            "",
            "    server a 10.0.0.1:80 check\n    server b 10.0.0.2:80\n",
        );
        let run = running(&[
            "3 be 1 a 10.0.0.1 0 1 1 1 0 1 0 0 2 0 0 0 - 81 - 0 0 - - 0",
            "3 be 3 c 10.0.0.3 2 0 1 1 0 6 3 4 6 0 0 0 - 80 - 0 0 - - 0",
        ]);
        let d = compare(&ch.backends[0], &run, |_| true);
        assert_eq!(
            d,
            [
                "be/c is running but not in the file",
                "be/a runs at 10.0.0.1:81 instead of 10.0.0.1:80",
                "be/a is still in maintenance",
                "be/a has its health checks disabled",
                "be/b is in the file but not running",
            ]
        );
    }
}
