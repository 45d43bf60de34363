//! One primary's session, once its certificate was admitted: its greeting is answered
//! (refused with the reason, or welcomed with where this replica stands), then its messages
//! are served until it hangs up — a cycle, a planned failover, a boot file, a hash request,
//! each by its own function below. A cycle goes down the pipeline in `cycle`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail};
use ferry_domain::replication::ReplicationSettings;
use ferry_domain::{ReplicationState, VmSpec};
use ferry_store::ReplicationRow;
use ferry_wire::{FrameKind, FrameReader, FrameWriter};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedMutexGuard;
use tracing::{warn, Instrument};

use super::cycle::{receive_cycle, Announced};
use super::disk_hashes::disk_hashes;
use super::replica_vm::{check_hello, managed_boot_dir, replica_for};
use super::reverse::become_replica;
use super::{apply_retention, authorize, load_config, one_session, HELLO_MAX_FRAME, IDLE};
use crate::replication::boot_files::{self, Incoming};
use crate::replication::proto::{BootFileMeta, DiskMeta, Msg, Resume};
use crate::replication::{now_ms, Shared};

/// What a primary's greeting (`Hello`) says.
struct Hello {
    protocol: u32,
    max_protocol: Option<u32>,
    primary: String,
    spec: VmSpec,
    disks: Vec<DiskMeta>,
    settings: ReplicationSettings,
    last_cycle: i64,
    reverse: bool,
    reverse_resync: bool,
    boot_files: Vec<BootFileMeta>,
    next_fingerprint: Option<String>,
}

/// How a greeting is answered, unless refused.
enum Decision {
    /// Welcomed here.
    Welcome(Box<Accepted>),
    /// Sent to another server of this replica cluster (see `broker`).
    Redirect { node: String, address: String },
}

/// A greeting this replica accepted: what its `Welcome` is made of.
struct Accepted {
    protocol: u32,
    storage: PathBuf,
    extra: Vec<(usize, u64, u64)>,
    rel: ReplicationRow,
}

/// A welcomed primary's session: what serving its messages needs.
struct Session<'a> {
    fingerprint: &'a str,
    vm_id: i64,
    spec: VmSpec,
    boot_files: Vec<BootFileMeta>,
    /// Where this replica keeps its own boot files (`None`: it has none).
    boot_dir: Option<PathBuf>,
    need_boot_files: Vec<String>,
    incoming_boot_file: Option<Incoming>,
    /// The successor certificate announced in the `Welcome`.
    next_fp: Option<String>,
    /// One session per VM at a time.
    _one_session: OwnedMutexGuard<()>,
}

pub(super) async fn session<R, W>(
    shared: &Arc<Shared>,
    r: R,
    w: W,
    fingerprint: &str,
    via_ca: super::Admission,
    from_ip: String,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = FrameReader::new(r).with_max_frame(HELLO_MAX_FRAME);
    let mut writer = FrameWriter::new(w);
    let hello = read_hello(&mut reader, &mut writer).await?;
    reader.set_max_frame(ferry_wire::MAX_FRAME);
    let Some(mut session) =
        welcome(shared, &mut writer, hello, fingerprint, via_ca, &from_ip).await?
    else {
        // Redirected to another server of this replica cluster.
        let _ = writer.shutdown().await;
        return Ok(());
    };
    serve(shared, &mut reader, &mut writer, &mut session).await
}

/// The first frame, which must be the primary's greeting; a malformed one is answered
/// with `Refused`.
async fn read_hello<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> anyhow::Result<Hello>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello: Msg = match next_control(reader).await {
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
    let Msg::Hello {
        protocol,
        max_protocol,
        primary,
        spec,
        disks,
        settings,
        last_cycle,
        reverse,
        reverse_resync,
        boot_files,
        next_fingerprint,
    } = hello
    else {
        bail!("the primary did not start with Hello");
    };
    Ok(Hello {
        protocol,
        max_protocol,
        primary,
        spec,
        disks,
        settings,
        last_cycle,
        reverse,
        reverse_resync,
        boot_files,
        next_fingerprint,
    })
}

