//! The reconciler: turns Docker events and full container lists into the desired endpoints of
//! each container, and hands them to the etcd writer (never waiting for etcd).
//!
//! - `start`, `unpause`, `health_status: healthy` → inspect the container, register what it
//!   announces.
//! - `kill` (with a stopping signal), `stop`, `die`, `pause`, `health_status: unhealthy`,
//!   `destroy` → deregister at once, without asking Docker. A container that was killed or
//!   stopped is *draining*: it stays deregistered until it starts again, even though a full list
//!   still shows it running while it shuts down.
//! - After every (re)subscription, every `--resync` and on SIGHUP: list all containers, inspect
//!   them, and replace the whole desired state (the writer then compares with etcd).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use flotilla_registry::backoff::Backoff;
use flotilla_registry::Endpoint;
use futures::StreamExt;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::docker::{DockerApi, DockerError};
use crate::events::{kill_stops, ContainerEvent, Effect, ReaderMsg};
use crate::liveness::{beat_interval, Loop};
use crate::metrics::{ActionLabel, Metrics, SharedStatus};
use crate::spec::{decide_noting, ContainerInfo, Decision, LocalBinding, SpecConfig};

/// What the writer is told.
#[derive(Debug, Clone, PartialEq)]
pub enum WriterMsg {
    /// The endpoints of one container are now exactly these (empty: none).
    Set {
        container: String,
        endpoints: Vec<Endpoint>,
        event_at: Option<Instant>,
    },
    /// A full list: the desired state of every container (absent ones have none). The writer
    /// reconciles against etcd's actual content after it.
    Replace {
        containers: HashMap<String, Vec<Endpoint>>,
    },
}

/// Requests from outside the event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: reconcile now.
    Reconcile,
}

/// How many containers are inspected at once during a full list.
const INSPECT_CONCURRENCY: usize = 8;

pub struct Reconciler<D: DockerApi> {
    api: Arc<D>,
    spec: SpecConfig,
    to_writer: UnboundedSender<WriterMsg>,
    metrics: Metrics,
    status: SharedStatus,
    /// Stop signal per known container (for `kill` events).
    stop_signals: HashMap<String, Option<String>>,
    /// Killed or stopped, still running: kept deregistered until the next start.
    draining: HashSet<String>,
    /// Last warning per container, so each problem is warned about once.
    warned: HashMap<String, String>,
    backlog: VecDeque<ReaderMsg>,
    /// Containers that currently have endpoints (to skip no-op messages).
    registered: HashSet<String>,
    /// Ports left out because they are bound to loopback / link-local only, per container
    /// (logged once each; their count is a gauge).
    local_only: HashMap<String, Vec<LocalBinding>>,
}

/// The longest a full list (list and every inspect) may take before it is abandoned and
/// retried: below [`crate::liveness::STALL`], so a slow engine never looks like a stuck loop.
pub const FULL_LIST_TIMEOUT: Duration = Duration::from_secs(20);

impl<D: DockerApi> Reconciler<D> {
    pub fn new(
        api: Arc<D>,
        spec: SpecConfig,
        to_writer: UnboundedSender<WriterMsg>,
        metrics: Metrics,
        status: SharedStatus,
    ) -> Self {
        Reconciler {
            api,
            spec,
            to_writer,
            metrics,
            status,
            stop_signals: HashMap::new(),
            draining: HashSet::new(),
            warned: HashMap::new(),
            backlog: VecDeque::new(),
            registered: HashSet::new(),
            local_only: HashMap::new(),
        }
    }

