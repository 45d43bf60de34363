//! The VM hardware beyond CPUs, memory and NICs: machine type, firmware (OVMF with a
//! per-VM NVRAM on the second flash chip), disk buses, the CD drive, boot order and the
//! RNG. Kept apart from the fixed parts of the command line in [`crate::process`].
//!
//! The NVRAM is one of the VM's qcow2 disks (block node `drive{i}` like the others) but is
//! attached as `pflash1` instead of as a guest disk: QEMU's pflash takes any block node of
//! the flash chip's size, and being a qcow2 node it gets dirty bitmaps, internal snapshots
//! and exports like every disk, so replication, checkpoints and failover carry the UEFI
//! variables (boot entries, Secure Boot keys) without code of their own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use ferry_domain::{BootDevice, DiskBus, Machine};

use serde_json::json;

use crate::process::disk_node;
use crate::qmp::{Qmp, QmpError};

/// Device id of the CD drive; QMP's `blockdev-change-medium`, `blockdev-open-tray` and
/// `blockdev-remove-medium` address it by this id.
pub const CDROM_ID: &str = "cdrom0";

/// OVMF firmware settings of a UEFI VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uefi {
    /// The read-only firmware code (`OVMF_CODE_4M.fd` or its `.secboot` build).
    pub code: PathBuf,
    /// Index of the disk that holds the VM's NVRAM (its variable store).
    pub nvram_disk: usize,
    /// Secure Boot: the `.secboot` code needs SMM and a flash only SMM code may write.
    pub secure_boot: bool,
}

/// The hardware part of a VM's command line. The default is what every VM had before
/// these options existed: `pc`, SeaBIOS, virtio-blk disks, no CD drive, no RNG.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hardware {
    /// The machine type.
    pub machine: Machine,
    /// UEFI firmware; `None` = SeaBIOS.
    pub uefi: Option<Uefi>,
    /// Bus of each disk, by index; a disk beyond the end is virtio-blk.
    pub disk_buses: Vec<DiskBus>,
    /// The CD drive, if any: `Some(None)` is an empty drive.
    pub cdrom: Option<Option<PathBuf>>,
    /// Firmware boot order; empty = QEMU's `-boot c`.
    pub boot_order: Vec<BootDevice>,
    /// A virtio-rng device fed from the host's `/dev/urandom`.
    pub rng: bool,
}

impl Hardware {
    /// The `-machine` value. The pflash units name block nodes defined by
    /// [`firmware_args`](Self::firmware_args) and the disk loop.
    pub fn machine_arg(&self) -> String {
        let mut m = match self.machine {
            Machine::Pc => "pc".to_owned(),
            Machine::Q35 => "q35".to_owned(),
        };
        if let Some(uefi) = &self.uefi {
            m.push_str(&format!(
                ",pflash0=fw-code,pflash1={}",
                disk_node(uefi.nvram_disk)
            ));
            if uefi.secure_boot {
                m.push_str(",smm=on");
            }
        }
        m
    }

    /// Firmware code block nodes (read-only raw) and, for Secure Boot, the flash lock.
    pub fn firmware_args(&self) -> Vec<OsString> {
        let Some(uefi) = &self.uefi else {
            return Vec::new();
        };
        let mut a: Vec<OsString> = vec![
            "-blockdev".into(),
            path_opt(
                "driver=file,node-name=fw-code-file,filename=",
                &uefi.code,
                ",read-only=on",
            ),
            "-blockdev".into(),
            "driver=raw,node-name=fw-code,file=fw-code-file,read-only=on".into(),
        ];
        if uefi.secure_boot {
            a.push("-global".into());
            a.push("driver=cfi.pflash01,property=secure,value=on".into());
        }
        a
    }

    /// Whether disk `i` is the NVRAM (attached as flash, not as a guest disk).
    pub fn is_nvram(&self, i: usize) -> bool {
        self.uefi.as_ref().is_some_and(|u| u.nvram_disk == i)
    }

    fn bus(&self, i: usize) -> DiskBus {
        self.disk_buses.get(i).copied().unwrap_or_default()
    }

