//! VM hardware a real OS needs, on real QEMU under TCG: a UEFI (OVMF) q35 VM boots a
//! GRUB rescue ISO from its CD drive (GRUB reports `$grub_platform` = efi on the serial
//! console), its NVRAM lives in the VM's directory and travels with a checkpoint export;
//! the disc is changed and ejected while the VM runs (QEMU's `query-block`, through
//! `ferry vm show`); the test guest boots under q35 with an RNG; a raw image used in place
//! replicates through its qcow2 metadata file, with the UEFI NVRAM, to a replica equal to
//! the raw image, and a test failover boots it through OVMF from the replicated NVRAM;
//! Secure Boot refuses the unsigned GRUB. Bad hardware input is refused with one line and
//! changes nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_testkit::guest::{parse_console, verify_prefix, GuestWorkload};
use ferry_testkit::host::Host;
use ferry_testkit::replication::{enable_replica_server, points, status, wait_for};
use serde_json::Value;

/// Builds a hybrid BIOS/EFI GRUB rescue ISO whose grub.cfg prints `FERRY-GRUB <label>
/// platform=<efi|pc>` on the serial console and then waits.
fn grub_iso(dir: &Path, label: &str) -> PathBuf {
    let root = dir.join(format!("iso-{label}"));
    std::fs::create_dir_all(root.join("boot/grub")).unwrap();
    std::fs::write(
        root.join("boot/grub/grub.cfg"),
        format!(
            "serial --unit=0 --speed=115200\nterminal_output --append serial\necho \"FERRY-GRUB {label} platform=$grub_platform\"\nsleep 3600\n"
        ),
    )
    .unwrap();
    let iso = dir.join(format!("{label}.iso"));
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&root)
        .args(["--fonts=", "--locales=", "--themes="])
        .output()
        .expect("grub-mkrescue is missing: run scripts/install-deps.sh (grub-pc-bin grub-efi-amd64-bin xorriso mtools)");
    assert!(
        out.status.success() && iso.is_file(),
        "grub-mkrescue failed (scripts/install-deps.sh installs grub-pc-bin grub-efi-amd64-bin xorriso mtools): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    iso
}

/// Everything a refused command could have changed: the inventory and the storage files.
fn fingerprint(host: &Host) -> (Value, Vec<String>) {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(format!(
                "{} {}",
                p.display(),
                e.metadata().map(|m| m.len()).unwrap_or(0)
            ));
            if p.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut files = Vec::new();
    walk(&host.vm_storage, &mut files);
    files.sort();
    let mut list = host.ferry_json(&["vm", "list"]);
    for vm in list.as_array_mut().expect("a list") {
        // A running VM's uptime moves on by itself.
        vm.as_object_mut().expect("a VM").remove("uptime_s");
    }
    (list, files)
}