    /// Runs until the reader or the writer is gone.
    pub async fn run(
        mut self,
        mut from_reader: UnboundedReceiver<ReaderMsg>,
        mut triggers: UnboundedReceiver<Trigger>,
        resync: Duration,
    ) {
        let mut tick = tokio::time::interval_at(Instant::now() + resync, resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            Duration::from_secs(10),
        );
        // When a full list failed: when to try again.
        let mut retry_at: Option<Instant> = None;
        let mut subscribed = false;
        let mut beat = beat_interval();
        let pulse = self.metrics.pulse.clone();
        loop {
            pulse.round(Loop::Reconciler).await;
            let msg = if let Some(m) = self.backlog.pop_front() {
                Some(m)
            } else {
                let retry = async {
                    match retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    m = from_reader.recv() => match m {
                        Some(m) => Some(m),
                        None => return,
                    },
                    _ = tick.tick() => {
                        debug!("periodic resync");
                        None
                    }
                    t = triggers.recv() => {
                        if t.is_some() {
                            info!("SIGHUP: reconciling now");
                        }
                        None
                    }
                    _ = retry => None,
                    // Idle: come round to say so (liveness.rs), and wait again.
                    _ = beat.tick() => continue,
                }
            };
            match msg {
                Some(ReaderMsg::Subscribed { .. }) => {
                    subscribed = true;
                    self.status.lock().expect("status").docker = Ok(());
                    retry_at = self.relist(&mut from_reader, &mut backoff).await;
                }
                Some(ReaderMsg::Down(e)) => {
                    subscribed = false;
                    self.status.lock().expect("status").docker = Err(e);
                }
                Some(ReaderMsg::Event(ev, at)) => {
                    let handled = self.handle_event(&ev, at).await;
                    if handled.is_err() {
                        retry_at.get_or_insert_with(|| Instant::now() + backoff.next_delay());
                    }
                }
                // A tick, SIGHUP or retry: a full list (once the stream is up; the
                // subscription itself triggers one).
                None if subscribed => {
                    retry_at = self.relist(&mut from_reader, &mut backoff).await;
                }
                None => {}
            }
            if self.to_writer.is_closed() {
                return;
            }
        }
    }

    fn send(&mut self, container: &str, endpoints: Vec<Endpoint>, event_at: Option<Instant>) {
        let had = if endpoints.is_empty() {
            self.registered.remove(container)
        } else {
            self.registered.insert(container.to_owned());
            true
        };
        if had || !endpoints.is_empty() {
            let _ = self.to_writer.send(WriterMsg::Set {
                container: container.to_owned(),
                endpoints,
                event_at,
            });
        }
    }

    /// Handles one event. `Err` when Docker could not be asked (logged here; a full list will
    /// follow).
    pub async fn handle_event(
        &mut self,
        ev: &ContainerEvent,
        at: Instant,
    ) -> Result<(), DockerError> {
        self.metrics
            .events
            .get_or_create(&ActionLabel {
                action: ev.action_label(),
            })
            .inc();
        match ev.effect() {
            Effect::Ignore => Ok(()),
            Effect::Register => {
                self.draining.remove(&ev.id);
                match self.api.inspect(&ev.id).await {
                    Ok(Some(info)) => {
                        let eps = self.endpoints_of(&info);
                        debug!(container = %info.name, action = %ev.action, endpoints = eps.len(), "event");
                        self.send(&ev.id, eps, Some(at));
                        Ok(())
                    }
                    Ok(None) => {
                        self.forget(&ev.id);
                        self.send(&ev.id, Vec::new(), Some(at));
                        Ok(())
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot inspect a container after an event; will list all");
                        Err(e)
                    }
                }
            }
            Effect::KillSignal => {
                let stop = self.stop_signals.get(&ev.id).cloned().flatten();
                if kill_stops(ev.signal(), stop.as_deref()) {
                    self.draining.insert(ev.id.clone());
                    debug!(id = %ev.id, signal = ?ev.signal(), "kill: deregistering while it stops");
                    self.send(&ev.id, Vec::new(), Some(at));
                } else {
                    debug!(id = %ev.id, signal = ?ev.signal(), "kill with a non-stopping signal: unchanged");
                }
                Ok(())
            }
            Effect::Deregister { draining } => {
                if draining {
                    self.draining.insert(ev.id.clone());
                } else if ev.action != "pause" && !ev.action.starts_with("health_status") {
                    // die / destroy / oom: the container is down; a later start registers it.
                    self.draining.remove(&ev.id);
                    if self.local_only.remove(&ev.id).is_some() {
                        self.count_local_only();
                    }
                }
                if ev.action == "destroy" {
                    self.forget(&ev.id);
                }
                self.send(&ev.id, Vec::new(), Some(at));
                Ok(())
            }
        }
    }

