//! A replica server trusts nothing a primary sends: who may replicate is decided from the
//! peer's certificate before anything it sends is read; "any authenticated primary" means
//! any certificate the configured CA issued, never any self-signed one; a primary cannot
//! start a VM on the replica unless the replica's admin allows it; and a replica server
//! cannot make its old primary overwrite its VM without a planned failover or that host's
//! own consent. Real ferryd daemons over real mutual TLS; the hostile peer speaks the real
//! wire protocol with crafted messages. VMs stay off (offline replication through
//! qemu-nbd), so no guest boots.

use std::path::Path;
use std::time::Duration;

use ferry_testkit::host::Host;
use ferry_testkit::hostile::HostilePeer;
use ferry_testkit::pki::TestCa;
use ferry_testkit::replication::{enable_replica_server, points, status, wait_for};
use serde_json::{json, Value};

/// Where `host`'s replica server listens, and its certificate fingerprint.
fn replica_port(host: &Host) -> (String, String) {
    let info = host.ferry_json(&["replica-server", "show"]);
    (
        info["listening"].as_str().expect("listening").to_owned(),
        info["fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_owned(),
    )
}

/// A peer presenting `host`'s own certificate and key (a compromised `host`).
fn peer_as(host: &Host, to: &Host) -> HostilePeer {
    host.issue_identity();
    let (addr, fp) = replica_port(to);
    let read = |f: &str| std::fs::read(host.data_dir.join(f)).expect("identity file");
    HostilePeer::connect(&addr, &fp, &read("host.crt"), &read("host.key")).expect("TLS")
}

/// A valid greeting for VM `vm`, as a primary named `primary` would send it.
fn hello(primary: &str, vm: &str, last_cycle: i64, reverse: bool) -> Value {
    json!({
        "type": "hello",
        "protocol": 1,
        "primary": primary,
        "spec": {
            "name": vm, "cpus": 1, "memory_mib": 256,
            "disks": [{"file": "disk0.qcow2", "size_bytes": 16u64 << 20}],
            "boot": {"kind": "disk"}, "nics": [],
        },
        "disks": [{"index": 0, "size_bytes": 16u64 << 20}],
        "settings": {
            "interval": {"secs": 5, "nanos": 0},
            "retention": {"additional": 0, "spacing_secs": 3600},
            "compression": false, "excluded_disks": [],
            "initial": {"method": "network"}, "bandwidth_limit": null,
            "granularity": 65536, "relationship_id": 7,
        },
        "last_cycle": last_cycle,
        "reverse": reverse,
    })
}

fn vm_names(host: &Host) -> Vec<String> {
    host.ferry_json(&["vm", "list"])
        .as_array()
        .expect("vm list")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_owned())
        .collect()
}

