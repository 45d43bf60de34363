//! A TCP link between two hosts that a test can cut, slow down and lengthen: a forwarding
//! proxy on loopback. The primary is pointed at the proxy's address instead of the
//! replica's; `cut` kills every connection in flight (as a failed link does), `partition`
//! also refuses new ones, `set_rate` throttles it and `set_rtt` adds latency — a WAN in
//! userspace, as this kernel has no netem.
//!
//! Each direction of a connection is a reader thread and a writer thread: the reader
//! stamps every chunk with the time it may leave (now + half the RTT) and queues it; the
//! writer sends it no earlier, and no faster than the rate. The queue holds at most the
//! link's bandwidth-delay product plus 1 MiB (a router's buffer): beyond that the reader
//! stops reading, TCP's flow control pushes back on the sender, as on a real path.

use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

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
    /// Added one-way delay, in microseconds (half the added round-trip time).
    one_way_us: AtomicU64,
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
            one_way_us: AtomicU64::new(0),
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

    /// Adds `rtt` of round-trip time (half each way) to every byte from now on (zero: none).
    pub fn set_rtt(&self, rtt: Duration) {
        self.state
            .one_way_us
            .store(rtt.as_micros() as u64 / 2, Ordering::SeqCst);
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }
}

/// Chunks read but not yet sent, with the time each may leave.
struct Queue {
    chunks: Mutex<(VecDeque<(Instant, Vec<u8>)>, usize, bool)>,
    changed: Condvar,
}

const CHUNK: usize = 16 * 1024;

/// Copies one direction; when it ends (EOF or error) both sockets are closed both ways, as
/// a peer's reset would: a dead peer must not leave the other side writing into a buffer.
fn pipe(mut from: TcpStream, mut to: TcpStream, state: Arc<State>) {
    use std::io::{Read, Write};
    let queue = Arc::new(Queue {
        chunks: Mutex::new((VecDeque::new(), 0, false)),
        changed: Condvar::new(),
    });
    let q = queue.clone();
    let s = state.clone();
    // The writer closes both sockets when it ends, which also wakes a reader blocked in read.
    let from_w = from.try_clone().expect("clone");
    // Reader: stamps and queues.
    thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let delay = Duration::from_micros(s.one_way_us.load(Ordering::SeqCst));
            let due = Instant::now() + delay;
            let rate = s.rate.load(Ordering::SeqCst);
            let cap = if rate == 0 {
                64 * CHUNK
            } else {
                (rate as f64 * delay.as_secs_f64()) as usize + 1024 * 1024
            };
            let mut g = q.chunks.lock().expect("queue");
            while g.1 > cap && !g.2 {
                g = q.changed.wait(g).expect("queue");
            }
            if g.2 {
                break;
            }
            g.0.push_back((due, buf[..n].to_vec()));
            g.1 += n;
            q.changed.notify_all();
        }
        // EOF or an error: the writer sends what is queued, then closes both ways.
        let mut g = q.chunks.lock().expect("queue");
        g.2 = true;
        q.changed.notify_all();
    });
    // Writer: sends each chunk when it is due, paced to the rate.
    thread::spawn(move || {
        let mut next_free = Instant::now();
        loop {
            let (due, chunk) = {
                let mut g = queue.chunks.lock().expect("queue");
                loop {
                    if let Some(c) = g.0.pop_front() {
                        g.1 -= c.1.len();
                        queue.changed.notify_all();
                        break c;
                    }
                    if g.2 {
                        drop(g);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from_w.shutdown(Shutdown::Both);
                        return;
                    }
                    g = queue.changed.wait(g).expect("queue");
                }
            };
            let now = Instant::now();
            let leave = due.max(next_free).max(now);
            if leave > now {
                thread::sleep(leave - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
            // Paced per chunk: a slow link, not a stalled one.
            let rate = state.rate.load(Ordering::SeqCst);
            next_free = if rate > 0 {
                leave.max(Instant::now() - Duration::from_millis(1))
                    + Duration::from_secs_f64(chunk.len() as f64 / rate as f64)
            } else {
                Instant::now()
            };
        }
        // The far end is gone: stop the reader too.
        let mut g = queue.chunks.lock().expect("queue");
        g.2 = true;
        queue.changed.notify_all();
        drop(g);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from_w.shutdown(Shutdown::Both);
    });
}