    /// Records the ports of `info` left out as host-local; logs each new one once.
    fn note_local_only(&mut self, info: &ContainerInfo, bindings: Vec<LocalBinding>) {
        let known = self
            .local_only
            .get(&info.id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for b in bindings.iter().filter(|b| !known.contains(b)) {
            warn!(container = %info.name, id = %info.short_id(), port = %format!("{}/{}", b.port, b.proto), binding = %b,
                "published port bound to a loopback or link-local address only: not announced (other proxy hosts would route to themselves; --allow-loopback on a single host)");
        }
        if bindings.is_empty() {
            self.local_only.remove(&info.id);
        } else {
            self.local_only.insert(info.id.clone(), bindings);
        }
        self.count_local_only();
    }

    fn count_local_only(&self) {
        let n: usize = self.local_only.values().map(Vec::len).sum();
        self.metrics.local_bindings.set(n as i64);
    }

    fn forget(&mut self, id: &str) {
        self.stop_signals.remove(id);
        self.draining.remove(id);
        if self.local_only.remove(id).is_some() {
            self.count_local_only();
        }
        if self.warned.remove(id).is_some() {
            self.metrics
                .invalid_containers
                .set(self.warned.len() as i64);
        }
    }

    /// The endpoints `info` announces now; warns once about invalid settings.
    fn endpoints_of(&mut self, info: &ContainerInfo) -> Vec<Endpoint> {
        self.stop_signals
            .insert(info.id.clone(), info.stop_signal.clone());
        if self.draining.contains(&info.id) {
            return Vec::new();
        }
        let decided = decide_noting(info, &self.spec).map(|(d, local)| {
            self.note_local_only(info, local);
            d
        });
        match decided {
            Ok(Decision::Register(eps)) => {
                if self.warned.remove(&info.id).is_some() {
                    self.metrics
                        .invalid_containers
                        .set(self.warned.len() as i64);
                }
                eps
            }
            Ok(Decision::Skip(reason)) => {
                debug!(container = %info.name, %reason, "not registered");
                Vec::new()
            }
            Err(e) => {
                let text = e.to_string();
                if self.warned.get(&info.id) != Some(&text) {
                    warn!(container = %e.container, id = %e.short_id, field = %e.field, reason = %e.reason,
                        "container skipped: invalid label or env value; nothing is registered for it");
                    self.warned.insert(info.id.clone(), text);
                    self.metrics
                        .invalid_containers
                        .set(self.warned.len() as i64);
                }
                Vec::new()
            }
        }
    }

    /// Lists and inspects every container and sends the whole desired state. Events that
    /// arrived meanwhile are applied on top (deregistrations first, so a container killed during
    /// the listing is not registered again for a moment).
    /// A full list; when it fails, when to try again (the backoff's next delay).
    async fn relist(
        &mut self,
        from_reader: &mut UnboundedReceiver<ReaderMsg>,
        backoff: &mut Backoff,
    ) -> Option<Instant> {
        let retry_at = self
            .full_list(from_reader)
            .await
            .err()
            .map(|_| Instant::now() + backoff.next_delay());
        if retry_at.is_none() {
            backoff.success();
        }
        retry_at
    }

    async fn full_list(
        &mut self,
        from_reader: &mut UnboundedReceiver<ReaderMsg>,
    ) -> Result<(), DockerError> {
        let started = Instant::now();
        let pulse = self.metrics.pulse.clone();
        let ids = match self.api.list().await {
            Ok(ids) => ids,
            Err(e) => {
                warn!(error = %e, "cannot list containers; retrying");
                return Err(e);
            }
        };
        let api = self.api.clone();
        // Each inspect is bounded (DOCKER_TIMEOUT) and says the loop is alive; the whole
        // list is bounded too, so a slow engine fails the list (retried) rather than holding
        // the reconciler past the watchdog's limit.
        let inspects = futures::stream::iter(ids)
            .map(|id| {
                let api = api.clone();
                async move { api.inspect(&id).await }
            })
            .buffer_unordered(INSPECT_CONCURRENCY)
            .inspect(|_| pulse.beat(Loop::Reconciler))
            .collect::<Vec<Result<Option<ContainerInfo>, DockerError>>>();
        let results = match tokio::time::timeout(FULL_LIST_TIMEOUT, inspects).await {
            Ok(r) => r,
            Err(_) => {
                let e = DockerError::Timeout {
                    what: "inspecting every container".into(),
                    after: FULL_LIST_TIMEOUT,
                };
                warn!(error = %e, "retrying the full list");
                return Err(e);
            }
        };
        let mut infos = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(Some(info)) => infos.push(info),
                Ok(None) => {} // gone between list and inspect
                Err(e) => {
                    warn!(error = %e, "cannot inspect containers; retrying the full list");
                    return Err(e);
                }
            }
        }
        // Events that came in while listing: deregistrations are applied to the list result.
        while let Ok(m) = from_reader.try_recv() {
            self.backlog.push_back(m);
        }
        let mut late_deregister: HashSet<String> = HashSet::new();
        for m in &self.backlog {
            if let ReaderMsg::Event(ev, _) = m {
                match ev.effect() {
                    Effect::Deregister { .. } => {
                        late_deregister.insert(ev.id.clone());
                    }
                    Effect::KillSignal => {
                        let stop = infos
                            .iter()
                            .find(|i| i.id == ev.id)
                            .and_then(|i| i.stop_signal.clone());
                        if kill_stops(ev.signal(), stop.as_deref()) {
                            late_deregister.insert(ev.id.clone());
                        }
                    }
                    _ => {}
                }
            }
        }
        let listed: HashSet<String> = infos.iter().map(|i| i.id.clone()).collect();
        // Draining containers that are no longer running have finished draining.
        self.draining
            .retain(|id| infos.iter().any(|i| &i.id == id && i.running && !i.paused));
        self.stop_signals.retain(|id, _| listed.contains(id));
        self.local_only.retain(|id, _| listed.contains(id));
        self.count_local_only();
        let before = self.warned.len();
        self.warned.retain(|id, _| listed.contains(id));
        if before != self.warned.len() {
            self.metrics
                .invalid_containers
                .set(self.warned.len() as i64);
        }
        let mut containers = HashMap::new();
        for info in &infos {
            let eps = self.endpoints_of(info);
            if !eps.is_empty() && !late_deregister.contains(&info.id) {
                containers.insert(info.id.clone(), eps);
            }
        }
        let count: usize = containers.values().map(Vec::len).sum();
        self.registered = containers.keys().cloned().collect();
        debug!(
            containers = infos.len(),
            endpoints = count,
            took_ms = started.elapsed().as_millis() as u64,
            "full list"
        );
        let _ = self.to_writer.send(WriterMsg::Replace { containers });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Status;
    use flotilla_registry::{Keys, Proto};
    use prometheus_client::registry::Registry;
    use std::future::Future;
    use std::sync::Mutex;
    use tokio::sync::mpsc;

