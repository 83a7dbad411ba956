//! From the raw `services.yaml` to a checked [`Spec`]: defaults applied, every value validated,
//! every problem reported at once with its file, line, column and field.

use crate::error::{sort_diagnostics, Diagnostic, Error, SourceFile};
use crate::image::{self, ImagePolicy, ImageRef};
use crate::model::*;
use crate::path::FieldPath;
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

/// A checked `services.yaml`.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// The Flotilla daemons' own units, when asked for.
    pub platform: Option<Platform>,
    /// Which image tags count as pinned (a rollout's `--tag` is checked against it too).
    pub policy: ImagePolicy,
}

/// A number of instances, absolute or a percentage of `instances` (Kubernetes-style).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    /// That many instances.
    Count(u32),
    /// That percentage of the service's instances.
    Percent(u32),
}

impl Amount {
    /// The count for `instances`: percentages round down (`max_unavailable`) or up
    /// (`max_surge`), as Kubernetes does.
    pub fn resolve(self, instances: u32, round_up: bool) -> u32 {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => {
                let scaled = u64::from(instances) * u64::from(p);
                let n = if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                n as u32
            }
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How `unitgen rollout` replaces the instances of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutSettings {
    /// How many instances may be down (stopped and not yet replaced) at once. Default 1.
    pub max_unavailable: Amount,
    /// How many extra instances may run beside the old ones at once. Default 0.
    pub max_surge: Amount,
    /// How long one batch may take to become healthy in the registry. Default 5m.
    pub progress_deadline: Millis,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            max_unavailable: Amount::Count(1),
            max_surge: Amount::Count(0),
            progress_deadline: Millis(300_000),
        }
    }
}

/// Host metadata a unit may run on: AND across keys, OR within a key.
pub type MetadataMatch = BTreeMap<String, BTreeSet<String>>;

/// A duration, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

impl Millis {
    /// `15s`, `1500ms`: understood by systemd, Docker (Go) and humantime alike.
    pub fn render(self) -> String {
        if self.0 % 1000 == 0 {
            format!("{}s", self.0 / 1000)
        } else {
            format!("{}ms", self.0)
        }
    }
}

/// One checked service.
#[derive(Clone, Debug)]
pub struct Service {
    /// The key under `services:`; a DNS label. Units are `<name>@<N>.service`.
    pub name: String,
    /// Free text for `Description=`.
    pub description: Option<String>,
    /// The pinned image.
    pub image: ImageRef,
    /// How many instances.
    pub instances: u32,
    /// Published ports.
    pub ports: Vec<Port>,
    /// `-e` variables.
    pub env: BTreeMap<String, String>,
    /// Extra container labels (never `flotilla.*`).
    pub labels: BTreeMap<String, String>,
    /// Arguments after the image.
    pub command: Vec<String>,
    /// `-v` volumes.
    pub volumes: Vec<Volume>,
    /// `--memory`.
    pub memory: Option<String>,
    /// `--cpus`, as written by Rust's shortest float formatting.
    pub cpus: Option<String>,
    /// Docker health check.
    pub health: Option<Health>,
    /// Services whose instance N must run on the same host, before this one's instance N
    /// (`depends_on`, then `sidekick_of`).
    pub depends_on: Vec<String>,
    /// The main service this one is a sidekick of (`BindsTo=` instead of `Requires=`).
    pub sidekick_of: Option<String>,
    /// How presence registers it.
    pub registration: Registration,
    /// Placement rules.
    pub constraints: Constraints,
    /// The host port that makes `max_per_host` 1 when the input did not set it.
    pub max_per_host_from_port: Option<u16>,
    /// `RestartSec=`.
    pub restart_sec: Millis,
    /// `TimeoutStartSec=` (covers the pull).
    pub start_timeout: Millis,
    /// `docker stop -t` seconds.
    pub stop_timeout_secs: u64,
    /// Whether to `docker pull` before starting.
    pub pull: bool,
    /// How `unitgen rollout` replaces instances.
    pub rollout: RolloutSettings,
    /// Where each placement rule was written, for errors.
    pub origins: Origins,
}

/// Where a service's placement-relevant values come from, most specific first.
#[derive(Clone, Debug, Default)]
pub struct Origins {
    /// The service itself.
    pub service: FieldPath,
    /// `instances`.
    pub instances: Vec<FieldPath>,
    /// `constraints.metadata`.
    pub metadata: Vec<FieldPath>,
    /// `constraints.max_per_host` (or the port that implies it).
    pub max_per_host: Vec<FieldPath>,
    /// `constraints.spread`.
    pub spread: Vec<FieldPath>,
    /// `depends_on` (and `sidekick_of`).
    pub depends_on: Vec<FieldPath>,
    /// `ports`.
    pub ports: Vec<FieldPath>,
    /// `health` (the service's, then the default's).
    pub health: Vec<FieldPath>,
    /// `image` / `tag` / `digest`.
    pub image: Vec<FieldPath>,
    /// `rollout` (the service's, then the default's).
    pub rollout: Vec<FieldPath>,
}

/// Placement rules of one service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Constraints {
    /// Host metadata to match.
    pub metadata: MetadataMatch,
    /// At most this many instances per host (1 when a host port is published).
    pub max_per_host: Option<u32>,
    /// Spread instances evenly over the values of this host metadata key.
    pub spread: Option<String>,
}

/// TCP or UDP, spelled as in the registry's records (`tcp`, `udp`).
pub use flotilla_registry::Proto;

/// A published port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Port inside the container.
    pub container: u16,
    /// Fixed host port; `None` lets Docker choose one (presence registers whatever it gets).
    pub host: Option<u16>,
    /// Host address to bind.
    pub ip: Option<IpAddr>,
    /// Protocol.
    pub proto: Proto,
    /// Flotilla service name for this port (`flotilla.service.<container>` label).
    pub service: Option<String>,
}

impl Port {
    /// The `-p` argument: `[ip:][host:]container/proto`.
    pub fn publish_arg(&self) -> String {
        let mut s = String::new();
        if let Some(ip) = self.ip {
            match ip {
                IpAddr::V4(v4) => s.push_str(&format!("{v4}:")),
                IpAddr::V6(v6) => s.push_str(&format!("[{v6}]:")),
            }
            // With an address, Docker needs the host part too (empty = any port).
            if self.host.is_none() {
                s.push(':');
            }
        }
        if let Some(h) = self.host {
            s.push_str(&format!("{h}:"));
        }
        s.push_str(&format!("{}/{}", self.container, self.proto.as_str()));
        s
    }
}

/// A bind mount or named volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// Absolute host path or volume name.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// A Docker health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Shell command (`--health-cmd`).
    pub cmd: String,
    /// `--health-interval`.
    pub interval: Option<Millis>,
    /// `--health-timeout`.
    pub timeout: Option<Millis>,
    /// `--health-start-period`.
    pub start_period: Option<Millis>,
    /// `--health-retries`.
    pub retries: Option<u32>,
}

/// The labels presence reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// `flotilla.service`.
    pub service: String,
    /// `flotilla.tags` (comma-joined).
    pub tags: Vec<String>,
    /// `flotilla.ignore=true`.
    pub ignore: bool,
}

/// The optional `platform:` section.
#[derive(Clone, Debug)]
pub struct Platform {
    /// `EnvironmentFile=-` for both daemons (secrets such as `FLOTILLA_ETCD_PASSWORD`).
    pub environment_file: Option<String>,
    /// fleet format: file that defines `FLOTILLA_NODE` and `FLOTILLA_ADVERTISE_IP` per machine.
    pub node_env_file: String,
    /// presence, when asked for.
    pub presence: Option<Daemon>,
    /// confgen, when asked for.
    pub confgen: Option<Daemon>,
}

