//! The watch cache: an exact in-memory mirror of one or more etcd prefixes.
//!
//! It reads the store through the [`Store`] trait ([`Store::range_page`], [`Store::watch`]):
//! etcd in the daemons ([`WatchCache::spawn_prefixes`] with [`EtcdArgs`]), the in-memory
//! [`MemStore`](crate::store::MemStore) in unit tests ([`WatchCache::spawn_with`]).
//!
//! A state machine (`Connect → List → Watch`, with `Backoff` on faults):
//!
//! - **List** reads the prefix in pages, all pinned to the revision `R` of the first page, into a
//!   fresh map, and only then swaps it in as one new [`Snapshot`]: a reader never sees a
//!   half-listed view.
//! - **Watch** starts at `R + 1`, so nothing between the list and the watch is lost, and applies
//!   each response's events in order (a put replaces, a delete removes).
//! - More than one prefix (confgen's `--prefix` plus confd resource keys outside it): every
//!   prefix is listed at the same revision `R` into the one map, and watched from `R + 1` by one
//!   watcher each on one gRPC stream. etcd orders each watcher's events, not one watcher's
//!   against another's, so the published revision follows the registry's watcher (the prefix
//!   covering `keys.root()`) alone: [`WatchCache::wait_for_revision`] vouches for the registry;
//!   keys outside it arrive as their watcher delivers them, and a transaction writing under two
//!   prefixes may be seen in two steps. The set can be changed
//!   while running ([`WatchCache::set_prefixes`]: confgen after a SIGHUP); the cache relists.
//! - A compacted revision, a cancelled watch (e.g. the member lost its leader: connections use
//!   `require_leader`), a stream error or an ended stream all lead back to **List**, after a
//!   jittered, capped backoff for faults. Relisting swaps the whole map atomically, so entries
//!   deleted while the watch was down disappear and none are duplicated.
//!
//! Records under `<prefix>/endpoints/` and `<prefix>/nodes/` are decoded and validated as they
//! arrive; an invalid one is left out of [`Snapshot::endpoints`] / [`Snapshot::nodes`] with one
//! warning per write naming the key and field, and listed in [`Snapshot::rejected`].
//!
//! Two ways to follow it:
//!
//! - [`WatchCache::subscribe`]: the current [`Snapshot`] through `tokio::sync::watch` (a reader
//!   that wakes up late sees only the newest one);
//! - [`WatchCache::updates`]: every change, in order, never lost: an [`Update`] per listing or
//!   watch response, carrying the keys it changed **and** the snapshot right after it (in the
//!   style of kube-rs' watcher: a consumer that keeps derived state applies the changed keys and
//!   never has to diff two snapshots itself). A consumer that falls behind (busy running a check
//!   or a reload during a burst) gets the updates it missed merged into one: the union of their
//!   keys with the newest snapshot, so memory stays bounded by one snapshot however far behind
//!   it is.
//!
//! Snapshots are persistent maps ([`imbl::OrdMap`]): cloning one is O(1) and an update shares
//! every unchanged node with the snapshot before it, so readers may hold snapshots as long as
//! they like without making the cache copy anything. There is one copy of each value: the one in
//! the maps, shared by every snapshot that contains it.
//!
//! The task ends when the handle is dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use std::future::Future;

use etcd_client::Client;
use imbl::OrdMap;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::etcd::{EtcdArgs, StoreError};
use crate::keys::{prefix_end, KeyKind, Keys};
use crate::record::{Endpoint, Node};
use crate::store::{
    etcd_range_page, EtcdStore, RangeKv, RangePage, Store, Watch, WatchError, WatchEvent,
    MAX_MESSAGE,
};

/// Keys per page when listing. Each page is a round trip, so pages are large (10,000 endpoint
/// records are about 4 MB): a 10k registry lists in one request instead of eleven.
const PAGE: i64 = 10_000;

/// How the cache gets a [`Store`]: once at start and again after a fault.
pub trait Connector: Send + Sync + 'static {
    /// The store it opens.
    type Store: Store;
    /// Opens the store (for etcd: connects); the error, one line.
    fn open(&self) -> impl Future<Output = Result<Self::Store, String>> + Send;
}

impl Connector for EtcdArgs {
    type Store = EtcdStore;

    async fn open(&self) -> Result<EtcdStore, String> {
        self.connect()
            .await
            .map(EtcdStore::new)
            .map_err(|e| e.to_string())
    }
}

impl Connector for crate::store::MemStore {
    type Store = crate::store::MemStore;

    async fn open(&self) -> Result<Self::Store, String> {
        Ok(self.clone())
    }
}

/// A raw etcd value, shared between snapshots.
pub type Bytes = Arc<[u8]>;

/// One consistent view of the watched prefix at one etcd revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The etcd revision this view reflects (0 before the first list).
    pub revision: i64,
    /// False until the first complete list has been swapped in.
    pub complete: bool,
    /// Every key under the watched prefix with its raw value, except records that failed
    /// validation (their values are not kept: see `rejected`).
    pub kvs: OrdMap<String, Bytes>,
    /// Valid endpoint records, by etcd key.
    pub endpoints: OrdMap<String, Arc<Endpoint>>,
    /// Valid node records, by node name.
    pub nodes: OrdMap<String, Arc<Node>>,
    /// Keys whose value failed validation, with the reason.
    pub rejected: OrdMap<String, String>,
    /// The prefixes this view mirrors (a [`cover`]; empty before the first list).
    pub prefixes: Arc<Vec<String>>,
}

