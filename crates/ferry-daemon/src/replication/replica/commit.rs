//! The commit stage: a received cycle becomes a recovery point. Its layers are made
//! durable first (flushed, closed, fsynced with their directory); only then is the point
//! committed in the store, in the same transaction as the relationship's progress, so a
//! point exists exactly when all of its data is durable.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use ferry_domain::ReplicationState;
use ferry_store::PointRow;
use tracing::info;

use super::apply::Layers;
use super::cycle::Announced;
use super::receive::Target;
use super::staging::{Staging, STAGING_FILE};
use crate::replication::{now_unix, Shared};

/// Makes the received layers durable: flushed, closed, and fsynced with their directory.
pub(super) async fn make_durable(
    layers: Layers,
    staging: &Staging,
    vm_dir: &Path,
) -> anyhow::Result<()> {
    layers.close().await?;
    for (_, p) in &staging.layers {
        fsync(p)?;
    }
    fsync(vm_dir)?;
    Ok(())
}

/// Records the durable cycle as a recovery point and shows it as the replica VM's disks:
/// the point's id and the cycle's size.
pub(super) fn record_point(
    shared: &Arc<Shared>,
    vm_id: i64,
    target: &Target,
    announced: &Announced<'_>,
    bytes: u64,
    staging: &Staging,
) -> anyhow::Result<(i64, u64)> {
    let (cycle, kind) = (announced.cycle, announced.kind);
    // Commit: the point and the relationship's progress in one transaction.
    let mut rel = shared
        .store
        .replication(vm_id)?
        .ok_or_else(|| anyhow!("replication was removed"))?;
    rel.state = match rel.state {
        ReplicationState::WaitingForInitialReplication | ReplicationState::Error => {
            ReplicationState::Replicating
        }
        s => s,
    };
    rel.last_cycle = cycle;
    // The primary's clock is not trusted for what guards this host: the split-brain guard
    // of unplanned failover ("the primary still sends points") and retention's spacing read
    // these times. The guard uses when the point arrived here; the point's own time is the
    // primary's, clamped between the previous point's and now (a primary's clock ahead or
    // a hostile primary cannot place a point in the future or reorder points).
    let now = now_unix();
    rel.last_point_at = Some(now);
    let newest_before = shared
        .store
        .list_points(rel.vm_id)?
        .iter()
        .map(|p| p.taken_at)
        .max()
        .unwrap_or(i64::MIN);
    let taken_at = announced.taken_at.min(now).max(newest_before.min(now));
    let point = PointRow {
        id: 0,
        vm_id: rel.vm_id,
        cycle,
        taken_at,
        applied_at: now_unix(),
        kind: kind.to_owned(),
        layers: staging
            .layers
            .iter()
            .map(|(d, p)| (*d, p.display().to_string()))
            .collect(),
        bytes: bytes as i64,
        consistency: if announced.app_consistent {
            "application"
        } else {
            "crash"
        }
        .to_owned(),
    };
    let id = shared.store.commit_point(&point, &rel)?;
    // Which capture this point came from, for the primary's next greeting. Written after
    // the commit: lost in a crash in between, the primary sees no match and sends its
    // capture again as the next cycle (more data, never less).
    if announced.capture != 0 {
        let _ = shared
            .store
            .set_setting(&last_capture_key(vm_id), &announced.capture.to_string());
    }
    let _ = std::fs::remove_file(target.vm_dir.join(STAGING_FILE));
    // The replica VM's disks show the latest point.
    let mut spec = target.vm.spec.clone();
    for (d, p) in &point.layers {
        if let Some(slot) = spec.disks.get_mut(*d) {
            slot.file = p.clone();
        }
    }
    shared.store.set_vm_spec(rel.vm_id, &spec)?;
    // On a replica cluster's node: the next node to hold this replica starts from here,
    // written before the primary hears the cycle was committed.
    crate::broker::hold(shared, rel.vm_id)
        .map_err(|e| anyhow!("cannot record the point on the shared directory: {e:#}"))?;
    shared.events.emit(
        &target.vm.spec.name,
        "recovery_point_added",
        &format!("recovery point {id} (cycle {cycle}, {kind}, {bytes} bytes)"),
    );
    info!(vm = %target.vm.spec.name, cycle, point = id, bytes, "recovery point committed");
    Ok((id, bytes))
}

/// Where the capture of a replica VM's last committed cycle is kept.
pub fn last_capture_key(vm_id: i64) -> String {
    format!("replica_last_capture:{vm_id}")
}

/// Makes a file (or a directory's entries) durable.
pub(super) fn fsync(p: &Path) -> anyhow::Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", p.display()))
}
