//! Unplanned failover on the replica server (Hyper-V's Failover): the replica VM is switched
//! to new qcow2 overlays on a chosen recovery point (instant, nothing copied; the point is
//! pinned and never written) and may be started. Until it is completed the failover can be
//! cancelled: the VM goes off, its overlays and whatever it wrote are discarded, and
//! replication goes on. Completing keeps the chosen point and removes the others.
//! A split-brain guard refuses while the primary still sends recovery points, unless forced.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_api_types::ActionReply;
use ferry_domain::{NicKind, ReplicationState, Role, VmState};
use serde::{Deserialize, Serialize};

use super::{now_unix, rel_of, test_failover, Shared};
use crate::error::ApiFailure;

/// A failover not yet completed, as kept in the store's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failover {
    /// The recovery point failed over to.
    pub point: i64,
    /// The overlays the VM runs on.
    pub overlays: Vec<String>,
    /// When (UNIX s).
    pub started_at: i64,
    /// The NICs as the replica held them before the network mapping (a cancel restores
    /// them: the next failover maps them again).
    #[serde(default)]
    pub nics_before: Option<Vec<ferry_domain::NicSpec>>,
}

fn key(vm_id: i64) -> String {
    format!("failover:{vm_id}")
}

/// Ranges written after the failover point (by the old primary), kept for reverse.
fn later_key(vm_id: i64) -> String {
    format!("failover_later:{vm_id}")
}

/// Ranges the new primary's first reverse cycle sends besides its own changes.
pub fn reverse_extra_key(vm_id: i64) -> String {
    format!("reverse_extra:{vm_id}")
}

/// The ranges allocated in a qcow2 layer itself (not in its backing chain).
async fn allocated_in(qemu_img: &std::path::Path, layer: &std::path::Path) -> Vec<(u64, u64)> {
    let Ok(out) = tokio::process::Command::new(qemu_img)
        .args(["map", "-U", "--output=json", "-f", "qcow2"])
        .arg(layer)
        .output()
        .await
    else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["depth"].as_u64() == Some(0) && e["present"].as_bool() != Some(false))
        .filter_map(|e| Some((e["start"].as_u64()?, e["length"].as_u64()?)))
        .collect()
}

/// The uncompleted failover of a replica VM, if any.
pub fn current(shared: &Shared, vm_id: i64) -> Option<Failover> {
    serde_json::from_str(&shared.store.setting(&key(vm_id)).ok()??).ok()
}

