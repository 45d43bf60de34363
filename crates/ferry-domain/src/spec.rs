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
    /// The virtual hardware platform (absent in VMs made before it existed: `pc`).
    #[serde(default)]
    pub machine: Machine,
    /// The firmware (absent: BIOS). A UEFI VM's NVRAM is one of its disks, of role
    /// [`DiskRole::Nvram`], so it is replicated, checkpointed and exported with them.
    #[serde(default)]
    pub firmware: Firmware,
    /// UEFI Secure Boot (needs UEFI and q35).
    #[serde(default)]
    pub secure_boot: bool,
    /// The CD drive, if the VM has one.
    #[serde(default)]
    pub cdrom: Option<CdromSpec>,
    /// Firmware boot order; empty = the first disk (QEMU's `-boot c`).
    #[serde(default)]
    pub boot_order: Vec<BootDevice>,
    /// A virtio-rng device feeding the guest's entropy pool from the host's.
    #[serde(default)]
    pub rng: bool,
    /// Hyper-V's "Failover TCP/IP": per NIC, the address the guest must have after a
    /// failover (applied through qemu-guest-agent); replicated with the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_ip: Vec<FailoverIp>,
    /// The same for a test failover's VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_failover_ip: Vec<FailoverIp>,
}

/// The IP settings one NIC gets in the guest after a failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverIp {
    /// The NIC, by its MAC address (it survives network mapping at failover).
    pub mac: String,
    /// `ADDRESS/PREFIX`, IPv4 or IPv6.
    pub address: String,
    /// Default gateway.
    #[serde(default)]
    pub gateway: Option<String>,
    /// DNS servers.
    #[serde(default)]
    pub dns: Vec<String>,
}

impl FailoverIp {
    /// Parses `ADDR/PREFIX[,gw=IP][,dns=IP;IP]` for the NIC `mac`; the error is one line
    /// saying what is wrong.
    pub fn parse(mac: &str, text: &str) -> Result<Self, ValidationError> {
        let mut parts = text.split(',');
        let address = parts.next().unwrap_or_default().trim().to_owned();
        let mut ip = FailoverIp {
            mac: mac.to_owned(),
            address,
            gateway: None,
            dns: Vec::new(),
        };
        for part in parts {
            match part.split_once('=') {
                Some(("gw", gw)) => ip.gateway = Some(gw.trim().to_owned()),
                Some(("dns", dns)) => {
                    ip.dns = dns
                        .split(';')
                        .map(|d| d.trim().to_owned())
                        .filter(|d| !d.is_empty())
                        .collect()
                }
                _ => {
                    return Err(ValidationError::FailoverIp(format!(
                        "{part:?} is neither gw=IP nor dns=IP;IP"
                    )))
                }
            }
        }
        ip.check()?;
        Ok(ip)
    }

    /// Every address parses; the prefix fits the address family.
    pub fn check(&self) -> Result<(), ValidationError> {
        let bad = |what: String| Err(ValidationError::FailoverIp(what));
        let Some((addr, prefix)) = self.address.split_once('/') else {
            return bad(format!("{:?} is not ADDRESS/PREFIX", self.address));
        };
        let Ok(addr) = addr.parse::<std::net::IpAddr>() else {
            return bad(format!("{addr:?} is not an IP address"));
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if !prefix.parse::<u8>().is_ok_and(|p| (1..=max).contains(&p)) {
            return bad(format!("prefix {prefix:?} is not between 1 and {max}"));
        }
        for ip in self.gateway.iter().chain(&self.dns) {
            if ip.parse::<std::net::IpAddr>().is_err() {
                return bad(format!("{ip:?} is not an IP address"));
            }
        }
        Ok(())
    }
}

/// The virtual hardware platform.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Machine {
    /// i440FX + PIIX: the oldest, most compatible platform.
    #[default]
    Pc,
    /// Q35 + ICH9 with PCI Express; needed for Secure Boot.
    Q35,
}

/// The firmware a VM boots with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    /// SeaBIOS.
    #[default]
    Bios,
    /// OVMF (UEFI), with a per-VM NVRAM.
    Uefi,
}

/// The bus a disk is attached to in the guest (named as the CLI's `bus=` takes it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// One virtio-blk PCI device per disk (`vda`, `vdb`, …).
    #[default]
    VirtioBlk,
    /// A LUN on the VM's virtio-scsi controller (`sda`, …); supports discard and many disks.
    VirtioScsi,
}

