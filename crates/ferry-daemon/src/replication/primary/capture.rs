//! The capture stage: a frozen view of every replicated disk, read into the spool and to
//! the shipper. A capture is planned first (what it reads: allocated data, a comparison
//! with the replica's hashes, or the dirty extents), its change-tracking generations are
//! reconciled and the spool prepared under the VM lock, then the view is frozen by a
//! fleecing point of the running VM (`live`) or a `qemu-nbd` export of the stopped VM's
//! disks (`offline`) and read (`read`); it finishes by describing the captured cycle (the
//! spool's `.meta`), and the previous generation is kept until the replica commits it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_domain::replication::InitialMethod;
use ferry_domain::ReplicationState;
use ferry_qemu::cbt;
use ferry_qemu::process::disk_node;
use ferry_qemu::qmp::Qmp;
use ferry_store::{ReplicationRow, VmRow};
use tracing::info;

use super::frame::Tap;
use super::generations::{
    generation_name, reconcile_generations, reconcile_offline, set_generation,
};
use super::live::fleece_dir;
use super::read::ReadSummary;
use super::spool::{spool_dir, spool_paths};
use super::{compare, disks, live, offline, vm_row, Pending};
use crate::replication::hashes::Hash;
use crate::replication::{now_ms, now_unix, Shared};

/// What a capture reads from each disk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// Allocated data only: the replica starts from zeros (initial copy).
    Allocated,
    /// Every chunk whose hash differs from the replica's (resynchronization, or an initial
    /// copy from an existing copy on the replica).
    Compare,
    /// The dirty extents of the frozen generation.
    Dirty,
}

/// A capture as planned under the VM lock: what it reads, from which change-tracking
/// generation into which, and where it spools.
pub(super) struct Capture<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) rel: &'a ReplicationRow,
    pub(super) vm: &'a VmRow,
    /// The replicated disks: (index, image path, size).
    pub(super) disks: Vec<(usize, PathBuf, u64)>,
    pub(super) cycle: i64,
    /// `initial`, `delta`, `resync`.
    pub(super) kind: &'static str,
    pub(super) scope: Scope,
    /// The replica's chunk hashes, for a comparison.
    pub(super) theirs: Option<HashMap<usize, Vec<Hash>>>,
    /// Ranges to send besides the dirty ones.
    pub(super) extra: Vec<(usize, u64, u64)>,
    /// The generation read (a delta only), and the one started by this capture.
    pub(super) old_gen: Option<String>,
    pub(super) new_gen: String,
    pub(super) new_gen_no: i64,
    pub(super) spool_path: PathBuf,
    pub(super) meta_path: PathBuf,
    pub(super) started_ms: i64,
}

/// The point a capture took: when, whether the guest's filesystems were frozen for it, and
/// the capture's identity.
pub(super) struct Point {
    pub(super) taken_at: i64,
    pub(super) app_consistent: bool,
    pub(super) capture: u64,
}

/// Captures the next cycle into the spool, and to the shipper through `tap` (dropped when
/// the capture ends, which tells the shipper so).
pub(super) async fn capture(
    shared: &Arc<Shared>,
    rel: &ReplicationRow,
    mut tap: Option<Tap>,
) -> anyhow::Result<()> {
    let vm = vm_row(shared, rel.vm_id)?;
    let (scope, kind) = plan(rel);
    // The replica's hashes first (before anything is frozen here): they do not change
    // meanwhile, as only this primary writes there.
    let theirs = if scope == Scope::Compare {
        Some(compare::fetch_hashes(shared, &vm, rel).await?)
    } else {
        None
    };
    // The VM lock only now: hashing on the replica may take long, and must not keep an
    // administrator from stopping the VM.
    let _vm_lock = shared.vms.lock_vm(&vm.spec.name).await;
    let extra = extra_ranges(shared, rel.vm_id);
    let disks = disks(shared, &vm, rel);
    let live = shared.vms.live_qmp(&vm.spec.name);
    let generation = reconcile(shared, rel, &vm, live.as_ref(), &disks).await?;
    let c = prepare(
        shared, rel, &vm, disks, scope, kind, theirs, extra, generation,
    )?;
    match live {
        Some(qmp) => live::capture(&c, &qmp, tap.as_mut()).await,
        None => offline::capture(&c, tap.as_mut()).await,
    }
}

/// What the next cycle reads, and its kind.
fn plan(rel: &ReplicationRow) -> (Scope, &'static str) {
    let resync = rel.state == ReplicationState::Resynchronizing;
    if rel.generation == 0 {
        if rel.settings.initial == InitialMethod::Existing {
            (Scope::Compare, "initial")
        } else {
            (Scope::Allocated, "initial")
        }
    } else if resync {
        (Scope::Compare, "resync")
    } else {
        (Scope::Dirty, "delta")
    }
}

