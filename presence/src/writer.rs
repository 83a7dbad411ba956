//! The etcd writer: owns the lease and the keys of this node.
//!
//! - Waits for the first full container list, then *recovers*: makes sure it holds a live lease
//!   (grants one at `--ttl`), reads every key under `endpoints/<node>/` and the node key, and
//!   writes only the differences (puts what is missing, changed or on another lease; deletes
//!   leftovers). Then revokes the predecessor's lease from `--state-file`.
//! - Afterwards applies each change as a small transaction (deletes first), again only the
//!   differences from what it has written.
//! - Keeps the lease alive every TTL/3 on a keepalive stream, reads every answer and tracks the
//!   deadline (send time + TTL). A stream error or a missing answer re-opens the stream. An answer
//!   with TTL 0 (lease gone) or a passed deadline means the lease may be lost: recover again, which
//!   grants a new lease if needed and re-puts everything.
//! - Any failed request also leads to a recovery, retried with jittered backoff (100 ms to 1 s)
//!   until etcd answers. Faults are logged once per state change.
//! - Transactions are bounded in operations (100) and bytes (`--max-txn-bytes`). A transaction
//!   etcd still refuses as too large (its `--max-request-bytes` may be smaller) is split in
//!   halves and sent again. A record that does not fit alone is *refused*: logged once, counted,
//!   removed from etcd if an older version was there, and not tried again until the container's
//!   record changes — every other record is written.
//! - On shutdown, revokes the lease: every entry vanishes at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use crate::liveness::{beat_interval, Loop};
use flotilla_registry::backoff::Backoff;
use flotilla_registry::daemon;
use flotilla_registry::record::now_rfc3339;
use flotilla_registry::store::{KeepAlive, Store, Write};
use flotilla_registry::{Endpoint, Keys, Node, StoreError};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, SharedStatus};
use crate::reconcile::WriterMsg;
use crate::state_file;

/// Largest number of operations in one transaction (etcd's default limit is 128).
const MAX_TXN_OPS: usize = 100;

/// Bytes one operation adds to a request beyond its key and value (protobuf framing, the lease
/// id, the request header's share): an estimate on the safe side.
const OP_OVERHEAD: usize = 64;

/// Splits operations of the given sizes, in order, into consecutive transactions of at most
/// `max_ops` operations and at most `max_bytes` bytes. An operation larger than `max_bytes`
/// gets a transaction of its own (callers refuse such operations before).
pub fn batches(sizes: &[usize], max_ops: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, size) in sizes.iter().enumerate() {
        if i > start && (i - start >= max_ops || bytes + size > max_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// One operation of a plan, with its estimated size.
#[derive(Debug, Clone)]
struct Op {
    key: String,
    /// Encoded record for a put, `None` for a delete.
    value: Option<Vec<u8>>,
    bytes: usize,
}

/// A record that is not written: it is too large for one etcd request.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub key: String,
    pub endpoint: Endpoint,
    /// Estimated bytes of its put.
    pub bytes: usize,
    pub reason: String,
}

/// Fixed settings of the writer.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub keys: Keys,
    pub node: Node,
    pub ttl: Duration,
    pub state_file: Option<PathBuf>,
    /// The lease a predecessor left in the state file, revoked after the first sync.
    pub predecessor: Option<i64>,
    /// Largest transaction in (estimated) bytes (`--max-txn-bytes`).
    pub max_txn_bytes: usize,
}

/// The writes that bring etcd to the desired state.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub deletes: Vec<String>,
    pub puts: Vec<(String, Endpoint)>,
    /// What etcd holds for this node once the plan is applied.
    pub result: BTreeMap<String, Endpoint>,
}

impl Plan {
    /// Puts `ep` at `key`.
    fn put(&mut self, key: &str, ep: Endpoint) {
        self.puts.push((key.to_owned(), ep.clone()));
        self.result.insert(key.to_owned(), ep);
    }

    /// Puts `want` at `key` as a new or changed endpoint: registered now.
    fn put_new(&mut self, key: &str, want: &Endpoint, now: &str) {
        let mut ep = want.clone();
        ep.registered_at = now.to_owned();
        self.put(key, ep);
    }

    pub fn is_empty(&self) -> bool {
        self.deletes.is_empty() && self.puts.is_empty()
    }
}

/// Equal apart from the registration time.
fn same(a: &Endpoint, b: &Endpoint) -> bool {
    let mut a = a.clone();
    a.registered_at.clone_from(&b.registered_at);
    a == *b
}

/// One key of this node as read from etcd.
#[derive(Debug, Clone)]
pub struct ActualKv {
    pub key: String,
    pub value: Vec<u8>,
    pub lease: i64,
}

/// Compares the desired endpoints with what etcd holds under this node's prefix. Keys that are
/// equal (apart from `registered_at`) and on `lease` are left alone; equal ones on another lease
/// are re-put keeping their registration time; everything else desired is put with `now`, and
/// every other key is deleted.
pub fn plan_full(
    keys: &Keys,
    desired: &BTreeMap<String, Endpoint>,
    actual: &[ActualKv],
    lease: i64,
    now: &str,
) -> Plan {
    let mut plan = Plan::default();
    let mut found: HashMap<&str, &ActualKv> = HashMap::new();
    for kv in actual {
        if desired.contains_key(&kv.key) {
            found.insert(kv.key.as_str(), kv);
        } else {
            plan.deletes.push(kv.key.clone());
        }
    }
    for (key, want) in desired {
        let existing = found.get(key.as_str()).and_then(|kv| {
            Endpoint::decode(keys, key, &kv.value)
                .ok()
                .map(|ep| (ep, kv.lease))
        });
        match existing {
            Some((ep, l)) if same(&ep, want) && l == lease => {
                plan.result.insert(key.clone(), ep);
            }
            Some((ep, _)) if same(&ep, want) => plan.put(key, ep),
            _ => plan.put_new(key, want, now),
        }
    }
    plan
}

