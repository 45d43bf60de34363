//! The send stage: a captured cycle goes to the replica over a session, and the replica
//! answers once it has committed the point, which is then recorded here (`commit`). A cycle
//! is streamed while it is captured (protocol 3): its batches as they are read, then those
//! the read left in the spool, then its size with its end. Otherwise it is shipped from the
//! spool, resuming at the first batch the replica had not made durable. A link that stalls
//! fails the cycle (it stays captured); a damaged spool abandons it.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ferry_domain::ReplicationState;
use ferry_store::ReplicationRow;
use ferry_wire::{EncodedFrame, FrameReader, FrameWriter, SpoolReader};
use tracing::{info, warn};

use super::commit::{abandon_pending, record_replicated};
use super::session::next_control;
use super::spool::{spool_dir, spool_paths, write_meta};
use super::{handshake, pending, vm_row, Pending, Session, SpoolLost, StreamItem, StreamProgress};
use crate::peer;
use crate::replication::proto::{Msg, Resume};
use crate::replication::Shared;

/// How long a streamed cycle's link may stay quiet before a keepalive (the replica gives
/// up on a primary silent for a minute).
const STREAM_KEEPALIVE: Duration = Duration::from_secs(15);
/// A frame that cannot be sent for this long means the link is dead (a partition gives no
/// error, writes just stop draining).
pub(super) const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the replica may take to commit a point after the last batch.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Ships a cycle while it is captured (protocol 3, `CycleBegin::streamed`): the batches the
/// capture streams, then those it left in the spool, then the cycle's size with its end.
/// The replica commits only after that end, which is sent once the capture (and its
/// durable spool) is complete, so a failure anywhere leaves the same states as a shipped
/// spool would. Returns the committed cycle; `None` when it was not streamed (the capture
/// failed before its point, a replica older than protocol 3, or one that already has the
/// cycle): the caller ships it from the spool.
pub(super) async fn stream_ship(
    shared: &Shared,
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
    let superseded = last_cycle == cycle && superseded(shared, rel, cycle, last_capture, capture);
    if superseded && kind == "initial" {
        let _ = writer.shutdown().await;
        return Err(earlier_initial(shared, rel, cycle, taken_at, rel.generation + 1).await);
    }
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
        let streamed = stream_frames(shared, rel, &mut writer, &mut rx, progress, cycle).await?;
        end_stream(shared, rel, &mut writer, capture, cycle, streamed).await
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

/// What went to the replica while the cycle was read: frames, bytes, and the shipper's
/// profile (time writing frames to the link, time waiting for the read).
struct Streamed {
    frames: u64,
    sent: u64,
    writing: Duration,
    waiting: Duration,
}

/// Sends the frames the capture streams, until it ends (its sender is gone).
async fn stream_frames(
    shared: &Shared,
    rel: &ReplicationRow,
    writer: &mut FrameWriter<tokio::io::WriteHalf<peer::PeerStream>>,
    rx: &mut tokio::sync::mpsc::Receiver<StreamItem>,
    progress: &StreamProgress,
    cycle: i64,
) -> anyhow::Result<Streamed> {
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
        // The frame's share of the host's budget goes once it is sent (end of this turn).
        let StreamItem::Frame(frame, _budget) = item else {
            bail!("the capture began cycle {cycle} twice");
        };
        let t = Instant::now();
        send_frame(writer, &frame, rel).await?;
        writing += t.elapsed();
        frames += 1;
        sent += frame.wire_len() as u64;
        shared.set_progress(rel.vm_id, "sending", sent, progress.total(sent));
    }
    Ok(Streamed {
        frames,
        sent,
        writing,
        waiting,
    })
}

/// Ends a streamed cycle once its capture has ended: the batches the read left in the
/// spool, then the cycle's size with its end. Returns the captured cycle as sent.
async fn end_stream(
    shared: &Shared,
    rel: &ReplicationRow,
    writer: &mut FrameWriter<tokio::io::WriteHalf<peer::PeerStream>>,
    capture: u64,
    cycle: i64,
    streamed: Streamed,
) -> anyhow::Result<Pending> {
    let Streamed {
        frames,
        sent,
        writing,
        waiting,
    } = streamed;
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
        send_spool(shared, rel, writer, &p, frames, sent).await?;
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
    Ok(p)
}

