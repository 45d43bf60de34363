//! The binary extent-batch codec.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! batch   := seq:u64 count:u32 extent{count}
//! extent  := disk:u16 tag:u8 offset:u64 len:u64 [data: len bytes if tag == 0]
//! tag     := 0 (data) | 1 (zeroes)
//! ```
//!
//! Binary rather than JSON because batches are the bulk of the traffic: the
//! codec is a memcpy plus 19 bytes per extent, and decoding is zero-copy
//! (data extents are slices of the frame payload).
//!
//! Invariants, enforced on both encode and decode so a peer can never make
//! the receiver apply something ambiguous: every extent is non-empty,
//! `offset + len` does not overflow `u64`, extents of the same disk in one
//! batch do not overlap (so apply order inside a batch cannot matter), the
//! declared count matches exactly and no bytes trail the last extent.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Result, WireError};
use crate::frame::MAX_FRAME;

/// Bytes of the batch header (`seq`, `count`).
pub const BATCH_HEADER_LEN: usize = 12;
/// Bytes of each extent header (`disk`, `tag`, `offset`, `len`).
pub const EXTENT_HEADER_LEN: usize = 19;

const TAG_DATA: u8 = 0;
const TAG_ZEROES: u8 = 1;

/// What an extent carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentKind {
    /// These bytes, to be written at the offset.
    Data(Bytes),
    /// This many zero bytes (or a discard/unmap) at the offset.
    Zeroes(u64),
}

/// One changed range of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Index of the disk within the VM's replicated disk set.
    pub disk: u16,
    /// Byte offset within the disk.
    pub offset: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn data(disk: u16, offset: u64, data: impl Into<Bytes>) -> Self {
        Extent {
            disk,
            offset,
            kind: ExtentKind::Data(data.into()),
        }
    }

    pub fn zeroes(disk: u16, offset: u64, len: u64) -> Self {
        Extent {
            disk,
            offset,
            kind: ExtentKind::Zeroes(len),
        }
    }

    /// Length in bytes of the disk range covered.
    pub fn len(&self) -> u64 {
        match &self.kind {
            ExtentKind::Data(b) => b.len() as u64,
            ExtentKind::Zeroes(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Exclusive end offset, or `None` if it overflows `u64`.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len())
    }

    fn encoded_len(&self) -> usize {
        EXTENT_HEADER_LEN
            + match &self.kind {
                ExtentKind::Data(b) => b.len(),
                ExtentKind::Zeroes(_) => 0,
            }
    }
}

/// A numbered set of extents; one frame of kind
/// [`FrameKind::ExtentBatch`](crate::FrameKind::ExtentBatch).
///
/// `seq` numbers batches within a replication cycle so the receiver can
/// check order ([`expect_seq`](Self::expect_seq)) and the sender can resume
/// after a reconnect from the first batch the receiver has not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExtentBatch {
    pub seq: u64,
    pub extents: Vec<Extent>,
}

impl ExtentBatch {
    pub fn new(seq: u64) -> Self {
        ExtentBatch {
            seq,
            extents: Vec::new(),
        }
    }

    /// Encoded payload size in bytes.
    pub fn encoded_len(&self) -> usize {
        BATCH_HEADER_LEN + self.extents.iter().map(Extent::encoded_len).sum::<usize>()
    }