    /// In-memory Docker: containers by id; `kill` events do not change the state (the
    /// container keeps running while it drains), as with the real engine.
    #[derive(Default)]
    struct FakeDocker {
        containers: Mutex<HashMap<String, ContainerInfo>>,
        fail: Mutex<bool>,
    }

    impl DockerApi for FakeDocker {
        fn list(&self) -> impl Future<Output = Result<Vec<String>, DockerError>> + Send {
            let r = if *self.fail.lock().unwrap() {
                Err(DockerError::Unreachable {
                    what: "fake".into(),
                    detail: "engine away".into(),
                })
            } else {
                let mut ids: Vec<String> =
                    self.containers.lock().unwrap().keys().cloned().collect();
                ids.sort();
                Ok(ids)
            };
            async move { r }
        }
        fn inspect(
            &self,
            id: &str,
        ) -> impl Future<Output = Result<Option<ContainerInfo>, DockerError>> + Send {
            let r = if *self.fail.lock().unwrap() {
                Err(DockerError::Unreachable {
                    what: "fake".into(),
                    detail: "engine away".into(),
                })
            } else {
                Ok(self.containers.lock().unwrap().get(id).cloned())
            };
            async move { r }
        }
    }

    fn container(n: u8) -> ContainerInfo {
        let id = format!("{:02x}", n).repeat(32);
        ContainerInfo {
            id,
            name: format!("c{n}"),
            image: "web:1".into(),
            running: true,
            network_mode: "default".into(),
            ports: vec![crate::spec::PortBindings {
                port: 80,
                proto: Proto::Tcp,
                bindings: vec![("0.0.0.0".into(), 30000 + n as u16)],
            }],
            ..Default::default()
        }
    }

