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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ferry_api_types::{AuthorizationEntry, ReplicaServerConfig};
use ferry_domain::replication::{InitialMethod, ReplicationSettings};
use ferry_domain::{DiskSpec, ReplicationState, Role, VmName, VmSpec, VmState};
use ferry_nbd::{NbdClient, BASE_ALLOCATION};
use ferry_qemu::cbt::OfflineExport;
use ferry_store::{PointRow, ReplicationRow, Store};
use ferry_wire::{ExtentKind, FrameKind, FrameReader, FrameWriter};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use super::hashes;
use super::proto::{
    DiskMeta, ExportManifest, Msg, Resume, EXPORT_DATA, EXPORT_FORMAT, EXPORT_MANIFEST,
};
use super::{now_ms, now_unix, qemu_nbd_path, Shared};
use crate::peer;

/// Settings key of the replica-server configuration.
pub const CONFIG_KEY: &str = "replica_server";
/// Default replication port.
pub const DEFAULT_PORT: u16 = 7444;
/// Data between durable checkpoints of a cycle being received (flush + resume mark): a
/// dropped link re-sends at most this much.
const FLUSH_EVERY_BYTES: u64 = 8 << 20;
/// A session with no frame for this long is dropped.
const IDLE: Duration = Duration::from_secs(60);
/// Replication connections held at once (one per replicating VM at a time, plus retries).
const MAX_REPLICATION_CONNS: usize = 512;
/// Of which from one address (a primary host with many VMs).
const MAX_REPLICATION_CONNS_PER_PEER: usize = 128;

/// A cycle being received: its layers and how far it got durably. Also kept as
/// `staging.json` beside the layers, so a transfer resumes after a replica crash too.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Staging {
    cycle: i64,
    layers: Vec<(usize, PathBuf)>,
    next_batch: u64,
    /// The capture being received (`CycleBegin::capture`).
    #[serde(default)]
    capture: u64,
}

