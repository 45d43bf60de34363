//! A client for the QEMU guest agent (QGA), over the unix socket of the VM's
//! `org.qemu.guest_agent.0` channel: just what application-consistent recovery points need
//! (sync, filesystem freeze and thaw), and what re-IP at failover and `ferry vm exec` need
//! (run a program, write a file).
//!
//! The channel exists whether or not the guest runs an agent; a guest without one simply
//! never answers, so every call has a timeout, and `guest-sync` with a fresh id first
//! discards any stale reply left in the channel (the protocol's documented handshake).

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Why a guest agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No answer in time (no agent in the guest, or it is busy).
    #[error("the guest agent did not answer {command} within {timeout:?} (is qemu-guest-agent running in the guest?)")]
    Timeout {
        /// The command.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The agent answered with an error.
    #[error("the guest agent refused {command}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// Its description.
        desc: String,
    },
    /// The socket failed.
    #[error("guest agent channel: {0}")]
    Io(#[from] std::io::Error),
}

/// A `guest-sync` id no earlier connection used. A connection that gave up (a guest still
/// booting) leaves its guest-sync in the channel, and the agent answers it later, to
/// whoever is connected then: with the same id, that stale answer would pass for the new
/// connection's, and every reply after it would be one call late.
fn fresh_sync_id() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Within i64 (the protocol's int), distinct per connection and across restarts.
    (nanos.wrapping_add(SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 20))
        & (i64::MAX as u64)
}

/// What a program run in the guest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its exit code (128 + signal when killed by one).
    pub exit_code: i32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// A connected guest agent channel.
pub struct GuestAgent {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    next_id: u64,
}

impl GuestAgent {
    /// Connects to the channel and synchronizes with the agent (`guest-sync`).
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| AgentError::Timeout {
                command: "connect".into(),
                timeout,
            })??;
        let (r, w) = stream.into_split();
        let mut agent = Self {
            reader: BufReader::new(r),
            writer: w,
            next_id: fresh_sync_id(),
        };
        agent.sync(timeout).await?;
        Ok(agent)
    }

    /// `guest-sync`: replies before ours (stale ones) are skipped.
    async fn sync(&mut self, timeout: Duration) -> Result<(), AgentError> {
        let id = self.next_id;
        self.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}))
            .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let reply = self.read_reply("guest-sync", deadline, timeout).await?;
            if reply.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(());
            }
        }
    }

    /// Freezes the guest's filesystems; returns how many were frozen.
    pub async fn freeze(&mut self, timeout: Duration) -> Result<u64, AgentError> {
        let r = self.call("guest-fsfreeze-freeze", timeout).await?;
        Ok(r.as_u64().unwrap_or(0))
    }

    /// Thaws them.
    pub async fn thaw(&mut self, timeout: Duration) -> Result<u64, AgentError> {
        let r = self.call("guest-fsfreeze-thaw", timeout).await?;
        Ok(r.as_u64().unwrap_or(0))
    }

    /// Runs `path` with `args` in the guest (`guest-exec`, output captured) and waits for
    /// it to exit, at most `timeout`.
    pub async fn exec(
        &mut self,
        path: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let started = self
            .call_with(
                "guest-exec",
                json!({"path": path, "arg": args, "capture-output": true}),
                timeout,
            )
            .await?;
        let pid = started.get("pid").and_then(Value::as_i64).unwrap_or(0);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let st = self
                .call_with("guest-exec-status", json!({ "pid": pid }), timeout)
                .await?;
            if st.get("exited").and_then(Value::as_bool) == Some(true) {
                let text = |k: &str| {
                    st.get(k)
                        .and_then(Value::as_str)
                        .and_then(|b| B64.decode(b).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                };
                return Ok(ExecOutput {
                    exit_code: st
                        .get("exitcode")
                        .and_then(Value::as_i64)
                        .or_else(|| st.get("signal").and_then(Value::as_i64).map(|s| 128 + s))
                        .unwrap_or(-1) as i32,
                    stdout: text("out-data"),
                    stderr: text("err-data"),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AgentError::Timeout {
                    command: format!("{path} (still running)"),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes `data` to `path` in the guest (created or truncated), through
    /// guest-file-open/write/close.
    pub async fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let handle = self
            .call_with(
                "guest-file-open",
                json!({"path": path, "mode": "w"}),
                timeout,
            )
            .await?;
        let written = self
            .call_with(
                "guest-file-write",
                json!({"handle": handle, "buf-b64": B64.encode(data)}),
                timeout,
            )
            .await;
        let closed = self
            .call_with("guest-file-close", json!({ "handle": handle }), timeout)
            .await;
        written?;
        closed?;
        Ok(())
    }

    async fn call(&mut self, command: &str, timeout: Duration) -> Result<Value, AgentError> {
        self.call_with(command, Value::Null, timeout).await
    }

    async fn call_with(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let msg = if arguments.is_null() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        self.send(&msg).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let reply = self.read_reply(command, deadline, timeout).await?;
        if let Some(err) = reply.get("error") {
            return Err(AgentError::Refused {
                command: command.into(),
                desc: err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description")
                    .into(),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    async fn send(&mut self, msg: &Value) -> Result<(), AgentError> {
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        Ok(())
    }

    async fn read_reply(
        &mut self,
        command: &str,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout_at(deadline, self.reader.read_line(&mut line))
                .await
                .map_err(|_| AgentError::Timeout {
                    command: command.into(),
                    timeout,
                })??;
            if n == 0 {
                return Err(AgentError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the guest agent channel closed",
                )));
            }
            // Lines that are not JSON objects (noise from a guest) are skipped.
            if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) {
                return Ok(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sync_ids_differ_per_connection() {
        let a = super::fresh_sync_id();
        let b = super::fresh_sync_id();
        assert_ne!(a, b);
        assert!(a <= i64::MAX as u64 && b <= i64::MAX as u64);
    }
}