    /// Total bytes of `Data` extents.
    pub fn data_bytes(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| match &e.kind {
                ExtentKind::Data(b) => b.len() as u64,
                ExtentKind::Zeroes(_) => 0,
            })
            .sum()
    }

    /// Fail with [`WireError::BadBatch`] unless this is batch `expected`.
    pub fn expect_seq(&self, expected: u64) -> Result<()> {
        if self.seq == expected {
            Ok(())
        } else {
            Err(WireError::BadBatch(format!(
                "out of order: expected batch {expected}, got batch {}",
                self.seq
            )))
        }
    }

    /// Check the invariants listed in the module docs.
    pub fn validate(&self) -> Result<()> {
        if self.extents.len() > u32::MAX as usize {
            return Err(WireError::BadBatch(format!(
                "{} extents do not fit a u32 count",
                self.extents.len()
            )));
        }
        let mut ranges = Vec::with_capacity(self.extents.len());
        for (i, e) in self.extents.iter().enumerate() {
            if e.is_empty() {
                return Err(WireError::BadBatch(format!(
                    "extent {i} (disk {}, offset {}) is empty",
                    e.disk, e.offset
                )));
            }
            let end = e.end().ok_or_else(|| {
                WireError::BadBatch(format!(
                    "extent {i} (disk {}): offset {} + length {} overflows u64",
                    e.disk,
                    e.offset,
                    e.len()
                ))
            })?;
            ranges.push((e.disk, e.offset, end));
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            let ((d0, o0, e0), (d1, o1, e1)) = (w[0], w[1]);
            if d0 == d1 && o1 < e0 {
                return Err(WireError::BadBatch(format!(
                    "overlapping extents on disk {d0}: [{o0}, {e0}) and [{o1}, {e1})"
                )));
            }
        }
        Ok(())
    }

    /// Encode to a frame payload.
    pub fn encode(&self) -> Result<Bytes> {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf)?;
        Ok(buf.freeze())
    }

    /// Encode to a frame payload appended to `buf` (which may already hold a frame
    /// header: see `FrameEncoder::encode_batch`).
    pub fn encode_into(&self, buf: &mut impl BufMut) -> Result<()> {
        self.validate()?;
        buf.put_u64_le(self.seq);
        buf.put_u32_le(self.extents.len() as u32);
        for e in &self.extents {
            buf.put_u16_le(e.disk);
            match &e.kind {
                ExtentKind::Data(b) => {
                    buf.put_u8(TAG_DATA);
                    buf.put_u64_le(e.offset);
                    buf.put_u64_le(b.len() as u64);
                    buf.put_slice(b);
                }
                ExtentKind::Zeroes(n) => {
                    buf.put_u8(TAG_ZEROES);
                    buf.put_u64_le(e.offset);
                    buf.put_u64_le(*n);
                }
            }
        }
        Ok(())
    }

    /// Decode and validate a frame payload. Data extents share `payload`'s
    /// allocation. Never allocates more than proportional to `payload.len()`.
    pub fn decode(payload: Bytes) -> Result<Self> {
        let bad = |m: String| Err(WireError::BadBatch(m));
        if payload.len() < BATCH_HEADER_LEN {
            return bad(format!(
                "{} bytes is shorter than the {BATCH_HEADER_LEN}-byte batch header",
                payload.len()
            ));
        }
        let seq = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes")) as usize;
        let mut pos = BATCH_HEADER_LEN;
        if count > (payload.len() - pos) / EXTENT_HEADER_LEN {
            return bad(format!(
                "declares {count} extents but has only {} bytes left",
                payload.len() - pos
            ));
        }
        let mut extents = Vec::with_capacity(count);
        for i in 0..count {
            if payload.len() - pos < EXTENT_HEADER_LEN {
                return bad(format!("extent {i}: header truncated"));
            }
            let h = &payload[pos..pos + EXTENT_HEADER_LEN];
            let disk = u16::from_le_bytes([h[0], h[1]]);
            let tag = h[2];
            let offset = u64::from_le_bytes(h[3..11].try_into().expect("8 bytes"));
            let len = u64::from_le_bytes(h[11..19].try_into().expect("8 bytes"));
            pos += EXTENT_HEADER_LEN;
            let kind = match tag {
                TAG_DATA => {
                    let left = (payload.len() - pos) as u64;
                    if len > left {
                        return bad(format!(
                            "extent {i}: data length {len} exceeds the {left} bytes left"
                        ));
                    }
                    let data = payload.slice(pos..pos + len as usize);
                    pos += len as usize;
                    ExtentKind::Data(data)
                }
                TAG_ZEROES => ExtentKind::Zeroes(len),
                t => return bad(format!("extent {i}: unknown extent tag {t}")),
            };
            extents.push(Extent { disk, offset, kind });
        }
        if pos != payload.len() {
            return bad(format!(
                "{} trailing bytes after the last extent",
                payload.len() - pos
            ));
        }
        let batch = ExtentBatch { seq, extents };
        batch.validate()?;
        Ok(batch)
    }
}

