//! Changed-block tracking on the primary: dirty-bitmap generations,
//! fleecing points exported over NBD, and the offline equivalents for a VM
//! that is off.
//!
//! Vocabulary:
//!
//! - A **generation** is a persistent dirty bitmap on each replicated disk
//!   node (e.g. `cbt-7`). It records which granules the guest wrote since it
//!   was started. Only one generation records at a time.
//! - A **fleecing point** is a frozen, point-in-time view of every disk of a
//!   VM while the guest keeps running: a temporary qcow2 overlay per disk,
//!   filled by copy-before-write (`blockdev-backup sync=none`), exported
//!   read-only over QEMU's NBD server together with the generation that
//!   just stopped recording. The client reads the dirty extents
//!   (`qemu:dirty-bitmap:<old>`) or, for a full copy, everything allocated
//!   (`base:allocation`).
//! - A **recovery point** is what the replica commits once a fleecing point
//!   was copied completely. This module does not ship data; it only tells
//!   the replication worker what to read and cleans up afterwards.
//!
//! One cycle, as proven on QEMU 7.2 (see `QEMU-CBT.md`):
//!
//! ```text
//! FleecePoint::create     qemu-img create overlays; blockdev-add (backing = drive)
//!                         transaction { bitmap-add new; bitmap-disable old; blockdev-backup sync=none }
//!                         nbd-server-start (once per QEMU); block-export-add (bitmaps = [old])
//! ... the worker copies the dirty extents over NBD ...
//! FleecePoint::release    block-export-del -> BLOCK_EXPORT_DELETED
//!                         block-job-cancel force -> BLOCK_JOB_CANCELLED
//!                         blockdev-del; delete overlays; `cont` if CBW paused the guest
//!                         success: bitmap-remove old
//!                         failure: transaction { bitmap-merge old -> new; bitmap-remove old }
//! ```
//!
//! Every QEMU object a fleecing point creates has a name starting with
//! [`FLEECE_PREFIX`], so [`cleanup_stale`] can find and remove the leftovers
//! of a crashed daemon.
//!
//! Persistent generations reach the qcow2 only on a clean close (`quit`,
//! guest poweroff). After QEMU was killed a generation loaded from the image
//! is *inconsistent* and one created at runtime is *missing*; either way the
//! next copy must be a full (or hash-compared) one.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::img::{self, ImgError};
use crate::process::one_line;
use crate::qmp::{
    self, BlockDirtyBitmapAdd, BlockDirtyBitmapDisable, BlockDirtyBitmapEnable,
    BlockDirtyBitmapMerge, BlockDirtyBitmapRemove, BlockExportAdd, BlockExportDel,
    BlockExportRemoveMode, BlockJobCancel, BlockNodeInfo, BlockdevAdd, BlockdevBackup, BlockdevDel,
    Command, Event, NbdServerAddr, NbdServerStart, Qmp, QmpError, Transaction, TransactionAction,
};

/// Prefix of every node name, job id, export id and overlay file a
/// fleecing point creates; nothing else may use it.
pub const FLEECE_PREFIX: &str = "ferry-fleece-";

/// File name of the NBD server socket inside the run directory.
pub const NBD_SOCKET_NAME: &str = "ferry-nbd.sock";

/// NBD export name of [`OfflineExport`].
pub const OFFLINE_EXPORT_NAME: &str = "ferry-offline";

/// How long [`FleecePoint::release`] waits for an export to go away and a
/// job to be cancelled. Both take milliseconds unless QEMU is stuck.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(15);

/// How long `blockdev-del` is retried while QEMU still finishes detaching
/// the cancelled job from the overlay.
const NODE_DEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Fallback poll interval while waiting for events (in case one is missed).
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long [`OfflineExport::start`] waits for qemu-nbd's socket.
const QEMU_NBD_START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long [`OfflineExport::close`] waits after SIGTERM before SIGKILL.
const QEMU_NBD_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on `qemu-img info` / `qemu-img bitmap`.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(30);

/// QEMU stores node names in 32 bytes including the NUL.
const NODE_NAME_MAX: usize = 31;

/// Longest unix socket path (`sun_path` is 108 bytes with the NUL).
const SUN_PATH_MAX: usize = 107;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CbtError {
    /// A QMP command failed (QEMU's message is the source).
    #[error("QMP command {command} failed")]
    Qmp {
        /// The command name.
        command: &'static str,
        /// The QMP error.
        #[source]
        source: QmpError,
    },
    /// A disk node named by the caller does not exist in QEMU.
    #[error("Block node {node:?} does not exist in this QEMU; check the VM's disk node names")]
    NodeNotFound {
        /// The node.
        node: String,
    },
    /// The generation the copy should be based on is gone.
    #[error(
        "Generation {name:?} is missing on {node}: the change history is lost; \
         start a new generation and do a full copy"
    )]
    GenerationMissing {
        /// The node (or image, offline).
        node: String,
        /// The generation.
        name: String,
    },
    /// The generation was not stored by a clean close and can't be trusted.
    #[error(
        "Generation {name:?} on {node} is inconsistent (QEMU did not close the image cleanly); \
         remove it, start a new generation and do a full copy"
    )]
    GenerationInconsistent {
        /// The node (or image, offline).
        node: String,
        /// The generation.
        name: String,
    },
    /// The generation to start exists already.
    #[error(
        "Generation {name:?} already exists on {node}; pick an unused name or remove it first"
    )]
    GenerationExists {
        /// The node (or image, offline).
        node: String,
        /// The generation.
        name: String,
    },
    /// The arguments can't describe a valid fleecing point.
    #[error("Invalid fleecing point request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// The overlay image of a fleecing point could not be created.
    #[error("Failed to create fleecing overlay {path:?} (after a crash, run cleanup_stale first)")]
    CreateOverlay {
        /// The overlay.
        path: PathBuf,
        /// qemu-img's error.
        #[source]
        source: ImgError,
    },
    /// QEMU's single NBD server is running, but not on our socket.
    #[error(
        "QEMU's NBD server is already running on another socket than {socket:?} \
         (another tool, e.g. a libvirt backup, owns it); stop that job and retry"
    )]
    NbdServerForeign {
        /// The socket we wanted.
        socket: PathBuf,
    },
    /// A release step could not be completed.
    #[error(
        "Releasing fleecing point {cycle_id} left work undone: {}; run cleanup_stale, \
         then check the generations with bitmap_state",
        .failures.join("; ")
    )]
    Release {
        /// The fleecing point.
        cycle_id: u64,
        /// What failed, one entry per step.
        failures: Vec<String>,
    },
    /// Deleting leftovers of a crashed daemon failed partly.
    #[error("Cleaning up stale fleecing objects left work undone: {}", .failures.join("; "))]
    Cleanup {
        /// What failed.
        failures: Vec<String>,
    },
    /// A tool binary does not exist.
    #[error("{binary:?} not found; install it with `apt-get install qemu-utils`")]
    BinaryNotFound {
        /// The binary.
        binary: PathBuf,
        /// The exec error.
        #[source]
        source: std::io::Error,
    },
    /// A tool could not be run, or an OS call failed.
    #[error("Failed to run {binary:?}")]
    RunTool {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A tool did not finish in time and was killed.
    #[error("{binary:?} did not finish within {timeout:?}")]
    ToolTimeout {
        /// The binary.
        binary: PathBuf,
        /// The timeout.
        timeout: Duration,
    },
    /// `qemu-img info` or `qemu-img bitmap` failed on an image.
    #[error("qemu-img {action} on {image:?} failed (is the VM still running?): {stderr}")]
    OfflineImage {
        /// What was attempted, e.g. `bitmap --remove cbt-3`.
        action: String,
        /// The image.
        image: PathBuf,
        /// qemu-img's stderr on one line.
        stderr: String,
    },
    /// `qemu-img info` printed something that is not the expected JSON.
    #[error("Failed to parse the output of qemu-img info")]
    ParseInfo {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// qemu-nbd exited before serving.
    #[error("qemu-nbd could not export {image:?} (is the VM still running?): {stderr}")]
    StartQemuNbd {
        /// The image.
        image: PathBuf,
        /// qemu-nbd's stderr on one line.
        stderr: String,
    },
    /// qemu-nbd did not listen in time.
    #[error("qemu-nbd did not accept connections on {socket:?} within {timeout:?}; it was killed")]
    QemuNbdTimeout {
        /// The socket.
        socket: PathBuf,
        /// The timeout.
        timeout: Duration,
    },
}

// ---------------------------------------------------------------------------
// Generations (online)
// ---------------------------------------------------------------------------

/// State of one generation on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapState {
    /// No bitmap of that name: never created, removed, or a runtime bitmap
    /// lost when QEMU was killed.
    Missing,
    /// Loaded from an image that was not closed cleanly; unusable, only
    /// removal works.
    Inconsistent,
    /// Usable.
    Ok {
        /// Whether it records guest writes (false once frozen by a
        /// fleecing point).
        recording: bool,
        /// Dirty bytes.
        count: u64,
        /// Bytes per bit.
        granularity: u64,
    },
}

