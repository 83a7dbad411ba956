//! Configuration checks (`haproxy -c`, `nginx -t`) and their messages, parsed into diagnostics
//! with file and line.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;

use crate::Error;

/// How serious a message from a configuration check is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// HAProxy `[ALERT]`, nginx `[emerg]`/`[alert]`/`[crit]`/`[error]`.
    Error,
    /// HAProxy `[WARNING]`, nginx `[warn]`.
    Warning,
    /// HAProxy `[NOTICE]`, nginx `[notice]`/`[info]`.
    Notice,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Notice => "notice",
        })
    }
}

/// One message of a configuration check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// How serious it is.
    pub severity: Severity,
    /// The configuration file the message points at, when it names one.
    pub file: Option<String>,
    /// The line in `file`.
    pub line: Option<u32>,
    /// The message without the location and the process prefix.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: ")?,
            (Some(file), None) => write!(f, "{file}: ")?,
            _ => {}
        }
        write!(f, "{}: {}", self.severity, self.message)
    }
}

/// The result of a configuration check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// `haproxy` or `nginx`.
    pub proxy: &'static str,
    /// The configuration that was checked.
    pub config: PathBuf,
    /// Whether the proxy accepted it.
    pub valid: bool,
    /// Every error, warning and notice the check printed, in order.
    pub diagnostics: Vec<Diagnostic>,
    /// The check's raw output (stdout then stderr), for messages the parser does not know.
    pub output: String,
}

impl CheckReport {
    /// The errors of the report.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }

    /// The warnings of the report.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }

    /// The most useful single line: the first error with a location, else the first error, else
    /// the last non-empty output line.
    pub fn first_error(&self) -> String {
        self.errors()
            .find(|d| d.line.is_some())
            .or_else(|| self.errors().next())
            .map(ToString::to_string)
            .or_else(|| {
                self.output
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| "no message".to_string())
    }
}

/// `Default` (the binary `$name` on `PATH`), `new` and `with_timeout` of a proxy binary type
/// with the fields `binary` and `timeout` (30 s by default); `$timeout_doc` documents
/// `with_timeout`.
macro_rules! proxy_binary {
    ($ty:ident, $name:literal, $timeout_doc:literal) => {
        impl Default for $ty {
            fn default() -> Self {
                $ty::new($name)
            }
        }

        impl $ty {
            /// Uses `binary` (a path, or a name looked up on `PATH`).
            pub fn new(binary: impl Into<PathBuf>) -> Self {
                $ty {
                    binary: binary.into(),
                    timeout: Duration::from_secs(30),
                }
            }

            #[doc = $timeout_doc]
            pub fn with_timeout(mut self, timeout: Duration) -> Self {
                self.timeout = timeout;
                self
            }
        }
    };
}
pub(crate) use proxy_binary;

/// The HAProxy binary: configuration checks. Reloads go through [`crate::MasterSocket`].
#[derive(Debug, Clone)]
pub struct Haproxy {
    binary: PathBuf,
    timeout: Duration,
}

proxy_binary!(
    Haproxy,
    "haproxy",
    "Bounds how long `haproxy -c` may run (default 30 s; a `resolvers` section can make it\n\
     slow)."
);

impl Haproxy {
    /// Runs `haproxy -c -f <config>`. `Ok` means HAProxy accepted it (possibly with warnings);
    /// [`Error::CheckFailed`] carries HAProxy's messages otherwise.
    pub async fn check(&self, config: &Path) -> Result<CheckReport, Error> {
        let check = ConfigCheck {
            proxy: "haproxy",
            what: "haproxy -c",
            flags: ["-c", "-f"],
            parse: parse_haproxy_output,
        };
        check.run(&self.binary, config, self.timeout).await
    }
}

/// How a proxy checks a config file: `<binary> <flags> <config>`.
pub(crate) struct ConfigCheck {
    /// The proxy's name in the report.
    pub proxy: &'static str,
    /// The command as messages name it (`haproxy -c`).
    pub what: &'static str,
    /// The flags before the config's path.
    pub flags: [&'static str; 2],
    /// Reads the proxy's messages.
    pub parse: fn(&str) -> Vec<Diagnostic>,
}

impl ConfigCheck {
    /// Runs the check of `config` with `binary`, for at most `timeout`. `Ok` means the proxy
    /// accepted it (possibly with warnings); [`Error::CheckFailed`] carries its messages
    /// otherwise.
    pub async fn run(
        &self,
        binary: &Path,
        config: &Path,
        timeout: Duration,
    ) -> Result<CheckReport, Error> {
        ensure_readable(config)?;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(self.flags).arg(config);
        let (valid, output) = run_check(binary, &mut cmd, timeout, self.what).await?;
        let report = CheckReport {
            proxy: self.proxy,
            config: config.to_path_buf(),
            valid,
            diagnostics: (self.parse)(&output),
            output,
        };
        if report.valid {
            Ok(report)
        } else {
            Err(Error::CheckFailed {
                report: Box::new(report),
            })
        }
    }
}

/// Fails with [`Error::ConfigMissing`] or [`Error::ConfigUnreadable`] before any proxy is asked,
/// so the operator sees the path rather than the proxy's paraphrase of it.
pub(crate) fn ensure_readable(config: &Path) -> Result<(), Error> {
    match std::fs::metadata(config) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::ConfigMissing {
                path: config.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(Error::ConfigUnreadable {
                path: config.to_path_buf(),
                source,
            })
        }
        // HAProxy accepts a directory (all files in it, in order); nginx does not, and says so.
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => {}
    }
    std::fs::File::open(config)
        .map(drop)
        .map_err(|source| Error::ConfigUnreadable {
            path: config.to_path_buf(),
            source,
        })
}

pub(crate) async fn run_check(
    binary: &Path,
    cmd: &mut tokio::process::Command,
    timeout: Duration,
    what: &str,
) -> Result<(bool, String), Error> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        program: binary.to_path_buf(),
        source,
    })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => {
            return Err(Error::Spawn {
                program: binary.to_path_buf(),
                source,
            })
        }
        Err(_) => {
            return Err(Error::Timeout {
                what: what.to_string(),
                timeout,
            })
        }
    };
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), output))
}

