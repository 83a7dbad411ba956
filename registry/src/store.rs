//! The part of etcd a registry writer uses, as a trait: reads of a key or a prefix, puts and
//! transactions on a lease, and leases (grant, keep-alive, revoke); for the watch cache, paged
//! range reads pinned to a revision and a watch of several prefixes from a revision
//! ([`Store::range_page`], [`Store::watch`]). [`EtcdStore`] is etcd;
//! [`MemStore`] is an in-memory store for unit tests of the logic above it (with tokio's paused
//! time: leases expire on tokio's clock), with faults to inject. The real-etcd tests stay the
//! proof that the system works; the in-memory one makes lease loss and errors cheap to test.
//!
//! Every method fails with a [`StoreError`] whose `what` names the request kind (`"write"`,
//! `"lease grant"`, ...); a caller with a better name replaces it ([`StoreError::named`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, EventType, GetOptions, KvClient, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, WatchOptions, WatchStream,
};
use imbl::OrdMap;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::etcd::{error_chain, StoreError};
use crate::keys::prefix_end;

/// Largest gRPC message accepted from etcd by range reads and watches: a 10,000-key page or a
/// watch response can carry many megabytes.
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// One key of a [`RangePage`]: the value is moved into its one shared allocation as it is read,
/// so snapshots share it without copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeKv {
    /// The key, as bytes (etcd keys need not be UTF-8).
    pub key: Vec<u8>,
    /// The value.
    pub value: Arc<[u8]>,
    /// The revision of its last write.
    pub mod_revision: i64,
}

/// One page of a range read ([`Store::range_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangePage {
    /// The keys, in key order.
    pub kvs: Vec<RangeKv>,
    /// True if the range has more keys after the last one.
    pub more: bool,
    /// The store's current revision when the page was read (etcd's header: a page pinned to
    /// an older revision reads the keys as they were then, and still reports the current one).
    pub revision: i64,
}

/// One change delivered by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// `key` was created or changed.
    Put {
        /// The key.
        key: Vec<u8>,
        /// Its new value.
        value: Arc<[u8]>,
        /// The revision of the write.
        mod_revision: i64,
    },
    /// `key` was deleted (or its lease ended).
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The revision of the deletion.
        mod_revision: i64,
    },
}

impl WatchEvent {
    /// The key changed.
    pub fn key(&self) -> &[u8] {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn mod_revision(&self) -> i64 {
        match self {
            WatchEvent::Put { mod_revision, .. } | WatchEvent::Delete { mod_revision, .. } => {
                *mod_revision
            }
        }
    }
}

/// One answer of a watch: events of one watcher, or (no events) a progress notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchResponse {
    /// The watcher: the index of its prefix in what [`Store::watch`] was given. Each watcher's
    /// answers are in revision order; one watcher's are not ordered against another's.
    pub watcher: usize,
    /// The store's revision when the answer was sent. Without events (a progress
    /// notification), every event of this watcher up to it has been delivered.
    pub revision: i64,
    /// The changes, in revision order.
    pub events: Vec<WatchEvent>,
}

/// How a watch ended. Every kind ends the watch; the caller lists again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The start revision was compacted away: list again at a current revision.
    #[error("watch revision compacted (etcd keeps revisions from {compact_revision})")]
    Compacted {
        /// The store's compaction revision.
        compact_revision: i64,
    },
    /// The store cancelled the watch (e.g. the member lost its leader).
    #[error("watch cancelled by etcd{}", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    Cancelled {
        /// etcd's reason (may be empty).
        reason: String,
    },
    /// The stream ended without an error.
    #[error("watch stream ended")]
    Ended,
    /// The stream failed, or adding a watcher to it did.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An open watch ([`Store::watch`]).
pub trait Watch: Send + 'static {
    /// The next answer. Cancel-safe: usable in `select!`.
    fn next(&mut self) -> impl Future<Output = Result<WatchResponse, WatchError>> + Send;
}

/// One key as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// Its value.
    pub value: Vec<u8>,
    /// The lease it is attached to (0: none).
    pub lease: i64,
    /// The revision of its last write.
    pub mod_revision: i64,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Put `value` at `key` on `lease` (0: no lease).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease (0: none).
        lease: i64,
    },
    /// Delete `key` (absent is fine).
    Delete {
        /// The key.
        key: String,
    },
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its id.
    pub id: i64,
    /// The TTL granted, in seconds.
    pub ttl: i64,
}

