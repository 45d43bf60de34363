//! A bridge NIC on a real Linux bridge: ferryd gives the VM a tap device through
//! `qemu-bridge-helper`, the tap is enslaved to the bridge, and the guest sees its NIC.
//! The bridge is the test's own (no uplink), so no traffic leaves the machine.

use std::process::Command;
use std::time::Duration;

use ferry_testkit::guest::GuestWorkload;
use ferry_testkit::host::Host;
use ferry_testkit::test_guest;

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
    let (kernel, initrd) = test_guest();
    let append = GuestWorkload {
        seed: 5,
        start: 1,
        span_blocks: 256,
    }
    .kernel_args(0, 1.0);
    host.ferry_ok(&[
        "vm",
        "create",
        "br",
        "--memory",
        "256M",
        "--disk",
        "16M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        &append,
        // One NIC on the named bridge and one on the host's default bridge.
        "--nic",
        &format!("bridge={}", bridge.0),
        "--nic",
        "bridge",
    ]);
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
