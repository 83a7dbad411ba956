//! `confgen run`: the watch → render → apply loop.
//!
//! One task owns everything (view, resources, timers), driven by a `select!` over: a new
//! registry snapshot, a change of the cache's health, SIGHUP, a template/conf.d file event, a
//! timer (quiescence, retry, drop guard), and shutdown. Each wake-up ends with a *flush*: every
//! resource that is due is rendered and applied as one batch, then each distinct `reload_cmd`
//! runs once. A resource with a pending change that shares a reload command with a due one joins
//! the batch even if its own quiet period has not ended (one transaction, one reload).
//!
//! Per resource:
//! - **dirty** when a change touched its keys (or its template / resource changed);
//! - **due** at once for the first change after `wait.min` of quiet (leading edge), otherwise
//!   when no change arrived for `wait.min`, or `wait.max` after the batch's first change;
//! - after a failure, retried with backoff (1 s doubling to 60 s) or at the next change; a
//!   failure of the same kind again is logged at debug, not as a new error;
//! - **held** by the drop guard while a render would remove more than `max_drop` of its
//!   endpoints, until that drop has persisted for `drop_grace`. The endpoint count it compares
//!   with survives restarts (not with `--onetime`).
//!
//! Files beside a destination `D` (besides staged `.D.confgen-*` files, removed at start):
//! `D.bak` (the previous content), `.D.reload-pending` (exists from before a new file is
//! renamed into place until its reload succeeded; a run that finds it reloads at its first
//! apply even if the file is current), `.D.endpoints` (endpoints of the last applied render,
//! for the drop guard of the next run) and, for a resource with `runtime_api`,
//! `.D.runtime-removing` (servers a runtime apply is removing; see [`crate::runtime`]).
//!
//! Nothing is rendered or written before the first complete registry view, nor while the watch
//! is not current (etcd unreachable): the last good files stay, `/healthz` says stale.
//! `/healthz` is healthy once the view is current and every resource has been applied once
//! without failing since.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_registry::backoff::Backoff;
use flotilla_registry::shutdown::Hangups;
use flotilla_registry::{CacheState, CacheStatus, KeyKind, Keys, Update, Updates};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::admit::AdmitArgs;
use crate::apply::{self, Commands, Committed, DropUnit, Outcome};
use crate::metrics::{self, Metrics};
use crate::resource::{self, Resource};
use crate::runtime::{Attempt, Runtime};
use crate::template::{Engine, TemplateError};
use crate::view::{Changes, Scope, TemplateData, View};

/// Modes of `confgen run`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Modes {
    /// Render once, apply, exit.
    pub onetime: bool,
    /// Render and check, write nothing.
    pub noop: bool,
    /// Print a unified diff of each change.
    pub diff: bool,
    /// Write, but run no reload command.
    pub no_reload: bool,
    /// The first apply of each resource skips the drop guard (`--allow-drop`).
    pub allow_drop: bool,
}

#[derive(Debug)]
struct Pending {
    first: Instant,
    last: Instant,
    leading: bool,
}

#[derive(Debug)]
struct Held {
    since: Instant,
    had: usize,
    now: usize,
    unit: DropUnit,
}

#[derive(Debug)]
struct Failure {
    kind: &'static str,
    message: String,
    retry_at: Instant,
    backoff: Backoff,
}

/// One resource and its state.
#[derive(Debug)]
struct Slot {
    res: Resource,
    engine: Result<Engine, TemplateError>,
    data: TemplateData,
    pending: Option<Pending>,
    last_flush: Option<Instant>,
    applied_revision: i64,
    applied_endpoints: Option<usize>,
    /// The size of the destination when it exists but no endpoint count was recorded for it:
    /// the drop guard's baseline until the first apply records one.
    unrecorded_bytes: Option<usize>,
    held: Option<Held>,
    failure: Option<Failure>,
    succeeded_once: bool,
    /// The destination was renamed into place but its reload has not succeeded yet (also
    /// across restarts, through [`reload_marker`]).
    reload_pending: bool,
    /// The resource's runtime API (`runtime_api`), if it has one.
    runtime: Option<Runtime>,
    buf: Vec<u8>,
}

impl Slot {
    fn new(res: Resource, view: &View) -> Slot {
        let scope = Scope {
            keys: res.keys.clone(),
            prefix: res.prefix.clone(),
        };
        let engine = load_engine(&res, view, &scope);
        let mut data = TemplateData::new(scope);
        data.want_json(engine.as_ref().map_or(true, Engine::needs_json));
        let runtime = Runtime::for_resource(&res);
        Slot {
            data,
            res,
            engine,
            pending: None,
            last_flush: None,
            applied_revision: 0,
            applied_endpoints: None,
            unrecorded_bytes: None,
            held: None,
            failure: None,
            succeeded_once: false,
            reload_pending: false,
            runtime,
            buf: Vec::new(),
        }
    }

    /// What the drop guard compares the first render with: what the last run applied
    /// (`.D.endpoints`), so that a run started while most endpoints had vanished (leases expired
    /// in an outage) does not write that at once, `--onetime` included; without a record, the
    /// size of the destination, if it exists. `--allow-drop` starts without a baseline.
    fn load_drop_baseline(&mut self, modes: Modes) {
        if modes.allow_drop {
            return;
        }
        let dest = &self.res.dest;
        self.applied_endpoints = load_applied_endpoints(dest);
        if self.applied_endpoints.is_none() {
            self.unrecorded_bytes = std::fs::metadata(dest)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len() as usize);
        }
    }

    /// A change this resource sees arrived. `config`: a key other than an endpoint changed
    /// (or the template, or the resource): that may be the fix for a failure, so a failing
    /// resource is retried at once. Endpoint churn alone does not cut a failure's backoff short:
    /// a check that fails for a reason the endpoints cannot fix must not run once per change.
    fn mark_dirty(&mut self, now: Instant, config: bool) {
        if let (Some(f), true) = (&mut self.failure, config) {
            f.retry_at = now;
        }
        match &mut self.pending {
            Some(p) => p.last = now,
            None => {
                let quiet = self
                    .last_flush
                    .is_none_or(|t| now.duration_since(t) >= self.res.wait.min);
                self.pending = Some(Pending {
                    first: now,
                    last: now,
                    leading: quiet,
                });
            }
        }
    }

    /// When this slot should be flushed next, if at all.
    fn due(&self) -> Option<Instant> {
        let mut due = self.pending.as_ref().map(|p| {
            if p.leading {
                p.first
            } else {
                (p.last + self.res.wait.min).min(p.first + self.res.wait.max)
            }
        });
        if let Some(f) = &self.failure {
            due = Some(due.map_or(f.retry_at, |d| d.max(f.retry_at)));
        }
        if let Some(h) = &self.held {
            let grace_end = h.since + self.res.drop_grace;
            due = Some(due.map_or(grace_end, |d| d.min(grace_end)));
        }
        due
    }

    /// An apply of this slot succeeded at `revision`: its endpoint count becomes the drop
    /// guard's baseline (also on disk, not with `--noop`), a failure or hold ends.
    fn succeeded(&mut self, revision: i64, modes: Modes, metrics: &Metrics) {
        self.data.applied();
        if self.failure.take().is_some() {
            info!(resource = %self.res.name, "recovered");
        }
        self.succeeded_once = true;
        self.applied_revision = revision;
        if !modes.noop {
            let n = self.data.endpoint_count();
            if self.applied_endpoints != Some(n) {
                store_applied_endpoints(&self.res.dest, n);
            }
            self.applied_endpoints = Some(n);
            self.unrecorded_bytes = None;
        }
        self.held = None;
        metrics
            .last_success
            .get_or_create(&metrics::resource(&self.res.name))
            .set(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
    }

    /// The drop guard held this slot's render: the hold keeps the time it began (the grace
    /// period counts from there) and is logged when it begins (with `--onetime`, always).
    fn hold(&mut self, had: usize, now: usize, unit: DropUnit, modes: Modes) {
        let name = &self.res.name;
        let first = self.held.is_none();
        let since = self.held.as_ref().map_or(Instant::now(), |h| h.since);
        self.held = Some(Held {
            since,
            had,
            now,
            unit,
        });
        if modes.onetime {
            warn!(
                resource = %name,
                had, now, unit = %unit.name(),
                max_drop = %format!("{:.0}%", self.res.max_drop * 100.0),
                "drop guard: not applied; the destination keeps its content (--onetime cannot wait out drop_grace; --allow-drop applies it)"
            );
        } else if first {
            warn!(
                resource = %name,
                had, now, unit = %unit.name(),
                max_drop = %format!("{:.0}%", self.res.max_drop * 100.0),
                grace = %humantime::format_duration(self.res.drop_grace),
                "drop guard: holding a render that removes too many endpoints; it is applied if the drop persists for the grace period"
            );
        }
    }

    /// An apply of this slot failed: it stays dirty and is retried with backoff (or at the
    /// next change of its configuration, see [`Slot::mark_dirty`]).
    fn failed(&mut self, failed: &Outcome, batch_start: Option<Instant>, metrics: &Metrics) {
        let name = &self.res.name;
        metrics.failure(name, failed.kind());
        let message = failed.to_string();
        let now = Instant::now();
        match &mut self.failure {
            // The same kind of failure again is the same fault still there: keep backing
            // off and log at debug. Messages are not compared: they vary between attempts
            // (a check names the staged file and HAProxy prints its pid).
            Some(f) if f.kind == failed.kind() => {
                debug!(resource = %name, error = %message, "still failing");
                f.message = message;
                f.retry_at = now + f.backoff.next_delay();
            }
            _ => {
                error!(resource = %name, error = %message, "apply failed; the destination keeps its last good content");
                let mut backoff = Backoff::new(
                    Duration::from_secs(1),
                    Duration::from_secs(60),
                    Duration::from_secs(60),
                );
                let retry_at = now + backoff.next_delay();
                self.failure = Some(Failure {
                    kind: failed.kind(),
                    message,
                    retry_at,
                    backoff,
                });
            }
        }
        // Keep the resource dirty: the apply is retried.
        self.pending.get_or_insert(Pending {
            first: batch_start.unwrap_or(now),
            last: now,
            leading: false,
        });
    }
}

