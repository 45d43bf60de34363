//! Removal: replication removed, the relationship's change-tracking generations go from
//! the VM's disks, with a fleecing point an aborted cycle left behind.

use std::sync::Arc;

use ferry_domain::VmName;
use ferry_qemu::cbt;
use ferry_store::{ReplicationRow, VmRow};
use tracing::warn;

use super::generations::remove_generations;
use super::live::fleece_dir;
use crate::replication::Shared;

/// Removes every generation of the relationship from a VM's disks (replication removed).
pub async fn remove_tracking(
    shared: &Arc<Shared>,
    name: &VmName,
    vm: &VmRow,
    rel: &ReplicationRow,
) {
    if let Some(qmp) = shared.vms.live_qmp(name) {
        // A capture stopped mid-way (the task was aborted) leaves its fleecing point: its
        // exports and copy-before-write job would hold the bitmaps and grow the overlay.
        let run_dir = fleece_dir(shared, rel.vm_id);
        if let Err(e) = cbt::cleanup_stale(&qmp, &run_dir).await {
            warn!(vm = %name, error = %e, "cleaning up a fleecing point left by an aborted cycle failed");
        }
    }
    let _ = remove_generations(shared, vm, rel, |n| n.starts_with("ferry-r")).await;
}
