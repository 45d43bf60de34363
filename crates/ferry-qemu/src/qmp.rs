//! An async QMP client for QEMU's monitor socket.
//!
//! The split follows qapi-rs: [`Qmp`] holds the writer behind a mutex plus a
//! map from command `id` to a oneshot sender; a reader task routes each reply
//! to its waiter by `id` and publishes events on a broadcast channel, so
//! several consumers (replication, health, the UI feed) can each subscribe.
//!
//! Commands are typed by hand, only the ones ferryd uses ([`Command`]), and
//! decoded leniently: unknown fields are ignored and fields QEMU 7.2 may omit
//! have defaults. For replies whose structs changed across QEMU versions
//! (e.g. `query-blockstats`), use [`Qmp::execute_raw`] and pick fields from
//! the JSON.
//!
//! Every call has a timeout. When QEMU exits, the socket reaches EOF, pending
//! calls fail with [`QmpError::Closed`] and [`Qmp::closed`] resolves.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::Instant;

/// Per-call timeout unless [`Qmp::with_timeout`] sets another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Events buffered per subscriber before a slow one starts missing some
/// (it then sees `RecvError::Lagged`).
const EVENT_CAPACITY: usize = 256;

/// Pause between connection attempts while the socket is not there yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected to within the timeout.
    #[error("Failed to connect to QMP socket {path:?}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last connection error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU accepted the connection but sent no greeting. The monitor serves
    /// one client at a time, so another client is probably attached.
    #[error("No QMP greeting within {timeout:?}; another client may be attached to the monitor")]
    Greeting {
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// Writing to the socket failed.
    #[error("QMP socket I/O failed")]
    Io {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A command got no reply in time.
    #[error("QMP command {command} got no reply within {timeout:?}")]
    Timeout {
        /// The command name.
        command: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The connection is closed: QEMU exited or closed the socket.
    #[error("QMP connection closed (QEMU exited or closed the monitor)")]
    Closed,
    /// QEMU sent something that is not QMP, or the connection became
    /// unusable.
    #[error("QMP protocol violation: {detail}")]
    Protocol {
        /// What went wrong.
        detail: String,
    },
    /// The arguments of a command could not be serialized.
    #[error("Failed to encode the arguments of QMP command {command}")]
    Encode {
        /// The command name.
        command: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The reply of a command did not match its typed reply struct.
    #[error("Failed to decode the reply to QMP command {command}")]
    Decode {
        /// The command name.
        command: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// QEMU rejected the command; the message is QEMU's `desc`.
    #[error("{desc}")]
    Command {
        /// QMP error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
}

/// A QMP command with its typed reply.
///
/// The command struct serializes to the `arguments` object; a unit struct
/// (serialized as `null`) or an empty struct sends no arguments.
pub trait Command: Serialize {
    /// The QMP command name, e.g. `query-status`.
    const NAME: &'static str;
    /// The type of the `return` value.
    type Ok: DeserializeOwned;
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    /// Event name, e.g. `STOP`, `BLOCK_JOB_CANCELLED`.
    pub event: String,
    /// Event payload; `Null` for events without data.
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted the event.
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
}

/// QMP event timestamp (host wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// QEMU version from the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
    /// Distribution package string, e.g. `Debian 1:7.2+dfsg-7+deb12u18`.
    #[serde(default)]
    pub package: String,
}

/// A connected QMP client. Cheap to clone; all clones share the connection,
/// which closes when the last clone is dropped.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
    timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.inner.version)
            .field("timeout", &self.timeout)
            .field("closed", &self.is_closed())
            .finish()
    }
}

struct Inner {
    writer: tokio::sync::Mutex<Writer>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    version: QemuVersion,
    reader: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reader task owns the read half; stopping it closes the
        // connection so QEMU accepts the next client.
        self.reader.abort();
    }
}

struct Writer {
    half: OwnedWriteHalf,
    /// Set while a line is being written. A call cancelled (timeout, drop)
    /// in the middle of a write leaves a partial line that would corrupt
    /// every later command, so the connection is then refused.
    torn: bool,
}

/// State shared between the handle and the reader task.
struct Shared {
    pending: std::sync::Mutex<Pending>,
    events: broadcast::Sender<Event>,
    closed: watch::Sender<bool>,
}

#[derive(Default)]
struct Pending {
    /// Set under the same lock as `waiters` so no call can register after
    /// the reader drained the map at EOF.
    closed: bool,
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
}

type Reply = Result<Value, (String, String)>;

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding this lock leaves the map consistent.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        let mut pending = self.lock();
        pending.closed = true;
        // Dropping the senders fails every waiting call with Closed.
        pending.waiters.clear();
        drop(pending);
        self.closed.send_replace(true);
    }
}

/// Removes a waiter whose call gave up (timeout or cancellation).
struct WaiterGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiters.remove(&self.id);
    }
}

/// One line from QEMU: a greeting, a reply or an event.
#[derive(Deserialize)]
struct Message {
    #[serde(rename = "QMP")]
    greeting: Option<Greeting>,
    event: Option<String>,
    data: Option<Value>,
    timestamp: Option<Timestamp>,
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<ErrorBody>,
    id: Option<Value>,
}

