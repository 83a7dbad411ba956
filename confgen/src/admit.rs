//! Which valid endpoint records a proxy may route to: the admission rules confgen applies on
//! read, after the registry's record validation and before any template sees an endpoint.
//!
//! Record validation (in `flotilla-registry`) already guarantees that no value can inject a
//! line; these rules stop a *valid* record from taking routing down or stealing traffic:
//!
//! | rule | reason label |
//! | --- | --- |
//! | the endpoint's node has a live node record (`<prefix>/nodes/<node>`) | `no_node_record` |
//! | the service's claim policy (`<prefix>/policy/services/<svc>`) allows the node; with `--require-claims` a service without a policy is closed | `claim` |
//! | a loopback or link-local host only from this host's own node (`--node`), unless `--allow-loopback` | `loopback` |
//! | the host is an IP literal, unless `--allow-dns-hosts` | `dns_host` |
//! | meta `weight` is an integer 0–256 (what HAProxy accepts) | `weight` |
//! | at most `--max-endpoints-per-node` endpoints and `--max-bytes-per-node` bytes per node (the first by key are kept) | `node_cap` |
//! | one instance id per service: on a clash the endpoint whose node name is the longer prefix of the id wins | `duplicate_instance` |
//!
//! Service-wide settings (`mode`, `service_port`, `path`, `check_path`) come from operator keys
//! `<prefix>/config/services/<svc>/<setting>`; endpoint meta may only narrow them (see
//! [`Settings`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use flotilla_registry::policy::ServicePolicy;
use flotilla_registry::{Endpoint, Node};

/// Service-wide settings read from `<prefix>/config/services/<svc>/`.
pub const SETTINGS: [&str; 4] = ["mode", "service_port", "path", "check_path"];

/// Highest server weight HAProxy accepts.
pub const MAX_WEIGHT: u32 = 256;

/// The admission options of `confgen run` and `confgen render`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdmitArgs {
    /// This host's node name (as presence's --node): loopback and link-local endpoint
    /// addresses are accepted from this node only (they point at this host itself).
    #[arg(long = "node", env = "FLOTILLA_NODE")]
    pub node: Option<String>,
    /// Accept loopback and link-local endpoint addresses from every node (single-host setups
    /// and tests, where every "node" is this machine).
    #[arg(long, env = "FLOTILLA_ALLOW_LOOPBACK")]
    pub allow_loopback: bool,
    /// Accept endpoints whose host is a DNS name (the proxy resolves it; a name that does not
    /// resolve fails the proxy's config check). Default: IP literals only.
    #[arg(long, env = "FLOTILLA_ALLOW_DNS_HOSTS")]
    pub allow_dns_hosts: bool,
    /// Route a service only if a claim policy `<prefix>/policy/services/<service>` exists and
    /// allows the announcing node. Default: a service without a policy is open to every node.
    #[arg(long, env = "FLOTILLA_REQUIRE_CLAIMS")]
    pub require_claims: bool,
    /// Most endpoints one node may announce; the rest (by key order) are left out.
    #[arg(long, env = "FLOTILLA_MAX_ENDPOINTS_PER_NODE", default_value_t = 5000)]
    pub max_endpoints_per_node: usize,
    /// Most bytes of endpoint records one node may announce; the rest are left out.
    #[arg(long, env = "FLOTILLA_MAX_BYTES_PER_NODE", default_value = "8MiB", value_parser = parse_bytes)]
    pub max_bytes_per_node: usize,
}

impl Default for AdmitArgs {
    fn default() -> Self {
        AdmitArgs {
            node: None,
            allow_loopback: false,
            allow_dns_hosts: false,
            require_claims: false,
            max_endpoints_per_node: 5000,
            max_bytes_per_node: 8 << 20,
        }
    }
}

/// `123`, `64KiB`, `8MiB`, `1GiB`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = [
        ("GiB", 1usize << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim(), *m)))
    .unwrap_or((t, 1));
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: expected a size such as 65536, 64KiB or 8MiB"))
}

/// Why a valid endpoint record is not routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Excluded {
    /// No live `<prefix>/nodes/<node>` record.
    NoNodeRecord,
    /// The service's claim policy does not allow the node (or there is none, with
    /// `--require-claims`).
    Claim {
        /// True if a policy exists (and does not name the node), false if there is none.
        policy: bool,
    },
    /// A loopback or link-local address announced by another node.
    Loopback,
    /// A DNS name where IP literals are required.
    DnsHost,
    /// A `weight` the proxy would refuse.
    Weight(String),
    /// Beyond the node's cap.
    NodeCap {
        /// `endpoints` or `bytes`.
        what: &'static str,
        /// The cap.
        limit: usize,
    },
    /// Another node's endpoint holds this instance id in the service.
    DuplicateInstance {
        /// The key of the endpoint that keeps it.
        kept: String,
    },
}

