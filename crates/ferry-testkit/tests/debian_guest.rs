//! The real Debian guest (guest/debian/), end to end under TCG with UEFI: its ISO installs
//! it onto an empty virtio disk and powers off; the disk then boots by itself (OVMF, grub at
//! the removable EFI path) to multi-user with qemu-guest-agent answering, and after a clean
//! shutdown its root filesystem checks clean. QEMU is driven directly for now; see
//! ferry_testkit::debian.

use std::time::{Duration, Instant};

use ferry_testkit::debian::{debian_image, fsck_root, ovmf, tail, Qga, RawVm, RawVmConfig};

#[test]
fn debian_iso_installs_and_boots_from_disk_with_uefi() {
    let image = debian_image();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(4 << 30))
        .expect("create the 4 GiB disk");
    let vars = dir.path().join("OVMF_VARS.fd");
    std::fs::copy(ovmf().vars_template, &vars).expect("copy the OVMF vars");
    let agent_socket = dir.path().join("qga.sock");
    let mut cfg = RawVmConfig {
        disk: disk.clone(),
        cdrom: Some(image.iso.clone()),
        vars,
        agent_socket: None,
        console_log: dir.path().join("install.log"),
        memory_mib: 1024,
    };

    // 1. The ISO boots (UEFI, empty disk), installs and powers off.
    let t = Instant::now();
    let mut vm = RawVm::start(&cfg).expect("start the installer VM");
    let finished = vm.wait_exit(Duration::from_secs(480));
    let console = vm.console();
    assert!(
        finished.is_ok() && console.contains("FERRY-INSTALL: DONE"),
        "install did not finish ({finished:?}); console:\n{}",
        tail(&console, 40)
    );
    let install_s = t.elapsed().as_secs();
    drop(vm);

    // 2. The ISO ejected: the disk boots by itself, to the guest agent.
    cfg.cdrom = None;
    cfg.agent_socket = Some(agent_socket.clone());
    cfg.console_log = dir.path().join("boot.log");
    let t = Instant::now();
    let mut vm = RawVm::start(&cfg).expect("start the installed VM");
    let mut agent = match Qga::connect(&agent_socket, Duration::from_secs(300)) {
        Ok(a) => a,
        Err(e) => panic!("{e:#}; console:\n{}", tail(&vm.console(), 40)),
    };
    agent.ping().expect("guest-ping");
    let agent_s = t.elapsed().as_secs();

    let exec = |agent: &mut Qga, path: &str, args: &[&str]| {
        agent
            .exec(path, args, Duration::from_secs(240))
            .unwrap_or_else(|e| panic!("{path} {args:?} through the guest agent: {e:#}"))
    };
    let state = exec(
        &mut agent,
        "/usr/bin/systemctl",
        &["is-system-running", "--wait"],
    );
    let running_s = t.elapsed().as_secs();
    if state.stdout.trim() != "running" {
        let failed = exec(
            &mut agent,
            "/usr/bin/systemctl",
            &["--failed", "--no-legend", "--plain"],
        );
        panic!(
            "the installed guest is {:?}, not running; failed units:\n{}",
            state.stdout.trim(),
            failed.stdout
        );
    }
    // Booted with UEFI, from the disk's root partition, mounted by the UUID in its fstab.
    let efi = exec(&mut agent, "/usr/bin/test", &["-d", "/sys/firmware/efi"]);
    assert_eq!(efi.exit_code, 0, "the guest did not boot with UEFI");
    let root = exec(
        &mut agent,
        "/usr/bin/findmnt",
        &["-n", "-o", "SOURCE,FSTYPE,UUID", "/"],
    );
    let fields: Vec<&str> = root.stdout.split_whitespace().collect();
    assert_eq!(
        fields.get(..2),
        Some(&["/dev/vda2", "ext4"][..]),
        "root is {:?}",
        root.stdout
    );
    let fstab = exec(&mut agent, "/usr/bin/cat", &["/etc/fstab"]);
    assert!(
        fstab.stdout.contains(&format!("UUID={}", fields[2])),
        "fstab does not name the root by UUID {}:\n{}",
        fields[2],
        fstab.stdout
    );
    let qga = exec(
        &mut agent,
        "/usr/bin/systemctl",
        &["is-active", "qemu-guest-agent"],
    );
    assert_eq!(qga.stdout.trim(), "active");

    // 3. A clean shutdown through the agent; the root filesystem then checks clean.
    agent.shutdown().expect("guest-shutdown");
    if let Err(e) = vm.wait_exit(Duration::from_secs(120)) {
        panic!("{e:#}; console:\n{}", tail(&vm.console(), 30));
    }
    let fsck = fsck_root(&disk).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "debian guest: install {install_s} s, boot to agent {agent_s} s, to running {running_s} s\n{}",
        tail(&fsck, 1)
    );
}