/// The state of generation `name` on `node`, from `query-named-block-nodes`.
/// The backup job's nameless copy bitmap is ignored.
pub async fn bitmap_state(qmp: &Qmp, node: &str, name: &str) -> Result<BitmapState, CbtError> {
    let nodes = query_nodes(qmp).await?;
    state_in(&nodes, node, name)
}

async fn query_nodes(qmp: &Qmp) -> Result<Vec<BlockNodeInfo>, CbtError> {
    run(qmp, &qmp::QueryNamedBlockNodes { flat: Some(true) }).await
}

fn state_in(nodes: &[BlockNodeInfo], node: &str, name: &str) -> Result<BitmapState, CbtError> {
    let info = nodes
        .iter()
        .find(|n| n.node_name == node)
        .ok_or_else(|| CbtError::NodeNotFound { node: node.into() })?;
    let Some(bitmap) = info
        .dirty_bitmaps
        .iter()
        .find(|b| b.name.as_deref() == Some(name))
    else {
        return Ok(BitmapState::Missing);
    };
    if bitmap.inconsistent {
        return Ok(BitmapState::Inconsistent);
    }
    Ok(BitmapState::Ok {
        recording: bitmap.recording,
        count: bitmap.count,
        granularity: bitmap.granularity,
    })
}

/// Starts generation `gen_name` on every node in one transaction: a
/// persistent bitmap of `granularity` bytes per bit (a power of two, at
/// least 512; 0 means the qcow2 cluster size). Either all nodes start
/// tracking or none does.
pub async fn start_tracking<S: AsRef<str>>(
    qmp: &Qmp,
    nodes: &[S],
    gen_name: &str,
    granularity: u64,
) -> Result<(), CbtError> {
    check_granularity(granularity)?;
    let actions = nodes
        .iter()
        .map(|n| {
            TransactionAction::BlockDirtyBitmapAdd(bitmap_add(n.as_ref(), gen_name, granularity))
        })
        .collect();
    run(qmp, &Transaction { actions }).await?;
    tracing::info!(
        generation = gen_name,
        granularity,
        "Started change tracking"
    );
    Ok(())
}

/// Removes generation `name` from every node that has it (in any state,
/// including inconsistent), in one transaction. Returns the nodes it was
/// removed from.
pub async fn remove_generation<S: AsRef<str>>(
    qmp: &Qmp,
    nodes: &[S],
    name: &str,
) -> Result<Vec<String>, CbtError> {
    let infos = query_nodes(qmp).await?;
    let mut present = Vec::new();
    for node in nodes {
        if state_in(&infos, node.as_ref(), name)? != BitmapState::Missing {
            present.push(node.as_ref().to_string());
        }
    }
    if !present.is_empty() {
        let actions = present
            .iter()
            .map(|n| TransactionAction::BlockDirtyBitmapRemove(bitmap_ref(n, name)))
            .collect();
        run(qmp, &Transaction { actions }).await?;
    }
    Ok(present)
}

/// Folds generation `old` back into `new` after a failed copy, so nothing
/// is lost: on every node where both exist, one transaction merges `old`
/// into `new` and removes `old`. Where only `old` exists (the fleecing
/// transaction never ran), `old` is re-enabled if it was frozen. Safe to
/// call again; call it only while no export holds `old`.
pub async fn rollback_generation<S: AsRef<str>>(
    qmp: &Qmp,
    nodes: &[S],
    old: &str,
    new: &str,
) -> Result<(), CbtError> {
    let infos = query_nodes(qmp).await?;
    let mut actions = Vec::new();
    for node in nodes {
        let node = node.as_ref();
        let old_state = state_in(&infos, node, old)?;
        let new_state = state_in(&infos, node, new)?;
        match (old_state, new_state) {
            (BitmapState::Missing, _) => {}
            (BitmapState::Inconsistent, _) => {
                return Err(CbtError::GenerationInconsistent {
                    node: node.into(),
                    name: old.into(),
                })
            }
            (BitmapState::Ok { .. }, BitmapState::Ok { .. }) => {
                actions.push(TransactionAction::BlockDirtyBitmapMerge(
                    BlockDirtyBitmapMerge {
                        node: node.into(),
                        target: new.into(),
                        bitmaps: vec![old.into()],
                    },
                ));
                actions.push(TransactionAction::BlockDirtyBitmapRemove(bitmap_ref(
                    node, old,
                )));
            }
            (
                BitmapState::Ok {
                    recording: false, ..
                },
                _,
            ) => {
                actions.push(TransactionAction::BlockDirtyBitmapEnable(
                    BlockDirtyBitmapEnable {
                        node: node.into(),
                        name: old.into(),
                    },
                ));
            }
            (
                BitmapState::Ok {
                    recording: true, ..
                },
                _,
            ) => {}
        }
    }
    if !actions.is_empty() {
        run(qmp, &Transaction { actions }).await?;
    }
    Ok(())
}

fn bitmap_add(node: &str, name: &str, granularity: u64) -> BlockDirtyBitmapAdd {
    BlockDirtyBitmapAdd {
        node: node.into(),
        name: name.into(),
        persistent: true,
        granularity: (granularity != 0).then_some(granularity),
    }
}

fn bitmap_ref(node: &str, name: &str) -> BlockDirtyBitmapRemove {
    BlockDirtyBitmapRemove {
        node: node.into(),
        name: name.into(),
    }
}

