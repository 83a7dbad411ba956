//! Template resources: `conf.d/*.toml` under `--confdir`, with confd's fields plus quiescence,
//! timeouts and the drop guard.
//!
//! ```toml
//! [template]
//! src = "haproxy.cfg.tmpl"              # under <confdir>/templates/
//! dest = "/etc/haproxy/haproxy.cfg"
//! prefix = "/flotilla"                  # optional; prepended to keys and to getv & co.
//! keys = ["/endpoints", "/config/haproxy"]
//! owner = "root"                         # or uid = 0 / gid = 0
//! mode = "0644"
//! check_cmd = "haproxy -c -f {{src}}"
//! reload_cmd = "proxyctl reload --config /etc/haproxy/haproxy.cfg --master-socket /run/haproxy-master.sock"
//! wait = "50ms:1s"
//! reload_timeout = "30s"
//! max_drop = "50%"
//! drop_grace = "30s"
//! runtime_api = "/run/haproxy/admin.sock"  # HAProxy: server-line changes without a reload
//! runtime_timeout = "2s"
//! ```
//!
//! Unknown fields and bad values are errors naming the file, the field and (for TOML errors) the
//! line and column. Every file is checked and every error reported at once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// Default `reload_timeout` and `check_timeout`.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `max_drop`: half of a template's endpoints.
pub const DEFAULT_MAX_DROP: f64 = 0.5;
/// Default `drop_grace`.
pub const DEFAULT_DROP_GRACE: Duration = Duration::from_secs(30);
/// Default `runtime_timeout`.
pub const DEFAULT_RUNTIME_TIMEOUT: Duration = Duration::from_secs(2);

/// One problem in one resource file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceError {
    /// The resource file.
    pub file: PathBuf,
    /// What is wrong (names the field; TOML errors carry line and column).
    pub message: String,
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

/// Every problem found while loading a confdir.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ResourceError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} error{} in the template resources:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// `wait = "min:max"`: quiescence window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wait {
    /// A batch ends once no change arrived for this long.
    pub min: Duration,
    /// A batch is flushed at the latest this long after its first change.
    pub max: Duration,
}

/// File mode bits from an octal string (`"0644"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

/// A validated resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// Name: the file stem (`haproxy` for `conf.d/haproxy.toml`).
    pub name: String,
    /// The resource file.
    pub file: PathBuf,
    /// Template path (absolute, under `<confdir>/templates`).
    pub src: PathBuf,
    /// Template name relative to the templates directory.
    pub src_name: String,
    /// Destination file (absolute).
    pub dest: PathBuf,
    /// Key prefix prepended to `keys` and to the keys templates read (`""` = none).
    pub prefix: String,
    /// Absolute etcd key prefixes this template depends on (prefix already applied).
    pub keys: Vec<String>,
    /// Owner uid, if set (from `owner` or `uid`).
    pub uid: Option<u32>,
    /// Group gid, if set (from `gid` or the owner's primary group).
    pub gid: Option<u32>,
    /// Mode of the written file; `None` keeps the current file's mode (0644 for a new file).
    pub mode: Option<Mode>,
    /// Check command; `{{src}}` is replaced by the staged file's path.
    pub check_cmd: Option<String>,
    /// Reload command, run once per batch for all resources that share it.
    pub reload_cmd: Option<String>,
    /// Quiescence.
    pub wait: Wait,
    /// Timeout of `check_cmd`.
    pub check_timeout: Duration,
    /// Timeout of `reload_cmd`.
    pub reload_timeout: Duration,
    /// Largest fraction (0..=1) of endpoints a render may remove at once without being held.
    pub max_drop: f64,
    /// How long a larger drop must persist before it is applied.
    pub drop_grace: Duration,
    /// HAProxy's runtime API socket (`stats socket … level admin`): renders that differ from
    /// the destination only in `server` lines are applied through it instead of a reload.
    pub runtime_api: Option<PathBuf>,
    /// Bounds each exchange with the runtime socket, and the wait for a removed server's last
    /// session.
    pub runtime_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    template: Raw,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    src: String,
    dest: PathBuf,
    keys: Vec<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    check_cmd: Option<String>,
    #[serde(default)]
    reload_cmd: Option<String>,
    #[serde(default)]
    wait: Option<Wait>,
    #[serde(default, deserialize_with = "duration")]
    check_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    reload_timeout: Option<Duration>,
    #[serde(default)]
    max_drop: Option<Fraction>,
    #[serde(default, deserialize_with = "duration")]
    drop_grace: Option<Duration>,
    #[serde(default)]
    runtime_api: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration")]
    runtime_timeout: Option<Duration>,
}

