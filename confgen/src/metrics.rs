//! Prometheus metrics served at `/metrics` (names and meanings in docs/CONFGEN.md).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Every metric confgen exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Renders by resource.
    pub renders: Family<Labels, Counter>,
    /// Per-service fragments rendered (cache misses), by resource.
    pub fragment_renders: Family<Labels, Counter>,
    /// Destination writes by resource.
    pub writes: Family<Labels, Counter>,
    /// Reload commands run, by result (`ok`, `failed`).
    pub reloads: Family<Labels, Counter>,
    /// Failures by resource and kind (`render`, `check`, `write`, `reload`, `config`).
    pub failures: Family<Labels, Counter>,
    /// Renders held by the drop guard, by resource.
    pub held: Family<Labels, Counter>,
    /// Seconds from confgen seeing a change to the destination being renamed into place.
    pub change_to_write: Histogram,
    /// Seconds one render takes.
    pub render_seconds: Histogram,
    /// etcd revision of confgen's view.
    pub revision: Gauge,
    /// Revisions between confgen's view and the oldest applied revision of any resource.
    pub watch_lag: Gauge,
    /// Unix time of the last successful apply, by resource.
    pub last_success: Family<Labels, Gauge<f64, AtomicU64>>,
    /// 1 while the registry view is stale (etcd unreachable or not yet listed).
    pub stale: Gauge,
    /// Endpoints each resource's template sees.
    pub endpoints: Family<Labels, Gauge>,
    /// Valid endpoint records left out of every config, by reason.
    pub excluded: Family<Labels, Gauge>,
    /// Endpoints left out of one resource because its check failed with them.
    pub quarantined: Family<Labels, Gauge>,
    /// Renders applied through the runtime API (no reload), by resource.
    pub runtime_applies: Family<Labels, Counter>,
    /// Renders of a resource with `runtime_api` that took the reload path, by resource and
    /// reason (`structural`, `unparseable`, `reload_pending`, `unreachable`, `rejected`, `busy`,
    /// `mismatch`).
    pub runtime_fallbacks: Family<Labels, Counter>,
    /// Seconds one runtime apply takes (commands and the read-back).
    pub runtime_apply_seconds: Histogram,
}

/// Label set `resource=<name>`.
pub fn resource(name: &str) -> Labels {
    vec![("resource".into(), name.into())]
}

impl Metrics {
    /// Creates the metrics and registers them in a new registry.
    pub fn new() -> (Arc<Metrics>, Arc<Mutex<Registry>>) {
        let m = Metrics {
            renders: Family::default(),
            writes: Family::default(),
            fragment_renders: Family::default(),
            reloads: Family::default(),
            failures: Family::default(),
            held: Family::default(),
            change_to_write: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            render_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            revision: Gauge::default(),
            watch_lag: Gauge::default(),
            last_success: Family::default(),
            stale: Gauge::default(),
            endpoints: Family::default(),
            excluded: Family::default(),
            quarantined: Family::default(),
            runtime_applies: Family::default(),
            runtime_fallbacks: Family::default(),
            runtime_apply_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        };
        let mut r = Registry::default();
        m.register_in(&mut r);
        (Arc::new(m), Arc::new(Mutex::new(r)))
    }

    /// Registers every metric in `r`, under its name and help text.
    fn register_in(&self, r: &mut Registry) {
        r.register("confgen_renders", "Template renders", self.renders.clone());
        r.register(
            "confgen_fragment_renders",
            "Per-service fragments rendered (fragment cache misses)",
            self.fragment_renders.clone(),
        );
        r.register(
            "confgen_writes",
            "Destination files written",
            self.writes.clone(),
        );
        r.register(
            "confgen_reloads",
            "Reload commands run, by result",
            self.reloads.clone(),
        );
        r.register(
            "confgen_failures",
            "Failed applies by kind (render, check, write, reload, config)",
            self.failures.clone(),
        );
        r.register(
            "confgen_held",
            "Renders held by the drop guard",
            self.held.clone(),
        );
        r.register(
            "confgen_change_to_write_seconds",
            "From seeing a registry change to the destination renamed into place",
            self.change_to_write.clone(),
        );
        r.register(
            "confgen_render_seconds",
            "Time to render one template",
            self.render_seconds.clone(),
        );
        r.register(
            "confgen_registry_revision",
            "etcd revision of confgen's registry view",
            self.revision.clone(),
        );
        r.register(
            "confgen_watch_lag_revisions",
            "Revisions between the registry view and the oldest applied revision",
            self.watch_lag.clone(),
        );
        r.register(
            "confgen_last_success_timestamp_seconds",
            "Unix time of the last successful apply",
            self.last_success.clone(),
        );
        r.register(
            "confgen_stale",
            "1 while the registry view is stale (etcd unreachable or not yet listed)",
            self.stale.clone(),
        );
        r.register(
            "confgen_endpoints",
            "Endpoints each template sees",
            self.endpoints.clone(),
        );
        r.register(
            "confgen_endpoints_excluded",
            "Valid endpoint records left out of every config, by reason (no_node_record, claim, loopback, dns_host, weight, node_cap, duplicate_instance)",
            self.excluded.clone(),
        );
        r.register(
            "confgen_endpoints_quarantined",
            "Endpoints left out of a resource because its check_cmd failed with them",
            self.quarantined.clone(),
        );
        r.register(
            "confgen_runtime_applies",
            "Renders applied through the runtime API without a reload",
            self.runtime_applies.clone(),
        );
        r.register(
            "confgen_runtime_fallbacks",
            "Renders of a runtime_api resource that took the reload path, by reason (structural, unparseable, reload_pending, unreachable, rejected, busy, mismatch)",
            self.runtime_fallbacks.clone(),
        );
        r.register(
            "confgen_runtime_apply_seconds",
            "Time one runtime apply takes (commands and the read-back)",
            self.runtime_apply_seconds.clone(),
        );
    }

    /// Counts a runtime fallback of `resource` for `reason`.
    pub fn runtime_fallback(&self, resource: &str, reason: &str) {
        self.runtime_fallbacks
            .get_or_create(&vec![
                ("resource".into(), resource.into()),
                ("reason".into(), reason.into()),
            ])
            .inc();
    }

    /// Counts a failure of `kind` for `resource`.
    pub fn failure(&self, resource: &str, kind: &str) {
        self.failures
            .get_or_create(&vec![
                ("resource".into(), resource.into()),
                ("kind".into(), kind.into()),
            ])
            .inc();
    }
}