fn events_of_kind(host: &Host, kind: &str) -> Vec<Value> {
    host.ferry_json(&["events"])
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

fn replicate_offline(primary: &Host, replica: &Host, vm: &str) -> Result<(), String> {
    primary.ferry_ok(&["vm", "create", vm, "--memory", "256M", "--disk", "16M"]);
    let r = primary.ferry(&[
        "replication",
        "enable",
        vm,
        "--to",
        replica.socket.to_str().unwrap(),
        "--interval",
        "5s",
        "--wait",
    ]);
    if r.code == 0 {
        Ok(())
    } else {
        Err(r.stderr.trim().to_owned())
    }
}

/// `--allow-any` admits exactly the certificates the trusted CA issued: not ferryd's
/// default self-signed ones, not another CA's; a refused peer is told why before it can
/// send anything, and gets an event on the replica; a configuration stored by an older
/// ferryd (allow-any without a CA) admits nobody by "any".
#[test]
fn allow_any_admits_only_certificates_of_the_trusted_ca() {
    let mut b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let stranger = Host::start_self_signed("stranger", "127.0.0.3", "accel = \"tcg\"");
    let outsider = {
        let mut h = Host::configure_self_signed("outsider", "127.0.0.4", "accel = \"tcg\"");
        TestCa::new("Another organization").issue_host("outsider", &h.data_dir);
        h.launch();
        h
    };
    let storage = b.dir.path().join("replicas");
    let storage = storage.to_str().unwrap();

    // Bad input changes nothing: --allow-any without a CA, a CA file that is no PEM.
    let before = b.ferry_json(&["replica-server", "show"]);
    let err = b.ferry_err(&[
        "replica-server",
        "set",
        "--enable",
        "--allow-any",
        "--storage",
        storage,
    ]);
    assert!(err.contains("--trust-ca"), "{err}");
    let junk = b.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = b.ferry_err(&[
        "replica-server",
        "set",
        "--enable",
        "--allow-any",
        "--trust-ca",
        junk.to_str().unwrap(),
        "--storage",
        storage,
    ]);
    assert!(err.contains("no PEM certificate"), "{err}");
    assert_eq!(b.ferry_json(&["replica-server", "show"]), before);
    assert!(
        !Path::new(storage).exists(),
        "a refused setting created storage"
    );

    enable_replica_server(&b, "127.0.0.2");
    let shown = b.ferry_ok(&["replica-server", "show"]);
    assert!(shown.contains("certificate from the trusted CA"), "{shown}");

    // A host of the organization replicates.
    replicate_offline(&a, &b, "app").expect("a CA-issued primary is admitted");
    assert_eq!(points(&b, "app").len(), 1);

    // docs/SECURITY.md's recipe, with openssl: an organization CA, a certificate for a
    // host's own key (made by ferryd at its first start), installed as host.crt. The
    // replica trusts a bundle of both CAs.
    let mut c = Host::start_self_signed("c", "127.0.0.5", "accel = \"tcg\"");
    c.stop_daemon();
    let org = c.dir.path().join("org");
    std::fs::create_dir_all(&org).unwrap();
    let sh = |script: &str| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(&org)
            .env("DATA", &c.data_dir)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(include_str!("../../../docs/examples/org-ca.sh"));
    c.launch();
    let bundle = b.dir.path().join("bundle.pem");
    let org_ca = std::fs::read_to_string(org.join("ca.crt")).unwrap();
    std::fs::write(
        &bundle,
        format!("{}{org_ca}", ferry_testkit::pki::test_ca().pem),
    )
    .unwrap();
    b.ferry_ok(&[
        "replica-server",
        "set",
        "--trust-ca",
        bundle.to_str().unwrap(),
    ]);
    replicate_offline(&c, &b, "app-c").expect("a host certified by the documented recipe");
    replicate_offline(&a, &b, "app-a2").expect("the first CA of the bundle still counts");

    // ferryd's own self-signed certificate is not "any authenticated primary".
    let err = replicate_offline(&stranger, &b, "intruder").unwrap_err();
    assert!(
        err.contains("not authorized") && err.contains("not issued by the trusted CA"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Nor is a certificate of another organization's CA.
    let err = replicate_offline(&outsider, &b, "intruder2").unwrap_err();
    assert!(err.contains("not issued by the trusted CA"), "{err}");
    let mut names = vm_names(&b);
    names.sort();
    assert_eq!(
        names,
        ["app", "app-a2", "app-c"],
        "a refused primary left a VM behind"
    );
    assert!(
        std::fs::read_dir(storage).unwrap().all(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("app")),
        "a refused primary left files in the replica storage"
    );
    // Everything ferryd made is its own (umask 077): disks, replica layers, the store.
    for dir in [
        b.data_dir.clone(),
        std::path::PathBuf::from(storage),
        a.vm_storage.clone(),
    ] {
        assert_private(&dir);
    }
    let refused = events_of_kind(&b, "primary_refused");
    assert!(!refused.is_empty(), "no primary_refused event");
    assert!(refused[0]["code"] == 1200, "{refused:?}");

    // The refusal comes before the peer's first byte is read: a stranger that sends
    // nothing is already told.
    let mut peer = peer_as(&stranger, &b);
    let reply = peer
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("a refusal");
    assert_eq!(reply["type"], "refused", "{reply}");
    assert!(
        reply["reason"]
            .as_str()
            .unwrap()
            .contains("ferry replica-server set --allow NAME="),
        "{reply}"
    );

    // A configuration stored by an older ferryd, allow-any without a CA: nobody is admitted
    // by "any" (a listed primary still would be), and `show` says how to fix it.
    b.stop_daemon();
    let db = b.data_dir.join("ferry.db");
    let sql = "UPDATE settings SET value = json_remove(value, '$.trusted_ca') WHERE key = 'replica_server';";
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(sql)
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.launch();
    let shown = b.ferry_ok(&["replica-server", "show"]);
    assert!(shown.contains("trusts no CA"), "{shown}");
    let mut peer = peer_as(&a, &b);
    let reply = peer
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("a refusal");
    assert_eq!(reply["type"], "refused", "{reply}");
    assert!(
        reply["reason"].as_str().unwrap().contains("--trust-ca"),
        "{reply}"
    );
}

/// What an authorized primary may do is still bounded: its greeting is capped before it is
/// parsed, a planned failover does not start the VM unless the replica's admin allows it,
/// and its replica server (when it is compromised) cannot turn the primary's VM into a
/// replica and overwrite it without a planned failover or the primary admin's consent.
#[test]
fn an_authorized_peer_cannot_overrun_start_or_take_over() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    enable_replica_server(&a, "127.0.0.1");
    replicate_offline(&a, &b, "app").expect("replicates");

    // A greeting larger than any real one is refused from its header, before it is
    // buffered whole.
    let mut peer = peer_as(&a, &b);
    let huge = vec![b'x'; 1 << 20];
    let _ = peer.send_frame(ferry_wire::FrameKind::Control, &huge);
    let reply = peer
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("a refusal");
    assert_eq!(reply["type"], "refused", "{reply}");
    assert!(
        reply["reason"]
            .as_str()
            .unwrap()
            .contains("frame too large"),
        "{reply}"
    );
    assert_eq!(status(&b, "app")["state"], "replicating");

    // b, compromised, claims reverse replication of "app" onto a: a's VM is merely off, no
    // failover happened, and a's admin did not agree. Refused; nothing changes on a.
    let mut peer = peer_as(&b, &a);
    peer.send(&hello("b", "app", 1, true)).unwrap();
    let reply = peer
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("a reply");
    assert_eq!(reply["type"], "refused", "{reply}");
    let reason = reply["reason"].as_str().unwrap();
    assert!(
        reason.contains("did not agree") && reason.contains("ferry replication accept-reverse app"),
        "{reason}"
    );
    let st = status(&a, "app");
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["state"], "replicating", "{st}");

    // A planned failover with --start: b's admin did not allow primaries to start VMs
    // (turned off here; the testkit's replica servers allow it), so the VM fails over but
    // stays off, and the reply says how to start it.
    b.ferry_ok(&["replica-server", "set", "--allow-primary-start", "no"]);
    let out = a.ferry_ok(&["failover", "planned", "app", "--start"]);
    assert!(out.contains("was not started"), "{out}");
    assert_eq!(b.vm_state("app"), "off");
    wait_for("the failover on b", Duration::from_secs(30), || {
        status(&b, "app")["state"] != "replicating"
    });
    // b's own admin starts it.
    b.ferry_ok(&["vm", "start", "app"]);
    assert_eq!(b.vm_state("app"), "running");
    b.ferry_ok(&["vm", "stop", "app"]);
}

/// A spec as a hostile primary would send it: direct-kernel boot from one of the primary's
/// host paths, a NIC on a bridge of its choosing.
fn hostile_spec(vm: &str) -> Value {
    json!({
        "name": vm, "cpus": 1, "memory_mib": 256,
        "disks": [{"file": "disk0.qcow2", "size_bytes": 16u64 << 20}],
        "boot": {"kind": "kernel", "kernel": "/etc/shadow", "initrd": null, "append": "console=ttyS0"},
        "nics": [{"kind": {"kind": "bridge", "bridge": "br-mgmt"}, "mac": "52:54:00:12:34:56"}],
        "cdrom": {"iso": "/etc/ssh/ssh_host_ed25519_key"},
    })
}

/// The replica's stored spec of `vm` (what a failover would start).
fn stored_spec(host: &Host, vm: &str) -> Value {
    let out = std::process::Command::new("sqlite3")
        .arg(host.data_dir.join("ferry.db"))
        .arg(format!("SELECT spec FROM vms WHERE name = '{vm}';"))
        .output()
        .expect("sqlite3");
    serde_json::from_slice(&out.stdout).expect("spec JSON")
}

/// An authorized primary that is hostile (a compromised host of the organization) sends
/// crafted greetings, boot files, extents and cycles. The replica refuses each bad one in
/// one line with an event, stores nothing for it, never keeps a host path the primary
/// named (its kernel becomes a file in the replica's storage, checked by hash), and at
/// failover never attaches the VM to a bridge the primary named.
#[test]
fn a_hostile_primary_cannot_choose_what_the_replica_runs() {
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let storage = enable_replica_server(&b, "127.0.0.2");
    // Mallory's certificate is from the organization's CA: authorized, but hostile.
    let mallory = Host::configure("mallory", "127.0.0.5", "");
    let greet = |hello: Value| -> Value {
        let mut peer = peer_as(&mallory, &b);
        peer.send(&hello).unwrap();
        peer.recv(Duration::from_secs(10))
            .unwrap()
            .expect("an answer")
    };
    let refused = |hello: Value, why: &str| {
        let reply = greet(hello);
        assert_eq!(reply["type"], "refused", "{reply}");
        let reason = reply["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{reason:?} does not say {why:?}");
        assert_eq!(reason.lines().count(), 1, "{reason}");
    };

    // Protocol versions: one this replica does not speak is refused with what to do.
    let mut h = hello("mallory", "evil", 0, false);
    h["protocol"] = json!(7);
    h["max_protocol"] = json!(9);
    refused(h, "upgrade ferry on the older host");

    // Greetings that are not what they claim.
    refused(
        json!({"type": "hello", "protocol": 1}),
        "malformed greeting",
    );
    let mut h = hello("mallory", "../../etc", 0, false);
    refused(h.clone(), "malformed greeting");
    h = hello("mallory", "evil", 0, false);
    h["spec"]["disks"] = json!((0..17)
        .map(|i| json!({"file": format!("disk{i}.qcow2"), "size_bytes": 1 << 20}))
        .collect::<Vec<_>>());
    refused(h, "invalid");
    h = hello("mallory", "evil", 0, false);
    h["spec"]["disks"][0]["size_bytes"] = json!(u64::MAX);
    h["disks"][0]["size_bytes"] = json!(u64::MAX);
    refused(h, "invalid");
    h = hello("mallory", "evil", 0, false);
    h["spec"] = hostile_spec("evil");
    refused(h.clone(), "did not announce the boot files");
    h["boot_files"] = json!([{"role": "kernel", "size": 1u64 << 40, "hash": "00".repeat(32)}]);
    refused(h.clone(), "boot files must be");
    h["boot_files"] = json!([{"role": "../../etc/passwd", "size": 10, "hash": "00".repeat(32)}]);
    refused(h.clone(), "only one kernel and one initrd");
    assert!(
        vm_names(&b).is_empty(),
        "a refused greeting created a VM: {:?}",
        vm_names(&b)
    );
    assert!(!storage.join("evil").exists() && !storage.join("../../etc").exists());
    assert!(!events_of_kind(&b, "primary_refused").is_empty());

    // A direct-kernel VM is accepted, but the kernel is this host's own copy: the replica
    // asks for it, refuses one that does not match its announced hash, and keeps one that
    // does. The primary's path is never stored.
    let kernel = b"a kernel, as the primary ships it".repeat(1000);
    let hash = blake3::hash(&kernel).to_hex().to_string();
    h["boot_files"] = json!([{"role": "kernel", "size": kernel.len(), "hash": hash}]);
    let mut peer = peer_as(&mallory, &b);
    peer.send(&h).unwrap();
    let welcome = peer.recv(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    // This peer speaks as a version-1 primary did (no max_protocol): version 1 it is.
    assert_eq!(welcome["protocol"], 1, "{welcome}");
    assert_eq!(welcome["need_boot_files"], json!(["kernel"]));
    let mut forged = kernel.clone();
    forged[0] ^= 1;
    peer.send(&json!({"type": "boot_file", "role": "kernel", "offset": 0, "data": hex(&forged)}))
        .unwrap();
    let reply = peer.recv(Duration::from_secs(10)).unwrap().unwrap();
    assert!(
        reply["type"] == "failed"
            && reply["reason"]
                .as_str()
                .unwrap()
                .contains("does not match the hash"),
        "{reply}"
    );
    let local_kernel = storage.join("evil/boot/kernel");
    assert!(!local_kernel.exists(), "a forged kernel was kept");

    let mut peer = peer_as(&mallory, &b);
    peer.send(&h).unwrap();
    let welcome = peer.recv(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(welcome["need_boot_files"], json!(["kernel"]));
    peer.send(&json!({"type": "boot_file", "role": "kernel", "offset": 0, "data": hex(&kernel)}))
        .unwrap();
    let reply = peer.recv(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(reply, json!({"type": "boot_file_stored", "role": "kernel"}));
    assert_eq!(std::fs::read(&local_kernel).unwrap(), kernel);
    let spec = stored_spec(&b, "evil");
    assert_eq!(
        spec["boot"]["kernel"].as_str().unwrap(),
        local_kernel.to_str().unwrap()
    );
    assert!(!spec.to_string().contains("/etc/shadow"), "{spec}");
    // The CD drive stays, empty: the primary's ISO path could name any file here.
    assert_eq!(spec["cdrom"], json!({"iso": null}), "{spec}");

    // Extents: one beyond the declared disk size fails the whole cycle; no point.
    let begin = json!({"type": "cycle_begin", "cycle": 1, "kind": "initial", "taken_at": 4_000_000_000i64,
        "from_batch": 0, "batches": 1, "bytes": 4096});
    peer.send(&begin).unwrap();
    peer.send_batch(0, &[(0, 16 << 20, vec![7u8; 4096])])
        .unwrap();
    peer.send(&json!({"type": "cycle_end", "cycle": 1}))
        .unwrap();
    let reply = peer.recv(Duration::from_secs(30)).unwrap().unwrap();
    assert!(
        reply["type"] == "failed" && reply["reason"].as_str().unwrap().contains("beyond disk 0"),
        "{reply}"
    );
    assert!(points(&b, "evil").is_empty(), "a bad cycle left a point");

    // Streamed cycles (protocol 3) say their size at the end: one that announces a size up
    // front, ends without one, or ends with a count other than what it sent is refused,
    // and no point appears.
    let streamed = |batches: u64| {
        json!({"type": "cycle_begin", "cycle": 1, "kind": "initial", "taken_at": 0,
            "from_batch": 0, "batches": batches, "bytes": 0, "streamed": true})
    };
    for (begin, end, why) in [
        (
            streamed(1),
            json!({"type": "cycle_end", "cycle": 1, "batches": 1, "bytes": 4096}),
            "announces its size at its end",
        ),
        (
            streamed(0),
            json!({"type": "cycle_end", "cycle": 1}),
            "ended without its batch count and size",
        ),
        (
            streamed(0),
            json!({"type": "cycle_end", "cycle": 1, "batches": 2, "bytes": 4096}),
            "but 2 were announced",
        ),
        (
            streamed(0),
            json!({"type": "cycle_end", "cycle": 1, "batches": 1, "bytes": 5}),
            "carried 4096 data bytes, but 5 were announced",
        ),
    ] {
        let mut peer = peer_as(&mallory, &b);
        let mut h3 = h.clone();
        h3["max_protocol"] = json!(3);
        peer.send(&h3).unwrap();
        let welcome = peer.recv(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(welcome["protocol"], 3, "{welcome}");
        peer.send(&begin).unwrap();
        // (Refused at the beginning, the replica may close before these arrive.)
        let _ = peer.send_batch(0, &[(0, 0, vec![9u8; 4096])]);
        let _ = peer.send(&end);
        let reply = peer.recv(Duration::from_secs(30)).unwrap().unwrap();
        assert!(
            reply["type"] == "failed" && reply["reason"].as_str().unwrap().contains(why),
            "{why}: {reply}"
        );
        assert!(
            points(&b, "evil").is_empty(),
            "a bad streamed cycle left a point"
        );
    }

    // A well-formed cycle is a point; its time is not the primary's future clock.
    let mut peer = peer_as(&mallory, &b);
    peer.send(&h).unwrap();
    let welcome = peer.recv(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(welcome["need_boot_files"], json!([]), "{welcome}");
    peer.send(&begin).unwrap();
    peer.send_batch(0, &[(0, 0, vec![7u8; 4096])]).unwrap();
    peer.send(&json!({"type": "cycle_end", "cycle": 1}))
        .unwrap();
    let reply = peer.recv(Duration::from_secs(30)).unwrap().unwrap();
    assert_eq!(reply["type"], "committed", "{reply}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let pts = points(&b, "evil");
    let taken = pts[0]["taken_at"].as_i64().unwrap();
    assert!(
        taken <= now + 5,
        "a point dated by the primary's clock: {taken}"
    );
    // A well-formed streamed cycle: committed, with the size its end announced.
    peer.send(
        &json!({"type": "cycle_begin", "cycle": 2, "kind": "delta", "taken_at": 0,
        "from_batch": 0, "batches": 0, "bytes": 0, "streamed": true}),
    )
    .unwrap();
    peer.send_batch(0, &[(0, 8192, vec![5u8; 4096])]).unwrap();
    peer.send_batch(1, &[(0, 12288, vec![6u8; 4096])]).unwrap();
    peer.send(&json!({"type": "cycle_end", "cycle": 2, "batches": 2, "bytes": 8192}))
        .unwrap();
    let reply = peer.recv(Duration::from_secs(30)).unwrap().unwrap();
    assert_eq!(reply["type"], "committed", "{reply}");
    let last = points(&b, "evil").last().cloned().unwrap();
    assert_eq!(
        (last["cycle"].as_i64(), last["bytes"].as_i64()),
        (Some(2), Some(8192)),
        "{last}"
    );

    // Limits per primary and quota per storage location: a new replica past either is
    // refused in one line and nothing is created.
    b.ferry_ok(&["replica-server", "set", "--max-vms-per-primary", "1"]);
    refused(
        hello("mallory", "second", 0, false),
        "already has 1 replica VMs",
    );
    b.ferry_ok(&[
        "replica-server",
        "set",
        "--max-vms-per-primary",
        "0",
        "--storage-quota",
        "20M",
    ]);
    refused(hello("mallory", "second", 0, false), "past its quota");
    b.ferry_ok(&["replica-server", "set", "--storage-quota", "0"]);
    assert_eq!(vm_names(&b), ["evil"]);
    assert!(!storage.join("second").exists());
    let err = b.ferry_err(&["replica-server", "set", "--storage-quota", "lots"]);
    assert!(err.contains("--storage-quota lots"), "{err}");

    // Failover: no mapping for the primary's bridge here, so the NIC is left out instead of
    // joining "br-mgmt"; a mapping to a bridge this host lacks is refused.
    let err = b.ferry_err(&[
        "replica-server",
        "set",
        "--map-bridge",
        "mallory/br-mgmt=ferry-nobr0",
    ]);
    assert!(err.contains("does not exist on this host"), "{err}");
    let out = b.ferry_ok(&["failover", "start", "evil", "--force"]);
    assert!(out.contains("left out NIC 52:54:00:12:34:56"), "{out}");
    assert!(b.ferry_json(&["vm", "show", "evil"])["nics"]
        .as_array()
        .unwrap()
        .is_empty());
    // Cancel gives the replica back its NIC list (mapped again at the next failover).
    b.ferry_ok(&["failover", "cancel", "evil"]);
    assert_eq!(stored_spec(&b, "evil")["nics"].as_array().unwrap().len(), 1);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 fingerprint of a host's certificate, as `ferry server show` prints it.
fn fingerprint_of(host: &Host) -> String {
    host.issue_identity();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(host.data_dir.join("host.crt"))
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .rsplit('=')
        .next()
        .expect("fingerprint")
        .to_owned()
}

/// Storage locations may nest (one primary's storage inside another's replica directory):
/// removing one primary's replica deletes only what is its own.
#[test]
fn removing_a_replica_never_deletes_another_primarys_files() {
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let mallory = Host::configure("mallory", "127.0.0.5", "");
    let eve = Host::configure("eve", "127.0.0.6", "");
    let outer = b.dir.path().join("replicas");
    let nested = outer.join("evil");
    for (who, host, storage) in [("mallory", &mallory, &outer), ("eve", &eve, &nested)] {
        b.ferry_ok(&[
            "replica-server",
            "set",
            "--enable",
            "--port",
            &ferry_testkit::replication::free_port("127.0.0.2"),
            "--allow",
            &format!("{who}={}", fingerprint_of(host)),
            "--storage",
            storage.to_str().unwrap(),
        ]);
    }
    for (who, host, vm) in [("mallory", &mallory, "evil"), ("eve", &eve, "x")] {
        let mut peer = peer_as(host, &b);
        peer.send(&hello(who, vm, 0, false)).unwrap();
        let welcome = peer.recv(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(welcome["type"], "welcome", "{welcome}");
    }
    assert!(nested.join("x").is_dir());
    std::fs::write(nested.join("x").join("disk0.qcow2"), b"eve's data").unwrap();
    b.ferry_ok(&["replication", "remove", "evil"]);
    assert_eq!(vm_names(&b), ["x"]);
    assert_eq!(
        std::fs::read(nested.join("x").join("disk0.qcow2")).unwrap(),
        b"eve's data",
        "removing mallory's replica deleted eve's"
    );
}

/// Panics naming any file or directory under `dir` that users other than ferryd's can read.
fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut seen = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.file_type().is_symlink() {
                continue;
            }
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", e.path().display());
            seen += 1;
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    assert!(seen > 0, "nothing under {}", dir.display());
}

/// The API token is rotated without an outage: the new one works at once, the old one
/// until its grace period ends (also across a ferryd restart), then never again.
#[test]
fn the_api_token_rotates_with_a_grace_period() {
    let mut a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let (old, fp) = a.credentials();
    let url = format!("https://{}", a.tls_addr);
    let with = |a: &Host, token: &str| {
        let file = a.dir.path().join("tok");
        std::fs::write(&file, token).unwrap();
        a.ferry(&[
            "--host",
            &url,
            "--token-file",
            file.to_str().unwrap(),
            "--fingerprint",
            &fp,
            "server",
            "show",
        ])
    };
    let err = a.ferry_err(&["server", "rotate-token", "--grace", "30d"]);
    assert!(err.contains("at most a week"), "{err}");
    let reply = a.ferry_json(&["server", "rotate-token", "--grace", "6s"]);
    let new = reply["token"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(a.credentials().0, new, "the token file holds the new token");
    let deadline = reply["previous_valid_until"].as_i64().unwrap();
    assert_eq!(with(&a, &new).code, 0);
    assert_eq!(
        with(&a, &old).code,
        0,
        "the old token stopped before its grace ended"
    );
    a.stop_daemon();
    a.launch();
    assert_eq!(with(&a, &old).code, 0, "a restart ended the grace period");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    while now() <= deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    let late = with(&a, &old);
    assert_ne!(late.code, 0);
    assert!(late.stderr.contains("wrong API token"), "{}", late.stderr);
    assert_eq!(with(&a, &new).code, 0);
}

/// Commits `host`'s prepared certificate rotation once its partner has learnt it (a cycle
/// already in flight when it prepared did not carry the announcement: `cycle` runs one
/// more, as an admin would), then waits for ferryd to restart with `next`.
fn commit_rotation(host: &Host, next: &str, cycle: impl Fn()) {
    let mut committed = false;
    for _ in 0..3 {
        cycle();
        let r = host.ferry(&["server", "rotate-certificate", "--commit"]);
        if r.code == 0 {
            committed = true;
            break;
        }
        assert!(r.stderr.contains("had no session since"), "{}", r.stderr);
    }
    assert!(
        committed,
        "{}'s partner never learnt its next certificate",
        host.name
    );
    wait_for(
        &format!("{} to restart with its new certificate", host.name),
        Duration::from_secs(30),
        || {
            host.ferry(&["--output", "json", "server", "show"])
                .stdout
                .contains(next)
        },
    );
}

/// Certificates rotate without stopping replication, on the primary (b's authorization
/// entry moves to the new certificate) and on the replica server (the primary's pin
/// moves), each announced over the old certificate first; the old certificate is then
/// refused.
#[test]
fn certificates_rotate_on_both_sides_while_replication_goes_on() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let fp = |h: &Host| {
        h.ferry_json(&["server", "show"])["fingerprint"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let storage = b.dir.path().join("replicas");
    b.ferry_ok(&[
        "replica-server",
        "set",
        "--enable",
        "--port",
        &ferry_testkit::replication::free_port("127.0.0.2"),
        "--allow",
        &format!("a={}", fp(&a)),
        "--storage",
        storage.to_str().unwrap(),
    ]);
    a.ferry_ok(&["vm", "create", "app", "--memory", "256M", "--disk", "16M"]);
    a.ferry_ok(&[
        "replication",
        "enable",
        "app",
        "--to",
        b.socket.to_str().unwrap(),
        "--interval",
        "15m",
        "--wait",
    ]);
    let cycle = |h: &Host| status(h, "app")["last_cycle"].as_i64().unwrap();
    let one_more = |a: &Host| {
        let before = cycle(a);
        a.ferry_ok(&["replication", "now", "app"]);
        wait_for("a cycle", Duration::from_secs(60), || {
            let st = status(a, "app");
            st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() > before
        });
    };
    // Bad input changes nothing.
    let err = a.ferry_err(&["server", "rotate-certificate", "--commit"]);
    assert!(err.contains("no certificate rotation is prepared"), "{err}");
    let junk = a.dir.path().join("junk.pem");
    std::fs::write(&junk, "junk").unwrap();
    let err = a.ferry_err(&[
        "server",
        "rotate-certificate",
        "--cert",
        junk.to_str().unwrap(),
        "--key",
        junk.to_str().unwrap(),
    ]);
    assert!(err.contains("not a valid PEM"), "{err}");

    // The primary rotates: prepared, announced at the next cycle, committed.
    let a_old = fp(&a);
    let a_next = a.ferry_json(&["server", "rotate-certificate"])["next_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(a_next, a_old);
    let err = a.ferry_err(&["server", "rotate-certificate", "--commit"]);
    assert!(
        err.contains("app (partner b) had no session since"),
        "{err}"
    );
    commit_rotation(&a, &a_next, || one_more(&a));
    one_more(&a);
    let entry = &b.ferry_json(&["replica-server", "show"])["config"]["entries"][0];
    assert_eq!(entry["fingerprint"], a_next.as_str(), "{entry}");
    // The old certificate is refused now.
    let (addr, b_fp) = replica_port(&b);
    let read = |f: &str| std::fs::read(a.data_dir.join(f)).unwrap();
    let mut old =
        HostilePeer::connect(&addr, &b_fp, &read("host.prev.crt"), &read("host.prev.key")).unwrap();
    let reply = old.recv(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(reply["type"], "refused", "{reply}");

    // The replica server rotates to a certificate its organization's CA issued.
    let next_dir = b.dir.path().join("next");
    ferry_testkit::pki::test_ca().issue_host("b", &next_dir);
    let b_next = b.ferry_json(&[
        "server",
        "rotate-certificate",
        "--cert",
        next_dir.join("host.crt").to_str().unwrap(),
        "--key",
        next_dir.join("host.key").to_str().unwrap(),
    ])["next_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    commit_rotation(&b, &b_next, || one_more(&a));
    one_more(&a);
    one_more(&a);
    assert_eq!(status(&a, "app")["state"], "replicating");
    assert!(points(&b, "app").len() >= 1);
}
