//! A real guest under QEMU (TCG), driven through the `ferry` CLI against a real ferryd:
//! its writes reach the qcow2 (read back and verified), shutdown/stop/pause/resume do what
//! they say, and the serial console works both as a log and attached live.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::bin_dir;
use ferry_testkit::guest::{parse_console, verify_prefix, GuestWorkload, BLOCK_SIZE};
use ferry_testkit::host::{pid_alive, Host};

const SPAN: u64 = 2048;

fn create_guest_vm(host: &Host, vm: &str) {
    host.create_guest_vm(
        vm,
        GuestWorkload {
            seed: 777,
            start: 1,
            span_blocks: SPAN,
        },
        0.1,
        &[
            "--cpus", "1", "--memory", "256M", "--disk", "32M", "--nic", "user",
        ],
    );
}

fn last_seq(host: &Host, vm: &str) -> u64 {
    parse_console(&host.console(vm)).last_wrote_seq.unwrap_or(0)
}

fn disk_image(host: &Host, vm: &str) -> Vec<u8> {
    let info = host.ferry_json(&["vm", "show", vm]);
    let qcow2 = info["disks"][0]["path"].as_str().unwrap().to_owned();
    let raw = host.dir.path().join("readback.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw", &qcow2])
        .arg(&raw)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(raw).unwrap()
}

#[test]
fn guest_writes_reach_the_disk_and_lifecycle_operations_work() {
    let host = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    create_guest_vm(&host, "web 1");
    assert_eq!(host.vm_state("web 1"), "off");

    // start: running, with a live pid and the guest writing.
    host.ferry_ok(&["vm", "start", "web 1"]);
    let info = host.ferry_json(&["vm", "show", "web 1"]);
    assert_eq!(info["state"], "running");
    let pid = info["pid"].as_u64().unwrap() as u32;
    assert!(pid_alive(pid));
    assert_eq!(info["nics"][0]["kind"], "user");
    host.wait_console("web 1", Duration::from_secs(60), "10 writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 10
    });
    let list = host.ferry_ok(&["vm", "list"]);
    assert!(list.contains("web 1") && list.contains("running"), "{list}");

    // The console attached live sees new output as it is printed.
    let mut console = Command::new(bin_dir().join("ferry"))
        .args(["vm", "console", "web 1"])
        .env("FERRY_SOCKET", &host.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let before = last_seq(&host, "web 1");
    let mut reader = BufReader::new(console.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut live_seq = 0;
    let mut line = String::new();
    while live_seq <= before {
        assert!(Instant::now() < deadline, "no live console output");
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("console closed");
        }
        live_seq = parse_console(&line).last_wrote_seq.unwrap_or(0);
    }
    let _ = console.kill();
    let _ = console.wait();

    // pause: the vCPUs stop, so the write sequence stops.
    host.ferry_ok(&["vm", "pause", "web 1"]);
    assert_eq!(host.vm_state("web 1"), "paused");
    let paused_at = last_seq(&host, "web 1");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        last_seq(&host, "web 1"),
        paused_at,
        "guest wrote while paused"
    );
    let err = host.ferry_err(&["vm", "shutdown", "web 1"]);
    assert!(err.contains("paused"), "{err}");

    // resume: writes continue.
    host.ferry_ok(&["vm", "resume", "web 1"]);
    assert_eq!(host.vm_state("web 1"), "running");
    host.wait_console(
        "web 1",
        Duration::from_secs(20),
        "writes after resume",
        |c| parse_console(c).last_wrote_seq.unwrap_or(0) > paused_at + 3,
    );

    // shutdown (ACPI): the guest powers itself off, ferry reports it and the process ends.
    let out = host.ferry_ok(&["vm", "shutdown", "web 1", "--timeout", "30"]);
    assert!(out.contains("shut down by the guest"), "{out}");
    assert_eq!(host.vm_state("web 1"), "off");
    assert!(!pid_alive(pid), "QEMU still alive after shutdown");
    let report = parse_console(&host.console("web 1"));
    assert!(report.powerdown, "guest did not see the power button");
    let shown = report.last_wrote_seq.unwrap();

    // The qcow2 holds exactly writes 1..=N, N being the last write the guest announced.
    let disk = disk_image(&host, "web 1");
    let v = verify_prefix(&disk, 777, SPAN).unwrap();
    assert_eq!(
        v.last_seq, shown,
        "disk holds writes up to {}, console said {shown}",
        v.last_seq
    );
    assert_eq!(disk.len(), 32 << 20);
    assert!(v.blocks_checked >= SPAN);
    let _ = BLOCK_SIZE;

    // start again, then stop (hard power-off): off at once, and the disk is still a
    // consistent prefix of the (same, replayed) write sequence.
    host.ferry_ok(&["vm", "start", "web 1"]);
    let pid2 = host.ferry_json(&["vm", "show", "web 1"])["pid"]
        .as_u64()
        .unwrap() as u32;
    assert_ne!(pid, pid2);
    host.wait_console(
        "web 1",
        Duration::from_secs(60),
        "writes of the second boot",
        |c| {
            c.matches("GUEST: READY").count() >= 2
                && c.rsplit("GUEST: READY")
                    .next()
                    .unwrap()
                    .contains("WROTE seq=3 ")
        },
    );
    let out = host.ferry_ok(&["vm", "stop", "web 1"]);
    assert!(out.contains("powered off"), "{out}");
    assert_eq!(host.vm_state("web 1"), "off");
    assert!(!pid_alive(pid2));
    let disk = disk_image(&host, "web 1");
    let v2 = verify_prefix(&disk, 777, SPAN).unwrap();
    assert!(v2.last_seq >= shown, "{} < {shown}", v2.last_seq);

    // Operations that make no sense when off are refused, nothing changes.
    for op in ["stop", "shutdown", "pause", "resume"] {
        let err = host.ferry_err(&["vm", op, "web 1"]);
        assert!(err.contains("already off"), "{op}: {err}");
    }

    // delete: gone with its disks.
    let dir = host.vm_storage.join("web 1");
    assert!(dir.exists());
    host.ferry_ok(&["vm", "delete", "web 1"]);
    assert!(!dir.exists());
    assert_eq!(host.ferry_json(&["vm", "list"]), serde_json::json!([]));
}

#[test]
fn shutdown_of_a_guest_that_ignores_acpi_times_out_clearly_and_keeps_it_running() {
    let host = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    // No kernel: the VM sits in the firmware, which does not handle the power button.
    host.ferry_ok(&["vm", "create", "bios", "--memory", "64M", "--disk", "16M"]);
    host.ferry_ok(&["vm", "start", "bios"]);
    let err = host.ferry_err(&["vm", "shutdown", "bios", "--timeout", "2"]);
    assert!(err.contains("did not power off within 2 s"), "{err}");
    assert!(err.contains("ferry vm stop bios"), "{err}");
    assert_eq!(host.vm_state("bios"), "running");
    let err = host.ferry_err(&["vm", "delete", "bios"]);
    assert!(err.contains("stop it first"), "{err}");
    host.ferry_ok(&["vm", "stop", "bios"]);
    assert_eq!(host.vm_state("bios"), "off");
}
