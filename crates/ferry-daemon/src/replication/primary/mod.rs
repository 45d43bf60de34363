//! The primary side: one task per relationship runs cycles at the interval.
//!
//! A cycle captures and ships at once (ADR 0004), yet the fleecing window never depends on
//! the link:
//! 1. **capture** (VM lock held, short): a fleecing point (running VM) or a `qemu-nbd`
//!    export (VM off) gives a frozen view of every replicated disk; the dirty extents of the
//!    frozen generation (or, for the initial copy and resynchronization, every allocated
//!    extent) are read into checksummed, optionally compressed frames. Each frame goes to
//!    the shipper while the link keeps up and, in any case, to a local spool (not fsynced)
//!    described by a `.meta` file (fsynced, temp + rename) once the read is complete.
//! 2. **ship**: the frames go over mutual TLS as they are read, the rest from the spool; the
//!    replica applies them as a new recovery point and answers only once it is committed.
//!    A dropped link resumes from the spool at the first batch the replica had not made
//!    durable.
//! 3. **commit**: only the replica's answer drops the previous change-tracking generation
//!    (and the spool). Until then it is kept, so that a cycle lost before its commit (the
//!    spool lost with the host, a capture that failed) is folded into the next point: that
//!    point is later, never missing data. A failed read folds it back at once.
//!
//! While a spool is pending no new point is taken (the cycle counts as missed), so pending
//! replication size stays one cycle's worth.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use ferry_domain::replication::InitialMethod;
use ferry_domain::{ReplicationState, Role, VmName, VmState};
use ferry_nbd::{Extent as NbdExtent, NbdClient, BASE_ALLOCATION, STATE_ZERO};
use ferry_qemu::agent::GuestAgent;
use ferry_qemu::cbt::{self, BitmapState, FleecePoint, NodeSpec, OfflineExport};
use ferry_qemu::process::disk_node;
use ferry_store::{CycleRow, ReplicationRow, VmRow};
use ferry_wire::{
    BatchBuilder, EncodedFrame, Extent, FrameReader, FrameWriter, SpoolReader, SpoolWriter,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn, Instrument};

use super::hashes::{self, Hash};
use super::proto::{
    DiskMeta, ExportManifest, Msg, EXPORT_DATA, EXPORT_FORMAT, EXPORT_MANIFEST, MIN_PROTOCOL,
    PROTOCOL,
};
use super::{now_ms, now_unix, qemu_nbd_path, Shared};
use crate::peer;

/// Bytes read from a disk per NBD request while capturing.
const READ_CHUNK: u64 = 1 << 20;
/// Space left free on the spool's filesystem after a capture.
const SPOOL_RESERVE_BYTES: u64 = 256 << 20;

/// Free bytes for an unprivileged writer on the filesystem of `dir` (u64::MAX if unknown).
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return u64::MAX;
    };
    // SAFETY: statvfs writes only into the struct we pass; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return u64::MAX;
        }
        (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)
    }
}

/// Reads in flight at once while capturing (pipelined NBD requests).
const READ_AHEAD: usize = 8;
/// Payload of one extent batch (one frame).
const BATCH_PAYLOAD: usize = 1 << 20;
/// Frames a capture may queue for the shipper streaming them (about 1 MiB each): beyond
/// that the link is slower than the read, and the rest waits in the spool.
const STREAM_QUEUE_FRAMES: usize = 32;
/// How long a streamed cycle's link may stay quiet before a keepalive (the replica gives
/// up on a primary silent for a minute).
const STREAM_KEEPALIVE: Duration = Duration::from_secs(15);
/// A frame that cannot be sent for this long means the link is dead (a partition gives no
/// error, writes just stop draining).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the replica may take to hash its copy of the disks.
const HASH_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the replica may take to commit a point after the last batch.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(300);

/// The name of dirty-bitmap generation `n` of a VM's relationship (one per VM).
pub fn generation_name(n: i64) -> String {
    format!("ferry-r{n}")
}

/// The initial copy was exported and the replica has not imported it yet (not a failure).
#[derive(Debug, thiserror::Error)]
#[error("waiting for the exported initial copy to be imported on the replica server")]
pub struct AwaitingImport;

/// A captured cycle's spool cannot be read back (missing, torn or corrupt, e.g. after a
/// power loss: it is not fsynced). The cycle is abandoned; the change tracking kept until
/// the replica's commit carries its changes into the next point.
#[derive(Debug, thiserror::Error)]
#[error(
    "the spool of cycle {cycle} is damaged ({why}): discarded; the next cycle carries its changes"
)]
pub struct SpoolLost {
    cycle: i64,
    why: String,
}

/// A change tracking failure that only a resynchronization repairs.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ResyncRequired(pub String);

/// A captured cycle waiting to be shipped (the `.meta` next to the spool).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    /// Cycle number.
    pub cycle: i64,
    /// `initial`, `delta`, `resync`.
    pub kind: String,
    /// When the disks were frozen (UNIX s).
    pub taken_at: i64,
    /// The generation tracking changes after this point.
    pub generation: i64,
    /// Frames (batches) in the spool.
    pub frames: u64,
    /// Data bytes in the spool (uncompressed).
    pub data_bytes: u64,
    /// Bytes marked dirty (or allocated) when captured.
    pub dirty_bytes: u64,
    /// Spool file size.
    pub spool_bytes: u64,
    /// When capture started (UNIX ms).
    pub started_ms: i64,
    /// The guest's filesystems were frozen through its agent for the point.
    #[serde(default)]
    pub app_consistent: bool,
    /// This capture's identity (see `Msg::CycleBegin::capture`).
    #[serde(default)]
    pub capture: u64,
    /// The ranges read besides the dirty ones (reverse replication's first cycle, a
    /// checkpoint applied): forgotten only once the replica has committed the point.
    #[serde(default)]
    pub extra: Vec<(usize, u64, u64)>,
    /// Whether the spool holds every frame (false: the cycle was larger than the spool's
    /// free space and went only to the wire; it cannot be resumed, only captured again).
    #[serde(default = "spooled_by_default")]
    pub spooled: bool,
}

/// Descriptions written before `Pending::spooled` existed describe whole spools.
fn spooled_by_default() -> bool {
    true
}

/// A fresh, non-zero capture identity.
fn new_capture_id(vm_id: i64, cycle: i64) -> u64 {
    let mut seed = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
    let h = blake3::hash(&[&seed[..], &vm_id.to_le_bytes(), &cycle.to_le_bytes()].concat());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | 1
}

/// Where a VM's fleecing overlays live while a cycle holds its point.
fn fleece_dir(shared: &Shared, vm_id: i64) -> PathBuf {
    shared
        .cfg
        .data_dir
        .join("run")
        .join(format!("fleece-{vm_id}"))
}

fn spool_dir(shared: &Shared, vm_id: i64) -> PathBuf {
    shared.cfg.data_dir.join("spool").join(vm_id.to_string())
}

fn spool_paths(dir: &Path, cycle: i64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("cycle-{cycle}.spool")),
        dir.join(format!("cycle-{cycle}.meta")),
    )
}

/// The captured cycle waiting to be shipped, if any.
pub fn pending(shared: &Shared, vm_id: i64) -> Option<Pending> {
    let dir = spool_dir(shared, vm_id);
    let mut found: Vec<Pending> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".meta"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    found.sort_by_key(|p| p.cycle);
    found.into_iter().next()
}

/// Removes everything spooled for a VM.
pub fn discard_spool(shared: &Shared, vm_id: i64) {
    let _ = std::fs::remove_dir_all(spool_dir(shared, vm_id));
}

/// Runs a relationship until it is removed.
pub async fn run(shared: Arc<Shared>, vm_id: i64) {
    let kick = shared.kick(vm_id);
    loop {
        let rel = match shared.store.replication(vm_id) {
            Ok(Some(r)) if r.role == Role::Primary => r,
            _ => return,
        };
        let started = tokio::time::Instant::now();
        if let ReplicationState::ReadyForInitialReplication = rel.state {
            if let InitialMethod::At(t) = rel.settings.initial {
                if now_unix() >= t {
                    set_state(
                        &shared,
                        vm_id,
                        ReplicationState::InitialReplicationInProgress,
                        None,
                    );
                    continue;
                }
            }
        }
        let awaiting_import = rel.state == ReplicationState::WaitingForInitialReplication
            && matches!(rel.settings.initial, InitialMethod::Export(_));
        if rel.state.runs_cycles() || awaiting_import {
            run_cycle(&shared, &rel).await;
        }
        let rel = match shared.store.replication(vm_id) {
            Ok(Some(r)) => r,
            _ => return,
        };
        let wait = match rel.state {
            ReplicationState::ReadyForInitialReplication => match rel.settings.initial {
                InitialMethod::At(t) => Duration::from_secs((t - now_unix()).clamp(1, 3600) as u64),
                _ => Duration::from_secs(3600),
            },
            // A failed cycle is retried at the next interval, but not sooner than 2 s.
            _ => rel.settings.interval.0,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(started + wait) => {}
            _ = kick.notified() => {}
        }
    }
}

