//! An HAProxy configuration file read as HAProxy reads it (sections, lines, tokens), and the
//! difference between two of them.
//!
//! Two uses: confgen asks [`Config::server_changes`] whether a new render differs from the
//! running configuration only in `server` lines of existing backends (then it can be applied
//! through the runtime API instead of a reload), and `proxyctl reload` reads the global
//! `server-state-file` and every backend's servers to save the running servers' state for the
//! new workers (see [`crate::state`]).
//!
//! The reader is deliberately small: it splits sections, strips comments and tokenises lines
//! (quotes and backslash escapes as HAProxy does). It does not validate keywords; `haproxy -c`
//! does that. Anything it cannot vouch for (a quoted or escaped server line, a host name, a
//! `default-server` that dynamic servers would not inherit) makes a difference *structural*:
//! the caller takes the reload path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Section keywords of HAProxy 2.6 (a line whose first token is one of them starts a section).
const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "peers",
    "resolvers",
    "userlist",
    "program",
    "http-errors",
    "ring",
    "mailers",
    "cache",
    "fcgi-app",
];

/// One significant line: its 1-based number and its tokens (comments and blank lines dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number in the file.
    pub number: usize,
    /// The tokens, unquoted.
    pub tokens: Vec<String>,
    /// True if the line used quotes or escapes (its tokens then differ from its text).
    pub quoted: bool,
}

/// A `server` line of a backend or listen section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// 1-based line number.
    pub line: usize,
    /// The server's name.
    pub name: String,
    /// The address token as written (`10.0.0.1:8080`, `[::1]:8080`, `web.local:80`, …).
    pub addr: String,
    /// The address as an IP literal and a port, when it is one.
    pub endpoint: Option<(IpAddr, u16)>,
    /// `weight N`, if given.
    pub weight: Option<u32>,
    /// Every token after the address except `weight N`, in order.
    pub options: Vec<String>,
    /// Every token after the name (address, then options with `weight N`), as written.
    pub args: Vec<String>,
    /// True when every token is made of characters that are safe on the runtime CLI
    /// (letters, digits, `_ . : / @ = + , % [ ] -`) and the line has no quotes or escapes.
    pub plain: bool,
}

impl Server {
    /// True if the line carries the `disabled` keyword (the server starts in maintenance).
    pub fn disabled(&self) -> bool {
        self.options.iter().any(|o| o == "disabled")
    }

    /// True if the line enables health checks (`check`).
    pub fn checked(&self) -> bool {
        self.options.iter().any(|o| o == "check")
    }

    /// The effective weight: `weight N`, else HAProxy's default 1.
    pub fn effective_weight(&self) -> u32 {
        self.weight.unwrap_or(1)
    }
}

/// A section: its header and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// `global`, `defaults`, `backend`, …
    pub keyword: String,
    /// The section's name (`backend web` → `web`), if any.
    pub name: Option<String>,
    /// The header line.
    pub header: Line,
    /// Every significant line of the body except `server` lines of backend/listen sections.
    pub body: Vec<Line>,
    /// The `server` lines of a backend or listen section, in order.
    pub servers: Vec<Server>,
}

impl Section {
    /// True for `backend` and `listen` sections (the ones that hold servers).
    pub fn is_backend(&self) -> bool {
        self.keyword == "backend" || self.keyword == "listen"
    }

    fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{} {n}", self.keyword),
            None => self.keyword.clone(),
        }
    }

    fn has_default_server(&self) -> bool {
        self.body
            .iter()
            .any(|l| l.tokens.first().is_some_and(|t| t == "default-server"))
    }
}

/// A parsed configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Lines before the first section (HAProxy accepts none; kept so a difference shows).
    pub preamble: Vec<Line>,
    /// The sections in file order.
    pub sections: Vec<Section>,
}

/// A configuration that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Why two configurations differ in more than server lines: the runtime API cannot apply it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Structural {
    /// What differs, naming the section and line (for logs).
    pub detail: String,
}

impl fmt::Display for Structural {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The servers of one backend, before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendServers {
    /// The backend (or listen section) name.
    pub backend: String,
    /// The servers the new configuration gives it, in order.
    pub servers: Vec<Server>,
    /// The servers the old configuration gave it, by name.
    pub old: BTreeMap<String, Server>,
    /// True if any server line differs between the two.
    pub changed: bool,
}

impl BackendServers {
    /// Names of servers the new configuration adds.
    pub fn added(&self) -> impl Iterator<Item = &Server> {
        self.servers
            .iter()
            .filter(|s| !self.old.contains_key(&s.name))
    }

