//! The read stage: a capture's frozen view read into frames. Every disk is mapped first,
//! so progress has a total (`map`: its dirty or allocated extents, plus the extra ranges);
//! the spool's bound is checked against its free space (a streamed cycle that may not fit
//! goes to the wire only); then the pieces are read with the NBD requests pipelined
//! (`read_pieces`) or, for a comparison, chunk by chunk against the replica's hashes
//! (`compare`). Each extent goes to the frame stage.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use ferry_nbd::{Extent as NbdExtent, NbdClient, BASE_ALLOCATION, STATE_ZERO};
use ferry_wire::{Extent, SpoolWriter};
use tracing::info;

use super::capture::{Capture, Scope};
use super::compare;
use super::frame::{Emitter, Tap};
use crate::replication::Shared;

/// Bytes read from a disk per NBD request while capturing.
const READ_CHUNK: u64 = 1 << 20;
/// Space left free on the spool's filesystem after a capture.
const SPOOL_RESERVE_BYTES: u64 = 256 << 20;
/// Reads in flight at once while capturing (pipelined NBD requests).
const READ_AHEAD: usize = 8;

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

/// A disk of the frozen view, as an NBD export.
pub(super) struct Source {
    pub(super) disk: usize,
    pub(super) socket: PathBuf,
    pub(super) export: String,
    pub(super) size: u64,
}

/// What a capture's read produced.
pub(super) struct ReadSummary {
    /// Batches (frames) read.
    pub(super) frames: u64,
    /// Data bytes in them (uncompressed).
    pub(super) data_bytes: u64,
    /// Bytes marked dirty (or allocated) when read.
    pub(super) dirty_bytes: u64,
    /// Their size on the wire (and in the spool, when spooled).
    pub(super) bytes: u64,
    /// Whether the spool holds them all.
    pub(super) spooled: bool,
    /// Where the read's time went.
    pub(super) timing: ReadTiming,
}

/// Where a capture's read spent its time (the cycle's profile, logged with "cycle
/// captured"): waiting for NBD reads, encoding frames (checksums, compression), writing
/// the spool, and waiting for the shipper (a cycle streamed without a spool).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ReadTiming {
    pub(super) nbd: Duration,
    pub(super) encode: Duration,
    pub(super) spool: Duration,
    pub(super) wait: Duration,
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

/// One disk as mapped: its connection, the ranges to read (offset, length, zero), and the
/// map they came from.
pub(super) struct Mapped<'a> {
    pub(super) source: &'a Source,
    pub(super) client: NbdClient,
    pub(super) ranges: Vec<(u64, u64, bool)>,
    pub(super) map: Vec<NbdExtent>,
}

/// Every disk as mapped, with the bytes marked dirty (or allocated, or compared) and the
/// most the spool may take.
struct Plan<'a> {
    disks: Vec<Mapped<'a>>,
    dirty_bytes: u64,
    spool_bound: u64,
}

/// A read under way: where its extents go, and what it has done.
pub(super) struct Reading<'a, 't> {
    shared: &'a Shared,
    vm_id: i64,
    pub(super) out: Emitter<'t>,
    /// Time spent waiting for NBD reads.
    pub(super) nbd: Duration,
    /// Bytes read (or compared) so far, of `dirty_bytes`.
    pub(super) done: u64,
    pub(super) data_bytes: u64,
    dirty_bytes: u64,
}

impl Reading<'_, '_> {
    /// Shows the read's progress in `phase`. While a shipper streams this cycle, the
    /// progress shown is its sending; this read's own is shown only when nobody streams it.
    pub(super) fn progress(&self, phase: &str) {
        if !self.out.streaming() {
            self.shared
                .set_progress(self.vm_id, phase, self.done, self.dirty_bytes);
        }
    }
}