/// A share: `"50%"` or a number between 0 and 1.
#[derive(Debug, Clone, Copy)]
struct Fraction(f64);

/// A resource field that is not a duration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{value:?} is not a duration like \"500ms\", \"2s\", \"1m\": {source}")]
pub struct DurationError {
    /// The value as written.
    pub value: String,
    /// humantime's reason.
    #[source]
    pub source: humantime::DurationError,
}

/// A `wait` that confgen cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WaitError {
    /// `min` or `max` is not a duration.
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// `min` or `max` is longer than [`Wait::LONGEST`].
    #[error(
        "{value:?} is too long: a wait is at most {}",
        humantime::format_duration(Wait::LONGEST)
    )]
    TooLong {
        /// The value as written.
        value: String,
    },
    /// `max` is smaller than `min`.
    #[error("{value:?}: max must not be smaller than min")]
    MaxBelowMin {
        /// The whole `wait` as written.
        value: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(s.trim()).map_err(|source| DurationError {
        value: s.to_string(),
        source,
    })
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map(Some).map_err(de::Error::custom)
}

impl<'de> Deserialize<'de> for Wait {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Wait::parse(&s).map_err(de::Error::custom)
    }
}

impl Wait {
    /// Longest `min` or `max` accepted.
    pub const LONGEST: Duration = Duration::from_secs(3600);

