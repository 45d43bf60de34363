//! The types of ferryd's HTTP API (`/v1/...`), shared by the daemon, the `ferry` CLI and
//! the console, so that all three agree on the wire format by construction.
//!
//! | method | path | body → reply |
//! |---|---|---|
//! | GET | `/v1/server` | → [`ServerInfo`] |
//! | GET | `/v1/vms` | → `Vec<`[`VmInfo`]`>` |
//! | POST | `/v1/vms` | [`VmCreateRequest`] → [`VmInfo`] |
//! | GET | `/v1/vms/{name}` | → [`VmInfo`] |
//! | DELETE | `/v1/vms/{name}` | → [`ActionReply`] |
//! | POST | `/v1/vms/{name}/start`, `/stop`, `/pause`, `/resume` | → [`ActionReply`] |
//! | POST | `/v1/vms/{name}/shutdown` | [`ShutdownRequest`] → [`ActionReply`] |
//! | POST | `/v1/vms/{name}/set` | [`VmSetRequest`] → [`VmInfo`] |
//! | GET | `/v1/vms/{name}/console/log?offset=N` | → [`ConsoleLog`] |
//! | GET | `/v1/vms/{name}/console` | HTTP upgrade `ferry-console` → raw serial stream |
//! | GET | `/v1/vms/{name}/screenshot` | → `image/png` of the VM's display |
//! | GET | `/v1/vms/{name}/vnc` | websocket upgrade → the VM's VNC (RFB) stream, binary frames |
//! | POST | `/v1/import` | [`VmImportRequest`] → [`VmInfo`] |
//! | GET | `/v1/vms/{name}/checkpoints` | → [`CheckpointList`] |
//! | POST | `/v1/vms/{name}/checkpoints` | [`CheckpointCreateRequest`] → [`CheckpointCreated`] |
//! | POST | `/v1/vms/{name}/checkpoints/{cp}/apply` | [`CheckpointApplyRequest`] → [`ActionReply`] |
//! | POST | `/v1/vms/{name}/checkpoints/{cp}/rename` | [`CheckpointRenameRequest`] → [`CheckpointInfo`] |
//! | DELETE | `/v1/vms/{name}/checkpoints/{cp}?subtree=true` | → [`ActionReply`] |
//! | POST | `/v1/vms/{name}/checkpoints/{cp}/export` | [`CheckpointExportRequest`] → [`ActionReply`] |
//!
//! `{cp}` is a checkpoint's id or its name (when no other checkpoint of the VM has it).
//!
//! Errors are [`ApiError`] with a stable `code` and an HTTP status chosen from it.

use serde::{Deserialize, Serialize};

/// Parses sizes such as `512M` or `8G`, as the CLI accepts them.
pub use ferry_domain::parse_size;
pub use ferry_domain::spec::FailoverIp;
pub use ferry_domain::{BootDevice, CdromSpec, DiskBus, DiskRole, Firmware, Machine};
pub use ferry_domain::{VmName, VmState};

/// The upgrade protocol name of the console stream.
pub const CONSOLE_UPGRADE: &str = "ferry-console";

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable machine-readable code (`not_found`, `conflict`, `invalid`, `unauthorized`,
    /// `qemu`, `internal`).
    pub code: String,
    /// One line saying what went wrong and what to do.
    pub message: String,
}

/// What a host says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The host's name (from its config, default the hostname).
    pub name: String,
    /// ferryd's version.
    pub version: String,
    /// SHA-256 fingerprint of the host's certificate, `AA:BB:…`, to pin from other hosts.
    pub fingerprint: String,
    /// Where the TLS API listens.
    pub tls_listen: String,
    /// The file holding the TLS API's bearer token (readable by root on that host).
    pub token_file: String,
    /// The accelerator VMs get: `kvm` or `tcg`.
    pub accel: String,
    /// Why that accelerator was chosen (config, or the probe's outcome).
    pub accel_reason: String,
    /// The data directory.
    pub data_dir: String,
    /// Where VM disks are stored.
    pub vm_storage: String,
    /// The bridge new NICs attach to when none is named.
    pub default_bridge: Option<String>,
    /// Number of VMs in the inventory.
    pub vm_count: usize,
    /// The host-wide limit on outgoing replication in force now (bytes/s; none = unlimited).
    #[serde(default)]
    pub replication_bandwidth_limit: Option<u64>,
    /// The time-of-day windows that change it (`HH:MM-HH:MM=RATE`, local time).
    #[serde(default)]
    pub replication_bandwidth_schedule: Vec<String>,
}

