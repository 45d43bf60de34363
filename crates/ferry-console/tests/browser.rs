//! The console in a real headless Chromium (Debian's, through chromedriver), against two
//! real ferryd hosts and a real replicated test guest: nothing is reachable without
//! logging in; a host with a wrong fingerprint is refused and nothing is stored; both
//! hosts are added over their TLS APIs; replication is enabled with the wizard; the
//! dashboard shows the relationship Normal; a test failover started from the replica's
//! page runs (the host confirms it) and shows on the page, the VM list and the dashboard;
//! stopping it from the page removes the test VM; checkpoints of the primary are created,
//! renamed, applied and deleted from its page; the VM is started and shut down, its
//! replication suspended and resumed, a planned failover with reverse replication run
//! from its page, and on the new replica an unplanned failover and its cancel. Screenshots of the main pages are saved
//! (to `FERRY_SCREENSHOTS` when set: docs/screenshots holds the committed ones).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    form, host_form, http, screenshot_dir, start_guest, Browser, Console, PASSWORD, USER,
};
use ferry_testkit::host::Host;
use ferry_testkit::replication::{enable_replica_server, status};

#[test]
fn browser_logs_in_adds_hosts_sees_health_and_runs_a_test_failover() {
    let a = Host::start("site-a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("site-b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    // site-a too: the planned failover at the end reverses replication to it.
    enable_replica_server(&a, "127.0.0.1");
    start_guest(&a, "app", 41);
    let console = Console::start(2);
    let base = format!("http://{}", console.addr);
    let shots = screenshot_dir(&console);
    let (a_url, a_fp, a_token) = host_form(&a);
    let (b_url, b_fp, b_token) = host_form(&b);

    // No page and no action without a session.
    let r = http(&console.addr, "GET", "/vms", &[], "");
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/login"));
    let r = http(
        &console.addr,
        "POST",
        "/hosts",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &form(&[("url", &a_url), ("fingerprint", &a_fp), ("token", &a_token)]),
    );
    assert_eq!(r.status, 401, "{r:?}");
    let cookie = console.login();
    assert!(
        !console.get(&cookie, "/hosts").contains("data-host="),
        "an unauthenticated POST added a host"
    );

    let br = Browser::start();
    br.goto(&base);
    assert!(br.url().ends_with("/login"), "{}", br.url());
    br.screenshot(&shots.join("login.png"));
    br.fill("#user", USER);
    br.fill("#password", "not the password");
    br.click("#login");
    assert_eq!(br.text("#error"), "wrong user or password");
    br.fill("#user", USER);
    br.fill("#password", PASSWORD);
    br.click("#login");
    assert_eq!(br.url(), format!("{base}/"));

    // A wrong fingerprint (b's, for a) is refused in one line and nothing is added.
    br.goto(&format!("{base}/hosts"));
    br.fill("#host-url", &a_url);
    br.fill("#host-fingerprint", &b_fp);
    br.fill("#host-token", &a_token);
    br.click("#add-host-submit");
    let err = br.text("#flash-err");
    assert!(err.contains("fingerprint"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(br.count("#hosts tr[data-host]"), 0);
    // So is a wrong token.
    br.fill("#host-url", &a_url);
    br.fill("#host-fingerprint", &a_fp);
    br.fill("#host-token", "wrong");
    br.click("#add-host-submit");
    assert!(
        br.text("#flash-err").contains("token"),
        "{}",
        br.text("#flash-err")
    );
    assert_eq!(br.count("#hosts tr[data-host]"), 0);
    for (url, fp, token, name) in [
        (&a_url, &a_fp, &a_token, "site-a"),
        (&b_url, &b_fp, &b_token, "site-b"),
    ] {
        br.fill("#host-url", url);
        br.fill("#host-fingerprint", fp);
        br.fill("#host-token", token);
        br.click("#add-host-submit");
        assert_eq!(br.flash_ok(), format!("host {name} added"));
    }
    for name in ["site-a", "site-b"] {
        br.wait_text(
            &format!("{base}/hosts"),
            &format!("#hosts tr[data-host='{name}'] .status"),
            Duration::from_secs(30),
            |t| t.starts_with("REACHABLE"),
        );
    }
    br.screenshot(&shots.join("hosts.png"));
    // The hosts page (it holds a form) shows the fleet's status in a fragment that
    // reloads itself.
    let fleet = br
        .script("return document.querySelector('#status-frame').contentDocument.body.innerText;")
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        fleet.contains("site-a: reachable") && fleet.contains("site-b: reachable"),
        "{fleet}"
    );

    let t = std::time::Instant::now();
    create_vm_refresh_and_confirm(&br, &a, &console, &cookie, &shots);
    eprintln!(
        "new VM, live status and confirmation steps: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The guest on site-a, then replication through the wizard.
    br.wait_text(
        &format!("{base}/vms"),
        "tr[data-host='site-a'][data-vm='app'] .vm-state",
        Duration::from_secs(30),
        |t| t == "running",
    );
    br.click("tr[data-host='site-a'][data-vm='app'] a");
    br.click("#enable-replication");
    br.select("#replica-host", "site-b");
    br.fill("#interval", "nonsense");
    br.click("#enable-submit");
    let err = br.text("#flash-err");
    assert!(err.contains("nonsense"), "{err}");
    assert!(a
        .ferry_json(&["replication", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    br.select("#replica-host", "site-b");
    br.fill("#interval", "5s");
    br.screenshot(&shots.join("enable-replication.png"));
    br.click("#enable-submit");
    let ok = br.flash_ok();
    assert!(ok.contains("enabled"), "{ok}");

    // The dashboard shows the relationship Normal once cycles run, seen from both sides.
    br.wait_text(
        &format!("{base}/"),
        "#relationships tr[data-vm='app'] .rel-health",
        Duration::from_secs(180),
        |t| t == "NORMAL",
    );
    br.wait_text(
        &format!("{base}/"),
        "#relationships tr[data-vm='app'] .last-test",
        Duration::from_secs(30),
        |t| t == "never (not running)",
    );

    // Test failover from the replica's page.
    br.goto(&format!("{base}/vms"));
    br.click("tr[data-host='site-b'][data-vm='app'] a");
    br.click("#tab-replication");
    assert_eq!(br.text("#test-failover-status"), "not running");
    br.click("#action-test_failover");
    let ok = br.flash_ok();
    assert!(ok.contains("app-test"), "{ok}");
    assert_eq!(br.text("#test-failover-status"), "running");
    // The host itself says so.
    let h = b.ferry_json(&["replication", "health", "app"]);
    assert_eq!(h[0]["test_failover_status"], "running", "{h}");
    assert_eq!(b.vm_state("app-test"), "running");
    // And the console's other pages reflect it.
    br.wait_text(
        &format!("{base}/vms"),
        "tr[data-host='site-b'][data-vm='app-test'] .vm-state",
        Duration::from_secs(30),
        |t| t == "running",
    );
    br.screenshot(&shots.join("vms.png"));
    br.wait_text(
        &format!("{base}/"),
        "#relationships tr[data-vm='app'] .last-test",
        Duration::from_secs(30),
        |t| t.ends_with("(running)"),
    );
    // Let a few cycles land so the history charts have something to draw.
    std::thread::sleep(Duration::from_secs(15));
    br.goto(&format!("{base}/"));
    assert!(
        br.count(".charts[data-vm='app'] polyline") >= 3,
        "charts have no data"
    );
    br.screenshot(&shots.join("dashboard.png"));
    br.goto(&format!("{base}/vms"));
    br.click("tr[data-host='site-b'][data-vm='app'] a");
    br.click("#tab-replication");
    assert!(br.count("#points tr") >= 2, "no recovery points shown");
    br.screenshot(&shots.join("vm-replication.png"));

    // Stop the test failover from the page: the test VM is gone.
    br.click("#action-stop_test");
    assert!(br.flash_ok().contains("unchanged"), "{}", br.flash_ok());
    assert_eq!(br.text("#test-failover-status"), "not running");
    assert!(b
        .ferry_err(&["vm", "show", "app-test"])
        .contains("app-test"));
    // Importing an exported initial copy goes to the host, which refuses it here (this
    // replica already holds points): its one-line reason is shown.
    br.fill("#import-dir", "/tmp/nonexistent/export");
    br.click("#action-import");
    let err = br.text("#flash-err");
    assert!(err.contains("already has recovery points"), "{err}");
    br.goto(&format!("{base}/vms"));
    br.click("tr[data-host='site-a'][data-vm='app'] a");
    br.screenshot(&shots.join("vm-overview.png"));

    // Checkpoints of the (replicated) primary: create, rename, apply, delete.
    br.click("#tab-checkpoints");
    for name in ["before-upgrade", "second"] {
        br.fill("#checkpoint-name", name);
        br.click("#action-cp_create");
        br.flash_ok();
        assert_eq!(br.count(&format!("tr[data-checkpoint='{name}']")), 1);
    }
    br.fill(
        "tr[data-checkpoint='before-upgrade'] input[name=name]",
        "baseline",
    );
    br.click("tr[data-checkpoint='before-upgrade'] #action-cp_rename");
    assert_eq!(br.flash_ok(), "checkpoint renamed to baseline");
    br.click("tr[data-checkpoint='baseline'] #action-cp_apply");
    assert!(
        br.text("#confirm-text")
            .contains("everything it wrote since that checkpoint is lost"),
        "{}",
        br.text("#confirm-text")
    );
    br.click("#confirm");
    br.flash_ok();
    let list = a.ferry_json(&["checkpoint", "list", "app"]);
    let id_of = |name: &str| {
        list["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no checkpoint {name}: {list}"))["id"]
            .clone()
    };
    assert_eq!(list["current"], id_of("baseline"), "{list}");
    assert_eq!(br.count("#checkpoint-now"), 1);
    br.screenshot(&shots.join("vm-checkpoints.png"));
    br.click("tr[data-checkpoint='second'] #action-cp_delete");
    assert!(br.text("#confirm-text").contains("Checkpoint second"));
    br.click("#confirm");
    br.flash_ok();
    let list = a.ferry_json(&["checkpoint", "list", "app"]);
    assert_eq!(list["checkpoints"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(br.count("tr[data-checkpoint='second']"), 0);
    // VM actions: the apply left it off; start it and shut it down (ACPI) from its page.
    br.click("#tab-overview");
    assert_eq!(br.text("#vm-state"), "off");
    let boots = a.console("app").matches("GUEST: READY").count();
    br.click("#action-start");
    br.flash_ok();
    assert_eq!(a.vm_state("app"), "running");
    // The console log keeps earlier boots' lines: wait for this boot's READY (the guest
    // listens to the power button from then on).
    a.wait_console(
        "app",
        Duration::from_secs(90),
        "the guest booted again",
        |c| c.matches("GUEST: READY").count() > boots,
    );
    br.click("#action-shutdown");
    br.flash_ok();
    assert_eq!(a.vm_state("app"), "off");

    // Replication actions on the primary: suspend and resume.
    br.click("#tab-replication");
    br.click("#action-suspend");
    assert!(
        br.flash_ok().contains("Replication Paused"),
        "{}",
        br.flash_ok()
    );
    assert_eq!(status(&a, "app")["state"], "suspended");
    br.click("#action-resume");
    br.flash_ok();
    assert_eq!(status(&a, "app")["state"], "replicating");
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    br.click("#action-cycle");
    br.flash_ok();
    ferry_testkit::replication::wait_for("the cycle asked for", Duration::from_secs(60), || {
        status(&a, "app")["last_cycle"].as_i64().unwrap() > cycle
    });
    br.click("#action-reset");
    assert_eq!(
        br.flash_ok(),
        "statistics reset: a new monitoring window started"
    );
    let h = a.ferry_json(&["replication", "health", "app"]);
    assert_eq!(h[0]["errors"], 0, "{h}");

    // Planned failover with reverse replication, from site-a's page: site-b becomes the
    // primary and replicates back to site-a.
    br.check("input[name=reverse]");
    br.click("#action-planned");
    assert!(
        br.text("#confirm-text")
            .contains("with replication reversed"),
        "{}",
        br.text("#confirm-text")
    );
    br.click("#confirm");
    let ok = br.flash_ok();
    assert!(ok.contains("reversed"), "{ok}");
    assert_eq!(status(&b, "app")["role"], "primary");
    assert_eq!(status(&a, "app")["role"], "replica");
    assert_eq!(
        br.text("#replication-state"),
        status(&a, "app")["state_label"]
    );

    // site-a is now the replica: an unplanned failover there (forced: site-b still sends
    // points), then cancelled, back to replicating.
    br.check("form:has(#action-failover) input[name=force]");
    br.click("#action-failover");
    assert!(br.text("#confirm-text").contains("lost"));
    br.click("#confirm");
    br.flash_ok();
    assert_eq!(status(&a, "app")["state"], "failed_over_waiting_completion");
    assert_eq!(br.text("#replication-state"), "Failover Complete");
    br.click("#action-cancel");
    assert!(br.text("#confirm-text").contains("discarded"));
    br.click("#confirm");
    br.flash_ok();
    assert_eq!(status(&a, "app")["state"], "replicating");
    br.goto(&format!("{base}/alerts"));
    br.screenshot(&shots.join("alerts.png"));

    // Logging out ends the session.
    br.click("#logout");
    br.goto(&format!("{base}/vms"));
    assert!(br.url().ends_with("/login"), "{}", br.url());
}

/// The New VM form makes a real VM on site-a (a bad ISO first: ferryd's one line, the form
/// keeps what was typed, nothing is created); its page's status fragment follows a start
/// made with the host's CLI while the page (and what a form on it holds) stays; deleting it
/// shows what is lost, does nothing when cancelled and deletes it when confirmed.
fn create_vm_refresh_and_confirm(
    br: &Browser,
    a: &Host,
    console: &Console,
    cookie: &str,
    shots: &Path,
) {
    br.click("tr[data-host='site-a'] a.create-vm");
    br.fill("#vm-name", "web1");
    br.fill("#vm-cpus", "2");
    br.fill("#vm-memory", "128M");
    br.fill("#disk0-size", "16M");
    br.fill("#vm-iso", "/var/lib/ferry-no-such/install.iso");
    br.select("#vm-machine", "q35 (PCI Express)");
    br.select("#vm-network", "user-mode (NAT)");
    br.click("#create-vm-submit");
    let err = br.text("#form-err");
    assert!(err.contains("install.iso"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let value = |css: &str| {
        br.script(&format!("return document.querySelector({css:?}).value;"))
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(value("#vm-name"), "web1");
    assert_eq!(value("#vm-cpus"), "2");
    assert_eq!(value("#vm-memory"), "128M");
    assert_eq!(value("#disk0-size"), "16M");
    assert_eq!(value("#vm-machine"), "q35");
    assert_eq!(value("#vm-iso"), "/var/lib/ferry-no-such/install.iso");
    assert!(a.ferry_err(&["vm", "show", "web1"]).contains("web1"));
    br.screenshot(&shots.join("create-vm.png"));
    br.fill("#vm-iso", "");
    br.click("#create-vm-submit");
    assert_eq!(br.flash_ok(), "VM web1 created on site-a");
    let vm = a.ferry_json(&["vm", "show", "web1"]);
    assert_eq!(vm["cpus"], 2, "{vm}");
    assert_eq!(vm["memory_mib"], 128, "{vm}");
    assert_eq!(vm["machine"], "q35", "{vm}");
    assert_eq!(vm["disks"].as_array().unwrap().len(), 1, "{vm}");
    assert_eq!(vm["nics"][0]["kind"], "user", "{vm}");
    assert_eq!(vm["state"], "off", "{vm}");
    // The VM's page on the console, e.g. /hosts/1/vms/web1.
    let page = br.url();
    let page = page[page.find("/hosts/").unwrap()..page.find('?').unwrap()].to_owned();

    // The status fragment refreshes by itself: type into a form, start the VM with the
    // host's CLI, and the fragment says running while the page (a marker set in it) and
    // the typed text stay.
    let fragment = || {
        br.script(
            "const d = document.querySelector('#status-frame').contentDocument; \
             const e = d && d.querySelector('#status-state'); return e ? e.textContent : '';",
        )
        .as_str()
        .unwrap_or_default()
        .to_owned()
    };
    br.click("#tab-checkpoints");
    common::wait_until("the fragment shows off", Duration::from_secs(20), || {
        fragment() == "off"
    });
    br.fill("#checkpoint-name", "typed, not sent");
    br.script("window.__ferryKeep = 1;");
    a.ferry_ok(&["vm", "start", "web1"]);
    common::wait_until(
        "the fragment shows running by itself",
        Duration::from_secs(30),
        || fragment() == "running",
    );
    assert_eq!(
        br.script("return window.__ferryKeep;"),
        1,
        "the page was reloaded"
    );
    assert_eq!(value("#checkpoint-name"), "typed, not sent");
    a.ferry_ok(&["vm", "stop", "web1"]);

    // Delete asks first, says what is lost, and does nothing when cancelled.
    br.click("#tab-overview");
    br.click("#action-delete");
    let text = br.text("#confirm-text");
    assert!(
        text.contains("VM web1 is deleted from site-a with all its disks"),
        "{text}"
    );
    br.screenshot(&shots.join("confirm.png"));
    br.click("#confirm-cancel");
    assert!(br.url().ends_with("?tab=overview"), "{}", br.url());
    assert_eq!(a.vm_state("web1"), "off");
    // A POST without the confirmation (an old page, a script) only leads to that page,
    // and a confirmed one from another site is refused.
    let to = console.post(cookie, &format!("{page}/action"), &[("action", "delete")]);
    assert_eq!(to, format!("{page}/confirm?action=delete"));
    let r = http(
        &console.addr,
        "POST",
        &format!("{page}/action"),
        &[
            ("Cookie", cookie),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        &form(&[("action", "delete"), ("confirmed", "yes")]),
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(a.vm_state("web1"), "off");
    br.click("#action-delete");
    br.click("#confirm");
    assert_eq!(br.flash_ok(), "VM web1 deleted with its disks");
    assert!(br.url().contains("/vms?"), "{}", br.url());
    assert!(a.ferry_err(&["vm", "show", "web1"]).contains("web1"));
}