/// The replica-server role's runtime state.
#[derive(Default)]
pub struct ReplicaServer {
    /// Stops the current listener.
    stop: Mutex<Option<watch::Sender<bool>>>,
    /// Where the listener listens.
    pub listening: Mutex<Option<String>>,
    /// Cycles partly received, by local VM id.
    pub(super) staging: Mutex<HashMap<i64, Staging>>,
    /// One session per VM at a time.
    sessions: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// Certificates refused lately, and when (throttles their events).
    refused: Mutex<HashMap<String, std::time::Instant>>,
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

/// Starts or stops the listener to match the stored configuration.
pub async fn apply_config(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let cfg = load_config(&shared.store);
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
    let acceptor = match peer::replica_acceptor(&shared.identity) {
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
                            let admitted = admit(
                                &load_config(&shared.store),
                                &shared.cfg.name,
                                &fp,
                                &peer::peer_chain(&tls),
                            );
                            let (r, w) = tokio::io::split(tls);
                            let result = match admitted {
                                Ok(via_ca) => session(&shared, r, w, &fp, via_ca, from.ip().to_string()).await,
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

async fn session<R, W>(
    shared: &Arc<Shared>,
    r: R,
    w: W,
    fingerprint: &str,
    via_ca: bool,
    from_ip: String,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = FrameReader::new(r).with_max_frame(HELLO_MAX_FRAME);
    let mut writer = FrameWriter::new(w);
    let hello: Msg = match next_control(&mut reader).await {
        Ok(m) => m,
        Err(e) => {
            let reason = format!("malformed greeting from the primary: {e:#}");
            let _ = writer
                .write_control(&Msg::Refused {
                    reason: reason.clone(),
                })
                .await;
            bail!(reason);
        }
    };
    reader.set_max_frame(ferry_wire::MAX_FRAME);
    let Msg::Hello {
        protocol,
        max_protocol,
        primary,
        spec,
        disks,
        settings,
        last_cycle: primary_last_cycle,
        reverse,
        reverse_resync,
        boot_files,
        next_fingerprint,
    } = hello
    else {
        bail!("the primary did not start with Hello");
    };
    let refuse = |reason: String| Msg::Refused { reason };
    let protocol = match super::proto::negotiate(protocol, max_protocol) {
        Ok(v) => v,
        Err(reason) => {
            writer.write_control(&refuse(reason.clone())).await?;
            bail!(reason);
        }
    };
    let cfg = load_config(&shared.store);
    let (storage, _trust_group) =
        match authorize(&cfg, &shared.cfg.name, &primary, fingerprint, via_ca) {
            Ok(x) => x,
            Err(reason) => {
                warn!(%primary, %fingerprint, "refused an unauthorized primary");
                writer.write_control(&refuse(reason.clone())).await?;
                bail!(reason);
            }
        };
    // Everything the primary says about its VM is checked against this host's rules
    // before anything is stored or created.
    if let Err(reason) = check_hello(&spec, &disks, &settings, &boot_files) {
        warn!(%primary, vm = %spec.name, %reason, "refused a primary's VM description");
        shared.events.emit(
            &spec.name,
            "primary_refused",
            &format!("refused {primary}'s replication of {}: {reason}", spec.name),
        );
        writer.write_control(&refuse(reason.clone())).await?;
        bail!(reason);
    }
    // Authenticated by its current certificate: its announced successor is trusted next.
    super::rotation::learn(&shared.store, fingerprint, next_fingerprint.as_deref());
    let mut extra = Vec::new();
    if reverse {
        match become_replica(
            shared,
            &primary,
            fingerprint,
            &from_ip,
            &spec,
            &settings,
            primary_last_cycle,
            reverse_resync,
        )
        .await
        {
            Ok(e) => extra = e,
            Err(reason) => {
                writer.write_control(&refuse(reason.clone())).await?;
                bail!(reason);
            }
        }
    }
    if primary_last_cycle > 0 && shared.store.get_vm(&spec.name).is_err() {
        let reason = format!(
            "{} has no replica of {} (it was removed there): on {primary}, run `ferry replication remove {}`, then enable replication again",
            shared.cfg.name, spec.name, spec.name
        );
        writer.write_control(&refuse(reason.clone())).await?;
        bail!(reason);
    }
    let created = tokio::task::block_in_place(|| {
        replica_for(
            shared,
            &primary,
            fingerprint,
            &from_ip,
            &spec,
            &disks,
            &settings,
            &storage,
        )
    });
    let rel = match created {
        Ok(rel) => rel,
        Err(reason) => {
            writer.write_control(&refuse(reason.clone())).await?;
            bail!(reason);
        }
    };
    // Both sides must agree on where they are: equal, or the replica one ahead (its answer
    // to the last cycle was lost). Anything else means the relationship was re-created on
    // one side, and applying deltas would build on the wrong base.
    if rel.settings.relationship_id != settings.relationship_id
        || (primary_last_cycle != rel.last_cycle && primary_last_cycle != rel.last_cycle - 1)
    {
        let reason = format!(
            "the replica of {} on {} has recovery points up to cycle {}, but the primary is at cycle {primary_last_cycle}: replication was re-created on one side; remove it on both ({primary} and {}) and enable it again",
            spec.name, shared.cfg.name, rel.last_cycle, shared.cfg.name
        );
        writer.write_control(&refuse(reason.clone())).await?;
        bail!(reason);
    }
    let lock = shared
        .replica
        .sessions
        .lock()
        .expect("sessions")
        .entry(rel.vm_id)
        .or_default()
        .clone();
    let _one_session = lock.lock().await;
    let resume = shared
        .replica
        .staging
        .lock()
        .expect("staging")
        .get(&rel.vm_id)
        .map(|s| Resume {
            cycle: s.cycle,
            next_batch: s.next_batch,
            capture: s.capture,
        });
    // A direct-kernel replica boots from this host's own copies of its kernel and initrd
    // (in its directory in the replica storage), never from the primary's paths.
    let boot_dir = match managed_boot_dir(shared, rel.vm_id, &storage) {
        Ok(d) => d,
        Err(e) => {
            let reason = format!("{e:#}");
            writer.write_control(&refuse(reason.clone())).await?;
            bail!(reason);
        }
    };
    let need_boot_files = match &boot_dir {
        Some(dir) => super::boot_files::needed(dir, &boot_files).await,
        None => Vec::new(),
    };
    let mut incoming_boot_file = None;
    let next_fp = shared.identity.next();
    writer
        .write_control(&Msg::Welcome {
            protocol,
            replica: shared.cfg.name.clone(),
            last_cycle: rel.last_cycle,
            resume,
            extra,
            need_boot_files: need_boot_files.clone(),
            next_fingerprint: next_fp.clone(),
        })
        .await?;

    loop {
        let msg = match tokio::time::timeout(IDLE, reader.read_frame()).await {
            Err(_) => bail!("the primary went silent"),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(f))) if f.kind == FrameKind::Keepalive => continue,
            Ok(Ok(Some(f))) => f.control::<Msg>()?,
            Ok(Err(e)) => return Err(e.into()),
        };
        if let Some(next) = &next_fp {
            // The primary went on after a Welcome that carried it.
            super::rotation::told(&shared.store, rel.vm_id, next);
        }
        if let Msg::PlannedFailover {
            cycle,
            start,
            reverse_to,
        } = msg
        {
            let current = shared.store.replication(rel.vm_id)?.map(|r| r.last_cycle);
            let reply = if current != Some(cycle) {
                Msg::Failed {
                    reason: format!(
                        "the replica holds cycle {current:?}, not the primary's last cycle {cycle}: the planned failover would lose data"
                    ),
                }
            } else {
                // Starting a VM here is this host's decision, not the primary's.
                let may_start = start && load_config(&shared.store).allow_primary_start;
                let held_back = if start && !may_start {
                    format!(
                        "; {} was not started: {} does not let primaries start VMs (start it there with `ferry vm start {}`, or allow it with `ferry replica-server set --allow-primary-start yes`)",
                        spec.name, shared.cfg.name, spec.name
                    )
                } else {
                    String::new()
                };
                match super::failover::start(shared, spec.name.as_str(), None, may_start, true)
                    .await
                    .map(|mut r| {
                        r.message.push_str(&held_back);
                        r
                    }) {
                    Ok(r) => match reverse_to {
                        None => Msg::FailedOver { message: r.message },
                        Some((name, addr)) => match super::failover::reverse(
                            shared,
                            spec.name.as_str(),
                            &name,
                            &addr,
                            fingerprint,
                            false,
                        )
                        .await
                        {
                            Ok(_) => Msg::FailedOver {
                                message: format!(
                                    "{}; replication reversed to {name} (delta only)",
                                    r.message
                                ),
                            },
                            Err(e) => Msg::FailedOver {
                                message: format!(
                                    "{}; reversing replication failed: {} (retry with `ferry replication reverse {} --to {name}` there)",
                                    r.message, e.message, spec.name
                                ),
                            },
                        },
                    },
                    Err(e) => Msg::Failed { reason: e.message },
                }
            };
            writer.write_control(&reply).await?;
            continue;
        }
        if let Msg::BootFile { role, offset, data } = msg {
            let dir = boot_dir
                .as_deref()
                .ok_or_else(|| anyhow!("the primary sent a boot file nobody asked for"))?;
            match super::boot_files::receive_chunk(
                dir,
                &boot_files,
                &need_boot_files,
                &mut incoming_boot_file,
                &role,
                offset,
                &data,
            )
            .await
            {
                Ok(false) => {}
                Ok(true) => writer.write_control(&Msg::BootFileStored { role }).await?,
                Err(reason) => {
                    writer
                        .write_control(&Msg::Failed {
                            reason: reason.clone(),
                        })
                        .await?;
                    bail!(reason);
                }
            }
            continue;
        }
        if let Msg::HashRequest = msg {
            match disk_hashes(shared, rel.vm_id).await {
                Ok(list) => {
                    for (disk, hashes) in list {
                        writer.write_control(&Msg::Hashes { disk, hashes }).await?;
                    }
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    writer
                        .write_control(&Msg::Failed {
                            reason: reason.clone(),
                        })
                        .await?;
                    bail!(reason);
                }
            }
            continue;
        }
        let Msg::CycleBegin {
            cycle,
            kind,
            taken_at,
            from_batch,
            batches,
            bytes,
            app_consistent,
            capture,
            streamed,
        } = msg
        else {
            bail!("unexpected message from the primary: {msg:?}");
        };
        let rel = shared
            .store
            .replication(rel.vm_id)?
            .ok_or_else(|| anyhow!("replication was removed"))?;
        let refusal = match rel.state {
            ReplicationState::Suspended => Some(format!(
                "replication of {} is suspended on the replica server {}: resume it there (`ferry replication resume {}`)",
                spec.name, shared.cfg.name, spec.name
            )),
            ReplicationState::FailedOverWaitingCompletion | ReplicationState::FailedOver => {
                Some(format!(
                    "{} was failed over on the replica server {}: it takes no more recovery points",
                    spec.name, shared.cfg.name
                ))
            }
            _ => None,
        };
        if let (Some(reason), true) = (refusal, cycle > rel.last_cycle) {
            writer
                .write_control(&Msg::Failed {
                    reason: reason.clone(),
                })
                .await?;
            bail!(reason);
        }
        if cycle < rel.last_cycle || cycle > rel.last_cycle + 1 {
            let reason = format!(
                "cycle {cycle} does not follow cycle {} of {}",
                rel.last_cycle, spec.name
            );
            writer
                .write_control(&Msg::Failed {
                    reason: reason.clone(),
                })
                .await?;
            bail!(reason);
        }
        if cycle == rel.last_cycle {
            // Already committed: the primary did not hear the answer last time.
            let point = shared
                .store
                .list_points(rel.vm_id)?
                .into_iter()
                .find(|p| p.cycle == cycle)
                .map(|p| p.id)
                .unwrap_or(0);
            writer
                .write_control(&Msg::Committed { cycle, point })
                .await?;
            continue;
        }
        let started_ms = now_ms();
        // Every log line of this cycle carries the VM, relationship and cycle number.
        let span = tracing::info_span!(
            "cycle",
            vm = %spec.name,
            relationship = %rel.settings.relationship_id,
            cycle
        );
        let received = receive_cycle(
            shared,
            &rel,
            &mut reader,
            cycle,
            &kind,
            taken_at,
            from_batch,
            batches,
            bytes,
            app_consistent,
            capture,
            streamed,
        )
        .instrument(span.clone())
        .await;
        // A streamed cycle says its size at the end.
        let bytes = received.as_ref().map(|r| r.1).unwrap_or(bytes);
        let received = received.map(|r| r.0);
        // The replica's own statistics: what arrived, how long it took to apply.
        let _ = shared.store.record_cycle(&ferry_store::CycleRow {
            vm_id: rel.vm_id,
            cycle,
            kind: kind.clone(),
            started_ms,
            ended_ms: now_ms(),
            dirty_bytes: bytes as i64,
            sent_bytes: bytes as i64,
            ok: received.is_ok(),
            error: received.as_ref().err().map(|e| format!("{e:#}")),
        });
        match received {
            Ok(point) => {
                // Retention before the answer: when the primary counts the cycle done, the
                // replica's points are settled (nothing merges under a reader or under the
                // next cycle's layer).
                if let Err(e) = apply_retention(shared, rel.vm_id)
                    .instrument(span.clone())
                    .await
                {
                    span.in_scope(|| {
                        warn!(
                            error = format!("{e:#}"),
                            "retention failed; it is retried after the next cycle"
                        )
                    });
                }
                writer
                    .write_control(&Msg::Committed { cycle, point })
                    .await?;
            }
            Err(e) => {
                let reason = format!("{e:#}");
                shared
                    .store
                    .set_replication_error(rel.vm_id, Some(&reason))?;
                let _ = writer
                    .write_control(&Msg::Failed {
                        reason: reason.clone(),
                    })
                    .await;
                bail!(reason);
            }
        }
    }
}

async fn next_control<R: AsyncRead + Unpin>(reader: &mut FrameReader<R>) -> anyhow::Result<Msg> {
    loop {
        let frame = tokio::time::timeout(IDLE, reader.read_frame())
            .await
            .map_err(|_| anyhow!("the peer went silent"))??
            .ok_or_else(|| anyhow!("the peer closed the connection"))?;
        if frame.kind != FrameKind::Keepalive {
            return Ok(frame.control()?);
        }
    }
}

/// Settings key: until when (UNIX s) this host's admin agreed that VM `vm_id` becomes the
/// replica of its failed-over copy (`ferry replication accept-reverse`).
pub fn reverse_accept_key(vm_id: i64) -> String {
    format!("reverse_accepted:{vm_id}")
}

/// How long an `accept-reverse` holds.
pub const REVERSE_ACCEPT_FOR_S: i64 = 3600;

/// Reverse replication reaches the old primary: its VM (off, prepared for a planned
/// failover, or with a failover done elsewhere) becomes the replica of the new primary. Its
/// disks hold exactly cycle `cycle` of the new direction, so they become the first recovery
/// point as they are: nothing is copied, and the next cycles are deltas. Idempotent: a
/// relationship already reversed is left alone.
async fn become_replica(
    shared: &Arc<Shared>,
    primary: &str,
    fingerprint: &str,
    from_ip: &str,
    spec: &VmSpec,
    settings: &ReplicationSettings,
    cycle: i64,
    resync: bool,
) -> Result<Vec<(usize, u64, u64)>, String> {
    let store = &shared.store;
    let me = &shared.cfg.name;
    let row = store
        .get_vm(&spec.name)
        .map_err(|_| format!("{me} has no VM {} to reverse replication onto", spec.name))?;
    let rel = store
        .replication(row.id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "VM {} on {me} is not replicated: it cannot receive reverse replication",
                spec.name
            )
        })?;
    if rel.role == Role::Replica && rel.partner_fingerprint == fingerprint {
        return Ok(Vec::new()); // already reversed
    }
    if rel.role != Role::Primary || rel.partner_fingerprint != fingerprint {
        return Err(format!(
            "VM {} on {me} does not replicate to {primary}: reverse replication goes back to the old primary only",
            spec.name
        ));
    }
    if row.state != VmState::Off {
        return Err(format!(
            "VM {} runs on {me}: reverse replication would overwrite it; shut it down first (two running copies diverge)",
            spec.name
        ));
    }
    // The peer is this VM's replica server, but that alone must not let it overwrite the
    // VM here: only a planned failover this host ran, or this host's admin, agrees to it.
    let accept_key = reverse_accept_key(row.id);
    let accepted = store
        .setting(&accept_key)
        .ok()
        .flatten()
        .and_then(|v| v.parse::<i64>().ok())
        .is_some_and(|until| until >= now_unix());
    if rel.state != ReplicationState::PreparedForFailover && !accepted {
        return Err(format!(
            "{me} did not agree to become the replica of {}: no planned failover prepared it; if {} really failed over, on {me} run `ferry replication accept-reverse {}`, then reverse again",
            spec.name, spec.name, spec.name
        ));
    }
    // After a planned failover this disk is exactly the failover point. After an unplanned
    // one it may hold writes made after the last cycle the replica got: what its change
    // tracking and any unsent spool cover goes back to the new primary, which sends those
    // ranges too (unless the first cycle compares everything anyway).
    let extra = if rel.state != ReplicationState::PreparedForFailover && !resync {
        writes_since_last_cycle(shared, &row, &rel)
            .await
            .map_err(|e| format!("cannot tell what {} wrote after its last cycle: {e:#}; reverse with --resync instead", spec.name))?
    } else {
        Vec::new()
    };
    super::primary::discard_spool(shared, row.id);
    // Its own change tracking has no meaning any more.
    let vm_dir = shared.vms.vm_dir(&row.spec.name);
    let mut replica_spec = row.spec.clone();
    let mut layers = Vec::new();
    for (i, d) in replica_spec.disks.iter_mut().enumerate() {
        let path = vm_dir.join(&d.file);
        if let Ok(o) = Command::new(&shared.cfg.qemu_img)
            .args(["info", "-U", "--output=json"])
            .arg(&path)
            .output()
            .await
        {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            for b in v["format-specific"]["data"]["bitmaps"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(n) = b["name"].as_str().filter(|n| n.starts_with("ferry-r")) {
                    let _ = Command::new(&shared.cfg.qemu_img)
                        .args(["bitmap", "--remove", "-f", "qcow2"])
                        .arg(&path)
                        .arg(n)
                        .status()
                        .await;
                }
            }
        }
        d.file = path.display().to_string();
        if !settings.excluded_disks.contains(&i) {
            layers.push((i, d.file.clone()));
        }
    }
    store
        .delete_replication(row.id)
        .map_err(|e| e.to_string())?;
    let new_rel = ReplicationRow {
        vm_id: row.id,
        role: Role::Replica,
        partner_name: primary.to_owned(),
        partner_addr: from_ip.to_owned(),
        partner_fingerprint: fingerprint.to_owned(),
        settings: settings.clone(),
        state: ReplicationState::Replicating,
        generation: 0,
        last_cycle: cycle,
        last_point_at: Some(now_unix()),
        last_error: None,
        created_at: now_unix(),
    };
    store
        .insert_replication(&new_rel)
        .map_err(|e| e.to_string())?;
    store
        .set_vm_spec(row.id, &replica_spec)
        .map_err(|e| e.to_string())?;
    let point = PointRow {
        id: 0,
        vm_id: row.id,
        cycle,
        taken_at: now_unix(),
        applied_at: now_unix(),
        kind: "reverse-base".into(),
        layers,
        bytes: 0,
        consistency: "crash".into(),
    };
    store
        .commit_point(&point, &new_rel)
        .map_err(|e| e.to_string())?;
    let _ = store.delete_setting(&accept_key);
    shared.events.emit(
        &spec.name,
        "replication_reversed",
        &format!(
            "{} now replicates from {primary}; this host holds its replica (delta only)",
            spec.name
        ),
    );
    Ok(extra)
}

