//! ferryd can restart (gracefully or by crashing) without touching its VMs: running VMs
//! are re-attached — same process, still writing, still controllable — and a VM whose QEMU
//! died while ferryd was down is shown as off with the reason.

use std::time::Duration;

use ferry_testkit::guest::{parse_console, GuestWorkload};
use ferry_testkit::host::{pid_alive, Host};

fn seq(host: &Host, vm: &str) -> u64 {
    parse_console(&host.console(vm)).last_wrote_seq.unwrap_or(0)
}

#[test]
fn running_vms_survive_daemon_restarts_and_are_reattached() {
    let mut host = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    for vm in ["keep", "doomed"] {
        host.create_guest_vm(
            vm,
            GuestWorkload {
                seed: 99,
                start: 1,
                span_blocks: 1024,
            },
            0.1,
            &["--memory", "256M", "--disk", "16M"],
        );
        host.ferry_ok(&["vm", "start", vm]);
    }
    let pid = host.ferry_json(&["vm", "show", "keep"])["pid"]
        .as_u64()
        .unwrap() as u32;
    let doomed_pid = host.ferry_json(&["vm", "show", "doomed"])["pid"]
        .as_u64()
        .unwrap() as u32;
    host.wait_console("keep", Duration::from_secs(60), "writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 3
    });

    // Graceful stop of ferryd: exit code 0, the VM keeps running (and writing).
    assert_eq!(host.stop_daemon(), 0);
    assert!(!host.socket.exists(), "admin socket left behind");
    let before = parse_console(&Host::offline_console(&host, "keep"))
        .last_wrote_seq
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs(2));
    assert!(pid_alive(pid), "VM died with ferryd");
    let during = Host::offline_console(&host, "keep");
    assert!(
        parse_console(&during).last_wrote_seq.unwrap_or(0) > before,
        "guest stopped writing while ferryd was down"
    );

    // Restart: same pid, running, and controllable.
    host.launch();
    let info = host.ferry_json(&["vm", "show", "keep"]);
    assert_eq!(info["state"], "running");
    assert_eq!(info["pid"].as_u64().unwrap() as u32, pid);
    assert!(info["uptime_s"].as_u64().unwrap() >= 2);
    host.ferry_ok(&["vm", "pause", "keep"]);
    assert_eq!(host.vm_state("keep"), "paused");

    // Crash of ferryd (SIGKILL) while the VM is paused; meanwhile the other VM's QEMU dies.
    host.kill_daemon();
    // SAFETY: kill(2) on the pid of the test's own QEMU.
    unsafe { libc::kill(doomed_pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    host.launch();
    let info = host.ferry_json(&["vm", "show", "keep"]);
    assert_eq!(
        (info["state"].as_str(), info["pid"].as_u64()),
        (Some("paused"), Some(pid as u64))
    );
    let doomed = host.ferry_json(&["vm", "show", "doomed"]);
    assert_eq!(doomed["state"], "off");
    assert!(
        doomed["last_error"]
            .as_str()
            .unwrap()
            .contains("exited while ferryd was not running"),
        "{doomed}"
    );
    // The dead VM starts again normally.
    host.ferry_ok(&["vm", "start", "doomed"]);
    assert_eq!(host.vm_state("doomed"), "running");

    // The re-attached VM resumes, and its process end is still noticed.
    host.ferry_ok(&["vm", "resume", "keep"]);
    let s = seq(&host, "keep");
    host.wait_console(
        "keep",
        Duration::from_secs(20),
        "writes after resume",
        |c| parse_console(c).last_wrote_seq.unwrap_or(0) > s,
    );
    let out = host.ferry_ok(&["vm", "shutdown", "keep", "--timeout", "30"]);
    assert!(out.contains("shut down by the guest"), "{out}");
    assert!(!pid_alive(pid));
    assert_eq!(host.vm_state("keep"), "off");

    // A QEMU that crashes under a running ferryd is noticed and reported.
    let pid = host.ferry_json(&["vm", "show", "doomed"])["pid"]
        .as_u64()
        .unwrap() as u32;
    // SAFETY: kill(2) on the pid of the test's own QEMU.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while host.vm_state("doomed") != "off" {
        assert!(std::time::Instant::now() < deadline, "crash not noticed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let doomed = host.ferry_json(&["vm", "show", "doomed"]);
    assert!(
        doomed["last_error"]
            .as_str()
            .unwrap()
            .contains("unexpectedly"),
        "{doomed}"
    );
}
