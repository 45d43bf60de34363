//! Checkpoints (Hyper-V's "snapshots"): create, list, apply, rename, delete (one or a
//! subtree), export, and import of an export as a new VM.
//!
//! A checkpoint is an internal qcow2 snapshot with the same tag in every disk of the VM
//! (and, for a standard checkpoint, the memory and device state in disk 0), plus a row in
//! the store that places it in the VM's tree. Internal snapshots suit the tree: any of them
//! can be applied or deleted without touching the others, and deleting one frees only the
//! clusters nothing else uses, so the rest stay applicable.
//!
//! With replication: the relationship's dirty bitmaps survive an apply (stashed and put
//! back), and what the apply changed is read from the qcow2 metadata (the clusters whose
//! mapping differs between the current state and the checkpoint): the next cycle ships just
//! that, through the same "extra ranges" path reverse replication uses. When it cannot be
//! known (a bitmap was inconsistent, the image has features the reader does not handle), the
//! relationship becomes "resynchronization required" with the reason.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api_types::{
    ActionReply, CheckpointCreateRequest, CheckpointInfo, CheckpointKind, CheckpointList,
    DiskRequest, ImageFormat, NicRequest, Progress, VmCreateRequest, VmImportRequest, VmInfo,
};
use ferry_domain::{
    Boot, CdromSpec, CivilTime, DiskRole, NicKind, ReplicationState, Role, VmName, VmSpec, VmState,
};
use ferry_qemu::process::disk_node;
use ferry_qemu::qmp::{self, Qmp, Transaction, TransactionAction};
use ferry_qemu::{qcow2, snapshot};
use ferry_store::{CheckpointRow, VmRow};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::ApiFailure;
use crate::replication::{self, failover::reverse_extra_key};

/// The unit in which an apply's changes are found and shipped: the guest block size (a
/// qcow2 cluster, 64 KiB, would ship up to 16 times the bytes of scattered 4 KiB writes).
const DIFF_UNIT: u64 = 4096;
/// Hyper-V's limit per VM.
pub const MAX_CHECKPOINTS: usize = 50;
/// Hyper-V's limit on a checkpoint name.
pub const MAX_NAME_CHARS: usize = 100;
/// How long saving memory state may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);
/// The manifest of an export folder; written last, so its presence marks a complete export.
const EXPORT_MANIFEST: &str = "ferry-export.json";

/// The manifest of a checkpoint export.
#[derive(Debug, Serialize, Deserialize)]
struct ExportManifest {
    /// Format version.
    format: u32,
    /// The exported VM's spec (disk `i` is `disk{i}.qcow2` in the folder).
    spec: VmSpec,
    /// The checkpoint's name.
    checkpoint: String,
    /// When it was taken (UNIX ms).
    created_ms: i64,
}

/// Checkpoint operations. At most one runs per VM; another is refused, not queued.
pub struct Checkpoints {
    shared: Arc<replication::Shared>,
    busy: Mutex<HashMap<String, &'static str>>,
    /// Progress of the long operation running on a VM (export), for the API.
    progress: Mutex<HashMap<String, Progress>>,
}

/// Shows a VM's operation progress in the API until dropped.
struct ProgressGuard<'a> {
    map: &'a Mutex<HashMap<String, Progress>>,
    vm: String,
}

impl<'a> ProgressGuard<'a> {
    fn start(
        map: &'a Mutex<HashMap<String, Progress>>,
        vm: &VmName,
        phase: &str,
        total: u64,
    ) -> Self {
        map.lock().expect("progress").insert(
            vm.to_string(),
            Progress {
                phase: phase.into(),
                done_bytes: 0,
                total_bytes: total,
                percent: 0,
            },
        );
        Self {
            map,
            vm: vm.to_string(),
        }
    }
}

impl Drop for ProgressGuard<'_> {
    fn drop(&mut self) {
        self.map.lock().expect("progress").remove(&self.vm);
    }
}

/// Marks a VM busy with a checkpoint operation until dropped.
struct Busy<'a> {
    map: &'a Mutex<HashMap<String, &'static str>>,
    vm: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.map.lock().expect("busy").remove(&self.vm);
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Hyper-V's default name, "VM (MM/DD/YYYY - hh:mm:ss AM/PM)", in UTC, cut to fit the
/// name limit.
pub fn default_name(vm: &str, unix_s: i64) -> String {
    let t = CivilTime::from_unix(unix_s);
    let (h12, ampm) = match t.hour {
        0 => (12, "AM"),
        1..=11 => (t.hour, "AM"),
        12 => (12, "PM"),
        _ => (t.hour - 12, "PM"),
    };
    let stamp = format!(
        " ({:02}/{:02}/{} - {h12:02}:{:02}:{:02} {ampm})",
        t.month, t.day, t.year, t.minute, t.second
    );
    let room = MAX_NAME_CHARS - stamp.chars().count();
    let vm: String = vm.chars().take(room).collect();
    format!("{vm}{stamp}")
}

