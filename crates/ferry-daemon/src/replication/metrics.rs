//! The Prometheus exposition of this host (`GET /metrics`), written by the
//! `prometheus-client` crate in the OpenMetrics text format, by the conventions of
//! node_exporter and the Ceph manager: counters only ever rise (they count from the
//! relationship's creation and are kept in the store, so neither a statistics reset nor a
//! restart lowers them), Hyper-V's monitoring-window figures are gauges named
//! `..._window_...`, units are in the names, and a series with no value is absent rather
//! than a sentinel. docs/HEALTH.md lists every family.

use std::sync::atomic::AtomicU64;

use ferry_domain::health::Health;
use ferry_domain::{ReplicationState, Role};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::{health, Shared};

/// The labels of every relationship series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rel {
    vm: String,
    role: String,
    primary: String,
    replica: String,
}

/// [`Rel`] and the relationship's state (`ferry_replication_state`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelState {
    vm: String,
    role: String,
    primary: String,
    replica: String,
    state: String,
}

type Gauges = Family<Rel, Gauge<f64, AtomicU64>>;
type Counters = Family<Rel, Counter<u64>>;

/// The OpenMetrics content type `metrics_text` is written in.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every family of this host's exposition, registered and filled for one scrape.
struct Families {
    registry: Registry,
    health: Gauges,
    state: Family<RelState, Gauge<f64, AtomicU64>>,
    suspended: Gauges,
    interval: Gauges,
    last_point: Gauges,
    rpo: Gauges,
    pending: Gauges,
    points: Gauges,
    cycles: Counters,
    errors: Counters,
    network: Counters,
    data: Counters,
    resync: Counters,
    w_start: Gauges,
    w_cycles: Gauges,
    w_errors: Gauges,
    w_expected: Gauges,
    w_missed: Gauges,
    w_avg_size: Gauges,
    w_max_size: Gauges,
    w_avg_latency: Gauges,
    w_max_latency: Gauges,
    w_network: Gauges,
    w_resync: Gauges,
    w_compression: Gauges,
    vms: Gauge<f64, AtomicU64>,
}

impl Families {
    fn new() -> Self {
        let mut registry = Registry::default();
        let mut gauge = |name: &str, help: &str, unit: Option<Unit>| {
            let f = Gauges::default();
            match unit {
                Some(u) => registry.register_with_unit(name, help, u, f.clone()),
                None => registry.register(name, help, f.clone()),
            }
            f
        };
        let health = gauge(
            "ferry_replication_health",
            "Replication health: 0 normal, 1 warning, 2 critical",
            None,
        );
        let suspended = gauge(
            "ferry_replication_suspended",
            "1 while replication is suspended on this side, else 0",
            None,
        );
        let interval = gauge(
            "ferry_replication_interval",
            "The configured replication interval",
            Some(Unit::Seconds),
        );
        let last_point = gauge(
            "ferry_replication_last_point_timestamp",
            "UNIX time the newest complete recovery point was taken (absent before the first)",
            Some(Unit::Seconds),
        );
        let rpo = gauge(
            "ferry_replication_rpo",
            "Now minus the newest complete recovery point's time (absent before the first)",
            Some(Unit::Seconds),
        );
        let pending = gauge(
            "ferry_replication_pending",
            "Captured on the primary and not yet on the replica (primary only)",
            Some(Unit::Bytes),
        );
        let points = gauge(
            "ferry_replication_recovery_points",
            "Recovery points kept (replica only)",
            None,
        );
        let w_start = gauge(
            "ferry_replication_window_start_timestamp",
            "UNIX time the monitoring window starts (creation, last statistics reset, or 12 h ago)",
            Some(Unit::Seconds),
        );
        let w_cycles = gauge(
            "ferry_replication_window_cycles",
            "Successful cycles in the monitoring window",
            None,
        );
        let w_errors = gauge(
            "ferry_replication_window_errors",
            "Failed cycles in the monitoring window",
            None,
        );
        let w_expected = gauge(
            "ferry_replication_window_expected_cycles",
            "Cycles the monitoring window should have seen",
            None,
        );
        let w_missed = gauge(
            "ferry_replication_window_missed_cycles",
            "Cycles expected in the monitoring window and not done",
            None,
        );
        let w_avg_size = gauge(
            "ferry_replication_window_average_size",
            "Average bytes per successful cycle in the window (absent without one)",
            Some(Unit::Bytes),
        );
        let w_max_size = gauge(
            "ferry_replication_window_maximum_size",
            "Largest successful cycle in the window (absent without one)",
            Some(Unit::Bytes),
        );
        let w_avg_latency = gauge(
            "ferry_replication_window_average_latency",
            "Average cycle latency (capture to the replica's commit) in the window (absent without a cycle)",
            Some(Unit::Seconds),
        );
        let w_max_latency = gauge(
            "ferry_replication_window_maximum_latency",
            "Longest cycle latency in the window (absent without a cycle)",
            Some(Unit::Seconds),
        );
        let w_network = gauge(
            "ferry_replication_window_network",
            "Bytes sent (primary) or received (replica) in the window",
            Some(Unit::Bytes),
        );
        let w_resync = gauge(
            "ferry_replication_window_resynchronized",
            "Bytes of resynchronizations in the window",
            Some(Unit::Bytes),
        );
        let w_compression = gauge(
            "ferry_replication_window_compression_ratio",
            "Data bytes per byte sent in the window (absent when nothing was sent)",
            None,
        );
        let mut counter = |name: &str, help: &str, unit: Option<Unit>| {
            let f = Counters::default();
            match unit {
                Some(u) => registry.register_with_unit(name, help, u, f.clone()),
                None => registry.register(name, help, f.clone()),
            }
            f
        };
        let cycles = counter(
            "ferry_replication_cycles",
            "Successful cycles since the relationship was created",
            None,
        );
        let errors = counter(
            "ferry_replication_errors",
            "Failed cycles since the relationship was created",
            None,
        );
        let network = counter(
            "ferry_replication_network",
            "Bytes sent (primary) or received (replica) since the relationship was created",
            Some(Unit::Bytes),
        );
        let data = counter(
            "ferry_replication_data",
            "Data bytes (before compression) replicated since the relationship was created",
            Some(Unit::Bytes),
        );
        let resync = counter(
            "ferry_replication_resynchronized",
            "Bytes of resynchronizations since the relationship was created",
            Some(Unit::Bytes),
        );
        let state = Family::<RelState, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "ferry_replication_state",
            "1 for the relationship's current state (label state)",
            state.clone(),
        );
        let vms = Gauge::<f64, AtomicU64>::default();
        registry.register("ferry_vms", "Virtual machines on this host", vms.clone());
        registry.register(
            "ferry_build",
            "ferryd's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Families {
            registry,
            health,
            state,
            suspended,
            interval,
            last_point,
            rpo,
            pending,
            points,
            cycles,
            errors,
            network,
            data,
            resync,
            w_start,
            w_cycles,
            w_errors,
            w_expected,
            w_missed,
            w_avg_size,
            w_max_size,
            w_avg_latency,
            w_max_latency,
            w_network,
            w_resync,
            w_compression,
            vms,
        }
    }
}

