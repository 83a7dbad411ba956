//! `unitgen rollout`: replace a service's instances with a new tag, batch by batch, moving on
//! only when the registry shows the new instances healthy.
//!
//! - **Lock.** The key `<prefix>/rollouts/<service>` is created in one transaction that
//!   requires it to be absent, attached to a lease this process keeps alive: it is the lock (a
//!   second rollout of the service finds it and is refused, naming the holder) and the progress
//!   record ([`RolloutRecord`]) at once. When the driver dies the lease expires and the key
//!   goes; when it ends, it deletes the key and revokes the lease.
//! - **Batches.** Each batch takes `max_unavailable` instances down (stop old, start new in the
//!   same unit) and replaces `max_surge` more through a surge unit `<svc>@<N>-surge.service` that
//!   runs the new tag beside the old instance, so those never leave the service short. The
//!   number taken down is also bounded by what the registry shows healthy right now, so an
//!   instance that is already sick counts against `max_unavailable`.
//! - **Proof.** An instance is replaced when presence has registered its container (node =
//!   host, meta `container_name`, the new image) with health `healthy`. The service must have a
//!   health check.
//! - **Failure.** A batch not healthy within `progress_deadline` is rolled back to the tags it
//!   had, and the rollout stops with an error naming each instance that failed and its health
//!   (the registry's view and Docker's).
//! - **Lock file.** After every batch the placement lock records the deployed tags, so
//!   `unitgen services.yaml` generates what runs, and a rollout that was interrupted continues
//!   where it stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use flotilla_registry::record::now_rfc3339;
use flotilla_registry::{Endpoint, Health, Keys};
use serde::{Deserialize, Serialize};

use crate::app::{with_deployed_tag, Job, OutFile, SystemdPlan};
use crate::lock::{Deployed, DeployedTags, Lock};
use crate::output::{listing, write_atomic, write_tree};
use crate::path::FieldPath;
use crate::remote::Via;
use crate::render::{self, Instance};
use crate::spec::Service;
use crate::Error;

/// The record at `<prefix>/rollouts/<service>`: who is rolling out what, and how far it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// The service.
    pub service: String,
    /// Who drives it: `host pid N` or `--holder`.
    pub holder: String,
    /// When it started, RFC 3339.
    pub started_at: String,
    /// When this record was last written.
    pub updated_at: String,
    /// The new tag.
    pub to: String,
    /// Instance → tag when the rollout started.
    pub from: BTreeMap<u32, String>,
    /// Instance numbers already on the new tag.
    pub done: Vec<u32>,
    /// The batch in progress (1-based) and its instances.
    pub batch: u32,
    /// Instances of the batch in progress.
    pub current: Vec<u32>,
    /// What the driver is doing: `starting`, `replacing`, `waiting for health`, `rolling back`,
    /// `finishing`.
    pub phase: String,
}

/// How a rollout ended when it did not succeed. Each says what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The input does not allow this rollout (no health check, unknown service, bad tag, ...).
    #[error(transparent)]
    Input(#[from] Error),
    /// Another rollout of the service holds the lock.
    #[error("{0}")]
    Busy(Box<Holder>),
    /// A batch did not become healthy and was rolled back.
    #[error("{0}")]
    Failed(String),
    /// etcd, a host or the lock lease failed in a way that left the rollout unfinished.
    #[error("{0}")]
    Aborted(String),
}

/// The rollout that holds a service's lock, as its record says.
#[derive(Debug)]
pub struct Holder {
    /// The service.
    pub service: String,
    /// The key.
    pub key: String,
    /// The record found there (None when it could not be read).
    pub record: Option<RolloutRecord>,
    /// Our lease TTL (theirs is likely the same).
    pub ttl: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rollout of {} refused: another rollout holds {}: ",
            self.service, self.key
        )?;
        match &self.record {
            Some(r) => write!(
                f,
                "{} (started {}, to {}, batch {}, {})",
                r.holder, r.started_at, r.to, r.batch, r.phase
            )?,
            None => write!(f, "a holder whose record cannot be read")?,
        }
        write!(
            f,
            "; wait for it to finish, or if its driver is gone, for its lease to expire (about {} s)",
            self.ttl
        )
    }
}

