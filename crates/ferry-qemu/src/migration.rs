//! Live migration of a running VM from one QEMU process to another (on this
//! host or another one) over TCP, with the disks on shared storage.
//!
//! The sequence the daemon drives:
//!
//! ```text
//! target  spawn the same QemuCommand with `incoming: true`   (-incoming defer)
//!         prepare_incoming(target_qmp, listen)               caps events, dirty-bitmaps,
//!                                                            return-path;
//!                                                            migrate-incoming tcp:IP:PORT
//! source  migrate(source_qmp, addr, opts, progress)          the same caps, parameters,
//!                                                            migrate, poll query-migrate
//!                                                            to the end
//! target  wait_incoming_done(target_qmp, timeout)            the guest runs on the target
//! source  quit                                               (run state `postmigrate`)
//! ```
//!
//! Choices and QEMU 7.2 behaviour this module relies on:
//!
//! - **Shared storage, no block migration.** Both QEMUs open the same qcow2
//!   files. `migrate` never asks for the deprecated `blk`/`inc` block
//!   migration; QEMU flushes and inactivates the source's images before the
//!   switchover and the target activates (re-reads) them afterwards, so at
//!   no moment do two QEMUs write the same image.
//! - **Dirty bitmaps travel in the migration stream** (capability
//!   `dirty-bitmaps`, set on both sides): name, granularity, persistence,
//!   recording state and bits arrive on the target's node of the same name,
//!   so changed-block tracking continues on the target without a full copy.
//!   A bitmap that is busy (e.g. exported by a fleecing point) makes
//!   `migrate` fail: release fleecing points first.
//! - **`completed` means the target has the VM** (capability `return-path`,
//!   set on both sides): the source waits for the target to confirm that it
//!   loaded the device state. Without it, QEMU 7.2 reports `completed` as
//!   soon as the stream is sent, even to a peer that discarded it, leaving
//!   the source in `postmigrate` and the VM nowhere.
//! - **QEMU 7.2 bug, worked around: a failed or cancelled migration with
//!   `dirty-bitmaps` silently makes the source's persistent bitmaps
//!   non-persistent.** Migration setup marks every migrated bitmap
//!   "skip store" and nothing clears the mark when the migration fails, while
//!   `query-named-block-nodes` still says `persistent: true`. Such a bitmap
//!   is not written to the image on quit (one loaded from the image stays
//!   `in-use` there, i.e. inconsistent at the next start), and a later
//!   migration delivers it non-persistent to the target. [`migrate`]
//!   therefore re-creates every persistent bitmap on the source after a
//!   failure ([`restore_bitmap_persistence`]).
//! - **The target starts the guest by itself.** The target is started
//!   without `-S`, so QEMU resumes the guest as soon as the migration
//!   completes, as it was running on the source (a guest paused on the
//!   source stays paused). This keeps the downtime to what QEMU reports;
//!   the source's images are already inactive then, so there is no split
//!   brain.
//! - **After a failure or cancel the source runs on**: QEMU re-activates its
//!   images and resumes the guest. The target QEMU cannot be reused (it
//!   exits when its incoming migration fails); start a fresh one to retry.
//!
//! Dropping the future of [`migrate`] does not stop QEMU's migration; call
//! [`cancel`] for that.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::qmp::{
    Command, Migrate, MigrateCancel, MigrateIncoming, MigrateSetCapabilities, MigrateSetParameters,
    MigrationCapability, MigrationInfo, MigrationStatus, Qmp, QmpError, QueryMigrate, QueryStatus,
};

/// Capabilities set on both sides: `events` for prompt status changes,
/// `dirty-bitmaps` so change tracking survives the move, `return-path` so
/// `completed` means the target loaded the VM.
const CAPABILITIES: [MigrationCapability; 3] = [
    MigrationCapability::Events,
    MigrationCapability::DirtyBitmaps,
    MigrationCapability::ReturnPath,
];

