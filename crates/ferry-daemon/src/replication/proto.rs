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

/// The newest protocol version this build speaks.
///
/// - 1: the first release.
/// - 2: a direct-kernel VM's boot files are shipped (`Hello::boot_files`,
///   `Welcome::need_boot_files`, `BootFile`, `BootFileStored`); captures carry an identity
///   (`CycleBegin::capture`, `Resume::capture`); `Hello::max_protocol`, `Welcome::protocol`.
/// - 3: a streamed cycle (`CycleBegin::streamed`): batches are sent while the primary still
///   reads them, so their number and data bytes come at the end (`CycleEnd::batches`,
///   `CycleEnd::bytes`). Sent only to a replica that answered protocol 3.
/// - 4: a cluster's Replica Broker answers a greeting with `Redirect` (the node that holds
///   the replica VM), and a node that no longer holds it redirects back to the Broker.
///   Sent only to a primary whose Hello says it speaks 4.
///
/// Negotiation: a primary's Hello says the oldest version it speaks (`protocol`, which a
/// version-1 replica checks) and the newest (`max_protocol`); the replica answers the
/// version both speak in its Welcome. Every field added since version 1 has a default, so
/// a peer one version apart reads what it knows and ignores the rest.
pub const PROTOCOL: u32 = 4;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL: u32 = 1;