/// Answers the greeting: `Welcome`, with where this replica stands (its last cycle, a
/// staged cycle to resume, the boot files it lacks), `Redirect` to the server of this
/// replica cluster that holds the VM (`None`), or `Refused` with the reason.
async fn welcome<'a, W: AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    writer: &mut FrameWriter<W>,
    hello: Hello,
    fingerprint: &'a str,
    via_ca: super::Admission,
    from_ip: &str,
) -> anyhow::Result<Option<Session<'a>>> {
    let accepted = match accept(shared, &hello, fingerprint, via_ca, from_ip).await {
        Ok(Decision::Welcome(a)) => *a,
        Ok(Decision::Redirect { node, address }) => {
            writer
                .write_control(&Msg::Redirect { node, address })
                .await?;
            return Ok(None);
        }
        Err(reason) => return refuse(writer, reason).await,
    };
    let vm_id = accepted.rel.vm_id;
    let one_session = one_session(shared, vm_id).await;
    let resume = shared
        .replica
        .staging
        .lock()
        .expect("staging")
        .get(&vm_id)
        .map(|s| Resume {
            cycle: s.cycle,
            next_batch: s.next_batch,
            capture: s.capture,
        });
    // A direct-kernel replica boots from this host's own copies of its kernel and initrd
    // (in its directory in the replica storage), never from the primary's paths.
    let boot_dir = match managed_boot_dir(shared, vm_id, &accepted.storage) {
        Ok(d) => d,
        Err(e) => return refuse(writer, format!("{e:#}")).await,
    };
    let need_boot_files = match &boot_dir {
        Some(dir) => boot_files::needed(dir, &hello.boot_files).await,
        None => Vec::new(),
    };
    let next_fp = shared.identity.next();
    // Read again now that this session holds the VM: a session still running when the
    // greeting arrived (a primary that died with a cycle's end on the way) may have
    // committed a cycle since.
    let last_cycle = shared
        .store
        .replication(vm_id)?
        .map_or(accepted.rel.last_cycle, |r| r.last_cycle);
    let last_capture = shared
        .store
        .setting(&super::commit::last_capture_key(vm_id))?
        .and_then(|v| v.parse().ok());
    writer
        .write_control(&Msg::Welcome {
            protocol: accepted.protocol,
            replica: shared.cfg.name.clone(),
            last_cycle,
            last_capture,
            resume,
            extra: accepted.extra,
            need_boot_files: need_boot_files.clone(),
            next_fingerprint: next_fp.clone(),
        })
        .await?;
    Ok(Some(Session {
        fingerprint,
        vm_id,
        spec: hello.spec,
        boot_files: hello.boot_files,
        boot_dir,
        need_boot_files,
        incoming_boot_file: None,
        next_fp,
        _one_session: one_session,
    }))
}