impl Snapshot {
    /// Endpoints grouped by service, each list sorted by (node, instance): deterministic, so the
    /// same registry always renders the same output.
    pub fn services(&self) -> BTreeMap<String, Vec<Endpoint>> {
        let mut out: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
        for ep in self.endpoints.values() {
            out.entry(ep.service.clone())
                .or_default()
                .push(Endpoint::clone(ep));
        }
        for eps in out.values_mut() {
            eps.sort_by(|a, b| (&a.node, &a.instance).cmp(&(&b.node, &b.instance)));
        }
        out
    }
}

/// What one listing or watch response changed, with the snapshot right after it.
#[derive(Debug, Clone)]
pub struct Update {
    /// The snapshot after this update.
    pub snapshot: Snapshot,
    /// Keys put (created or changed) or deleted by this update, in key order, each once. A key
    /// whose value became invalid or valid again is listed too.
    pub changed: Arc<Vec<String>>,
    /// True for a full listing (the first one, or a relist after a fault or compaction): the
    /// keys are what differs from the snapshot before it.
    pub relisted: bool,
}

/// Where the cache is, for `/healthz` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    /// Connecting or listing; no complete view yet (or reconnecting after a fault).
    Syncing,
    /// Listed and watching: the snapshot is current.
    Watching,
    /// A fault; waiting before the next attempt. The last snapshot stays published (stale).
    Degraded {
        /// The fault, one line.
        error: String,
    },
}

/// Health and counters of the cache.
#[derive(Debug, Clone)]
pub struct CacheStatus {
    /// Current state.
    pub state: CacheState,
    /// Full lists done (1 after the first sync).
    pub lists: u64,
    /// Compactions that forced a relist.
    pub compactions: u64,
    /// Faults seen (connect, list or watch errors).
    pub faults: u64,
}

/// Subscribers of [`WatchCache::updates`].
type Subscribers = Arc<Mutex<Vec<Arc<Mailbox>>>>;

/// One subscriber's pending update: at most one, later ones merged into it.
#[derive(Debug, Default)]
struct Mailbox {
    pending: Mutex<Option<(Snapshot, std::collections::BTreeSet<String>, bool)>>,
    notify: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl Mailbox {
    fn put(&self, snapshot: Snapshot, changed: &[String], relisted: bool) {
        let mut p = self.pending.lock().expect("mailbox lock");
        match p.as_mut() {
            Some((snap, keys, re)) => {
                *snap = snapshot;
                keys.extend(changed.iter().cloned());
                *re |= relisted;
            }
            None => *p = Some((snapshot, changed.iter().cloned().collect(), relisted)),
        }
        drop(p);
        self.notify.notify_one();
    }

    fn take(&self) -> Option<Update> {
        let (snapshot, keys, relisted) = self.pending.lock().expect("mailbox lock").take()?;
        Some(Update {
            snapshot,
            changed: Arc::new(keys.into_iter().collect()),
            relisted,
        })
    }

    fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// The receiving end of [`WatchCache::updates`].
#[derive(Debug)]
pub struct Updates {
    mailbox: Arc<Mailbox>,
}

impl Updates {
    /// The next update (the ones since the last call merged), or `None` once the cache is gone.
    pub async fn recv(&mut self) -> Option<Update> {
        loop {
            if let Some(u) = self.mailbox.take() {
                return Some(u);
            }
            if self
                .mailbox
                .closed
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return None;
            }
            self.mailbox.notify.notified().await;
        }
    }

    /// The pending update, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Update> {
        self.mailbox.take()
    }
}

impl Drop for Updates {
    fn drop(&mut self) {
        self.mailbox
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Handle to a running watch cache task. Dropping it stops the task.
#[derive(Debug)]
pub struct WatchCache {
    snapshot: watch::Receiver<Snapshot>,
    status: watch::Receiver<CacheStatus>,
    subscribers: Subscribers,
    prefixes: watch::Sender<Vec<String>>,
    task: tokio::task::JoinHandle<()>,
}

/// The smallest set of prefixes that covers every key any of `prefixes` covers: sorted, without
/// repeats or prefixes that another one in the set already covers (`/a` covers `/ab/c`: etcd
/// prefixes are byte prefixes, not paths). Empty prefixes are dropped.
pub fn cover(mut prefixes: Vec<String>) -> Vec<String> {
    prefixes.retain(|p| !p.is_empty());
    prefixes.sort();
    prefixes.dedup();
    let mut out: Vec<String> = Vec::with_capacity(prefixes.len());
    for p in prefixes {
        // Sorted: a covering prefix sorts before everything it covers, and right before them.
        if out.last().is_some_and(|c| p.starts_with(c.as_str())) {
            continue;
        }
        out.push(p);
    }
    out
}

impl Drop for WatchCache {
    fn drop(&mut self) {
        self.task.abort();
        for m in self.subscribers.lock().expect("subscribers lock").iter() {
            m.close();
        }
    }
}

/// Knobs for tests; the defaults are what the daemons use.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// Wait this long between a list and the watch that follows it. Tests use it to let the
    /// listed revision be compacted before the watch starts, forcing the relist path.
    pub pause_before_watch: std::time::Duration,
    /// Keys per page when listing (0: [`PAGE`], 10,000).
    pub page: i64,
}

impl WatchCache {
    /// Starts mirroring `watch_prefix` (normally `keys.root()`), connecting with `args`.
    pub fn spawn(args: EtcdArgs, keys: Keys, watch_prefix: String) -> WatchCache {
        Self::spawn_tuned(args, keys, vec![watch_prefix], Tuning::default())
    }

    /// Starts mirroring every key under any of `prefixes` into one view (reduced to their
    /// [`cover`] first; records are still decoded by `keys`' schema, so keys outside it are
    /// kept as raw values only).
    pub fn spawn_prefixes(args: EtcdArgs, keys: Keys, prefixes: Vec<String>) -> WatchCache {
        Self::spawn_tuned(args, keys, prefixes, Tuning::default())
    }

