//! confgen's own view of the registry, kept up to date incrementally.
//!
//! The registry's [`WatchCache`](flotilla_registry::WatchCache) publishes snapshots; confgen
//! never holds on to one (a held snapshot makes the cache copy its maps on the next event).
//! Instead [`View::sync`] borrows the newest snapshot briefly and:
//!
//! 1. diffs its raw key/value map against confgen's exact copy ([`Store`]) in one merge pass,
//!    giving the keys that changed;
//! 2. for each template ([`TemplateData`]), rebuilds only the services and nodes whose keys
//!    changed **and** lie under the template's `keys`, so the template context (a
//!    `serde_json` tree Tera renders from) never has to be rebuilt as a whole.
//!
//! A template sees exactly the keys it declared: its `services` and `nodes` hold only endpoints
//! and nodes under its `keys`, and `getv` & co. find only keys under them. That keeps "a change
//! re-renders only the templates whose keys it touches" exact.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;
use std::sync::{Arc, RwLock};

use flotilla_registry::{Endpoint, KeyKind, Keys, Node, Snapshot};
use serde_json::{Map, Value};

/// Raw key/value copy shared with the template functions.
pub type Store = Arc<RwLock<BTreeMap<String, Vec<u8>>>>;

/// Which keys a template sees: absolute key prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Absolute etcd key prefixes (resource prefix applied).
    pub keys: Vec<String>,
    /// The resource's prefix, prepended to keys given to `getv` & co.
    pub prefix: String,
}

impl Scope {
    /// A scope that sees every key, without a prefix (offline rendering).
    pub fn everything() -> Scope {
        Scope {
            keys: vec!["/".into()],
            prefix: String::new(),
        }
    }

    /// True if `key` is under one of the scope's prefixes.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// The data one template renders from, updated in place.
#[derive(Debug)]
pub struct TemplateData {
    scope: Scope,
    /// `{"services": {name: [endpoint, …]}, "nodes": {name: node}}`.
    root: Map<String, Value>,
    endpoints: usize,
    built: bool,
    /// Version of each service's endpoint list (bumped when it is rebuilt).
    versions: std::collections::HashMap<String, u64>,
    next_version: u64,
    /// Bumped when anything in scope other than an endpoint changes (config keys, nodes).
    epoch: u64,
}

impl TemplateData {
    /// Empty data for `scope`; filled in by the next [`View::sync`].
    pub fn new(scope: Scope) -> TemplateData {
        let mut root = Map::new();
        root.insert("services".into(), Value::Object(Map::new()));
        root.insert("nodes".into(), Value::Object(Map::new()));
        TemplateData {
            scope,
            root,
            endpoints: 0,
            built: false,
            versions: std::collections::HashMap::new(),
            next_version: 1,
            epoch: 1,
        }
    }

    /// Version of `service`'s endpoint list: changes whenever the list is rebuilt.
    pub fn service_version(&self, service: &str) -> u64 {
        self.versions.get(service).copied().unwrap_or(0)
    }

    /// Changes whenever something in scope other than an endpoint changed (config keys, nodes).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The template's scope.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// Number of valid endpoints this template sees (for the drop guard).
    pub fn endpoint_count(&self) -> usize {
        self.endpoints
    }

    /// Takes the context tree out for rendering; give it back with [`TemplateData::restore`].
    pub fn take_root(&mut self) -> Map<String, Value> {
        std::mem::take(&mut self.root)
    }

    /// Puts the context tree back after rendering.
    pub fn restore(&mut self, root: Map<String, Value>) {
        self.root = root;
    }

    /// The context tree (read-only).
    #[cfg(test)]
    pub fn root(&self) -> &Map<String, Value> {
        &self.root
    }

    fn services_mut(&mut self) -> &mut Map<String, Value> {
        self.root
            .entry("services")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("services is an object")
    }

    fn nodes_mut(&mut self) -> &mut Map<String, Value> {
        self.root
            .entry("nodes")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("nodes is an object")
    }

    fn rebuild_service(&mut self, service: &str, index: &ServiceIndex, snap: &Snapshot) {
        let mut eps: Vec<&Endpoint> = index
            .get(service)
            .into_iter()
            .flatten()
            .filter(|k| self.scope.contains(k))
            .filter_map(|k| snap.endpoints.get(k.as_str()))
            .collect();
        eps.sort_by(|a, b| (&a.node, &a.instance).cmp(&(&b.node, &b.instance)));
        let list: Vec<Value> = eps.iter().map(|ep| endpoint_value(ep)).collect();
        let version = self.next_version;
        self.next_version += 1;
        self.versions.insert(service.to_owned(), version);
        let services = self.services_mut();
        let old = if list.is_empty() {
            services.remove(service)
        } else {
            services.insert(service.to_owned(), Value::Array(list))
        };
        let old_len = old.and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0);
        let new_len = self
            .root
            .get("services")
            .and_then(|s| s.get(service))
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
        self.endpoints = self.endpoints + new_len - old_len;
    }

