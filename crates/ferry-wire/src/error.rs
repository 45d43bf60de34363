//! The one error type of the crate.

use crate::frame::FrameKind;

/// Everything that can go wrong reading, writing or decoding Ferry frames.
///
/// Every variant renders as one line that says what was wrong, so it can go
/// straight into a replication-health message. Any of the "bad data" variants
/// means the frame was **not** handed to the caller: nothing from it may be
/// applied.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The first four bytes of a frame were not `FRY1`: the peer or the file
    /// is not speaking this protocol, or the stream is desynchronised.
    #[error("bad frame magic {got:02x?}: not a Ferry replication stream or stream desynchronised")]
    BadMagic { got: [u8; 4] },

    /// The frame declares a protocol version this build does not speak.
    #[error(
        "unsupported wire protocol version {got} (this build speaks version {})",
        crate::frame::WIRE_VERSION
    )]
    UnsupportedVersion { got: u8 },

    /// A declared length is larger than the configured maximum; rejected
    /// before any buffer was allocated for it.
    #[error("frame too large: {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: u64, max: u64 },

    /// The CRC32C of the frame header does not match: the header was corrupted
    /// (or tampered with), so none of its lengths can be trusted.
    #[error("frame header checksum mismatch (expected {expected:#010x}, got {got:#010x}): corrupted header")]
    HeaderChecksum { expected: u32, got: u32 },

    /// The CRC32C of the frame payload does not match: corrupted or tampered
    /// payload.
    #[error("frame payload checksum mismatch (expected {expected:#010x}, got {got:#010x}): corrupted payload")]
    Checksum { expected: u32, got: u32 },

    /// The stream or file ended inside a frame.
    #[error("truncated frame: stream ended in the middle of a frame")]
    Truncated,

    /// The header passed its checksum but its fields are not valid for this
    /// version (unknown kind, unknown flag bits, inconsistent lengths ...).
    #[error("invalid frame header: {0}")]
    BadHeader(String),

    /// The zstd payload did not decompress to exactly the declared length
    /// (includes "decompression bombs" that expand beyond it).
    #[error("frame decompression failed: {0}")]
    Decompress(String),

    /// An extent batch payload is malformed or violates its invariants.
    #[error("invalid extent batch: {0}")]
    BadBatch(String),

    /// A control payload is not valid JSON for the expected message type.
    #[error("invalid control message: {0}")]
    BadControl(#[source] serde_json::Error),

    /// A typed decoder was handed a frame of another kind.
    #[error("unexpected frame kind: expected {expected:?}, got {got:?}")]
    UnexpectedKind { expected: FrameKind, got: FrameKind },

    /// A keepalive payload is not the expected 8 bytes.
    #[error("invalid keepalive payload: {len} bytes, expected 8")]
    BadKeepalive { len: usize },

    /// No frame arrived within the idle timeout (see
    /// [`crate::FrameReader::read_frame_timeout`]).
    #[error("no frame received for {secs:.1} s: peer is gone or stalled")]
    IdleTimeout { secs: f64 },

    /// A spool was asked to resume at a frame index past its end.
    #[error("spool has only {available} frames, cannot resume at frame {requested}")]
    SpoolIndex { requested: u64, available: u64 },

    /// A reader already returned an error; the stream position is unknown.
    #[error("frame stream already failed earlier; reconnect or reopen")]
    Poisoned,

    /// Underlying I/O error.
    #[error("connection error: {0}")]
    // Not `#[from]`: that would make the I/O error the source too, and `{:#}` would print
    // it twice.
    Io(std::io::Error),
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Result alias for this crate.
pub type Result<T, E = WireError> = std::result::Result<T, E>;
