//! The records stored in etcd (`Endpoint`, `Node`) and their validation.
//!
//! Every record is validated when it is encoded for a write **and** when it is decoded from a
//! read. The rules are strict on purpose: each value may end up inside a proxy configuration, so
//! no field may carry whitespace, quotes, `#`, control characters or anything else that could
//! start a new directive or argument. A value that fails decodes to a [`RecordError`] naming the
//! etcd key and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::keys::{KeyKind, Keys};

/// Longest service or node name (a DNS label).
pub const MAX_LABEL: usize = 63;
/// Longest instance id.
pub const MAX_INSTANCE: usize = 128;
/// Longest host name (RFC 1035).
pub const MAX_HOST: usize = 253;
/// Longest image reference.
pub const MAX_IMAGE: usize = 512;
/// Longest tag, meta key.
pub const MAX_TAG: usize = 128;
/// Longest meta value.
pub const MAX_META_VALUE: usize = 512;
/// Most tags / meta entries on one endpoint.
pub const MAX_ITEMS: usize = 64;
/// Largest encoded record accepted on read.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Why a record (or one of its fields) is invalid. Always names the etcd key (or `<new>` for a
/// record not yet written) and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid record at {key}: field `{field}`: {reason}")]
pub struct RecordError {
    /// The etcd key of the record.
    pub key: String,
    /// The offending field (`service`, `tags[2]`, `meta.owner`, `json`, …).
    pub field: String,
    /// What is wrong, with the offending value escaped for display.
    pub reason: String,
}

impl RecordError {
    pub(crate) fn new(key: &str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// Its spelling in records, in Docker's port keys (`80/tcp`) and in unitgen's specs: `tcp`
    /// or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The protocol spelled `s` ([`Proto::as_str`]), if it is one.
    pub fn parse(s: &str) -> Option<Proto> {
        [Proto::Tcp, Proto::Udp]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Docker health of the container behind an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The container has a HEALTHCHECK and it passes.
    Healthy,
    /// The container has a HEALTHCHECK and it fails.
    Unhealthy,
    /// The container has no HEALTHCHECK.
    None,
}

impl Health {
    /// Its spelling in records (and in Docker's health states, but `none`): `healthy`,
    /// `unhealthy` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::None => "none",
        }
    }

    /// The health spelled `s` ([`Health::as_str`]), if it is one.
    pub fn parse(s: &str) -> Option<Health> {
        [Health::Healthy, Health::Unhealthy, Health::None]
            .into_iter()
            .find(|h| h.as_str() == s)
    }
}

/// One published port of one container: `<prefix>/endpoints/<node>/<service>/<instance>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Service name: a DNS label.
    pub service: String,
    /// `<node>-<container12>-<private port>[-udp]`; stable for the life of the container.
    pub instance: String,
    /// The node (host) that registered it: a DNS label.
    pub node: String,
    /// Address to reach it: an IP literal or DNS name.
    pub host: String,
    /// Port to reach it: 1–65535.
    pub port: u16,
    /// `tcp` or `udp`.
    pub proto: Proto,
    /// 12-hex container id.
    pub container: String,
    /// Image reference the container runs.
    pub image: String,
    /// Free-form tags (`[A-Za-z0-9._:/=+@-]`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Docker health.
    pub health: Health,
    /// When it was registered, RFC 3339.
    pub registered_at: String,
}

/// A presence daemon's own record: `<prefix>/nodes/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Node name: a DNS label.
    pub node: String,
    /// Version of the presence daemon.
    pub version: String,
    /// When this presence process started, RFC 3339.
    pub started_at: String,
    /// The IP it advertises for published ports.
    pub advertise_ip: IpAddr,
    /// Operator-given labels of the host (`presence --node-label role=web`), which service
    /// claim policies may name. Absent in records of older versions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

// Wire form used on read: ports are decoded wide so that an out-of-range value is reported as a
// field error rather than a JSON type error.
#[derive(Deserialize)]
struct EndpointWire {
    service: String,
    instance: String,
    node: String,
    host: String,
    port: i64,
    #[serde(default = "default_proto")]
    proto: String,
    container: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    #[serde(default = "default_health")]
    health: String,
    registered_at: String,
}

fn default_proto() -> String {
    Proto::Tcp.as_str().into()
}
fn default_health() -> String {
    "none".into()
}