/// An open keep-alive stream of one lease.
pub trait KeepAlive: Send + 'static {
    /// Sends one renewal request (the answer arrives through [`KeepAlive::answer`]).
    fn send(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The next answer: `Some(ttl)` with the lease's new TTL in seconds (0 or less: the lease
    /// is gone), `None` when the stream closed. Cancel-safe: usable in `select!`.
    fn answer(&mut self) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
}

/// What a registry writer needs from etcd.
pub trait Store: Clone + Send + Sync + 'static {
    /// The keep-alive stream of this store.
    type KeepAlive: KeepAlive;
    /// The watch of this store.
    type Watch: Watch;
    /// Every key under `prefix`.
    fn get_prefix(&self, prefix: &str) -> impl Future<Output = Result<Vec<Kv>, StoreError>> + Send;
    /// One key, if present.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Kv>, StoreError>> + Send;
    /// Puts one key on `lease` (0: none).
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Applies `ops` in one transaction: all or nothing.
    fn txn(&self, ops: Vec<Write>) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Grants a lease of `ttl` seconds.
    fn lease_grant(&self, ttl: i64) -> impl Future<Output = Result<Lease, StoreError>> + Send;
    /// Opens a keep-alive stream of lease `id`, renewing it once: fails with
    /// [`StoreError::LeaseGone`] if the lease no longer exists.
    fn lease_keep_alive(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Self::KeepAlive, StoreError>> + Send;
    /// Revokes lease `id`: its keys go at once.
    fn lease_revoke(&self, id: i64) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// At most `limit` keys (0: no limit) from `from` (inclusive) to `end` (exclusive; empty:
    /// the key `from` alone), at `revision` (0: the current one). A caller listing in pages
    /// pins every page to the first one's [`RangePage::revision`].
    fn range_page(
        &self,
        from: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
        limit: i64,
    ) -> impl Future<Output = Result<RangePage, StoreError>> + Send;
    /// Watches every key under each of `prefixes` (one watcher each, created in this order, on
    /// one stream) from `start_revision`, with progress notifications. A start revision that
    /// was compacted ends the watch with [`WatchError::Compacted`].
    fn watch(
        &self,
        prefixes: Vec<String>,
        start_revision: i64,
    ) -> impl Future<Output = Result<Self::Watch, StoreError>> + Send;
}

/// One page of a range read through etcd-client (see [`Store::range_page`]); the values are
/// moved out of the response, each into its shared allocation.
pub async fn etcd_range_page(
    kv: &mut KvClient,
    from: Vec<u8>,
    end: Vec<u8>,
    revision: i64,
    limit: i64,
) -> Result<RangePage, etcd_client::Error> {
    let mut opts = GetOptions::new();
    if !end.is_empty() {
        opts = opts.with_range(end);
    }
    if limit > 0 {
        opts = opts.with_limit(limit);
    }
    if revision > 0 {
        opts = opts.with_revision(revision);
    }
    let mut resp = kv.get(from, Some(opts)).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let more = resp.more();
    let kvs = resp
        .take_kvs()
        .into_iter()
        .map(|kv| {
            let mod_revision = kv.mod_revision();
            let (key, value) = kv.into_key_value();
            RangeKv {
                key,
                value: Arc::from(value),
                mod_revision,
            }
        })
        .collect();
    Ok(RangePage {
        kvs,
        more,
        revision,
    })
}

fn is_out_of_range(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::OutOfRange)
}

/// etcd-client's watch stream, with the ids of its watchers in the order etcd created them.
pub struct EtcdWatch {
    stream: WatchStream,
    /// Watch ids by watcher index (etcd answers `created` in the order of the requests).
    ids: Vec<i64>,
}

impl Watch for EtcdWatch {
    async fn next(&mut self) -> Result<WatchResponse, WatchError> {
        loop {
            let resp = match self.stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(WatchError::Ended),
                Err(e) => return Err(StoreError::from_etcd("watch", &e).into()),
            };
            if resp.compact_revision() > 0 {
                return Err(WatchError::Compacted {
                    compact_revision: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                return Err(WatchError::Cancelled {
                    reason: resp.cancel_reason().to_owned(),
                });
            }
            if resp.created() {
                // Not a progress notification: its header is the store's revision at creation,
                // while the events since the start revision are still to come.
                self.ids.push(resp.watch_id());
                continue;
            }
            let watcher = self
                .ids
                .iter()
                .position(|id| *id == resp.watch_id())
                .unwrap_or(self.ids.len());
            let events = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    Some(match ev.event_type() {
                        EventType::Put => WatchEvent::Put {
                            key: kv.key().to_vec(),
                            value: Arc::from(kv.value()),
                            mod_revision: kv.mod_revision(),
                        },
                        EventType::Delete => WatchEvent::Delete {
                            key: kv.key().to_vec(),
                            mod_revision: kv.mod_revision(),
                        },
                    })
                })
                .collect();
            return Ok(WatchResponse {
                watcher,
                revision: resp.header().map(|h| h.revision()).unwrap_or(0),
                events,
            });
        }
    }
}