fn set_state(shared: &Shared, vm_id: i64, state: ReplicationState, error: Option<String>) {
    if let Ok(Some(r)) = shared.store.replication(vm_id) {
        if r.state != state {
            shared.events.emit_id(
                vm_id,
                "replication_state",
                &format!("{} -> {}", r.state, state),
            );
        }
        let _ = shared
            .store
            .set_replication_state(vm_id, state, error.as_deref());
    }
}

/// Runs one cycle; every log line of it carries the VM, the relationship and the cycle
/// number (a span), so an operator can follow one cycle through the log.
pub(crate) async fn run_cycle(shared: &Arc<Shared>, rel: &ReplicationRow) {
    let vm = vm_row(shared, rel.vm_id)
        .map(|v| v.spec.name.to_string())
        .unwrap_or_default();
    let cycle = pending(shared, rel.vm_id)
        .map(|p| p.cycle)
        .unwrap_or(rel.last_cycle + 1);
    let span = tracing::info_span!(
        "cycle",
        vm = %vm,
        relationship = %rel.settings.relationship_id,
        cycle
    );
    run_cycle_in_span(shared, rel).instrument(span).await
}

async fn run_cycle_in_span(shared: &Arc<Shared>, rel: &ReplicationRow) {
    let started_ms = now_ms();
    let was_running = vm_is_running(shared, rel.vm_id);
    let mut result = attempt_cycle(shared, rel).await;
    // The guest shut down under the cycle (an administrator preparing a planned failover
    // does exactly this): not a replication error. The capture that lost its QEMU left its
    // change-tracking generation on the disk, which the offline capture adopts, so the
    // cycle runs again at once from the stopped VM's disks.
    if result.is_err() && was_running && vm_went_off(shared, rel.vm_id).await {
        info!("the VM stopped during the cycle: captured again from its disks");
        // From the store again: the failed attempt may have recorded a cycle.
        if let Ok(Some(fresh)) = shared.store.replication(rel.vm_id) {
            result = attempt_cycle(shared, &fresh).await;
        }
    }
    shared.clear_progress(rel.vm_id);
    match result {
        Ok(p) => {
            let _ = shared.store.record_cycle(&CycleRow {
                vm_id: rel.vm_id,
                cycle: p.cycle,
                kind: p.kind.clone(),
                started_ms: p.started_ms,
                ended_ms: now_ms(),
                dirty_bytes: p.dirty_bytes as i64,
                sent_bytes: p.spool_bytes as i64,
                ok: true,
                error: None,
            });
        }
        Err(e) if e.is::<AwaitingImport>() => {}
        Err(e) => {
            let msg = format!("{e:#}");
            let cycle = pending(shared, rel.vm_id)
                .map(|p| p.cycle)
                .unwrap_or(rel.last_cycle + 1);
            let _ = shared.store.record_cycle(&CycleRow {
                vm_id: rel.vm_id,
                cycle,
                kind: "failed".into(),
                started_ms,
                ended_ms: now_ms(),
                dirty_bytes: 0,
                sent_bytes: 0,
                ok: false,
                error: Some(msg.clone()),
            });
            let state = if e.downcast_ref::<ResyncRequired>().is_some() {
                ReplicationState::ResynchronizationRequired
            } else if matches!(
                rel.state,
                ReplicationState::InitialReplicationInProgress
                    | ReplicationState::Resynchronizing
                    | ReplicationState::WaitingForInitialReplication
            ) {
                rel.state
            } else {
                ReplicationState::Error
            };
            warn!(error = %msg, "replication cycle failed");
            shared.events.emit_id(
                rel.vm_id,
                "cycle_failed",
                &format!("replication cycle {cycle} failed: {msg}"),
            );
            set_state(shared, rel.vm_id, state, Some(msg));
        }
    }
}

/// One try at a cycle: capture (unless a captured one waits), then ship.
async fn attempt_cycle(shared: &Arc<Shared>, rel: &ReplicationRow) -> anyhow::Result<Pending> {
    if pending(shared, rel.vm_id).is_none() {
        // An initial copy carried by hand (export) is written out, not sent.
        let exported =
            matches!(rel.settings.initial, InitialMethod::Export(_)) && rel.generation == 0;
        if exported {
            capture(shared, rel, None).await?;
        } else {
            // Capture and ship at once: batches go to the replica while they are read, as
            // far as the link keeps up (the rest is shipped from the spool once read).
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_QUEUE_FRAMES);
            let progress = Arc::new(StreamProgress::default());
            let tap = Tap {
                tx,
                open: true,
                progress: progress.clone(),
            };
            let (captured, streamed) = tokio::join!(
                capture(shared, rel, Some(tap)),
                stream_ship(shared, rel, rx, &progress)
            );
            match (captured, streamed) {
                // Committed on the replica: the cycle is done, even if the capture failed
                // after its spool was complete (e.g. releasing the fleecing point).
                (captured, Ok(Some(p))) => {
                    if let Err(e) = captured {
                        warn!(error = %format!("{e:#}"), "the capture failed after its cycle was complete; the cycle is replicated");
                    }
                    return Ok(p);
                }
                (Err(e), _) => return Err(e),
                // The send failed: the cycle stays captured and its transfer resumes from
                // the spool at the next attempt.
                (Ok(()), Err(e)) => return Err(e),
                // A replica older than protocol 3 (or one that has the cycle): below.
                (Ok(()), Ok(None)) => {}
            }
        }
    }
    let p = pending(shared, rel.vm_id).ok_or_else(|| anyhow!("the captured cycle vanished"))?;
    if let InitialMethod::Export(dir) = &rel.settings.initial {
        if p.kind == "initial" {
            if rel.state != ReplicationState::WaitingForInitialReplication {
                export_initial(shared, rel, &p, Path::new(dir)).await?;
                set_state(
                    shared,
                    rel.vm_id,
                    ReplicationState::WaitingForInitialReplication,
                    None,
                );
                return Err(AwaitingImport.into());
            }
            // Exported: ship() below only records it once the replica has imported it.
            let vm = vm_row(shared, rel.vm_id)?;
            let session = handshake(shared, &vm, rel).await?;
            let imported = session.last_cycle >= p.cycle;
            session.close().await;
            if !imported {
                return Err(AwaitingImport.into());
            }
        }
    }
    ship(shared, rel, &p).await
}

fn vm_is_running(shared: &Shared, vm_id: i64) -> bool {
    matches!(shared.store.vm_by_id(vm_id), Ok(Some(v)) if v.state != VmState::Off)
}

