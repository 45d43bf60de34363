//! The real Debian guest (guest/debian/), end to end under TCG with UEFI: its ISO installs
//! it onto an empty virtio disk and powers off; the disk then boots by itself (OVMF, grub at
//! the removable EFI path) to multi-user with qemu-guest-agent answering, and after a clean
//! shutdown its root filesystem checks clean. QEMU is driven directly for now; see
//! ferry_testkit::debian.

use std::time::{Duration, Instant};

use ferry_testkit::debian::{
    debian_image, fresh_vars, fsck_root, install, tail, Qga, RawVm, RawVmConfig, INSTALL_DISK_BYTES,
};

#[test]
fn debian_iso_installs_and_boots_from_disk_with_uefi() {
    let image = debian_image();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(INSTALL_DISK_BYTES))
        .expect("create the disk");
    let vars = dir.path().join("OVMF_VARS.fd");
    fresh_vars(&vars).expect("OVMF vars");
    let install_log = dir.path().join("install.log");

    // 1. The ISO boots (UEFI, empty disk), installs and powers off.
    let install_s = install(&image.iso, &disk, &vars, &install_log)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .as_secs();
    let log =
        String::from_utf8_lossy(&std::fs::read(&install_log).expect("install log")).into_owned();
    assert!(
        log.contains("FERRY-INSTALL: NVRAM boot entry written"),
        "the installer wrote no NVRAM boot entry; console:\n{}",
        tail(&log, 30)
    );
    // Later tests that need an installed guest start from this disk instead of installing.
    image
        .cache_installed_disk(&disk)
        .unwrap_or_else(|e| panic!("{e:#}"));

    // 2. The ISO ejected, and an empty NVRAM (as a VM whose vars file was lost): the disk
    // boots by itself through grub's removable-media path, to the guest agent.
    fresh_vars(&vars).expect("OVMF vars");
    let agent_socket = dir.path().join("qga.sock");
    let cfg = RawVmConfig {
        disk: disk.clone(),
        disk_format: "raw",
        cdrom: None,
        vars,
        agent_socket: Some(agent_socket.clone()),
        console_log: dir.path().join("boot.log"),
        memory_mib: 1024,
    };
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
    // The test workload: ferry-writer commits numbered rows to SQLite.
    let start = exec(&mut agent, "/usr/bin/systemctl", &["start", "ferry-writer"]);
    assert_eq!(
        start.exit_code, 0,
        "systemctl start ferry-writer: {}",
        start.stderr
    );
    // Its rows must be 1..N without a gap; wait (TCG is slow to start processes) for N >= 2.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = exec(
            &mut agent,
            "/usr/bin/sqlite3",
            &[
                "/var/lib/ferry-writer/rows.db",
                "SELECT COUNT(*), COALESCE(MAX(n), 0) FROM rows",
            ],
        );
        let (count, max) = rows.stdout.trim().split_once('|').unwrap_or(("?", "?"));
        assert_eq!(count, max, "ferry-writer's rows have a gap: {rows:?}");
        if max.parse::<u64>().is_ok_and(|n| n >= 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ferry-writer wrote {max} rows in 90 s: {rows:?}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }

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
