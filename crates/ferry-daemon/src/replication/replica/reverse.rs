//! Reverse replication, on the old primary: after a failover, the VM here becomes the
//! replica of its failed-over copy, with its own disks as the first recovery point. It
//! exists beside the data path because it turns a primary's VM into a replica before the
//! first cycle arrives.

use std::sync::Arc;

use ferry_domain::replication::ReplicationSettings;
use ferry_domain::{ReplicationState, Role, VmSpec, VmState};
use ferry_nbd::NbdClient;
use ferry_qemu::cbt::OfflineExport;
use ferry_store::{PointRow, ReplicationRow};
use ferry_wire::FrameKind;
use tokio::process::Command;

use crate::replication::{now_unix, qemu_nbd_path, Shared};

/// Settings key: until when (UNIX s) this host's admin agreed that VM `vm_id` becomes the
/// replica of its failed-over copy (`ferry replication accept-reverse`).
pub fn reverse_accept_key(vm_id: i64) -> String {
    format!("reverse_accepted:{vm_id}")
}

/// How long an `accept-reverse` holds.
pub const REVERSE_ACCEPT_FOR_S: i64 = 3600;

/// Reverse replication reaches the old primary: its VM (off, prepared for a planned
/// failover, or with a failover done elsewhere) becomes the replica of the new primary. Its
/// disks hold exactly cycle `cycle` of the new direction, so they become the first recovery
/// point as they are: nothing is copied, and the next cycles are deltas. Idempotent: a
/// relationship already reversed is left alone.
#[allow(clippy::too_many_arguments)]
pub(super) async fn become_replica(
    shared: &Arc<Shared>,
    primary: &str,
    fingerprint: &str,
    from_ip: &str,
    spec: &VmSpec,
    settings: &ReplicationSettings,
    cycle: i64,
    resync: bool,
) -> Result<Vec<(usize, u64, u64)>, String> {
    let store = &shared.store;
    let me = &shared.cfg.name;
    let row = store
        .get_vm(&spec.name)
        .map_err(|_| format!("{me} has no VM {} to reverse replication onto", spec.name))?;
    let rel = store
        .replication(row.id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "VM {} on {me} is not replicated: it cannot receive reverse replication",
                spec.name
            )
        })?;
    if rel.role == Role::Replica && rel.partner_fingerprint == fingerprint {
        return Ok(Vec::new()); // already reversed
    }
    if rel.role != Role::Primary || rel.partner_fingerprint != fingerprint {
        return Err(format!(
            "VM {} on {me} does not replicate to {primary}: reverse replication goes back to the old primary only",
            spec.name
        ));
    }
    if row.state != VmState::Off {
        return Err(format!(
            "VM {} runs on {me}: reverse replication would overwrite it; shut it down first (two running copies diverge)",
            spec.name
        ));
    }
    // The peer is this VM's replica server, but that alone must not let it overwrite the
    // VM here: only a planned failover this host ran, or this host's admin, agrees to it.
    let accept_key = reverse_accept_key(row.id);
    let accepted = store
        .setting(&accept_key)
        .ok()
        .flatten()
        .and_then(|v| v.parse::<i64>().ok())
        .is_some_and(|until| until >= now_unix());
    if rel.state != ReplicationState::PreparedForFailover && !accepted {
        return Err(format!(
            "{me} did not agree to become the replica of {}: no planned failover prepared it; if {} really failed over, on {me} run `ferry replication accept-reverse {}`, then reverse again",
            spec.name, spec.name, spec.name
        ));
    }
    // After a planned failover this disk is exactly the failover point. After an unplanned
    // one it may hold writes made after the last cycle the replica got: what its change
    // tracking and any unsent spool cover goes back to the new primary, which sends those
    // ranges too (unless the first cycle compares everything anyway).
    let extra = if rel.state != ReplicationState::PreparedForFailover && !resync {
        writes_since_last_cycle(shared, &row, &rel)
            .await
            .map_err(|e| format!("cannot tell what {} wrote after its last cycle: {e:#}; reverse with --resync instead", spec.name))?
    } else {
        Vec::new()
    };
    crate::replication::primary::discard_spool(shared, row.id);
    // Its own change tracking has no meaning any more.
    let vm_dir = shared.vms.vm_dir(&row.spec.name);
    let mut replica_spec = row.spec.clone();
    let mut layers = Vec::new();
    for (i, d) in replica_spec.disks.iter_mut().enumerate() {
        let path = vm_dir.join(&d.file);
        if let Ok(o) = Command::new(&shared.cfg.qemu_img)
            .args(["info", "-U", "--output=json"])
            .arg(&path)
            .output()
            .await
        {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            for b in v["format-specific"]["data"]["bitmaps"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(n) = b["name"].as_str().filter(|n| n.starts_with("ferry-r")) {
                    let _ = Command::new(&shared.cfg.qemu_img)
                        .args(["bitmap", "--remove", "-f", "qcow2"])
                        .arg(&path)
                        .arg(n)
                        .status()
                        .await;
                }
            }
        }
        d.file = path.display().to_string();
        if !settings.excluded_disks.contains(&i) {
            layers.push((i, d.file.clone()));
        }
    }
    store
        .delete_replication(row.id)
        .map_err(|e| e.to_string())?;
    let new_rel = ReplicationRow {
        vm_id: row.id,
        role: Role::Replica,
        partner_name: primary.to_owned(),
        partner_addr: from_ip.to_owned(),
        partner_fingerprint: fingerprint.to_owned(),
        settings: settings.clone(),
        state: ReplicationState::Replicating,
        generation: 0,
        last_cycle: cycle,
        last_point_at: Some(now_unix()),
        last_error: None,
        created_at: now_unix(),
    };
    store
        .insert_replication(&new_rel)
        .map_err(|e| e.to_string())?;
    store
        .set_vm_spec(row.id, &replica_spec)
        .map_err(|e| e.to_string())?;
    let point = PointRow {
        id: 0,
        vm_id: row.id,
        cycle,
        taken_at: now_unix(),
        applied_at: now_unix(),
        kind: "reverse-base".into(),
        layers,
        bytes: 0,
        consistency: "crash".into(),
    };
    store
        .commit_point(&point, &new_rel)
        .map_err(|e| e.to_string())?;
    let _ = store.delete_setting(&accept_key);
    shared.events.emit(
        &spec.name,
        "replication_reversed",
        &format!(
            "{} now replicates from {primary}; this host holds its replica (delta only)",
            spec.name
        ),
    );
    Ok(extra)
}