fn check_granularity(granularity: u64) -> Result<(), CbtError> {
    if granularity != 0 && (granularity < 512 || !granularity.is_power_of_two()) {
        return Err(CbtError::InvalidRequest {
            reason: format!("granularity {granularity} is not a power of two of at least 512"),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Fleecing points
// ---------------------------------------------------------------------------

/// A disk of the VM to include in a fleecing point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The qcow2 node the guest writes to, e.g. `drive0`.
    pub node: String,
    /// Its virtual size in bytes (the overlay gets the same size).
    pub size: u64,
}

/// One disk of a [`FleecePoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleeceDisk {
    /// The live disk node.
    pub node: String,
    /// Its size in bytes.
    pub size: u64,
    /// The overlay node holding the point-in-time view.
    pub overlay_node: String,
    /// The overlay's qcow2 file in the run directory.
    pub overlay_file: PathBuf,
    /// The `sync=none` backup job feeding the overlay.
    pub job_id: String,
    /// The block export id.
    pub export_id: String,
    /// The NBD export name clients connect to.
    pub export_name: String,
}

impl FleeceDisk {
    /// The NBD URI of this disk's export (`nbd+unix:///NAME?socket=PATH`),
    /// as nbdinfo, nbdcopy and qemu-img take it.
    pub fn nbd_uri(&self, socket: &Path) -> String {
        nbd_unix_uri(&self.export_name, socket)
    }
}

/// A guest write that failed while a fleecing point existed
/// (`BLOCK_IO_ERROR`), typically because the overlay's storage is full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIoError {
    /// Node the error happened on (QEMU's generated name for an overlay's
    /// file node, e.g. `#block160`).
    pub node_name: String,
    /// Device, empty for nodes without one.
    pub device: String,
    /// `read` or `write`.
    pub operation: String,
    /// What QEMU did: `stop` (the guest is paused), `report`, `ignore`.
    pub action: String,
    /// QEMU's reason, e.g. "No space left on device".
    pub reason: String,
    /// Whether the error was ENOSPC.
    pub nospace: bool,
}

impl BlockIoError {
    fn from_event(event: &Event) -> Option<Self> {
        if event.event != "BLOCK_IO_ERROR" {
            return None;
        }
        let s = |k: &str| {
            event.data[k]
                .as_str()
                .map(str::to_string)
                .unwrap_or_default()
        };
        Some(BlockIoError {
            node_name: s("node-name"),
            device: s("device"),
            operation: s("operation"),
            action: s("action"),
            reason: s("reason"),
            nospace: event.data["nospace"].as_bool().unwrap_or(false),
        })
    }
}

/// Watches `BLOCK_IO_ERROR` for the lifetime of a fleecing point.
struct IoErrorWatch {
    rx: watch::Receiver<Option<BlockIoError>>,
    task: tokio::task::AbortHandle,
}

impl IoErrorWatch {
    fn start(qmp: &Qmp) -> Self {
        // Subscribe before anything is set up, so no event is missed.
        let mut events = qmp.events();
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if let Some(err) = BlockIoError::from_event(&event) {
                            tracing::warn!(
                                node = %err.node_name,
                                reason = %err.reason,
                                action = %err.action,
                                "Guest I/O error during a fleecing window"
                            );
                            tx.send_if_modified(|cur| {
                                let first = cur.is_none();
                                if first {
                                    *cur = Some(err);
                                }
                                first
                            });
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        IoErrorWatch {
            rx,
            task: task.abort_handle(),
        }
    }
}

impl Drop for IoErrorWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What [`FleecePoint::release`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Bytes copy-before-write saved into the overlays during the window
    /// (from `BLOCK_JOB_CANCELLED`): the guest's overwrite volume.
    pub cbw_bytes: u64,
    /// The first guest I/O error seen during the window.
    pub io_error: Option<BlockIoError>,
    /// Whether the guest was paused by an I/O error and resumed (`cont`).
    pub resumed_vm: bool,
    /// Time the release took.
    pub duration: Duration,
}

/// What releasing a fleecing point does with the change-tracking generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generations {
    /// The point is safe elsewhere: the old generation goes.
    DropOld,
    /// The copy failed: the old generation is merged into the new one.
    FoldBack,
    /// The point is not committed yet: both stay (see `release_keeping_generations`).
    Keep,
}

/// A point-in-time view of every disk of a VM, exported read-only over
/// QEMU's NBD server, with the generation that stopped recording at that
/// instant. Create with [`FleecePoint::create`]; always end with
/// [`FleecePoint::release`]. Dropping it without release leaves the QEMU
/// objects in place (logged); [`cleanup_stale`] removes them.
#[derive(Debug)]
pub struct FleecePoint {
    cycle_id: u64,
    old_gen: Option<String>,
    new_gen: String,
    socket: PathBuf,
    disks: Vec<FleeceDisk>,
    transaction_time: Duration,
    create_time: Duration,
    /// Whether the transaction took effect (the generations switched).
    committed: bool,
    released: bool,
    io: IoErrorWatch,
}

impl std::fmt::Debug for IoErrorWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoErrorWatch")
            .field("error", &*self.rx.borrow())
            .finish()
    }
}

impl FleecePoint {
    /// Creates a fleecing point of `nodes` with `qemu-img` from `PATH`; see
    /// [`create_with`](Self::create_with).
    pub async fn create(
        qmp: &Qmp,
        run_dir: &Path,
        nodes: &[NodeSpec],
        old_gen: Option<&str>,
        new_gen: &str,
        granularity: u64,
        cycle_id: u64,
    ) -> Result<FleecePoint, CbtError> {
        Self::create_with(
            Path::new("qemu-img"),
            qmp,
            run_dir,
            nodes,
            old_gen,
            new_gen,
            granularity,
            cycle_id,
        )
        .await
    }