#[derive(Deserialize)]
struct Greeting {
    version: GreetingVersion,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: QemuVersion,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    class: String,
    #[serde(default)]
    desc: String,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, retrying until `timeout` while the
    /// socket does not exist yet (it appears a moment after spawn), then
    /// reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                // NotFound: not created yet; ConnectionRefused: a stale file
                // QEMU is about to replace.
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                        && Instant::now() + CONNECT_RETRY < deadline =>
                {
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.into(),
                        source,
                    })
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);

        let mut line = Vec::new();
        let n = tokio::time::timeout_at(deadline, reader.read_until(b'\n', &mut line))
            .await
            .map_err(|_| QmpError::Greeting { timeout })?
            .map_err(|source| QmpError::Io { source })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        let greeting = serde_json::from_slice::<Message>(&line)
            .ok()
            .and_then(|m| m.greeting)
            .ok_or_else(|| QmpError::Protocol {
                detail: format!(
                    "expected the QMP greeting, got {}",
                    String::from_utf8_lossy(&line).trim()
                ),
            })?;
        let mut version = greeting.version.qemu;
        version.package = greeting.version.package;

        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            pending: Default::default(),
            events,
            closed,
        });
        let task = tokio::spawn(read_loop(reader, shared.clone()));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                writer: tokio::sync::Mutex::new(Writer {
                    half: write,
                    torn: false,
                }),
                shared,
                next_id: AtomicU64::new(1),
                version,
                reader: task.abort_handle(),
            }),
            timeout: DEFAULT_TIMEOUT,
        };

        // Until capabilities are negotiated QEMU accepts no other command.
        let remaining = deadline.saturating_duration_since(Instant::now());
        qmp.clone()
            .with_timeout(remaining.max(Duration::from_millis(100)))
            .execute(&QmpCapabilities)
            .await?;
        tracing::debug!(path = %path.display(), version = ?qmp.inner.version, "QMP connected");
        Ok(qmp)
    }

    /// The same connection with another per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The QEMU version from the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// Runs a typed command and decodes its reply.
    pub async fn execute<C: Command>(&self, cmd: &C) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|source| QmpError::Encode {
            command: C::NAME.into(),
            source,
        })?;
        let ret = self.call(C::NAME, Some(args)).await?;
        serde_json::from_value(ret).map_err(|source| QmpError::Decode {
            command: C::NAME.into(),
            source,
        })
    }

    /// Runs any command and returns its raw `return` value: the escape hatch
    /// for commands without a typed struct, or whose reply structs differ
    /// between QEMU versions.
    pub async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.call(name, args).await
    }

    /// Sends `quit`. QEMU may exit before its reply arrives, so a closed
    /// connection counts as success. Await [`closed`](Self::closed) or
    /// poll the pid to know the process is gone.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(&Quit).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.shared.events.subscribe()
    }

    /// Resolves once the connection is closed (QEMU exited or closed the
    /// socket).
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed.subscribe();
        // The sender lives as long as `self`, so this can't fail early.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        *self.inner.shared.closed.borrow()
    }

    async fn call(&self, name: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = serde_json::json!({ "execute": name, "id": id });
        match args {
            // Unit structs serialize to null; QEMU wants no arguments then.
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) if map.is_empty() => {}
            Some(args) => {
                msg["arguments"] = args;
            }
        }
        let mut line = serde_json::to_vec(&msg).map_err(|source| QmpError::Encode {
            command: name.into(),
            source,
        })?;
        line.push(b'\n');

        let shared = &*self.inner.shared;
        let rx = {
            let mut pending = shared.lock();
            if pending.closed {
                return Err(QmpError::Closed);
            }
            let (tx, rx) = oneshot::channel();
            pending.waiters.insert(id, tx);
            rx
        };
        let _guard = WaiterGuard { shared, id };
        tracing::debug!(command = name, id, "QMP execute");

        let exchange = async {
            {
                let mut writer = self.inner.writer.lock().await;
                if writer.torn {
                    return Err(QmpError::Protocol {
                        detail: "an earlier command was cancelled mid-write; reconnect".into(),
                    });
                }
                writer.torn = true;
                writer
                    .half
                    .write_all(&line)
                    .await
                    .map_err(|source| match source.kind() {
                        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => QmpError::Closed,
                        _ => QmpError::Io { source },
                    })?;
                writer.torn = false;
            }
            rx.await.map_err(|_| QmpError::Closed)
        };
        let reply = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout {
                command: name.into(),
                timeout: self.timeout,
            })??;
        reply.map_err(|(class, desc)| {
            tracing::debug!(command = name, id, class, desc, "QMP error");
            QmpError::Command { class, desc }
        })
    }
}

/// Reads lines until EOF, routing replies and publishing events.
async fn read_loop(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) => break,
            Ok(_) => dispatch(&shared, &line),
            Err(e) => {
                // ECONNRESET is how a QEMU that exits with unread input ends.
                tracing::debug!("QMP read failed, treating as closed: {e}");
                break;
            }
        }
    }
    tracing::debug!("QMP connection closed");
    shared.close();
}

fn dispatch(shared: &Shared, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    let msg: Message = match serde_json::from_slice(line) {
        Ok(msg) => msg,
        Err(e) => {
            tracing::warn!("Ignoring unparsable QMP line ({e}): {}", text.trim());
            return;
        }
    };
    if let Some(event) = msg.event {
        let event = Event {
            event,
            data: msg.data.unwrap_or(Value::Null),
            timestamp: msg.timestamp,
        };
        tracing::debug!(event = %event.event, data = %event.data, "QMP event");
        // No subscribers is fine: events nobody listens for are dropped.
        let _ = shared.events.send(event);
        return;
    }
    let reply: Reply = match (msg.ret, msg.error) {
        (Some(ret), _) => Ok(ret),
        (None, Some(err)) => Err((err.class, err.desc)),
        (None, None) => {
            tracing::warn!("Ignoring unexpected QMP message: {}", text.trim());
            return;
        }
    };
    // We always send numeric ids; QEMU omits the id only when it could not
    // parse the request at all.
    let Some(id) = msg.id.as_ref().and_then(Value::as_u64) else {
        tracing::warn!("Ignoring QMP reply without our id: {}", text.trim());
        return;
    };
    let waiter = shared.lock().waiters.remove(&id);
    match waiter {
        Some(tx) => {
            let _ = tx.send(reply);
        }
        None => tracing::debug!(id, "Dropping QMP reply to a call that gave up"),
    }
}

