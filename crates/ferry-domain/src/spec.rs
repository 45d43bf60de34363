//! The VM spec: everything needed to start a VM, as stored in the host's inventory, and
//! the rules that make a spec valid.

use serde::{Deserialize, Serialize};

use crate::name::VmName;

/// Most virtual CPUs a VM may have.
pub const MAX_CPUS: u32 = 64;
/// Least memory a VM may have (below this not even the test guest's kernel boots).
pub const MIN_MEMORY_MIB: u64 = 32;
/// Most memory a VM may have.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most disks per VM.
pub const MAX_DISKS: usize = 16;
/// Most NICs per VM.
pub const MAX_NICS: usize = 8;
/// Largest new disk (64 TiB, qcow2's practical limit with default clusters).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// A VM's full description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The VM's name, unique on its host.
    pub name: VmName,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks, in the order the guest sees them (`vda`, `vdb`, …).
    pub disks: Vec<DiskSpec>,
    /// How the VM boots.
    pub boot: Boot,
    /// A graphical display (VGA, USB tablet, VNC on a unix socket ferryd bridges to the
    /// web console). Absent in specs stored before displays existed: those VMs keep
    /// running without one, so their checkpoints' device state still matches.
    #[serde(default)]
    pub vnc: bool,
    /// Network adapters.
    pub nics: Vec<NicSpec>,
}

/// One qcow2 disk, stored in the VM's own directory under the host's VM storage path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// File name inside the VM's directory (`disk0.qcow2`), never a path.
    pub file: String,
    /// Virtual size in bytes.
    pub size_bytes: u64,
}

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Boot {
    /// From its first disk, through the firmware.
    Disk,
    /// Directly from a kernel (and optional initrd) on the host.
    Kernel {
        /// Absolute path of the kernel image on the host.
        kernel: String,
        /// Absolute path of the initrd on the host.
        initrd: Option<String>,
        /// Kernel command line.
        append: Option<String>,
    },
}

/// What a NIC attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "bridge", rename_all = "snake_case")]
pub enum NicKind {
    /// A Linux bridge on the host.
    Bridge(String),
    /// QEMU's user-mode network (NAT, no inbound).
    User,
}

/// One network adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// What it attaches to.
    pub kind: NicKind,
    /// Its MAC address, `52:54:00:xx:xx:xx` style.
    pub mac: String,
}

/// Why a VM spec was refused. Each message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// CPU count out of range.
    #[error("cpus must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u32),
    /// Memory out of range.
    #[error("memory must be between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB, got {0} MiB")]
    Memory(u64),
    /// Too many disks.
    #[error("a VM may have at most {MAX_DISKS} disks, got {0}")]
    TooManyDisks(usize),
    /// A disk of size zero or beyond the limit.
    #[error("disk {index} size must be between 1 byte and 64 TiB, got {size} bytes")]
    DiskSize {
        /// Which disk.
        index: usize,
        /// Its size.
        size: u64,
    },
    /// A disk file name that is not a plain `*.qcow2` name.
    #[error("disk file {0:?} must be a plain file name ending in .qcow2")]
    DiskFile(String),
    /// Two disks with the same file.
    #[error("disk file {0:?} is used twice")]
    DuplicateDisk(String),
    /// Too many NICs.
    #[error("a VM may have at most {MAX_NICS} NICs, got {0}")]
    TooManyNics(usize),
    /// A malformed MAC address.
    #[error("MAC address {0:?} is not of the form 52:54:00:12:34:56 (unicast)")]
    Mac(String),
    /// A malformed bridge name.
    #[error(
        "bridge name {0:?} is not a valid interface name (1-15 of letters, digits, '-', '_', '.')"
    )]
    Bridge(String),
    /// A kernel or initrd path that is not absolute or holds characters QEMU can't take.
    #[error("{what} path {path:?} must be absolute and contain no ','")]
    BootPath {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The path given.
        path: String,
    },
    /// A kernel command line with control characters.
    #[error("kernel command line must be one line of printable characters")]
    Append,
    /// Disk boot without a disk.
    #[error("a VM that boots from disk needs at least one disk")]
    NoBootDisk,
}

