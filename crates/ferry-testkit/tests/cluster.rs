//! Failover clusters: three real nodes (Corosync, Pacemaker, ferryd each, in their own
//! namespaces), real fencing (fence_netns SIGKILLs a node's every process), shared storage,
//! and the writing test guest as a highly available VM. One cluster serves every
//! assertion, in order: forming it, status in text and JSON, refusals, HA enable, a node
//! crash (the VM restarts elsewhere within 30 s, never on two nodes, its disk an exact
//! prefix of its writes), a partition (the cut-off node is fenced, the VM restarts once),
//! a live migration under writes (the same boot goes on, no write lost), and leaving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_testkit::cluster::TestCluster;
use ferry_testkit::guest::{parse_console, verify_prefix, GuestWorkload};
use ferry_testkit::replication::{read_image, wait_for};

const SEED: u64 = 4242;
const SPAN: u64 = 2048;

/// Watches, every 50 ms, on how many nodes a QEMU of `vm` runs; remembers the most.
struct TwoCopiesWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Vec<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TwoCopiesWatch {
    fn start(cluster: &TestCluster, vm: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let prefix = cluster.prefix.clone();
        let nodes: Vec<(usize, String)> = cluster
            .nodes
            .iter()
            .map(|n| (n.index, n.name.clone()))
            .collect();
        let needle = format!("{}/vms/{vm}/", cluster.shared.display());
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut on = Vec::new();
                for (i, name) in &nodes {
                    let out = std::process::Command::new("ip")
                        .args(["netns", "pids", &format!("{prefix}-n{i}")])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    let here = out.split_whitespace().any(|p| {
                        std::fs::read(format!("/proc/{p}/cmdline"))
                            .map(|c| {
                                let c = String::from_utf8_lossy(&c);
                                c.contains("qemu-system") && c.contains(&needle)
                            })
                            .unwrap_or(false)
                            && ferry_testkit::host::pid_alive(p.parse().unwrap_or(0))
                    });
                    if here {
                        on.push(name.clone());
                    }
                }
                if on.len() > 1 {
                    v.lock().unwrap().push(on);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.seen.lock().unwrap().clone()
    }
}

/// Waits until the cluster says the VM runs on a node other than `not`, and a QEMU of it
/// really runs there; returns the node and how long it took.
fn wait_moved(
    c: &TestCluster,
    ask: &str,
    vm: &str,
    not: &str,
    since: Instant,
) -> (String, Duration) {
    let deadline = since + Duration::from_secs(30);
    loop {
        let st = c.status(ask);
        let node = st["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm)
            .and_then(|v| v["node"].as_str().map(str::to_owned));
        if let Some(node) = node {
            if node != not && c.qemu_nodes(vm) == vec![node.clone()] {
                return (node, since.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{vm} did not run on another node than {not} within 30 s: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many successful fencings of `node` a status shows.
fn fences_of(st: &serde_json::Value, node: &str) -> usize {
    st["fencing"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["target"] == node && f["status"] == "success")
        .count()
}

/// The guest's disk as raw bytes, read while a QEMU may hold it (shared read).
fn disk_now(c: &TestCluster, vm: &str) -> Vec<u8> {
    read_image(&c.shared.join("vms").join(vm).join("disk0.qcow2"))
}

#[test]
fn a_cluster_restarts_a_writing_ha_guest_on_a_survivor_after_a_crash_and_a_partition() {
    let mut c = TestCluster::new(3);
    let t0 = Instant::now();

    // Refusals first: no fencing, a node list without this host, a wrong vm_storage.
    let n1 = &c.node("node1").host;
    let shared = c.shared.display().to_string();
    let err = n1.ferry_err(&[
        "cluster",
        "create",
        "c1",
        "--shared",
        &shared,
        "--node",
        "node1=10.0.0.1",
        "--node",
        "node2=10.0.0.2",
        "--fence",
        "fence_nonexistent",
    ]);
    assert!(
        err.contains("fence agent fence_nonexistent is not installed"),
        "{err}"
    );
    let err = n1.ferry_err(&[
        "cluster",
        "create",
        "c1",
        "--shared",
        &shared,
        "--node",
        "nodeX=10.0.0.1",
        "--node",
        "nodeY=10.0.0.2",
        "--fence",
        "fence_netns",
    ]);
    assert!(err.contains("not among the nodes"), "{err}");
    let err = n1.ferry_err(&["cluster", "status"]);
    assert!(err.contains("not a cluster node"), "{err}");
    assert!(
        !c.shared.join("cluster").exists(),
        "a refused create must leave nothing behind"
    );

    // 1. Form the cluster: create on node1, join on node2 and node3.
    c.form("c1");
    let formed = t0.elapsed();
    let st = c.status("node2");
    assert_eq!(st["name"], "c1");
    assert_eq!(st["quorate"], true);
    assert_eq!(st["nodes"].as_array().unwrap().len(), 3);
    let text = c.node("node3").host.ferry_ok(&["cluster", "status"]);
    assert!(
        text.contains("Cluster c1") && text.contains("quorate"),
        "{text}"
    );
    assert!(text.contains("node2") && text.contains("online"), "{text}");
    // Joining twice is harmless; another cluster's create is refused.
    c.node("node2")
        .host
        .ferry_ok(&["cluster", "join", "--shared", &shared]);
    let err = c.node("node2").host.ferry_err(&[
        "cluster",
        "create",
        "c2",
        "--shared",
        &shared,
        "--node",
        "node2=10.0.0.2",
        "--node",
        "node3=10.0.0.3",
        "--fence",
        "fence_netns",
    ]);
    assert!(err.contains("already a node"), "{err}");

    // 2. A writing guest, created on node1, made highly available.
    let n1 = &c.node("node1").host;
    n1.create_guest_vm(
        "app",
        GuestWorkload {
            seed: SEED,
            start: 1,
            span_blocks: SPAN,
        },
        0.02,
        &["--memory", "256M", "--disk", "16M", "--no-vnc"],
    );
    let st = c.status("node3");
    assert_eq!(st["vms"][0]["name"], "app", "{st:#}");
    assert_eq!(st["vms"][0]["ha"], false);
    assert_eq!(st["vms"][0]["state"], "stopped");
    let r = n1.ferry_ok(&["vm", "ha", "enable", "app"]);
    assert!(r.contains("highly available"), "{r}");
    let watch = TwoCopiesWatch::start(&c, "app");
    // The cluster starts it somewhere.
    let mut owner = String::new();
    wait_for(
        "app started by the cluster",
        Duration::from_secs(60),
        || {
            let nodes = c.qemu_nodes("app");
            if nodes.len() == 1 {
                owner = nodes[0].clone();
                true
            } else {
                false
            }
        },
    );
    let oh = &c.node(&owner).host;
    oh.wait_console("app", Duration::from_secs(60), "guest writes", |t| {
        parse_console(t).last_wrote_seq.unwrap_or(0) >= 20
    });
    // Direct lifecycle operations of an HA VM are refused with what to do instead.
    let err = oh.ferry_err(&["vm", "stop", "app"]);
    assert!(
        err.contains("highly available") && err.contains("ferry vm migrate"),
        "{err}"
    );
    let err = oh.ferry_err(&["vm", "delete", "app"]);
    assert!(err.contains("highly available"), "{err}");
    let st = c.status(&owner);
    let vm = &st["vms"][0];
    assert_eq!(
        (vm["ha"].clone(), vm["state"].clone()),
        (true.into(), "started".into()),
        "{st:#}"
    );
    assert_eq!(vm["node"], owner.as_str());

    // 3. Crash the owner: every process of the node dies at once.
    let crashed = owner.clone();
    let ask = c
        .nodes
        .iter()
        .find(|n| n.name != crashed)
        .unwrap()
        .name
        .clone();
    let since = Instant::now();
    c.crash(&crashed);
    // The disk as the crash left it: an exact prefix of the guest's writes (read before the
    // guest boots again elsewhere and starts its sequence over).
    let at_crash = verify_prefix(&disk_now(&c, "app"), SEED, SPAN)
        .unwrap_or_else(|e| panic!("disk after the crash: {e}"));
    assert!(at_crash.last_seq >= 20, "{at_crash:?}");
    let (new_owner, crash_failover) = wait_moved(&c, &ask, "app", &crashed, since);
    eprintln!("crash: app runs on {new_owner} {crash_failover:?} after {crashed} died");
    let st = c.status(&ask);
    let fenced: Vec<_> = st["fencing"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["target"] == crashed.as_str() && f["status"] == "success")
        .collect();
    assert_eq!(fenced.len(), 1, "the crashed node is fenced once: {st:#}");
    let text = c.node(&ask).host.ferry_ok(&["cluster", "status"]);
    assert!(
        text.contains("Fencing history") && text.contains(&crashed),
        "{text}"
    );
    // The console log is the VM's, on the shared storage: the new boot's lines follow.
    let old_len = std::fs::metadata(c.shared.join("vms/app/console.log"))
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    c.node(&new_owner).host.wait_console(
        "app",
        Duration::from_secs(60),
        "the restarted guest writes",
        |t| {
            parse_console(t.get(old_len..).unwrap_or(""))
                .last_wrote_seq
                .unwrap_or(0)
                >= 5
        },
    );
    c.reboot(&crashed);
    // Stickiness: the VM stays where it is when the crashed node returns.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.qemu_nodes("app"), vec![new_owner.clone()]);

    // 4. Partition: cut the owner off the cluster network. It loses quorum and stops the
    // VM, the majority fences it, then starts the VM once.
    let cut = new_owner.clone();
    let ask = c.nodes.iter().find(|n| n.name != cut).unwrap().name.clone();
    let fenced_before = fences_of(&c.status(&ask), &cut);
    let boots_before_partition = c.node(&ask).host.console("app").matches("READY").count();
    let since = Instant::now();
    c.set_link(&cut, false);
    let (after_partition, partition_failover) = wait_moved(&c, &ask, "app", &cut, since);
    eprintln!(
        "partition: app runs on {after_partition} {partition_failover:?} after {cut} was cut off"
    );
    let st = c.status(&ask);
    assert_eq!(
        fences_of(&st, &cut),
        fenced_before + 1,
        "fenced once: {st:#}"
    );
    wait_for(
        "the cut-off node fenced (no process left)",
        Duration::from_secs(30),
        || c.node_pids(c.node(&cut).index).is_empty(),
    );
    c.set_link(&cut, true);
    c.reboot(&cut);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.qemu_nodes("app"),
        vec![after_partition.clone()],
        "restarted once, stays put"
    );

    let copies = watch.finish();
    assert!(
        copies.is_empty(),
        "the VM ran on two nodes at once: {copies:?}"
    );

    // 5. Live migration under writes: the guest keeps its sequence (no reboot) and loses no
    // write. (Two QEMUs exist during a migration by design: the target's disks stay
    // inactive until the source's are inactivated at the switch-over.)
    let from = after_partition.clone();
    // The guest restarted after the partition is booted and writing before it moves.
    // (Moved within seconds of its boot, it once wrote nothing more after the move: see
    // the closing note of this change.)
    // (The console log is on the shared storage: one line per boot says READY.)
    c.node(&from).host.wait_console(
        "app",
        Duration::from_secs(60),
        "the guest restarted after the partition writes",
        |t| {
            let boot = t.rfind("READY").unwrap_or(0);
            t.matches("READY").count() > boots_before_partition
                && parse_console(&t[boot..]).last_wrote_seq.unwrap_or(0) >= 5
        },
    );
    let to = c
        .nodes
        .iter()
        .find(|n| n.name != from)
        .unwrap()
        .name
        .clone();
    let before = parse_console(&c.node(&from).host.console("app"))
        .last_wrote_seq
        .unwrap_or(0);
    let err = c
        .node(&from)
        .host
        .ferry_err(&["vm", "migrate", "app", "--to", "node9"]);
    assert!(err.contains("not a node"), "{err}");
    let reply = c
        .node(&from)
        .host
        .ferry_json(&["vm", "migrate", "app", "--to", &to]);
    assert_eq!(reply["node"], to.as_str(), "{reply:#}");
    // Guest memory crossed the cluster network in mutual TLS (the cluster's migration CA).
    assert_eq!(reply["encrypted"], true, "{reply:#}");
    let downtime_ms = reply["downtime_ms"]
        .as_u64()
        .expect("QEMU reports the downtime");
    let total_ms = reply["total_ms"].as_u64().unwrap();
    eprintln!("live migration {from} -> {to}: downtime {downtime_ms} ms, total {total_ms} ms");
    assert_eq!(c.qemu_nodes("app"), vec![to.clone()]);
    let st = c.status(&to);
    assert_eq!(st["vms"][0]["node"], to.as_str(), "{st:#}");
    // The same boot goes on writing past where it was (a restarted guest would start over).
    let th = &c.node(&to).host;
    th.wait_console(
        "app",
        Duration::from_secs(60),
        "writes go on after the move",
        |t| parse_console(t).last_wrote_seq.unwrap_or(0) >= before + 30,
    );
    // Stop it (no longer HA, then powered off) and check the disk: one unbroken sequence.
    th.ferry_ok(&["vm", "ha", "disable", "app"]);
    assert_eq!(
        c.qemu_nodes("app"),
        vec![to.clone()],
        "disabling HA leaves it running"
    );
    th.ferry_ok(&["vm", "stop", "app"]);
    let v = verify_prefix(&disk_now(&c, "app"), SEED, SPAN)
        .unwrap_or_else(|e| panic!("disk after the live migration: {e}"));
    assert!(
        v.last_seq >= before + 30,
        "{v:?} (before the move: {before})"
    );

    // 6. Leave: a node without the VM leaves cleanly (never fenced for it).
    let leaver = c.nodes.iter().find(|n| n.name != to).unwrap().name.clone();
    let leaver_fenced = fences_of(&c.status(&to), &leaver);
    let r = c.node(&leaver).host.ferry_ok(&["cluster", "leave"]);
    assert!(r.contains("left the cluster"), "{r}");
    let err = c.node(&leaver).host.ferry_err(&["cluster", "status"]);
    assert!(err.contains("not a cluster node"), "{err}");
    let st = c.status(&to);
    let node = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == leaver.as_str())
        .unwrap();
    assert_eq!(node["online"], false);
    assert_eq!(st["quorate"], true, "two of three keep quorum: {st:#}");
    assert_eq!(
        fences_of(&st, &leaver),
        leaver_fenced,
        "a node that leaves is not fenced: {st:#}"
    );
    eprintln!(
        "figures: formed in {formed:?}; crash failover {crash_failover:?}; partition failover {partition_failover:?}; migration downtime {downtime_ms} ms of {total_ms} ms"
    );
}

/// The replica's points of `vm` newer than cycle `after`: (cycle, kind).
fn new_points(replica: &ferry_testkit::host::Host, vm: &str, after: i64) -> Vec<(i64, String)> {
    ferry_testkit::replication::points(replica, vm)
        .iter()
        .map(|p| {
            (
                p["cycle"].as_i64().unwrap(),
                p["kind"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(c, _)| *c > after)
        .collect()
}

#[test]
fn a_replicated_ha_vm_keeps_replicating_as_the_cluster_after_a_move_and_a_node_crash() {
    // Three cluster nodes and a standalone replica server (node4) on the same network.
    let mut c = TestCluster::with_standalone(3, 1);
    c.form("c1");
    let st = c.status("node1");
    let cluster_fp = st["replication_fingerprint"]
        .as_str()
        .expect("the cluster's replication identity")
        .to_owned();
    let replica = &c.node("node4").host;
    let storage = replica.dir.path().join("replicas");
    let port = "7444";
    replica.ferry_ok(&[
        "replica-server",
        "set",
        "--enable",
        "--port",
        port,
        "--allow",
        &format!("c1={cluster_fp}"),
        "--storage",
        storage.to_str().unwrap(),
    ]);
    let replica_fp = replica.ferry_json(&["server", "show"])["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let replica_addr = format!("{}:{port}", c.node("node4").address);

    let n1 = &c.node("node1").host;
    n1.create_guest_vm(
        "app",
        GuestWorkload {
            seed: SEED,
            start: 1,
            span_blocks: SPAN,
        },
        0.05,
        &["--memory", "256M", "--disk", "16M", "--no-vnc"],
    );
    n1.ferry_ok(&["vm", "ha", "enable", "app"]);
    let mut owner = String::new();
    wait_for(
        "app started by the cluster",
        Duration::from_secs(60),
        || {
            let nodes = c.qemu_nodes("app");
            owner = nodes.first().cloned().unwrap_or_default();
            nodes.len() == 1
        },
    );
    let oh = &c.node(&owner).host;
    oh.wait_console("app", Duration::from_secs(60), "guest writes", |t| {
        parse_console(t).last_wrote_seq.unwrap_or(0) >= 5
    });
    oh.ferry_ok(&[
        "replication",
        "enable",
        "app",
        "--to",
        &replica_addr,
        "--replica-fingerprint",
        &replica_fp,
        "--interval",
        "3s",
        "--recovery-points",
        "24",
        "--point-spacing",
        "1s",
        "--wait",
    ]);
    wait_for(
        "a delta point after the initial copy",
        Duration::from_secs(90),
        || new_points(replica, "app", 0).len() >= 2,
    );
    // One primary identity: the replica knows the VM's primary as the cluster.
    let rs = ferry_testkit::replication::status(replica, "app");
    assert_eq!(rs["partner"], "c1", "{rs:#}");

    // Live migration: the next cycles come from the new node, deltas only.
    let to = c
        .nodes
        .iter()
        .take(3)
        .find(|n| n.name != owner)
        .unwrap()
        .name
        .clone();
    oh.ferry_ok(&["vm", "migrate", "app", "--to", &to]);
    let moved_at = new_points(replica, "app", 0)
        .iter()
        .map(|p| p.0)
        .max()
        .unwrap();
    wait_for(
        "two cycles from the new node",
        Duration::from_secs(90),
        || new_points(replica, "app", moved_at).len() >= 2,
    );
    let after_move = new_points(replica, "app", moved_at);
    assert!(
        after_move.iter().all(|(_, k)| k == "delta"),
        "after a live migration only deltas: {after_move:?}"
    );
    let th = &c.node(&to).host;
    let ps = ferry_testkit::replication::status(th, "app");
    assert_eq!(ps["role"], "primary", "{ps:#}");
    assert_eq!(ps["partner"], "node4", "{ps:#}");
    // Every point so far (one boot of the guest) is an exact prefix of its writes.
    ferry_testkit::replication::verify_quiesced(th, replica, "app", SEED, SPAN);

    // The new node dies: the VM restarts on a survivor, which resynchronizes by hash
    // comparison (QEMU was killed with the disk) and goes on; no new initial copy.
    let before_crash = new_points(replica, "app", 0)
        .iter()
        .map(|p| p.0)
        .max()
        .unwrap();
    let since = Instant::now();
    c.crash(&to);
    let replica = &c.node("node4").host;
    let ask = c
        .nodes
        .iter()
        .take(3)
        .find(|n| n.name != to)
        .unwrap()
        .name
        .clone();
    let (survivor, _) = wait_moved(&c, &ask, "app", &to, since);
    // A cycle the dead node had sent in full may still land as a delta; the survivor's
    // own cycles are a resync, then deltas.
    wait_for(
        "replication going on from the survivor",
        Duration::from_secs(120),
        || {
            let points = new_points(replica, "app", before_crash);
            let resync = points.iter().find(|(_, k)| k == "resync").map(|p| p.0);
            resync.is_some_and(|r| points.iter().any(|(c, k)| k == "delta" && *c > r))
        },
    );
    let after_crash = new_points(replica, "app", before_crash);
    assert!(
        after_crash
            .iter()
            .all(|(_, k)| k == "delta" || k == "resync"),
        "no new initial copy after a node crash: {after_crash:?}"
    );
    assert!(
        after_crash.iter().any(|(_, k)| k == "resync"),
        "QEMU died with its node: the survivor resynchronizes first: {after_crash:?}"
    );
    let ps = ferry_testkit::replication::status(&c.node(&survivor).host, "app");
    assert_eq!(ps["state"], "replicating", "{ps:#}");
    eprintln!("replication: points after the move {after_move:?}, after the crash {after_crash:?}");
}

/// `ferry ARGS` against the Replica Broker's ferryd on the node that runs it now.
fn on_broker(c: &TestCluster, ask: &str, args: &[&str]) -> serde_json::Value {
    let st = c.status(ask);
    let node = st["broker"]["node"]
        .as_str()
        .unwrap_or_else(|| panic!("the Broker runs nowhere: {st:#}"))
        .to_owned();
    let n = c.node(&node);
    let socket = c
        .work
        .path()
        .join(format!("node{}/run-ferry/broker.sock", n.index));
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let r = n
        .host
        .ferry_with(&all, &[("FERRY_SOCKET", socket.to_str().unwrap())]);
    assert_eq!(
        r.code, 0,
        "ferry {args:?} on the Broker ({node}): {}",
        r.stderr
    );
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

#[test]
fn a_cluster_replicates_to_a_replica_clusters_broker_which_survives_its_node() {
    // Cluster "pa" (nodes 1-3) replicates to cluster "rb" (nodes 4-6) through rb's Broker.
    let mut c = TestCluster::with_groups(&[3, 3], 0);
    c.form_group(0, "pa");
    c.form_group(1, "rb");
    let subnet = c.nodes[0].address.rsplit_once('.').unwrap().0.to_owned();
    let broker_ip = format!("{subnet}.100");
    let n4 = &c.node("node4").host;
    let err = n4.ferry_err(&["replica-broker", "set", "--enable"]);
    assert!(err.contains("--address"), "{err}");
    let b = n4.ferry_json(&["replica-broker", "set", "--enable", "--address", &broker_ip]);
    assert_eq!(b["state"], "started", "{b:#}");
    assert_eq!(b["name"], "rb-broker");
    let broker_fp = b["fingerprint"].as_str().unwrap().to_owned();
    // One identity for the cluster: the Broker's certificate is the one rb's VMs would
    // replicate with and its nodes' replica servers answer with.
    assert_eq!(
        c.status("node5")["replication_fingerprint"],
        broker_fp.as_str(),
        "the Broker has the cluster's certificate"
    );
    let text = c.node("node5").host.ferry_ok(&["replica-broker", "show"]);
    assert!(
        text.contains("rb-broker") && text.contains(&broker_ip),
        "{text}"
    );
    let err = n4.ferry_err(&["replica-broker", "set", "--enable", "--address", &broker_ip]);
    assert!(err.contains("already has a Replica Broker"), "{err}");
    // The Broker holds the replica-server settings: pa's identity, storage on rb's shared dir.
    let pa_fp = c.status("node1")["replication_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let storage = c.groups[1].1.join("broker/replicas");
    on_broker(
        &c,
        "node4",
        &[
            "replica-server",
            "set",
            "--enable",
            "--port",
            "7444",
            "--allow",
            &format!("pa={pa_fp}"),
            "--storage",
            storage.to_str().unwrap(),
            "--allow-primary-start",
            "yes",
        ],
    );

    // A writing HA guest on pa, replicated to the Broker's address.
    let n1 = &c.node("node1").host;
    n1.create_guest_vm(
        "app",
        GuestWorkload {
            seed: SEED,
            start: 1,
            span_blocks: SPAN,
        },
        0.05,
        &["--memory", "256M", "--disk", "16M", "--no-vnc"],
    );
    n1.ferry_ok(&["vm", "ha", "enable", "app"]);
    let mut owner = String::new();
    wait_for(
        "app started by the cluster",
        Duration::from_secs(60),
        || {
            let nodes = c.qemu_nodes("app");
            owner = nodes.first().cloned().unwrap_or_default();
            nodes.len() == 1
        },
    );
    let oh = &c.node(&owner).host;
    oh.wait_console("app", Duration::from_secs(60), "guest writes", |t| {
        parse_console(t).last_wrote_seq.unwrap_or(0) >= 5
    });
    oh.ferry_ok(&[
        "replication",
        "enable",
        "app",
        "--to",
        &format!("{broker_ip}:7444"),
        "--replica-fingerprint",
        &broker_fp,
        "--interval",
        "2s",
        "--recovery-points",
        "24",
        "--point-spacing",
        "1s",
        "--wait",
    ]);
    // A second HA guest, for a planned failover with reverse replication later.
    n1.create_guest_vm(
        "web",
        GuestWorkload {
            seed: SEED + 1,
            start: 1,
            span_blocks: SPAN,
        },
        0.2,
        &["--memory", "256M", "--disk", "16M", "--no-vnc"],
    );
    n1.ferry_ok(&["vm", "ha", "enable", "web"]);
    let mut web_owner = String::new();
    wait_for(
        "web started by the cluster",
        Duration::from_secs(60),
        || {
            let nodes = c.qemu_nodes("web");
            web_owner = nodes.first().cloned().unwrap_or_default();
            nodes.len() == 1
        },
    );
    c.node(&web_owner).host.ferry_ok(&[
        "replication",
        "enable",
        "web",
        "--to",
        &format!("{broker_ip}:7444"),
        "--replica-fingerprint",
        &broker_fp,
        "--interval",
        "5s",
        "--wait",
    ]);
    // The Broker placed each replica on a node (the one holding fewest) and sent the
    // primary there: the node keeps the replica, the Broker keeps none.
    let mut app_node = String::new();
    let mut web_node = String::new();
    wait_for("both replicas placed", Duration::from_secs(90), || {
        app_node = holder(&c, "node5", "app").unwrap_or_default();
        web_node = holder(&c, "node5", "web").unwrap_or_default();
        !app_node.is_empty() && !web_node.is_empty()
    });
    assert_ne!(
        app_node, web_node,
        "the Broker spreads replicas over its nodes"
    );
    wait_for("deltas on app's node", Duration::from_secs(90), || {
        node_points(&c, &app_node, "app").len() >= 3
    });
    let rs = ferry_testkit::replication::status(&c.node(&app_node).host, "app");
    assert_eq!(rs["partner"], "pa", "{rs:#}");
    assert_eq!(rs["role"], "replica");
    let broker_node = c.status("node4")["broker"]["node"]
        .as_str()
        .unwrap()
        .to_owned();
    let bn = c.node(&broker_node);
    let broker_sock = c
        .work
        .path()
        .join(format!("node{}/run-ferry/broker.sock", bn.index));
    let r = bn.host.ferry_with(
        &["replication", "status", "app"],
        &[("FERRY_SOCKET", broker_sock.to_str().unwrap())],
    );
    assert!(
        r.code != 0 && r.stderr.contains(&format!("held by node {app_node}")),
        "the Broker keeps no replica and says where it is: {}",
        r.stderr
    );
    let text = c.node("node5").host.ferry_ok(&["replica-broker", "show"]);
    assert!(text.contains("app") && text.contains(&app_node), "{text}");

    // Kill the node holding app's replica (mid-cycle: cycles run every 2 s): rb fences it,
    // the primary cannot reach it and asks the Broker again (itself moved if it ran
    // there), which places the replica on a survivor; that node takes the recovery points
    // over from the shared directory and replication goes on with deltas.
    let ask = ["node4", "node5", "node6"]
        .into_iter()
        .find(|n| *n != app_node)
        .unwrap()
        .to_owned();
    let last = node_points(&c, &app_node, "app")
        .iter()
        .map(|p| p.0)
        .max()
        .unwrap();
    let killed_at = Instant::now();
    c.crash(&app_node);
    let mut lag = Duration::ZERO;
    let mut moved_to = String::new();
    wait_for(
        "a new point on the node app's replica moved to",
        Duration::from_secs(120),
        || {
            moved_to = holder(&c, &ask, "app").unwrap_or_default();
            if moved_to.is_empty() || moved_to == app_node {
                return false;
            }
            lag = killed_at.elapsed();
            node_points(&c, &moved_to, "app").iter().any(|p| p.0 > last)
        },
    );
    let st = c.status(&ask);
    assert_eq!(fences_of(&st, &app_node), 1, "{st:#}");
    let points = node_points(&c, &moved_to, "app");
    assert!(
        points.iter().any(|p| p.0 <= last),
        "the earlier points came along: {points:?}"
    );
    let after: Vec<_> = points.iter().filter(|p| p.0 > last).collect();
    assert!(
        after.iter().all(|(_, k)| k == "delta"),
        "no new initial copy after the replica moved: {after:?}"
    );
    eprintln!(
        "replica of app moved {app_node} -> {moved_to}; first point there {lag:?} after the node died"
    );

    // The dead node boots again. It forgets the replica it no longer holds: its stale
    // rows would otherwise have it clean up, as leftovers, the layers the new node wrote
    // (the test failover below boots the newest point, so they must all be there).
    c.reboot(&app_node);
    let r = c
        .node(&app_node)
        .host
        .ferry(&["replication", "status", "app"]);
    assert!(
        r.code != 0 && r.stderr.contains("no VM named"),
        "{app_node} forgot the moved replica: {} {}",
        r.stdout,
        r.stderr
    );
    assert_eq!(holder(&c, &ask, "app").as_deref(), Some(moved_to.as_str()));

    // The Broker's own node is killed mid-cycle: the Broker starts on another node, and
    // replication, which flows from node to node, goes on with deltas (the replicas on
    // that node move too).
    let bnode = c.status(&ask)["broker"]["node"]
        .as_str()
        .unwrap()
        .to_owned();
    let bask = ["node4", "node5", "node6"]
        .into_iter()
        .find(|n| *n != bnode)
        .unwrap()
        .to_owned();
    let before = node_points(&c, &moved_to, "app")
        .iter()
        .map(|p| p.0)
        .max()
        .unwrap();
    let fenced_before = fences_of(&c.status(&bask), &bnode);
    c.crash(&bnode);
    wait_for(
        "the Broker on another node and a new point of app",
        Duration::from_secs(120),
        || {
            let st = c.status(&bask);
            if st["broker"]["state"] != "started" || st["broker"]["node"] == bnode.as_str() {
                return false;
            }
            moved_to = holder(&c, &bask, "app").unwrap_or_default();
            !moved_to.is_empty()
                && moved_to != bnode
                && node_points(&c, &moved_to, "app")
                    .iter()
                    .any(|p| p.0 > before)
        },
    );
    assert_eq!(fences_of(&c.status(&bask), &bnode), fenced_before + 1);
    let new: Vec<_> = node_points(&c, &moved_to, "app")
        .into_iter()
        .filter(|p| p.0 > before)
        .collect();
    assert!(new.iter().all(|(_, k)| k == "delta"), "{new:?}");
    c.reboot(&bnode);
    let web_node = holder(&c, &bask, "web").unwrap();

    // A primary that greets a node not holding its replica is sent to the Broker, which
    // places it on the node holding fewest and sends it there.
    let n1 = &c.node("node1").host;
    n1.ferry_ok(&[
        "vm", "create", "db", "--memory", "64M", "--disk", "8M", "--no-vnc",
    ]);
    let app_node_addr = c.node(&app_node).address.clone();
    n1.ferry_ok(&[
        "replication",
        "enable",
        "db",
        "--to",
        &format!("{app_node_addr}:7444"),
        "--replica-fingerprint",
        &broker_fp,
        "--wait",
    ]);
    let db_node = holder(&c, &ask, "db").expect("db placed");
    assert_ne!(db_node, moved_to, "placed on a node holding fewest");
    assert_ne!(db_node, web_node, "placed on a node holding fewest");
    assert_eq!(node_points(&c, &db_node, "db").len(), 1);
    // The primary site is gone (db's replication stops) and then db's node dies too: the
    // Broker moves the replica by itself once the node is fenced, the new node takes it
    // over, and it can be failed over there.
    c.node("node1")
        .host
        .ferry_ok(&["replication", "suspend", "db"]);
    let ask2 = ["node4", "node5", "node6"]
        .into_iter()
        .find(|n| *n != db_node)
        .unwrap()
        .to_owned();
    let db_fenced_before = fences_of(&c.status(&ask2), &db_node);
    c.crash(&db_node);
    let mut db_moved = String::new();
    wait_for(
        "db's replica moved with no primary greeting",
        Duration::from_secs(90),
        || {
            db_moved = holder(&c, &ask2, "db").unwrap_or_default();
            !db_moved.is_empty()
                && db_moved != db_node
                && node_points(&c, &db_moved, "db").len() == 1
        },
    );
    let st = c.status(&ask2);
    assert_eq!(
        fences_of(&st, &db_node),
        db_fenced_before + 1,
        "fenced before the move: {st:#}"
    );
    let dh = &c.node(&db_moved).host;
    dh.ferry_ok(&["failover", "start", "db", "--force"]);
    let st = ferry_testkit::replication::status(dh, "db");
    assert_eq!(st["state"], "failed_over_waiting_completion", "{st:#}");
    c.reboot(&db_node);

    // Failover operations against the replica cluster, on the node holding the replica:
    // a test failover boots a point, then an unplanned failover (pa "lost").
    let mh = &c.node(&moved_to).host;
    mh.ferry_ok(&["failover", "test", "app"]);
    wait_for("the test VM writes", Duration::from_secs(90), || {
        let r = mh.ferry(&["vm", "console", "app-test", "--log"]);
        parse_console(&r.stdout).last_wrote_seq.unwrap_or(0) >= 1
    });
    mh.ferry_ok(&["failover", "stop-test", "app"]);
    // Unplanned failover: stop the primary's replication first (pa is "gone").
    c.node(&owner)
        .host
        .ferry_ok(&["replication", "suspend", "app"]);
    mh.ferry_ok(&["failover", "start", "app", "--start", "--force"]);
    wait_for("the failed-over VM writes", Duration::from_secs(90), || {
        let r = mh.ferry(&["vm", "console", "app", "--log"]);
        parse_console(&r.stdout).last_wrote_seq.unwrap_or(0) >= 1
    });
    let vm = mh.ferry_json(&["vm", "show", "app"]);
    assert_eq!(vm["state"], "running", "{vm:#}");
    mh.ferry_ok(&["failover", "complete", "app"]);
    // Made highly available on the replica cluster, the failed-over VM is the cluster's
    // now (no longer a replica the Broker moves), and a crash of its node restarts it
    // on another node.
    let err = c
        .node(&holder(&c, &moved_to, "web").unwrap())
        .host
        .ferry_err(&["vm", "ha", "enable", "web"]);
    assert!(err.contains("fail it over first"), "{err}");
    mh.ferry_ok(&["vm", "ha", "enable", "app"]);
    let other = ["node4", "node5", "node6"]
        .into_iter()
        .find(|n| *n != moved_to)
        .unwrap()
        .to_owned();
    assert_eq!(
        holder(&c, &other, "app"),
        None,
        "{}",
        mh.ferry_ok(&["replica-broker", "show"])
    );
    let since = Instant::now();
    c.crash(&moved_to);
    let mut restarted = String::new();
    wait_for(
        "the failed-over VM restarted on another node",
        Duration::from_secs(60),
        || {
            let st = c.status(&other);
            restarted = st["vms"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "app")
                .and_then(|v| v["node"].as_str())
                .unwrap_or_default()
                .to_owned();
            !restarted.is_empty() && restarted != moved_to
        },
    );
    let rh = &c.node(&restarted).host;
    wait_for("the restarted VM writes", Duration::from_secs(90), || {
        let r = rh.ferry(&["vm", "console", "app", "--log"]);
        parse_console(&r.stdout).last_wrote_seq.unwrap_or(0) >= 1
    });
    eprintln!(
        "failed-over app restarted on {restarted} {:?} after {moved_to} died",
        since.elapsed()
    );
    c.reboot(&moved_to);

    // Planned failover of web to the replica cluster, zero data loss (the primary greets
    // the Broker, which sends it to web's node), then reverse replication from that node
    // back to the primary cluster's node, as the replica cluster's Broker.
    let web_node = holder(&c, &ask, "web").unwrap();
    let wo = &c.node(&web_owner).host;
    let reverse_storage = c.shared.join("reverse");
    wo.ferry_ok(&[
        "replica-server",
        "set",
        "--enable",
        "--port",
        "7444",
        "--allow",
        &format!("rb-broker={broker_fp}"),
        "--storage",
        reverse_storage.to_str().unwrap(),
    ]);
    let err = wo.ferry_err(&["vm", "stop", "web"]);
    assert!(err.contains("highly available"), "{err}");
    wo.ferry_ok(&["vm", "ha", "disable", "web"]);
    wo.ferry_ok(&["vm", "stop", "web"]);
    let out = wo.ferry_ok(&["failover", "planned", "web", "--start", "--reverse"]);
    eprintln!("{out}");
    let wh = &c.node(&web_node).host;
    let vm = wh.ferry_json(&["vm", "show", "web"]);
    assert_eq!(vm["state"], "running", "{vm:#}");
    wait_for(
        "reverse cycles into the primary cluster",
        Duration::from_secs(120),
        || {
            let st = ferry_testkit::replication::status(wo, "web");
            st["role"] == "replica" && st["last_cycle"].as_i64().unwrap_or(0) >= 1
        },
    );
    let rs = ferry_testkit::replication::status(wh, "web");
    assert_eq!(rs["role"], "primary", "{rs:#}");
    let back = ferry_testkit::replication::status(wo, "web");
    assert_eq!(back["partner"], "rb-broker", "{back:#}");
    eprintln!("figures: broker failover replication lag {lag:?}");
}

/// The node the Replica Broker placed `vm`'s replica on, as `ferry replica-broker show`
/// on node `ask` says.
fn holder(c: &TestCluster, ask: &str, vm: &str) -> Option<String> {
    let r = c
        .node(ask)
        .host
        .ferry(&["--output", "json", "replica-broker", "show"]);
    let b: serde_json::Value = serde_json::from_str(&r.stdout).ok()?;
    b["replicas"]
        .as_array()?
        .iter()
        .find(|x| x["vm"] == vm)
        .and_then(|x| x["node"].as_str())
        .map(str::to_owned)
}

/// A node's recovery points of `vm`: (cycle, kind); none while it does not answer.
fn node_points(c: &TestCluster, node: &str, vm: &str) -> Vec<(i64, String)> {
    let r = c
        .node(node)
        .host
        .ferry(&["--output", "json", "replication", "points", vm]);
    serde_json::from_str::<serde_json::Value>(&r.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p["cycle"].as_i64().unwrap(),
                p["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `ferry vm exec VM -- ARGS` until the guest's agent answers; its stdout.
fn guest_exec(
    host: &ferry_testkit::host::Host,
    vm: &str,
    args: &[&str],
    timeout: Duration,
) -> String {
    let mut all = vec!["vm", "exec", vm, "--timeout", "120", "--"];
    all.extend_from_slice(args);
    let mut out = String::new();
    wait_for("the guest agent", timeout, || {
        let r = host.ferry(&all);
        out = r.stdout.clone();
        r.code == 0
    });
    out
}

#[test]
fn the_real_debian_guest_moves_live_between_nodes_and_restarts_after_a_crash() {
    let disk = ferry_testkit::debian::debian_image()
        .installed_disk()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = TestCluster::new(3);
    c.form("c1");
    let n1 = &c.node("node1").host;
    n1.ferry_ok(&[
        "vm",
        "create",
        "deb",
        "--memory",
        "1024M",
        "--firmware",
        "uefi",
        "--machine",
        "q35",
        "--disk",
        disk.to_str().unwrap(),
        "--no-vnc",
    ]);
    n1.ferry_ok(&["vm", "ha", "enable", "deb"]);
    let mut owner = String::new();
    wait_for(
        "deb started by the cluster",
        Duration::from_secs(60),
        || {
            let nodes = c.qemu_nodes("deb");
            owner = nodes.first().cloned().unwrap_or_default();
            nodes.len() == 1
        },
    );
    // Booted to multi-user, with its agent answering.
    let state = guest_exec(
        &c.node(&owner).host,
        "deb",
        &["/usr/bin/systemctl", "is-system-running", "--wait"],
        Duration::from_secs(400),
    );
    assert!(
        state.contains("running") || state.contains("degraded"),
        "{state}"
    );
    let boot_id = guest_exec(
        &c.node(&owner).host,
        "deb",
        &["/bin/cat", "/proc/sys/kernel/random/boot_id"],
        // TCG on a busy machine: a 1 GiB guest may answer slowly after a move.
        Duration::from_secs(300),
    );

    // Live migration of a UEFI q35 guest (its NVRAM on the shared storage too): the same
    // boot goes on, and its agent answers on the new node.
    let to = c
        .nodes
        .iter()
        .find(|n| n.name != owner)
        .unwrap()
        .name
        .clone();
    let r = c
        .node(&owner)
        .host
        .ferry_json(&["vm", "migrate", "deb", "--to", &to]);
    eprintln!(
        "Debian guest {owner} -> {to}: downtime {} ms, total {} ms",
        r["downtime_ms"], r["total_ms"]
    );
    assert_eq!(c.qemu_nodes("deb"), vec![to.clone()]);
    let after = guest_exec(
        &c.node(&to).host,
        "deb",
        &["/bin/cat", "/proc/sys/kernel/random/boot_id"],
        // TCG on a busy machine: a 1 GiB guest may answer slowly after a move.
        Duration::from_secs(300),
    );
    assert_eq!(after, boot_id, "a live migration does not reboot the guest");

    // Its node dies: the guest boots again on a survivor and reaches multi-user.
    let since = Instant::now();
    c.crash(&to);
    let ask = c.nodes.iter().find(|n| n.name != to).unwrap().name.clone();
    let (survivor, took) = wait_moved(&c, &ask, "deb", &to, since);
    eprintln!("Debian guest restarted on {survivor} {took:?} after {to} died");
    let state = guest_exec(
        &c.node(&survivor).host,
        "deb",
        &["/usr/bin/systemctl", "is-system-running", "--wait"],
        Duration::from_secs(400),
    );
    assert!(
        state.contains("running") || state.contains("degraded"),
        "{state}"
    );
    let rebooted = guest_exec(
        &c.node(&survivor).host,
        "deb",
        &["/bin/cat", "/proc/sys/kernel/random/boot_id"],
        // TCG on a busy machine: a 1 GiB guest may answer slowly after a move.
        Duration::from_secs(300),
    );
    assert_ne!(
        rebooted, boot_id,
        "after its node died the guest booted again"
    );
}
