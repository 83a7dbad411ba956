//! The part of etcd a registry writer uses, as a trait: reads of a key or a prefix, puts and
//! transactions on a lease, and leases (grant, keep-alive, revoke). [`EtcdStore`] is etcd;
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

use etcd_client::{Client, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::etcd::StoreError;

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
    kvs: BTreeMap<String, Kv>,
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
        let before = self.kvs.len();
        self.kvs.retain(|_, kv| kv.lease != id);
        if self.kvs.len() != before {
            self.revision += 1;
        }
        true
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

    fn apply(&mut self, op: Write) {
        match op {
            Write::Put { key, value, lease } => {
                let rev = self.revision;
                self.kvs.insert(
                    key.clone(),
                    Kv {
                        key,
                        value,
                        lease,
                        mod_revision: rev,
                    },
                );
            }
            Write::Delete { key } => {
                self.kvs.remove(&key);
            }
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

    /// Every request fails as unreachable while `on` (keep-alive answers stop too).
    pub fn set_unreachable(&self, on: bool) {
        self.with(|s| s.unreachable = on);
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
            s.kvs.clone()
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

impl Store for MemStore {
    type KeepAlive = MemKeepAlive;

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
            for op in ops {
                s.apply(op);
            }
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
}