/// What a stopped primary wrote after its last cycle reached the replica: every change
/// tracking generation on its images, and the extents of a spool not yet shipped.
async fn writes_since_last_cycle(
    shared: &Arc<Shared>,
    row: &ferry_store::VmRow,
    rel: &ReplicationRow,
) -> anyhow::Result<Vec<(usize, u64, u64)>> {
    let mut out = Vec::new();
    let qemu_nbd = qemu_nbd_path(&shared.cfg);
    let vm_dir = shared.vms.vm_dir(&row.spec.name);
    // This host's own engine may be running an offline cycle of the same VM (it rotates
    // bitmaps, which takes the image's write lock): one at a time.
    let _vm_lock = shared.vms.lock_vm(&row.spec.name).await;
    // Read again under the lock: a cycle that ran meanwhile moved to a newer generation.
    let fresh = shared.store.replication(row.id)?;
    let rel = fresh.as_ref().unwrap_or(rel);
    for i in rel.settings.replicated_disks(row.spec.disks.len()) {
        let image = vm_dir.join(&row.spec.disks[i].file);
        let bitmaps = ferry_qemu::cbt::offline_bitmaps(&shared.cfg.qemu_img, &image).await?;
        // Without the current generation (QEMU was killed before it saved it) the writes
        // since the last cycle are unknown: only a comparison is safe.
        let current = super::primary::generation_name(rel.generation);
        if rel.generation > 0 && !bitmaps.iter().any(|b| b.name == current) {
            anyhow::bail!(
                "change tracking of {} was lost (QEMU did not shut down cleanly)",
                image.display()
            );
        }
        for b in bitmaps {
            if !b.name.starts_with("ferry-r") {
                continue;
            }
            if b.in_use() {
                anyhow::bail!("change tracking of {} is inconsistent", image.display());
            }
            let socket = shared
                .cfg
                .data_dir
                .join("run")
                .join(format!("rev-{}-{i}.sock", row.id));
            let export = OfflineExport::start(&qemu_nbd, &image, Some(&b.name), &socket).await?;
            let ctx = ferry_nbd::dirty_bitmap_context(&b.name);
            let result = async {
                let mut c =
                    NbdClient::connect_unix(&socket, export.export_name(), &[ctx.as_str()]).await?;
                let map = c.map(&ctx).await?;
                let _ = c.disconnect().await;
                Ok::<_, anyhow::Error>(map)
            }
            .await;
            let _ = export.close().await;
            for e in result?.into_iter().filter(|e| e.flags & 1 != 0) {
                out.push((i, e.offset, e.length));
            }
        }
    }
    let spool = shared.cfg.data_dir.join("spool").join(row.id.to_string());
    if let Ok(rd) = std::fs::read_dir(spool) {
        for f in rd
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().ends_with(".spool"))
        {
            let mut reader = ferry_wire::SpoolReader::open(f.path()).await?;
            while let Some(frame) = reader.next_frame().await? {
                if frame.kind == FrameKind::ExtentBatch {
                    for e in frame.batch()?.extents {
                        out.push((e.disk as usize, e.offset, e.len()));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// What a primary's greeting says about its VM, checked against this host's rules: the
/// spec's own validity (CPU, memory, disk and NIC counts and sizes, names), the disk list
/// and settings, and the announced boot files.
fn check_hello(
    spec: &VmSpec,
    disks: &[DiskMeta],
    settings: &ReplicationSettings,
    boot_files: &[super::proto::BootFileMeta],
) -> Result<(), String> {
    // The primary's disk file names are its own business (a failed-over replica's are
    // paths into its storage) and are never used here: the replica names its own files.
    let mut checked = spec.clone();
    for (i, d) in checked.disks.iter_mut().enumerate() {
        d.file = format!("disk{i}.qcow2");
    }
    checked
        .validate()
        .map_err(|e| format!("the primary's description of {} is invalid: {e}", spec.name))?;
    settings.validate(spec.disks.len()).map_err(|e| {
        format!(
            "the primary's replication settings of {} are invalid: {e}",
            spec.name
        )
    })?;
    if disks.len() > ferry_domain::spec::MAX_DISKS
        || disks
            .iter()
            .any(|d| d.size_bytes == 0 || d.size_bytes > ferry_domain::spec::MAX_DISK_BYTES)
    {
        return Err(format!(
            "the primary sent an invalid disk list for {}: at most {} disks of 1 byte to {} bytes",
            spec.name,
            ferry_domain::spec::MAX_DISKS,
            ferry_domain::spec::MAX_DISK_BYTES
        ));
    }
    super::boot_files::check_announced(spec, boot_files)
}

/// The directory of replica VM `vm_id` when it lives in the primary's authorized
/// `storage` (so its boot files are this host's copies, kept there), after pointing its
/// spec at them (replicas created before boot files were shipped kept the primary's
/// paths). `None` for a VM that became a replica by reverse replication: its spec is this
/// host's own.
fn managed_boot_dir(
    shared: &Arc<Shared>,
    vm_id: i64,
    storage: &Path,
) -> anyhow::Result<Option<PathBuf>> {
    let row = shared
        .store
        .vm_by_id(vm_id)?
        .ok_or_else(|| anyhow!("the replica VM is gone"))?;
    let Some(dir) = row
        .spec
        .disks
        .first()
        .and_then(|d| Path::new(&d.file).parent())
        .map(Path::to_path_buf)
    else {
        return Ok(None);
    };
    if !dir.starts_with(storage) {
        return Ok(None);
    }
    let local = super::boot_files::localize(&row.spec, &dir);
    if local != row.spec {
        shared.store.set_vm_spec(vm_id, &local)?;
    }
    Ok(Some(dir))
}

/// This replica server's limits on a new replica VM: how many one primary may have, and
/// how many virtual disk bytes the replicas in one storage location may add up to.
fn check_limits(
    shared: &Arc<Shared>,
    primary: &str,
    fingerprint: &str,
    storage: &Path,
    disks: &[DiskMeta],
) -> Result<(), String> {
    let cfg = load_config(&shared.store);
    let me = &shared.cfg.name;
    let replicas: Vec<(ferry_store::VmRow, ReplicationRow)> = shared
        .store
        .list_vms()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|v| {
            let rel = shared.store.replication(v.id).ok()??;
            (rel.role == Role::Replica).then_some((v, rel))
        })
        .collect();
    if let Some(max) = cfg.max_vms_per_primary {
        let mine = replicas
            .iter()
            .filter(|(_, r)| r.partner_fingerprint == fingerprint)
            .count();
        if mine >= max as usize {
            return Err(format!(
                "primary {primary} already has {mine} replica VMs on {me}, its limit: on {me}, raise it with `ferry replica-server set --max-vms-per-primary N` or remove one"
            ));
        }
    }
    if let Some(quota) = cfg.storage_quota_bytes {
        let used: u64 = replicas
            .iter()
            .filter(|(v, _)| {
                v.spec
                    .disks
                    .first()
                    .is_some_and(|d| Path::new(&d.file).starts_with(storage))
            })
            .flat_map(|(v, _)| v.spec.disks.iter().map(|d| d.size_bytes))
            .sum();
        let wanted: u64 = disks.iter().map(|d| d.size_bytes).sum();
        if used.saturating_add(wanted) > quota {
            return Err(format!(
                "a replica of {wanted} bytes would take {} past its quota of {quota} bytes ({used} in use): on {me}, raise it with `ferry replica-server set --storage-quota SIZE`",
                storage.display()
            ));
        }
    }
    Ok(())
}

/// Finds (or creates) the replica VM and relationship for this primary's VM.
#[allow(clippy::too_many_arguments)]
fn replica_for(
    shared: &Arc<Shared>,
    primary: &str,
    fingerprint: &str,
    from_ip: &str,
    spec: &VmSpec,
    disks: &[DiskMeta],
    settings: &ReplicationSettings,
    storage: &Path,
) -> Result<ReplicationRow, String> {
    let store = &shared.store;
    let me = &shared.cfg.name;
    if let Ok(row) = store.get_vm(&spec.name) {
        return match store.replication(row.id).map_err(|e| e.to_string())? {
            Some(rel) if rel.role == Role::Replica && rel.partner_fingerprint == fingerprint => Ok(rel),
            _ => Err(format!(
                "a VM named {} already exists on {me} and is not a replica from {primary}: rename or remove it there",
                spec.name
            )),
        };
    }
    if disks.is_empty() || disks.iter().any(|d| d.size_bytes == 0) {
        return Err("the primary sent an invalid disk list".into());
    }
    let expected: Vec<(usize, u64)> = spec
        .disks
        .iter()
        .enumerate()
        .filter(|(i, _)| !settings.excluded_disks.contains(i))
        .map(|(i, d)| (i, d.size_bytes))
        .collect();
    let announced: Vec<(usize, u64)> = disks.iter().map(|d| (d.index, d.size_bytes)).collect();
    if expected != announced {
        return Err(
            "the primary sent a disk list that does not match its VM and exclusions".into(),
        );
    }
    check_limits(shared, primary, fingerprint, storage, disks)?;
    let dir = storage.join(spec.name.as_str());
    if settings.initial == InitialMethod::Existing {
        for d in disks {
            let seed = dir.join(format!("disk{}.qcow2", d.index));
            check_seed(&seed, d.size_bytes).map_err(|e| {
                format!(
                    "initial copy from an existing copy: {e}; put a qcow2 copy of disk {} of {} ({} bytes) at {} on {me}, then enable again",
                    d.index,
                    spec.name,
                    d.size_bytes,
                    seed.display()
                )
            })?;
        }
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create {} on {me}: {e}", dir.display()))?;
    // The replica VM's disks point into its storage (same slots as on the primary); they
    // are updated to the latest recovery point's layers as points arrive. An excluded disk
    // gets a blank image of its size, as the failed-over VM will need one.
    let mut replica_spec = spec.clone();
    let mut slots = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let excluded = settings.excluded_disks.contains(&i);
        let file = dir.join(if excluded {
            format!("disk{i}.excluded.qcow2")
        } else {
            format!("disk{i}.qcow2")
        });
        if excluded && !file.exists() {
            let ok = std::process::Command::new(&shared.cfg.qemu_img)
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&file)
                .arg(d.size_bytes.to_string())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(format!("cannot create {} on {me}", file.display()));
            }
        }
        slots.push(DiskSpec {
            file: file.display().to_string(),
            size_bytes: d.size_bytes,
            ..d.clone()
        });
    }
    replica_spec.disks = slots;
    let replica_spec = super::boot_files::localize(&replica_spec, &dir);
    let row = store
        .insert_vm(&replica_spec, now_unix())
        .map_err(|e| e.to_string())?;
    let rel = ReplicationRow {
        vm_id: row.id,
        role: Role::Replica,
        partner_name: primary.to_owned(),
        partner_addr: from_ip.to_owned(),
        partner_fingerprint: fingerprint.to_owned(),
        settings: settings.clone(),
        state: ReplicationState::WaitingForInitialReplication,
        generation: 0,
        last_cycle: 0,
        last_point_at: None,
        last_error: None,
        created_at: now_unix(),
    };
    if let Err(e) = store.insert_replication(&rel) {
        let _ = store.delete_vm(&spec.name);
        return Err(e.to_string());
    }
    shared.events.emit(
        &spec.name,
        "replica_created",
        &format!(
            "replica of {} from {primary} created in {}",
            spec.name,
            dir.display()
        ),
    );
    info!(vm = %spec.name, %primary, dir = %dir.display(), "replica VM created");
    Ok(rel)
}

/// A writable `qemu-nbd` on one layer, and our client to it.
struct LayerWriter {
    child: Child,
    client: Option<NbdClient>,
    socket: PathBuf,
}

impl LayerWriter {
    async fn open(qemu_nbd: &Path, image: &Path, socket: PathBuf) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(qemu_nbd)
            .arg("--format=qcow2")
            .arg("--cache=writeback")
            .arg("--discard=unmap")
            .arg("--detect-zeroes=unmap")
            .arg(format!("--socket={}", socket.display()))
            .arg("--export-name=layer")
            .arg(image)
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", qemu_nbd.display()))?;
        let mut w = LayerWriter {
            child,
            client: None,
            socket,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if w.socket.exists() {
                if let Ok(c) = NbdClient::connect_unix(&w.socket, "layer", &[]).await {
                    w.client = Some(c);
                    return Ok(w);
                }
            }
            if let Ok(Some(status)) = w.child.try_wait() {
                bail!("qemu-nbd on {} exited ({status})", image.display());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("qemu-nbd on {} did not start", image.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn client(&mut self) -> &mut NbdClient {
        self.client.as_mut().expect("connected")
    }

    async fn close(mut self) -> anyhow::Result<()> {
        if let Some(c) = self.client.take() {
            c.disconnect().await?;
        }
        // Without --persistent, qemu-nbd exits once its client is gone, after closing the
        // image cleanly.
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(s)) if s.success() => {}
            Ok(Ok(s)) => bail!("qemu-nbd exited with {s}"),
            _ => bail!("qemu-nbd did not exit"),
        }
        let _ = std::fs::remove_file(&self.socket);
        Ok(())
    }
}

/// A cycle's layer. The relationship id is in the name: after a failover and reverse
/// replication the same directory holds the layers of earlier relationships (under the
/// failed-over disks), which a new relationship's cycle numbers must never collide with.
fn layer_path(vm_dir: &Path, relationship: u64, disk: usize, cycle: i64) -> PathBuf {
    vm_dir.join(format!(
        "disk{disk}.r{:08x}.c{cycle}.qcow2",
        relationship as u32
    ))
}

#[allow(clippy::too_many_arguments)]
async fn receive_cycle<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    rel: &ReplicationRow,
    reader: &mut FrameReader<R>,
    cycle: i64,
    kind: &str,
    taken_at: i64,
    from_batch: u64,
    batches: u64,
    bytes: u64,
    app_consistent: bool,
    capture: u64,
    streamed: bool,
) -> anyhow::Result<(i64, u64)> {
    let (mut batches, mut bytes) = (batches, bytes);
    if streamed && (batches != 0 || bytes != 0 || from_batch != 0) {
        bail!("a streamed cycle starts at batch 0 and announces its size at its end");
    }
    let vm = shared
        .store
        .vm_by_id(rel.vm_id)?
        .ok_or_else(|| anyhow!("the replica VM is gone"))?;
    // Only the next cycle is applied: anything else would delete or build on the wrong layer.
    let current = shared
        .store
        .replication(rel.vm_id)?
        .map(|r| r.last_cycle)
        .unwrap_or(-1);
    if cycle != current + 1 {
        bail!("cycle {cycle} does not follow cycle {current}: refused");
    }
    let points = shared.store.list_points(rel.vm_id)?;
    let latest = points.last().cloned();
    let vm_dir = PathBuf::from(&vm.spec.disks[0].file)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("the replica VM has no storage directory"))?;
    let disk_sizes: Vec<(usize, u64)> = replicated_disks(&vm.spec, rel);

    // Continue a staged cycle, or start fresh layers.
    let staged = shared
        .replica
        .staging
        .lock()
        .expect("staging")
        .remove(&rel.vm_id);
    let staging = match staged {
        Some(s)
            if s.cycle == cycle
                && s.next_batch == from_batch
                && s.capture == capture
                && capture != 0 =>
        {
            s
        }
        other => {
            if let Some(old) = other {
                for (_, p) in &old.layers {
                    let _ = std::fs::remove_file(p);
                }
            }
            let _ = std::fs::remove_file(vm_dir.join(STAGING_FILE));
            if from_batch != 0 {
                bail!("the primary resumed cycle {cycle} at batch {from_batch}, but nothing is staged here: restart the cycle");
            }
            let mut layers = Vec::new();
            for &(disk, size) in &disk_sizes {
                let path = layer_path(&vm_dir, rel.settings.relationship_id, disk, cycle);
                let _ = std::fs::remove_file(&path);
                // On the latest point; before the first, on the existing copy if that is
                // the initial method.
                let backing = latest
                    .as_ref()
                    .and_then(|p| p.layers.iter().find(|(d, _)| *d == disk))
                    .map(|(_, l)| PathBuf::from(l))
                    .or_else(|| {
                        (rel.settings.initial == InitialMethod::Existing)
                            .then(|| vm_dir.join(format!("disk{disk}.qcow2")))
                    });
                create_layer(&shared.cfg.qemu_img, &path, size, backing.as_deref()).await?;
                layers.push((disk, path));
            }
            Staging {
                cycle,
                layers,
                next_batch: 0,
                capture,
            }
        }
    };

    let qemu_nbd = qemu_nbd_path(&shared.cfg);
    let mut writers: HashMap<usize, LayerWriter> = HashMap::new();
    for (disk, path) in &staging.layers {
        let socket = shared
            .cfg
            .data_dir
            .join("run")
            .join(format!("rx-{}-{disk}.sock", rel.vm_id));
        writers.insert(*disk, LayerWriter::open(&qemu_nbd, path, socket).await?);
    }
    let mut staging = staging;
    let result = async {
        let mut expected = staging.next_batch;
        let mut unflushed = 0u64;
        let mut data_bytes = 0u64;
        shared.set_progress(rel.vm_id, "applying", 0, bytes);
        loop {
            let frame = tokio::time::timeout(IDLE, reader.read_frame())
                .await
                .map_err(|_| anyhow!("the primary went silent during cycle {cycle}"))??
                .ok_or_else(|| anyhow!("the connection closed in the middle of cycle {cycle}"))?;
            match frame.kind {
                FrameKind::Keepalive => continue,
                FrameKind::Control => {
                    let msg: Msg = frame.control()?;
                    match msg {
                        Msg::CycleEnd {
                            cycle: c,
                            batches: b,
                            bytes: n,
                        } if c == cycle => {
                            if streamed {
                                let (Some(b), Some(n)) = (b, n) else {
                                    bail!("the streamed cycle {cycle} ended without its batch count and size");
                                };
                                (batches, bytes) = (b, n);
                            }
                            break;
                        }
                        other => bail!("unexpected message during cycle {cycle}: {other:?}"),
                    }
                }
                FrameKind::ExtentBatch => {
                    let batch = frame.batch()?;
                    batch.expect_seq(expected)?;
                    // Checked first: a bad extent applies nothing of its batch.
                    for ext in &batch.extents {
                        let disk = ext.disk as usize;
                        if !writers.contains_key(&disk) {
                            bail!("extent for disk {disk}, which is not replicated");
                        }
                        let size = disk_sizes
                            .iter()
                            .find(|d| d.0 == disk)
                            .map(|d| d.1)
                            .unwrap_or(0);
                        if ext.end().is_none_or(|end| end > size) {
                            bail!(
                                "extent at {} (+{}) is beyond disk {disk}'s size {size}",
                                ext.offset,
                                ext.len()
                            );
                        }
                    }
                    // Per disk: the batch's data extents as one pipelined write (extents
                    // of one cycle never overlap), zeroes one by one.
                    for (disk, w) in writers.iter_mut() {
                        let data = batch.extents.iter().filter_map(|e| match &e.kind {
                            ExtentKind::Data(d) if e.disk as usize == *disk => {
                                Some((e.offset, d.as_ref()))
                            }
                            _ => None,
                        });
                        w.client().write_many(data, Default::default()).await?;
                        for e in batch.extents.iter().filter(|e| e.disk as usize == *disk) {
                            if let ExtentKind::Zeroes(n) = &e.kind {
                                w.client().write_zeroes(e.offset, *n).await?;
                            }
                        }
                    }
                    data_bytes += batch.data_bytes();
                    unflushed += batch.data_bytes().max(1);
                    expected += 1;
                    shared.set_progress(rel.vm_id, "applying", data_bytes, bytes);
                    if unflushed >= FLUSH_EVERY_BYTES {
                        for w in writers.values_mut() {
                            w.client().flush().await?;
                        }
                        staging.next_batch = expected;
                        save_staging(&vm_dir, &staging)?;
                        unflushed = 0;
                    }
                }
            }
        }
        if expected != batches {
            bail!("cycle {cycle} ended after {expected} batches, but {batches} were announced");
        }
        // A streamed cycle starts at batch 0: what arrived is its whole size.
        if streamed && data_bytes != bytes {
            bail!("cycle {cycle} carried {data_bytes} data bytes, but {bytes} were announced");
        }
        Ok(())
    }
    .await;
    shared.clear_progress(rel.vm_id);
    if let Err(e) = result {
        // Keep what was durably written, so the primary can resume after a dropped link.
        for (_, w) in writers.drain() {
            let _ = w.client.map(|c| drop(c));
            drop(w.child);
        }
        shared
            .replica
            .staging
            .lock()
            .expect("staging")
            .insert(rel.vm_id, staging);
        return Err(e);
    }
    for (_, mut w) in writers.drain() {
        w.client().flush().await?;
        w.close().await?;
    }
    for (_, p) in &staging.layers {
        fsync(p)?;
    }
    fsync(&vm_dir)?;

    // Commit: the point and the relationship's progress in one transaction.
    let mut rel = shared
        .store
        .replication(rel.vm_id)?
        .ok_or_else(|| anyhow!("replication was removed"))?;
    rel.state = match rel.state {
        ReplicationState::WaitingForInitialReplication | ReplicationState::Error => {
            ReplicationState::Replicating
        }
        s => s,
    };
    rel.last_cycle = cycle;
    // The primary's clock is not trusted for what guards this host: the split-brain guard
    // of unplanned failover ("the primary still sends points") and retention's spacing read
    // these times. The guard uses when the point arrived here; the point's own time is the
    // primary's, clamped between the previous point's and now (a primary's clock ahead or
    // a hostile primary cannot place a point in the future or reorder points).
    let now = now_unix();
    rel.last_point_at = Some(now);
    let newest_before = shared
        .store
        .list_points(rel.vm_id)?
        .iter()
        .map(|p| p.taken_at)
        .max()
        .unwrap_or(i64::MIN);
    let taken_at = taken_at.min(now).max(newest_before.min(now));
    let point = PointRow {
        id: 0,
        vm_id: rel.vm_id,
        cycle,
        taken_at,
        applied_at: now_unix(),
        kind: kind.to_owned(),
        layers: staging
            .layers
            .iter()
            .map(|(d, p)| (*d, p.display().to_string()))
            .collect(),
        bytes: bytes as i64,
        consistency: if app_consistent {
            "application"
        } else {
            "crash"
        }
        .to_owned(),
    };
    let id = shared.store.commit_point(&point, &rel)?;
    let _ = std::fs::remove_file(vm_dir.join(STAGING_FILE));
    // The replica VM's disks show the latest point.
    let mut spec = vm.spec.clone();
    for (d, p) in &point.layers {
        if let Some(slot) = spec.disks.get_mut(*d) {
            slot.file = p.clone();
        }
    }
    shared.store.set_vm_spec(rel.vm_id, &spec)?;
    shared.events.emit(
        &vm.spec.name,
        "recovery_point_added",
        &format!("recovery point {id} (cycle {cycle}, {kind}, {bytes} bytes)"),
    );
    info!(vm = %vm.spec.name, cycle, point = id, bytes, "recovery point committed");
    Ok((id, bytes))
}

/// Applies an initial copy exported on the primary (`--initial export:DIR`) as the first
/// recovery point. The data file is read as the wire stream would be (checksummed frames):
/// a damaged or truncated file is refused and nothing becomes visible.
pub async fn import_initial(shared: &Arc<Shared>, vm_id: i64, dir: &Path) -> anyhow::Result<i64> {
    let rel = shared
        .store
        .replication(vm_id)?
        .ok_or_else(|| anyhow!("replication was removed"))?;
    let vm = shared
        .store
        .vm_by_id(vm_id)?
        .ok_or_else(|| anyhow!("the replica VM is gone"))?;
    if rel.role != Role::Replica {
        bail!(
            "{} is the primary: import on its replica server {}",
            vm.spec.name,
            rel.partner_name
        );
    }
    if rel.last_cycle != 0 {
        bail!(
            "{} already has recovery points: there is nothing to import",
            vm.spec.name
        );
    }
    let manifest_path = dir.join(EXPORT_MANIFEST);
    let manifest: ExportManifest = std::fs::read(&manifest_path)
        .map_err(|e| {
            anyhow!(
                "cannot read {} ({e}): give the folder the primary exported to, DIR/{}",
                manifest_path.display(),
                vm.spec.name
            )
        })
        .and_then(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| anyhow!("{} is not an export manifest: {e}", manifest_path.display()))
        })?;
    if manifest.format != EXPORT_FORMAT {
        bail!(
            "export format {} is not supported (this ferryd reads {EXPORT_FORMAT})",
            manifest.format
        );
    }
    if manifest.vm != vm.spec.name.as_str() {
        bail!("this export holds VM {}, not {}", manifest.vm, vm.spec.name);
    }
    if manifest.primary_fingerprint != rel.partner_fingerprint {
        bail!(
            "this export comes from host {} (certificate {}), not from {}'s primary {}",
            manifest.primary,
            manifest.primary_fingerprint,
            vm.spec.name,
            rel.partner_name
        );
    }
    if manifest.cycle != 1 {
        bail!(
            "the export holds cycle {}, not an initial copy",
            manifest.cycle
        );
    }
    let data = dir.join(EXPORT_DATA);
    let len = std::fs::metadata(&data)
        .map_err(|e| anyhow!("cannot read {} ({e})", data.display()))?
        .len();
    if len != manifest.file_bytes {
        bail!(
            "{} is {len} bytes, the manifest says {}: the copy is incomplete",
            data.display(),
            manifest.file_bytes
        );
    }
    let lock = shared
        .replica
        .sessions
        .lock()
        .expect("sessions")
        .entry(vm_id)
        .or_default()
        .clone();
    let _one_session = lock.lock().await;
    // Again under the lock: an import (or a session) may have committed meanwhile.
    let rel = shared
        .store
        .replication(vm_id)?
        .ok_or_else(|| anyhow!("replication was removed"))?;
    if rel.last_cycle != 0 {
        bail!(
            "{} already has recovery points: there is nothing to import",
            vm.spec.name
        );
    }
    // The stream ends as a session's would.
    let mut end = FrameWriter::new(Vec::new());
    end.write_control(&Msg::CycleEnd {
        cycle: manifest.cycle,
        batches: None,
        bytes: None,
    })
    .await?;
    let stream = tokio::io::AsyncReadExt::chain(
        tokio::fs::File::open(&data).await?,
        std::io::Cursor::new(end.into_inner()),
    );
    let mut reader = FrameReader::new(stream);
    let point = receive_cycle(
        shared,
        &rel,
        &mut reader,
        manifest.cycle,
        &manifest.kind,
        manifest.taken_at,
        0,
        manifest.frames,
        manifest.data_bytes,
        false,
        0,
        false,
    )
    .await
    .with_context(|| format!("importing {}", data.display()))?
    .0;
    info!(vm = %vm.spec.name, point, "initial copy imported");
    Ok(point)
}