    fn rebuild_node(&mut self, name: &str, key: &str, snap: &Snapshot) {
        let node = if self.scope.contains(key) {
            snap.nodes.get(name)
        } else {
            None
        };
        let nodes = self.nodes_mut();
        match node {
            Some(n) => {
                nodes.insert(name.to_owned(), node_value(n));
            }
            None => {
                nodes.remove(name);
            }
        }
    }

    fn rebuild_all(&mut self, index: &ServiceIndex, keys: &Keys, snap: &Snapshot) {
        let (next_version, epoch) = (self.next_version, self.epoch + 1);
        *self = TemplateData::new(self.scope.clone());
        // Versions never repeat, so cached per-service renders cannot be mistaken as current.
        self.next_version = next_version;
        self.epoch = epoch;
        for service in index.keys() {
            self.rebuild_service(service, index, snap);
        }
        for name in snap.nodes.keys() {
            let key = keys.node(name);
            self.rebuild_node(name, &key, snap);
        }
        self.built = true;
    }
}

/// The JSON a template sees for one endpoint: every record field (as the record serialises),
/// plus `addr` (`host:port`, `[v6]:port` for IPv6).
///
/// Built field by field rather than through `serde_json::to_value`: this runs for every
/// endpoint when a template's data is built (a sixth of a 10,000-endpoint `--onetime` went into
/// the serializer). A unit test checks it equals the serialised record.
pub fn endpoint_value(ep: &Endpoint) -> Value {
    let s = |v: &str| Value::String(v.to_owned());
    let addr = if ep.host.parse::<Ipv6Addr>().is_ok() {
        format!("[{}]:{}", ep.host, ep.port)
    } else {
        format!("{}:{}", ep.host, ep.port)
    };
    let mut m = Map::new();
    m.insert("service".into(), s(&ep.service));
    m.insert("instance".into(), s(&ep.instance));
    m.insert("node".into(), s(&ep.node));
    m.insert("host".into(), s(&ep.host));
    m.insert("port".into(), Value::from(ep.port));
    m.insert(
        "proto".into(),
        s(match ep.proto {
            flotilla_registry::Proto::Tcp => "tcp",
            flotilla_registry::Proto::Udp => "udp",
        }),
    );
    m.insert("container".into(), s(&ep.container));
    m.insert("image".into(), s(&ep.image));
    m.insert(
        "tags".into(),
        Value::Array(ep.tags.iter().map(|t| s(t)).collect()),
    );
    m.insert(
        "meta".into(),
        Value::Object(ep.meta.iter().map(|(k, v)| (k.clone(), s(v))).collect()),
    );
    m.insert(
        "health".into(),
        s(match ep.health {
            flotilla_registry::Health::Healthy => "healthy",
            flotilla_registry::Health::Unhealthy => "unhealthy",
            flotilla_registry::Health::None => "none",
        }),
    );
    m.insert("registered_at".into(), s(&ep.registered_at));
    m.insert("addr".into(), Value::String(addr));
    Value::Object(m)
}

fn node_value(n: &Node) -> Value {
    serde_json::to_value(n).expect("Node serialises")
}

/// service name → etcd keys of its valid endpoints.
type ServiceIndex = BTreeMap<String, BTreeSet<String>>;

/// What one [`View::sync`] found.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Keys put, changed or deleted since the previous sync.
    pub keys: Vec<String>,
    /// The snapshot's revision.
    pub revision: i64,
}

/// confgen's mirror of the registry.
#[derive(Debug)]
pub struct View {
    keys: Keys,
    store: Store,
    index: ServiceIndex,
    revision: i64,
    complete: bool,
}

impl View {
    /// An empty view for the key schema `keys`.
    pub fn new(keys: Keys) -> View {
        View {
            keys,
            store: Arc::new(RwLock::new(BTreeMap::new())),
            index: BTreeMap::new(),
            revision: 0,
            complete: false,
        }
    }

