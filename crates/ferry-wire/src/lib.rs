//! Ferry's host-to-host replication protocol: framing and messages.
//!
//! This crate is transport-agnostic: it works over any
//! `AsyncRead`/`AsyncWrite + Unpin` (in ferryd, a tokio-rustls mutual-TLS
//! stream between the primary and the replica, usually split into a read
//! half and a write half).
//!
//! # Frame format (version 1)
//!
//! ```text
//! offset size field
//!  0     4    magic        b"FRY1"
//!  4     1    version      1
//!  5     1    kind         1 = Control, 2 = ExtentBatch, 3 = Keepalive
//!  6     1    flags        bit 0 = payload is zstd-compressed; others must be 0
//!  7     1    reserved     must be 0
//!  8     4    payload_len  u32 LE, bytes of payload on the wire
//! 12     4    raw_len      u32 LE, uncompressed payload length
//! 16     4    payload_crc  u32 LE, CRC32C of the on-wire payload
//! 20     4    header_crc   u32 LE, CRC32C of bytes 0..20
//! 24     payload_len bytes of payload
//! ```
//!
//! Why a separate header CRC rather than one CRC over header + payload (the
//! first design): with a single trailing-checked CRC, a flipped bit in
//! `payload_len` is only detectable *after* reading `payload_len` bytes. On a
//! live connection that means waiting for bytes that never come (a hang until
//! the idle timeout) or swallowing part of the next frame; in a spool file it
//! surfaces as a misleading "truncated". Checking the header CRC first means
//! no length is trusted, and nothing is allocated, until the header is proven
//! intact. Since the header CRC also covers `payload_crc`, the pair covers
//! every byte of the frame.
//!
//! Checks, in order, all before allocating: magic ([`WireError::BadMagic`]),
//! version ([`WireError::UnsupportedVersion`]; checked before the header CRC
//! because a future version may lay out the header differently), header CRC
//! ([`WireError::HeaderChecksum`]), field validity ([`WireError::BadHeader`]),
//! both lengths against the reader's maximum ([`WireError::TooLarge`],
//! default [`MAX_FRAME`] = 8 MiB). Then the payload is read and its CRC
//! checked ([`WireError::Checksum`]), and a compressed payload is
//! decompressed into a buffer of exactly `raw_len` bytes which zstd may not
//! grow: output larger or smaller than declared (a "zip bomb" included) is
//! [`WireError::Decompress`]. An end of stream inside a frame is
//! [`WireError::Truncated`]; at a frame boundary it is a clean `Ok(None)`.
//!
//! CRC32C protects against corruption (disks, buggy middleboxes, bugs), not
//! against an attacker: authenticity and integrity against tampering on the
//! network come from the mutual-TLS layer. Spool files are local.
//!
//! # Messages
//!
//! * [`FrameKind::Control`]: application-defined JSON messages (hello, cycle
//!   start/end, acks, "resume from batch N", errors) via [`encode_control`] /
//!   [`decode_control`]. This crate doesn't define them, so the daemon can
//!   evolve them with serde defaults without touching the framing.
//! * [`FrameKind::ExtentBatch`]: binary [`ExtentBatch`] (see [`batch`] for
//!   the layout and the invariants checked on decode), with a sequence number
//!   for ordering and resume. [`BatchBuilder`] packs extents into batches
//!   that fit a frame.
//! * [`FrameKind::Keepalive`]: an 8-byte value; send one every
//!   [`KEEPALIVE_INTERVAL`] on an idle connection and give up after
//!   [`IDLE_TIMEOUT`] without any frame ([`FrameReader::read_frame_timeout`]).
//!
//! Compression is per frame and optional (per relationship, the caller
//! decides): zstd level [`DEFAULT_ZSTD_LEVEL`], and the compressed form is
//! only kept when it is strictly smaller, so incompressible data costs one
//! failed compression attempt but never more wire bytes.
//!
//! # Other pieces
//!
//! * [`SpoolWriter`] / [`SpoolReader`]: a cycle spooled to local disk as the
//!   same frame encoding, with fsync and resume from a frame index.
//! * [`RateLimiter`]: shareable token bucket for bandwidth limits, applied to
//!   a [`FrameWriter`] with [`FrameWriter::add_limiter`].

//! # Example
//!
//! ```
//! use ferry_wire::{Extent, ExtentBatch, FrameKind, FrameReader, FrameWriter};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Hello { vm: String }
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let (a, b) = tokio::io::duplex(1 << 20); // in ferryd: a TLS stream
//! let mut tx = FrameWriter::new(a);
//! let mut rx = FrameReader::new(b);
//!
//! tx.write_control(&Hello { vm: "vm-1".into() }).await?;
//! let batch = ExtentBatch { seq: 0, extents: vec![
//!     Extent::data(0, 0, vec![1u8; 4096]),
//!     Extent::zeroes(0, 4096, 1 << 20),
//! ]};
//! tx.write_batch(&batch, true).await?; // zstd on for this relationship
//! tx.write_keepalive(1).await?;
//! drop(tx);
//!
//! let hello: Hello = rx.read_frame().await?.unwrap().control()?;
//! assert_eq!(hello.vm, "vm-1");
//! let got = rx.read_frame().await?.unwrap().batch()?;
//! got.expect_seq(0)?;
//! assert_eq!(got, batch);
//! assert_eq!(rx.read_frame().await?.unwrap().kind, FrameKind::Keepalive);
//! assert!(rx.read_frame().await?.is_none()); // clean EOF at a frame boundary
//! # Ok::<(), ferry_wire::WireError>(())
//! # }).unwrap();
//! ```

pub mod batch;
mod error;
mod frame;
mod rate;
mod spool;

pub use batch::{
    BatchBuilder, Extent, ExtentBatch, ExtentKind, BATCH_HEADER_LEN, EXTENT_HEADER_LEN,
};
pub use error::{Result, WireError};
pub use frame::{
    decode_control, decode_keepalive, encode_control, encode_frame, encode_keepalive, EncodedFrame,
    Frame, FrameEncoder, FrameKind, FrameReader, FrameStats, FrameWriter, DEFAULT_ZSTD_LEVEL,
    FLAG_ZSTD, HEADER_LEN, IDLE_TIMEOUT, KEEPALIVE_INTERVAL, MAGIC, MAX_FRAME, WIRE_VERSION,
};
pub use rate::RateLimiter;
pub use spool::{SpoolReader, SpoolSummary, SpoolWriter};

#[cfg(test)]
mod tests;
