//! The runtime API (`stats socket … level admin`): live statistics and server state.
//!
//! Every command goes through [`RuntimeApi::run`] with validated arguments (names and tokens of
//! a safe character set, so nothing can end the command line or start a second command): live
//! statistics, server state, and the server-line commands of HAProxy ≥ 2.6 (`add server`,
//! `del server`, `set server … addr/weight`, `enable health/server`) that [`crate::sync`] uses
//! to apply a configuration's server lines without a reload.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::socket::{exchange, validate_token, validate_word, Answer};
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

/// One server of `show servers state` (format version 1), with the fields Flotilla reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerState {
    /// The backend's numeric id.
    pub backend_id: u32,
    /// The backend's name.
    pub backend: String,
    /// The server's numeric id inside the backend.
    pub id: u32,
    /// The server's name.
    pub name: String,
    /// Its address as HAProxy prints it (an IP address, or `-`).
    pub addr: String,
    /// Its port.
    pub port: u16,
    /// Operational state: 0 down, 1 starting, 2 up, 3 stopping.
    pub op_state: u8,
    /// Administrative state flags (0x01 forced maintenance, 0x04 maintenance from the
    /// configuration, 0x08 forced drain, …).
    pub admin_state: u32,
    /// The weight in effect (`set server … weight` changes it).
    pub weight: u32,
    /// The weight the server was configured with (at start, reload or `add server`).
    pub initial_weight: u32,
    /// Health check state flags (0x02 configured, 0x04 enabled, 0x08 paused).
    pub check_state: u32,
    /// The whole line as HAProxy printed it (for saving the state).
    pub line: String,
}

impl ServerState {
    /// Forced maintenance (`set server … state maint`, `disable server`, or a new dynamic
    /// server not enabled yet).
    pub const ADMIN_FMAINT: u32 = 0x01;
    /// Maintenance from the configuration (`disabled`).
    pub const ADMIN_CMAINT: u32 = 0x04;
    /// Forced drain (`set server … state drain`).
    pub const ADMIN_FDRAIN: u32 = 0x08;
    /// Health checks configured.
    pub const CHECK_CONFIGURED: u32 = 0x02;
    /// Health checks enabled.
    pub const CHECK_ENABLED: u32 = 0x04;

    /// The address as an IP literal, if it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.addr.parse().ok()
    }

    /// True in forced or configured maintenance.
    pub fn in_maintenance(&self) -> bool {
        self.admin_state & (Self::ADMIN_FMAINT | Self::ADMIN_CMAINT) != 0
    }

    /// True if health checks are configured but not enabled (a dynamic server before
    /// `enable health`, or after `disable health`).
    pub fn health_disabled(&self) -> bool {
        self.check_state & Self::CHECK_CONFIGURED != 0
            && self.check_state & Self::CHECK_ENABLED == 0
    }
}

/// Parses the answer to `show servers state`: a version line (`1`), a `#` header naming the
/// columns, one line per server. Columns are found by name.
pub fn parse_servers_state(text: &str) -> Result<Vec<ServerState>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match lines.next().map(str::trim) {
        Some("1") => {}
        Some(other) => return Err(format!("unknown format version {other:?}")),
        None => return Err("empty answer".into()),
    }
    let header = lines
        .next()
        .and_then(|h| h.trim().strip_prefix('#'))
        .ok_or_else(|| "no `# be_id be_name …` header".to_string())?;
    let columns: BTreeMap<&str, usize> = header
        .split_whitespace()
        .enumerate()
        .map(|(i, n)| (n, i))
        .collect();
    let col = |name: &str| {
        columns
            .get(name)
            .copied()
            .ok_or_else(|| format!("no `{name}` column in the header"))
    };
    let idx = [
        col("be_id")?,
        col("be_name")?,
        col("srv_id")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_op_state")?,
        col("srv_admin_state")?,
        col("srv_uweight")?,
        col("srv_iweight")?,
        col("srv_check_state")?,
        col("srv_port")?,
    ];
    let mut out = Vec::new();
    for line in lines {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let get = |i: usize| -> Result<&str, String> {
            f.get(idx[i])
                .copied()
                .ok_or_else(|| format!("short line {line:?}"))
        };
        // Each number must fit the field's type: `as` would wrap an op_state of 258 to 2 (up)
        // or a port of 70000 to 4464.
        let num = |i: usize| -> Result<u64, String> {
            let v = get(i)?;
            v.parse()
                .map_err(|_| format!("field {} is not a number in {line:?}", idx[i] + 1))
        };
        let fits = |i: usize, max: u64| -> Result<u64, String> {
            let n = num(i)?;
            if n <= max {
                Ok(n)
            } else {
                Err(format!(
                    "field {} is {n}, more than {max}, in {line:?}",
                    idx[i] + 1
                ))
            }
        };
        let (u8_max, u16_max, u32_max) =
            (u64::from(u8::MAX), u64::from(u16::MAX), u64::from(u32::MAX));
        out.push(ServerState {
            backend_id: fits(0, u32_max)? as u32,
            backend: get(1)?.to_string(),
            id: fits(2, u32_max)? as u32,
            name: get(3)?.to_string(),
            addr: get(4)?.to_string(),
            op_state: fits(5, u8_max)? as u8,
            admin_state: fits(6, u32_max)? as u32,
            weight: fits(7, u32_max)? as u32,
            initial_weight: fits(8, u32_max)? as u32,
            check_state: fits(9, u32_max)? as u32,
            port: fits(10, u16_max)? as u16,
            line: line.trim().to_string(),
        });
    }
    Ok(out)
}

