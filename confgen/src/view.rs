//! confgen's view of the registry, kept up to date from the watch cache's change stream.
//!
//! The registry's [`WatchCache`](flotilla_registry::WatchCache) publishes an
//! [`Update`](flotilla_registry::Update) per listing or watch response: the keys it changed and
//! the snapshot after it (persistent maps, shared, never copied). [`View::sync`] applies one:
//!
//! 1. the per-service and per-node indexes are updated for the changed keys only;
//! 2. every service those keys touch (an endpoint of it, its claim policy, its settings under
//!    `config/services/<svc>/`, the node record of a node announcing it, a node's cap) has its
//!    **routed** list recomputed by the admission rules of [`crate::admit`]: endpoints left out
//!    are named in one log line per (service, node, reason) and counted by reason;
//! 3. for each template ([`TemplateData`]), only the services whose routed list changed and lie
//!    under the template's `keys` are rebuilt, so the template context (a `serde_json` tree Tera
//!    renders from) is never rebuilt as a whole.
//!
//! A template sees exactly the keys it declared: its `services` and `nodes` hold only endpoints
//! and nodes under its `keys`, and `getv` & co. find only keys under them (and never the raw
//! value of an endpoint that is not routed). That keeps "a change re-renders only the templates
//! whose keys it touches" exact.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;
use std::sync::{Arc, RwLock};

use flotilla_registry::policy::ServicePolicy;
use flotilla_registry::{Bytes, Endpoint, KeyKind, Keys, Node, Snapshot, Update};
use imbl::{OrdMap, OrdSet};
use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::admit::{self, AdmitArgs, Excluded, Settings, SETTINGS};

/// The raw key/values template functions read: the registry snapshot's map (shared with the
/// watch cache), minus the endpoint records that are not routed.
#[derive(Debug, Default, Clone)]
pub struct KvStore {
    kvs: OrdMap<String, Bytes>,
    hidden: OrdSet<String>,
}

impl KvStore {
    /// The raw value at `key`, unless it is an endpoint that is not routed.
    pub fn get(&self, key: &str) -> Option<&Bytes> {
        if self.hidden.contains(key) {
            return None;
        }
        self.kvs.get(key)
    }

    /// Visible keys from `start` on, in order.
    pub fn range_from<'a>(&'a self, start: &str) -> impl Iterator<Item = (&'a String, &'a Bytes)> {
        self.kvs
            .range(start.to_string()..)
            .filter(|(k, _)| !self.hidden.contains(*k))
    }

    /// A store over plain key/values (tests).
    #[cfg(test)]
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Vec<u8>)>) -> KvStore {
        KvStore {
            kvs: pairs
                .into_iter()
                .map(|(k, v)| (k, Bytes::from(v)))
                .collect(),
            hidden: OrdSet::new(),
        }
    }
}

/// Raw key/value store shared with the template functions.
pub type Store = Arc<RwLock<KvStore>>;

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

/// An endpoint's etcd key as the view holds it: one allocation shared by the service and node
/// indexes and the routed lists (three copies of every key cost 1.6 MB at 10,000 endpoints).
pub type Key = Arc<str>;

/// One service as proxies should route it: the admitted endpoints (sorted by node, instance)
/// with their keys, and the service's effective settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routed {
    /// (etcd key, endpoint), sorted by (node, instance).
    pub eps: Vec<(Key, Arc<Endpoint>)>,
    /// Effective service-wide settings.
    pub settings: Settings,
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
    /// Endpoint keys left out of this template because its check failed with them (see
    /// `Daemon::isolate`); released when the key changes or is deleted.
    quarantine: BTreeSet<String>,
    /// Routed endpoint keys put since the last successful apply: the suspects when a check
    /// fails.
    suspects: BTreeSet<String>,
    /// Every routed endpoint is a suspect (nothing was applied since the data was built): set
    /// instead of listing 10,000 keys in `suspects`.
    all_suspect: bool,
    /// Each service's list (shared, cheap to clone: a memoised template reads it and builds the
    /// JSON of the services it renders only).
    lists: OrdMap<String, Arc<ServiceList>>,
    /// Whether `root.services` holds the JSON of every service (a template that is not
    /// memoised renders from it; a memoised one does not need it, see [`crate::memo`]).
    json: bool,
}

/// One service's endpoints as one template sees them (scope and quarantine applied), with the
/// service's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceList {
    /// Sorted by (node, instance).
    pub eps: Vec<Arc<Endpoint>>,
    /// The service's effective settings.
    pub settings: Settings,
}

impl ServiceList {
    /// The list as templates see it: one [`endpoint_value`] per endpoint.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.eps
                .iter()
                .map(|e| endpoint_value(e, &self.settings))
                .collect(),
        )
    }
}

fn same_endpoints(a: &[Arc<Endpoint>], b: &[Arc<Endpoint>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
}

/// What a [`TemplateData::apply`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dirty {
    /// Something the template sees changed.
    pub any: bool,
    /// A key other than an endpoint (config, node) changed: a failed apply should be retried
    /// at once rather than after its backoff (the change may be the fix).
    pub config: bool,
}

