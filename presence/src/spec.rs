//! What a container announces: from its inspect data (labels, env, ports, health) to the
//! endpoints presence registers for it. Pure functions, unit-tested here.
//!
//! Precedence for names, tags, ignore and meta: the `flotilla.*` labels, then `SERVICE_*`
//! labels, then `SERVICE_*` environment variables; a per-port setting beats the container-wide
//! one. A value that would make an invalid record is an error naming the container and the
//! label or variable: the container is skipped as a whole and nothing is written for it.
//!
//! Registrator's rules, followed where a record can express them (docs/PRESENCE.md "Names,
//! tags, ignore" names the Registrator source of each):
//! - a container with more than one candidate port (published ports; exposed ports with
//!   `--network host`; exposed and published with `--internal`) names each port without a
//!   per-port name `<name>-<private port>`, whether the name is the image's or `SERVICE_NAME`
//!   (bridge/bridge.go `add`: `isGroup`, `newService`); `flotilla.service` names every port
//!   as given;
//! - `SERVICE_ID` / `SERVICE_<port>_ID` become meta `service_id` (the instance, and so the
//!   key, stays `<node>-<container12>-<port>`);
//! - every other `SERVICE_<attr>` / `SERVICE_<port>_<attr>` becomes meta `<attr>` lowercased
//!   (bridge/util.go `serviceMetaData`), except `CHECK_*`, Registrator's health checks
//!   (consul/consul.go `buildCheck`): `CHECK_HTTP` (a path) becomes meta `check_path`, the
//!   proxy's HTTP check; `CHECK_TCP` is the proxy's default check and sets nothing; the others
//!   (script, TTL, interval, ...) have no proxy-side equivalent and are not read. An empty value
//!   sets nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use flotilla_registry::record::{
    escaped, is_dns_label, is_host_local, is_instance_char, is_meta_char, is_tag_char, MAX_ITEMS,
    MAX_LABEL, MAX_META_VALUE, MAX_TAG,
};
use flotilla_registry::{labels, Endpoint, Health, Keys, Proto};

/// Largest label or variable value presence reads at all (anything larger is refused).
pub const MAX_VALUE: usize = 4096;

/// The parts of `docker inspect` that decide what a container announces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Full container id (64 hex).
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// `Config.Image` as the user gave it (`nginx:1.25`, `registry:5000/team/app@sha256:…`).
    pub image: String,
    pub labels: HashMap<String, String>,
    /// `Config.Env`, `KEY=VALUE` each.
    pub env: Vec<String>,
    pub running: bool,
    pub paused: bool,
    /// `None` when the container has no HEALTHCHECK.
    pub health: Option<HealthState>,
    /// `HostConfig.NetworkMode` (`default`, `bridge`, `host`, `container:…`, a network name).
    pub network_mode: String,
    /// Published ports: private port → bindings (host IP, host port).
    pub ports: Vec<PortBindings>,
    /// `Config.ExposedPorts`.
    pub exposed: Vec<(u16, Proto)>,
    /// Attached networks: name → container IP (empty string when none).
    pub networks: BTreeMap<String, String>,
    /// `Config.StopSignal` (`SIGQUIT`, `3`, …), if set.
    pub stop_signal: Option<String>,
}

/// One private port and where Docker published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortBindings {
    pub port: u16,
    pub proto: Proto,
    /// (host IP as Docker reports it, host port). Empty when the port is only exposed.
    pub bindings: Vec<(String, u16)>,
}

/// Docker's health state of a container that has a HEALTHCHECK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Starting,
    Healthy,
    Unhealthy,
}

impl ContainerInfo {
    /// The 12-hex short id.
    pub fn short_id(&self) -> &str {
        // By characters: the id comes from the Docker API and is not trusted to be hex.
        match self.id.char_indices().nth(12) {
            Some((end, _)) => &self.id[..end],
            None => &self.id,
        }
    }
}

/// Per-port settings once parsed.
#[derive(Debug, Clone, Default)]
struct PortSettings {
    name: Option<String>,
    tags: Option<Vec<String>>,
    ignore: bool,
    /// Meta of this port: `Some` sets the key, `None` (an empty `SERVICE_<port>_<attr>`)
    /// removes a container-wide value.
    meta: BTreeMap<String, Option<String>>,
}

/// How endpoints are derived; fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct SpecConfig {
    pub node: String,
    pub advertise_ip: IpAddr,
    pub internal: bool,
    pub explicit: bool,
    /// Announce bindings to loopback / link-local addresses (`--allow-loopback`).
    pub allow_loopback: bool,
    pub keys: Keys,
}

/// A published port that is not announced because Docker bound it to a loopback or link-local
/// address only (reachable from this host alone), and `--allow-loopback` is not given.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalBinding {
    /// Private port and protocol.
    pub port: u16,
    pub proto: Proto,
    /// The host address Docker bound (`127.0.0.1`, `::1`, `169.254.…`, `fe80::…`).
    pub host_ip: String,
    pub host_port: u16,
}

impl fmt::Display for LocalBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host_ip.contains(':') {
            write!(f, "[{}]:{}", self.host_ip, self.host_port)
        } else {
            write!(f, "{}:{}", self.host_ip, self.host_port)
        }
    }
}

/// A container whose labels or environment cannot make a valid record. Names the container and
/// the offending label or variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("container {container} ({short_id}): {field}: {reason}")]
pub struct SpecError {
    pub container: String,
    pub short_id: String,
    /// `label flotilla.tags`, `env SERVICE_80_NAME`, `image`, …
    pub field: String,
    pub reason: String,
}

/// Why a running container announces nothing (not an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    NotRunning,
    Paused,
    Ignored,
    HealthNotHealthy,
    NoPorts,
    Unnamed,
    /// Every published port is bound to a loopback or link-local address only.
    LocalOnly,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::NotRunning => "not running",
            SkipReason::Paused => "paused",
            SkipReason::Ignored => "ignored by label or env",
            SkipReason::HealthNotHealthy => "has a HEALTHCHECK and is not healthy",
            SkipReason::NoPorts => "publishes no port",
            SkipReason::Unnamed => "names no service (--explicit)",
            SkipReason::LocalOnly => {
                "publishes ports on loopback or link-local addresses only (--allow-loopback)"
            }
        })
    }
}

/// What presence does with one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Register exactly these endpoints (never empty).
    Register(Vec<Endpoint>),
    /// Register nothing.
    Skip(SkipReason),
}

/// Where a setting came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sourced {
    value: String,
    field: String,
}

/// One meta entry as read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MetaSetting {
    src: Sourced,
    /// From a `SERVICE_*` attribute: an empty value sets nothing (and unsets a weaker one).
    /// A `flotilla.meta.<key>` label must not be empty.
    empty_unsets: bool,
}

/// Container-wide or per-port settings.
#[derive(Debug, Clone, Default)]
struct Settings {
    name: Option<Sourced>,
    tags: Option<Sourced>,
    ignore: Option<Sourced>,
    /// Meta: container-wide from `flotilla.meta.<key>` and `SERVICE_<attr>`, per port from
    /// `SERVICE_<port>_<attr>`.
    meta: BTreeMap<String, MetaSetting>,
}

#[derive(Debug, Default)]
struct Meta {
    general: Settings,
    /// The container-wide name is the label `flotilla.service`: every port gets it as given,
    /// never with Registrator's `-<port>` suffix.
    general_name_verbatim: bool,
    per_port: BTreeMap<u16, Settings>,
    network: Option<Sourced>,
}

/// What a `SERVICE_*` variable sets, by the part after `SERVICE_` (and the port), lowercased
/// as Registrator's bridge/util.go `serviceMetaData` does.
enum Attr {
    Setting(Which),
    /// A meta key (`id` is stored as `service_id`).
    Meta(String),
    /// `check_*` other than `check_http`: Registrator's health-check attributes with no
    /// equivalent here (`check_tcp` is the proxy's default check), not read.
    NotOurs,
}

/// The meta key `SERVICE_CHECK_HTTP` sets: the path the shipped templates health-check.
const CHECK_PATH: &str = "check_path";