/// Compares the desired endpoints with what this process has written (on its current lease).
pub fn plan_incremental(
    desired: &BTreeMap<String, Endpoint>,
    written: &BTreeMap<String, Endpoint>,
    now: &str,
) -> Plan {
    let mut plan = Plan::default();
    for key in written.keys() {
        if !desired.contains_key(key) {
            plan.deletes.push(key.clone());
        }
    }
    for (key, want) in desired {
        match written.get(key) {
            Some(have) if same(have, want) => {
                plan.result.insert(key.clone(), have.clone());
            }
            _ => plan.put_new(key, want, now),
        }
    }
    plan
}

/// The writer over a [`Store`]: etcd in the daemon (`flotilla_registry::store::EtcdStore`),
/// the in-memory store in unit tests.
pub struct Writer<S: Store> {
    store: S,
    cfg: WriterConfig,
    metrics: Metrics,
    status: SharedStatus,
    op_timeout: Duration,
    desired: HashMap<String, Vec<Endpoint>>,
    written: BTreeMap<String, Endpoint>,
    /// Records refused as too large, by key; left out of every plan until their content changes.
    refused: BTreeMap<String, Refusal>,
    lease: Option<i64>,
    keepalive: Option<S::KeepAlive>,
    /// Send times of keepalive requests not yet answered.
    sent: VecDeque<Instant>,
    deadline: Option<Instant>,
    to_revoke: Vec<i64>,
    pending: Vec<Instant>,
    need_full: bool,
    ready: bool,
    fault: Option<WriterError>,
}

type EtcdResult<T> = Result<T, WriterError>;

/// Why a round of the writer failed; either way it is retried with backoff.
#[derive(Debug, thiserror::Error)]
enum WriterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record that does not encode: a bug upstream of the writer, never sent to etcd.
    #[error("refusing to write an invalid {what}: {source}")]
    Invalid {
        what: &'static str,
        source: flotilla_registry::RecordError,
    },
}

impl<S: Store> Writer<S> {
    pub fn new(store: S, cfg: WriterConfig, metrics: Metrics, status: SharedStatus) -> Self {
        let op_timeout = (cfg.ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(5));
        let to_revoke = cfg.predecessor.into_iter().collect();
        Writer {
            store,
            cfg,
            metrics,
            status,
            op_timeout,
            desired: HashMap::new(),
            written: BTreeMap::new(),
            refused: BTreeMap::new(),
            lease: None,
            keepalive: None,
            sent: VecDeque::new(),
            deadline: None,
            to_revoke,
            pending: Vec::new(),
            need_full: true,
            ready: false,
            fault: None,
        }
    }

    /// Takes in one message; true if it was a full list.
    fn absorb(&mut self, msg: WriterMsg) -> bool {
        match msg {
            WriterMsg::Set {
                container,
                endpoints,
                event_at,
            } => {
                if endpoints.is_empty() {
                    self.desired.remove(&container);
                } else {
                    self.desired.insert(container, endpoints);
                }
                self.pending.extend(event_at);
                false
            }
            WriterMsg::Replace { containers } => {
                self.desired = containers;
                true
            }
        }
    }

    /// The desired records, without those refused as too large (a refused record whose content
    /// changed, or that is no longer desired, is forgotten: the new content is tried).
    fn desired_map(&mut self) -> BTreeMap<String, Endpoint> {
        let mut all: BTreeMap<String, Endpoint> = self
            .desired
            .values()
            .flatten()
            .map(|ep| (ep.key(&self.cfg.keys), ep.clone()))
            .collect();
        let before = self.refused.len();
        self.refused
            .retain(|key, r| all.get(key).is_some_and(|ep| same(ep, &r.endpoint)));
        if self.refused.len() != before {
            self.metrics.records_refused.set(self.refused.len() as i64);
        }
        all.retain(|key, _| !self.refused.contains_key(key));
        all
    }