    /// [`WatchCache::spawn_prefixes`] with test knobs.
    pub fn spawn_tuned(
        args: EtcdArgs,
        keys: Keys,
        prefixes: Vec<String>,
        tuning: Tuning,
    ) -> WatchCache {
        Self::spawn_with(args, keys, prefixes, tuning)
    }

    /// [`WatchCache::spawn_tuned`] over any store: `connector` opens it at start and after
    /// each fault.
    pub fn spawn_with<C: Connector>(
        connector: C,
        keys: Keys,
        prefixes: Vec<String>,
        tuning: Tuning,
    ) -> WatchCache {
        let (prefixes_tx, prefixes_rx) = watch::channel(cover(prefixes));
        let (snap_tx, snap_rx) = watch::channel(Snapshot::default());
        let (status_tx, status_rx) = watch::channel(CacheStatus {
            state: CacheState::Syncing,
            lists: 0,
            compactions: 0,
            faults: 0,
        });
        let subscribers: Subscribers = Arc::default();
        let worker = Worker {
            connector,
            keys,
            prefixes: prefixes_rx,
            snap: snap_tx,
            status: status_tx,
            subscribers: subscribers.clone(),
            tuning,
        };
        let task = tokio::spawn(worker.run());
        WatchCache {
            snapshot: snap_rx,
            status: status_rx,
            subscribers,
            prefixes: prefixes_tx,
            task,
        }
    }

    /// Mirrors `prefixes` from now on (reduced to their [`cover`]). If that differs from the
    /// current set the cache relists at once: keys no longer covered leave the view, new ones
    /// arrive, in one update. Returns whether the set changed.
    pub fn set_prefixes(&self, prefixes: Vec<String>) -> bool {
        let next = cover(prefixes);
        self.prefixes.send_if_modified(|cur| {
            if *cur == next {
                return false;
            }
            *cur = next;
            true
        })
    }

    /// The prefixes mirrored (a [`cover`]).
    pub fn prefixes(&self) -> Vec<String> {
        self.prefixes.borrow().clone()
    }

    /// Every change from now on, in order. If a complete snapshot exists already, the first
    /// update is that snapshot with every key in it listed as changed (`relisted`), so a new
    /// subscriber builds its state from it. Updates are never dropped; those a subscriber has not
    /// taken yet are merged (see the module docs).
    pub fn updates(&self) -> Updates {
        let mailbox = Arc::new(Mailbox::default());
        let mut subs = self.subscribers.lock().expect("subscribers lock");
        // Under the lock the worker cannot publish: the snapshot read here is the one the next
        // update will follow.
        let current = self.snapshot.borrow().clone();
        if current.complete {
            let changed: Vec<String> = current
                .kvs
                .keys()
                .chain(current.rejected.keys())
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            mailbox.put(current, &changed, true);
        }
        subs.push(mailbox.clone());
        Updates { mailbox }
    }

    /// A receiver of snapshots. `changed()` fires on every applied change.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    /// A receiver of the cache's health.
    pub fn status(&self) -> watch::Receiver<CacheStatus> {
        self.status.clone()
    }

    /// The current snapshot.
    pub fn current(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// Waits until a complete snapshot at or after `revision` is published.
    pub async fn wait_for_revision(&self, revision: i64) -> Snapshot {
        let mut rx = self.subscribe();
        let snap = rx
            .wait_for(|s| s.complete && s.revision >= revision)
            .await
            .expect("cache task ended while its handle is alive");
        snap.clone()
    }
}

/// How a watch ended.
enum WatchEnd {
    /// The start revision was compacted: relist at once.
    Compacted(i64),
    /// Everyone stopped listening: end the task.
    Closed,
    /// The set of prefixes changed: relist at once.
    Rewatch,
    /// A fault: back off, then reconnect and relist.
    Fault(String),
}

struct Worker<C: Connector> {
    connector: C,
    keys: Keys,
    /// The prefixes to mirror, always a [`cover`]; a change makes the worker relist.
    prefixes: watch::Receiver<Vec<String>>,
    snap: watch::Sender<Snapshot>,
    status: watch::Sender<CacheStatus>,
    subscribers: Subscribers,
    tuning: Tuning,
}

impl<C: Connector> Worker<C> {
    async fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut store: Option<C::Store> = None;
        loop {
            if self.snap.is_closed() {
                return;
            }
            let prefixes = self.prefixes.borrow_and_update().clone();
            let shown = prefixes.join(",");
            let c = match store.take() {
                Some(c) => c,
                None => match self.connector.open().await {
                    Ok(c) => c,
                    Err(e) => {
                        self.fault(e, &mut backoff).await;
                        continue;
                    }
                },
            };
            let revision = match self.list(&c, &prefixes).await {
                Ok(rev) => rev,
                Err(e) => {
                    self.fault(format!("listing {shown}: {e}"), &mut backoff)
                        .await;
                    continue;
                }
            };
            backoff.success();
            if !self.tuning.pause_before_watch.is_zero() {
                tokio::time::sleep(self.tuning.pause_before_watch).await;
            }
            self.set_state(CacheState::Watching, &shown);
            match self.watch(&c, revision, &prefixes).await {
                WatchEnd::Closed => return,
                WatchEnd::Compacted(compact) => {
                    info!(prefix = %shown, revision, compact, "watch revision compacted; relisting");
                    self.status.send_modify(|s| s.compactions += 1);
                    store = Some(c);
                }
                WatchEnd::Rewatch => {
                    let next = self.prefixes.borrow().join(",");
                    info!(from = %shown, to = %next, "watched prefixes changed; relisting");
                    store = Some(c);
                }
                WatchEnd::Fault(error) => {
                    self.fault(format!("watching {shown}: {error}"), &mut backoff)
                        .await;
                }
            }
        }
    }