/// What a stopped primary wrote after its last cycle reached the replica: every change
/// tracking generation on its images, and the extents of a spool not yet shipped.
async fn writes_since_last_cycle(
    shared: &Arc<Shared>,
    row: &ferry_store::VmRow,
    rel: &ReplicationRow,
) -> anyhow::Result<Vec<(usize, u64, u64)>> {
    let mut out = Vec::new();
    let qemu_nbd = qemu_nbd_path(&shared.cfg);
    let vm_dir = shared.vms.vm_dir(&row.spec.name);
    // This host's own engine may be running an offline cycle of the same VM (it rotates
    // bitmaps, which takes the image's write lock): one at a time.
    let _vm_lock = shared.vms.lock_vm(&row.spec.name).await;
    // Read again under the lock: a cycle that ran meanwhile moved to a newer generation.
    let fresh = shared.store.replication(row.id)?;
    let rel = fresh.as_ref().unwrap_or(rel);
    for i in rel.settings.replicated_disks(row.spec.disks.len()) {
        let image = vm_dir.join(&row.spec.disks[i].file);
        let bitmaps = ferry_qemu::cbt::offline_bitmaps(&shared.cfg.qemu_img, &image).await?;
        // Without the current generation (QEMU was killed before it saved it) the writes
        // since the last cycle are unknown: only a comparison is safe.
        let current = crate::replication::primary::generation_name(rel.generation);
        if rel.generation > 0 && !bitmaps.iter().any(|b| b.name == current) {
            anyhow::bail!(
                "change tracking of {} was lost (QEMU did not shut down cleanly)",
                image.display()
            );
        }
        for b in bitmaps {
            if !b.name.starts_with("ferry-r") {
                continue;
            }
            if b.in_use() {
                anyhow::bail!("change tracking of {} is inconsistent", image.display());
            }
            let socket = shared
                .cfg
                .data_dir
                .join("run")
                .join(format!("rev-{}-{i}.sock", row.id));
            let export = OfflineExport::start(&qemu_nbd, &image, Some(&b.name), &socket).await?;
            let ctx = ferry_nbd::dirty_bitmap_context(&b.name);
            let result = async {
                let mut c =
                    NbdClient::connect_unix(&socket, export.export_name(), &[ctx.as_str()]).await?;
                let map = c.map(&ctx).await?;
                let _ = c.disconnect().await;
                Ok::<_, anyhow::Error>(map)
            }
            .await;
            let _ = export.close().await;
            for e in result?.into_iter().filter(|e| e.flags & 1 != 0) {
                out.push((i, e.offset, e.length));
            }
        }
    }
    let spool = shared.cfg.data_dir.join("spool").join(row.id.to_string());
    if let Ok(rd) = std::fs::read_dir(spool) {
        for f in rd
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().ends_with(".spool"))
        {
            let mut reader = ferry_wire::SpoolReader::open(f.path()).await?;
            while let Some(frame) = reader.next_frame().await? {
                if frame.kind == FrameKind::ExtentBatch {
                    for e in frame.batch()?.extents {
                        out.push((e.disk as usize, e.offset, e.len()));
                    }
                }
            }
        }
    }
    Ok(out)
}