/// Decides on a greeting: the protocol both speak, the primary authorized by its
/// certificate and name, its VM description within this host's rules, then the replica VM
/// found or created (after reversing replication onto this host's VM, if asked), with both
/// sides agreeing on where they are. `Err`: why the primary is refused.
async fn accept(
    shared: &Arc<Shared>,
    hello: &Hello,
    fingerprint: &str,
    via_ca: super::Admission,
    from_ip: &str,
) -> Result<Decision, String> {
    let Hello {
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
    } = hello;
    let protocol = crate::replication::proto::negotiate(*protocol, *max_protocol)?;
    // A primary of a replica cluster's Broker: the node the Broker placed its VM on
    // holds the replica; any other server of the cluster sends it there.
    let brokered =
        crate::broker::node_answer(shared, primary, fingerprint, via_ca.broker, &spec.name).await;
    let placed_here = matches!(brokered, Some(Ok(crate::broker::NodeAnswer::Here(_))));
    let storage = match brokered {
        Some(Ok(crate::broker::NodeAnswer::Here(storage))) => storage,
        Some(Ok(crate::broker::NodeAnswer::Elsewhere { node, address })) => {
            if protocol < 4 {
                return Err(format!(
                    "{} does not hold the replica of {}: its Replica Broker {node} ({address}) places it; {primary} speaks protocol {protocol} and cannot be redirected: upgrade ferry there",
                    shared.cfg.name, spec.name
                ));
            }
            return Ok(Decision::Redirect { node, address });
        }
        Some(Err(reason)) => return Err(reason),
        None => {
            let cfg = load_config(&shared.store);
            authorize(
                &cfg,
                &shared.cfg.name,
                primary,
                fingerprint,
                via_ca.own.unwrap_or(false),
            )
            .inspect_err(|_| {
                warn!(%primary, %fingerprint, "refused an unauthorized primary");
            })?
            .0
        }
    };
    // Everything the primary says about its VM is checked against this host's rules
    // before anything is stored or created.
    if let Err(reason) = check_hello(spec, disks, settings, boot_files) {
        warn!(%primary, vm = %spec.name, %reason, "refused a primary's VM description");
        shared.events.emit(
            &spec.name,
            "primary_refused",
            &format!("refused {primary}'s replication of {}: {reason}", spec.name),
        );
        return Err(reason);
    }
    // Authenticated by its current certificate: its announced successor is trusted next.
    crate::replication::rotation::learn(&shared.store, fingerprint, next_fingerprint.as_deref());
    // A Replica Broker keeps no replica itself: it places the VM on a node of its
    // cluster, and the primary greets that node.
    if crate::broker::brokered_cluster(shared).is_some() {
        if protocol < 4 {
            return Err(format!(
                "{} is a replica cluster's Broker, which sends primaries to the node holding the replica (protocol 4); {primary} speaks up to {protocol}: upgrade ferry there",
                shared.cfg.name
            ));
        }
        let name = spec.name.to_string();
        let (node, address) = tokio::task::block_in_place(|| crate::broker::place(shared, &name))?;
        return Ok(Decision::Redirect { node, address });
    }
    let mut extra = Vec::new();
    if *reverse {
        extra = become_replica(
            shared,
            primary,
            fingerprint,
            from_ip,
            spec,
            settings,
            *primary_last_cycle,
            *reverse_resync,
        )
        .await?;
    }
    if *primary_last_cycle > 0 && shared.store.get_vm(&spec.name).is_err() {
        return Err(format!(
            "{} has no replica of {} (it was removed there): on {primary}, run `ferry replication remove {}`, then enable replication again",
            shared.cfg.name, spec.name, spec.name
        ));
    }
    let rel = tokio::task::block_in_place(|| {
        replica_for(
            shared,
            primary,
            fingerprint,
            from_ip,
            spec,
            disks,
            settings,
            &storage,
        )
    })?;
    // A replica the Broker placed here: marked as the Broker's, and on the shared
    // directory before the primary hears where this node stands.
    if placed_here {
        crate::broker::held_here(shared, rel.vm_id)?;
    }
    // Both sides must agree on where they are: equal, or the replica one ahead (its answer
    // to the last cycle was lost). Anything else means the relationship was re-created on
    // one side, and applying deltas would build on the wrong base.
    if rel.settings.relationship_id != settings.relationship_id
        || (*primary_last_cycle != rel.last_cycle && *primary_last_cycle != rel.last_cycle - 1)
    {
        return Err(format!(
            "the replica of {} on {} has recovery points up to cycle {}, but the primary is at cycle {primary_last_cycle}: replication was re-created on one side; remove it on both ({primary} and {}) and enable it again",
            spec.name, shared.cfg.name, rel.last_cycle, shared.cfg.name
        ));
    }
    Ok(Decision::Welcome(Box::new(Accepted {
        protocol,
        storage,
        extra,
        rel,
    })))
}