impl TemplateData {
    /// Empty data for `scope`; filled in by the next [`TemplateData::apply`].
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
            quarantine: BTreeSet::new(),
            suspects: BTreeSet::new(),
            all_suspect: false,
            lists: OrdMap::new(),
            json: true,
        }
    }

    /// Each service's list (O(1) to clone).
    pub fn lists(&self) -> &OrdMap<String, Arc<ServiceList>> {
        &self.lists
    }

    /// Keep `root.services` as JSON (`true`, the default) or not. Turning it on builds it.
    pub fn want_json(&mut self, json: bool) {
        if json == self.json {
            return;
        }
        self.json = json;
        let services: Map<String, Value> = if json {
            self.lists
                .iter()
                .map(|(name, l)| (name.clone(), l.to_json()))
                .collect()
        } else {
            Map::new()
        };
        *self.services_mut() = services;
    }

    /// Version of `service`'s endpoint list: changes whenever the list is rebuilt.
    pub fn service_version(&self, service: &str) -> u64 {
        self.versions.get(service).copied().unwrap_or(0)
    }

    /// The version of every service's list.
    pub fn versions(&self) -> &std::collections::HashMap<String, u64> {
        &self.versions
    }

    /// Changes whenever something in scope other than an endpoint changed (config keys, nodes).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The template's scope.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// Number of endpoints this template renders (for the drop guard).
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

    /// Routed endpoint keys put since the last successful apply.
    pub fn suspects(&self, keys: &Keys) -> Vec<String> {
        if !self.all_suspect {
            return self.suspects.iter().cloned().collect();
        }
        let mut all: BTreeSet<String> = self
            .lists
            .values()
            .flat_map(|l| l.eps.iter().map(|e| e.key(keys)))
            .collect();
        all.extend(self.suspects.iter().cloned());
        all.into_iter().collect()
    }

    /// Keys currently left out by quarantine.
    pub fn quarantined(&self) -> &BTreeSet<String> {
        &self.quarantine
    }

    /// The last apply succeeded: nothing is suspect any more.
    pub fn applied(&mut self) {
        self.suspects.clear();
        self.all_suspect = false;
    }

    /// Replaces the quarantine set and rebuilds the services it adds or releases.
    pub fn set_quarantine(&mut self, keys: BTreeSet<String>, view: &View) {
        let touched: BTreeSet<String> = self
            .quarantine
            .symmetric_difference(&keys)
            .filter_map(|k| match view.keys.parse(k) {
                Some(KeyKind::Endpoint { service, .. }) => Some(service.to_owned()),
                _ => None,
            })
            .collect();
        self.quarantine = keys;
        for svc in touched {
            self.rebuild_service(&svc, view);
        }
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

    /// Rebuilds `service` from the view's routed list; returns true if what the template sees
    /// changed.
    fn rebuild_service(&mut self, service: &str, view: &View) -> bool {
        let routed = view.routed.get(service);
        let eps: Vec<Arc<Endpoint>> = routed
            .map(|r| {
                r.eps
                    .iter()
                    .filter(|(k, _)| {
                        self.scope.contains(k) && !self.quarantine.contains(k.as_ref())
                    })
                    .map(|(_, ep)| ep.clone())
                    .collect()
            })
            .unwrap_or_default();
        let settings = routed.map(|r| r.settings.clone()).unwrap_or_default();
        let old_len = match self.lists.get(service) {
            Some(old) if old.settings == settings && same_endpoints(&old.eps, &eps) => {
                return false
            }
            Some(old) => old.eps.len(),
            None if eps.is_empty() => return false,
            None => 0,
        };
        let new_len = eps.len();
        if eps.is_empty() {
            self.lists.remove(service);
            if self.json {
                self.services_mut().remove(service);
            }
        } else {
            let list = Arc::new(ServiceList { eps, settings });
            if self.json {
                let value = list.to_json();
                self.services_mut().insert(service.to_owned(), value);
            }
            self.lists.insert(service.to_owned(), list);
        }
        self.endpoints = self.endpoints + new_len - old_len;
        let version = self.next_version;
        self.next_version += 1;
        self.versions.insert(service.to_owned(), version);
        true
    }

    fn rebuild_node(&mut self, name: &str, key: &str, view: &View) {
        let node = if self.scope.contains(key) {
            view.snap.nodes.get(name)
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

    fn rebuild_all(&mut self, view: &View) {
        let (next_version, epoch, json) = (self.next_version, self.epoch + 1, self.json);
        let quarantine = std::mem::take(&mut self.quarantine);
        let suspects = std::mem::take(&mut self.suspects);
        *self = TemplateData::new(self.scope.clone());
        // Versions never repeat, so cached per-service renders cannot be mistaken as current.
        self.next_version = next_version;
        self.epoch = epoch;
        self.quarantine = quarantine;
        self.suspects = suspects;
        self.json = json;
        for service in view.routed.keys() {
            self.rebuild_service(service, view);
        }
        for name in view.snap.nodes.keys() {
            let key = view.keys.node(name);
            self.rebuild_node(name, &key, view);
        }
        self.built = true;
    }

    /// Brings this template's data up to date with what [`View::sync`] found.
    pub fn apply(&mut self, view: &View, changes: &Changes) -> Dirty {
        if !view.complete {
            return Dirty::default();
        }
        let mut dirty = Dirty::default();
        let mut services = changes.services.clone();
        for k in &changes.keys {
            let in_scope = self.scope.contains(k);
            match view.keys.parse(k) {
                Some(KeyKind::Endpoint { service, .. }) => {
                    if self.quarantine.remove(k.as_str()) {
                        services.insert(service.to_owned());
                    }
                    if !self.built || self.all_suspect {
                        // All of them are suspects already (see `all_suspect`).
                    } else if in_scope && view.is_routed(k) {
                        self.suspects.insert(k.clone());
                    } else {
                        self.suspects.remove(k.as_str());
                    }
                }
                Some(KeyKind::Node { .. }) if in_scope => dirty.config = true,
                _ if in_scope => dirty.config = true,
                _ => {}
            }
        }
        if !self.built {
            self.rebuild_all(view);
            self.all_suspect = true;
            return Dirty {
                any: true,
                config: true,
            };
        }
        for service in &services {
            dirty.any |= self.rebuild_service(service, view);
        }
        for (node, key) in &changes.nodes {
            if self.scope.contains(key) {
                self.rebuild_node(node, key, view);
            }
        }
        if dirty.config {
            self.epoch += 1;
            dirty.any = true;
        }
        dirty
    }
}

/// The JSON a template sees for one endpoint: every record field (as the record serialises),
/// plus `addr` (`host:port`, `[v6]:port` for IPv6), with the service's effective settings in
/// place of the endpoint's own meta for `mode`, `service_port`, `path` and `check_path`.
///
/// Built field by field rather than through `serde_json::to_value`: this runs for every
/// endpoint when a template's data is built (a sixth of a 10,000-endpoint `--onetime` went into
/// the serializer). A unit test checks it equals the serialised record plus `addr`.
pub fn endpoint_value(ep: &Endpoint, settings: &Settings) -> Value {
    let s = |v: &str| Value::String(v.to_owned());
    let addr = if ep.host.parse::<Ipv6Addr>().is_ok() {
        format!("[{}]:{}", ep.host, ep.port)
    } else {
        format!("{}:{}", ep.host, ep.port)
    };
    let meta: Map<String, Value> = if settings.values.is_empty() {
        ep.meta
            .iter()
            .filter(|(k, _)| !SETTINGS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), s(v)))
            .collect()
    } else {
        let mut meta: Map<String, Value> = ep
            .meta
            .iter()
            .filter(|(k, _)| !SETTINGS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), s(v)))
            .collect();
        for (k, v) in &settings.values {
            meta.insert((*k).to_owned(), s(v));
        }
        meta
    };
    // In key order: a map collected from sorted pairs is built in one pass (no search per
    // insert), which is most of what this function costs.
    let m: Map<String, Value> = [
        ("addr", Value::String(addr)),
        ("container", s(&ep.container)),
        (
            "health",
            s(match ep.health {
                flotilla_registry::Health::Healthy => "healthy",
                flotilla_registry::Health::Unhealthy => "unhealthy",
                flotilla_registry::Health::None => "none",
            }),
        ),
        ("host", s(&ep.host)),
        ("image", s(&ep.image)),
        ("instance", s(&ep.instance)),
        ("meta", Value::Object(meta)),
        ("node", s(&ep.node)),
        ("port", Value::from(ep.port)),
        (
            "proto",
            s(match ep.proto {
                flotilla_registry::Proto::Tcp => "tcp",
                flotilla_registry::Proto::Udp => "udp",
            }),
        ),
        ("registered_at", s(&ep.registered_at)),
        ("service", s(&ep.service)),
        ("tags", Value::Array(ep.tags.iter().map(|t| s(t)).collect())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Value::Object(m)
}

fn node_value(n: &Node) -> Value {
    serde_json::to_value(n).expect("Node serialises")
}

/// What one [`View::sync`] found.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Keys put, changed or deleted by the update.
    pub keys: Vec<String>,
    /// Services whose routed list or settings changed.
    pub services: BTreeSet<String>,
    /// (node name, node key) of node records put or deleted.
    pub nodes: Vec<(String, String)>,
    /// The snapshot's revision.
    pub revision: i64,
}