/// What `del server` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The server is gone.
    Deleted,
    /// It still has connections (or queued requests); try again later.
    Busy,
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

    /// `show servers state [BACKEND]`: every server (of one backend) with its address, state
    /// and weights. An unknown backend is [`Error::CommandRejected`].
    pub async fn show_servers_state(
        &self,
        backend: Option<&str>,
    ) -> Result<Vec<ServerState>, Error> {
        let command = match backend {
            Some(b) => {
                validate_word("backend name", b)?;
                format!("show servers state {b}")
            }
            None => "show servers state".to_string(),
        };
        let answer = self.run(&command).await?;
        parse_servers_state(&answer).map_err(|message| {
            if answer.trim_start().starts_with('1') {
                Error::Protocol {
                    socket: self.socket.clone(),
                    command: command.clone(),
                    message,
                }
            } else {
                Error::CommandRejected {
                    socket: self.socket.clone(),
                    command: command.clone(),
                    message: first_line(answer.trim()),
                }
            }
        })
    }

    /// `show servers state` as HAProxy printed it (checked to be a version-1 dump), for saving
    /// it to a server-state file.
    pub async fn raw_servers_state(&self) -> Result<String, Error> {
        let command = "show servers state";
        let answer = self.run(command).await?;
        match parse_servers_state(&answer) {
            Ok(_) => Ok(answer),
            Err(message) => Err(Error::Protocol {
                socket: self.socket.clone(),
                command: command.into(),
                message,
            }),
        }
    }

    /// `add server BACKEND/SERVER ARGS…`: a new server, in maintenance and with health checks
    /// disabled (HAProxy 2.6 creates dynamic servers so): follow with
    /// [`RuntimeApi::enable_health`] and [`RuntimeApi::enable_server`]. `args` are the tokens
    /// of a `server` line after the name (address first); each must be a plain token.
    pub async fn add_server(&self, server: &ServerRef, args: &[String]) -> Result<(), Error> {
        if args.is_empty() {
            return Err(Error::InvalidName {
                what: "server arguments",
                value: String::new(),
                reason: "an address is required",
            });
        }
        for a in args {
            validate_token(a)?;
        }
        let command = format!("add server {server} {}", args.join(" "));
        self.expect(&command, &["New server registered."]).await
    }

    /// `del server BACKEND/SERVER` (the server must be in maintenance).
    pub async fn del_server(&self, server: &ServerRef) -> Result<Removal, Error> {
        let command = format!("del server {server}");
        let answer = self.run(&command).await?;
        let answer = answer.trim();
        if answer.starts_with("Server deleted") {
            Ok(Removal::Deleted)
        } else if answer.contains("still has connections") {
            Ok(Removal::Busy)
        } else {
            Err(Error::CommandRejected {
                socket: self.socket.clone(),
                command,
                message: first_line(answer),
            })
        }
    }

    /// `set server BACKEND/SERVER addr IP port PORT`.
    pub async fn set_server_addr(
        &self,
        server: &ServerRef,
        ip: IpAddr,
        port: u16,
    ) -> Result<(), Error> {
        let command = format!("set server {server} addr {ip} port {port}");
        // Success is a sentence: "IP changed from … to …, port changed from … by 'stats socket
        // command'" or "no need to change the addr, …".
        let answer = self.run(&command).await?;
        let text = answer.trim();
        if text.contains("changed") || text.contains("no need to change") {
            Ok(())
        } else {
            Err(Error::CommandRejected {
                socket: self.socket.clone(),
                command,
                message: first_line(text),
            })
        }
    }

    /// `set server BACKEND/SERVER weight N` (0–256).
    pub async fn set_server_weight(&self, server: &ServerRef, weight: u32) -> Result<(), Error> {
        self.run_silent(&format!("set server {server} weight {weight}"))
            .await
    }

    /// `enable health BACKEND/SERVER`: start its health checks.
    pub async fn enable_health(&self, server: &ServerRef) -> Result<(), Error> {
        self.run_silent(&format!("enable health {server}")).await
    }

    /// `enable server BACKEND/SERVER`: leave maintenance.
    pub async fn enable_server(&self, server: &ServerRef) -> Result<(), Error> {
        self.run_silent(&format!("enable server {server}")).await
    }

    /// Runs a command whose success answer is one of `ok` (any other text is an error).
    async fn expect(&self, command: &str, ok: &[&str]) -> Result<(), Error> {
        let answer = self.run(command).await?;
        let text = answer.trim();
        if ok.iter().any(|o| text.starts_with(o)) {
            Ok(())
        } else {
            Err(Error::CommandRejected {
                socket: self.socket.clone(),
                command: command.to_string(),
                message: first_line(text),
            })
        }
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

    // Verbatim HAProxy 2.6.12: a configured server (drained) and a dynamic one just added.
    const SERVERS_STATE: &str = "1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 svc_web 1 a 127.0.0.1 2 8 1 1 1 6 3 4 6 0 0 0 - 18101 - 0 0 - - 0
3 svc_web 2 b 127.0.0.1 0 1 5 5 0 1 0 0 2 0 0 0 - 18102 - 0 0 - - 0
";

    #[test]
    fn servers_state_by_column_name() {
        let s = parse_servers_state(SERVERS_STATE).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].backend.as_str(), s[0].name.as_str()),
            ("svc_web", "a")
        );
        assert_eq!(s[0].ip(), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(s[0].port, 18101);
        assert_eq!(s[0].admin_state, ServerState::ADMIN_FDRAIN);
        assert!(!s[0].in_maintenance() && !s[0].health_disabled());
        assert_eq!((s[1].weight, s[1].initial_weight), (5, 5));
        assert!(s[1].in_maintenance() && s[1].health_disabled());
        assert_eq!(s[1].op_state, 0);
        assert!(s[1].line.starts_with("3 svc_web 2 b 127.0.0.1"));
        // A backend without servers: the header only.
        assert!(
            parse_servers_state(&SERVERS_STATE[..SERVERS_STATE.find("3 svc").unwrap()])
                .unwrap()
                .is_empty()
        );
        assert!(parse_servers_state("Can't find backend.\n").is_err());
        assert!(parse_servers_state("2\n# be_id\n").is_err());
    }

    /// Caught by the `haproxy_cli` fuzz target (its check that every number is the one in its
    /// column of the line): numbers too large for their field were wrapped
    /// (`as u8`, `as u16`), so an op_state of 258 read as 2 (up) and a port of 70000 as 4464.
    #[test]
    fn regression_servers_state_numbers_out_of_range_are_errors_not_wrapped() {
        let header = SERVERS_STATE.lines().nth(1).unwrap();
        let dump = |op: &str, port: &str, id: &str| {
            format!("1\n{header}\n3 svc_web {id} a 127.0.0.1 {op} 8 1 1 1 6 3 4 6 0 0 0 - {port} - 0 0 - - 0\n")
        };
        let ok = parse_servers_state(&dump("255", "65535", "4294967295")).unwrap();
        assert_eq!(
            (ok[0].op_state, ok[0].port, ok[0].id),
            (255, 65535, u32::MAX)
        );
        for (op, port, id) in [
            ("258", "18101", "1"),
            ("2", "70000", "1"),
            ("2", "18101", "4294967297"),
        ] {
            let e = parse_servers_state(&dump(op, port, id)).unwrap_err();
            assert!(e.contains("more than"), "{op} {port} {id}: {e}");
        }
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