    /// Publishes `next` to snapshot readers and, with the keys that changed, to every update
    /// subscriber (both under the subscribers' lock, see [`WatchCache::updates`]).
    fn publish(&self, next: Snapshot, changed: Vec<String>, relisted: bool) {
        let mut subs = self.subscribers.lock().expect("subscribers lock");
        subs.retain(|m| !m.closed.load(std::sync::atomic::Ordering::SeqCst));
        if !changed.is_empty() || relisted {
            for m in subs.iter() {
                m.put(next.clone(), &changed, relisted);
            }
        }
        self.snap.send_replace(next);
    }

    fn set_state(&self, state: CacheState, shown: &str) {
        self.status.send_if_modified(|s| {
            if s.state == state {
                return false;
            }
            match &state {
                CacheState::Watching => info!(prefix = %shown, "registry watch is current"),
                CacheState::Degraded { error } => warn!(prefix = %shown, %error, "registry watch degraded; the last view is kept and retried"),
                CacheState::Syncing => {}
            }
            s.state = state;
            true
        });
    }

    async fn fault(&self, error: String, backoff: &mut Backoff) {
        let shown = self.prefixes.borrow().join(",");
        debug!(prefix = %shown, %error, "registry watch fault");
        self.status.send_modify(|s| s.faults += 1);
        self.set_state(CacheState::Degraded { error }, &shown);
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.snap.closed() => {}
        }
    }

    /// Lists the prefixes (see [`fetch_snapshot`]), then swaps the result in.
    async fn list(&self, store: &C::Store, prefixes: &[String]) -> Result<i64, StoreError> {
        let known_bad = self.snap.borrow().rejected.clone();
        let page = if self.tuning.page > 0 {
            self.tuning.page
        } else {
            PAGE
        };
        let fresh = list_prefixes(&mut StorePager(store), &self.keys, prefixes, page, |k| {
            !known_bad.contains_key(k)
        })
        .await?;
        let revision = fresh.revision;
        let count = fresh.kvs.len();
        let changed = {
            let old = self.snap.borrow();
            changed_between(&old, &fresh)
        };
        self.publish(fresh, changed, true);
        self.status.send_modify(|s| s.lists += 1);
        debug!(prefix = %prefixes.join(","), revision, keys = count, "listed");
        Ok(revision)
    }

    /// Watches every prefix from `revision + 1` (one watcher each, on one stream), applying
    /// events until the watch ends or the set of prefixes changes.
    async fn watch(&mut self, store: &C::Store, revision: i64, prefixes: &[String]) -> WatchEnd {
        // The watcher of the prefix that covers the registry (`keys.root()`) is created first
        // (watcher 0): its answers alone move the published revision (below).
        let root = self.keys.root();
        let mut ordered: Vec<String> = prefixes.to_vec();
        if let Some(i) = ordered.iter().position(|p| root.starts_with(p.as_str())) {
            let p = ordered.remove(i);
            ordered.insert(0, p);
        }
        let multi = ordered.len() > 1;
        if ordered.is_empty() {
            // Nothing to watch: wait for a set that has something.
            return match self.prefixes.changed().await {
                Ok(()) => WatchEnd::Rewatch,
                Err(_) => WatchEnd::Closed,
            };
        }
        let mut stream = match store.watch(ordered, revision + 1).await {
            Ok(s) => s,
            Err(e) => return WatchEnd::Fault(e.to_string()),
        };
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = self.snap.closed() => return WatchEnd::Closed,
                c = self.prefixes.changed() => match c {
                    Ok(()) => return WatchEnd::Rewatch,
                    Err(_) => return WatchEnd::Closed,
                },
            };
            let resp = match msg {
                Ok(r) => r,
                Err(WatchError::Compacted { compact_revision }) => {
                    return WatchEnd::Compacted(compact_revision)
                }
                Err(e) => return WatchEnd::Fault(e.to_string()),
            };
            // With several watchers on the stream, etcd orders each watcher's events but not
            // one watcher's against another's (a watcher catching up can lag behind), so a
            // revision seen by one says nothing of the others. The published revision follows
            // the registry's watcher alone: `wait_for_revision` vouches for the registry, and
            // keys outside it arrive as their watcher delivers them.
            let moves_revision = !multi || resp.watcher == 0;
            if resp.events.is_empty() {
                // A progress notification: every event up to its revision has been delivered.
                if moves_revision && resp.revision > self.snap.borrow().revision {
                    let mut next = self.snap.borrow().clone();
                    next.revision = resp.revision;
                    self.publish(next, Vec::new(), false);
                }
                continue;
            }
            let last_rev = resp
                .events
                .iter()
                .map(WatchEvent::mod_revision)
                .max()
                .unwrap_or(0);
            let (mut m, covered) = {
                let cur = self.snap.borrow();
                (Mirror::of(&cur), cur.prefixes.clone())
            };
            let mut changed = Vec::with_capacity(resp.events.len());
            for ev in resp.events {
                let key = match ev {
                    WatchEvent::Put { key, value, .. } => m.put(&self.keys, &key, value, true),
                    WatchEvent::Delete { key, .. } => m.delete(&self.keys, &key),
                };
                changed.extend(key);
            }
            changed.sort_unstable();
            changed.dedup();
            let mut next = m.into_snapshot(0, true);
            next.prefixes = covered;
            let cur = self.snap.borrow().revision;
            next.revision = if moves_revision {
                cur.max(last_rev)
            } else {
                cur
            };
            self.publish(next, changed, false);
        }
    }
}