fn load_engine(res: &Resource, view: &View, scope: &Scope) -> Result<Engine, TemplateError> {
    let dir = res.src.parent().map(Path::to_path_buf).unwrap_or_default();
    // src_name may contain subdirectories; the templates dir is confdir/templates.
    let templates_dir = templates_dir_of(res).unwrap_or(dir);
    let engine = Engine::load(&templates_dir, &res.src_name, view.store(), scope.clone());
    if let Ok(e) = &engine {
        if e.memoised() {
            debug!(resource = %res.name, "the template's `for … in services` loops are rendered once per service and kept until it changes");
        }
    }
    engine
}

fn templates_dir_of(res: &Resource) -> Option<PathBuf> {
    let mut dir = res.src.clone();
    for _ in Path::new(&res.src_name).components() {
        dir = dir.parent()?.to_path_buf();
    }
    Some(dir)
}

/// What `/healthz` shows.
#[derive(Debug, Default)]
pub struct Health {
    cache: Option<CacheState>,
    complete: bool,
    resources: BTreeMap<String, String>,
    failing: usize,
    /// Resources that have not been applied once yet (not ready, as for sd_notify READY).
    unready: usize,
}

impl Health {
    /// (healthy, body) for `/healthz`.
    pub fn report(&self) -> (bool, String) {
        let mut body = String::new();
        let stale = !self.complete || self.cache != Some(CacheState::Watching);
        match (&self.cache, self.complete) {
            (_, false) => body.push_str("registry: stale (no complete view yet)\n"),
            (Some(CacheState::Watching), true) => body.push_str("registry: current\n"),
            (Some(CacheState::Degraded { error }), true) => {
                body.push_str(&format!("registry: stale (last view kept): {error}\n"))
            }
            _ => body.push_str("registry: stale (resyncing)\n"),
        }
        for (name, state) in &self.resources {
            body.push_str(&format!("resource {name}: {state}\n"));
        }
        (!stale && self.failing == 0 && self.unready == 0, body)
    }
}

/// The running daemon.
pub struct Daemon {
    confdir: PathBuf,
    modes: Modes,
    view: View,
    slots: Vec<Slot>,
    metrics: Arc<Metrics>,
    health: Arc<Mutex<Health>>,
    heartbeat: Arc<AtomicU64>,
    ready_sent: bool,
    writable: bool,
    /// Asks the registry cache to mirror a new set of prefixes (see
    /// [`Daemon::follow_prefixes`]); `None` in tests that feed updates by hand.
    set_prefixes: Option<PrefixSetter>,
    /// The prefixes the cache was last asked to mirror, and those the view holds: files are
    /// written only when the two agree, so a resource added at SIGHUP with keys outside the
    /// watched set never renders before they are listed.
    wanted_prefixes: Option<Vec<String>>,
    view_prefixes: Arc<Vec<String>>,
    /// Runs the check and reload commands: [`apply::Shell`]; the unit tests' own records them.
    commands: Arc<dyn Commands>,
}

/// Where [`Daemon::run`] takes registry updates from: the cache's [`Updates`]; in unit tests,
/// updates fed by hand.
pub trait UpdateSource {
    /// The next update, or `None` once the source is gone. Cancel-safe.
    fn recv(&mut self) -> impl std::future::Future<Output = Option<Update>> + Send;
    /// The pending update, if any, without waiting.
    fn try_recv(&mut self) -> Option<Update>;
}

impl UpdateSource for Updates {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<Update>> + Send {
        Updates::recv(self)
    }

    fn try_recv(&mut self) -> Option<Update> {
        Updates::try_recv(self)
    }
}

/// Hands the registry cache a new set of prefixes to mirror; true if the set changed.
pub type PrefixSetter = Box<dyn Fn(Vec<String>) -> bool + Send>;

/// How a run ended (for `--onetime`'s exit code).
#[derive(Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// Every resource applied (or shutdown in daemon mode).
    Ok,
    /// At least one resource failed (`--onetime`).
    Failed,
    /// None failed, but the drop guard held at least one (`--onetime`): its destination keeps
    /// its content.
    Held,
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy)]
struct Flushed {
    failed: bool,
    held: bool,
}

/// One flush in progress: what each slot's apply did, and the files written for each reload
/// command.
#[derive(Debug, Default)]
struct Batch {
    /// (slot, outcome, first change of its batch).
    outcomes: Vec<(usize, Outcome, Option<Instant>)>,
    committed: BTreeMap<String, Vec<(usize, Committed)>>,
    /// Slots whose file is current but whose reload never succeeded.
    reload_only: Vec<usize>,
}

impl Daemon {
    /// Loads the confdir and templates. Resource errors are fatal here (start-up); template
    /// errors are not (the resource reports them and waits for a fix).
    pub fn new(
        confdir: &Path,
        keys: &Keys,
        admit: AdmitArgs,
        modes: Modes,
        metrics: Arc<Metrics>,
        health: Arc<Mutex<Health>>,
    ) -> Result<Daemon, resource::ConfigErrors> {
        let resources = resource::load_confdir(confdir)?;
        let view = View::new(keys.clone(), admit);
        let mut slots = Vec::new();
        for r in resources {
            // A run killed between renaming a new file into place and its reload left the
            // marker: the proxy may still run the old config, so reload at the first apply.
            let reload_pending = r.reload_cmd.is_some() && reload_marker(&r.dest).exists();
            if reload_pending {
                warn!(resource = %r.name, dest = %r.dest.display(), "an earlier run wrote this file but did not finish its reload; reloading at the first apply");
            }
            let n = apply::remove_leftovers(&r.dest)
                + apply::remove_leftovers(&applied_endpoints_file(&r.dest));
            if n > 0 {
                info!(resource = %r.name, files = n, "removed staged files left by an earlier run");
            }
            let mut slot = Slot::new(r, &view);
            slot.reload_pending = reload_pending;
            slot.load_drop_baseline(modes);
            if let Err(e) = &slot.engine {
                error!(resource = %slot.res.name, error = %e, "template does not load; the destination is left as it is");
            }
            slots.push(slot);
        }
        // Stale until the first complete, current view (/metrics may be scraped before).
        metrics.stale.set(1);
        Ok(Daemon {
            confdir: confdir.to_owned(),
            modes,
            view,
            slots,
            metrics,
            health,
            heartbeat: Arc::new(AtomicU64::new(now_secs())),
            ready_sent: false,
            writable: false,
            set_prefixes: None,
            wanted_prefixes: None,
            view_prefixes: Arc::default(),
            commands: Arc::new(apply::Shell),
        })
    }

    /// The etcd prefixes the resources need: `--prefix`'s root, and every resource key outside
    /// it, watched as given (confd's absolute keys), reduced to their cover.
    pub fn watch_prefixes(&self) -> Vec<String> {
        watch_prefixes(self.view.keys(), self.slots.iter().map(|s| &s.res))
    }

    /// From now on, a configuration re-read that changes [`Daemon::watch_prefixes`] hands the
    /// new set to `set` (the registry cache's `set_prefixes`), and files wait until the view
    /// mirrors it. Call it with the cache built from [`Daemon::watch_prefixes`].
    pub fn follow_prefixes(&mut self, set: PrefixSetter) {
        self.wanted_prefixes = Some(self.watch_prefixes());
        self.set_prefixes = Some(set);
    }

    /// Seconds-since-epoch of the loop's last turn (for the systemd watchdog).
    pub fn heartbeat(&self) -> Arc<AtomicU64> {
        self.heartbeat.clone()
    }

