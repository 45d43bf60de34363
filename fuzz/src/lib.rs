//! Helpers shared by Ferry's fuzz targets (see docs/FUZZING.md).
//!
//! The replication control messages live in the `ferryd` binary crate, which has no
//! library to link against. Rather than moving code other engineers are changing, the
//! fuzzers compile the very same source files into this crate (`replication`), so what is
//! fuzzed is exactly what the replica runs.

pub mod replication;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

thread_local! {
    /// One single-threaded runtime per fuzzing thread, reused across inputs (building
    /// one per input cost most of the time of the stream targets).
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
}

/// Drives an async decoder on one input to completion.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(f))
}

/// A byte source that hands out its bytes at most `chunk` at a time, so a reader sees a
/// frame arrive in pieces as it would from a socket (exercising its partial-buffer
/// logic); writes are accepted and dropped (a peer that never listens).
pub struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl<'a> Trickle<'a> {
    pub fn new(data: &'a [u8], chunk: usize) -> Self {
        Trickle {
            data,
            chunk: chunk.max(1),
        }
    }
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.data.len().min(self.chunk).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Trickle<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// An owned [`Trickle`] for APIs that need `'static` streams (the NBD client).
pub struct OwnedTrickle {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
}

impl OwnedTrickle {
    pub fn new(data: Vec<u8>, chunk: usize) -> Self {
        OwnedTrickle {
            data,
            pos: 0,
            chunk: chunk.max(1),
        }
    }
}

impl AsyncRead for OwnedTrickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let left = self.data.len() - self.pos;
        let n = left.min(self.chunk).min(buf.remaining());
        let pos = self.pos;
        buf.put_slice(&self.data[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for OwnedTrickle {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A per-process scratch file on tmpfs for targets whose code under test opens a path
/// (the spool reader, the qcow2 reader): rewritten for every input.
pub fn scratch_file(name: &str) -> std::path::PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("ferry-fuzz-{name}-{}", std::process::id()))
}

/// Every frame of a stream, decoded as the replica decodes it: batches as extent batches
/// (whose encoding must round-trip exactly), keepalives as keepalives, control frames as
/// replication messages. Returns how many frames were read before the end or an error.
pub async fn drain_frames<R: AsyncRead + Unpin>(mut reader: ferry_wire::FrameReader<R>) -> usize {
    use ferry_wire::FrameKind;
    let mut n = 0;
    while let Ok(Some(frame)) = reader.read_frame().await {
        n += 1;
        match frame.kind {
            FrameKind::ExtentBatch => {
                if let Ok(batch) = frame.batch() {
                    check_batch_roundtrip(&frame.payload, &batch);
                }
            }
            FrameKind::Keepalive => {
                let _ = frame.keepalive();
            }
            FrameKind::Control => {
                if let Ok(msg) = frame.control::<replication::proto::Msg>() {
                    replication::check_msg(&msg);
                }
            }
        }
    }
    n
}

/// A batch that decoded must encode back to exactly the bytes it came from (the encoding
/// is canonical), and decode again to the same batch.
pub fn check_batch_roundtrip(payload: &[u8], batch: &ferry_wire::ExtentBatch) {
    let again = batch.encode().expect("a decoded batch re-encodes");
    assert_eq!(&again[..], payload, "batch encoding is not canonical");
    let back = ferry_wire::ExtentBatch::decode(again).expect("re-encoded batch decodes");
    assert_eq!(&back, batch);
}