/// Reads `prefix` once into a complete [`Snapshot`]: pages of 10,000 keys, all pinned to the
/// revision of the first page, decoded and validated like the watch cache does (bad records are
/// in `rejected`, with one warning each). For one-shot readers (`proxyctl ls`, `confgen dump`).
pub async fn fetch_snapshot(
    client: &mut Client,
    keys: &Keys,
    prefix: &str,
) -> Result<Snapshot, etcd_client::Error> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    list_prefixes(&mut kv, keys, &[prefix.to_owned()], PAGE, |_| true).await
}

/// [`fetch_snapshot`] of several prefixes into one snapshot, every one at the same revision
/// (`prefixes` should be a [`cover`], or keys are read twice).
pub async fn fetch_snapshot_of(
    client: &mut Client,
    keys: &Keys,
    prefixes: &[String],
) -> Result<Snapshot, etcd_client::Error> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    list_prefixes(&mut kv, keys, prefixes, PAGE, |_| true).await
}

/// Reads one page of a range ([`Store::range_page`]'s arguments): a [`Store`] (for the cache)
/// or etcd-client's KV client (for [`fetch_snapshot`], whose callers see etcd-client's error).
trait Pager {
    type Error;
    fn page(
        &mut self,
        from: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
        limit: i64,
    ) -> impl Future<Output = Result<RangePage, Self::Error>> + Send;
}

struct StorePager<'a, S>(&'a S);

impl<S: Store> Pager for StorePager<'_, S> {
    type Error = StoreError;
    fn page(
        &mut self,
        from: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
        limit: i64,
    ) -> impl Future<Output = Result<RangePage, StoreError>> + Send {
        self.0.range_page(from, end, revision, limit)
    }
}

impl Pager for etcd_client::KvClient {
    type Error = etcd_client::Error;
    fn page(
        &mut self,
        from: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
        limit: i64,
    ) -> impl Future<Output = Result<RangePage, etcd_client::Error>> + Send {
        etcd_range_page(self, from, end, revision, limit)
    }
}

async fn list_prefixes<P: Pager>(
    pager: &mut P,
    keys: &Keys,
    prefixes: &[String],
    page: i64,
    warn_bad: impl Fn(&str) -> bool,
) -> Result<Snapshot, P::Error> {
    let mut revision = 0i64;
    let mut fresh = Mirror::default();
    for prefix in prefixes {
        revision = list_into(pager, keys, prefix, revision, page, &mut fresh, &warn_bad).await?;
    }
    if revision == 0 {
        // No prefix at all: the store's revision still dates the (empty) view.
        revision = pager.page(b"\0".to_vec(), Vec::new(), 0, 1).await?.revision;
    }
    let mut snap = fresh.into_snapshot(revision, true);
    snap.prefixes = Arc::new(prefixes.to_vec());
    Ok(snap)
}

/// Lists one prefix into `fresh` at `revision` (0: the current one, returned for the next), in
/// pages of `page` keys.
async fn list_into<P: Pager>(
    pager: &mut P,
    keys: &Keys,
    prefix: &str,
    mut revision: i64,
    page: i64,
    fresh: &mut Mirror,
    warn_bad: &impl Fn(&str) -> bool,
) -> Result<i64, P::Error> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    loop {
        let resp = pager.page(from, end.clone(), revision, page).await?;
        if revision == 0 {
            revision = resp.revision;
        }
        let decoded = decode_page(keys, &resp.kvs);
        let next = match resp.kvs.last() {
            Some(last) if resp.more => {
                let mut k = last.key.clone();
                k.push(0);
                Some(k)
            }
            _ => None,
        };
        for (item, decoded) in resp.kvs.into_iter().zip(decoded) {
            let warn = std::str::from_utf8(&item.key).is_ok_and(warn_bad);
            fresh.store(&item.key, item.value, decoded, warn);
        }
        match next {
            Some(k) => from = k,
            None => break,
        }
    }
    Ok(revision)
}

/// Keys whose value or validity differs between two snapshots (one ordered merge of each pair
/// of maps; only run for a full listing).
fn changed_between(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    use imbl::ordmap::DiffItem;
    let mut out = std::collections::BTreeSet::new();
    for d in old.kvs.diff(&new.kvs) {
        match d {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) => out.insert(k.clone()),
            DiffItem::Update { new: (k, _), .. } => out.insert(k.clone()),
        };
    }
    for d in old.rejected.diff(&new.rejected) {
        match d {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) => out.insert(k.clone()),
            DiffItem::Update { new: (k, _), .. } => out.insert(k.clone()),
        };
    }
    out.into_iter().collect()
}

/// The maps of a snapshot being edited, with decode-on-put.
#[derive(Default)]
struct Mirror {
    kvs: OrdMap<String, Bytes>,
    endpoints: OrdMap<String, Arc<Endpoint>>,
    nodes: OrdMap<String, Arc<Node>>,
    rejected: OrdMap<String, String>,
}

impl Mirror {
    /// The maps of `s` (O(1): persistent maps share their nodes until edited).
    fn of(s: &Snapshot) -> Mirror {
        Mirror {
            kvs: s.kvs.clone(),
            endpoints: s.endpoints.clone(),
            nodes: s.nodes.clone(),
            rejected: s.rejected.clone(),
        }
    }

    fn into_snapshot(self, revision: i64, complete: bool) -> Snapshot {
        Snapshot {
            revision,
            complete,
            kvs: self.kvs,
            endpoints: self.endpoints,
            nodes: self.nodes,
            rejected: self.rejected,
            prefixes: Arc::default(),
        }
    }

