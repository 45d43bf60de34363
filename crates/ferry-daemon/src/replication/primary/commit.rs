//! The commit stage, once the replica has committed a cycle's point: the point is recorded
//! here, and only then go the change-tracking generations before it, the extra ranges it
//! carried, and its spool (ADR 0004 decision 3: until then they are kept, so that a cycle
//! lost before its commit is folded into the next point). A cycle whose spool is damaged
//! is abandoned here instead, its changes left to the next capture.

use ferry_store::{ReplicationRow, VmRow};
use tracing::{info, warn};

use super::generations::{generation_name, remove_generations, set_generation};
use super::spool::{spool_dir, spool_paths};
use super::{vm_row, Pending};
use crate::replication::Shared;

/// The point exists on the replica: record it, drop what it made obsolete (the older
/// change-tracking generations, the extra ranges it carried), then forget the spool.
pub(super) async fn record_replicated(
    shared: &Shared,
    rel: &ReplicationRow,
    vm: &VmRow,
    p: &Pending,
) -> anyhow::Result<()> {
    // The replica has the point: the older generations go first, so that the store says
    // the cycle is replicated only once everything of it is done but its own row (which
    // the caller records at once: health reads those rows). A crash in between leaves
    // the cycle pending, and the next attempt finds it on the replica and records it.
    drop_old_generations(shared, rel, vm, p).await;
    // (The spool's generation too: a crash between writing the spool's description and
    // recording the generation must not leave the store behind the bitmaps.)
    if let Some(before) =
        shared
            .store
            .record_shipped(rel.vm_id, p.cycle, p.taken_at, p.generation, &p.kind)?
    {
        let after = shared
            .store
            .replication(rel.vm_id)?
            .map(|r| r.state)
            .unwrap_or(before);
        if before != after {
            shared.events.emit_id(
                rel.vm_id,
                "replication_state",
                &format!("{before} -> {after}"),
            );
        }
    }
    let (spool_path, meta_path) = spool_paths(&spool_dir(shared, rel.vm_id), p.cycle);
    let _ = std::fs::remove_file(meta_path);
    let _ = std::fs::remove_file(spool_path);
    info!(vm = %vm.spec.name, cycle = p.cycle, kind = %p.kind, bytes = p.spool_bytes, "cycle replicated");
    // A cluster node hands the moved-on relationship to the shared directory now.
    shared.events.cluster_changed.notify_one();
    if p.kind == "resync" {
        shared.events.emit(
            &vm.spec.name,
            "resync_finished",
            &format!(
                "resynchronization finished: {} bytes differed and were sent, of {} compared",
                p.data_bytes, p.dirty_bytes
            ),
        );
    }
    Ok(())
}

/// The replica has committed the point of `p`: the generations before `p.generation` go,
/// and so do the extra ranges the point carried (if nobody added others since). Until now
/// they were kept so that a cycle lost before its commit (a spool lost with the host, a
/// transfer that cannot resume) is folded into the next one. A failure here costs only a
/// larger next point: whatever is left is folded into the current generation by the next
/// capture.
async fn drop_old_generations(shared: &Shared, rel: &ReplicationRow, vm: &VmRow, p: &Pending) {
    let _vm_lock = shared.vms.lock_vm(&vm.spec.name).await;
    let extra_key = crate::replication::failover::reverse_extra_key(rel.vm_id);
    if !p.extra.is_empty() {
        let now: Vec<(usize, u64, u64)> = shared
            .store
            .setting(&extra_key)
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default();
        if now == p.extra {
            let _ = shared.store.delete_setting(&extra_key);
        }
    }
    let obsolete = |name: &str| {
        name.strip_prefix("ferry-r")
            .and_then(|g| g.parse::<i64>().ok())
            .is_some_and(|g| g < p.generation)
    };
    if let Err(e) = remove_generations(shared, vm, rel, obsolete).await {
        warn!(vm = %vm.spec.name, error = %format!("{e:#}"), "the generations before the committed point could not be removed; the next capture folds them in");
    }
}

fn abandoned_key(vm_id: i64) -> String {
    format!("abandoned_cycle:{vm_id}")
}

/// The cycle number this primary last gave up (see [`abandon_pending`]), if any.
pub(super) fn abandoned(shared: &Shared, vm_id: i64) -> Option<i64> {
    shared
        .store
        .setting(&abandoned_key(vm_id))
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok())
}

/// Gives up a captured cycle whose spool is damaged: its files go, and the change tracking
/// kept for it until the replica's commit makes the next capture carry its changes (a
/// delta folds the old generation into the new one; a resynchronization compares again).
/// An initial copy starts again from scratch.
pub(super) async fn abandon_pending(shared: &Shared, rel: &ReplicationRow, p: &Pending) {
    warn!(cycle = p.cycle, kind = %p.kind, "abandoning a captured cycle whose spool is damaged");
    // Remembered for a replica that does not say which capture its last cycle came from:
    // if it still commits this one, the next capture of the number must go on top.
    let _ = shared
        .store
        .set_setting(&abandoned_key(rel.vm_id), &p.cycle.to_string());
    let (spool_path, meta_path) = spool_paths(&spool_dir(shared, rel.vm_id), p.cycle);
    let _ = std::fs::remove_file(meta_path);
    let _ = std::fs::remove_file(spool_path);
    if p.kind == "initial" {
        if let Ok(vm) = vm_row(shared, rel.vm_id) {
            let _vm_lock = shared.vms.lock_vm(&vm.spec.name).await;
            let name = generation_name(p.generation);
            let _ = remove_generations(shared, &vm, rel, |n| n == name).await;
        }
        set_generation(shared, rel.vm_id, 0);
    }
}
