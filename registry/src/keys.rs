//! The etcd key schema.
//!
//! ```text
//! <prefix>/nodes/<node>                               -> Node
//! <prefix>/endpoints/<node>/<service>/<instance>      -> Endpoint
//! <prefix>/config/...                                 -> free-form keys templates may read
//! <prefix>/config/services/<service>/<setting>        -> service-wide settings (operator)
//! <prefix>/policy/services/<service>                  -> which nodes may announce it (operator)
//! <prefix>/rollouts/<service>                         -> the rollout in progress (unitgen)
//! ```
//!
//! Node first, so etcd RBAC can confine each host's credentials to
//! `<prefix>/endpoints/<node>/` and its own node key.

use crate::record::{is_dns_label, is_instance_char};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/flotilla";

/// Builds and parses keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix denotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind<'a> {
    /// `<prefix>/nodes/<node>`
    Node {
        /// node name
        node: &'a str,
    },
    /// `<prefix>/endpoints/<node>/<service>/<instance>`
    Endpoint {
        /// node name
        node: &'a str,
        /// service name
        service: &'a str,
        /// instance id
        instance: &'a str,
    },
    /// `<prefix>/policy/services/<service>`: which nodes may announce `service`
    /// (operator-written, see [`crate::policy`]).
    Policy {
        /// service name
        service: &'a str,
    },
    /// `<prefix>/rollouts/<service>`: the rollout of `service` in progress, held by
    /// `unitgen rollout` under a lease (the key is the lock).
    Rollout {
        /// service name
        service: &'a str,
    },
    /// `<prefix>/config/<rest>`
    Config {
        /// the part after `config/`
        rest: &'a str,
    },
}

/// A prefix that is not of the form `/a/b` (leading slash, no trailing slash, no empty or
/// odd segments).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --prefix {0:?}: must look like /flotilla (leading '/', segments of [A-Za-z0-9._-], no trailing '/')")]
pub struct PrefixError(pub String);

impl Keys {
    /// Keys under `prefix` (e.g. `/flotilla`).
    pub fn new(prefix: &str) -> Result<Keys, PrefixError> {
        let ok = prefix.starts_with('/')
            && prefix.len() > 1
            && !prefix.ends_with('/')
            && prefix[1..].split('/').all(|seg| {
                !seg.is_empty() && seg != "." && seg != ".." && seg.chars().all(is_instance_char)
            });
        if ok {
            Ok(Keys {
                prefix: prefix.to_owned(),
            })
        } else {
            Err(PrefixError(prefix.to_owned()))
        }
    }

    /// The prefix itself, without a trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/` — everything Flotilla stores.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// `<prefix>/nodes/<node>`
    pub fn node(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }

    /// `<prefix>/endpoints/`
    pub fn endpoints(&self) -> String {
        format!("{}/endpoints/", self.prefix)
    }

    /// `<prefix>/endpoints/<node>/` — everything one host announced.
    pub fn endpoints_of(&self, node: &str) -> String {
        format!("{}/endpoints/{node}/", self.prefix)
    }

    /// `<prefix>/endpoints/<node>/<service>/<instance>`
    pub fn endpoint(&self, node: &str, service: &str, instance: &str) -> String {
        format!("{}/endpoints/{node}/{service}/{instance}", self.prefix)
    }

    /// `<prefix>/policy/services/<service>`
    pub fn policy(&self, service: &str) -> String {
        format!("{}/policy/services/{service}", self.prefix)
    }

    /// `<prefix>/config/services/<service>/<setting>`: an operator-written service-wide
    /// setting (`mode`, `service_port`, `path`, `check_path`).
    pub fn service_setting(&self, service: &str, setting: &str) -> String {
        format!("{}/config/services/{service}/{setting}", self.prefix)
    }

    /// `<prefix>/config/`
    pub fn config(&self) -> String {
        format!("{}/config/", self.prefix)
    }

    /// `<prefix>/rollouts/` — every rollout in progress.
    pub fn rollouts(&self) -> String {
        format!("{}/rollouts/", self.prefix)
    }

    /// `<prefix>/rollouts/<service>`
    pub fn rollout(&self, service: &str) -> String {
        format!("{}/rollouts/{service}", self.prefix)
    }

    /// Classifies `key`. Returns `None` for keys outside the schema (wrong prefix, wrong depth,
    /// names that are not DNS labels / instance ids).
    pub fn parse<'a>(&self, key: &'a str) -> Option<KeyKind<'a>> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        let (kind, rest) = rest.split_once('/')?;
        match kind {
            "nodes" => is_dns_label(rest).then_some(KeyKind::Node { node: rest }),
            "endpoints" => {
                let mut parts = rest.split('/');
                let (node, service, instance) = (parts.next()?, parts.next()?, parts.next()?);
                let ok = parts.next().is_none()
                    && is_dns_label(node)
                    && is_dns_label(service)
                    && !instance.is_empty()
                    && instance.len() <= crate::record::MAX_INSTANCE
                    && instance.chars().all(is_instance_char);
                ok.then_some(KeyKind::Endpoint {
                    node,
                    service,
                    instance,
                })
            }
            "config" if !rest.is_empty() => Some(KeyKind::Config { rest }),
            "policy" => {
                let service = rest.strip_prefix("services/")?;
                is_dns_label(service).then_some(KeyKind::Policy { service })
            }
            "rollouts" => is_dns_label(rest).then_some(KeyKind::Rollout { service: rest }),
            _ => None,
        }
    }
}

/// The smallest key greater than every key starting with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_keys_round_trip() {
        let k = Keys::new("/flotilla").unwrap();
        assert_eq!(k.rollouts(), "/flotilla/rollouts/");
        assert_eq!(k.rollout("web"), "/flotilla/rollouts/web");
        assert_eq!(
            k.parse(&k.rollout("web")),
            Some(KeyKind::Rollout { service: "web" })
        );
        assert!(k.rollout("web").starts_with(&k.rollouts()));
        assert!(!k.rollout("web").starts_with(&k.endpoints()));
    }

    #[test]
    fn rollout_keys_outside_the_schema_are_refused() {
        let k = Keys::new("/flotilla").unwrap();
        for bad in [
            "/flotilla/rollouts/",
            "/flotilla/rollouts/Web",
            "/flotilla/rollouts/web/lock",
            "/flotilla/rollouts/-web",
            "/other/rollouts/web",
        ] {
            assert_eq!(k.parse(bad), None, "{bad}");
        }
    }
}
