//! Health, statistics and metrics of the relationships on this host: Hyper-V's
//! "View Replication Health" over a monitoring window (since the relationship began, the
//! last statistics reset, or the last 12 hours, whichever is latest), computed from the
//! cycles the store keeps (the whole history stays there), and a watcher that records
//! every health change as an event. The Prometheus exposition is in `metrics`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_api_types::ReplicationHealthInfo;
use ferry_domain::health::{evaluate, HealthInput};
use ferry_domain::{Role, VmName};
use ferry_store::ReplicationRow;

use super::{now_ms, now_unix, primary, Shared};

/// Hyper-V's default monitoring interval.
pub const MONITORING_WINDOW_S: i64 = 12 * 3600;

/// Health and statistics of one relationship.
pub fn report(
    shared: &Shared,
    vm: &VmName,
    rel: &ReplicationRow,
) -> anyhow::Result<ReplicationHealthInfo> {
    let now = now_unix();
    let reset_ms = shared.store.stats_reset_ms(rel.vm_id)?;
    // The window starts at the reset's exact millisecond: a cycle that ended earlier in the
    // same second belongs to the old window. (Reported in whole seconds.)
    let since_ms = [
        rel.created_at * 1000,
        reset_ms,
        (now - MONITORING_WINDOW_S) * 1000,
    ]
    .into_iter()
    .max()
    .unwrap_or(now * 1000);
    let window_start = since_ms / 1000;
    let cycles = shared.store.cycles_since(rel.vm_id, since_ms)?;
    let ok: Vec<_> = cycles.iter().filter(|c| c.ok).collect();
    let errors = cycles.len() as u64 - ok.len() as u64;
    let sizes: Vec<u64> = ok.iter().map(|c| c.sent_bytes.max(0) as u64).collect();
    let latencies: Vec<u64> = ok
        .iter()
        .map(|c| (c.ended_ms - c.started_ms).max(0) as u64)
        .collect();
    let avg = |v: &[u64]| {
        if v.is_empty() {
            0
        } else {
            v.iter().sum::<u64>() / v.len() as u64
        }
    };
    let failures_in_a_row = shared
        .store
        .recent_cycles(rel.vm_id, 16)?
        .iter()
        .take_while(|c| !c.ok)
        .count() as u32;
    let input = HealthInput {
        vm: vm.to_string(),
        role: rel.role,
        state: rel.state,
        suspended_on_replica: rel
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("suspended on the replica server")),
        interval_s: rel.settings.interval.secs() as i64,
        now,
        window_start,
        last_point_at: rel.last_point_at,
        successful: ok.len() as u64,
        failures_in_a_row,
        // Failover (issue #4) sets this once it exists; no relationship can be failed over yet.
        failover_not_reversed: false,
    };
    let verdict = evaluate(&input);
    let pending_bytes = if rel.role == Role::Primary {
        primary::pending(shared, rel.vm_id)
            .map(|p| p.spool_bytes)
            .unwrap_or(0)
    } else {
        0
    };
    let (primary_server, replica_server) = match rel.role {
        Role::Primary => (shared.cfg.name.clone(), rel.partner_name.clone()),
        Role::Replica => (rel.partner_name.clone(), shared.cfg.name.clone()),
    };
    Ok(ReplicationHealthInfo {
        vm: vm.to_string(),
        role: rel.role.as_str().to_owned(),
        state: rel.state.as_str().to_owned(),
        state_label: rel.state.label().to_owned(),
        health: verdict.health.as_str().to_owned(),
        details: verdict.details,
        primary_server,
        replica_server,
        from_time: window_start,
        to_time: now,
        average_size: avg(&sizes),
        maximum_size: sizes.iter().copied().max().unwrap_or(0),
        average_latency_ms: avg(&latencies),
        maximum_latency_ms: latencies.iter().copied().max().unwrap_or(0),
        errors,
        successful_cycles: ok.len() as u64,
        missed_cycles: verdict.missed,
        expected_cycles: verdict.expected,
        pending_bytes,
        last_synchronized_at: rel.last_point_at,
        rpo_s: verdict.rpo_s,
        data_bytes: ok.iter().map(|c| c.dirty_bytes.max(0) as u64).sum(),
        network_bytes: sizes.iter().sum(),
        resynchronized_bytes: ok
            .iter()
            .filter(|c| c.kind == "resync")
            .map(|c| c.sent_bytes.max(0) as u64)
            .sum(),
        test_failover_status: if super::test_failover::current(shared, rel.vm_id).is_some() {
            "running".into()
        } else {
            "not running".into()
        },
        last_test_failover_at: super::test_failover::last_started(shared, rel.vm_id),
    })
}

/// Every relationship on this host with its report.
pub fn all(shared: &Shared) -> anyhow::Result<Vec<ReplicationHealthInfo>> {
    let vms = shared.store.list_vms()?;
    let mut out = Vec::new();
    for rel in shared.store.list_replications()? {
        if let Some(vm) = vms.iter().find(|v| v.id == rel.vm_id) {
            out.push(report(shared, &vm.spec.name, &rel)?);
        }
    }
    Ok(out)
}

/// Re-evaluates health every few seconds and records each change as an event.
pub fn spawn_watcher(shared: Arc<Shared>) {
    tokio::spawn(async move {
        // Continue from the health the event log last recorded, so a restart does not
        // report changes that did not happen.
        let mut last: HashMap<String, String> = HashMap::new();
        for e in shared
            .store
            .latest_events_by_vm("health_changed")
            .unwrap_or_default()
        {
            if let (Some(vm), Some(h)) = (e.vm, e.message.split("-> ").nth(1)) {
                let h = h.split(':').next().unwrap_or("").trim().to_owned();
                last.insert(vm, h);
            }
        }
        let changed = shared.events.changed.clone();
        loop {
            if let Ok(list) = all(&shared) {
                let live: Vec<String> = list.iter().map(|r| r.vm.clone()).collect();
                last.retain(|vm, _| live.contains(vm));
                for r in list {
                    let before = last.insert(r.vm.clone(), r.health.clone());
                    if before.as_deref().unwrap_or("normal") != r.health {
                        let severity = match r.health.as_str() {
                            "critical" => "error",
                            "warning" => "warning",
                            _ => "info",
                        };
                        let why = r
                            .details
                            .first()
                            .cloned()
                            .unwrap_or_else(|| "all rules pass".into());
                        shared.events.emit_with(
                            &r.vm,
                            "health_changed",
                            severity,
                            &format!(
                                "replication health {} -> {}: {why}",
                                before.as_deref().unwrap_or("normal"),
                                r.health
                            ),
                        );
                    }
                }
            }
            // Promptly after any event (a state change, a failed cycle), else every 2 s
            // (time alone changes health too: the RPO grows, cycles go missing).
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = changed.notified() => {}
            }
        }
    });
}

/// Resets a relationship's statistics window (Hyper-V's Reset Statistics).
pub fn reset(shared: &Shared, vm: &VmName, rel: &ReplicationRow) -> anyhow::Result<()> {
    shared.store.reset_stats(rel.vm_id, now_ms())?;
    shared.events.emit(
        vm,
        "statistics_reset",
        "replication statistics reset: a new monitoring window starts",
    );
    Ok(())
}