    /// Parses `"min:max"` (or `"min"`, meaning max = 4 × min, as consul-template does).
    /// Each value is at most [`Wait::LONGEST`], so `4 × min` and `now + max` cannot overflow.
    pub fn parse(s: &str) -> Result<Wait, WaitError> {
        let bounded = |v: &str| {
            let d = parse_duration(v)?;
            if d > Wait::LONGEST {
                return Err(WaitError::TooLong {
                    value: v.to_string(),
                });
            }
            Ok(d)
        };
        let (min, max) = match s.split_once(':') {
            Some((a, b)) => (bounded(a)?, bounded(b)?),
            None => {
                let min = bounded(s)?;
                (min, min * 4)
            }
        };
        if max < min {
            return Err(WaitError::MaxBelowMin {
                value: s.to_string(),
            });
        }
        Ok(Wait { min, max })
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let digits = s.strip_prefix("0o").unwrap_or(&s);
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o7777 && !digits.is_empty() => Ok(Mode(m)),
            _ => Err(de::Error::custom(format!(
                "{s:?} is not an octal file mode like \"0644\""
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Num(f64),
            Text(String),
        }
        let bad = |v: &dyn fmt::Display| {
            de::Error::custom(format!(
                "{v} is not a share like \"50%\" (0% to 100%) or a number from 0 to 1"
            ))
        };
        let f = match Either::deserialize(d)? {
            Either::Num(n) => n,
            Either::Text(s) => match s.trim().strip_suffix('%') {
                Some(p) => p.trim().parse::<f64>().map_err(|_| bad(&s))? / 100.0,
                None => return Err(bad(&format!("{s:?}"))),
            },
        };
        if !(0.0..=1.0).contains(&f) {
            return Err(bad(&f));
        }
        Ok(Fraction(f))
    }
}

/// Replaces `{{src}}` (also confd's `{{.src}}`) in `cmd` with `path`, shell-quoted.
pub fn substitute_src(cmd: &str, path: &Path) -> String {
    let quoted = shell_quote(&path.to_string_lossy());
    cmd.replace("{{.src}}", &quoted)
        .replace("{{ .src }}", &quoted)
        .replace("{{ src }}", &quoted)
        .replace("{{src}}", &quoted)
}

fn mentions_src(cmd: &str) -> bool {
    ["{{.src}}", "{{ .src }}", "{{ src }}", "{{src}}"]
        .iter()
        .any(|p| cmd.contains(p))
}

/// Single-quotes `s` for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Loads every `conf.d/*.toml` under `confdir`, sorted by name. Reports every error at once.
pub fn load_confdir(confdir: &Path) -> Result<Vec<Resource>, ConfigErrors> {
    let confd = confdir.join("conf.d");
    let entries = match std::fs::read_dir(&confd) {
        Ok(e) => e,
        Err(e) => {
            return Err(ConfigErrors(vec![ResourceError {
                file: confd,
                message: format!("cannot read the resource directory: {e} (--confdir)"),
            }]))
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    let mut errors = Vec::new();
    let mut out = Vec::new();
    if files.is_empty() {
        errors.push(ResourceError {
            file: confd.clone(),
            message: "no *.toml template resources found".into(),
        });
    }
    for file in files {
        match load_resource(confdir, &file) {
            Ok(r) => out.push(r),
            Err(mut e) => errors.append(&mut e),
        }
    }
    // Two resources writing one file would fight over it.
    for (i, a) in out.iter().enumerate() {
        if let Some(b) = out[..i].iter().find(|b| b.dest == a.dest) {
            errors.push(ResourceError {
                file: a.file.clone(),
                message: format!(
                    "field `dest`: {} is also the dest of {}",
                    a.dest.display(),
                    b.file.display()
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Loads and validates one resource file.
pub fn load_resource(confdir: &Path, file: &Path) -> Result<Resource, Vec<ResourceError>> {
    let err = |message: String| ResourceError {
        file: file.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(file).map_err(|e| vec![err(format!("cannot read: {e}"))])?;
    let raw: File = toml::from_str(&text).map_err(|e| vec![err(one_line_toml_error(&text, &e))])?;
    let raw = raw.template;
    let mut errors = Vec::new();
    let mut field = |name: &str, msg: String| errors.push(err(format!("field `{name}`: {msg}")));

    let templates = confdir.join("templates");
    let src_rel = Path::new(&raw.src);
    check_paths(&raw, &templates, &mut field);
    let prefix = raw.prefix.clone().unwrap_or_default();
    let keys = check_keys(&raw, &prefix, &mut field);
    let (uid, gid) = owner(&raw, &mut field);
    check_commands(&raw, &mut field);
    if !errors.is_empty() {
        return Err(errors);
    }
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Resource {
        name,
        file: file.to_owned(),
        src: templates.join(src_rel),
        src_name: raw.src.clone(),
        dest: raw.dest,
        prefix,
        keys,
        uid,
        gid,
        mode: raw.mode,
        check_cmd: raw.check_cmd,
        reload_cmd: raw.reload_cmd,
        wait: raw.wait.unwrap_or_default(),
        check_timeout: raw.check_timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT),
        reload_timeout: raw.reload_timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT),
        max_drop: raw.max_drop.map(|f| f.0).unwrap_or(DEFAULT_MAX_DROP),
        drop_grace: raw.drop_grace.unwrap_or(DEFAULT_DROP_GRACE),
        runtime_api: raw.runtime_api,
        runtime_timeout: raw.runtime_timeout.unwrap_or(DEFAULT_RUNTIME_TIMEOUT),
    })
}

/// Where a resource's problems go: `field(name, message)`.
type Field<'a> = dyn FnMut(&str, String) + 'a;

/// Checks `src` (a file under `templates`) and `dest` (an absolute path in an existing
/// directory).
fn check_paths(raw: &Raw, templates: &Path, field: &mut Field<'_>) {
    let src_rel = Path::new(&raw.src);
    if raw.src.is_empty()
        || src_rel.is_absolute()
        || src_rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        field(
            "src",
            format!(
                "{:?} must be a file name under {}",
                raw.src,
                templates.display()
            ),
        );
    } else if !templates.join(src_rel).is_file() {
        field(
            "src",
            format!("{} does not exist", templates.join(src_rel).display()),
        );
    }
    if !raw.dest.is_absolute() {
        field(
            "dest",
            format!("{} must be an absolute path", raw.dest.display()),
        );
    } else if raw.dest.file_name().is_none() {
        field("dest", format!("{} names no file", raw.dest.display()));
    } else if let Some(dir) = raw.dest.parent() {
        if !dir.is_dir() {
            field(
                "dest",
                format!("directory {} does not exist", dir.display()),
            );
        }
    }
}

/// Checks `prefix` and `keys`; returns the keys with the prefix.
fn check_keys(raw: &Raw, prefix: &str, field: &mut Field<'_>) -> Vec<String> {
    if !prefix.is_empty() && (!prefix.starts_with('/') || prefix.ends_with('/')) {
        field(
            "prefix",
            format!("{prefix:?} must start with '/' and not end with '/' (e.g. \"/flotilla\")"),
        );
    }
    if raw.keys.is_empty() {
        field(
            "keys",
            "must list at least one key prefix (e.g. [\"/flotilla/endpoints\"])".into(),
        );
    }
    let mut keys = Vec::new();
    for (i, k) in raw.keys.iter().enumerate() {
        if !k.starts_with('/') {
            field(&format!("keys[{i}]"), format!("{k:?} must start with '/'"));
        } else {
            keys.push(format!("{prefix}{k}"));
        }
    }
    keys
}

/// The uid and gid of the destination: `uid`/`gid`, or `owner`'s.
fn owner(raw: &Raw, field: &mut Field<'_>) -> (Option<u32>, Option<u32>) {
    let (mut uid, mut gid) = (raw.uid, raw.gid);
    if let Some(owner) = &raw.owner {
        if raw.uid.is_some() {
            field("uid", "give either `owner` or `uid`, not both".into());
        }
        match nix::unistd::User::from_name(owner) {
            Ok(Some(u)) => {
                uid = Some(u.uid.as_raw());
                gid = gid.or(Some(u.gid.as_raw()));
            }
            Ok(None) => field("owner", format!("no such user {owner:?}")),
            Err(e) => field("owner", format!("cannot look up user {owner:?}: {e}")),
        }
    }
    (uid, gid)
}

/// Checks `check_cmd`, `reload_cmd`, `runtime_api` and the timeouts.
fn check_commands(raw: &Raw, field: &mut Field<'_>) {
    for (name, cmd) in [
        ("check_cmd", &raw.check_cmd),
        ("reload_cmd", &raw.reload_cmd),
    ] {
        if let Some(c) = cmd {
            if c.trim().is_empty() {
                field(name, "is empty; leave it out instead".into());
            }
        }
    }
    if let Some(c) = &raw.check_cmd {
        if !mentions_src(c) {
            field(
                "check_cmd",
                format!("{c:?} must check the staged file: put {{{{src}}}} where its path goes"),
            );
        }
    }
    if let Some(sock) = &raw.runtime_api {
        if !sock.is_absolute() {
            field(
                "runtime_api",
                format!("{} must be an absolute path", sock.display()),
            );
        }
        if raw.reload_cmd.is_none() {
            field(
                "runtime_api",
                "needs a reload_cmd: it is the fallback for every change the runtime API cannot \
                 apply"
                    .into(),
            );
        }
    } else if raw.runtime_timeout.is_some() {
        field(
            "runtime_timeout",
            "has no effect without runtime_api".into(),
        );
    }
    for (name, d) in [
        ("check_timeout", raw.check_timeout),
        ("reload_timeout", raw.reload_timeout),
        ("runtime_timeout", raw.runtime_timeout),
    ] {
        if d.is_some_and(|d| d.is_zero()) {
            field(name, "must be greater than 0".into());
        }
    }
}

/// One line for a TOML error: `line L, column C: what`, the place from the error's span (1-based,
/// columns in characters), not from toml's multi-line display text.
fn one_line_toml_error(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("line {line}, column {column}: {what}")
        }
        None => what,
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_errors_are_one_line_placed_by_their_span() {
        let text = "[template]\n# é è\nsrc = \"a\"\nkeys = [1, \"é\", ]]\n";
        let e = toml::from_str::<toml::Value>(text).unwrap_err();
        let line = one_line_toml_error(text, &e);
        assert!(line.starts_with("line 4, column "), "{line}");
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(line_column("ab\néé x", 7), (2, 3));
        assert_eq!(line_column("x", 99), (1, 2));
    }

    fn confdir(resources: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::create_dir(dir.path().join("templates")).unwrap();
        std::fs::write(dir.path().join("templates/a.tmpl"), "x").unwrap();
        for (name, text) in resources {
            let text = text.replace("DIR", &dir.path().display().to_string());
            std::fs::write(dir.path().join("conf.d").join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn loads_a_full_resource() {
        let dir = confdir(&[(
            "a.toml",
            r#"[template]
src = "a.tmpl"
dest = "DIR/out.cfg"
prefix = "/flotilla"
keys = ["/endpoints", "/config/a"]
owner = "root"
mode = "0640"
check_cmd = "test -s {{src}}"
reload_cmd = "true"
wait = "10ms:2s"
reload_timeout = "5s"
max_drop = "80%"
drop_grace = "1m"
runtime_api = "/run/haproxy/admin.sock"
runtime_timeout = "500ms"
"#,
        )]);
        let rs = load_confdir(dir.path()).unwrap();
        let r = &rs[0];
        assert_eq!(r.name, "a");
        assert_eq!(r.keys, vec!["/flotilla/endpoints", "/flotilla/config/a"]);
        assert_eq!((r.uid, r.gid), (Some(0), Some(0)));
        assert_eq!(r.mode, Some(Mode(0o640)));
        assert_eq!(
            r.wait,
            Wait {
                min: Duration::from_millis(10),
                max: Duration::from_secs(2)
            }
        );
        assert_eq!(r.reload_timeout, Duration::from_secs(5));
        assert_eq!(r.check_timeout, DEFAULT_COMMAND_TIMEOUT);
        assert!((r.max_drop - 0.8).abs() < 1e-9);
        assert_eq!(r.drop_grace, Duration::from_secs(60));
        assert_eq!(
            r.runtime_api.as_deref(),
            Some(Path::new("/run/haproxy/admin.sock"))
        );
        assert_eq!(r.runtime_timeout, Duration::from_millis(500));
    }

    #[test]
    fn runtime_api_needs_an_absolute_socket_and_a_reload_cmd() {
        let dir = confdir(&[
            (
                "a.toml",
                "[template]\nsrc = \"a.tmpl\"\ndest = \"DIR/a\"\nkeys = [\"/k\"]\nruntime_api = \"admin.sock\"\nreload_cmd = \"true\"\n",
            ),
            (
                "b.toml",
                "[template]\nsrc = \"a.tmpl\"\ndest = \"DIR/b\"\nkeys = [\"/k\"]\nruntime_api = \"/run/admin.sock\"\n",
            ),
            (
                "c.toml",
                "[template]\nsrc = \"a.tmpl\"\ndest = \"DIR/c\"\nkeys = [\"/k\"]\nruntime_timeout = \"1s\"\n",
            ),
        ]);
        let text = load_confdir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("a.toml: field `runtime_api`: admin.sock must be an absolute path"),
            "{text}"
        );
        assert!(
            text.contains("b.toml: field `runtime_api`: needs a reload_cmd"),
            "{text}"
        );
        assert!(
            text.contains("c.toml: field `runtime_timeout`: has no effect without runtime_api"),
            "{text}"
        );
    }

    #[test]
    fn unknown_field_names_file_field_line_and_column() {
        let dir = confdir(&[(
            "bad.toml",
            "[template]\nsrc = \"a.tmpl\"\ndest = \"DIR/o\"\nkeys = [\"/k\"]\nreload_command = \"x\"\n",
        )]);
        let e = load_confdir(dir.path()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("bad.toml"), "{text}");
        assert!(text.contains("line 5, column 1"), "{text}");
        assert!(text.contains("unknown field `reload_command`"), "{text}");
    }

    #[test]
    fn bad_values_are_reported_with_their_field_and_all_at_once() {
        let dir = confdir(&[
            (
                "a.toml",
                "[template]\nsrc = \"a.tmpl\"\ndest = \"DIR/o\"\nkeys = [\"/k\"]\nmode = \"0999\"\n",
            ),
            (
                "b.toml",
                "[template]\nsrc = \"missing.tmpl\"\ndest = \"relative/o\"\nkeys = [\"k\"]\ncheck_cmd = \"haproxy -c -f /etc/haproxy.cfg\"\n",
            ),
            (
                "c.toml",
                "[template]\nsrc = \"a.tmpl\"\ndest = \"DIR/c\"\nkeys = [\"/k\"]\nwait = \"2s:1s\"\n",
            ),
            (
                "d.toml",
                "[template]\nsrc = \"a.tmpl\"\ndest = \"DIR/d\"\nkeys = [\"/k\"]\nmax_drop = \"150%\"\n",
            ),
        ]);
        let e = load_confdir(dir.path()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("a.toml: line 5, column 8"), "{text}");
        assert!(
            text.contains("\"0999\" is not an octal file mode"),
            "{text}"
        );
        assert!(text.contains("b.toml: field `src`"), "{text}");
        assert!(text.contains("b.toml: field `dest`"), "{text}");
        assert!(text.contains("b.toml: field `keys[0]`"), "{text}");
        assert!(text.contains("b.toml: field `check_cmd`"), "{text}");
        assert!(text.contains("c.toml: line 5"), "{text}");
        assert!(text.contains("max must not be smaller than min"), "{text}");
        assert!(text.contains("d.toml: line 5"), "{text}");
        assert_eq!(e.0.len(), 7, "{text}");
    }

    #[test]
    fn duplicate_dest_is_refused() {
        let r = "[template]\nsrc = \"a.tmpl\"\ndest = \"DIR/same\"\nkeys = [\"/k\"]\n";
        let dir = confdir(&[("a.toml", r), ("b.toml", r)]);
        let text = load_confdir(dir.path()).unwrap_err().to_string();
        assert!(text.contains("b.toml: field `dest`"), "{text}");
    }

    #[test]
    fn src_substitution_quotes_the_path() {
        let p = Path::new("/tmp/it's here/.x.staged");
        assert_eq!(
            substitute_src("haproxy -c -f {{src}} && test -s {{.src}}", p),
            "haproxy -c -f '/tmp/it'\\''s here/.x.staged' && test -s '/tmp/it'\\''s here/.x.staged'"
        );
    }

    #[test]
    fn wait_single_value_means_four_times_max() {
        assert_eq!(
            Wait::parse("100ms").unwrap(),
            Wait {
                min: Duration::from_millis(100),
                max: Duration::from_millis(400)
            }
        );
    }

    #[test]
    fn regression_a_huge_wait_is_an_error_not_an_overflow_panic() {
        // `min * 4` overflowed Duration (a panic) for a wait this long.
        for w in [
            "150000000000y",
            "1s:150000000000y",
            "150000000000y:150000000000y",
        ] {
            let e = Wait::parse(w).expect_err(w);
            assert!(matches!(e, WaitError::TooLong { .. }), "{w}: {e}");
            assert!(e.to_string().ends_with("a wait is at most 1h"), "{w}: {e}");
        }
        assert!(Wait::parse("1h").is_ok());
    }
}
