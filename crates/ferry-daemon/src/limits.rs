//! Limits on what network clients can hold: connections open at once, in all and per peer
//! address, and how long a client may take to say what it wants. A slow or silent client
//! (or a thousand of them) must not exhaust ferryd's file descriptors or stall others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request's headers must arrive within this (TLS API); a silent connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The TLS handshake must finish within this (TLS API and replication port).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body the API accepts (the largest real one, a replica-server setting
/// with a CA bundle, is a few KiB).
pub const MAX_BODY: usize = 1 << 20;

/// Counts open connections, refusing those over the limits.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    what: &'static str,
    total: usize,
    per_peer: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnGuard {
    limits: ConnLimits,
    peer: IpAddr,
}

impl ConnLimits {
    /// At most `total` connections, `per_peer` of them from one address, to `what`.
    pub fn new(what: &'static str, total: usize, per_peer: usize) -> Self {
        Self {
            what,
            total,
            per_peer,
            open: Arc::default(),
        }
    }

    /// A place for a connection from `peer`, or why not.
    pub fn admit(&self, peer: IpAddr) -> Result<ConnGuard, String> {
        let mut open = self.open.lock().expect("connection counts");
        let all: usize = open.values().sum();
        let mine = open.get(&peer).copied().unwrap_or(0);
        if all >= self.total {
            return Err(format!(
                "{} has {all} connections open, its limit",
                self.what
            ));
        }
        if mine >= self.per_peer {
            return Err(format!(
                "{peer} has {mine} connections open to {}, the limit per address",
                self.what
            ));
        }
        *open.entry(peer).or_default() += 1;
        Ok(ConnGuard {
            limits: self.clone(),
            peer,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().expect("connection counts");
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Raises this process's open-file limit to its hard limit: QEMU processes, NBD sockets,
/// images and clients all count, and the limits above are sized for it.
pub fn raise_fd_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_peer_and_in_all_and_frees_on_drop() {
        let l = ConnLimits::new("the test port", 3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert!(l.admit(a).unwrap_err().contains("limit per address"));
        let _b1 = l.admit(b).unwrap();
        assert!(l.admit(b).unwrap_err().contains("its limit"));
        drop(a1);
        l.admit(b).unwrap();
    }
}