/// The backing file named in a qcow2 image's header (relative names resolved against the
/// image's directory), if any.
fn backing_file(image: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).ok()?;
    let mut head = [0u8; 20];
    f.read_exact(&mut head).ok()?;
    if &head[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(head[16..20].try_into().ok()?) as usize;
    if offset == 0 || len == 0 || len > 4096 {
        return None;
    }
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut name = vec![0u8; len];
    f.read_exact(&mut name).ok()?;
    let name = PathBuf::from(String::from_utf8(name).ok()?);
    Some(if name.is_absolute() {
        name
    } else {
        image.parent()?.join(name)
    })
}

/// An existing copy must be a qcow2 image of the disk's exact size.
fn check_seed(path: &Path, size: u64) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| format!("{} cannot be read ({e})", path.display()))?;
    if &head[..4] != b"QFI\xfb" {
        return Err(format!(
            "{} is not a qcow2 image (convert it with `qemu-img convert -O qcow2`)",
            path.display()
        ));
    }
    let virtual_size = u64::from_be_bytes(head[24..32].try_into().expect("8 bytes"));
    if virtual_size != size {
        return Err(format!(
            "{} is {virtual_size} bytes, the disk is {size}",
            path.display()
        ));
    }
    Ok(())
}

/// The chunk hashes of every replicated disk: of the latest recovery point, or of the
/// existing copy before the first point.
async fn disk_hashes(shared: &Arc<Shared>, vm_id: i64) -> anyhow::Result<Vec<(usize, String)>> {
    let rel = shared
        .store
        .replication(vm_id)?
        .ok_or_else(|| anyhow!("replication was removed"))?;
    let vm = shared
        .store
        .vm_by_id(vm_id)?
        .ok_or_else(|| anyhow!("the replica VM is gone"))?;
    let latest = shared.store.list_points(vm_id)?.pop();
    let qemu_nbd = qemu_nbd_path(&shared.cfg);
    let mut out = Vec::new();
    for (disk, size) in replicated_disks(&vm.spec, &rel) {
        let image = match &latest {
            Some(p) => p
                .layers
                .iter()
                .find(|(d, _)| *d == disk)
                .map(|(_, l)| PathBuf::from(l))
                .ok_or_else(|| anyhow!("the latest recovery point has no layer for disk {disk}"))?,
            None => {
                let seed = PathBuf::from(&vm.spec.disks[disk].file);
                if !seed.exists() {
                    bail!("there is no recovery point and no existing copy of disk {disk} to compare with");
                }
                seed
            }
        };
        let socket = shared
            .cfg
            .data_dir
            .join("run")
            .join(format!("hash-{vm_id}-{disk}.sock"));
        let export = OfflineExport::start(&qemu_nbd, &image, None, &socket).await?;
        let result = async {
            let mut c =
                NbdClient::connect_unix(&socket, export.export_name(), &[BASE_ALLOCATION]).await?;
            let h = hashes::hash_disk(&mut c, size).await?;
            let _ = c.disconnect().await;
            Ok::<_, anyhow::Error>(h)
        }
        .await;
        let _ = export.close().await;
        let h = result.with_context(|| format!("hashing disk {disk} of {}", vm.spec.name))?;
        out.push((disk, hashes::encode(&h)));
    }
    Ok(out)
}

