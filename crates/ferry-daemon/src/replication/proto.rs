//! The control messages of a replication session (JSON in `Control` frames; extents travel
//! as binary `ExtentBatch` frames, see `ferry-wire`).
//!
//! One session ships one cycle:
//! ```text
//! primary                               replica
//!   Hello{vm, disks, settings}   --->     authorize by certificate fingerprint
//!                                <---     Welcome{replica, last_cycle, resume} | Refused{reason}
//!  [HashRequest                 --->     Hashes{disk, hashes} per disk]
//!   CycleBegin{cycle, from_batch} --->    new qcow2 layer per disk (or the staged one)
//!   ExtentBatch × n              --->     written through qemu-nbd
//!   CycleEnd{cycle, batches}     --->     flush, fsync, commit the recovery point
//!                                <---     Committed{cycle, point} | Failed{reason}
//! ```
//! A dropped connection leaves the staged layers on the replica with the number of batches
//! durably written; the next session's Welcome says where to resume.

use ferry_domain::replication::ReplicationSettings;
use ferry_domain::VmSpec;
use serde::{Deserialize, Serialize};

/// Bumped on incompatible changes; the replica refuses other versions.
pub const PROTOCOL: u32 = 1;

/// A disk being replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMeta {
    /// Index in the VM's disk list.
    pub index: usize,
    /// Virtual size in bytes.
    pub size_bytes: u64,
}

/// Where an interrupted cycle can continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The cycle staged on the replica.
    pub cycle: i64,
    /// The first batch not yet durably written.
    pub next_batch: u64,
    /// Which capture of the cycle was being received (see `CycleBegin::capture`): a cycle
    /// captured again after a crash is never spliced onto an older transfer.
    #[serde(default)]
    pub capture: u64,
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Primary → replica: who is replicating what.
    Hello {
        /// Protocol version.
        protocol: u32,
        /// The primary's host name.
        primary: String,
        /// The VM's spec on the primary.
        spec: VmSpec,
        /// The replicated disks.
        disks: Vec<DiskMeta>,
        /// The relationship's settings.
        settings: ReplicationSettings,
        /// The last cycle the primary knows committed (0 for a new relationship): a replica
        /// that has no relationship for a VM the primary already replicated was removed
        /// there, and is not silently re-created.
        #[serde(default)]
        last_cycle: i64,
        /// Reverse replication: the receiver is this VM's old primary, whose disk holds
        /// cycle `last_cycle`; it becomes the replica with that disk as its first point.
        #[serde(default)]
        reverse: bool,
        /// With `reverse`: the old primary's disk may hold writes the failover point lacks
        /// (an unplanned failover); the first cycle compares both sides by hashes.
        #[serde(default)]
        reverse_resync: bool,
        /// The files a direct-kernel VM boots from, by role: the replica never uses the
        /// primary's host paths, it keeps its own copies (sent when it lacks them).
        #[serde(default)]
        boot_files: Vec<BootFileMeta>,
    },
    /// Replica → primary: accepted.
    Welcome {
        /// The replica server's host name.
        replica: String,
        /// The last cycle committed as a recovery point (0 = none).
        last_cycle: i64,
        /// A partially received cycle.
        resume: Option<Resume>,
        /// Reverse replication after an unplanned failover: what this (old primary's) disk
        /// holds beyond the failover point, as (disk, offset, length); the new primary sends
        /// those ranges too in its first cycle.
        #[serde(default)]
        extra: Vec<(usize, u64, u64)>,
        /// Roles of the boot files the replica lacks (or holds another version of): the
        /// primary sends them now, as `BootFile` chunks.
        #[serde(default)]
        need_boot_files: Vec<String>,
    },
    /// Primary → replica: a chunk of a boot file the replica asked for; chunks arrive in
    /// order, and the last one (offset + data = size) completes the file.
    BootFile {
        /// `kernel` or `initrd`.
        role: String,
        /// Where this chunk starts.
        offset: u64,
        /// The chunk, hex.
        data: String,
    },
    /// Replica → primary: a boot file arrived whole, with the announced size and hash.
    BootFileStored {
        /// Its role.
        role: String,
    },
    /// Replica → primary: refused, with the reason (also logged on the replica).
    Refused {
        /// Why, and what to do.
        reason: String,
    },
    /// Primary → replica: send the chunk hashes of every replicated disk (of the latest
    /// recovery point, or of the existing copy before the first one), for a
    /// resynchronization or an initial copy that ships only differences.
    HashRequest,
    /// Replica → primary: one disk's chunk hashes (see `hashes::chunk_size`), hex.
    Hashes {
        /// Disk index.
        disk: usize,
        /// Concatenated 128-bit hashes, hex.
        hashes: String,
    },
    /// Primary → replica: planned failover. Every change up to `cycle` was shipped and the
    /// VM is off on the primary: fail the replica VM over to that point (and start it).
    PlannedFailover {
        /// The last cycle, which the replica must hold.
        cycle: i64,
        /// Start the VM once failed over.
        start: bool,
        /// Then reverse replication back to the sender: its name and replication address.
        #[serde(default)]
        reverse_to: Option<(String, String)>,
    },
    /// Replica → primary: the planned failover is done.
    FailedOver {
        /// What the replica did.
        message: String,
    },
    /// Primary → replica: a cycle follows.
    CycleBegin {
        /// Cycle number (1 = initial copy).
        cycle: i64,
        /// `initial`, `delta`, `resync`.
        kind: String,
        /// When the primary froze the disks (UNIX s).
        taken_at: i64,
        /// The batch the stream starts at (0, or a resume point).
        from_batch: u64,
        /// Batches in the whole cycle.
        batches: u64,
        /// Data bytes in the whole cycle.
        bytes: u64,
        /// The guest's filesystems were frozen (guest agent) when the point was taken.
        #[serde(default)]
        app_consistent: bool,
        /// Identity of this capture of the cycle (random, non-zero): a transfer resumes only
        /// onto batches of the same capture. 0: unknown (never resumed).
        #[serde(default)]
        capture: u64,
    },
    /// Primary → replica: every batch of the cycle was sent.
    CycleEnd {
        /// Cycle number.
        cycle: i64,
    },
    /// Replica → primary: the recovery point exists.
    Committed {
        /// Cycle number.
        cycle: i64,
        /// The recovery point's id on the replica.
        point: i64,
    },
    /// Replica → primary: the cycle could not be applied.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A file a direct-kernel VM boots from, as the primary announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFileMeta {
    /// `kernel` or `initrd`.
    pub role: String,
    /// Its size in bytes.
    pub size: u64,
    /// BLAKE3 of its content, hex.
    pub hash: String,
}