    /// The raw store, shared with template functions.
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// The key schema.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Revision of the last synced snapshot.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// True once a complete snapshot was synced.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// Brings the view and every template's data up to date with `snap`. Templates whose data
    /// was never built are built in full; the others get the services and nodes the changed
    /// keys touch. Returns the changed keys.
    pub fn sync<'a>(
        &mut self,
        snap: &Snapshot,
        templates: impl IntoIterator<Item = &'a mut TemplateData>,
    ) -> Changes {
        let mut changes = Changes {
            keys: Vec::new(),
            revision: snap.revision,
        };
        if !snap.complete {
            return changes;
        }
        self.complete = true;
        self.revision = snap.revision;
        {
            let mut store = self.store.write().expect("store lock");
            changes.keys = diff(&store, &snap.kvs);
            for k in &changes.keys {
                match snap.kvs.get(k.as_str()) {
                    Some(v) => {
                        store.insert(k.clone(), v.clone());
                    }
                    None => {
                        store.remove(k.as_str());
                    }
                }
            }
        }
        let mut touched_services: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut touched_nodes: Vec<(&str, &str)> = Vec::new();
        for k in &changes.keys {
            match self.keys.parse(k) {
                Some(KeyKind::Endpoint { service, .. }) => {
                    if snap.endpoints.contains_key(k.as_str()) {
                        self.index
                            .entry(service.to_owned())
                            .or_default()
                            .insert(k.clone());
                    } else if let Some(set) = self.index.get_mut(service) {
                        set.remove(k.as_str());
                        if set.is_empty() {
                            self.index.remove(service);
                        }
                    }
                    touched_services.entry(service).or_default().push(k);
                }
                Some(KeyKind::Node { node }) => touched_nodes.push((node, k)),
                _ => {}
            }
        }
        for data in templates {
            if !data.built {
                data.rebuild_all(&self.index, &self.keys, snap);
                continue;
            }
            for (service, keys) in &touched_services {
                if keys.iter().any(|k| data.scope.contains(k)) {
                    data.rebuild_service(service, &self.index, snap);
                }
            }
            for (node, key) in &touched_nodes {
                if data.scope.contains(key) {
                    data.rebuild_node(node, key, snap);
                }
            }
            let other = changes.keys.iter().any(|k| {
                data.scope.contains(k)
                    && !matches!(self.keys.parse(k), Some(KeyKind::Endpoint { .. }))
            });
            if other {
                data.epoch += 1;
            }
        }
        changes
    }
}