    /// Names of servers the new configuration removes.
    pub fn removed(&self) -> impl Iterator<Item = &String> {
        let new: BTreeSet<&String> = self.servers.iter().map(|s| &s.name).collect();
        self.old.keys().filter(move |n| !new.contains(n))
    }
}

/// Two configurations that differ at most in `server` lines of the same backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerChanges {
    /// Every backend and listen section of the new configuration, in file order.
    pub backends: Vec<BackendServers>,
}

impl ServerChanges {
    /// The backends whose server lines differ.
    pub fn changed(&self) -> impl Iterator<Item = &BackendServers> {
        self.backends.iter().filter(|b| b.changed)
    }

    /// True if no server line differs.
    pub fn is_empty(&self) -> bool {
        self.changed().next().is_none()
    }
}

impl Config {
    /// Reads a configuration from its text.
    pub fn parse(text: &str) -> Result<Config, ParseError> {
        let mut preamble = Vec::new();
        let mut sections: Vec<Section> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let number = i + 1;
            let Some(line) = tokenize(raw, number)? else {
                continue;
            };
            let first = line.tokens[0].as_str();
            if SECTIONS.contains(&first) {
                sections.push(Section {
                    keyword: first.to_string(),
                    name: line.tokens.get(1).cloned(),
                    header: line,
                    body: Vec::new(),
                    servers: Vec::new(),
                });
                continue;
            }
            let Some(section) = sections.last_mut() else {
                preamble.push(line);
                continue;
            };
            if section.is_backend() && first == "server" {
                section.servers.push(server_line(&line)?);
            } else {
                section.body.push(line);
            }
        }
        Ok(Config { preamble, sections })
    }

    /// Reads a configuration file.
    pub fn read(path: &Path) -> Result<Config, crate::Error> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                crate::Error::ConfigMissing {
                    path: path.to_path_buf(),
                }
            } else {
                crate::Error::ConfigUnreadable {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Config::parse(&text).map_err(|e| crate::Error::ConfigSyntax {
            path: path.to_path_buf(),
            line: e.line,
            message: e.message,
        })
    }

    /// The sections with servers (`backend` and `listen`).
    pub fn backends(&self) -> impl Iterator<Item = &Section> {
        self.sections.iter().filter(|s| s.is_backend())
    }

    /// The backend or listen section named `name`.
    pub fn backend(&self, name: &str) -> Option<&Section> {
        self.backends().find(|s| s.name.as_deref() == Some(name))
    }

    /// The global `server-state-file`, made absolute against `server-state-base` if it is
    /// relative (a relative result is relative to HAProxy's working directory).
    pub fn server_state_file(&self) -> Option<PathBuf> {
        let global = self.sections.iter().filter(|s| s.keyword == "global");
        let mut file = None;
        let mut base = None;
        for line in global.flat_map(|s| &s.body) {
            match (line.tokens[0].as_str(), line.tokens.get(1)) {
                ("server-state-file", Some(f)) => file = Some(PathBuf::from(f)),
                ("server-state-base", Some(b)) => base = Some(PathBuf::from(b)),
                _ => {}
            }
        }
        let file = file?;
        Some(match base {
            Some(base) if file.is_relative() => base.join(file),
            _ => file,
        })
    }

    /// Compares `self` (the running configuration) with `new`. `Ok` when they differ in server
    /// lines of the same backends only, and only in what the runtime API can change: servers
    /// added or removed, a server's address (IP literal and port) or its weight. Any other
    /// difference is [`Structural`] and needs a reload.
    pub fn server_changes(&self, new: &Config) -> Result<ServerChanges, Structural> {
        let structural = |detail: String| Err(Structural { detail });
        if self.preamble != new.preamble {
            return structural("lines before the first section differ".into());
        }
        if self.sections.len() != new.sections.len() {
            return structural(section_list_change(self, new));
        }
        let default_server = new
            .sections
            .iter()
            .any(|s| s.keyword == "defaults" && s.has_default_server());
        let mut backends = Vec::new();
        for (old, sec) in self.sections.iter().zip(&new.sections) {
            if old.header.tokens != sec.header.tokens {
                return structural(section_list_change(self, new));
            }
            if let Some(d) = first_difference(&old.body, &sec.body) {
                return structural(format!("{}: {d}", sec.label()));
            }
            if !sec.is_backend() {
                continue;
            }
            let backend = sec.name.clone().unwrap_or_default();
            let old_servers: BTreeMap<String, Server> = old
                .servers
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect();
            let mut seen = BTreeSet::new();
            let mut changed = false;
            for s in &sec.servers {
                if !seen.insert(s.name.as_str()) {
                    return structural(format!(
                        "{}: line {}: server {} appears twice",
                        sec.label(),
                        s.line,
                        s.name
                    ));
                }
                let same = old_servers.get(&s.name).is_some_and(|o| o.args == s.args);
                if same {
                    continue;
                }
                changed = true;
                if !s.plain || s.endpoint.is_none() {
                    return structural(format!(
                        "{}: line {}: server {} {} is not an IP address and port in plain \
                         tokens",
                        sec.label(),
                        s.line,
                        s.name,
                        s.addr
                    ));
                }
                if let Some(o) = old_servers.get(&s.name) {
                    if o.options != s.options {
                        return structural(format!(
                            "{}: line {}: the options of server {} changed",
                            sec.label(),
                            s.line,
                            s.name
                        ));
                    }
                } else if default_server || sec.has_default_server() {
                    // Servers added at runtime do not inherit `default-server` (HAProxy 2.6).
                    return structural(format!(
                        "{}: line {}: server {} is new and the configuration has a \
                         default-server line, which servers added at runtime do not inherit",
                        sec.label(),
                        s.line,
                        s.name
                    ));
                }
            }
            changed |= old_servers.keys().any(|n| !seen.contains(n.as_str()));
            backends.push(BackendServers {
                backend,
                servers: sec.servers.clone(),
                old: old_servers,
                changed,
            });
        }
        Ok(ServerChanges { backends })
    }
}