/// Options of one rollout.
#[derive(Clone, Debug)]
pub struct RolloutOptions {
    /// The service (its name in services.yaml).
    pub service: String,
    /// The new tag.
    pub tag: String,
    /// Written into the record as the holder.
    pub holder: String,
    /// TTL of the lock lease.
    pub lease_ttl: Duration,
    /// How often the registry is read while waiting.
    pub poll: Duration,
    /// The lock file to rewrite after each batch.
    pub lock_path: PathBuf,
    /// A generated tree to rewrite with the lock (`-o DIR`).
    pub out_dir: Option<PathBuf>,
    /// Overrides services.yaml's `progress_deadline`.
    pub progress_deadline: Option<Duration>,
}

/// One batch of a rollout, as [`Driver::replace`] applies it.
struct Step<'a> {
    /// The batch's number, from 1.
    no: u32,
    /// Instances replaced in place.
    in_place: &'a [u32],
    /// Instances replaced with a surge unit beside them.
    surged: &'a [u32],
    /// The hosts of the batch's instances.
    hosts: &'a BTreeSet<String>,
    /// The surge units: (instance, host).
    surge_units: &'a [(u32, String)],
    /// When the batch must be healthy.
    deadline: Instant,
    /// progress_deadline, for messages.
    deadline_per_batch: Duration,
}

/// An instance that did not become healthy, as the rollout saw it.
#[derive(Clone, Debug)]
struct Target {
    instance: u32,
    host: String,
    container: String,
    image: String,
}

impl Target {
    fn unit(&self, svc: &str) -> String {
        format!("{svc}@{}", self.instance)
    }
}

/// A lease-held lock on `<prefix>/rollouts/<service>`.
struct EtcdLock {
    client: Client,
    key: String,
    lease: i64,
    lost: Arc<AtomicBool>,
    keeper: tokio::task::JoinHandle<()>,
}

fn etcd_err(op: &str, e: impl std::fmt::Display) -> RolloutError {
    RolloutError::Aborted(format!("etcd {op}: {e}"))
}

impl EtcdLock {
    async fn acquire(
        client: &Client,
        keys: &Keys,
        record: &RolloutRecord,
        ttl: Duration,
    ) -> Result<EtcdLock, RolloutError> {
        let mut c = client.clone();
        let key = keys.rollout(&record.service);
        let ttl_s = ttl.as_secs().max(2) as i64;
        let lease = c
            .lease_grant(ttl_s, None)
            .await
            .map_err(|e| etcd_err("lease grant", e))?
            .id();
        let value = serde_json::to_vec(record).expect("record serialises");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = match c.txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                let _ = c.lease_revoke(lease).await;
                return Err(etcd_err("txn (take the rollout lock)", e));
            }
        };
        if !resp.succeeded() {
            let _ = c.lease_revoke(lease).await;
            let other = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            let theirs: Option<RolloutRecord> = other.and_then(|v| serde_json::from_slice(&v).ok());
            return Err(RolloutError::Busy(Box::new(Holder {
                service: record.service.clone(),
                key,
                record: theirs,
                ttl: ttl_s as u64,
            })));
        }
        let lost = Arc::new(AtomicBool::new(false));
        let keeper = {
            let mut c = client.clone();
            let lost = lost.clone();
            let period = Duration::from_secs((ttl_s as u64 / 3).max(1));
            tokio::spawn(async move {
                let (mut k, mut stream) = match c.lease_keep_alive(lease).await {
                    Ok(p) => p,
                    Err(_) => {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                };
                let mut last_ok = Instant::now();
                loop {
                    let ok = async {
                        k.keep_alive().await.ok()?;
                        let r = stream.message().await.ok()??;
                        (r.ttl() > 0).then_some(())
                    };
                    match tokio::time::timeout(period, ok).await {
                        Ok(Some(())) => last_ok = Instant::now(),
                        _ => {
                            if last_ok.elapsed() >= Duration::from_secs(ttl_s as u64) {
                                lost.store(true, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                    tokio::time::sleep(period).await;
                }
            })
        };
        Ok(EtcdLock {
            client: client.clone(),
            key,
            lease,
            lost,
            keeper,
        })
    }

    fn check(&self) -> Result<(), RolloutError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(RolloutError::Aborted(format!(
                "lost the lease on {} (etcd unreachable for longer than its TTL); stopped here so that a second rollout cannot overlap",
                self.key
            )));
        }
        Ok(())
    }

    async fn update(&self, record: &RolloutRecord) -> Result<(), RolloutError> {
        self.check()?;
        let mut c = self.client.clone();
        let value = serde_json::to_vec(record).expect("record serialises");
        c.put(
            self.key.clone(),
            value,
            Some(PutOptions::new().with_lease(self.lease)),
        )
        .await
        .map_err(|e| etcd_err("put (rollout record)", e))?;
        Ok(())
    }

    async fn release(self) {
        self.keeper.abort();
        let mut c = self.client.clone();
        let _ = c.delete(self.key.clone(), None).await;
        let _ = c.lease_revoke(self.lease).await;
    }
}

/// Every key below `prefix`; the error names it.
async fn get_prefix(client: &Client, prefix: &str) -> Result<etcd_client::GetResponse, String> {
    let mut c = client.clone();
    c.get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| format!("etcd get {prefix}: {e}"))
}

