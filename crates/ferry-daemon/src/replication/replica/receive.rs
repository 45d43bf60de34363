//! The receive stage: a cycle's frames read off the connection and checked before anything
//! is written — the cycle must be the next one, every batch must come in sequence and stay
//! within its disk, and the end must match what was announced. Keepalives are skipped;
//! decoding and checksums are the frame reader's. Each checked batch goes to the apply
//! stage, and every few MiB the cycle is checkpointed (staging).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ferry_store::{PointRow, ReplicationRow, VmRow};
use ferry_wire::{ExtentBatch, FrameKind, FrameReader};
use tokio::io::AsyncRead;

use super::apply::Layers;
use super::cycle::Announced;
use super::staging::{self, Staging};
use super::{replicated_disks, IDLE};
use crate::replication::proto::Msg;
use crate::replication::Shared;

/// Data between durable checkpoints of a cycle being received (flush + resume mark): a
/// dropped link re-sends at most this much. Each checkpoint costs a flush of the layers (an
/// fdatasync): at 8 MiB they took a fifth of a 256 MiB cycle's time (docs/BENCHMARKS.md).
const FLUSH_EVERY_BYTES: u64 = 64 << 20;
/// ... or this long, whichever comes first: on a slow link a dropped connection re-sends at
/// most this many seconds of transfer.
const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// Where an announced cycle goes: the replica VM, its latest point and directory, and the
/// replicated disks with their sizes.
pub(super) struct Target {
    pub(super) vm: VmRow,
    pub(super) latest: Option<PointRow>,
    pub(super) vm_dir: PathBuf,
    pub(super) disk_sizes: Vec<(usize, u64)>,
}

/// Checks a cycle's announcement before anything is received: a streamed cycle's shape,
/// and that it is the next cycle of this replica.
pub(super) fn target(
    shared: &Shared,
    rel: &ReplicationRow,
    announced: &Announced<'_>,
) -> anyhow::Result<Target> {
    let (cycle, batches, bytes, from_batch) = (
        announced.cycle,
        announced.batches,
        announced.bytes,
        announced.from_batch,
    );
    if announced.streamed && (batches != 0 || bytes != 0 || from_batch != 0) {
        bail!("a streamed cycle starts at batch 0 and announces its size at its end");
    }
    let vm = shared
        .store
        .vm_by_id(rel.vm_id)?
        .ok_or_else(|| anyhow!("the replica VM is gone"))?;
    // Only the next cycle is applied: anything else would delete or build on the wrong layer.
    let current = shared
        .store
        .replication(rel.vm_id)?
        .map(|r| r.last_cycle)
        .unwrap_or(-1);
    if cycle != current + 1 {
        bail!("cycle {cycle} does not follow cycle {current}: refused");
    }
    let points = shared.store.list_points(rel.vm_id)?;
    let latest = points.last().cloned();
    let vm_dir = PathBuf::from(&vm.spec.disks[0].file)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("the replica VM has no storage directory"))?;
    let disk_sizes: Vec<(usize, u64)> = replicated_disks(&vm.spec, rel);
    Ok(Target {
        vm,
        latest,
        vm_dir,
        disk_sizes,
    })
}

/// Receives the cycle's frames up to its `CycleEnd`, applying each batch into `layers`
/// and checkpointing `staging` as it goes; the cycle's size (a streamed cycle says it at
/// its end). The replica VM's progress shows meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) async fn frames<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    rel: &ReplicationRow,
    reader: &mut FrameReader<R>,
    announced: &Announced<'_>,
    target: &Target,
    layers: &mut Layers,
    staging: &mut Staging,
    timing: &mut ApplyTiming,
) -> anyhow::Result<u64> {
    let result = async {
        let cycle = announced.cycle;
        let first = staging.next_batch;
        shared.set_progress(rel.vm_id, "applying", 0, announced.bytes);
        // Two stages at once: frames are read and checked while the batches before them are
        // written, through a short queue (its memory: APPLY_QUEUE batches of at most 8 MiB).
        let replicated: Vec<usize> = target
            .disk_sizes
            .iter()
            .map(|d| d.0)
            .filter(|d| layers.contains(*d))
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(APPLY_QUEUE);
        // The writes run in their own task (on another core than the reads, decryption and
        // checks), holding the layers and the staging until they are done.
        let writing = Writing {
            shared: shared.clone(),
            vm_id: rel.vm_id,
            bytes: announced.bytes,
            vm_dir: target.vm_dir.clone(),
            layers: std::mem::take(layers),
            staging: staging.clone(),
            timing: ApplyTiming::default(),
            result: Ok((0, 0)),
        };
        let writes = tokio::spawn(apply_batches(writing, rx));
        let read = read_batches(reader, announced, target, &replicated, first, tx, timing).await;
        let mut writing = writes
            .await
            .map_err(|e| anyhow!("the writes of cycle {cycle} stopped: {e}"))?;
        *layers = std::mem::take(&mut writing.layers);
        *staging = writing.staging.clone();
        timing.apply = writing.timing.apply;
        timing.checkpoint = writing.timing.checkpoint;
        // A failed read is the cause; the writes only stopped because of it.
        let (batches, bytes) = read?;
        let (applied, data_bytes) = writing.result?;
        if applied != batches {
            bail!("cycle {cycle} ended after {applied} batches, but {batches} were announced");
        }
        // A streamed cycle starts at batch 0: what arrived is its whole size.
        if announced.streamed && data_bytes != bytes {
            bail!("cycle {cycle} carried {data_bytes} data bytes, but {bytes} were announced");
        }
        Ok(bytes)
    }
    .await;
    shared.clear_progress(rel.vm_id);
    result
}