/// One Flotilla daemon run as a global unit.
#[derive(Clone, Debug)]
pub struct Daemon {
    /// `presence` or `confgen`.
    pub name: &'static str,
    /// Absolute path of the binary.
    pub binary: String,
    /// Arguments (for presence: after `--node` and `--advertise-ip`, which depend on the host).
    pub args: Vec<String>,
    /// Hosts it runs on.
    pub metadata: MetadataMatch,
    /// Where `metadata` was written.
    pub metadata_origin: FieldPath,
}

/// Limits that keep the output sane.
pub const MAX_INSTANCES: u32 = 1000;

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("built-in regex is valid"))
}

/// A DNS label, as DESIGN.md requires for service and node names: the registry's rule, the one
/// presence and confgen apply.
pub use flotilla_registry::record::is_dns_label;

/// A host metadata key or value (fleet's `MachineMetadata=key=value` has no room for more).
pub fn is_metadata_word(s: &str) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$").is_match(s)
}

fn is_env_key(s: &str) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"^[A-Za-z_][A-Za-z0-9_]{0,254}$").is_match(s)
}

fn is_label_key(s: &str) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,254}[A-Za-z0-9])?$").is_match(s)
}

fn is_volume_name(s: &str) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$").is_match(s)
}

/// Parses `30`, `"30"` (seconds), `"500ms"`, `"1m30s"`, `"2h"`.
pub fn parse_duration(text: &str) -> Result<Millis, String> {
    static R: OnceLock<Regex> = OnceLock::new();
    let part = re(&R, r"^([0-9]+)(ms|s|m|h)");
    let bad = || {
        format!("`{text}` is not a duration: write seconds (`30`) or units ms, s, m, h (`1m30s`, `500ms`)")
    };
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = text.parse().map_err(|_| bad())?;
        return secs.checked_mul(1000).map(Millis).ok_or_else(bad);
    }
    let mut rest = text;
    let mut total: u64 = 0;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let caps = part.captures(rest).ok_or_else(bad)?;
        let n: u64 = caps[1].parse().map_err(|_| bad())?;
        let unit = match &caps[2] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            _ => 3_600_000,
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        rest = &rest[caps[0].len()..];
    }
    Ok(Millis(total))
}

/// Collects diagnostics against one source file.
struct Ctx<'a> {
    src: &'a SourceFile,
    diags: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn err(&mut self, path: &FieldPath, msg: impl Into<String>) {
        self.diags.push(self.src.error(path, msg));
    }
    fn err_first(&mut self, paths: &[FieldPath], msg: impl Into<String>) {
        self.diags.push(self.src.error_at_first(paths, msg));
    }
}

/// Reads and checks `services.yaml`. Syntax and type errors stop at the first one (the YAML
/// parser cannot go on); value errors are all collected.
pub fn load(src: &SourceFile) -> Result<Spec, Error> {
    let raw: RawServicesFile = parse_yaml(src)?;
    let mut ctx = Ctx {
        src,
        diags: control_char_errors(src),
    };
    let spec = build(&mut ctx, raw);
    if ctx.diags.is_empty() {
        Ok(spec)
    } else {
        let mut diags = ctx.diags;
        sort_diagnostics(&mut diags);
        Err(Error::Invalid(diags))
    }
}

/// Deserializes one YAML document, turning serde_norway's error into a located diagnostic.
/// An empty document reads as the type's default.
pub fn parse_yaml<T>(src: &SourceFile) -> Result<T, Error>
where
    T: serde::de::DeserializeOwned + Default,
{
    let is_empty = src
        .text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if is_empty {
        return Ok(T::default());
    }
    serde_norway::from_str(&src.text).map_err(|e| Error::Invalid(vec![src.serde_error(&e)]))
}

/// Every string (key or value) with a control character, newlines and tabs included: nothing
/// from the input may start a new line in a unit file.
pub fn control_char_errors(src: &SourceFile) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if let Ok(value) = serde_norway::from_str::<serde_norway::Value>(&src.text) {
        walk_value(src, &value, &FieldPath::root(), &mut out);
    }
    out
}

fn walk_value(
    src: &SourceFile,
    v: &serde_norway::Value,
    path: &FieldPath,
    out: &mut Vec<Diagnostic>,
) {
    use serde_norway::Value;
    let check = |s: &str, out: &mut Vec<Diagnostic>| {
        if let Err(e) = crate::quote::check_text(s) {
            out.push(src.error(path, format!("value {e}")));
        }
    };
    match v {
        Value::String(s) => check(s, out),
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                walk_value(src, item, &path.index(i), out);
            }
        }
        Value::Mapping(map) => {
            for (k, item) in map {
                let key = match k {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => continue,
                };
                let child = path.key(&key);
                if let Err(e) = crate::quote::check_text(&key) {
                    out.push(src.error(&child, format!("key {e}")));
                }
                walk_value(src, item, &child, out);
            }
        }
        Value::Tagged(t) => walk_value(src, &t.value, path, out),
        _ => {}
    }
}

fn build(ctx: &mut Ctx<'_>, raw: RawServicesFile) -> Spec {
    let policy = build_policy(ctx, raw.image_policy.unwrap_or_default());
    let defaults = raw.defaults.unwrap_or_default();
    check_defaults(ctx, &defaults);
    if let Some(r) = &defaults.rollout {
        build_rollout(ctx, &FieldPath::keys(&["defaults", "rollout"]), r, None);
    }
    let raw_services = raw.services.unwrap_or_default().0;
    let mut services = BTreeMap::new();
    for (name, rs) in &raw_services {
        if let Some(svc) = build_service(ctx, &policy, &defaults, name, rs) {
            services.insert(name.clone(), svc);
        }
    }
    check_dependencies(ctx, &raw_services, &services);
    let platform = raw.platform.map(|p| build_platform(ctx, p));
    Spec {
        services,
        platform,
        policy,
    }
}