/// A loop device over a file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn uefi_vm_boots_an_iso_and_its_cd_changes_while_it_runs() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let dir = a.dir.path();
    let iso1 = grub_iso(dir, "one");
    let iso2 = grub_iso(dir, "two");
    let garbage = dir.join("garbage.qcow2");
    std::fs::write(&garbage, vec![7u8; 65536]).unwrap();
    let base = dir.join("base.qcow2");
    let overlay = dir.join("overlay.qcow2");
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"])
        .status
        .success());
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&overlay)
    ])
    .status
    .success());

    // Bad input: one line each, nothing changed.
    let before = fingerprint(&a);
    let bad: &[(&[&str], &str)] = &[
        (
            &[
                "vm",
                "create",
                "v",
                "--disk",
                "16M",
                "--cdrom",
                "/tmp/nonexistent/x.iso",
            ],
            "ISO /tmp/nonexistent/x.iso cannot be read",
        ),
        (
            &[
                "vm",
                "create",
                "v",
                "--disk",
                "16M",
                "--firmware",
                "coreboot",
            ],
            "--firmware coreboot: use bios or uefi",
        ),
        (
            &["vm", "create", "v", "--disk", "16M", "--machine", "isapc"],
            "--machine isapc: use pc or q35",
        ),
        (
            &["vm", "create", "v", "--disk", "16M,bus=ide"],
            "unknown bus \"ide\"",
        ),
        (
            &["vm", "create", "v", "--disk", "16M", "--boot", "floppy"],
            "unknown device \"floppy\"",
        ),
        (
            &["vm", "create", "v", "--disk", "16M", "--boot", "cdrom"],
            "boot order cdrom: the VM has no such device",
        ),
        (
            &["vm", "create", "v", "--disk", s(&garbage)],
            "is unreadable as qcow2",
        ),
        (
            &["vm", "create", "v", "--disk", s(&overlay)],
            "has a backing file",
        ),
        (
            &["vm", "create", "v", "--disk", s(&iso1)],
            "cannot tell the format",
        ),
        (
            &["vm", "create", "v", "--disk", "16M", "--secure-boot"],
            "secure boot needs --firmware uefi and --machine q35",
        ),
    ];
    for (args, want) in bad {
        let err = a.ferry_err(args);
        assert!(err.contains(want), "ferry {args:?}: {err}");
        assert_eq!(fingerprint(&a), before, "ferry {args:?} changed something");
    }
    // OVMF missing on a host: refused by name, nothing made.
    let no_ovmf = Host::start(
        "n",
        "127.0.0.1",
        "accel = \"tcg\"\nfirmware_dir = \"/nonexistent-ovmf\"",
    );
    let err = no_ovmf.ferry_err(&["vm", "create", "v", "--disk", "16M", "--firmware", "uefi"]);
    assert!(
        err.contains("UEFI firmware /nonexistent-ovmf/OVMF_CODE_4M.fd not found")
            && err.contains("apt-get install ovmf"),
        "{err}"
    );
    assert!(no_ovmf
        .ferry_json(&["vm", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        std::fs::read_dir(&no_ovmf.vm_storage)
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    drop(no_ovmf);

    // A UEFI q35 VM with the ISO, a virtio-scsi disk and an RNG boots GRUB's EFI build.
    a.ferry_ok(&[
        "vm",
        "create",
        "efi",
        "--memory",
        "256M",
        "--machine",
        "q35",
        "--firmware",
        "uefi",
        "--disk",
        "32M,bus=virtio-scsi",
        "--cdrom",
        s(&iso1),
        "--boot",
        "cdrom,disk",
        "--rng",
    ]);
    let show = a.ferry_json(&["vm", "show", "efi"]);
    assert_eq!(show["machine"], "q35", "{show}");
    assert_eq!(show["firmware"], "uefi");
    assert_eq!(show["rng"], true);
    assert_eq!(show["boot_order"], serde_json::json!(["cdrom", "disk"]));
    assert_eq!(show["disks"][0]["bus"], "virtio-scsi");
    assert_eq!(show["disks"][1]["role"], "nvram");
    let nvram = PathBuf::from(show["disks"][1]["path"].as_str().unwrap());
    assert_eq!(nvram, a.vm_storage.join("efi").join("nvram.qcow2"));
    let info: Value = serde_json::from_slice(
        &qemu_img(&["info", "--output=json", "-f", "qcow2", s(&nvram)]).stdout,
    )
    .unwrap();
    assert_eq!(info["virtual-size"], 540672, "OVMF 4M variable store size");
    assert_eq!(show["cdrom"]["iso"], s(&iso1));

    a.ferry_ok(&["vm", "start", "efi"]);
    a.wait_console("efi", Duration::from_secs(120), "GRUB under OVMF", |c| {
        c.contains("FERRY-GRUB one platform=efi")
    });
    assert_eq!(
        a.ferry_json(&["vm", "show", "efi"])["cdrom"]["iso"],
        s(&iso1),
        "query-block shows the ISO"
    );

    // The disc changes and is ejected while the VM runs; `vm show` reads QEMU's query-block.
    a.ferry_ok(&["vm", "set", "efi", "--cdrom", s(&iso2)]);
    assert_eq!(
        a.ferry_json(&["vm", "show", "efi"])["cdrom"]["iso"],
        s(&iso2)
    );
    let before = fingerprint(&a);
    for (args, want) in [
        (
            vec!["vm", "set", "efi", "--cdrom", "/tmp/nonexistent/y.iso"],
            "ISO /tmp/nonexistent/y.iso cannot be read",
        ),
        (
            vec!["vm", "set", "efi", "--machine", "pc"],
            "change its machine type or RNG while it is off",
        ),
        (
            vec!["vm", "set", "efi", "--boot", "network"],
            "boot order network",
        ),
    ] {
        let err = a.ferry_err(&args);
        assert!(err.contains(want), "ferry {args:?}: {err}");
        assert_eq!(fingerprint(&a), before, "ferry {args:?} changed something");
        assert_eq!(
            a.ferry_json(&["vm", "show", "efi"])["cdrom"]["iso"],
            s(&iso2)
        );
    }
    a.ferry_ok(&["vm", "set", "efi", "--eject"]);
    let show = a.ferry_json(&["vm", "show", "efi"]);
    assert!(
        show["cdrom"].is_object() && show["cdrom"]["iso"].is_null(),
        "{show}"
    );
    let text = a.ferry_ok(&["vm", "show", "efi"]);
    assert!(
        text.contains("CD-ROM:   (empty)") && text.contains("UEFI NVRAM"),
        "{text}"
    );
    a.ferry_ok(&["vm", "set", "efi", "--cdrom", s(&iso1)]);
    assert_eq!(
        a.ferry_json(&["vm", "show", "efi"])["cdrom"]["iso"],
        s(&iso1)
    );
    // A standard checkpoint (memory too) saves the NVRAM with the disks: QEMU's savevm
    // takes the qcow2 flash node, where a raw flash file would make it fail.
    a.ferry_ok(&["checkpoint", "create", "efi", "running", "--standard"]);
    a.ferry_ok(&["vm", "stop", "efi"]);
    let snaps = qemu_img(&["snapshot", "-l", s(&nvram)]);
    assert!(
        String::from_utf8_lossy(&snaps.stdout).contains("ferry-cp-"),
        "the NVRAM holds the checkpoint's snapshot: {}",
        String::from_utf8_lossy(&snaps.stdout)
    );

    // OVMF wrote its boot entries into the VM's own NVRAM, not into the template.
    let same = qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&nvram),
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ]);
    assert_eq!(same.status.code(), Some(1), "the NVRAM was written by OVMF");

    // Secure Boot (q35 + SMM, Microsoft's keys enrolled) refuses the unsigned GRUB.
    a.ferry_ok(&[
        "vm",
        "create",
        "sb",
        "--memory",
        "256M",
        "--machine",
        "q35",
        "--firmware",
        "uefi",
        "--secure-boot",
        "--cdrom",
        s(&iso1),
    ]);
    assert_eq!(a.ferry_json(&["vm", "show", "sb"])["secure_boot"], true);
    a.ferry_ok(&["vm", "start", "sb"]);
    let console = a.wait_console("sb", Duration::from_secs(120), "OVMF's refusal", |c| {
        c.contains("Access Denied")
    });
    assert!(!console.contains("FERRY-GRUB"), "{console}");
    a.ferry_ok(&["vm", "stop", "sb"]);

    // The NVRAM travels with a checkpoint export and import.
    a.ferry_ok(&["checkpoint", "create", "efi", "cp1"]);
    let export = dir.join("export");
    a.ferry_ok(&["checkpoint", "export", "efi", "cp1", s(&export)]);
    a.ferry_ok(&["vm", "import", s(&export), "--name", "efi-copy"]);
    let copy = a.ferry_json(&["vm", "show", "efi-copy"]);
    assert_eq!(copy["firmware"], "uefi", "{copy}");
    assert_eq!(copy["machine"], "q35");
    assert_eq!(copy["disks"][0]["bus"], "virtio-scsi");
    assert_eq!(copy["disks"][1]["role"], "nvram");
    assert!(
        copy["cdrom"]["iso"].is_null(),
        "an imported VM's drive starts empty"
    );
    let copied = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        copy["disks"][1]["path"].as_str().unwrap(),
        s(&nvram),
    ]);
    assert!(
        copied.status.success(),
        "the imported NVRAM equals the exported one"
    );

    // Applying the standard checkpoint restores the running VM with its NVRAM (loadvm).
    a.ferry_ok(&["checkpoint", "apply", "efi", "running"]);
    assert_eq!(a.vm_state("efi"), "running");
    a.ferry_ok(&["vm", "stop", "efi"]);

    // Hardware of a VM that is off changes through `vm set`: a CD drive is added.
    a.ferry_ok(&["vm", "create", "plain", "--memory", "64M", "--disk", "16M"]);
    a.ferry_ok(&[
        "vm",
        "set",
        "plain",
        "--cdrom",
        s(&iso2),
        "--boot",
        "cdrom,disk",
        "--rng",
        "on",
        "--machine",
        "q35",
    ]);
    let plain = a.ferry_json(&["vm", "show", "plain"]);
    assert_eq!(plain["cdrom"]["iso"], s(&iso2), "{plain}");
    assert_eq!(plain["boot_order"], serde_json::json!(["cdrom", "disk"]));
    assert_eq!(
        (plain["rng"].clone(), plain["machine"].clone()),
        (true.into(), "q35".into())
    );

    // A block device is used in place like a raw file, by one VM only, and outlives it.
    let lun = dir.join("lun.img");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&lun, &data).unwrap();
    let dev = LoopDevice::attach(&lun);
    a.ferry_ok(&["vm", "create", "blk", "--memory", "64M", "--disk", &dev.0]);
    let blk = a.ferry_json(&["vm", "show", "blk"]);
    assert_eq!(blk["disks"][0]["data_file"], dev.0.as_str(), "{blk}");
    assert_eq!(blk["disks"][0]["size_bytes"], 8u64 << 20);
    let same = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        blk["disks"][0]["path"].as_str().unwrap(),
        s(&lun),
    ]);
    assert!(same.status.success(), "the metadata file reads the device");
    let before = fingerprint(&a);
    let err = a.ferry_err(&["vm", "create", "blk2", "--disk", &dev.0]);
    assert!(err.contains("is already used by VM blk"), "{err}");
    assert_eq!(fingerprint(&a), before);
    a.ferry_ok(&["vm", "delete", "blk"]);
    assert_eq!(
        std::fs::read(&lun).unwrap(),
        data,
        "the device's data is kept"
    );
}