/// confgen's view of the registry: the current snapshot, the routed endpoints of every
/// service, and what was left out and why.
#[derive(Debug)]
pub struct View {
    keys: Keys,
    opts: AdmitArgs,
    snap: Snapshot,
    store: Store,
    /// service → keys of its valid endpoint records.
    by_service: BTreeMap<String, BTreeSet<Key>>,
    /// node → keys of its valid endpoint records.
    by_node: BTreeMap<String, BTreeSet<Key>>,
    /// node → its keys beyond its caps.
    over_cap: BTreeMap<String, BTreeMap<String, Excluded>>,
    /// The last valid claim policy of each service that has one.
    policies: BTreeMap<String, ServicePolicy>,
    routed: BTreeMap<String, Routed>,
    excluded: BTreeMap<String, Excluded>,
    /// Exclusions by (service, node, reason), for logging per incident.
    groups: Groups,
    /// The keys of `excluded`, as the store's persistent set (shared with template functions).
    hidden: OrdSet<String>,
    revision: i64,
    complete: bool,
}

impl View {
    /// An empty view for the key schema `keys`, admitting endpoints by `opts`.
    pub fn new(keys: Keys, opts: AdmitArgs) -> View {
        View {
            keys,
            opts,
            snap: Snapshot::default(),
            store: Store::default(),
            by_service: BTreeMap::new(),
            by_node: BTreeMap::new(),
            over_cap: BTreeMap::new(),
            policies: BTreeMap::new(),
            routed: BTreeMap::new(),
            excluded: BTreeMap::new(),
            groups: Groups::new(),
            hidden: OrdSet::new(),
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

    /// Revision of the last synced update.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// True once a complete snapshot was synced.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// True if the endpoint at `key` is routed.
    pub fn is_routed(&self, key: &str) -> bool {
        self.snap.endpoints.contains_key(key) && !self.excluded.contains_key(key)
    }

    /// Valid endpoint records left out, by reason label.
    pub fn excluded_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for e in self.excluded.values() {
            *out.entry(e.label()).or_default() += 1;
        }
        out
    }

    /// Applies one update of the watch cache (`update.snapshot` must follow the previous one)
    /// and returns what changed.
    pub fn sync(&mut self, update: &Update) -> Changes {
        let snap = &update.snapshot;
        let mut changes = Changes {
            revision: snap.revision,
            ..Changes::default()
        };
        if !snap.complete {
            return changes;
        }
        self.complete = true;
        self.revision = snap.revision;
        self.snap = snap.clone();
        changes.keys = update.changed.as_ref().clone();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let mut cap_nodes: BTreeSet<String> = BTreeSet::new();
        let mut log = ExclusionLog::default();
        for k in &changes.keys {
            match self.keys.parse(k) {
                Some(KeyKind::Endpoint { node, service, .. }) => {
                    if self.snap.endpoints.contains_key(k.as_str()) {
                        let key = self.shared_key(node, k);
                        self.by_service
                            .entry(service.to_owned())
                            .or_default()
                            .insert(key.clone());
                        self.by_node.entry(node.to_owned()).or_default().insert(key);
                    } else {
                        remove_from(&mut self.by_service, service, k);
                        remove_from(&mut self.by_node, node, k);
                        // Deleted (or no longer a valid record): not excluded, just gone.
                        if let Some(was) = self.excluded.remove(k.as_str()) {
                            self.hidden.remove(k.as_str());
                            log.gone(service, k, &was);
                        }
                    }
                    touched.insert(service.to_owned());
                    cap_nodes.insert(node.to_owned());
                }
                Some(KeyKind::Node { node }) => {
                    changes.nodes.push((node.to_owned(), k.clone()));
                    touched.extend(self.services_of_node(node));
                }
                Some(KeyKind::Policy { service }) => {
                    self.update_policy(service, k);
                    touched.insert(service.to_owned());
                }
                Some(KeyKind::Config { rest }) => {
                    if let Some(service) = rest
                        .strip_prefix("services/")
                        .and_then(|r| r.split_once('/'))
                        .map(|(svc, _)| svc)
                    {
                        touched.insert(service.to_owned());
                    }
                }
                Some(KeyKind::Rollout { .. }) | None => {}
            }
        }
        for node in cap_nodes {
            touched.extend(self.update_caps(&node));
        }
        for service in &touched {
            if self.route_service(service, &mut log) {
                changes.services.insert(service.clone());
            }
        }
        self.emit(log);
        *self.store.write().expect("store lock") = KvStore {
            kvs: self.snap.kvs.clone(),
            hidden: self.hidden.clone(),
        };
        changes
    }

    /// The view's one copy of endpoint key `k` of `node`: the one it holds already, else a
    /// new one.
    fn shared_key(&self, node: &str, k: &str) -> Key {
        self.by_node
            .get(node)
            .and_then(|set| set.get(k))
            .cloned()
            .unwrap_or_else(|| Key::from(k))
    }

    /// Services with endpoints from `node`.
    fn services_of_node(&self, node: &str) -> BTreeSet<String> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|k| match self.keys.parse(k) {
                Some(KeyKind::Endpoint { service, .. }) => Some(service.to_owned()),
                _ => None,
            })
            .collect()
    }

    fn update_policy(&mut self, service: &str, key: &str) {
        match self.snap.kvs.get(key) {
            None => {
                if self.policies.remove(service).is_some() {
                    info!(
                        service,
                        key, "claim policy removed: the service is open to every node again"
                    );
                }
            }
            Some(raw) => match ServicePolicy::decode(key, raw) {
                Ok(p) => {
                    self.policies.insert(service.to_owned(), p);
                }
                Err(e) => {
                    let kept = if self.policies.contains_key(service) {
                        "the previous policy stays in force"
                    } else {
                        self.policies
                            .insert(service.to_owned(), ServicePolicy::default());
                        "no node may announce the service until it is fixed"
                    };
                    warn!(service, key, field = %e.field, reason = %e.reason, "invalid claim policy; {kept}");
                }
            },
        }
    }

    /// Recomputes which of `node`'s keys are over its caps; returns the services whose keys
    /// moved in or out.
    fn update_caps(&mut self, node: &str) -> BTreeSet<String> {
        let mut over = BTreeMap::new();
        let (mut count, mut bytes) = (0usize, 0usize);
        for k in self.by_node.get(node).into_iter().flatten() {
            count += 1;
            bytes += self.snap.kvs.get(k.as_ref()).map_or(0, |v| v.len());
            let e = if count > self.opts.max_endpoints_per_node {
                Some(Excluded::NodeCap {
                    what: "endpoints",
                    limit: self.opts.max_endpoints_per_node,
                })
            } else if bytes > self.opts.max_bytes_per_node {
                Some(Excluded::NodeCap {
                    what: "bytes",
                    limit: self.opts.max_bytes_per_node,
                })
            } else {
                None
            };
            if let Some(e) = e {
                over.insert(k.to_string(), e);
            }
        }
        let old = if over.is_empty() {
            self.over_cap.remove(node).unwrap_or_default()
        } else {
            self.over_cap
                .insert(node.to_owned(), over.clone())
                .unwrap_or_default()
        };
        let moved: BTreeSet<&String> = old
            .keys()
            .filter(|k| !over.contains_key(*k))
            .chain(over.keys().filter(|k| !old.contains_key(*k)))
            .collect();
        moved
            .into_iter()
            .filter_map(|k| match self.keys.parse(k) {
                Some(KeyKind::Endpoint { service, .. }) => Some(service.to_owned()),
                _ => None,
            })
            .collect()
    }

    /// Marks `key` excluded for `why`; returns its previous exclusion.
    fn exclude(&mut self, key: &str, why: &Excluded) -> Option<Excluded> {
        self.hidden.insert(key.to_owned());
        self.excluded.insert(key.to_owned(), why.clone())
    }

    /// Records each key's verdict of [`View::route_service`] (excluded, or routed again) and
    /// what to log about it.
    fn apply_verdicts(
        &mut self,
        service: &str,
        verdicts: Vec<(Key, Option<Excluded>)>,
        log: &mut ExclusionLog,
    ) {
        for (k, verdict) in verdicts {
            let k: &str = &k;
            match verdict {
                Some(e) => match self.exclude(k, &e) {
                    Some(old) if old == e => {}
                    Some(old) => {
                        log.gone(service, k, &old);
                        log.left_out(service, k, &e);
                    }
                    None => log.left_out(service, k, &e),
                },
                None => {
                    if let Some(was) = self.excluded.remove(k) {
                        self.hidden.remove(k);
                        log.routed_again(service, k, &was);
                    }
                }
            }
        }
    }

    /// The operator's settings of `service` (`<prefix>/config/services/<svc>/<setting>`).
    fn service_config(&self, service: &str) -> BTreeMap<&'static str, String> {
        let mut config = BTreeMap::new();
        for setting in SETTINGS {
            if let Some(v) = self
                .snap
                .kvs
                .get(&self.keys.service_setting(service, setting))
            {
                let v = String::from_utf8_lossy(v).trim().to_owned();
                if !v.is_empty() {
                    config.insert(setting, v);
                }
            }
        }
        config
    }

    /// Recomputes the routed list of `service`; returns true if it changed.
    fn route_service(&mut self, service: &str, log: &mut ExclusionLog) -> bool {
        let mut admitted: Vec<(Key, Arc<Endpoint>)> = Vec::new();
        let mut verdicts: Vec<(Key, Option<Excluded>)> = Vec::new();
        let policy = self.policies.get(service);
        for k in self.by_service.get(service).into_iter().flatten() {
            let Some(ep) = self.snap.endpoints.get(k.as_ref()) else {
                continue;
            };
            let node_cap = self
                .over_cap
                .get(&ep.node)
                .and_then(|m| m.get(k.as_ref()))
                .cloned();
            let verdict = match node_cap {
                Some(e) => Err(e),
                None => admit::check(
                    &self.opts,
                    ep,
                    self.snap.nodes.get(&ep.node).map(Arc::as_ref),
                    policy,
                ),
            };
            match verdict {
                Ok(()) => admitted.push((k.clone(), ep.clone())),
                Err(e) => verdicts.push((k.clone(), Some(e))),
            }
        }
        // One instance id per service: the endpoint whose node is the longer prefix of it wins.
        admitted.sort_by(|a, b| {
            (&a.1.instance, std::cmp::Reverse(a.1.node.len()))
                .cmp(&(&b.1.instance, std::cmp::Reverse(b.1.node.len())))
        });
        let mut unique: Vec<(Key, Arc<Endpoint>)> = Vec::with_capacity(admitted.len());
        for (k, ep) in admitted {
            match unique.last() {
                Some((kept, prev)) if prev.instance == ep.instance => verdicts.push((
                    k,
                    Some(Excluded::DuplicateInstance {
                        kept: kept.to_string(),
                    }),
                )),
                _ => {
                    verdicts.push((k.clone(), None));
                    unique.push((k, ep));
                }
            }
        }
        unique.sort_by(|a, b| (&a.1.node, &a.1.instance).cmp(&(&b.1.node, &b.1.instance)));
        self.apply_verdicts(service, verdicts, log);
        let config = self.service_config(service);
        let eps: Vec<&Endpoint> = unique.iter().map(|(_, e)| e.as_ref()).collect();
        let next = Routed {
            settings: Settings::effective(&config, &eps),
            eps: unique,
        };
        let same = match self.routed.get(service) {
            Some(old) => {
                old.settings == next.settings
                    && old.eps.len() == next.eps.len()
                    && old
                        .eps
                        .iter()
                        .zip(&next.eps)
                        .all(|(a, b)| a.0 == b.0 && (Arc::ptr_eq(&a.1, &b.1) || a.1 == b.1))
            }
            None => next.eps.is_empty() && next.settings == Settings::default(),
        };
        if next.eps.is_empty() {
            self.routed.remove(service);
        } else {
            self.routed.insert(service.to_owned(), next);
        }
        !same
    }
}