/// Whether the replica's cycle `cycle` came from another capture than `capture` (one this
/// primary gave up, whose end still reached the replica). A replica that does not say its
/// last capture (older than `Welcome::last_capture`) is taken at its word unless this
/// primary gave that cycle number up.
fn superseded(
    shared: &Shared,
    rel: &ReplicationRow,
    cycle: i64,
    last_capture: Option<u64>,
    capture: u64,
) -> bool {
    match last_capture {
        Some(c) => capture != 0 && c != capture,
        None => super::commit::abandoned(shared, rel.vm_id) == Some(cycle),
    }
}

/// The replica committed an earlier *initial* copy as cycle `cycle` (one this primary gave
/// up). An initial copy skips what reads as zeros, so another one cannot go on top of it:
/// the replica's copy is taken as that cycle, and a resynchronization (a comparison by
/// hashes, which also sends zeros where they differ) brings it to this disk. Returns the
/// error that ends this attempt.
async fn earlier_initial(
    shared: &Shared,
    rel: &ReplicationRow,
    cycle: i64,
    taken_at: i64,
    generation: i64,
) -> anyhow::Error {
    if let Some(p) = pending(shared, rel.vm_id).filter(|p| p.cycle == cycle) {
        let (spool, meta) = spool_paths(&spool_dir(shared, rel.vm_id), p.cycle);
        let _ = std::fs::remove_file(meta);
        let _ = std::fs::remove_file(spool);
    }
    let recorded = shared
        .store
        .record_shipped(rel.vm_id, cycle, taken_at, generation, "initial")
        .and_then(|_| {
            shared
                .store
                .set_replication_state(rel.vm_id, ReplicationState::Resynchronizing, None)
        });
    if let Err(e) = recorded {
        return anyhow!("cannot record the replica's earlier initial copy: {e}");
    }
    warn!(
        cycle,
        "the replica holds an earlier initial copy of this cycle: resynchronizing against it"
    );
    anyhow!(
        "replica server {} holds an earlier initial copy (cycle {cycle}) from a transfer this primary gave up: resynchronizing against it (by comparison) instead of copying again",
        rel.partner_name
    )
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
pub(super) async fn ship(
    shared: &Shared,
    rel: &ReplicationRow,
    p: &Pending,
) -> anyhow::Result<Pending> {
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
    let superseded =
        last_cycle == p.cycle && superseded(shared, rel, p.cycle, last_capture, p.capture);
    if superseded && p.kind == "initial" {
        let _ = writer.shutdown().await;
        return Err(earlier_initial(shared, rel, p.cycle, p.taken_at, p.generation).await);
    }
    let p = if superseded {
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
        let from = resume_from(resume, p);
        if from > 0 {
            info!(vm = %vm.spec.name, cycle = p.cycle, from, "resuming an interrupted transfer");
        }
        send_cycle(shared, rel, &mut reader, &mut writer, p, from).await?;
    }
    let _ = writer.shutdown().await;
    record_replicated(shared, rel, &vm, p).await?;
    Ok(p.clone())
}

/// The batch a transfer of `p` resumes from: where the replica's partly received copy of
/// this very capture ends (0: from the start).
fn resume_from(resume: Option<Resume>, p: &Pending) -> u64 {
    resume
        .filter(|r| {
            r.cycle == p.cycle
                && p.capture != 0
                && r.capture == p.capture
                && r.next_batch <= p.frames
        })
        .map(|r| r.next_batch)
        .unwrap_or(0)
}

/// Sends cycle `p` from its spool, from batch `from` on, and waits for the replica to
/// commit it.
async fn send_cycle(
    shared: &Shared,
    rel: &ReplicationRow,
    reader: &mut FrameReader<tokio::io::ReadHalf<peer::PeerStream>>,
    writer: &mut FrameWriter<tokio::io::WriteHalf<peer::PeerStream>>,
    p: &Pending,
    from: u64,
) -> anyhow::Result<()> {
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
        send_spool(shared, rel, writer, p, from, 0).await?;
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
        return Err(refusal_or(reader, rel, p.cycle, e).await);
    }
    await_commit(reader, rel, p.cycle).await
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