/// Serves a welcomed primary's messages until it hangs up.
async fn serve<R, W>(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    s: &mut Session<'_>,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let msg = match tokio::time::timeout(IDLE, reader.read_frame()).await {
            Err(_) => bail!("the primary went silent"),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(f))) if f.kind == FrameKind::Keepalive => continue,
            Ok(Ok(Some(f))) => f.control::<Msg>()?,
            Ok(Err(e)) => return Err(e.into()),
        };
        if let Some(next) = &s.next_fp {
            // The primary went on after a Welcome that carried it.
            crate::replication::rotation::told(&shared.store, s.vm_id, next);
        }
        match msg {
            Msg::PlannedFailover {
                cycle,
                start,
                reverse_to,
            } => {
                let reply = planned_failover(shared, s, cycle, start, reverse_to).await?;
                writer.write_control(&reply).await?;
            }
            Msg::BootFile { role, offset, data } => {
                boot_file(writer, s, role, offset, &data).await?;
            }
            Msg::HashRequest => hashes(shared, writer, s.vm_id).await?,
            Msg::CycleBegin {
                cycle,
                kind,
                taken_at,
                from_batch,
                batches,
                bytes,
                app_consistent,
                capture,
                streamed,
            } => {
                let announced = Announced {
                    cycle,
                    kind: &kind,
                    taken_at,
                    from_batch,
                    batches,
                    bytes,
                    app_consistent,
                    capture,
                    streamed,
                };
                cycle_begin(shared, reader, writer, s, &announced).await?;
            }
            msg => bail!("unexpected message from the primary: {msg:?}"),
        }
    }
}

/// `PlannedFailover`: the primary's last cycle is here, so this host takes over (starting
/// the VM only if this host allows primaries to), and reverses replication if asked. The
/// answer to send.
async fn planned_failover(
    shared: &Arc<Shared>,
    s: &Session<'_>,
    cycle: i64,
    start: bool,
    reverse_to: Option<(String, String)>,
) -> anyhow::Result<Msg> {
    let current = shared.store.replication(s.vm_id)?.map(|r| r.last_cycle);
    let reply = if current != Some(cycle) {
        Msg::Failed {
            reason: format!(
                "the replica holds cycle {current:?}, not the primary's last cycle {cycle}: the planned failover would lose data"
            ),
        }
    } else {
        // Starting a VM here is this host's decision, not the primary's.
        let may_start =
            start && super::config_for(shared, s.spec.name.as_str()).allow_primary_start;
        let held_back = if start && !may_start {
            format!(
                "; {} was not started: {} does not let primaries start VMs (start it there with `ferry vm start {}`, or allow it with `ferry replica-server set --allow-primary-start yes`)",
                s.spec.name, shared.cfg.name, s.spec.name
            )
        } else {
            String::new()
        };
        match crate::replication::failover::start(shared, s.spec.name.as_str(), None, may_start, true)
            .await
            .map(|mut r| {
                r.message.push_str(&held_back);
                r
            }) {
            Ok(r) => match reverse_to {
                None => Msg::FailedOver { message: r.message },
                Some((name, addr)) => match crate::replication::failover::reverse(
                    shared,
                    s.spec.name.as_str(),
                    &name,
                    &addr,
                    s.fingerprint,
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
                            r.message, e.message, s.spec.name
                        ),
                    },
                },
            },
            Err(e) => Msg::Failed { reason: e.message },
        }
    };
    Ok(reply)
}

/// `BootFile`: a chunk of a boot file this replica asked for; `BootFileStored` once the
/// file is whole.
async fn boot_file<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    s: &mut Session<'_>,
    role: String,
    offset: u64,
    data: &str,
) -> anyhow::Result<()> {
    let dir = s
        .boot_dir
        .as_deref()
        .ok_or_else(|| anyhow!("the primary sent a boot file nobody asked for"))?;
    match boot_files::receive_chunk(
        dir,
        &s.boot_files,
        &s.need_boot_files,
        &mut s.incoming_boot_file,
        &role,
        offset,
        data,
    )
    .await
    {
        Ok(false) => {}
        Ok(true) => writer.write_control(&Msg::BootFileStored { role }).await?,
        Err(reason) => return fail(writer, reason).await,
    }
    Ok(())
}