/// A disk to give a new VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskRequest {
    /// A new empty qcow2 of this many bytes.
    New {
        /// Virtual size in bytes.
        size_bytes: u64,
        /// The guest bus.
        #[serde(default)]
        bus: DiskBus,
    },
    /// An existing image on the host. A qcow2 is copied into the VM's directory; a raw
    /// image or block device stays where it is and is tracked through a qcow2 metadata
    /// file in the VM's directory (see docs/HARDWARE.md).
    Import {
        /// Absolute path of the image on the host that runs ferryd.
        path: String,
        /// Its format; `None`: `qcow2` for a `*.qcow2` name, `raw` for `*.raw` and block
        /// devices, otherwise it must be given (the contents are never probed).
        #[serde(default)]
        format: Option<ImageFormat>,
        /// The guest bus.
        #[serde(default)]
        bus: DiskBus,
    },
}

/// The format of an existing image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    /// qcow2 (without a backing file or an external data file).
    Qcow2,
    /// Raw bytes: a plain image file or a block device.
    Raw,
}

/// A NIC to give a new VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NicRequest {
    /// A Linux bridge; `None` means the host's default bridge.
    Bridge {
        /// The bridge.
        bridge: Option<String>,
    },
    /// QEMU user-mode networking.
    User,
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCreateRequest {
    /// The new VM's name.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks.
    pub disks: Vec<DiskRequest>,
    /// Kernel to boot directly (absolute host path); none = boot from disk.
    pub kernel: Option<String>,
    /// Initrd for the kernel.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub append: Option<String>,
    /// A graphical display (VGA + USB tablet, VNC reached through ferryd's websocket);
    /// absent = on.
    #[serde(default)]
    pub vnc: Option<bool>,
    /// NICs; empty = no network.
    pub nics: Vec<NicRequest>,
    /// Machine type (default `pc`).
    #[serde(default)]
    pub machine: Machine,
    /// Firmware (default BIOS). UEFI gives the VM an NVRAM disk made from OVMF's template.
    #[serde(default)]
    pub firmware: Firmware,
    /// UEFI Secure Boot (needs `uefi` and `q35`).
    #[serde(default)]
    pub secure_boot: bool,
    /// A CD drive: with an ISO (absolute host path) in it, or empty.
    #[serde(default)]
    pub cdrom: Option<CdromSpec>,
    /// Firmware boot order; empty = the first disk.
    #[serde(default)]
    pub boot_order: Vec<BootDevice>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// An NVRAM image (qcow2) to copy instead of the firmware's blank template; how an
    /// imported export keeps its UEFI variables.
    #[serde(default)]
    pub nvram: Option<String>,
}

/// `POST /v1/vms/{name}/set`: change a VM's hardware. The CD drive changes while the VM
/// runs; the others while it is off, or take effect at its next start (boot order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VmSetRequest {
    /// Put this ISO (absolute host path) into the CD drive.
    #[serde(default)]
    pub cdrom: Option<String>,
    /// Empty the CD drive.
    #[serde(default)]
    pub eject: bool,
    /// New firmware boot order.
    #[serde(default)]
    pub boot_order: Option<Vec<BootDevice>>,
    /// New machine type (VM off).
    #[serde(default)]
    pub machine: Option<Machine>,
    /// Add or remove the virtio-rng device (VM off).
    #[serde(default)]
    pub rng: Option<bool>,
    /// New failover IP settings, each `NIC=ADDR/PREFIX[,gw=IP][,dns=IP;IP]` (NIC: its
    /// index from 0 or its MAC); an empty list removes them all.
    #[serde(default)]
    pub failover_ip: Option<Vec<String>>,
    /// The same for test failovers.
    #[serde(default)]
    pub test_failover_ip: Option<Vec<String>>,
}

