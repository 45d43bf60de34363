//! A session with the replica server: mutual TLS with its pinned certificate, then the
//! greeting (`Hello`, answered by `Welcome`) that introduces the VM and learns where the
//! replica stands (its last cycle and the capture it came from, a partly received cycle to
//! resume). Every exchange with the replica goes through one: a cycle sent, the hashes a
//! comparison needs, a planned failover.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ferry_domain::ReplicationState;
use ferry_store::{ReplicationRow, VmRow};
use ferry_wire::{FrameReader, FrameWriter};

use super::disks;
use super::send::STALL_TIMEOUT;
use crate::peer;
use crate::replication::proto::{DiskMeta, Msg, MIN_PROTOCOL, PROTOCOL};
use crate::replication::Shared;

/// The marker of a reverse replication the old primary has not accepted yet.
pub fn reverse_key(vm_id: i64) -> String {
    format!("reverse_pending:{vm_id}")
}

/// A connection to the replica server that got past Hello.
pub struct Session {
    pub(super) reader: FrameReader<tokio::io::ReadHalf<peer::PeerStream>>,
    pub(super) writer: FrameWriter<tokio::io::WriteHalf<peer::PeerStream>>,
    /// The replica server's host name.
    pub replica: String,
    /// Reverse replication: ranges the old primary holds beyond the failover point.
    pub extra: Vec<(usize, u64, u64)>,
    /// The last cycle the replica committed.
    pub last_cycle: i64,
    /// The capture that cycle came from, if the replica says.
    pub last_capture: Option<u64>,
    /// A partially received cycle on the replica.
    pub resume: Option<crate::replication::proto::Resume>,
    /// The protocol version the replica answered.
    pub protocol: u32,
}

/// Connects to the replica server (mutual TLS, pinned certificate) and introduces the VM:
/// the replica authorizes this host and creates (or finds) the replica VM. A refusal comes
/// back as an error carrying the replica's reason.
pub async fn handshake(
    shared: &Shared,
    vm: &VmRow,
    rel: &ReplicationRow,
) -> anyhow::Result<Session> {
    let disks: Vec<DiskMeta> = disks(shared, vm, rel)
        .into_iter()
        .map(|(index, _, size_bytes)| DiskMeta { index, size_bytes })
        .collect();
    let boot = crate::replication::boot_files::announce(&vm.spec).await?;
    // The replica's pinned certificate, or the successor it announced while rotating it.
    let successor =
        crate::replication::rotation::successor(&shared.store, &rel.partner_fingerprint);
    let mut pins = vec![rel.partner_fingerprint.as_str()];
    pins.extend(successor.as_deref());
    // A cluster's VM replicates as the cluster, whichever node runs it.
    let (identity, me) = crate::cluster::replication_identity(shared, vm.spec.name.as_str());
    let next_fp = identity.next();
    let hello = Msg::Hello {
        protocol: MIN_PROTOCOL,
        max_protocol: Some(PROTOCOL),
        primary: me.clone(),
        spec: vm.spec.clone(),
        disks,
        settings: rel.settings.clone(),
        last_cycle: rel.last_cycle,
        reverse: shared
            .store
            .setting(&reverse_key(rel.vm_id))
            .ok()
            .flatten()
            .is_some(),
        reverse_resync: rel.state == ReplicationState::Resynchronizing,
        boot_files: boot.iter().map(|(m, _)| m.clone()).collect(),
        next_fingerprint: next_fp.clone(),
    };
    // A replica cluster's Broker redirects to the node that holds the replica VM; that
    // node is greeted directly until it fails or sends the primary back to the Broker
    // (the replica VM moved). Every server of that cluster has the cluster's certificate.
    let mut target = redirected(shared, rel.vm_id).unwrap_or_else(|| rel.partner_addr.clone());
    // Where the target came from: the redirect remembered from an earlier session (which
    // may be stale: asking the Broker again is the cure), or the Broker just now.
    let mut sent_by: Option<String> = None;
    let mut hops = 0;
    let (mut reader, mut writer, presented, answer) = loop {
        // A replica cluster's node gets a short time to answer: a dead one is silent,
        // and asking its Broker again is cheap.
        let limit = (target != rel.partner_addr).then_some(NODE_CONNECT_TIMEOUT);
        let greeted = greet(shared, rel, &identity, &pins, &target, &hello, limit).await;
        match greeted {
            Err(e) if target != rel.partner_addr && sent_by.is_none() => {
                tracing::info!(vm = %vm.spec.name, node = %target, error = format!("{e:#}"), "the replica cluster's node does not answer; asking its Broker again");
                forget_redirect(shared, rel.vm_id);
                target = rel.partner_addr.clone();
            }
            Err(e) => {
                forget_redirect(shared, rel.vm_id);
                return Err(match sent_by {
                    Some(node) => e.context(format!(
                        "replica server {} sent this primary to its node {node} ({target}), which does not answer (a node that just died is replaced once the cluster has fenced it)",
                        rel.partner_name
                    )),
                    None => e,
                });
            }
            Ok((.., Msg::Redirect { node, address })) if hops < 3 => {
                hops += 1;
                sent_by = Some(node.clone());
                tracing::debug!(vm = %vm.spec.name, %node, %address, "redirected");
                if address == rel.partner_addr {
                    forget_redirect(shared, rel.vm_id);
                } else {
                    shared
                        .redirects
                        .lock()
                        .expect("redirects")
                        .insert(rel.vm_id, address.clone());
                }
                target = address;
            }
            Ok((.., Msg::Redirect { .. })) => {
                forget_redirect(shared, rel.vm_id);
                bail!(
                    "replica server {} redirected this primary in a circle: check its Replica Broker (`ferry replica-broker show` there)",
                    rel.partner_name
                )
            }
            Ok(x) => break x,
        }
    };
    if presented != rel.partner_fingerprint {
        crate::replication::rotation::adopt(&shared.store, &presented);
    }
    match answer {
        Msg::Welcome {
            protocol,
            replica,
            last_cycle,
            last_capture,
            resume,
            extra,
            need_boot_files,
            next_fingerprint,
        } => {
            tracing::debug!(vm = %vm.spec.name, %replica, protocol, "replication session");
            crate::replication::rotation::learn(
                &shared.store,
                &presented,
                next_fingerprint.as_deref(),
            );
            if let Some(next) = &next_fp {
                // The replica answered a Hello that carried it.
                crate::replication::rotation::told(&shared.store, rel.vm_id, next);
            }
            crate::replication::boot_files::send(
                &mut reader,
                &mut writer,
                &boot,
                &need_boot_files,
                STALL_TIMEOUT,
            )
            .await?;
            Ok(Session {
                reader,
                writer,
                replica,
                extra,
                last_cycle,
                last_capture,
                resume,
                protocol,
            })
        }
        Msg::Refused { reason } => bail!(
            "replica server {} refused: {}",
            rel.partner_name,
            // The replica refuses an unknown certificate before the greeting tells it this
            // host's name: its advice names the entry to add as NAME; fill it in.
            reason.replace("--allow NAME=", &format!("--allow {me}="))
        ),
        other => bail!("unexpected answer from the replica server: {other:?}"),
    }
}