/// The reply of commands that return nothing (`{}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}

/// `qmp_capabilities`: leaves capabilities negotiation mode.
#[derive(Debug, Clone, Copy, Serialize)]
struct QmpCapabilities;

impl Command for QmpCapabilities {
    const NAME: &'static str = "qmp_capabilities";
    type Ok = Empty;
}

/// `query-status`: whether the guest CPUs run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryStatus;

impl Command for QueryStatus {
    const NAME: &'static str = "query-status";
    type Ok = StatusInfo;
}

/// Reply of [`QueryStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// Run state, e.g. `running`, `paused`, `io-error`, `shutdown`.
    pub status: String,
}

/// `stop`: pauses the vCPUs (emits `STOP`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stop;

impl Command for Stop {
    const NAME: &'static str = "stop";
    type Ok = Empty;
}

/// `cont`: resumes the vCPUs (emits `RESUME`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cont;

impl Command for Cont {
    const NAME: &'static str = "cont";
    type Ok = Empty;
}

/// `system_powerdown`: presses the ACPI power button; the guest decides
/// whether and when to shut down.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SystemPowerdown;

impl Command for SystemPowerdown {
    const NAME: &'static str = "system_powerdown";
    type Ok = Empty;
}

/// `quit`: QEMU closes its images (storing persistent bitmaps) and exits.
/// Prefer [`Qmp::quit`], which tolerates the connection closing first.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Quit;

impl Command for Quit {
    const NAME: &'static str = "quit";
    type Ok = Empty;
}

/// `screendump`: QEMU writes the display's current picture to a file on the host (the
/// monitor's process writes it, so the path must be one QEMU may create). In QEMU 7.2 the
/// schema is `{filename, *device, *head, *format}`; `format` (`ppm`, the default, or
/// `png`) exists since 7.1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Screendump {
    /// Where QEMU writes the picture (replaced if it exists).
    pub filename: PathBuf,
    /// The image format; `None` is QEMU's default, PPM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
}

impl Command for Screendump {
    const NAME: &'static str = "screendump";
    type Ok = Empty;
}

/// `ImageFormat` of [`Screendump`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Portable pixmap (binary `P6`), QEMU's default.
    Ppm,
    /// PNG (QEMU built with libpng, as Debian's is).
    Png,
}

/// `query-named-block-nodes`: every named block node with its dirty
/// bitmaps.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Omit the nested `backing-image` chains (QEMU 5.0+).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}

impl Command for QueryNamedBlockNodes {
    const NAME: &'static str = "query-named-block-nodes";
    type Ok = Vec<BlockNodeInfo>;
}

/// One block node from [`QueryNamedBlockNodes`] (a subset of QEMU's
/// `BlockDeviceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockNodeInfo {
    /// Node name, e.g. `drive0`, or QEMU's generated `#block123`.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Block driver, e.g. `qcow2`, `file`.
    pub drv: String,
    /// Filename of the node (for filters, that of the child).
    #[serde(default)]
    pub file: String,
    /// Dirty bitmaps on this node.
    #[serde(default, rename = "dirty-bitmaps")]
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
}

/// A dirty bitmap as QMP reports it (`BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirtyBitmapInfo {
    /// Bitmap name; `None` for the anonymous copy bitmap a backup job keeps
    /// while it runs.
    #[serde(default)]
    pub name: Option<String>,
    /// Dirty bytes.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether guest writes are being recorded (enabled).
    pub recording: bool,
    /// Whether the bitmap is stored in the qcow2 on clean close.
    #[serde(default)]
    pub persistent: bool,
    /// Whether an operation (export, job) holds the bitmap.
    #[serde(default)]
    pub busy: bool,
    /// Whether the bitmap was loaded after an unclean shutdown and can't be
    /// trusted; QEMU only reports the field when it is true.
    #[serde(default)]
    pub inconsistent: bool,
}

// ---------------------------------------------------------------------------
// Changed-block tracking and fleecing (used by `crate::cbt`).
//
// QEMU 7.2 answers every command below with an empty object, decoded as
// [`Empty`]. Argument structs that also appear inside a `transaction` are
// shared between the standalone command and the [`TransactionAction`].
// ---------------------------------------------------------------------------

/// How `blockdev-add` finds a child node: by name, or as an inline `file`
/// node QEMU names itself (`#blockNNN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BlockdevRef {
    /// An existing node.
    Node(String),
    /// A new `driver=file` node on a host file.
    File {
        /// Always `file`.
        driver: &'static str,
        /// The host file.
        filename: PathBuf,
    },
}

/// `blockdev-add` of a qcow2 node, e.g. a fleecing overlay whose backing
/// node is the live disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevAdd {
    /// Name of the new node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Block driver; [`BlockdevAdd::qcow2`] sets `qcow2`.
    pub driver: &'static str,
    /// The protocol child holding the image.
    pub file: BlockdevRef,
    /// Backing node; `None` opens the backing file named in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
}

impl BlockdevAdd {
    /// A qcow2 node on `filename` with the node `backing` (if any) as its
    /// backing node.
    pub fn qcow2(node_name: &str, filename: &Path, backing: Option<&str>) -> Self {
        BlockdevAdd {
            node_name: node_name.into(),
            driver: "qcow2",
            file: BlockdevRef::File {
                driver: "file",
                filename: filename.into(),
            },
            backing: backing.map(Into::into),
        }
    }
}

impl Command for BlockdevAdd {
    const NAME: &'static str = "blockdev-add";
    type Ok = Empty;
}

/// `blockdev-del`: removes a node added with `blockdev-add` (and its inline
/// children). Fails while a job, export or device still uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevDel {
    /// The node.
    #[serde(rename = "node-name")]
    pub node_name: String,
}

impl Command for BlockdevDel {
    const NAME: &'static str = "blockdev-del";
    type Ok = Empty;
}