/// `POST /v1/vms/{name}/exec`: run a program in the guest through qemu-guest-agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program (an absolute path in the guest; `/bin/sh -c '…'` for a shell line) and
    /// its arguments.
    pub argv: Vec<String>,
    /// How long it may take, agent answer included (default 60 s, at most 600 s).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// What a program run in the guest did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecReply {
    /// Its exit code (128 + signal when a signal ended it).
    pub exit_code: i32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// A disk as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Full path of the qcow2 file.
    pub path: String,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// QEMU block node name (`drive0`, …).
    pub node: String,
    /// The guest bus.
    #[serde(default)]
    pub bus: DiskBus,
    /// `data`, or `nvram` for a UEFI VM's variable store.
    #[serde(default)]
    pub role: DiskRole,
    /// The raw image or block device a raw disk's qcow2 metadata file tracks.
    #[serde(default)]
    pub data_file: Option<String>,
}

/// A NIC as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    /// `bridge` or `user`.
    pub kind: String,
    /// The bridge, for bridge NICs.
    pub bridge: Option<String>,
    /// MAC address.
    pub mac: String,
}

/// A VM as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// Lifecycle state.
    pub state: VmState,
    /// QEMU process id while running.
    pub pid: Option<u32>,
    /// Seconds since the QEMU process started.
    pub uptime_s: Option<u64>,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks.
    pub disks: Vec<DiskInfo>,
    /// NICs.
    pub nics: Vec<NicInfo>,
    /// `disk` or `kernel`.
    pub boot: String,
    /// Kernel command line, for kernel boot.
    pub append: Option<String>,
    /// Whether the VM has a graphical display (screenshots, the console's Connect view).
    #[serde(default)]
    pub vnc: bool,
    /// The last problem worth knowing about.
    pub last_error: Option<String>,
    /// `primary` or `replica` when the VM is replicated. A replica VM starts only through
    /// failover.
    #[serde(default)]
    pub replication: Option<String>,
    /// Machine type.
    #[serde(default)]
    pub machine: Machine,
    /// Firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// UEFI Secure Boot.
    #[serde(default)]
    pub secure_boot: bool,
    /// The CD drive, if the VM has one. While the VM runs, what QEMU reports is in it.
    #[serde(default)]
    pub cdrom: Option<CdromSpec>,
    /// Firmware boot order (empty: the first disk).
    #[serde(default)]
    pub boot_order: Vec<BootDevice>,
    /// Whether the VM has a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Per NIC, the guest's IP settings after a failover.
    #[serde(default)]
    pub failover_ip: Vec<FailoverIp>,
    /// The same for a test failover.
    #[serde(default)]
    pub test_failover_ip: Vec<FailoverIp>,
}

/// `POST /v1/vms/{name}/shutdown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// How long to wait for the guest to power off (default 60 s).
    pub timeout_s: Option<u64>,
}

/// The result of an action on a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReply {
    /// The VM's state afterwards.
    pub state: VmState,
    /// One line for the user.
    pub message: String,
}

/// `GET /v1/vms/{name}/console/log`: what the serial console printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleLog {
    /// Offset of `text` in the whole log.
    pub offset: u64,
    /// Offset to ask for next time to get only new output.
    pub next_offset: u64,
    /// The output (lossy UTF-8).
    pub text: String,
}

// ---- replication ------------------------------------------------------------------------
//
// | GET | `/v1/replica-server` | → [`ReplicaServerInfo`] |
// | POST | `/v1/replica-server` | [`ReplicaServerSetRequest`] → [`ReplicaServerInfo`] |
// | GET | `/v1/replication` | → `Vec<`[`ReplicationInfo`]`>` |
// | GET | `/v1/vms/{name}/replication` | → [`ReplicationInfo`] |
// | POST | `/v1/vms/{name}/replication` | [`EnableReplicationRequest`] → [`ReplicationInfo`] |
// | DELETE | `/v1/vms/{name}/replication` | → [`ActionReply`] |
// | POST | `/v1/vms/{name}/replication/{start,suspend,resume,resync,cycle}` | → [`ReplicationInfo`] |
// | GET | `/v1/vms/{name}/replication/points` | → `Vec<`[`RecoveryPointInfo`]`>` |

/// One primary allowed to replicate to this replica server (Hyper-V's authorization entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationEntry {
    /// The primary's host name, as it introduces itself.
    pub primary: String,
    /// The SHA-256 fingerprint of the primary's host certificate (what authenticates it).
    pub fingerprint: String,
    /// Where its replica VMs are stored.
    pub storage: String,
    /// Primaries in one trust group may take over each other's relationships.
    pub trust_group: String,
}

