//! A bridge NIC on a real Linux bridge: ferryd gives the VM a tap device through
//! `qemu-bridge-helper`, the tap is enslaved to the bridge, and the guest sees its NIC.
//! The bridge is the test's own (no uplink), so no traffic leaves the machine.

use std::process::Command;
use std::time::Duration;

use ferry_testkit::guest::GuestWorkload;
use ferry_testkit::host::Host;
use ferry_testkit::replication::{enable_replica_server, wait_for};

/// A bridge created for the test and removed when it ends, even on failure.
struct TestBridge(String);

impl TestBridge {
    fn create(name: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", name]).status();
        run("ip", &["link", "add", name, "type", "bridge"]);
        run("ip", &["link", "set", name, "up"]);
        // qemu-bridge-helper only attaches taps to bridges its ACL allows.
        std::fs::create_dir_all("/etc/qemu").unwrap();
        let conf = std::path::Path::new("/etc/qemu/bridge.conf");
        let allow = format!("allow {name}");
        let text = std::fs::read_to_string(conf).unwrap_or_default();
        if !text.lines().any(|l| l.trim() == allow) {
            std::fs::write(conf, format!("{text}{allow}\n")).unwrap();
        }
        TestBridge(name.to_owned())
    }

    /// Interfaces enslaved to the bridge.
    fn ports(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-o", "link", "show", "master", &self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split(": ")
                    .nth(1)
                    .map(|s| s.split('@').next().unwrap().to_owned())
            })
            .collect()
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().unwrap();
    assert!(st.success(), "{cmd} {args:?} failed");
}

#[test]
fn bridge_nic_attaches_a_tap_to_the_bridge_and_the_guest_sees_it() {
    let bridge = TestBridge::create(&format!("fbr{}", std::process::id() % 100000));
    let host = Host::start(
        "nic",
        "127.0.0.1",
        // TCG: on nested-virtualization hosts the KVM probe can pass while Linux guests
        // hang early in boot (see docs/CONFIG.md).
        &format!("default_bridge = \"{}\"\naccel = \"tcg\"\n", bridge.0),
    );
    host.create_guest_vm(
        "br",
        GuestWorkload {
            seed: 5,
            start: 1,
            span_blocks: 256,
        },
        1.0,
        &[
            "--memory",
            "256M",
            "--disk",
            "16M",
            // One NIC on the named bridge and one on the host's default bridge.
            "--nic",
            &format!("bridge={}", bridge.0),
            "--nic",
            "bridge",
        ],
    );
    let show = host.ferry_json(&["vm", "show", "br"]);
    let nics = show["nics"].as_array().unwrap();
    assert_eq!(nics.len(), 2, "{show}");
    for nic in nics {
        assert_eq!(nic["bridge"].as_str(), Some(bridge.0.as_str()), "{show}");
    }
    assert!(bridge.ports().is_empty());

    host.ferry_ok(&["vm", "start", "br"]);
    let console = host.wait_console("br", Duration::from_secs(60), "READY", |c| {
        c.contains("GUEST: READY")
    });
    assert!(console.contains("GUEST: NET eth0"), "{console}");
    assert!(console.contains("GUEST: NET eth1"), "{console}");
    let ports = bridge.ports();
    assert_eq!(ports.len(), 2, "two taps on {}: {ports:?}", bridge.0);

    host.ferry_ok(&["vm", "stop", "br"]);
    assert_eq!(host.vm_state("br"), "off");
    // The taps go away with the QEMU process.
    for _ in 0..50 {
        if bridge.ports().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(bridge.ports().is_empty(), "{:?}", bridge.ports());
}

/// Network mapping on failover: the failed-over VM's bridged NIC joins the replica host's
/// own bridge (its `default_bridge`), not the primary site's bridge name.
#[test]
fn failed_over_vm_nics_join_the_replica_hosts_bridge() {
    let id = std::process::id() % 100000;
    let site_a = TestBridge::create(&format!("fa{id}"));
    let site_b = TestBridge::create(&format!("fb{id}"));
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start(
        "b",
        "127.0.0.2",
        // A short wait for the guest agent: this VM's empty disk boots nothing.
        &format!(
            "accel = \"tcg\"\ndefault_bridge = \"{}\"\nfailover_ip_wait_s = 15",
            site_b.0
        ),
    );
    enable_replica_server(&b, "127.0.0.2");
    a.ferry_ok(&[
        "vm",
        "create",
        "app",
        "--memory",
        "128M",
        "--disk",
        "16M",
        "--nic",
        &format!("bridge={}", site_a.0),
    ]);
    a.ferry_ok(&["vm", "set", "app", "--failover-ip", "0=10.78.0.5/24"]);
    a.ferry_ok(&[
        "replication",
        "enable",
        "app",
        "--to",
        b.socket.to_str().unwrap(),
        "--interval",
        "5s",
        "--wait",
    ]);
    // Failed over without --start, started by hand: the failover IP is applied then.
    let out = b.ferry_ok(&["failover", "start", "app", "--force"]);
    assert!(
        out.contains("failover IP is applied through the guest agent when it starts"),
        "{out}"
    );
    b.ferry_ok(&["vm", "start", "app"]);
    let show = b.ferry_json(&["vm", "show", "app"]);
    assert_eq!(
        show["nics"][0]["bridge"].as_str(),
        Some(site_b.0.as_str()),
        "{show}"
    );
    assert_eq!(site_b.ports().len(), 1, "no tap on {}", site_b.0);
    assert!(site_a.ports().is_empty());
    // Re-IP in a guest without an agent: reported plainly, as an error event.
    let mut failed = None;
    wait_for("the failover IP's outcome", Duration::from_secs(90), || {
        failed = b
            .ferry_json(&["events", "--vm", "app"])
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "failover_ip_failed")
            .cloned();
        failed.is_some()
    });
    let failed = failed.unwrap();
    assert_eq!(failed["severity"], "error", "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("the guest has no agent"),
        "{failed}"
    );
    b.ferry_ok(&["failover", "cancel", "app"]);
    assert_eq!(b.vm_state("app"), "off");
}
