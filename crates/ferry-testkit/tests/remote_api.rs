//! The same API over TLS for remote admin: the certificate created at first start is
//! pinned by the fingerprint `ferry server show` prints, and the API token is required.

use ferry_testkit::host::Host;

#[test]
fn remote_admin_over_tls_needs_the_pinned_certificate_and_the_token() {
    let a = Host::start("host-a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("host-b", "127.0.0.2", "accel = \"tcg\"");
    let (token, fp) = b.credentials();
    assert_eq!(fp.len(), 95, "{fp}");
    let url = format!("https://{}", b.tls_addr);

    // With URL + token + fingerprint, host a's CLI manages host b.
    let shown = a.ferry_json(&[
        "--host",
        &url,
        "--token",
        &token,
        "--fingerprint",
        &fp,
        "server",
        "show",
    ]);
    assert_eq!(shown["name"], "host-b");
    assert_eq!(shown["fingerprint"], fp.as_str());
    a.ferry_ok(&[
        "--host",
        &url,
        "--token",
        &token,
        "--fingerprint",
        &fp,
        "vm",
        "create",
        "remote1",
        "--memory",
        "64M",
        "--disk",
        "16M",
    ]);
    assert_eq!(b.ferry_json(&["vm", "list"])[0]["name"], "remote1");
    assert_eq!(a.ferry_json(&["vm", "list"]), serde_json::json!([]));

    // A remembered host by name, fingerprint pasted in lower case without colons.
    let fp_plain = fp.replace(':', "").to_lowercase();
    a.ferry_ok(&[
        "host",
        "add",
        "b",
        &url,
        "--fingerprint",
        &fp_plain,
        "--token",
        &token,
    ]);
    assert!(a.ferry_ok(&["host", "list"]).contains(&b.tls_addr));
    assert_eq!(
        a.ferry_json(&["--host", "b", "vm", "show", "remote1"])["state"],
        "off"
    );
    a.ferry_ok(&["--host", "b", "vm", "delete", "remote1"]);
    assert_eq!(b.ferry_json(&["vm", "list"]), serde_json::json!([]));

    // Wrong token: refused by the server.
    let err = a.ferry_err(&[
        "--host",
        &url,
        "--token",
        "wrong",
        "--fingerprint",
        &fp,
        "vm",
        "list",
    ]);
    assert!(err.contains("API token"), "{err}");
    // Wrong fingerprint (host a's): refused by the client before any request is sent.
    let (_, fp_a) = a.credentials();
    let err = a.ferry_err(&[
        "--host",
        &url,
        "--token",
        &token,
        "--fingerprint",
        &fp_a,
        "vm",
        "list",
    ]);
    assert!(
        err.contains("TLS handshake") && err.contains("not the pinned"),
        "{err}"
    );
    // Nothing listening: a clear connect error.
    let err = a.ferry_err(&[
        "--host",
        "https://127.0.0.1:1",
        "--token",
        "t",
        "--fingerprint",
        &fp,
        "vm",
        "list",
    ]);
    assert!(err.contains("cannot connect"), "{err}");

    a.ferry_ok(&["host", "remove", "b"]);
    let err = a.ferry_err(&["--host", "b", "vm", "list"]);
    assert!(err.contains("unknown host"), "{err}");
}