/// etcd through etcd-client.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl EtcdStore {
    /// A store over a connected client.
    pub fn new(client: Client) -> EtcdStore {
        EtcdStore { client }
    }
}

fn kv_of(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        lease: kv.lease(),
        mod_revision: kv.mod_revision(),
    }
}

fn lease_opt(lease: i64) -> Option<PutOptions> {
    (lease != 0).then(|| PutOptions::new().with_lease(lease))
}

/// etcd-client's keep-alive pair.
pub struct EtcdKeepAlive {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

impl KeepAlive for EtcdKeepAlive {
    async fn send(&mut self) -> Result<(), StoreError> {
        self.keeper
            .keep_alive()
            .await
            .map_err(|e| StoreError::from_etcd("lease keepalive", &e))
    }

    async fn answer(&mut self) -> Result<Option<i64>, StoreError> {
        match self.stream.message().await {
            Ok(Some(r)) => Ok(Some(r.ttl())),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::from_etcd("lease keepalive", &e)),
        }
    }
}

impl Store for EtcdStore {
    type KeepAlive = EtcdKeepAlive;
    type Watch = EtcdWatch;

    fn range_page(
        &self,
        from: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
        limit: i64,
    ) -> impl Future<Output = Result<RangePage, StoreError>> + Send {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        async move {
            etcd_range_page(&mut kv, from, end, revision, limit)
                .await
                .map_err(|e| match StoreError::from_etcd("list", &e) {
                    // etcd answers a read pinned to a compacted (or future) revision with
                    // OutOfRange, which `from_etcd` counts as a message too large.
                    StoreError::TooLarge { what, detail }
                        if revision > 0 && is_out_of_range(&e) =>
                    {
                        StoreError::Failed { what, detail }
                    }
                    other => other,
                })
        }
    }

    fn watch(
        &self,
        prefixes: Vec<String>,
        start_revision: i64,
    ) -> impl Future<Output = Result<EtcdWatch, StoreError>> + Send {
        let mut wc = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        async move {
            let opts = |p: &str| {
                WatchOptions::new()
                    .with_range(prefix_end(p))
                    .with_start_revision(start_revision)
                    .with_progress_notify()
            };
            let Some((first, rest)) = prefixes.split_first() else {
                return Err(StoreError::Failed {
                    what: "watch",
                    detail: "no prefix to watch".into(),
                });
            };
            let mut stream = wc
                .watch(first.clone(), Some(opts(first)))
                .await
                .map_err(|e| StoreError::from_etcd("watch", &e))?;
            for p in rest {
                stream
                    .watch(p.clone(), Some(opts(p)))
                    .await
                    .map_err(|e| StoreError::Failed {
                        what: "watch",
                        detail: format!("adding a watch on {p}: {}", error_chain(&e)),
                    })?;
            }
            Ok(EtcdWatch {
                stream,
                ids: Vec::with_capacity(prefixes.len()),
            })
        }
    }

    fn get_prefix(&self, prefix: &str) -> impl Future<Output = Result<Vec<Kv>, StoreError>> + Send {
        let mut c = self.client.clone();
        let prefix = prefix.to_owned();
        async move {
            let r = c
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| StoreError::from_etcd("read", &e))?;
            Ok(r.kvs().iter().map(kv_of).collect())
        }
    }

    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Kv>, StoreError>> + Send {
        let mut c = self.client.clone();
        let key = key.to_owned();
        async move {
            let r = c
                .get(key, None)
                .await
                .map_err(|e| StoreError::from_etcd("read", &e))?;
            Ok(r.kvs().first().map(kv_of))
        }
    }

    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let mut c = self.client.clone();
        let key = key.to_owned();
        async move {
            c.put(key, value, lease_opt(lease))
                .await
                .map(|_| ())
                .map_err(|e| StoreError::from_etcd("write", &e))
        }
    }

    fn txn(&self, ops: Vec<Write>) -> impl Future<Output = Result<(), StoreError>> + Send {
        let mut c = self.client.clone();
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Write::Put { key, value, lease } => TxnOp::put(key, value, lease_opt(lease)),
                Write::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        async move {
            c.txn(Txn::new().and_then(ops))
                .await
                .map(|_| ())
                .map_err(|e| StoreError::from_etcd("write", &e))
        }
    }

    fn lease_grant(&self, ttl: i64) -> impl Future<Output = Result<Lease, StoreError>> + Send {
        let mut c = self.client.clone();
        async move {
            let r = c
                .lease_grant(ttl, None)
                .await
                .map_err(|e| StoreError::from_etcd("lease grant", &e))?;
            Ok(Lease {
                id: r.id(),
                ttl: r.ttl(),
            })
        }
    }

    fn lease_keep_alive(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<EtcdKeepAlive, StoreError>> + Send {
        let mut c = self.client.clone();
        async move {
            // etcd-client sends the first request and reads its answer: a lease that is gone
            // fails here.
            let (keeper, stream) = c
                .lease_keep_alive(id)
                .await
                .map_err(|e| StoreError::from_etcd("lease keepalive", &e))?;
            Ok(EtcdKeepAlive { keeper, stream })
        }
    }

    fn lease_revoke(&self, id: i64) -> impl Future<Output = Result<(), StoreError>> + Send {
        let mut c = self.client.clone();
        async move {
            c.lease_revoke(id)
                .await
                .map(|_| ())
                .map_err(|e| StoreError::from_etcd("lease revoke", &e))
        }
    }
}