/// Checks a checkpoint name: not blank, at most 100 characters, no control characters.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("a checkpoint name cannot be empty".into());
    }
    let n = name.chars().count();
    if n > MAX_NAME_CHARS {
        return Err(format!(
            "a checkpoint name has at most {MAX_NAME_CHARS} characters; this one has {n}"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("a checkpoint name cannot contain control characters".into());
    }
    Ok(())
}

/// The checkpoint with this id, or the only one with this name; a number that is both one
/// checkpoint's id and another's name is ambiguous.
fn resolve<'a>(
    list: &'a [CheckpointRow],
    vm: &VmName,
    cp: &str,
) -> Result<&'a CheckpointRow, ApiFailure> {
    let by_id = cp
        .parse::<i64>()
        .ok()
        .and_then(|id| list.iter().find(|c| c.id == id));
    let named: Vec<&CheckpointRow> = list.iter().filter(|c| c.name == cp).collect();
    match (by_id, named.as_slice()) {
        (Some(c), []) => Ok(c),
        (Some(c), [n]) if n.id == c.id => Ok(c),
        (None, [one]) => Ok(one),
        (None, []) => Err(ApiFailure::not_found(format!(
            "VM {vm} has no checkpoint {cp:?}; see `ferry checkpoint list {vm}`"
        ))),
        (by_id, many) => {
            let ids: Vec<String> = by_id
                .into_iter()
                .chain(many.iter().copied())
                .map(|c| c.id.to_string())
                .collect();
            Err(ApiFailure::conflict(format!(
                "{cp:?} names several checkpoints of VM {vm} (ids {}); name one by an id no other checkpoint is named",
                ids.join(", ")
            )))
        }
    }
}

fn info(c: &CheckpointRow) -> CheckpointInfo {
    CheckpointInfo {
        id: c.id,
        name: c.name.clone(),
        parent_id: c.parent_id,
        kind: c.kind.clone(),
        consistency: c.consistency.clone(),
        with_memory: c.with_memory,
        created_ms: c.created_ms,
    }
}

fn qemu_err(vm: &VmName, what: &str, e: impl std::fmt::Display) -> ApiFailure {
    ApiFailure::qemu(format!("{vm}: {what} failed: {e}"))
}

impl Checkpoints {
    /// Checkpoint operations over the replication engine's shared state (store, VMs, events).
    pub fn new(shared: Arc<replication::Shared>) -> Arc<Self> {
        Arc::new(Self {
            shared,
            busy: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
        })
    }

    fn set_progress(&self, vm: &VmName, done: u64) {
        if let Some(p) = self.progress.lock().expect("progress").get_mut(vm.as_str()) {
            p.done_bytes = done.min(p.total_bytes);
            p.percent = (p.done_bytes * 100).checked_div(p.total_bytes).unwrap_or(0) as u8;
        }
    }