/// The replica-server role of a host (Hyper-V's Replication Configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReplicaServerConfig {
    /// Whether this host accepts replication.
    pub enabled: bool,
    /// The port for host-to-host replication (mutual TLS).
    pub port: u16,
    /// Accept any primary whose host certificate was issued by `trusted_ca` (never a
    /// self-signed one: "any" means any member of the organization the CA vouches for).
    pub allow_any: bool,
    /// Storage for replicas from any primary (with `allow_any`).
    pub default_storage: Option<String>,
    /// Listed primaries.
    pub entries: Vec<AuthorizationEntry>,
    /// PEM of the CA certificate(s) that `allow_any` trusts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_ca: Option<String>,
    /// Whether a primary may start a VM here (planned failover with start). Off: the VM is
    /// failed over and left off for this host's admin to start.
    #[serde(default)]
    pub allow_primary_start: bool,
    /// Network mapping applied at failover: a primary's bridge (`FROM`, or `PRIMARY/FROM`
    /// for one primary) → this host's bridge. A bridged NIC with no mapping and no
    /// `default_bridge` in ferryd's config is left out of the failed-over VM: it never joins
    /// a bridge the primary named.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bridge_map: std::collections::BTreeMap<String, String>,
    /// Most replica VMs one primary may have here (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vms_per_primary: Option<u32>,
    /// Most virtual disk bytes the replica VMs of one storage location may add up to
    /// (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_quota_bytes: Option<u64>,
}

/// The replica-server role and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaServerInfo {
    /// The host's name.
    pub name: String,
    /// Its certificate fingerprint (primaries pin it).
    pub fingerprint: String,
    /// The configuration.
    pub config: ReplicaServerConfig,
    /// `ip:port` it listens on when enabled.
    pub listening: Option<String>,
    /// Free and total space of each replica storage location, measured now (for
    /// monitoring: replicas fail when it runs out).
    #[serde(default)]
    pub storage: Vec<StorageSpace>,
}

/// Space on the filesystem of one storage location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageSpace {
    /// The configured location.
    pub path: String,
    /// Bytes an unprivileged writer can still use.
    pub free_bytes: u64,
    /// Size of the filesystem.
    pub total_bytes: u64,
}

/// Changes to the replica-server role; absent fields stay as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplicaServerSetRequest {
    /// Enable (true) or disable (false).
    pub enabled: Option<bool>,
    /// Listen port.
    pub port: Option<u16>,
    /// Allow any primary whose certificate `trusted_ca` issued, storing in `storage`.
    pub allow_any: Option<bool>,
    /// PEM of the CA certificate(s) for `allow_any`; an empty string removes it.
    #[serde(default)]
    pub trusted_ca: Option<String>,
    /// Let primaries start VMs here (planned failover with start).
    #[serde(default)]
    pub allow_primary_start: Option<bool>,
    /// Add a network mapping: (`FROM` or `PRIMARY/FROM`, this host's bridge).
    #[serde(default)]
    pub map_bridge: Option<(String, String)>,
    /// Remove the network mapping of `FROM` or `PRIMARY/FROM`.
    #[serde(default)]
    pub unmap_bridge: Option<String>,
    /// Set the most replica VMs per primary (0: no limit).
    #[serde(default)]
    pub max_vms_per_primary: Option<u32>,
    /// Set the quota of virtual disk bytes per storage location (0: no limit).
    #[serde(default)]
    pub storage_quota_bytes: Option<u64>,
    /// Default storage (with `allow_any`) or the storage of the entry being added.
    pub storage: Option<String>,
    /// Add (or replace, by primary name) an authorization entry.
    pub allow: Option<AuthorizationEntry>,
    /// Remove the entry of this primary.
    pub disallow: Option<String>,
}

