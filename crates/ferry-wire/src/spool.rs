//! On-disk spool of frames.
//!
//! The primary writes a cycle's frames to a local spool file first so the
//! QEMU snapshot / dirty-bitmap export can be released as soon as the data
//! is copied out, independent of how slow the link to the replica is. The
//! spool is nothing but a concatenation of frames in the wire encoding, so:
//! - reading it back through a [`FrameReader`] verifies every checksum, and
//!   a torn last frame after a crash is reported as [`WireError::Truncated`];
//! - frames can be forwarded verbatim ([`SpoolReader::next_encoded`] +
//!   [`FrameWriter::write_encoded`](crate::FrameWriter::write_encoded))
//!   without decompressing and recompressing;
//! - resuming at frame `N` after a reconnect skips the first `N` frames by
//!   reading only their headers (header CRC verified) and seeking past their
//!   payloads: those payloads were already verified when first shipped.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};

use crate::batch::ExtentBatch;
use crate::error::{Result, WireError};
use crate::frame::{
    encode_control, EncodedFrame, Frame, FrameEncoder, FrameKind, FrameReader, Header, HEADER_LEN,
    MAX_FRAME,
};

/// What [`SpoolWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolSummary {
    pub path: PathBuf,
    pub frames: u64,
    /// File size in bytes.
    pub bytes: u64,
}

/// Appends frames to a spool file.
#[derive(Debug)]
pub struct SpoolWriter {
    file: BufWriter<File>,
    path: PathBuf,
    encoder: FrameEncoder,
    frames: u64,
    bytes: u64,
}

impl SpoolWriter {
    /// Create (or truncate) the spool file at `path`.
    pub async fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).await?;
        Ok(SpoolWriter {
            file: BufWriter::with_capacity(1024 * 1024, file),
            path,
            encoder: FrameEncoder::new(),
            frames: 0,
            bytes: 0,
        })
    }

    /// Use this zstd level for compressed frames.
    pub fn with_level(mut self, level: i32) -> Self {
        self.encoder = FrameEncoder::new().with_level(level);
        self
    }

    /// Encode and append a frame; returns its index in the spool.
    pub async fn append(&mut self, kind: FrameKind, payload: &[u8], compress: bool) -> Result<u64> {
        let frame = self.encoder.encode(kind, payload, compress)?;
        self.append_encoded(&frame).await
    }

    /// Append an extent batch; returns its frame index.
    pub async fn append_batch(&mut self, batch: &ExtentBatch, compress: bool) -> Result<u64> {
        let payload = batch.encode()?;
        self.append(FrameKind::ExtentBatch, &payload, compress)
            .await
    }

    /// Append an extent batch and return its encoded frame too, for a caller that also
    /// streams it (the frame as written, checksummed and maybe compressed once).
    pub async fn append_batch_frame(
        &mut self,
        batch: &ExtentBatch,
        compress: bool,
    ) -> Result<EncodedFrame> {
        let payload = batch.encode()?;
        let frame = self
            .encoder
            .encode(FrameKind::ExtentBatch, &payload, compress)?;
        self.append_encoded(&frame).await?;
        Ok(frame)
    }

    /// Encode an extent batch as [`SpoolWriter::append_batch_frame`] would, without writing
    /// it: for a frame that goes only to the wire.
    pub fn encode_batch_frame(
        &mut self,
        batch: &ExtentBatch,
        compress: bool,
    ) -> Result<EncodedFrame> {
        let payload = batch.encode()?;
        self.encoder
            .encode(FrameKind::ExtentBatch, &payload, compress)
    }

    /// Append a JSON control message; returns its frame index.
    pub async fn append_control<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<u64> {
        let payload = encode_control(msg)?;
        self.append(FrameKind::Control, &payload, false).await
    }

    /// Append an already encoded frame; returns its frame index.
    pub async fn append_encoded(&mut self, frame: &EncodedFrame) -> Result<u64> {
        self.file.write_all(frame.as_bytes()).await?;
        let index = self.frames;
        self.frames += 1;
        self.bytes += frame.wire_len() as u64;
        Ok(index)
    }

    /// Flush buffered frames and fsync the file data.
    pub async fn sync(&mut self) -> Result<()> {
        self.file.flush().await?;
        self.file.get_ref().sync_data().await?;
        Ok(())
    }

    /// Frames appended so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flush and close without forcing the data to disk. For a spool whose loss costs only
    /// a re-read (the primary keeps the change tracking that produced it until the replica
    /// has committed it), so a cycle does not pay a durable write it does not need; a spool
    /// torn by a power loss fails its frame checksums when read back.
    pub async fn finish_unsynced(mut self) -> Result<SpoolSummary> {
        self.file.flush().await?;
        Ok(SpoolSummary {
            path: self.path,
            frames: self.frames,
            bytes: self.bytes,
        })
    }

    /// Flush, fsync the file and its directory entry, and close.
    pub async fn finish(mut self) -> Result<SpoolSummary> {
        self.file.flush().await?;
        self.file.get_ref().sync_all().await?;
        if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir).await?.sync_all().await?;
        }
        Ok(SpoolSummary {
            path: self.path,
            frames: self.frames,
            bytes: self.bytes,
        })
    }
}

/// Reads frames back from a spool file, verifying every checksum.
#[derive(Debug)]
pub struct SpoolReader {
    reader: FrameReader<File>,
    index: u64,
}

impl SpoolReader {
    /// Open a spool at its first frame.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_at(path, 0).await
    }

    /// Open a spool positioned at frame index `start` (for resume). `start`
    /// equal to the number of frames is allowed (nothing left to send);
    /// beyond that is [`WireError::SpoolIndex`].
    pub async fn open_at(path: impl AsRef<Path>, start: u64) -> Result<Self> {
        let mut file = File::open(path.as_ref()).await?;
        let len = file.metadata().await?.len();
        let mut pos = 0u64;
        for i in 0..start {
            if pos == len {
                return Err(WireError::SpoolIndex {
                    requested: start,
                    available: i,
                });
            }
            if len - pos < HEADER_LEN as u64 {
                return Err(WireError::Truncated);
            }
            let mut h = [0u8; HEADER_LEN];
            file.read_exact(&mut h).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
                _ => e.into(),
            })?;
            let header = Header::parse(&h, MAX_FRAME)?;
            let next = pos + HEADER_LEN as u64 + header.payload_len as u64;
            if next > len {
                return Err(WireError::Truncated);
            }
            file.seek(SeekFrom::Start(next)).await?;
            pos = next;
        }
        Ok(SpoolReader {
            reader: FrameReader::new(file),
            index: start,
        })
    }

    /// Index of the frame the next call will return.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Next frame, verified and decompressed; `None` at the end of the spool.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>> {
        let f = self.reader.read_frame().await?;
        self.index += f.is_some() as u64;
        Ok(f)
    }

    /// Next frame in its verified on-wire form, for verbatim forwarding.
    pub async fn next_encoded(&mut self) -> Result<Option<EncodedFrame>> {
        let f = self.reader.read_encoded().await?;
        self.index += f.is_some() as u64;
        Ok(f)
    }
}