/// `block-dirty-bitmap-add`: a new, empty dirty bitmap that records writes
/// from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapAdd {
    /// The node to track.
    pub node: String,
    /// Bitmap name.
    pub name: String,
    /// Store the bitmap in the qcow2 on clean close (qcow2 nodes only).
    pub persistent: bool,
    /// Bytes per bit, a power of two from 512; `None` means the qcow2
    /// cluster size (64 KiB by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u64>,
}

impl Command for BlockDirtyBitmapAdd {
    const NAME: &'static str = "block-dirty-bitmap-add";
    type Ok = Empty;
}

/// `block-dirty-bitmap-remove`: deletes a bitmap (also from the qcow2 if it
/// is persistent). Works on an inconsistent bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapRemove {
    /// The node.
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

impl Command for BlockDirtyBitmapRemove {
    const NAME: &'static str = "block-dirty-bitmap-remove";
    type Ok = Empty;
}

/// `block-dirty-bitmap-disable`: freezes a bitmap (it stops recording).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapDisable {
    /// The node.
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

impl Command for BlockDirtyBitmapDisable {
    const NAME: &'static str = "block-dirty-bitmap-disable";
    type Ok = Empty;
}

/// `block-dirty-bitmap-enable`: makes a frozen bitmap record again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapEnable {
    /// The node.
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

impl Command for BlockDirtyBitmapEnable {
    const NAME: &'static str = "block-dirty-bitmap-enable";
    type Ok = Empty;
}

/// `block-dirty-bitmap-merge`: ORs `bitmaps` into `target` (all on `node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapMerge {
    /// The node holding all bitmaps.
    pub node: String,
    /// The bitmap that receives the union.
    pub target: String,
    /// Source bitmaps, unchanged by the merge.
    pub bitmaps: Vec<String>,
}

impl Command for BlockDirtyBitmapMerge {
    const NAME: &'static str = "block-dirty-bitmap-merge";
    type Ok = Empty;
}

/// `sync` mode of a backup job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupSync {
    /// Copy nothing up front; only copy-before-write of the regions the
    /// guest overwrites (image fleecing).
    None,
    /// Copy the whole device.
    Full,
}

/// `blockdev-backup`: starts a backup job from `device` into `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevBackup {
    /// Job id, used by `block-job-cancel` and in job events.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// Source node.
    pub device: String,
    /// Target node.
    pub target: String,
    /// What to copy.
    pub sync: BackupSync,
}

impl Command for BlockdevBackup {
    const NAME: &'static str = "blockdev-backup";
    type Ok = Empty;
}

/// One action of a [`Transaction`]; the serialized form is
/// `{"type": "block-dirty-bitmap-add", "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum TransactionAction {
    /// `block-dirty-bitmap-add`.
    BlockDirtyBitmapAdd(BlockDirtyBitmapAdd),
    /// `block-dirty-bitmap-remove`.
    BlockDirtyBitmapRemove(BlockDirtyBitmapRemove),
    /// `block-dirty-bitmap-disable`.
    BlockDirtyBitmapDisable(BlockDirtyBitmapDisable),
    /// `block-dirty-bitmap-enable`.
    BlockDirtyBitmapEnable(BlockDirtyBitmapEnable),
    /// `block-dirty-bitmap-merge`.
    BlockDirtyBitmapMerge(BlockDirtyBitmapMerge),
    /// `blockdev-backup`.
    BlockdevBackup(BlockdevBackup),
    /// `blockdev-snapshot-internal-sync`.
    BlockdevSnapshotInternalSync(BlockdevSnapshotInternalSync),
}

/// `blockdev-snapshot-internal-sync`: a disk-only internal snapshot of one qcow2 node,
/// taken while the VM runs (in a [`Transaction`], of several disks at one instant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevSnapshotInternalSync {
    /// The node (7.2 accepts a node name here).
    pub device: String,
    /// Snapshot name (tag).
    pub name: String,
}

impl Command for BlockdevSnapshotInternalSync {
    const NAME: &'static str = "blockdev-snapshot-internal-sync";
    type Ok = Empty;
}

/// `blockdev-snapshot-delete-internal-sync`: deletes an internal snapshot (with any
/// memory state it holds) from a node while the VM runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevSnapshotDeleteInternalSync {
    /// The node.
    pub device: String,
    /// Snapshot name (tag).
    pub name: String,
}

impl Command for BlockdevSnapshotDeleteInternalSync {
    const NAME: &'static str = "blockdev-snapshot-delete-internal-sync";
    type Ok = Value;
}

/// `snapshot-save`: a job saving the VM's memory and device state into `vmstate` and an
/// internal snapshot of every node in `devices`, all named `tag` (QEMU 6.0+). The vCPUs
/// are paused while it runs. Use [`snapshot_save`], which waits for the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotSave {
    /// Job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// Snapshot name.
    pub tag: String,
    /// The node that stores the memory state.
    pub vmstate: String,
    /// The nodes to snapshot.
    pub devices: Vec<String>,
}

impl Command for SnapshotSave {
    const NAME: &'static str = "snapshot-save";
    type Ok = Empty;
}

