//! proxyctl's readers of what HAProxy (and nginx) print, on arbitrary text: the runtime API's
//! `show stat` CSV and `show servers state`, the master CLI's `show proc`, the configuration
//! reader (`Config::parse`, `server_changes`), the state-file rewrite before a reload, the
//! `haproxy -c` / `nginx -t` message parsers and `BACKEND/SERVER` references.
//!
//! The first byte picks the parser (its value modulo 8; the seeds use the digits `0`–`7`), the
//! rest is its input:
//!
//! | byte | parser | property besides "no panic" |
//! | --- | --- | --- |
//! | `0` | `parse_show_stat` | the rows written back as CSV parse to the same rows |
//! | `1` | `parse_servers_state` | every number is the one in its column of the line (nothing truncated); written back, the dump parses to the same servers |
//! | `2` | `ProcList::parse` | current + old workers are all the workers; it formats and serialises |
//! | `3` | `Config::parse` | written back (tokens re-quoted, same line numbers) it parses to the same configuration; compared with itself it has no server change unless a backend names a server twice |
//! | `4` | `Config::server_changes` on `OLD\n%%\nNEW` | a change the runtime API would apply is one it can apply: plain tokens and an IP address for every new or changed server, same options, added/removed/changed consistent |
//! | `5` | `state::rewrite` on `CONFIG\n%%\nSTATE` | the count matches the lines written, every line is a server of the configuration, and rewriting the result changes nothing |
//! | `6` | `parse_haproxy_output`, `parse_nginx_output` | at most one diagnostic per line; each formats |
//! | `7` | `ServerRef::from_str` | an accepted reference formats back to the input and holds nothing that could end or extend a CLI command |
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use proxyctl::config::{Config, Line};
use proxyctl::{parse_haproxy_output, parse_nginx_output, parse_servers_state, parse_show_stat};
use proxyctl::{ProcList, ServerRef, ServerState, StatKind, StatRow};

/// Separates the two documents of the two-input modes.
const SPLIT: &str = "\n%%\n";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match mode % 8 {
        0 => show_stat(&text),
        1 => servers_state(&text),
        2 => show_proc(&text),
        3 => config(&text),
        4 => {
            let (old, new) = text.split_once(SPLIT).unwrap_or((&text, ""));
            server_changes(old, new);
        }
        5 => {
            let (config, state) = text.split_once(SPLIT).unwrap_or(("", &text));
            state_rewrite(config, state);
        }
        6 => check_output(&text),
        _ => server_ref(&text),
    }
});

// ---- show stat --------------------------------------------------------------------------

fn show_stat(text: &str) {
    let Ok(rows) = parse_show_stat(text) else {
        return;
    };
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(rows.len() < lines, "more rows than lines after the header");
    let again = render_show_stat(&rows);
    let back = parse_show_stat(&again)
        .unwrap_or_else(|e| panic!("rows written back do not parse: {e}\n{again}"));
    assert_eq!(back, rows, "rows written back parse differently:\n{again}");
}