    fn begin(&self, vm: &VmName, what: &'static str) -> Result<Busy<'_>, ApiFailure> {
        let mut busy = self.busy.lock().expect("busy");
        if let Some(running) = busy.get(vm.as_str()) {
            return Err(ApiFailure::conflict(format!(
                "another checkpoint operation ({running}) is running on VM {vm}; retry when it has finished"
            )));
        }
        busy.insert(vm.to_string(), what);
        Ok(Busy {
            map: &self.busy,
            vm: vm.to_string(),
        })
    }

    /// Refuses VMs whose disks are not theirs to change: replicas (their recovery points
    /// are the replica's history) and primaries handed over in a planned failover.
    fn check_replication(&self, vm: &VmName, row: &VmRow, verb: &str) -> Result<(), ApiFailure> {
        let Some(rel) = self.shared.store.replication(row.id)? else {
            return Ok(());
        };
        if rel.role == Role::Replica {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} is a replica: it cannot {verb} checkpoints (its recovery points are listed by `ferry replication points {vm}`); checkpoints belong to the primary, {}",
                rel.partner_name
            )));
        }
        if rel.state == ReplicationState::PreparedForFailover && verb != "list" {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} is prepared for a planned failover to {}: cancel it first (`ferry failover cancel {vm}`)",
                rel.partner_name
            )));
        }
        Ok(())
    }

    fn check_settled(vm: &VmName, row: &VmRow) -> Result<(), ApiFailure> {
        match row.state {
            VmState::Off | VmState::Running | VmState::Paused => Ok(()),
            other => Err(ApiFailure::conflict(format!(
                "VM {vm} is {other} (another operation is running); retry when it has finished"
            ))),
        }
    }

    /// The VM's checkpoint tree.
    pub fn list(&self, name: &str) -> Result<CheckpointList, ApiFailure> {
        let (vm, row) = self.shared.vms.get(name)?;
        self.check_replication(&vm, &row, "list")?;
        Ok(CheckpointList {
            vm: vm.to_string(),
            current: self.shared.store.checkpoint_position(row.id)?,
            progress: self
                .progress
                .lock()
                .expect("progress")
                .get(vm.as_str())
                .cloned(),
            checkpoints: self
                .shared
                .store
                .checkpoints(row.id)?
                .iter()
                .map(info)
                .collect(),
        })
    }

    /// Takes a checkpoint.
    pub async fn create(
        &self,
        name: &str,
        req: CheckpointCreateRequest,
    ) -> Result<(CheckpointInfo, String), ApiFailure> {
        let (vm, _) = self.shared.vms.get(name)?;
        let _busy = self.begin(&vm, "create")?;
        self.create_inner(&vm, req).await
    }

    async fn create_inner(
        &self,
        vm: &VmName,
        req: CheckpointCreateRequest,
    ) -> Result<(CheckpointInfo, String), ApiFailure> {
        let store = &self.shared.store;
        let created_ms = now_ms();
        let cp_name = match req.name {
            Some(n) => n,
            None => default_name(vm.as_str(), created_ms / 1000),
        };
        validate_name(&cp_name).map_err(ApiFailure::invalid)?;
        let _lock = self.shared.vms.lock_vm(vm).await;
        let (_, row) = self.shared.vms.get(vm.as_str())?;
        self.check_replication(vm, &row, "take")?;
        Self::check_settled(vm, &row)?;
        let existing = store.checkpoints(row.id)?;
        if existing.len() >= MAX_CHECKPOINTS {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} has {MAX_CHECKPOINTS} checkpoints, the most it may have; delete some first (`ferry checkpoint delete {vm} CP`)"
            )));
        }
        if row.spec.disks.is_empty() {
            return Err(ApiFailure::invalid(format!(
                "VM {vm} has no disk to checkpoint"
            )));
        }
        let tag = format!("ferry-cp-{created_ms}");
        let disks = self.shared.vms.disk_paths(&row);
        // QEMU keeps no internal snapshots in a qcow2 whose data lives in a raw file.
        for d in &disks {
            if let Ok(Some(raw)) = qcow2::external_data_file(d) {
                return Err(ApiFailure::invalid(format!(
                    "VM {vm} has a raw disk ({raw}): checkpoints need qcow2 disks (QEMU keeps no internal snapshots when the data is in a raw file)"
                )));
            }
        }
        let nodes: Vec<String> = (0..disks.len()).map(|i| disk_node(i)).collect();
        let qmp = self.shared.vms.live_qmp(vm);
        let (consistency, with_memory, note) = match (&qmp, req.kind) {
            (None, _) => {
                for (i, d) in disks.iter().enumerate() {
                    if let Err(e) = snapshot::create(&self.shared.cfg.qemu_img, d, &tag).await {
                        self.drop_tag(None, &disks[..i], &nodes, &tag).await;
                        return Err(qemu_err(vm, "taking the checkpoint", e));
                    }
                }
                ("offline", false, "taken while the VM was off".to_owned())
            }
            (Some(qmp), CheckpointKind::Standard) => {
                // The memory state goes where `-loadvm` looks for it when the checkpoint is
                // applied: the first writable block backend, which for a UEFI VM is its
                // NVRAM flash (the machine creates it before any -device disk).
                let vmstate = row
                    .spec
                    .disks
                    .iter()
                    .position(|d| d.role == DiskRole::Nvram)
                    .map_or(&nodes[0], |i| &nodes[i]);
                qmp::snapshot_save(qmp, &tag, vmstate, nodes.clone(), SAVE_TIMEOUT)
                    .await
                    .map_err(|e| qemu_err(vm, "saving the VM's state", e))?;
                (
                    "saved-state",
                    true,
                    "memory and device state saved".to_owned(),
                )
            }
            (Some(qmp), CheckpointKind::Production) => {
                // Freeze the guest's filesystems around the (millisecond) snapshot when it
                // runs an agent; a paused guest cannot answer, so it is not asked.
                let mut agent = match row.state {
                    VmState::Running => {
                        replication::primary::freeze_guest(&self.shared, &row).await
                    }
                    _ => None,
                };
                let taken = qmp
                    .execute(&Transaction {
                        actions: nodes
                            .iter()
                            .map(|n| {
                                TransactionAction::BlockdevSnapshotInternalSync(
                                    qmp::BlockdevSnapshotInternalSync {
                                        device: n.clone(),
                                        name: tag.clone(),
                                    },
                                )
                            })
                            .collect(),
                    })
                    .await;
                let frozen = agent.is_some();
                if let Some(a) = agent.as_mut() {
                    if let Err(e) = a.thaw(Duration::from_secs(10)).await {
                        warn!(vm = %vm, error = %e, "thawing the guest's filesystems failed");
                    }
                }
                taken.map_err(|e| qemu_err(vm, "taking the checkpoint", e))?;
                if frozen {
                    (
                        "application-consistent",
                        false,
                        "guest filesystems were frozen through its agent".to_owned(),
                    )
                } else {
                    ("crash-consistent", false, "crash-consistent: the guest has no working agent to freeze its filesystems".to_owned())
                }
            }
        };
        let kind = match req.kind {
            CheckpointKind::Production => "production",
            CheckpointKind::Standard => "standard",
        };
        let cp = store.insert_checkpoint(&CheckpointRow {
            id: 0,
            vm_id: row.id,
            name: cp_name,
            tag,
            parent_id: store.checkpoint_position(row.id)?,
            kind: kind.into(),
            consistency: consistency.into(),
            with_memory,
            created_ms,
        })?;
        info!(vm = %vm, checkpoint = cp.id, kind, consistency, "checkpoint taken");
        let message = format!(
            "checkpoint {:?} (id {}) of VM {vm} taken: {kind}, {note}",
            cp.name, cp.id
        );
        self.shared.events.emit(vm, "checkpoint_created", &message);
        Ok((info(&cp), message))
    }

    /// Removes internal snapshot `tag` from `disks` (best effort, for cleanup).
    async fn drop_tag(&self, qmp: Option<&Qmp>, disks: &[PathBuf], nodes: &[String], tag: &str) {
        for (d, node) in disks.iter().zip(nodes) {
            let r = match qmp {
                Some(q) => q
                    .execute(&qmp::BlockdevSnapshotDeleteInternalSync {
                        device: node.clone(),
                        name: tag.into(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => snapshot::delete(&self.shared.cfg.qemu_img, d, tag)
                    .await
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = r {
                warn!(disk = %d.display(), tag, error = %e, "cannot remove an internal snapshot");
            }
        }
    }

    /// Applies a checkpoint: the VM's disks (and, for a standard checkpoint, its memory)
    /// return exactly to it. A running VM is turned off first; a standard checkpoint then
    /// resumes it where it was, a production one leaves it off (as Hyper-V).
    pub async fn apply(
        &self,
        name: &str,
        cp: &str,
        checkpoint_first: bool,
    ) -> Result<ActionReply, ApiFailure> {
        let (vm, row) = self.shared.vms.get(name)?;
        let _busy = self.begin(&vm, "apply")?;
        self.check_replication(&vm, &row, "apply")?;
        Self::check_settled(&vm, &row)?;
        let target = resolve(&self.shared.store.checkpoints(row.id)?, &vm, cp)?.clone();
        let qemu_img = &self.shared.cfg.qemu_img;
        let disks = self.shared.vms.disk_paths(&row);
        // Every disk must hold the checkpoint before anything happens (the VM is not even
        // stopped): a half-applied VM would be worse than none. `-U` reads a running VM's.
        for d in &disks {
            let tags = snapshot::list(qemu_img, d)
                .await
                .map_err(|e| qemu_err(&vm, "reading the disk's snapshots", e))?;
            if !tags.iter().any(|t| t.name == target.tag) {
                return Err(ApiFailure::conflict(format!(
                    "checkpoint {:?} is missing from {} (the disk was replaced or edited outside Ferry); nothing was changed — delete the checkpoint",
                    target.name,
                    d.display()
                )));
            }
        }
        let mut notes = Vec::new();
        if checkpoint_first {
            let (first, _) = self
                .create_inner(&vm, CheckpointCreateRequest::default())
                .await?;
            notes.push(format!(
                "the state before was saved as checkpoint {:?} (id {})",
                first.name, first.id
            ));
        }
        if matches!(row.state, VmState::Running | VmState::Paused) {
            self.shared.vms.stop(vm.as_str()).await?;
        }
        let _lock = self.shared.vms.lock_vm(&vm).await;
        let (_, row) = self.shared.vms.get(vm.as_str())?;
        // Again under the lock: a planned failover may have begun meanwhile.
        self.check_replication(&vm, &row, "apply")?;
        if row.state != VmState::Off {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} was started again meanwhile; stop it and retry"
            )));
        }
        let rel = self
            .shared
            .store
            .replication(row.id)?
            .filter(|r| r.role == Role::Primary);
        let replicated = rel.as_ref().is_some_and(|r| r.generation > 0);
        let tracked = |i: usize| {
            rel.as_ref()
                .is_some_and(|r| !r.settings.excluded_disks.contains(&i))
        };

        // What the apply changes, per replicated disk, before it happens; recorded for the
        // next cycle before the first disk is reverted (sending a range that ends up
        // unchanged is harmless, missing one is not).
        let mut unknown: Option<String> = None;
        if replicated {
            let mut changed: Vec<(usize, u64, u64)> = Vec::new();
            for (i, d) in disks.iter().enumerate().filter(|(i, _)| tracked(*i)) {
                let (path, tag) = (d.clone(), target.tag.clone());
                let diff = tokio::task::spawn_blocking(move || {
                    qcow2::changed_since_snapshot(&path, &tag, DIFF_UNIT)
                })
                .await
                .map_err(|e| ApiFailure::internal(format!("comparing {}: {e}", d.display())))?;
                match diff {
                    Ok(ranges) => changed.extend(ranges.into_iter().map(|(o, l)| (i, o, l))),
                    Err(e) => unknown = Some(e.to_string()),
                }
            }
            if unknown.is_none() {
                let bytes: u64 = changed.iter().map(|c| c.2).sum();
                let key = reverse_extra_key(row.id);
                let mut extra: Vec<(usize, u64, u64)> = self
                    .shared
                    .store
                    .setting(&key)?
                    .and_then(|v| serde_json::from_str(&v).ok())
                    .unwrap_or_default();
                extra.extend(changed);
                self.shared.store.set_setting(
                    &key,
                    &serde_json::to_string(&extra).expect("serialize ranges"),
                )?;
                notes.push(format!(
                    "replication sends the {} KiB the checkpoint changed at its next cycle (no resynchronization)",
                    bytes / 1024
                ));
            }
        }
        let run_dir = self.shared.cfg.data_dir.join("run");
        std::fs::create_dir_all(&run_dir).map_err(|e| {
            ApiFailure::internal(format!("cannot create {}: {e}", run_dir.display()))
        })?;
        let mut stashes = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let scratch = run_dir.join(format!("bitmap-stash-{}-{i}.qcow2", row.id));
            let applied = match snapshot::apply(
                qemu_img,
                d,
                &target.tag,
                &scratch,
                !target.with_memory,
            )
            .await
            {
                Ok(a) => a,
                Err(e) if i == 0 => return Err(qemu_err(&vm, "applying the checkpoint", e)),
                Err(e) => {
                    // Some disks are reverted already: what replication holds no longer
                    // describes this VM.
                    let why = format!(
                        "applying checkpoint {:?} failed on {} after {i} disk(s) were reverted: {e}",
                        target.name,
                        d.display()
                    );
                    self.require_resync(&vm, row.id, &why)?;
                    return Err(ApiFailure::qemu(format!(
                        "{vm}: {why}; apply it again, or apply another checkpoint"
                    )));
                }
            };
            if applied.tracking == snapshot::Tracking::Lost && tracked(i) {
                unknown = Some(format!(
                    "the change tracking of {} was inconsistent (QEMU or the host crashed while the VM ran)",
                    d.display()
                ));
            }
            // The relationship's current generation (or a newer one a capture started) must
            // be among the bitmaps kept: if QEMU was killed before it ever stored it, the
            // record of unsent writes is gone.
            if let Some(r) = rel
                .as_ref()
                .filter(|_| replicated && tracked(i) && unknown.is_none())
            {
                let kept = applied.stashed.iter().any(|b| {
                    b.name
                        .strip_prefix("ferry-r")
                        .and_then(|n| n.parse::<i64>().ok())
                        .is_some_and(|n| n >= r.generation)
                });
                if !kept {
                    unknown = Some(format!(
                        "the change tracking of {} was lost (QEMU was killed or crashed)",
                        d.display()
                    ));
                }
            }
            stashes.push((scratch, applied.stashed));
        }
        self.shared
            .store
            .set_checkpoint_position(row.id, Some(target.id))?;
        info!(vm = %vm, checkpoint = target.id, "checkpoint applied");
        if let Some(why) = &unknown {
            let msg = format!(
                "checkpoint {:?} was applied and what it changed cannot be known ({why})",
                target.name
            );
            notes.retain(|n| !n.contains("no resynchronization"));
            notes.push(self.require_resync(&vm, row.id, &msg)?);
        }
        let mut event = format!("checkpoint {:?} applied", target.name);
        for n in &notes {
            event.push_str("; ");
            event.push_str(n);
        }
        self.shared.events.emit(&vm, "checkpoint_applied", &event);

        let reply = if target.with_memory {
            let nodes_stashes: Vec<(String, PathBuf, Vec<ferry_qemu::cbt::OfflineBitmap>)> =
                stashes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (p, b))| (disk_node(i), p, b))
                    .collect();
            let resumed = self
                .shared
                .vms
                .resume_from_saved_state(&vm, &target.tag, |qmp| rearm(qmp, nodes_stashes))
                .await;
            match resumed {
                Ok(reply) => ActionReply {
                    state: reply.state,
                    message: format!(
                        "VM {vm} resumed from checkpoint {:?} where it was",
                        target.name
                    ),
                },
                Err(e) => {
                    // The disks are at the checkpoint; the saved state did not load, and
                    // change tracking, taken out for `-loadvm`, is gone.
                    let mut message = format!(
                        "VM {vm}'s disks are at checkpoint {:?}, but resuming from its saved state failed ({}); the VM is off — start it with `ferry vm start {vm}`",
                        target.name, e.message
                    );
                    if replicated {
                        message.push_str("; ");
                        message.push_str(&self.require_resync(
                            &vm,
                            row.id,
                            "change tracking was lost when resuming from a checkpoint failed",
                        )?);
                    }
                    return Err(ApiFailure::qemu(message));
                }
            }
        } else {
            ActionReply {
                state: VmState::Off,
                message: format!(
                    "VM {vm} is at checkpoint {:?} and off (a {} checkpoint holds no memory state); start it with `ferry vm start {vm}`",
                    target.name, target.kind
                ),
            }
        };
        Ok(ActionReply {
            message: std::iter::once(reply.message)
                .chain(notes)
                .collect::<Vec<_>>()
                .join("; "),
            ..reply
        })
    }

    /// Puts the VM's replication (when it is a primary) into "resynchronization required"
    /// because of `why`; returns the message shown.
    fn require_resync(&self, vm: &VmName, vm_id: i64, why: &str) -> Result<String, ApiFailure> {
        let Some(rel) = self
            .shared
            .store
            .replication(vm_id)?
            .filter(|r| r.role == Role::Primary)
        else {
            return Ok(String::new());
        };
        let msg = format!(
            "{why}: resynchronization required — run `ferry replication resume {vm} --resync`"
        );
        if rel.state != ReplicationState::ResynchronizationRequired {
            self.shared.events.emit(
                vm,
                "replication_state",
                &format!(
                    "{} -> {}",
                    rel.state,
                    ReplicationState::ResynchronizationRequired
                ),
            );
        }
        self.shared.store.set_replication_state(
            vm_id,
            ReplicationState::ResynchronizationRequired,
            Some(&msg),
        )?;
        Ok(msg)
    }

    /// Renames a checkpoint.
    pub async fn rename(
        &self,
        name: &str,
        cp: &str,
        new_name: &str,
    ) -> Result<CheckpointInfo, ApiFailure> {
        let (vm, row) = self.shared.vms.get(name)?;
        validate_name(new_name).map_err(ApiFailure::invalid)?;
        let _busy = self.begin(&vm, "rename")?;
        let list = self.shared.store.checkpoints(row.id)?;
        let target = resolve(&list, &vm, cp)?;
        self.shared.store.rename_checkpoint(target.id, new_name)?;
        Ok(CheckpointInfo {
            name: new_name.to_owned(),
            ..info(target)
        })
    }

    /// Deletes a checkpoint (its children move to its parent), or with `subtree` it and
    /// every checkpoint below it. The VM's current state and the other checkpoints keep
    /// their data.
    pub async fn delete(
        &self,
        name: &str,
        cp: &str,
        subtree: bool,
    ) -> Result<ActionReply, ApiFailure> {
        let (vm, row) = self.shared.vms.get(name)?;
        let _busy = self.begin(&vm, "delete")?;
        self.check_replication(&vm, &row, "delete")?;
        let _lock = self.shared.vms.lock_vm(&vm).await;
        let (_, row) = self.shared.vms.get(vm.as_str())?;
        Self::check_settled(&vm, &row)?;
        let list = self.shared.store.checkpoints(row.id)?;
        let target = resolve(&list, &vm, cp)?.clone();
        // The checkpoints to delete, children before parents.
        let mut doomed = vec![target.clone()];
        if subtree {
            let mut ids: HashSet<i64> = HashSet::from([target.id]);
            let mut grew = true;
            while grew {
                grew = false;
                for c in &list {
                    if c.parent_id.is_some_and(|p| ids.contains(&p)) && ids.insert(c.id) {
                        doomed.push(c.clone());
                        grew = true;
                    }
                }
            }
        }
        doomed.reverse();
        let disks = self.shared.vms.disk_paths(&row);
        let nodes: Vec<String> = (0..disks.len()).map(|i| disk_node(i)).collect();
        let qmp = self.shared.vms.live_qmp(&vm);
        // Each disk's snapshots, read once: a tag already gone (an interrupted delete) is
        // skipped, not an error.
        let mut present = Vec::new();
        for d in &disks {
            let tags: HashSet<String> = snapshot::list(&self.shared.cfg.qemu_img, d)
                .await
                .map_err(|e| qemu_err(&vm, "reading the disk's snapshots", e))?
                .into_iter()
                .map(|s| s.name)
                .collect();
            present.push(tags);
        }
        for c in &doomed {
            for ((d, node), tags) in disks.iter().zip(&nodes).zip(&present) {
                if !tags.contains(&c.tag) {
                    continue;
                }
                match &qmp {
                    Some(q) => q
                        .execute(&qmp::BlockdevSnapshotDeleteInternalSync {
                            device: node.clone(),
                            name: c.tag.clone(),
                        })
                        .await
                        .map(|_| ())
                        .map_err(|e| qemu_err(&vm, "deleting the checkpoint", e))?,
                    None => snapshot::delete(&self.shared.cfg.qemu_img, d, &c.tag)
                        .await
                        .map_err(|e| qemu_err(&vm, "deleting the checkpoint", e))?,
                }
            }
            self.shared.store.delete_checkpoint(row.id, c.id)?;
        }
        let message = if doomed.len() == 1 {
            format!("checkpoint {:?} of VM {vm} deleted", target.name)
        } else {
            format!(
                "checkpoint {:?} of VM {vm} and the {} below it deleted",
                target.name,
                doomed.len() - 1
            )
        };
        self.shared.events.emit(&vm, "checkpoint_deleted", &message);
        Ok(ActionReply {
            state: row.state,
            message,
        })
    }

    /// Exports a checkpoint to `dir` (new or empty): its disks as standalone qcow2 images
    /// and the VM's configuration; `ferry vm import` turns the folder into a VM.
    pub async fn export(&self, name: &str, cp: &str, dir: &str) -> Result<ActionReply, ApiFailure> {
        let (vm, row) = self.shared.vms.get(name)?;
        let dir_path = Path::new(dir);
        if !dir_path.is_absolute() {
            return Err(ApiFailure::invalid(format!(
                "export folder {dir:?} must be an absolute path"
            )));
        }
        self.shared
            .cfg
            .allowed_path("export folder", dir_path)
            .map_err(ApiFailure::invalid)?;
        let _busy = self.begin(&vm, "export")?;
        self.check_replication(&vm, &row, "export")?;
        let target = resolve(&self.shared.store.checkpoints(row.id)?, &vm, cp)?.clone();
        let mut created = false;
        match std::fs::read_dir(dir_path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(ApiFailure::conflict(format!(
                        "export folder {dir} is not empty; choose a new or empty folder"
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir_path)
                    .map_err(|e| ApiFailure::invalid(format!("cannot create {dir}: {e}")))?;
                created = true;
            }
            Err(e) => return Err(ApiFailure::invalid(format!("cannot use {dir}: {e}"))),
        }
        // A failed export leaves the folder as it was.
        let undo = |upto: usize| {
            for j in 0..=upto {
                let _ = std::fs::remove_file(dir_path.join(format!("disk{j}.qcow2")));
            }
            let _ = std::fs::remove_file(dir_path.join(EXPORT_MANIFEST));
            if created {
                let _ = std::fs::remove_dir(dir_path);
            }
        };
        let disks = self.shared.vms.disk_paths(&row);
        let total: u64 = row.spec.disks.iter().map(|d| d.size_bytes).sum();
        let _progress = ProgressGuard::start(&self.progress, &vm, "exporting", total);
        let mut written = 0u64;
        let mut before = 0u64;
        for (i, d) in disks.iter().enumerate() {
            let out = dir_path.join(format!("disk{i}.qcow2"));
            let size = row.spec.disks[i].size_bytes;
            let exported = snapshot::export(&self.shared.cfg.qemu_img, d, &target.tag, &out, |f| {
                self.set_progress(&vm, before + (f * size as f64) as u64)
            })
            .await;
            before += size;
            if let Err(e) = exported {
                undo(i);
                return Err(qemu_err(&vm, "exporting the checkpoint", e));
            }
            written += std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        }
        let manifest = ExportManifest {
            format: 1,
            spec: row.spec.clone(),
            checkpoint: target.name.clone(),
            created_ms: target.created_ms,
        };
        write_durably(
            &dir_path.join(EXPORT_MANIFEST),
            serde_json::to_vec_pretty(&manifest)
                .expect("serialize manifest")
                .as_slice(),
        )
        .map_err(|e| {
            undo(disks.len());
            ApiFailure::internal(format!("cannot write the export manifest in {dir}: {e}"))
        })?;
        Ok(ActionReply {
            state: row.state,
            message: format!(
                "checkpoint {:?} of VM {vm} exported to {dir} ({} disk(s), {} MiB); import it with `ferry vm import {dir}`",
                target.name,
                disks.len(),
                written >> 20
            ),
        })
    }

    /// Creates a VM from an export folder (new MAC addresses; disks copied).
    pub async fn import(&self, req: VmImportRequest) -> Result<VmInfo, ApiFailure> {
        let dir = Path::new(&req.dir);
        if !dir.is_absolute() {
            return Err(ApiFailure::invalid(format!(
                "import folder {:?} must be an absolute path",
                req.dir
            )));
        }
        self.shared
            .cfg
            .allowed_path("import folder", dir)
            .map_err(ApiFailure::invalid)?;
        let manifest_path = dir.join(EXPORT_MANIFEST);
        let text = std::fs::read(&manifest_path).map_err(|e| {
            ApiFailure::invalid(format!(
                "{} is not a Ferry export ({}: {e}); export a checkpoint with `ferry checkpoint export VM CP DIR`",
                req.dir,
                manifest_path.display()
            ))
        })?;
        let manifest: ExportManifest = serde_json::from_slice(&text).map_err(|e| {
            ApiFailure::invalid(format!("{} is damaged: {e}", manifest_path.display()))
        })?;
        if manifest.format != 1 {
            return Err(ApiFailure::invalid(format!(
                "{} has export format {}, which this ferryd does not know; upgrade ferryd",
                manifest_path.display(),
                manifest.format
            )));
        }
        let spec = manifest.spec;
        let (kernel, initrd, append) = match spec.boot {
            Boot::Disk => (None, None, None),
            Boot::Kernel {
                kernel,
                initrd,
                append,
            } => (Some(kernel), initrd, append),
        };
        // The NVRAM travels as its own image; the data disks keep their order and buses.
        let mut disks = Vec::new();
        let mut nvram = None;
        for (i, d) in spec.disks.iter().enumerate() {
            let path = dir.join(format!("disk{i}.qcow2")).display().to_string();
            match d.role {
                DiskRole::Nvram => nvram = Some(path),
                DiskRole::Data => disks.push(DiskRequest::Import {
                    path,
                    format: Some(ImageFormat::Qcow2),
                    bus: d.bus,
                }),
            }
        }
        self.shared
            .vms
            .create(VmCreateRequest {
                name: req.name.unwrap_or_else(|| spec.name.to_string()),
                cpus: spec.cpus,
                memory_mib: spec.memory_mib,
                disks,
                vnc: Some(spec.vnc),
                kernel,
                initrd,
                append,
                nics: spec
                    .nics
                    .iter()
                    .map(|n| match &n.kind {
                        NicKind::Bridge(b) => NicRequest::Bridge {
                            bridge: Some(b.clone()),
                        },
                        NicKind::User => NicRequest::User,
                    })
                    .collect(),
                machine: spec.machine,
                firmware: spec.firmware,
                secure_boot: spec.secure_boot,
                // The ISO may not exist where the export is imported: an empty drive.
                cdrom: spec.cdrom.as_ref().map(|_| CdromSpec { iso: None }),
                boot_order: spec.boot_order.clone(),
                rng: spec.rng,
                nvram,
            })
            .await
    }
}

