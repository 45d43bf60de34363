//! The frame stage: each batch of extents a capture reads is encoded into a frame
//! (checksummed, optionally compressed) and goes to the spool and to the shipper streaming
//! the cycle as far as it keeps up (through the capture's `Tap`), or, for a cycle larger
//! than the spool's free space, to the shipper only, waiting for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail};
use ferry_wire::{BatchBuilder, EncodedFrame, Extent, ExtentBatch, FrameEncoder, SpoolWriter};

use super::read::ReadTiming;

/// Payload of one extent batch (one frame).
const BATCH_PAYLOAD: usize = 1 << 20;

/// Where a capture's batches go: the spool and the shipper as far as it keeps up, or (a
/// cycle larger than the spool's free space) the shipper only, waiting for it.
pub(super) struct Emitter<'t> {
    builder: BatchBuilder,
    encoder: FrameEncoder,
    /// The spool's writer runs in its own task, so that writing a frame overlaps reading
    /// and encoding the next; it gets each frame through this queue.
    spool: Option<(
        tokio::sync::mpsc::Sender<EncodedFrame>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
    tap: Option<&'t mut Tap>,
    compress: bool,
    frames: u64,
    bytes: u64,
    timing: ReadTiming,
}

impl<'t> Emitter<'t> {
    pub(super) fn new(
        spool: SpoolWriter,
        tap: Option<&'t mut Tap>,
        compress: bool,
        wire_only: bool,
    ) -> Self {
        let spool = (!wire_only).then(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(SPOOL_QUEUE);
            (tx, tokio::spawn(write_spool(spool, rx)))
        });
        Emitter {
            builder: BatchBuilder::new(0, BATCH_PAYLOAD),
            encoder: FrameEncoder::new(),
            spool,
            tap,
            compress,
            frames: 0,
            bytes: 0,
            timing: ReadTiming::default(),
        }
    }

    /// Whether a shipper streams this cycle (its progress is then the cycle's).
    pub(super) fn streaming(&self) -> bool {
        self.tap.as_deref().is_some_and(Tap::streaming)
    }

    /// Tells the shipper how much the read expects (the dirty bytes), for its progress.
    pub(super) fn estimate(&self, dirty_bytes: u64) {
        if let Some(t) = self.tap.as_deref() {
            t.progress.hint.store(dirty_bytes, Ordering::Relaxed);
        }
    }

    /// Adds an extent; the batches it completes go out.
    pub(super) async fn push(&mut self, extent: Extent) -> anyhow::Result<()> {
        for b in self.builder.push(extent) {
            self.emit(&b).await?;
        }
        Ok(())
    }

    /// The last batch goes out and the spool is complete: the frames and bytes emitted,
    /// and where the time went.
    pub(super) async fn finish(mut self) -> anyhow::Result<(u64, u64, ReadTiming)> {
        if let Some(b) = self.builder.finish() {
            self.emit(&b).await?;
        }
        // The spool is complete once its writer has written every frame.
        if let Some((tx, writer)) = self.spool.take() {
            drop(tx);
            let t = Instant::now();
            writer
                .await
                .map_err(|e| anyhow!("the spool's writer stopped: {e}"))??;
            self.timing.spool += t.elapsed();
        }
        if let Some(t) = self.tap.as_deref() {
            t.progress.total.store(self.bytes, Ordering::Relaxed);
        }
        Ok((self.frames, self.bytes, self.timing))
    }

    async fn emit(&mut self, batch: &ExtentBatch) -> anyhow::Result<()> {
        let started = Instant::now();
        let frame = self.encoder.encode_batch(batch, self.compress)?;
        let encoded = Instant::now();
        self.timing.encode += encoded - started;
        let len = frame.wire_len() as u64;
        match &self.spool {
            None => {
                let tap = self.tap.as_deref_mut().ok_or_else(|| {
                    anyhow!("a cycle larger than the spool's free space has no stream")
                })?;
                tap.send(frame).await?;
                self.timing.wait += encoded.elapsed();
            }
            Some((tx, _)) => {
                if let Some(t) = self.tap.as_deref_mut() {
                    t.frame(frame.clone());
                }
                if tx.send(frame).await.is_err() {
                    // The writer failed: its error says why.
                    let (_, writer) = self.spool.take().expect("the spool's writer");
                    writer
                        .await
                        .map_err(|e| anyhow!("the spool's writer stopped: {e}"))??;
                    bail!("the spool's writer stopped");
                }
                self.timing.spool += encoded.elapsed();
            }
        }
        self.frames += 1;
        self.bytes += len;
        Ok(())
    }
}