/// Batches read ahead of the writes: enough to keep the link and the disk busy at once.
const APPLY_QUEUE: usize = 4;

/// The read half of [`receive`]: frames off the connection until the cycle's end, each
/// batch checked (sequence from `first`, extents within replicated disks) before it goes
/// to the writes. Returns the batch count and data bytes the cycle ends with (as announced
/// up front, or at the end for a streamed cycle).
async fn read_batches<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    announced: &Announced<'_>,
    target: &Target,
    replicated: &[usize],
    first: u64,
    tx: tokio::sync::mpsc::Sender<ExtentBatch>,
    timing: &mut ApplyTiming,
) -> anyhow::Result<(u64, u64)> {
    let (cycle, streamed) = (announced.cycle, announced.streamed);
    let mut expected = first;
    loop {
        let t = Instant::now();
        let frame = tokio::time::timeout(IDLE, reader.read_frame())
            .await
            .map_err(|_| anyhow!("the primary went silent during cycle {cycle}"))??
            .ok_or_else(|| anyhow!("the connection closed in the middle of cycle {cycle}"))?;
        timing.receive += t.elapsed();
        match frame.kind {
            FrameKind::Keepalive => continue,
            FrameKind::Control => {
                let msg: Msg = frame.control()?;
                match msg {
                    Msg::CycleEnd {
                        cycle: c,
                        batches: b,
                        bytes: n,
                    } if c == cycle => {
                        if !streamed {
                            return Ok((announced.batches, announced.bytes));
                        }
                        let (Some(b), Some(n)) = (b, n) else {
                            bail!(
                                "the streamed cycle {cycle} ended without its batch count and size"
                            );
                        };
                        return Ok((b, n));
                    }
                    other => bail!("unexpected message during cycle {cycle}: {other:?}"),
                }
            }
            FrameKind::ExtentBatch => {
                let t = Instant::now();
                let batch = frame.batch()?;
                batch.expect_seq(expected)?;
                // Checked first: a bad extent applies nothing of its batch.
                check_extents(&batch, replicated, &target.disk_sizes)?;
                timing.decode += t.elapsed();
                expected += 1;
                if tx.send(batch).await.is_err() {
                    // The writes stopped (their error is the one reported).
                    return Ok((expected, 0));
                }
            }
        }
    }
}

/// The write half of [`receive`], with what it owns while it runs; its outcome is the
/// batches applied (from the first of the cycle) and the data bytes written.
struct Writing {
    shared: Arc<Shared>,
    vm_id: i64,
    /// The cycle's announced data bytes (for progress).
    bytes: u64,
    vm_dir: PathBuf,
    layers: Layers,
    staging: Staging,
    timing: ApplyTiming,
    result: anyhow::Result<(u64, u64)>,
}

/// Writes each checked batch into the layers, and every FLUSH_EVERY_BYTES or FLUSH_EVERY
/// a checkpoint (flush + resume mark). Stops at the first failure, or when the reads end.
async fn apply_batches(
    mut w: Writing,
    mut rx: tokio::sync::mpsc::Receiver<ExtentBatch>,
) -> Writing {
    let mut applied = w.staging.next_batch;
    let mut unflushed = 0u64;
    let mut data_bytes = 0u64;
    let mut flushed_at = Instant::now();
    let result = async {
        while let Some(batch) = rx.recv().await {
            let t = Instant::now();
            w.layers.write(&batch).await?;
            w.timing.apply += t.elapsed();
            data_bytes += batch.data_bytes();
            unflushed += batch.data_bytes().max(1);
            applied += 1;
            w.shared
                .set_progress(w.vm_id, "applying", data_bytes, w.bytes);
            if unflushed >= FLUSH_EVERY_BYTES || flushed_at.elapsed() >= FLUSH_EVERY {
                let t = Instant::now();
                staging::checkpoint(&mut w.layers, &mut w.staging, &w.vm_dir, applied).await?;
                flushed_at = Instant::now();
                w.timing.checkpoint += flushed_at - t;
                unflushed = 0;
            }
        }
        Ok::<_, anyhow::Error>((applied, data_bytes))
    }
    .await;
    w.result = result;
    w
}

/// Where the replica's time for a cycle went (its profile, logged as "cycle applied"):
/// waiting for and reading frames off the link, decoding and checking batches, writing
/// them into the layers (NBD), the resumable checkpoints (flush + mark), and making the
/// point durable (close + fsync) and recording it.
#[derive(Debug, Default)]
pub(super) struct ApplyTiming {
    pub(super) receive: Duration,
    pub(super) decode: Duration,
    pub(super) apply: Duration,
    pub(super) checkpoint: Duration,
    pub(super) durable: Duration,
    pub(super) record: Duration,
}

/// Checks that every extent of a batch is for a replicated disk and within its size.
fn check_extents(
    batch: &ExtentBatch,
    replicated: &[usize],
    disk_sizes: &[(usize, u64)],
) -> anyhow::Result<()> {
    for ext in &batch.extents {
        let disk = ext.disk as usize;
        if !replicated.contains(&disk) {
            bail!("extent for disk {disk}, which is not replicated");
        }
        let size = disk_sizes
            .iter()
            .find(|d| d.0 == disk)
            .map(|d| d.1)
            .unwrap_or(0);
        if ext.end().is_none_or(|end| end > size) {
            bail!(
                "extent at {} (+{}) is beyond disk {disk}'s size {size}",
                ext.offset,
                ext.len()
            );
        }
    }
    Ok(())
}