/// How long [`restore_bitmap_persistence`] waits for QEMU to release the
/// bitmaps a failed migration held (busy until its cleanup ran).
const BITMAP_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Suffix of the temporary bitmap [`restore_bitmap_persistence`] keeps the
/// bits in while it re-creates a bitmap.
const REARM_SUFFIX: &str = "-ferry-rearm";

/// Longest pause between two `query-migrate` polls; a `MIGRATION` event
/// wakes the poll loop earlier.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long [`migrate`] waits for QEMU to wind down a migration it
/// cancelled on timeout.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A QMP command failed (QEMU's message is the source).
    #[error("QMP command {command} failed during live migration")]
    Qmp {
        /// The command name.
        command: &'static str,
        /// The QMP error.
        #[source]
        source: QmpError,
    },
    /// [`prepare_incoming`] or [`wait_incoming_done`] was called on a QEMU
    /// that was not started as a migration target.
    #[error(
        "QEMU is not waiting for an incoming migration (run state {status}); \
         start it with -incoming defer (QemuCommand::incoming)"
    )]
    NotIncoming {
        /// QEMU's run state.
        status: String,
    },
    /// QEMU reported the migration as failed; the VM runs on the source.
    #[error("Live migration to {target} failed: {desc}")]
    Failed {
        /// The target address.
        target: SocketAddr,
        /// QEMU's `error-desc`.
        desc: String,
    },
    /// Someone else cancelled the migration; the VM runs on the source.
    #[error("Live migration to {target} was cancelled")]
    Cancelled {
        /// The target address.
        target: SocketAddr,
    },
    /// The migration did not complete in time and was cancelled; the VM runs
    /// on the source.
    #[error(
        "Live migration to {target} did not complete within {timeout:?} \
         (status {status}, {transferred} of {total} RAM bytes sent); it was cancelled"
    )]
    Timeout {
        /// The target address.
        target: SocketAddr,
        /// The timeout that elapsed.
        timeout: Duration,
        /// The status when the timeout hit.
        status: MigrationStatus,
        /// RAM bytes sent by then.
        transferred: u64,
        /// Guest RAM size.
        total: u64,
    },
    /// The migration failed and re-creating the source's persistent bitmaps
    /// afterwards failed too (see [`restore_bitmap_persistence`]).
    #[error(
        "{failure}; re-arming the persistent dirty bitmaps afterwards failed too, \
         so they will not be stored on quit (start a new generation)"
    )]
    Rearm {
        /// The migration's failure.
        failure: Box<MigrationError>,
        /// Why re-arming failed.
        #[source]
        source: Box<MigrationError>,
    },
    /// A persistent bitmap stayed busy after a failed migration, so its
    /// persistence could not be restored.
    #[error("Dirty bitmap {name:?} on node {node:?} is still busy {timeout:?} after the migration ended")]
    BitmapBusy {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
        /// How long it was waited for.
        timeout: Duration,
    },
    /// The target's incoming migration failed.
    #[error("Incoming migration failed on the target: {detail}")]
    IncomingFailed {
        /// What the target reported.
        detail: String,
    },
    /// The target did not finish the incoming migration in time.
    #[error(
        "The incoming migration did not finish within {timeout:?} (run state {status}, \
         migration status {migration})"
    )]
    IncomingTimeout {
        /// The timeout that elapsed.
        timeout: Duration,
        /// The target's run state.
        status: String,
        /// The target's migration status.
        migration: MigrationStatus,
    },
}

fn qmp_err(command: &'static str) -> impl FnOnce(QmpError) -> MigrationError {
    move |source| MigrationError::Qmp { command, source }
}

