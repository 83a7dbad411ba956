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
use etcd_client::{Client, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use flotilla_registry::backoff::Backoff;
use flotilla_registry::daemon;
use flotilla_registry::etcd::error_chain;
use flotilla_registry::record::now_rfc3339;
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
            Some((ep, _)) if same(&ep, want) => {
                plan.puts.push((key.clone(), ep.clone()));
                plan.result.insert(key.clone(), ep);
            }
            _ => {
                let mut ep = want.clone();
                ep.registered_at = now.to_owned();
                plan.puts.push((key.clone(), ep.clone()));
                plan.result.insert(key.clone(), ep);
            }
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
            _ => {
                let mut ep = want.clone();
                ep.registered_at = now.to_owned();
                plan.puts.push((key.clone(), ep.clone()));
                plan.result.insert(key.clone(), ep);
            }
        }
    }
    plan
}

pub struct Writer {
    client: Client,
    cfg: WriterConfig,
    metrics: Metrics,
    status: SharedStatus,
    op_timeout: Duration,
    desired: HashMap<String, Vec<Endpoint>>,
    written: BTreeMap<String, Endpoint>,
    /// Records refused as too large, by key; left out of every plan until their content changes.
    refused: BTreeMap<String, Refusal>,
    lease: Option<i64>,
    keepalive: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
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

impl Writer {
    pub fn new(client: Client, cfg: WriterConfig, metrics: Metrics, status: SharedStatus) -> Self {
        let op_timeout = (cfg.ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(5));
        let to_revoke = cfg.predecessor.into_iter().collect();
        Writer {
            client,
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
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        // Several calls make one reconciliation: each answer (or timeout) says the loop is
        // alive.
        let r = timeout(self.op_timeout, fut).await;
        self.metrics.pulse.beat(Loop::Writer);
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::from_etcd(what, &e)),
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

    /// Runs until `shutdown` turns true (then revokes the lease) or the reconciler is gone.
    pub async fn run(
        mut self,
        mut rx: UnboundedReceiver<WriterMsg>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Nothing is written before the first full list: writing from a partial view would
        // delete live entries of a predecessor.
        let pulse = self.metrics.pulse.clone();
        let mut beat = beat_interval();
        loop {
            pulse.round(Loop::Writer).await;
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => if self.absorb(m) { break },
                    None => return,
                },
                _ = shutdown.changed() => return,
                _ = beat.tick() => {}
            }
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
                    Some((_, stream)) => stream.message().await,
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
        if let Some((keeper, _)) = self.keepalive.as_mut() {
            match timeout(self.op_timeout, keeper.keep_alive()).await {
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
        let client = self.client.clone();
        // Opening the stream renews once: etcd-client sends a request and reads its answer,
        // failing with "lease not found" when the lease is gone.
        match self
            .call("lease keepalive", async move {
                let mut c = client;
                c.lease_keep_alive(id).await
            })
            .await
        {
            Ok(pair) => {
                self.keepalive = Some(pair);
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

    fn keepalive_answer(
        &mut self,
        r: Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error>,
    ) {
        match r {
            Ok(Some(resp)) => {
                let sent = self.sent.pop_front().unwrap_or_else(Instant::now);
                if resp.ttl() > 0 {
                    self.deadline = Some(sent + Duration::from_secs(resp.ttl() as u64));
                    self.etcd_ok();
                } else {
                    warn!(lease = %format!("{:x}", resp.id()), "etcd says the lease is gone; granting a new one and re-putting everything");
                    self.lease_lost();
                }
            }
            Ok(None) | Err(_) => {
                self.metrics.lease_renew_failures.inc();
                let why = match r {
                    Err(e) => error_chain(&e),
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
        let txn_ops: Vec<TxnOp> = ops
            .iter()
            .map(|op| match &op.value {
                Some(v) => TxnOp::put(
                    op.key.as_str(),
                    v.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                None => TxnOp::delete(op.key.as_str(), None),
            })
            .collect();
        let client = self.client.clone();
        self.call("write", async move {
            let mut c = client;
            c.txn(Txn::new().and_then(txn_ops)).await
        })
        .await
        .map(|_| ())
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
        if let Some(id) = self.lease {
            // Is the lease alive? Opening a keepalive stream renews it once, or fails with
            // "lease not found".
            self.keepalive = None;
            self.sent.clear();
            let client = self.client.clone();
            let sent = Instant::now();
            match self
                .call("lease keepalive", async move {
                    let mut c = client;
                    c.lease_keep_alive(id).await
                })
                .await
            {
                Ok(pair) => {
                    self.deadline = Some(sent + self.cfg.ttl);
                    self.keepalive = Some(pair);
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
            let client = self.client.clone();
            let resp = self
                .call("lease grant", async move {
                    let mut c = client;
                    c.lease_grant(ttl, None).await
                })
                .await?;
            let id = resp.id();
            self.lease = Some(id);
            self.written.clear();
            self.deadline = Some(Instant::now() + Duration::from_secs(resp.ttl().max(1) as u64));
            self.metrics.lease_grants.inc();
            info!(lease = %format!("{id:x}"), ttl = resp.ttl(), "lease granted");
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
        let lease = self.lease.expect("lease held");

        // Compare with etcd.
        let prefix = self.cfg.keys.endpoints_of(&self.cfg.node.node);
        let node_key = self.cfg.keys.node(&self.cfg.node.node);
        let client = self.client.clone();
        let p = prefix.clone();
        let resp = self
            .call("read this node's endpoints", async move {
                let mut c = client;
                c.get(p, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let actual: Vec<ActualKv> = resp
            .kvs()
            .iter()
            .map(|kv| ActualKv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                lease: kv.lease(),
            })
            .collect();
        let client = self.client.clone();
        let nk = node_key.clone();
        let node_resp = self
            .call("read the node record", async move {
                let mut c = client;
                c.get(nk, None).await
            })
            .await?;
        let node_ok = node_resp.kvs().first().is_some_and(|kv| {
            kv.lease() == lease
                && Node::decode(&self.cfg.keys, &node_key, kv.value())
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
            let client = self.client.clone();
            let nk = node_key.clone();
            self.call("write the node record", async move {
                let mut c = client;
                c.put(nk, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            })
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

        // Revoke leftover leases (the predecessor's, or a lease of ours that was given up).
        let mut keep = Vec::new();
        for old in std::mem::take(&mut self.to_revoke) {
            if old == lease {
                continue;
            }
            let client = self.client.clone();
            match self
                .call("revoke the predecessor's lease", async move {
                    let mut c = client;
                    c.lease_revoke(old).await
                })
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

        self.need_full = false;
        self.etcd_ok();
        self.observe_pending(wrote);
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

    async fn shutdown(&mut self) {
        daemon::notify_stopping();
        let Some(id) = self.lease else {
            info!("shutting down (no lease held)");
            return;
        };
        let client = self.client.clone();
        let revoke = async move {
            let mut c = client;
            c.lease_revoke(id).await
        };
        match timeout(Duration::from_secs(5), revoke).await {
            Ok(Ok(_)) => {
                info!(lease = %format!("{id:x}"), "lease revoked: this node's entries are gone");
                if let Some(path) = &self.cfg.state_file {
                    if let Err(e) = state_file::remove(path) {
                        warn!(error = %e, "cannot remove the state file");
                    }
                }
            }
            Ok(Err(e)) if StoreError::from_etcd("revoke", &e).is_lease_gone() => {
                info!("lease already gone");
            }
            Ok(Err(e)) => {
                warn!(error = %error_chain(&e), ttl = %humantime::format_duration(self.cfg.ttl),
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