    /// Creates a fleecing point of `nodes`:
    ///
    /// 1. per disk, an empty qcow2 overlay `run_dir/ferry-fleece-…qcow2` of
    ///    the disk's size, added as a node backed by the live disk;
    /// 2. one transaction across all disks that starts generation
    ///    `new_gen` (persistent, `granularity` bytes per bit), freezes
    ///    `old_gen` and starts copy-before-write into each overlay, so all
    ///    disks switch generation at the same instant as the point is taken;
    /// 3. QEMU's NBD server on `run_dir/ferry-nbd.sock` (started once per
    ///    QEMU process) and a read-only export per overlay, offering
    ///    `qemu:dirty-bitmap:<old_gen>`. Without `old_gen` this is the
    ///    initial full copy: no bitmap is offered, read `base:allocation`.
    ///
    /// `old_gen` must be usable on every node and `new_gen` must not exist.
    /// On failure everything created so far is undone (and a switched
    /// generation folded back), so the call can simply be retried.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_with(
        qemu_img: &Path,
        qmp: &Qmp,
        run_dir: &Path,
        nodes: &[NodeSpec],
        old_gen: Option<&str>,
        new_gen: &str,
        granularity: u64,
        cycle_id: u64,
    ) -> Result<FleecePoint, CbtError> {
        let started = Instant::now();
        let socket = run_dir.join(NBD_SOCKET_NAME);
        validate_request(&socket, nodes, old_gen, new_gen, granularity)?;

        // Refuse before touching anything when the generations are off.
        let infos = query_nodes(qmp).await?;
        for spec in nodes {
            if let Some(old) = old_gen {
                match state_in(&infos, &spec.node, old)? {
                    BitmapState::Ok { .. } => {}
                    BitmapState::Missing => {
                        return Err(CbtError::GenerationMissing {
                            node: spec.node.clone(),
                            name: old.into(),
                        })
                    }
                    BitmapState::Inconsistent => {
                        return Err(CbtError::GenerationInconsistent {
                            node: spec.node.clone(),
                            name: old.into(),
                        })
                    }
                }
            }
            if state_in(&infos, &spec.node, new_gen)? != BitmapState::Missing {
                return Err(CbtError::GenerationExists {
                    node: spec.node.clone(),
                    name: new_gen.into(),
                });
            }
        }

        let disks = nodes
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let overlay_node = format!("{FLEECE_PREFIX}{cycle_id}-{i}");
                FleeceDisk {
                    node: spec.node.clone(),
                    size: spec.size,
                    overlay_file: run_dir.join(format!("{overlay_node}.qcow2")),
                    job_id: format!("{overlay_node}-job"),
                    export_id: format!("{overlay_node}-export"),
                    export_name: format!("{}-fleece-{cycle_id}", spec.node),
                    overlay_node,
                }
            })
            .collect::<Vec<_>>();
        if let Some(d) = disks.iter().find(|d| d.overlay_node.len() > NODE_NAME_MAX) {
            return Err(CbtError::InvalidRequest {
                reason: format!(
                    "node name {:?} is longer than QEMU's {NODE_NAME_MAX} bytes; use a smaller cycle id",
                    d.overlay_node
                ),
            });
        }

        let mut point = FleecePoint {
            cycle_id,
            old_gen: old_gen.map(Into::into),
            new_gen: new_gen.into(),
            socket,
            disks,
            transaction_time: Duration::ZERO,
            create_time: Duration::ZERO,
            committed: false,
            released: false,
            io: IoErrorWatch::start(qmp),
        };
        match point.set_up(qemu_img, qmp, granularity).await {
            Ok(()) => {
                point.create_time = started.elapsed();
                tracing::info!(
                    cycle = cycle_id,
                    old = ?point.old_gen,
                    new = %point.new_gen,
                    transaction_ms = point.transaction_time.as_secs_f64() * 1e3,
                    create_ms = point.create_time.as_secs_f64() * 1e3,
                    "Fleecing point created"
                );
                Ok(point)
            }
            Err(e) => {
                tracing::warn!(
                    cycle = cycle_id,
                    "Creating fleecing point failed, undoing: {e}"
                );
                let (_, failures) = point.teardown(qmp, Generations::FoldBack).await;
                for f in failures {
                    tracing::warn!(cycle = cycle_id, "Undoing a failed fleecing point: {f}");
                }
                Err(e)
            }
        }
    }

    async fn set_up(
        &mut self,
        qemu_img: &Path,
        qmp: &Qmp,
        granularity: u64,
    ) -> Result<(), CbtError> {
        for disk in &self.disks {
            img::create_qcow2(qemu_img, &disk.overlay_file, disk.size)
                .await
                .map_err(|source| CbtError::CreateOverlay {
                    path: disk.overlay_file.clone(),
                    source,
                })?;
            run(
                qmp,
                &BlockdevAdd::qcow2(&disk.overlay_node, &disk.overlay_file, Some(&disk.node)),
            )
            .await?;
        }

        let mut actions = Vec::new();
        for disk in &self.disks {
            actions.push(TransactionAction::BlockDirtyBitmapAdd(bitmap_add(
                &disk.node,
                &self.new_gen,
                granularity,
            )));
            if let Some(old) = &self.old_gen {
                actions.push(TransactionAction::BlockDirtyBitmapDisable(
                    BlockDirtyBitmapDisable {
                        node: disk.node.clone(),
                        name: old.clone(),
                    },
                ));
            }
            actions.push(TransactionAction::BlockdevBackup(BlockdevBackup {
                job_id: disk.job_id.clone(),
                device: disk.node.clone(),
                target: disk.overlay_node.clone(),
                sync: qmp::BackupSync::None,
            }));
        }
        let t = Instant::now();
        run(qmp, &Transaction { actions }).await?;
        self.transaction_time = t.elapsed();
        self.committed = true;

        ensure_nbd_server(qmp, &self.socket).await?;
        let bitmaps: Vec<String> = self.old_gen.iter().cloned().collect();
        for disk in &self.disks {
            run(
                qmp,
                &BlockExportAdd::nbd_read_only(
                    &disk.export_id,
                    &disk.overlay_node,
                    &disk.export_name,
                    bitmaps.clone(),
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// The id given at creation.
    pub fn cycle_id(&self) -> u64 {
        self.cycle_id
    }

    /// The generation frozen at this point, whose dirty extents to copy;
    /// `None` for a full copy.
    pub fn old_generation(&self) -> Option<&str> {
        self.old_gen.as_deref()
    }

    /// The generation recording since this point.
    pub fn new_generation(&self) -> &str {
        &self.new_gen
    }

    /// The NBD meta context to read: `qemu:dirty-bitmap:<old>` for an
    /// incremental copy, `base:allocation` for a full one.
    pub fn meta_context(&self) -> String {
        match &self.old_gen {
            Some(old) => format!("qemu:dirty-bitmap:{old}"),
            None => "base:allocation".into(),
        }
    }

    /// The unix socket of QEMU's NBD server.
    pub fn nbd_socket(&self) -> &Path {
        &self.socket
    }

    /// The disks, in the order given at creation.
    pub fn disks(&self) -> &[FleeceDisk] {
        &self.disks
    }

    /// How long the switching transaction took inside QEMU (the only step
    /// that touches the guest's I/O path).
    pub fn transaction_time(&self) -> Duration {
        self.transaction_time
    }

    /// How long the whole creation took.
    pub fn create_time(&self) -> Duration {
        self.create_time
    }

    /// The first guest I/O error since the point was created. The copy
    /// should be aborted: release with `success = false`.
    pub fn io_error(&self) -> Option<BlockIoError> {
        self.io.rx.borrow().clone()
    }

    /// Resolves when a guest I/O error occurs during the window; use it in
    /// a `select!` next to the copy.
    pub async fn io_error_occurred(&self) -> BlockIoError {
        let mut rx = self.io.rx.clone();
        loop {
            if let Some(err) = rx.borrow_and_update().clone() {
                return err;
            }
            if rx.changed().await.is_err() {
                // The watcher ended (connection closed); never resolves.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Ends the fleecing point: deletes the exports (waiting for
    /// `BLOCK_EXPORT_DELETED`; connected clients are disconnected), cancels
    /// the backup jobs, deletes the overlay nodes and files, and resumes
    /// the guest if copy-before-write paused it with an I/O error.
    ///
    /// Then, if `success` (the replica committed the recovery point), the
    /// old generation is removed. Otherwise one transaction merges the old
    /// generation into the new one and removes it, so the next point ships
    /// the union and nothing is lost. A failed full copy (no old
    /// generation) removes the new generation instead: the next attempt
    /// must be a full copy again.
    ///
    /// Every step tolerates objects that are already gone and all steps run
    /// even if one fails; the error lists what was left undone.
    pub async fn release(self, qmp: &Qmp, success: bool) -> Result<ReleaseReport, CbtError> {
        let outcome = match success {
            true => Generations::DropOld,
            false => Generations::FoldBack,
        };
        self.release_with(qmp, outcome).await
    }

    /// Ends the fleecing point like [`FleecePoint::release`], but leaves both generations
    /// as they are: the old one (frozen) still holds every change up to this point, the new
    /// one everything after it. For a point the replica has not committed yet: the caller
    /// removes the old generation once it has, and a failure before that is folded back by
    /// whoever reconciles the generations next (nothing is lost even if the process dies
    /// in between).
    pub async fn release_keeping_generations(self, qmp: &Qmp) -> Result<ReleaseReport, CbtError> {
        self.release_with(qmp, Generations::Keep).await
    }

    async fn release_with(
        mut self,
        qmp: &Qmp,
        outcome: Generations,
    ) -> Result<ReleaseReport, CbtError> {
        let success = outcome != Generations::FoldBack;
        let (report, failures) = self.teardown(qmp, outcome).await;
        tracing::info!(
            cycle = self.cycle_id,
            success,
            cbw_bytes = report.cbw_bytes,
            resumed_vm = report.resumed_vm,
            release_ms = report.duration.as_secs_f64() * 1e3,
            "Fleecing point released"
        );
        if failures.is_empty() {
            Ok(report)
        } else {
            Err(CbtError::Release {
                cycle_id: self.cycle_id,
                failures,
            })
        }
    }

    async fn teardown(&mut self, qmp: &Qmp, outcome: Generations) -> (ReleaseReport, Vec<String>) {
        let started = Instant::now();
        self.released = true;
        let mut failures = Vec::new();
        let mut events = qmp.events();

        let exports: Vec<String> = self.disks.iter().map(|d| d.export_id.clone()).collect();
        failures.extend(delete_exports(qmp, &mut events, &exports).await);

        let jobs: Vec<String> = self.disks.iter().map(|d| d.job_id.clone()).collect();
        let (cbw_bytes, job_failures) = cancel_jobs(qmp, &mut events, &jobs).await;
        failures.extend(job_failures);

        let io_error = self.io_error();
        let mut resumed_vm = false;
        if io_error.is_some() {
            match resume_after_io_error(qmp).await {
                Ok(resumed) => resumed_vm = resumed,
                Err(e) => failures.push(format!("resuming the guest: {}", chain(&e))),
            }
        }

        for disk in &self.disks {
            if let Err(e) = delete_node(qmp, &disk.overlay_node).await {
                failures.push(format!(
                    "deleting node {}: {}",
                    disk.overlay_node,
                    chain(&e)
                ));
            }
            if let Err(e) = remove_file(&disk.overlay_file).await {
                failures.push(format!("deleting {:?}: {e}", disk.overlay_file));
            }
        }

        if self.committed && outcome != Generations::Keep {
            let success = outcome == Generations::DropOld;
            let nodes: Vec<&str> = self.disks.iter().map(|d| d.node.as_str()).collect();
            match (self.old_gen.as_deref(), success) {
                (Some(old), true) => {
                    if let Err(e) = remove_generation(qmp, &nodes, old).await {
                        failures.push(format!("removing generation {old}: {}", chain(&e)));
                    }
                }
                (Some(old), false) => {
                    if let Err(e) = rollback_generation(qmp, &nodes, old, &self.new_gen).await {
                        failures.push(format!("merging back generation {old}: {}", chain(&e)));
                    }
                }
                // A failed full copy has no base to build on: the next
                // attempt is a full copy again, so the generation started
                // for it goes too (and the same name can be reused).
                (None, false) => {
                    if let Err(e) = remove_generation(qmp, &nodes, &self.new_gen).await {
                        failures.push(format!(
                            "removing generation {}: {}",
                            self.new_gen,
                            chain(&e)
                        ));
                    }
                }
                (None, true) => {}
            }
        }

        let report = ReleaseReport {
            cbw_bytes,
            io_error,
            resumed_vm,
            duration: started.elapsed(),
        };
        (report, failures)
    }
}

impl Drop for FleecePoint {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!(
                cycle = self.cycle_id,
                "Fleecing point dropped without release; its QEMU objects stay until cleanup_stale"
            );
        }
    }
}

fn validate_request(
    socket: &Path,
    nodes: &[NodeSpec],
    old_gen: Option<&str>,
    new_gen: &str,
    granularity: u64,
) -> Result<(), CbtError> {
    let invalid = |reason: String| Err(CbtError::InvalidRequest { reason });
    if nodes.is_empty() {
        return invalid("no disks given".into());
    }
    let distinct: BTreeSet<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
    if distinct.len() != nodes.len() {
        return invalid("a disk node is listed twice".into());
    }
    if let Some(n) = nodes.iter().find(|n| n.size == 0) {
        return invalid(format!("disk {} has size 0", n.node));
    }
    if new_gen.is_empty() || old_gen == Some(new_gen) {
        return invalid(format!(
            "the new generation {new_gen:?} must be non-empty and differ from the old one"
        ));
    }
    check_granularity(granularity)?;
    let len = socket.as_os_str().len();
    if len > SUN_PATH_MAX {
        return invalid(format!(
            "NBD socket path {socket:?} is {len} bytes; unix sockets allow at most {SUN_PATH_MAX}"
        ));
    }
    if !socket.is_absolute() {
        return invalid(format!("run directory of {socket:?} must be absolute"));
    }
    Ok(())
}

/// Starts QEMU's NBD server on `socket` unless it runs already. QEMU has
/// one NBD server per process; "already running" is accepted when our
/// socket answers, otherwise someone else owns the server.
pub async fn ensure_nbd_server(qmp: &Qmp, socket: &Path) -> Result<(), CbtError> {
    let cmd = NbdServerStart {
        addr: NbdServerAddr::Unix {
            path: socket.into(),
        },
    };
    match qmp.execute(&cmd).await {
        Ok(_) => {
            tracing::debug!(socket = %socket.display(), "Started QEMU's NBD server");
            Ok(())
        }
        Err(e) if desc_contains(&e, "already running") => {
            if UnixStream::connect(socket).await.is_ok() {
                Ok(())
            } else {
                Err(CbtError::NbdServerForeign {
                    socket: socket.into(),
                })
            }
        }
        Err(source) => Err(CbtError::Qmp {
            command: NbdServerStart::NAME,
            source,
        }),
    }
}

// ---------------------------------------------------------------------------
// Teardown steps, shared by release and cleanup_stale
// ---------------------------------------------------------------------------

/// Deletes exports and waits until they are gone. Returns failures.
async fn delete_exports(
    qmp: &Qmp,
    events: &mut broadcast::Receiver<Event>,
    ids: &[String],
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut pending = BTreeSet::new();
    for id in ids {
        let safe = BlockExportDel {
            id: id.clone(),
            mode: None,
        };
        let result = match qmp.execute(&safe).await {
            // A client is still connected: we are done with the point, so
            // disconnect it.
            Err(e) if desc_contains(&e, "still in use") => {
                qmp.execute(&BlockExportDel {
                    id: id.clone(),
                    mode: Some(BlockExportRemoveMode::Hard),
                })
                .await
            }
            other => other,
        };
        match result {
            Ok(_) => {
                pending.insert(id.clone());
            }
            Err(e) if desc_contains(&e, "already shutting down") => {
                pending.insert(id.clone());
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => failures.push(format!("deleting export {id}: {e}")),
        }
    }
    if !pending.is_empty() {
        let gone = wait_gone(qmp, events, Waiting::Exports, &mut pending).await;
        if !gone.is_empty() {
            failures.push(gone);
        }
    }
    failures
}

/// Cancels jobs (force) and waits until they are gone. Returns the bytes
/// copy-before-write saved (from `BLOCK_JOB_CANCELLED`) and failures.
async fn cancel_jobs(
    qmp: &Qmp,
    events: &mut broadcast::Receiver<Event>,
    ids: &[String],
) -> (u64, Vec<String>) {
    let mut failures = Vec::new();
    let mut pending = BTreeSet::new();
    for id in ids {
        let cmd = BlockJobCancel {
            device: id.clone(),
            force: Some(true),
        };
        match qmp.execute(&cmd).await {
            Ok(_) => {
                pending.insert(id.clone());
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => failures.push(format!("cancelling job {id}: {e}")),
        }
    }
    let mut cbw = CbwTally::default();
    if !pending.is_empty() {
        let gone = wait_jobs(qmp, events, &mut pending, &mut cbw).await;
        if !gone.is_empty() {
            failures.push(gone);
        }
    }
    (cbw.total(), failures)
}

#[derive(Default)]
struct CbwTally(BTreeMap<String, u64>);

impl CbwTally {
    fn record(&mut self, event: &Event) -> Option<String> {
        if !matches!(
            event.event.as_str(),
            "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_COMPLETED"
        ) {
            return None;
        }
        let id = event.data["device"].as_str()?.to_string();
        let offset = event.data["offset"].as_u64().unwrap_or(0);
        self.0.insert(id.clone(), offset);
        Some(id)
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

#[derive(Clone, Copy)]
enum Waiting {
    Exports,
    Jobs,
}

async fn wait_jobs(
    qmp: &Qmp,
    events: &mut broadcast::Receiver<Event>,
    pending: &mut BTreeSet<String>,
    cbw: &mut CbwTally,
) -> String {
    let result = wait_until_gone(qmp, events, Waiting::Jobs, pending, |e| cbw.record(e)).await;
    // Events that raced with the last poll still carry the CBW counts.
    while let Ok(event) = events.try_recv() {
        cbw.record(&event);
    }
    result
}

async fn wait_gone(
    qmp: &Qmp,
    events: &mut broadcast::Receiver<Event>,
    what: Waiting,
    pending: &mut BTreeSet<String>,
) -> String {
    wait_until_gone(qmp, events, what, pending, |event| {
        (event.event == "BLOCK_EXPORT_DELETED")
            .then(|| event.data["id"].as_str().map(str::to_string))
            .flatten()
    })
    .await
}

/// Waits until every id in `pending` is gone: `on_event` maps an event to
/// the id it finishes; a periodic query covers missed events. Returns an
/// empty string on success, else a description of what is left.
async fn wait_until_gone(
    qmp: &Qmp,
    events: &mut broadcast::Receiver<Event>,
    what: Waiting,
    pending: &mut BTreeSet<String>,
    mut on_event: impl FnMut(&Event) -> Option<String>,
) -> String {
    let deadline = Instant::now() + TEARDOWN_TIMEOUT;
    let mut next_poll = Instant::now() + POLL_INTERVAL;
    while !pending.is_empty() {
        if Instant::now() >= deadline {
            let kind = match what {
                Waiting::Exports => "exports",
                Waiting::Jobs => "jobs",
            };
            let left: Vec<&str> = pending.iter().map(String::as_str).collect();
            return format!(
                "{kind} {} still present after {TEARDOWN_TIMEOUT:?}",
                left.join(", ")
            );
        }
        tokio::select! {
            received = events.recv() => match received {
                Ok(event) => {
                    if let Some(id) = on_event(&event) {
                        pending.remove(&id);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => next_poll = Instant::now(),
                Err(broadcast::error::RecvError::Closed) => return "QMP connection closed".into(),
            },
            _ = tokio::time::sleep_until(next_poll) => {
                next_poll = Instant::now() + POLL_INTERVAL;
                let present: Result<BTreeSet<String>, QmpError> = match what {
                    Waiting::Exports => qmp
                        .execute(&qmp::QueryBlockExports)
                        .await
                        .map(|v| v.into_iter().map(|e| e.id).collect()),
                    Waiting::Jobs => qmp
                        .execute(&qmp::QueryBlockJobs)
                        .await
                        .map(|v| v.into_iter().map(|j| j.device).collect()),
                };
                match present {
                    Ok(present) => pending.retain(|id| present.contains(id)),
                    Err(QmpError::Closed) => return "QMP connection closed".into(),
                    Err(e) => tracing::debug!("Polling while waiting for teardown failed: {e}"),
                }
            }
        }
    }
    String::new()
}

/// `blockdev-del`, retried while QEMU is still detaching a cancelled job;
/// a node that is already gone counts as deleted.
async fn delete_node(qmp: &Qmp, node: &str) -> Result<(), CbtError> {
    let deadline = Instant::now() + NODE_DEL_TIMEOUT;
    loop {
        let cmd = BlockdevDel {
            node_name: node.into(),
        };
        match qmp.execute(&cmd).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e @ QmpError::Command { .. }) if Instant::now() < deadline => {
                tracing::debug!(node, "blockdev-del failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(source) => {
                return Err(CbtError::Qmp {
                    command: BlockdevDel::NAME,
                    source,
                })
            }
        }
    }
}

async fn remove_file(path: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Sends `cont` if the guest is paused by an I/O error. Returns whether it
/// did.
async fn resume_after_io_error(qmp: &Qmp) -> Result<bool, CbtError> {
    let status = run(qmp, &qmp::QueryStatus).await?;
    if status.status != "io-error" {
        return Ok(false);
    }
    run(qmp, &qmp::Cont).await?;
    tracing::info!("Resumed the guest after an I/O error in the fleecing window");
    Ok(true)
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaleCleanup {
    /// Export ids.
    pub exports: Vec<String>,
    /// Job ids.
    pub jobs: Vec<String>,
    /// Overlay node names.
    pub nodes: Vec<String>,
    /// Overlay files.
    pub files: Vec<PathBuf>,
    /// Whether a guest paused by an I/O error was resumed.
    pub resumed_vm: bool,
}

impl StaleCleanup {
    /// Whether nothing was left over.
    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
            && self.jobs.is_empty()
            && self.nodes.is_empty()
            && self.files.is_empty()
    }
}

/// Removes what fleecing points of a crashed daemon left behind in this
/// QEMU and in `run_dir`: exports, backup jobs and overlay nodes named
/// [`FLEECE_PREFIX`]`…`, and overlay files. Resumes a guest paused by an
/// I/O error if anything was removed. Generations are left alone: check
/// them with [`bitmap_state`] and fold a frozen one back with
/// [`rollback_generation`].
///
/// Call it when attaching to a QEMU, never while a [`FleecePoint`] of this
/// QEMU is alive.
pub async fn cleanup_stale(qmp: &Qmp, run_dir: &Path) -> Result<StaleCleanup, CbtError> {
    let mut out = StaleCleanup::default();
    let mut failures = Vec::new();
    let mut events = qmp.events();

    let exports: Vec<String> = run(qmp, &qmp::QueryBlockExports)
        .await?
        .into_iter()
        .filter(|e| e.id.starts_with(FLEECE_PREFIX) || e.node_name.starts_with(FLEECE_PREFIX))
        .map(|e| e.id)
        .collect();
    failures.extend(delete_exports(qmp, &mut events, &exports).await);
    out.exports = exports;

    let jobs: Vec<String> = run(qmp, &qmp::QueryBlockJobs)
        .await?
        .into_iter()
        .filter(|j| j.device.starts_with(FLEECE_PREFIX))
        .map(|j| j.device)
        .collect();
    failures.extend(cancel_jobs(qmp, &mut events, &jobs).await.1);
    out.jobs = jobs;

    if !out.jobs.is_empty() {
        match resume_after_io_error(qmp).await {
            Ok(resumed) => out.resumed_vm = resumed,
            Err(e) => failures.push(format!("resuming the guest: {}", chain(&e))),
        }
    }

    let mut kept_files = BTreeSet::new();
    for node in query_nodes(qmp).await? {
        if !node.node_name.starts_with(FLEECE_PREFIX) {
            continue;
        }
        match delete_node(qmp, &node.node_name).await {
            Ok(()) => out.nodes.push(node.node_name),
            Err(e) => {
                kept_files.insert(PathBuf::from(&node.file));
                failures.push(format!("deleting node {}: {}", node.node_name, chain(&e)));
            }
        }
    }

    let mut dir = tokio::fs::read_dir(run_dir)
        .await
        .map_err(|source| CbtError::RunTool {
            binary: run_dir.into(),
            source,
        })?;
    while let Ok(Some(entry)) = dir.next_entry().await {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        if name.starts_with(FLEECE_PREFIX)
            && name.ends_with(".qcow2")
            && !kept_files.contains(&path)
        {
            match remove_file(&path).await {
                Ok(()) => out.files.push(path),
                Err(e) => failures.push(format!("deleting {path:?}: {e}")),
            }
        }
    }
    out.files.sort();

    if !out.is_empty() {
        tracing::info!(?out, "Removed stale fleecing objects");
    }
    if failures.is_empty() {
        Ok(out)
    } else {
        Err(CbtError::Cleanup { failures })
    }
}

// ---------------------------------------------------------------------------
// QMP helpers
// ---------------------------------------------------------------------------

async fn run<C: Command>(qmp: &Qmp, cmd: &C) -> Result<C::Ok, CbtError> {
    qmp.execute(cmd).await.map_err(|source| CbtError::Qmp {
        command: C::NAME,
        source,
    })
}

fn desc_contains(e: &QmpError, needle: &str) -> bool {
    matches!(e, QmpError::Command { desc, .. } if desc.contains(needle))
}

/// Whether QEMU says the object does not exist. QEMU 7.2's wording:
/// "Export 'x' is not found", "Block job 'x' not found",
/// "Failed to find node with node-name='x'", "Dirty bitmap 'x' not found".
fn is_not_found(e: &QmpError) -> bool {
    match e {
        QmpError::Command { class, desc } => {
            class == "DeviceNotFound"
                || class == "DeviceNotActive"
                || desc.contains("not found")
                || desc.contains("Failed to find")
                || desc.contains("Cannot find")
        }
        _ => false,
    }
}

/// An error with its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn nbd_unix_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

// ---------------------------------------------------------------------------
// Offline: the VM is off
// ---------------------------------------------------------------------------

/// A persistent bitmap stored in a qcow2, as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OfflineBitmap {
    /// Bitmap (generation) name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// qcow2 flags: `auto` (records once the image is opened) and
    /// `in-use` (opened read-write; without a running VM this means QEMU
    /// did not close the image cleanly and the bitmap is inconsistent).
    #[serde(default)]
    pub flags: Vec<String>,
}

impl OfflineBitmap {
    /// Flagged `in-use`: inconsistent when no QEMU holds the image.
    pub fn in_use(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }

    /// Flagged `auto`: QEMU loads it enabled (recording) at the next open.
    pub fn auto(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
}

/// Parses the bitmaps out of `qemu-img info --output=json` of one image.
pub fn parse_offline_bitmaps(json: &str) -> Result<Vec<OfflineBitmap>, CbtError> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(rename = "format-specific")]
        format_specific: Option<FormatSpecific>,
    }
    #[derive(Deserialize)]
    struct FormatSpecific {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        data: serde_json::Value,
    }
    let info: Info = serde_json::from_str(json).map_err(|source| CbtError::ParseInfo { source })?;
    match info.format_specific {
        Some(fs) if fs.kind == "qcow2" => match fs.data.get("bitmaps") {
            Some(bitmaps) => serde_json::from_value(bitmaps.clone())
                .map_err(|source| CbtError::ParseInfo { source }),
            None => Ok(Vec::new()),
        },
        _ => Ok(Vec::new()),
    }
}

/// The persistent bitmaps of a qcow2 image (`qemu-img info -U`).
pub async fn offline_bitmaps(
    qemu_img: &Path,
    image: &Path,
) -> Result<Vec<OfflineBitmap>, CbtError> {
    let args = [
        OsStr::new("info"),
        OsStr::new("--output=json"),
        OsStr::new("-U"),
        image.as_os_str(),
    ];
    let out = run_tool(qemu_img, &args).await?;
    if !out.status.success() {
        return Err(CbtError::OfflineImage {
            action: "info".into(),
            image: image.into(),
            stderr: failure_text(&out),
        });
    }
    parse_offline_bitmaps(&String::from_utf8_lossy(&out.stdout))
}

/// Starts generation `name` in the image of a VM that is off
/// (`qemu-img bitmap --add`): QEMU 7.2 stores it with the `auto` flag, so
/// it records from the next boot on; no `--enable` is needed.
pub async fn add_bitmap_offline(
    qemu_img: &Path,
    image: &Path,
    name: &str,
    granularity: u64,
) -> Result<(), CbtError> {
    check_granularity(granularity)?;
    let mut args = vec!["--add".to_string()];
    if granularity != 0 {
        args.extend(["-g".into(), granularity.to_string()]);
    }
    qemu_img_bitmap(qemu_img, image, &args, name).await
}

/// Removes bitmap `name` from the image of a VM that is off, also when it
/// is `in-use` (inconsistent after a crash; `qemu-img check -r` does not
/// repair those). Returns false if there was no such bitmap.
pub async fn remove_bitmap_offline(
    qemu_img: &Path,
    image: &Path,
    name: &str,
) -> Result<bool, CbtError> {
    let present = offline_bitmaps(qemu_img, image)
        .await?
        .iter()
        .any(|b| b.name == name);
    if present {
        qemu_img_bitmap(qemu_img, image, &["--remove".to_string()], name).await?;
    }
    Ok(present)
}

/// Rotates generations in the image of a VM that is off, after the final
/// offline copy of `old` was committed: adds `new` (recording from the next
/// boot), then removes `old`. Safe to call again after an interruption.
pub async fn rotate_bitmap_offline(
    qemu_img: &Path,
    image: &Path,
    old: &str,
    new: &str,
    granularity: u64,
) -> Result<(), CbtError> {
    let bitmaps = offline_bitmaps(qemu_img, image).await?;
    match bitmaps.iter().find(|b| b.name == new) {
        None => add_bitmap_offline(qemu_img, image, new, granularity).await?,
        Some(b) if b.in_use() => {
            return Err(CbtError::GenerationInconsistent {
                node: image.display().to_string(),
                name: new.into(),
            })
        }
        Some(_) => {}
    }
    if bitmaps.iter().any(|b| b.name == old) {
        qemu_img_bitmap(qemu_img, image, &["--remove".to_string()], old).await?;
    }
    Ok(())
}

async fn qemu_img_bitmap(
    qemu_img: &Path,
    image: &Path,
    ops: &[String],
    name: &str,
) -> Result<(), CbtError> {
    let mut args: Vec<&OsStr> = vec![OsStr::new("bitmap")];
    args.extend(ops.iter().map(OsStr::new));
    args.extend([
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        image.as_os_str(),
        OsStr::new(name),
    ]);
    let out = run_tool(qemu_img, &args).await?;
    if !out.status.success() {
        return Err(CbtError::OfflineImage {
            action: format!("bitmap {} {name}", ops.join(" ")),
            image: image.into(),
            stderr: failure_text(&out),
        });
    }
    Ok(())
}

fn spawn_error(binary: &Path, source: std::io::Error) -> CbtError {
    if source.kind() == ErrorKind::NotFound {
        CbtError::BinaryNotFound {
            binary: binary.into(),
            source,
        }
    } else {
        CbtError::RunTool {
            binary: binary.into(),
            source,
        }
    }
}

async fn run_tool(binary: &Path, args: &[&OsStr]) -> Result<std::process::Output, CbtError> {
    let child = tokio::process::Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| spawn_error(binary, e))?;
    tokio::time::timeout(QEMU_IMG_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| CbtError::ToolTimeout {
            binary: binary.into(),
            timeout: QEMU_IMG_TIMEOUT,
        })?
        .map_err(|source| CbtError::RunTool {
            binary: binary.into(),
            source,
        })
}

/// Whether an NBD server on `socket` sends its greeting (`NBDMAGIC`).
async fn nbd_greets(socket: &Path) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut stream) = UnixStream::connect(socket).await else {
        return false;
    };
    let mut magic = [0u8; 8];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut magic)).await,
        Ok(Ok(_)) if &magic == b"NBDMAGIC"
    )
}

fn failure_text(out: &std::process::Output) -> String {
    let stderr = one_line(&out.stderr);
    if stderr.is_empty() {
        format!("exited with {} and printed nothing", out.status)
    } else {
        stderr
    }
}

/// A read-only `qemu-nbd` serving the image of a VM that is off, with
/// generation `bitmap` as `qemu:dirty-bitmap:<bitmap>`: the final copy
/// after a clean shutdown. qemu-nbd runs as our child and is killed when
/// this is dropped; prefer [`close`](Self::close).
#[derive(Debug)]
pub struct OfflineExport {
    child: Option<tokio::process::Child>,
    socket: PathBuf,
    bitmap: Option<String>,
}

impl OfflineExport {
    /// Runs `qemu-nbd --read-only --format=qcow2 --persistent --shared=8
    /// [--bitmap=NAME] --socket=SOCKET --export-name=ferry-offline IMAGE`
    /// and waits until the socket accepts connections.
    pub async fn start(
        qemu_nbd: &Path,
        image: &Path,
        bitmap: Option<&str>,
        socket: &Path,
    ) -> Result<OfflineExport, CbtError> {
        if socket.as_os_str().len() > SUN_PATH_MAX {
            return Err(CbtError::InvalidRequest {
                reason: format!("socket path {socket:?} is longer than {SUN_PATH_MAX} bytes"),
            });
        }
        // A socket file nobody listens on is from an earlier crash.
        if socket.exists() && UnixStream::connect(socket).await.is_err() {
            let _ = remove_file(socket).await;
        }
        let mut cmd = tokio::process::Command::new(qemu_nbd);
        cmd.args([
            "--read-only",
            "--format=qcow2",
            "--persistent",
            "--shared=8",
        ]);
        if let Some(bitmap) = bitmap {
            cmd.arg(format!("--bitmap={bitmap}"));
        }
        let mut socket_arg = std::ffi::OsString::from("--socket=");
        socket_arg.push(socket);
        cmd.arg(socket_arg)
            .arg(format!("--export-name={OFFLINE_EXPORT_NAME}"))
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| spawn_error(qemu_nbd, e))?;
        let deadline = Instant::now() + QEMU_NBD_START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().map_err(|source| CbtError::RunTool {
                binary: qemu_nbd.into(),
                source,
            })? {
                let mut stderr = Vec::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_end(&mut stderr).await;
                }
                let stderr = one_line(&stderr);
                if stderr.contains("inconsistent") {
                    if let Some(name) = bitmap {
                        return Err(CbtError::GenerationInconsistent {
                            node: image.display().to_string(),
                            name: name.into(),
                        });
                    }
                }
                if stderr.contains("not found") {
                    if let Some(name) = bitmap {
                        return Err(CbtError::GenerationMissing {
                            node: image.display().to_string(),
                            name: name.into(),
                        });
                    }
                }
                return Err(CbtError::StartQemuNbd {
                    image: image.into(),
                    stderr: if stderr.is_empty() {
                        format!("exited with {status} and printed nothing")
                    } else {
                        stderr
                    },
                });
            }
            // qemu-nbd listens before it has opened the image and checked the bitmap: only
            // its greeting says the export is ready (an inconsistent bitmap makes it exit
            // instead, caught above on the next turn).
            if nbd_greets(socket).await {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(CbtError::QemuNbdTimeout {
                    socket: socket.into(),
                    timeout: QEMU_NBD_START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Keep draining stderr so qemu-nbd never blocks on a full pipe.
        if let Some(pipe) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!("qemu-nbd: {line}");
                }
            });
        }
        tracing::info!(image = %image.display(), ?bitmap, "Offline export started");
        Ok(OfflineExport {
            child: Some(child),
            socket: socket.into(),
            bitmap: bitmap.map(Into::into),
        })
    }

    /// The unix socket qemu-nbd listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The NBD export name.
    pub fn export_name(&self) -> &str {
        OFFLINE_EXPORT_NAME
    }

    /// The NBD URI (`nbd+unix:///ferry-offline?socket=PATH`).
    pub fn nbd_uri(&self) -> String {
        nbd_unix_uri(OFFLINE_EXPORT_NAME, &self.socket)
    }

    /// The meta context to read: the bitmap's, or `base:allocation`.
    pub fn meta_context(&self) -> String {
        match &self.bitmap {
            Some(b) => format!("qemu:dirty-bitmap:{b}"),
            None => "base:allocation".into(),
        }
    }

    /// The qemu-nbd pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Stops qemu-nbd (SIGTERM, then SIGKILL after a grace period) and
    /// removes the socket.
    pub async fn close(mut self) -> Result<(), CbtError> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = crate::process::signal(pid, libc::SIGTERM);
            }
            if tokio::time::timeout(QEMU_NBD_STOP_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        let _ = remove_file(&self.socket).await;
        Ok(())
    }
}