/// Packs extents into batches whose encoded payload stays within a byte
/// budget, splitting large data extents, and numbers them consecutively.
///
/// ```
/// # use ferry_wire::{BatchBuilder, Extent};
/// let mut b = BatchBuilder::new(0, 1024 * 1024);
/// let mut out = b.push(Extent::data(0, 0, vec![7u8; 3 * 1024 * 1024]));
/// out.extend(b.finish());
/// assert_eq!(out.len(), 4);
/// assert!(out.iter().all(|b| b.encoded_len() <= 1024 * 1024));
/// ```
#[derive(Debug)]
pub struct BatchBuilder {
    max_payload: usize,
    current: ExtentBatch,
    current_len: usize,
}

impl BatchBuilder {
    /// `first_seq` is the sequence number of the first batch produced
    /// (non-zero when resuming). `max_payload` is clamped to
    /// `[BATCH_HEADER_LEN + EXTENT_HEADER_LEN + 4096, MAX_FRAME]`.
    pub fn new(first_seq: u64, max_payload: usize) -> Self {
        let max_payload = max_payload.clamp(BATCH_HEADER_LEN + EXTENT_HEADER_LEN + 4096, MAX_FRAME);
        BatchBuilder {
            max_payload,
            current: ExtentBatch::new(first_seq),
            current_len: BATCH_HEADER_LEN,
        }
    }

    /// Sequence number the next completed batch will carry.
    pub fn next_seq(&self) -> u64 {
        self.current.seq
    }

    /// Add an extent; returns the batches that became full. Empty extents
    /// are ignored. Overlap checking is left to [`ExtentBatch::encode`].
    pub fn push(&mut self, extent: Extent) -> Vec<ExtentBatch> {
        let mut done = Vec::new();
        match extent.kind {
            ExtentKind::Zeroes(0) => {}
            ExtentKind::Zeroes(_) => {
                if self.room() < EXTENT_HEADER_LEN {
                    done.extend(self.cut());
                }
                self.current_len += EXTENT_HEADER_LEN;
                self.current.extents.push(extent);
            }
            ExtentKind::Data(mut data) => {
                let mut offset = extent.offset;
                while !data.is_empty() {
                    // Don't start a data extent with a tiny tail of room.
                    if self.room() < EXTENT_HEADER_LEN + 4096.min(data.len()) {
                        done.extend(self.cut());
                    }
                    let take = data.len().min(self.room() - EXTENT_HEADER_LEN);
                    let chunk = data.split_to(take);
                    self.current_len += EXTENT_HEADER_LEN + take;
                    self.current.extents.push(Extent {
                        disk: extent.disk,
                        offset,
                        kind: ExtentKind::Data(chunk),
                    });
                    offset = offset.wrapping_add(take as u64);
                }
            }
        }
        done
    }

    /// Return the last, partially filled batch, if it has any extent.
    pub fn finish(&mut self) -> Option<ExtentBatch> {
        self.cut()
    }

    fn room(&self) -> usize {
        self.max_payload - self.current_len
    }

    fn cut(&mut self) -> Option<ExtentBatch> {
        if self.current.extents.is_empty() {
            return None;
        }
        self.current_len = BATCH_HEADER_LEN;
        let next = ExtentBatch::new(self.current.seq + 1);
        Some(std::mem::replace(&mut self.current, next))
    }
}
