//! Access to the console without any host: the reverse-proxy header mode (no page without
//! the header, the user shown as the proxy names it), password rules of `set-password`,
//! and bad config files refused in one line before anything starts.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{form, http, http_from, Console, PASSWORD, USER};
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
    // ... but may frame the console's own status fragments, which alone may be framed,
    // only by the console's pages, and run no script either.
    assert!(csp.contains("frame-src 'self'"), "{csp}");
    assert!(!csp.contains("script-src"), "{csp}");
    let r = http(
        &c.addr,
        "GET",
        "/status",
        &[("X-Forwarded-User", "ops-alice")],
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains(r#"http-equiv="refresh""#), "{r:?}");
    let csp = r.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("default-src 'none'")
            && csp.contains("frame-ancestors 'self'")
            && !csp.contains("script-src"),
        "{r:?}"
    );
    assert_eq!(r.header("x-frame-options"), Some("SAMEORIGIN"));

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
        // Anyone reaching a public address could set the user header.
        (
            "listen = \"0.0.0.0:1\"\ndata_dir = \"/tmp/x\"\n[auth]\nmode = \"proxy_header\"\nheader = \"X-Forwarded-User\"\n",
            "listen on loopback or set trusted_proxies",
        ),
        (
            "listen = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\nwebhook_allow = [\"intranet\"]\n",
            "webhook_allow: \"intranet\": use IP or IP/PREFIX",
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

#[test]
fn proxy_header_is_taken_only_from_trusted_proxies_and_webhooks_stay_outside() {
    // The proxy is 127.0.0.2; this test's ordinary requests come from 127.0.0.1, a peer
    // that reaches the console directly.
    let c = Console::start_with(
        60,
        "trusted_proxies = [\"127.0.0.2\"]\n[auth]\nmode = \"proxy_header\"\nheader = \"X-Forwarded-User\"\n",
    );
    let user = ("X-Forwarded-User", "ops-alice");
    for (method, path) in [("GET", "/vms"), ("POST", "/hosts"), ("GET", "/")] {
        let r = http(&c.addr, method, path, &[user], "");
        assert_eq!(r.status, 403, "{method} {path}: {r:?}");
        assert_eq!(r.body.trim().lines().count(), 1, "{r:?}");
        assert!(
            r.body.contains("127.0.0.1 is not one (trusted_proxies)"),
            "{r:?}"
        );
    }
    let r = http_from("127.0.0.2", &c.addr, "GET", "/vms", &[user], "");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("ops-alice"));

    // Webhooks may not target internal addresses the config does not list: the settings
    // are refused in one line and nothing changes.
    for (url, want) in [
        (
            "http://127.0.0.1:9/hook",
            "127.0.0.1 is a loopback address; refused unless listed in webhook_allow",
        ),
        (
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254 is a link-local address",
        ),
        ("http://localhost:9/hook", "is a loopback address"),
    ] {
        let r = http_from(
            "127.0.0.2",
            &c.addr,
            "POST",
            "/alerts/settings",
            &[user, ("Content-Type", "application/x-www-form-urlencoded")],
            &form(&[("health_min", "warning"), ("webhook_url", url)]),
        );
        assert_eq!(r.status, 303, "{r:?}");
        let to = r.header("location").unwrap_or_default();
        let err = percent_decode(to.split_once("err=").expect(to).1);
        assert!(err.contains(want), "{url}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let page = http_from("127.0.0.2", &c.addr, "GET", "/alerts", &[user], "");
    assert!(
        !page.body.contains("127.0.0.1:9/hook"),
        "the settings changed"
    );
    assert!(
        !page.body.contains("169.254.169.254"),
        "the settings changed"
    );
}

fn login_from(
    c: &Console,
    source: &str,
    user: &str,
    password: &str,
    extra: &[(&str, &str)],
) -> common::Answer {
    let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
    headers.extend_from_slice(extra);
    http_from(
        source,
        &c.addr,
        "POST",
        "/login",
        &headers,
        &form(&[("user", user), ("password", password)]),
    )
}

#[test]
fn cookies_are_secure_over_https_sessions_end_with_a_new_password_and_logins_are_throttled() {
    let c = Console::start(60);
    // Plain http: no `Secure` (the browser would drop the cookie), HttpOnly and SameSite.
    let r = login_from(&c, "127.0.0.1", USER, PASSWORD, &[]);
    assert_eq!(r.status, 303, "{r:?}");
    let set = r.header("set-cookie").unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(!set.contains("Secure"), "{set}");
    let plain = set.split(';').next().unwrap().to_owned();
    // Through a proxy on this machine (loopback is trusted when no proxies are listed)
    // that says the browser used https: `Secure`.
    let r = login_from(
        &c,
        "127.0.0.1",
        USER,
        PASSWORD,
        &[("X-Forwarded-Proto", "https")],
    );
    let set = r.header("set-cookie").unwrap().to_owned();
    assert!(set.contains("; Secure"), "{set}");
    let secure = set.split(';').next().unwrap().to_owned();
    for cookie in [&plain, &secure] {
        assert!(c.get(cookie, "/hosts").contains("Hosts"));
    }

    // A new password ends every session of the user.
    let dir = c.config();
    let (ok, err) = console_cmd(&dir, &["set-password", USER], &format!("{PASSWORD}\n"));
    assert!(ok, "{err}");
    for cookie in [&plain, &secure] {
        let r = http(&c.addr, "GET", "/hosts", &[("Cookie", cookie)], "");
        assert_eq!(r.status, 303, "the old session still works: {r:?}");
        assert_eq!(r.header("location"), Some("/login"));
    }
    let cookie = c.login();
    assert!(c.get(&cookie, "/hosts").contains("Hosts"));

    // Five failures from one address (the proxy's X-Forwarded-For) lock that address,
    // even for the right password of another user…
    let via = |ip: &'static str| [("X-Forwarded-For", ip)];
    for i in 0..5 {
        let r = login_from(
            &c,
            "127.0.0.1",
            &format!("guess{i}"),
            "wrong",
            &via("10.0.0.1"),
        );
        assert_eq!(r.status, 401, "{r:?}");
    }
    let r = login_from(&c, "127.0.0.1", USER, PASSWORD, &via("10.0.0.1"));
    assert_eq!(r.status, 429, "{r:?}");
    assert!(
        r.body.contains(
            "too many failed logins for this user or from this address: try again in 15 min"
        ),
        "{}",
        r.body
    );
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert!(r.header("set-cookie").is_none());
    // …but not the user from elsewhere.
    assert_eq!(
        login_from(&c, "127.0.0.1", USER, PASSWORD, &via("10.0.0.2")).status,
        303
    );
    // Five failures for one user from five addresses lock the user everywhere.
    for i in 0..5 {
        let ip = ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5"][i];
        assert_eq!(
            login_from(&c, "127.0.0.1", USER, "wrong", &via(ip)).status,
            401
        );
    }
    for ip in ["10.0.0.3", "10.0.1.1"] {
        let r = login_from(&c, "127.0.0.1", USER, PASSWORD, &via(ip));
        assert_eq!(r.status, 429, "{ip}: {r:?}");
    }
    // A burst of parallel guesses is no way around it: the count is checked again when
    // each guess gets its turn at the (two) password checkers.
    let answers: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..12)
            .map(|i| {
                let c = &c;
                sc.spawn(move || {
                    let ip = format!("10.0.2.{i}");
                    let xff = [("X-Forwarded-For", ip.as_str())];
                    login_from(c, "127.0.0.1", "burst", "wrong", &xff).status
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let checked = answers.iter().filter(|&&a| a == 401).count();
    assert!((5..=6).contains(&checked), "{answers:?}");
    assert_eq!(answers.iter().filter(|&&a| a == 429).count(), 12 - checked);
    // The existing session is untouched by the lock.
    assert!(c.get(&cookie, "/hosts").contains("Hosts"));
    assert!(c.log().contains("login refused: too many failures"));
}

#[test]
fn forwarded_headers_count_only_from_listed_proxies() {
    let c = Console::start_with(60, "trusted_proxies = [\"127.0.0.2\"]");
    let https = [("X-Forwarded-Proto", "https")];
    let r = login_from(&c, "127.0.0.1", USER, PASSWORD, &https);
    assert_eq!(r.status, 303, "{r:?}");
    assert!(!r.header("set-cookie").unwrap().contains("Secure"), "{r:?}");
    let r = login_from(&c, "127.0.0.2", USER, PASSWORD, &https);
    assert!(
        r.header("set-cookie").unwrap().contains("; Secure"),
        "{r:?}"
    );
    // A peer that is not a listed proxy cannot dodge the address throttle by claiming
    // other addresses in X-Forwarded-For: its failures count against its own address.
    for ip in ["10.2.0.1", "10.2.0.2", "10.2.0.3", "10.2.0.4", "10.2.0.5"] {
        let r = login_from(
            &c,
            "127.0.0.3",
            &format!("g{ip}"),
            "wrong",
            &[("X-Forwarded-For", ip)],
        );
        assert_eq!(r.status, 401, "{r:?}");
    }
    let r = login_from(
        &c,
        "127.0.0.3",
        USER,
        PASSWORD,
        &[("X-Forwarded-For", "10.2.0.9")],
    );
    assert_eq!(r.status, 429, "{r:?}");
}

/// Decodes `%XX` escapes (the console's redirects carry their message so).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