/// Re-creates the stashed dirty bitmaps on a VM restored from saved state (its vCPUs still
/// stopped), merging their bits from the stash images, then removes the stashes.
async fn rearm(
    qmp: Qmp,
    stashes: Vec<(String, PathBuf, Vec<ferry_qemu::cbt::OfflineBitmap>)>,
) -> Result<(), ApiFailure> {
    for (i, (node, stash, bitmaps)) in stashes.iter().enumerate() {
        if bitmaps.is_empty() {
            continue;
        }
        let stash_node = format!("bitmap-stash{i}");
        let fail = |e: ferry_qemu::qmp::QmpError| {
            ApiFailure::qemu(format!("restoring change tracking on {node} failed: {e}"))
        };
        qmp.execute_raw(
            "blockdev-add",
            Some(serde_json::json!({
                "driver": "qcow2",
                "node-name": stash_node,
                "read-only": true,
                "file": {"driver": "file", "filename": stash},
            })),
        )
        .await
        .map_err(fail)?;
        for b in bitmaps {
            qmp.execute_raw(
                "block-dirty-bitmap-add",
                Some(serde_json::json!({
                    "node": node, "name": b.name, "persistent": true,
                    "granularity": b.granularity, "disabled": !b.auto(),
                })),
            )
            .await
            .map_err(fail)?;
            qmp.execute_raw(
                "block-dirty-bitmap-merge",
                Some(serde_json::json!({
                    "node": node, "target": b.name,
                    "bitmaps": [{"node": stash_node, "name": b.name}],
                })),
            )
            .await
            .map_err(fail)?;
        }
        qmp.execute_raw(
            "blockdev-del",
            Some(serde_json::json!({ "node-name": stash_node })),
        )
        .await
        .map_err(fail)?;
        let _ = std::fs::remove_file(stash);
        info!(node = %node, bitmaps = bitmaps.len(), "change tracking restored on the resumed VM");
    }
    Ok(())
}

