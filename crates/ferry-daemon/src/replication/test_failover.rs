//! Test failover (Hyper-V's "Test Failover"): on the replica server, a throw-away VM
//! `<VM>-test` boots from a chosen recovery point, isolated (no network), while replication
//! goes on adding points. Its disks are new qcow2 overlays on the point's layers, so the
//! point itself is never written; the point is pinned (retention merges nothing it is built
//! on) until `stop-test` deletes the test VM and its overlays. One test per VM at a time.
//! The pin is kept in the store, so it survives a ferryd restart.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_api_types::ActionReply;
use ferry_domain::{DiskSpec, NicKind, Role, VmName, VmState};
use serde::{Deserialize, Serialize};

use super::{now_unix, rel_of, Shared};
use crate::error::ApiFailure;

/// A running test failover, as kept in the store's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestFailover {
    /// The test VM's name.
    pub test_vm: String,
    /// The recovery point it started from.
    pub point: i64,
    /// When it started (UNIX s).
    pub started_at: i64,
    /// The overlays made for it.
    pub overlays: Vec<String>,
}

fn key(vm_id: i64) -> String {
    format!("test_failover:{vm_id}")
}

/// The test failover of a replica VM, if one runs.
pub fn current(shared: &Shared, vm_id: i64) -> Option<TestFailover> {
    let v = shared.store.setting(&key(vm_id)).ok()??;
    serde_json::from_str(&v).ok()
}

/// When the last test failover of a replica VM started (UNIX s).
pub fn last_started(shared: &Shared, vm_id: i64) -> Option<i64> {
    shared
        .store
        .setting(&format!("test_failover_last:{vm_id}"))
        .ok()??
        .parse()
        .ok()
}

