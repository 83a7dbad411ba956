//! Prometheus metrics and the shared status behind `/healthz`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

/// Every metric presence exports.
#[derive(Clone)]
pub struct Metrics {
    /// Endpoints currently written to etcd by this process.
    pub endpoints: Gauge,
    /// Containers skipped because their labels or env are invalid.
    pub invalid_containers: Gauge,
    /// Published ports left out because they are bound to loopback / link-local only.
    pub local_bindings: Gauge,
    /// Docker container events read, by action.
    pub events: Family<ActionLabel, Counter>,
    /// Re-subscriptions to the Docker event stream.
    pub docker_reconnects: Counter,
    /// Failed lease renewals (keepalive stream errors, missing answers).
    pub lease_renew_failures: Counter,
    /// Leases granted (1 at start, +1 per lost lease).
    pub lease_grants: Counter,
    /// Failed etcd requests of any kind.
    pub etcd_errors: Counter,
    /// Completed full reconciliations against etcd.
    pub full_syncs: Counter,
    /// Records not written because they are too large for one etcd request.
    pub records_refused: Gauge,
    /// Transactions etcd refused as too large and that were split and sent again.
    pub txn_splits: Counter,
    /// Seconds from reading a Docker event to etcd acknowledging the resulting write.
    pub event_to_etcd: Histogram,
    /// Each loop's beats, for the watchdog (not exported: the ping is the export).
    pub pulse: crate::liveness::Pulse,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            endpoints: Gauge::default(),
            invalid_containers: Gauge::default(),
            local_bindings: Gauge::default(),
            events: Family::default(),
            docker_reconnects: Counter::default(),
            lease_renew_failures: Counter::default(),
            lease_grants: Counter::default(),
            etcd_errors: Counter::default(),
            full_syncs: Counter::default(),
            records_refused: Gauge::default(),
            txn_splits: Counter::default(),
            event_to_etcd: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            pulse: crate::liveness::Pulse::from_env(),
        };
        registry.register(
            "presence_endpoints_registered",
            "Endpoints this presence has written to etcd",
            m.endpoints.clone(),
        );
        registry.register(
            "presence_invalid_containers",
            "Running containers skipped because a label or env value is invalid",
            m.invalid_containers.clone(),
        );
        registry.register(
            "presence_loopback_bindings_skipped",
            "Published ports not announced because Docker bound them to a loopback or link-local address only (see --allow-loopback)",
            m.local_bindings.clone(),
        );
        registry.register(
            "presence_docker_events",
            "Docker container events read, by action",
            m.events.clone(),
        );
        registry.register(
            "presence_docker_reconnects",
            "Re-subscriptions to the Docker event stream",
            m.docker_reconnects.clone(),
        );
        registry.register(
            "presence_lease_renew_failures",
            "Failed etcd lease renewals",
            m.lease_renew_failures.clone(),
        );
        registry.register(
            "presence_lease_grants",
            "etcd leases granted (one at start, one more per lost lease)",
            m.lease_grants.clone(),
        );
        registry.register(
            "presence_etcd_errors",
            "Failed etcd requests",
            m.etcd_errors.clone(),
        );
        registry.register(
            "presence_full_syncs",
            "Completed full reconciliations of this node's keys against etcd",
            m.full_syncs.clone(),
        );
        registry.register(
            "presence_records_refused",
            "Endpoint records not written because they are too large for one etcd request (--max-txn-bytes or etcd's --max-request-bytes)",
            m.records_refused.clone(),
        );
        registry.register(
            "presence_txn_splits",
            "etcd transactions refused as too large and sent again in two halves",
            m.txn_splits.clone(),
        );
        registry.register(
            "presence_event_to_etcd_seconds",
            "Seconds from reading a Docker event to etcd acknowledging the write it caused",
            m.event_to_etcd.clone(),
        );
        m
    }

    /// Records one event→etcd latency.
    pub fn observe_latency(&self, d: Duration) {
        self.event_to_etcd.observe(d.as_secs_f64());
    }
}

/// What `/healthz` reports. Each part is `Ok` or the last error.
#[derive(Debug, Clone)]
pub struct Status {
    pub docker: Result<(), String>,
    pub etcd: Result<(), String>,
    pub synced: bool,
    pub lease: Option<i64>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            docker: Err("not connected yet".into()),
            etcd: Err("not connected yet".into()),
            synced: false,
            lease: None,
        }
    }
}

/// The status shared between tasks.
pub type SharedStatus = Arc<Mutex<Status>>;

/// Renders `/healthz`: healthy when Docker streams, etcd answers and the first sync is done.
pub fn render_health(status: &Status) -> (bool, String) {
    let part = |name: &str, r: &Result<(), String>| match r {
        Ok(()) => format!("{name}: ok\n"),
        Err(e) => format!("{name}: down: {e}\n"),
    };
    let mut text = part("docker", &status.docker);
    text.push_str(&part("etcd", &status.etcd));
    text.push_str(&format!(
        "synced: {}\n",
        if status.synced { "yes" } else { "no" }
    ));
    if let Some(lease) = status.lease {
        text.push_str(&format!("lease: {lease:x}\n"));
    }
    let ok = status.docker.is_ok() && status.etcd.is_ok() && status.synced;
    (ok, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_names_what_is_down() {
        let mut s = Status::default();
        let (ok, text) = render_health(&s);
        assert!(!ok);
        assert!(text.contains("docker: down: not connected yet"), "{text}");
        s.docker = Ok(());
        s.etcd = Ok(());
        s.synced = true;
        s.lease = Some(0x1f);
        let (ok, text) = render_health(&s);
        assert!(ok, "{text}");
        assert_eq!(text, "docker: ok\netcd: ok\nsynced: yes\nlease: 1f\n");
    }

    #[test]
    fn metrics_are_exported_under_their_names() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        m.events
            .get_or_create(&ActionLabel {
                action: "start".into(),
            })
            .inc();
        m.observe_latency(Duration::from_millis(3));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for needle in [
            "presence_endpoints_registered 0",
            "presence_docker_events_total{action=\"start\"} 1",
            "presence_docker_reconnects_total 0",
            "presence_lease_renew_failures_total 0",
            "presence_event_to_etcd_seconds_count 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
    }
}