/// This host's exposition: every relationship's series, its VM count and build.
pub fn metrics_text(shared: &Shared, vm_count: usize) -> anyhow::Result<String> {
    let f = Families::new();
    f.vms.set(vm_count as f64);
    let vms = shared.store.list_vms()?;
    for rel in shared.store.list_replications()? {
        let Some(vm) = vms.iter().find(|v| v.id == rel.vm_id) else {
            continue;
        };
        let r = health::report(shared, &vm.spec.name, &rel)?;
        let counters = shared.store.counters(rel.vm_id)?;
        let l = Rel {
            vm: r.vm.clone(),
            role: r.role.clone(),
            primary: r.primary_server.clone(),
            replica: r.replica_server.clone(),
        };
        let set = |g: &Gauges, v: f64| {
            g.get_or_create(&l).set(v);
        };
        let count = |c: &Counters, v: i64| {
            c.get_or_create(&l).inc_by(v.max(0) as u64);
        };
        let level = match r.health.as_str() {
            "critical" => Health::Critical,
            "warning" => Health::Warning,
            _ => Health::Normal,
        };
        set(&f.health, f64::from(level.level()));
        f.state
            .get_or_create(&RelState {
                vm: l.vm.clone(),
                role: l.role.clone(),
                primary: l.primary.clone(),
                replica: l.replica.clone(),
                state: r.state.clone(),
            })
            .set(1.0);
        set(
            &f.suspended,
            f64::from(u8::from(rel.state == ReplicationState::Suspended)),
        );
        set(&f.interval, rel.settings.interval.secs() as f64);
        if let Some(t) = rel.last_point_at {
            set(&f.last_point, t as f64);
        }
        if let Some(rpo) = r.rpo_s {
            set(&f.rpo, rpo as f64);
        }
        match rel.role {
            Role::Primary => set(&f.pending, r.pending_bytes as f64),
            Role::Replica => set(&f.points, shared.store.list_points(rel.vm_id)?.len() as f64),
        }
        count(&f.cycles, counters.cycles);
        count(&f.errors, counters.errors);
        count(&f.network, counters.network_bytes);
        count(&f.data, counters.data_bytes);
        count(&f.resync, counters.resynchronized_bytes);
        set(&f.w_start, r.from_time as f64);
        set(&f.w_cycles, r.successful_cycles as f64);
        set(&f.w_errors, r.errors as f64);
        set(&f.w_expected, r.expected_cycles as f64);
        set(&f.w_missed, r.missed_cycles as f64);
        if r.successful_cycles > 0 {
            set(&f.w_avg_size, r.average_size as f64);
            set(&f.w_max_size, r.maximum_size as f64);
            set(&f.w_avg_latency, r.average_latency_ms as f64 / 1000.0);
            set(&f.w_max_latency, r.maximum_latency_ms as f64 / 1000.0);
        }
        set(&f.w_network, r.network_bytes as f64);
        set(&f.w_resync, r.resynchronized_bytes as f64);
        if r.network_bytes > 0 {
            set(
                &f.w_compression,
                r.data_bytes as f64 / r.network_bytes as f64,
            );
        }
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &f.registry)?;
    Ok(out)
}