/// Reads the extents in the capture's scope of every source into a spool, and to the
/// shipper through `tap` as far as it keeps up. A read larger than the spool's free space
/// streams to the shipper only, at the link's pace, and is not spooled at all.
pub(super) async fn read_to_spool(
    c: &Capture<'_>,
    sources: &[Source],
    context: &str,
    tap: Option<&mut Tap>,
) -> anyhow::Result<ReadSummary> {
    let spool = SpoolWriter::create(&c.spool_path).await?;
    // Map first, so progress has a total.
    let plan = map(sources, c.scope, context, &c.extra).await?;
    let wire_only = wire_only(plan.spool_bound, &c.spool_path, tap.as_deref())?;
    let mut r = Reading {
        shared: c.shared,
        vm_id: c.rel.vm_id,
        out: Emitter::new(spool, tap, c.rel.settings.compression, wire_only),
        nbd: Duration::ZERO,
        done: 0,
        data_bytes: 0,
        dirty_bytes: plan.dirty_bytes,
    };
    r.out.estimate(plan.dirty_bytes);
    r.progress("reading");
    for disk in plan.disks {
        if c.scope == Scope::Compare {
            compare::compare(&mut r, disk, c.theirs.as_ref()).await?;
        } else {
            read_pieces(&mut r, c.scope, disk).await?;
        }
    }
    let (frames, bytes, timing) = r.out.finish().await?;
    Ok(ReadSummary {
        frames,
        data_bytes: r.data_bytes,
        dirty_bytes: r.dirty_bytes,
        bytes,
        spooled: !wire_only,
        timing: ReadTiming {
            nbd: r.nbd,
            ..timing
        },
    })
}

/// Maps every source: the ranges in `scope` (dirty in `context`, or allocated), the bytes
/// they hold, and the most the spool may take for them.
async fn map<'a>(
    sources: &'a [Source],
    scope: Scope,
    context: &str,
    extra: &[(usize, u64, u64)],
) -> anyhow::Result<Plan<'a>> {
    let mut plan = Plan {
        disks: Vec::new(),
        dirty_bytes: 0,
        spool_bound: 0,
    };
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
            with_extra(&ranges, extra, s)
        } else {
            ranges
        };
        plan.dirty_bytes += ranges.iter().filter(|r| !r.2).map(|r| r.1).sum::<u64>();
        if scope == Scope::Compare {
            plan.dirty_bytes += s.size;
            // At most the allocated data can differ as data (the rest as zero extents).
            plan.spool_bound += map
                .iter()
                .filter(|e| e.flags & STATE_ZERO == 0)
                .map(|e| e.length)
                .sum::<u64>();
        } else {
            plan.spool_bound += ranges.iter().filter(|r| !r.2).map(|r| r.1).sum::<u64>();
        }
        plan.disks.push(Mapped {
            source: s,
            client,
            ranges,
            map,
        });
    }
    Ok(plan)
}

/// `ranges` of source `s` with the extra ranges of its disk merged in, in disk order.
fn with_extra(
    ranges: &[(u64, u64, bool)],
    extra: &[(usize, u64, u64)],
    s: &Source,
) -> Vec<(u64, u64, bool)> {
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
}

/// Whether the cycle goes to the wire only, without a spool (`spool_bound`: the most it
/// may spool).
fn wire_only(spool_bound: u64, spool_path: &Path, tap: Option<&Tap>) -> anyhow::Result<bool> {
    // The spool is bounded by the space it may take. A streamed cycle that may not fit goes
    // to the wire only (the read then waits for the link, so the fleecing window does); any
    // other is refused up front (the cycle fails, the bitmap generation is merged back,
    // nothing is lost) rather than fill the data disk.
    let free = free_bytes(spool_path.parent().unwrap_or(spool_path));
    let reserve = SPOOL_RESERVE_BYTES;
    let fits = free >= spool_bound.saturating_add(reserve);
    let wire_only = !fits && tap.is_some_and(Tap::streaming);
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
    Ok(wire_only)
}