/// Keys whose value differs between `old` and `new` (added, changed or removed), in key order:
/// one merge pass over both sorted maps.
fn diff(old: &BTreeMap<String, Vec<u8>>, new: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let mut out = Vec::new();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, _)), None) => {
                out.push((*ka).clone());
                a.next();
            }
            (None, Some((kb, _))) => {
                out.push((*kb).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((*kb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        out.push((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

/// Builds a complete [`Snapshot`] from raw key/values, decoding records exactly as the watch
/// cache does (invalid ones are left out and listed in `rejected`). Used by `confgen render` and
/// by tests.
pub fn snapshot_from_kvs(keys: &Keys, revision: i64, kvs: BTreeMap<String, Vec<u8>>) -> Snapshot {
    let mut endpoints = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    let mut rejected = BTreeMap::new();
    for (k, v) in &kvs {
        match keys.parse(k) {
            Some(KeyKind::Endpoint { .. }) => match Endpoint::decode(keys, k, v) {
                Ok(ep) => {
                    endpoints.insert(k.clone(), ep);
                }
                Err(e) => {
                    rejected.insert(k.clone(), e.to_string());
                }
            },
            Some(KeyKind::Node { .. }) => match Node::decode(keys, k, v) {
                Ok(n) => {
                    nodes.insert(n.node.clone(), n);
                }
                Err(e) => {
                    rejected.insert(k.clone(), e.to_string());
                }
            },
            _ => {}
        }
    }
    Snapshot {
        revision,
        complete: true,
        kvs: Arc::new(kvs),
        endpoints: Arc::new(endpoints),
        nodes: Arc::new(nodes),
        rejected: Arc::new(rejected),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ep_json(node: &str, service: &str, n: u32, host: &str) -> (String, Vec<u8>) {
        let keys = Keys::new("/flotilla").unwrap();
        let instance = format!("{node}-0123456789ab-{n}");
        let ep = Endpoint {
            service: service.into(),
            instance: instance.clone(),
            node: node.into(),
            host: host.into(),
            port: 8000 + n as u16,
            proto: flotilla_registry::Proto::Tcp,
            container: "0123456789ab".into(),
            image: "example/web:1.0".into(),
            tags: vec![],
            meta: BTreeMap::new(),
            health: flotilla_registry::Health::None,
            registered_at: "2024-01-01T00:00:00Z".into(),
        };
        (ep.key(&keys), ep.encode(&keys).unwrap())
    }

    fn snap(kvs: &[(String, Vec<u8>)], rev: i64) -> Snapshot {
        let keys = Keys::new("/flotilla").unwrap();
        snapshot_from_kvs(&keys, rev, kvs.iter().cloned().collect())
    }

    fn services(d: &TemplateData) -> Vec<(String, Vec<String>)> {
        d.root()["services"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["instance"].as_str().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn incremental_updates_match_a_full_build() {
        let keys = Keys::new("/flotilla").unwrap();
        let mut view = View::new(keys.clone());
        let scope = Scope {
            keys: vec!["/flotilla/".into()],
            prefix: String::new(),
        };
        let mut data = TemplateData::new(scope.clone());
        let mut kvs = vec![
            ep_json("b", "web", 1, "127.0.0.2"),
            ep_json("a-b", "web", 2, "127.0.0.3"),
            ep_json("a", "web", 3, "::1"),
            ep_json("a", "db", 4, "127.0.0.4"),
            ("/flotilla/config/x".to_string(), b"hello".to_vec()),
        ];
        let c = view.sync(&snap(&kvs, 5), [&mut data]);
        assert_eq!(c.keys.len(), 5);
        assert_eq!(
            services(&data),
            vec![
                ("db".to_string(), vec!["a-0123456789ab-4".to_string()]),
                (
                    "web".to_string(),
                    vec![
                        "a-0123456789ab-3".to_string(),
                        "a-b-0123456789ab-2".to_string(),
                        "b-0123456789ab-1".to_string()
                    ]
                )
            ]
        );
        assert_eq!(data.endpoint_count(), 4);
        assert_eq!(data.root()["services"]["web"][0]["addr"], "[::1]:8003");
        // Change one, delete one, add one invalid record.
        kvs[0] = ep_json("b", "web", 1, "127.0.0.9");
        kvs.remove(3);
        kvs.push((
            "/flotilla/endpoints/c/web/c-0123456789ab-1".into(),
            b"{not json".to_vec(),
        ));
        let c = view.sync(&snap(&kvs, 6), [&mut data]);
        assert_eq!(c.keys.len(), 3, "{:?}", c.keys);
        let mut full = TemplateData::new(scope);
        View::new(keys).sync(&snap(&kvs, 6), [&mut full]);
        assert_eq!(data.root(), full.root());
        assert_eq!(data.endpoint_count(), 3);
        assert_eq!(full.endpoint_count(), 3);
        // Nothing changed: nothing reported.
        assert!(view.sync(&snap(&kvs, 7), [&mut data]).keys.is_empty());
    }

    #[test]
    fn a_template_sees_only_its_keys() {
        let keys = Keys::new("/flotilla").unwrap();
        let mut view = View::new(keys);
        let mut only_a = TemplateData::new(Scope {
            keys: vec!["/flotilla/endpoints/a/".into()],
            prefix: String::new(),
        });
        let kvs = vec![
            ep_json("a", "web", 1, "127.0.0.2"),
            ep_json("b", "web", 2, "127.0.0.3"),
        ];
        view.sync(&snap(&kvs, 2), [&mut only_a]);
        assert_eq!(
            services(&only_a),
            vec![("web".to_string(), vec!["a-0123456789ab-1".to_string()])]
        );
        assert_eq!(only_a.endpoint_count(), 1);
    }

    #[test]
    fn endpoint_values_are_the_serialised_record_plus_addr() {
        use flotilla_registry::{Health, Proto};
        let keys = Keys::new("/flotilla").unwrap();
        for (host, proto, health) in [
            ("127.0.0.2", Proto::Tcp, Health::Healthy),
            ("::1", Proto::Udp, Health::Unhealthy),
            ("db.example.org", Proto::Tcp, Health::None),
        ] {
            let (k, v) = ep_json("a", "web", 1, host);
            let mut ep = Endpoint::decode(&keys, &k, &v).unwrap();
            ep.proto = proto;
            ep.health = health;
            ep.tags = vec!["v1".into(), "x=y".into()];
            ep.meta.insert("path".into(), "/api".into());
            let mut want = serde_json::to_value(&ep).unwrap();
            let addr = if host == "::1" {
                "[::1]:8001".to_string()
            } else {
                format!("{host}:8001")
            };
            want["addr"] = Value::String(addr);
            assert_eq!(endpoint_value(&ep), want);
        }
    }

    #[test]
    fn incomplete_snapshots_are_ignored() {
        let mut view = View::new(Keys::new("/flotilla").unwrap());
        let mut data = TemplateData::new(Scope::everything());
        let c = view.sync(&Snapshot::default(), [&mut data]);
        assert!(c.keys.is_empty());
        assert!(!view.complete());
    }
}
