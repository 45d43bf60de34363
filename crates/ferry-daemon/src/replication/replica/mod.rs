//! The replica server: authorizes primaries by their certificate, receives cycles, and
//! keeps recovery points as a qcow2 chain per disk.
//!
//! Each cycle is written into a new qcow2 layer on top of the previous point's layer,
//! through `qemu-nbd` (write, write-zeroes, flush); the layers are fsynced, and only then is
//! the recovery point committed in the store, in the same transaction as the
//! relationship's progress. So a point exists exactly when all of its data is durable, and
//! a half-received cycle is never visible: its layers are not referenced by any point, and
//! are deleted at startup (or continued, if the link dropped and the primary resumes).
//!
//! Retention merges the layer of a dropped point's successor into the dropped point's
//! layer (`qemu-img commit`), re-points the successor's record to the merged layer, and
//! rebases the layer above (`qemu-img rebase -u`: the content below is unchanged). At
//! every step the chain stays valid, so a crash mid-merge loses nothing.
//!
//! The code walks the data path forward, one module per stage: `session` answers a
//! primary's greeting and dispatches its messages; a cycle (`cycle`) is received and
//! checked (`receive`), written into its layers (`apply`), and made durable and recorded as
//! a recovery point (`commit`), with `staging` keeping a half-received cycle resumable;
//! `retention` merges points away afterwards. Beside the data path: the replica VM a
//! greeting describes (`replica_vm`), reverse replication (`reverse`), an exported initial
//! copy (`import`), hash answers for comparing disks (`disk_hashes`), and removal
//! (`remove`). This module is the server itself: its configuration, the listener, and
//! which peers may talk to it.

mod apply;
mod commit;
mod cycle;
mod disk_hashes;
mod import;
mod receive;
mod remove;
mod replica_vm;
mod retention;
mod reverse;
mod session;
mod staging;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ferry_api_types::{AuthorizationEntry, ReplicaServerConfig};
use ferry_domain::VmSpec;
use ferry_store::{ReplicationRow, Store};
use ferry_wire::FrameWriter;
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::watch;
use tracing::{info, warn};

use super::proto::Msg;
use super::Shared;
use crate::peer;

pub use commit::last_capture_key;
pub use import::import_initial;
pub use remove::remove_replica;
pub use retention::apply_retention;
pub use reverse::{reverse_accept_key, REVERSE_ACCEPT_FOR_S};
pub use staging::{recover_staging, Staging};

/// Settings key of the replica-server configuration.
pub const CONFIG_KEY: &str = "replica_server";
/// Default replication port.
pub const DEFAULT_PORT: u16 = 7444;
/// A session with no frame for this long is dropped.
const IDLE: Duration = Duration::from_secs(60);
/// Replication connections held at once (one per replicating VM at a time, plus retries).
const MAX_REPLICATION_CONNS: usize = 512;
/// Of which from one address (a primary host with many VMs).
const MAX_REPLICATION_CONNS_PER_PEER: usize = 128;

/// The replica-server role's runtime state.
#[derive(Default)]
pub struct ReplicaServer {
    /// Stops the current listener.
    stop: Mutex<Option<watch::Sender<bool>>>,
    /// Where the listener listens.
    pub listening: Mutex<Option<String>>,
    /// Cycles partly received, by local VM id.
    pub(crate) staging: Mutex<HashMap<i64, Staging>>,
    /// One session per VM at a time.
    sessions: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// Certificates refused lately, and when (throttles their events).
    refused: Mutex<HashMap<String, std::time::Instant>>,
}

/// Holds the one session of VM `vm_id` (a primary's session, or an import) until dropped.
async fn one_session(shared: &Shared, vm_id: i64) -> tokio::sync::OwnedMutexGuard<()> {
    let lock = shared
        .replica
        .sessions
        .lock()
        .expect("sessions")
        .entry(vm_id)
        .or_default()
        .clone();
    lock.lock_owned().await
}

/// Loads the stored configuration (disabled by default).
pub fn load_config(store: &Store) -> ReplicaServerConfig {
    store
        .setting(CONFIG_KEY)
        .ok()
        .flatten()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(ReplicaServerConfig {
            port: DEFAULT_PORT,
            ..Default::default()
        })
}

/// The settings that govern replica VM `vm` here: the Replica Broker's for a replica it
/// placed on this node (its storage, network mapping, limits, whether primaries may start
/// VMs), else this host's own.
pub fn config_for(shared: &Shared, vm: &str) -> ReplicaServerConfig {
    match crate::broker::published(shared) {
        Some((cluster, p))
            if crate::broker::placement(&cluster, vm).as_deref()
                == Some(shared.cfg.name.as_str()) =>
        {
            p.config
        }
        _ => load_config(&shared.store),
    }
}