/// Whether the VM is off, or goes off within a few seconds (QEMU exiting is noticed a
/// moment after its monitor closes).
async fn vm_went_off(shared: &Shared, vm_id: i64) -> bool {
    for _ in 0..50 {
        if !vm_is_running(shared, vm_id) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

fn vm_row(shared: &Shared, vm_id: i64) -> anyhow::Result<VmRow> {
    shared
        .store
        .vm_by_id(vm_id)?
        .ok_or_else(|| anyhow!("the VM of this relationship is gone"))
}

/// The replicated disks: (index, image path, size).
fn disks(shared: &Shared, vm: &VmRow, rel: &ReplicationRow) -> Vec<(usize, PathBuf, u64)> {
    let dir = shared.vms.vm_dir(&vm.spec.name);
    rel.settings
        .replicated_disks(vm.spec.disks.len())
        .into_iter()
        .map(|i| {
            (
                i,
                dir.join(&vm.spec.disks[i].file),
                vm.spec.disks[i].size_bytes,
            )
        })
        .collect()
}

/// What a capture reads from each disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Allocated data only: the replica starts from zeros (initial copy).
    Allocated,
    /// Every chunk whose hash differs from the replica's (resynchronization, or an initial
    /// copy from an existing copy on the replica).
    Compare,
    /// The dirty extents of the frozen generation.
    Dirty,
}

async fn capture(
    shared: &Arc<Shared>,
    rel: &ReplicationRow,
    mut tap: Option<Tap>,
) -> anyhow::Result<()> {
    let vm = vm_row(shared, rel.vm_id)?;
    let name = vm.spec.name.clone();
    let cycle = rel.last_cycle + 1;
    let resync = rel.state == ReplicationState::Resynchronizing;
    let (scope, kind) = if rel.generation == 0 {
        if rel.settings.initial == InitialMethod::Existing {
            (Scope::Compare, "initial")
        } else {
            (Scope::Allocated, "initial")
        }
    } else if resync {
        (Scope::Compare, "resync")
    } else {
        (Scope::Dirty, "delta")
    };
    // The replica's hashes first (before anything is frozen here): they do not change
    // meanwhile, as only this primary writes there.
    let theirs = if scope == Scope::Compare {
        Some(fetch_hashes(shared, &vm, rel).await?)
    } else {
        None
    };
    let theirs = theirs.as_ref();
    // The VM lock only now: hashing on the replica may take long, and must not keep an
    // administrator from stopping the VM.
    let _vm_lock = shared.vms.lock_vm(&name).await;
    // Ranges to send besides the dirty ones (reverse replication's first cycle, a checkpoint
    // applied): read under the lock, as their writers hold it, so that the deletion once
    // this cycle holds them in its spool removes only what it read.
    let extra_key = super::failover::reverse_extra_key(rel.vm_id);
    let extra: Vec<(usize, u64, u64)> = shared
        .store
        .setting(&extra_key)
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default();
    let disks = disks(shared, &vm, rel);
    // The generation that holds every change since the last point: a capture whose outcome
    // was not recorded (ferryd crashed, QEMU stopped mid-cycle, a failure folded the old
    // generation into the new one) leaves a newer one, which is adopted.
    let live = shared.vms.live_qmp(&name);
    let nodes: Vec<String> = disks.iter().map(|(i, _, _)| disk_node(*i)).collect();
    let run_dir = fleece_dir(shared, rel.vm_id);
    let generation = match (&live, rel.generation == 0 || resync) {
        (_, true) => rel.generation,
        (Some(qmp), false) => {
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
        info!(vm = %name, from = rel.generation, to = generation, "adopted a newer change-tracking generation");
        set_generation(shared, rel.vm_id, generation);
    }
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
    let gran = rel.settings.granularity as u64;

    if let Some(qmp) = live {
        std::fs::create_dir_all(&run_dir)?;
        if rel.generation == 0 || resync {
            cbt::cleanup_stale(&qmp, &run_dir).await?;
        }
        if let Some(old) = &old_gen {
            for node in &nodes {
                match cbt::bitmap_state(&qmp, node, old).await? {
                    BitmapState::Ok { .. } => {}
                    BitmapState::Missing => {
                        return Err(ResyncRequired(format!("change tracking of {node} was lost (generation {old} is missing, e.g. after QEMU was killed): resynchronization required — run `ferry replication resume {name} --resync`")).into())
                    }
                    BitmapState::Inconsistent => {
                        return Err(ResyncRequired(format!("change tracking of {node} is inconsistent (QEMU or the host crashed while the VM ran): resynchronization required — run `ferry replication resume {name} --resync`")).into())
                    }
                }
            }
        }
        let specs: Vec<NodeSpec> = disks
            .iter()
            .map(|(i, _, size)| NodeSpec {
                node: disk_node(*i),
                size: *size,
            })
            .collect();
        // Application-consistent when due and the guest runs an agent: its filesystems are
        // frozen only around the (millisecond) transaction that creates the point.
        let mut agent = match due_app_consistent(shared, rel) {
            true => freeze_guest(shared, &vm).await,
            false => None,
        };
        let fleece = FleecePoint::create_with(
            &shared.cfg.qemu_img,
            &qmp,
            &run_dir,
            &specs,
            old_gen.as_deref(),
            &new_gen,
            gran,
            cycle as u64,
        )
        .await;
        let app_consistent = agent.is_some();
        if let Some(a) = agent.as_mut() {
            if let Err(e) = a.thaw(AGENT_TIMEOUT).await {
                warn!(vm = %name, error = %e, "thawing the guest's filesystems failed");
            }
        }
        let fleece = fleece?;
        let taken_at = now_unix();
        let capture_id = new_capture_id(rel.vm_id, cycle);
        if let Some(t) = tap.as_mut() {
            t.begin(cycle, kind, taken_at, app_consistent, capture_id)
                .await;
        }
        let context = fleece.meta_context();
        let sources: Vec<Source> = disks
            .iter()
            .zip(fleece.disks())
            .map(|((i, _, size), d)| Source {
                disk: *i,
                socket: fleece.nbd_socket().to_path_buf(),
                export: d.export_name.clone(),
                size: *size,
            })
            .collect();
        let read = read_to_spool(
            shared,
            rel,
            &sources,
            scope,
            theirs,
            &extra,
            &context,
            &spool_path,
            tap.as_mut(),
        )
        .await;
        match read {
            Ok(ReadSummary {
                frames,
                data_bytes,
                dirty_bytes,
                bytes: spool_bytes,
                spooled,
                timing,
            }) => {
                let p = Pending {
                    cycle,
                    kind: kind.into(),
                    taken_at,
                    generation: new_gen_no,
                    frames,
                    data_bytes,
                    dirty_bytes,
                    spool_bytes,
                    started_ms,
                    app_consistent,
                    capture: capture_id,
                    extra: extra.clone(),
                    spooled,
                };
                if let Err(e) = write_meta(&meta_path, &p) {
                    let _ = std::fs::remove_file(&spool_path);
                    let _ = fleece.release(&qmp, false).await;
                    // The old generation was folded into the new one.
                    set_generation(shared, rel.vm_id, new_gen_no);
                    return Err(e);
                }
                set_generation(shared, rel.vm_id, new_gen_no);
                // The old generation stays until the replica has committed this point
                // (ADR 0004 decision 3): if the spool is lost before that (it is not
                // fsynced), the next capture folds it into the new one.
                let report = fleece.release_keeping_generations(&qmp).await?;
                if let Some(err) = report.io_error {
                    warn!(vm = %name, ?err, "a guest write failed during the fleecing window");
                }
                info!(vm = %name, cycle, kind, dirty_bytes, data_bytes, %timing, "cycle captured");
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&spool_path);
                match fleece.release(&qmp, false).await {
                    // The old generation was folded into the new one, which now holds
                    // every change since the last point: it is the current one.
                    Ok(_) => set_generation(shared, rel.vm_id, new_gen_no),
                    Err(re) => {
                        warn!(vm = %name, error = %re, "releasing the fleecing point after a failed read failed")
                    }
                }
                Err(e)
            }
        }
    } else {
        capture_offline(
            shared,
            rel,
            &vm,
            &disks,
            cycle,
            kind,
            scope,
            theirs,
            &extra,
            old_gen.as_deref(),
            &new_gen,
            new_gen_no,
            &spool_path,
            &meta_path,
            started_ms,
            tap.as_mut(),
        )
        .await
    }
}

/// Returns the generation holding every change since the last point, after folding stray
/// generations into it: older strays merge into the current one; a newer one (a capture
/// started it and its outcome was not recorded) absorbs every other and is adopted.
async fn reconcile_generations(
    qmp: &ferry_qemu::qmp::Qmp,
    nodes: &[String],
    current: i64,
) -> anyhow::Result<i64> {
    let found = generations_on(qmp, nodes).await?;
    let on_node = |node: &str| -> Vec<i64> {
        found
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, names)| {
                names
                    .iter()
                    .filter_map(|n| n.strip_prefix("ferry-r").and_then(|g| g.parse().ok()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let newest = nodes
        .iter()
        .flat_map(|n| on_node(n))
        .max()
        .unwrap_or(current)
        .max(current);
    let target = generation_name(newest);
    for node in nodes {
        for g in on_node(node).into_iter().filter(|g| *g != newest) {
            cbt::rollback_generation(qmp, &[node.as_str()], &generation_name(g), &target).await?;
        }
    }
    Ok(newest)
}

/// [`reconcile_generations`] for a VM that is off, on its images.
async fn reconcile_offline(
    qemu_img: &Path,
    images: &[PathBuf],
    current: i64,
) -> anyhow::Result<i64> {
    let mut newest = current;
    let mut all = Vec::new();
    for image in images {
        let found: Vec<(i64, bool)> = cbt::offline_bitmaps(qemu_img, image)
            .await?
            .into_iter()
            // An in-use (inconsistent) generation is left to the capture, which asks for a
            // resynchronization.
            .filter(|b| !b.in_use())
            .filter_map(|b| {
                let g = b.name.strip_prefix("ferry-r")?.parse().ok()?;
                Some((g, b.flags.iter().any(|f| f == "auto")))
            })
            .collect();
        newest = found
            .iter()
            .map(|f| f.0)
            .max()
            .unwrap_or(newest)
            .max(newest);
        all.push((image, found));
    }
    let target = generation_name(newest);
    for (image, found) in all {
        for (g, _) in found.iter().filter(|f| f.0 != newest) {
            let source = generation_name(*g);
            let mut cmd = tokio::process::Command::new(qemu_img);
            cmd.args(["bitmap", "--merge", &source, "-b"])
                .arg(image)
                .args(["-F", "qcow2", "-f", "qcow2"])
                .arg(image)
                .arg(&target);
            let out = cmd.output().await?;
            if !out.status.success() {
                bail!(
                    "cannot fold change-tracking generation {source} into {target} of {}: {}",
                    image.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            cbt::remove_bitmap_offline(qemu_img, image, &source).await?;
        }
        // The adopted generation must record once QEMU opens the image.
        if found.iter().any(|f| f.0 == newest && !f.1) {
            let out = tokio::process::Command::new(qemu_img)
                .args(["bitmap", "--enable", "-f", "qcow2"])
                .arg(image)
                .arg(&target)
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "cannot enable change-tracking generation {target} of {}: {}",
                    image.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    Ok(newest)
}

#[allow(clippy::too_many_arguments)]
async fn capture_offline(
    shared: &Arc<Shared>,
    rel: &ReplicationRow,
    vm: &VmRow,
    disks: &[(usize, PathBuf, u64)],
    cycle: i64,
    kind: &str,
    scope: Scope,
    theirs: Option<&HashMap<usize, Vec<Hash>>>,
    extra: &[(usize, u64, u64)],
    old_gen: Option<&str>,
    new_gen: &str,
    new_gen_no: i64,
    spool_path: &Path,
    meta_path: &Path,
    started_ms: i64,
    mut tap: Option<&mut Tap>,
) -> anyhow::Result<()> {
    let qemu_img = &shared.cfg.qemu_img;
    let gran = rel.settings.granularity as u64;
    for (_, image, _) in disks {
        let bitmaps = cbt::offline_bitmaps(qemu_img, image).await?;
        if let Some(old) = old_gen {
            match bitmaps.iter().find(|b| b.name == old) {
                None => return Err(ResyncRequired(format!("change tracking of {} was lost (generation {old} is missing): resynchronization required — run `ferry replication resume {} --resync`", image.display(), vm.spec.name)).into()),
                Some(b) if b.in_use() => return Err(ResyncRequired(format!("change tracking of {} is inconsistent (QEMU or the host crashed while the VM ran): resynchronization required — run `ferry replication resume {} --resync`", image.display(), vm.spec.name)).into()),
                Some(_) => {}
            }
        }
        // Start the new generation now: the VM is off and locked, so nothing is written
        // between this instant and the read below.
        if !bitmaps.iter().any(|b| b.name == new_gen) {
            cbt::add_bitmap_offline(qemu_img, image, new_gen, gran).await?;
        }
    }
    let taken_at = now_unix();
    let capture_id = new_capture_id(rel.vm_id, cycle);
    if let Some(t) = tap.as_deref_mut() {
        // The VM is off: nothing runs inside to be inconsistent.
        t.begin(cycle, kind, taken_at, false, capture_id).await;
    }
    let qemu_nbd = qemu_nbd_path(&shared.cfg);
    let mut exports = Vec::new();
    let mut sources = Vec::new();
    let result = async {
        for (i, image, size) in disks {
            let socket = shared
                .cfg
                .data_dir
                .join("run")
                .join(format!("off-{}-{i}.sock", rel.vm_id));
            let export = OfflineExport::start(&qemu_nbd, image, old_gen, &socket).await?;
            sources.push(Source {
                disk: *i,
                socket: socket.clone(),
                export: export.export_name().to_owned(),
                size: *size,
            });
            exports.push(export);
        }
        let context = old_gen
            .map(ferry_nbd::dirty_bitmap_context)
            .unwrap_or_else(|| BASE_ALLOCATION.to_owned());
        read_to_spool(
            shared, rel, &sources, scope, theirs, &extra, &context, spool_path, tap,
        )
        .await
    }
    .await;
    for e in exports {
        let _ = e.close().await;
    }
    match result {
        Ok(ReadSummary {
            frames,
            data_bytes,
            dirty_bytes,
            bytes: spool_bytes,
            spooled,
            timing,
        }) => {
            let p = Pending {
                cycle,
                kind: kind.into(),
                taken_at,
                generation: new_gen_no,
                frames,
                data_bytes,
                dirty_bytes,
                spool_bytes,
                started_ms,
                // The VM is off: nothing runs inside to be inconsistent.
                app_consistent: false,
                capture: capture_id,
                extra: extra.to_vec(),
                spooled,
            };
            write_meta(meta_path, &p)?;
            set_generation(shared, rel.vm_id, new_gen_no);
            // The older generations stay until the replica has committed this point.
            info!(vm = %vm.spec.name, cycle, kind, dirty_bytes, %timing, "offline cycle captured");
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(spool_path);
            // The old generation still holds everything; the new one only what follows.
            Err(e)
        }
    }
}

fn set_generation(shared: &Shared, vm_id: i64, generation: i64) {
    let _ = shared.store.set_generation(vm_id, generation);
}

fn write_meta(path: &Path, p: &Pending) -> anyhow::Result<()> {
    let tmp = path.with_extension("meta.tmp");
    std::fs::write(&tmp, serde_json::to_vec(p)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

struct Source {
    disk: usize,
    socket: PathBuf,
    export: String,
    size: u64,
}

/// Asks the replica for the chunk hashes of every replicated disk.
async fn fetch_hashes(
    shared: &Shared,
    vm: &VmRow,
    rel: &ReplicationRow,
) -> anyhow::Result<HashMap<usize, Vec<Hash>>> {
    let mut session = handshake(shared, vm, rel).await?;
    session.writer.write_control(&Msg::HashRequest).await?;
    let wanted = rel.settings.replicated_disks(vm.spec.disks.len());
    let mut out = HashMap::new();
    shared.set_progress(rel.vm_id, "comparing", 0, 0);
    while out.len() < wanted.len() {
        match next_control(&mut session.reader, HASH_TIMEOUT).await? {
            Msg::Hashes { disk, hashes: h } => {
                let size = vm.spec.disks.get(disk).map(|d| d.size_bytes).unwrap_or(0);
                let h = hashes::decode(&h)?;
                if !wanted.contains(&disk) || h.len() as u64 != hashes::chunks(size) {
                    bail!("the replica server sent hashes that do not fit disk {disk}");
                }
                out.insert(disk, h);
            }
            Msg::Failed { reason } => bail!(
                "replica server {} cannot compare: {reason}",
                rel.partner_name
            ),
            other => bail!("unexpected answer from the replica server: {other:?}"),
        }
    }
    session.close().await;
    Ok(out)
}

/// What a capture's read produced.
struct ReadSummary {
    /// Batches (frames) read.
    frames: u64,
    /// Data bytes in them (uncompressed).
    data_bytes: u64,
    /// Bytes marked dirty (or allocated) when read.
    dirty_bytes: u64,
    /// Their size on the wire (and in the spool, when spooled).
    bytes: u64,
    /// Whether the spool holds them all.
    spooled: bool,
    /// Where the read's time went.
    timing: ReadTiming,
}

/// Where a capture's read spent its time (the cycle's profile, logged with "cycle
/// captured"): waiting for NBD reads, encoding frames (checksums, compression), writing
/// the spool, and waiting for the shipper (a cycle streamed without a spool).
#[derive(Debug, Default, Clone, Copy)]
struct ReadTiming {
    nbd: Duration,
    encode: Duration,
    spool: Duration,
    wait: Duration,
}

impl std::fmt::Display for ReadTiming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nbd {:.3} s, encode {:.3} s, spool {:.3} s, wait {:.3} s",
            self.nbd.as_secs_f64(),
            self.encode.as_secs_f64(),
            self.spool.as_secs_f64(),
            self.wait.as_secs_f64()
        )
    }
}

/// Reads the extents in `scope` of every source into a spool, and to the shipper through
/// `tap` as far as it keeps up. A read larger than the spool's free space streams to the
/// shipper only, at the link's pace, and is not spooled at all.
#[allow(clippy::too_many_arguments)]
async fn read_to_spool(
    shared: &Shared,
    rel: &ReplicationRow,
    sources: &[Source],
    scope: Scope,
    theirs: Option<&HashMap<usize, Vec<Hash>>>,
    extra: &[(usize, u64, u64)],
    context: &str,
    spool_path: &Path,
    mut tap: Option<&mut Tap>,
) -> anyhow::Result<ReadSummary> {
    let compress = rel.settings.compression;
    let mut spool = SpoolWriter::create(spool_path).await?;
    let mut builder = BatchBuilder::new(0, BATCH_PAYLOAD);
    let mut data_bytes = 0u64;
    let mut dirty_bytes = 0u64;
    // Map first, so progress has a total.
    let mut spool_bound = 0u64;
    let mut plans = Vec::new();
    for s in sources {
        let ctx = if scope == Scope::Dirty {
            context.to_owned()
        } else {
            BASE_ALLOCATION.to_owned()
        };
        let mut client = NbdClient::connect_unix(&s.socket, &s.export, &[ctx.as_str()])
            .await
            .with_context(|| format!("cannot read disk {} of the frozen view", s.disk))?;
        let map = client.map(&ctx).await?;
        let ranges: Vec<(u64, u64, bool)> = map
            .iter()
            .filter_map(|e: &NbdExtent| match scope {
                Scope::Dirty => (e.flags & 1 != 0).then_some((e.offset, e.length, false)),
                Scope::Allocated => {
                    (e.flags & STATE_ZERO == 0).then_some((e.offset, e.length, false))
                }
                Scope::Compare => None,
            })
            .collect();
        // Reverse replication's first cycle: also the ranges the old primary holds beyond
        // the failover point (merged with the dirty ones, overlaps once).
        let ranges = if scope == Scope::Dirty && !extra.is_empty() {
            let mut all: Vec<(u64, u64)> = ranges.iter().map(|r| (r.0, r.1)).collect();
            all.extend(
                extra
                    .iter()
                    .filter(|e| e.0 == s.disk)
                    .map(|e| (e.1, e.2.min(s.size.saturating_sub(e.1))))
                    .filter(|e| e.1 > 0),
            );
            all.sort();
            let mut merged: Vec<(u64, u64, bool)> = Vec::new();
            for (o, l) in all {
                match merged.last_mut() {
                    Some(last) if o <= last.0 + last.1 => {
                        last.1 = last.1.max(o + l - last.0);
                    }
                    _ => merged.push((o, l, false)),
                }
            }
            merged
        } else {
            ranges
        };
        dirty_bytes += ranges.iter().filter(|r| !r.2).map(|r| r.1).sum::<u64>();
        if scope == Scope::Compare {
            dirty_bytes += s.size;
            // At most the allocated data can differ as data (the rest as zero extents).
            spool_bound += map
                .iter()
                .filter(|e| e.flags & STATE_ZERO == 0)
                .map(|e| e.length)
                .sum::<u64>();
        } else {
            spool_bound += ranges.iter().filter(|r| !r.2).map(|r| r.1).sum::<u64>();
        }
        plans.push((s, client, ranges, map));
    }
    // The spool is bounded by the space it may take. A streamed cycle that may not fit goes
    // to the wire only (the read then waits for the link, so the fleecing window does); any
    // other is refused up front (the cycle fails, the bitmap generation is merged back,
    // nothing is lost) rather than fill the data disk.
    let free = free_bytes(spool_path.parent().unwrap_or(spool_path));
    let reserve = SPOOL_RESERVE_BYTES;
    let fits = free >= spool_bound.saturating_add(reserve);
    let wire_only = !fits && tap.as_deref().is_some_and(Tap::streaming);
    if wire_only {
        info!(
            may_spool_mib = spool_bound >> 20,
            free_mib = free >> 20,
            "this cycle is larger than the spool's free space: it streams without a spool"
        );
    } else if !fits {
        bail!(
            "this cycle may spool up to {} MiB but only {} MiB are free in {} (of which {} MiB stay in reserve): free space there or move data_dir; changes stay tracked",
            spool_bound >> 20,
            free >> 20,
            spool_path.parent().unwrap_or(spool_path).display(),
            reserve >> 20
        );
    }
    // While a shipper streams this cycle, the progress shown is its sending; this read's
    // own is shown only when nobody streams it.
    let quiet = |tap: &Option<&mut Tap>| tap.as_deref().is_some_and(Tap::streaming);
    if let Some(t) = tap.as_deref() {
        t.progress.hint.store(dirty_bytes, Ordering::Relaxed);
    }
    if !quiet(&tap) {
        shared.set_progress(rel.vm_id, "reading", 0, dirty_bytes);
    }
    let mut out = Emitter {
        compress,
        wire_only,
        frames: 0,
        bytes: 0,
        timing: ReadTiming::default(),
    };
    let mut nbd = Duration::ZERO;
    let mut done = 0u64;
    for (s, mut client, ranges, map) in plans {
        if scope == Scope::Compare {
            let theirs = theirs
                .and_then(|t| t.get(&s.disk))
                .ok_or_else(|| anyhow!("no hashes from the replica for disk {}", s.disk))?;
            let chunk = hashes::chunk_size(s.size);
            let zeros = hashes::zero_chunks(&map, s.size);
            let mut buf = Vec::new();
            for (i, zero) in zeros.iter().enumerate() {
                let offset = i as u64 * chunk;
                let len = chunk.min(s.size - offset);
                done += len;
                if !quiet(&tap) {
                    shared.set_progress(rel.vm_id, "comparing", done, dirty_bytes);
                }
                let ext = if *zero {
                    if theirs[i] == hashes::zero_hash(len) {
                        continue;
                    }
                    Extent::zeroes(s.disk as u16, offset, len)
                } else {
                    buf.resize(len as usize, 0);
                    let t = Instant::now();
                    client.read(offset, &mut buf).await?;
                    nbd += t.elapsed();
                    if hashes::hash(&buf) == theirs[i] {
                        continue;
                    }
                    if buf.iter().all(|&b| b == 0) {
                        Extent::zeroes(s.disk as u16, offset, len)
                    } else {
                        data_bytes += len;
                        Extent::data(s.disk as u16, offset, Bytes::copy_from_slice(&buf))
                    }
                };
                for b in builder.push(ext) {
                    out.emit(&mut spool, &mut tap, &b).await?;
                }
            }
            let _ = client.disconnect().await;
            continue;
        }
        // Pieces in disk order: zero ranges whole, data ranges cut into reads of at most
        // READ_CHUNK, read READ_AHEAD at a time with the NBD requests pipelined.
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        for (offset, len, zero) in ranges {
            if offset.checked_add(len).is_none_or(|end| end > s.size) {
                bail!("the NBD server reported an extent beyond disk {}", s.disk);
            }
            if zero {
                pieces.push((offset, len, true));
                continue;
            }
            let mut pos = offset;
            while pos < offset + len {
                let n = READ_CHUNK.min(offset + len - pos);
                pieces.push((pos, n, false));
                pos += n;
            }
        }
        for window in pieces.chunks(READ_AHEAD) {
            let mut bufs: Vec<Vec<u8>> = window
                .iter()
                .map(|&(_, n, zero)| {
                    if zero {
                        Vec::new()
                    } else {
                        vec![0u8; n as usize]
                    }
                })
                .collect();
            let t = Instant::now();
            client
                .read_many(
                    window
                        .iter()
                        .zip(bufs.iter_mut())
                        .filter(|((_, _, zero), _)| !zero)
                        .map(|((pos, _, _), buf)| (*pos, buf.as_mut_slice())),
                )
                .await?;
            nbd += t.elapsed();
            for (&(pos, n, zero), buf) in window.iter().zip(bufs) {
                let ext = if zero {
                    Extent::zeroes(s.disk as u16, pos, n)
                } else if buf.iter().all(|&b| b == 0) {
                    done += n;
                    if scope == Scope::Allocated {
                        continue;
                    }
                    Extent::zeroes(s.disk as u16, pos, n)
                } else {
                    done += n;
                    data_bytes += n;
                    Extent::data(s.disk as u16, pos, Bytes::from(buf))
                };
                for b in builder.push(ext) {
                    out.emit(&mut spool, &mut tap, &b).await?;
                }
            }
            if !quiet(&tap) {
                shared.set_progress(rel.vm_id, "reading", done, dirty_bytes);
            }
        }
        let _ = client.disconnect().await;
    }
    if let Some(b) = builder.finish() {
        out.emit(&mut spool, &mut tap, &b).await?;
    }
    // Not fsynced: the generation that produced it stays until the replica has committed
    // the point, so a lost spool costs a re-read, never data (ADR 0004 decision 3).
    spool.finish_unsynced().await?;
    if let Some(t) = tap.as_deref() {
        t.progress.total.store(out.bytes, Ordering::Relaxed);
    }
    Ok(ReadSummary {
        frames: out.frames,
        data_bytes,
        dirty_bytes,
        bytes: out.bytes,
        spooled: !wire_only,
        timing: ReadTiming { nbd, ..out.timing },
    })
}

/// Where a capture's batches go: the spool and the shipper as far as it keeps up, or (a
/// cycle larger than the spool's free space) the shipper only, waiting for it.
struct Emitter {
    compress: bool,
    wire_only: bool,
    frames: u64,
    bytes: u64,
    timing: ReadTiming,
}

impl Emitter {
    async fn emit(
        &mut self,
        spool: &mut SpoolWriter,
        tap: &mut Option<&mut Tap>,
        batch: &ferry_wire::ExtentBatch,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let frame = spool.encode_batch_frame(batch, self.compress)?;
        let encoded = Instant::now();
        self.timing.encode += encoded - started;
        let len = frame.wire_len() as u64;
        if self.wire_only {
            let tap = tap.as_deref_mut().ok_or_else(|| {
                anyhow!("a cycle larger than the spool's free space has no stream")
            })?;
            tap.send(frame).await?;
            self.timing.wait += encoded.elapsed();
        } else {
            spool.append_encoded(&frame).await?;
            self.timing.spool += encoded.elapsed();
            if let Some(t) = tap.as_deref_mut() {
                t.frame(frame);
            }
        }
        self.frames += 1;
        self.bytes += len;
        Ok(())
    }
}

/// Writes the captured initial copy to `dir/VM/` (data file + manifest) for carrying to
/// the replica server, where `ferry replication import` applies it.
async fn export_initial(
    shared: &Shared,
    rel: &ReplicationRow,
    p: &Pending,
    dir: &Path,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let vm = vm_row(shared, rel.vm_id)?;
    let out = dir.join(vm.spec.name.as_str());
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create the export folder {}", out.display()))?;
    let (spool_path, _) = spool_paths(&spool_dir(shared, rel.vm_id), p.cycle);
    let data = out.join(EXPORT_DATA);
    let mut src = tokio::fs::File::open(&spool_path).await?;
    let mut dst = tokio::fs::File::create(&data)
        .await
        .with_context(|| format!("cannot write {}", data.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    shared.set_progress(rel.vm_id, "exporting", 0, p.spool_bytes);
    loop {
        let n = src.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .await
            .with_context(|| format!("cannot write {}", data.display()))?;
        done += n as u64;
        shared.set_progress(rel.vm_id, "exporting", done, p.spool_bytes);
    }
    dst.sync_all().await?;
    let manifest = ExportManifest {
        format: EXPORT_FORMAT,
        vm: vm.spec.name.to_string(),
        primary: shared.cfg.name.clone(),
        primary_fingerprint: shared.identity.fingerprint.clone(),
        cycle: p.cycle,
        kind: p.kind.clone(),
        taken_at: p.taken_at,
        frames: p.frames,
        data_bytes: p.data_bytes,
        file_bytes: done,
    };
    let tmp = out.join("export.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, out.join(EXPORT_MANIFEST))?;
    info!(vm = %vm.spec.name, dir = %out.display(), bytes = done, "initial copy exported");
    Ok(())
}

/// How long the guest agent may take to answer a sync or a thaw.
const AGENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long it may take to freeze the guest's filesystems.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this cycle should try an application-consistent point (and marks the attempt,
/// so a guest without an agent costs the wait once per period, not every cycle).
fn due_app_consistent(shared: &Shared, rel: &ReplicationRow) -> bool {
    let Some(every) = rel.settings.app_consistent_every else {
        return false;
    };
    let now = now_unix();
    let mut tried = shared.app_consistent_tried.lock().expect("tried");
    let last = tried.get(&rel.vm_id).copied().unwrap_or(0);
    if now - last < every as i64 {
        return false;
    }
    tried.insert(rel.vm_id, now);
    true
}

/// Freezes the guest's filesystems through its agent; `None` (crash-consistent point,
/// reason logged and recorded as an event) when there is no agent or it fails.
pub(crate) async fn freeze_guest(shared: &Shared, vm: &VmRow) -> Option<GuestAgent> {
    let socket = shared.vms.agent_socket(vm.id);
    let mut agent = match GuestAgent::connect(&socket, AGENT_TIMEOUT).await {
        Ok(a) => a,
        Err(e) => {
            shared.events.emit_id(
                vm.id,
                "app_consistent_skipped",
                &format!("crash-consistent point instead of application-consistent: {e}"),
            );
            return None;
        }
    };
    match agent.freeze(FREEZE_TIMEOUT).await {
        Ok(n) => {
            info!(vm = %vm.spec.name, filesystems = n, "guest filesystems frozen");
            Some(agent)
        }
        Err(e) => {
            // A freeze that timed out may still happen: thaw to be sure.
            let _ = agent.thaw(AGENT_TIMEOUT).await;
            shared.events.emit_id(
                vm.id,
                "app_consistent_skipped",
                &format!("crash-consistent point instead of application-consistent: {e}"),
            );
            None
        }
    }
}

/// Asks the replica server to fail the VM over to cycle `cycle` (planned failover); returns
/// what it did.
pub async fn send_planned_failover(
    shared: &Shared,
    vm: &VmRow,
    rel: &ReplicationRow,
    start: bool,
    reverse_to: Option<(String, String)>,
) -> anyhow::Result<String> {
    let mut session = handshake(shared, vm, rel).await?;
    session
        .writer
        .write_control(&Msg::PlannedFailover {
            cycle: rel.last_cycle,
            start,
            reverse_to,
        })
        .await?;
    let answer = next_control(&mut session.reader, Duration::from_secs(120)).await?;
    session.close().await;
    match answer {
        Msg::FailedOver { message } => Ok(message),
        Msg::Failed { reason } => bail!("replica server {} refused: {reason}", rel.partner_name),
        other => bail!("unexpected answer from the replica server: {other:?}"),
    }
}

/// The marker of a reverse replication the old primary has not accepted yet.
pub fn reverse_key(vm_id: i64) -> String {
    format!("reverse_pending:{vm_id}")
}

/// A connection to the replica server that got past Hello.
pub struct Session {
    reader: FrameReader<tokio::io::ReadHalf<peer::PeerStream>>,
    writer: FrameWriter<tokio::io::WriteHalf<peer::PeerStream>>,
    /// The replica server's host name.
    pub replica: String,
    /// Reverse replication: ranges the old primary holds beyond the failover point.
    pub extra: Vec<(usize, u64, u64)>,
    /// The last cycle the replica committed.
    pub last_cycle: i64,
    /// The capture that cycle came from, if the replica says.
    pub last_capture: Option<u64>,
    /// A partially received cycle on the replica.
    pub resume: Option<super::proto::Resume>,
    /// The protocol version the replica answered.
    pub protocol: u32,
}

/// Connects to the replica server (mutual TLS, pinned certificate) and introduces the VM:
/// the replica authorizes this host and creates (or finds) the replica VM. A refusal comes
/// back as an error carrying the replica's reason.
pub async fn handshake(
    shared: &Shared,
    vm: &VmRow,
    rel: &ReplicationRow,
) -> anyhow::Result<Session> {
    let disks: Vec<DiskMeta> = disks(shared, vm, rel)
        .into_iter()
        .map(|(index, _, size_bytes)| DiskMeta { index, size_bytes })
        .collect();
    let boot = super::boot_files::announce(&vm.spec).await?;
    // The replica's pinned certificate, or the successor it announced while rotating it.
    let successor = super::rotation::successor(&shared.store, &rel.partner_fingerprint);
    let mut pins = vec![rel.partner_fingerprint.as_str()];
    pins.extend(successor.as_deref());
    let tls = peer::connect_any(&shared.identity, &rel.partner_addr, &pins).await?;
    let presented = peer::server_fingerprint(&tls).unwrap_or_default();
    if presented != rel.partner_fingerprint {
        super::rotation::adopt(&shared.store, &presented);
    }
    let next_fp = shared.identity.next();
    let (r, w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    if let Some(l) = shared.limiter(rel) {
        writer.add_limiter(l);
    }
    if let Some(l) = shared.host_limiter.clone() {
        writer.add_limiter(l);
    }
    writer
        .write_control(&Msg::Hello {
            protocol: MIN_PROTOCOL,
            max_protocol: Some(PROTOCOL),
            primary: shared.cfg.name.clone(),
            spec: vm.spec.clone(),
            disks,
            settings: rel.settings.clone(),
            last_cycle: rel.last_cycle,
            reverse: shared
                .store
                .setting(&reverse_key(rel.vm_id))
                .ok()
                .flatten()
                .is_some(),
            reverse_resync: rel.state == ReplicationState::Resynchronizing,
            boot_files: boot.iter().map(|(m, _)| m.clone()).collect(),
            next_fingerprint: next_fp.clone(),
        })
        .await?;
    match next_control(&mut reader, peer::CONNECT_TIMEOUT).await? {
        Msg::Welcome {
            protocol,
            replica,
            last_cycle,
            last_capture,
            resume,
            extra,
            need_boot_files,
            next_fingerprint,
        } => {
            tracing::debug!(vm = %vm.spec.name, %replica, protocol, "replication session");
            super::rotation::learn(&shared.store, &presented, next_fingerprint.as_deref());
            if let Some(next) = &next_fp {
                // The replica answered a Hello that carried it.
                super::rotation::told(&shared.store, rel.vm_id, next);
            }
            super::boot_files::send(
                &mut reader,
                &mut writer,
                &boot,
                &need_boot_files,
                STALL_TIMEOUT,
            )
            .await?;
            Ok(Session {
                reader,
                writer,
                replica,
                extra,
                last_cycle,
                last_capture,
                resume,
                protocol,
            })
        }
        Msg::Refused { reason } => bail!(
            "replica server {} refused: {}",
            rel.partner_name,
            // The replica refuses an unknown certificate before the greeting tells it this
            // host's name: its advice names the entry to add as NAME; fill it in.
            reason.replace("--allow NAME=", &format!("--allow {}=", shared.cfg.name))
        ),
        other => bail!("unexpected answer from the replica server: {other:?}"),
    }
}

impl Session {
    /// Ends the session cleanly (TLS close_notify).
    pub async fn close(mut self) {
        let _ = self.writer.shutdown().await;
    }
}

/// What a capture tells the shipper streaming its cycle.
pub(crate) enum StreamItem {
    /// The point was taken: the cycle's identity.
    Begin {
        cycle: i64,
        kind: String,
        taken_at: i64,
        app_consistent: bool,
        capture: u64,
    },
    /// The next batch, as written to the spool.
    Frame(EncodedFrame),
}

/// A capture's end of the stream. Frames go to the shipper while it keeps up; from the
/// first one it cannot take, none: the rest stays, in order, in the spool, and the shipper
/// sends it from there once the capture has finished.
pub(crate) struct Tap {
    tx: tokio::sync::mpsc::Sender<StreamItem>,
    open: bool,
    progress: Arc<StreamProgress>,
}

/// How much a streamed cycle holds, for the shipper's progress: the read's estimate (the
/// dirty bytes) until the spool is complete, then its exact size.
#[derive(Default)]
pub(crate) struct StreamProgress {
    hint: AtomicU64,
    total: AtomicU64,
}

impl StreamProgress {
    fn total(&self, sent: u64) -> u64 {
        match self.total.load(Ordering::Relaxed) {
            0 => self.hint.load(Ordering::Relaxed).max(sent),
            n => n,
        }
    }
}

impl Tap {
    async fn begin(
        &mut self,
        cycle: i64,
        kind: &str,
        taken_at: i64,
        app_consistent: bool,
        capture: u64,
    ) {
        let begin = StreamItem::Begin {
            cycle,
            kind: kind.to_owned(),
            taken_at,
            app_consistent,
            capture,
        };
        if self.tx.send(begin).await.is_err() {
            self.open = false;
        }
    }

    /// Whether the shipper still takes this capture's frames (its progress is then the
    /// cycle's).
    fn streaming(&self) -> bool {
        self.open && !self.tx.is_closed()
    }

    /// Hands the shipper a frame that is not spooled, waiting for room in the queue.
    async fn send(&mut self, frame: EncodedFrame) -> anyhow::Result<()> {
        if !self.open || self.tx.send(StreamItem::Frame(frame)).await.is_err() {
            bail!("the stream to the replica server ended while a cycle too large for the spool's free space was read (a replica older than protocol 3 needs that space: free space in the spool's directory or move data_dir)");
        }
        Ok(())
    }

    fn frame(&mut self, frame: EncodedFrame) {
        if self.open && self.tx.try_send(StreamItem::Frame(frame)).is_err() {
            self.open = false;
        }
    }
}

/// Ships a cycle while it is captured (protocol 3, `CycleBegin::streamed`): the batches the
/// capture streams, then those it left in the spool, then the cycle's size with its end.
/// The replica commits only after that end, which is sent once the capture (and its
/// durable spool) is complete, so a failure anywhere leaves the same states as a shipped
/// spool would. Returns the committed cycle; `None` when it was not streamed (the capture
/// failed before its point, a replica older than protocol 3, or one that already has the
/// cycle): the caller ships it from the spool.
async fn stream_ship(
    shared: &Arc<Shared>,
    rel: &ReplicationRow,
    mut rx: tokio::sync::mpsc::Receiver<StreamItem>,
    progress: &StreamProgress,
) -> anyhow::Result<Option<Pending>> {
    let Some(StreamItem::Begin {
        cycle,
        kind,
        taken_at,
        app_consistent,
        capture,
    }) = rx.recv().await
    else {
        return Ok(None);
    };
    let vm = vm_row(shared, rel.vm_id)?;
    let Session {
        mut reader,
        mut writer,
        last_cycle,
        last_capture,
        protocol,
        ..
    } = handshake(shared, &vm, rel).await?;
    let superseded = last_cycle == cycle && superseded(last_capture, capture);
    if protocol < 3 || (last_cycle >= cycle && !superseded) {
        // Dropping `rx` stops the stream; the capture goes on into the spool.
        let _ = writer.shutdown().await;
        return Ok(None);
    }
    // The replica committed another capture of this cycle number (one given up here): this
    // one holds every change since the cycle before it, so it goes on top, as the next.
    let cycle = if superseded { cycle + 1 } else { cycle };
    writer
        .write_control(&Msg::CycleBegin {
            cycle,
            kind,
            taken_at,
            from_batch: 0,
            batches: 0,
            bytes: 0,
            app_consistent,
            capture,
            streamed: true,
        })
        .await?;
    let sending = async {
        let (mut frames, mut sent) = (0u64, 0u64);
        let mut keepalives = 0u64;
        // The shipper's profile: time writing frames to the link, time waiting for the read.
        let (mut writing, mut waiting) = (Duration::ZERO, Duration::ZERO);
        loop {
            // A read that runs ahead of a full queue (or finds little to send) leaves the
            // link quiet: keepalives keep the replica from taking it for a dead primary.
            let t = Instant::now();
            let received = tokio::time::timeout(STREAM_KEEPALIVE, rx.recv()).await;
            waiting += t.elapsed();
            let item = match received {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(_) => {
                    keepalives += 1;
                    writer.write_keepalive(keepalives).await?;
                    continue;
                }
            };
            let StreamItem::Frame(frame) = item else {
                bail!("the capture began cycle {cycle} twice");
            };
            let t = Instant::now();
            send_frame(&mut writer, &frame, rel).await?;
            writing += t.elapsed();
            frames += 1;
            sent += frame.wire_len() as u64;
            shared.set_progress(rel.vm_id, "sending", sent, progress.total(sent));
        }
        let from_spool = Instant::now();
        // The capture has ended (its sender is gone): done, or failed.
        let p = pending(shared, rel.vm_id)
            .filter(|p| p.capture == capture)
            .ok_or_else(|| anyhow!("the capture of cycle {cycle} did not complete"))?;
        let p = match p.cycle == cycle {
            true => p,
            false => renumber(shared, rel, &p, cycle)?,
        };
        if p.spooled {
            send_spool(shared, rel, &mut writer, &p, frames, sent).await?;
        } else if frames != p.frames {
            bail!(
                "cycle {cycle} was streamed without a spool, but {frames} of its {} batches were sent",
                p.frames
            );
        }
        writer
            .write_control(&Msg::CycleEnd {
                cycle,
                batches: Some(p.frames),
                bytes: Some(p.data_bytes),
            })
            .await?;
        info!(
            cycle,
            batches = p.frames,
            streamed = frames,
            write_s = format!("{:.3}", writing.as_secs_f64()),
            wait_s = format!("{:.3}", waiting.as_secs_f64()),
            spool_s = format!("{:.3}", from_spool.elapsed().as_secs_f64()),
            "cycle streamed: batches sent while read, the rest from the spool"
        );
        Ok::<Pending, anyhow::Error>(p)
    }
    .await;
    let p = match sending {
        Ok(p) => p,
        Err(e) => {
            if e.is::<SpoolLost>() {
                if let Some(p) = pending(shared, rel.vm_id).filter(|p| p.capture == capture) {
                    abandon_pending(shared, rel, &p).await;
                }
                return Err(e);
            }
            return Err(refusal_or(&mut reader, rel, cycle, e).await);
        }
    };
    await_commit(&mut reader, rel, cycle).await?;
    let _ = writer.shutdown().await;
    record_replicated(shared, rel, &vm, &p).await?;
    Ok(Some(p))
}

/// Whether the replica's last cycle came from another capture than `capture` (of the same
/// cycle number: one this primary gave up, whose end still reached the replica).
fn superseded(last_capture: Option<u64>, capture: u64) -> bool {
    capture != 0 && last_capture.is_some_and(|c| c != capture)
}

/// Gives a captured cycle the number `cycle` (its spool renamed, its description
/// rewritten), for a capture that must go on top of another capture of its number.
fn renumber(
    shared: &Shared,
    rel: &ReplicationRow,
    p: &Pending,
    cycle: i64,
) -> anyhow::Result<Pending> {
    let dir = spool_dir(shared, rel.vm_id);
    let (old_spool, old_meta) = spool_paths(&dir, p.cycle);
    let (new_spool, new_meta) = spool_paths(&dir, cycle);
    info!(
        from = p.cycle,
        to = cycle,
        "the replica committed an earlier capture of this cycle: this one goes on top of it"
    );
    if old_spool.exists() {
        std::fs::rename(&old_spool, &new_spool)?;
    }
    let q = Pending { cycle, ..p.clone() };
    write_meta(&new_meta, &q)?;
    std::fs::remove_file(&old_meta)?;
    Ok(q)
}

/// Sends a captured cycle and waits for the replica to commit it; returns the cycle as
/// shipped (renumbered if the replica already had another capture of its number).
async fn ship(shared: &Arc<Shared>, rel: &ReplicationRow, p: &Pending) -> anyhow::Result<Pending> {
    let vm = vm_row(shared, rel.vm_id)?;
    let Session {
        mut reader,
        mut writer,
        last_cycle,
        last_capture,
        resume,
        ..
    } = handshake(shared, &vm, rel).await?;
    let renumbered;
    let p = if last_cycle == p.cycle && superseded(last_capture, p.capture) {
        renumbered = renumber(shared, rel, p, last_cycle + 1)?;
        &renumbered
    } else {
        p
    };
    if last_cycle > p.cycle {
        bail!(
            "replica server {} has cycle {last_cycle}, beyond this primary's cycle {}: remove replication on both sides and enable it again",
            rel.partner_name,
            p.cycle
        );
    }
    if last_cycle < p.cycle {
        let from = resume
            .filter(|r| {
                r.cycle == p.cycle
                    && p.capture != 0
                    && r.capture == p.capture
                    && r.next_batch <= p.frames
            })
            .map(|r| r.next_batch)
            .unwrap_or(0);
        if from > 0 {
            info!(vm = %vm.spec.name, cycle = p.cycle, from, "resuming an interrupted transfer");
        }
        writer
            .write_control(&Msg::CycleBegin {
                cycle: p.cycle,
                kind: p.kind.clone(),
                taken_at: p.taken_at,
                from_batch: from,
                batches: p.frames,
                bytes: p.data_bytes,
                app_consistent: p.app_consistent,
                capture: p.capture,
                streamed: false,
            })
            .await?;
        let sending = async {
            send_spool(shared, rel, &mut writer, p, from, 0).await?;
            writer
                .write_control(&Msg::CycleEnd {
                    cycle: p.cycle,
                    batches: None,
                    bytes: None,
                })
                .await?;
            Ok::<(), anyhow::Error>(())
        }
        .await;
        if let Err(e) = sending {
            if e.is::<SpoolLost>() {
                abandon_pending(shared, rel, p).await;
                return Err(e);
            }
            return Err(refusal_or(&mut reader, rel, p.cycle, e).await);
        }
        await_commit(&mut reader, rel, p.cycle).await?;
    }
    let _ = writer.shutdown().await;
    record_replicated(shared, rel, &vm, p).await?;
    Ok(p.clone())
}

/// Sends the frames of cycle `p`'s spool from index `from` on, with the "sending" progress
/// (`sent` bytes already sent). A spool that cannot be read back whole fails with
/// [`SpoolLost`].
async fn send_spool(
    shared: &Shared,
    rel: &ReplicationRow,
    writer: &mut FrameWriter<tokio::io::WriteHalf<peer::PeerStream>>,
    p: &Pending,
    from: u64,
    mut sent: u64,
) -> anyhow::Result<()> {
    let (spool_path, _) = spool_paths(&spool_dir(shared, rel.vm_id), p.cycle);
    let lost = |why: String| SpoolLost {
        cycle: p.cycle,
        why,
    };
    if !p.spooled {
        return Err(lost(
            "it was larger than the spool's free space and went only to the wire".into(),
        )
        .into());
    }
    let mut spool = SpoolReader::open_at(&spool_path, from)
        .await
        .map_err(|e| lost(e.to_string()))?;
    shared.set_progress(rel.vm_id, "sending", sent, p.spool_bytes);
    let mut index = from;
    while let Some(frame) = spool
        .next_encoded()
        .await
        .map_err(|e| lost(e.to_string()))?
    {
        send_frame(writer, &frame, rel).await?;
        index += 1;
        sent += frame.wire_len() as u64;
        shared.set_progress(rel.vm_id, "sending", sent, p.spool_bytes);
    }
    if index != p.frames {
        return Err(lost(format!("{index} of its {} batches", p.frames)).into());
    }
    Ok(())
}

/// Gives up a captured cycle whose spool is damaged: its files go, and the change tracking
/// kept for it until the replica's commit makes the next capture carry its changes (a
/// delta folds the old generation into the new one; a resynchronization compares again).
/// An initial copy starts again from scratch.
async fn abandon_pending(shared: &Shared, rel: &ReplicationRow, p: &Pending) {
    warn!(cycle = p.cycle, kind = %p.kind, "abandoning a captured cycle whose spool is damaged");
    let (spool_path, meta_path) = spool_paths(&spool_dir(shared, rel.vm_id), p.cycle);
    let _ = std::fs::remove_file(meta_path);
    let _ = std::fs::remove_file(spool_path);
    if p.kind == "initial" {
        if let Ok(vm) = vm_row(shared, rel.vm_id) {
            let _vm_lock = shared.vms.lock_vm(&vm.spec.name).await;
            let disks = disks(shared, &vm, rel);
            let name = generation_name(p.generation);
            if let Some(qmp) = shared.vms.live_qmp(&vm.spec.name) {
                let nodes: Vec<String> = disks.iter().map(|(i, _, _)| disk_node(*i)).collect();
                let _ = cbt::remove_generation(&qmp, &nodes, &name).await;
            } else {
                for (_, image, _) in &disks {
                    let _ = cbt::remove_bitmap_offline(&shared.cfg.qemu_img, image, &name).await;
                }
            }
        }
        set_generation(shared, rel.vm_id, 0);
    }
}

/// Writes one frame, failing when the link stalls.
async fn send_frame(
    writer: &mut FrameWriter<tokio::io::WriteHalf<peer::PeerStream>>,
    frame: &EncodedFrame,
    rel: &ReplicationRow,
) -> anyhow::Result<()> {
    tokio::time::timeout(STALL_TIMEOUT, writer.write_encoded(frame))
        .await
        .map_err(|_| {
            anyhow!(
                "the link to replica server {} stalled for {}s",
                rel.partner_name,
                STALL_TIMEOUT.as_secs()
            )
        })??;
    Ok(())
}

/// A send failed: the replica may have refused the cycle and closed, and its reason
/// (already sent) says more than the broken pipe.
async fn refusal_or(
    reader: &mut FrameReader<tokio::io::ReadHalf<peer::PeerStream>>,
    rel: &ReplicationRow,
    cycle: i64,
    e: anyhow::Error,
) -> anyhow::Error {
    if let Ok(Ok(Msg::Failed { reason })) = tokio::time::timeout(
        Duration::from_secs(2),
        next_control(reader, Duration::from_secs(2)),
    )
    .await
    {
        return anyhow!(
            "replica server {} could not apply cycle {cycle}: {reason}",
            rel.partner_name
        );
    }
    e
}

/// Waits for the replica's answer to a cycle's end.
async fn await_commit(
    reader: &mut FrameReader<tokio::io::ReadHalf<peer::PeerStream>>,
    rel: &ReplicationRow,
    cycle: i64,
) -> anyhow::Result<()> {
    match next_control(reader, COMMIT_TIMEOUT).await? {
        Msg::Committed { cycle: c, .. } if c == cycle => Ok(()),
        Msg::Failed { reason } => bail!(
            "replica server {} could not apply cycle {cycle}: {reason}",
            rel.partner_name
        ),
        other => bail!("unexpected answer from the replica server: {other:?}"),
    }
}

/// The point exists on the replica: record it, drop what it made obsolete (the older
/// change-tracking generations, the extra ranges it carried), then forget the spool.
async fn record_replicated(
    shared: &Shared,
    rel: &ReplicationRow,
    vm: &VmRow,
    p: &Pending,
) -> anyhow::Result<()> {
    // (The spool's generation too: a crash between writing the spool's description and
    // recording the generation must not leave the store behind the bitmaps.)
    if let Some(before) =
        shared
            .store
            .record_shipped(rel.vm_id, p.cycle, p.taken_at, p.generation, &p.kind)?
    {
        let after = shared
            .store
            .replication(rel.vm_id)?
            .map(|r| r.state)
            .unwrap_or(before);
        if before != after {
            shared.events.emit_id(
                rel.vm_id,
                "replication_state",
                &format!("{before} -> {after}"),
            );
        }
    }
    drop_old_generations(shared, rel, vm, p).await;
    let (spool_path, meta_path) = spool_paths(&spool_dir(shared, rel.vm_id), p.cycle);
    let _ = std::fs::remove_file(meta_path);
    let _ = std::fs::remove_file(spool_path);
    info!(vm = %vm.spec.name, cycle = p.cycle, kind = %p.kind, bytes = p.spool_bytes, "cycle replicated");
    if p.kind == "resync" {
        shared.events.emit(
            &vm.spec.name,
            "resync_finished",
            &format!(
                "resynchronization finished: {} bytes differed and were sent, of {} compared",
                p.data_bytes, p.dirty_bytes
            ),
        );
    }
    Ok(())
}

/// The replica has committed the point of `p`: the generations before `p.generation` go,
/// and so do the extra ranges the point carried (if nobody added others since). Until now
/// they were kept so that a cycle lost before its commit (a spool lost with the host, a
/// transfer that cannot resume) is folded into the next one. A failure here costs only a
/// larger next point: whatever is left is folded into the current generation by the next
/// capture.
async fn drop_old_generations(shared: &Shared, rel: &ReplicationRow, vm: &VmRow, p: &Pending) {
    let _vm_lock = shared.vms.lock_vm(&vm.spec.name).await;
    let extra_key = super::failover::reverse_extra_key(rel.vm_id);
    if !p.extra.is_empty() {
        let now: Vec<(usize, u64, u64)> = shared
            .store
            .setting(&extra_key)
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default();
        if now == p.extra {
            let _ = shared.store.delete_setting(&extra_key);
        }
    }
    let disks = disks(shared, vm, rel);
    let obsolete = |name: &str| {
        name.strip_prefix("ferry-r")
            .and_then(|g| g.parse::<i64>().ok())
            .is_some_and(|g| g < p.generation)
    };
    let result: anyhow::Result<()> = async {
        if let Some(qmp) = shared.vms.live_qmp(&vm.spec.name) {
            let nodes: Vec<String> = disks.iter().map(|(i, _, _)| disk_node(*i)).collect();
            for (node, names) in generations_on(&qmp, &nodes).await? {
                for name in names.iter().filter(|n| obsolete(n)) {
                    cbt::remove_generation(&qmp, &[node.as_str()], name).await?;
                }
            }
        } else {
            for (_, image, _) in &disks {
                for b in cbt::offline_bitmaps(&shared.cfg.qemu_img, image).await? {
                    if obsolete(&b.name) {
                        cbt::remove_bitmap_offline(&shared.cfg.qemu_img, image, &b.name).await?;
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        warn!(vm = %vm.spec.name, error = %format!("{e:#}"), "the generations before the committed point could not be removed; the next capture folds them in");
    }
}

/// The change-tracking generations (`ferry-r<N>` bitmaps) on each of `nodes`.
async fn generations_on(
    qmp: &ferry_qemu::qmp::Qmp,
    nodes: &[String],
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let infos = qmp
        .execute(&ferry_qemu::qmp::QueryNamedBlockNodes { flat: Some(true) })
        .await?;
    Ok(nodes
        .iter()
        .map(|node| {
            let names = infos
                .iter()
                .find(|n| &n.node_name == node)
                .map(|info| {
                    info.dirty_bitmaps
                        .iter()
                        .filter_map(|b| b.name.clone())
                        .filter(|n| n.starts_with("ferry-r"))
                        .collect()
                })
                .unwrap_or_default();
            (node.clone(), names)
        })
        .collect())
}

async fn next_control<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    timeout: Duration,
) -> anyhow::Result<Msg> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, reader.read_frame())
            .await
            .map_err(|_| anyhow!("the replica server did not answer within {timeout:?}"))??
            .ok_or_else(|| anyhow!("the replica server closed the connection"))?;
        if frame.kind != ferry_wire::FrameKind::Keepalive {
            return Ok(frame.control()?);
        }
    }
}

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