/// What a disk is to the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskRole {
    /// A disk the guest sees.
    #[default]
    Data,
    /// The UEFI variable store (OVMF's second flash chip); not a guest disk.
    Nvram,
}

/// A device the firmware may boot from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootDevice {
    /// The CD drive.
    Cdrom,
    /// The first data disk.
    Disk,
    /// The first NIC (PXE).
    Network,
}

impl BootDevice {
    /// Parses `cdrom`, `disk` or `network`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cdrom" => Some(Self::Cdrom),
            "disk" => Some(Self::Disk),
            "network" | "net" => Some(Self::Network),
            _ => None,
        }
    }

    /// Its name as [`parse`](Self::parse) takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cdrom => "cdrom",
            Self::Disk => "disk",
            Self::Network => "network",
        }
    }
}

/// A VM's CD drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdromSpec {
    /// Absolute host path of the ISO in the drive; `None` = the drive is empty.
    pub iso: Option<String>,
}

/// One qcow2 disk, stored in the VM's own directory under the host's VM storage path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// File name inside the VM's directory (`disk0.qcow2`), never a path.
    pub file: String,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// The guest bus (absent: virtio-blk).
    #[serde(default)]
    pub bus: DiskBus,
    /// Data disk or UEFI NVRAM (absent: data).
    #[serde(default)]
    pub role: DiskRole,
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
    /// UEFI without exactly one NVRAM disk, or an NVRAM disk without UEFI.
    #[error("a UEFI VM has exactly one NVRAM disk and a BIOS VM none, got {0}")]
    Nvram(usize),
    /// Secure Boot without UEFI on q35.
    #[error("secure boot needs --firmware uefi and --machine q35")]
    SecureBoot,
    /// An ISO path that is not absolute or holds characters QEMU can't take.
    #[error("ISO path {0:?} must be absolute and contain no ','")]
    IsoPath(String),
    /// Booting from a device the VM does not have, or twice from one.
    #[error("boot order {0}: the VM has no such device or names it twice")]
    BootOrder(String),
    /// A failover IP setting that does not parse, or names no NIC of the VM.
    #[error("failover IP: {0}")]
    FailoverIp(String),
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
        let nvram = self
            .disks
            .iter()
            .filter(|d| d.role == DiskRole::Nvram)
            .count();
        if nvram != usize::from(self.firmware == Firmware::Uefi) {
            return Err(ValidationError::Nvram(nvram));
        }
        if self.secure_boot && (self.firmware != Firmware::Uefi || self.machine != Machine::Q35) {
            return Err(ValidationError::SecureBoot);
        }
        if let Some(iso) = self.cdrom.as_ref().and_then(|c| c.iso.as_ref()) {
            if check_boot_path("ISO", iso).is_err() {
                return Err(ValidationError::IsoPath(iso.clone()));
            }
        }
        for (i, dev) in self.boot_order.iter().enumerate() {
            let present = match dev {
                BootDevice::Cdrom => self.cdrom.is_some(),
                BootDevice::Disk => self.disks.iter().any(|d| d.role == DiskRole::Data),
                BootDevice::Network => !self.nics.is_empty(),
            };
            if !present || self.boot_order[..i].contains(dev) {
                return Err(ValidationError::BootOrder(dev.as_str().to_owned()));
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
        for (list, what) in [(&self.failover_ip, ""), (&self.test_failover_ip, "test ")] {
            for (i, ip) in list.iter().enumerate() {
                // Not tied to the VM's NICs here: a failover may leave a NIC out (no network
                // mapping on the replica site) and its setting then simply matches nothing;
                // `ferry vm set` resolves each setting to a NIC the VM has.
                ip.check()?;
                if !is_valid_mac(&ip.mac) {
                    return Err(ValidationError::FailoverIp(format!(
                        "{what}failover IP for {:?}, which is not a MAC address",
                        ip.mac
                    )));
                }
                if list[..i].iter().any(|o| o.mac == ip.mac) {
                    return Err(ValidationError::FailoverIp(format!(
                        "NIC {} has two {what}failover IPs",
                        ip.mac
                    )));
                }
            }
        }
        match &self.boot {
            // A CD drive is a boot device too (an installer ISO onto an empty disk).
            Boot::Disk
                if self.cdrom.is_none() && !self.disks.iter().any(|d| d.role == DiskRole::Data) =>
            {
                return Err(ValidationError::NoBootDisk)
            }
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
                bus: DiskBus::VirtioBlk,
                role: DiskRole::Data,
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
            machine: Machine::Pc,
            firmware: Firmware::Bios,
            secure_boot: false,
            cdrom: None,
            boot_order: vec![],
            rng: false,
            failover_ip: Vec::new(),
            test_failover_ip: Vec::new(),
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
            (|s| s.firmware = Firmware::Uefi, ValidationError::Nvram(0)),
            (
                |s| s.disks[0].role = DiskRole::Nvram,
                ValidationError::Nvram(1),
            ),
            (|s| s.secure_boot = true, ValidationError::SecureBoot),
            (
                |s| {
                    s.cdrom = Some(CdromSpec {
                        iso: Some("rel.iso".into()),
                    })
                },
                ValidationError::IsoPath("rel.iso".into()),
            ),
            (
                |s| s.boot_order = vec![BootDevice::Cdrom],
                ValidationError::BootOrder("cdrom".into()),
            ),
            (
                |s| s.boot_order = vec![BootDevice::Disk, BootDevice::Disk],
                ValidationError::BootOrder("disk".into()),
            ),
        ];
        for (mutate, want) in cases {
            let mut spec = base();
            mutate(&mut spec);
            assert_eq!(spec.validate().unwrap_err(), *want);
        }
    }

    #[test]
    fn uefi_q35_with_nvram_and_cdrom_is_valid() {
        let mut s = base();
        s.machine = Machine::Q35;
        s.firmware = Firmware::Uefi;
        s.secure_boot = true;
        s.disks.push(DiskSpec {
            file: "nvram.qcow2".into(),
            size_bytes: 540672,
            bus: DiskBus::VirtioBlk,
            role: DiskRole::Nvram,
        });
        s.cdrom = Some(CdromSpec {
            iso: Some("/isos/debian.iso".into()),
        });
        s.boot_order = vec![BootDevice::Cdrom, BootDevice::Disk, BootDevice::Network];
        s.validate().unwrap();
    }

    #[test]
    fn specs_stored_before_the_hardware_fields_read_as_pc_bios() {
        let old = r#"{"name":"vm1","cpus":1,"memory_mib":256,"disks":[{"file":"disk0.qcow2","size_bytes":1}],"boot":{"kind":"disk"},"nics":[]}"#;
        let spec: VmSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.machine, Machine::Pc);
        assert_eq!(spec.firmware, Firmware::Bios);
        assert_eq!(spec.disks[0].bus, DiskBus::VirtioBlk);
        assert_eq!(spec.disks[0].role, DiskRole::Data);
        assert!(spec.cdrom.is_none() && spec.boot_order.is_empty() && !spec.rng);
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = base();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn failover_ip_parses_or_says_why() {
        let ip = FailoverIp::parse(
            "52:54:00:12:34:56",
            "10.1.2.3/24,gw=10.1.2.1,dns=10.1.2.2;2001:db8::1",
        )
        .unwrap();
        assert_eq!(ip.address, "10.1.2.3/24");
        assert_eq!(ip.gateway.as_deref(), Some("10.1.2.1"));
        assert_eq!(ip.dns, ["10.1.2.2", "2001:db8::1"]);
        assert!(FailoverIp::parse("52:54:00:12:34:56", "2001:db8::5/64").is_ok());
        for (bad, why) in [
            ("10.1.2.3", "not ADDRESS/PREFIX"),
            ("10.1.2.300/24", "not an IP address"),
            ("10.1.2.3/33", "prefix"),
            ("10.1.2.3/24,gw=x", "not an IP address"),
            ("10.1.2.3/24,mtu=9000", "neither gw=IP nor dns=IP;IP"),
        ] {
            let e = FailoverIp::parse("52:54:00:12:34:56", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why) && !e.contains('\n'), "{bad}: {e}");
        }
        let mut s = base();
        s.failover_ip = vec![ip.clone(), ip];
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("two failover IPs"));
    }

    #[test]
    fn mac_helpers() {
        assert!(is_valid_mac(&mac_from_seed([1, 2, 255])));
        assert!(!is_valid_mac("52:54:00:12:34"));
        assert!(!is_valid_mac("52:54:00:12:34:zz"));
    }
}
