//! The console and a real failover cluster: three Corosync/Pacemaker nodes with their own
//! ferryd each (the testkit's `TestCluster`, real fencing), the writing test guest as a
//! highly available VM, the console managing all three nodes over their TLS APIs, Debian's
//! headless Chromium through chromedriver, and a real SMTP server (aiosmtpd, STARTTLS and
//! AUTH). One cluster serves every assertion, in order: the Clusters page shows the three
//! hosts as one cluster `c1`, quorate, with its designated controller, three online nodes,
//! where the VM runs, and "not configured" for the Replica Broker; crashing the VM's node
//! sends one `node_fenced` mail, and the page shows the VM on its new node, the node
//! offline and the fencing in the history; the node's return clears the alert; finally two
//! nodes crash at once and the survivor's lost quorum and the VM it can no longer run are
//! alerted too.
//!
//! The binary is called `cluster`, so nextest runs it in the `cluster` test group (one
//! cluster test at a time: .config/nextest.toml).

mod common;

use std::time::{Duration, Instant};

use common::smtp::{smtp_certificates, SmtpServer};
use common::{free_port, screenshot_dir, Browser, Console, PASSWORD, USER};
use ferry_testkit::cluster::TestCluster;
use ferry_testkit::guest::GuestWorkload;
use ferry_testkit::replication::wait_for;

/// The VM's row of the cluster's table on the clusters page.
fn vm_cell(class: &str) -> String {
    format!("section.cluster tr[data-vm='app'] .{class}")
}

fn node_cell(node: &str, class: &str) -> String {
    format!("section.cluster tr[data-node='{node}'] .{class}")
}