    /// The `bootindex` property for a device, when the boot order names it.
    fn bootindex(&self, dev: BootDevice) -> String {
        self.boot_order
            .iter()
            .position(|d| *d == dev)
            .map(|p| format!(",bootindex={}", p + 1))
            .unwrap_or_default()
    }

    /// The guest device of every data disk (the block nodes are defined by the caller):
    /// virtio-blk PCI devices, or LUNs on one virtio-scsi controller.
    pub fn disk_device_args(&self, disks: usize) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let first_data = (0..disks).find(|&i| !self.is_nvram(i));
        if (0..disks).any(|i| !self.is_nvram(i) && self.bus(i) == DiskBus::VirtioScsi) {
            a.push("-device".into());
            a.push("virtio-scsi-pci,id=scsi0".into());
        }
        for i in 0..disks {
            if self.is_nvram(i) {
                continue;
            }
            let boot = if Some(i) == first_data {
                self.bootindex(BootDevice::Disk)
            } else {
                String::new()
            };
            let dev = match self.bus(i) {
                DiskBus::VirtioBlk => {
                    format!("virtio-blk-pci,drive={},id=vblk{i}{boot}", disk_node(i))
                }
                DiskBus::VirtioScsi => {
                    format!("scsi-hd,bus=scsi0.0,drive={},id=sd{i}{boot}", disk_node(i))
                }
            };
            a.push("-device".into());
            a.push(dev.into());
        }
        a
    }

    /// The `bootindex` suffix of NIC `j`'s device (PXE boot from the first NIC).
    pub fn nic_suffix(&self, j: usize) -> String {
        if j == 0 {
            self.bootindex(BootDevice::Network)
        } else {
            String::new()
        }
    }

    /// The CD drive (an IDE/AHCI CD-ROM, which every firmware and installer can boot
    /// from without drivers) and the RNG. The ISO is opened as raw, never probed.
    pub fn device_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Some(iso) = &self.cdrom {
            let boot = self.bootindex(BootDevice::Cdrom);
            match iso {
                Some(iso) => {
                    a.push("-blockdev".into());
                    a.push(path_opt(
                        "driver=file,node-name=cdrom-file,filename=",
                        iso,
                        ",read-only=on",
                    ));
                    a.push("-blockdev".into());
                    a.push("driver=raw,node-name=cdrom-media,file=cdrom-file,read-only=on".into());
                    a.push("-device".into());
                    a.push(format!("ide-cd,id={CDROM_ID},drive=cdrom-media{boot}").into());
                }
                None => {
                    a.push("-device".into());
                    a.push(format!("ide-cd,id={CDROM_ID}{boot}").into());
                }
            }
        }
        if self.rng {
            a.push("-object".into());
            a.push("rng-random,id=rng0,filename=/dev/urandom".into());
            a.push("-device".into());
            a.push("virtio-rng-pci,rng=rng0".into());
        }
        a
    }

    /// Paths this hardware puts into QEMU option strings, for validation.
    pub fn paths(&self) -> Vec<(String, &Path)> {
        let mut p = Vec::new();
        if let Some(uefi) = &self.uefi {
            p.push(("firmware code".to_owned(), uefi.code.as_path()));
        }
        if let Some(Some(iso)) = &self.cdrom {
            p.push(("ISO".to_owned(), iso.as_path()));
        }
        p
    }
}

/// Puts `iso` into the running VM's CD drive (replacing what is there), opened read-only
/// as raw: `blockdev-change-medium` opens the tray, swaps the medium and closes it, so the
/// guest sees a media change.
pub async fn change_cdrom(qmp: &Qmp, iso: &Path) -> Result<(), QmpError> {
    qmp.execute_raw(
        "blockdev-change-medium",
        Some(json!({
            "id": CDROM_ID,
            "filename": iso,
            "format": "raw",
            "read-only-mode": "read-only",
        })),
    )
    .await?;
    Ok(())
}