/// Every endpoint in the registry, validated (invalid records are skipped, as everywhere).
pub async fn read_endpoints(client: &Client, keys: &Keys) -> Result<Vec<Endpoint>, String> {
    let resp = get_prefix(client, &keys.endpoints()).await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let key = kv.key_str().ok()?;
            Endpoint::decode(keys, key, kv.value()).ok()
        })
        .collect())
}

/// Every rollout record in progress.
pub async fn read_rollouts(client: &Client, keys: &Keys) -> Result<Vec<RolloutRecord>, String> {
    let resp = get_prefix(client, &keys.rollouts()).await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect())
}

/// The endpoints of container `name` on `host`.
pub fn endpoints_of<'a>(eps: &'a [Endpoint], host: &str, name: &str) -> Vec<&'a Endpoint> {
    eps.iter()
        .filter(|e| {
            e.node == host && e.meta.get("container_name").map(String::as_str) == Some(name)
        })
        .collect()
}

fn is_healthy_on(eps: &[Endpoint], t: &Target) -> bool {
    endpoints_of(eps, &t.host, &t.container)
        .iter()
        .any(|e| e.health == Health::Healthy && e.image == t.image)
}

/// A unit name of one service instance: `web@3.service`, or its surge unit `web@3-surge.service`.
pub fn unit_name(svc: &str, instance: Instance) -> String {
    match instance {
        Instance::Surge(n) => format!("{svc}@{n}-surge.service"),
        Instance::Number(n) => format!("{svc}@{n}.service"),
        Instance::Template => format!("{svc}@.service"),
    }
}

/// Checks, before anything changes or connects, that `opts.service` can be rolled out to
/// `opts.tag`; returns its placement.
pub fn preflight(
    job: &Job,
    plan: &SystemdPlan,
    opts: &RolloutOptions,
) -> Result<BTreeMap<u32, String>, RolloutError> {
    let input_err = |paths: &[FieldPath], msg: String| {
        RolloutError::Input(Error::Invalid(vec![job
            .services
            .error_at_first(paths, msg)]))
    };
    let name = &opts.service;
    let Some(svc) = plan.spec.services.get(name) else {
        let known: Vec<&String> = plan.spec.services.keys().collect();
        return Err(RolloutError::Input(Error::Usage(format!(
            "--service {name}: {} has no such service (services: {})",
            job.services.name,
            known
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))));
    };
    let o = &svc.origins;
    if svc.health.is_none() {
        return Err(input_err(&o.health, format!("{name} has no health check: a rollout moves on only when presence registers new instances as healthy, which needs one (`health: {{cmd: ...}}`)")));
    }
    if svc.registration.ignore {
        return Err(input_err(std::slice::from_ref(&o.service), format!("{name} has flotilla.ignore: presence never registers it, so a rollout could never see it healthy")));
    }
    if svc.ports.is_empty() {
        return Err(input_err(std::slice::from_ref(&o.service), format!("{name} publishes no port: presence registers only containers with a published port, so a rollout could never see it healthy")));
    }
    if svc.image.tag.is_none() {
        return Err(input_err(&o.image, format!("{name} is pinned by digest only ({}); a rollout replaces the tag: give the new image in services.yaml instead", svc.image)));
    }
    let mut new = svc.image.clone();
    new.tag = Some(opts.tag.clone());
    new.digest = None;
    match crate::image::parse(&new.to_string()) {
        Ok(r) if r.tag.as_deref() == Some(opts.tag.as_str()) => {}
        _ => {
            return Err(RolloutError::Input(Error::Usage(format!(
                "--tag {}: not a tag (1 to 128 of [A-Za-z0-9_.-], not starting with `.` or `-`)",
                opts.tag
            ))))
        }
    }
    if let Err(e) = plan.spec.policy.check(&new) {
        return Err(RolloutError::Input(Error::Usage(format!("--tag: {e}"))));
    }
    if svc.image.digest.is_some() {
        return Err(input_err(&o.image, format!("{name}'s image {} carries a digest, which pins the old content whatever the tag; drop the digest to roll out by tag", svc.image)));
    }
    let placed = plan
        .output
        .placement
        .as_ref()
        .and_then(|p| p.get(name))
        .cloned()
        .unwrap_or_default();
    let locked = plan.lock.placement.get(name).cloned().unwrap_or_default();
    if placed.is_empty() {
        return Err(RolloutError::Input(Error::Usage(format!(
            "{name} has no instances to roll out"
        ))));
    }
    if placed != locked {
        return Err(RolloutError::Input(Error::Usage(format!(
            "the placement of {name} in {} is not what services.yaml and hosts.yaml give now (a host or a rule changed, or the lock is new): run `unitgen {} --format systemd ... -o DIR` and `unitgen apply` on the hosts first, then roll out",
            opts.lock_path.display(),
            job.services.name
        ))));
    }
    let has_sidekick_or_deps = !svc.depends_on.is_empty() || svc.sidekick_of.is_some();
    let surge = svc.rollout.max_surge.resolve(svc.instances, true);
    if surge > 0 && svc.ports.iter().any(|p| p.host.is_some()) {
        return Err(input_err(&o.rollout, format!("{name} publishes a fixed host port, so a surge instance cannot run beside the old one on its host; set rollout.max_surge: 0")));
    }
    if surge > 0 && has_sidekick_or_deps {
        return Err(input_err(&o.rollout, format!("{name} depends on other units (depends_on / sidekick_of), which a surge unit would not have; set rollout.max_surge: 0")));
    }
    Ok(placed)
}