fn section_list_change(old: &Config, new: &Config) -> String {
    let labels = |c: &Config| -> Vec<String> { c.sections.iter().map(Section::label).collect() };
    let (a, b) = (labels(old), labels(new));
    let added: Vec<&String> = b.iter().filter(|l| !a.contains(l)).collect();
    let removed: Vec<&String> = a.iter().filter(|l| !b.contains(l)).collect();
    match (added.first(), removed.first()) {
        (Some(x), _) => format!("{x} is new"),
        (None, Some(x)) => format!("{x} is gone"),
        (None, None) => "the sections are in another order".into(),
    }
}

fn first_difference(a: &[Line], b: &[Line]) -> Option<String> {
    for (x, y) in a.iter().zip(b) {
        if x.tokens != y.tokens {
            return Some(format!(
                "line {} changed ({})",
                y.number,
                y.tokens.join(" ")
            ));
        }
    }
    match a.len().cmp(&b.len()) {
        std::cmp::Ordering::Less => {
            let l = &b[a.len()];
            Some(format!("line {} is new ({})", l.number, l.tokens.join(" ")))
        }
        std::cmp::Ordering::Greater => {
            let l = &a[b.len()];
            Some(format!(
                "line {} is gone ({})",
                l.number,
                l.tokens.join(" ")
            ))
        }
        std::cmp::Ordering::Equal => None,
    }
}

fn server_line(line: &Line) -> Result<Server, ParseError> {
    let err = |message: &str| ParseError {
        line: line.number,
        message: message.to_string(),
    };
    let name = line
        .tokens
        .get(1)
        .ok_or_else(|| err("`server` needs a name and an address"))?
        .clone();
    let addr = line
        .tokens
        .get(2)
        .ok_or_else(|| err("`server` needs a name and an address"))?
        .clone();
    let args: Vec<String> = line.tokens[2..].to_vec();
    let mut weight = None;
    let mut options = Vec::new();
    let mut rest = line.tokens[3..].iter();
    while let Some(t) = rest.next() {
        if t == "weight" {
            let v = rest.next().ok_or_else(|| err("`weight` needs a value"))?;
            weight = Some(
                v.parse()
                    .map_err(|_| err(&format!("weight {v:?} is not a number")))?,
            );
        } else {
            options.push(t.clone());
        }
    }
    let plain = !line.quoted && line.tokens[1..].iter().all(|t| is_plain(t));
    Ok(Server {
        line: line.number,
        endpoint: ip_endpoint(&addr),
        name,
        addr,
        weight,
        options,
        args,
        plain,
    })
}

/// `ip:port` or `[ipv6]:port` as an IP literal and a port (no `ipv4@`-style prefixes, no port
/// ranges or offsets, no host names).
pub fn ip_endpoint(addr: &str) -> Option<(IpAddr, u16)> {
    // `[v6]:port`, or the last colon separates the port (as HAProxy reads `::1:80`).
    let (host, port) = match addr.strip_prefix('[') {
        Some(rest) => rest.split_once("]:")?,
        None => addr.rsplit_once(':')?,
    };
    let ip: IpAddr = host.parse().ok()?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    (port > 0).then_some((ip, port))
}