impl Drop for Emitter<'_> {
    /// A capture that failed stops its spool's writer (the spool is deleted anyway).
    fn drop(&mut self) {
        if let Some((_, writer)) = self.spool.take() {
            writer.abort();
        }
    }
}

/// Frames encoded ahead of the spool's writer (about 1 MiB each).
const SPOOL_QUEUE: usize = 8;

/// The spool's writer: appends each frame in order, then completes the file. Not fsynced:
/// the generation that produced it stays until the replica has committed the point, so a
/// lost spool costs a re-read, never data (ADR 0004 decision 3).
async fn write_spool(
    mut spool: SpoolWriter,
    mut frames: tokio::sync::mpsc::Receiver<EncodedFrame>,
) -> anyhow::Result<()> {
    while let Some(frame) = frames.recv().await {
        spool.append_encoded(&frame).await?;
    }
    spool.finish_unsynced().await?;
    Ok(())
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
    /// The next batch, and its share of the host's streaming budget (none for a cycle
    /// streamed without a spool, which waits for the link instead).
    Frame(EncodedFrame, Option<tokio::sync::OwnedSemaphorePermit>),
}

/// A capture's end of the stream. Frames go to the shipper while it keeps up; from the
/// first one it cannot take, none: the rest stays, in order, in the spool, and the shipper
/// sends it from there once the capture has finished.
pub(crate) struct Tap {
    tx: tokio::sync::mpsc::Sender<StreamItem>,
    open: bool,
    progress: Arc<StreamProgress>,
    /// The host's budget of queued frames (`Shared::stream_budget`).
    budget: Arc<tokio::sync::Semaphore>,
}

/// How much a streamed cycle holds, for the shipper's progress: the read's estimate (the
/// dirty bytes) until the spool is complete, then its exact size.
#[derive(Default)]
pub(crate) struct StreamProgress {
    hint: AtomicU64,
    total: AtomicU64,
}

impl StreamProgress {
    /// The cycle's size as known so far, for `sent` bytes sent.
    pub(super) fn total(&self, sent: u64) -> u64 {
        match self.total.load(Ordering::Relaxed) {
            0 => self.hint.load(Ordering::Relaxed).max(sent),
            n => n,
        }
    }
}

impl Tap {
    /// A tap on the stream `tx`, whose shipper shows its progress against `progress`.
    pub(super) fn new(
        tx: tokio::sync::mpsc::Sender<StreamItem>,
        progress: Arc<StreamProgress>,
        budget: Arc<tokio::sync::Semaphore>,
    ) -> Self {
        Tap {
            tx,
            open: true,
            progress,
            budget,
        }
    }

    /// The point was taken: the shipper may begin the cycle.
    pub(super) async fn begin(
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
    pub(super) fn streaming(&self) -> bool {
        self.open && !self.tx.is_closed()
    }

    /// Hands the shipper a frame that is not spooled, waiting for room in the queue.
    pub(super) async fn send(&mut self, frame: EncodedFrame) -> anyhow::Result<()> {
        if !self.open || self.tx.send(StreamItem::Frame(frame, None)).await.is_err() {
            bail!("the stream to the replica server ended while a cycle too large for the spool's free space was read (a replica older than protocol 3 needs that space: free space in the spool's directory or move data_dir)");
        }
        Ok(())
    }

    /// Hands the shipper a spooled frame if it has room (in its queue and in the host's
    /// budget); from the first it has none, it gets no more (the rest is in the spool).
    pub(super) fn frame(&mut self, frame: EncodedFrame) {
        if !self.open {
            return;
        }
        let sent = match self.budget.clone().try_acquire_owned() {
            Ok(permit) => self
                .tx
                .try_send(StreamItem::Frame(frame, Some(permit)))
                .is_ok(),
            Err(_) => false,
        };
        if !sent {
            self.open = false;
        }
    }
}