    fn ev(c: &ContainerInfo, action: &str, signal: Option<&str>) -> ContainerEvent {
        ContainerEvent {
            id: c.id.clone(),
            action: action.into(),
            time_nano: 1,
            attributes: signal
                .map(|s| [("signal".to_owned(), s.to_owned())].into())
                .unwrap_or_default(),
        }
    }

    struct Fixture {
        docker: Arc<FakeDocker>,
        rec: Reconciler<FakeDocker>,
        rx: mpsc::UnboundedReceiver<WriterMsg>,
        reader_rx: mpsc::UnboundedReceiver<ReaderMsg>,
    }

    fn fixture() -> Fixture {
        let docker = Arc::new(FakeDocker::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (_reader_tx, reader_rx) = mpsc::unbounded_channel();
        let spec = SpecConfig {
            node: "n1".into(),
            advertise_ip: "10.0.0.1".parse().unwrap(),
            internal: false,
            explicit: false,
            allow_loopback: false,
            keys: Keys::new("/flotilla").unwrap(),
        };
        let metrics = Metrics::new(&mut Registry::default());
        let rec = Reconciler::new(
            docker.clone(),
            spec,
            tx,
            metrics,
            Arc::new(Mutex::new(Status::default())),
        );
        Fixture {
            docker,
            rec,
            rx,
            reader_rx,
        }
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<WriterMsg>) -> Vec<WriterMsg> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    fn set_of(msgs: &[WriterMsg]) -> Vec<(String, usize)> {
        msgs.iter()
            .map(|m| match m {
                WriterMsg::Set {
                    container,
                    endpoints,
                    ..
                } => (container[..4].to_owned(), endpoints.len()),
                WriterMsg::Replace { containers } => ("all".to_owned(), containers.len()),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_killed_container_stays_deregistered_while_it_drains() {
        let mut f = fixture();
        let c = container(1);
        f.docker
            .containers
            .lock()
            .unwrap()
            .insert(c.id.clone(), c.clone());
        let now = Instant::now();
        f.rec
            .handle_event(&ev(&c, "start", None), now)
            .await
            .unwrap();
        f.rec
            .handle_event(&ev(&c, "kill", Some("15")), now)
            .await
            .unwrap();
        assert_eq!(
            set_of(&drain(&mut f.rx)),
            vec![("0101".into(), 1), ("0101".into(), 0)]
        );
        // A resync while it drains (still running) must not register it again.
        f.rec.full_list(&mut f.reader_rx).await.unwrap();
        assert_eq!(set_of(&drain(&mut f.rx)), vec![("all".into(), 0)]);
        // It exits and starts again: registered.
        f.rec.handle_event(&ev(&c, "die", None), now).await.unwrap();
        f.rec
            .handle_event(&ev(&c, "start", None), now)
            .await
            .unwrap();
        assert_eq!(set_of(&drain(&mut f.rx)), vec![("0101".into(), 1)]);
    }

    #[tokio::test]
    async fn a_reload_signal_does_not_deregister_but_the_stop_signal_does() {
        let mut f = fixture();
        let mut c = container(2);
        c.stop_signal = Some("SIGWINCH".into());
        f.docker
            .containers
            .lock()
            .unwrap()
            .insert(c.id.clone(), c.clone());
        let now = Instant::now();
        f.rec
            .handle_event(&ev(&c, "start", None), now)
            .await
            .unwrap();
        f.rec
            .handle_event(&ev(&c, "kill", Some("1")), now)
            .await
            .unwrap();
        assert_eq!(set_of(&drain(&mut f.rx)), vec![("0202".into(), 1)]);
        f.rec
            .handle_event(&ev(&c, "kill", Some("28")), now)
            .await
            .unwrap();
        assert_eq!(set_of(&drain(&mut f.rx)), vec![("0202".into(), 0)]);
    }

    #[tokio::test]
    async fn pause_and_unpause_and_events_during_a_full_list() {
        let mut f = fixture();
        let (a, b) = (container(3), container(4));
        for c in [&a, &b] {
            f.docker
                .containers
                .lock()
                .unwrap()
                .insert(c.id.clone(), c.clone());
        }
        f.rec.full_list(&mut f.reader_rx).await.unwrap();
        assert_eq!(set_of(&drain(&mut f.rx)), vec![("all".into(), 2)]);
        let now = Instant::now();
        f.rec
            .handle_event(&ev(&a, "pause", None), now)
            .await
            .unwrap();
        f.docker
            .containers
            .lock()
            .unwrap()
            .get_mut(&a.id)
            .unwrap()
            .paused = true;
        f.rec
            .handle_event(&ev(&a, "unpause", None), now)
            .await
            .unwrap();
        // pause deregisters; an unpause while Docker still says paused (a stale inspect)
        // registers nothing…
        assert_eq!(set_of(&drain(&mut f.rx)), vec![("0303".into(), 0)]);
        f.docker
            .containers
            .lock()
            .unwrap()
            .get_mut(&a.id)
            .unwrap()
            .paused = false;
        f.rec
            .handle_event(&ev(&a, "unpause", None), now)
            .await
            .unwrap();
        assert_eq!(set_of(&drain(&mut f.rx)), vec![("0303".into(), 1)]);

        // A kill that arrives while a full list runs is applied to the list's result.
        let (reader_tx, mut reader_rx) = mpsc::unbounded_channel();
        reader_tx
            .send(ReaderMsg::Event(ev(&b, "kill", Some("15")), now))
            .unwrap();
        f.rec.full_list(&mut reader_rx).await.unwrap();
        match &drain(&mut f.rx)[..] {
            [WriterMsg::Replace { containers }] => {
                assert!(containers.contains_key(&a.id));
                assert!(!containers.contains_key(&b.id), "killed during the list");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn invalid_containers_are_skipped_and_an_engine_failure_is_an_error() {
        let mut f = fixture();
        let mut c = container(5);
        c.labels
            .insert("flotilla.tags".into(), "ok,\nserver evil".into());
        f.docker
            .containers
            .lock()
            .unwrap()
            .insert(c.id.clone(), c.clone());
        let now = Instant::now();
        f.rec
            .handle_event(&ev(&c, "start", None), now)
            .await
            .unwrap();
        assert!(drain(&mut f.rx).is_empty(), "nothing written for it");
        assert_eq!(f.rec.warned.len(), 1);
        assert_eq!(f.rec.metrics.invalid_containers.get(), 1);
        *f.docker.fail.lock().unwrap() = true;
        assert!(f
            .rec
            .handle_event(&ev(&c, "start", None), now)
            .await
            .is_err());
        assert!(f.rec.full_list(&mut f.reader_rx).await.is_err());
        assert!(
            drain(&mut f.rx).is_empty(),
            "a failed list replaces nothing"
        );
    }
}