fn remove_from(index: &mut BTreeMap<String, BTreeSet<Key>>, name: &str, key: &str) {
    if let Some(set) = index.get_mut(name) {
        set.remove(key);
        if set.is_empty() {
            index.remove(name);
        }
    }
}

/// Exclusions found in one sync, to be logged. Logging is per incident, not per key: a
/// (service, node, reason) group is logged once when its first key is left out (naming that key
/// and the reason) and once when its last one is routed again; keys that join a group already
/// left out are logged at debug (a flood of 5,000 endpoints is one line; the metric counts them).
#[derive(Default)]
struct ExclusionLog {
    out: Vec<(String, String, Excluded)>,
    back: Vec<(String, String, Excluded)>,
    gone: Vec<(String, String, Excluded)>,
}

impl ExclusionLog {
    fn left_out(&mut self, service: &str, key: &str, why: &Excluded) {
        self.out
            .push((service.to_owned(), key.to_owned(), why.clone()));
    }

    fn routed_again(&mut self, service: &str, key: &str, was: &Excluded) {
        self.back
            .push((service.to_owned(), key.to_owned(), was.clone()));
    }

    /// No longer excluded because it is gone (or excluded for another reason now).
    fn gone(&mut self, service: &str, key: &str, was: &Excluded) {
        self.gone
            .push((service.to_owned(), key.to_owned(), was.clone()));
    }
}