/// Fails the replica VM `name` over to `point` (default: the latest), optionally starting it.
pub async fn start(
    shared: &Arc<Shared>,
    name: &str,
    point: Option<i64>,
    power_on: bool,
    force: bool,
) -> Result<ActionReply, ApiFailure> {
    let (vm, row, rel) = rel_of(shared, name)?;
    if rel.role != Role::Replica {
        return Err(ApiFailure::invalid(format!(
            "VM {vm} is the primary: an unplanned failover runs on its replica server {} (for a planned one, stop the VM and fail over from there)",
            rel.partner_name
        )));
    }
    if matches!(
        rel.state,
        ReplicationState::FailedOverWaitingCompletion | ReplicationState::FailedOver
    ) {
        return Err(ApiFailure::conflict(format!(
            "VM {vm} is already failed over: complete or cancel that failover first"
        )));
    }
    if let Some(t) = test_failover::current(shared, row.id) {
        return Err(ApiFailure::conflict(format!(
            "a test failover of {vm} is running ({}): stop it first with `ferry failover stop-test {vm}`",
            t.test_vm
        )));
    }
    // Split-brain guard: a primary that sent a point lately is probably still running.
    let recent = 3 * rel.settings.interval.secs() as i64 + 30;
    if let (Some(at), false) = (rel.last_point_at, force) {
        let age = now_unix() - at;
        if age < recent {
            return Err(ApiFailure::conflict(format!(
                "the primary {} sent a recovery point of {vm} {age} s ago: it is probably still running, and two running copies would diverge; fail over with --force only if it is down (without data loss: stop the VM there and run a planned failover)",
                rel.partner_name
            )));
        }
    }
    // Chosen and pinned while retention cannot be merging (it would delete the chosen
    // point's layer under us).
    let points_locked = shared.lock_points(row.id).await;
    let points = shared.store.list_points(row.id)?;
    let chosen = match point {
        Some(id) => points.iter().find(|p| p.id == id).cloned().ok_or_else(|| {
            ApiFailure::not_found(format!(
                "{vm} has no recovery point {id} (see `ferry replication points {vm}`)"
            ))
        })?,
        None => points.last().cloned().ok_or_else(|| {
            ApiFailure::conflict(format!("{vm} has no recovery point to fail over to"))
        })?,
    };
    shared.pin(row.id, chosen.id);
    drop(points_locked);
    let dir = PathBuf::from(&row.spec.disks[0].file)
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| ApiFailure::internal("the replica VM has no storage directory".into()))?;
    let mut spec = row.spec.clone();
    let nics_before = spec.nics.clone();
    let mut overlays = Vec::new();
    for (i, d) in spec.disks.iter_mut().enumerate() {
        let Some((_, layer)) = chosen.layers.iter().find(|(di, _)| *di == i) else {
            continue; // an excluded disk keeps its blank image
        };
        let overlay = dir.join(format!("failover-p{}-disk{i}.qcow2", chosen.id));
        let out = tokio::process::Command::new(&shared.cfg.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(layer)
            .args(["-F", "qcow2"])
            .arg(&overlay)
            .arg(d.size_bytes.to_string())
            .output()
            .await
            .map_err(|e| ApiFailure::internal(format!("qemu-img: {e}")))?;
        if !out.status.success() {
            shared.unpin(row.id, chosen.id);
            for o in &overlays {
                let _ = std::fs::remove_file(o);
            }
            return Err(ApiFailure::internal(format!(
                "cannot create {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // Everything the failed-over VM writes is tracked from its first write, so reverse
        // replication ships only that (generation 1 of the reversed relationship).
        let out = tokio::process::Command::new(&shared.cfg.qemu_img)
            .args(["bitmap", "--add", "-f", "qcow2", "-g"])
            .arg(rel.settings.granularity.to_string())
            .arg(&overlay)
            .arg(super::primary::generation_name(1))
            .output()
            .await
            .map_err(|e| ApiFailure::internal(format!("qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(ApiFailure::internal(format!(
                "cannot start change tracking on {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        d.file = overlay.display().to_string();
        overlays.push(d.file.clone());
    }
    // Network mapping, this host's own: a bridged NIC joins the bridge the replica server's
    // mapping gives for the primary's bridge (for that primary, or for any), else this
    // host's default bridge; a NIC with neither is left out rather than attached to a
    // bridge the primary named.
    let map = super::replica::config_for(shared, spec.name.as_str()).bridge_map;
    let mut left_out = Vec::new();
    spec.nics.retain_mut(|n| {
        let NicKind::Bridge(from) = &n.kind else {
            return true;
        };
        let to = map
            .get(&format!("{}/{from}", rel.partner_name))
            .or_else(|| map.get(from))
            .or(shared.cfg.default_bridge.as_ref());
        match to {
            Some(to) => {
                n.kind = NicKind::Bridge(to.clone());
                true
            }
            None => {
                left_out.push(format!("{} (bridge {from} on {})", n.mac, rel.partner_name));
                false
            }
        }
    });
    // What the primary wrote after the chosen point (the layers of the later points), for a
    // reverse replication that sends only what differs.
    let mut later = Vec::new();
    for p in points.iter().filter(|p| p.cycle > chosen.cycle) {
        for (disk, layer) in &p.layers {
            later.extend(
                allocated_in(&shared.cfg.qemu_img, std::path::Path::new(layer))
                    .await
                    .into_iter()
                    .map(|(o, l)| (*disk, o, l)),
            );
        }
    }
    shared.store.set_setting(
        &later_key(row.id),
        &serde_json::to_string(&later).expect("serialize"),
    )?;
    let f = Failover {
        point: chosen.id,
        overlays,
        started_at: now_unix(),
        nics_before: Some(nics_before),
    };
    shared
        .store
        .set_setting(&key(row.id), &serde_json::to_string(&f).expect("serialize"))?;
    shared.store.set_vm_spec(row.id, &spec)?;
    shared
        .store
        .set_replication_state_only(row.id, ReplicationState::FailedOverWaitingCompletion)?;
    shared.events.emit(
        &vm,
        "failover_started",
        &format!(
            "failed over to recovery point {} (cycle {}){}",
            chosen.id,
            chosen.cycle,
            if force {
                ", forced past the split-brain guard"
            } else {
                ""
            }
        ),
    );
    let mut message = format!(
        "{vm} failed over to recovery point {} (cycle {}); complete with `ferry failover complete {vm}` or cancel with `ferry failover cancel {vm}`",
        chosen.id, chosen.cycle
    );
    if !left_out.is_empty() {
        message.push_str(&format!(
            "; left out NIC {} (no network mapping here: `ferry replica-server set --map-bridge {}/BRIDGE=LOCAL_BRIDGE`)",
            left_out.join(", "),
            rel.partner_name
        ));
    }
    let mut state = VmState::Off;
    let ips = super::reip::present(&spec, &spec.failover_ip);
    if power_on {
        shared.vms.start(vm.as_str()).await?;
        state = VmState::Running;
        message.push_str("; the VM is running");
        if !ips.is_empty() {
            message.push_str(&format!(
                "; its failover IP ({}) is applied through the guest agent once the guest answers (see `ferry events`)",
                ips.iter().map(|i| i.address.as_str()).collect::<Vec<_>>().join(", ")
            ));
            super::reip::spawn_apply(shared, row.id, ips, "failover");
        }
    } else if !ips.is_empty() {
        // Started later by hand (`ferry vm start`): applied then, once.
        shared
            .store
            .set_setting(&super::reip::pending_key(row.id), "1")?;
        message.push_str("; its failover IP is applied through the guest agent when it starts");
    }
    Ok(ActionReply { state, message })
}

/// Reverse replication, run on the failed-over replica: it becomes the primary and
/// replicates back to the old primary, whose disk holds the point it failed over to; only
/// what the VM wrote since the failover is sent (tracked from the failover on).
pub async fn reverse(
    shared: &Arc<Shared>,
    name: &str,
    to_name: &str,
    to_addr: &str,
    to_fingerprint: &str,
    resync: bool,
) -> Result<ferry_api_types::ReplicationInfo, ApiFailure> {
    let (vm, row, rel) = rel_of(shared, name)?;
    if rel.role != Role::Replica
        || !matches!(
            rel.state,
            ReplicationState::FailedOverWaitingCompletion | ReplicationState::FailedOver
        )
    {
        return Err(ApiFailure::conflict(format!(
            "VM {vm} is not failed over here: reverse replication runs on the replica after a failover"
        )));
    }
    let fp = ferry_client::normalize_fingerprint(to_fingerprint);
    if fp != rel.partner_fingerprint {
        return Err(ApiFailure::invalid(format!(
            "reverse replication goes back to {vm}'s old primary {} (certificate {}), not to that host",
            rel.partner_name, rel.partner_fingerprint
        )));
    }
    if current(shared, row.id).is_some() {
        complete(shared, name).await?;
    }
    let row = shared.store.get_vm(&vm)?;
    let mut settings = rel.settings.clone();
    settings.relationship_id = {
        let h = blake3::hash(format!("{fp}{}{}", super::now_ms(), row.id).as_bytes());
        u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | 1
    };
    // Cycle 1 of the reversed relationship is the failover point, which both sides hold;
    // generation 1 (started on the failover overlays) tracks what came after.
    let new_rel = ferry_store::ReplicationRow {
        vm_id: row.id,
        role: Role::Primary,
        partner_name: to_name.to_owned(),
        partner_addr: to_addr.to_owned(),
        partner_fingerprint: fp,
        settings,
        state: if resync {
            ReplicationState::Resynchronizing
        } else {
            ReplicationState::Replicating
        },
        generation: 1,
        last_cycle: 1,
        last_point_at: Some(now_unix()),
        last_error: None,
        created_at: now_unix(),
    };
    let key = super::primary::reverse_key(row.id);
    shared.store.set_setting(&key, "1")?;
    let from_old_primary = match super::primary::handshake(shared, &row, &new_rel).await {
        Ok(session) => {
            let extra = session.extra.clone();
            session.close().await;
            extra
        }
        Err(e) => {
            shared.store.delete_setting(&key)?;
            return Err(ApiFailure::invalid(format!("{e:#}")));
        }
    };
    shared.store.delete_setting(&key)?;
    // The first cycle also sends what the old primary wrote after the failover point: the
    // later recovery points' ranges (recorded at failover) and what it wrote after its last
    // cycle (it just told us); with its own changes since the failover, that is the union.
    let mut extra: Vec<(usize, u64, u64)> = shared
        .store
        .setting(&later_key(row.id))?
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default();
    extra.extend(from_old_primary);
    if !extra.is_empty() && !resync {
        shared.store.set_setting(
            &reverse_extra_key(row.id),
            &serde_json::to_string(&extra).expect("serialize"),
        )?;
    }
    shared.store.delete_setting(&later_key(row.id))?;
    for p in shared.store.list_points(row.id)? {
        shared.store.delete_point(p.id)?;
    }
    shared.store.delete_replication(row.id)?;
    shared.store.insert_replication(&new_rel)?;
    shared.spawn_primary(row.id);
    shared.events.emit(
        &vm,
        "replication_reversed",
        &format!("{vm} now replicates to {to_name} (reverse replication, delta only)"),
    );
    Ok(super::info(shared, &vm, &new_rel))
}

/// Planned failover, run on the primary: the VM must be off; every change is shipped (zero
/// data loss), the primary is "prepared for failover" (the VM does not start here), and the
/// replica fails over to that last point (and starts it if asked).
pub async fn planned(
    shared: &Arc<Shared>,
    name: &str,
    power_on: bool,
    reverse: bool,
) -> Result<ActionReply, ApiFailure> {
    let (vm, row, rel) = rel_of(shared, name)?;
    // Reversing needs this host to accept replication, from the replica.
    let reverse_to = if reverse {
        let listening = shared.replica.listening.lock().expect("listening").clone();
        match listening {
            Some(addr) => Some((shared.cfg.name.clone(), addr)),
            None => {
                return Err(ApiFailure::conflict(format!(
                    "--reverse needs {} to accept replication from {}: run `ferry replica-server set --enable --allow {}=FINGERPRINT --storage DIR` here first",
                    shared.cfg.name, rel.partner_name, rel.partner_name
                )))
            }
        }
    } else {
        None
    };
    if rel.role != Role::Primary {
        return Err(ApiFailure::invalid(format!(
            "VM {vm} is a replica: run the planned failover on its primary {} (here: `ferry failover start {vm}` for an unplanned one)",
            rel.partner_name
        )));
    }
    if row.state != VmState::Off {
        return Err(ApiFailure::conflict(format!(
            "VM {vm} is {}: shut it down first, so that the final cycle ships every change",
            row.state
        )));
    }
    if rel.state != ReplicationState::Replicating {
        return Err(ApiFailure::conflict(format!(
            "replication of {vm} is {} ({}): a planned failover needs it replicating",
            rel.state.label(),
            rel.state
        )));
    }
    // No cycle of the relationship's own from now on: the final ones run here.
    shared.stop_primary(row.id);
    let restore = |why: String| {
        let _ = shared
            .store
            .set_replication_state_only(row.id, ReplicationState::Replicating);
        shared.spawn_primary(row.id);
        ApiFailure::conflict(format!(
            "planned failover of {vm} stopped, nothing changed: {why}"
        ))
    };
    // A spool captured earlier goes first, then the stopped VM's last changes.
    for _ in 0..2 {
        let Some(rel) = shared.store.replication(row.id)? else {
            return Err(restore("replication was removed".into()));
        };
        super::primary::run_cycle(shared, &rel).await;
        let after = shared.store.replication(row.id)?;
        if let Some(err) = after.as_ref().and_then(|r| r.last_error.clone()) {
            return Err(restore(format!("the final cycle failed: {err}")));
        }
    }
    if super::primary::pending(shared, row.id).is_some() {
        return Err(restore("a captured cycle could not be shipped".into()));
    }
    shared
        .store
        .set_replication_state_only(row.id, ReplicationState::PreparedForFailover)?;
    let Some(rel) = shared.store.replication(row.id)? else {
        return Err(restore("replication was removed".into()));
    };
    let row = shared.store.get_vm(&vm)?;
    let done = match super::primary::send_planned_failover(shared, &row, &rel, power_on, reverse_to)
        .await
    {
        Ok(m) => m,
        Err(e) => return Err(restore(format!("{e:#}"))),
    };
    shared.events.emit(
        &vm,
        "planned_failover",
        &format!(
            "planned failover: every change up to cycle {} is on {}; {done}",
            rel.last_cycle, rel.partner_name
        ),
    );
    Ok(ActionReply {
        state: VmState::Off,
        message: format!(
            "{vm} is prepared for planned failover: every change (cycle {}) is on {}, which reports: {done}",
            rel.last_cycle, rel.partner_name
        ),
    })
}

/// Cancels a failover. On the primary: a planned failover (the VM may start here again).
/// On the replica: the VM goes off, what it wrote is discarded, and the replica VM shows
/// its latest recovery point again.
pub async fn cancel(shared: &Arc<Shared>, name: &str) -> Result<ActionReply, ApiFailure> {
    let (vm, row, rel) = rel_of(shared, name)?;
    if rel.role == Role::Primary {
        if rel.state != ReplicationState::PreparedForFailover {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} is not prepared for a planned failover"
            )));
        }
        shared
            .store
            .set_replication_state_only(row.id, ReplicationState::Replicating)?;
        shared.spawn_primary(row.id);
        shared.events.emit(
            &vm,
            "failover_cancelled",
            "planned failover cancelled on the primary",
        );
        return Ok(ActionReply {
            state: row.state,
            message: format!(
                "planned failover of {vm} cancelled here: the VM may start again; if {} failed it over, cancel it there too (`ferry failover cancel {vm}` on {})",
                rel.partner_name, rel.partner_name
            ),
        });
    }
    let Some(f) = current(shared, row.id) else {
        return Err(ApiFailure::conflict(format!(
            "VM {vm} has no failover to cancel{}",
            if rel.state == ReplicationState::FailedOver {
                " (it was completed)"
            } else {
                ""
            }
        )));
    };
    if row.state != VmState::Off {
        shared.vms.stop(vm.as_str()).await?;
    }
    let mut spec = shared.store.get_vm(&vm)?.spec;
    if let Some(nics) = f.nics_before.clone() {
        spec.nics = nics;
    }
    if let Some(latest) = shared.store.list_points(row.id)?.pop() {
        for (d, layer) in &latest.layers {
            if let Some(slot) = spec.disks.get_mut(*d) {
                slot.file = layer.clone();
            }
        }
    }
    shared.store.set_vm_spec(row.id, &spec)?;
    for o in &f.overlays {
        let _ = std::fs::remove_file(o);
    }
    shared.store.delete_setting(&key(row.id))?;
    shared.store.delete_setting(&later_key(row.id))?;
    shared
        .store
        .delete_setting(&super::reip::pending_key(row.id))?;
    shared.unpin(row.id, f.point);
    shared
        .store
        .set_replication_state_only(row.id, ReplicationState::Replicating)?;
    shared.events.emit(
        &vm,
        "failover_cancelled",
        "failover cancelled: what the VM wrote is discarded, replication goes on",
    );
    Ok(ActionReply {
        state: VmState::Off,
        message: format!(
            "failover of {vm} cancelled; what it wrote was discarded; replication goes on"
        ),
    })
}

/// Completes a failover: the chosen point becomes the VM's base for good and the other
/// recovery points are removed.
pub async fn complete(shared: &Arc<Shared>, name: &str) -> Result<ActionReply, ApiFailure> {
    let (vm, row, _) = rel_of(shared, name)?;
    let Some(f) = current(shared, row.id) else {
        return Err(ApiFailure::conflict(format!(
            "VM {vm} has no failover to complete"
        )));
    };
    let points = shared.store.list_points(row.id)?;
    let pos = points.iter().position(|p| p.id == f.point);
    for (i, p) in points.iter().enumerate() {
        if p.id == f.point {
            continue;
        }
        shared.store.delete_point(p.id)?;
        // Layers of later points are not under the VM's disks: they go. Earlier ones are
        // (the chosen point is built on them) and stay as files.
        if pos.is_some_and(|pos| i > pos) {
            for (_, layer) in &p.layers {
                let _ = std::fs::remove_file(layer);
            }
        }
    }
    shared.store.delete_setting(&key(row.id))?;
    shared.unpin(row.id, f.point);
    shared
        .store
        .set_replication_state_only(row.id, ReplicationState::FailedOver)?;
    shared.events.emit(
        &vm,
        "failover_completed",
        &format!(
            "failover completed on recovery point {}; the other points were removed",
            f.point
        ),
    );
    Ok(ActionReply {
        state: shared.store.get_vm(&vm)?.state,
        message: format!(
            "failover of {vm} completed: it keeps recovery point {} and the other points were removed",
            f.point
        ),
    })
}