    /// Stores `value` at `key`, decoding records; a bad record is warned about if `warn_bad`
    /// and its value is not kept. Returns the key if it is UTF-8.
    fn put(&mut self, keys: &Keys, key: &[u8], value: Bytes, warn_bad: bool) -> Option<String> {
        let decoded = decode(keys, key, &value);
        self.store(key, value, decoded, warn_bad)
    }

    /// [`Mirror::put`] with the record already decoded (see [`decode_page`]).
    fn store(
        &mut self,
        key: &[u8],
        value: Bytes,
        decoded: Decoded,
        warn_bad: bool,
    ) -> Option<String> {
        let Ok(key) = std::str::from_utf8(key) else {
            warn!(key = %String::from_utf8_lossy(key), "skipping a key that is not UTF-8");
            return None;
        };
        self.endpoints.remove(key);
        self.rejected.remove(key);
        if let Some(node) = &decoded.node_key {
            self.nodes.remove(node.as_str());
        }
        let result = match decoded.record {
            Some(Ok(Record::Endpoint(ep))) => {
                self.endpoints.insert(key.to_owned(), ep);
                Ok(())
            }
            Some(Ok(Record::Node(n))) => {
                self.nodes.insert(n.node.clone(), n);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                self.kvs.insert(key.to_owned(), value);
            }
            Err(e) => {
                // One warning per write of a bad value (a relist does not repeat it). The value
                // itself is not kept: a flood of invalid values costs a key and a reason each.
                if warn_bad {
                    warn!(key, field = %e.field, reason = %e.reason, "skipping an invalid record");
                } else {
                    debug!(key, field = %e.field, reason = %e.reason, "skipping an invalid record");
                }
                self.kvs.remove(key);
                self.rejected.insert(key.to_owned(), e.to_string());
            }
        }
        Some(key.to_owned())
    }

    fn delete(&mut self, keys: &Keys, key: &[u8]) -> Option<String> {
        let key = std::str::from_utf8(key).ok()?;
        self.kvs.remove(key);
        self.endpoints.remove(key);
        self.rejected.remove(key);
        if let Some(KeyKind::Node { node }) = keys.parse(key) {
            self.nodes.remove(node);
        }
        Some(key.to_owned())
    }
}

/// A decoded record of one key.
enum Record {
    Endpoint(Arc<Endpoint>),
    Node(Arc<Node>),
}

/// What [`decode`] made of a key's value: the record (for endpoint and node keys; `None` for
/// other keys or a key that is not UTF-8) and, for a node key, the node's name.
struct Decoded {
    record: Option<Result<Record, crate::RecordError>>,
    node_key: Option<String>,
}

/// Decodes and validates `value` as the record `key` names (no map is touched, so pages can be
/// decoded on several threads).
fn decode(keys: &Keys, key: &[u8], value: &[u8]) -> Decoded {
    let Ok(key) = std::str::from_utf8(key) else {
        return Decoded {
            record: None,
            node_key: None,
        };
    };
    match keys.parse(key) {
        Some(KeyKind::Endpoint { .. }) => Decoded {
            record: Some(
                Endpoint::decode(keys, key, value).map(|ep| Record::Endpoint(Arc::new(ep))),
            ),
            node_key: None,
        },
        Some(KeyKind::Node { node }) => Decoded {
            record: Some(Node::decode(keys, key, value).map(|n| Record::Node(Arc::new(n)))),
            node_key: Some(node.to_owned()),
        },
        _ => Decoded {
            record: None,
            node_key: None,
        },
    }
}

/// Keys of one page before its decoding is spread over threads.
const PARALLEL_DECODE_MIN: usize = 2_000;