fn build_policy(ctx: &mut Ctx<'_>, raw: RawImagePolicy) -> ImagePolicy {
    let base = FieldPath::keys(&["image_policy"]);
    let mut policy = ImagePolicy::default();
    if let Some(tags) = raw.moving_tags {
        for (i, t) in tags.iter().enumerate() {
            if t.trim().is_empty() {
                ctx.err(
                    &base.key("moving_tags").index(i),
                    "a moving tag cannot be empty",
                );
            }
        }
        policy.moving_tags = tags;
    }
    if let Some(p) = raw.tag_pattern {
        match Regex::new(&p) {
            Ok(re) => policy.tag_pattern = Some(re),
            Err(e) => ctx.err(
                &base.key("tag_pattern"),
                format!(
                    "`{p}` is not a valid regular expression: {}",
                    one_line(&e.to_string())
                ),
            ),
        }
    }
    policy
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Checks values in `defaults:` once, so a bad default is reported at its own line rather than
/// once per service.
fn check_defaults(ctx: &mut Ctx<'_>, d: &RawDefaults) {
    let base = FieldPath::keys(&["defaults"]);
    if let Some(f) = &d.flotilla {
        if f.service.is_some() {
            ctx.err(
                &base.key("flotilla").key("service"),
                "a Flotilla service name cannot be a default; set it per service",
            );
        }
        if let Some(tags) = &f.tags {
            check_tags(ctx, &base.key("flotilla").key("tags"), tags);
        }
    }
    if let Some(env) = &d.env {
        check_env(ctx, &base.key("env"), env);
    }
    if let Some(labels) = &d.labels {
        check_labels(ctx, &base.key("labels"), labels);
    }
    if let Some(m) = &d.memory {
        check_memory(ctx, &base.key("memory"), m);
    }
    if let Some(c) = d.cpus {
        check_cpus(ctx, &base.key("cpus"), c);
    }
    if let Some(h) = &d.health {
        build_health(ctx, &base.key("health"), h);
    }
    if let Some(c) = &d.constraints {
        build_constraints_parts(ctx, &base.key("constraints"), c);
    }
    if let Some(i) = d.instances {
        check_instances(ctx, &base.key("instances"), i);
    }
    for (key, v) in [
        ("restart_sec", &d.restart_sec),
        ("start_timeout", &d.start_timeout),
        ("stop_timeout", &d.stop_timeout),
    ] {
        if let Some(v) = v {
            duration_field(ctx, &base.key(key), v, key == "stop_timeout");
        }
    }
}

fn check_instances(ctx: &mut Ctx<'_>, path: &FieldPath, n: u32) {
    if n > MAX_INSTANCES {
        ctx.err(
            path,
            format!("{n} instances is more than the limit of {MAX_INSTANCES}"),
        );
    }
}

fn check_env(ctx: &mut Ctx<'_>, path: &FieldPath, env: &UniqueMap<Scalar>) {
    for k in env.0.keys() {
        if !is_env_key(k) {
            ctx.err(
                &path.key(k),
                format!(
                    "`{k}` is not a valid environment variable name: use [A-Za-z_][A-Za-z0-9_]*"
                ),
            );
        }
    }
}

fn check_labels(ctx: &mut Ctx<'_>, path: &FieldPath, labels: &UniqueMap<Scalar>) {
    for k in labels.0.keys() {
        if k.starts_with("flotilla.") || k == "flotilla" {
            ctx.err(
                &path.key(k),
                format!("label `{k}` is reserved: unitgen writes the flotilla.* labels from the `flotilla:` section"),
            );
        } else if !is_label_key(k) {
            ctx.err(
                &path.key(k),
                format!("`{k}` is not a valid label key: use letters, digits and . _ / -, starting and ending with a letter or digit"),
            );
        }
    }
}

fn check_memory(ctx: &mut Ctx<'_>, path: &FieldPath, m: &Scalar) -> Option<String> {
    static R: OnceLock<Regex> = OnceLock::new();
    let ok = re(&R, r"^[1-9][0-9]{0,15}[bkmgBKMG]?$").is_match(&m.0);
    if ok {
        Some(m.0.clone())
    } else {
        ctx.err(
            path,
            format!("`{}` is not a memory limit: write a number with an optional unit b, k, m or g (`512m`)", m.0),
        );
        None
    }
}

fn check_cpus(ctx: &mut Ctx<'_>, path: &FieldPath, c: f64) -> Option<String> {
    if c.is_finite() && c > 0.0 && c <= 1024.0 {
        Some(format!("{c}"))
    } else {
        ctx.err(
            path,
            format!("cpus must be a number above 0 and at most 1024, got {c}"),
        );
        None
    }
}

fn check_tags(ctx: &mut Ctx<'_>, path: &FieldPath, tags: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, t) in tags.iter().enumerate() {
        if t.is_empty() || t.len() > 128 || t.contains(',') || t.chars().any(char::is_whitespace) {
            ctx.err(
                &path.index(i),
                format!("tag `{t}` is not allowed: 1 to 128 characters, no commas or spaces (presence splits flotilla.tags on commas)"),
            );
        } else if !seen.insert(t.clone()) {
            ctx.err(&path.index(i), format!("tag `{t}` is listed twice"));
        } else {
            out.push(t.clone());
        }
    }
    out
}

fn duration_field(
    ctx: &mut Ctx<'_>,
    path: &FieldPath,
    v: &Scalar,
    whole_seconds: bool,
) -> Option<Millis> {
    match parse_duration(&v.0) {
        Ok(d) if whole_seconds && d.0 % 1000 != 0 => {
            ctx.err(
                path,
                format!(
                    "`{}` must be whole seconds (docker stop -t takes seconds)",
                    v.0
                ),
            );
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            ctx.err(path, e);
            None
        }
    }
}

fn build_health(ctx: &mut Ctx<'_>, path: &FieldPath, h: &RawHealth) -> Option<Health> {
    let cmd = match &h.cmd {
        Some(c) if !c.trim().is_empty() => Some(c.clone()),
        Some(_) => {
            ctx.err(&path.key("cmd"), "the health check command is empty");
            None
        }
        None => {
            ctx.err(
                &path.key("cmd"),
                "a health check needs `cmd:` (run by the container's /bin/sh)",
            );
            None
        }
    };
    let mut dur = |key: &str, v: &Option<Scalar>| match v {
        Some(v) => duration_field(ctx, &path.key(key), v, false).map(Some),
        None => Some(None),
    };
    let interval = dur("interval", &h.interval);
    let timeout = dur("timeout", &h.timeout);
    let start_period = dur("start_period", &h.start_period);
    if h.retries == Some(0) {
        ctx.err(&path.key("retries"), "retries must be at least 1");
    }
    Some(Health {
        cmd: cmd?,
        interval: interval?,
        timeout: timeout?,
        start_period: start_period?,
        retries: h.retries,
    })
}

fn build_metadata(ctx: &mut Ctx<'_>, path: &FieldPath, m: &UniqueMap<OneOrMany>) -> MetadataMatch {
    let mut out = MetadataMatch::new();
    for (k, values) in &m.0 {
        let kp = path.key(k);
        if !is_metadata_word(k) {
            ctx.err(&kp, format!("`{k}` is not a valid metadata key: use [A-Za-z0-9._-], starting with a letter or digit"));
            continue;
        }
        // An empty list means "no requirement on this key" (it removes an inherited one).
        let mut set = BTreeSet::new();
        for (i, v) in values.0.iter().enumerate() {
            if !is_metadata_word(&v.0) {
                let vp = if values.0.len() == 1 {
                    kp.clone()
                } else {
                    kp.index(i)
                };
                ctx.err(&vp, format!("`{}` is not a valid metadata value: use [A-Za-z0-9._-], starting with a letter or digit", v.0));
            }
            set.insert(v.0.clone());
        }
        out.insert(k.clone(), set);
    }
    out
}

/// Checks the parts of a `constraints:` mapping; returns them for merging.
fn build_constraints_parts(
    ctx: &mut Ctx<'_>,
    path: &FieldPath,
    c: &RawConstraints,
) -> (Option<MetadataMatch>, Option<u32>, Option<String>) {
    let metadata = c
        .metadata
        .as_ref()
        .map(|m| build_metadata(ctx, &path.key("metadata"), m));
    if c.max_per_host == Some(0) {
        ctx.err(&path.key("max_per_host"), "max_per_host must be at least 1");
    }
    if let Some(s) = &c.spread {
        if !is_metadata_word(s) {
            ctx.err(
                &path.key("spread"),
                format!("`{s}` is not a valid metadata key to spread over"),
            );
        }
    }
    (metadata, c.max_per_host, c.spread.clone())
}

