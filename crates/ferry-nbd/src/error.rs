//! Error types.
//!
//! Three kinds of failure are kept apart because callers react differently:
//! the server refused something it is allowed to refuse ([`NbdError::OptionRefused`],
//! [`NbdError::Server`]) — the connection is still usable after a command error;
//! the server broke the protocol ([`NbdError::Protocol`]) — the connection is
//! dropped because the byte stream can no longer be trusted; or the caller
//! asked for something the export cannot do ([`NbdError::Unsupported`],
//! [`NbdError::InvalidRequest`]) — nothing was sent.

use std::fmt;

/// Error values of the transmission phase (`NBD_E*` in the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// `NBD_EPERM` (1), operation not permitted.
    Eperm,
    /// `NBD_EIO` (5), input/output error.
    Eio,
    /// `NBD_ENOMEM` (12), cannot allocate memory.
    Enomem,
    /// `NBD_EINVAL` (22), invalid argument.
    Einval,
    /// `NBD_ENOSPC` (28), no space left on device.
    Enospc,
    /// `NBD_EOVERFLOW` (75), value too large.
    Eoverflow,
    /// `NBD_ENOTSUP` (95), operation not supported.
    Enotsup,
    /// `NBD_ESHUTDOWN` (108), server is shutting down.
    Eshutdown,
    /// A value the spec does not define (to be treated like `EINVAL`).
    Other(u32),
}

impl Errno {
    /// Maps a wire error value.
    pub fn from_wire(value: u32) -> Self {
        match value {
            1 => Self::Eperm,
            5 => Self::Eio,
            12 => Self::Enomem,
            22 => Self::Einval,
            28 => Self::Enospc,
            75 => Self::Eoverflow,
            95 => Self::Enotsup,
            108 => Self::Eshutdown,
            other => Self::Other(other),
        }
    }

    /// The spec's name without the `NBD_` prefix, e.g. `"EIO"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Eperm => "EPERM",
            Self::Eio => "EIO",
            Self::Enomem => "ENOMEM",
            Self::Einval => "EINVAL",
            Self::Enospc => "ENOSPC",
            Self::Eoverflow => "EOVERFLOW",
            Self::Enotsup => "ENOTSUP",
            Self::Eshutdown => "ESHUTDOWN",
            Self::Other(_) => "E?",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(value) => write!(f, "unknown error {value}"),
            known => f.write_str(known.name()),
        }
    }
}

/// A failed option during the handshake (`NBD_REP_ERR_*` reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionError(pub u32);

impl OptionError {
    /// The spec's name of the reply type, e.g. `"NBD_REP_ERR_UNKNOWN"`.
    pub fn name(self) -> &'static str {
        match self.0 & !crate::proto::NBD_REP_FLAG_ERROR {
            1 => "NBD_REP_ERR_UNSUP",
            2 => "NBD_REP_ERR_POLICY",
            3 => "NBD_REP_ERR_INVALID",
            4 => "NBD_REP_ERR_PLATFORM",
            5 => "NBD_REP_ERR_TLS_REQD",
            6 => "NBD_REP_ERR_UNKNOWN",
            7 => "NBD_REP_ERR_SHUTDOWN",
            8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
            9 => "NBD_REP_ERR_TOO_BIG",
            10 => "NBD_REP_ERR_EXT_HEADER_REQD",
            _ => "NBD_REP_ERR_?",
        }
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#x})", self.name(), self.0)
    }
}