/// Ranges to send besides the dirty ones (reverse replication's first cycle, a checkpoint
/// applied): read under the lock, as their writers hold it, so that the deletion once
/// this cycle holds them in its spool removes only what it read.
fn extra_ranges(shared: &Shared, vm_id: i64) -> Vec<(usize, u64, u64)> {
    let extra_key = crate::replication::failover::reverse_extra_key(vm_id);
    shared
        .store
        .setting(&extra_key)
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default()
}

/// The generation that holds every change since the last point: a capture whose outcome
/// was not recorded (ferryd crashed, QEMU stopped mid-cycle, a failure folded the old
/// generation into the new one) leaves a newer one, which is adopted.
async fn reconcile(
    shared: &Shared,
    rel: &ReplicationRow,
    vm: &VmRow,
    live: Option<&Qmp>,
    disks: &[(usize, PathBuf, u64)],
) -> anyhow::Result<i64> {
    let resync = rel.state == ReplicationState::Resynchronizing;
    let generation = match (live, rel.generation == 0 || resync) {
        (_, true) => rel.generation,
        (Some(qmp), false) => {
            let nodes: Vec<String> = disks.iter().map(|(i, _, _)| disk_node(*i)).collect();
            let run_dir = fleece_dir(shared, rel.vm_id);
            std::fs::create_dir_all(&run_dir)?;
            cbt::cleanup_stale(qmp, &run_dir).await?;
            reconcile_generations(qmp, &nodes, rel.generation).await?
        }
        (None, false) => {
            let images: Vec<PathBuf> = disks.iter().map(|(_, p, _)| p.clone()).collect();
            reconcile_offline(&shared.cfg.qemu_img, &images, rel.generation).await?
        }
    };
    if generation != rel.generation {
        info!(vm = %vm.spec.name, from = rel.generation, to = generation, "adopted a newer change-tracking generation");
        set_generation(shared, rel.vm_id, generation);
    }
    Ok(generation)
}

/// The capture as planned: the generations it reads and starts, and its spool's paths
/// (the spool's directory created and made durable).
#[allow(clippy::too_many_arguments)]
fn prepare<'a>(
    shared: &'a Arc<Shared>,
    rel: &'a ReplicationRow,
    vm: &'a VmRow,
    disks: Vec<(usize, PathBuf, u64)>,
    scope: Scope,
    kind: &'static str,
    theirs: Option<HashMap<usize, Vec<Hash>>>,
    extra: Vec<(usize, u64, u64)>,
    generation: i64,
) -> anyhow::Result<Capture<'a>> {
    let cycle = rel.last_cycle + 1;
    let old_gen = (scope == Scope::Dirty).then(|| generation_name(generation));
    let new_gen_no = generation + 1;
    let new_gen = generation_name(new_gen_no);
    let dir = spool_dir(shared, rel.vm_id);
    if !dir.exists() {
        std::fs::create_dir_all(&dir)?;
        // A new spool directory survives a crash only once its parents record it.
        for d in [Some(dir.as_path()), dir.parent()].into_iter().flatten() {
            std::fs::File::open(d)?.sync_all()?;
        }
    }
    let (spool_path, meta_path) = spool_paths(&dir, cycle);
    let started_ms = now_ms();
    Ok(Capture {
        shared,
        rel,
        vm,
        disks,
        cycle,
        kind,
        scope,
        theirs,
        extra,
        old_gen,
        new_gen,
        new_gen_no,
        spool_path,
        meta_path,
        started_ms,
    })
}

impl Capture<'_> {
    /// The point is taken now: the stream to the shipper begins with it.
    pub(super) async fn point_taken(&self, app_consistent: bool, tap: Option<&mut Tap>) -> Point {
        let taken_at = now_unix();
        let capture = new_capture_id(self.rel.vm_id, self.cycle);
        if let Some(t) = tap {
            t.begin(self.cycle, self.kind, taken_at, app_consistent, capture)
                .await;
        }
        Point {
            taken_at,
            app_consistent,
            capture,
        }
    }

    /// The description of the captured cycle (the spool's `.meta`): the point, what its
    /// read produced, and the generation that now tracks changes.
    pub(super) fn describe(&self, point: &Point, read: &ReadSummary) -> Pending {
        Pending {
            cycle: self.cycle,
            kind: self.kind.into(),
            taken_at: point.taken_at,
            generation: self.new_gen_no,
            frames: read.frames,
            data_bytes: read.data_bytes,
            dirty_bytes: read.dirty_bytes,
            spool_bytes: read.bytes,
            started_ms: self.started_ms,
            app_consistent: point.app_consistent,
            capture: point.capture,
            extra: self.extra.clone(),
            spooled: read.spooled,
        }
    }
}

/// A fresh, non-zero capture identity.
fn new_capture_id(vm_id: i64, cycle: i64) -> u64 {
    let mut seed = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
    let h = blake3::hash(&[&seed[..], &vm_id.to_le_bytes(), &cycle.to_le_bytes()].concat());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | 1
}