/// `show stat` CSV as HAProxy writes it (only the columns `StatRow` keeps, in another order).
fn render_show_stat(rows: &[StatRow]) -> String {
    let mut out =
        String::from("# pxname,svname,status,scur,stot,type,weight,check_status,lastchg,addr\n");
    for r in rows {
        let kind = match r.kind {
            StatKind::Frontend => "0",
            StatKind::Backend => "1",
            StatKind::Server => "2",
            StatKind::Listener => "3",
        };
        let num = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
        let fields = [
            csv(&r.proxy),
            csv(&r.name),
            csv(&r.status),
            r.current_sessions.to_string(),
            r.total_sessions.to_string(),
            kind.to_string(),
            num(r.weight),
            csv(r.check_status.as_deref().unwrap_or("")),
            num(r.last_change_secs),
            csv(r.addr.as_deref().unwrap_or("")),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// One CSV field, double-quoted (with `""` for a quote) when it holds a comma, a quote or a
/// carriage return.
fn csv(s: &str) -> String {
    if s.contains([',', '"', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

// ---- show servers state -----------------------------------------------------------------

/// The columns `ServerState` reads, in the order the render below writes them.
const STATE_COLUMNS: [&str; 11] = [
    "be_id",
    "be_name",
    "srv_id",
    "srv_name",
    "srv_addr",
    "srv_op_state",
    "srv_admin_state",
    "srv_uweight",
    "srv_iweight",
    "srv_check_state",
    "srv_port",
];

fn servers_state(text: &str) {
    let Ok(servers) = parse_servers_state(text) else {
        return;
    };
    // The header the parser read: the second non-blank line, after its `#`. A name that
    // appears twice is read at its last position.
    let header: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .nth(1)
        .and_then(|h| h.trim().strip_prefix('#'))
        .expect("a dump that parses has a header")
        .split_whitespace()
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .rposition(|c| *c == name)
            .expect("a dump that parses names every column")
    };
    for s in &servers {
        let f: Vec<&str> = s.line.split_whitespace().collect();
        let number = |name: &str| -> u64 {
            f[col(name)]
                .parse()
                .unwrap_or_else(|_| panic!("{name} of {:?} is not a number", s.line))
        };
        let read = [
            ("be_id", u64::from(s.backend_id)),
            ("srv_id", u64::from(s.id)),
            ("srv_op_state", u64::from(s.op_state)),
            ("srv_admin_state", u64::from(s.admin_state)),
            ("srv_uweight", u64::from(s.weight)),
            ("srv_iweight", u64::from(s.initial_weight)),
            ("srv_check_state", u64::from(s.check_state)),
            ("srv_port", u64::from(s.port)),
        ];
        for (name, value) in read {
            assert_eq!(number(name), value, "{name} of {:?} read wrong", s.line);
        }
        assert_eq!(f[col("be_name")], s.backend);
        assert_eq!(f[col("srv_name")], s.name);
        assert_eq!(f[col("srv_addr")], s.addr);
    }
    let again = render_servers_state(&servers);
    let back = parse_servers_state(&again)
        .unwrap_or_else(|e| panic!("the dump written back does not parse: {e}\n{again}"));
    let strip = |v: &[ServerState]| -> Vec<ServerState> {
        v.iter()
            .map(|s| ServerState {
                line: String::new(),
                ..s.clone()
            })
            .collect()
    };
    assert_eq!(strip(&back), strip(&servers), "written back:\n{again}");
}

fn render_servers_state(servers: &[ServerState]) -> String {
    let mut out = format!("1\n# {}\n", STATE_COLUMNS.join(" "));
    for s in servers {
        out.push_str(&format!(
            "{} {} {} {} {} {} {} {} {} {} {}\n",
            s.backend_id,
            s.backend,
            s.id,
            s.name,
            s.addr,
            s.op_state,
            s.admin_state,
            s.weight,
            s.initial_weight,
            s.check_state,
            s.port
        ));
    }
    out
}

// ---- show proc --------------------------------------------------------------------------

fn show_proc(text: &str) {
    let Ok(procs) = ProcList::parse(text) else {
        return;
    };
    assert_eq!(
        procs.current_workers().count() + procs.old_workers().count(),
        procs.workers.len()
    );
    assert!(procs.workers.iter().all(|w| w.kind == "worker"));
    let _ = procs.to_string();
    serde_json::to_string(&procs).expect("a process list serialises");
}

// ---- configuration ----------------------------------------------------------------------

fn config(text: &str) {
    let Ok(c) = Config::parse(text) else {
        return;
    };
    let _ = c.server_state_file();
    for b in c.backends() {
        for s in &b.servers {
            let _ = (s.disabled(), s.checked(), s.effective_weight());
        }
    }

    let again = render_config(&c);
    let back = Config::parse(&again)
        .unwrap_or_else(|e| panic!("the configuration written back does not parse: {e}\n{again}"));
    assert_eq!(unquoted(&back), unquoted(&c), "written back:\n{again}");

    let twice = c.backends().any(|b| {
        let mut seen = BTreeSet::new();
        !b.servers.iter().all(|s| seen.insert(&s.name))
    });
    match c.server_changes(&c) {
        Ok(ch) => assert!(ch.is_empty(), "a configuration differs from itself"),
        Err(e) => assert!(
            twice,
            "a configuration is structurally different from itself: {e}"
        ),
    }
}

/// The configuration with the quoting flags cleared (writing a line back may quote it
/// differently; the tokens are what must survive).
fn unquoted(c: &Config) -> Config {
    let mut c = c.clone();
    let clear = |l: &mut Line| l.quoted = false;
    c.preamble.iter_mut().for_each(clear);
    for s in &mut c.sections {
        clear(&mut s.header);
        s.body.iter_mut().for_each(clear);
        for srv in &mut s.servers {
            srv.plain = false;
        }
    }
    c
}

/// Writes a parsed configuration back, one line per significant line at its own line number
/// (blank lines in between), each token bare or double-quoted.
fn render_config(c: &Config) -> String {
    let mut lines: Vec<(usize, Vec<String>)> = Vec::new();
    let of = |l: &Line| (l.number, l.tokens.clone());
    lines.extend(c.preamble.iter().map(of));
    for s in &c.sections {
        lines.push(of(&s.header));
        lines.extend(s.body.iter().map(of));
        for srv in &s.servers {
            let mut tokens = vec!["server".to_string(), srv.name.clone()];
            tokens.extend(srv.args.iter().cloned());
            lines.push((srv.line, tokens));
        }
    }
    lines.sort_by_key(|(n, _)| *n);
    let mut out = String::new();
    let mut at = 1;
    for (n, tokens) in lines {
        assert!(n >= at, "two lines numbered {n}");
        while at < n {
            out.push('\n');
            at += 1;
        }
        let quoted: Vec<String> = tokens.iter().map(|t| token(t)).collect();
        out.push_str(&quoted.join(" "));
        out.push('\n');
        at += 1;
    }
    out
}

/// A token as the configuration reader reads it back: bare if it has nothing special, else in
/// double quotes with `\` before `"` and `\`.
fn token(t: &str) -> String {
    let bare = !t.is_empty()
        && !t
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '#'));
    if bare {
        t.to_string()
    } else {
        let mut out = String::from("\"");
        for c in t.chars() {
            if matches!(c, '"' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }
}

fn server_changes(old: &str, new: &str) {
    let (Ok(old), Ok(new)) = (Config::parse(old), Config::parse(new)) else {
        return;
    };
    let Ok(ch) = old.server_changes(&new) else {
        return;
    };
    assert_eq!(ch.backends.len(), new.backends().count());
    // Every section header is the same in both, so the backends pair up by position.
    for (b, o) in ch.backends.iter().zip(old.backends()) {
        let mut differs = false;
        for s in &b.servers {
            match b.old.get(&s.name) {
                Some(was) if was.args == s.args => {}
                Some(was) => {
                    differs = true;
                    assert!(s.plain && s.endpoint.is_some(), "{}/{}", b.backend, s.name);
                    assert_eq!(was.options, s.options, "{}/{}", b.backend, s.name);
                }
                None => {
                    differs = true;
                    assert!(s.plain && s.endpoint.is_some(), "{}/{}", b.backend, s.name);
                }
            }
        }
        for gone in b.removed() {
            differs = true;
            assert!(b.old.contains_key(gone));
            assert!(!b.servers.iter().any(|s| &s.name == gone));
        }
        assert_eq!(
            b.changed, differs,
            "backend {}: changed is wrong",
            b.backend
        );
        assert!(b.added().all(|s| !b.old.contains_key(&s.name)));
        let names: BTreeSet<&String> = o.servers.iter().map(|s| &s.name).collect();
        assert_eq!(b.old.len(), names.len());
    }
}

// ---- state file -------------------------------------------------------------------------

fn state_rewrite(config: &str, state: &str) {
    let Ok(config) = Config::parse(config) else {
        return;
    };
    let Ok((out, kept)) = proxyctl::state::rewrite(state, &config) else {
        return;
    };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), kept + 2, "{out:?}");
    assert_eq!(lines[0], "1");
    assert!(lines[1].starts_with('#'));
    let names: BTreeSet<(String, String)> = config
        .backends()
        .flat_map(|b| {
            let be = b.name.clone().unwrap_or_default();
            b.servers.iter().map(move |s| (be.clone(), s.name.clone()))
        })
        .collect();
    let header: Vec<&str> = lines[1]
        .trim_start_matches('#')
        .split_whitespace()
        .collect();
    let col = |n: &str| header.iter().position(|c| *c == n).expect("column");
    for l in &lines[2..] {
        let f: Vec<&str> = l.split_whitespace().collect();
        let key = (
            f[col("be_name")].to_string(),
            f[col("srv_name")].to_string(),
        );
        assert!(
            names.contains(&key),
            "{key:?} is not a server of the configuration"
        );
    }
    let again = proxyctl::state::rewrite(&out, &config).expect("the rewritten state rewrites");
    assert_eq!(again, (out.clone(), kept), "rewriting twice changed it");
}

// ---- check output and references -------------------------------------------------------

fn check_output(text: &str) {
    let lines = text.lines().count();
    for d in parse_haproxy_output(text)
        .iter()
        .chain(&parse_nginx_output(text))
    {
        let shown = d.to_string();
        if let (Some(file), Some(line)) = (&d.file, d.line) {
            assert!(shown.starts_with(&format!("{file}:{line}: ")));
        }
    }
    assert!(parse_haproxy_output(text).len() <= lines);
    assert!(parse_nginx_output(text).len() <= lines);
}

fn server_ref(text: &str) {
    let Ok(r) = text.parse::<ServerRef>() else {
        return;
    };
    assert_eq!(r.to_string(), text);
    assert_eq!(text.matches('/').count(), 1, "{text:?}");
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b)),
        "{text:?} could end or extend a CLI command"
    );
    assert!(ServerRef::new(r.backend.clone(), r.server.clone()).is_ok());
}