fn is_plain(token: &str) -> bool {
    // The tokens the runtime API accepts in a `server` line, nothing more.
    crate::socket::validate_token(token).is_ok()
}

/// Splits one line into tokens the way HAProxy does: whitespace separates, `#` outside quotes
/// starts a comment, `"…"` and `'…'` quote, `\` escapes the next character. `None` for a line
/// without tokens.
fn tokenize(raw: &str, number: usize) -> Result<Option<Line>, ParseError> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut quote: Option<char> = None;
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (_, '\\') => {
                quoted = true;
                in_token = true;
                match chars.next() {
                    Some(n) => cur.push(n),
                    None => cur.push('\\'),
                }
            }
            (Some(q), c) if c == q => {
                quote = None;
            }
            (Some(_), c) => cur.push(c),
            (None, '"') | (None, '\'') => {
                quoted = true;
                in_token = true;
                quote = Some(c);
            }
            (None, '#') => break,
            (None, c) if c.is_whitespace() => {
                if in_token {
                    tokens.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            (None, c) => {
                in_token = true;
                cur.push(c);
            }
        }
    }
    if quote.is_some() {
        return Err(ParseError {
            line: number,
            message: "unmatched quote".into(),
        });
    }
    if in_token {
        tokens.push(cur);
    }
    Ok((!tokens.is_empty()).then_some(Line {
        number,
        tokens,
        quoted,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "\
# Generated
global
    master-worker
    stats socket /run/haproxy/admin.sock mode 600 level admin expose-fd listeners
    server-state-file /var/lib/haproxy/server-state

defaults
    mode http
    load-server-state-from-file global

frontend http
    bind :80
    use_backend svc_web if { hdr(host) -i web.localhost }  # a comment

backend svc_web
    balance roundrobin
    server web-1 10.0.0.1:8080 check inter 2s fall 3 rise 2
    server web-2 10.0.0.2:8080 check inter 2s fall 3 rise 2 weight 5

backend svc_api
    balance roundrobin
";

    fn with(text: &str, from: &str, to: &str) -> Config {
        assert!(text.contains(from), "{from:?} not in the text");
        Config::parse(&text.replacen(from, to, 1)).unwrap()
    }

    #[test]
    fn sections_servers_and_tokens() {
        let c = Config::parse(BASE).unwrap();
        let kinds: Vec<String> = c.sections.iter().map(Section::label).collect();
        assert_eq!(
            kinds,
            [
                "global",
                "defaults",
                "frontend http",
                "backend svc_web",
                "backend svc_api"
            ]
        );
        let web = c.backend("svc_web").unwrap();
        assert_eq!(web.servers.len(), 2);
        let s = &web.servers[1];
        assert_eq!(s.name, "web-2");
        assert_eq!(s.endpoint, Some(("10.0.0.2".parse().unwrap(), 8080)));
        assert_eq!(s.weight, Some(5));
        assert_eq!(
            s.options,
            ["check", "inter", "2s", "fall", "3", "rise", "2"]
        );
        assert!(s.plain && s.checked() && !s.disabled());
        assert_eq!(s.line, 18);
        // The comment is not a token; the braces are.
        let fe = &c.sections[2];
        assert_eq!(fe.body[1].tokens.last().unwrap(), "}");
        assert_eq!(
            c.server_state_file(),
            Some(PathBuf::from("/var/lib/haproxy/server-state"))
        );
    }

    #[test]
    fn quotes_escapes_and_comments() {
        let l = tokenize(r#"  acl x "a b" 'c#d' e\ f # rest"#, 1)
            .unwrap()
            .unwrap();
        assert_eq!(l.tokens, ["acl", "x", "a b", "c#d", "e f"]);
        assert!(l.quoted);
        assert!(tokenize("   # only a comment", 2).unwrap().is_none());
        assert!(tokenize("", 3).unwrap().is_none());
        assert!(tokenize("acl x \"open", 4).is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            ip_endpoint("[::1]:8003"),
            Some(("::1".parse().unwrap(), 8003))
        );
        assert_eq!(
            ip_endpoint("127.0.0.1:80"),
            Some(("127.0.0.1".parse().unwrap(), 80))
        );
        for bad in [
            "web.local:80",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:+1",
            "ipv4@1.2.3.4:5",
            "1.2.3.4:70000",
            "unix@/x",
        ] {
            assert_eq!(ip_endpoint(bad), None, "{bad}");
        }
    }

    #[test]
    fn server_only_changes_are_listed_per_backend() {
        let old = Config::parse(BASE).unwrap();
        let new = Config::parse(
            &BASE
                .replace("10.0.0.1:8080", "10.0.0.9:9090")
                .replace("weight 5", "weight 7")
                .replace(
                    "backend svc_api\n    balance roundrobin\n",
                    "backend svc_api\n    balance roundrobin\n    server api-1 10.0.1.1:80 check\n",
                ),
        )
        .unwrap();
        let ch = old.server_changes(&new).unwrap();
        let changed: Vec<&str> = ch.changed().map(|b| b.backend.as_str()).collect();
        assert_eq!(changed, ["svc_web", "svc_api"]);
        let api = &ch.backends[1];
        assert_eq!(
            api.added().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["api-1"]
        );
        assert_eq!(api.removed().count(), 0);

        // Removing a server, and nothing at all.
        let fewer = with(
            BASE,
            "    server web-1 10.0.0.1:8080 check inter 2s fall 3 rise 2\n",
            "",
        );
        let ch = old.server_changes(&fewer).unwrap();
        assert_eq!(
            ch.backends[0].removed().collect::<Vec<_>>(),
            [&"web-1".to_string()]
        );
        assert!(old.server_changes(&old).unwrap().is_empty());
        // Whitespace and comments are not differences.
        let spaced = with(
            BASE,
            "    balance roundrobin\n",
            "  balance   roundrobin   # rr\n",
        );
        assert!(old.server_changes(&spaced).unwrap().is_empty());
    }

    #[test]
    fn everything_else_is_structural() {
        let old = Config::parse(BASE).unwrap();
        let cases = [
            ("backend svc_api\n", "backend svc_new\n", "is new"),
            ("    mode http\n", "    mode tcp\n", "defaults: line"),
            ("    bind :80\n", "    bind :81\n", "frontend http: line"),
            (
                "check inter 2s fall 3 rise 2 weight 5",
                "check inter 5s fall 3 rise 2 weight 5",
                "options of server web-2 changed",
            ),
            ("10.0.0.1:8080", "web.local:8080", "not an IP address"),
            (
                "10.0.0.1:8080 check",
                "10.0.0.1:8081 \"check\"",
                "plain tokens",
            ),
            (
                "    balance roundrobin\n    server web-1",
                "    balance roundrobin\n    server web-2",
                "appears twice",
            ),
        ];
        for (from, to, want) in cases {
            let new = with(BASE, from, to);
            let e = old.server_changes(&new).unwrap_err();
            assert!(e.detail.contains(want), "{from:?} → {to:?}: {e}");
        }
        // A default-server line: servers added at runtime would not inherit it.
        let old = with(
            BASE,
            "    mode http\n",
            "    mode http\n    default-server inter 3s\n",
        );
        let new = Config::parse(&old_text_with_default_server().replace(
            "backend svc_api\n    balance roundrobin\n",
            "backend svc_api\n    balance roundrobin\n    server api-1 10.0.1.1:80\n",
        ))
        .unwrap();
        let e = old.server_changes(&new).unwrap_err();
        assert!(e.detail.contains("default-server"), "{e}");
        // A removal is fine with it.
        let fewer = Config::parse(&old_text_with_default_server().replacen(
            "    server web-1 10.0.0.1:8080 check inter 2s fall 3 rise 2\n",
            "",
            1,
        ))
        .unwrap();
        assert!(old.server_changes(&fewer).is_ok());
    }

    fn old_text_with_default_server() -> String {
        BASE.replacen(
            "    mode http\n",
            "    mode http\n    default-server inter 3s\n",
            1,
        )
    }

    #[test]
    fn state_file_relative_to_its_base() {
        let c = Config::parse(
            "global\n    server-state-base /var/state\n    server-state-file haproxy\n",
        )
        .unwrap();
        assert_eq!(
            c.server_state_file(),
            Some(PathBuf::from("/var/state/haproxy"))
        );
        assert_eq!(Config::parse("global\n").unwrap().server_state_file(), None);
    }

    #[test]
    fn bad_server_lines_name_their_line() {
        let e = Config::parse("backend b\n    server\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Config::parse("backend b\n    server s 1.2.3.4:5 weight x\n").unwrap_err();
        assert!(e.message.contains("weight"), "{e}");
    }
}
