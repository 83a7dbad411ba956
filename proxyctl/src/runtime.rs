//! The runtime API (`stats socket … level admin`): live statistics and server state.
//!
//! Every command goes through [`RuntimeApi::run`] with validated arguments, so the server-line
//! commands HAProxy ≥ 2.6 offers (`add server`, `del server`, `set server … addr`) can be added
//! as small typed methods next to [`RuntimeApi::set_server_state`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::socket::{exchange, validate_word, Answer};
use crate::Error;

/// A server of a backend, `BACKEND/SERVER`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ServerRef {
    /// The backend's name.
    pub backend: String,
    /// The server's name inside the backend.
    pub server: String,
}

impl ServerRef {
    /// A validated reference: names may hold letters, digits and `_ - . :` only, so nothing can
    /// be smuggled into the command line.
    pub fn new(backend: impl Into<String>, server: impl Into<String>) -> Result<Self, Error> {
        let (backend, server) = (backend.into(), server.into());
        validate_word("backend name", &backend)?;
        validate_word("server name", &server)?;
        Ok(ServerRef { backend, server })
    }
}

impl FromStr for ServerRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once('/') {
            Some((backend, server)) => ServerRef::new(backend, server),
            None => Err(Error::InvalidName {
                what: "server reference",
                value: s.to_string(),
                reason: "expected BACKEND/SERVER",
            }),
        }
    }
}

impl fmt::Display for ServerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.backend, self.server)
    }
}

/// The administrative state of a server (`set server … state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes traffic normally.
    Ready,
    /// Takes no new sessions except persistent ones; existing sessions finish. `show stat`
    /// shows `DRAIN`.
    Drain,
    /// Maintenance: no traffic at all, health checks stop. `show stat` shows `MAINT`.
    Maint,
}

impl AdminState {
    fn keyword(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

/// What a `show stat` row describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StatKind {
    /// A frontend (`FRONTEND` row).
    Frontend,
    /// A backend's aggregate (`BACKEND` row).
    Backend,
    /// A server of a backend.
    Server,
    /// A listener (only with `option socket-stats`).
    Listener,
}

impl fmt::Display for StatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StatKind::Frontend => "frontend",
            StatKind::Backend => "backend",
            StatKind::Server => "server",
            StatKind::Listener => "listener",
        })
    }
}

/// One row of `show stat`, with the fields an operator reads first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatRow {
    /// The frontend or backend (`pxname`).
    pub proxy: String,
    /// `FRONTEND`, `BACKEND`, or the server / listener name (`svname`).
    pub name: String,
    /// What the row describes.
    pub kind: StatKind,
    /// `OPEN`, `UP`, `DOWN`, `DRAIN`, `MAINT`, `no check`, … (`status`).
    pub status: String,
    /// Effective weight, for servers and backends.
    pub weight: Option<u64>,
    /// Current sessions (`scur`).
    pub current_sessions: u64,
    /// Total sessions since start (`stot`).
    pub total_sessions: u64,
    /// Last health check result, e.g. `L4OK`, `L7STS` (`check_status`).
    pub check_status: Option<String>,
    /// Seconds since the last UP/DOWN transition (`lastchg`).
    pub last_change_secs: Option<u64>,
    /// The server's address, `ip:port` (`addr`).
    pub addr: Option<String>,
}

/// A client of HAProxy's runtime API on a stats socket (or through the master CLI).
#[derive(Debug, Clone)]
pub struct RuntimeApi {
    socket: PathBuf,
    prefix: Option<String>,
    timeout: Duration,
}

impl RuntimeApi {
    /// A client for the stats socket at `socket` (`stats socket <path> level admin`).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        RuntimeApi {
            socket: socket.into(),
            prefix: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// A client that reaches the current worker through the master CLI (`@1 <command>`), for
    /// setups without a stats socket.
    pub fn via_master(master_socket: impl Into<PathBuf>) -> Self {
        RuntimeApi {
            prefix: Some("@1 ".to_string()),
            ..RuntimeApi::new(master_socket)
        }
    }

    /// Bounds each exchange (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one command line built by this module and returns the answer.
    async fn run(&self, command: &str) -> Result<String, Error> {
        let line = match &self.prefix {
            Some(prefix) => format!("{prefix}{command}"),
            None => command.to_string(),
        };
        exchange(&self.socket, &line, self.timeout, Answer::Required).await
    }

    /// Runs a command whose success answer is empty; any text is HAProxy's error message.
    async fn run_silent(&self, command: &str) -> Result<(), Error> {
        let answer = self.run(command).await?;
        let answer = answer.trim();
        if answer.is_empty() {
            Ok(())
        } else {
            Err(Error::CommandRejected {
                socket: self.socket.clone(),
                command: command.to_string(),
                message: first_line(answer),
            })
        }
    }