/// Reads a disk's ranges, READ_AHEAD pieces at a time with the NBD requests pipelined.
/// Data that reads as zeros goes as a zero extent (an initial copy skips it: the replica
/// starts from zeros). The NBD reads run in their own task, up to READ_WINDOWS windows
/// ahead of this one, which turns what they read into frames: reading and framing (zero
/// checks, checksums, compression, the spool, the shipper) overlap.
async fn read_pieces(
    r: &mut Reading<'_, '_>,
    scope: Scope,
    disk: Mapped<'_>,
) -> anyhow::Result<()> {
    let Mapped {
        source: s,
        client,
        ranges,
        ..
    } = disk;
    let pieces = pieces(s, ranges)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(READ_WINDOWS);
    let reader = tokio::spawn(read_windows(client, pieces, tx));
    // A framing that fails stops the reads too (instead of leaving them to finish a window).
    let _stop_reads = AbortOnDrop(reader.abort_handle());
    loop {
        let t = Instant::now();
        let Some(window) = rx.recv().await else { break };
        r.nbd += t.elapsed();
        for (pos, n, zero, buf) in window {
            let ext = if zero {
                Extent::zeroes(s.disk as u16, pos, n)
            } else if is_zero(&buf) {
                r.done += n;
                if scope == Scope::Allocated {
                    continue;
                }
                Extent::zeroes(s.disk as u16, pos, n)
            } else {
                r.done += n;
                r.data_bytes += n;
                Extent::data(s.disk as u16, pos, Bytes::from(buf))
            };
            r.out.push(ext).await?;
        }
        r.progress("reading");
    }
    // The reads ended: all of them, or at the first error (which is the cause).
    reader
        .await
        .map_err(|e| anyhow::anyhow!("the read of disk {} stopped: {e}", s.disk))?
}

/// Whether `buf` holds only zeros. In 64-byte blocks OR-ed together, which the compiler
/// vectorizes (a byte-by-byte `all` stops early but goes a byte at a time), as every byte
/// read is checked.
pub(super) fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    blocks.all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

/// Aborts a task when dropped (a no-op once it has ended).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Windows of reads the framing may lag behind (each READ_AHEAD pieces of at most
/// READ_CHUNK: 16 MiB of memory in all).
const READ_WINDOWS: usize = 2;

/// A read piece: (offset, length, reported as zeros, data).
type ReadPiece = (u64, u64, bool, Vec<u8>);

/// The NBD half of [`read_pieces`]: reads the pieces READ_AHEAD at a time (pipelined) and
/// hands each window over; stops when the framing stops taking them.
async fn read_windows(
    mut client: NbdClient,
    pieces: Vec<(u64, u64, bool)>,
    tx: tokio::sync::mpsc::Sender<Vec<ReadPiece>>,
) -> anyhow::Result<()> {
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
        client
            .read_many(
                window
                    .iter()
                    .zip(bufs.iter_mut())
                    .filter(|((_, _, zero), _)| !zero)
                    .map(|((pos, _, _), buf)| (*pos, buf.as_mut_slice())),
            )
            .await?;
        let read = window
            .iter()
            .zip(bufs)
            .map(|(&(pos, n, zero), buf)| (pos, n, zero, buf))
            .collect();
        if tx.send(read).await.is_err() {
            break;
        }
    }
    let _ = client.disconnect().await;
    Ok(())
}

/// Pieces in disk order: zero ranges whole, data ranges cut into reads of at most
/// READ_CHUNK.
fn pieces(s: &Source, ranges: Vec<(u64, u64, bool)>) -> anyhow::Result<Vec<(u64, u64, bool)>> {
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
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn is_zero_sees_any_nonzero_byte() {
        for len in [0usize, 1, 63, 64, 65, 4096, 1 << 20] {
            let mut buf = vec![0u8; len];
            assert!(is_zero(&buf), "{len} zeros");
            for at in [0, len / 2, len.saturating_sub(1)] {
                if len == 0 {
                    continue;
                }
                buf[at] = 1;
                assert!(!is_zero(&buf), "a one at {at} of {len}");
                buf[at] = 0;
            }
        }
    }
}