#[test]
fn test_guest_runs_on_q35_and_a_raw_disk_with_uefi_nvram_replicates() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    let raw = a.dir.path().join("data.raw");
    std::fs::write(&raw, vec![0u8; 32 << 20]).unwrap();
    let workload = GuestWorkload {
        seed: 77,
        start: 1,
        span_blocks: 2048,
    };
    // The raw image is used in place through a qcow2 metadata file with a data file; the
    // guest boots its kernel through OVMF on q35.
    a.create_guest_vm(
        "rawvm",
        workload,
        0.1,
        &[
            "--memory",
            "256M",
            "--machine",
            "q35",
            "--firmware",
            "uefi",
            "--rng",
            "--nic",
            "user",
            "--disk",
            s(&raw),
        ],
    );
    let show = a.ferry_json(&["vm", "show", "rawvm"]);
    assert_eq!(show["disks"][0]["data_file"], s(&raw), "{show}");
    assert_eq!(
        show["disks"][0]["path"],
        s(&a.vm_storage.join("rawvm").join("disk0.qcow2"))
    );
    // The same raw image for another VM is refused (also through another path to it).
    let link = a.dir.path().join("link.raw");
    std::os::unix::fs::symlink(&raw, &link).unwrap();
    let before = fingerprint(&a);
    let err = a.ferry_err(&["vm", "create", "other", "--disk", s(&link)]);
    assert!(
        err.contains(&format!(
            "raw disk {} is already used by VM rawvm",
            raw.display()
        )),
        "{err}"
    );
    assert_eq!(fingerprint(&a), before);
    let err = a.ferry_err(&["checkpoint", "create", "rawvm"]);
    assert!(err.contains("checkpoints need qcow2 disks"), "{err}");
    assert_eq!(fingerprint(&a), before);

    a.ferry_ok(&["vm", "start", "rawvm"]);
    a.wait_console("rawvm", Duration::from_secs(120), "guest writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 3
    });
    a.ferry_ok(&[
        "replication",
        "enable",
        "rawvm",
        "--to",
        s(&b.socket),
        "--interval",
        "5s",
        "--wait",
    ]);
    // The replica keeps the hardware it got: changing it on the primary alone is refused.
    let err = a.ferry_err(&["vm", "set", "rawvm", "--machine", "pc"]);
    assert!(err.contains("is replicated"), "{err}");
    let err = b.ferry_err(&["vm", "set", "rawvm", "--boot", "disk"]);
    assert!(err.contains("is a replica"), "{err}");
    // Delta cycles while the guest writes, tracked by the metadata file's dirty bitmap.
    let first = status(&a, "rawvm")["last_cycle"].as_i64().unwrap();
    wait_for("two delta cycles", Duration::from_secs(90), || {
        status(&a, "rawvm")["last_cycle"].as_i64().unwrap() >= first + 2
    });
    a.ferry_ok(&["vm", "stop", "rawvm"]);
    let cycle = status(&a, "rawvm")["last_cycle"].as_i64().unwrap();
    a.ferry_ok(&["replication", "now", "rawvm"]);
    wait_for("the final cycle", Duration::from_secs(60), || {
        status(&a, "rawvm")["last_cycle"].as_i64().unwrap() > cycle
    });
    a.ferry_ok(&["replication", "suspend", "rawvm"]);
    wait_for(
        "the cycle in flight to end",
        Duration::from_secs(60),
        || status(&a, "rawvm")["progress"].is_null(),
    );
    std::thread::sleep(Duration::from_secs(2));

    // The newest point equals the raw image itself, and the NVRAM was replicated too.
    let newest = points(&b, "rawvm")
        .last()
        .cloned()
        .expect("a recovery point");
    let layer = |disk: u64| -> String {
        newest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l[0].as_u64() == Some(disk))
            .unwrap_or_else(|| panic!("no layer for disk {disk}: {newest}"))[1]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // Both replicated disks are their source's exact copy: the raw data disk and the NVRAM.
    let nvram = a.vm_storage.join("rawvm").join("nvram.qcow2");
    for (disk, source, format, what) in [
        (0, &raw, "raw", "the raw image"),
        (1, &nvram, "qcow2", "the NVRAM"),
    ] {
        let out = qemu_img(&[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            format,
            &layer(disk),
            s(source),
        ]);
        assert!(
            out.status.success(),
            "the replica differs from {what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let data = std::fs::read(&raw).unwrap();
    let v = verify_prefix(&data, workload.seed, workload.span_blocks)
        .unwrap_or_else(|e| panic!("the raw image holds the guest's writes: {e}"));
    assert!(v.last_seq >= 3, "{v:?}");
    let replica = b.ferry_json(&["vm", "show", "rawvm"]);
    assert_eq!(replica["firmware"], "uefi", "{replica}");
    assert_eq!(replica["disks"][1]["role"], "nvram");

    // A test failover boots the replica through OVMF from the replicated NVRAM.
    b.ferry_ok(&["failover", "test", "rawvm"]);
    let t = b.ferry_json(&["vm", "show", "rawvm-test"]);
    assert_eq!(t["state"], "running", "{t}");
    assert_eq!(t["firmware"], "uefi");
    assert_eq!(t["machine"], "q35");
    assert_eq!(t["disks"][1]["role"], "nvram");
    b.wait_console(
        "rawvm-test",
        Duration::from_secs(120),
        "the test VM's writes",
        |c| parse_console(c).last_wrote_seq.unwrap_or(0) >= 1,
    );
    b.ferry_ok(&["failover", "stop-test", "rawvm"]);
}