/// `HashRequest`: the chunk hashes of every replicated disk, one `Hashes` per disk.
async fn hashes<W: AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    writer: &mut FrameWriter<W>,
    vm_id: i64,
) -> anyhow::Result<()> {
    match disk_hashes(shared, vm_id).await {
        Ok(list) => {
            for (disk, hashes) in list {
                writer.write_control(&Msg::Hashes { disk, hashes }).await?;
            }
            Ok(())
        }
        Err(e) => fail(writer, format!("{e:#}")).await,
    }
}

/// `CycleBegin`: the cycle becomes a recovery point (`Committed`), unless the replica
/// takes no more points or the cycle is out of sequence (`Failed`). A cycle committed
/// already is answered again: the primary did not hear the answer last time.
async fn cycle_begin<R, W>(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    s: &Session<'_>,
    announced: &Announced<'_>,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cycle = announced.cycle;
    let rel = shared
        .store
        .replication(s.vm_id)?
        .ok_or_else(|| anyhow!("replication was removed"))?;
    if let Some(reason) = cycle_refusal(shared, &rel, &s.spec, cycle) {
        return fail(writer, reason).await;
    }
    if cycle == rel.last_cycle {
        // Already committed: the primary did not hear the answer last time. A replica
        // of the Broker's is on the shared directory first (the write may be what failed).
        if let Err(e) = crate::broker::hold(shared, rel.vm_id) {
            return fail(writer, format!("{e:#}")).await;
        }
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
        return Ok(());
    }
    let started_ms = now_ms();
    // Every log line of this cycle carries the VM, relationship and cycle number.
    let span = tracing::info_span!(
        "cycle",
        vm = %s.spec.name,
        relationship = %rel.settings.relationship_id,
        cycle
    );
    let received = receive_cycle(shared, &rel, reader, announced)
        .instrument(span.clone())
        .await;
    // A streamed cycle says its size at the end.
    let bytes = received.as_ref().map(|r| r.1).unwrap_or(announced.bytes);
    let received = received.map(|r| r.0);
    // The replica's own statistics: what arrived, how long it took to apply.
    let _ = shared.store.record_cycle(&ferry_store::CycleRow {
        vm_id: rel.vm_id,
        cycle,
        kind: announced.kind.to_owned(),
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
            Ok(())
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

/// Why this replica takes no cycle `cycle` now, if it does not: its relationship is
/// suspended or failed over (a cycle committed already is still answered), or the cycle
/// does not follow the last one.
fn cycle_refusal(
    shared: &Shared,
    rel: &ReplicationRow,
    spec: &VmSpec,
    cycle: i64,
) -> Option<String> {
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
        return Some(reason);
    }
    if cycle < rel.last_cycle || cycle > rel.last_cycle + 1 {
        return Some(format!(
            "cycle {cycle} does not follow cycle {} of {}",
            rel.last_cycle, spec.name
        ));
    }
    None
}

/// Answers `Refused` with `reason`, and ends the session with it.
async fn refuse<W: AsyncWrite + Unpin, T>(
    writer: &mut FrameWriter<W>,
    reason: String,
) -> anyhow::Result<T> {
    writer
        .write_control(&Msg::Refused {
            reason: reason.clone(),
        })
        .await?;
    bail!(reason)
}

/// Answers `Failed` with `reason`, and ends the session with it.
async fn fail<W: AsyncWrite + Unpin, T>(
    writer: &mut FrameWriter<W>,
    reason: String,
) -> anyhow::Result<T> {
    writer
        .write_control(&Msg::Failed {
            reason: reason.clone(),
        })
        .await?;
    bail!(reason)
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
