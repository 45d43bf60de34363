//! A pure-Rust async NBD client for Ferry.
//!
//! Ferry needs two things from QEMU's NBD servers: the dirty extents of a
//! fleecing export (metadata context `qemu:dirty-bitmap:NAME`, or
//! `base:allocation` for a full copy), and a writable export of a qcow2
//! overlay to apply recovery points into. No crate on crates.io offers block
//! status with metadata contexts, and Debian bookworm's libnbd is too old for
//! its Rust bindings, hence this small client.
//!
//! It speaks the fixed-newstyle handshake with structured replies,
//! `NBD_OPT_SET_META_CONTEXT` and `NBD_OPT_GO` (honouring
//! `NBD_INFO_BLOCK_SIZE`), then READ, WRITE, WRITE_ZEROES, TRIM, FLUSH,
//! BLOCK_STATUS and DISC. Large calls are split to the server's maximum
//! payload and pipelined. Every server message is validated; a broken or
//! hostile server yields an [`NbdError`], never a panic or an endless loop.
//! TLS and the experimental extended headers are not implemented.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_nbd::NbdError> {
//! use ferry_nbd::{dirty_bitmap_context, NbdClient, STATE_DIRTY};
//! let ctx = dirty_bitmap_context("backup-1");
//! let mut nbd = NbdClient::connect_unix("/run/fleece.sock".as_ref(), "drive0", &[&ctx]).await?;
//! for extent in nbd.map(&ctx).await?.iter().filter(|e| e.has(STATE_DIRTY)) {
//!     let mut buf = vec![0; extent.length as usize];
//!     nbd.read(extent.offset, &mut buf).await?;
//! }
//! nbd.disconnect().await
//! # }
//! ```

mod client;
mod error;
mod extent;
mod handshake;
mod proto;
mod transmission;

pub use client::{NbdClient, WriteOptions, ZeroOptions};
pub use error::{Errno, NbdError, OptionError, ProtocolError};
pub use extent::Extent;
pub use handshake::BlockSize;

/// The standard allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag `NBD_STATE_HOLE`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag `NBD_STATE_ZERO`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1;

/// Name of the metadata context QEMU uses to export dirty bitmap `name`.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// Raw protocol constants, for callers and tests that need them.
pub mod constants {
    pub use crate::proto::{
        NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL,
        NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA,
        NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    /// Callers spawn these futures on a multi-threaded runtime.
    #[allow(dead_code)]
    fn futures_are_send(client: &mut NbdClient, buf: &mut [u8]) {
        assert_send(&client.read(0, buf));
        assert_send(&client.read_many([(0, &mut buf[..])]));
        assert_send(&client.write(0, &[]));
        assert_send(&client.block_status(BASE_ALLOCATION, 0, 1));
    }

    #[test]
    fn dirty_bitmap_context_name() {
        assert_eq!(dirty_bitmap_context("b1"), "qemu:dirty-bitmap:b1");
    }
}
