//! The testkit's WAN link (issue 12): added round-trip time and a bandwidth throttle in
//! userspace, bytes delivered exactly and in order, and a cut still ends the connection.
//! Only lower bounds on time are asserted (a shared machine can be slower, never faster
//! than the link allows).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use ferry_testkit::link::Link;

/// An echo server on 127.0.0.2: every byte back, until EOF.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.2:0").expect("bind");
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Pseudo-random bytes (xorshift), so a reordering or a lost chunk shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn the_link_adds_round_trip_time_and_throttles_and_delivers_every_byte_in_order() {
    let link = Link::start("127.0.0.1", echo_server());
    link.set_rtt(Duration::from_millis(100));
    let mut c = TcpStream::connect(link.addr).expect("connect through the link");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

    // One byte there and back crosses the link twice: at least the RTT.
    for _ in 0..3 {
        let t = Instant::now();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(100), "round trip {rtt:?}");
    }

    // Throttled to 2 MiB/s each way: 3 MiB echoed takes at least ~1.5 s (both directions
    // run at once), and comes back exactly as sent.
    link.set_rate(Some(2 * 1024 * 1024));
    let data = pattern(3 * 1024 * 1024, 7);
    let t = Instant::now();
    let mut w = c.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || w.write_all(&sent).unwrap());
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    let took = t.elapsed();
    assert!(back == data, "the echoed bytes differ from those sent");
    assert!(
        took >= Duration::from_millis(1400),
        "3 MiB at 2 MiB/s took only {took:?}"
    );

    // Back to full speed, no added latency: fast again (and still exact).
    link.set_rate(None);
    link.set_rtt(Duration::ZERO);
    let data = pattern(1024 * 1024, 9);
    c.write_all(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).unwrap();
    assert!(back == data);

    // A cut ends the connection: the next read sees EOF or an error, not a hang.
    link.set_rtt(Duration::from_millis(100));
    link.cut();
    let mut b = [0u8; 1];
    let r = c.write_all(b"y").and_then(|_| c.read(&mut b));
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert_eq!(link.connections(), 1);
}