fn build_service(
    ctx: &mut Ctx<'_>,
    policy: &ImagePolicy,
    d: &RawDefaults,
    name: &str,
    s: &RawService,
) -> Option<Service> {
    let base = FieldPath::keys(&["services", name]);
    let def = FieldPath::keys(&["defaults"]);
    let errors_before = ctx.diags.len();
    if !is_dns_label(name) {
        ctx.err(
            &base,
            format!("service name `{name}` must be a DNS label: lowercase letters, digits and `-`, at most 63, not starting or ending with `-`"),
        );
    }

    let image = build_image(ctx, policy, &base, s);

    let instances = s.instances.or(d.instances).unwrap_or(1);
    if let Some(i) = s.instances {
        check_instances(ctx, &base.key("instances"), i);
    }

    let ports = build_ports(ctx, &base.key("ports"), s.ports.as_deref().unwrap_or(&[]));

    let mut env = BTreeMap::new();
    if let Some(e) = &s.env {
        check_env(ctx, &base.key("env"), e);
    }
    for m in [&d.env, &s.env].into_iter().flatten() {
        env.extend(m.0.iter().map(|(k, v)| (k.clone(), v.0.clone())));
    }
    let mut labels = BTreeMap::new();
    if let Some(l) = &s.labels {
        check_labels(ctx, &base.key("labels"), l);
    }
    for m in [&d.labels, &s.labels].into_iter().flatten() {
        labels.extend(m.0.iter().map(|(k, v)| (k.clone(), v.0.clone())));
    }

    let command: Vec<String> = s.command.iter().flatten().map(|a| a.0.clone()).collect();
    let volumes = build_volumes(
        ctx,
        &base.key("volumes"),
        s.volumes.as_deref().unwrap_or(&[]),
    );

    let (memory, cpus, health) = build_limits(ctx, &base, &def, s, d);

    let depends_on: Vec<String> = s.dependencies().into_iter().map(|(d, ..)| d).collect();

    let registration = build_registration(ctx, &base, name, s, d);
    let (constraints, max_per_host_from_port, max_origin) =
        build_service_constraints(ctx, &base, &def, name, &ports, s, d);
    let (restart_sec, start_timeout, stop_timeout) = build_timeouts(ctx, &base, s, d);

    let origins = Origins {
        service: base.clone(),
        instances: vec![base.key("instances"), def.key("instances"), base.clone()],
        metadata: cons_path(&base, &def, "metadata"),
        max_per_host: max_origin,
        spread: cons_path(&base, &def, "spread"),
        depends_on: vec![base.key("depends_on"), base.key("sidekick_of")],
        ports: vec![base.key("ports")],
        health: vec![base.key("health"), def.key("health")],
        image: vec![base.key("tag"), base.key("image")],
        rollout: vec![base.key("rollout"), def.key("rollout"), base.clone()],
    };
    let rollout = build_service_rollout(ctx, &base, &def, s, d);

    if ctx.diags.len() != errors_before {
        return None;
    }
    Some(Service {
        name: name.to_string(),
        description: s.description.clone(),
        image: image?,
        instances,
        ports,
        env,
        labels,
        command,
        volumes,
        memory,
        cpus,
        health,
        depends_on,
        sidekick_of: s.sidekick_of.clone(),
        registration,
        constraints,
        max_per_host_from_port,
        restart_sec: restart_sec?,
        start_timeout: start_timeout?,
        stop_timeout_secs: stop_timeout?.0 / 1000,
        pull: s.pull.or(d.pull).unwrap_or(true),
        rollout,
        origins,
    })
}

/// `memory`, `cpus` and `health` of a service, each inherited from the defaults.
fn build_limits(
    ctx: &mut Ctx<'_>,
    base: &FieldPath,
    def: &FieldPath,
    s: &RawService,
    d: &RawDefaults,
) -> (Option<String>, Option<String>, Option<Health>) {
    let memory = match (&s.memory, &d.memory) {
        (Some(m), _) => check_memory(ctx, &base.key("memory"), m),
        (None, Some(m)) => Some(m.0.clone()), // checked in check_defaults
        (None, None) => None,
    };
    let cpus = match (s.cpus, d.cpus) {
        (Some(c), _) => check_cpus(ctx, &base.key("cpus"), c),
        (None, Some(c)) => Some(format!("{c}")),
        (None, None) => None,
    };
    let health = match (&s.health, &d.health) {
        (Some(h), _) => build_health(ctx, &base.key("health"), h),
        (None, Some(h)) => {
            // Checked (and reported) in check_defaults; rebuild quietly.
            let mut scratch = Ctx {
                src: ctx.src,
                diags: Vec::new(),
            };
            build_health(&mut scratch, &def.key("health"), h)
        }
        (None, None) => None,
    };
    (memory, cpus, health)
}

/// The registration of service `name`: `flotilla.service`, `flotilla.tags` and
/// `flotilla.ignore`, each inherited from the defaults.
fn build_registration(
    ctx: &mut Ctx<'_>,
    base: &FieldPath,
    name: &str,
    s: &RawService,
    d: &RawDefaults,
) -> Registration {
    let fl = s.flotilla.clone().unwrap_or_default();
    let dfl = d.flotilla.clone().unwrap_or_default();
    let reg_service = match &fl.service {
        Some(n) => {
            if !is_dns_label(n) {
                ctx.err(
                    &base.key("flotilla").key("service"),
                    format!("Flotilla service name `{n}` must be a DNS label (lowercase letters, digits, `-`)"),
                );
            }
            n.clone()
        }
        None => name.to_string(),
    };
    let tags = match (&fl.tags, &dfl.tags) {
        (Some(t), _) => check_tags(ctx, &base.key("flotilla").key("tags"), t),
        (None, Some(t)) => t.clone(),
        (None, None) => Vec::new(),
    };
    Registration {
        service: reg_service,
        tags,
        ignore: fl.ignore.or(dfl.ignore).unwrap_or(false),
    }
}

/// The paths of constraint `key` under the service and under the defaults.
fn cons_path(base: &FieldPath, def: &FieldPath, key: &str) -> Vec<FieldPath> {
    vec![
        base.key("constraints").key(key),
        def.key("constraints").key(key),
    ]
}

/// The constraints of service `name`, each part inherited separately from defaults; also the
/// host port that set max_per_host to 1, if one did, and where max_per_host came from.
fn build_service_constraints(
    ctx: &mut Ctx<'_>,
    base: &FieldPath,
    def: &FieldPath,
    name: &str,
    ports: &[Port],
    s: &RawService,
    d: &RawDefaults,
) -> (Constraints, Option<u16>, Vec<FieldPath>) {
    let (s_meta, s_max, s_spread) = match &s.constraints {
        Some(c) => build_constraints_parts(ctx, &base.key("constraints"), c),
        None => (None, None, None),
    };
    let (d_meta, d_max, d_spread) = match &d.constraints {
        Some(c) => {
            let mut scratch = Ctx {
                src: ctx.src,
                diags: Vec::new(),
            };
            build_constraints_parts(&mut scratch, &def.key("constraints"), c)
        }
        None => (None, None, None),
    };
    let mut max_per_host = s_max.or(d_max);
    let mut max_origin = cons_path(base, def, "max_per_host");
    let mut max_per_host_from_port = None;
    // A fixed host port fits once per host.
    if let Some((i, p)) = ports.iter().enumerate().find(|(_, p)| p.host.is_some()) {
        let host = p.host.unwrap_or_default();
        match max_per_host {
            Some(m) if m > 1 => ctx.err_first(
                &cons_path(base, def, "max_per_host"),
                format!("{name} publishes host port {host}, so only one instance fits on a host; max_per_host {m} cannot hold (drop the host port or set max_per_host: 1)"),
            ),
            Some(_) => {}
            None => {
                max_per_host = Some(1);
                max_per_host_from_port = Some(host);
                max_origin = vec![base.key("ports").index(i)];
            }
        }
    }
    // Metadata merges key by key (the service wins on a shared key), like env and labels.
    // An empty list under the service drops the inherited key.
    let mut metadata = d_meta.unwrap_or_default();
    metadata.extend(s_meta.unwrap_or_default());
    metadata.retain(|_, values| !values.is_empty());
    let constraints = Constraints {
        metadata,
        max_per_host,
        spread: s_spread.or(d_spread),
    };
    (constraints, max_per_host_from_port, max_origin)
}

