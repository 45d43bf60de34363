//! Retention: the recovery points the policy no longer keeps are merged away, after a
//! cycle's point is committed and before the primary hears it was (`session`). Every step
//! keeps the chain valid (see the replica module's documentation), so a crash mid-merge
//! loses nothing.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::process::Command;
use tracing::info;

use super::run;
use crate::replication::Shared;

/// Drops the recovery points the policy no longer keeps, merging their layers.
pub async fn apply_retention(shared: &Arc<Shared>, vm_id: i64) -> anyhow::Result<()> {
    let Some(rel) = shared.store.replication(vm_id)? else {
        return Ok(());
    };
    let _points_locked = shared.lock_points(vm_id).await;
    let points = shared.store.list_points(vm_id)?;
    let list: Vec<(i64, i64)> = points.iter().map(|p| (p.id, p.taken_at)).collect();
    let pinned = shared.pinned_points(vm_id);
    let mut drop: Vec<i64> = rel.settings.retention.to_drop(&list, &pinned);
    // A merge rewrites the dropped point's layer, which every later point is built on: below
    // a pinned point (a test failover runs on it) nothing is merged.
    if let Some(lowest_pin) = points.iter().position(|p| pinned.contains(&p.id)) {
        drop.retain(|id| points.iter().position(|p| p.id == *id) > Some(lowest_pin));
    }
    // Oldest first, so each merge folds a point into the one below it.
    drop.sort_by_key(|id| points.iter().position(|p| p.id == *id));
    for id in drop {
        let points = shared.store.list_points(vm_id)?;
        let Some(pos) = points.iter().position(|p| p.id == id) else {
            continue;
        };
        let Some(next) = points.get(pos + 1).cloned() else {
            continue;
        };
        let dropped = points[pos].clone();
        let above = points.get(pos + 2).cloned();
        // 1. The dropped point stops existing before its layer's content changes.
        shared.store.delete_point(id)?;
        // A replica cluster's next node must never build on a point that is gone.
        crate::broker::hold(shared, vm_id)?;
        for (disk, layer) in &dropped.layers {
            let Some((_, next_layer)) = next.layers.iter().find(|(d, _)| d == disk).cloned() else {
                continue;
            };
            // 2. Fold the successor's layer into the dropped one: it now holds `next`.
            let mut cmd = Command::new(&shared.cfg.qemu_img);
            cmd.args(["commit", "-q", "-f", "qcow2"]).arg(&next_layer);
            run(cmd, "merge recovery point layers").await?;
            // 3. `next` is now the merged layer.
            let mut layers = shared
                .store
                .list_points(vm_id)?
                .into_iter()
                .find(|p| p.id == next.id)
                .map(|p| p.layers)
                .unwrap_or_default();
            for l in layers.iter_mut().filter(|(d, _)| d == disk) {
                l.1 = layer.clone();
            }
            shared.store.set_point_layers(next.id, &layers)?;
            // Before the old layer goes (step 5): the next node reads the merged one.
            crate::broker::hold(shared, vm_id)?;
            // 4. The layer above (if any) now backs onto the merged layer: same content.
            if let Some(above) = &above {
                if let Some((_, above_layer)) = above.layers.iter().find(|(d, _)| d == disk) {
                    let mut cmd = Command::new(&shared.cfg.qemu_img);
                    cmd.args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                        .arg(layer)
                        .arg(above_layer);
                    run(cmd, "rebase a recovery point layer").await?;
                }
            } else {
                // A staged cycle's layers sit on `next_layer`: rebase them too. The list is
                // copied out first: no lock is held across qemu-img, which would stall
                // every replication session of this host.
                let staged: Vec<PathBuf> = shared
                    .replica
                    .staging
                    .lock()
                    .expect("staging")
                    .get(&vm_id)
                    .map(|s| {
                        s.layers
                            .iter()
                            .filter(|(d, _)| d == disk)
                            .map(|(_, p)| p.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for p in staged {
                    let mut cmd = Command::new(&shared.cfg.qemu_img);
                    cmd.args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                        .arg(layer)
                        .arg(&p);
                    let _ = run(cmd, "rebase a staged layer").await;
                }
            }
            // 5. The successor's old layer is no longer referenced.
            if next_layer != *layer {
                let _ = std::fs::remove_file(&next_layer);
            }
        }
        // Keep the replica VM's disk paths on the latest point.
        if let (Some(last), Some(vm)) = (
            shared.store.list_points(vm_id)?.last().cloned(),
            shared.store.vm_by_id(vm_id)?,
        ) {
            let mut spec = vm.spec.clone();
            for (d, p) in &last.layers {
                if let Some(slot) = spec.disks.get_mut(*d) {
                    slot.file = p.clone();
                }
            }
            shared.store.set_vm_spec(vm_id, &spec)?;
        }
        info!(vm_id, point = id, "recovery point merged away by retention");
    }
    Ok(())
}