/// Writes a file so that after a crash it is either absent or complete.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_follow_hyper_v_and_fit_the_limit() {
        // 2026-11-29 20:05:03 UTC.
        assert_eq!(
            default_name("web1", 1_795_982_703),
            "web1 (11/29/2026 - 08:05:03 PM)"
        );
        assert_eq!(default_name("a", 0), "a (01/01/1970 - 12:00:00 AM)");
        assert_eq!(default_name("a", 43_200), "a (01/01/1970 - 12:00:00 PM)");
        let long = "v".repeat(120);
        let n = default_name(&long, 0);
        assert_eq!(n.chars().count(), MAX_NAME_CHARS);
        assert!(validate_name(&n).is_ok());
    }

    #[test]
    fn checkpoints_are_found_by_id_or_unique_name() {
        let cp = |id: i64, name: &str| CheckpointRow {
            id,
            vm_id: 1,
            name: name.into(),
            tag: format!("t{id}"),
            parent_id: None,
            kind: "production".into(),
            consistency: "offline".into(),
            with_memory: false,
            created_ms: 0,
        };
        let vm = VmName::new("vm").unwrap();
        let list = [
            cp(3, "12"),
            cp(12, "a"),
            cp(14, "b"),
            cp(15, "b"),
            cp(16, "16"),
        ];
        assert_eq!(resolve(&list, &vm, "a").unwrap().id, 12);
        assert_eq!(resolve(&list, &vm, "14").unwrap().id, 14);
        // A checkpoint named by its own id is not ambiguous.
        assert_eq!(resolve(&list, &vm, "16").unwrap().id, 16);
        // "12" is checkpoint 12's id and checkpoint 3's name.
        let e = resolve(&list, &vm, "12").unwrap_err();
        assert!(e.message.contains("ids 12, 3"), "{}", e.message);
        let e = resolve(&list, &vm, "b").unwrap_err();
        assert!(e.message.contains("ids 14, 15"), "{}", e.message);
        assert_eq!(resolve(&list, &vm, "zz").unwrap_err().status, 404);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("before upgrade").is_ok());
        assert!(validate_name("").unwrap_err().contains("empty"));
        assert!(validate_name("   ").unwrap_err().contains("empty"));
        assert!(validate_name(&"x".repeat(101)).unwrap_err().contains("101"));
        assert!(validate_name(&"é".repeat(100)).is_ok());
        assert!(validate_name("a\nb").unwrap_err().contains("control"));
    }
}