/// `restart_sec`, `start_timeout` and `stop_timeout` of a service, inherited from the defaults.
fn build_timeouts(
    ctx: &mut Ctx<'_>,
    base: &FieldPath,
    s: &RawService,
    d: &RawDefaults,
) -> (Option<Millis>, Option<Millis>, Option<Millis>) {
    let dur = |ctx: &mut Ctx<'_>,
               key: &str,
               s: &Option<Scalar>,
               d: &Option<Scalar>,
               default: u64|
     -> Option<Millis> {
        let whole = key == "stop_timeout";
        match (s, d) {
            (Some(v), _) => duration_field(ctx, &base.key(key), v, whole),
            (None, Some(v)) => parse_duration(&v.0).ok(),
            (None, None) => Some(Millis(default)),
        }
    };
    let restart_sec = dur(ctx, "restart_sec", &s.restart_sec, &d.restart_sec, 5_000);
    let start_timeout = dur(
        ctx,
        "start_timeout",
        &s.start_timeout,
        &d.start_timeout,
        300_000,
    );
    let stop_timeout = dur(
        ctx,
        "stop_timeout",
        &s.stop_timeout,
        &d.stop_timeout,
        10_000,
    );

    (restart_sec, start_timeout, stop_timeout)
}

/// The rollout settings of a service, inherited from the defaults.
fn build_service_rollout(
    ctx: &mut Ctx<'_>,
    base: &FieldPath,
    def: &FieldPath,
    s: &RawService,
    d: &RawDefaults,
) -> RolloutSettings {
    match (&s.rollout, &d.rollout) {
        (Some(r), dr) => build_rollout(ctx, &base.key("rollout"), r, dr.as_ref()),
        (None, Some(r)) => {
            // Checked (and reported) once in `build`; rebuild quietly.
            let mut scratch = Ctx {
                src: ctx.src,
                diags: Vec::new(),
            };
            build_rollout(&mut scratch, &def.key("rollout"), r, None)
        }
        (None, None) => RolloutSettings::default(),
    }
}

/// Parses `max_unavailable` / `max_surge`: a whole number or a percentage `0%`..`100%`.
pub fn parse_amount(text: &str) -> Result<Amount, String> {
    let t = text.trim();
    if let Some(p) = t.strip_suffix('%') {
        return match p.parse::<u32>() {
            Ok(n) if n <= 100 => Ok(Amount::Percent(n)),
            _ => Err(format!(
                "`{text}` is not a percentage from 0% to 100% (or a whole number of instances)"
            )),
        };
    }
    match t.parse::<u32>() {
        Ok(n) if n <= MAX_INSTANCES => Ok(Amount::Count(n)),
        _ => Err(format!(
            "`{text}` is not a whole number of instances (0 to {MAX_INSTANCES}) or a percentage like `25%`"
        )),
    }
}

/// Builds `rollout:`; a field the service leaves out comes from `defaults.rollout`.
fn build_rollout(
    ctx: &mut Ctx<'_>,
    path: &FieldPath,
    r: &RawRollout,
    inherited: Option<&RawRollout>,
) -> RolloutSettings {
    let mut out = RolloutSettings::default();
    let inherited = inherited.cloned().unwrap_or_default();
    let pick = |own: &Option<Scalar>, def: &Option<Scalar>| -> Option<(bool, String)> {
        match (own, def) {
            (Some(v), _) => Some((true, v.0.clone())),
            (None, Some(v)) => Some((false, v.0.clone())),
            (None, None) => None,
        }
    };
    if let Some((own, v)) = pick(&r.max_unavailable, &inherited.max_unavailable) {
        match parse_amount(&v) {
            Ok(a) => out.max_unavailable = a,
            Err(e) if own => ctx.err(&path.key("max_unavailable"), e),
            Err(_) => {}
        }
    }
    if let Some((own, v)) = pick(&r.max_surge, &inherited.max_surge) {
        match parse_amount(&v) {
            Ok(a) => out.max_surge = a,
            Err(e) if own => ctx.err(&path.key("max_surge"), e),
            Err(_) => {}
        }
    }
    if let Some((own, v)) = pick(&r.progress_deadline, &inherited.progress_deadline) {
        match parse_duration(&v) {
            Ok(Millis(0)) if own => ctx.err(
                &path.key("progress_deadline"),
                "progress_deadline must be longer than 0",
            ),
            Ok(d) => out.progress_deadline = d,
            Err(e) if own => ctx.err(&path.key("progress_deadline"), e),
            Err(_) => {}
        }
    }
    let zero = |a: Amount| matches!(a, Amount::Count(0) | Amount::Percent(0));
    if zero(out.max_unavailable) && zero(out.max_surge) {
        ctx.err(
            path,
            "max_unavailable and max_surge are both 0, so a rollout could never replace an instance; allow at least one",
        );
    }
    out
}

fn build_image(
    ctx: &mut Ctx<'_>,
    policy: &ImagePolicy,
    base: &FieldPath,
    s: &RawService,
) -> Option<ImageRef> {
    let ipath = base.key("image");
    let Some(raw) = &s.image else {
        ctx.err(&ipath, "missing field `image`");
        return None;
    };
    let mut r = match image::parse(raw) {
        Ok(r) => r,
        Err(e) => {
            ctx.err(&ipath, format!("malformed image reference `{raw}`: {e}"));
            return None;
        }
    };
    let mut tag_path = ipath.clone();
    if let Some(tag) = &s.tag {
        let tpath = base.key("tag");
        if let Some(existing) = &r.tag {
            ctx.err(
                &tpath,
                format!(
                    "image `{raw}` already carries tag `{existing}`; give the tag in one place"
                ),
            );
            return None;
        }
        // Validate the tag with the same grammar, through the parser.
        match image::parse(&format!("x:{}", tag.0)) {
            Ok(p) if p.tag.as_deref() == Some(tag.0.as_str()) => r.tag = Some(tag.0.clone()),
            Ok(_) | Err(_) => {
                ctx.err(&tpath, format!("tag `{}` is malformed: a tag is 1 to 128 of [A-Za-z0-9_.-] and does not start with `.` or `-`", tag.0));
                return None;
            }
        }
        tag_path = tpath;
    }
    if let Some(digest) = &s.digest {
        let dpath = base.key("digest");
        if let Some(existing) = &r.digest {
            ctx.err(&dpath, format!("image `{raw}` already carries digest `{existing}`; give the digest in one place"));
            return None;
        }
        match image::parse_digest(digest) {
            Ok(d) => r.digest = Some(d),
            Err(e) => {
                ctx.err(&dpath, e.0);
                return None;
            }
        }
        if r.tag.is_none() {
            tag_path = dpath;
        }
    }
    match policy.check(&r) {
        Ok(()) => Some(r),
        Err(e) => {
            ctx.err(&tag_path, e.to_string());
            None
        }
    }
}

