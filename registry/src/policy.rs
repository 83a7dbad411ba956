//! Service claim policies: `<prefix>/policy/services/<service>`, written by the operator, say
//! which nodes may announce a service.
//!
//! ```json
//! {"nodes": ["web-1", "web-2"], "labels": ["role=web"]}
//! ```
//!
//! A node may announce the service if its name is listed in `nodes` **or** its node record
//! carries one of the `labels` (`presence --node-label role=web`). Both lists may be empty (then
//! no node may announce it: a service can be closed). Unknown fields are an error, so a typo
//! (`"node": [...]`) never silently opens or closes a service. Readers (confgen) enforce it;
//! etcd RBAC keeps hosts from writing it (hosts may write only their own endpoints and node key).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::record::{is_dns_label, is_instance_char, RecordError, MAX_ITEMS, MAX_TAG};

/// Largest policy value accepted.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Which nodes may announce one service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePolicy {
    /// Node names allowed.
    pub nodes: Vec<String>,
    /// Node labels (`key=value`) that allow a node carrying one of them.
    pub labels: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    labels: Vec<String>,
}

impl ServicePolicy {
    /// Decodes and validates the value at `key`.
    pub fn decode(key: &str, value: &[u8]) -> Result<ServicePolicy, RecordError> {
        if value.len() > MAX_POLICY_BYTES {
            return Err(RecordError::new(
                key,
                "json",
                format!("larger than {MAX_POLICY_BYTES} bytes"),
            ));
        }
        let wire: Wire = serde_json::from_slice(value).map_err(|e| {
            RecordError::new(
                key,
                "json",
                format!("not a policy ({{\"nodes\": [..], \"labels\": [\"k=v\"]}}): {e}"),
            )
        })?;
        if wire.nodes.len() + wire.labels.len() > 16 * MAX_ITEMS {
            return Err(RecordError::new(key, "nodes", "too many entries"));
        }
        for (i, n) in wire.nodes.iter().enumerate() {
            if !is_dns_label(n) {
                return Err(RecordError::new(
                    key,
                    format!("nodes[{i}]"),
                    format!("not a node name (DNS label): {n:?}"),
                ));
            }
        }
        let mut labels = Vec::new();
        for (i, l) in wire.labels.iter().enumerate() {
            let pair = l.split_once('=').filter(|(k, v)| {
                [k, v]
                    .iter()
                    .all(|s| !s.is_empty() && s.len() <= MAX_TAG && s.chars().all(is_instance_char))
            });
            match pair {
                Some((k, v)) => labels.push((k.to_owned(), v.to_owned())),
                None => {
                    return Err(RecordError::new(
                        key,
                        format!("labels[{i}]"),
                        format!("must be key=value of [A-Za-z0-9._-]: {l:?}"),
                    ))
                }
            }
        }
        Ok(ServicePolicy {
            nodes: wire.nodes,
            labels,
        })
    }

    /// True if the node `name`, whose record carries `labels`, may announce the service.
    pub fn allows(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.nodes.iter().any(|n| n == name)
            || self
                .labels
                .iter()
                .any(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_or_labels_allow() {
        let p = ServicePolicy::decode("k", br#"{"nodes": ["a"], "labels": ["role=web"]}"#).unwrap();
        let none = BTreeMap::new();
        let web: BTreeMap<String, String> = [("role".into(), "web".into())].into();
        let db: BTreeMap<String, String> = [("role".into(), "db".into())].into();
        assert!(p.allows("a", &none));
        assert!(p.allows("b", &web));
        assert!(!p.allows("b", &db));
        assert!(!p.allows("b", &none));
        let closed = ServicePolicy::decode("k", b"{}").unwrap();
        assert!(!closed.allows("a", &web));
    }

    #[test]
    fn typos_and_bad_values_are_errors_naming_the_field() {
        for (v, field) in [
            (&br#"{"node": ["a"]}"#[..], "json"),
            (br#"{"nodes": ["A_b"]}"#, "nodes[0]"),
            (br#"{"labels": ["role"]}"#, "labels[0]"),
            (br#"{"labels": ["role=a b"]}"#, "labels[0]"),
            (b"not json", "json"),
        ] {
            let e = ServicePolicy::decode("/flotilla/policy/services/web", v).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert_eq!(e.key, "/flotilla/policy/services/web");
        }
    }
}