/// The version a replica speaks with a primary whose Hello says `oldest`..=`newest`, or
/// why none.
pub fn negotiate(oldest: u32, newest: Option<u32>) -> Result<u32, String> {
    let newest = newest.unwrap_or(oldest).max(oldest);
    let agreed = newest.min(PROTOCOL);
    if oldest > PROTOCOL || agreed < MIN_PROTOCOL {
        return Err(format!(
            "the primary speaks protocol versions {oldest} to {newest}, this replica server {MIN_PROTOCOL} to {PROTOCOL}: upgrade ferry on the older host"
        ));
    }
    Ok(agreed)
}

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
        /// The oldest protocol version the primary speaks.
        protocol: u32,
        /// The newest (absent from version-1 primaries: `protocol`).
        #[serde(default)]
        max_protocol: Option<u32>,
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
        /// The fingerprint of the certificate this primary is rotating to (see
        /// `rotation`): the replica re-pins to it when it is presented.
        #[serde(default)]
        next_fingerprint: Option<String>,
    },
    /// Replica → primary: accepted.
    Welcome {
        /// The protocol version of this session (absent from version-1 replicas: 1).
        #[serde(default = "protocol_one")]
        protocol: u32,
        /// The replica server's host name.
        replica: String,
        /// The last cycle committed as a recovery point (0 = none).
        last_cycle: i64,
        /// The capture that cycle came from (`CycleBegin::capture`; absent from older
        /// replicas and for cycles without one). A primary that gave a cycle up (its spool
        /// was lost) while its end was still on the way learns here that the replica
        /// committed it after all, and sends its new capture of that cycle number as the
        /// next cycle instead of taking it for done.
        #[serde(default)]
        last_capture: Option<u64>,
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
        /// The fingerprint of the certificate this replica server is rotating to.
        #[serde(default)]
        next_fingerprint: Option<String>,
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
    /// Replica → primary, instead of `Welcome` (protocol 4): the replica VM is kept by
    /// another server of this replica cluster; greet that one (same certificate: the
    /// cluster's). A Broker names the node it placed the VM on; a node that no longer
    /// holds it names the Broker.
    Redirect {
        /// The server's name (a node's, or the Broker's).
        node: String,
        /// Its replication `address:port`.
        address: String,
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
        /// Protocol 3: the batches follow while the primary still reads them; `batches` and
        /// `bytes` here are 0 and the real ones come with `CycleEnd`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        streamed: bool,
    },
    /// Primary → replica: every batch of the cycle was sent.
    CycleEnd {
        /// Cycle number.
        cycle: i64,
        /// A streamed cycle's batch count.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batches: Option<u64>,
        /// A streamed cycle's data bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
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

fn protocol_one() -> u32 {
    1
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_one_apart_agree_on_the_older() {
        assert_eq!(negotiate(1, None), Ok(1)); // a version-1 primary
        assert_eq!(negotiate(1, Some(2)), Ok(2)); // a version-2 primary
        assert_eq!(negotiate(1, Some(3)), Ok(3));
        assert_eq!(negotiate(1, Some(4)), Ok(4));
        assert_eq!(negotiate(1, Some(5)), Ok(4)); // a newer primary speaks ours
        assert!(negotiate(5, Some(6)).unwrap_err().contains("upgrade ferry"));
    }

    /// What a version-1 replica parses of this build's Hello: its own type, as it was.
    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum MsgV1 {
        Hello {
            protocol: u32,
            primary: String,
            spec: VmSpec,
            disks: Vec<DiskMeta>,
            #[allow(dead_code)]
            settings: ReplicationSettings,
        },
        CycleBegin {
            cycle: i64,
            from_batch: u64,
        },
    }

    #[test]
    fn a_version_1_replica_reads_this_builds_messages() {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "name": "web1", "cpus": 1, "memory_mib": 256,
            "disks": [{"file": "disk0.qcow2", "size_bytes": 1048576}],
            "boot": {"kind": "disk"}, "nics": []
        }))
        .unwrap();
        let settings: ReplicationSettings = serde_json::from_value(serde_json::json!({
            "interval": {"secs": 30, "nanos": 0},
            "retention": {"additional": 0, "spacing_secs": 3600},
            "compression": false, "excluded_disks": [], "initial": {"method": "network"},
            "bandwidth_limit": null, "granularity": 65536
        }))
        .unwrap();
        let hello = Msg::Hello {
            protocol: MIN_PROTOCOL,
            max_protocol: Some(PROTOCOL),
            primary: "a".into(),
            spec,
            disks: vec![DiskMeta {
                index: 0,
                size_bytes: 1 << 20,
            }],
            settings,
            last_cycle: 3,
            reverse: false,
            reverse_resync: false,
            boot_files: Vec::new(),
            next_fingerprint: None,
        };
        let text = serde_json::to_string(&hello).unwrap();
        match serde_json::from_str::<MsgV1>(&text).unwrap() {
            MsgV1::Hello {
                protocol,
                primary,
                spec,
                disks,
                ..
            } => {
                // Version 1 refused any protocol but 1.
                assert_eq!(protocol, 1);
                assert_eq!(
                    (primary.as_str(), spec.name.as_str(), disks.len()),
                    ("a", "web1", 1)
                );
            }
            MsgV1::CycleBegin { .. } => unreachable!(),
        }
        let begin = Msg::CycleBegin {
            cycle: 4,
            kind: "delta".into(),
            taken_at: 0,
            from_batch: 0,
            batches: 1,
            bytes: 0,
            app_consistent: false,
            capture: 77,
            streamed: false,
        };
        let text = serde_json::to_string(&begin).unwrap();
        assert!(matches!(
            serde_json::from_str::<MsgV1>(&text).unwrap(),
            MsgV1::CycleBegin {
                cycle: 4,
                from_batch: 0
            }
        ));
        // And this build reads a version-1 replica's Welcome (no protocol, no boot files).
        let welcome: Msg = serde_json::from_str(
            r#"{"type":"welcome","replica":"b","last_cycle":3,"resume":{"cycle":4,"next_batch":2}}"#,
        )
        .unwrap();
        match welcome {
            Msg::Welcome {
                protocol,
                need_boot_files,
                resume,
                ..
            } => {
                assert_eq!(protocol, 1);
                assert!(need_boot_files.is_empty());
                // Without a capture identity a transfer is never resumed.
                assert_eq!(resume.unwrap().capture, 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_brokers_redirect_is_version_4_and_names_the_node() {
        // A version-3 primary agrees on 3 (so a Broker refuses it rather than redirect
        // what it cannot follow); a version-4 one on 4.
        assert_eq!(negotiate(1, Some(3)).unwrap(), 3);
        assert_eq!(negotiate(1, Some(4)).unwrap(), 4);
        let r = Msg::Redirect {
            node: "node5".into(),
            address: "10.0.0.5:7444".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"type":"redirect","node":"node5","address":"10.0.0.5:7444"}"#
        );
        assert_eq!(serde_json::from_str::<Msg>(&text).unwrap(), r);
    }
}