/// Runs [`SnapshotSave`] to its end: waits for the job to conclude, reads its error, and
/// dismisses it. The VM runs again afterwards if it ran before.
pub async fn snapshot_save(
    qmp: &Qmp,
    tag: &str,
    vmstate: &str,
    devices: Vec<String>,
    timeout: Duration,
) -> Result<(), QmpError> {
    let job_id = format!("snapshot-save-{tag}");
    let mut events = qmp.events();
    qmp.execute(&SnapshotSave {
        job_id: job_id.clone(),
        tag: tag.into(),
        vmstate: vmstate.into(),
        devices,
    })
    .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Events can be missed (lagged receiver): poll the job's status as well.
        let jobs = qmp.execute_raw("query-jobs", None).await?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == job_id.as_str()))
            .cloned();
        match job {
            Some(j) if j["status"] == "concluded" => {
                let _ = qmp
                    .execute_raw("job-dismiss", Some(serde_json::json!({ "id": job_id })))
                    .await;
                return match j.get("error").and_then(Value::as_str) {
                    Some(e) => Err(QmpError::Command {
                        class: "GenericError".into(),
                        desc: format!("snapshot-save failed: {e}"),
                    }),
                    None => Ok(()),
                };
            }
            None => {
                return Err(QmpError::Command {
                    class: "GenericError".into(),
                    desc: format!("job {job_id} disappeared"),
                })
            }
            Some(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(QmpError::Command {
                class: "GenericError".into(),
                desc: format!("snapshot-save did not finish within {timeout:?}"),
            });
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
    }
}

/// `transaction`: runs all actions atomically: either every action takes
/// effect at the same instant, or none does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transaction {
    /// The actions, applied in order.
    pub actions: Vec<TransactionAction>,
}

impl Command for Transaction {
    const NAME: &'static str = "transaction";
    type Ok = Empty;
}

/// Address of QEMU's NBD server (QAPI `SocketAddressLegacy`, which
/// `nbd-server-start` still takes in 7.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum NbdServerAddr {
    /// A unix socket QEMU creates.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
}

/// `nbd-server-start`: QEMU's built-in NBD server. One per QEMU process; a
/// second start fails with "NBD server already running".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NbdServerStart {
    /// Where to listen.
    pub addr: NbdServerAddr,
}

impl Command for NbdServerStart {
    const NAME: &'static str = "nbd-server-start";
    type Ok = Empty;
}

/// `nbd-server-stop`: stops the NBD server and removes its exports.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NbdServerStop;

impl Command for NbdServerStop {
    const NAME: &'static str = "nbd-server-stop";
    type Ok = Empty;
}

/// Export type of [`BlockExportAdd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockExportType {
    /// Through the server of `nbd-server-start`.
    Nbd,
}

/// `block-export-add`: exports a node over the running NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockExportAdd {
    /// Export type.
    #[serde(rename = "type")]
    pub kind: BlockExportType,
    /// Export id, for `block-export-del` and events.
    pub id: String,
    /// The exported node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// NBD export name clients ask for; defaults to the node name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether clients may write.
    pub writable: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` meta contexts.
    /// They may live on the node or a node of its backing chain, and must be
    /// disabled for a read-only export.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<String>,
}

impl BlockExportAdd {
    /// A read-only NBD export.
    pub fn nbd_read_only(id: &str, node_name: &str, name: &str, bitmaps: Vec<String>) -> Self {
        BlockExportAdd {
            kind: BlockExportType::Nbd,
            id: id.into(),
            node_name: node_name.into(),
            name: Some(name.into()),
            writable: false,
            bitmaps,
        }
    }
}

impl Command for BlockExportAdd {
    const NAME: &'static str = "block-export-add";
    type Ok = Empty;
}

/// How [`BlockExportDel`] treats connected clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockExportRemoveMode {
    /// Fail with "still in use" while clients are connected.
    Safe,
    /// Disconnect clients.
    Hard,
}

/// `block-export-del`: starts removing an export; `BLOCK_EXPORT_DELETED`
/// follows once it is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockExportDel {
    /// Export id.
    pub id: String,
    /// Client handling; QEMU's default is safe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<BlockExportRemoveMode>,
}

impl Command for BlockExportDel {
    const NAME: &'static str = "block-export-del";
    type Ok = Empty;
}

/// `query-block-exports`: the exports, including those shutting down.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBlockExports;

impl Command for QueryBlockExports {
    const NAME: &'static str = "query-block-exports";
    type Ok = Vec<BlockExportInfo>;
}

/// One export from [`QueryBlockExports`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockExportInfo {
    /// Export id.
    pub id: String,
    /// Exported node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Whether `block-export-del` was called and it waits for clients.
    #[serde(default, rename = "shutting-down")]
    pub shutting_down: bool,
}

/// `block-job-cancel`: stops a block job; `BLOCK_JOB_CANCELLED` follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobCancel {
    /// Job id (QMP calls it `device` for historical reasons).
    pub device: String,
    /// Cancel even a paused job, and skip a mirror's graceful completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

impl Command for BlockJobCancel {
    const NAME: &'static str = "block-job-cancel";
    type Ok = Empty;
}

/// `query-block-jobs`: the running block jobs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBlockJobs;

impl Command for QueryBlockJobs {
    const NAME: &'static str = "query-block-jobs";
    type Ok = Vec<BlockJobInfo>;
}

/// One job from [`QueryBlockJobs`] (a subset of `BlockJobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobInfo {
    /// Job id.
    pub device: String,
    /// Job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Progress: for a `sync=none` backup, the bytes copied before write.
    #[serde(default)]
    pub offset: u64,
    /// Total work.
    #[serde(default)]
    pub len: u64,
    /// Job state, e.g. `running`, `paused`, `concluded`.
    #[serde(default)]
    pub status: String,
}

// ---------------------------------------------------------------------------
// Live migration (used by `crate::migration`).
//
// Checked against the schema QEMU 7.2.22 reports (`query-qmp-schema`):
// `migrate {uri, *blk, *inc, *detach, *resume}`, `migrate-incoming {uri}`,
// `migrate-set-capabilities {capabilities: [{capability, state}]}`,
// `migrate-set-parameters {*downtime-limit, *max-bandwidth, ...}`,
// `query-migrate -> MigrationInfo`, `migrate_cancel`, and the events
// `MIGRATION {status}` / `MIGRATION_PASS {pass}`.
// ---------------------------------------------------------------------------

