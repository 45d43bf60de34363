//! Access to the console without any host: the reverse-proxy header mode (no page without
//! the header, the user shown as the proxy names it), password rules of `set-password`,
//! and bad config files refused in one line before anything starts.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{http, Console};
use ferry_testkit::bin_dir;

#[test]
fn proxy_header_mode_needs_the_header_on_every_page_and_action() {
    let c = Console::start_with(
        60,
        "[auth]\nmode = \"proxy_header\"\nheader = \"X-Forwarded-User\"\n",
    );
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/hosts"),
        ("GET", "/alerts"),
        ("POST", "/hosts"),
    ] {
        let r = http(&c.addr, method, path, &[], "");
        assert_eq!(r.status, 401, "{method} {path}: {r:?}");
        assert!(r.body.contains("no authenticated user"), "{r:?}");
        // An empty header is no user either.
        let r = http(&c.addr, method, path, &[("X-Forwarded-User", " ")], "");
        assert_eq!(r.status, 401, "{method} {path}: {r:?}");
    }
    let r = http(
        &c.addr,
        "GET",
        "/vms",
        &[("X-Forwarded-User", "ops-alice")],
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains("ops-alice"),
        "the page does not name the user"
    );
    // The login form is not offered: the proxy authenticates.
    let r = http(&c.addr, "GET", "/login", &[], "");
    assert_eq!(r.status, 303);

    // Pages tell the browser to run no script and refuse framing.
    let r = http(
        &c.addr,
        "GET",
        "/hosts",
        &[("X-Forwarded-User", "ops-alice")],
        "",
    );
    let csp = r.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{r:?}"
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"));

    // The proxy's header alone does not let another site post the console's forms: a
    // browser says where a request came from, and cross-site ones are refused.
    let user = ("X-Forwarded-User", "ops-alice");
    for from in [
        ("Origin", "http://evil.example"),
        ("Sec-Fetch-Site", "cross-site"),
    ] {
        let r = http(&c.addr, "POST", "/alerts/test", &[user, from], "");
        assert_eq!(r.status, 403, "{from:?}: {r:?}");
        assert!(r.body.contains("another site"), "{r:?}");
    }
    // The console's own pages (same origin) may post.
    let origin = format!("http://{}", c.addr);
    let r = http(
        &c.addr,
        "POST",
        "/alerts/test",
        &[user, ("Origin", &origin), ("Sec-Fetch-Site", "same-origin")],
        "",
    );
    assert_ne!(r.status, 403, "{r:?}");
}

fn console_cmd(config: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(bin_dir().join("ferry-console"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[test]
fn bad_configs_and_weak_passwords_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("console.toml");
    let data = dir.path().join("data");
    for (text, want) in [
        (
            "listen = \"localhost\"\ndata_dir = \"/tmp/x\"\n",
            "use IP:PORT",
        ),
        (
            "listen = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\ncolour = 1\n",
            "unknown field",
        ),
        (
            "listen = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n[auth]\nmode = \"ldap\"\n",
            "unknown variant",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        let (ok, err) = console_cmd(&config, &[], "");
        assert!(!ok, "{text}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("ferry-console: error: "), "{err}");
        assert!(err.contains(want), "{text}: {err}");
    }
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:1\"\ndata_dir = \"{}\"\n",
            data.display()
        ),
    )
    .unwrap();
    // No user yet: serving is refused with what to do.
    let (ok, err) = console_cmd(&config, &[], "");
    assert!(!ok);
    assert!(err.contains("set-password"), "{err}");
    let (ok, err) = console_cmd(&config, &["set-password", "admin"], "short\n");
    assert!(!ok);
    assert!(err.contains("at least 8 characters"), "{err}");
    let (ok, err) = console_cmd(
        &config,
        &["set-password", "admin"],
        "long enough password\n",
    );
    assert!(ok, "{err}");
    // The store is private to the console's user: it holds tokens and the SMTP password.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&data).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    let phc = Command::new("sqlite3")
        .arg(data.join("console.db"))
        .arg("SELECT phc FROM users WHERE name = 'admin'")
        .output()
        .unwrap();
    let phc = String::from_utf8_lossy(&phc.stdout);
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    assert!(!phc.contains("long enough"), "{phc}");
}