/// Starts a test failover of replica VM `name` from `point` (default: the latest). With
/// `network`, a bridge of this host, the test VM's NICs (same MACs) join it — an isolated
/// test network, Hyper-V's test failover switch — and its test failover IP is applied
/// through its agent; without, it has no NICs at all.
pub async fn start(
    shared: &Arc<Shared>,
    name: &str,
    point: Option<i64>,
    network: Option<&str>,
) -> Result<ActionReply, ApiFailure> {
    if let Some(br) = network {
        if !ferry_domain::spec::is_valid_ifname(br) {
            return Err(ApiFailure::invalid(format!(
                "--network {br:?}: use a bridge's interface name (1-15 characters, no spaces or slashes)"
            )));
        }
        crate::vms::require_bridge(br)?;
    }
    let (vm, row, rel) = rel_of(shared, name)?;
    if rel.role != Role::Replica {
        return Err(ApiFailure::invalid(format!(
            "VM {vm} is the primary: test failover runs on its replica server {}",
            rel.partner_name
        )));
    }
    if let Some(t) = current(shared, row.id) {
        return Err(ApiFailure::conflict(format!(
            "a test failover of {vm} is running ({}): stop it first with `ferry failover stop-test {vm}`",
            t.test_vm
        )));
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
            ApiFailure::conflict(format!(
                "{vm} has no recovery point yet: wait for the initial replication"
            ))
        })?,
    };
    let test_name = VmName::new(&format!("{vm}-test")).map_err(|e| {
        ApiFailure::invalid(format!("the test VM's name {vm}-test is not valid: {e}"))
    })?;
    if shared.store.get_vm(&test_name).is_ok() {
        return Err(ApiFailure::conflict(format!(
            "a VM named {test_name} already exists on this host: rename or delete it first"
        )));
    }
    // Pinned before anything reads the point's layers: retention must not merge them now.
    shared.pin(row.id, chosen.id);
    drop(points_locked);
    let result = async {
        let dir = PathBuf::from(&row.spec.disks[0].file)
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| {
                ApiFailure::internal("the replica VM has no storage directory".into())
            })?;
        let mut disks = Vec::new();
        let mut overlays = Vec::new();
        for (i, d) in row.spec.disks.iter().enumerate() {
            let overlay = dir.join(format!("test-p{}-disk{i}.qcow2", chosen.id));
            let mut cmd = tokio::process::Command::new(&shared.cfg.qemu_img);
            cmd.args(["create", "-q", "-f", "qcow2"]);
            // Replicated disks: on the point's layer. Excluded ones: blank.
            if let Some((_, layer)) = chosen.layers.iter().find(|(di, _)| *di == i) {
                cmd.arg("-b").arg(layer).args(["-F", "qcow2"]);
            }
            cmd.arg(&overlay).arg(d.size_bytes.to_string());
            let out = cmd
                .output()
                .await
                .map_err(|e| ApiFailure::internal(format!("qemu-img: {e}")))?;
            if !out.status.success() {
                return Err(ApiFailure::internal(format!(
                    "cannot create the test disk {}: {}",
                    overlay.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            overlays.push(overlay.display().to_string());
            disks.push(DiskSpec {
                file: overlay.display().to_string(),
                size_bytes: d.size_bytes,
                ..d.clone()
            });
        }
        let mut spec = row.spec.clone();
        spec.name = test_name.clone();
        spec.disks = disks;
        // Isolated: a test must never talk to production. Either no NICs, or every NIC on
        // the test network the administrator named (same MACs, so the test failover IP's
        // per-NIC settings find them).
        match network {
            Some(br) => {
                for nic in &mut spec.nics {
                    nic.kind = NicKind::Bridge(br.to_owned());
                }
            }
            None => spec.nics.clear(),
        }
        // Its own directory holds its console log (its disks stay beside the points).
        std::fs::create_dir_all(shared.vms.vm_dir(&test_name)).map_err(|e| {
            ApiFailure::internal(format!("cannot create the test VM's directory: {e}"))
        })?;
        shared.store.insert_vm(&spec, now_unix())?;
        let t = TestFailover {
            test_vm: test_name.to_string(),
            point: chosen.id,
            started_at: now_unix(),
            overlays,
        };
        shared
            .store
            .set_setting(&key(row.id), &serde_json::to_string(&t).expect("serialize"))?;
        shared.store.set_setting(
            &format!("test_failover_last:{}", row.id),
            &t.started_at.to_string(),
        )?;
        Ok::<_, ApiFailure>(t)
    }
    .await;
    let t = match result {
        Ok(t) => t,
        Err(e) => {
            shared.unpin(row.id, chosen.id);
            return Err(e);
        }
    };
    if let Err(e) = shared.vms.start(test_name.as_str()).await {
        stop(shared, name).await.ok();
        return Err(e);
    }
    let mut net = match network {
        Some(br) => format!("on test network {br}"),
        None => "without network".to_owned(),
    };
    if network.is_some() {
        if let Ok(test_row) = shared.store.get_vm(&test_name) {
            let ips = super::reip::present(&test_row.spec, &test_row.spec.test_failover_ip);
            if !ips.is_empty() {
                net.push_str(&format!(
                    "; its test failover IP ({}) is applied through the guest agent once the guest answers (see `ferry events`)",
                    ips.iter().map(|i| i.address.as_str()).collect::<Vec<_>>().join(", ")
                ));
            }
            super::reip::spawn_apply(shared, test_row.id, ips, "test failover");
        }
    }
    shared.events.emit(
        &vm,
        "test_failover_started",
        &format!(
            "test failover started: {} runs from recovery point {} (cycle {}), {net}",
            t.test_vm, chosen.id, chosen.cycle
        ),
    );
    Ok(ActionReply {
        state: VmState::Running,
        message: format!(
            "test VM {} started from recovery point {} (cycle {}), {net}; replication goes on. Stop it with `ferry failover stop-test {vm}`",
            t.test_vm, chosen.id, chosen.cycle
        ),
    })
}

/// Stops a test failover: the test VM and its disks go; every recovery point stays as it was.
pub async fn stop(shared: &Arc<Shared>, name: &str) -> Result<ActionReply, ApiFailure> {
    let (vm, row, _) = rel_of(shared, name)?;
    let Some(t) = current(shared, row.id) else {
        return Err(ApiFailure::conflict(format!(
            "no test failover of {vm} is running"
        )));
    };
    if let Ok(test_row) = shared
        .store
        .get_vm(&VmName::new(&t.test_vm).map_err(|e| ApiFailure::internal(e.to_string()))?)
    {
        if test_row.state != VmState::Off {
            shared.vms.stop(&t.test_vm).await?;
        }
        shared.vms.delete(&t.test_vm).await?;
    }
    for o in &t.overlays {
        let _ = std::fs::remove_file(o);
    }
    shared.store.delete_setting(&key(row.id))?;
    shared.unpin(row.id, t.point);
    shared.events.emit(
        &vm,
        "test_failover_stopped",
        &format!("test failover stopped: {} and its disks deleted", t.test_vm),
    );
    Ok(ActionReply {
        state: VmState::Off,
        message: format!(
            "test VM {} deleted with its disks; the recovery points are unchanged",
            t.test_vm
        ),
    })
}