/// Tuning of one outgoing migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateOptions {
    /// Longest pause of the guest at switchover that QEMU aims for, in
    /// milliseconds. QEMU keeps sending dirtied RAM until the rest fits into
    /// this time at the measured bandwidth, so a guest that dirties memory
    /// faster than the link carries never converges (and hits `timeout`).
    pub downtime_limit_ms: u64,
    /// Bandwidth cap in bytes per second.
    pub max_bandwidth: u64,
    /// How long the whole migration may take before it is cancelled.
    pub timeout: Duration,
}

impl Default for MigrateOptions {
    /// 300 ms downtime (QEMU's default), 1 GiB/s (QEMU's own default of
    /// 32 MiB/s is too slow for guests of a few GiB), 10 minutes.
    fn default() -> Self {
        MigrateOptions {
            downtime_limit_ms: 300,
            max_bandwidth: 1 << 30,
            timeout: Duration::from_secs(600),
        }
    }
}

/// A snapshot of a running outgoing migration, passed to the `progress`
/// callback of [`migrate`] after every poll.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationProgress {
    /// QEMU's status.
    pub status: MigrationStatus,
    /// Time since [`migrate`] issued the command.
    pub elapsed: Duration,
    /// RAM bytes sent so far.
    pub ram_transferred: u64,
    /// RAM bytes still to send in this pass.
    pub ram_remaining: u64,
    /// Guest RAM size in bytes.
    pub ram_total: u64,
    /// Passes over the dirty log so far (1 = the first full pass).
    pub dirty_sync_count: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// QEMU's downtime estimate in milliseconds, while `active`.
    pub expected_downtime_ms: Option<u64>,
}

impl MigrationProgress {
    fn from_info(status: MigrationStatus, info: &MigrationInfo, elapsed: Duration) -> Self {
        let ram = info.ram.clone().unwrap_or_default();
        MigrationProgress {
            status,
            elapsed,
            ram_transferred: ram.transferred,
            ram_remaining: ram.remaining,
            ram_total: ram.total,
            dirty_sync_count: ram.dirty_sync_count,
            mbps: ram.mbps,
            expected_downtime_ms: info.expected_downtime_ms,
        }
    }
}

/// What a completed migration cost, as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationOutcome {
    /// Duration of the whole migration in milliseconds (QEMU's
    /// `total-time`; measured by [`migrate`] if QEMU omits it).
    pub total_ms: u64,
    /// How long the guest was paused at switchover (QEMU's `downtime`).
    pub downtime_ms: Option<u64>,
    /// Time spent in `setup` (QEMU's `setup-time`).
    pub setup_ms: Option<u64>,
    /// RAM bytes sent.
    pub ram_transferred: u64,
    /// Guest RAM size in bytes.
    pub ram_total: u64,
    /// Passes over the dirty log.
    pub dirty_sync_count: u64,
}

/// Mutual TLS for the migration stream: a directory of QEMU x509 credentials (`ca-cert.pem`
/// and, for a target, `server-cert.pem` + `server-key.pem`, for a source `client-cert.pem`
/// + `client-key.pem`) and the name the target's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationTls {
    /// The credentials' directory.
    pub dir: std::path::PathBuf,
    /// The name checked in the target's certificate (the source's `tls-hostname`).
    pub hostname: String,
}

/// Which end of a migration a QEMU is, for its TLS credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEnd {
    /// The target (listens; checks the source's client certificate).
    Target,
    /// The source (connects; checks the target's certificate and its name).
    Source,
}

/// The id of the credentials object Ferry adds to QEMU.
const TLS_OBJECT: &str = "ferry-migration-tls";