fn parse_port_number(text: &str, what: &str) -> Result<u16, String> {
    match text.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(format!("{what} `{text}` must be a number from 1 to 65535")),
    }
}

/// Parses the short form `[ip:][host:]container[/proto]`.
fn parse_short_port(text: &str) -> Result<Port, String> {
    let (body, proto) = match text.rsplit_once('/') {
        Some((b, p)) => (b, p),
        None => (text, Proto::Tcp.as_str()),
    };
    let proto = parse_proto(proto)?;
    // An IPv6 address is bracketed: [::1]:8080:80
    let (ip, rest) = if let Some(r) = body.strip_prefix('[') {
        let (addr, after) = r
            .split_once(']')
            .ok_or_else(|| format!("port `{text}`: unclosed `[` around an IPv6 address"))?;
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("port `{text}`: `{addr}` is not an IP address"))?;
        let after = after
            .strip_prefix(':')
            .ok_or_else(|| format!("port `{text}`: expected `:` after the address"))?;
        (Some(ip), after)
    } else {
        (None, body)
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (ip, host, container) = match (ip, parts.as_slice()) {
        (None, [c]) => (None, None, *c),
        (None, [h, c]) => (None, Some(*h), *c),
        (None, [a, h, c]) => {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| format!("port `{text}`: `{a}` is not an IP address"))?;
            (Some(ip), Some(*h), *c)
        }
        (Some(ip), [h, c]) => (Some(ip), Some(*h), *c),
        _ => {
            return Err(format!(
            "port `{text}` is malformed: write `80`, `8080:80`, `127.0.0.1:8080:80` or add `/udp`"
        ))
        }
    };
    let host = match host {
        Some("") | None => None,
        Some(h) => Some(parse_port_number(h, "host port")?),
    };
    Ok(Port {
        container: parse_port_number(container, "container port")?,
        host,
        ip,
        proto,
        service: None,
    })
}

fn parse_proto(p: &str) -> Result<Proto, String> {
    Proto::parse(p).ok_or_else(|| format!("protocol `{p}` must be tcp or udp"))
}

fn build_ports(ctx: &mut Ctx<'_>, path: &FieldPath, raw: &[RawPort]) -> Vec<Port> {
    let mut out: Vec<Port> = Vec::new();
    for (i, rp) in raw.iter().enumerate() {
        let pp = path.index(i);
        let port = match rp {
            RawPort::Short(s) => parse_short_port(s).map_err(|e| (pp.clone(), e)),
            RawPort::Long(l) => build_long_port(&pp, l),
        };
        let port = match port {
            Ok(p) => p,
            Err((p, e)) => {
                ctx.err(&p, e);
                continue;
            }
        };
        if out
            .iter()
            .any(|o| o.container == port.container && o.proto == port.proto)
        {
            ctx.err(
                &pp,
                format!(
                    "container port {}/{} is listed twice",
                    port.container,
                    port.proto.as_str()
                ),
            );
            continue;
        }
        if let Some(h) = port.host {
            if out
                .iter()
                .any(|o| o.host == Some(h) && o.proto == port.proto)
            {
                ctx.err(
                    &pp,
                    format!("host port {h}/{} is published twice", port.proto.as_str()),
                );
                continue;
            }
        }
        out.push(port);
    }
    out
}

fn build_long_port(pp: &FieldPath, l: &RawPortLong) -> Result<Port, (FieldPath, String)> {
    let container = match l.container {
        Some(c) => parse_port_number(&c.to_string(), "container port")
            .map_err(|e| (pp.key("container"), e))?,
        None => return Err((pp.key("container"), "a port needs `container:`".into())),
    };
    let host = match l.host {
        Some(h) => {
            Some(parse_port_number(&h.to_string(), "host port").map_err(|e| (pp.key("host"), e))?)
        }
        None => None,
    };
    let ip = match &l.ip {
        Some(a) => Some(
            a.parse::<IpAddr>()
                .map_err(|_| (pp.key("ip"), format!("`{a}` is not an IP address")))?,
        ),
        None => None,
    };
    let proto = parse_proto(l.proto.as_deref().unwrap_or(Proto::Tcp.as_str()))
        .map_err(|e| (pp.key("proto"), e))?;
    if let Some(s) = &l.service {
        if !is_dns_label(s) {
            return Err((pp.key("service"), format!("Flotilla service name `{s}` must be a DNS label (lowercase letters, digits, `-`)")));
        }
    }
    Ok(Port {
        container,
        host,
        ip,
        proto,
        service: l.service.clone(),
    })
}

fn check_path_part(text: &str) -> bool {
    !text.contains(':') && !text.contains(',')
}

fn build_volumes(ctx: &mut Ctx<'_>, path: &FieldPath, raw: &[RawVolume]) -> Vec<Volume> {
    let mut out = Vec::new();
    for (i, rv) in raw.iter().enumerate() {
        let vp = path.index(i);
        let (vol, field) = match rv {
            RawVolume::Short(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                let (src, dst, ro) = match parts.as_slice() {
                    [a, b] => (*a, *b, false),
                    [a, b, "ro"] => (*a, *b, true),
                    [a, b, "rw"] => (*a, *b, false),
                    _ => {
                        ctx.err(&vp, format!("volume `{s}` is malformed: write `/host/path:/container/path` with an optional `:ro`"));
                        continue;
                    }
                };
                (
                    Volume {
                        source: src.into(),
                        target: dst.into(),
                        read_only: ro,
                    },
                    (vp.clone(), vp.clone()),
                )
            }
            RawVolume::Long(l) => {
                let (Some(src), Some(dst)) = (&l.source, &l.target) else {
                    ctx.err(&vp, "a volume needs `source:` and `target:`");
                    continue;
                };
                (
                    Volume {
                        source: src.clone(),
                        target: dst.clone(),
                        read_only: l.read_only.unwrap_or(false),
                    },
                    (vp.key("source"), vp.key("target")),
                )
            }
        };
        let src_ok = check_path_part(&vol.source)
            && ((vol.source.starts_with('/') && vol.source.len() > 1)
                || is_volume_name(&vol.source));
        if !src_ok {
            ctx.err(&field.0, format!("volume source `{}` must be an absolute host path or a volume name, without `:` or `,`", vol.source));
            continue;
        }
        if !(vol.target.starts_with('/') && check_path_part(&vol.target)) {
            ctx.err(
                &field.1,
                format!(
                    "volume target `{}` must be an absolute path without `:` or `,`",
                    vol.target
                ),
            );
            continue;
        }
        out.push(vol);
    }
    out
}