impl Drop for OfflineExport {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn fleecing_transaction_serializes_like_qemu_wants() {
        let t = Transaction {
            actions: vec![
                TransactionAction::BlockDirtyBitmapAdd(bitmap_add("drive0", "cbt-2", 65536)),
                TransactionAction::BlockDirtyBitmapDisable(BlockDirtyBitmapDisable {
                    node: "drive0".into(),
                    name: "cbt-1".into(),
                }),
                TransactionAction::BlockdevBackup(BlockdevBackup {
                    job_id: "j".into(),
                    device: "drive0".into(),
                    target: "f".into(),
                    sync: qmp::BackupSync::None,
                }),
                TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
                    node: "drive0".into(),
                    target: "cbt-2".into(),
                    bitmaps: vec!["cbt-1".into()],
                }),
                TransactionAction::BlockDirtyBitmapRemove(bitmap_ref("drive0", "cbt-1")),
            ],
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "drive0", "name": "cbt-2", "persistent": true, "granularity": 65536}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "drive0", "name": "cbt-1"}},
                {"type": "blockdev-backup",
                 "data": {"job-id": "j", "device": "drive0", "target": "f", "sync": "none"}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "drive0", "target": "cbt-2", "bitmaps": ["cbt-1"]}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "drive0", "name": "cbt-1"}},
            ]})
        );
        // Granularity 0 leaves the choice to QEMU.
        assert!(serde_json::to_value(bitmap_add("d", "n", 0))
            .unwrap()
            .get("granularity")
            .is_none());
    }

    #[test]
    fn overlay_and_export_commands_serialize() {
        assert_eq!(
            serde_json::to_value(BlockdevAdd::qcow2(
                "ferry-fleece-1-0",
                Path::new("/run/f.qcow2"),
                Some("drive0")
            ))
            .unwrap(),
            json!({"node-name": "ferry-fleece-1-0", "driver": "qcow2",
                   "file": {"driver": "file", "filename": "/run/f.qcow2"}, "backing": "drive0"})
        );
        assert_eq!(
            serde_json::to_value(NbdServerStart {
                addr: NbdServerAddr::Unix {
                    path: "/run/nbd.sock".into()
                }
            })
            .unwrap(),
            json!({"addr": {"type": "unix", "data": {"path": "/run/nbd.sock"}}})
        );
        assert_eq!(
            serde_json::to_value(BlockExportAdd::nbd_read_only(
                "e",
                "n",
                "x",
                vec!["cbt-1".into()]
            ))
            .unwrap(),
            json!({"type": "nbd", "id": "e", "node-name": "n", "name": "x", "writable": false,
                   "bitmaps": ["cbt-1"]})
        );
        // A full copy offers no bitmap at all.
        assert!(
            serde_json::to_value(BlockExportAdd::nbd_read_only("e", "n", "x", vec![]))
                .unwrap()
                .get("bitmaps")
                .is_none()
        );
        assert_eq!(
            serde_json::to_value(BlockExportDel {
                id: "e".into(),
                mode: Some(BlockExportRemoveMode::Hard)
            })
            .unwrap(),
            json!({"id": "e", "mode": "hard"})
        );
        assert_eq!(
            serde_json::to_value(BlockJobCancel {
                device: "j".into(),
                force: Some(true)
            })
            .unwrap(),
            json!({"device": "j", "force": true})
        );
        assert_eq!(
            serde_json::to_value(BlockdevDel {
                node_name: "n".into()
            })
            .unwrap(),
            json!({"node-name": "n"})
        );
    }

    #[test]
    fn replies_of_7_2_decode() {
        let exports: Vec<qmp::BlockExportInfo> = serde_json::from_value(json!([
            {"type": "nbd", "id": "ferry-fleece-1-0-export", "node-name": "ferry-fleece-1-0",
             "shutting-down": false}
        ]))
        .unwrap();
        assert_eq!(exports[0].node_name, "ferry-fleece-1-0");
        let jobs: Vec<qmp::BlockJobInfo> = serde_json::from_value(json!([
            {"auto-finalize": true, "io-status": "ok", "device": "ferry-fleece-1-0-job",
             "auto-dismiss": true, "busy": false, "len": 67108864, "offset": 655360,
             "status": "running", "paused": false, "speed": 0, "ready": false, "type": "backup"}
        ]))
        .unwrap();
        assert_eq!((jobs[0].kind.as_str(), jobs[0].offset), ("backup", 655360));
    }

    fn node(bitmaps: serde_json::Value) -> Vec<BlockNodeInfo> {
        serde_json::from_value(json!([{
            "node-name": "drive0", "drv": "qcow2", "file": "/d.qcow2", "dirty-bitmaps": bitmaps
        }]))
        .unwrap()
    }

    #[test]
    fn bitmap_states() {
        let nodes = node(json!([
            {"name": "cbt-1", "recording": false, "persistent": true, "busy": true,
             "granularity": 4096, "count": 8192},
            {"recording": false, "busy": true, "granularity": 65536, "count": 67108864,
             "persistent": false},
            {"name": "cbt-0", "recording": false, "persistent": true, "busy": false,
             "granularity": 65536, "count": 0, "inconsistent": true},
        ]));
        assert_eq!(
            state_in(&nodes, "drive0", "cbt-1").unwrap(),
            BitmapState::Ok {
                recording: false,
                count: 8192,
                granularity: 4096
            }
        );
        assert_eq!(
            state_in(&nodes, "drive0", "cbt-0").unwrap(),
            BitmapState::Inconsistent
        );
        assert_eq!(
            state_in(&nodes, "drive0", "cbt-9").unwrap(),
            BitmapState::Missing
        );
        assert!(matches!(
            state_in(&nodes, "drive1", "cbt-1"),
            Err(CbtError::NodeNotFound { .. })
        ));
    }

    #[test]
    fn offline_bitmaps_parse() {
        let json = r#"{"virtual-size": 4194304, "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
              "bitmaps": [{"flags": ["in-use", "auto"], "name": "cbt-8", "granularity": 65536},
                          {"flags": [], "name": "old", "granularity": 4096}]}}}"#;
        let b = parse_offline_bitmaps(json).unwrap();
        assert_eq!(b.len(), 2);
        assert!(b[0].in_use() && b[0].auto());
        assert!(!b[1].in_use() && !b[1].auto());
        assert_eq!(b[1].granularity, 4096);
        let plain = r#"{"virtual-size": 1, "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}"#;
        assert!(parse_offline_bitmaps(plain).unwrap().is_empty());
        let raw = r#"{"virtual-size": 1, "format": "raw"}"#;
        assert!(parse_offline_bitmaps(raw).unwrap().is_empty());
        assert!(parse_offline_bitmaps("nope").is_err());
    }

    #[test]
    fn requests_are_validated() {
        let sock = Path::new("/run/ferry/vm/ferry-nbd.sock");
        let disk = |n: &str| NodeSpec {
            node: n.into(),
            size: 1 << 20,
        };
        validate_request(
            sock,
            &[disk("drive0"), disk("drive1")],
            Some("a"),
            "b",
            4096,
        )
        .unwrap();
        validate_request(sock, &[disk("drive0")], None, "b", 0).unwrap();
        for (nodes, old, new, gran) in [
            (vec![], None, "b", 4096),
            (vec![disk("drive0"), disk("drive0")], None, "b", 4096),
            (vec![disk("drive0")], Some("a"), "a", 4096),
            (vec![disk("drive0")], None, "", 4096),
            (vec![disk("drive0")], None, "b", 3000),
            (vec![disk("drive0")], None, "b", 256),
        ] {
            assert!(matches!(
                validate_request(sock, &nodes, old, new, gran),
                Err(CbtError::InvalidRequest { .. })
            ));
        }
        let long = PathBuf::from(format!("/{}/ferry-nbd.sock", "x".repeat(100)));
        assert!(validate_request(&long, &[disk("drive0")], None, "b", 0).is_err());
    }

    #[test]
    fn not_found_recognizes_7_2_wording() {
        let err = |class: &str, desc: &str| QmpError::Command {
            class: class.into(),
            desc: desc.into(),
        };
        assert!(is_not_found(&err(
            "GenericError",
            "Export 'x' is not found"
        )));
        assert!(is_not_found(&err(
            "DeviceNotActive",
            "Block job 'x' not found"
        )));
        assert!(is_not_found(&err(
            "GenericError",
            "Failed to find node with node-name='x'"
        )));
        assert!(is_not_found(&err(
            "GenericError",
            "Dirty bitmap 'x' not found"
        )));
        assert!(!is_not_found(&err("GenericError", "Node 'x' is busy")));
        assert!(!is_not_found(&QmpError::Closed));
    }

    #[test]
    fn io_error_event_parses() {
        let event: Event = serde_json::from_value(json!({
            "event": "BLOCK_IO_ERROR",
            "data": {"device": "", "nospace": true, "node-name": "#block160",
                     "reason": "No space left on device", "operation": "write", "action": "stop"}
        }))
        .unwrap();
        let e = BlockIoError::from_event(&event).unwrap();
        assert!(e.nospace);
        assert_eq!(e.node_name, "#block160");
        assert_eq!(e.action, "stop");
        let stop: Event = serde_json::from_value(json!({"event": "STOP"})).unwrap();
        assert!(BlockIoError::from_event(&stop).is_none());
    }
}