/// Parses HAProxy's startup/check messages, e.g.
/// `[ALERT]    (8290) : config : parsing [h.cfg:9] : unknown keyword 'foo' in 'defaults' section`.
pub fn parse_haproxy_output(output: &str) -> Vec<Diagnostic> {
    output.lines().filter_map(parse_haproxy_line).collect()
}

fn parse_haproxy_line(line: &str) -> Option<Diagnostic> {
    let line = line.trim();
    let rest = line.strip_prefix('[')?;
    let (level, rest) = rest.split_once(']')?;
    let severity = match level {
        "ALERT" | "EMERG" => Severity::Error,
        "WARNING" => Severity::Warning,
        "NOTICE" | "INFO" | "DEBUG" => Severity::Notice,
        _ => return None,
    };
    let mut rest = rest.trim_start();
    // The emitting process: `(8290) :`.
    if let Some(after) = rest.strip_prefix('(') {
        if let Some((pid, after)) = after.split_once(')') {
            if pid.chars().all(|c| c.is_ascii_digit()) {
                rest = after.trim_start();
                rest = rest.strip_prefix(':').unwrap_or(rest).trim_start();
            }
        }
    }
    // HAProxy ≥ 2.4 names the context (`config :`).
    if let Some(after) = rest.strip_prefix("config :") {
        rest = after.trim_start();
    }
    let (file, line_no, message) = match find_location(rest) {
        Some((start, end, file, line_no)) => {
            let before = rest[..start].trim();
            let after = rest[end..].trim_start();
            let after = after.strip_prefix(':').unwrap_or(after).trim();
            // `parsing [f:1] : msg` → `msg`; `Binding [f:10] for frontend fe: msg` keeps its words.
            let message = if before.is_empty() || before == "parsing" {
                after.to_string()
            } else {
                format!("{before} {after}")
            };
            (Some(file), Some(line_no), message)
        }
        None => (None, None, rest.to_string()),
    };
    Some(Diagnostic {
        severity,
        file,
        line: line_no,
        message,
    })
}

/// Finds the first `[file:line]` in `s`: (start, end, file, line).
fn find_location(s: &str) -> Option<(usize, usize, String, u32)> {
    let mut from = 0;
    while let Some(open) = s[from..].find('[').map(|i| i + from) {
        let close = s[open..].find(']').map(|i| i + open)?;
        let inner = &s[open + 1..close];
        if let Some((file, line)) = inner.rsplit_once(':') {
            if !file.is_empty() {
                if let Ok(line) = line.parse::<u32>() {
                    return Some((open, close + 1, file.to_string(), line));
                }
            }
        }
        from = close + 1;
    }
    None
}

/// Parses `nginx -t` messages, e.g.
/// `nginx: [emerg] unknown directive "foo" in /etc/nginx/nginx.conf:3`.
pub fn parse_nginx_output(output: &str) -> Vec<Diagnostic> {
    output.lines().filter_map(parse_nginx_line).collect()
}