/// A migration capability (QAPI `MigrationCapability`), the subset ferryd
/// uses. Capabilities can only be changed while no migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    /// Emit a `MIGRATION` event on every status change and `MIGRATION_PASS`
    /// on every RAM pass.
    Events,
    /// Carry the block dirty bitmaps (name, granularity, persistence,
    /// enabled state and bits) in the migration stream. Must be enabled on
    /// the source and the target alike.
    DirtyBitmaps,
    /// Open a channel from the target back to the source even for
    /// pre-copy. The source then completes only once the target confirmed
    /// that it loaded the device state; without it the source reports
    /// `completed` as soon as everything is sent, even into a peer that
    /// discards it.
    ReturnPath,
    /// Stop in status `pre-switchover` before the final device state is
    /// sent, until `migrate-continue`.
    PauseBeforeSwitchover,
    /// Throttle the vCPUs when RAM is dirtied faster than it is sent.
    AutoConverge,
}

/// One entry of [`MigrateSetCapabilities`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// Whether it is on.
    pub state: bool,
}

/// `migrate-set-capabilities`: turns migration capabilities on or off, on
/// the source before `migrate` and on the target before `migrate-incoming`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateSetCapabilities {
    /// The capabilities to change; the others keep their state.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

impl MigrateSetCapabilities {
    /// Turns on every capability in `caps`.
    pub fn enable(caps: &[MigrationCapability]) -> Self {
        MigrateSetCapabilities {
            capabilities: caps
                .iter()
                .map(|&capability| MigrationCapabilityStatus {
                    capability,
                    state: true,
                })
                .collect(),
        }
    }
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Ok = Empty;
}

/// `migrate-set-parameters`: tunes the next (or the running) migration.
/// Unset fields keep their value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MigrateSetParameters {
    /// Longest pause of the guest QEMU aims for at switchover, in
    /// milliseconds (QEMU's default: 300). QEMU keeps iterating over the RAM
    /// until the rest fits into this time at the measured bandwidth.
    #[serde(rename = "downtime-limit", skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth cap in bytes per second (QEMU's default: 32 MiB/s).
    #[serde(rename = "max-bandwidth", skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Ok = Empty;
}

/// `migrate`: starts an outgoing migration of RAM and device state to
/// `uri`, e.g. `tcp:10.0.0.2:4444`. Returns at once; progress is read with
/// [`QueryMigrate`] or the `MIGRATION` events. The disks are not copied
/// (the deprecated `blk`/`inc` block migration is never requested): both
/// sides must open the same images on shared storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Migrate {
    /// Where the target listens.
    pub uri: String,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Ok = Empty;
}

/// `migrate-incoming`: makes a QEMU started with `-incoming defer` listen
/// for the migration on `uri`, e.g. `tcp:0.0.0.0:4444` (port 0: any free
/// port, reported by [`QueryMigrate`] in `socket-address`). Only once per
/// process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateIncoming {
    /// Where to listen.
    pub uri: String,
}

impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Ok = Empty;
}

/// `migrate_cancel`: aborts the outgoing migration; the source keeps
/// running (status `cancelling`, then `cancelled`). A no-op when none runs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MigrateCancel;

impl Command for MigrateCancel {
    const NAME: &'static str = "migrate_cancel";
    type Ok = Empty;
}

/// `query-migrate`: the state of the outgoing migration, or on a target
/// that of the incoming one.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrate;

impl Command for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Ok = MigrationInfo;
}

/// QAPI `MigrationStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has run yet.
    None,
    /// Connecting and setting up.
    Setup,
    /// `migrate_cancel` was called; the migration is being torn down.
    Cancelling,
    /// Cancelled; the source runs on.
    Cancelled,
    /// Sending RAM while the guest runs.
    Active,
    /// Post-copy phase (never used by ferryd).
    PostcopyActive,
    /// Post-copy paused on a network failure.
    PostcopyPaused,
    /// Post-copy recovering.
    PostcopyRecover,
    /// Done: the target owns the VM.
    Completed,
    /// Failed; `error-desc` says why and the source runs on.
    Failed,
    /// COLO fault tolerance.
    Colo,
    /// Waiting for `migrate-continue` (capability `pause-before-switchover`).
    PreSwitchover,
    /// Sending the final device state with the guest paused.
    Device,
    /// Waiting for the guest to unplug failover devices.
    WaitUnplug,
    /// A status this crate does not know (newer QEMU).
    #[serde(other)]
    Unknown,
}

impl MigrationStatus {
    /// QEMU's name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
            MigrationStatus::Unknown => "unknown",
        }
    }

    /// Whether the migration is over: `completed`, `failed` or `cancelled`.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reply of [`QueryMigrate`] (a subset of QAPI `MigrationInfo`). Every
/// field is optional: QEMU fills in what applies to the current status.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MigrationInfo {
    /// Status; `None` before any migration.
    #[serde(default)]
    pub status: Option<MigrationStatus>,
    /// RAM statistics (source side, from `active` on).
    #[serde(default)]
    pub ram: Option<MigrationRamStats>,
    /// Milliseconds since the migration started (final once completed).
    #[serde(default, rename = "total-time")]
    pub total_time_ms: Option<u64>,
    /// QEMU's estimate of the downtime while `active`, in milliseconds.
    #[serde(default, rename = "expected-downtime")]
    pub expected_downtime_ms: Option<u64>,
    /// How long the guest was paused at switchover, in milliseconds (only
    /// once completed).
    #[serde(default, rename = "downtime")]
    pub downtime_ms: Option<u64>,
    /// Milliseconds spent in `setup`.
    #[serde(default, rename = "setup-time")]
    pub setup_time_ms: Option<u64>,
    /// Why the migration failed.
    #[serde(default, rename = "error-desc")]
    pub error_desc: Option<String>,
    /// Where an incoming migration listens (target side, after
    /// `migrate-incoming`), with the actual port when 0 was asked for.
    #[serde(default, rename = "socket-address")]
    pub socket_address: Vec<MigrationSocketAddress>,
}