impl Endpoint {
    /// Checks every field. `key` is used in the error only.
    pub fn validate(&self, key: &str) -> Result<(), RecordError> {
        check_label(key, "service", &self.service)?;
        check_label(key, "node", &self.node)?;
        check_charset(
            key,
            "instance",
            &self.instance,
            MAX_INSTANCE,
            is_instance_char,
        )?;
        // The instance names its node, so one host cannot reuse (and so replace, or collide
        // with as an HAProxy server name) an instance id of another.
        if !self
            .instance
            .strip_prefix(self.node.as_str())
            .is_some_and(|rest| rest.len() > 1 && rest.starts_with('-'))
        {
            return Err(RecordError::new(
                key,
                "instance",
                format!(
                    "must start with the node name and a dash ({}-…), got {}",
                    self.node,
                    escaped(&self.instance)
                ),
            ));
        }
        check_host(key, "host", &self.host)?;
        if self.port == 0 {
            return Err(RecordError::new(key, "port", "must be 1-65535, got 0"));
        }
        check_container(key, &self.container)?;
        if !self.image.is_empty() {
            check_charset(key, "image", &self.image, MAX_IMAGE, is_image_char)?;
        }
        if self.tags.len() > MAX_ITEMS {
            return Err(RecordError::new(
                key,
                "tags",
                format!("at most {MAX_ITEMS} tags"),
            ));
        }
        for (i, tag) in self.tags.iter().enumerate() {
            check_charset(key, &format!("tags[{i}]"), tag, MAX_TAG, is_tag_char)?;
        }
        if self.meta.len() > MAX_ITEMS {
            return Err(RecordError::new(
                key,
                "meta",
                format!("at most {MAX_ITEMS} entries"),
            ));
        }
        for (k, v) in &self.meta {
            check_charset(key, "meta (key)", k, MAX_TAG, is_instance_char)?;
            check_charset(key, &format!("meta.{k}"), v, MAX_META_VALUE, is_meta_char)?;
        }
        check_time(key, "registered_at", &self.registered_at)?;
        Ok(())
    }

    /// The etcd key of this endpoint under `keys`.
    pub fn key(&self, keys: &Keys) -> String {
        keys.endpoint(&self.node, &self.service, &self.instance)
    }

    /// Validates and serialises to JSON for a write.
    pub fn encode(&self, keys: &Keys) -> Result<Vec<u8>, RecordError> {
        let key = self.key(keys);
        self.validate(&key)?;
        Ok(serde_json::to_vec(self).expect("Endpoint serialises"))
    }

    /// Decodes and validates the value read at `key`; the key path must agree with the body.
    /// Unknown JSON fields are ignored so the schema can grow.
    pub fn decode(keys: &Keys, key: &str, value: &[u8]) -> Result<Endpoint, RecordError> {
        let (node, service, instance) = match keys.parse(key) {
            Some(KeyKind::Endpoint {
                node,
                service,
                instance,
            }) => (node, service, instance),
            _ => return Err(RecordError::new(key, "key", "not an endpoint key")),
        };
        let wire: EndpointWire = decode_json(key, value)?;
        let port = u16::try_from(wire.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                RecordError::new(key, "port", format!("must be 1-65535, got {}", wire.port))
            })?;
        let proto = Proto::parse(&wire.proto).ok_or_else(|| {
            RecordError::new(
                key,
                "proto",
                format!("must be tcp or udp, got {}", escaped(&wire.proto)),
            )
        })?;
        let health = Health::parse(&wire.health).ok_or_else(|| {
            RecordError::new(
                key,
                "health",
                format!(
                    "must be healthy, unhealthy or none, got {}",
                    escaped(&wire.health)
                ),
            )
        })?;
        let ep = Endpoint {
            service: wire.service,
            instance: wire.instance,
            node: wire.node,
            host: wire.host,
            port,
            proto,
            container: wire.container,
            image: wire.image,
            tags: wire.tags,
            meta: wire.meta,
            health,
            registered_at: wire.registered_at,
        };
        for (field, in_key, in_body) in [
            ("node", node, &ep.node),
            ("service", service, &ep.service),
            ("instance", instance, &ep.instance),
        ] {
            if in_key != in_body.as_str() {
                return Err(RecordError::new(
                    key,
                    field,
                    format!(
                        "body says {} but the key path says {}",
                        escaped(in_body),
                        escaped(in_key)
                    ),
                ));
            }
        }
        ep.validate(key)?;
        Ok(ep)
    }
}

impl Node {
    /// Checks every field.
    pub fn validate(&self, key: &str) -> Result<(), RecordError> {
        check_label(key, "node", &self.node)?;
        check_charset(key, "version", &self.version, MAX_TAG, is_tag_char)?;
        check_time(key, "started_at", &self.started_at)?;
        if self.labels.len() > MAX_ITEMS {
            return Err(RecordError::new(
                key,
                "labels",
                format!("at most {MAX_ITEMS} entries"),
            ));
        }
        for (k, v) in &self.labels {
            check_charset(key, "labels (key)", k, MAX_TAG, is_instance_char)?;
            check_charset(key, &format!("labels.{k}"), v, MAX_TAG, is_instance_char)?;
        }
        Ok(())
    }

    /// Validates and serialises to JSON for a write.
    pub fn encode(&self, keys: &Keys) -> Result<Vec<u8>, RecordError> {
        self.validate(&keys.node(&self.node))?;
        Ok(serde_json::to_vec(self).expect("Node serialises"))
    }