fn parse_nginx_line(line: &str) -> Option<Diagnostic> {
    let line = line.trim();
    // Two layouts: `nginx: [emerg] msg` before the error log is open, and the error log's
    // `2026/11/22 07:51:00 [emerg] 21511#21511: msg` once the config names one.
    let rest = match line.strip_prefix("nginx:") {
        Some(rest) => rest.trim_start(),
        None if line.starts_with(|c: char| c.is_ascii_digit()) => &line[line.find('[')?..],
        None => line,
    };
    let rest = rest.strip_prefix('[')?;
    let (level, rest) = rest.split_once(']')?;
    let rest = match rest.trim_start().split_once(": ") {
        Some((pid, after)) if pid.split('#').all(|n| n.parse::<u32>().is_ok()) => after,
        _ => rest,
    };
    let severity = match level {
        "emerg" | "alert" | "crit" | "error" => Severity::Error,
        "warn" => Severity::Warning,
        "notice" | "info" | "debug" => Severity::Notice,
        _ => return None,
    };
    let rest = rest.trim();
    if let Some((message, location)) = rest.rsplit_once(" in ") {
        if let Some((file, line_no)) = location.rsplit_once(':') {
            if let Ok(line_no) = line_no.trim().parse::<u32>() {
                return Some(Diagnostic {
                    severity,
                    file: Some(file.to_string()),
                    line: Some(line_no),
                    message: message.to_string(),
                });
            }
        }
    }
    Some(Diagnostic {
        severity,
        file: None,
        line: None,
        message: rest.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Verbatim output of HAProxy 2.6.12 `haproxy -c` on this project's test configs.
    const HAPROXY_26: &str = "\
[NOTICE]   (8248) : haproxy version is 2.6.12-1+deb12u4
[NOTICE]   (8248) : path to executable is /usr/sbin/haproxy
[ALERT]    (8248) : config : parsing [k.cfg:9] : unknown keyword 'idle-close-on-response' in 'defaults' section; did you mean 'tcp-response' maybe ?
[ALERT]    (8290) : config : [w.cfg:14] : 'server be/s1' : weight of server s1 is not within 0 and 256 (1000)..
[ALERT]    (8248) : config : Error(s) found in configuration file : k.cfg
[WARNING]  (9545) : Loading failure!
[ALERT]    (9545) : Binding [h.cfg:10] for frontend fe: cannot bind socket (Address already in use) for [127.0.0.1:18081]
Configuration file is valid
";

    #[test]
    fn haproxy_messages_keep_file_line_and_text() {
        let d = parse_haproxy_output(HAPROXY_26);
        assert_eq!(d.len(), 7, "{d:#?}");
        assert_eq!(d[0].severity, Severity::Notice);
        assert_eq!(d[2].severity, Severity::Error);
        assert_eq!(d[2].file.as_deref(), Some("k.cfg"));
        assert_eq!(d[2].line, Some(9));
        assert_eq!(
            d[2].to_string(),
            "k.cfg:9: error: unknown keyword 'idle-close-on-response' in 'defaults' section; \
             did you mean 'tcp-response' maybe ?"
        );
        assert_eq!(
            d[3].to_string(),
            "w.cfg:14: error: 'server be/s1' : weight of server s1 is not within 0 and 256 (1000).."
        );
        assert_eq!(d[4].file, None);
        assert_eq!(d[5].severity, Severity::Warning);
        assert_eq!(d[6].line, Some(10));
        assert_eq!(
            d[6].message,
            "Binding for frontend fe: cannot bind socket (Address already in use) for [127.0.0.1:18081]"
        );
    }

    #[test]
    fn first_error_prefers_a_located_one() {
        let report = CheckReport {
            proxy: "haproxy",
            config: "k.cfg".into(),
            valid: false,
            diagnostics: parse_haproxy_output(
                "[ALERT]    (1) : config : Fatal errors found in configuration.\n\
                 [ALERT]    (1) : config : parsing [k.cfg:3] : unknown keyword 'x'\n",
            ),
            output: String::new(),
        };
        assert_eq!(report.first_error(), "k.cfg:3: error: unknown keyword 'x'");
    }

    #[test]
    fn first_error_falls_back_to_raw_output() {
        let report = CheckReport {
            proxy: "haproxy",
            config: "k.cfg".into(),
            valid: false,
            diagnostics: vec![],
            output: "something odd\n\n".into(),
        };
        assert_eq!(report.first_error(), "something odd");
    }

    #[test]
    fn nginx_messages_keep_file_line_and_text() {
        let d = parse_nginx_output(
            "nginx: [emerg] unknown directive \"foo\" in /tmp/n/nginx.conf:3\n\
             nginx: [warn] the \"user\" directive makes sense only if the master process runs with super-user privileges, ignored in /tmp/n/nginx.conf:1\n\
             nginx: configuration file /tmp/n/nginx.conf test failed\n",
        );
        assert_eq!(d.len(), 2, "{d:#?}");
        assert_eq!(
            d[0].to_string(),
            "/tmp/n/nginx.conf:3: error: unknown directive \"foo\""
        );
        assert_eq!(d[1].severity, Severity::Warning);
        assert_eq!(d[1].line, Some(1));

        let d = parse_nginx_output(
            "2026/11/22 07:51:00 [emerg] 21511#21511: unknown directive \"x\" in /tmp/n.conf:9\n",
        );
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(
            d[0].to_string(),
            "/tmp/n.conf:9: error: unknown directive \"x\""
        );
    }
}