/// The largest boot file a replica accepts (a kernel or an initrd).
pub const MAX_BOOT_FILE: u64 = 512 << 20;
/// Bytes per `BootFile` chunk (hex doubles it; well inside a frame).
pub const BOOT_FILE_CHUNK: usize = 1 << 20;

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Bytes of a hex string; `None` if it is not hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16);
            Some((d(p[0])? * 16 + d(p[1])?) as u8)
        })
        .collect()
}

/// The manifest of an initial copy exported to a folder (`export.json` beside the data
/// file, which holds the cycle's frames exactly as they would cross the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportManifest {
    /// Format version ([`EXPORT_FORMAT`]).
    pub format: u32,
    /// The VM.
    pub vm: String,
    /// The primary host's name.
    pub primary: String,
    /// The primary host's certificate fingerprint: only its replica imports this.
    pub primary_fingerprint: String,
    /// Cycle number (1).
    pub cycle: i64,
    /// `initial`.
    pub kind: String,
    /// When the disks were frozen (UNIX s).
    pub taken_at: i64,
    /// Frames in the data file.
    pub frames: u64,
    /// Data bytes (uncompressed).
    pub data_bytes: u64,
    /// Size of the data file.
    pub file_bytes: u64,
}

/// Version of [`ExportManifest`].
pub const EXPORT_FORMAT: u32 = 1;
/// The manifest's file name.
pub const EXPORT_MANIFEST: &str = "export.json";
/// The data file's name.
pub const EXPORT_DATA: &str = "initial.ferry";