/// [`decode`] for every key-value of a page, on every core when the page is large (decoding and
/// validating records is most of a 10,000-key list's CPU); in the page's order.
fn decode_page(keys: &Keys, kvs: &[RangeKv]) -> Vec<Decoded> {
    let threads = if kvs.len() >= PARALLEL_DECODE_MIN {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    } else {
        1
    };
    if threads == 1 {
        return kvs
            .iter()
            .map(|kv| decode(keys, &kv.key, &kv.value))
            .collect();
    }
    let chunk = kvs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = kvs
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|kv| decode(keys, &kv.key, &kv.value))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a page decode panicked"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new("/flotilla").unwrap()
    }

    #[test]
    fn cover_keeps_only_prefixes_no_other_one_covers() {
        let c = |v: &[&str]| cover(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            c(&[
                "/myapp/db/url",
                "/flotilla/",
                "/myapp/db",
                "/myapp/db/user",
                "/flotilla/"
            ]),
            vec!["/flotilla/", "/myapp/db"]
        );
        // Byte prefixes, not paths: "/a" covers "/ab".
        assert_eq!(c(&["/ab/c", "/a"]), vec!["/a"]);
        assert_eq!(c(&["/a/", "/ab/"]), vec!["/a/", "/ab/"]);
        assert_eq!(c(&["/", "/flotilla/", "/x"]), vec!["/"]);
        assert_eq!(c(&["", "/x"]), vec!["/x"]);
        assert!(c(&[]).is_empty());
    }

    fn ep(node: &str, service: &str, n: u16) -> (String, Vec<u8>) {
        let ep = Endpoint {
            service: service.into(),
            instance: format!("{node}-0123456789ab-{n}"),
            node: node.into(),
            host: "10.0.0.1".into(),
            port: n,
            proto: crate::Proto::Tcp,
            container: "0123456789ab".into(),
            image: String::new(),
            tags: vec![],
            meta: BTreeMap::new(),
            health: crate::Health::None,
            registered_at: "2026-01-01T00:00:00Z".into(),
        };
        (ep.key(&keys()), ep.encode(&keys()).unwrap())
    }

    #[test]
    fn an_invalid_value_is_rejected_without_its_value_and_a_fix_restores_it() {
        let keys = keys();
        let mut m = Mirror::default();
        let (k, v) = ep("a", "web", 80);
        m.put(&keys, k.as_bytes(), Bytes::from(&v[..]), false);
        assert!(m.endpoints.contains_key(&k) && m.kvs.contains_key(&k));
        m.put(&keys, k.as_bytes(), Bytes::from(&b"{bad"[..]), false);
        assert!(!m.endpoints.contains_key(&k));
        assert!(!m.kvs.contains_key(&k), "the invalid value is not kept");
        assert!(m.rejected.contains_key(&k));
        m.put(&keys, k.as_bytes(), Bytes::from(&v[..]), false);
        assert!(m.endpoints.contains_key(&k) && !m.rejected.contains_key(&k));
    }

    #[test]
    fn a_relist_reports_exactly_the_keys_that_differ() {
        let keys = keys();
        let mut a = Mirror::default();
        let (k1, v1) = ep("a", "web", 80);
        let (k2, v2) = ep("a", "web", 81);
        let (k3, v3) = ep("b", "web", 82);
        a.put(&keys, k1.as_bytes(), Bytes::from(&v1[..]), false);
        a.put(&keys, k2.as_bytes(), Bytes::from(&v2[..]), false);
        a.put(&keys, b"/flotilla/config/x", Bytes::from(&b"1"[..]), false);
        let before = a.into_snapshot(5, true);
        let mut b = Mirror::of(&before);
        b.delete(&keys, k1.as_bytes());
        b.put(&keys, k2.as_bytes(), Bytes::from(&b"{bad"[..]), false);
        b.put(&keys, k3.as_bytes(), Bytes::from(&v3[..]), false);
        b.put(&keys, b"/flotilla/config/x", Bytes::from(&b"1"[..]), false);
        let after = b.into_snapshot(9, true);
        assert_eq!(changed_between(&before, &after), vec![k1, k2, k3]);
        // The earlier snapshot is untouched by the edits (persistent maps).
        assert_eq!(before.endpoints.len(), 2);
        assert_eq!(changed_between(&after, &after), Vec::<String>::new());
    }

    /// The cache over [`crate::store::MemStore`], on tokio's paused clock.
    mod over_mem_store {
        use super::*;
        use crate::store::{MemStore, Write};
        use std::time::Duration;

        fn put(key: &str, value: &[u8]) -> Write {
            Write::Put {
                key: key.into(),
                value: value.to_vec(),
                lease: 0,
            }
        }

        fn delete(key: &str) -> Write {
            Write::Delete { key: key.into() }
        }

        async fn recv(updates: &mut Updates) -> Update {
            tokio::time::timeout(Duration::from_secs(60), updates.recv())
                .await
                .expect("an update within 60 s")
                .expect("the cache is running")
        }

        fn sorted(keys: &[&str]) -> Vec<String> {
            let mut v: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            v.sort();
            v
        }

        /// A store with two endpoints, a config key and a key outside the registry.
        async fn store() -> (MemStore, Vec<(String, Vec<u8>)>) {
            let store = MemStore::new();
            let eps = vec![ep("a", "web", 80), ep("b", "web", 81), ep("c", "api", 82)];
            store
                .txn(vec![
                    put(&eps[0].0, &eps[0].1),
                    put(&eps[1].0, &eps[1].1),
                    put("/flotilla/config/x", b"1"),
                    put("/other/y", b"2"),
                ])
                .await
                .unwrap();
            (store, eps)
        }

        fn spawn(store: &MemStore, tuning: Tuning) -> WatchCache {
            WatchCache::spawn_with(store.clone(), keys(), vec![keys().root()], tuning)
        }

        #[tokio::test(start_paused = true)]
        async fn the_first_update_is_a_complete_listing_in_pages() {
            let (store, eps) = store().await;
            let cache = spawn(
                &store,
                Tuning {
                    page: 2,
                    ..Tuning::default()
                },
            );
            let mut updates = cache.updates();
            let u = recv(&mut updates).await;
            assert!(u.relisted && u.snapshot.complete);
            assert_eq!(u.snapshot.revision, store.revision());
            assert_eq!(
                *u.changed,
                sorted(&[&eps[0].0, &eps[1].0, "/flotilla/config/x"])
            );
            assert_eq!(u.snapshot.endpoints.len(), 2);
            assert_eq!(u.snapshot.services()["web"].len(), 2);
            assert!(
                !u.snapshot.kvs.contains_key("/other/y"),
                "outside the prefix"
            );
            assert_eq!(&*u.snapshot.kvs["/flotilla/config/x"], b"1");
            assert_eq!(cache.status().borrow().lists, 1);
            assert_eq!(cache.status().borrow().state, CacheState::Watching);
        }

        #[tokio::test(start_paused = true)]
        async fn puts_and_deletes_are_published_with_their_keys_and_revision() {
            let (store, eps) = store().await;
            let cache = spawn(&store, Tuning::default());
            let mut updates = cache.updates();
            let first = recv(&mut updates).await;
            store.txn(vec![put(&eps[2].0, &eps[2].1)]).await.unwrap();
            let u = recv(&mut updates).await;
            assert!(!u.relisted);
            assert_eq!(*u.changed, vec![eps[2].0.clone()]);
            assert_eq!(u.snapshot.revision, store.revision());
            assert_eq!(u.snapshot.services()["api"].len(), 1);
            // One transaction: one update with both keys; a bad value is rejected, not kept.
            store
                .txn(vec![delete(&eps[0].0), put(&eps[1].0, b"{bad")])
                .await
                .unwrap();
            let u = recv(&mut updates).await;
            assert_eq!(*u.changed, sorted(&[&eps[0].0, &eps[1].0]));
            assert_eq!(u.snapshot.revision, store.revision());
            assert!(!u.snapshot.kvs.contains_key(&eps[0].0));
            assert!(u.snapshot.rejected.contains_key(&eps[1].0));
            assert!(!u.snapshot.kvs.contains_key(&eps[1].0));
            assert_eq!(u.snapshot.endpoints.len(), 1);
            // The values not written are the very allocations of the first snapshot.
            assert!(Arc::ptr_eq(
                &first.snapshot.kvs["/flotilla/config/x"],
                &u.snapshot.kvs["/flotilla/config/x"]
            ));
            // A write outside the prefix publishes nothing; a progress notification moves the
            // revision.
            store.txn(vec![put("/other/z", b"3")]).await.unwrap();
            store.progress();
            let snap = tokio::time::timeout(
                Duration::from_secs(60),
                cache.wait_for_revision(store.revision()),
            )
            .await
            .expect("the revision moves");
            assert_eq!(snap.revision, store.revision());
            assert!(updates.try_recv().is_none(), "nothing changed");
            assert_eq!(cache.status().borrow().lists, 1, "no relist");
        }

        #[tokio::test(start_paused = true)]
        async fn a_failed_watch_relists_and_publishes_only_the_difference() {
            let (store, eps) = store().await;
            let cache = spawn(&store, Tuning::default());
            let mut updates = cache.updates();
            recv(&mut updates).await;
            store.break_watches();
            store
                .txn(vec![delete(&eps[0].0), put(&eps[2].0, &eps[2].1)])
                .await
                .unwrap();
            let u = recv(&mut updates).await;
            assert!(u.relisted);
            assert_eq!(*u.changed, sorted(&[&eps[0].0, &eps[2].0]));
            assert_eq!(u.snapshot.revision, store.revision());
            assert_eq!(u.snapshot.endpoints.len(), 2);
            let status = cache.status().borrow().clone();
            assert_eq!((status.lists, status.faults), (2, 1));
            // Watching again.
            store
                .txn(vec![put("/flotilla/config/x", b"2")])
                .await
                .unwrap();
            let u = recv(&mut updates).await;
            assert!(!u.relisted);
            assert_eq!(*u.changed, vec!["/flotilla/config/x".to_string()]);
            assert_eq!(cache.status().borrow().state, CacheState::Watching);
            // The store away: the view is kept (degraded), then relisted when it is back.
            store.set_unreachable(true);
            let mut status = cache.status();
            tokio::time::timeout(
                Duration::from_secs(60),
                status.wait_for(|s| matches!(s.state, CacheState::Degraded { .. })),
            )
            .await
            .expect("degraded")
            .unwrap();
            assert_eq!(cache.current().endpoints.len(), 2, "the last view is kept");
            store.set_unreachable(false);
            store.txn(vec![delete("/flotilla/config/x")]).await.unwrap();
            let u = recv(&mut updates).await;
            assert!(u.relisted);
            assert_eq!(*u.changed, vec!["/flotilla/config/x".to_string()]);
        }

        #[tokio::test(start_paused = true)]
        async fn with_two_prefixes_only_the_registrys_watcher_moves_the_revision() {
            let (store, eps) = store().await;
            let cache = WatchCache::spawn_with(
                store.clone(),
                keys(),
                // "/app/" sorts before the registry's prefix: the cache still creates the
                // registry's watcher first.
                vec!["/app/".into(), keys().root()],
                Tuning::default(),
            );
            let mut updates = cache.updates();
            let u = recv(&mut updates).await;
            assert!(!u.snapshot.kvs.contains_key("/other/y"));
            let listed = u.snapshot.revision;
            store.txn(vec![put("/app/z", b"3")]).await.unwrap();
            let u = recv(&mut updates).await;
            assert_eq!(*u.changed, vec!["/app/z".to_string()]);
            assert_eq!(u.snapshot.revision, listed, "another watcher's event");
            store.txn(vec![put(&eps[2].0, &eps[2].1)]).await.unwrap();
            let u = recv(&mut updates).await;
            assert_eq!(*u.changed, vec![eps[2].0.clone()]);
            assert_eq!(u.snapshot.revision, store.revision());
            // A changed set relists: keys no longer covered leave in one update.
            assert!(cache.set_prefixes(vec![keys().root()]));
            let u = recv(&mut updates).await;
            assert!(u.relisted);
            assert_eq!(*u.changed, vec!["/app/z".to_string()]);
            assert!(!u.snapshot.kvs.contains_key("/app/z"));
        }

        #[tokio::test(start_paused = true)]
        async fn a_compacted_watch_revision_relists() {
            let (store, eps) = store().await;
            let cache = spawn(
                &store,
                Tuning {
                    pause_before_watch: Duration::from_secs(1),
                    ..Tuning::default()
                },
            );
            let mut updates = cache.updates();
            let first = recv(&mut updates).await;
            // Between the list and the watch: two writes, then a compaction past the watch's
            // start revision.
            store.txn(vec![put(&eps[2].0, &eps[2].1)]).await.unwrap();
            store.txn(vec![delete(&eps[1].0)]).await.unwrap();
            store.compact(store.revision());
            let u = recv(&mut updates).await;
            assert!(u.relisted);
            assert_eq!(*u.changed, sorted(&[&eps[1].0, &eps[2].0]));
            assert_eq!(u.snapshot.revision, store.revision());
            assert!(u.snapshot.revision > first.snapshot.revision);
            let status = cache.status().borrow().clone();
            assert_eq!((status.compactions, status.faults, status.lists), (1, 0, 2));
        }
    }
}