/// `ferry replication enable`: the wizard's choices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnableReplicationRequest {
    /// The replica server's name.
    pub replica_name: String,
    /// Its replication address, `host:port`.
    pub replica_addr: String,
    /// Its certificate fingerprint.
    pub replica_fingerprint: String,
    /// `30s`, `5m`, `15m`, or any duration from 1s.
    pub interval: String,
    /// Additional recovery points besides the latest (0–96; Hyper-V: 0–24).
    pub recovery_points: u32,
    /// Minimum spacing between kept recovery points (default `1h`, as Hyper-V).
    pub point_spacing: Option<String>,
    /// zstd-compress what is sent.
    pub compression: bool,
    /// Disk indexes not to replicate.
    pub exclude_disks: Vec<usize>,
    /// `network` (default), `at:UNIX_TIME`, `export:DIR`, `existing`.
    pub initial: Option<String>,
    /// Bandwidth limit, bytes/s (e.g. from `10M`), or none.
    pub bandwidth_limit: Option<u64>,
    /// Change-tracking granularity in bytes (default 4096).
    pub granularity: Option<u32>,
    /// Application-consistent points at most this often (a duration such as `1h`).
    #[serde(default)]
    pub app_consistent_every: Option<String>,
}

/// A long operation's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// What is being done: `reading`, `sending`, `applying`.
    pub phase: String,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in all (0 when unknown yet).
    pub total_bytes: u64,
    /// Percent done, 0–100.
    pub percent: u8,
}

/// A replication relationship as seen from one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationInfo {
    /// The VM.
    pub vm: String,
    /// `primary` or `replica`.
    pub role: String,
    /// Machine state name (Hyper-V's, snake case).
    pub state: String,
    /// Hyper-V's UI label of the state.
    pub state_label: String,
    /// The other host's name.
    pub partner: String,
    /// The other host's address.
    pub partner_addr: String,
    /// Interval in seconds.
    pub interval_s: u64,
    /// Additional recovery points kept.
    pub recovery_points: u32,
    /// Compression on?
    pub compression: bool,
    /// Excluded disk indexes.
    pub excluded_disks: Vec<usize>,
    /// Tracking granularity.
    pub granularity: u32,
    /// Application-consistent points at most this often (s); none = crash-consistent only.
    #[serde(default)]
    pub app_consistent_every_s: Option<u64>,
    /// Bandwidth limit, bytes/s.
    pub bandwidth_limit: Option<u64>,
    /// The last cycle applied on the replica.
    pub last_cycle: i64,
    /// When the newest recovery point was taken (UNIX s).
    pub last_point_at: Option<i64>,
    /// The last failure.
    pub last_error: Option<String>,
    /// Bytes captured on the primary, not yet acknowledged by the replica.
    pub pending_bytes: u64,
    /// What is running now.
    pub progress: Option<Progress>,
    /// Recovery points on the replica (replica side).
    pub points: usize,
}

/// One recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPointInfo {
    /// Its id (for `failover --point`).
    pub id: i64,
    /// The primary's cycle number.
    pub cycle: i64,
    /// When the primary froze the disks (UNIX s).
    pub taken_at: i64,
    /// When the replica committed it.
    pub applied_at: i64,
    /// `initial`, `delta`, `resync`.
    pub kind: String,
    /// Bytes received for it.
    pub bytes: i64,
    /// Per disk index, the image holding the point (top of a qcow2 chain).
    pub layers: Vec<(usize, String)>,
    /// `crash` or `application` (guest filesystems frozen by the guest agent).
    #[serde(default)]
    pub consistency: String,
}

/// `POST /v1/vms/{name}/replication/import`: the folder holding an exported initial copy
/// (on the replica server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// Absolute path of the folder (`export.json` and `initial.ferry`).
    pub dir: String,
}

/// `GET /v1/vms/{name}/replication/health`: Hyper-V's "View Replication Health" for one
/// relationship, over the current monitoring window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationHealthInfo {
    /// The VM.
    pub vm: String,
    /// `primary` or `replica`.
    pub role: String,
    /// Replication state (API name) and its label.
    pub state: String,
    /// Hyper-V's label for the state.
    pub state_label: String,
    /// `normal`, `warning` or `critical`.
    pub health: String,
    /// Why, one sentence per rule that applies (empty when normal).
    pub details: Vec<String>,
    /// Primary server's name.
    pub primary_server: String,
    /// Replica server's name.
    pub replica_server: String,
    /// Start of the monitoring window (UNIX s).
    pub from_time: i64,
    /// End of the window: now (UNIX s).
    pub to_time: i64,
    /// Average bytes per successful cycle (as sent).
    pub average_size: u64,
    /// Largest cycle (bytes sent).
    pub maximum_size: u64,
    /// Average cycle latency (capture to committed), ms.
    pub average_latency_ms: u64,
    /// Longest cycle latency, ms.
    pub maximum_latency_ms: u64,
    /// Failed cycles in the window.
    pub errors: u64,
    /// Successful cycles in the window.
    pub successful_cycles: u64,
    /// Cycles expected in the window but not done.
    pub missed_cycles: u64,
    /// Cycles expected in the window.
    pub expected_cycles: u64,
    /// Bytes captured and not yet on the replica (primary).
    pub pending_bytes: u64,
    /// When the newest complete recovery point was taken (UNIX s).
    pub last_synchronized_at: Option<i64>,
    /// Now minus that, in seconds: the data that a failure now would lose, in time.
    pub rpo_s: Option<i64>,
    /// Data bytes (before compression) of the window's successful cycles.
    pub data_bytes: u64,
    /// Bytes sent (primary) or received (replica) in the window.
    pub network_bytes: u64,
    /// Bytes sent by resynchronizations in the window.
    pub resynchronized_bytes: u64,
    /// `running` or `not running` (replica side; test failover arrives with failover).
    pub test_failover_status: String,
    /// When the last test failover started (UNIX s).
    pub last_test_failover_at: Option<i64>,
}