/// Starts or stops the listener to match the stored configuration.
pub async fn apply_config(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let mut cfg = load_config(&shared.store);
    // A node of a cluster with a Replica Broker holds the replicas the Broker places
    // here: it listens on the Broker's port, where the Broker sends primaries.
    if let Some((_, p)) = crate::broker::published(shared) {
        cfg.enabled = true;
        cfg.port = p.config.port;
    }
    let server = &shared.replica;
    if let Some(stop) = server.stop.lock().expect("stop").take() {
        let _ = stop.send(true);
    }
    *server.listening.lock().expect("listening") = None;
    if !cfg.enabled {
        return Ok(());
    }
    let addr = std::net::SocketAddr::new(shared.cfg.tls_listen.ip(), cfg.port);
    // The previous listener may take a moment to release the port.
    let mut listener = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                listener = Some(l);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(anyhow!("cannot listen for replication on {addr}: {e}")),
        }
    }
    let listener = listener.ok_or_else(|| {
        anyhow!("cannot listen for replication on {addr}: the port is in use; choose another with --port")
    })?;
    let (tx, rx) = watch::channel(false);
    *server.stop.lock().expect("stop") = Some(tx);
    *server.listening.lock().expect("listening") = Some(addr.to_string());
    info!(%addr, "replica server listening");
    tokio::spawn(accept_loop(shared.clone(), listener, rx));
    Ok(())
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    // A cluster node's replica server answers as the cluster: reverse replication comes
    // back to the identity the cluster's VMs replicated with.
    let identity = crate::cluster::replica_server_identity(&shared);
    let acceptor = match peer::replica_acceptor(&identity) {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "replica server TLS setup failed");
            return;
        }
    };
    let limits = crate::limits::ConnLimits::new(
        "the replication port",
        MAX_REPLICATION_CONNS,
        MAX_REPLICATION_CONNS_PER_PEER,
    );
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let (tcp, from) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors: wait for some to close instead of
                        // spinning on the same error.
                        warn!(error = %e, "accept on the replication port failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let guard = match limits.admit(from.ip()) {
                    Ok(g) => g,
                    Err(why) => {
                        tracing::debug!(%from, "replication connection refused: {why}");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    match tokio::time::timeout(crate::limits::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let fp = peer::peer_fingerprint(&tls).unwrap_or_default();
                            // A primary that rotated its certificate presents the
                            // successor it announced: re-pin before deciding.
                            super::rotation::adopt(&shared.store, &fp);
                            // Decided on the certificate alone, before anything the peer
                            // sends is read or buffered.
                            let chain = peer::peer_chain(&tls);
                            let own = admit(
                                &load_config(&shared.store),
                                &shared.cfg.name,
                                &fp,
                                &chain,
                            );
                            // Or a primary of the cluster's Broker, redirected here: each
                            // configuration's admission is kept apart (its own CA).
                            let brokers = crate::broker::node_config(&shared)
                                .map(|(broker, cfg)| admit(&cfg, &broker, &fp, &chain));
                            let admitted = match (own, brokers) {
                                (Ok(o), b) => Ok(Admission { own: Some(o), broker: b.and_then(Result::ok) }),
                                (Err(_), Some(Ok(b))) => Ok(Admission { own: None, broker: Some(b) }),
                                (Err(e), _) => Err(e),
                            };
                            let (r, w) = tokio::io::split(tls);
                            let result = match admitted {
                                Ok(via_ca) => session::session(&shared, r, w, &fp, via_ca, from.ip().to_string()).await,
                                Err(reason) => refuse_peer(&shared, w, &fp, &from, reason).await,
                            };
                            if let Err(e) = result {
                                warn!(%from, error = format!("{e:#}"), "replication session ended with an error");
                            }
                        }
                        Ok(Err(e)) => warn!(%from, error = %e, "replication TLS handshake failed"),
                        Err(_) => warn!(%from, "replication TLS handshake timed out"),
                    }
                });
            }
        }
    }
    info!("replica server stopped listening");
}

/// How a peer's certificate was admitted, per configuration (see [`admit`]): `Some(true)`
/// issued by that configuration's trusted CA, `Some(false)` listed by fingerprint, `None`
/// not admitted by it. This host's own replica-server settings and, on a node of a cluster
/// with a Replica Broker, the Broker's: each authorizes only with its own admission.
#[derive(Debug, Clone, Copy, Default)]
pub struct Admission {
    /// By this host's own settings.
    pub own: Option<bool>,
    /// By the Replica Broker's.
    pub broker: Option<bool>,
}

/// The most a greeting (`Hello`) may take on the wire: a VM spec, its disks and settings
/// are a few KiB; an unauthorized or hostile peer must not make the replica buffer more.
pub const HELLO_MAX_FRAME: usize = 256 * 1024;