/// An in-memory store for unit tests: one revision counter, leases that expire on tokio's clock
/// (so `tokio::test(start_paused = true)` moves them), etcd's transaction size limit, and
/// faults to inject. Clones share one state.
#[derive(Clone, Default)]
pub struct MemStore {
    state: Arc<Mutex<MemState>>,
}

#[derive(Default)]
struct MemState {
    revision: i64,
    kvs: OrdMap<String, Kv>,
    /// The keys after each revision since the compaction (persistent maps: each shares all but
    /// what its revision changed), for range reads pinned to a past revision.
    history: BTreeMap<i64, OrdMap<String, Kv>>,
    /// The events of each revision since the compaction, for watches.
    log: BTreeMap<i64, Vec<WatchEvent>>,
    /// The compaction revision: reads and watches before it fail (0: none).
    compacted: i64,
    /// Woken at every new revision, progress notification and broken watch.
    changes: Arc<Notify>,
    /// Bumped to break every open watch ([`MemStore::break_watches`]).
    watch_epoch: u64,
    /// Bumped to send every open watch a progress notification ([`MemStore::progress`]).
    progress: u64,
    leases: HashMap<i64, MemLease>,
    next_lease: i64,
    /// etcd's `--max-txn-ops` (0: no limit).
    max_txn_ops: usize,
    /// While true, every request fails as unreachable.
    unreachable: bool,
    /// Errors the next requests fail with, in order.
    fail_next: VecDeque<StoreError>,
    /// Keep-alive streams: lease id → senders of answers.
    streams: Vec<(i64, mpsc::UnboundedSender<i64>)>,
    requests: u64,
}

struct MemLease {
    ttl: i64,
    expires: Instant,
}

impl MemState {
    /// Expires leases whose time has passed, with their keys.
    fn expire(&mut self) {
        let now = Instant::now();
        let gone: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: i64) -> bool {
        if self.leases.remove(&id).is_none() {
            return false;
        }
        let gone: Vec<String> = self
            .kvs
            .iter()
            .filter(|(_, kv)| kv.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            self.revision += 1;
            let mod_revision = self.revision;
            let events = gone
                .into_iter()
                .map(|key| {
                    self.kvs.remove(&key);
                    WatchEvent::Delete {
                        key: key.into_bytes(),
                        mod_revision,
                    }
                })
                .collect();
            self.commit(events);
        }
        true
    }

    /// Records the revision just made: its keys, its events, and wakes the watches.
    fn commit(&mut self, events: Vec<WatchEvent>) {
        self.history.insert(self.revision, self.kvs.clone());
        self.log.insert(self.revision, events);
        self.changes.notify_waiters();
    }

    /// The keys at `revision` (0: the current one), as a range read sees them.
    fn view_at(&self, what: &'static str, revision: i64) -> Result<OrdMap<String, Kv>, StoreError> {
        let rev = if revision > 0 {
            revision
        } else {
            self.revision
        };
        if rev < self.compacted {
            return Err(StoreError::Failed {
                what,
                detail: "etcdserver: mvcc: required revision has been compacted".into(),
            });
        }
        if rev > self.revision {
            return Err(StoreError::Failed {
                what,
                detail: "etcdserver: mvcc: required revision is a future revision".into(),
            });
        }
        if rev == self.revision {
            return Ok(self.kvs.clone());
        }
        Ok(self
            .history
            .range(..=rev)
            .next_back()
            .map(|(_, m)| m.clone())
            .unwrap_or_default())
    }