/// The node a replica cluster's Broker last redirected this VM's replication to.
fn redirected(shared: &Shared, vm_id: i64) -> Option<String> {
    shared
        .redirects
        .lock()
        .expect("redirects")
        .get(&vm_id)
        .cloned()
}

fn forget_redirect(shared: &Shared, vm_id: i64) {
    shared.redirects.lock().expect("redirects").remove(&vm_id);
}

type Framed = (
    FrameReader<tokio::io::ReadHalf<peer::PeerStream>>,
    FrameWriter<tokio::io::WriteHalf<peer::PeerStream>>,
    String,
    Msg,
);

/// How long a node of a replica cluster (where its Broker sent this primary) has to
/// accept the connection and finish the TLS handshake.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One greeting: connects to `address` (mutual TLS, pinned; within `limit` if given), sends
/// the Hello, and reads the answer, with the streams and the certificate the server
/// presented.
async fn greet(
    shared: &Shared,
    rel: &ReplicationRow,
    identity: &crate::identity::Identity,
    pins: &[&str],
    address: &str,
    hello: &Msg,
    limit: Option<Duration>,
) -> anyhow::Result<Framed> {
    let connect = peer::connect_any(identity, address, pins);
    let tls = match limit {
        Some(limit) => tokio::time::timeout(limit, connect).await.map_err(|_| {
            anyhow!("the replica server at {address} did not answer within {limit:?}")
        })??,
        None => connect.await?,
    };
    let presented = peer::server_fingerprint(&tls).unwrap_or_default();
    let (r, w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    if let Some(l) = shared.limiter(rel) {
        writer.add_limiter(l);
    }
    if let Some(l) = shared.host_limiter.clone() {
        writer.add_limiter(l);
    }
    writer.write_control(hello).await?;
    let answer = next_control(&mut reader, peer::CONNECT_TIMEOUT).await?;
    Ok((reader, writer, presented, answer))
}

impl Session {
    /// Ends the session cleanly (TLS close_notify).
    pub async fn close(mut self) {
        let _ = self.writer.shutdown().await;
    }
}

/// Asks the replica server to fail the VM over to cycle `cycle` (planned failover); returns
/// what it did.
pub async fn send_planned_failover(
    shared: &Shared,
    vm: &VmRow,
    rel: &ReplicationRow,
    start: bool,
    reverse_to: Option<(String, String)>,
) -> anyhow::Result<String> {
    let mut session = handshake(shared, vm, rel).await?;
    session
        .writer
        .write_control(&Msg::PlannedFailover {
            cycle: rel.last_cycle,
            start,
            reverse_to,
        })
        .await?;
    let answer = next_control(&mut session.reader, Duration::from_secs(120)).await?;
    session.close().await;
    match answer {
        Msg::FailedOver { message } => Ok(message),
        Msg::Failed { reason } => bail!("replica server {} refused: {reason}", rel.partner_name),
        other => bail!("unexpected answer from the replica server: {other:?}"),
    }
}

/// The replica's next control message (keepalives skipped), within `timeout`.
pub(super) async fn next_control<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    timeout: Duration,
) -> anyhow::Result<Msg> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, reader.read_frame())
            .await
            .map_err(|_| anyhow!("the replica server did not answer within {timeout:?}"))??
            .ok_or_else(|| anyhow!("the replica server closed the connection"))?;
        if frame.kind != ferry_wire::FrameKind::Keepalive {
            return Ok(frame.control()?);
        }
    }
}
