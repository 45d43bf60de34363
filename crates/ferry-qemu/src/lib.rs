//! The QEMU driver: everything ferryd knows about running `qemu-system-x86_64`
//! and `qemu-img` on the host.
//!
//! - [`process`] builds the QEMU command line, starts daemonized VMs, tracks
//!   them by pid and probes whether KVM actually works.
//! - [`qmp`] is an async QMP client with typed commands written by hand for
//!   QEMU 7.2 and an untyped escape hatch for everything else.
//! - [`img`] wraps `qemu-img` (info, create, convert).
//! - [`snapshot`] and [`qcow2`] are the disk side of checkpoints: internal snapshots
//!   of a VM that is off, and what differs between an image and one of its snapshots.
//! - [`cbt`] is changed-block tracking: dirty-bitmap generations, fleecing
//!   points exported over NBD, and the offline helpers for a VM that is off.
//! - [`migration`] is live migration between two QEMUs on shared storage,
//!   carrying the dirty bitmaps along.
//!
//! The crate targets QEMU 7.2 (Debian bookworm) and is deliberately tolerant
//! of newer versions: replies are decoded leniently and unknown fields ignored.

pub mod agent;
pub mod cbt;
pub mod hardware;
pub mod img;
pub mod migration;
pub mod process;
pub mod qcow2;
pub mod qmp;
pub mod snapshot;

pub use cbt::{
    bitmap_state, cleanup_stale, rotate_bitmap_offline, start_tracking, BitmapState, CbtError,
    FleeceDisk, FleecePoint, NodeSpec, OfflineExport, ReleaseReport,
};
