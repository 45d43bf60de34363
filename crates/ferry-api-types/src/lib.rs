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
//! | GET | `/v1/vms/{name}/console/log?offset=N` | → [`ConsoleLog`] |
//! | GET | `/v1/vms/{name}/console` | HTTP upgrade `ferry-console` → raw serial stream |
//!
//! Errors are [`ApiError`] with a stable `code` and an HTTP status chosen from it.

use serde::{Deserialize, Serialize};

/// Parses sizes such as `512M` or `8G`, as the CLI accepts them.
pub use ferry_domain::parse_size;
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
}

/// A disk to give a new VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskRequest {
    /// A new empty qcow2 of this many bytes.
    New {
        /// Virtual size in bytes.
        size_bytes: u64,
    },
    /// A copy of an existing image on the host (any format qemu-img reads), as qcow2.
    Import {
        /// Absolute path of the image on the host that runs ferryd.
        path: String,
    },
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
    /// NICs; empty = no network.
    pub nics: Vec<NicRequest>,
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
    /// The last problem worth knowing about.
    pub last_error: Option<String>,
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