/// Ways a server can violate the protocol. Any of these ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic {got:#x} where {expected} was expected")]
    BadMagic { expected: &'static str, got: u64 },
    #[error("server uses oldstyle negotiation, which is not supported")]
    Oldstyle,
    #[error("server does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("option reply for option {got} while waiting for option {expected}")]
    OptionMismatch { expected: u32, got: u32 },
    #[error("option reply type {reply_type:#x} with length {length} is malformed")]
    BadOptionReply { reply_type: u32, length: u32 },
    #[error("unexpected option reply type {0:#x}")]
    UnexpectedOptionReply(u32),
    #[error("server finished NBD_OPT_GO without NBD_INFO_EXPORT")]
    MissingExportInfo,
    #[error("invalid block size constraints: min {minimum}, preferred {preferred}, max {maximum}")]
    BadBlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    #[error("transmission flags {0:#x} lack NBD_FLAG_HAS_FLAGS")]
    BadTransmissionFlags(u16),
    #[error("reply cookie {0:#x} matches no request in flight")]
    UnexpectedCookie(u64),
    #[error("reply chunk type {chunk_type} with length {length} is malformed or too large")]
    BadChunkLength { chunk_type: u16, length: u32 },
    #[error("reply chunk type {0} is not valid for this command")]
    UnexpectedChunkType(u16),
    #[error("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")]
    NoneWithoutDone,
    #[error("successful block status sent as a simple reply")]
    SimpleReplyForBlockStatus,
    #[error("simple reply after structured chunks of the same request")]
    SimpleAfterStructured,
    #[error("read chunk [{offset}, +{length}) lies outside the request or overlaps another")]
    ReadChunkOutOfBounds { offset: u64, length: u64 },
    #[error("read reply covered {covered} of {requested} bytes without an error")]
    IncompleteRead { covered: u64, requested: u64 },
    #[error("error chunk carries error value 0")]
    ZeroErrorValue,
    #[error("error offset {0} lies outside the request")]
    ErrorOffsetOutOfBounds(u64),
    #[error("block status chunk for unknown metadata context id {0}")]
    UnknownContextId(u32),
    #[error("two block status chunks for metadata context id {0} in one reply")]
    DuplicateContextId(u32),
    #[error("block status reply lacks a chunk for metadata context id {0}")]
    MissingContextChunk(u32),
    #[error("block status descriptor of length 0")]
    ZeroLengthExtent,
    #[error("block status descriptors continue past the requested length")]
    ExtentBeyondRequest,
    #[error("string from server is not valid UTF-8")]
    BadString,
}

/// Everything that can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The transport failed (including the server closing the connection).
    #[error("NBD connection I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The server violated the protocol; the connection is no longer usable.
    #[error("NBD protocol violation by server: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server refused an option during the handshake.
    #[error("NBD server refused {option}: {reply}{}", fmt_message(.message))]
    OptionRefused {
        option: &'static str,
        reply: OptionError,
        message: String,
    },
    /// A requested metadata context was not selected by the server
    /// (e.g. the dirty bitmap is not exported).
    #[error("NBD server does not offer metadata context {0:?}")]
    ContextNotAvailable(String),
    /// The server failed a command; the connection stays usable.
    #[error("NBD server error {errno} on {command}{}{}", fmt_offset(.offset), fmt_message(.message))]
    Server {
        command: &'static str,
        errno: Errno,
        /// Offset reported with `NBD_REPLY_TYPE_ERROR_OFFSET`, if any.
        offset: Option<u64>,
        message: String,
    },
    /// The export does not advertise the feature (nothing was sent).
    #[error("NBD export does not support {0}")]
    Unsupported(&'static str),
    /// The caller's request is out of range or misaligned (nothing was sent).
    #[error("invalid NBD request: {0}")]
    InvalidRequest(String),
    /// An earlier error or a cancelled call left the connection out of sync.
    #[error("NBD connection is unusable after an earlier error or cancelled call")]
    ConnectionBroken,
}

impl NbdError {
    /// True when the connection can no longer be used after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Io(_) | Self::Protocol(_) | Self::ConnectionBroken
        )
    }
}

fn fmt_message(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn fmt_offset(offset: &Option<u64>) -> String {
    offset
        .map(|o| format!(" at offset {o}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_error_names_errno_and_message() {
        let e = NbdError::Server {
            command: "NBD_CMD_READ",
            errno: Errno::from_wire(5),
            offset: Some(4096),
            message: "disk on fire".into(),
        };
        assert_eq!(
            e.to_string(),
            "NBD server error EIO on NBD_CMD_READ at offset 4096: disk on fire"
        );
        assert!(!e.is_fatal());
    }

    #[test]
    fn option_error_is_named() {
        assert_eq!(OptionError(0x8000_0006).name(), "NBD_REP_ERR_UNKNOWN");
        assert_eq!(Errno::from_wire(999), Errno::Other(999));
    }
}