    /// `show stat`: one row per frontend, backend and server.
    pub async fn show_stat(&self) -> Result<Vec<StatRow>, Error> {
        let answer = self.run("show stat").await?;
        parse_show_stat(&answer).map_err(|message| {
            if answer.trim_start().starts_with('#') {
                Error::Protocol {
                    socket: self.socket.clone(),
                    command: "show stat".into(),
                    message,
                }
            } else {
                Error::CommandRejected {
                    socket: self.socket.clone(),
                    command: "show stat".into(),
                    message: first_line(answer.trim()),
                }
            }
        })
    }

    /// `set server <backend>/<server> state ready|drain|maint`.
    pub async fn set_server_state(
        &self,
        server: &ServerRef,
        state: AdminState,
    ) -> Result<(), Error> {
        self.run_silent(&format!("set server {server} state {}", state.keyword()))
            .await
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_string()
}

/// Parses `show stat` CSV. Columns are found by name from the `# pxname,svname,…` header, so
/// versions that add columns parse the same.
pub fn parse_show_stat(text: &str) -> Result<Vec<StatRow>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix('#'))
        .ok_or_else(|| "no `# pxname,svname,…` header".to_string())?;
    let columns: BTreeMap<&str, usize> = header
        .trim()
        .split(',')
        .enumerate()
        .map(|(i, name)| (name.trim(), i))
        .collect();
    for required in ["pxname", "svname", "status", "scur", "stot", "type"] {
        if !columns.contains_key(required) {
            return Err(format!("no `{required}` column in the header"));
        }
    }
    let mut rows = Vec::new();
    for line in lines {
        let fields = split_csv(line);
        let get = |name: &str| -> &str {
            columns
                .get(name)
                .and_then(|&i| fields.get(i))
                .map(|s| s.as_str())
                .unwrap_or("")
        };
        let num = |name: &str| get(name).parse::<u64>().ok();
        let opt = |name: &str| Some(get(name).to_string()).filter(|s| !s.is_empty());
        let kind = match get("type") {
            "0" => StatKind::Frontend,
            "1" => StatKind::Backend,
            "2" => StatKind::Server,
            "3" => StatKind::Listener,
            other => return Err(format!("unknown row type {other:?} in {line:?}")),
        };
        rows.push(StatRow {
            proxy: get("pxname").to_string(),
            name: get("svname").to_string(),
            kind,
            status: get("status").to_string(),
            weight: num("weight"),
            current_sessions: num("scur").unwrap_or(0),
            total_sessions: num("stot").unwrap_or(0),
            check_status: opt("check_status"),
            last_change_secs: num("lastchg"),
            addr: opt("addr"),
        });
    }
    Ok(rows)
}

/// Splits one CSV line as HAProxy writes it (fields with `,` or `"` are double-quoted, `""`
/// escapes a quote).
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    // Verbatim HAProxy 2.6.12 answer (trimmed to the first columns that matter is not possible:
    // the parser must cope with the full width, so this is the full width).
    const SHOW_STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,
fe,FRONTEND,,,0,0,1000,0,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,0,0,0,,,,0,0,0,0,0,0,,0,0,0,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,0,0,0,0,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
be,s1,0,0,0,0,,0,0,0,,0,,0,0,0,0,DRAIN,1,1,0,,,0,,,1,3,1,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,127.0.0.1:18081,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
be,BACKEND,0,0,0,0,100,0,0,0,0,0,,0,0,0,0,DOWN,1,1,0,,0,0,0,,1,3,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,1,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
";

    #[test]
    fn show_stat_rows_by_column_name() {
        let rows = parse_show_stat(SHOW_STAT).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].kind, StatKind::Frontend);
        assert_eq!(rows[0].status, "OPEN");
        assert_eq!(rows[0].addr, None);
        assert_eq!(rows[1].kind, StatKind::Server);
        assert_eq!(rows[1].proxy, "be");
        assert_eq!(rows[1].name, "s1");
        assert_eq!(rows[1].status, "DRAIN");
        assert_eq!(rows[1].weight, Some(1));
        assert_eq!(rows[1].addr.as_deref(), Some("127.0.0.1:18081"));
        assert_eq!(rows[2].kind, StatKind::Backend);
        assert_eq!(rows[2].status, "DOWN");
    }

    #[test]
    fn show_stat_without_header_is_an_error() {
        assert!(parse_show_stat("Permission denied\n").is_err());
        assert!(parse_show_stat("# foo,bar\nx,y\n").is_err());
    }

    #[test]
    fn quoted_csv_fields() {
        assert_eq!(
            split_csv(r#"a,"b,c","d ""e""",,f"#),
            vec!["a", "b,c", "d \"e\"", "", "f"]
        );
    }

    #[test]
    fn server_refs() {
        let r: ServerRef = "be_web/web-1".parse().unwrap();
        assert_eq!((r.backend.as_str(), r.server.as_str()), ("be_web", "web-1"));
        assert_eq!(r.to_string(), "be_web/web-1");
        for bad in ["noslash", "be/", "/s", "be/s;show info", "be/s x", "a/b/c"] {
            assert!(bad.parse::<ServerRef>().is_err(), "{bad:?} was accepted");
        }
    }
}