/// `healthy`, `unhealthy` or `none`, as in the record.
pub fn health_str(h: Health) -> &'static str {
    h.as_str()
}

/// The rollout driver.
pub struct Driver<'a> {
    job: &'a Job,
    plan: SystemdPlan,
    opts: RolloutOptions,
    via: Via,
    client: Client,
    keys: Keys,
    docker: String,
}

impl<'a> Driver<'a> {
    /// A driver for `plan` (from [`crate::app::plan_systemd`]).
    pub fn new(
        job: &'a Job,
        plan: SystemdPlan,
        opts: RolloutOptions,
        via: Via,
        client: Client,
        keys: Keys,
    ) -> Driver<'a> {
        let docker = job.render.docker.clone();
        Driver {
            job,
            plan,
            opts,
            via,
            client,
            keys,
            docker,
        }
    }

    fn svc(&self) -> &Service {
        &self.plan.spec.services[&self.opts.service]
    }

    fn check(&self) -> Result<BTreeMap<u32, String>, RolloutError> {
        preflight(self.job, &self.plan, &self.opts)
    }

    fn address(&self, host: &str) -> String {
        self.plan
            .inventory
            .addresses
            .get(host)
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// Every file for the hosts with the service at `deployed` and surge units for `surge`.
    fn files(
        &self,
        deployed: &Deployed,
        surge: &[(u32, String)],
    ) -> Result<Vec<OutFile>, RolloutError> {
        let name = &self.opts.service;
        let svc = self.svc();
        let placed = &self.plan.output.placement.as_ref().expect("systemd")[name];
        let ours: BTreeSet<String> = placed
            .iter()
            .map(|(i, h)| format!("{h}/{}", unit_name(name, Instance::Number(*i))))
            .collect();
        let mut files: Vec<OutFile> = self
            .plan
            .output
            .files
            .iter()
            .filter(|f| !ours.contains(&f.path))
            .cloned()
            .collect();
        let render = |s: &Service, inst: Instance, host: &str| {
            render::service_unit(s, inst, false, Some(host), &self.job.render).map_err(|e| {
                RolloutError::Input(Error::Invalid(vec![self
                    .job
                    .services
                    .error(&e.field, format!("value {}", e.source))]))
            })
        };
        for (i, host) in placed {
            let s = with_deployed_tag(svc, *i, deployed);
            files.push(OutFile {
                path: format!("{host}/{}", unit_name(name, Instance::Number(*i))),
                content: render(&s, Instance::Number(*i), host)?,
            });
        }
        for (i, host) in surge {
            let mut s = svc.clone();
            s.image.tag = Some(self.opts.tag.clone());
            files.push(OutFile {
                path: format!("{host}/{}", unit_name(name, Instance::Surge(*i))),
                content: render(&s, Instance::Surge(*i), host)?,
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// Applies `files` on `hosts`, in parallel.
    async fn apply(&self, hosts: &BTreeSet<String>, files: &[OutFile]) -> Result<(), RolloutError> {
        let text = listing(files);
        let mut tasks = Vec::new();
        for h in hosts {
            let via = self.via.clone();
            let (h, addr, text) = (h.clone(), self.address(h), text.clone());
            tasks.push(tokio::task::spawn_blocking(move || {
                via.apply(&h, &addr, &text)
            }));
        }
        let mut errors = Vec::new();
        for t in tasks {
            match t.await {
                Ok(Ok(report)) => eprintln!("unitgen: {}", report.summary()),
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RolloutError::Aborted(errors.join("; ")))
        }
    }

    fn image_with(&self, tag: &str) -> String {
        let mut i = self.svc().image.clone();
        i.tag = Some(tag.into());
        i.to_string()
    }

    /// Polls the registry until every target is healthy, or the deadline passes (then returns
    /// the ones that are not).
    async fn wait_healthy(
        &self,
        targets: &[Target],
        deadline: Instant,
        lock: &EtcdLock,
    ) -> Result<Result<(), Vec<Target>>, RolloutError> {
        loop {
            lock.check()?;
            let eps = read_endpoints(&self.client, &self.keys).await;
            if let Ok(eps) = &eps {
                let missing: Vec<Target> = targets
                    .iter()
                    .filter(|t| !is_healthy_on(eps, t))
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    return Ok(Ok(()));
                }
                if Instant::now() >= deadline {
                    return Ok(Err(missing));
                }
            } else if Instant::now() >= deadline {
                return Err(RolloutError::Aborted(eps.unwrap_err()));
            }
            tokio::time::sleep(self.opts.poll).await;
        }
    }

    /// How many instances of the service the registry shows healthy (any tag).
    async fn healthy_now(&self, placed: &BTreeMap<u32, String>) -> Result<u32, RolloutError> {
        let eps = read_endpoints(&self.client, &self.keys)
            .await
            .map_err(RolloutError::Aborted)?;
        let name = &self.opts.service;
        Ok(placed
            .iter()
            .filter(|(i, h)| {
                let c = render::container_name(name, Instance::Number(**i));
                endpoints_of(&eps, h, &c)
                    .iter()
                    .any(|e| e.health == Health::Healthy)
            })
            .count() as u32)
    }

    /// Describes targets that did not become healthy: the registry's view and Docker's.
    async fn describe(&self, missing: &[Target]) -> Vec<String> {
        let eps = read_endpoints(&self.client, &self.keys)
            .await
            .unwrap_or_default();
        let mut out = Vec::new();
        for t in missing {
            let mine = endpoints_of(&eps, &t.host, &t.container);
            let registry = if mine.is_empty() {
                "not registered in etcd (presence registers a container with a health check only once Docker reports it healthy)".to_string()
            } else {
                mine.iter()
                    .map(|e| {
                        format!(
                            "registered as {} with health {} and image {}",
                            e.instance,
                            health_str(e.health),
                            e.image
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let via = self.via.clone();
            let (h, a, d, c) = (
                t.host.clone(),
                self.address(&t.host),
                self.docker.clone(),
                t.container.clone(),
            );
            let docker = tokio::task::spawn_blocking(move || via.container_health(&h, &a, &d, &c))
                .await
                .unwrap_or_default();
            let health = if !docker.health.is_empty() {
                docker.health.clone()
            } else if mine.iter().any(|e| e.health == Health::Healthy) {
                "healthy (old image)".into()
            } else {
                format!("unknown (container {})", docker.status)
            };
            out.push(format!(
                "{} on {} (container {}, image {}): health {health}: {registry}; docker: {docker}",
                t.unit(&self.opts.service),
                t.host,
                t.container,
                t.image
            ));
        }
        out
    }

    fn write_lock(&self, deployed: &Deployed) -> Result<(), RolloutError> {
        let lock = Lock {
            placement: self.plan.output.placement.clone().expect("systemd format"),
            deployed: deployed.clone(),
        };
        write_atomic(&self.opts.lock_path, &crate::lock::render_lock(&lock))?;
        if let Some(dir) = &self.opts.out_dir {
            write_tree(dir, &self.files(deployed, &[])?)?;
        }
        Ok(())
    }

    /// Runs the rollout. Returns a summary line.
    pub async fn run(self) -> Result<String, RolloutError> {
        let placed = self.check()?;
        let name = self.opts.service.clone();
        let svc = self.svc().clone();
        let spec_tag = svc.image.tag.clone().unwrap_or_default();
        let mut deployed = self.plan.output.deployed.clone();
        let current = |deployed: &Deployed, i: u32| -> String {
            deployed
                .get(&name)
                .and_then(|d| d.tags.get(&i))
                .cloned()
                .unwrap_or_else(|| spec_tag.clone())
        };
        let from: BTreeMap<u32, String> = placed
            .keys()
            .map(|i| (*i, current(&deployed, *i)))
            .collect();
        let mut todo: Vec<u32> = from
            .iter()
            .filter(|(_, t)| **t != self.opts.tag)
            .map(|(i, _)| *i)
            .collect();
        if todo.is_empty() {
            return Ok(format!(
                "{name}: all {} instances already run {}; nothing to do",
                placed.len(),
                self.opts.tag
            ));
        }
        let n = svc.instances;
        let mut unavailable = svc.rollout.max_unavailable.resolve(n, false);
        let surge = svc.rollout.max_surge.resolve(n, true);
        if unavailable == 0 && surge == 0 {
            unavailable = 1; // as Kubernetes does when both round down to 0
        }
        let deadline_per_batch = self
            .opts
            .progress_deadline
            .unwrap_or(Duration::from_millis(svc.rollout.progress_deadline.0));

        let mut record = RolloutRecord {
            service: name.clone(),
            holder: self.opts.holder.clone(),
            started_at: now_rfc3339(),
            updated_at: now_rfc3339(),
            to: self.opts.tag.clone(),
            from: from.clone(),
            done: from
                .iter()
                .filter(|(_, t)| **t == self.opts.tag)
                .map(|(i, _)| *i)
                .collect(),
            batch: 0,
            current: Vec::new(),
            phase: "starting".into(),
        };
        let lock =
            EtcdLock::acquire(&self.client, &self.keys, &record, self.opts.lease_ttl).await?;
        let result = self
            .batches(
                &lock,
                &mut record,
                &mut deployed,
                &placed,
                &mut todo,
                unavailable,
                surge,
                deadline_per_batch,
            )
            .await;
        lock.release().await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn batches(
        &self,
        lock: &EtcdLock,
        record: &mut RolloutRecord,
        deployed: &mut Deployed,
        placed: &BTreeMap<u32, String>,
        todo: &mut Vec<u32>,
        unavailable: u32,
        surge: u32,
        deadline_per_batch: Duration,
    ) -> Result<String, RolloutError> {
        let name = self.opts.service.clone();
        let started = Instant::now();
        let mut batch_no = 0;
        while !todo.is_empty() {
            batch_no += 1;
            let down = self
                .batch_down(
                    placed,
                    todo.len(),
                    unavailable,
                    surge,
                    deadline_per_batch,
                    batch_no,
                )
                .await?;
            let in_place: Vec<u32> = todo.iter().take(down as usize).copied().collect();
            let surged: Vec<u32> = todo
                .iter()
                .skip(down as usize)
                .take(surge as usize)
                .copied()
                .collect();
            let batch: Vec<u32> = in_place.iter().chain(&surged).copied().collect();
            let hosts: BTreeSet<String> = batch.iter().map(|i| placed[i].clone()).collect();
            record.batch = batch_no;
            record.current = batch.clone();
            record.phase = "replacing".into();
            record.updated_at = now_rfc3339();
            lock.update(record).await?;
            eprintln!(
                "unitgen: {name} batch {batch_no}: {} to {} (in place: {in_place:?}, surge: {surged:?})",
                batch.iter().map(|i| format!("{name}@{i}")).collect::<Vec<_>>().join(" "),
                self.opts.tag
            );

            let before = deployed.clone();
            let mut next = self.next_deployed(deployed, placed, &in_place);
            let surge_units: Vec<(u32, String)> =
                surged.iter().map(|i| (*i, placed[i].clone())).collect();
            let step = Step {
                no: batch_no,
                in_place: &in_place,
                surged: &surged,
                hosts: &hosts,
                surge_units: &surge_units,
                deadline: Instant::now() + deadline_per_batch,
                deadline_per_batch,
            };
            if let Err(why) = self.replace(lock, record, placed, &step, &mut next).await? {
                return self
                    .roll_back(lock, record, &before, placed, &batch, &hosts, why)
                    .await;
            }
            *deployed = next;
            self.write_lock(deployed)?;
            todo.retain(|i| !batch.contains(i));
            record.done.extend(&batch);
            record.done.sort();
            record.current.clear();
            record.phase = if todo.is_empty() {
                "finishing"
            } else {
                "replacing"
            }
            .into();
            record.updated_at = now_rfc3339();
            lock.update(record).await?;
        }
        Ok(format!(
            "{name}: all {} instances run {} ({batch_no} batches, {:.1} s); {} records the tags",
            placed.len(),
            self.opts.tag,
            started.elapsed().as_secs_f64(),
            self.opts.lock_path.display()
        ))
    }

    /// How many of the `todo` instances may go down for batch `batch_no`: what is healthy
    /// beyond n - max_unavailable. Waits up to `deadline_per_batch` while that is none and
    /// there is no surge.
    async fn batch_down(
        &self,
        placed: &BTreeMap<u32, String>,
        todo: usize,
        unavailable: u32,
        surge: u32,
        deadline_per_batch: Duration,
        batch_no: u32,
    ) -> Result<u32, RolloutError> {
        let name = &self.opts.service;
        let n = self.svc().instances;
        let wait_until = Instant::now() + deadline_per_batch;
        loop {
            let healthy = self.healthy_now(placed).await?;
            let budget = healthy.saturating_sub(n.saturating_sub(unavailable));
            let down = budget.min(unavailable).min(todo as u32);
            if down > 0 || surge > 0 {
                return Ok(down);
            }
            if Instant::now() >= wait_until {
                return Err(RolloutError::Failed(format!(
                    "rollout of {name} to {} stopped before batch {batch_no}: only {healthy} of {n} instances are healthy in the registry, and max_unavailable {unavailable} allows none more down within progress_deadline {:?}; nothing of this batch was changed",
                    self.opts.tag, deadline_per_batch
                )));
            }
            tokio::time::sleep(self.opts.poll).await;
        }
    }

    /// Sets the tag of the service's `slots` in `d` (and its spec image).
    fn set_tags(&self, d: &mut Deployed, slots: &[u32], tag: &str) {
        let spec_image = self.svc().image.to_string();
        let e = d
            .entry(self.opts.service.clone())
            .or_insert_with(|| DeployedTags {
                spec: spec_image.clone(),
                tags: BTreeMap::new(),
            });
        e.spec = spec_image;
        for i in slots {
            e.tags.insert(*i, tag.to_string());
        }
    }

    /// `deployed` with the new tag for `in_place`. Every instance gets an explicit tag in the
    /// lock once a rollout touched it.
    fn next_deployed(
        &self,
        deployed: &Deployed,
        placed: &BTreeMap<u32, String>,
        in_place: &[u32],
    ) -> Deployed {
        let name = &self.opts.service;
        let mut next = deployed.clone();
        for i in placed.keys() {
            let cur = next
                .get(name)
                .and_then(|d| d.tags.get(i))
                .cloned()
                .unwrap_or_else(|| self.svc().image.tag.clone().unwrap_or_default());
            self.set_tags(&mut next, &[*i], &cur);
        }
        self.set_tags(&mut next, in_place, &self.opts.tag);
        next
    }

    /// Where instance `i` (as `instance`) runs `image`.
    fn target(
        &self,
        placed: &BTreeMap<u32, String>,
        i: u32,
        instance: Instance,
        image: &str,
    ) -> Target {
        Target {
            instance: i,
            host: placed[&i].clone(),
            container: render::container_name(&self.opts.service, instance),
            image: image.to_string(),
        }
    }

    /// Replaces one batch: in-place replacements and surge units beside the old instances,
    /// then the surged instances' own units. `Ok(Err(why))` when the batch is to be rolled
    /// back.
    async fn replace(
        &self,
        lock: &EtcdLock,
        record: &mut RolloutRecord,
        placed: &BTreeMap<u32, String>,
        step: &Step<'_>,
        next: &mut Deployed,
    ) -> Result<Result<(), String>, RolloutError> {
        let batch_no = step.no;
        let new_image = self.image_with(&self.opts.tag);
        // Phase 1: in-place replacements, and surge units beside the old instances.
        let mut waiting: Vec<Target> = step
            .in_place
            .iter()
            .map(|i| self.target(placed, *i, Instance::Number(*i), &new_image))
            .collect();
        waiting.extend(
            step.surged
                .iter()
                .map(|i| self.target(placed, *i, Instance::Surge(*i), &new_image)),
        );
        let mut outcome = match self
            .apply(step.hosts, &self.files(next, step.surge_units)?)
            .await
        {
            Ok(()) => {
                record.phase = "waiting for health".into();
                record.updated_at = now_rfc3339();
                lock.update(record).await?;
                self.wait_healthy(&waiting, step.deadline, lock).await?
            }
            Err(e) => return Ok(Err(format!("applying batch {batch_no} failed: {e}"))),
        };
        // Phase 2: the surged instances' own units move to the new tag (their surge unit
        // serves meanwhile), then the surge units go.
        if outcome.is_ok() && !step.surged.is_empty() {
            self.set_tags(next, step.surged, &self.opts.tag);
            let waiting: Vec<Target> = step
                .surged
                .iter()
                .map(|i| self.target(placed, *i, Instance::Number(*i), &new_image))
                .collect();
            if let Err(e) = self
                .apply(step.hosts, &self.files(next, step.surge_units)?)
                .await
            {
                return Ok(Err(format!("applying batch {batch_no} failed: {e}")));
            }
            outcome = self.wait_healthy(&waiting, step.deadline, lock).await?;
            if outcome.is_ok() {
                if let Err(e) = self.apply(step.hosts, &self.files(next, &[])?).await {
                    return Ok(Err(format!(
                        "removing the surge units of batch {batch_no} failed: {e}"
                    )));
                }
            }
        }
        if let Err(missing) = outcome {
            let why = self.describe(&missing).await;
            return Ok(Err(format!(
                "batch {batch_no} did not become healthy within progress_deadline {:?}: {}",
                step.deadline_per_batch,
                why.join("; ")
            )));
        }
        Ok(Ok(()))
    }

    /// Puts the batch back on the tags in `before` (surge units removed) and waits for it to be
    /// healthy again; always ends in an error that starts with `why`.
    #[allow(clippy::too_many_arguments)]
    async fn roll_back(
        &self,
        lock: &EtcdLock,
        record: &mut RolloutRecord,
        before: &Deployed,
        placed: &BTreeMap<u32, String>,
        batch: &[u32],
        hosts: &BTreeSet<String>,
        why: String,
    ) -> Result<String, RolloutError> {
        let name = &self.opts.service;
        record.phase = "rolling back".into();
        record.updated_at = now_rfc3339();
        let _ = lock.update(record).await;
        let spec_tag = self.svc().image.tag.clone().unwrap_or_default();
        let old_tag = |i: u32| {
            before
                .get(name)
                .and_then(|d| d.tags.get(&i))
                .cloned()
                .unwrap_or_else(|| spec_tag.clone())
        };
        let units: Vec<String> = batch.iter().map(|i| format!("{name}@{i}")).collect();
        let head = format!("rollout of {name} to {} failed: {why}", self.opts.tag);
        eprintln!("unitgen: {head}; rolling back {}", units.join(" "));
        let files = self.files(before, &[])?;
        if let Err(e) = self.apply(hosts, &files).await {
            return Err(RolloutError::Aborted(format!(
                "{head}; rolling back {} failed too: {e}",
                units.join(" ")
            )));
        }
        let targets: Vec<Target> = batch
            .iter()
            .map(|i| Target {
                instance: *i,
                host: placed[i].clone(),
                container: render::container_name(name, Instance::Number(*i)),
                image: self.image_with(&old_tag(*i)),
            })
            .collect();
        let deadline = Instant::now()
            + self.opts.progress_deadline.unwrap_or(Duration::from_millis(
                self.svc().rollout.progress_deadline.0,
            ));
        let back = self.wait_healthy(&targets, deadline, lock).await?;
        self.write_lock(before)?;
        let olds: Vec<String> = batch
            .iter()
            .map(|i| format!("{name}@{i} on {}", old_tag(*i)))
            .collect();
        match back {
            Ok(()) => Err(RolloutError::Failed(format!(
                "{head}; rolled back: {} healthy again",
                olds.join(", ")
            ))),
            Err(missing) => {
                let why = self.describe(&missing).await;
                Err(RolloutError::Aborted(format!(
                    "{head}; rolled back to {} but not healthy again: {}",
                    olds.join(", "),
                    why.join("; ")
                )))
            }
        }
    }
}