    async fn call<T, F>(&self, what: &'static str, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        // Several calls make one reconciliation: each answer (or timeout) says the loop is
        // alive.
        let r = timeout(self.op_timeout, fut).await;
        self.metrics.pulse.beat(Loop::Writer);
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.named(what)),
            Err(_) => Err(StoreError::Timeout {
                what,
                after: self.op_timeout,
            }),
        }
    }

    fn etcd_failed(&mut self, e: WriterError) {
        self.metrics.etcd_errors.inc();
        if self.fault.is_none() {
            warn!(error = %e, "etcd request failed; retrying with backoff (entries stay on the lease meanwhile)");
        } else {
            debug!(error = %e, "etcd still failing");
        }
        self.status.lock().expect("status").etcd = Err(e.to_string());
        self.fault = Some(e);
        self.need_full = true;
    }

    fn etcd_ok(&mut self) {
        if let Some(prev) = self.fault.take() {
            info!(previous_error = %prev, "etcd answers again");
        }
        let mut st = self.status.lock().expect("status");
        st.etcd = Ok(());
        st.lease = self.lease;
    }

    /// Absorbs messages until the first full list; false when `shutdown` turned true or the
    /// reconciler is gone first. Nothing is written before the first full list: writing from a
    /// partial view would delete live entries of a predecessor.
    async fn first_list(
        &mut self,
        rx: &mut UnboundedReceiver<WriterMsg>,
        shutdown: &mut watch::Receiver<bool>,
        beat: &mut tokio::time::Interval,
    ) -> bool {
        let pulse = self.metrics.pulse.clone();
        loop {
            pulse.round(Loop::Writer).await;
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => if self.absorb(m) { return true },
                    None => return false,
                },
                _ = shutdown.changed() => return false,
                _ = beat.tick() => {}
            }
        }
    }

    /// Runs until `shutdown` turns true (then revokes the lease) or the reconciler is gone.
    pub async fn run(
        mut self,
        mut rx: UnboundedReceiver<WriterMsg>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let pulse = self.metrics.pulse.clone();
        let mut beat = beat_interval();
        if !self.first_list(&mut rx, &mut shutdown, &mut beat).await {
            return;
        }
        let mut backoff = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(5),
        );
        let mut tick = tokio::time::interval(self.cfg.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_at: Option<Instant> = Some(Instant::now());
        loop {
            pulse.round(Loop::Writer).await;
            // A lease found gone (a keep-alive answered TTL 0, or etcd said so when the stream
            // was reopened) needs a recovery now: without this it waited for the next full
            // Docker list (--resync, 30 s) with every record of this node out of etcd.
            if self.need_full && retry_at.is_none() {
                retry_at = Some(Instant::now());
            }
            if self.need_full && retry_at.is_some_and(|t| t <= Instant::now()) {
                match self.recover().await {
                    Ok(()) => {
                        backoff.success();
                        retry_at = None;
                    }
                    Err(e) => {
                        self.etcd_failed(e);
                        retry_at = Some(Instant::now() + backoff.next_delay());
                    }
                }
                continue;
            }
            let need_full = self.need_full;
            let deadline = self.deadline;
            let has_lease = self.lease.is_some();
            let ka = &mut self.keepalive;
            let ka_answer = async {
                match ka.as_mut() {
                    Some(stream) => stream.answer().await,
                    None => std::future::pending().await,
                }
            };
            let retry = async {
                match retry_at {
                    Some(at) if need_full => tokio::time::sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            };
            let expiry = async {
                match deadline {
                    Some(at) if !need_full => tokio::time::sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    let mut full = self.absorb(m);
                    while let Ok(m) = rx.try_recv() {
                        full |= self.absorb(m);
                    }
                    if full {
                        self.need_full = true;
                        retry_at.get_or_insert_with(Instant::now);
                    } else if !self.need_full {
                        if let Err(e) = self.apply().await {
                            self.etcd_failed(e);
                            retry_at = Some(Instant::now() + backoff.next_delay());
                        }
                    }
                }
                r = ka_answer => self.keepalive_answer(r),
                _ = expiry => {
                    warn!(ttl = %humantime::format_duration(self.cfg.ttl),
                        "no keepalive answer within the TTL: the lease may have expired; re-checking and re-putting");
                    self.deadline = None;
                    self.need_full = true;
                    retry_at = Some(Instant::now());
                }
                _ = tick.tick(), if has_lease && !need_full => self.keepalive_send().await,
                _ = retry => {}
                // Idle: come round to say so (liveness.rs).
                _ = beat.tick() => {}
            }
        }
        self.shutdown().await;
    }

    async fn keepalive_send(&mut self) {
        let Some(id) = self.lease else { return };
        if !self.sent.is_empty() {
            // The previous request is still unanswered: the stream is stale.
            self.metrics.lease_renew_failures.inc();
            debug!("keepalive unanswered; re-opening the keepalive stream");
            self.keepalive = None;
            self.sent.clear();
        }
        if let Some(keeper) = self.keepalive.as_mut() {
            match timeout(self.op_timeout, keeper.send()).await {
                Ok(Ok(())) => {
                    self.sent.push_back(Instant::now());
                    return;
                }
                _ => {
                    self.metrics.lease_renew_failures.inc();
                    self.keepalive = None;
                }
            }
        }
        let at = Instant::now();
        // Opening the stream renews once, failing with LeaseGone when the lease is gone.
        match self
            .call("lease keepalive", self.store.lease_keep_alive(id))
            .await
        {
            Ok(stream) => {
                self.keepalive = Some(stream);
                self.deadline = Some(at + self.cfg.ttl);
                self.etcd_ok();
            }
            Err(e) if e.is_lease_gone() => {
                warn!(lease = %format!("{id:x}"), "etcd says the lease is gone; granting a new one and re-putting everything");
                self.lease_lost();
            }
            Err(e) => {
                self.metrics.lease_renew_failures.inc();
                self.metrics.etcd_errors.inc();
                if self.fault.is_none() {
                    warn!(error = %e, "cannot renew the lease; retrying every TTL/3 until the deadline");
                    self.status.lock().expect("status").etcd = Err(e.to_string());
                    self.fault = Some(e.into());
                }
            }
        }
    }

    fn lease_lost(&mut self) {
        self.lease = None;
        self.keepalive = None;
        self.sent.clear();
        self.deadline = None;
        self.need_full = true;
    }

    fn keepalive_answer(&mut self, r: Result<Option<i64>, StoreError>) {
        match r {
            Ok(Some(ttl)) => {
                let sent = self.sent.pop_front().unwrap_or_else(Instant::now);
                if ttl > 0 {
                    self.deadline = Some(sent + Duration::from_secs(ttl as u64));
                    self.etcd_ok();
                } else {
                    warn!(lease = %format!("{:x}", self.lease.unwrap_or(0)), "etcd says the lease is gone; granting a new one and re-putting everything");
                    self.lease_lost();
                }
            }
            Ok(None) | Err(_) => {
                self.metrics.lease_renew_failures.inc();
                let why = match r {
                    Err(e) => e.to_string(),
                    _ => "stream closed".into(),
                };
                debug!(error = %why, "keepalive stream lost; re-opening at the next tick");
                self.keepalive = None;
                self.sent.clear();
            }
        }
    }

    /// Sends one transaction.
    /// etcd refusing it as too large (or as too many operations) is `StoreError::TooLarge`:
    /// smaller ones may pass; anything else (etcd away, timeout, permission) is retried with
    /// backoff as a whole.
    async fn txn(&self, ops: &[Op], lease: i64) -> Result<(), StoreError> {
        let writes: Vec<Write> = ops
            .iter()
            .map(|op| match &op.value {
                Some(v) => Write::Put {
                    key: op.key.clone(),
                    value: v.clone(),
                    lease,
                },
                None => Write::Delete {
                    key: op.key.clone(),
                },
            })
            .collect();
        self.call("write", self.store.txn(writes)).await
    }

    /// Applies `plan` in bounded transactions (deletes first). Returns the puts that were
    /// refused as too large; every other operation was applied. `Err` for any other failure.
    async fn execute(&self, plan: &Plan, lease: i64) -> EtcdResult<Vec<Refusal>> {
        let max = self.cfg.max_txn_bytes;
        let mut refused = Vec::new();
        let mut ops: Vec<Op> = Vec::with_capacity(plan.deletes.len() + plan.puts.len());
        for key in &plan.deletes {
            ops.push(Op {
                key: key.clone(),
                value: None,
                bytes: key.len() + OP_OVERHEAD,
            });
        }
        let mut endpoints: HashMap<&str, &Endpoint> = HashMap::new();
        for (key, ep) in &plan.puts {
            let value = ep
                .encode(&self.cfg.keys)
                .map_err(|source| WriterError::Invalid {
                    what: "record",
                    source,
                })?;
            let bytes = key.len() + value.len() + OP_OVERHEAD;
            if bytes > max {
                refused.push(Refusal {
                    key: key.clone(),
                    endpoint: ep.clone(),
                    bytes,
                    reason: format!("larger than --max-txn-bytes ({max} bytes)"),
                });
                continue;
            }
            endpoints.insert(key.as_str(), ep);
            ops.push(Op {
                key: key.clone(),
                value: Some(value),
                bytes,
            });
        }
        let sizes: Vec<usize> = ops.iter().map(|o| o.bytes).collect();
        let mut queue: VecDeque<Range<usize>> = batches(&sizes, MAX_TXN_OPS, max).into();
        while let Some(range) = queue.pop_front() {
            match self.txn(&ops[range.clone()], lease).await {
                Ok(()) => {}
                Err(e @ StoreError::TooLarge { .. }) if range.len() > 1 => {
                    self.metrics.txn_splits.inc();
                    let mid = range.start + range.len() / 2;
                    debug!(error = %e, ops = range.len(), "etcd refused a transaction as too large; splitting it");
                    queue.push_front(mid..range.end);
                    queue.push_front(range.start..mid);
                }
                Err(e @ StoreError::TooLarge { .. }) => {
                    let op = &ops[range.start];
                    match endpoints.get(op.key.as_str()) {
                        Some(ep) => refused.push(Refusal {
                            key: op.key.clone(),
                            endpoint: (*ep).clone(),
                            bytes: op.bytes,
                            reason: format!("etcd refused it alone: {e}"),
                        }),
                        None => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(refused)
    }

    /// Records refusals (one warning each), and deletes their keys: an older version of a
    /// refused record must not stay announced. Returns the keys, now absent from etcd.
    async fn refuse(&mut self, refusals: Vec<Refusal>, lease: i64) -> EtcdResult<Vec<String>> {
        if refusals.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.cfg.max_txn_bytes;
        let mut keys = Vec::new();
        for r in refusals {
            let name = r
                .endpoint
                .meta
                .get("container_name")
                .map(String::as_str)
                .unwrap_or("?");
            warn!(key = %r.key, container = %name, id = %r.endpoint.container, service = %r.endpoint.service,
                bytes = r.bytes, max_txn_bytes = max, reason = %r.reason,
                "record refused: too large for one etcd request; not announced until the container's record changes (every other record is written)");
            keys.push(r.key.clone());
            self.refused.insert(r.key.clone(), r);
        }
        self.metrics.records_refused.set(self.refused.len() as i64);
        let plan = Plan {
            deletes: keys.clone(),
            ..Plan::default()
        };
        self.execute(&plan, lease).await?;
        Ok(keys)
    }

    fn observe_pending(&mut self, wrote: bool) {
        let now = Instant::now();
        if wrote {
            for at in self.pending.drain(..) {
                self.metrics.observe_latency(now - at);
            }
        } else {
            self.pending.clear();
        }
        self.metrics.endpoints.set(self.written.len() as i64);
    }

    /// Writes the difference between the desired state and what was written.
    async fn apply(&mut self) -> EtcdResult<()> {
        let Some(lease) = self.lease else {
            return Err(StoreError::LeaseGone {
                what: "write",
                detail: "no lease held yet".into(),
            }
            .into());
        };
        let desired = self.desired_map();
        let plan = plan_incremental(&desired, &self.written, &now_rfc3339());
        if plan.is_empty() {
            self.observe_pending(false);
            return Ok(());
        }
        let refusals = self.execute(&plan, lease).await?;
        let mut result = plan.result;
        for key in self.refuse(refusals, lease).await? {
            result.remove(&key);
        }
        for (key, ep) in plan.puts.iter().filter(|(k, _)| result.contains_key(k)) {
            debug!(key = %key, service = %ep.service, instance = %ep.instance, host = %ep.host, port = ep.port, "registered");
        }
        for key in &plan.deletes {
            debug!(key = %key, "deregistered");
        }
        self.written = result;
        self.etcd_ok();
        self.observe_pending(true);
        Ok(())
    }

    /// Makes sure a live lease is held and etcd holds exactly the desired keys of this node;
    /// counts the reconciliation once it has completed, so that a waiter on the counter knows
    /// etcd holds what the last full Docker list said.
    async fn recover(&mut self) -> EtcdResult<()> {
        self.reconcile_with_etcd().await?;
        self.metrics.full_syncs.inc();
        Ok(())
    }

    async fn reconcile_with_etcd(&mut self) -> EtcdResult<()> {
        let lease = self.ensure_lease().await?;
        self.sync_node_keys(lease).await?;
        self.revoke_leftover_leases(lease).await;
        self.need_full = false;
        self.etcd_ok();
        if !self.ready {
            self.ready = true;
            self.status.lock().expect("status").synced = true;
            info!(
                endpoints = self.written.len(),
                lease = %format!("{lease:x}"),
                "initial sync done; ready"
            );
            daemon::notify_ready();
        }
        Ok(())
    }

    /// A live lease: the one held if etcd still has it (checked by opening a keep-alive
    /// stream, which renews it once), or a new one (recorded in the state file).
    async fn ensure_lease(&mut self) -> EtcdResult<i64> {
        if let Some(id) = self.lease {
            // Is the lease alive? Opening a keepalive stream renews it once, or fails with
            // "lease not found".
            self.keepalive = None;
            self.sent.clear();
            let sent = Instant::now();
            match self
                .call("lease keepalive", self.store.lease_keep_alive(id))
                .await
            {
                Ok(stream) => {
                    self.deadline = Some(sent + self.cfg.ttl);
                    self.keepalive = Some(stream);
                }
                Err(e) if e.is_lease_gone() => {
                    warn!(lease = %format!("{id:x}"), "the lease expired; granting a new one and re-putting everything");
                    self.lease = None;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.lease.is_none() {
            let ttl = self.cfg.ttl.as_secs() as i64;
            let granted = self
                .call("lease grant", self.store.lease_grant(ttl))
                .await?;
            let id = granted.id;
            self.lease = Some(id);
            self.written.clear();
            self.deadline = Some(Instant::now() + Duration::from_secs(granted.ttl.max(1) as u64));
            self.metrics.lease_grants.inc();
            info!(lease = %format!("{id:x}"), ttl = granted.ttl, "lease granted");
            if let Some(path) = &self.cfg.state_file {
                let st = state_file::State {
                    lease: id,
                    node: self.cfg.node.node.clone(),
                    pid: std::process::id(),
                };
                if let Err(e) = state_file::write(path, &st) {
                    warn!(error = %e, "cannot record the lease in the state file");
                }
            }
        }
        Ok(self.lease.expect("lease held"))
    }

    /// Brings this node's keys in etcd to the desired records and the node record, on `lease`,
    /// writing only what differs.
    async fn sync_node_keys(&mut self, lease: i64) -> EtcdResult<()> {
        let prefix = self.cfg.keys.endpoints_of(&self.cfg.node.node);
        let node_key = self.cfg.keys.node(&self.cfg.node.node);
        let actual: Vec<ActualKv> = self
            .call("read this node's endpoints", self.store.get_prefix(&prefix))
            .await?
            .into_iter()
            .map(|kv| ActualKv {
                key: kv.key,
                value: kv.value,
                lease: kv.lease,
            })
            .collect();
        let node_kv = self
            .call("read the node record", self.store.get(&node_key))
            .await?;
        let node_ok = node_kv.is_some_and(|kv| {
            kv.lease == lease
                && Node::decode(&self.cfg.keys, &node_key, &kv.value)
                    .ok()
                    .as_ref()
                    == Some(&self.cfg.node)
        });
        let desired = self.desired_map();
        let plan = plan_full(&self.cfg.keys, &desired, &actual, lease, &now_rfc3339());
        if !node_ok {
            let value =
                self.cfg
                    .node
                    .encode(&self.cfg.keys)
                    .map_err(|source| WriterError::Invalid {
                        what: "node record",
                        source,
                    })?;
            self.call(
                "write the node record",
                self.store.put(&node_key, value, lease),
            )
            .await?;
        }
        if !plan.is_empty() {
            info!(
                puts = plan.puts.len(),
                deletes = plan.deletes.len(),
                unchanged = plan.result.len() - plan.puts.len(),
                "reconciled this node's keys in etcd"
            );
        } else {
            debug!(endpoints = plan.result.len(), "etcd already up to date");
        }
        let refusals = self.execute(&plan, lease).await?;
        let wrote = !plan.is_empty();
        let mut result = plan.result;
        for key in self.refuse(refusals, lease).await? {
            result.remove(&key);
        }
        self.written = result;
        self.observe_pending(wrote);
        Ok(())
    }

    /// Revokes leftover leases (the predecessor's, or a lease of ours that was given up); one
    /// that cannot be revoked yet is tried at the next recovery.
    async fn revoke_leftover_leases(&mut self, lease: i64) {
        let mut keep = Vec::new();
        for old in std::mem::take(&mut self.to_revoke) {
            if old == lease {
                continue;
            }
            match self
                .call(
                    "revoke the predecessor's lease",
                    self.store.lease_revoke(old),
                )
                .await
            {
                Ok(_) => info!(lease = %format!("{old:x}"), "revoked the predecessor's lease"),
                Err(e) if e.is_lease_gone() => {
                    debug!(lease = %format!("{old:x}"), "predecessor's lease already gone")
                }
                Err(e) => {
                    debug!(error = %e, "cannot revoke the predecessor's lease yet");
                    keep.push(old);
                }
            }
        }
        self.to_revoke = keep;
    }

    async fn shutdown(&mut self) {
        daemon::notify_stopping();
        let Some(id) = self.lease else {
            info!("shutting down (no lease held)");
            return;
        };
        match timeout(Duration::from_secs(5), self.store.lease_revoke(id)).await {
            Ok(Ok(_)) => {
                info!(lease = %format!("{id:x}"), "lease revoked: this node's entries are gone");
                if let Some(path) = &self.cfg.state_file {
                    if let Err(e) = state_file::remove(path) {
                        warn!(error = %e, "cannot remove the state file");
                    }
                }
            }
            Ok(Err(e)) if e.is_lease_gone() => {
                info!("lease already gone");
            }
            Ok(Err(e)) => {
                warn!(error = %e, ttl = %humantime::format_duration(self.cfg.ttl),
                "cannot revoke the lease; the entries expire within the TTL")
            }
            Err(_) => warn!(ttl = %humantime::format_duration(self.cfg.ttl),
                "etcd did not answer the revoke; the entries expire within the TTL"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_registry::{Health, Proto};

    fn keys() -> Keys {
        Keys::new("/flotilla").unwrap()
    }

    fn ep(n: u16, at: &str) -> Endpoint {
        Endpoint {
            service: "web".into(),
            instance: format!("n1-0123456789ab-{n}"),
            node: "n1".into(),
            host: "10.0.0.1".into(),
            port: 30000 + n,
            proto: Proto::Tcp,
            container: "0123456789ab".into(),
            image: "web:1".into(),
            tags: vec![],
            meta: Default::default(),
            health: Health::None,
            registered_at: at.into(),
        }
    }

    fn map(eps: &[Endpoint]) -> BTreeMap<String, Endpoint> {
        eps.iter().map(|e| (e.key(&keys()), e.clone())).collect()
    }

    fn kv(e: &Endpoint, lease: i64) -> ActualKv {
        ActualKv {
            key: e.key(&keys()),
            value: e.encode(&keys()).unwrap(),
            lease,
        }
    }

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:01:00Z";

    #[test]
    fn full_plan_writes_only_differences() {
        let desired = map(&[ep(1, T1), ep(2, T1), ep(3, T1)]);
        let mut changed = ep(3, T0);
        changed.port = 1;
        let actual = vec![
            kv(&ep(1, T0), 7), // same, our lease: untouched
            kv(&ep(2, T0), 6), // same, predecessor's lease: re-put
            kv(&changed, 7),   // differs: put
            kv(&ep(4, T0), 6), // leftover: delete
            ActualKv {
                key: ep(5, T0).key(&keys()),
                value: b"{not json".to_vec(),
                lease: 7,
            }, // garbage: delete
        ];
        let plan = plan_full(&keys(), &desired, &actual, 7, "2026-01-01T00:02:00Z");
        assert_eq!(
            plan.deletes,
            vec![ep(4, T0).key(&keys()), ep(5, T0).key(&keys())]
        );
        let puts: Vec<(&str, &str)> = plan
            .puts
            .iter()
            .map(|(k, e)| (k.rsplit('/').next().unwrap(), e.registered_at.as_str()))
            .collect();
        assert_eq!(
            puts,
            vec![
                ("n1-0123456789ab-2", T0), // keeps its registration time
                ("n1-0123456789ab-3", "2026-01-01T00:02:00Z"),
            ]
        );
        assert_eq!(plan.result.len(), 3);
        assert_eq!(plan.result[&ep(1, T0).key(&keys())].registered_at, T0);
    }

    /// The writer's run loop over the in-memory store, on tokio's paused clock.
    mod over_a_store {
        use super::*;
        use crate::metrics::Status;
        use flotilla_registry::store::MemStore;
        use std::sync::{Arc, Mutex};
        use tokio::sync::mpsc;

        const TTL: Duration = Duration::from_secs(6);

        struct Rig {
            tx: mpsc::UnboundedSender<WriterMsg>,
            stop: watch::Sender<bool>,
            task: tokio::task::JoinHandle<()>,
            metrics: Metrics,
            status: SharedStatus,
        }

        fn node() -> Node {
            Node {
                node: "n1".into(),
                version: "test".into(),
                started_at: T0.into(),
                advertise_ip: "10.0.0.1".parse().unwrap(),
                labels: Default::default(),
            }
        }

        fn start(store: &MemStore) -> Rig {
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = Metrics::new(&mut registry);
            let status: SharedStatus = Arc::new(Mutex::new(Status::default()));
            let cfg = WriterConfig {
                keys: keys(),
                node: node(),
                ttl: TTL,
                state_file: None,
                predecessor: None,
                max_txn_bytes: 1 << 20,
            };
            let w = Writer::new(store.clone(), cfg, metrics.clone(), status.clone());
            let (tx, rx) = mpsc::unbounded_channel();
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(w.run(rx, stop_rx));
            Rig {
                tx,
                stop,
                task,
                metrics,
                status,
            }
        }

        fn eps(ns: std::ops::Range<u16>) -> Vec<Endpoint> {
            ns.map(|n| ep(n, T0)).collect()
        }

        fn replace(rig: &Rig, containers: &[(&str, Vec<Endpoint>)]) {
            let containers = containers
                .iter()
                .map(|(c, e)| (c.to_string(), e.clone()))
                .collect();
            rig.tx.send(WriterMsg::Replace { containers }).unwrap();
        }

        fn set(rig: &Rig, container: &str, endpoints: Vec<Endpoint>) {
            rig.tx
                .send(WriterMsg::Set {
                    container: container.into(),
                    endpoints,
                    event_at: Some(Instant::now()),
                })
                .unwrap();
        }

        /// The endpoint keys in the store, and the leases the node's keys are on.
        fn held(store: &MemStore) -> (Vec<String>, Vec<i64>) {
            let all = store.dump();
            let eps = all
                .keys()
                .filter(|k| k.starts_with("/flotilla/endpoints/n1/"))
                .cloned()
                .collect();
            let mut leases: Vec<i64> = all.values().map(|kv| kv.lease).collect();
            leases.sort_unstable();
            leases.dedup();
            (eps, leases)
        }

        fn keys_of(endpoints: &[Endpoint]) -> Vec<String> {
            let mut k: Vec<String> = endpoints.iter().map(|e| e.key(&keys())).collect();
            k.sort();
            k
        }

        /// Polls `f` on the paused clock (time moves when every task waits) for up to `within`.
        async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
            let deadline = Instant::now() + within;
            while !f() {
                assert!(Instant::now() < deadline, "not within {within:?}: {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        #[tokio::test(start_paused = true)]
        async fn records_go_on_one_lease_kept_alive_for_many_ttls_without_a_write() {
            let store = MemStore::new();
            let rig = start(&store);
            replace(&rig, &[("c1", eps(1..4))]);
            until("the first sync", TTL, || {
                held(&store).0 == keys_of(&eps(1..4))
            })
            .await;
            let (_, leases) = held(&store);
            assert_eq!(leases.len(), 1, "node record and endpoints on one lease");
            assert!(store.dump().contains_key("/flotilla/nodes/n1"));
            let revision = store.revision();
            tokio::time::sleep(TTL * 10).await;
            assert_eq!(held(&store), (keys_of(&eps(1..4)), leases.clone()));
            assert_eq!(store.revision(), revision, "keep-alives write no key");
            assert_eq!(rig.metrics.lease_grants.get(), 1);
            assert!(rig.status.lock().unwrap().etcd.is_ok());
            // A change is one small write; a container gone takes its records along.
            set(&rig, "c2", eps(10..11));
            set(&rig, "c1", Vec::new());
            until("the change", TTL, || {
                held(&store).0 == keys_of(&eps(10..11))
            })
            .await;
            rig.stop.send(true).unwrap();
            rig.task.await.unwrap();
            assert!(store.dump().is_empty(), "shutdown revokes the lease");
            assert!(store.leases().is_empty());
        }

        #[tokio::test(start_paused = true)]
        async fn a_lost_lease_is_granted_again_and_every_record_put_back() {
            let store = MemStore::new();
            let rig = start(&store);
            replace(&rig, &[("c1", eps(1..3)), ("c2", eps(5..6))]);
            let want = keys_of(&[eps(1..3), eps(5..6)].concat());
            until("the first sync", TTL, || held(&store).0 == want).await;
            let first = held(&store).1[0];
            // etcd loses the lease (revoked by an operator, or expired while a member was
            // away): the next keep-alive answers TTL 0.
            assert!(store.revoke(first));
            assert!(held(&store).0.is_empty());
            until("records back on a new lease", TTL, || {
                let (eps, leases) = held(&store);
                eps == want && leases.len() == 1 && leases[0] != first
            })
            .await;
            assert_eq!(rig.metrics.lease_grants.get(), 2);
            assert!(store.dump().contains_key("/flotilla/nodes/n1"));
        }

        #[tokio::test(start_paused = true)]
        async fn etcd_away_past_the_ttl_then_back_converges_to_the_desired_records() {
            let store = MemStore::new();
            let rig = start(&store);
            replace(&rig, &[("c1", eps(1..3))]);
            until("the first sync", TTL, || {
                held(&store).0 == keys_of(&eps(1..3))
            })
            .await;
            store.set_unreachable(true);
            // Changes while etcd is away: kept, and written once it answers.
            set(&rig, "c2", eps(7..9));
            set(&rig, "c1", eps(1..2));
            until("the fault reported", TTL, || {
                rig.status.lock().unwrap().etcd.is_err()
            })
            .await;
            let reported = rig.status.lock().unwrap().etcd.clone().unwrap_err();
            assert!(reported.contains("unreachable"), "{reported}");
            tokio::time::sleep(TTL * 2).await;
            assert!(
                held(&store).0.is_empty(),
                "the lease expired meanwhile (etcd's side)"
            );
            let errors = rig.metrics.etcd_errors.get();
            assert!(errors > 0);
            store.set_unreachable(false);
            let want = keys_of(&[eps(1..2), eps(7..9)].concat());
            until("converged after the outage", TTL, || held(&store).0 == want).await;
            assert_eq!(held(&store).1.len(), 1);
            assert!(rig.status.lock().unwrap().etcd.is_ok());
            // Retried with backoff (100 ms doubling to 1 s), not in a tight loop: over 12 s of
            // outage, a few dozen failed requests at most.
            assert!(
                store.requests() < 200,
                "{} requests during the outage",
                store.requests()
            );
        }

        #[tokio::test(start_paused = true)]
        async fn a_transaction_etcd_refuses_as_too_large_is_split_until_it_fits() {
            let store = MemStore::new();
            store.set_max_txn_ops(3);
            let rig = start(&store);
            replace(&rig, &[("c1", eps(1..12))]);
            until("every record written", TTL, || {
                held(&store).0 == keys_of(&eps(1..12))
            })
            .await;
            assert!(rig.metrics.txn_splits.get() > 0);
            assert_eq!(rig.metrics.records_refused.get(), 0);
        }

        #[tokio::test(start_paused = true)]
        async fn one_failed_write_is_retried_and_other_errors_do_not_lose_the_lease() {
            let store = MemStore::new();
            let rig = start(&store);
            replace(&rig, &[("c1", eps(1..2))]);
            until("the first sync", TTL, || {
                held(&store).0 == keys_of(&eps(1..2))
            })
            .await;
            let lease = held(&store).1[0];
            store.fail_next([StoreError::Failed {
                what: "x",
                detail: "etcdserver: permission denied".into(),
            }]);
            set(&rig, "c2", eps(4..5));
            let want = keys_of(&[eps(1..2), eps(4..5)].concat());
            until("written after the retry", TTL, || held(&store).0 == want).await;
            assert_eq!(held(&store).1, vec![lease], "same lease: nothing was lost");
            assert_eq!(rig.metrics.lease_grants.get(), 1);
            assert!(rig.metrics.etcd_errors.get() >= 1);
        }
    }

    #[test]
    fn batches_are_bounded_in_operations_and_bytes_and_keep_the_order() {
        assert_eq!(batches(&[], 100, 1000), Vec::<Range<usize>>::new());
        assert_eq!(batches(&[10; 5], 2, 1000), vec![0..2, 2..4, 4..5]);
        assert_eq!(batches(&[400, 400, 400, 100], 100, 1000), vec![0..2, 2..4]);
        // Exactly the bound fits; one more byte starts a new transaction.
        assert_eq!(batches(&[500, 500, 1], 100, 1000), vec![0..2, 2..3]);
        // An operation over the bound stands alone (callers refuse it before).
        assert_eq!(batches(&[10, 5000, 10], 100, 1000), vec![0..1, 1..2, 2..3]);
        // Every range is within both bounds and together they cover everything in order.
        let sizes: Vec<usize> = (0..500).map(|i| 1 + (i * 37) % 300).collect();
        let got = batches(&sizes, 100, 2048);
        assert_eq!(got.first().unwrap().start, 0);
        assert_eq!(got.last().unwrap().end, sizes.len());
        for w in got.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for r in &got {
            assert!(
                r.len() <= 100 && sizes[r.clone()].iter().sum::<usize>() <= 2048,
                "{r:?}"
            );
        }
    }

    #[test]
    fn full_plan_of_an_up_to_date_node_is_empty() {
        let desired = map(&[ep(1, T1)]);
        let plan = plan_full(&keys(), &desired, &[kv(&ep(1, T0), 7)], 7, T1);
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn incremental_plan_puts_new_and_changed_and_deletes_gone() {
        let written = map(&[ep(1, T0), ep(2, T0)]);
        let mut moved = ep(2, T1);
        moved.port = 9;
        let desired = map(&[ep(1, T1), moved.clone(), ep(3, T1)]);
        let plan = plan_incremental(&desired, &written, T1);
        assert!(plan.deletes.is_empty());
        assert_eq!(plan.puts.len(), 2);
        assert_eq!(plan.result[&ep(1, T0).key(&keys())].registered_at, T0);
        let plan = plan_incremental(&map(&[ep(1, T1)]), &written, T1);
        assert_eq!(plan.deletes, vec![ep(2, T0).key(&keys())]);
        assert!(plan.puts.is_empty());
        assert!(plan_incremental(&map(&[ep(1, T1)]), &map(&[ep(1, T0)]), T1).is_empty());
    }
}