/// Makes the next migration of this QEMU (as `end`) mutual TLS: both ends verify the
/// other's certificate against the CA in `tls.dir`. Call on the target before
/// [`prepare_incoming`], on the source before [`migrate`]. Guest memory then crosses the
/// network encrypted, and a target accepts only a source holding the cluster's key.
pub async fn use_tls(qmp: &Qmp, end: TlsEnd, tls: &MigrationTls) -> Result<(), MigrationError> {
    // A previous attempt's object (the source may migrate again after a failure).
    let _ = qmp
        .execute_raw("object-del", Some(serde_json::json!({ "id": TLS_OBJECT })))
        .await;
    qmp.execute_raw(
        "object-add",
        Some(serde_json::json!({
            "qom-type": "tls-creds-x509",
            "id": TLS_OBJECT,
            "dir": tls.dir.display().to_string(),
            "endpoint": if end == TlsEnd::Target { "server" } else { "client" },
            "verify-peer": true,
        })),
    )
    .await
    .map_err(qmp_err("object-add"))?;
    let mut params = serde_json::json!({ "tls-creds": TLS_OBJECT });
    if end == TlsEnd::Source {
        params["tls-hostname"] = serde_json::Value::String(tls.hostname.clone());
    }
    qmp.execute_raw("migrate-set-parameters", Some(params))
        .await
        .map_err(qmp_err("migrate-set-parameters"))?;
    Ok(())
}

/// The QEMU migration URI of a TCP address (`tcp:1.2.3.4:5`, `tcp:[::1]:5`).
pub fn tcp_uri(addr: SocketAddr) -> String {
    format!("tcp:{addr}")
}

/// Sets up a target QEMU (started with [`QemuCommand::incoming`]) to
/// receive the migration: turns on the `events`, `dirty-bitmaps` and
/// `return-path` capabilities and listens on `listen`. Port 0 picks a free port; the
/// address actually listened on is returned (send that to the source).
///
/// [`QemuCommand::incoming`]: crate::process::QemuCommand::incoming
pub async fn prepare_incoming(qmp: &Qmp, listen: SocketAddr) -> Result<SocketAddr, MigrationError> {
    let status = qmp
        .execute(&QueryStatus)
        .await
        .map_err(qmp_err(QueryStatus::NAME))?;
    if status.status != "inmigrate" {
        return Err(MigrationError::NotIncoming {
            status: status.status,
        });
    }
    qmp.execute(&MigrateSetCapabilities::enable(&CAPABILITIES))
        .await
        .map_err(qmp_err(MigrateSetCapabilities::NAME))?;
    qmp.execute(&MigrateIncoming {
        uri: tcp_uri(listen),
    })
    .await
    .map_err(qmp_err(MigrateIncoming::NAME))?;
    let info = qmp
        .execute(&QueryMigrate)
        .await
        .map_err(qmp_err(QueryMigrate::NAME))?;
    let port = info
        .socket_address
        .iter()
        .filter(|a| a.kind == "inet")
        .find_map(|a| a.port.as_deref()?.parse::<u16>().ok());
    let bound = match port {
        Some(port) => SocketAddr::new(listen.ip(), port),
        None => listen,
    };
    tracing::info!(%bound, "Waiting for the incoming migration");
    Ok(bound)
}

