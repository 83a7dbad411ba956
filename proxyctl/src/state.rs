//! Servers' state across reloads (`server-state-file` + `load-server-state-from-file`).
//!
//! Before a reload, the running workers' `show servers state` is written to the file the
//! configuration's global `server-state-file` names, so the new workers start with the same
//! administrative state (a drain or maintenance set with `proxyctl drain`), the same runtime
//! weights and the same health as the old ones, instead of every server fresh and ready.
//!
//! Two HAProxy behaviours are corrected on the way:
//!
//! - HAProxy applies a state file's address and port to a server *over* its configuration
//!   (`init-addr last` is the default, and the port is always taken). A file saved before a
//!   reload that moves a server would send the new workers to the old address. Each line's
//!   address and port are therefore rewritten to the ones the new configuration gives the
//!   server (`-` for a host name, which HAProxy then resolves), and lines of servers the new
//!   configuration does not have are dropped.
//! - Once the reload is over the file is emptied (to `1\n`, a valid state of no servers, which
//!   `haproxy -c` reads without a warning, unlike a missing file), so a later restart of HAProxy
//!   (not a reload) never loads a stale state.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, Server};
use crate::{Error, MasterSocket, RuntimeApi};

/// What was saved for a reload.
#[derive(Debug, Clone, Serialize)]
pub struct SavedState {
    /// The state file.
    pub path: PathBuf,
    /// Servers whose state was saved.
    pub servers: usize,
}

/// Saves the running servers' state (through the master CLI, from the current worker) to the
/// `server-state-file` of `config`, for the new workers of a reload. `Ok(None)` when the
/// configuration names no state file. `cwd` is the master's working directory (relative state
/// file paths are relative to it).
pub async fn save_for_reload(
    config: &Config,
    master: &MasterSocket,
    cwd: Option<&Path>,
) -> Result<Option<SavedState>, Error> {
    let Some(path) = config.server_state_file() else {
        return Ok(None);
    };
    let path = match (path.is_relative(), cwd) {
        (true, Some(cwd)) => cwd.join(path),
        _ => path,
    };
    let api = RuntimeApi::via_master(master.path());
    let text = match api.raw_servers_state().await {
        Ok(t) => t,
        Err(e) => {
            // Better no state than a stale one.
            let _ = write_atomic(&path, EMPTY_STATE.as_bytes());
            return Err(Error::StateFile {
                path,
                reason: format!("`show servers state` failed: {e}"),
            });
        }
    };
    let (content, servers) = rewrite(&text, config).map_err(|reason| Error::StateFile {
        path: path.clone(),
        reason,
    })?;
    write_atomic(&path, content.as_bytes()).map_err(|reason| Error::StateFile {
        path: path.clone(),
        reason,
    })?;
    Ok(Some(SavedState { path, servers }))
}

/// The state of no servers (version line only).
pub const EMPTY_STATE: &str = "1\n";

/// Empties the state file after a reload (see the module docs).
pub fn clear_after_reload(saved: &SavedState) {
    if let Err(e) = write_atomic(&saved.path, EMPTY_STATE.as_bytes()) {
        tracing::warn!(path = %saved.path.display(), error = %e, "cannot empty the server state file after the reload");
        let _ = std::fs::remove_file(&saved.path);
    }
}

/// Rewrites a `show servers state` dump for the servers of `config`: their address and port
/// from the configuration, other servers dropped. Returns the file content and the number of
/// server lines kept.
pub fn rewrite(text: &str, config: &Config) -> Result<(String, usize), String> {
    let mut lines = text.lines();
    let version = lines.next().map(str::trim).unwrap_or_default();
    if version != "1" {
        return Err(format!(
            "unknown `show servers state` format {version:?} (expected 1)"
        ));
    }
    let header = lines
        .next()
        .filter(|h| h.trim_start().starts_with('#'))
        .ok_or("no header line in `show servers state`")?;
    let names: Vec<&str> = header.trim_start_matches('#').split_whitespace().collect();
    let col = |n: &str| {
        names
            .iter()
            .position(|c| *c == n)
            .ok_or_else(|| format!("no `{n}` column in `show servers state`"))
    };
    let (be, srv, addr, port) = (
        col("be_name")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_port")?,
    );
    let wanted: BTreeMap<(&str, &str), &Server> = config
        .backends()
        .flat_map(|b| {
            let name = b.name.as_deref().unwrap_or_default();
            b.servers.iter().map(move |s| ((name, s.name.as_str()), s))
        })
        .collect();
    let mut out = format!("1\n{}\n", header.trim());
    let mut kept = 0;
    for line in lines {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let mut f: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        if f.len() <= be.max(srv).max(addr).max(port) {
            continue;
        }
        let Some(s) = wanted.get(&(f[be].as_str(), f[srv].as_str())) else {
            continue;
        };
        match (s.endpoint, s.addr.rsplit_once(':')) {
            (Some((ip, p)), _) => {
                f[addr] = ip.to_string();
                f[port] = p.to_string();
            }
            (None, Some((_, p))) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                f[addr] = "-".into();
                f[port] = p.to_string();
            }
            // No port we can tell: leave this server's state out.
            _ => continue,
        }
        out.push_str(&f.join(" "));
        out.push('\n');
        kept += 1;
    }
    Ok((out, kept))
}

fn write_atomic(path: &Path, content: &[u8]) -> Result<(), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{} names no file", path.display()))?;
    let staged = path.with_file_name(format!(".{name}.proxyctl-{}", std::process::id()));
    let result = std::fs::File::create(&staged)
        .and_then(|mut f| {
            f.write_all(content)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&staged, path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&staged);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_ports_come_from_the_new_configuration() {
        // Verbatim HAProxy 2.6.12 dump: `a` drained and running at its old port, `gone` removed
        // from the new configuration.
        let dump = "1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 svc_web 1 a 127.0.0.1 2 8 1 1 1 6 3 4 6 0 0 0 - 18101 - 0 0 - - 0
3 svc_web 2 gone 127.0.0.1 2 0 1 1 1 6 3 4 6 0 0 0 - 18102 - 0 0 - - 0
4 svc_dns 1 d 10.1.1.1 2 0 1 1 1 6 3 4 6 0 0 0 - 80 - 0 0 - - 0
";
        let config = Config::parse(
            "backend svc_web\n    server a 127.0.0.2:18103 check\nbackend svc_dns\n    server d db.local:5432\n",
        )
        .unwrap();
        let (text, kept) = rewrite(dump, &config).unwrap();
        assert_eq!(kept, 2);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "1");
        assert!(lines[1].starts_with("# be_id be_name"));
        assert_eq!(
            lines[2],
            "3 svc_web 1 a 127.0.0.2 2 8 1 1 1 6 3 4 6 0 0 0 - 18103 - 0 0 - - 0"
        );
        assert_eq!(
            lines[3],
            "4 svc_dns 1 d - 2 0 1 1 1 6 3 4 6 0 0 0 - 5432 - 0 0 - - 0"
        );
        assert_eq!(lines.len(), 4);
        assert!(rewrite("Unknown command.\n", &config).is_err());
    }
}