/// (service, node, reason label) → keys left out.
type Groups = BTreeMap<(String, String, &'static str), usize>;

fn node_of(keys: &Keys, key: &str) -> String {
    match keys.parse(key) {
        Some(KeyKind::Endpoint { node, .. }) => node.to_owned(),
        _ => "?".into(),
    }
}

impl View {
    fn emit(&mut self, log: ExclusionLog) {
        for (service, key, was) in log.gone {
            let g = (service, node_of(&self.keys, &key), was.label());
            if let Some(n) = self.groups.get_mut(&g) {
                *n -= 1;
                if *n == 0 {
                    self.groups.remove(&g);
                }
            }
        }
        for (service, key, was) in log.back {
            let g = (service.clone(), node_of(&self.keys, &key), was.label());
            if let Some(n) = self.groups.get_mut(&g) {
                *n -= 1;
                if *n == 0 {
                    self.groups.remove(&g);
                    info!(service, node = %g.1, reason = g.2, key, "endpoints of this node routed again");
                }
            }
        }
        for (service, key, why) in log.out {
            let g = (service.clone(), node_of(&self.keys, &key), why.label());
            let n = self.groups.entry(g.clone()).or_default();
            *n += 1;
            if *n == 1 {
                warn!(service, node = %g.1, reason = g.2, key, "endpoint left out of every proxy config: {why}");
            } else {
                tracing::debug!(service, node = %g.1, reason = g.2, key, "endpoint left out of every proxy config: {why}");
            }
        }
    }
}

/// Builds a complete [`Update`] (every key changed) from raw key/values, decoding records
/// exactly as the watch cache does (invalid ones are left out and listed in `rejected`). Used
/// by `confgen render` and by tests.
pub fn update_from_kvs(keys: &Keys, revision: i64, kvs: BTreeMap<String, Vec<u8>>) -> Update {
    let mut snap = Snapshot {
        revision,
        complete: true,
        ..Snapshot::default()
    };
    let changed: Vec<String> = kvs.keys().cloned().collect();
    for (k, v) in kvs {
        let ok = match keys.parse(&k) {
            Some(KeyKind::Endpoint { .. }) => Endpoint::decode(keys, &k, &v).map(|ep| {
                snap.endpoints.insert(k.clone(), Arc::new(ep));
            }),
            Some(KeyKind::Node { .. }) => Node::decode(keys, &k, &v).map(|n| {
                snap.nodes.insert(n.node.clone(), Arc::new(n));
            }),
            _ => Ok(()),
        };
        match ok {
            Ok(()) => {
                snap.kvs.insert(k, Bytes::from(v));
            }
            Err(e) => {
                snap.rejected.insert(k, e.to_string());
            }
        }
    }
    Update {
        snapshot: snap,
        changed: Arc::new(changed),
        relisted: true,
    }
}

/// An update from `prev` to the registry `kvs` (changed keys computed by comparison): for tests.
#[cfg(test)]
pub fn update_after(
    prev: &Snapshot,
    keys: &Keys,
    revision: i64,
    kvs: BTreeMap<String, Vec<u8>>,
) -> Update {
    let mut u = update_from_kvs(keys, revision, kvs);
    let next = &u.snapshot;
    let all: BTreeSet<&String> = prev
        .kvs
        .keys()
        .chain(prev.rejected.keys())
        .chain(next.kvs.keys())
        .chain(next.rejected.keys())
        .collect();
    let changed: Vec<String> = all
        .into_iter()
        .filter(|k| {
            prev.kvs.get(*k) != next.kvs.get(*k) || prev.rejected.get(*k) != next.rejected.get(*k)
        })
        .cloned()
        .collect();
    u.changed = Arc::new(changed);
    u
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn keys() -> Keys {
        Keys::new("/flotilla").unwrap()
    }

    pub(crate) fn ep_json(node: &str, service: &str, n: u32, host: &str) -> (String, Vec<u8>) {
        ep_meta(node, service, n, host, &[])
    }

    pub(crate) fn ep_meta(
        node: &str,
        service: &str,
        n: u32,
        host: &str,
        meta: &[(&str, &str)],
    ) -> (String, Vec<u8>) {
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
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            health: flotilla_registry::Health::None,
            registered_at: "2024-01-01T00:00:00Z".into(),
        };
        (ep.key(&keys()), ep.encode(&keys()).unwrap())
    }

    pub(crate) fn node_json(node: &str) -> (String, Vec<u8>) {
        let n = Node {
            node: node.into(),
            version: "0.1.0".into(),
            started_at: "2024-01-01T00:00:00Z".into(),
            advertise_ip: "10.0.0.1".parse().unwrap(),
            labels: Default::default(),
        };
        (keys().node(node), n.encode(&keys()).unwrap())
    }

    /// A view stepped through registry states, for tests of code that reads it.
    pub(crate) struct Sync {
        pub(crate) view: View,
        prev: Snapshot,
        rev: i64,
    }

    impl Sync {
        pub(crate) fn new() -> Sync {
            Sync {
                view: View::new(keys(), open()),
                prev: Snapshot::default(),
                rev: 1,
            }
        }

        pub(crate) fn to(&mut self, kvs: &BTreeMap<String, Vec<u8>>, data: &mut TemplateData) {
            self.rev += 1;
            let u = update_after(&self.prev, &keys(), self.rev, kvs.clone());
            self.prev = u.snapshot.clone();
            let c = self.view.sync(&u);
            data.apply(&self.view, &c);
        }
    }

    fn open() -> AdmitArgs {
        AdmitArgs {
            allow_loopback: true,
            ..AdmitArgs::default()
        }
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

    /// Steps a view and one template through registry states; returns them after the last.
    struct Run {
        view: View,
        data: TemplateData,
        prev: Snapshot,
        rev: i64,
    }

    impl Run {
        fn new(opts: AdmitArgs, scope: Scope) -> Run {
            Run {
                view: View::new(keys(), opts),
                data: TemplateData::new(scope),
                prev: Snapshot::default(),
                rev: 1,
            }
        }

        fn step(&mut self, kvs: &[(String, Vec<u8>)]) -> (Changes, Dirty) {
            self.rev += 1;
            let u = update_after(&self.prev, &keys(), self.rev, kvs.iter().cloned().collect());
            self.prev = u.snapshot.clone();
            let c = self.view.sync(&u);
            let d = self.data.apply(&self.view, &c);
            (c, d)
        }

        /// A fresh view + template built from the same registry in one go.
        fn full(&self, opts: AdmitArgs) -> TemplateData {
            let mut v = View::new(keys(), opts);
            let mut d = TemplateData::new(self.data.scope.clone());
            let u = update_from_kvs(
                &keys(),
                self.rev,
                self.prev
                    .kvs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_vec()))
                    .collect(),
            );
            let c = v.sync(&u);
            d.apply(&v, &c);
            d
        }
    }

    #[test]
    fn incremental_updates_match_a_full_build() {
        let mut run = Run::new(
            open(),
            Scope {
                keys: vec!["/flotilla/".into()],
                prefix: String::new(),
            },
        );
        let mut kvs = vec![
            node_json("a"),
            node_json("b"),
            node_json("a-b"),
            ep_json("b", "web", 1, "127.0.0.2"),
            ep_json("a-b", "web", 2, "127.0.0.3"),
            ep_json("a", "web", 3, "::1"),
            ep_json("a", "db", 4, "127.0.0.4"),
            ("/flotilla/config/x".to_string(), b"hello".to_vec()),
        ];
        let (c, d) = run.step(&kvs);
        assert_eq!(c.keys.len(), 8);
        assert!(d.any);
        assert_eq!(
            services(&run.data),
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
        assert_eq!(run.data.endpoint_count(), 4);
        assert_eq!(run.data.root()["services"]["web"][0]["addr"], "[::1]:8003");
        // Change one, delete one, add one invalid record.
        kvs[3] = ep_json("b", "web", 1, "127.0.0.9");
        kvs.remove(6);
        kvs.push((
            "/flotilla/endpoints/c/web/c-0123456789ab-1".into(),
            b"{not json".to_vec(),
        ));
        let (c, d) = run.step(&kvs);
        assert_eq!(c.keys.len(), 3, "{:?}", c.keys);
        assert!(d.any && !d.config);
        let full = run.full(open());
        assert_eq!(run.data.root(), full.root());
        assert_eq!(run.data.endpoint_count(), 3);
        assert_eq!(full.endpoint_count(), 3);
        // Nothing changed: nothing reported.
        let (c, d) = run.step(&kvs);
        assert!(c.keys.is_empty() && !d.any);
        // A node record goes: its endpoints are left out, and come back with it.
        kvs.remove(1);
        let (c, d) = run.step(&kvs);
        assert!(d.any);
        assert!(c.services.contains("web"));
        assert_eq!(run.data.endpoint_count(), 2);
        assert_eq!(run.view.excluded_counts()["no_node_record"], 1);
        assert_eq!(run.data.root(), run.full(open()).root());
        kvs.push(node_json("b"));
        run.step(&kvs);
        assert_eq!(run.data.endpoint_count(), 3);
        assert!(run.view.excluded_counts().is_empty());
    }

    #[test]
    fn a_template_sees_only_its_keys() {
        let mut run = Run::new(
            open(),
            Scope {
                keys: vec!["/flotilla/endpoints/a/".into()],
                prefix: String::new(),
            },
        );
        let kvs = vec![
            node_json("a"),
            node_json("b"),
            ep_json("a", "web", 1, "127.0.0.2"),
            ep_json("b", "web", 2, "127.0.0.3"),
        ];
        run.step(&kvs);
        assert_eq!(
            services(&run.data),
            vec![("web".to_string(), vec!["a-0123456789ab-1".to_string()])]
        );
        assert_eq!(run.data.endpoint_count(), 1);
        // A change of b's endpoint: the template sees nothing new.
        let mut kvs = kvs;
        kvs[3] = ep_json("b", "web", 2, "127.0.0.4");
        let (_, d) = run.step(&kvs);
        assert!(!d.any);
    }

    #[test]
    fn claims_caps_loopback_and_settings_are_applied_on_read() {
        let opts = AdmitArgs {
            node: Some("a".into()),
            max_endpoints_per_node: 2,
            ..AdmitArgs::default()
        };
        let mut run = Run::new(
            opts.clone(),
            Scope {
                keys: vec!["/flotilla/".into()],
                prefix: String::new(),
            },
        );
        let mut kvs = vec![
            node_json("a"),
            node_json("b"),
            node_json("evil"),
            ep_meta("a", "api", 1, "127.0.0.1", &[("path", "/api/v2")]),
            ep_meta(
                "b",
                "api",
                2,
                "10.0.0.2",
                &[("path", "/api/v2"), ("mode", "tcp")],
            ),
            ep_json("b", "web", 3, "127.0.0.1"),
            ep_json("evil", "api", 4, "10.6.6.6"),
            ep_json("evil", "api", 5, "10.6.6.7"),
            ep_json("evil", "api", 6, "10.6.6.8"),
            (keys().policy("api"), br#"{"nodes": ["a", "b"]}"#.to_vec()),
            (keys().service_setting("api", "path"), b"/api".to_vec()),
        ];
        run.step(&kvs);
        assert_eq!(
            services(&run.data),
            vec![(
                "api".to_string(),
                vec![
                    "a-0123456789ab-1".to_string(),
                    "b-0123456789ab-2".to_string()
                ]
            )]
        );
        let counts = run.view.excluded_counts();
        assert_eq!(counts["loopback"], 1, "{counts:?}");
        assert_eq!(counts["node_cap"], 1, "{counts:?}");
        assert_eq!(counts["claim"], 2, "{counts:?}");
        // The effective settings: the operator's path narrowed by unanimous meta; no mode.
        let api = &run.data.root()["services"]["api"];
        for e in api.as_array().unwrap() {
            assert_eq!(e["meta"]["path"], "/api/v2");
            assert!(e["meta"].get("mode").is_none());
        }
        // The operator opens the policy to evil: its first two endpoints are routed.
        kvs[9] = (
            keys().policy("api"),
            br#"{"nodes": ["a", "b", "evil"]}"#.to_vec(),
        );
        let (c, _) = run.step(&kvs);
        assert!(c.services.contains("api"));
        assert_eq!(run.data.endpoint_count(), 4);
        assert_eq!(run.data.root(), run.full(opts.clone()).root());
        // A broken policy keeps the previous one (a fresh start would close the service).
        kvs[9] = (keys().policy("api"), br#"{"nodes": "all"}"#.to_vec());
        let (c, _) = run.step(&kvs);
        assert!(!c.services.contains("api"));
        assert_eq!(run.data.endpoint_count(), 4);
        assert_eq!(run.full(opts).endpoint_count(), 0);
    }

    #[test]
    fn quarantine_leaves_out_and_releases_on_change() {
        let mut run = Run::new(
            open(),
            Scope {
                keys: vec!["/flotilla/".into()],
                prefix: String::new(),
            },
        );
        let mut kvs = vec![
            node_json("a"),
            ep_json("a", "web", 1, "10.0.0.1"),
            ep_json("a", "web", 2, "10.0.0.2"),
        ];
        run.step(&kvs);
        assert_eq!(run.data.suspects(&keys()).len(), 2);
        run.data.applied();
        let bad = ep_json("a", "web", 2, "10.0.0.3");
        kvs[2] = bad.clone();
        run.step(&kvs);
        assert_eq!(run.data.suspects(&keys()), vec![bad.0.clone()]);
        run.data.set_quarantine([bad.0.clone()].into(), &run.view);
        assert_eq!(run.data.endpoint_count(), 1);
        // Its record changes: released (and suspect again).
        kvs[2] = ep_json("a", "web", 2, "10.0.0.4");
        let (_, d) = run.step(&kvs);
        assert!(d.any);
        assert!(run.data.quarantined().is_empty());
        assert_eq!(run.data.endpoint_count(), 2);
    }

    #[test]
    fn endpoint_values_are_the_serialised_record_plus_addr() {
        use flotilla_registry::{Health, Proto};
        for (host, proto, health) in [
            ("127.0.0.2", Proto::Tcp, Health::Healthy),
            ("::1", Proto::Udp, Health::Unhealthy),
            ("db.example.org", Proto::Tcp, Health::None),
        ] {
            let (k, v) = ep_json("a", "web", 1, host);
            let mut ep = Endpoint::decode(&keys(), &k, &v).unwrap();
            ep.proto = proto;
            ep.health = health;
            ep.tags = vec!["v1".into(), "x=y".into()];
            ep.meta.insert("zone".into(), "eu".into());
            let mut want = serde_json::to_value(&ep).unwrap();
            let addr = if host == "::1" {
                "[::1]:8001".to_string()
            } else {
                format!("{host}:8001")
            };
            want["addr"] = Value::String(addr);
            assert_eq!(endpoint_value(&ep, &Settings::default()), want);
            // Service settings replace the endpoint's own.
            ep.meta.insert("mode".into(), "tcp".into());
            let mut settings = Settings::default();
            settings.values.insert("path", "/api".into());
            let v = endpoint_value(&ep, &settings);
            assert_eq!(v["meta"]["path"], "/api");
            assert!(v["meta"].get("mode").is_none());
            assert_eq!(v["meta"]["zone"], "eu");
        }
    }

    #[test]
    fn incomplete_updates_are_ignored() {
        let mut view = View::new(keys(), open());
        let mut data = TemplateData::new(Scope::everything());
        let u = Update {
            snapshot: Snapshot::default(),
            changed: Arc::new(vec![]),
            relisted: false,
        };
        let c = view.sync(&u);
        assert!(c.keys.is_empty());
        assert!(!view.complete());
        assert!(!data.apply(&view, &c).any);
    }
}
