//! Removal: replication removed, the relationship's change-tracking generations go from
//! the VM's disks, with a fleecing point an aborted cycle left behind.

use std::sync::Arc;

use ferry_domain::VmName;
use ferry_qemu::cbt;
use ferry_qemu::process::disk_node;
use ferry_store::{ReplicationRow, VmRow};
use tracing::warn;

use super::disks;
use super::live::fleece_dir;
use crate::replication::Shared;

/// Removes every generation of the relationship from a VM's disks (replication removed).
pub async fn remove_tracking(
    shared: &Arc<Shared>,
    name: &VmName,
    vm: &VmRow,
    rel: &ReplicationRow,
) {
    let disks = disks(shared, vm, rel);
    if let Some(qmp) = shared.vms.live_qmp(name) {
        let nodes: Vec<String> = disks.iter().map(|(i, _, _)| disk_node(*i)).collect();
        // A capture stopped mid-way (the task was aborted) leaves its fleecing point: its
        // exports and copy-before-write job would hold the bitmaps and grow the overlay.
        let run_dir = fleece_dir(shared, rel.vm_id);
        if let Err(e) = cbt::cleanup_stale(&qmp, &run_dir).await {
            warn!(vm = %name, error = %e, "cleaning up a fleecing point left by an aborted cycle failed");
        }
        if let Ok(infos) = qmp
            .execute(&ferry_qemu::qmp::QueryNamedBlockNodes { flat: Some(true) })
            .await
        {
            let mut names: Vec<String> = infos
                .iter()
                .flat_map(|n| n.dirty_bitmaps.iter().filter_map(|b| b.name.clone()))
                .filter(|n| n.starts_with("ferry-r"))
                .collect();
            names.sort();
            names.dedup();
            for n in names {
                let _ = cbt::remove_generation(&qmp, &nodes, &n).await;
            }
        }
    } else {
        for (_, image, _) in &disks {
            if let Ok(bitmaps) = cbt::offline_bitmaps(&shared.cfg.qemu_img, image).await {
                for b in bitmaps
                    .into_iter()
                    .filter(|b| b.name.starts_with("ferry-r"))
                {
                    let _ = cbt::remove_bitmap_offline(&shared.cfg.qemu_img, image, &b.name).await;
                }
            }
        }
    }
}
