//! The capture of a running VM: a fleecing point gives a frozen view of every replicated
//! disk while the guest runs on (writes to the view's blocks are copied aside first), and
//! starts the next change-tracking generation in the same transaction. The guest's
//! filesystems are frozen through its agent around that transaction when an
//! application-consistent point is due. The point is held only while the view is read, so
//! the fleecing window never depends on the link.

use std::path::{Path, PathBuf};

use ferry_domain::ReplicationState;
use ferry_qemu::cbt::{self, BitmapState, FleecePoint, NodeSpec};
use ferry_qemu::process::disk_node;
use ferry_qemu::qmp::Qmp;
use tracing::{info, warn};

use super::app_consistent::{due_app_consistent, freeze_guest, AGENT_TIMEOUT};
use super::capture::{Capture, Point};
use super::frame::Tap;
use super::generations::set_generation;
use super::read::{read_to_spool, ReadSummary, Source};
use super::spool::write_meta;
use super::ResyncRequired;
use crate::replication::Shared;

/// Where a VM's fleecing overlays live while a cycle holds its point.
pub(super) fn fleece_dir(shared: &Shared, vm_id: i64) -> PathBuf {
    shared
        .cfg
        .data_dir
        .join("run")
        .join(format!("fleece-{vm_id}"))
}

/// Captures the running VM behind `qmp`: the point, its read, and the captured cycle's
/// description; the fleecing point is released either way.
pub(super) async fn capture(
    c: &Capture<'_>,
    qmp: &Qmp,
    mut tap: Option<&mut Tap>,
) -> anyhow::Result<()> {
    let (shared, rel) = (c.shared, c.rel);
    let resync = rel.state == ReplicationState::Resynchronizing;
    let run_dir = fleece_dir(shared, rel.vm_id);
    std::fs::create_dir_all(&run_dir)?;
    if rel.generation == 0 || resync {
        cbt::cleanup_stale(qmp, &run_dir).await?;
    }
    if let Some(old) = &c.old_gen {
        check_generation(c, qmp, old).await?;
    }
    let (fleece, app_consistent) = take_point(c, qmp, &run_dir).await?;
    let point = c.point_taken(app_consistent, tap.as_deref_mut()).await;
    let context = fleece.meta_context();
    let sources: Vec<Source> = c
        .disks
        .iter()
        .zip(fleece.disks())
        .map(|((i, _, size), d)| Source {
            disk: *i,
            socket: fleece.nbd_socket().to_path_buf(),
            export: d.export_name.clone(),
            size: *size,
        })
        .collect();
    let read = read_to_spool(c, &sources, &context, tap).await;
    match read {
        Ok(summary) => finish(c, qmp, fleece, &point, &summary).await,
        Err(e) => {
            let _ = std::fs::remove_file(&c.spool_path);
            match fleece.release(qmp, false).await {
                // The old generation was folded into the new one, which now holds
                // every change since the last point: it is the current one.
                Ok(_) => set_generation(shared, rel.vm_id, c.new_gen_no),
                Err(re) => {
                    warn!(vm = %c.vm.spec.name, error = %re, "releasing the fleecing point after a failed read failed")
                }
            }
            Err(e)
        }
    }
}

/// Checks that generation `old`, which a delta reads, is intact on every disk: a lost or
/// inconsistent one asks for a resynchronization.
async fn check_generation(c: &Capture<'_>, qmp: &Qmp, old: &str) -> anyhow::Result<()> {
    let name = &c.vm.spec.name;
    for (i, _, _) in &c.disks {
        let node = disk_node(*i);
        match cbt::bitmap_state(qmp, &node, old).await? {
            BitmapState::Ok { .. } => {}
            BitmapState::Missing => {
                return Err(ResyncRequired(format!("change tracking of {node} was lost (generation {old} is missing, e.g. after QEMU was killed): resynchronization required — run `ferry replication resume {name} --resync`")).into())
            }
            BitmapState::Inconsistent => {
                return Err(ResyncRequired(format!("change tracking of {node} is inconsistent (QEMU or the host crashed while the VM ran): resynchronization required — run `ferry replication resume {name} --resync`")).into())
            }
        }
    }
    Ok(())
}

/// Creates the fleecing point (and the new generation); whether the guest's filesystems
/// were frozen for it.
async fn take_point(
    c: &Capture<'_>,
    qmp: &Qmp,
    run_dir: &Path,
) -> anyhow::Result<(FleecePoint, bool)> {
    let shared = c.shared;
    let specs: Vec<NodeSpec> = c
        .disks
        .iter()
        .map(|(i, _, size)| NodeSpec {
            node: disk_node(*i),
            size: *size,
        })
        .collect();
    // Application-consistent when due and the guest runs an agent: its filesystems are
    // frozen only around the (millisecond) transaction that creates the point.
    let mut agent = match due_app_consistent(shared, c.rel) {
        true => freeze_guest(shared, c.vm).await,
        false => None,
    };
    let fleece = FleecePoint::create_with(
        &shared.cfg.qemu_img,
        qmp,
        run_dir,
        &specs,
        c.old_gen.as_deref(),
        &c.new_gen,
        c.rel.settings.granularity as u64,
        c.cycle as u64,
    )
    .await;
    let app_consistent = agent.is_some();
    if let Some(a) = agent.as_mut() {
        if let Err(e) = a.thaw(AGENT_TIMEOUT).await {
            warn!(vm = %c.vm.spec.name, error = %e, "thawing the guest's filesystems failed");
        }
    }
    Ok((fleece?, app_consistent))
}

/// The read is complete: the cycle's description is written, the new generation recorded,
/// and the fleecing point released, keeping the old generation.
async fn finish(
    c: &Capture<'_>,
    qmp: &Qmp,
    fleece: FleecePoint,
    point: &Point,
    read: &ReadSummary,
) -> anyhow::Result<()> {
    let (shared, rel) = (c.shared, c.rel);
    let p = c.describe(point, read);
    if let Err(e) = write_meta(&c.meta_path, &p) {
        let _ = std::fs::remove_file(&c.spool_path);
        let _ = fleece.release(qmp, false).await;
        // The old generation was folded into the new one.
        set_generation(shared, rel.vm_id, c.new_gen_no);
        return Err(e);
    }
    set_generation(shared, rel.vm_id, c.new_gen_no);
    // The old generation stays until the replica has committed this point
    // (ADR 0004 decision 3): if the spool is lost before that (it is not
    // fsynced), the next capture folds it into the new one.
    let report = fleece.release_keeping_generations(qmp).await?;
    if let Some(err) = report.io_error {
        warn!(vm = %c.vm.spec.name, ?err, "a guest write failed during the fleecing window");
    }
    info!(
        vm = %c.vm.spec.name,
        cycle = c.cycle,
        kind = c.kind,
        dirty_bytes = read.dirty_bytes,
        data_bytes = read.data_bytes,
        timing = %read.timing,
        "cycle captured"
    );
    Ok(())
}