fn classify(what: &str) -> Attr {
    match what {
        "name" => Attr::Setting(Which::Name),
        "tags" => Attr::Setting(Which::Tags),
        "ignore" => Attr::Setting(Which::Ignore),
        "id" => Attr::Meta("service_id".to_owned()),
        "check_http" => Attr::Meta(CHECK_PATH.to_owned()),
        w if w.starts_with("check_") => Attr::NotOurs,
        w => Attr::Meta(w.to_owned()),
    }
}

/// Meta keys: what the record accepts.
fn check_meta_key(c: &ContainerInfo, field: &str, key: &str) -> Result<(), SpecError> {
    if key.is_empty() || key.len() > MAX_TAG || !key.chars().all(is_instance_char) {
        return Err(c.err(
            field,
            format!(
                "meta key {} must be 1-{MAX_TAG} characters of [A-Za-z0-9._-]",
                escaped(key)
            ),
        ));
    }
    Ok(())
}

/// A meta value, checked as the record checks it. `None` for an empty `SERVICE_*` attribute.
fn meta_value(c: &ContainerInfo, m: &MetaSetting) -> Result<Option<String>, SpecError> {
    let s = &m.src;
    if s.value.is_empty() && m.empty_unsets {
        return Ok(None);
    }
    if s.value.is_empty() || s.value.len() > MAX_META_VALUE {
        return Err(c.err(
            &s.field,
            format!(
                "value must be 1-{MAX_META_VALUE} bytes, got {}",
                s.value.len()
            ),
        ));
    }
    if let Some(bad) = s.value.chars().find(|ch| !is_meta_char(*ch)) {
        return Err(c.err(
            &s.field,
            format!(
                "{} contains the forbidden character {bad:?} (meta values: printable ASCII without spaces, quotes, backslash, #;$`{{}}<>)",
                escaped(&s.value)
            ),
        ));
    }
    Ok(Some(s.value.clone()))
}

enum Which {
    Name,
    Tags,
    Ignore,
}

impl Settings {
    fn slot(&mut self, which: Which) -> &mut Option<Sourced> {
        match which {
            Which::Name => &mut self.name,
            Which::Tags => &mut self.tags,
            Which::Ignore => &mut self.ignore,
        }
    }
}