    /// Decodes and validates the value read at `key`; the key must name the same node.
    pub fn decode(keys: &Keys, key: &str, value: &[u8]) -> Result<Node, RecordError> {
        let node = match keys.parse(key) {
            Some(KeyKind::Node { node }) => node,
            _ => return Err(RecordError::new(key, "key", "not a node key")),
        };
        let rec: Node = decode_json(key, value)?;
        rec.validate(key)?;
        if rec.node != node {
            return Err(RecordError::new(
                key,
                "node",
                format!(
                    "body says {} but the key path says {}",
                    escaped(&rec.node),
                    escaped(node)
                ),
            ));
        }
        Ok(rec)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, RecordError> {
    if value.len() > MAX_RECORD_BYTES {
        return Err(RecordError::new(
            key,
            "json",
            format!("record is {} bytes, limit {MAX_RECORD_BYTES}", value.len()),
        ));
    }
    let text = std::str::from_utf8(value).map_err(|e| {
        RecordError::new(key, "json", format!("not UTF-8 (byte {})", e.valid_up_to()))
    })?;
    serde_json::from_str(text).map_err(|e| {
        // serde_json names the missing or mistyped field in its message.
        RecordError::new(key, "json", format!("{e}"))
    })
}

/// Escapes a value for an error message: control characters and quotes are shown, never acted on.
pub fn escaped(value: &str) -> String {
    const SHOW: usize = 80;
    let mut s: String = value
        .chars()
        .take(SHOW)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > SHOW {
        s.push('…');
    }
    format!("\"{s}\"")
}

/// True if `s` is a DNS label: `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// True if `ip` reaches only the host it is used on: loopback (`127.0.0.0/8`, `::1`) or
/// link-local (`169.254.0.0/16`, `fe80::/10`), also as an IPv4-mapped IPv6 address. Such an
/// address announced by one host would make every proxy host route to itself.
pub fn is_host_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(a) => a.is_loopback() || a.is_link_local(),
        IpAddr::V6(a) => a.is_loopback() || (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// True if `s` is an IP literal or a DNS host name (letters, digits, `-`, dot-separated labels).
pub fn is_host(s: &str) -> bool {
    if s.parse::<IpAddr>().is_ok() {
        return true;
    }
    if s.is_empty() || s.len() > MAX_HOST {
        return false;
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    !name.is_empty()
        && name.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= MAX_LABEL
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
        // A name made only of digits and dots is a malformed IP, not a host name.
        && !name.bytes().all(|c| c.is_ascii_digit() || c == b'.')
}

/// Instance ids and meta keys: `[A-Za-z0-9._-]`.
pub fn is_instance_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn is_image_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@')
}

/// Tags: `[A-Za-z0-9._:/=+@-]`.
pub fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '=' | '+' | '@')
}

/// Meta values: printable ASCII without whitespace, quotes, backslash, `#`, `;`, `$`, backquote,
/// braces or angle brackets (so a value can start neither a new directive, a new argument, a
/// comment, nor a template or shell expansion).
pub fn is_meta_char(c: char) -> bool {
    c.is_ascii_graphic()
        && !matches!(
            c,
            '"' | '\'' | '`' | '\\' | '#' | ';' | '$' | '{' | '}' | '<' | '>'
        )
}

fn check_label(key: &str, field: &str, v: &str) -> Result<(), RecordError> {
    if is_dns_label(v) {
        Ok(())
    } else {
        Err(RecordError::new(
            key,
            field,
            format!(
                "{} is not a DNS label (lowercase letters, digits, '-', 1-{MAX_LABEL} chars)",
                escaped(v)
            ),
        ))
    }
}

fn check_host(key: &str, field: &str, v: &str) -> Result<(), RecordError> {
    if is_host(v) {
        Ok(())
    } else {
        Err(RecordError::new(
            key,
            field,
            format!("{} is neither an IP literal nor a DNS name", escaped(v)),
        ))
    }
}

fn check_container(key: &str, v: &str) -> Result<(), RecordError> {
    if v.len() == 12
        && v.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        Ok(())
    } else {
        Err(RecordError::new(
            key,
            "container",
            format!("{} is not a 12-hex container id", escaped(v)),
        ))
    }
}

fn check_charset(
    key: &str,
    field: &str,
    v: &str,
    max: usize,
    ok: fn(char) -> bool,
) -> Result<(), RecordError> {
    if v.is_empty() {
        return Err(RecordError::new(key, field, "is empty"));
    }
    if v.len() > max {
        return Err(RecordError::new(
            key,
            field,
            format!("is {} bytes, limit {max}", v.len()),
        ));
    }
    if let Some(bad) = v.chars().find(|c| !ok(*c)) {
        return Err(RecordError::new(
            key,
            field,
            format!("{} contains the forbidden character {:?}", escaped(v), bad),
        ));
    }
    Ok(())
}

fn check_time(key: &str, field: &str, v: &str) -> Result<(), RecordError> {
    if v.len() <= 64
        && humantime::parse_rfc3339_weak(v).is_ok()
        && v.chars().all(|c| c.is_ascii_graphic())
    {
        Ok(())
    } else {
        Err(RecordError::new(
            key,
            field,
            format!("{} is not an RFC 3339 time", escaped(v)),
        ))
    }
}

/// Current time as RFC 3339 with seconds precision (`2026-11-22T07:33:12Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