/// Migrates the VM behind `qmp` to the target listening on `target` (see
/// [`prepare_incoming`]) and waits for the end.
///
/// Sets the `events`, `dirty-bitmaps` and `return-path` capabilities and
/// the downtime and bandwidth limits, issues `migrate` (RAM and device
/// state only: the disks are shared), then polls `query-migrate` (woken
/// early by `MIGRATION` events) and calls `progress` after every poll. On
/// `completed` the target has loaded the VM and the source sits in run
/// state `postmigrate` (confirm with [`wait_incoming_done`] on the target,
/// then quit the source); on `failed`, `cancelled` or timeout (which
/// cancels) the VM runs on the source as before, with its persistent
/// bitmaps re-armed ([`restore_bitmap_persistence`]).
pub async fn migrate(
    qmp: &Qmp,
    target: SocketAddr,
    opts: MigrateOptions,
    mut progress: impl FnMut(MigrationProgress),
) -> Result<MigrationOutcome, MigrationError> {
    qmp.execute(&MigrateSetCapabilities::enable(&CAPABILITIES))
        .await
        .map_err(qmp_err(MigrateSetCapabilities::NAME))?;
    qmp.execute(&MigrateSetParameters {
        downtime_limit_ms: Some(opts.downtime_limit_ms),
        max_bandwidth: Some(opts.max_bandwidth),
    })
    .await
    .map_err(qmp_err(MigrateSetParameters::NAME))?;

    let mut events = qmp.events();
    let start = Instant::now();
    let deadline = start + opts.timeout;
    qmp.execute(&Migrate {
        uri: tcp_uri(target),
    })
    .await
    .map_err(qmp_err(Migrate::NAME))?;
    tracing::info!(%target, "Live migration started");

    let mut cancelled_at: Option<(MigrationStatus, u64, u64)> = None;
    loop {
        let info = qmp
            .execute(&QueryMigrate)
            .await
            .map_err(qmp_err(QueryMigrate::NAME))?;
        // `None` until QEMU has set the migration up.
        let status = info.status.unwrap_or(MigrationStatus::None);
        progress(MigrationProgress::from_info(status, &info, start.elapsed()));
        match status {
            MigrationStatus::Completed => {
                // QEMU 7.2 can say "completed" a moment before it has filled in the
                // times (total and downtime 0): read them again, briefly.
                let mut info = info;
                for _ in 0..25 {
                    if info.total_time_ms.unwrap_or(0) > 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    info = qmp
                        .execute(&QueryMigrate)
                        .await
                        .map_err(qmp_err(QueryMigrate::NAME))?;
                }
                let ram = info.ram.unwrap_or_default();
                let outcome = MigrationOutcome {
                    total_ms: info
                        .total_time_ms
                        .unwrap_or_else(|| start.elapsed().as_millis() as u64),
                    downtime_ms: info.downtime_ms,
                    setup_ms: info.setup_time_ms,
                    ram_transferred: ram.transferred,
                    ram_total: ram.total,
                    dirty_sync_count: ram.dirty_sync_count,
                };
                if cancelled_at.is_some() {
                    tracing::warn!(%target, "Live migration completed while being cancelled");
                }
                tracing::info!(%target, ?outcome, "Live migration completed");
                return Ok(outcome);
            }
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                let failure = match cancelled_at {
                    Some((status, transferred, total)) => MigrationError::Timeout {
                        target,
                        timeout: opts.timeout,
                        status,
                        transferred,
                        total,
                    },
                    None if status == MigrationStatus::Failed => MigrationError::Failed {
                        target,
                        desc: info
                            .error_desc
                            .unwrap_or_else(|| "QEMU gave no reason".into()),
                    },
                    None => MigrationError::Cancelled { target },
                };
                return Err(after_failure(qmp, failure).await);
            }
            _ => {}
        }

        let now = Instant::now();
        match cancelled_at {
            None if now >= deadline => {
                tracing::warn!(%target, %status, "Live migration timed out; cancelling");
                let ram = info.ram.unwrap_or_default();
                cancelled_at = Some((status, ram.transferred, ram.total));
                qmp.execute(&MigrateCancel)
                    .await
                    .map_err(qmp_err(MigrateCancel::NAME))?;
            }
            Some((status, transferred, total)) if now >= deadline + CANCEL_TIMEOUT => {
                // QEMU is stuck winding down (e.g. a connect that hangs); report
                // the timeout anyway rather than hang with it.
                // The bitmaps stay busy until it does: nothing to re-arm yet.
                tracing::warn!(%target, "Cancelled live migration did not wind down");
                return Err(MigrationError::Timeout {
                    target,
                    timeout: opts.timeout,
                    status,
                    transferred,
                    total,
                });
            }
            _ => {}
        }
        let wait = match cancelled_at {
            None => POLL_INTERVAL.min(deadline.saturating_duration_since(now)),
            Some(_) => POLL_INTERVAL,
        };
        // Any event (or a lagged/closed channel) just triggers the next poll.
        let _ = tokio::time::timeout(wait, events.recv()).await;
    }
}