/// Empties the running VM's CD drive: the tray is opened (forced, as a guest that mounted
/// the disc locks it), the medium removed, and the tray closed again.
pub async fn eject_cdrom(qmp: &Qmp) -> Result<(), QmpError> {
    qmp.execute_raw(
        "blockdev-open-tray",
        Some(json!({"id": CDROM_ID, "force": true})),
    )
    .await?;
    qmp.execute_raw("blockdev-remove-medium", Some(json!({"id": CDROM_ID})))
        .await?;
    qmp.execute_raw("blockdev-close-tray", Some(json!({"id": CDROM_ID})))
        .await?;
    Ok(())
}

/// What QEMU says is in the CD drive: `Ok(None)` for an empty drive, the image's file name
/// otherwise (from `query-block`).
pub async fn cdrom_medium(qmp: &Qmp) -> Result<Option<String>, QmpError> {
    let blocks = qmp.execute_raw("query-block", None).await?;
    Ok(blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| {
            b["qdev"]
                .as_str()
                .is_some_and(|q| q == CDROM_ID || q.ends_with(&format!("/{CDROM_ID}")))
        })
        .and_then(|b| b["inserted"]["file"].as_str().map(str::to_owned)))
}

/// `prefix + path + suffix` without a lossy UTF-8 conversion of the path.
fn path_opt(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path);
    s.push(suffix);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn default_is_the_old_hardware() {
        let hw = Hardware::default();
        assert_eq!(hw.machine_arg(), "pc");
        assert!(hw.firmware_args().is_empty());
        assert!(hw.device_args().is_empty());
        assert_eq!(
            strs(hw.disk_device_args(1)),
            ["-device", "virtio-blk-pci,drive=drive0,id=vblk0"]
        );
        assert_eq!(hw.nic_suffix(0), "");
    }

    #[test]
    fn uefi_secure_boot_q35_scsi_cdrom_boot_order() {
        let hw = Hardware {
            machine: Machine::Q35,
            uefi: Some(Uefi {
                code: "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd".into(),
                nvram_disk: 2,
                secure_boot: true,
            }),
            disk_buses: vec![DiskBus::VirtioScsi, DiskBus::VirtioBlk],
            cdrom: Some(Some("/isos/x.iso".into())),
            boot_order: vec![BootDevice::Cdrom, BootDevice::Disk, BootDevice::Network],
            rng: true,
        };
        assert_eq!(
            hw.machine_arg(),
            "q35,pflash0=fw-code,pflash1=drive2,smm=on"
        );
        assert_eq!(
            strs(hw.firmware_args()),
            [
                "-blockdev",
                "driver=file,node-name=fw-code-file,filename=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd,read-only=on",
                "-blockdev",
                "driver=raw,node-name=fw-code,file=fw-code-file,read-only=on",
                "-global",
                "driver=cfi.pflash01,property=secure,value=on",
            ]
        );
        // The NVRAM (disk 2) gets no guest device.
        assert_eq!(
            strs(hw.disk_device_args(3)),
            [
                "-device",
                "virtio-scsi-pci,id=scsi0",
                "-device",
                "scsi-hd,bus=scsi0.0,drive=drive0,id=sd0,bootindex=2",
                "-device",
                "virtio-blk-pci,drive=drive1,id=vblk1",
            ]
        );
        assert_eq!(hw.nic_suffix(0), ",bootindex=3");
        assert_eq!(hw.nic_suffix(1), "");
        assert_eq!(
            strs(hw.device_args()),
            [
                "-blockdev",
                "driver=file,node-name=cdrom-file,filename=/isos/x.iso,read-only=on",
                "-blockdev",
                "driver=raw,node-name=cdrom-media,file=cdrom-file,read-only=on",
                "-device",
                "ide-cd,id=cdrom0,drive=cdrom-media,bootindex=1",
                "-object",
                "rng-random,id=rng0,filename=/dev/urandom",
                "-device",
                "virtio-rng-pci,rng=rng0",
            ]
        );
    }

    #[test]
    fn empty_cd_drive() {
        let hw = Hardware {
            cdrom: Some(None),
            ..Default::default()
        };
        assert_eq!(strs(hw.device_args()), ["-device", "ide-cd,id=cdrom0"]);
    }
}