/// `depends_on`: names that exist, no self-reference, no cycle, enough instances.
fn check_dependencies(
    ctx: &mut Ctx<'_>,
    raw: &BTreeMap<String, RawService>,
    built: &BTreeMap<String, Service>,
) {
    for (name, s) in raw {
        let mut seen = BTreeSet::new();
        for (dep, field, index) in s.dependencies() {
            let mut p = FieldPath::keys(&["services", name, &field]);
            if let Some(i) = index {
                p = p.index(i);
            }
            let verb = if field == "sidekick_of" {
                "is a sidekick of"
            } else {
                "depends on"
            };
            if dep == *name {
                ctx.err(&p, format!("{name} cannot depend on itself"));
            } else if !raw.contains_key(&dep) {
                ctx.err(
                    &p,
                    format!("{name} {verb} `{dep}`, which is not a service in this file"),
                );
            } else if !seen.insert(dep.clone()) {
                ctx.err(&p, format!("`{dep}` is listed twice (depends_on and sidekick_of together name each service once)"));
            } else if let (Some(me), Some(other)) = (built.get(name), built.get(&dep)) {
                if other.instances < me.instances {
                    ctx.err(
                        &p,
                        format!(
                            "{name} {verb} {dep}: instance N of {name} runs beside instance N of {dep}, so {dep} needs at least {} instances, it has {}",
                            me.instances, other.instances
                        ),
                    );
                }
            }
        }
    }
    // Cycles: depth-first search in name order, reporting each cycle once at its first member.
    let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 = on stack, 2 = done
    fn visit<'a>(
        n: &'a str,
        raw: &'a BTreeMap<String, RawService>,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
        found: &mut Vec<Vec<String>>,
    ) {
        match state.get(n) {
            Some(2) => return,
            Some(1) => {
                let start = stack.iter().position(|s| *s == n).unwrap_or(0);
                let mut cycle: Vec<String> = stack[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_string());
                found.push(cycle);
                return;
            }
            _ => {}
        }
        state.insert(n, 1);
        stack.push(n);
        if let Some(s) = raw.get(n) {
            for (d, ..) in s.dependencies() {
                if let Some((key, _)) = raw.get_key_value(&d) {
                    if key != n {
                        visit(key, raw, state, stack, found);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n, 2);
    }
    let mut cycles = Vec::new();
    for name in raw.keys() {
        visit(name, raw, &mut state, &mut Vec::new(), &mut cycles);
    }
    for cycle in cycles {
        let field = match raw.get(&cycle[0]) {
            Some(s) if s.depends_on.is_none() => "sidekick_of",
            _ => "depends_on",
        };
        ctx.err(
            &FieldPath::keys(&["services", &cycle[0], field]),
            format!(
                "depends_on/sidekick_of form a cycle: {}",
                cycle.join(" -> ")
            ),
        );
    }
}

fn abs_path(
    ctx: &mut Ctx<'_>,
    path: &FieldPath,
    v: &Option<String>,
    default: Option<&str>,
) -> Option<String> {
    match v {
        Some(p) if p.starts_with('/') && !p.contains(char::is_whitespace) => Some(p.clone()),
        Some(p) => {
            ctx.err(
                path,
                format!("`{p}` must be an absolute path without spaces"),
            );
            None
        }
        None => default.map(str::to_string),
    }
}

fn platform_metadata(
    ctx: &mut Ctx<'_>,
    dp: &FieldPath,
    m: &Option<UniqueMap<OneOrMany>>,
) -> MetadataMatch {
    let mut md = m
        .as_ref()
        .map(|m| build_metadata(ctx, &dp.key("metadata"), m))
        .unwrap_or_default();
    md.retain(|_, values| !values.is_empty());
    md
}

/// What to do instead of a secret on a unit's command line.
const SECRET_HINT: &str = "the units are world-readable; put the password in a file (platform.etcd.password_file: --etcd-password-file, mode 0600) or FLOTILLA_ETCD_PASSWORD=… in platform.environment_file (EnvironmentFile=)";

/// If `arg` would put a secret on a unit's command line, how to show it without its value:
/// a flag (`--etcd-password`, `--api-token=…`) or an assignment (`FLOTILLA_ETCD_PASSWORD=…`)
/// whose name says password, secret, token, API key or credential. Names ending in
/// `-file`/`_file`/`-path` carry a path, not the secret. A bare word is a value: the flag before
/// it is what is refused.
fn secret_arg(arg: &str) -> Option<String> {
    let (name, assigned) = match arg.split_once('=') {
        Some((n, _)) => (n, true),
        None => (arg, false),
    };
    if !name.starts_with('-') && !assigned {
        return None;
    }
    let lower = name.trim_start_matches('-').to_ascii_lowercase();
    if ["-file", "_file", "-path", "_path"]
        .iter()
        .any(|s| lower.ends_with(s))
    {
        return None;
    }
    const WORDS: [&str; 8] = [
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api-key",
        "api_key",
        "credential",
    ];
    WORDS.iter().any(|w| lower.contains(w)).then(|| {
        if assigned {
            format!("{name}=…")
        } else {
            name.to_owned()
        }
    })
}

/// Refuses `args` entries that would write a secret into a unit (naming each, never its value).
fn check_args(ctx: &mut Ctx<'_>, dp: &FieldPath, args: &Option<Vec<Scalar>>) {
    for (i, a) in args.iter().flatten().enumerate() {
        if let Some(shown) = secret_arg(&a.0) {
            ctx.err(
                &dp.key("args").index(i),
                format!("`{shown}` would write a secret into the unit: {SECRET_HINT}"),
            );
        }
    }
}

fn build_platform(ctx: &mut Ctx<'_>, p: RawPlatform) -> Platform {
    let base = FieldPath::keys(&["platform"]);
    let etcd_args = match &p.etcd {
        Some(e) => build_etcd_args(ctx, &base.key("etcd"), e),
        None => Vec::new(),
    };
    let environment_file = abs_path(
        ctx,
        &base.key("environment_file"),
        &p.environment_file,
        None,
    );
    let node_env_file = abs_path(
        ctx,
        &base.key("node_env_file"),
        &p.node_env_file,
        Some("/etc/flotilla/node.env"),
    )
    .unwrap_or_default();

    let presence = p
        .presence
        .map(|r| build_presence(ctx, &base.key("presence"), r, &etcd_args));
    let confgen = p
        .confgen
        .map(|r| build_confgen(ctx, &base.key("confgen"), r, &etcd_args));
    Platform {
        environment_file,
        node_env_file,
        presence,
        confgen,
    }
}

/// The etcd flags both daemons get, from `platform.etcd` (at `ep`).
fn build_etcd_args(ctx: &mut Ctx<'_>, ep: &FieldPath, e: &RawEtcd) -> Vec<String> {
    let mut etcd_args = Vec::new();
    if let Some(list) = &e.endpoints {
        for (i, url) in list.iter().enumerate() {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.len() > 8
                && !url.contains(',')
                && !url.contains(char::is_whitespace);
            if !ok {
                ctx.err(
                    &ep.key("endpoints").index(i),
                    format!("`{url}` is not an etcd endpoint URL (http:// or https://, no commas)"),
                );
            }
        }
        if list.is_empty() {
            ctx.err(
                &ep.key("endpoints"),
                "endpoints is empty; leave it out to use the daemons' default",
            );
        } else {
            etcd_args.push("--etcd-endpoints".to_string());
            etcd_args.push(list.join(","));
        }
    }
    for (key, flag) in [
        ("cacert", "--etcd-cacert"),
        ("cert", "--etcd-cert"),
        ("key", "--etcd-key"),
        ("password_file", "--etcd-password-file"),
    ] {
        let v = match key {
            "cacert" => &e.cacert,
            "cert" => &e.cert,
            "password_file" => &e.password_file,
            _ => &e.key,
        };
        if let Some(path) = abs_path(ctx, &ep.key(key), v, None) {
            etcd_args.push(flag.to_string());
            etcd_args.push(path);
        }
    }
    if let Some(u) = &e.user {
        if u.is_empty() || u.contains(':') {
            ctx.err(
                &ep.key("user"),
                "the etcd user name must be non-empty and have no `:`",
            );
        }
        etcd_args.push("--etcd-user".to_string());
        etcd_args.push(u.clone());
    }
    if let Some(prefix) = &e.prefix {
        static PREFIX: OnceLock<Regex> = OnceLock::new();
        if !re(&PREFIX, r"^(/[A-Za-z0-9._-]+)+$").is_match(prefix) {
            ctx.err(
                &ep.key("prefix"),
                format!("prefix `{prefix}` must look like /seg[/seg...] with segments of [A-Za-z0-9._-] and no trailing slash"),
            );
        }
        etcd_args.push("--prefix".to_string());
        etcd_args.push(prefix.clone());
    }
    etcd_args
}

/// `--metrics-addr` and `--log-format` of a daemon (at `dp`), added to `args`.
fn common_args(
    ctx: &mut Ctx<'_>,
    dp: &FieldPath,
    metrics: &Option<String>,
    log: &Option<String>,
    args: &mut Vec<String>,
) {
    if let Some(m) = metrics {
        if m.parse::<SocketAddr>().is_err() {
            ctx.err(
                &dp.key("metrics_addr"),
                format!("`{m}` is not an address like 127.0.0.1:9100"),
            );
        }
        args.push("--metrics-addr".into());
        args.push(m.clone());
    }
    if let Some(l) = log {
        if l != "text" && l != "json" {
            ctx.err(
                &dp.key("log_format"),
                format!("log_format `{l}` must be text or json"),
            );
        }
        args.push("--log-format".into());
        args.push(l.clone());
    }
}

/// The presence daemon of `platform.presence` (at `dp`).
fn build_presence(
    ctx: &mut Ctx<'_>,
    dp: &FieldPath,
    r: RawPresence,
    etcd_args: &[String],
) -> Daemon {
    let mut args = Vec::new();
    for (key, flag, v) in [("ttl", "--ttl", &r.ttl), ("resync", "--resync", &r.resync)] {
        if let Some(v) = v {
            if let Some(d) = duration_field(ctx, &dp.key(key), v, false) {
                args.push(flag.to_string());
                args.push(d.render());
            }
        }
    }
    if r.explicit == Some(true) {
        args.push("--explicit".into());
    }
    if let Some(h) = &r.docker_host {
        if !(h.starts_with("unix:///") || h.starts_with("tcp://")) {
            ctx.err(
                &dp.key("docker_host"),
                format!("docker_host `{h}` must be unix:///path or tcp://host:port"),
            );
        }
        args.push("--docker-host".into());
        args.push(h.clone());
    }
    let state = abs_path(
        ctx,
        &dp.key("state_file"),
        &r.state_file,
        Some("/var/lib/flotilla/presence.state"),
    );
    if let Some(s) = state {
        args.push("--state-file".into());
        args.push(s);
    }
    common_args(ctx, dp, &r.metrics_addr, &r.log_format, &mut args);
    args.extend(etcd_args.iter().cloned());
    check_args(ctx, dp, &r.args);
    args.extend(r.args.iter().flatten().map(|a| a.0.clone()));
    Daemon {
        name: "presence",
        binary: abs_path(
            ctx,
            &dp.key("binary"),
            &r.binary,
            Some("/usr/local/bin/presence"),
        )
        .unwrap_or_default(),
        args,
        metadata: platform_metadata(ctx, dp, &r.metadata),
        metadata_origin: dp.key("metadata"),
    }
}

/// The confgen daemon of `platform.confgen` (at `dp`).
fn build_confgen(ctx: &mut Ctx<'_>, dp: &FieldPath, r: RawConfgen, etcd_args: &[String]) -> Daemon {
    let mut args = vec!["run".to_string(), "--confdir".to_string()];
    args.push(
        abs_path(
            ctx,
            &dp.key("confdir"),
            &r.confdir,
            Some("/etc/flotilla/confgen"),
        )
        .unwrap_or_default(),
    );
    common_args(ctx, dp, &r.metrics_addr, &r.log_format, &mut args);
    args.extend(etcd_args.iter().cloned());
    check_args(ctx, dp, &r.args);
    args.extend(r.args.iter().flatten().map(|a| a.0.clone()));
    Daemon {
        name: "confgen",
        binary: abs_path(
            ctx,
            &dp.key("binary"),
            &r.binary,
            Some("/usr/local/bin/confgen"),
        )
        .unwrap_or_default(),
        args,
        metadata: platform_metadata(ctx, dp, &r.metadata),
        metadata_origin: dp.key("metadata"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_args() {
        for (arg, shown) in [
            ("--etcd-password", "--etcd-password"),
            ("--etcd-password=x", "--etcd-password=…"),
            ("-password", "-password"),
            ("--api-token=x", "--api-token=…"),
            ("--client-secret", "--client-secret"),
            ("FLOTILLA_ETCD_PASSWORD=x", "FLOTILLA_ETCD_PASSWORD=…"),
            ("AWS_SECRET_ACCESS_KEY=x", "AWS_SECRET_ACCESS_KEY=…"),
        ] {
            assert_eq!(secret_arg(arg).as_deref(), Some(shown), "{arg}");
        }
        for arg in [
            "--etcd-password-file",
            "--etcd-password-file=/etc/pw",
            "TOKEN_PATH=/x",
            "hunter2",
            "tokenish-value",
            "--ttl",
            "--label-filter=a=b",
        ] {
            assert_eq!(secret_arg(arg), None, "{arg}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Millis(30_000)));
        assert_eq!(parse_duration("500ms"), Ok(Millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Millis(90_000)));
        assert_eq!(parse_duration("2h"), Ok(Millis(7_200_000)));
        for bad in ["", "s", "1x", "1.5s", "-1s", "1 s", "99999999999999999999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(Millis(90_000).render(), "90s");
        assert_eq!(Millis(1500).render(), "1500ms");
    }

    #[test]
    fn short_ports() {
        let p = parse_short_port("8080:80").unwrap();
        assert_eq!((p.host, p.container, p.proto), (Some(8080), 80, Proto::Tcp));
        assert_eq!(p.publish_arg(), "8080:80/tcp");
        let p = parse_short_port("53/udp").unwrap();
        assert_eq!(p.publish_arg(), "53/udp");
        let p = parse_short_port("127.0.0.1:8080:80").unwrap();
        assert_eq!(p.publish_arg(), "127.0.0.1:8080:80/tcp");
        let p = parse_short_port("[::1]:8080:80/udp").unwrap();
        assert_eq!(p.publish_arg(), "[::1]:8080:80/udp");
        let p = parse_short_port("127.0.0.1::80").unwrap();
        assert_eq!(p.publish_arg(), "127.0.0.1::80/tcp");
        for bad in [
            "", "0", "65536", "a:80", "80/sctp", "1:2:3:4", "x.y:1:2", "[::1:80",
        ] {
            assert!(parse_short_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(is_dns_label("web"));
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("Web"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a_b"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }

    #[test]
    fn rollout_amounts_round_like_kubernetes() {
        assert_eq!(parse_amount("25%"), Ok(Amount::Percent(25)));
        assert_eq!(parse_amount("3"), Ok(Amount::Count(3)));
        assert!(parse_amount("101%").is_err());
        assert!(parse_amount("-1").is_err());
        assert!(parse_amount("1.5").is_err());
        // max_unavailable rounds down, max_surge up.
        assert_eq!(Amount::Percent(25).resolve(6, false), 1);
        assert_eq!(Amount::Percent(25).resolve(6, true), 2);
        assert_eq!(Amount::Percent(25).resolve(2, false), 0);
        assert_eq!(Amount::Count(2).resolve(6, true), 2);
    }
}