fn replicated_disks(spec: &VmSpec, rel: &ReplicationRow) -> Vec<(usize, u64)> {
    spec.disks
        .iter()
        .enumerate()
        .filter(|(i, _)| !rel.settings.excluded_disks.contains(i))
        .map(|(i, d)| (i, d.size_bytes))
        .collect()
}

async fn create_layer(
    qemu_img: &Path,
    path: &Path,
    size: u64,
    backing: Option<&Path>,
) -> anyhow::Result<()> {
    let mut cmd = Command::new(qemu_img);
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        cmd.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    cmd.arg(path).arg(size.to_string());
    run(cmd, "create a recovery point layer").await
}

async fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
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

fn fsync(p: &Path) -> anyhow::Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", p.display()))
}

/// Drops the recovery points the policy no longer keeps, merging their layers.
pub async fn apply_retention(shared: &Arc<Shared>, vm_id: i64) -> anyhow::Result<()> {
    let Some(rel) = shared.store.replication(vm_id)? else {
        return Ok(());
    };
    let _points_locked = shared.lock_points(vm_id).await;
    let points = shared.store.list_points(vm_id)?;
    let list: Vec<(i64, i64)> = points.iter().map(|p| (p.id, p.taken_at)).collect();
    let pinned = shared.pinned_points(vm_id);
    let mut drop: Vec<i64> = rel.settings.retention.to_drop(&list, &pinned);
    // A merge rewrites the dropped point's layer, which every later point is built on: below
    // a pinned point (a test failover runs on it) nothing is merged.
    if let Some(lowest_pin) = points.iter().position(|p| pinned.contains(&p.id)) {
        drop.retain(|id| points.iter().position(|p| p.id == *id) > Some(lowest_pin));
    }
    // Oldest first, so each merge folds a point into the one below it.
    drop.sort_by_key(|id| points.iter().position(|p| p.id == *id));
    for id in drop {
        let points = shared.store.list_points(vm_id)?;
        let Some(pos) = points.iter().position(|p| p.id == id) else {
            continue;
        };
        let Some(next) = points.get(pos + 1).cloned() else {
            continue;
        };
        let dropped = points[pos].clone();
        let above = points.get(pos + 2).cloned();
        // 1. The dropped point stops existing before its layer's content changes.
        shared.store.delete_point(id)?;
        for (disk, layer) in &dropped.layers {
            let Some((_, next_layer)) = next.layers.iter().find(|(d, _)| d == disk).cloned() else {
                continue;
            };
            // 2. Fold the successor's layer into the dropped one: it now holds `next`.
            let mut cmd = Command::new(&shared.cfg.qemu_img);
            cmd.args(["commit", "-q", "-f", "qcow2"]).arg(&next_layer);
            run(cmd, "merge recovery point layers").await?;
            // 3. `next` is now the merged layer.
            let mut layers = shared
                .store
                .list_points(vm_id)?
                .into_iter()
                .find(|p| p.id == next.id)
                .map(|p| p.layers)
                .unwrap_or_default();
            for l in layers.iter_mut().filter(|(d, _)| d == disk) {
                l.1 = layer.clone();
            }
            shared.store.set_point_layers(next.id, &layers)?;
            // 4. The layer above (if any) now backs onto the merged layer: same content.
            if let Some(above) = &above {
                if let Some((_, above_layer)) = above.layers.iter().find(|(d, _)| d == disk) {
                    let mut cmd = Command::new(&shared.cfg.qemu_img);
                    cmd.args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                        .arg(layer)
                        .arg(above_layer);
                    run(cmd, "rebase a recovery point layer").await?;
                }
            } else {
                // A staged cycle's layers sit on `next_layer`: rebase them too. The list is
                // copied out first: no lock is held across qemu-img, which would stall
                // every replication session of this host.
                let staged: Vec<PathBuf> = shared
                    .replica
                    .staging
                    .lock()
                    .expect("staging")
                    .get(&vm_id)
                    .map(|s| {
                        s.layers
                            .iter()
                            .filter(|(d, _)| d == disk)
                            .map(|(_, p)| p.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for p in staged {
                    let mut cmd = Command::new(&shared.cfg.qemu_img);
                    cmd.args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                        .arg(layer)
                        .arg(&p);
                    let _ = run(cmd, "rebase a staged layer").await;
                }
            }
            // 5. The successor's old layer is no longer referenced.
            if next_layer != *layer {
                let _ = std::fs::remove_file(&next_layer);
            }
        }
        // Keep the replica VM's disk paths on the latest point.
        if let (Some(last), Some(vm)) = (
            shared.store.list_points(vm_id)?.last().cloned(),
            shared.store.vm_by_id(vm_id)?,
        ) {
            let mut spec = vm.spec.clone();
            for (d, p) in &last.layers {
                if let Some(slot) = spec.disks.get_mut(*d) {
                    slot.file = p.clone();
                }
            }
            shared.store.set_vm_spec(vm_id, &spec)?;
        }
        info!(vm_id, point = id, "recovery point merged away by retention");
    }
    Ok(())
}

const STAGING_FILE: &str = "staging.json";

/// Records how far a cycle being received got (after its layers were flushed).
fn save_staging(vm_dir: &Path, staging: &Staging) -> anyhow::Result<()> {
    let tmp = vm_dir.join("staging.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(staging)?)?;
    fsync(&tmp)?;
    std::fs::rename(&tmp, vm_dir.join(STAGING_FILE))?;
    // The rename is durable only once the directory is.
    fsync(vm_dir)?;
    Ok(())
}

/// At startup: a cycle that was being received resumes from its `staging.json` (if it is
/// the next cycle and its layers are there); any other layer not referenced by a recovery
/// point is a half-received cycle and goes. Returns the staged cycles by VM id.
pub fn recover_staging(store: &Store) -> anyhow::Result<HashMap<i64, Staging>> {
    let mut staged = HashMap::new();
    for rel in store
        .list_replications()?
        .into_iter()
        .filter(|r| r.role == Role::Replica)
    {
        let points = store.list_points(rel.vm_id)?;
        let mut referenced: Vec<String> = points
            .iter()
            .flat_map(|p| p.layers.iter().map(|(_, l)| l.clone()))
            .collect();
        let Some(vm) = store.vm_by_id(rel.vm_id)? else {
            continue;
        };
        let Some(dir) = PathBuf::from(&vm.spec.disks[0].file)
            .parent()
            .map(Path::to_path_buf)
        else {
            continue;
        };
        let staging: Option<Staging> = std::fs::read(dir.join(STAGING_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|s: &Staging| {
                s.cycle == rel.last_cycle + 1 && s.layers.iter().all(|(_, p)| p.exists())
            });
        match staging {
            Some(s) => {
                info!(vm = %vm.spec.name, cycle = s.cycle, next_batch = s.next_batch, "a partly received cycle will resume");
                referenced.extend(s.layers.iter().map(|(_, p)| p.display().to_string()));
                staged.insert(rel.vm_id, s);
            }
            None => {
                let _ = std::fs::remove_file(dir.join(STAGING_FILE));
            }
        }
        // Everything a referenced layer is built on is referenced too: a crash in the
        // middle of a retention merge leaves a dropped point's layer under later ones.
        let mut queue: Vec<PathBuf> = referenced.iter().map(PathBuf::from).collect();
        while let Some(layer) = queue.pop() {
            if let Some(b) = backing_file(&layer) {
                let s = b.display().to_string();
                if !referenced.contains(&s) {
                    referenced.push(s);
                    queue.push(b);
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("disk")
                && name.contains(".c")
                && name.ends_with(".qcow2")
                && !referenced.iter().any(|r| Path::new(r) == p)
            {
                info!(file = %p.display(), "removing a layer of an incomplete cycle");
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    Ok(staged)
}

/// Removes a replica VM's relationship, recovery points and files.
pub fn remove_replica(shared: &Arc<Shared>, vm: &VmName) -> anyhow::Result<()> {
    let row = shared.store.get_vm(vm)?;
    let points = shared.store.list_points(row.id)?;
    shared
        .replica
        .staging
        .lock()
        .expect("staging")
        .remove(&row.id);
    shared.store.delete_replication(row.id)?;
    shared.store.delete_vm(vm)?;
    let mut dirs = Vec::new();
    for p in &points {
        for (_, l) in &p.layers {
            let _ = std::fs::remove_file(l);
            if let Some(d) = Path::new(l).parent() {
                dirs.push(d.to_path_buf());
            }
        }
    }
    for d in &row.spec.disks {
        let _ = std::fs::remove_file(&d.file);
    }
    if let Some(d) = PathBuf::from(&row.spec.disks[0].file).parent() {
        dirs.push(d.to_path_buf());
    }
    dirs.sort();
    dirs.dedup();
    let cfg = load_config(&shared.store);
    let others: Vec<PathBuf> = shared
        .store
        .list_vms()?
        .iter()
        .flat_map(|v| v.spec.disks.iter().map(|d| PathBuf::from(&d.file)))
        .collect();
    for d in dirs {
        if owns_whole_dir(&d, &cfg, &others) {
            let _ = std::fs::remove_dir_all(&d);
        } else {
            // Shared with a storage location or another VM (nested or overlapping storage
            // paths): only this replica's own files go, then the directory if empty.
            warn!(dir = %d.display(), "replica directory is shared: removing only its own files");
            for f in ["boot/kernel", "boot/initrd", "staging.json"] {
                let _ = std::fs::remove_file(d.join(f));
            }
            let _ = std::fs::remove_dir(d.join("boot"));
            let _ = std::fs::remove_dir(&d);
        }
    }
    Ok(())
}

/// Whether `dir` (a removed replica's directory) may be deleted with everything in it: it
/// lies strictly inside a storage location, holds no storage location, and holds no disk
/// of another VM. Paths are compared canonicalized (symlinks and `..` cannot fool it).
fn owns_whole_dir(dir: &Path, cfg: &ReplicaServerConfig, other_disks: &[PathBuf]) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let dir = canon(dir);
    let storages: Vec<PathBuf> = cfg
        .entries
        .iter()
        .map(|e| PathBuf::from(&e.storage))
        .chain(cfg.default_storage.iter().map(PathBuf::from))
        .map(|p| canon(&p))
        .collect();
    storages.iter().any(|s| dir.starts_with(s) && &dir != s)
        && !storages.iter().any(|s| s.starts_with(&dir))
        && !other_disks.iter().any(|d| canon(d).starts_with(&dir))
}