    /// Counts the request, expires leases, and fails it if a fault says so.
    fn enter(&mut self, what: &'static str) -> Result<(), StoreError> {
        self.requests += 1;
        self.expire();
        if self.unreachable {
            return Err(StoreError::Unreachable {
                what,
                detail: "in-memory store set unreachable".into(),
            });
        }
        match self.fail_next.pop_front() {
            Some(e) => Err(e.named(what)),
            None => Ok(()),
        }
    }

    fn check_lease(&self, what: &'static str, lease: i64) -> Result<(), StoreError> {
        if lease != 0 && !self.leases.contains_key(&lease) {
            return Err(StoreError::LeaseGone {
                what,
                detail: format!("requested lease not found: {lease:x}"),
            });
        }
        Ok(())
    }

    /// Applies one operation at the current revision; the event a watch sees, if any.
    fn apply(&mut self, op: Write) -> Option<WatchEvent> {
        let mod_revision = self.revision;
        match op {
            Write::Put { key, value, lease } => {
                let event = WatchEvent::Put {
                    key: key.clone().into_bytes(),
                    value: Arc::from(value.as_slice()),
                    mod_revision,
                };
                self.kvs.insert(
                    key.clone(),
                    Kv {
                        key,
                        value,
                        lease,
                        mod_revision,
                    },
                );
                Some(event)
            }
            Write::Delete { key } => self.kvs.remove(&key).map(|_| WatchEvent::Delete {
                key: key.into_bytes(),
                mod_revision,
            }),
        }
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemState) -> T) -> T {
        f(&mut self.state.lock().expect("mem store lock"))
    }

    /// Refuses transactions of more than `n` operations as etcd's `--max-txn-ops` does.
    pub fn set_max_txn_ops(&self, n: usize) {
        self.with(|s| s.max_txn_ops = n);
    }

    /// Every request fails as unreachable while `on` (keep-alive answers stop too, and the
    /// open watches break).
    pub fn set_unreachable(&self, on: bool) {
        self.with(|s| s.unreachable = on);
        if on {
            self.break_watches();
        }
    }

    /// Every open watch fails (as unreachable) at its next answer; new watches work.
    pub fn break_watches(&self) {
        self.with(|s| {
            s.watch_epoch += 1;
            s.changes.notify_waiters();
        });
    }

    /// Compacts the store at `revision` (at most the current one): reads pinned before it and
    /// watches from before it fail, as etcd's do.
    pub fn compact(&self, revision: i64) {
        self.with(|s| {
            let revision = revision.min(s.revision);
            let base = s.view_at("compact", revision).unwrap_or_default();
            s.history = s.history.split_off(&revision);
            s.history.insert(revision, base);
            s.log = s.log.split_off(&revision);
            s.compacted = s.compacted.max(revision);
        });
    }

    /// Sends every open watch a progress notification at the current revision.
    pub fn progress(&self) {
        self.with(|s| {
            s.progress += 1;
            s.changes.notify_waiters();
        });
    }

    /// The next requests fail with these errors, in order.
    pub fn fail_next(&self, errors: impl IntoIterator<Item = StoreError>) {
        self.with(|s| s.fail_next.extend(errors));
    }

    /// Revokes lease `id` from outside (an operator, or etcd losing it): its keys go, and its
    /// keep-alive streams answer TTL 0 from now on.
    pub fn revoke(&self, id: i64) -> bool {
        self.with(|s| s.drop_lease(id))
    }

    /// Every key, with its value and lease (leases expired by now are gone first).
    pub fn dump(&self) -> BTreeMap<String, Kv> {
        self.with(|s| {
            s.expire();
            s.kvs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        })
    }

    /// The live leases' ids.
    pub fn leases(&self) -> Vec<i64> {
        self.with(|s| {
            s.expire();
            let mut ids: Vec<i64> = s.leases.keys().copied().collect();
            ids.sort_unstable();
            ids
        })
    }

    /// The store's revision (one per write that changed something).
    pub fn revision(&self) -> i64 {
        self.with(|s| s.revision)
    }

    /// Requests served or refused so far.
    pub fn requests(&self) -> u64 {
        self.with(|s| s.requests)
    }
}

/// A keep-alive stream of [`MemStore`].
pub struct MemKeepAlive {
    store: MemStore,
    id: i64,
    answers: mpsc::UnboundedReceiver<i64>,
}