/// Decides, from its certificate alone and right after the TLS handshake, whether a peer
/// may talk to this replica server at all: `Ok(true)` when it is admitted because a trusted
/// CA issued its certificate (`--allow-any`), `Ok(false)` when its fingerprint is listed
/// (the primary's name is checked against the entry once it introduces itself).
pub fn admit(
    cfg: &ReplicaServerConfig,
    me: &str,
    fingerprint: &str,
    chain: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<bool, String> {
    if !cfg.enabled {
        return Err(format!(
            "replication to {me} is disabled: on {me}, run `ferry replica-server set --enable`"
        ));
    }
    if cfg.entries.iter().any(|e| e.fingerprint == fingerprint) {
        return Ok(false);
    }
    let allow_hint =
        format!("on {me}, run `ferry replica-server set --allow NAME={fingerprint} --storage DIR`");
    if !cfg.allow_any {
        return Err(format!(
            "the certificate {fingerprint} is not authorized to replicate to {me}: {allow_hint}"
        ));
    }
    match &cfg.trusted_ca {
        None => Err(format!(
            "the certificate {fingerprint} is not authorized to replicate to {me}: --allow-any there trusts no CA yet (self-signed certificates are never accepted as \"any\"); {allow_hint}, or `ferry replica-server set --trust-ca CA.pem` with the CA that issues your hosts' certificates"
        )),
        Some(ca) => peer::chain_trusted(ca, chain).map(|()| true).map_err(|why| {
            format!(
                "the certificate {fingerprint} is not authorized to replicate to {me}: {why}; {allow_hint}, or issue the primary's host certificate from the CA {me} trusts"
            )
        }),
    }
}

/// Tells a peer refused by [`admit`] why (one frame; nothing it sent is read), and records
/// it: an event at most once a minute per certificate, so a stranger cannot fill the store.
async fn refuse_peer<W: AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    w: W,
    fingerprint: &str,
    from: &std::net::SocketAddr,
    reason: String,
) -> anyhow::Result<()> {
    warn!(%from, %fingerprint, "refused an unauthorized primary before its greeting");
    let first_in_a_minute = {
        let mut seen = shared.replica.refused.lock().expect("refused");
        let now = std::time::Instant::now();
        seen.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        seen.len() < 1024 && seen.insert(fingerprint.to_owned(), now).is_none()
    };
    if first_in_a_minute {
        shared.events.emit_host(
            "primary_refused",
            &format!("refused a peer from {}: {reason}", from.ip()),
        );
    }
    let mut writer = FrameWriter::new(w);
    let _ = tokio::time::timeout(
        peer::CONNECT_TIMEOUT,
        writer.write_control(&Msg::Refused {
            reason: reason.clone(),
        }),
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
    bail!(reason)
}

/// Decides whether the primary with certificate `fingerprint`, calling itself `name`, may
/// replicate here, and where its replicas go. `via_ca`: [`admit`] found its certificate
/// issued by the trusted CA.
pub fn authorize(
    cfg: &ReplicaServerConfig,
    me: &str,
    name: &str,
    fingerprint: &str,
    via_ca: bool,
) -> Result<(PathBuf, String), String> {
    if !cfg.enabled {
        return Err(format!(
            "replication to {me} is disabled: on {me}, run `ferry replica-server set --enable`"
        ));
    }
    if let Some(e) = cfg.entries.iter().find(|e| e.fingerprint == fingerprint) {
        if e.primary != name {
            return Err(format!(
                "the certificate {fingerprint} is authorized on {me} as primary {:?}, but the primary calls itself {name:?}",
                e.primary
            ));
        }
        return Ok((PathBuf::from(&e.storage), e.trust_group.clone()));
    }
    if cfg.allow_any && via_ca && cfg.trusted_ca.is_some() {
        if let Some(s) = &cfg.default_storage {
            return Ok((PathBuf::from(s), "DEFAULT".to_owned()));
        }
    }
    Err(format!(
        "primary {name} (certificate {fingerprint}) is not authorized to replicate to {me}: on {me}, run `ferry replica-server set --allow {name}={fingerprint} --storage DIR` (or --allow-any with --trust-ca, for hosts whose certificates your CA issues)"
    ))
}

/// Adds or replaces an authorization entry (by primary name).
pub fn upsert_entry(cfg: &mut ReplicaServerConfig, entry: AuthorizationEntry) {
    cfg.entries.retain(|e| e.primary != entry.primary);
    cfg.entries.push(entry);
}

/// The replicated disks of a replica VM, with their sizes.
pub(super) fn replicated_disks(spec: &VmSpec, rel: &ReplicationRow) -> Vec<(usize, u64)> {
    spec.disks
        .iter()
        .enumerate()
        .filter(|(i, _)| !rel.settings.excluded_disks.contains(i))
        .map(|(i, d)| (i, d.size_bytes))
        .collect()
}

/// Runs a `qemu-img` command; `what` names it in the error.
pub(super) async fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("cannot {what}"))?;
    if !out.status.success() {
        bail!(
            "cannot {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
