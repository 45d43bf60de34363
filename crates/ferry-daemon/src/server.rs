//! Serving the router: one accept loop for the admin unix socket and one for the TLS
//! port, both stopping on the shutdown signal and letting in-flight requests finish.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::limits::{self, ConnLimits};

/// How long in-flight requests may run after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the TLS API holds at once (admins, consoles, monitoring).
const MAX_API_CONNS: usize = 256;
/// Of which from one address.
const MAX_API_CONNS_PER_PEER: usize = 32;

/// Binds the admin socket (mode 0600: whoever can open it is the host's admin).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a killed ferryd would make bind fail with EADDRINUSE.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another ferryd is serving {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Created 0600 (ferryd runs with umask 077 from its first instruction), so there is no
    // moment when another user could connect; the chmod only states it.
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn serve_conn<S>(io: S, router: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    // Without a timer hyper's header timeout is off: a client that connects and says
    // nothing (or one byte a second) would hold its connection forever.
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits::HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        debug!(error = %e, "connection ended with an error");
    }
}

/// Serves `router` on the unix socket until `shutdown` turns true.
pub async fn serve_unix(listener: UnixListener, router: Router, shutdown: watch::Receiver<bool>) {
    let stopped = until_true(shutdown);
    tokio::pin!(stopped);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { conns.spawn(serve_conn(stream, router.clone())); }
                Err(e) => { warn!(error = %e, "accept on the admin socket failed"); tokio::time::sleep(Duration::from_millis(100)).await; }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drain(conns).await;
}

/// Serves `router` over TLS on `listener` until `shutdown` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: watch::Receiver<bool>,
) {
    let stopped = until_true(shutdown);
    tokio::pin!(stopped);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let limits = ConnLimits::new("the TLS API", MAX_API_CONNS, MAX_API_CONNS_PER_PEER);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let guard = match limits.admit(peer.ip()) {
                        Ok(g) => g,
                        Err(why) => {
                            debug!(%peer, "connection refused: {why}");
                            continue;
                        }
                    };
                    let acceptor = acceptor.clone();
                    let router = router.clone();
                    conns.spawn(async move {
                        let _guard = guard;
                        match tokio::time::timeout(limits::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => serve_conn(stream, router).await,
                            Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => { warn!(error = %e, "accept on the TLS port failed"); tokio::time::sleep(Duration::from_millis(100)).await; }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drain(conns).await;
}

/// Resolves once the flag turns true (or its sender is gone).
async fn until_true(mut flag: watch::Receiver<bool>) {
    while !*flag.borrow_and_update() {
        if flag.changed().await.is_err() {
            return;
        }
    }
}

async fn drain(mut conns: JoinSet<()>) {
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}