impl ContainerInfo {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> SpecError {
        SpecError {
            container: self.name.clone(),
            short_id: self.short_id().to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn parse_port(c: &ContainerInfo, field: &str, s: &str) -> Result<u16, SpecError> {
    let ok = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    match ok.then(|| s.parse::<u32>().ok()).flatten() {
        Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(c.err(
            field,
            format!("{} is not a port number (1-65535)", escaped(s)),
        )),
    }
}

/// Reads the settings. Sources are applied from weakest to strongest so the strongest wins:
/// env `SERVICE_*`, label `SERVICE_*`, label `flotilla.*`.
fn read_meta(c: &ContainerInfo) -> Result<Meta, SpecError> {
    let mut m = Meta::default();
    let mut env: Vec<(&str, &str)> = c
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| k.starts_with(labels::REGISTRATOR_PREFIX))
        .collect();
    env.sort();
    let mut labels: Vec<(&String, &String)> = c.labels.iter().collect();
    labels.sort();

    for (k, v) in &env {
        apply_registrator(c, &mut m, "env", k, v)?;
    }
    for (k, v) in &labels {
        apply_registrator(c, &mut m, "label", k, v)?;
    }
    for (k, v) in &labels {
        apply_flotilla(c, &mut m, k, v)?;
    }
    Ok(m)
}

/// Applies one `SERVICE_*` env entry or label (`kind` says which) to `m`.
///
/// Registrator's bridge/util.go serviceMetaData: the part after `SERVICE_` is lowercased;
/// if it starts with a number and `_`, the rest applies to that private port only,
/// otherwise all of it applies to every port (`SERVICE_DB_NAME` is the attribute `db_name`).
fn apply_registrator(
    c: &ContainerInfo,
    m: &mut Meta,
    kind: &str,
    key: &str,
    value: &str,
) -> Result<(), SpecError> {
    let field = format!("{kind} {key}");
    let Some(rest) = key.strip_prefix(labels::REGISTRATOR_PREFIX) else {
        return Ok(());
    };
    let lower = rest.to_ascii_lowercase();
    let (port, what) = match lower.split_once('_') {
        // Digits that are not a valid port (0, 70000) are an error.
        Some((p, what)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            (Some(parse_port(c, &field, p)?), what)
        }
        _ => (None, lower.as_str()),
    };
    let attr = classify(what);
    if matches!(attr, Attr::NotOurs) {
        return Ok(());
    }
    check_size(c, &field, value)?;
    let settings = match port {
        Some(p) => m.per_port.entry(p).or_default(),
        None => &mut m.general,
    };
    let sourced = Sourced {
        value: value.to_owned(),
        field,
    };
    match attr {
        Attr::Setting(which) => *settings.slot(which) = Some(sourced),
        Attr::Meta(meta_key) => {
            if !value.is_empty() {
                check_meta_key(c, &sourced.field, &meta_key)?;
            }
            if meta_key == CHECK_PATH && !value.is_empty() && !value.starts_with('/') {
                return Err(c.err(
                    &sourced.field,
                    format!(
                        "{} must be a path starting with '/' (Registrator's SERVICE_CHECK_HTTP \
                         is the path of an HTTP check, e.g. /health)",
                        escaped(value)
                    ),
                ));
            }
            settings.meta.insert(
                meta_key,
                MetaSetting {
                    src: sourced,
                    empty_unsets: true,
                },
            );
        }
        Attr::NotOurs => {}
    }
    Ok(())
}

/// Applies one `flotilla.*` label to `m` (other labels are left alone).
fn apply_flotilla(c: &ContainerInfo, m: &mut Meta, k: &str, v: &str) -> Result<(), SpecError> {
    let Some(rest) = k.strip_prefix(labels::PREFIX) else {
        return Ok(());
    };
    let field = format!("label {k}");
    check_size(c, &field, v)?;
    let sourced = Sourced {
        value: v.to_owned(),
        field: field.clone(),
    };
    let (head, port) = match rest.split_once('.') {
        Some((head, tail)) => (head, Some(tail)),
        None => (rest, None),
    };
    match (head, port) {
        (labels::SERVICE, None) => {
            m.general.name = Some(sourced);
            m.general_name_verbatim = true;
        }
        (labels::TAGS, None) => m.general.tags = Some(sourced),
        (labels::IGNORE, None) => m.general.ignore = Some(sourced),
        (labels::NETWORK, None) => m.network = Some(sourced),
        (labels::SERVICE | labels::TAGS | labels::IGNORE, Some(p)) => {
            let p = parse_port(c, &field, p)?;
            let s = m.per_port.entry(p).or_default();
            let which = match head {
                labels::SERVICE => Which::Name,
                labels::TAGS => Which::Tags,
                _ => Which::Ignore,
            };
            *s.slot(which) = Some(sourced);
        }
        (labels::META, Some(key)) => {
            check_meta_key(c, &field, key)?;
            m.general.meta.insert(
                key.to_owned(),
                MetaSetting {
                    src: sourced,
                    empty_unsets: false,
                },
            );
        }
        // Unknown flotilla.* labels are left alone (forward compatibility).
        _ => {}
    }
    Ok(())
}

fn check_size(c: &ContainerInfo, field: &str, v: &str) -> Result<(), SpecError> {
    if v.len() > MAX_VALUE {
        Err(c.err(
            field,
            format!("value is {} bytes, limit {MAX_VALUE}", v.len()),
        ))
    } else {
        Ok(())
    }
}

fn parse_bool(c: &ContainerInfo, s: &Sourced) -> Result<bool, SpecError> {
    match s.value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(c.err(
            &s.field,
            format!(
                "{} is not a boolean (true/false, yes/no, on/off, 1/0)",
                escaped(&s.value)
            ),
        )),
    }
}

fn parse_name(c: &ContainerInfo, s: &Sourced) -> Result<String, SpecError> {
    if is_dns_label(&s.value) {
        Ok(s.value.clone())
    } else {
        let why = if s.value.len() > MAX_LABEL {
            format!("is {} bytes, limit {MAX_LABEL}", s.value.len())
        } else {
            format!(
                "{} is not a DNS label (lowercase letters, digits, '-', 1-{MAX_LABEL} chars)",
                escaped(&s.value)
            )
        };
        Err(c.err(&s.field, why))
    }
}

fn parse_tags(c: &ContainerInfo, s: &Sourced) -> Result<Vec<String>, SpecError> {
    // Only spaces around commas are trimmed: a newline or tab is never silently dropped.
    let tags: Vec<String> = s
        .value
        .split(',')
        .map(|t| t.trim_matches(' '))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    if tags.len() > MAX_ITEMS {
        return Err(c.err(&s.field, format!("{} tags, limit {MAX_ITEMS}", tags.len())));
    }
    for t in &tags {
        if t.len() > MAX_TAG {
            return Err(c.err(
                &s.field,
                format!("tag {} is {} bytes, limit {MAX_TAG}", escaped(t), t.len()),
            ));
        }
        if let Some(bad) = t.chars().find(|ch| !is_tag_char(*ch)) {
            return Err(c.err(
                &s.field,
                format!(
                    "tag {} contains the forbidden character {bad:?} (allowed: [A-Za-z0-9._:/=+@-])",
                    escaped(t)
                ),
            ));
        }
    }
    Ok(tags)
}

/// The service name derived from an image reference: the repository's last path component,
/// without registry host, tag or digest, lowercased, with `_` and `.` turned into `-`.
/// `None` if that is not a DNS label (or the reference is empty).
pub fn default_service_name(image: &str) -> Option<String> {
    let no_digest = image.split('@').next().unwrap_or_default();
    let base = no_digest.rsplit('/').next().unwrap_or_default();
    // A ':' left in the last component separates the tag (a registry port lives in an
    // earlier component, which is gone by now).
    let repo = base.split(':').next().unwrap_or_default();
    let name: String = repo
        .chars()
        .map(|ch| match ch {
            '_' | '.' => '-',
            other => other.to_ascii_lowercase(),
        })
        .collect();
    let name = name.trim_matches('-');
    let mut collapsed = String::with_capacity(name.len());
    for ch in name.chars() {
        if ch == '-' && collapsed.ends_with('-') {
            continue;
        }
        collapsed.push(ch);
    }
    is_dns_label(&collapsed).then_some(collapsed)
}

fn is_unspecified_host(ip: &str) -> bool {
    ip.is_empty() || ip.parse::<IpAddr>().is_ok_and(|a| a.is_unspecified())
}

/// Where a published private port is reached.
#[derive(Debug, PartialEq, Eq)]
enum Pick {
    /// At this (host, port).
    At(String, u16),
    /// Only at this loopback or link-local (host, port): not announced.
    LocalOnly(String, u16),
    /// Not published.
    Nowhere,
}

fn is_local_host(ip: &str) -> bool {
    ip.parse::<IpAddr>().is_ok_and(is_host_local)
}

/// Picks one (host, port) for a published private port. Docker 20.10+ lists each binding twice
/// (`0.0.0.0` and `::`): one endpoint per port. A binding to the unspecified address is reached
/// at `--advertise-ip`; a binding to one specific address is reached only there, so that
/// address is registered. A loopback or link-local address reaches this host only: such a
/// binding is used only with `allow_local` (and another binding of the port is preferred).
fn pick_binding(bindings: &[(String, u16)], advertise: IpAddr, allow_local: bool) -> Pick {
    let usable: Vec<&(String, u16)> = bindings.iter().filter(|(_, p)| *p != 0).collect();
    let advertised = usable
        .iter()
        .find(|(ip, _)| is_unspecified_host(ip) || ip.parse::<IpAddr>().ok() == Some(advertise));
    if let Some((_, port)) = advertised {
        return Pick::At(advertise.to_string(), *port);
    }
    if let Some((ip, port)) = usable.iter().find(|(ip, _)| !is_local_host(ip)) {
        return Pick::At(ip.clone(), *port);
    }
    match usable.first() {
        Some((ip, port)) if allow_local => Pick::At(ip.clone(), *port),
        Some((ip, port)) => Pick::LocalOnly(ip.clone(), *port),
        None => Pick::Nowhere,
    }
}

/// Decides what `c` announces (the tests' shorthand for [`decide_noting`]).
#[cfg(test)]
pub fn decide(c: &ContainerInfo, cfg: &SpecConfig) -> Result<Decision, SpecError> {
    decide_noting(c, cfg).map(|(d, _)| d)
}

/// Like [`decide`], and also returns the ports of a container that would announce something
/// that are left out because they are bound to loopback or link-local addresses only.
pub fn decide_noting(
    c: &ContainerInfo,
    cfg: &SpecConfig,
) -> Result<(Decision, Vec<LocalBinding>), SpecError> {
    let mut local = Vec::new();
    let d = decide_inner(c, cfg, &mut local)?;
    Ok((d, local))
}

fn decide_inner(
    c: &ContainerInfo,
    cfg: &SpecConfig,
    local: &mut Vec<LocalBinding>,
) -> Result<Decision, SpecError> {
    if !c.running {
        return Ok(Decision::Skip(SkipReason::NotRunning));
    }
    if c.paused {
        return Ok(Decision::Skip(SkipReason::Paused));
    }
    let meta = read_meta(c)?;
    let parsed = parse_settings(c, &meta)?;
    let default_name = default_name(c, cfg, &parsed)?;

    if parsed.ignore_all {
        return Ok(Decision::Skip(SkipReason::Ignored));
    }
    if matches!(c.health, Some(h) if h != HealthState::Healthy) {
        return Ok(Decision::Skip(SkipReason::HealthNotHealthy));
    }

    let (targets, candidates) = targets(c, cfg, &meta, local)?;
    let group = candidates.len() > 1;
    // Only ports that would be announced are reported as left out.
    local.retain(|b| {
        let (name, ignore) = parsed
            .per_port
            .get(&b.port)
            .map_or((None, false), |s| (s.name.as_ref(), s.ignore));
        !ignore && (name.is_some() || parsed.general_name.is_some() || default_name.is_some())
    });
    local.sort();
    local.dedup_by(|a, b| a.port == b.port && a.proto == b.proto);
    if targets.is_empty() {
        return Ok(Decision::Skip(if local.is_empty() {
            SkipReason::NoPorts
        } else {
            SkipReason::LocalOnly
        }));
    }

    let naming = Naming {
        meta: &meta,
        parsed: &parsed,
        default_name: default_name.as_ref(),
        group,
        ports: candidates.len(),
    };
    let mut endpoints = Vec::new();
    for target in targets {
        if let Some(ep) = endpoint(c, cfg, &naming, target)? {
            endpoints.push(ep);
        }
    }
    if endpoints.is_empty() {
        let reason = if cfg.explicit {
            SkipReason::Unnamed
        } else {
            SkipReason::Ignored
        };
        return Ok(Decision::Skip(reason));
    }
    Ok(Decision::Register(endpoints))
}

/// The settings of a container, every one parsed and validated.
struct Parsed {
    /// The container-wide service name.
    general_name: Option<String>,
    /// The container-wide tags.
    general_tags: Vec<String>,
    /// The container is ignored as a whole.
    ignore_all: bool,
    /// The settings of single private ports.
    per_port: BTreeMap<u16, PortSettings>,
    /// The container-wide meta entries.
    meta_map: BTreeMap<String, String>,
    /// The container's name, when it is a valid meta value (`container_name`).
    container_name: Option<String>,
}

/// Parses every setting of `meta`, also of ports that are not published, so a bad value is
/// always reported (and never half-applied).
fn parse_settings(c: &ContainerInfo, meta: &Meta) -> Result<Parsed, SpecError> {
    let general_name = meta
        .general
        .name
        .as_ref()
        .map(|s| parse_name(c, s))
        .transpose()?;
    let general_tags = meta
        .general
        .tags
        .as_ref()
        .map(|s| parse_tags(c, s))
        .transpose()?
        .unwrap_or_default();
    let ignore_all = match &meta.general.ignore {
        Some(s) => parse_bool(c, s)?,
        None => false,
    };
    let mut per_port: BTreeMap<u16, PortSettings> = BTreeMap::new();
    for (port, s) in &meta.per_port {
        let mut port_meta = BTreeMap::new();
        for (k, m) in &s.meta {
            port_meta.insert(k.clone(), meta_value(c, m)?);
        }
        let settings = PortSettings {
            name: s.name.as_ref().map(|v| parse_name(c, v)).transpose()?,
            tags: s.tags.as_ref().map(|v| parse_tags(c, v)).transpose()?,
            ignore: match &s.ignore {
                Some(v) => parse_bool(c, v)?,
                None => false,
            },
            meta: port_meta,
        };
        per_port.insert(*port, settings);
    }
    let mut meta_map = BTreeMap::new();
    for (k, m) in &meta.general.meta {
        if let Some(v) = meta_value(c, m)? {
            meta_map.insert(k.clone(), v);
        }
    }
    let container_name =
        (!c.name.is_empty() && c.name.len() <= MAX_META_VALUE && c.name.chars().all(is_meta_char))
            .then(|| c.name.clone());
    Ok(Parsed {
        general_name,
        general_tags,
        ignore_all,
        per_port,
        meta_map,
        container_name,
    })
}

/// The service name derived from the image (none with `--explicit`); an error when there is
/// neither that nor a container-wide name.
fn default_name(
    c: &ContainerInfo,
    cfg: &SpecConfig,
    parsed: &Parsed,
) -> Result<Option<String>, SpecError> {
    if cfg.explicit {
        return Ok(None);
    }
    match default_service_name(&c.image) {
        Some(n) => Ok(Some(n)),
        None if parsed.general_name.is_none() => Err(c.err(
            "image",
            format!(
                "cannot derive a service name (a DNS label) from image {}; set the label flotilla.service",
                escaped(&c.image)
            ),
        )),
        None => Ok(None),
    }
}

/// Where one private port is reached: (private port, proto, host, host port).
type Target = (u16, Proto, String, u16);

/// A private port and its protocol.
type PortProto = (u16, Proto);

/// The ports to announce, sorted and one per (private port, proto), and the ports Registrator
/// would register (bridge/bridge.go `add`: `servicePorts`), counted before ignore, naming and
/// (here) the loopback rule: more than one makes a group, whose ports are named
/// `<name>-<private port>`. Ports bound to local addresses only are added to `local`.
fn targets(
    c: &ContainerInfo,
    cfg: &SpecConfig,
    meta: &Meta,
    local: &mut Vec<LocalBinding>,
) -> Result<(Vec<Target>, Vec<PortProto>), SpecError> {
    let host_mode = c.network_mode == "host";
    let mut targets: Vec<Target> = Vec::new();
    let mut candidates: Vec<(u16, Proto)> = Vec::new();
    if host_mode {
        for (port, proto) in &c.exposed {
            targets.push((*port, *proto, cfg.advertise_ip.to_string(), *port));
            candidates.push((*port, *proto));
        }
    } else if cfg.internal {
        internal_targets(c, cfg, meta, local, &mut targets, &mut candidates)?;
    } else {
        for p in &c.ports {
            let pick = pick_binding(&p.bindings, cfg.advertise_ip, cfg.allow_loopback);
            if pick != Pick::Nowhere {
                candidates.push((p.port, p.proto));
            }
            match pick {
                Pick::At(host, host_port) => targets.push((p.port, p.proto, host, host_port)),
                Pick::LocalOnly(host_ip, host_port) => local.push(LocalBinding {
                    port: p.port,
                    proto: p.proto,
                    host_ip,
                    host_port,
                }),
                Pick::Nowhere => {}
            }
        }
    }
    targets.sort();
    targets.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    candidates.sort();
    candidates.dedup();
    Ok((targets, candidates))
}

/// [`targets`] with `--internal`: every exposed or published port at the container's address
/// on its network (the one `flotilla.network` names, else the first with an address).
fn internal_targets(
    c: &ContainerInfo,
    cfg: &SpecConfig,
    meta: &Meta,
    local: &mut Vec<LocalBinding>,
    targets: &mut Vec<Target>,
    candidates: &mut Vec<(u16, Proto)>,
) -> Result<(), SpecError> {
    let ip = match &meta.network {
        Some(s) => match c.networks.get(&s.value) {
            Some(ip) => ip.clone(),
            None => {
                return Err(c.err(
                    &s.field,
                    format!(
                        "the container is not attached to network {} (attached: {})",
                        escaped(&s.value),
                        c.networks.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
        },
        None => c
            .networks
            .values()
            .find(|ip| !ip.is_empty())
            .cloned()
            .unwrap_or_default(),
    };
    if ip.is_empty() {
        return Ok(());
    }
    let mut ports: Vec<(u16, Proto)> = c.exposed.clone();
    ports.extend(c.ports.iter().map(|p| (p.port, p.proto)));
    ports.sort();
    ports.dedup();
    candidates.extend(ports.iter().copied());
    let local_ip = is_local_host(&ip) && !cfg.allow_loopback;
    for (port, proto) in ports {
        if local_ip {
            local.push(LocalBinding {
                port,
                proto,
                host_ip: ip.clone(),
                host_port: port,
            });
        } else {
            targets.push((port, proto, ip.clone(), port));
        }
    }
    Ok(())
}

/// What names the endpoints of one container.
struct Naming<'a> {
    meta: &'a Meta,
    parsed: &'a Parsed,
    default_name: Option<&'a String>,
    /// The container has more than one port Registrator would register.
    group: bool,
    /// How many such ports.
    ports: usize,
}

/// The endpoint of one target, validated; `None` when the port is ignored or has no name.
fn endpoint(
    c: &ContainerInfo,
    cfg: &SpecConfig,
    naming: &Naming<'_>,
    (port, proto, host, host_port): Target,
) -> Result<Option<Endpoint>, SpecError> {
    let parsed = naming.parsed;
    let no_settings = PortSettings::default();
    let settings = parsed.per_port.get(&port).unwrap_or(&no_settings);
    if settings.ignore {
        return Ok(None);
    }
    let Some(service) = service_name(c, naming, settings, port)? else {
        return Ok(None);
    };
    let mut ep_meta = parsed.meta_map.clone();
    for (k, v) in &settings.meta {
        match v {
            Some(v) => ep_meta.insert(k.clone(), v.clone()),
            None => ep_meta.remove(k),
        };
    }
    if let Some(n) = &parsed.container_name {
        ep_meta
            .entry("container_name".to_owned())
            .or_insert_with(|| n.clone());
    }
    let health = if c.health.is_some() {
        Health::Healthy
    } else {
        Health::None
    };
    let suffix = if proto == Proto::Udp { "-udp" } else { "" };
    let ep = Endpoint {
        service,
        instance: format!("{}-{}-{port}{suffix}", cfg.node, c.short_id()),
        node: cfg.node.clone(),
        host,
        port: host_port,
        proto,
        container: c.short_id().to_owned(),
        image: c.image.clone(),
        tags: settings
            .tags
            .clone()
            .unwrap_or_else(|| parsed.general_tags.clone()),
        meta: ep_meta,
        health,
        registered_at: flotilla_registry::record::now_rfc3339(),
    };
    let key = ep.key(&cfg.keys);
    if let Err(e) = ep.validate(&key) {
        let field = match e.field.as_str() {
            "image" => "image".to_owned(),
            "container" => "id".to_owned(),
            other => format!("endpoint {other}"),
        };
        return Err(c.err(field, e.reason));
    }
    Ok(Some(ep))
}

/// The service name of private port `port`: its own, else the container-wide or the image's,
/// with `-<port>` in a group; `None` when there is none.
fn service_name(
    c: &ContainerInfo,
    naming: &Naming<'_>,
    settings: &PortSettings,
    port: u16,
) -> Result<Option<String>, SpecError> {
    if let Some(name) = &settings.name {
        return Ok(Some(name.clone()));
    }
    let general_name = &naming.parsed.general_name;
    // Registrator (bridge/bridge.go newService): `if isgroup && !metadataFromPort["name"]`
    // the private port is appended, to SERVICE_NAME as to the image's name.
    let (base, field) = match (general_name, &naming.meta.general.name) {
        (Some(n), Some(s)) => (n, s.field.as_str()),
        _ => match naming.default_name {
            Some(n) => (n, "image"),
            None => return Ok(None),
        },
    };
    if naming.group && !(general_name.is_some() && naming.meta.general_name_verbatim) {
        let name = format!("{base}-{port}");
        if !is_dns_label(&name) {
            return Err(c.err(
                field,
                format!(
                    "service name {} is not a DNS label (1-{MAX_LABEL} chars): the container has {} ports, so each port without a name of its own is named <name>-<private port>, as Registrator names them; name this port with SERVICE_{port}_NAME or flotilla.service.{port}, or every port with flotilla.service",
                    escaped(&name),
                    naming.ports
                ),
            ));
        }
        Ok(Some(name))
    } else {
        Ok(Some(base.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SpecConfig {
        SpecConfig {
            node: "node-a".into(),
            advertise_ip: "10.0.0.5".parse().unwrap(),
            internal: false,
            explicit: false,
            allow_loopback: false,
            keys: Keys::new("/flotilla").unwrap(),
        }
    }

    fn web() -> ContainerInfo {
        ContainerInfo {
            id: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            name: "web-1".into(),
            image: "registry.example:5000/team/web_app:1.2@sha256:abcd".into(),
            running: true,
            network_mode: "default".into(),
            ports: vec![PortBindings {
                port: 8080,
                proto: Proto::Tcp,
                bindings: vec![("0.0.0.0".into(), 32768), ("::".into(), 32768)],
            }],
            exposed: vec![(8080, Proto::Tcp)],
            networks: [("bridge".to_owned(), "172.17.0.2".to_owned())].into(),
            ..Default::default()
        }
    }

    fn register(c: &ContainerInfo, cfg: &SpecConfig) -> Vec<Endpoint> {
        match decide(c, cfg).expect("valid") {
            Decision::Register(eps) => eps,
            other => panic!("expected endpoints, got {other:?}"),
        }
    }

    fn error(c: &ContainerInfo) -> SpecError {
        decide(c, &cfg()).expect_err("must be refused")
    }

    #[test]
    fn default_name_strips_registry_path_tag_and_digest() {
        for (image, name) in [
            ("nginx", Some("nginx")),
            ("nginx:1.25", Some("nginx")),
            ("library/nginx:1.25", Some("nginx")),
            (
                "registry.example:5000/team/web_app:1.2@sha256:abcd",
                Some("web-app"),
            ),
            ("localhost:5000/My.App", Some("my-app")),
            ("flotilla-busybox:test", Some("flotilla-busybox")),
            ("sha256:0123", Some("sha256")),
            ("", None),
            ("___", None),
        ] {
            assert_eq!(default_service_name(image).as_deref(), name, "{image}");
        }
    }

    #[test]
    fn one_endpoint_per_port_even_with_ipv4_and_ipv6_bindings() {
        let eps = register(&web(), &cfg());
        assert_eq!(eps.len(), 1);
        let ep = &eps[0];
        assert_eq!(ep.service, "web-app");
        assert_eq!(ep.instance, "node-a-0123456789ab-8080");
        assert_eq!(ep.host, "10.0.0.5");
        assert_eq!(ep.port, 32768);
        assert_eq!(ep.proto, Proto::Tcp);
        assert_eq!(ep.container, "0123456789ab");
        assert_eq!(ep.health, Health::None);
        assert_eq!(
            ep.meta.get("container_name").map(String::as_str),
            Some("web-1")
        );
    }

    #[test]
    fn labels_beat_env_and_per_port_beats_general() {
        let mut c = web();
        c.env = vec![
            "SERVICE_NAME=from-env".into(),
            "SERVICE_TAGS=env-tag".into(),
            "PATH=/bin".into(),
        ];
        assert_eq!(register(&c, &cfg())[0].service, "from-env");
        assert_eq!(register(&c, &cfg())[0].tags, vec!["env-tag"]);
        c.labels.insert("SERVICE_NAME".into(), "from-label".into());
        assert_eq!(register(&c, &cfg())[0].service, "from-label");
        c.labels
            .insert("flotilla.service".into(), "flotilla-label".into());
        c.labels.insert("flotilla.tags".into(), "a, b,,c".into());
        let ep = &register(&c, &cfg())[0];
        assert_eq!(ep.service, "flotilla-label");
        assert_eq!(ep.tags, vec!["a", "b", "c"]);
        c.env.push("SERVICE_8080_NAME=per-port".into());
        assert_eq!(register(&c, &cfg())[0].service, "per-port");
        c.labels
            .insert("flotilla.service.8080".into(), "per-port-label".into());
        c.labels.insert("flotilla.tags.8080".into(), "x".into());
        let ep = &register(&c, &cfg())[0];
        assert_eq!(ep.service, "per-port-label");
        assert_eq!(ep.tags, vec!["x"]);
    }

    #[test]
    fn ignore_and_explicit() {
        let mut c = web();
        c.env.push("SERVICE_IGNORE=true".into());
        assert_eq!(decide(&c, &cfg()), Ok(Decision::Skip(SkipReason::Ignored)));
        c.labels.insert("flotilla.ignore".into(), "false".into());
        assert_eq!(register(&c, &cfg()).len(), 1, "label beats env");
        c.labels.insert("flotilla.ignore.8080".into(), "yes".into());
        assert_eq!(decide(&c, &cfg()), Ok(Decision::Skip(SkipReason::Ignored)));

        let explicit = SpecConfig {
            explicit: true,
            ..cfg()
        };
        let c = web();
        assert_eq!(
            decide(&c, &explicit),
            Ok(Decision::Skip(SkipReason::Unnamed))
        );
        let mut named = web();
        named.labels.insert("flotilla.service".into(), "web".into());
        assert_eq!(register(&named, &explicit)[0].service, "web");
    }

    #[test]
    fn health_paused_and_portless_containers_announce_nothing() {
        let mut c = web();
        c.health = Some(HealthState::Starting);
        assert_eq!(
            decide(&c, &cfg()),
            Ok(Decision::Skip(SkipReason::HealthNotHealthy))
        );
        c.health = Some(HealthState::Unhealthy);
        assert_eq!(
            decide(&c, &cfg()),
            Ok(Decision::Skip(SkipReason::HealthNotHealthy))
        );
        c.health = Some(HealthState::Healthy);
        assert_eq!(register(&c, &cfg())[0].health, Health::Healthy);
        c.paused = true;
        assert_eq!(decide(&c, &cfg()), Ok(Decision::Skip(SkipReason::Paused)));
        let mut c = web();
        c.ports[0].bindings.clear();
        assert_eq!(decide(&c, &cfg()), Ok(Decision::Skip(SkipReason::NoPorts)));
        c.running = false;
        assert_eq!(
            decide(&c, &cfg()),
            Ok(Decision::Skip(SkipReason::NotRunning))
        );
    }

    #[test]
    fn loopback_and_link_local_bindings_are_left_out_unless_allowed() {
        let local = [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.3.4",
            "fe80::1",
            "::ffff:127.0.0.1",
        ];
        for ip in local {
            let mut c = web();
            c.ports.push(PortBindings {
                port: 9000,
                proto: Proto::Tcp,
                bindings: vec![(ip.into(), 40000)],
            });
            let (d, left_out) = decide_noting(&c, &cfg()).unwrap();
            let Decision::Register(eps) = d else {
                panic!("{ip}: {d:?}")
            };
            assert_eq!(eps.len(), 1, "{ip}: only 8080 (on 0.0.0.0) is announced");
            assert_eq!(eps[0].host, "10.0.0.5");
            assert_eq!(left_out.len(), 1, "{ip}");
            assert_eq!((left_out[0].port, left_out[0].host_port), (9000, 40000));
            assert!(left_out[0].to_string().contains(ip), "{}", left_out[0]);
            // Allowed: announced at that address.
            let allow = SpecConfig {
                allow_loopback: true,
                ..cfg()
            };
            let (d, left_out) = decide_noting(&c, &allow).unwrap();
            let Decision::Register(eps) = d else {
                panic!("{ip}: {d:?}")
            };
            assert!(left_out.is_empty());
            assert!(
                eps.iter().any(|e| e.port == 40000 && e.host == ip),
                "{eps:?}"
            );
        }
        // Only local bindings: nothing at all, and the reason says why.
        let mut c = web();
        c.ports[0].bindings = vec![("127.0.0.1".into(), 40000), ("::1".into(), 40000)];
        let (d, left_out) = decide_noting(&c, &cfg()).unwrap();
        assert_eq!(d, Decision::Skip(SkipReason::LocalOnly));
        assert_eq!(left_out.len(), 1, "one per port: {left_out:?}");
        // A port also bound to a reachable address is announced there.
        c.ports[0].bindings = vec![("127.0.0.1".into(), 40000), ("192.0.2.7".into(), 40001)];
        let eps = register(&c, &cfg());
        assert_eq!((eps[0].host.as_str(), eps[0].port), ("192.0.2.7", 40001));
        // An ignored port is not reported as left out.
        let mut c = web();
        c.ports[0].bindings = vec![("127.0.0.1".into(), 40000)];
        c.labels
            .insert("flotilla.ignore.8080".into(), "true".into());
        let (d, left_out) = decide_noting(&c, &cfg()).unwrap();
        assert!(matches!(d, Decision::Skip(_)), "{d:?}");
        assert!(left_out.is_empty());
    }

    #[test]
    fn udp_gets_its_own_instance_and_specific_host_ips_are_kept() {
        let mut c = web();
        c.ports.push(PortBindings {
            port: 53,
            proto: Proto::Udp,
            bindings: vec![("127.0.0.1".into(), 40000)],
        });
        let allow = SpecConfig {
            allow_loopback: true,
            ..cfg()
        };
        let eps = register(&c, &allow);
        assert_eq!(eps.len(), 2);
        let udp = eps.iter().find(|e| e.proto == Proto::Udp).unwrap();
        assert_eq!(udp.instance, "node-a-0123456789ab-53-udp");
        // Bound to loopback only: reachable there, not at --advertise-ip.
        assert_eq!(udp.host, "127.0.0.1");
        assert_eq!(udp.port, 40000);
        // A binding to the advertised address itself is the advertised address.
        c.ports[1].bindings = vec![("10.0.0.5".into(), 40001)];
        let eps = register(&c, &allow);
        let udp = eps.iter().find(|e| e.proto == Proto::Udp).unwrap();
        assert_eq!((udp.host.as_str(), udp.port), ("10.0.0.5", 40001));
    }

    #[test]
    fn host_network_uses_exposed_ports_and_internal_uses_container_ip() {
        let mut c = web();
        c.network_mode = "host".into();
        c.ports.clear();
        c.exposed = vec![(9000, Proto::Tcp)];
        let ep = &register(&c, &cfg())[0];
        assert_eq!((ep.host.as_str(), ep.port), ("10.0.0.5", 9000));

        let internal = SpecConfig {
            internal: true,
            ..cfg()
        };
        let mut c = web();
        c.networks.insert("zeta".into(), "10.9.0.7".into());
        let ep = &register(&c, &internal)[0];
        assert_eq!(
            (ep.host.as_str(), ep.port),
            ("172.17.0.2", 8080),
            "first network by name"
        );
        c.labels.insert("flotilla.network".into(), "zeta".into());
        let ep = &register(&c, &internal)[0];
        assert_eq!((ep.host.as_str(), ep.port), ("10.9.0.7", 8080));
        c.labels.insert("flotilla.network".into(), "nope".into());
        let e = decide(&c, &internal).unwrap_err();
        assert_eq!(e.field, "label flotilla.network");
        // A container IP that is loopback / link-local (a macvlan or a misreporting engine) is
        // held to the same rule as a binding.
        let mut c = web();
        c.networks = [("odd".to_owned(), "169.254.0.9".to_owned())].into();
        let (d, left_out) = decide_noting(&c, &internal).unwrap();
        assert_eq!(d, Decision::Skip(SkipReason::LocalOnly));
        assert_eq!(left_out[0].to_string(), "169.254.0.9:8080");
    }

    #[test]
    fn injection_attempts_are_refused_naming_the_container_and_field() {
        let long = "a".repeat(64);
        let cases: Vec<(&str, &str, &str)> = vec![
            (
                "flotilla.service",
                "web\n  server evil 1.2.3.4:80",
                "label flotilla.service",
            ),
            ("flotilla.service", "web\"", "label flotilla.service"),
            ("flotilla.service", &long, "label flotilla.service"),
            ("flotilla.tags", "ok,bad\ttag", "label flotilla.tags"),
            ("flotilla.tags", "a\"b", "label flotilla.tags"),
            ("flotilla.tags", "a\u{7}b", "label flotilla.tags"),
            ("flotilla.tags", "x\n", "label flotilla.tags"),
            (
                "flotilla.service.99999",
                "web",
                "label flotilla.service.99999",
            ),
            (
                "flotilla.service.http",
                "web",
                "label flotilla.service.http",
            ),
            ("flotilla.ignore", "maybe", "label flotilla.ignore"),
            ("flotilla.meta.owner", "a b", "label flotilla.meta.owner"),
            ("flotilla.meta.bad key", "v", "label flotilla.meta.bad key"),
            ("SERVICE_TAGS", "a;b", "label SERVICE_TAGS"),
            ("SERVICE_0_NAME", "web", "label SERVICE_0_NAME"),
            // Registrator's attributes are meta, held to the record's meta rules.
            (
                "SERVICE_REGION",
                "eu\n  server evil",
                "label SERVICE_REGION",
            ),
            ("SERVICE_8080_SNI", "a;b", "label SERVICE_8080_SNI"),
            ("SERVICE_ID", "{{x}}", "label SERVICE_ID"),
            ("SERVICE_bad key", "v", "label SERVICE_bad key"),
        ];
        for (label, value, field) in cases {
            let mut c = web();
            c.labels.insert(label.into(), value.into());
            let e = error(&c);
            assert_eq!(e.field, field, "{label}={value:?}: {e}");
            assert_eq!(e.container, "web-1");
            assert_eq!(e.short_id, "0123456789ab");
            assert!(!e.to_string().contains('\n'), "one-line message: {e}");
        }
        let mut c = web();
        c.labels
            .insert("flotilla.tags".into(), "t".repeat(MAX_VALUE + 1));
        assert!(error(&c).reason.contains("limit"));
        let mut c = web();
        c.env.push("SERVICE_NAME=Web".into());
        assert_eq!(error(&c).field, "env SERVICE_NAME");
        let mut c = web();
        c.env.push("SERVICE_70000_NAME=web".into());
        assert_eq!(error(&c).field, "env SERVICE_70000_NAME");
        // Registrator's attributes became meta (issue 17): these were left alone before, and
        // now refuse the container instead of being dropped silently.
        for (var, field) in [
            ("SERVICE_REGION=eu west", "env SERVICE_REGION"),
            ("SERVICE_DB_NAME=whatever it is", "env SERVICE_DB_NAME"),
        ] {
            let mut c = web();
            c.env.push(var.into());
            assert_eq!(error(&c).field, field, "{var}");
        }
        // Not ours: left alone (Registrator's health checks; unknown flotilla.* labels).
        let mut c = web();
        c.env
            .push("SERVICE_CHECK_SCRIPT=curl -f http://x/ || exit 1".into());
        c.env.push("SERVICE_8080_CHECK_INTERVAL=15 s".into());
        c.env.push("SERVICE_CHECK_TCP=true".into());
        c.labels.insert("flotilla.future".into(), "x\ny".into());
        let eps = register(&c, &cfg());
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].meta.keys().collect::<Vec<_>>(), ["container_name"]);
    }

    #[test]
    fn registrator_check_http_is_the_proxys_check_path_and_the_other_checks_are_not_read() {
        // consul/consul.go buildCheck: SERVICE_CHECK_HTTP is the path of an HTTP check on the
        // service's address; here the proxy runs it (meta check_path, the shipped templates'
        // `option httpchk`). Per port beats container-wide; flotilla.meta.check_path beats both
        // sources of the same scope, as for every meta key.
        let mut c = two_ports();
        c.env.push("SERVICE_CHECK_HTTP=/health".into());
        c.env
            .push("SERVICE_8443_CHECK_HTTP=/tls-health?deep=1".into());
        c.env.push("SERVICE_CHECK_INTERVAL=15s".into());
        c.env.push("SERVICE_CHECK_SCRIPT=exit 0".into());
        let eps = register(&c, &cfg());
        let path = |eps: &[Endpoint], port: &str| {
            eps.iter()
                .find(|e| e.instance.ends_with(&format!("-{port}")))
                .unwrap()
                .meta
                .get("check_path")
                .cloned()
        };
        assert_eq!(path(&eps, "8080").as_deref(), Some("/health"));
        assert_eq!(path(&eps, "8443").as_deref(), Some("/tls-health?deep=1"));
        for e in &eps {
            assert!(
                !e.meta
                    .keys()
                    .any(|k| k.starts_with("check_") && k != "check_path"),
                "{:?}",
                e.meta
            );
        }
        c.labels
            .insert("flotilla.meta.check_path".into(), "/ready".into());
        assert_eq!(
            path(&register(&c, &cfg()), "8080").as_deref(),
            Some("/ready")
        );
        // An empty one sets nothing (and clears a weaker source).
        let mut c = web();
        c.env.push("SERVICE_CHECK_HTTP=".into());
        assert_eq!(path(&register(&c, &cfg()), "8080"), None);
        // Not a path, or not a valid meta value: the container is refused, naming the variable.
        for (var, field) in [
            ("SERVICE_CHECK_HTTP=health", "env SERVICE_CHECK_HTTP"),
            (
                "SERVICE_8080_CHECK_HTTP=/a b",
                "env SERVICE_8080_CHECK_HTTP",
            ),
        ] {
            let mut c = web();
            c.env.push(var.into());
            let e = error(&c);
            assert_eq!(e.field, field, "{var}: {e}");
        }
        let mut c = web();
        c.env.push("SERVICE_CHECK_HTTP=health".into());
        assert!(error(&c).reason.contains("starting with '/'"));
    }

    /// `web()` publishing a second port, 8443.
    fn two_ports() -> ContainerInfo {
        let mut c = web();
        c.ports.push(PortBindings {
            port: 8443,
            proto: Proto::Tcp,
            bindings: vec![("0.0.0.0".into(), 32769)],
        });
        c.exposed.push((8443, Proto::Tcp));
        c
    }

    /// (private port, service) of each endpoint, in the order of the ports.
    fn names(c: &ContainerInfo, cfg: &SpecConfig) -> Vec<(String, String)> {
        register(c, cfg)
            .into_iter()
            .map(|e| (e.instance.rsplit('-').next().unwrap().to_owned(), e.service))
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn several_ports_are_named_name_dash_port_as_registrator_does() {
        // Default name (Registrator: `nginx` publishing 80 and 443 is nginx-80 and nginx-443).
        let c = two_ports();
        assert_eq!(
            names(&c, &cfg()),
            pairs(&[("8080", "web-app-8080"), ("8443", "web-app-8443")])
        );
        // One published port: the name as is.
        assert_eq!(names(&web(), &cfg()), pairs(&[("8080", "web-app")]));
        // A per-port name is used as given; the other port keeps the suffix.
        let mut c = two_ports();
        c.env.push("SERVICE_8443_NAME=https".into());
        assert_eq!(
            names(&c, &cfg()),
            pairs(&[("8080", "web-app-8080"), ("8443", "https")])
        );
        // SERVICE_NAME (env or label) also gets the suffix, as in Registrator.
        let mut c = two_ports();
        c.env.push("SERVICE_NAME=shop".into());
        assert_eq!(
            names(&c, &cfg()),
            pairs(&[("8080", "shop-8080"), ("8443", "shop-8443")])
        );
        c.labels.insert("SERVICE_NAME".into(), "store".into());
        assert_eq!(
            names(&c, &cfg()),
            pairs(&[("8080", "store-8080"), ("8443", "store-8443")])
        );
        // flotilla.service names every port as given (and beats SERVICE_NAME).
        c.labels.insert("flotilla.service".into(), "shop".into());
        assert_eq!(
            names(&c, &cfg()),
            pairs(&[("8080", "shop"), ("8443", "shop")])
        );
        c.labels
            .insert("flotilla.service.8443".into(), "tls".into());
        assert_eq!(
            names(&c, &cfg()),
            pairs(&[("8080", "shop"), ("8443", "tls")])
        );
        // With --explicit, SERVICE_NAME names the container: suffixed as well.
        let explicit = SpecConfig {
            explicit: true,
            ..cfg()
        };
        let mut c = two_ports();
        assert_eq!(
            decide(&c, &explicit),
            Ok(Decision::Skip(SkipReason::Unnamed))
        );
        c.labels.insert("SERVICE_NAME".into(), "shop".into());
        assert_eq!(
            names(&c, &explicit),
            pairs(&[("8080", "shop-8080"), ("8443", "shop-8443")])
        );
    }

    #[test]
    fn the_group_counts_the_ports_registrator_counts() {
        // A port ignored by SERVICE_<port>_IGNORE still counts (Registrator decides the group
        // before it reads ignore).
        let mut c = two_ports();
        c.env.push("SERVICE_8443_IGNORE=true".into());
        assert_eq!(names(&c, &cfg()), pairs(&[("8080", "web-app-8080")]));
        // An exposed port that is not published does not count.
        let mut c = web();
        c.exposed.push((9000, Proto::Tcp));
        c.ports.push(PortBindings {
            port: 9000,
            proto: Proto::Tcp,
            bindings: vec![],
        });
        assert_eq!(names(&c, &cfg()), pairs(&[("8080", "web-app")]));
        // ... but with --internal it does (Registrator -internal registers exposed ports).
        let internal = SpecConfig {
            internal: true,
            ..cfg()
        };
        assert_eq!(
            names(&c, &internal),
            pairs(&[("8080", "web-app-8080"), ("9000", "web-app-9000")])
        );
        // A port published on loopback only counts although it is not announced without
        // --allow-loopback, so names do not change with the flag.
        let mut c = web();
        c.ports.push(PortBindings {
            port: 9000,
            proto: Proto::Tcp,
            bindings: vec![("127.0.0.1".into(), 40000)],
        });
        assert_eq!(names(&c, &cfg()), pairs(&[("8080", "web-app-8080")]));
        let allow = SpecConfig {
            allow_loopback: true,
            ..cfg()
        };
        assert_eq!(
            names(&c, &allow),
            pairs(&[("8080", "web-app-8080"), ("9000", "web-app-9000")])
        );
        // tcp and udp of one port number are two ports, both named <name>-<port>.
        let mut c = web();
        c.ports[0].port = 53;
        c.ports.push(PortBindings {
            port: 53,
            proto: Proto::Udp,
            bindings: vec![("0.0.0.0".into(), 40053)],
        });
        let eps = register(&c, &cfg());
        assert_eq!(eps.len(), 2);
        assert!(eps.iter().all(|e| e.service == "web-app-53"), "{eps:?}");
        assert_eq!(eps[1].instance, "node-a-0123456789ab-53-udp");
        // --network host: the exposed ports.
        let mut c = web();
        c.network_mode = "host".into();
        c.ports.clear();
        c.exposed = vec![(80, Proto::Tcp), (443, Proto::Tcp)];
        assert_eq!(
            names(&c, &cfg()),
            pairs(&[("80", "web-app-80"), ("443", "web-app-443")])
        );
    }

    #[test]
    fn a_suffixed_name_that_is_too_long_is_an_error_naming_its_source() {
        let mut c = two_ports();
        c.image = format!("team/{}:1", "a".repeat(60));
        let e = error(&c);
        assert_eq!(e.field, "image", "{e}");
        assert!(e.reason.contains("SERVICE_8080_NAME"), "{e}");
        // The same name on one port is fine.
        let mut one = web();
        one.image = c.image.clone();
        assert_eq!(register(&one, &cfg())[0].service, "a".repeat(60));
        let mut c = two_ports();
        c.env.push(format!("SERVICE_NAME={}", "b".repeat(60)));
        assert_eq!(error(&c).field, "env SERVICE_NAME");
        // Naming both ports mends it.
        c.env.push("SERVICE_8080_NAME=http".into());
        c.env.push("SERVICE_8443_NAME=https".into());
        assert_eq!(
            names(&c, &cfg()),
            pairs(&[("8080", "http"), ("8443", "https")])
        );
    }

    #[test]
    fn service_id_goes_to_meta_and_never_changes_the_instance() {
        let mut c = two_ports();
        c.env.push("SERVICE_ID=shop.1".into());
        c.env.push("SERVICE_8443_ID=https.12345".into());
        let eps = register(&c, &cfg());
        let by_port: BTreeMap<&str, &Endpoint> = eps
            .iter()
            .map(|e| (e.instance.rsplit('-').next().unwrap(), e))
            .collect();
        assert_eq!(by_port["8080"].meta["service_id"], "shop.1");
        assert_eq!(by_port["8443"].meta["service_id"], "https.12345");
        assert_eq!(by_port["8080"].instance, "node-a-0123456789ab-8080");
        assert_eq!(by_port["8443"].instance, "node-a-0123456789ab-8443");
        assert!(eps.iter().all(|e| !e.meta.contains_key("id")));
        // An id naming another node (Registrator's `<hostname>:<name>:<port>`, or a forged
        // instance of another host) is only meta: key and instance stay this node's.
        let mut c = web();
        c.labels
            .insert("SERVICE_ID".into(), "node-b-0123456789ab-8080".into());
        let ep = &register(&c, &cfg())[0];
        assert_eq!(ep.instance, "node-a-0123456789ab-8080");
        assert_eq!(
            ep.key(&cfg().keys),
            "/flotilla/endpoints/node-a/web-app/node-a-0123456789ab-8080"
        );
        assert_eq!(ep.meta["service_id"], "node-b-0123456789ab-8080");
        c.labels
            .insert("SERVICE_ID".into(), "host-1:web.0:8080".into());
        assert_eq!(
            register(&c, &cfg())[0].meta["service_id"],
            "host-1:web.0:8080"
        );
        // Invalid: refused naming the variable.
        let mut c = web();
        c.env.push("SERVICE_ID=a b".into());
        assert_eq!(error(&c).field, "env SERVICE_ID");
        let mut c = web();
        c.env.push(format!(
            "SERVICE_8080_ID={}",
            "i".repeat(MAX_META_VALUE + 1)
        ));
        let e = error(&c);
        assert_eq!(e.field, "env SERVICE_8080_ID");
        assert!(e.reason.contains("1-512 bytes"), "{e}");
    }

    #[test]
    fn registrator_attributes_become_meta_and_per_port_beats_container_wide() {
        let mut c = two_ports();
        c.env.push("SERVICE_REGION=eu".into());
        c.env.push("SERVICE_8443_REGION=us".into());
        c.env.push("SERVICE_8443_SNI=enabled".into());
        c.env.push("SERVICE_DB_NAME=orders".into());
        c.env.push("SERVICE_TAGS=www".into());
        c.env.push("SERVICE_CHECK_TTL=30s".into());
        c.labels.insert("SERVICE_Owner".into(), "team-a".into());
        let eps = register(&c, &cfg());
        let meta = |port: &str| -> Vec<(String, String)> {
            eps.iter()
                .find(|e| e.instance.ends_with(&format!("-{port}")))
                .unwrap()
                .meta
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        assert_eq!(
            meta("8080"),
            pairs(&[
                ("container_name", "web-1"),
                ("db_name", "orders"),
                ("owner", "team-a"),
                ("region", "eu"),
            ])
        );
        assert_eq!(
            meta("8443"),
            pairs(&[
                ("container_name", "web-1"),
                ("db_name", "orders"),
                ("owner", "team-a"),
                ("region", "us"),
                ("sni", "enabled"),
            ])
        );
        assert!(eps.iter().all(|e| e.tags == ["www"]));

        // Strength: per-port beats container-wide of any source; then flotilla.meta.<key>
        // label, SERVICE_* label, SERVICE_* env.
        let region = |c: &ContainerInfo, port: &str| {
            register(c, &cfg())
                .into_iter()
                .find(|e| e.instance.ends_with(&format!("-{port}")))
                .unwrap()
                .meta
                .get("region")
                .cloned()
        };
        let mut c = two_ports();
        c.env.push("SERVICE_REGION=eu".into());
        c.labels.insert("SERVICE_REGION".into(), "ap".into());
        assert_eq!(region(&c, "8080").as_deref(), Some("ap"));
        c.labels.insert("flotilla.meta.region".into(), "sa".into());
        assert_eq!(region(&c, "8080").as_deref(), Some("sa"));
        c.env.push("SERVICE_8443_REGION=us".into());
        assert_eq!(region(&c, "8443").as_deref(), Some("us"));
        assert_eq!(region(&c, "8080").as_deref(), Some("sa"));
        // An explicit meta beats the container name.
        c.env.push("SERVICE_CONTAINER_NAME=web".into());
        assert_eq!(register(&c, &cfg())[0].meta["container_name"], "web");

        // Registrator lowercases the whole variable name after SERVICE_: SERVICE_8443_name is
        // the port's name, not meta.
        let mut c = two_ports();
        c.labels.insert("SERVICE_8443_name".into(), "https".into());
        let eps = register(&c, &cfg());
        assert_eq!(eps[1].service, "https");
        assert!(!eps[1].meta.contains_key("name"), "{:?}", eps[1].meta);
    }

    #[test]
    fn an_empty_attribute_sets_nothing_and_unsets_a_weaker_one() {
        // An image's ENV that is no valid meta value refuses the container...
        let mut c = two_ports();
        c.env.push("SERVICE_OPTS=-Xmx1g -server".into());
        assert_eq!(error(&c).field, "env SERVICE_OPTS");
        // ... unless the operator empties it (a label, or `docker run -e SERVICE_OPTS=`).
        c.labels.insert("SERVICE_OPTS".into(), String::new());
        let eps = register(&c, &cfg());
        assert!(eps.iter().all(|e| !e.meta.contains_key("opts")));
        // A per-port empty value removes the container-wide one from that port only.
        let mut c = two_ports();
        c.env.push("SERVICE_REGION=eu".into());
        c.env.push("SERVICE_8443_REGION=".into());
        let eps = register(&c, &cfg());
        assert_eq!(eps[0].meta.get("region").map(String::as_str), Some("eu"));
        assert_eq!(eps[1].meta.get("region"), None);
        // flotilla.meta.<key> keeps its rule: empty is an error.
        let mut c = web();
        c.labels
            .insert("flotilla.meta.region".into(), String::new());
        assert_eq!(error(&c).field, "label flotilla.meta.region");
        // An attribute of a port that is not published is checked as well.
        let mut c = web();
        c.env.push("SERVICE_9999_REGION=a b".into());
        assert_eq!(error(&c).field, "env SERVICE_9999_REGION");
    }

    #[test]
    fn a_bad_value_on_an_unpublished_port_still_refuses_the_container() {
        let mut c = web();
        c.labels
            .insert("flotilla.service.9999".into(), "bad name".into());
        assert_eq!(error(&c).field, "label flotilla.service.9999");
    }

    #[test]
    fn unusable_image_name_needs_an_explicit_service() {
        let mut c = web();
        c.image = "___".into();
        assert_eq!(error(&c).field, "image");
        c.labels.insert("flotilla.service".into(), "web".into());
        assert_eq!(register(&c, &cfg())[0].service, "web");
    }

    #[test]
    fn regression_short_id_of_a_non_ascii_id_does_not_panic() {
        // `&id[..12]` sliced inside a multi-byte character.
        let mut c = web();
        c.id = "01234567890\u{e9}ab".into();
        assert_eq!(c.short_id(), "01234567890\u{e9}");
        // Such an id never makes a record: it is refused naming the container.
        let e = error(&c);
        assert_eq!(e.container, "web-1");
        assert!(e.field.starts_with("endpoint"), "{e}");
    }
}