impl KeepAlive for MemKeepAlive {
    async fn send(&mut self) -> Result<(), StoreError> {
        let id = self.id;
        let answer = self.store.with(|s| {
            s.expire();
            if s.unreachable {
                // The request is lost: no answer.
                return None;
            }
            Some(match s.leases.get_mut(&id) {
                Some(l) => {
                    l.expires = Instant::now() + Duration::from_secs(l.ttl as u64);
                    l.ttl
                }
                None => 0,
            })
        });
        if let Some(ttl) = answer {
            self.store.with(|s| {
                for (lease, tx) in &s.streams {
                    if *lease == id {
                        let _ = tx.send(ttl);
                    }
                }
            });
        }
        Ok(())
    }

    async fn answer(&mut self) -> Result<Option<i64>, StoreError> {
        Ok(self.answers.recv().await)
    }
}

/// A watch of [`MemStore`], read from its revision log.
pub struct MemWatch {
    store: MemStore,
    prefixes: Vec<String>,
    /// The next revision to deliver.
    next: i64,
    /// The store's `watch_epoch` when it was opened.
    epoch: u64,
    /// The store's `progress` last answered.
    progress: u64,
    queue: VecDeque<WatchResponse>,
}

impl MemWatch {
    /// Queues what the log has from `next` on, per watcher.
    fn poll(&mut self) -> Result<(), WatchError> {
        let (prefixes, queue, next, progress, epoch) = (
            &self.prefixes,
            &mut self.queue,
            &mut self.next,
            &mut self.progress,
            self.epoch,
        );
        self.store.with(|s| {
            if s.watch_epoch != epoch {
                return Err(WatchError::Store(StoreError::Unreachable {
                    what: "watch",
                    detail: "in-memory store broke its watches".into(),
                }));
            }
            if *next < s.compacted {
                return Err(WatchError::Compacted {
                    compact_revision: s.compacted,
                });
            }
            for (rev, events) in s.log.range(*next..) {
                for (watcher, p) in prefixes.iter().enumerate() {
                    let mine: Vec<WatchEvent> = events
                        .iter()
                        .filter(|e| e.key().starts_with(p.as_bytes()))
                        .cloned()
                        .collect();
                    if !mine.is_empty() {
                        queue.push_back(WatchResponse {
                            watcher,
                            revision: *rev,
                            events: mine,
                        });
                    }
                }
            }
            *next = (*next).max(s.revision + 1);
            if *progress != s.progress {
                *progress = s.progress;
                for watcher in 0..prefixes.len() {
                    queue.push_back(WatchResponse {
                        watcher,
                        revision: s.revision,
                        events: Vec::new(),
                    });
                }
            }
            Ok(())
        })
    }
}

impl Watch for MemWatch {
    async fn next(&mut self) -> Result<WatchResponse, WatchError> {
        let changes = self.store.with(|s| s.changes.clone());
        loop {
            let notified = changes.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queue.is_empty() {
                self.poll()?;
            }
            if let Some(r) = self.queue.pop_front() {
                return Ok(r);
            }
            notified.await;
        }
    }
}

impl Store for MemStore {
    type KeepAlive = MemKeepAlive;
    type Watch = MemWatch;

    async fn range_page(
        &self,
        from: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
        limit: i64,
    ) -> Result<RangePage, StoreError> {
        self.with(|s| {
            s.enter("list")?;
            let view = s.view_at("list", revision)?;
            let from = String::from_utf8_lossy(&from).into_owned();
            // etcd's conventions: no end is the key alone, "\0" is every key from `from` on.
            let in_range = |k: &str| match &end[..] {
                [] => k == from,
                [0] => true,
                end => k.as_bytes() < end,
            };
            let mut page = RangePage {
                revision: s.revision,
                ..RangePage::default()
            };
            for (k, kv) in view.range(from.clone()..) {
                if !in_range(k) {
                    break;
                }
                if limit > 0 && page.kvs.len() as i64 == limit {
                    page.more = true;
                    break;
                }
                page.kvs.push(RangeKv {
                    key: k.as_bytes().to_vec(),
                    value: Arc::from(kv.value.as_slice()),
                    mod_revision: kv.mod_revision,
                });
            }
            Ok(page)
        })
    }