impl Excluded {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Excluded::NoNodeRecord => "no_node_record",
            Excluded::Claim { .. } => "claim",
            Excluded::Loopback => "loopback",
            Excluded::DnsHost => "dns_host",
            Excluded::Weight(_) => "weight",
            Excluded::NodeCap { .. } => "node_cap",
            Excluded::DuplicateInstance { .. } => "duplicate_instance",
        }
    }
}

impl fmt::Display for Excluded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Excluded::NoNodeRecord => f.write_str("its node has no live node record"),
            Excluded::Claim { policy: true } => {
                f.write_str("the service's claim policy does not allow this node")
            }
            Excluded::Claim { policy: false } => {
                f.write_str("the service has no claim policy and --require-claims is set")
            }
            Excluded::Loopback => f.write_str(
                "a loopback or link-local address announced by another node (it would point every proxy at itself; --allow-loopback for single-host setups)",
            ),
            Excluded::DnsHost => {
                f.write_str("the host is a DNS name, not an IP literal (--allow-dns-hosts)")
            }
            Excluded::Weight(w) => {
                write!(f, "meta weight {w:?} is not an integer 0-{MAX_WEIGHT}")
            }
            Excluded::NodeCap { what, limit } => {
                write!(f, "its node is over its cap of {limit} {what}")
            }
            Excluded::DuplicateInstance { kept } => {
                write!(f, "its instance id is already held by {kept}")
            }
        }
    }
}

/// The per-endpoint rules that need nothing but the endpoint, its node and its service's policy.
pub fn check(
    opts: &AdmitArgs,
    ep: &Endpoint,
    node: Option<&Node>,
    policy: Option<&ServicePolicy>,
) -> Result<(), Excluded> {
    let Some(node) = node else {
        return Err(Excluded::NoNodeRecord);
    };
    match policy {
        Some(p) if !p.allows(&ep.node, &node.labels) => {
            return Err(Excluded::Claim { policy: true })
        }
        None if opts.require_claims => return Err(Excluded::Claim { policy: false }),
        _ => {}
    }
    match ep.host.parse::<IpAddr>() {
        Ok(ip) => {
            let own = opts.node.as_deref() == Some(ep.node.as_str());
            if is_local(&ip) && !opts.allow_loopback && !own {
                return Err(Excluded::Loopback);
            }
        }
        Err(_) if !opts.allow_dns_hosts => return Err(Excluded::DnsHost),
        Err(_) => {}
    }
    if let Some(w) = ep.meta.get("weight") {
        if !w.parse::<u32>().is_ok_and(|n| n <= MAX_WEIGHT) {
            return Err(Excluded::Weight(w.clone()));
        }
    }
    Ok(())
}

/// Loopback, link-local (the registry's rule, as presence applies it) or unspecified: an
/// address that means "this host" to whoever uses it.
pub fn is_local(ip: &IpAddr) -> bool {
    flotilla_registry::record::is_host_local(*ip) || ip.to_canonical().is_unspecified()
}

/// A service's effective settings.
///
/// - `mode`, `service_port`: the operator's keys only (an endpoint cannot take a service out of
///   HTTP routing or bind a port on every proxy host);
/// - `path`: the operator's key; endpoint meta may narrow it to a sub-path if **every** routed
///   endpoint of the service says the same (`/api` → `/api/v2`), never widen or move it, so no
///   service can take requests from another service's route;
/// - `check_path`: the operator's key; without one, the endpoints' meta if **every** routed
///   endpoint sets the same value (one endpoint cannot point the others' health checks
///   elsewhere).
///
/// Templates see these values as the `meta` of every endpoint of the service (the endpoints' own
/// values for these keys are replaced), so `eps | meta(key="path")` reads the effective route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// setting → value, for the settings that have one.
    pub values: BTreeMap<&'static str, String>,
}