/// Re-arms the source's bitmaps after a failed migration and returns the
/// failure (wrapped if re-arming failed too).
async fn after_failure(qmp: &Qmp, failure: MigrationError) -> MigrationError {
    tracing::warn!("Live migration failed: {failure}");
    match restore_bitmap_persistence(qmp).await {
        Ok(names) => {
            if !names.is_empty() {
                tracing::info!(
                    ?names,
                    "Re-armed persistent dirty bitmaps after the failed migration"
                );
            }
            failure
        }
        Err(e) => MigrationError::Rearm {
            failure: Box::new(failure),
            source: Box::new(e),
        },
    }
}

/// Re-creates every persistent dirty bitmap of the VM behind `qmp` with the
/// same name, granularity and bits, so that QEMU stores it again on quit
/// and migrates it as persistent. Returns the `node/name` of each.
///
/// Needed on the source after a migration with `dirty-bitmaps` failed or was
/// cancelled (QEMU 7.2 leaves the bitmaps marked "skip store", invisibly;
/// see the module docs); [`migrate`] calls it itself, call it after a
/// migration that [`cancel`] stopped while [`migrate`] was not waiting for
/// it. No write is lost: a temporary bitmap records throughout, and is
/// merged back into the new bitmap. A bitmap that was disabled may come back
/// with the bits of writes made during the re-creation (a superset, never
/// fewer bits). Change tracking must not run concurrently (the bitmap is
/// briefly absent); bitmaps of a fleecing point (busy) are not touched and
/// fail the call.
pub async fn restore_bitmap_persistence(qmp: &Qmp) -> Result<Vec<String>, MigrationError> {
    use crate::qmp::{
        BlockDirtyBitmapAdd, BlockDirtyBitmapDisable, BlockDirtyBitmapMerge,
        BlockDirtyBitmapRemove, QueryNamedBlockNodes, Transaction, TransactionAction,
    };

    // A failed migration releases its bitmaps in a cleanup that can run a
    // moment after the status changed.
    let deadline = Instant::now() + BITMAP_RELEASE_TIMEOUT;
    let bitmaps = loop {
        let nodes = qmp
            .execute(&QueryNamedBlockNodes { flat: Some(true) })
            .await
            .map_err(qmp_err(QueryNamedBlockNodes::NAME))?;
        let bitmaps: Vec<(String, crate::qmp::DirtyBitmapInfo)> = nodes
            .into_iter()
            .flat_map(|n| {
                let node = n.node_name;
                n.dirty_bitmaps
                    .into_iter()
                    .filter(|b| b.name.is_some() && b.persistent && !b.inconsistent)
                    .map(move |b| (node.clone(), b))
            })
            .collect();
        match bitmaps.iter().find(|(_, b)| b.busy) {
            None => break bitmaps,
            Some((node, b)) if Instant::now() >= deadline => {
                return Err(MigrationError::BitmapBusy {
                    node: node.clone(),
                    name: b.name.clone().unwrap_or_default(),
                    timeout: BITMAP_RELEASE_TIMEOUT,
                })
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };

    let mut rearmed = Vec::new();
    for (node, bitmap) in bitmaps {
        let name = bitmap.name.unwrap_or_default();
        let tmp = format!("{name}{REARM_SUFFIX}");
        let add = |name: &str, persistent: bool| BlockDirtyBitmapAdd {
            node: node.clone(),
            name: name.into(),
            persistent,
            granularity: Some(bitmap.granularity),
        };
        let merge = |target: &str, from: &str| BlockDirtyBitmapMerge {
            node: node.clone(),
            target: target.into(),
            bitmaps: vec![from.into()],
        };
        let remove = |name: &str| BlockDirtyBitmapRemove {
            node: node.clone(),
            name: name.into(),
        };
        // The copy records from the same instant on, so it holds every bit.
        qmp.execute(&Transaction {
            actions: vec![
                TransactionAction::BlockDirtyBitmapAdd(add(&tmp, false)),
                TransactionAction::BlockDirtyBitmapMerge(merge(&tmp, &name)),
            ],
        })
        .await
        .map_err(qmp_err(Transaction::NAME))?;
        qmp.execute(&remove(&name))
            .await
            .map_err(qmp_err(BlockDirtyBitmapRemove::NAME))?;
        qmp.execute(&add(&name, true))
            .await
            .map_err(qmp_err(BlockDirtyBitmapAdd::NAME))?;
        qmp.execute(&merge(&name, &tmp))
            .await
            .map_err(qmp_err(BlockDirtyBitmapMerge::NAME))?;
        if !bitmap.recording {
            qmp.execute(&BlockDirtyBitmapDisable {
                node: node.clone(),
                name: name.clone(),
            })
            .await
            .map_err(qmp_err(BlockDirtyBitmapDisable::NAME))?;
        }
        qmp.execute(&remove(&tmp))
            .await
            .map_err(qmp_err(BlockDirtyBitmapRemove::NAME))?;
        rearmed.push(format!("{node}/{name}"));
    }
    Ok(rearmed)
}

/// Cancels the outgoing migration of the VM behind `qmp`, if one runs; the
/// VM keeps running on the source. [`migrate`] then returns
/// [`MigrationError::Cancelled`] (and re-arms the bitmaps).
pub async fn cancel(qmp: &Qmp) -> Result<(), MigrationError> {
    qmp.execute(&MigrateCancel)
        .await
        .map_err(qmp_err(MigrateCancel::NAME))?;
    Ok(())
}

/// On the target, waits until the incoming migration is done: returns
/// `true` once the guest runs, `false` if the migration completed with the
/// guest paused (it was paused on the source; `cont` resumes it).
///
/// A target whose incoming migration fails exits, so a closed QMP
/// connection is reported as [`MigrationError::IncomingFailed`].
pub async fn wait_incoming_done(qmp: &Qmp, timeout: Duration) -> Result<bool, MigrationError> {
    let deadline = Instant::now() + timeout;
    let mut events = qmp.events();
    loop {
        // Run state first: a migration that is completed stays completed, so
        // "not inmigrate before, not completed after" means no migration
        // target at all.
        let status = query_target(qmp, &QueryStatus).await?;
        let info = query_target(qmp, &QueryMigrate).await?;
        let migration = info.status.unwrap_or(MigrationStatus::None);
        match migration {
            // QEMU sets the final run state before `completed`; read it again
            // in case the migration completed between the two queries.
            MigrationStatus::Completed => {
                let status = query_target(qmp, &QueryStatus).await?;
                return Ok(status.running);
            }
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                return Err(MigrationError::IncomingFailed {
                    detail: info
                        .error_desc
                        .unwrap_or_else(|| format!("status {migration}")),
                })
            }
            _ if status.status != "inmigrate" => {
                return Err(MigrationError::NotIncoming {
                    status: status.status,
                })
            }
            _ => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(MigrationError::IncomingTimeout {
                timeout,
                status: status.status,
                migration,
            });
        }
        let _ = tokio::time::timeout(POLL_INTERVAL.min(deadline - now), events.recv()).await;
    }
}

/// Runs a query on the target; a closed connection means the target exited,
/// which QEMU does when its incoming migration fails.
async fn query_target<C: Command>(qmp: &Qmp, cmd: &C) -> Result<C::Ok, MigrationError> {
    match qmp.execute(cmd).await {
        Ok(reply) => Ok(reply),
        Err(QmpError::Closed) => Err(MigrationError::IncomingFailed {
            detail: "the target QEMU exited (its log has QEMU's reason)".into(),
        }),
        Err(source) => Err(MigrationError::Qmp {
            command: C::NAME,
            source,
        }),
    }
}