/// One event (`GET /v1/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInfo {
    /// Sequence number: pass it as `after` to get only newer events.
    pub id: i64,
    /// When (UNIX ms).
    pub at_ms: i64,
    /// The VM, if any.
    pub vm: Option<String>,
    /// Stable code of the kind.
    pub code: u32,
    /// Kind.
    pub kind: String,
    /// `info`, `warning`, `error`.
    pub severity: String,
    /// What happened.
    pub message: String,
}

/// What a checkpoint holds (`--standard` / `--production`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Disks only, with the guest's filesystems frozen through its agent when it has one
    /// (else crash-consistent). Applying it leaves the VM off. Hyper-V's default.
    #[default]
    Production,
    /// Disks plus memory and device state of a running VM: applying it resumes the VM
    /// where it was.
    Standard,
}

/// `POST /v1/vms/{name}/checkpoints`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointCreateRequest {
    /// Name (≤ 100 characters); default "VM (MM/DD/YYYY - hh:mm:ss AM/PM)" in UTC.
    #[serde(default)]
    pub name: Option<String>,
    /// Kind.
    #[serde(default)]
    pub kind: CheckpointKind,
}

/// One checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// The checkpoint it was taken after.
    pub parent_id: Option<i64>,
    /// `production` or `standard`.
    pub kind: String,
    /// `application-consistent`, `crash-consistent` or `saved-state` (memory included).
    pub consistency: String,
    /// Holds memory and device state.
    pub with_memory: bool,
    /// When it was taken (UNIX ms).
    pub created_ms: i64,
}

/// Reply of `POST /v1/vms/{name}/checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointCreated {
    /// The new checkpoint.
    pub checkpoint: CheckpointInfo,
    /// What was done, e.g. whether the guest's filesystems were frozen.
    pub message: String,
}

/// `GET /v1/vms/{name}/checkpoints`: the VM's checkpoint tree (user checkpoints only;
/// replica recovery points are under `/replication/points`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointList {
    /// The VM.
    pub vm: String,
    /// The checkpoint the VM's current state descends from ("Now" hangs below it).
    pub current: Option<i64>,
    /// Every checkpoint, oldest first.
    pub checkpoints: Vec<CheckpointInfo>,
    /// The long checkpoint operation running on the VM (`exporting`), if any.
    #[serde(default)]
    pub progress: Option<Progress>,
}

/// `POST /v1/vms/{name}/checkpoints/{cp}/apply`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointApplyRequest {
    /// Take a production checkpoint of the current state first ("Create Checkpoint and
    /// Apply").
    #[serde(default)]
    pub checkpoint_first: bool,
}

/// `POST /v1/vms/{name}/checkpoints/{cp}/rename`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRenameRequest {
    /// The new name.
    pub name: String,
}

/// `POST /v1/vms/{name}/checkpoints/{cp}/export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointExportRequest {
    /// Absolute path of a folder that does not exist yet (or is empty) on the VM's host.
    pub dir: String,
}

/// `POST /v1/vms/import`: a folder written by a checkpoint export becomes a new VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmImportRequest {
    /// Absolute path of the exported folder.
    pub dir: String,
    /// The new VM's name; default: the exported VM's name.
    #[serde(default)]
    pub name: Option<String>,
}

pub mod cluster;