    /// Every file to watch for changes: the conf.d directory and the templates directory.
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        vec![self.confdir.join("conf.d"), self.confdir.join("templates")]
    }

    /// Runs until `shutdown` resolves (or, with `--onetime`, until one apply is done).
    pub async fn run(
        mut self,
        mut updates: impl UpdateSource,
        mut status: watch::Receiver<CacheStatus>,
        mut files: mpsc::Receiver<()>,
        mut hangups: Hangups,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> RunEnd {
        tokio::pin!(shutdown);
        // Resources are listed (not rendered yet) before the view can make /healthz current.
        self.publish_health();
        self.on_status(&status.borrow_and_update().clone());
        self.drain_updates(&mut updates);
        loop {
            self.heartbeat.store(now_secs(), Ordering::Relaxed);
            if self.modes.onetime && self.writable {
                // Everything is dirty after the first complete view: one flush, then exit.
                let flushed = self.flush(true).await;
                // The process exits next: freeing the view and every resource's data one
                // allocation at a time would only delay that exit (see `run` in main.rs).
                std::mem::forget(self);
                return if flushed.failed {
                    RunEnd::Failed
                } else if flushed.held {
                    RunEnd::Held
                } else {
                    RunEnd::Ok
                };
            }
            self.flush(false).await;
            self.publish_health();
            // While the view is not writable nothing can be flushed, however due: wait for an
            // update or a status change (a due time in the past would make the loop spin).
            let next = self
                .slots
                .iter()
                .filter_map(Slot::due)
                .min()
                .filter(|_| self.writable)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            // Wake at least every 10 s so the watchdog heartbeat keeps moving.
            let next = next.min(Instant::now() + Duration::from_secs(10));
            tokio::select! {
                _ = &mut shutdown => {
                    info!("shutting down");
                    return RunEnd::Ok;
                }
                u = updates.recv() => {
                    let Some(u) = u else {
                        error!("the registry watch ended");
                        return RunEnd::Failed;
                    };
                    self.on_update(&u);
                    self.drain_updates(&mut updates);
                }
                r = status.changed() => {
                    if r.is_ok() {
                        let s = status.borrow_and_update().clone();
                        self.on_status(&s);
                        self.drain_updates(&mut updates);
                    }
                }
                _ = hangups.next() => {
                    info!("SIGHUP: re-reading conf.d and templates");
                    self.reload_config();
                }
                Some(()) = files.recv() => {
                    // Let a burst of file events (an editor's save) settle: 20 ms of quiet,
                    // at most 60 ms.
                    let until = Instant::now() + Duration::from_millis(60);
                    loop {
                        let quiet = tokio::time::sleep(Duration::from_millis(20));
                        tokio::select! {
                            Some(()) = files.recv() => if Instant::now() >= until { break },
                            _ = quiet => break,
                        }
                    }
                    info!("template or resource file changed: re-reading conf.d and templates");
                    self.reload_config();
                }
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    fn on_status(&mut self, s: &CacheStatus) {
        let mut h = self.health.lock().expect("health lock");
        h.cache = Some(s.state.clone());
        drop(h);
        self.update_writable();
    }

    fn update_writable(&mut self) {
        let state = self.health.lock().expect("health lock").cache.clone();
        let covered = self
            .wanted_prefixes
            .as_ref()
            .is_none_or(|w| *w == *self.view_prefixes);
        let writable = self.view.complete() && state == Some(CacheState::Watching) && covered;
        if writable != self.writable {
            if writable {
                info!(
                    revision = self.view.revision(),
                    "registry view is current; applying"
                );
            } else if self.view.complete() {
                warn!(
                    "registry view is stale; keeping the current files until it is current again"
                );
            }
        }
        self.writable = writable;
        self.metrics.stale.set(i64::from(!writable));
    }

    /// Applies every update already queued (each in order: they are incremental).
    fn drain_updates(&mut self, updates: &mut impl UpdateSource) {
        while let Some(u) = updates.try_recv() {
            self.on_update(&u);
        }
    }

    fn on_update(&mut self, update: &Update) {
        let was_complete = self.view.complete();
        self.view_prefixes = update.snapshot.prefixes.clone();
        let changes = self.view.sync(update);
        let now = Instant::now();
        let first = !was_complete && self.view.complete();
        for s in &mut self.slots {
            let dirty = s.data.apply(&self.view, &changes);
            if first || dirty.any {
                s.mark_dirty(now, dirty.config);
            }
        }
        if first {
            info!(
                revision = self.view.revision(),
                keys = changes.keys.len(),
                "first complete registry view"
            );
        } else if !changes.keys.is_empty() {
            debug!(
                revision = changes.revision,
                keys = changes.keys.len(),
                services = changes.services.len(),
                "registry changed"
            );
        }
        if !changes.keys.is_empty() {
            self.publish_excluded();
        }
        self.metrics.revision.set(self.view.revision());
        self.health.lock().expect("health lock").complete = self.view.complete();
        self.update_writable();
        self.update_lag();
    }

    fn publish_excluded(&self) {
        let counts = self.view.excluded_counts();
        for reason in [
            "no_node_record",
            "claim",
            "loopback",
            "dns_host",
            "weight",
            "node_cap",
            "duplicate_instance",
        ] {
            self.metrics
                .excluded
                .get_or_create(&vec![("reason".into(), reason.into())])
                .set(counts.get(reason).copied().unwrap_or(0) as i64);
        }
    }

    /// Re-reads conf.d and every template. A bad resource file keeps the old configuration; a
    /// broken template is reported by its resource.
    fn reload_config(&mut self) {
        let resources = match resource::load_confdir(&self.confdir) {
            Ok(r) => r,
            Err(e) => {
                // One log line: every problem, each naming its file and field.
                let errors: Vec<String> = e.0.iter().map(ToString::to_string).collect();
                error!(
                    errors = %errors.join("; "),
                    "the new configuration is invalid; keeping the running one"
                );
                self.metrics.failure("-", "config");
                return;
            }
        };
        let mut old: BTreeMap<String, Slot> = self
            .slots
            .drain(..)
            .map(|s| (s.res.name.clone(), s))
            .collect();
        let now = Instant::now();
        for r in resources {
            let mut slot = match old.remove(&r.name) {
                Some(mut prev) if prev.res.keys == r.keys && prev.res.prefix == r.prefix => {
                    prev.engine = load_engine(&r, &self.view, prev.data.scope());
                    prev.data
                        .want_json(prev.engine.as_ref().map_or(true, Engine::needs_json));
                    // A new socket or timeout, and a fresh comparison with the running state.
                    prev.runtime = Runtime::for_resource(&r);
                    prev.res = r;
                    prev
                }
                Some(prev) => {
                    let mut s = Slot::new(r, &self.view);
                    s.applied_endpoints = prev.applied_endpoints;
                    s.unrecorded_bytes = prev.unrecorded_bytes;
                    s.reload_pending = prev.reload_pending;
                    s
                }
                None => {
                    let mut s = Slot::new(r, &self.view);
                    s.load_drop_baseline(self.modes);
                    s
                }
            };
            if let Err(e) = &slot.engine {
                error!(resource = %slot.res.name, error = %e, "template does not load; the destination is left as it is");
                self.metrics.failure(&slot.res.name, "render");
            }
            slot.failure = None;
            slot.pending = None;
            slot.last_flush = None;
            slot.mark_dirty(now, true);
            // New or re-scoped resources build their data from the view.
            slot.data.apply(&self.view, &Changes::default());
            self.slots.push(slot);
        }
        for name in old.keys() {
            info!(resource = %name, "resource removed");
        }
        if let Some(set) = &self.set_prefixes {
            let next = self.watch_prefixes();
            if set(next.clone()) {
                info!(prefixes = %next.join(","), "the resources need other keys; relisting the registry before writing");
                self.wanted_prefixes = Some(next);
                self.update_writable();
            }
        }
    }

    /// `due` plus every other resource with a pending change that shares a reload command with
    /// one of them (and is neither in failure backoff nor held by the drop guard). Each slot
    /// keeps its own quiescence timer, so without this one etcd transaction touching two
    /// resources could be applied in two batches, a leading-edge one and a trailing one, and
    /// their shared reload would run twice: the reload is the expensive part, and it runs now
    /// anyway, so the sibling's render joins it.
    fn with_siblings(&self, mut due: Vec<usize>, now: Instant) -> Vec<usize> {
        let cmds: Vec<&String> = due
            .iter()
            .filter_map(|&i| self.slots[i].res.reload_cmd.as_ref())
            .collect();
        if cmds.is_empty() || self.modes.no_reload {
            return due;
        }
        let joining: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                !due.contains(i)
                    && s.pending.is_some()
                    && s.held.is_none()
                    && s.failure.as_ref().is_none_or(|f| f.retry_at <= now)
                    && s.res.reload_cmd.as_ref().is_some_and(|c| cmds.contains(&c))
            })
            .map(|(i, _)| i)
            .collect();
        due.extend(joining);
        due.sort_unstable();
        due
    }

    /// Renders and applies every due resource (all dirty ones with `all`), then runs each
    /// distinct reload command of the batch once.
    async fn flush(&mut self, all: bool) -> Flushed {
        if !self.writable {
            return Flushed::default();
        }
        let now = Instant::now();
        let due = self.due_slots(all, now);
        if due.is_empty() {
            return Flushed::default();
        }
        let due = self.with_siblings(due, now);
        let revision = self.view.revision();
        let mut batch = Batch::default();
        for i in due {
            self.apply_slot(i, now, &mut batch).await;
        }
        // Each distinct reload command once, after every write of the batch.
        for (cmd, group) in std::mem::take(&mut batch.committed) {
            self.reload(&cmd, &group, &mut batch).await;
        }
        self.finish_flush(batch, revision)
    }

    /// The slots to flush now: those due (every dirty, failing or held one with `all`).
    fn due_slots(&self, all: bool, now: Instant) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                if all {
                    s.pending.is_some() || s.failure.is_some() || s.held.is_some()
                } else {
                    s.due().is_some_and(|d| d <= now)
                }
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Renders slot `i` and runs phase 1 of its apply (a failed check is retried once without
    /// the endpoints [`Daemon::isolate`] finds it fails with); a written file, or a current one
    /// whose reload never succeeded, joins its reload command's group in `batch`.
    async fn apply_slot(&mut self, i: usize, now: Instant, batch: &mut Batch) {
        let commands = self.commands.clone();
        let slot = &mut self.slots[i];
        let batch_start = slot.pending.as_ref().map(|p| p.first);
        slot.pending = None;
        slot.last_flush = Some(now);
        let (mut outcome, mut commit) =
            render_and_write(slot, &*commands, &self.metrics, self.modes, batch_start).await;
        if let Outcome::CheckFailed { output } = &outcome {
            let output = output.clone();
            if self.isolate(i, &output).await {
                (outcome, commit) = render_and_write(
                    &mut self.slots[i],
                    &*commands,
                    &self.metrics,
                    self.modes,
                    batch_start,
                )
                .await;
            }
        }
        let slot = &mut self.slots[i];
        if matches!(outcome, Outcome::Applied { .. }) {
            if let Some(start) = batch_start {
                self.metrics
                    .change_to_write
                    .observe(start.elapsed().as_secs_f64());
            }
        }
        if let (Outcome::Written, Some(c)) = (&outcome, commit) {
            if let (Some(cmd), false) = (&slot.res.reload_cmd, self.modes.no_reload) {
                slot.reload_pending = true;
                batch.committed.entry(cmd.clone()).or_default().push((i, c));
            }
            if let Some(start) = batch_start {
                self.metrics
                    .change_to_write
                    .observe(start.elapsed().as_secs_f64());
            }
        } else if let (Outcome::Unchanged, true, Some(cmd), false) = (
            &outcome,
            slot.reload_pending,
            &slot.res.reload_cmd,
            self.modes.no_reload,
        ) {
            // The file is current but its reload never succeeded: reload it now. A rollback
            // would put back the same content.
            if let Ok(current) = std::fs::read(&slot.res.dest) {
                info!(resource = %slot.res.name, "the destination is current but was not reloaded; reloading");
                batch.reload_only.push(i);
                batch.committed.entry(cmd.clone()).or_default().push((
                    i,
                    Committed {
                        dest: slot.res.dest.clone(),
                        previous: Some(current),
                    },
                ));
            }
        }
        batch.outcomes.push((i, outcome, batch_start));
    }

    /// Runs `cmd` once for the slots of `group` (rolling their files back if it fails) and
    /// turns their outcomes in `batch` into the reload's.
    async fn reload(&mut self, cmd: &str, group: &[(usize, Committed)], batch: &mut Batch) {
        let timeout = group
            .iter()
            .map(|(i, _)| self.slots[*i].res.reload_timeout)
            .max()
            .unwrap_or(resource::DEFAULT_COMMAND_TIMEOUT);
        let commits: Vec<Committed> = group
            .iter()
            .map(|(_, c)| Committed {
                dest: c.dest.clone(),
                previous: c.previous.clone(),
            })
            .collect();
        let result = apply::reload_group(&*self.commands, cmd, timeout, &commits).await;
        let label = vec![(
            "result".to_string(),
            if result.is_ok() { "ok" } else { "failed" }.to_string(),
        )];
        self.metrics.reloads.get_or_create(&label).inc();
        for (i, _) in group {
            let slot = &mut self.slots[*i];
            if result.is_ok() {
                slot.reload_pending = false;
                remove_reload_marker(&slot.res.dest);
            }
            if let Some(o) = batch.outcomes.iter_mut().find(|(j, _, _)| j == i) {
                o.1 = match &result {
                    Ok(took) if batch.reload_only.contains(i) => {
                        info!(resource = %slot.res.name, took = ?took, "reloaded");
                        Outcome::Unchanged
                    }
                    Ok(took) => {
                        debug!(resource = %slot.res.name, took = ?took, "reloaded");
                        Outcome::Reloaded
                    }
                    Err(failure) => Outcome::ReloadFailed {
                        output: failure.output.clone(),
                        rolled_back: failure.rolled_back,
                    },
                };
            }
        }
    }

    /// Records the outcomes of `batch` and says whether one failed or was held; the first
    /// flush after which every resource has applied once sends sd_notify READY.
    fn finish_flush(&mut self, batch: Batch, revision: i64) -> Flushed {
        // Quiet for the leading edge of `wait` counts from the *end* of this flush. Counted from
        // its start, a flush that took longer than `wait.min` (a 900 KB render, write and reload
        // on a loaded machine) made the first change seen after it a leading edge again although
        // the changes had never paused (they queue up while the loop is busy flushing).
        let ended = Instant::now();
        for (i, _, _) in &batch.outcomes {
            self.slots[*i].last_flush = Some(ended);
        }
        let mut flushed = Flushed::default();
        for (i, outcome, batch_start) in batch.outcomes {
            let held = matches!(outcome, Outcome::Held { .. });
            flushed.held |= held;
            flushed.failed |= !outcome.is_success() && !held;
            self.record(i, outcome, batch_start, revision);
        }
        self.update_lag();
        if !self.ready_sent && self.slots.iter().all(|s| s.succeeded_once) {
            self.ready_sent = true;
            info!("every template has rendered; ready");
            flotilla_registry::daemon::notify_ready();
        }
        flushed
    }

    /// The check failed: find the endpoints it fails with among those put since the last good
    /// apply, and leave them out of this resource (quarantine), so one bad record cannot freeze
    /// the file for every service. Returns true if a render without them passes the check; false
    /// if the failure is not the endpoints' (then the resource fails as a whole, as before).
    ///
    /// The search renders and checks (nothing is written): first with every suspect left out
    /// (if that fails too, the cause is elsewhere), then halving the suspects that still fail,
    /// at most [`MAX_ISOLATION_CHECKS`] checks; suspects it could not clear within that stay
    /// out. A quarantined endpoint is tried again when its record changes.
    async fn isolate(&mut self, i: usize, output: &str) -> bool {
        let commands = self.commands.clone();
        let view = &self.view;
        let slot = &mut self.slots[i];
        let base = slot.data.quarantined().clone();
        let suspects: Vec<String> = slot
            .data
            .suspects(view.keys())
            .into_iter()
            .filter(|k| !base.contains(k) && view.is_routed(k))
            .collect();
        if suspects.is_empty() || slot.engine.is_err() {
            return false;
        }
        let started = Instant::now();
        let mut out: BTreeSet<String> = base.iter().chain(&suspects).cloned().collect();
        if !passes_check(slot, &*commands, view, out.clone(), true).await {
            slot.data.set_quarantine(base, view);
            return false;
        }
        let mut checks = 1;
        let mut groups = vec![suspects];
        while let Some(g) = groups.pop() {
            if checks >= MAX_ISOLATION_CHECKS {
                break;
            }
            checks += 1;
            let without: BTreeSet<String> =
                out.iter().filter(|k| !g.contains(k)).cloned().collect();
            if passes_check(slot, &*commands, view, without.clone(), false).await {
                out = without;
            } else if g.len() > 1 {
                let (a, b) = g.split_at(g.len() / 2);
                groups.push(b.to_vec());
                groups.push(a.to_vec());
            }
        }
        slot.data.set_quarantine(out.clone(), view);
        let reason = check_summary(output);
        let mut by_service: BTreeMap<String, Vec<&String>> = BTreeMap::new();
        for k in out.difference(&base) {
            if let Some(KeyKind::Endpoint { service, .. }) = view.keys().parse(k) {
                by_service.entry(service.to_owned()).or_default().push(k);
            }
        }
        for (service, keys) in by_service {
            warn!(
                resource = %slot.res.name,
                service,
                count = keys.len(),
                key = %keys[0],
                check = %reason,
                checks,
                took_ms = started.elapsed().as_millis() as u64,
                "endpoint left out of this resource: its check_cmd fails with it; the rest is applied. It is tried again when its record changes"
            );
        }
        true
    }

    fn record(&mut self, i: usize, outcome: Outcome, batch_start: Option<Instant>, revision: i64) {
        let metrics = self.metrics.clone();
        let modes = self.modes;
        let slot = &mut self.slots[i];
        let labels = metrics::resource(&slot.res.name);
        metrics
            .endpoints
            .get_or_create(&labels)
            .set(slot.data.endpoint_count() as i64);
        metrics
            .quarantined
            .get_or_create(&labels)
            .set(slot.data.quarantined().len() as i64);
        if outcome.is_success() {
            slot.succeeded(revision, modes, &metrics);
        }
        match &outcome {
            Outcome::Unchanged => {
                debug!(resource = %slot.res.name, revision, "render unchanged; nothing written")
            }
            Outcome::Written | Outcome::Reloaded | Outcome::Applied { .. } => {
                metrics.writes.get_or_create(&labels).inc();
                let servers_ms = match &outcome {
                    Outcome::Applied { servers_ms, .. } => *servers_ms,
                    _ => None,
                };
                info!(
                    resource = %slot.res.name,
                    dest = %slot.res.dest.display(),
                    revision,
                    endpoints = slot.data.endpoint_count(),
                    latency_ms = batch_start.map(|s| s.elapsed().as_millis() as u64),
                    servers_ms,
                    "{outcome}"
                );
            }
            Outcome::Planned { diff } => {
                info!(resource = %slot.res.name, dest = %slot.res.dest.display(), "{outcome}");
                if let Some(d) = diff {
                    println!("{d}");
                }
            }
            Outcome::Held { had, now, unit } => {
                metrics.held.get_or_create(&labels).inc();
                slot.hold(*had, *now, *unit, modes);
            }
            failed => slot.failed(failed, batch_start, &metrics),
        }
    }

    /// Revisions the oldest resource is behind. A resource with nothing to apply (not dirty,
    /// not failing, not held) is current at the view's revision, whatever revision it last
    /// wrote at: changes outside its keys do not concern it.
    fn update_lag(&self) {
        let view = self.view.revision();
        let oldest = self
            .slots
            .iter()
            .map(|s| {
                let idle = s.pending.is_none() && s.failure.is_none() && s.held.is_none();
                if idle && s.succeeded_once {
                    view
                } else {
                    s.applied_revision
                }
            })
            .min()
            .unwrap_or(0);
        self.metrics
            .watch_lag
            .set((self.view.revision() - oldest).max(0));
    }

    fn publish_health(&self) {
        let mut h = self.health.lock().expect("health lock");
        h.resources.clear();
        h.failing = 0;
        h.unready = 0;
        for s in &self.slots {
            let state = if let Some(f) = &s.failure {
                h.failing += 1;
                format!("failing ({}): {}", f.kind, f.message)
            } else if let Err(e) = &s.engine {
                h.failing += 1;
                format!("template error: {e}")
            } else if let Some(hd) = &s.held {
                format!(
                    "held by the drop guard ({} of {} {}) for {}",
                    hd.now,
                    hd.had,
                    hd.unit.name(),
                    humantime::format_duration(Duration::from_secs(hd.since.elapsed().as_secs()))
                )
            } else if let (true, Some(rt)) = (
                s.succeeded_once,
                s.runtime.as_ref().and_then(Runtime::status),
            ) {
                format!("ok at revision {} ({rt})", s.applied_revision)
            } else if s.succeeded_once {
                format!("ok at revision {}", s.applied_revision)
            } else {
                h.unready += 1;
                "not rendered yet".to_string()
            };
            // Published after the flush that would have applied it, so a client that sees this
            // knows the change was seen and left alone.
            let state = if s.pending.is_some() && !self.writable {
                format!("{state}; a change waits for a current registry view")
            } else {
                state
            };
            h.resources.insert(s.res.name.clone(), state);
        }
    }
}

/// Render one slot and run phase 1 of the apply.
/// Most checks [`Daemon::isolate`] runs for one failure.
const MAX_ISOLATION_CHECKS: usize = 48;

/// Renders `slot` with `quarantine` left out and runs its check (nothing is written). A render
/// equal to the destination passes without a check, unless `even_current`: the first check of
/// [`Daemon::isolate`] must show that the check can pass at all (it may fail for the current
/// file too, e.g. a file it needs went missing), or every new endpoint would be left out.
async fn passes_check(
    slot: &mut Slot,
    commands: &dyn Commands,
    view: &View,
    quarantine: BTreeSet<String>,
    even_current: bool,
) -> bool {
    slot.data.set_quarantine(quarantine, view);
    let Ok(engine) = &slot.engine else {
        return false;
    };
    if engine.render(&mut slot.data, &mut slot.buf).is_err() {
        return false;
    }
    if even_current {
        return match apply::stage(&slot.res, &slot.buf) {
            Ok(staged) => apply::check_staged(commands, &slot.res, staged.path())
                .await
                .is_ok(),
            Err(_) => false,
        };
    }
    let (outcome, _) = apply::write_checked(commands, &slot.res, &slot.buf, true, false).await;
    outcome.is_success()
}

/// The part of a failed check's output that says what is wrong (HAProxy's first ALERT, nginx's
/// `[emerg]`), short. The output is one line with ` | ` between the command's lines.
fn check_summary(output: &str) -> String {
    let parts = || output.split(['\n', '|']).map(str::trim);
    let part = parts()
        .find(|l| l.contains("[ALERT]") || l.contains("[emerg]"))
        .or_else(|| parts().find(|l| !l.is_empty()))
        .unwrap_or("");
    part.chars().take(400).collect()
}

async fn render_and_write(
    slot: &mut Slot,
    commands: &dyn Commands,
    metrics: &Metrics,
    modes: Modes,
    batch_start: Option<Instant>,
) -> (Outcome, Option<Committed>) {
    let engine = match &slot.engine {
        Ok(e) => e,
        Err(e) => return (Outcome::RenderFailed(e.clone()), None),
    };
    let started = Instant::now();
    let fragments_before = engine.fragment_renders();
    let result = engine.render(&mut slot.data, &mut slot.buf);
    metrics
        .fragment_renders
        .get_or_create(&metrics::resource(&slot.res.name))
        .inc_by(engine.fragment_renders() - fragments_before);
    let labels = metrics::resource(&slot.res.name);
    metrics.renders.get_or_create(&labels).inc();
    metrics
        .render_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        return (Outcome::RenderFailed(e), None);
    }
    // Drop guard: against the endpoints of the last apply or, with no record of them, the size
    // of the current file.
    let baseline = match (slot.applied_endpoints, slot.unrecorded_bytes) {
        (Some(had), _) => Some((had, slot.data.endpoint_count(), DropUnit::Endpoints)),
        (None, Some(bytes)) => Some((bytes, slot.buf.len(), DropUnit::Bytes)),
        (None, None) => None,
    };
    if let Some((had, now_count, unit)) = baseline {
        let dropped = had.saturating_sub(now_count);
        let too_many = had > 0 && (dropped as f64) > slot.res.max_drop * had as f64;
        if too_many {
            let persisted = slot
                .held
                .as_ref()
                .is_some_and(|h| h.since.elapsed() >= slot.res.drop_grace);
            if !persisted {
                return (
                    Outcome::Held {
                        had,
                        now: now_count,
                        unit,
                    },
                    None,
                );
            }
            warn!(
                resource = %slot.res.name,
                had, now = now_count, unit = %unit.name(),
                "drop guard: the drop persisted for the grace period; applying it"
            );
        }
    }
    if let Some(done) = runtime_apply(slot, commands, metrics, modes, batch_start).await {
        return done;
    }
    if slot.res.reload_cmd.is_some() && !modes.noop && !modes.no_reload && !slot.reload_pending {
        create_reload_marker(&slot.res.dest);
    }
    let (outcome, commit) =
        apply::write_checked(commands, &slot.res, &slot.buf, modes.noop, modes.diff).await;
    if !matches!(outcome, Outcome::Written) && !slot.reload_pending {
        remove_reload_marker(&slot.res.dest);
    }
    (outcome, commit)
}

/// The runtime path of a resource with `runtime_api` (see [`crate::runtime`]). `None`: take
/// the reload path (not applicable, or the resource has no runtime API).
async fn runtime_apply(
    slot: &mut Slot,
    commands: &dyn Commands,
    metrics: &Metrics,
    modes: Modes,
    batch_start: Option<Instant>,
) -> Option<(Outcome, Option<Committed>)> {
    if modes.noop || modes.no_reload || slot.res.reload_cmd.is_none() {
        return None;
    }
    let rt = slot.runtime.as_mut()?;
    let name = slot.res.name.clone();
    if slot.reload_pending {
        // The running HAProxy may not have loaded the file yet: only a reload makes it current.
        metrics.runtime_fallback(&name, "reload_pending");
        debug!(resource = %name, "a reload is pending; not using the runtime API");
        return None;
    }
    match rt.attempt(commands, &slot.res, &slot.buf, metrics).await {
        Attempt::Skip { reason, detail } => {
            metrics.runtime_fallback(&name, reason);
            if reason == "unreachable" {
                debug!(resource = %name, detail, "runtime API backing off; reloading");
            } else {
                info!(resource = %name, reason, detail, "this change needs a reload");
            }
            None
        }
        Attempt::Unchanged => Some((Outcome::Unchanged, None)),
        Attempt::ReloadCurrent { reason, detail } => {
            metrics.runtime_fallback(&name, reason);
            warn!(resource = %name, reason, error = %detail, "the running HAProxy differs from the destination and the runtime API cannot fix it; reloading the destination");
            slot.reload_pending = true;
            create_reload_marker(&slot.res.dest);
            Some((Outcome::Unchanged, None))
        }
        Attempt::Staged {
            staged,
            current,
            result: Ok(report),
            applied_at,
        } => Some(match apply::commit(&slot.res, staged, current) {
            Ok(_) => {
                metrics
                    .runtime_applies
                    .get_or_create(&metrics::resource(&name))
                    .inc();
                (
                    Outcome::Applied {
                        summary: report.to_string(),
                        servers_ms: batch_start
                            .map(|b| applied_at.saturating_duration_since(b).as_millis() as u64),
                    },
                    None,
                )
            }
            // The running servers are ahead of the file; the retry writes it (and finds
            // nothing left to apply).
            Err(error) => (Outcome::WriteFailed { error }, None),
        }),
        Attempt::Staged {
            staged,
            current,
            result: Err(e),
            ..
        } => {
            metrics.runtime_fallback(&name, e.reason());
            // (An unreachable socket was logged once, naming it, by the runtime module.)
            let unreachable = matches!(e, proxyctl::SyncError::Unreachable(_));
            if rt.first_fallback(e.reason()) && !unreachable {
                warn!(resource = %name, reason = e.reason(), error = %e, "the runtime API could not apply this change; reloading (the same reason again is logged at debug)");
            } else {
                debug!(resource = %name, reason = e.reason(), error = %e, "the runtime API could not apply this change; reloading");
            }
            create_reload_marker(&slot.res.dest);
            Some(match apply::commit(&slot.res, staged, current) {
                Ok(c) => (Outcome::Written, Some(c)),
                Err(error) => {
                    remove_reload_marker(&slot.res.dest);
                    (Outcome::WriteFailed { error }, None)
                }
            })
        }
        Attempt::CheckFailed { output, reverted } => {
            if !reverted {
                slot.reload_pending = true;
                create_reload_marker(&slot.res.dest);
            }
            Some((Outcome::CheckFailed { output }, None))
        }
        Attempt::WriteFailed { error, reverted } => {
            if !reverted {
                slot.reload_pending = true;
                create_reload_marker(&slot.res.dest);
            }
            Some((Outcome::WriteFailed { error }, None))
        }
    }
}

/// `.<dest name>.reload-pending` beside the destination: exists from before a new file is
/// renamed into place until its `reload_cmd` succeeded, so that a run killed in between is
/// followed by a reload (the file then equals the render, which alone would reload nothing).
fn reload_marker(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.reload-pending"))
}

/// `.<dest name>.endpoints` beside the destination: how many endpoints its last applied render
/// had, for the drop guard of the next run.
fn applied_endpoints_file(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.endpoints"))
}

fn load_applied_endpoints(dest: &Path) -> Option<usize> {
    if !dest.exists() {
        return None;
    }
    let text = std::fs::read_to_string(applied_endpoints_file(dest)).ok()?;
    text.trim().parse().ok()
}

fn store_applied_endpoints(dest: &Path, n: usize) {
    let path = applied_endpoints_file(dest);
    if let Err(e) = apply::write_own(&path, format!("{n}\n").as_bytes()) {
        debug!(path = %path.display(), error = %e, "cannot store the applied endpoint count");
    }
}

fn create_reload_marker(dest: &Path) {
    // Made durable by the directory fsync that follows the rename of the new file.
    if let Err(e) = std::fs::File::create(reload_marker(dest)) {
        warn!(dest = %dest.display(), error = %e, "cannot create the reload marker");
    }
}

fn remove_reload_marker(dest: &Path) {
    match std::fs::remove_file(reload_marker(dest)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(dest = %dest.display(), error = %e, "cannot remove the reload marker"),
    }
}

/// `keys`' root and every key of `resources` outside it, reduced to their cover (see
/// [`flotilla_registry::cache::cover`]).
fn watch_prefixes<'a>(keys: &Keys, resources: impl Iterator<Item = &'a Resource>) -> Vec<String> {
    let mut all = vec![keys.root()];
    all.extend(resources.flat_map(|r| r.keys.iter().cloned()));
    flotilla_registry::cache::cover(all)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The loop on tokio's paused clock: registry updates fed by hand, check and reload commands
/// answered by [`tests::Fake`] (which records them with their virtual time), so every timing of
/// the quiet period, the drop guard's grace and the failure backoff is asserted exactly.
#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use flotilla_registry::Snapshot;
    use tokio::sync::oneshot;

    use super::*;
    use crate::apply::{CommandFailure, CommandFuture};
    use crate::view::tests::{ep_json, keys, node_json};
    use crate::view::update_after;

    /// One `server` line per endpoint, and the configuration key `x`.
    const LIST: &str = "# x={{ getv(key=\"/config/x\", default=\"\") }}\n\
        {% for name, eps in services %}{% for ep in eps %}server {{ name }} {{ ep.addr }}\n{% endfor %}{% endfor %}";

    impl UpdateSource for mpsc::UnboundedReceiver<Update> {
        fn recv(&mut self) -> impl std::future::Future<Output = Option<Update>> + Send {
            mpsc::UnboundedReceiver::recv(self)
        }

        fn try_recv(&mut self) -> Option<Update> {
            mpsc::UnboundedReceiver::try_recv(self).ok()
        }
    }

    /// A command the daemon ran, at its virtual time since the start of the test.
    #[derive(Debug, Clone)]
    struct Call {
        at: Duration,
        /// `check <resource>` (the staged path cut off) or the reload command.
        cmd: String,
        /// For a check: the `server` lines of the staged file it was given.
        servers: Option<usize>,
    }

    /// Answers commands at once (after `check_takes` of virtual time for a check). A check
    /// fails while `fail_checks` is set or for a file with a `server bad` line; a reload fails
    /// while `fail_reloads` is set.
    struct Fake {
        t0: Instant,
        calls: Mutex<Vec<Call>>,
        fail_checks: AtomicBool,
        fail_reloads: AtomicBool,
        check_takes: Mutex<Duration>,
    }

    impl Commands for Fake {
        fn run<'a>(&'a self, cmd: &'a str, _timeout: Duration) -> CommandFuture<'a> {
            Box::pin(async move {
                let at = self.t0.elapsed();
                let Some((name, path)) = cmd.split_once(" '") else {
                    self.calls.lock().unwrap().push(Call {
                        at,
                        cmd: cmd.to_string(),
                        servers: None,
                    });
                    return if self.fail_reloads.load(Ordering::SeqCst) {
                        Err(CommandFailure(format!("`{cmd}` exit status: 1")))
                    } else {
                        Ok(String::new())
                    };
                };
                let text = std::fs::read_to_string(path.trim_end_matches('\'')).unwrap();
                self.calls.lock().unwrap().push(Call {
                    at,
                    cmd: name.to_string(),
                    servers: Some(text.lines().filter(|l| l.starts_with("server ")).count()),
                });
                let takes = *self.check_takes.lock().unwrap();
                if !takes.is_zero() {
                    tokio::time::sleep(takes).await;
                }
                if self.fail_checks.load(Ordering::SeqCst) || text.contains("server bad ") {
                    Err(CommandFailure(format!(
                        "`{name}` exit status: 1: [ALERT] config rejected"
                    )))
                } else {
                    Ok(String::new())
                }
            })
        }
    }

    /// A confdir with resources rendering [`LIST`] into `out/<name>`, and a registry fed by
    /// hand to a [`Daemon`] running in a task.
    struct Rig {
        dir: tempfile::TempDir,
        fake: Arc<Fake>,
        metrics: Arc<Metrics>,
        health: Arc<Mutex<Health>>,
        feed: Option<mpsc::UnboundedSender<Update>>,
        status: Option<watch::Sender<CacheStatus>>,
        /// Template and conf.d file events.
        files: Option<mpsc::Sender<()>>,
        stop: Option<oneshot::Sender<()>>,
        task: Option<tokio::task::JoinHandle<RunEnd>>,
        kvs: BTreeMap<String, Vec<u8>>,
        prev: Snapshot,
        rev: i64,
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ep(service: &str, n: u32) -> (String, Vec<u8>) {
        ep_json("node-a", service, n, "10.0.0.1")
    }

    fn watching() -> CacheStatus {
        CacheStatus {
            state: CacheState::Watching,
            lists: 1,
            compactions: 0,
            faults: 0,
        }
    }

    impl Rig {
        /// Resources `(name, extra TOML lines)`, each with `check_cmd = "check <name> {{src}}"`
        /// and keys `/endpoints/` and `/config/` under `/flotilla`.
        fn new(resources: &[(&str, &str)]) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("conf.d")).unwrap();
            std::fs::create_dir_all(dir.path().join("templates")).unwrap();
            std::fs::create_dir_all(dir.path().join("out")).unwrap();
            std::fs::write(dir.path().join("templates/list.tmpl"), LIST).unwrap();
            for (name, extra) in resources {
                std::fs::write(
                    dir.path().join(format!("conf.d/{name}.toml")),
                    format!(
                        "[template]\nsrc = \"list.tmpl\"\ndest = \"{}\"\nprefix = \"/flotilla\"\n\
                         keys = [\"/endpoints/\", \"/config/\"]\n\
                         check_cmd = \"check {name} {{{{src}}}}\"\n{extra}\n",
                        dir.path().join("out").join(name).display()
                    ),
                )
                .unwrap();
            }
            let (metrics, _) = Metrics::new();
            let mut kvs = BTreeMap::new();
            let (k, v) = node_json("node-a");
            kvs.insert(k, v);
            Rig {
                dir,
                fake: Arc::new(Fake {
                    t0: Instant::now(),
                    calls: Mutex::default(),
                    fail_checks: AtomicBool::new(false),
                    fail_reloads: AtomicBool::new(false),
                    check_takes: Mutex::default(),
                }),
                metrics,
                health: Arc::default(),
                feed: None,
                status: None,
                files: None,
                stop: None,
                task: None,
                kvs,
                prev: Snapshot::default(),
                rev: 1,
            }
        }

        fn out(&self, name: &str) -> PathBuf {
            self.dir.path().join("out").join(name)
        }

        /// Starts the daemon at the current virtual time with the registry holding the node
        /// record and `eps` (the first complete view).
        fn start(&mut self, modes: Modes, eps: &[(&str, u32)]) {
            for (s, n) in eps {
                let (k, v) = ep(s, *n);
                self.kvs.insert(k, v);
            }
            let admit = AdmitArgs {
                allow_loopback: true,
                ..AdmitArgs::default()
            };
            let mut daemon = Daemon::new(
                self.dir.path(),
                &keys(),
                admit,
                modes,
                self.metrics.clone(),
                self.health.clone(),
            )
            .unwrap();
            daemon.commands = self.fake.clone();
            let (feed, updates) = mpsc::unbounded_channel();
            let (status_tx, status) = watch::channel(watching());
            let (files_tx, files) = mpsc::channel(16);
            let (stop, stopped) = oneshot::channel::<()>();
            let hangups = Hangups::install().unwrap();
            self.task = Some(tokio::spawn(async move {
                daemon
                    .run(updates, status, files, hangups, async {
                        let _ = stopped.await;
                    })
                    .await
            }));
            self.feed = Some(feed);
            self.status = Some(status_tx);
            self.files = Some(files_tx);
            self.stop = Some(stop);
            self.send();
        }

        fn send(&mut self) {
            self.rev += 1;
            let u = update_after(&self.prev, &keys(), self.rev, self.kvs.clone());
            self.prev = u.snapshot.clone();
            let _ = self.feed.as_ref().unwrap().send(u);
        }

        /// One transaction: puts `add`, deletes `remove`.
        fn txn(&mut self, add: &[(&str, u32)], remove: &[(&str, u32)]) {
            for (s, n) in add {
                let (k, v) = ep(s, *n);
                self.kvs.insert(k, v);
            }
            for (s, n) in remove {
                self.kvs.remove(&ep(s, *n).0);
            }
            self.send();
        }

        fn put_config(&mut self, name: &str, value: &str) {
            self.kvs.insert(
                format!("/flotilla/config/{name}"),
                value.as_bytes().to_vec(),
            );
            self.send();
        }

        /// Lets the daemon run until `t` after the start of the test.
        async fn until(&self, t: Duration) {
            tokio::time::sleep_until(self.fake.t0 + t).await;
        }

        fn calls(&self) -> Vec<Call> {
            self.fake.calls.lock().unwrap().clone()
        }

        /// Every command so far: `"<ms>ms check <name> (<n> servers)"`, `"<ms>ms <reload>"`.
        fn log(&self) -> Vec<String> {
            self.calls()
                .iter()
                .map(|c| match c.servers {
                    Some(n) => format!("{}ms {} ({n} servers)", c.at.as_millis(), c.cmd),
                    None => format!("{}ms {}", c.at.as_millis(), c.cmd),
                })
                .collect()
        }

        fn servers(&self, name: &str) -> usize {
            std::fs::read_to_string(self.out(name))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("server "))
                .count()
        }

        fn renders(&self, name: &str) -> u64 {
            self.metrics
                .renders
                .get_or_create(&metrics::resource(name))
                .get()
        }

        fn held(&self, name: &str) -> u64 {
            self.metrics
                .held
                .get_or_create(&metrics::resource(name))
                .get()
        }

        fn healthz(&self) -> (bool, String) {
            self.health.lock().unwrap().report()
        }

        async fn stop(mut self) -> RunEnd {
            let _ = self.stop.take().unwrap().send(());
            self.task.take().unwrap().await.unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_within_the_quiet_period_gives_one_render_and_one_reload_when_it_ends() {
        let mut rig = Rig::new(&[("a", "wait = \"50ms:1s\"\nreload_cmd = \"reload a\"")]);
        rig.start(Modes::default(), &[("web", 0)]);
        // Ten puts 10 ms apart, the first 10 ms after the initial apply: one batch, applied
        // 50 ms after the last one (190 ms).
        for i in 1..=10 {
            rig.until(ms(10 * i as u64)).await;
            rig.txn(&[("web", i)], &[]);
        }
        // A lone change after more than 50 ms of quiet is applied at once (leading edge).
        rig.until(ms(400)).await;
        rig.txn(&[("web", 11)], &[]);
        rig.until(ms(1000)).await;
        assert_eq!(
            rig.log(),
            [
                "0ms check a (1 servers)",
                "0ms reload a",
                "150ms check a (11 servers)",
                "150ms reload a",
                "400ms check a (12 servers)",
                "400ms reload a",
            ]
        );
        assert_eq!(rig.renders("a"), 3);
        assert_eq!(rig.servers("a"), 12);
        assert_eq!(rig.stop().await, RunEnd::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_spaced_wider_than_wait_min_are_applied_one_each_at_once() {
        let mut rig = Rig::new(&[("a", "wait = \"50ms:1s\"\nreload_cmd = \"reload a\"")]);
        rig.start(Modes::default(), &[("web", 0)]);
        for i in 1..=3 {
            rig.until(ms(100 * i as u64)).await;
            rig.txn(&[("web", i)], &[]);
        }
        rig.until(ms(1000)).await;
        assert_eq!(
            rig.log(),
            [
                "0ms check a (1 servers)",
                "0ms reload a",
                "100ms check a (2 servers)",
                "100ms reload a",
                "200ms check a (3 servers)",
                "200ms reload a",
                "300ms check a (4 servers)",
                "300ms reload a",
            ]
        );
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn under_steady_churn_a_batch_is_applied_wait_max_after_its_first_change() {
        let mut rig = Rig::new(&[("a", "wait = \"50ms:210ms\"\nreload_cmd = \"reload a\"")]);
        rig.start(Modes::default(), &[("web", 0)]);
        // A put every 20 ms from 5 ms to 585 ms: never 50 ms of quiet.
        for i in 0..30u32 {
            rig.until(ms(5 + 20 * i as u64)).await;
            rig.txn(&[("web", i + 1)], &[]);
        }
        rig.until(ms(2000)).await;
        let reloads: Vec<String> = rig
            .log()
            .into_iter()
            .filter(|l| l.ends_with("reload a"))
            .collect();
        // Batches start at 5, 225 and 445 ms (the first put after each flush) and end 210 ms
        // later; the last one 50 ms after the last put (635 ms), before its 210 ms are up.
        assert_eq!(
            reloads,
            [
                "0ms reload a",
                "215ms reload a",
                "435ms reload a",
                "635ms reload a"
            ]
        );
        assert_eq!(rig.servers("a"), 31);
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_quiet_period_counts_from_the_end_of_a_slow_flush() {
        let mut rig = Rig::new(&[("a", "wait = \"20ms:1s\"\nreload_cmd = \"reload a\"")]);
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(ms(100)).await;
        // Each check takes 30 ms, longer than wait.min.
        *rig.fake.check_takes.lock().unwrap() = ms(30);
        rig.txn(&[("web", 1)], &[]);
        // Arrives while the flush of 100 ms is checking; seen when it ends (130 ms): not a
        // leading edge (no quiet since the flush), so applied 20 ms later.
        rig.until(ms(110)).await;
        rig.txn(&[("web", 2)], &[]);
        rig.until(ms(1000)).await;
        assert_eq!(
            rig.log(),
            [
                "0ms check a (1 servers)",
                "0ms reload a",
                "100ms check a (2 servers)",
                "130ms reload a",
                "150ms check a (3 servers)",
                "180ms reload a",
            ]
        );
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn resources_sharing_a_reload_command_touched_in_one_transaction_reload_once() {
        // `a` applies every change at once; `b` waits for 50 ms of quiet; `c` has its own
        // reload command.
        let mut rig = Rig::new(&[
            ("a", "reload_cmd = \"reload shared\""),
            ("b", "wait = \"50ms:1s\"\nreload_cmd = \"reload shared\""),
            ("c", "wait = \"50ms:1s\"\nreload_cmd = \"reload c\""),
        ]);
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(ms(20)).await;
        rig.txn(&[("web", 1)], &[]);
        rig.until(ms(1000)).await;
        assert_eq!(
            rig.log(),
            [
                "0ms check a (1 servers)",
                "0ms check b (1 servers)",
                "0ms check c (1 servers)",
                "0ms reload c",
                "0ms reload shared",
                // `b` is inside its quiet period but joins `a`'s batch: one reload.
                "20ms check a (2 servers)",
                "20ms check b (2 servers)",
                "20ms reload shared",
                // `c` does not share it and waits for its own quiet period.
                "70ms check c (2 servers)",
                "70ms reload c",
            ]
        );
        assert_eq!(
            rig.metrics
                .reloads
                .get_or_create(&vec![("result".into(), "ok".into())])
                .get(),
            4
        );
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_resource_with_a_pending_change_joins_the_batch_of_a_due_one() {
        let mut rig = Rig::new(&[
            ("a", "wait = \"30ms:1s\"\nreload_cmd = \"reload shared\""),
            ("b", "wait = \"50ms:1s\"\nreload_cmd = \"reload shared\""),
        ]);
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(ms(10)).await;
        rig.txn(&[("web", 1)], &[]);
        rig.until(ms(1000)).await;
        // `a` is due at 40 ms, `b` would be at 60 ms: both at 40 ms, one reload.
        assert_eq!(
            rig.log(),
            [
                "0ms check a (1 servers)",
                "0ms check b (1 servers)",
                "0ms reload shared",
                "40ms check a (2 servers)",
                "40ms check b (2 servers)",
                "40ms reload shared",
            ]
        );
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_drop_guard_holds_a_large_drop_for_the_grace_period_then_applies_it() {
        let mut rig = Rig::new(&[(
            "a",
            "max_drop = \"50%\"\ndrop_grace = \"30s\"\nreload_cmd = \"reload a\"",
        )]);
        rig.start(
            Modes::default(),
            &[("web", 0), ("web", 1), ("web", 2), ("web", 3)],
        );
        rig.until(Duration::from_secs(1)).await;
        // 3 of 4 gone: more than 50 %.
        rig.txn(&[], &[("web", 1), ("web", 2), ("web", 3)]);
        rig.until(Duration::from_secs(2)).await;
        assert_eq!(rig.log(), ["0ms check a (4 servers)", "0ms reload a"]);
        assert_eq!(rig.servers("a"), 4, "the old file stays");
        assert_eq!(rig.held("a"), 1);
        let (healthy, body) = rig.healthz();
        assert!(
            body.contains("resource a: held by the drop guard (1 of 4 endpoints) for 0s"),
            "{body}"
        );
        assert!(healthy, "a hold is not a failure: {body}");
        // Another drop while held: still held, the grace still counts from the first.
        rig.until(Duration::from_secs(10)).await;
        rig.txn(&[], &[("web", 0)]);
        rig.until(ms(10_500)).await;
        assert_eq!(rig.calls().len(), 2);
        assert_eq!(rig.held("a"), 2);
        assert!(
            rig.healthz().1.contains("(0 of 4 endpoints) for 9s"),
            "{}",
            rig.healthz().1
        );
        rig.until(Duration::from_secs(40)).await;
        assert_eq!(
            rig.log(),
            [
                "0ms check a (4 servers)",
                "0ms reload a",
                "31000ms check a (0 servers)",
                "31000ms reload a",
            ]
        );
        assert_eq!(rig.servers("a"), 0);
        assert!(
            rig.healthz().1.contains("resource a: ok"),
            "{}",
            rig.healthz().1
        );
        // The applied drop is the new baseline.
        assert_eq!(
            std::fs::read_to_string(applied_endpoints_file(&rig.out("a"))).unwrap(),
            "0\n"
        );
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_ends_when_the_endpoints_come_back_and_a_drop_up_to_max_drop_applies_at_once() {
        let mut rig = Rig::new(&[(
            "a",
            "max_drop = \"50%\"\ndrop_grace = \"30s\"\nreload_cmd = \"reload a\"",
        )]);
        rig.start(
            Modes::default(),
            &[("web", 0), ("web", 1), ("web", 2), ("web", 3)],
        );
        rig.until(Duration::from_secs(1)).await;
        rig.txn(&[], &[("web", 1), ("web", 2), ("web", 3)]);
        rig.until(Duration::from_secs(5)).await;
        rig.txn(&[("web", 1), ("web", 2), ("web", 3)], &[]);
        // Back before the grace ended: the render equals the file (nothing to check, write or
        // reload) and the hold is over; nothing happens when the grace would have ended.
        rig.until(Duration::from_secs(40)).await;
        assert_eq!(rig.log(), ["0ms check a (4 servers)", "0ms reload a"]);
        assert!(
            rig.healthz().1.contains("resource a: ok"),
            "{}",
            rig.healthz().1
        );
        // Exactly half: not more than max_drop, applied at once.
        rig.txn(&[], &[("web", 2), ("web", 3)]);
        rig.until(Duration::from_secs(41)).await;
        assert_eq!(
            rig.log(),
            [
                "0ms check a (4 servers)",
                "0ms reload a",
                "40000ms check a (2 servers)",
                "40000ms reload a",
            ]
        );
        assert_eq!(rig.held("a"), 1);
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_an_earlier_run_applied_guards_the_first_render_unless_allow_drop() {
        for allow_drop in [false, true] {
            let mut rig = Rig::new(&[("a", "max_drop = \"50%\"\nreload_cmd = \"reload a\"")]);
            // An earlier run applied 10 endpoints; 2 are left.
            std::fs::write(rig.out("a"), "server web 10.0.0.1:8000\n".repeat(10)).unwrap();
            store_applied_endpoints(&rig.out("a"), 10);
            rig.start(
                Modes {
                    allow_drop,
                    ..Modes::default()
                },
                &[("web", 0), ("web", 1)],
            );
            rig.until(ms(100)).await;
            if allow_drop {
                assert_eq!(rig.log(), ["0ms check a (2 servers)", "0ms reload a"]);
                assert_eq!(rig.servers("a"), 2);
            } else {
                assert!(rig.log().is_empty(), "{:?}", rig.log());
                assert_eq!(rig.servers("a"), 10);
                assert!(
                    rig.healthz().1.contains("(2 of 10 endpoints)"),
                    "{}",
                    rig.healthz().1
                );
            }
            rig.stop().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn onetime_exits_held_and_keeps_the_file_when_the_drop_guard_holds() {
        let mut rig = Rig::new(&[("a", "reload_cmd = \"reload a\"")]);
        // No record of the endpoints: the guard compares sizes (a 3 KB file, a 25-byte render).
        std::fs::write(rig.out("a"), "server web 10.0.0.1:8000\n".repeat(120)).unwrap();
        rig.start(
            Modes {
                onetime: true,
                ..Modes::default()
            },
            &[("web", 0)],
        );
        let end = rig.task.take().unwrap().await.unwrap();
        assert_eq!(end, RunEnd::Held);
        assert!(rig.log().is_empty(), "{:?}", rig.log());
        assert_eq!(rig.servers("a"), 120);
        assert_eq!(rig.held("a"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_check_keeps_the_file_reloads_nothing_and_is_retried_with_backoff() {
        let mut rig = Rig::new(&[("a", "reload_cmd = \"reload a\"")]);
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(Duration::from_secs(1)).await;
        // A configuration change the check rejects (leaving endpoints out cannot fix it).
        rig.fake.fail_checks.store(true, Ordering::SeqCst);
        rig.put_config("x", "1");
        rig.until(ms(1100)).await;
        let log = rig.log();
        assert!(log.len() > 2, "{log:?}");
        assert!(
            log[2..].iter().all(|l| l.starts_with("1000ms check a")),
            "{log:?}"
        );
        let text = std::fs::read_to_string(rig.out("a")).unwrap();
        assert!(
            text.starts_with("# x=\n"),
            "the destination is untouched: {text}"
        );
        let (healthy, body) = rig.healthz();
        assert!(!healthy);
        assert!(body.contains("resource a: failing (check)"), "{body}");
        // An endpoint change does not cut the backoff short (the first retry comes 0.5-1 s
        // after the failure)...
        let before = rig.calls().len();
        rig.txn(&[("web", 1)], &[]);
        rig.until(ms(1499)).await;
        assert_eq!(rig.calls().len(), before, "{:?}", rig.log());
        rig.until(ms(2001)).await;
        let calls = rig.calls();
        assert!(calls.len() > before, "{:?}", rig.log());
        let retry = calls[before].at;
        assert!(
            (ms(1500)..=ms(2000)).contains(&retry),
            "retried at {retry:?}"
        );
        assert!(calls[before..]
            .iter()
            .all(|c| c.at == retry && c.cmd == "check a"));
        // ... a configuration change does: the fix may be in it. (The next retry would come
        // at least 1 s after the last.)
        rig.until(ms(2100)).await;
        let before = rig.calls().len();
        rig.fake.fail_checks.store(false, Ordering::SeqCst);
        rig.put_config("x", "2");
        rig.until(ms(2200)).await;
        assert_eq!(
            rig.log()[before..],
            ["2100ms check a (2 servers)", "2100ms reload a"]
        );
        let text = std::fs::read_to_string(rig.out("a")).unwrap();
        assert!(text.starts_with("# x=2\n"), "{text}");
        assert!(rig.healthz().0, "{}", rig.healthz().1);
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_reload_restores_the_files_of_its_group_and_reloads_them_again() {
        let mut rig = Rig::new(&[
            ("a", "reload_cmd = \"reload shared\""),
            ("b", "reload_cmd = \"reload shared\""),
        ]);
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(Duration::from_secs(1)).await;
        rig.fake.fail_reloads.store(true, Ordering::SeqCst);
        rig.txn(&[("web", 1)], &[]);
        rig.until(ms(1100)).await;
        assert_eq!(
            rig.log()[3..],
            [
                "1000ms check a (2 servers)",
                "1000ms check b (2 servers)",
                "1000ms reload shared",
                "1000ms reload shared",
            ]
        );
        assert_eq!((rig.servers("a"), rig.servers("b")), (1, 1), "rolled back");
        assert!(rig.healthz().1.contains("resource b: failing (reload)"));
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_the_check_fails_with_is_left_out_and_the_rest_applied() {
        let mut rig = Rig::new(&[("a", "reload_cmd = \"reload a\"")]);
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(Duration::from_secs(1)).await;
        rig.txn(&[("web", 1), ("bad", 2)], &[]);
        rig.until(ms(1100)).await;
        assert_eq!(
            rig.log(),
            [
                "0ms check a (1 servers)",
                "0ms reload a",
                // The render with `bad` fails; without both new endpoints it passes; the
                // halves: both back fails, `bad` alone back fails, `web` 1 alone back passes;
                // the render without `bad` is written.
                "1000ms check a (3 servers)",
                "1000ms check a (1 servers)",
                "1000ms check a (3 servers)",
                "1000ms check a (2 servers)",
                "1000ms check a (2 servers)",
                "1000ms check a (2 servers)",
                "1000ms reload a",
            ]
        );
        assert_eq!(rig.servers("a"), 2);
        assert_eq!(
            rig.metrics
                .quarantined
                .get_or_create(&metrics::resource("a"))
                .get(),
            1
        );
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_fails_for_every_file_fails_the_resource_and_leaves_nothing_out() {
        let mut rig = Rig::new(&[("a", "reload_cmd = \"reload a\"")]);
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(Duration::from_secs(1)).await;
        // The check breaks (a certificate it needs went missing): it fails for the current
        // file too, so the new endpoint is not what it fails with.
        rig.fake.fail_checks.store(true, Ordering::SeqCst);
        rig.txn(&[("web", 1)], &[]);
        rig.until(ms(1100)).await;
        let (healthy, body) = rig.healthz();
        assert!(!healthy, "{body}");
        assert!(body.contains("resource a: failing (check)"), "{body}");
        assert_eq!(
            rig.metrics
                .quarantined
                .get_or_create(&metrics::resource("a"))
                .get(),
            0
        );
        // Once the check works again, the retry applies every endpoint.
        rig.fake.fail_checks.store(false, Ordering::SeqCst);
        rig.until(Duration::from_secs(3)).await;
        assert_eq!(rig.servers("a"), 2);
        assert!(rig.log().last().unwrap().ends_with("reload a"));
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_applied_while_the_view_is_stale() {
        let mut rig = Rig::new(&[("a", "reload_cmd = \"reload a\"")]);
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(Duration::from_secs(1)).await;
        // A change that becomes due while the cache is degraded (etcd unreachable).
        rig.status
            .as_ref()
            .unwrap()
            .send(CacheStatus {
                state: CacheState::Degraded {
                    error: "etcd unreachable".into(),
                },
                ..watching()
            })
            .unwrap();
        rig.until(ms(1001)).await;
        rig.txn(&[("web", 1)], &[]);
        // On the paused clock, a loop that spun on the past due time would never let the
        // clock reach 5 s: this test would hang.
        rig.until(Duration::from_secs(5)).await;
        assert_eq!(rig.calls().len(), 2, "{:?}", rig.log());
        let body = rig.healthz().1;
        assert!(body.contains("registry: stale"), "{body}");
        assert!(
            body.contains("a change waits for a current registry view"),
            "{body}"
        );
        rig.status.as_ref().unwrap().send(watching()).unwrap();
        rig.until(Duration::from_secs(6)).await;
        assert_eq!(
            rig.log()[2..],
            ["5000ms check a (2 servers)", "5000ms reload a"]
        );
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_a_killed_run_did_not_finish_runs_at_the_first_apply_of_a_current_file() {
        let mut rig = Rig::new(&[("a", "reload_cmd = \"reload a\"")]);
        // The file is already what the registry renders, but its reload never ran.
        std::fs::write(rig.out("a"), "# x=\nserver web 10.0.0.1:8000\n").unwrap();
        std::fs::write(reload_marker(&rig.out("a")), "").unwrap();
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(ms(100)).await;
        // Nothing to check or write: only the reload.
        assert_eq!(rig.log(), ["0ms reload a"]);
        assert!(!reload_marker(&rig.out("a")).exists());
        // A current file without the marker reloads nothing.
        rig.put_config("unused", "1");
        rig.until(ms(200)).await;
        assert_eq!(rig.log(), ["0ms reload a"]);
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_resource_in_failure_backoff_does_not_join_its_siblings_batch() {
        let mut rig = Rig::new(&[]);
        // `a` sees the configuration only and has no check; `b` sees the endpoints only.
        std::fs::write(
            rig.dir.path().join("templates/eps.tmpl"),
            "{% for name, eps in services %}{% for ep in eps %}server {{ name }} {{ ep.addr }}\n{% endfor %}{% endfor %}",
        )
        .unwrap();
        for (name, src, keys, check) in [
            ("a", "list.tmpl", "/config/", ""),
            (
                "b",
                "eps.tmpl",
                "/endpoints/",
                "check_cmd = \"check b {{src}}\"\n",
            ),
        ] {
            std::fs::write(
                rig.dir.path().join(format!("conf.d/{name}.toml")),
                format!(
                    "[template]\nsrc = \"{src}\"\ndest = \"{}\"\nprefix = \"/flotilla\"\n\
                     keys = [\"{keys}\"]\nreload_cmd = \"reload shared\"\n{check}",
                    rig.out(name).display()
                ),
            )
            .unwrap();
        }
        rig.start(Modes::default(), &[("web", 0)]);
        // `b`'s check breaks: it fails for the current file too, so `b` fails as a whole.
        rig.until(Duration::from_secs(1)).await;
        rig.fake.fail_checks.store(true, Ordering::SeqCst);
        rig.txn(&[("web", 1)], &[]);
        rig.until(ms(1100)).await;
        assert!(rig.healthz().1.contains("resource b: failing (check)"));
        rig.fake.fail_checks.store(false, Ordering::SeqCst);
        let before = rig.calls().len();
        // Within `b`'s backoff (0.5-1 s), `a` is due at once: `b` keeps its backoff.
        rig.put_config("x", "1");
        rig.until(ms(1150)).await;
        assert_eq!(rig.log()[before..], ["1100ms reload shared"]);
        // `b`'s retry comes on its own.
        rig.until(Duration::from_secs(3)).await;
        let log = rig.log();
        assert_eq!(log.len(), before + 3, "{log:?}");
        assert!(log[before + 1].ends_with("check b (2 servers)"), "{log:?}");
        assert!(log[before + 2].ends_with("reload shared"), "{log:?}");
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn template_edits_are_read_once_the_file_events_settle() {
        let mut rig = Rig::new(&[("a", "reload_cmd = \"reload a\"")]);
        rig.start(Modes::default(), &[("web", 0)]);
        rig.until(Duration::from_secs(1)).await;
        std::fs::write(
            rig.dir.path().join("templates/list.tmpl"),
            format!("# edited\n{LIST}"),
        )
        .unwrap();
        // An editor's save: three events within 15 ms; read 20 ms after the last.
        for t in [1000, 1010, 1015] {
            rig.until(ms(t)).await;
            rig.files.as_ref().unwrap().try_send(()).unwrap();
        }
        rig.until(ms(1100)).await;
        assert_eq!(
            rig.log()[2..],
            ["1035ms check a (1 servers)", "1035ms reload a"]
        );
        // Events every 10 ms without a pause: read 60 ms after the first.
        std::fs::write(
            rig.dir.path().join("templates/list.tmpl"),
            format!("# edited again\n{LIST}"),
        )
        .unwrap();
        for t in (2000..2200).step_by(10) {
            rig.until(ms(t)).await;
            let _ = rig.files.as_ref().unwrap().try_send(());
        }
        let edits: Vec<String> = rig.log()[4..].to_vec();
        assert_eq!(
            edits.first().map(String::as_str),
            Some("2060ms check a (1 servers)"),
            "{edits:?}"
        );
        rig.stop().await;
    }
}
