//! Slow and silent clients cannot hold ferryd: connections that never finish a TLS
//! handshake, never send a request's headers, or send them a byte at a time are closed
//! after the timeouts; one address cannot take every connection; bodies are bounded; and
//! meanwhile everyone else is served. The API token can be given without showing it in the
//! process list.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ferry_testkit::host::Host;
use ferry_testkit::hostile::HostilePeer;
use ferry_testkit::replication::enable_replica_server;

/// A TCP connection to `to` from the local address `from_ip` (its own "peer").
fn connect_from(from_ip: &str, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{from_ip}:0").parse().unwrap()).unwrap();
        let std = s.connect(to).await.unwrap().into_std().unwrap();
        std.set_nonblocking(false).unwrap();
        std
    })
}

/// Whether ferryd has closed `s` (EOF or reset), waiting up to `wait` for it.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn silent_and_slow_clients_are_cut_off_and_others_still_served() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    enable_replica_server(&a, "127.0.0.1");
    let info = a.ferry_json(&["replica-server", "show"]);
    let repl: SocketAddr = info["listening"].as_str().unwrap().parse().unwrap();
    let api: SocketAddr = a.tls_addr.parse().unwrap();
    let (token, fp) = a.credentials();
    let token_file = a.dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let url = format!("https://{}", a.tls_addr);
    let remote = |args: &[&str]| {
        let mut all = vec![
            "--host",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
            "--fingerprint",
            &fp,
        ];
        all.extend_from_slice(args);
        a.ferry_json(&all)
    };

    // One address opens far more connections than it may hold, to both ports, and says
    // nothing. Those over its share are closed at once.
    let started = Instant::now();
    let mut silent_api: Vec<TcpStream> = (0..60).map(|_| connect_from("127.0.0.3", api)).collect();
    let mut silent_repl: Vec<TcpStream> =
        (0..200).map(|_| connect_from("127.0.0.3", repl)).collect();
    let cut_at_once = |conns: &mut [TcpStream]| {
        conns
            .iter_mut()
            .map(|s| closed_within(s, Duration::from_millis(300)))
            .filter(|closed| *closed)
            .count()
    };
    assert!(
        cut_at_once(&mut silent_api) >= 60 - 32,
        "the API let one address hold more than 32 connections"
    );
    assert!(
        cut_at_once(&mut silent_repl) >= 200 - 128,
        "the replication port let one address hold more than 128 connections"
    );

    // Everyone else is served meanwhile: the API (token from a file, not the command line)
    // and the replication port (an unknown certificate is refused, with the reason).
    assert_eq!(remote(&["server", "show"])["name"], "a");
    let self_signed = Host::start_self_signed("s2", "127.0.0.4", "");
    let read = |f: &str| std::fs::read(self_signed.data_dir.join(f)).unwrap();
    let mut peer = HostilePeer::connect(
        &repl.to_string(),
        info["fingerprint"].as_str().unwrap(),
        &read("host.crt"),
        &read("host.key"),
    )
    .unwrap();
    let reply = peer.recv(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(reply["type"], "refused", "{reply}");

    // A TLS client that completes the handshake and then sends one header byte a second
    // never finishes its request: it is cut off by the header timeout.
    let slow = connect_from("127.0.0.5", api);
    let mut tls = {
        let config = ferry_client::pinned_client_config(&fp, None).unwrap();
        let conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            rustls::pki_types::ServerName::try_from("ferryd").unwrap(),
        )
        .unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        rustls::StreamOwned::new(conn, slow)
    };
    let slow_started = Instant::now();
    let mut cut = false;
    for b in b"GET /v1/server HTTP/1.1\r\nHost: a\r\nX-Slow: "
        .iter()
        .cycle()
    {
        if let Err(e) = tls.write_all(&[*b]).and_then(|()| tls.flush()) {
            println!("the slow client's write failed: {e}");
            cut = true;
            break;
        }
        if slow_started.elapsed() > Duration::from_secs(25) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    assert!(
        cut,
        "a client sending a header byte a second was served for 25 s"
    );
    let held = slow_started.elapsed();
    assert!(held >= Duration::from_secs(9), "cut after {held:?}");
    println!("slow client cut off after {held:?}");

    // The silent ones that were admitted are closed once the handshake timeout passes.
    let deadline = started + Duration::from_secs(20);
    for s in silent_api.iter_mut().chain(silent_repl.iter_mut()) {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100);
        assert!(
            closed_within(s, left),
            "a silent connection was still open {:?} after it was made",
            started.elapsed()
        );
    }

    // Bodies are bounded: 2 MiB to any route is refused with one line; the API still works.
    let big = format!(
        "{{\"enabled\": true, \"trusted_ca\": \"{}\"}}",
        "A".repeat(2 << 20)
    );
    let out = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&a.socket)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
            "-w",
            "\n%{http_code}",
            "http://ferry/v1/replica-server",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(big.as_bytes())?;
            c.wait_with_output()
        })
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.trim_end().ends_with("413"), "{text}");
    assert_eq!(remote(&["server", "show"])["name"], "a");
}
