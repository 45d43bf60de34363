//! A TCP link between two hosts that a test can cut: a forwarding proxy on loopback. The
//! primary is pointed at the proxy's address instead of the replica's; `cut` kills every
//! connection in flight (as a failed link does), `partition` also refuses new ones.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// A cuttable TCP link to `target`.
pub struct Link {
    /// Where the primary connects.
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    target: SocketAddr,
    live: Mutex<Vec<TcpStream>>,
    partitioned: AtomicBool,
    connections: AtomicU64,
    /// Bytes per second each direction of each connection may carry (0: no limit).
    rate: AtomicU64,
}

impl Link {
    /// Listens on `ip` (a free port) and forwards every connection to `target`.
    pub fn start(ip: &str, target: SocketAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind the link");
        let addr = listener.local_addr().expect("link addr");
        let state = Arc::new(State {
            target,
            live: Mutex::new(Vec::new()),
            partitioned: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        });
        let s = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(inbound) = conn else { continue };
                if s.partitioned.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(s.target) else {
                    continue;
                };
                s.connections.fetch_add(1, Ordering::SeqCst);
                {
                    let mut live = s.live.lock().expect("live");
                    live.push(inbound.try_clone().expect("clone"));
                    live.push(outbound.try_clone().expect("clone"));
                }
                pipe(
                    inbound.try_clone().expect("clone"),
                    outbound.try_clone().expect("clone"),
                    s.clone(),
                );
                pipe(outbound, inbound, s.clone());
            }
        });
        Self { addr, state }
    }

    /// Kills every connection in flight.
    pub fn cut(&self) {
        for s in self.state.live.lock().expect("live").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Cuts the link and refuses new connections until `heal`.
    pub fn partition(&self) {
        self.state.partitioned.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.state.partitioned.store(false, Ordering::SeqCst);
    }

    /// Slows the link to `bytes_per_s` each way (`None`: full speed), from now on, for the
    /// connections in flight too.
    pub fn set_rate(&self, bytes_per_s: Option<u64>) {
        self.state
            .rate
            .store(bytes_per_s.unwrap_or(0), Ordering::SeqCst);
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }
}

/// Copies one direction; when it ends (EOF or error) both sockets are closed both ways, as
/// a peer's reset would: a dead peer must not leave the other side writing into a buffer.
fn pipe(mut from: TcpStream, mut to: TcpStream, state: Arc<State>) {
    thread::spawn(move || {
        use std::io::{Read, Write};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            // Paced per chunk: a slow link, not a stalled one.
            let rate = state.rate.load(Ordering::SeqCst);
            if rate > 0 {
                thread::sleep(std::time::Duration::from_secs_f64(n as f64 / rate as f64));
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