    async fn watch(
        &self,
        prefixes: Vec<String>,
        start_revision: i64,
    ) -> Result<MemWatch, StoreError> {
        self.with(|s| {
            s.enter("watch")?;
            Ok(MemWatch {
                store: self.clone(),
                prefixes,
                next: if start_revision > 0 {
                    start_revision
                } else {
                    s.revision + 1
                },
                epoch: s.watch_epoch,
                progress: s.progress,
                queue: VecDeque::new(),
            })
        })
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<Kv>, StoreError> {
        self.with(|s| {
            s.enter("read")?;
            Ok(s.kvs
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, kv)| kv.clone())
                .collect())
        })
    }

    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        self.with(|s| {
            s.enter("read")?;
            Ok(s.kvs.get(key).cloned())
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), StoreError> {
        self.txn(vec![Write::Put {
            key: key.to_owned(),
            value,
            lease,
        }])
        .await
    }

    async fn txn(&self, ops: Vec<Write>) -> Result<(), StoreError> {
        self.with(|s| {
            s.enter("write")?;
            if s.max_txn_ops > 0 && ops.len() > s.max_txn_ops {
                return Err(StoreError::TooLarge {
                    what: "write",
                    detail: "etcdserver: too many operations in txn request".into(),
                });
            }
            for op in &ops {
                if let Write::Put { lease, .. } = op {
                    s.check_lease("write", *lease)?;
                }
            }
            s.revision += 1;
            let events = ops.into_iter().filter_map(|op| s.apply(op)).collect();
            s.commit(events);
            Ok(())
        })
    }

    async fn lease_grant(&self, ttl: i64) -> Result<Lease, StoreError> {
        self.with(|s| {
            s.enter("lease grant")?;
            s.next_lease += 1;
            let id = 0x7e57_0000 + s.next_lease;
            s.leases.insert(
                id,
                MemLease {
                    ttl,
                    expires: Instant::now() + Duration::from_secs(ttl as u64),
                },
            );
            Ok(Lease { id, ttl })
        })
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<MemKeepAlive, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.with(|s| {
            s.enter("lease keepalive")?;
            match s.leases.get_mut(&id) {
                Some(l) => l.expires = Instant::now() + Duration::from_secs(l.ttl as u64),
                None => {
                    return Err(StoreError::LeaseGone {
                        what: "lease keepalive",
                        detail: format!("requested lease not found: {id:x}"),
                    })
                }
            }
            s.streams.retain(|(_, tx)| !tx.is_closed());
            s.streams.push((id, tx));
            Ok(())
        })?;
        Ok(MemKeepAlive {
            store: self.clone(),
            id,
            answers: rx,
        })
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), StoreError> {
        self.with(|s| {
            s.enter("lease revoke")?;
            if s.drop_lease(id) {
                Ok(())
            } else {
                Err(StoreError::LeaseGone {
                    what: "lease revoke",
                    detail: format!("requested lease not found: {id:x}"),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, lease: i64) -> Write {
        Write::Put {
            key: key.into(),
            value: b"v".to_vec(),
            lease,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn mem_store_leases_expire_on_tokios_clock_and_keep_alives_extend_them() {
        let s = MemStore::new();
        let lease = s.lease_grant(3).await.unwrap();
        s.txn(vec![
            put("/a/1", lease.id),
            put("/a/2", lease.id),
            put("/b", 0),
        ])
        .await
        .unwrap();
        assert_eq!(s.get_prefix("/a/").await.unwrap().len(), 2);
        let mut ka = s.lease_keep_alive(lease.id).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        ka.send().await.unwrap();
        assert_eq!(ka.answer().await.unwrap(), Some(3));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(s.dump().len(), 3, "renewed at 2 s: alive at 4 s");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            s.dump().keys().collect::<Vec<_>>(),
            ["/b"],
            "expired at 5 s"
        );
        ka.send().await.unwrap();
        assert_eq!(
            ka.answer().await.unwrap(),
            Some(0),
            "a gone lease answers TTL 0"
        );
        let e = s.put("/a/3", b"v".to_vec(), lease.id).await.unwrap_err();
        assert!(e.is_lease_gone(), "{e}");
        assert!(s
            .lease_keep_alive(lease.id)
            .await
            .is_err_and(|e| e.is_lease_gone()));
    }

    #[tokio::test]
    async fn mem_store_faults_and_limits() {
        let s = MemStore::new();
        s.set_max_txn_ops(2);
        let e = s
            .txn(vec![put("/1", 0), put("/2", 0), put("/3", 0)])
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
        assert!(s.dump().is_empty(), "all or nothing");
        s.set_unreachable(true);
        assert!(matches!(
            s.get("/1").await,
            Err(StoreError::Unreachable { .. })
        ));
        s.set_unreachable(false);
        s.fail_next([StoreError::Failed {
            what: "x",
            detail: "permission denied".into(),
        }]);
        let e = s.put("/1", b"v".to_vec(), 0).await.unwrap_err();
        assert_eq!(e.to_string(), "write: permission denied");
        s.put("/1", b"v".to_vec(), 0).await.unwrap();
        let lease = s.lease_grant(10).await.unwrap();
        s.put("/2", b"v".to_vec(), lease.id).await.unwrap();
        assert!(s.revoke(lease.id));
        assert_eq!(s.dump().keys().collect::<Vec<_>>(), ["/1"]);
        assert!(s.lease_revoke(lease.id).await.unwrap_err().is_lease_gone());
    }

    #[tokio::test(start_paused = true)]
    async fn mem_store_watches_from_its_log_and_reports_compaction() {
        let s = MemStore::new();
        s.txn(vec![put("/a/1", 0), put("/b/1", 0)]).await.unwrap();
        let start = s.revision() + 1;
        let mut w = s
            .watch(vec!["/a/".into(), "/b/".into()], start)
            .await
            .unwrap();
        s.txn(vec![put("/a/2", 0), put("/b/2", 0)]).await.unwrap();
        let lease = s.lease_grant(5).await.unwrap();
        s.put("/a/3", b"v".to_vec(), lease.id).await.unwrap();
        s.txn(vec![Write::Delete { key: "/a/1".into() }])
            .await
            .unwrap();
        let r = w.next().await.unwrap();
        assert_eq!((r.watcher, r.revision, r.events.len()), (0, start, 1));
        assert_eq!(r.events[0].key(), b"/a/2");
        let r = w.next().await.unwrap();
        assert_eq!((r.watcher, r.events[0].key()), (1, &b"/b/2"[..]));
        let r = w.next().await.unwrap();
        assert!(matches!(&r.events[..], [WatchEvent::Put { key, .. }] if key == b"/a/3"));
        let r = w.next().await.unwrap();
        assert!(matches!(&r.events[..], [WatchEvent::Delete { key, .. }] if key == b"/a/1"));
        // A lease that ends deletes its keys in one revision.
        s.revoke(lease.id);
        let r = w.next().await.unwrap();
        assert_eq!(r.revision, s.revision());
        assert!(matches!(&r.events[..], [WatchEvent::Delete { key, .. }] if key == b"/a/3"));
        // Progress: an answer without events at the current revision, per watcher.
        s.progress();
        let r = w.next().await.unwrap();
        assert!(r.events.is_empty() && r.revision == s.revision());
        assert_eq!(w.next().await.unwrap().watcher, 1);
        // A broken watch fails; a new one works.
        s.break_watches();
        assert!(matches!(
            w.next().await,
            Err(WatchError::Store(StoreError::Unreachable { .. }))
        ));
        // Compaction: a watch from before it is told so; one from it on is not.
        let now = s.revision();
        s.put("/a/4", b"v".to_vec(), 0).await.unwrap();
        s.compact(now + 1);
        let mut old = s.watch(vec!["/a/".into()], now).await.unwrap();
        assert_eq!(
            old.next().await,
            Err(WatchError::Compacted {
                compact_revision: now + 1
            })
        );
        let mut w = s.watch(vec!["/a/".into()], now + 1).await.unwrap();
        assert_eq!(w.next().await.unwrap().events[0].key(), b"/a/4");
    }

    #[tokio::test]
    async fn mem_store_range_pages_are_pinned_to_a_revision() {
        let s = MemStore::new();
        s.txn(vec![
            put("/a/1", 0),
            put("/a/2", 0),
            put("/a/3", 0),
            put("/b", 0),
        ])
        .await
        .unwrap();
        let first = s
            .range_page(b"/a/".to_vec(), b"/a0".to_vec(), 0, 2)
            .await
            .unwrap();
        assert!(first.more);
        assert_eq!(first.revision, s.revision());
        assert_eq!(first.kvs[1].key, b"/a/2");
        // Written after the first page: not in the pinned second one.
        s.txn(vec![put("/a/4", 0), Write::Delete { key: "/a/3".into() }])
            .await
            .unwrap();
        let second = s
            .range_page(b"/a/2\0".to_vec(), b"/a0".to_vec(), first.revision, 2)
            .await
            .unwrap();
        assert!(!second.more);
        assert_eq!(
            second.kvs.iter().map(|kv| &kv.key[..]).collect::<Vec<_>>(),
            [b"/a/3"]
        );
        let one = s
            .range_page(b"/b".to_vec(), Vec::new(), 0, 0)
            .await
            .unwrap();
        assert_eq!(one.kvs.len(), 1);
        let all = s
            .range_page(b"\0".to_vec(), b"\0".to_vec(), 0, 0)
            .await
            .unwrap();
        assert_eq!(all.kvs.len(), 4);
        s.compact(s.revision());
        assert!(s
            .range_page(b"/a/".to_vec(), b"/a0".to_vec(), first.revision, 0)
            .await
            .is_err());
    }
}