impl Settings {
    /// Settings of a service from its operator keys (`config`: setting → value) and the meta of
    /// its routed endpoints.
    pub fn effective(config: &BTreeMap<&'static str, String>, eps: &[&Endpoint]) -> Settings {
        let mut values = BTreeMap::new();
        for (k, v) in config {
            values.insert(*k, v.clone());
        }
        let unanimous = |key: &str| -> Option<&String> {
            let first = eps.first()?.meta.get(key)?;
            eps.iter()
                .all(|e| e.meta.get(key) == Some(first))
                .then_some(first)
        };
        if let (Some(base), Some(narrow)) = (config.get("path"), unanimous("path")) {
            let base_trim = base.trim_end_matches('/');
            if narrow == base
                || narrow
                    .strip_prefix(base_trim)
                    .is_some_and(|rest| rest.starts_with('/'))
            {
                values.insert("path", narrow.clone());
            }
        }
        if !config.contains_key("check_path") {
            if let Some(c) = unanimous("check_path") {
                values.insert("check_path", c.clone());
            }
        }
        Settings { values }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(node: &str, host: &str, meta: &[(&str, &str)]) -> Endpoint {
        Endpoint {
            service: "web".into(),
            instance: format!("{node}-0123456789ab-80"),
            node: node.into(),
            host: host.into(),
            port: 80,
            proto: flotilla_registry::Proto::Tcp,
            container: "0123456789ab".into(),
            image: String::new(),
            tags: vec![],
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            health: flotilla_registry::Health::None,
            registered_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn node(name: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            node: name.into(),
            version: "1".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            advertise_ip: "10.0.0.1".parse().unwrap(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn each_rule() {
        let o = AdmitArgs::default();
        let a = node("a", &[("role", "web")]);
        assert_eq!(check(&o, &ep("a", "10.0.0.2", &[]), Some(&a), None), Ok(()));
        assert_eq!(
            check(&o, &ep("a", "10.0.0.2", &[]), None, None),
            Err(Excluded::NoNodeRecord)
        );
        let p = ServicePolicy::decode("k", br#"{"labels": ["role=web"]}"#).unwrap();
        assert_eq!(
            check(&o, &ep("a", "10.0.0.2", &[]), Some(&a), Some(&p)),
            Ok(())
        );
        let b = node("b", &[("role", "db")]);
        assert_eq!(
            check(&o, &ep("b", "10.0.0.2", &[]), Some(&b), Some(&p)),
            Err(Excluded::Claim { policy: true })
        );
        let strict = AdmitArgs {
            require_claims: true,
            ..AdmitArgs::default()
        };
        assert_eq!(
            check(&strict, &ep("a", "10.0.0.2", &[]), Some(&a), None),
            Err(Excluded::Claim { policy: false })
        );
        for host in [
            "127.0.0.1",
            "127.9.9.9",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(
                check(&o, &ep("a", host, &[]), Some(&a), None),
                Err(Excluded::Loopback),
                "{host}"
            );
        }
        let own = AdmitArgs {
            node: Some("a".into()),
            ..AdmitArgs::default()
        };
        assert_eq!(
            check(&own, &ep("a", "127.0.0.1", &[]), Some(&a), None),
            Ok(())
        );
        assert_eq!(
            check(&own, &ep("b", "127.0.0.1", &[]), Some(&b), None),
            Err(Excluded::Loopback)
        );
        assert_eq!(
            check(&o, &ep("a", "db.example.org", &[]), Some(&a), None),
            Err(Excluded::DnsHost)
        );
        for (w, ok) in [
            ("0", true),
            ("256", true),
            ("257", false),
            ("300", false),
            ("-1", false),
            ("x", false),
        ] {
            let r = check(&o, &ep("a", "10.0.0.2", &[("weight", w)]), Some(&a), None);
            assert_eq!(r.is_ok(), ok, "weight {w}");
        }
    }

    #[test]
    fn settings_come_from_config_and_meta_only_narrows() {
        let cfg = |kv: &[(&'static str, &str)]| -> BTreeMap<&'static str, String> {
            kv.iter().map(|(k, v)| (*k, v.to_string())).collect()
        };
        let a = ep("a", "10.0.0.2", &[("path", "/api/v2"), ("mode", "tcp")]);
        let b = ep("b", "10.0.0.3", &[("path", "/api/v2")]);
        // No operator path: meta cannot create a route, nor change the mode.
        let s = Settings::effective(&cfg(&[]), &[&a, &b]);
        assert_eq!(s.values.get("path"), None);
        assert_eq!(s.values.get("mode"), None);
        // Narrowing /api to /api/v2 when every endpoint agrees.
        let s = Settings::effective(&cfg(&[("path", "/api")]), &[&a, &b]);
        assert_eq!(s.values["path"], "/api/v2");
        // Not when one disagrees, and never outside the operator's path.
        let c = ep("c", "10.0.0.4", &[("path", "/api/v3")]);
        let s = Settings::effective(&cfg(&[("path", "/api")]), &[&a, &b, &c]);
        assert_eq!(s.values["path"], "/api");
        let s = Settings::effective(&cfg(&[("path", "/ap")]), &[&a, &b]);
        assert_eq!(s.values["path"], "/ap");
        // check_path from meta only if unanimous and the operator set none.
        let h1 = ep("a", "10.0.0.2", &[("check_path", "/h")]);
        let h2 = ep("b", "10.0.0.3", &[("check_path", "/h")]);
        let h3 = ep("c", "10.0.0.4", &[]);
        assert_eq!(
            Settings::effective(&cfg(&[]), &[&h1, &h2]).values["check_path"],
            "/h"
        );
        assert_eq!(
            Settings::effective(&cfg(&[]), &[&h1, &h2, &h3])
                .values
                .get("check_path"),
            None
        );
        assert_eq!(
            Settings::effective(&cfg(&[("check_path", "/ok")]), &[&h1, &h2]).values["check_path"],
            "/ok"
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("8MiB"), Ok(8 << 20));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }
}