#[test]
fn the_console_shows_a_cluster_once_and_alerts_when_a_node_is_fenced() {
    let t0 = Instant::now();
    let tls = tempfile::tempdir().unwrap();
    let path = |n: &str| tls.path().join(n).to_str().unwrap().to_owned();
    smtp_certificates(tls.path());
    let smtp_port = free_port();
    let smtp = SmtpServer::start(smtp_port, &path("cert.pem"), &path("key.pem"));

    // The cluster, reachable from this namespace (where the console runs).
    let mut c = TestCluster::new(3);
    c.form("c1");
    c.reach_from_host();
    let formed = t0.elapsed();

    // The writing test guest, made highly available: the cluster starts it somewhere.
    let n1 = &c.node("node1").host;
    n1.create_guest_vm(
        "app",
        GuestWorkload {
            seed: 77,
            start: 1,
            span_blocks: 2048,
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
            if nodes.len() == 1 {
                owner = nodes[0].clone();
                true
            } else {
                false
            }
        },
    );

    // The console manages the three nodes, alerts by e-mail.
    let console = Console::start(2);
    let cookie = console.login();
    for n in ["node1", "node2", "node3"] {
        let (url, fp, token) = c.node_credentials(n);
        let to = console.post(
            &cookie,
            "/hosts",
            &[("url", &url), ("fingerprint", &fp), ("token", &token)],
        );
        assert!(to.contains(&format!("host%20{n}%20added")), "{to}");
    }
    let smtp_port_s = smtp_port.to_string();
    let ca_file = path("ca.pem");
    let console_url = format!("http://{}", console.addr);
    let to = console.post(
        &cookie,
        "/alerts/settings",
        &[
            ("health_min", "warning"),
            ("rpo_factor", "3"),
            ("host_unreachable", "on"),
            ("cluster_quorum", "on"),
            ("node_fenced", "on"),
            ("ha_vm_unplaced", "on"),
            ("debounce_s", "5"),
            ("smtp_host", "127.0.0.1"),
            ("smtp_port", &smtp_port_s),
            ("smtp_security", "starttls"),
            ("smtp_username", "ferry"),
            ("smtp_password", "mail-secret"),
            ("smtp_ca_file", &ca_file),
            ("mail_from", "ferry@console.test"),
            ("mail_to", "ops@example.test"),
            ("console_url", &console_url),
        ],
    );
    assert!(to.contains("ok="), "{to}");

    // The Clusters page, in the browser: one cluster item for the three hosts.
    let br = Browser::start();
    let base = console_url.clone();
    br.goto(&base);
    br.fill("#user", USER);
    br.fill("#password", PASSWORD);
    br.click("#login");
    let clusters = format!("{base}/clusters");
    br.wait_text(
        &clusters,
        &vm_cell("vm-node"),
        Duration::from_secs(60),
        |t| t == owner,
    );
    assert_eq!(br.count("#clusters tr[data-cluster]"), 1, "{}", br.source());
    assert_eq!(br.count("section.cluster"), 1);
    assert_eq!(br.text("#clusters tr[data-cluster='c1'] a"), "c1");
    assert_eq!(
        br.text("#clusters tr[data-cluster='c1'] .quorum"),
        "QUORATE"
    );
    assert_eq!(
        br.text("#clusters tr[data-cluster='c1'] .nodes-online"),
        "3/3"
    );
    assert_eq!(
        br.text("#clusters tr[data-cluster='c1'] .broker"),
        "not configured"
    );
    assert_eq!(br.text("section.cluster .broker"), "not configured");
    assert_eq!(br.count("section.cluster tr[data-node]"), 3);
    let dc = c.status("node1")["dc"].as_str().unwrap().to_owned();
    assert_eq!(br.text("section.cluster b.dc"), dc);
    for n in ["node1", "node2", "node3"] {
        assert_eq!(br.text(&node_cell(n, "node-state")), "ONLINE");
        assert_eq!(br.text(&node_cell(n, "node-host")), "reachable");
    }
    assert_eq!(br.text(&vm_cell("vm-ha")), "yes");
    assert_eq!(br.text(&vm_cell("vm-state")), "started");
    assert_eq!(br.text("#standalone"), "none");
    assert!(br
        .text("section.cluster .cluster-fencing")
        .contains("no fencing"));
    // The VM's name links to its page on the node that runs it.
    br.click("section.cluster tr[data-vm='app'] a");
    assert!(br.url().ends_with("/vms/app"), "{}", br.url());
    assert_eq!(br.text("#vm-state"), "running");
    // The hosts page says which cluster each host is a node of.
    br.goto(&format!("{base}/hosts"));
    for n in ["node1", "node2", "node3"] {
        assert_eq!(
            br.text(&format!("#hosts tr[data-host='{n}'] .cluster")),
            "c1"
        );
    }
    let shown = t0.elapsed();

    // Power loss of the VM's node: the cluster fences it and restarts the VM on a survivor.
    let crashed = owner.clone();
    let since = Instant::now();
    c.crash(&crashed);
    let mail = smtp.wait_subject(
        &format!("[ferry] ALERT: node_fenced ({crashed})"),
        Duration::from_secs(60),
    );
    let fenced_mail = since.elapsed();
    println!("fencing mail after {fenced_mail:?}: {mail}");
    assert_eq!(mail["user"], "ferry");
    assert_eq!(mail["to"][0], "ops@example.test");
    let body = mail["body"].as_str().unwrap();
    assert!(
        body.contains(&format!(
            "Node {crashed} of cluster c1 was fenced (reboot) by"
        )),
        "{body}"
    );
    assert!(body.contains(&format!("{console_url}/alerts")), "{body}");
    let new_owner = br.wait_text(
        &clusters,
        &vm_cell("vm-node"),
        Duration::from_secs(60),
        |t| t != crashed && t != "-" && !t.is_empty() && runs_on(&c, t),
    );
    let moved = since.elapsed();
    println!("the page shows app on {new_owner} {moved:?} after {crashed} crashed");
    assert_eq!(c.qemu_nodes("app"), vec![new_owner.clone()]);
    assert_eq!(br.text(&vm_cell("vm-state")), "started");
    assert_eq!(br.text(&node_cell(&crashed, "node-state")), "OFFLINE");
    assert!(
        br.text(&node_cell(&crashed, "node-host"))
            .starts_with("unreachable"),
        "{}",
        br.text(&node_cell(&crashed, "node-host"))
    );
    let fence_row = format!("section.cluster .cluster-fencing tr[data-target='{crashed}']");
    assert_eq!(br.count(&fence_row), 1, "{}", br.source());
    assert_eq!(br.text(&format!("{fence_row} .fence-status")), "success");
    assert!(br
        .text("#clusters tr[data-cluster='c1'] .last-fencing")
        .starts_with(&crashed));
    assert_eq!(
        br.text("#clusters tr[data-cluster='c1'] .nodes-online"),
        "2/3"
    );
    assert_eq!(
        br.text("#clusters tr[data-cluster='c1'] .quorum"),
        "QUORATE"
    );
    br.screenshot(&screenshot_dir(&console).join("clusters.png"));
    // One fencing, one alert: however many nodes report it, and at every poll.
    std::thread::sleep(Duration::from_secs(6));
    let fenced: Vec<String> = smtp
        .subjects()
        .into_iter()
        .filter(|s| s.contains("node_fenced"))
        .collect();
    assert_eq!(fenced.len(), 1, "{:?}", smtp.subjects());

    // The node returns: the fencing alert clears (once).
    c.reboot(&crashed);
    smtp.wait_subject(
        &format!("[ferry] CLEARED: node_fenced ({crashed})"),
        Duration::from_secs(60),
    );
    br.wait_text(
        &clusters,
        &node_cell(&crashed, "node-state"),
        Duration::from_secs(30),
        |t| t == "ONLINE",
    );
    let cleared = t0.elapsed();

    // Two nodes die at once: the survivor has no quorum and stops the VM (no-quorum-policy
    // stop), so the console alerts the lost quorum and the HA VM that no node runs.
    let survivor = c.qemu_nodes("app")[0].clone();
    let others: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| *n != survivor)
        .collect();
    for n in &others {
        c.crash(n);
    }
    let since = Instant::now();
    let mail = smtp.wait_subject(
        "[ferry] ALERT: cluster_quorum (c1)",
        Duration::from_secs(60),
    );
    let body = mail["body"].as_str().unwrap();
    assert!(
        body.contains(&format!(
            "Cluster c1 has no quorum as {survivor} sees it (1 of 3 nodes online)"
        )),
        "{body}"
    );
    let quorum_mail = since.elapsed();
    let mail = smtp.wait_subject(
        "[ferry] ALERT: app: ha_vm_unplaced (c1)",
        Duration::from_secs(120),
    );
    let body = mail["body"].as_str().unwrap();
    assert!(
        body.contains("Highly available VM app of cluster c1 does not run"),
        "{body}"
    );
    let unplaced_mail = since.elapsed();
    assert!(c.qemu_nodes("app").is_empty());
    br.goto(&clusters);
    assert_eq!(
        br.text("#clusters tr[data-cluster='c1'] .quorum"),
        "NO QUORUM"
    );
    assert_eq!(br.text(&vm_cell("vm-state")), "unplaced");
    assert_eq!(br.text(&node_cell(&survivor, "node-state")), "ONLINE");
    assert_eq!(
        br.text("section.cluster .seen-from"),
        survivor,
        "the survivor is the only node that answers"
    );
    println!(
        "figures: formed {formed:?}; page checked at {shown:?}; fencing mail {fenced_mail:?} and the page's new node {moved:?} after the crash; cleared at {cleared:?}; quorum mail {quorum_mail:?}, unplaced mail {unplaced_mail:?} after two nodes died; total {:?}",
        t0.elapsed()
    );
}

/// The VM really runs on `node` (a QEMU of it in that node's namespace).
fn runs_on(c: &TestCluster, node: &str) -> bool {
    c.qemu_nodes("app") == vec![node.to_owned()]
}