impl VmSpec {
    /// Checks every rule; the first broken one is returned.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ValidationError::Cpus(self.cpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ValidationError::Memory(self.memory_mib));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ValidationError::TooManyDisks(self.disks.len()));
        }
        for (index, disk) in self.disks.iter().enumerate() {
            if disk.size_bytes == 0 || disk.size_bytes > MAX_DISK_BYTES {
                return Err(ValidationError::DiskSize {
                    index,
                    size: disk.size_bytes,
                });
            }
            if !is_plain_qcow2_name(&disk.file) {
                return Err(ValidationError::DiskFile(disk.file.clone()));
            }
            if self.disks[..index].iter().any(|d| d.file == disk.file) {
                return Err(ValidationError::DuplicateDisk(disk.file.clone()));
            }
        }
        if self.nics.len() > MAX_NICS {
            return Err(ValidationError::TooManyNics(self.nics.len()));
        }
        for nic in &self.nics {
            if !is_valid_mac(&nic.mac) {
                return Err(ValidationError::Mac(nic.mac.clone()));
            }
            if let NicKind::Bridge(br) = &nic.kind {
                if !is_valid_ifname(br) {
                    return Err(ValidationError::Bridge(br.clone()));
                }
            }
        }
        match &self.boot {
            Boot::Disk if self.disks.is_empty() => return Err(ValidationError::NoBootDisk),
            Boot::Disk => {}
            Boot::Kernel {
                kernel,
                initrd,
                append,
            } => {
                check_boot_path("kernel", kernel)?;
                if let Some(initrd) = initrd {
                    check_boot_path("initrd", initrd)?;
                }
                if append
                    .as_deref()
                    .is_some_and(|a| a.chars().any(|c| c.is_control()))
                {
                    return Err(ValidationError::Append);
                }
            }
        }
        Ok(())
    }
}

fn check_boot_path(what: &'static str, path: &str) -> Result<(), ValidationError> {
    if !path.starts_with('/') || path.contains(',') || path.chars().any(|c| c.is_control()) {
        return Err(ValidationError::BootPath {
            what,
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn is_plain_qcow2_name(file: &str) -> bool {
    file.len() > ".qcow2".len()
        && file.len() <= 64
        && file.ends_with(".qcow2")
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !file.starts_with('.')
}

/// True for `xx:xx:xx:xx:xx:xx` hex with the multicast bit clear.
pub fn is_valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// True for a Linux interface name (IFNAMSIZ − 1 = 15 characters).
pub fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name != "."
        && name != ".."
}

/// A MAC in QEMU's locally administered range `52:54:00:…`, derived from `seed` bytes
/// (the caller passes randomness; the domain has none).
pub fn mac_from_seed(seed: [u8; 3]) -> String {
    format!("52:54:00:{:02x}:{:02x}:{:02x}", seed[0], seed[1], seed[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmSpec {
        VmSpec {
            name: VmName::new("vm1").unwrap(),
            cpus: 1,
            memory_mib: 256,
            vnc: true,
            disks: vec![DiskSpec {
                file: "disk0.qcow2".into(),
                size_bytes: 64 << 20,
            }],
            boot: Boot::Kernel {
                kernel: "/boot/vmlinuz".into(),
                initrd: Some("/x/initramfs.gz".into()),
                append: Some("console=ttyS0".into()),
            },
            nics: vec![NicSpec {
                kind: NicKind::User,
                mac: "52:54:00:12:34:56".into(),
            }],
        }
    }

    #[test]
    fn base_is_valid() {
        base().validate().unwrap();
    }

    #[test]
    fn each_rule_is_enforced() {
        type Mutate = fn(&mut VmSpec);
        let cases: &[(Mutate, ValidationError)] = &[
            (|s| s.cpus = 0, ValidationError::Cpus(0)),
            (|s| s.cpus = 65, ValidationError::Cpus(65)),
            (|s| s.memory_mib = 8, ValidationError::Memory(8)),
            (
                |s| s.disks[0].size_bytes = 0,
                ValidationError::DiskSize { index: 0, size: 0 },
            ),
            (
                |s| s.disks[0].file = "../x.qcow2".into(),
                ValidationError::DiskFile("../x.qcow2".into()),
            ),
            (
                |s| s.disks[0].file = "disk0.raw".into(),
                ValidationError::DiskFile("disk0.raw".into()),
            ),
            (
                |s| s.disks.push(s.disks[0].clone()),
                ValidationError::DuplicateDisk("disk0.qcow2".into()),
            ),
            (
                |s| s.nics[0].mac = "01:00:00:00:00:00".into(),
                ValidationError::Mac("01:00:00:00:00:00".into()),
            ),
            (
                |s| s.nics[0].kind = NicKind::Bridge("br0;rm".into()),
                ValidationError::Bridge("br0;rm".into()),
            ),
            (
                |s| {
                    s.boot = Boot::Kernel {
                        kernel: "rel/vmlinuz".into(),
                        initrd: None,
                        append: None,
                    }
                },
                ValidationError::BootPath {
                    what: "kernel",
                    path: "rel/vmlinuz".into(),
                },
            ),
            (
                |s| {
                    s.boot = Boot::Kernel {
                        kernel: "/k".into(),
                        initrd: None,
                        append: Some("a\nb".into()),
                    }
                },
                ValidationError::Append,
            ),
            (
                |s| {
                    s.boot = Boot::Disk;
                    s.disks.clear()
                },
                ValidationError::NoBootDisk,
            ),
        ];
        for (mutate, want) in cases {
            let mut spec = base();
            mutate(&mut spec);
            assert_eq!(spec.validate().unwrap_err(), *want);
        }
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = base();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn mac_helpers() {
        assert!(is_valid_mac(&mac_from_seed([1, 2, 255])));
        assert!(!is_valid_mac("52:54:00:12:34"));
        assert!(!is_valid_mac("52:54:00:12:34:zz"));
    }
}
