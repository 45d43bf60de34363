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
//!
//! The code walks the data path forward, one module per stage. A cycle (`attempt_cycle`,
//! below) is captured (`capture`): planned, its change-tracking generations reconciled
//! (`generations`), its disks frozen by a fleecing point of the running VM (`live`) or
//! exported from the stopped VM's images (`offline`). The frozen view is read (`read`; for
//! a comparison, against the replica's hashes: `compare`) into frames (`frame`) that go to
//! the spool (`spool`) and to the shipper; they are sent over a session with the replica
//! (`send`, `session`), and the replica's commit is recorded (`commit`). Beside the data
//! path: application-consistent points (`app_consistent`), an initial copy carried by hand
//! (`export`), and removal (`remove`). This module is the relationship's task itself: its
//! loop, one attempt at a cycle, and how the outcome is recorded.

mod app_consistent;
mod capture;
mod commit;
mod compare;
mod export;
mod frame;
mod generations;
mod live;
mod offline;
mod read;
mod remove;
mod send;
mod session;
mod spool;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use ferry_domain::replication::InitialMethod;
use ferry_domain::{ReplicationState, Role, VmState};
use ferry_store::{CycleRow, ReplicationRow, VmRow};
use tracing::{info, warn, Instrument};

use super::{now_ms, now_unix, Shared};

pub(crate) use app_consistent::freeze_guest;
pub(crate) use frame::{StreamItem, StreamProgress, Tap};
pub use generations::generation_name;
pub use remove::remove_tracking;
pub use session::{handshake, reverse_key, send_planned_failover, Session};
pub use spool::{discard_spool, pending, Pending};

/// Frames a capture may queue for the shipper streaming them (about 1 MiB each), within
/// the host's budget for all of them (`Shared::stream_budget`): beyond that the link is
/// slower than the read, and the rest waits in the spool. At 32 a 256 MiB cycle on this
/// project's test machine re-sent a quarter of its bytes from the spool; at 96 almost none
/// (docs/BENCHMARKS.md).
const STREAM_QUEUE_FRAMES: usize = 96;

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
        // A cluster VM replicates from the node that runs it (or ran it last), never from
        // a node it left.
        if (rel.state.runs_cycles() || awaiting_import)
            && crate::cluster::replicates_here(&shared, vm_id)
        {
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
    // cycle runs again at once from the stopped VM's disks. Only a capture that failed
    // can mean that: when the cycle is captured and only its sending failed (the replica
    // is unreachable), waiting to see whether the VM goes off would only delay the retry.
    let captured = pending(shared, rel.vm_id).is_some();
    if result.is_err() && was_running && !captured && vm_went_off(shared, rel.vm_id).await {
        info!("the VM stopped during the cycle: captured again from its disks");
        // From the store again: the failed attempt may have recorded a cycle.
        if let Ok(Some(fresh)) = shared.store.replication(rel.vm_id) {
            result = attempt_cycle(shared, &fresh).await;
        }
    }
    shared.clear_progress(rel.vm_id);
    match result {
        Ok(p) => record_replicated_cycle(shared, rel, &p),
        Err(e) if e.is::<AwaitingImport>() => {}
        Err(e) => record_failed_cycle(shared, rel, started_ms, e),
    }
}

/// A replicated cycle goes into the cycle history.
fn record_replicated_cycle(shared: &Shared, rel: &ReplicationRow, p: &Pending) {
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

/// A failed cycle goes into the cycle history, the log and the events, and sets the
/// relationship's state: resynchronization required, an error, or (an initial copy or a
/// resynchronization, which try again) the state it had.
fn record_failed_cycle(shared: &Shared, rel: &ReplicationRow, started_ms: i64, e: anyhow::Error) {
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
    // The state as it is now: the cycle may have moved it (a resynchronization started
    // against an earlier initial copy the replica holds).
    let now = shared
        .store
        .replication(rel.vm_id)
        .ok()
        .flatten()
        .map_or(rel.state, |r| r.state);
    let state = if e.downcast_ref::<ResyncRequired>().is_some() {
        ReplicationState::ResynchronizationRequired
    } else if matches!(
        now,
        ReplicationState::InitialReplicationInProgress
            | ReplicationState::Resynchronizing
            | ReplicationState::WaitingForInitialReplication
    ) {
        now
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

/// One try at a cycle: capture (unless a captured one waits), then ship.
async fn attempt_cycle(shared: &Arc<Shared>, rel: &ReplicationRow) -> anyhow::Result<Pending> {
    if pending(shared, rel.vm_id).is_none() {
        // An initial copy carried by hand (export) is written out, not sent.
        let exported =
            matches!(rel.settings.initial, InitialMethod::Export(_)) && rel.generation == 0;
        if exported {
            capture::capture(shared, rel, None).await?;
        } else if let Some(p) = capture_and_stream(shared, rel).await? {
            return Ok(p);
        }
    }
    let p = pending(shared, rel.vm_id).ok_or_else(|| anyhow!("the captured cycle vanished"))?;
    if let InitialMethod::Export(dir) = &rel.settings.initial {
        if p.kind == "initial" {
            export::export_or_await_import(shared, rel, &p, Path::new(dir)).await?;
        }
    }
    send::ship(shared, rel, &p).await
}

/// Captures a cycle and streams it to the replica at once: the replicated cycle, or `None`
/// when it is captured but left to be shipped from the spool.
async fn capture_and_stream(
    shared: &Arc<Shared>,
    rel: &ReplicationRow,
) -> anyhow::Result<Option<Pending>> {
    // Capture and ship at once: batches go to the replica while they are read, as
    // far as the link keeps up (the rest is shipped from the spool once read).
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_QUEUE_FRAMES);
    let progress = Arc::new(StreamProgress::default());
    let tap = Tap::new(tx, progress.clone(), shared.stream_budget.clone());
    let (captured, streamed) = tokio::join!(
        capture::capture(shared, rel, Some(tap)),
        send::stream_ship(shared, rel, rx, &progress)
    );
    match (captured, streamed) {
        // Committed on the replica: the cycle is done, even if the capture failed
        // after its spool was complete (e.g. releasing the fleecing point).
        (captured, Ok(Some(p))) => {
            if let Err(e) = captured {
                warn!(error = %format!("{e:#}"), "the capture failed after its cycle was complete; the cycle is replicated");
            }
            Ok(Some(p))
        }
        (Err(e), _) => Err(e),
        // The send failed: the cycle stays captured and its transfer resumes from
        // the spool at the next attempt.
        (Ok(()), Err(e)) => Err(e),
        // A replica older than protocol 3 (or one that has the cycle): below.
        (Ok(()), Ok(None)) => Ok(None),
    }
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