/// RAM statistics of [`MigrationInfo`] (a subset of QAPI `MigrationStats`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MigrationRamStats {
    /// Bytes sent so far.
    #[serde(default)]
    pub transferred: u64,
    /// Bytes still to send in this pass.
    #[serde(default)]
    pub remaining: u64,
    /// Guest RAM in bytes.
    #[serde(default)]
    pub total: u64,
    /// Passes over the dirty log so far.
    #[serde(default, rename = "dirty-sync-count")]
    pub dirty_sync_count: u64,
    /// Pages dirtied per second in the last pass.
    #[serde(default, rename = "dirty-pages-rate")]
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second.
    #[serde(default)]
    pub mbps: f64,
}

/// One listening address of an incoming migration (QAPI `SocketAddress`;
/// only the `inet` fields are decoded).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MigrationSocketAddress {
    /// `inet`, `unix`, `vsock` or `fd`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Host (inet).
    #[serde(default)]
    pub host: Option<String>,
    /// Port as a string (inet).
    #[serde(default)]
    pub port: Option<String>,
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    use super::*;

    /// A scripted fake QEMU monitor: sends the greeting and acknowledges
    /// capabilities, then hands the stream to the test.
    async fn fake_qemu(listener: &UnixListener) -> (BufReader<OwnedReadHalf>, OwnedWriteHalf) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        write
            .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian\"}, \"capabilities\": [\"oob\"]}}\n")
            .await
            .unwrap();
        let req = next_request(&mut read).await;
        assert_eq!(req["execute"], "qmp_capabilities");
        assert!(req.get("arguments").is_none());
        reply(
            &mut write,
            &format!("{{\"return\": {{}}, \"id\": {}}}", req["id"]),
        )
        .await;
        (read, write)
    }

    async fn next_request(read: &mut BufReader<OwnedReadHalf>) -> Value {
        let mut line = String::new();
        read.read_line(&mut line).await.unwrap();
        serde_json::from_str(&line).unwrap()
    }

    async fn reply(write: &mut OwnedWriteHalf, line: &str) {
        write.write_all(line.as_bytes()).await.unwrap();
        write.write_all(b"\n").await.unwrap();
    }

    fn socket() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::Builder::new()
            .prefix("fq")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    #[tokio::test]
    async fn routes_out_of_order_replies_and_events() {
        let (_dir, path, listener) = socket();
        let server = tokio::spawn(async move {
            let (mut read, mut write) = fake_qemu(&listener).await;
            let a = next_request(&mut read).await;
            let b = next_request(&mut read).await;
            let (status, nodes) = if a["execute"] == "query-status" {
                (a, b)
            } else {
                (b, a)
            };
            assert_eq!(nodes["arguments"], serde_json::json!({"flat": true}));
            reply(
                &mut write,
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
            )
            .await;
            // Answer the second request first.
            let nodes_reply = serde_json::json!({
                "return": [{
                    "node-name": "drive0", "drv": "qcow2", "file": "/d.qcow2", "ro": false,
                    "dirty-bitmaps": [
                        {"name": "cbt-1", "recording": true, "persistent": true, "busy": false,
                         "granularity": 65536, "count": 0},
                        // The backup job's copy bitmap has no name.
                        {"recording": false, "busy": true, "granularity": 65536,
                         "count": 67108864, "persistent": false},
                    ],
                }],
                "id": nodes["id"],
            });
            reply(&mut write, &nodes_reply.to_string()).await;
            reply(
                &mut write,
                &format!(r#"{{"return": {{"status": "paused", "singlestep": false, "running": false}}, "id": {}}}"#, status["id"]),
            )
            .await;
            let err = next_request(&mut read).await;
            reply(
                &mut write,
                &format!(r#"{{"id": {}, "error": {{"class": "CommandNotFound", "desc": "The command nope has not been found"}}}}"#, err["id"]),
            )
            .await;
            // Hold the connection until the client is done.
            let mut rest = Vec::new();
            let _ = read.read_to_end(&mut rest).await;
        });

        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.version().major, 7);
        assert_eq!(qmp.version().package, "Debian");
        let mut events = qmp.events();
        let (status, nodes) = tokio::join!(
            qmp.execute(&QueryStatus),
            qmp.execute(&QueryNamedBlockNodes { flat: Some(true) })
        );
        let status = status.unwrap();
        assert!(!status.running);
        assert_eq!(status.status, "paused");
        let nodes = nodes.unwrap();
        assert_eq!(nodes[0].node_name, "drive0");
        assert_eq!(nodes[0].dirty_bitmaps.len(), 2);
        assert_eq!(nodes[0].dirty_bitmaps[0].name.as_deref(), Some("cbt-1"));
        assert!(!nodes[0].dirty_bitmaps[0].inconsistent);
        assert_eq!(nodes[0].dirty_bitmaps[1].name, None);

        let event = events.recv().await.unwrap();
        assert_eq!(event.event, "STOP");
        assert_eq!(event.data, Value::Null);
        assert_eq!(
            event.timestamp,
            Some(Timestamp {
                seconds: 1,
                microseconds: 2
            })
        );

        let err = qmp.execute_raw("nope", None).await.unwrap_err();
        match &err {
            QmpError::Command { class, .. } => assert_eq!(class, "CommandNotFound"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(err.to_string(), "The command nope has not been found");
        drop(qmp);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn eof_fails_pending_calls_and_resolves_closed() {
        let (_dir, path, listener) = socket();
        let server = tokio::spawn(async move {
            let (mut read, write) = fake_qemu(&listener).await;
            let req = next_request(&mut read).await;
            assert_eq!(req["execute"], "quit");
            // Exit without replying, like QEMU racing its reply.
            drop((read, write));
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert!(!qmp.is_closed());
        assert!(matches!(qmp.execute(&Quit).await, Err(QmpError::Closed)));
        tokio::time::timeout(Duration::from_secs(5), qmp.closed())
            .await
            .unwrap();
        assert!(qmp.is_closed());
        assert!(matches!(
            qmp.execute(&QueryStatus).await,
            Err(QmpError::Closed)
        ));
        // quit() treats the closed connection as success.
        qmp.quit().await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn call_times_out_and_late_reply_is_dropped() {
        let (_dir, path, listener) = socket();
        let server = tokio::spawn(async move {
            let (mut read, mut write) = fake_qemu(&listener).await;
            let slow = next_request(&mut read).await;
            let fast = next_request(&mut read).await;
            // The late reply to the timed-out call must not confuse routing.
            reply(
                &mut write,
                &format!(r#"{{"return": {{}}, "id": {}}}"#, slow["id"]),
            )
            .await;
            reply(
                &mut write,
                &format!(
                    r#"{{"return": {{"running": true, "status": "running"}}, "id": {}}}"#,
                    fast["id"]
                ),
            )
            .await;
            let mut rest = Vec::new();
            let _ = read.read_to_end(&mut rest).await;
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let err = qmp
            .clone()
            .with_timeout(Duration::from_millis(100))
            .execute(&Stop)
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(qmp.execute(&QueryStatus).await.unwrap().running);
        drop(qmp);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn connect_retries_until_socket_appears() {
        let dir = tempfile::Builder::new()
            .prefix("fq")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("qmp.sock");
        let server_path = path.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let listener = UnixListener::bind(&server_path).unwrap();
            let (mut read, _write) = fake_qemu(&listener).await;
            let mut rest = Vec::new();
            let _ = read.read_to_end(&mut rest).await;
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        drop(qmp);
        server.await.unwrap();

        let missing = dir.path().join("missing.sock");
        let err = Qmp::connect(&missing, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    }

    #[test]
    fn empty_decodes_from_object() {
        let e: Empty = serde_json::from_str("{}").unwrap();
        assert_eq!(e, Empty {});
        assert_eq!(serde_json::to_value(Stop).unwrap(), Value::Null);
        assert_eq!(
            serde_json::to_value(QueryNamedBlockNodes::default()).unwrap(),
            serde_json::json!({})
        );
    }

    #[test]
    fn migration_arguments() {
        let caps = MigrateSetCapabilities::enable(&[
            MigrationCapability::Events,
            MigrationCapability::DirtyBitmaps,
            MigrationCapability::ReturnPath,
        ]);
        assert_eq!(
            serde_json::to_value(caps).unwrap(),
            serde_json::json!({"capabilities": [
                {"capability": "events", "state": true},
                {"capability": "dirty-bitmaps", "state": true},
                {"capability": "return-path", "state": true},
            ]})
        );
        let params = MigrateSetParameters {
            downtime_limit_ms: Some(300),
            max_bandwidth: None,
        };
        assert_eq!(
            serde_json::to_value(params).unwrap(),
            serde_json::json!({"downtime-limit": 300})
        );
        let migrate = Migrate {
            uri: "tcp:127.0.0.1:4444".into(),
        };
        assert_eq!(
            serde_json::to_value(migrate).unwrap(),
            serde_json::json!({"uri": "tcp:127.0.0.1:4444"})
        );
        assert_eq!(serde_json::to_value(MigrateCancel).unwrap(), Value::Null);
    }

    #[test]
    fn migration_info_decodes_qemu_7_2_replies() {
        // Verbatim from QEMU 7.2.22: a completed source, a waiting target.
        let done: MigrationInfo = serde_json::from_str(
            r#"{"status": "completed", "setup-time": 1, "downtime": 4, "total-time": 12,
                "ram": {"total": 67641344, "postcopy-requests": 0, "dirty-sync-count": 2,
                "multifd-bytes": 0, "pages-per-second": 0, "downtime-bytes": 16423,
                "page-size": 4096, "remaining": 0, "postcopy-bytes": 0,
                "mbps": 577.3192727272727, "transferred": 636066,
                "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 619643, "duplicate": 16399,
                "dirty-pages-rate": 0, "skipped": 0, "normal-bytes": 487424, "normal": 119}}"#,
        )
        .unwrap();
        assert_eq!(done.status, Some(MigrationStatus::Completed));
        assert!(done.status.unwrap().is_finished());
        assert_eq!(
            (done.downtime_ms, done.total_time_ms, done.setup_time_ms),
            (Some(4), Some(12), Some(1))
        );
        let ram = done.ram.unwrap();
        assert_eq!(
            (ram.transferred, ram.total, ram.dirty_sync_count),
            (636066, 67641344, 2)
        );

        let waiting: MigrationInfo = serde_json::from_str(
            r#"{"socket-address": [{"port": "37305", "ipv4": true, "host": "127.0.0.1", "type": "inet"}]}"#,
        )
        .unwrap();
        assert_eq!(waiting.status, None);
        assert_eq!(waiting.socket_address[0].port.as_deref(), Some("37305"));

        let newer: MigrationInfo =
            serde_json::from_str(r#"{"status": "some-future-state"}"#).unwrap();
        assert_eq!(newer.status, Some(MigrationStatus::Unknown));
        assert_eq!(MigrationStatus::PreSwitchover.to_string(), "pre-switchover");
    }

    #[test]
    fn screendump_arguments() {
        let png = Screendump {
            filename: "/run/ferry/1.shot".into(),
            format: Some(ImageFormat::Png),
        };
        assert_eq!(
            serde_json::to_value(png).unwrap(),
            serde_json::json!({"filename": "/run/ferry/1.shot", "format": "png"})
        );
        let ppm = Screendump {
            filename: "/x".into(),
            format: None,
        };
        assert_eq!(
            serde_json::to_value(ppm).unwrap(),
            serde_json::json!({"filename": "/x"})
        );
    }
}
