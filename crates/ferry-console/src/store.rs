//! The console's own embedded store (SQLite, WAL, numbered migrations in `user_version`):
//! users and sessions, the hosts it manages (URL, pinned fingerprint, API token), alert
//! settings (with the SMTP password), the replication history it samples from the hosts,
//! and every alert with its deliveries. It shares nothing with ferryd's store.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("console store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored JSON value could not be read.
    #[error("console store: bad stored value: {0}")]
    Decode(#[from] serde_json::Error),
}

type Result<T> = std::result::Result<T, StoreError>;

/// Each entry migrates from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE users (name TEXT PRIMARY KEY, phc TEXT NOT NULL);
CREATE TABLE sessions (token_hash TEXT PRIMARY KEY, user TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE hosts (
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, url TEXT NOT NULL,
  fingerprint TEXT NOT NULL, token TEXT NOT NULL, added_at INTEGER NOT NULL);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE samples (
  host_id INTEGER NOT NULL, vm TEXT NOT NULL, role TEXT NOT NULL, at INTEGER NOT NULL,
  health TEXT NOT NULL, rpo_s INTEGER, pending_bytes INTEGER NOT NULL,
  avg_latency_ms INTEGER NOT NULL, avg_size INTEGER NOT NULL, network_bytes INTEGER NOT NULL);
CREATE INDEX samples_by_vm ON samples (host_id, vm, at);
CREATE TABLE cycles (
  host_id INTEGER NOT NULL, vm TEXT NOT NULL, cycle INTEGER NOT NULL, taken_at INTEGER NOT NULL,
  applied_at INTEGER NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY (host_id, vm, cycle));
CREATE TABLE alerts (
  id INTEGER PRIMARY KEY, key TEXT NOT NULL, rule TEXT NOT NULL, host TEXT NOT NULL,
  vm TEXT, message TEXT NOT NULL, started_at INTEGER NOT NULL, cleared_at INTEGER);
CREATE INDEX alerts_active ON alerts (cleared_at);
CREATE TABLE deliveries (
  alert_id INTEGER NOT NULL, transition TEXT NOT NULL, channel TEXT NOT NULL,
  at INTEGER NOT NULL, ok INTEGER NOT NULL, error TEXT);
"#];

/// A host the console manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    /// Row id (used in the console's URLs).
    pub id: i64,
    /// The name shown (the host's own name at the time it was added).
    pub name: String,
    /// `https://ADDR:PORT` of its TLS API.
    pub url: String,
    /// The pinned certificate fingerprint.
    pub fingerprint: String,
    /// Its API token (a secret).
    pub token: String,
}

/// One sample of a relationship's figures, taken at a poll.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    /// The VM.
    pub vm: String,
    /// `primary` or `replica`.
    pub role: String,
    /// When (UNIX s).
    pub at: i64,
    /// `normal`, `warning`, `critical`.
    pub health: String,
    /// RPO now (s), if any point exists.
    pub rpo_s: Option<i64>,
    /// Pending replication size.
    pub pending_bytes: i64,
    /// Average latency over the host's window.
    pub avg_latency_ms: i64,
    /// Average cycle size over the host's window.
    pub avg_size: i64,
    /// Network bytes in the host's window (a counter that restarts at a reset).
    pub network_bytes: i64,
}

/// One replication cycle as a recovery point showed it (replica side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleRow {
    /// The primary's cycle number.
    pub cycle: i64,
    /// When the primary froze the disks.
    pub taken_at: i64,
    /// When the replica committed it.
    pub applied_at: i64,
    /// Bytes received.
    pub bytes: i64,
}

/// An alert, active (no `cleared_at`) or past.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlertRow {
    /// Row id.
    pub id: i64,
    /// The condition's identity (rule + host + VM).
    pub key: String,
    /// The rule's name.
    pub rule: String,
    /// The host.
    pub host: String,
    /// The VM, for per-relationship rules.
    pub vm: Option<String>,
    /// What was found.
    pub message: String,
    /// When it started (UNIX s).
    pub started_at: i64,
    /// When it cleared.
    pub cleared_at: Option<i64>,
}

/// One attempt to deliver a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRow {
    /// `start` or `clear`.
    pub transition: String,
    /// `email` or `webhook`.
    pub channel: String,
    /// When.
    pub at: i64,
    /// Whether it was accepted.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
}

/// The console's store.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating and migrating) `dir/console.db`.
    pub fn open(dir: &Path) -> Result<Self> {
        let conn = Connection::open(dir.join("console.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        // Queries are small and indexed; a poisoned lock only means a panic elsewhere.
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(&conn)?)
    }

    // ---- users and sessions ----

    /// Creates or replaces a user's password hash.
    pub fn set_user(&self, name: &str, phc: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO users (name, phc) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET phc = ?2",
                params![name, phc],
            )
            .map(drop)
        })
    }

    /// A user's password hash.
    pub fn user_phc(&self, name: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT phc FROM users WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    /// Number of users.
    pub fn user_count(&self) -> Result<i64> {
        self.with(|c| c.query_row("SELECT count(*) FROM users", [], |r| r.get(0)))
    }

    /// Records a session (by the hash of its token); expired sessions go at the same time.
    pub fn add_session(&self, token_hash: &str, user: &str, expires_at: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM sessions WHERE expires_at <= ?1",
                [crate::now()],
            )?;
            c.execute(
                "INSERT INTO sessions (token_hash, user, expires_at) VALUES (?1, ?2, ?3)",
                params![token_hash, user, expires_at],
            )
            .map(drop)
        })
    }

    /// The user of a live session.
    pub fn session_user(&self, token_hash: &str, now: i64) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT user FROM sessions WHERE token_hash = ?1 AND expires_at > ?2",
                params![token_hash, now],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Ends every session of `user` (its password changed: whoever had it, or a stolen
    /// cookie, is out); returns how many ended.
    pub fn delete_user_sessions(&self, user: &str) -> Result<usize> {
        self.with(|c| c.execute("DELETE FROM sessions WHERE user = ?1", [user]))
    }

    /// Ends a session.
    pub fn delete_session(&self, token_hash: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM sessions WHERE token_hash = ?1", [token_hash])
                .map(drop)
        })
    }

    // ---- hosts ----

    /// Adds a host; `Ok(None)` if the name is taken.
    pub fn add_host(
        &self,
        name: &str,
        url: &str,
        fingerprint: &str,
        token: &str,
        now: i64,
    ) -> Result<Option<i64>> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO hosts (name, url, fingerprint, token, added_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, url, fingerprint, token, now],
            )?;
            Ok((n == 1).then(|| c.last_insert_rowid()))
        })
    }

    /// Removes a host with its history (alerts about it stay, under its name).
    pub fn remove_host(&self, id: i64) -> Result<bool> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let removed = tx.execute("DELETE FROM hosts WHERE id = ?1", [id])? == 1;
            tx.execute("DELETE FROM samples WHERE host_id = ?1", [id])?;
            tx.execute("DELETE FROM cycles WHERE host_id = ?1", [id])?;
            tx.commit()?;
            Ok(removed)
        })
    }

    /// Forgets a relationship's recorded cycles on a host (its numbering started again).
    pub fn forget_cycles(&self, host_id: i64, vm: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM cycles WHERE host_id = ?1 AND vm = ?2",
                params![host_id, vm],
            )?;
            Ok(())
        })
    }

    /// Every host, by name.
    pub fn hosts(&self) -> Result<Vec<HostRow>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT id, name, url, fingerprint, token FROM hosts ORDER BY name")?;
            let rows = st.query_map([], |r| {
                Ok(HostRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    url: r.get(2)?,
                    fingerprint: r.get(3)?,
                    token: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    // ---- settings ----

    /// A JSON setting.
    pub fn setting<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        let text: Option<String> = self.with(|c| {
            c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
        })?;
        Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
    }

    /// Stores a JSON setting.
    pub fn set_setting<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let text = serde_json::to_string(value)?;
        self.with(|c| {
            c.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                params![key, text],
            )
            .map(drop)
        })
    }

    // ---- history ----

    /// Appends samples taken at one poll of a host.
    pub fn add_samples(&self, host_id: i64, samples: &[SampleRow]) -> Result<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            for s in samples {
                tx.execute(
                    "INSERT INTO samples VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        host_id,
                        s.vm,
                        s.role,
                        s.at,
                        s.health,
                        s.rpo_s,
                        s.pending_bytes,
                        s.avg_latency_ms,
                        s.avg_size,
                        s.network_bytes
                    ],
                )?;
            }
            tx.commit()
        })
    }

    /// Deletes history older than `before` (samples and cycles).
    pub fn prune_history(&self, before: i64) -> Result<usize> {
        self.with(|c| {
            let n = c.execute("DELETE FROM samples WHERE at < ?1", [before])?;
            Ok(n + c.execute("DELETE FROM cycles WHERE taken_at < ?1", [before])?)
        })
    }

    /// A relationship's samples since `since`, oldest first.
    pub fn samples(&self, host_id: i64, vm: &str, since: i64) -> Result<Vec<SampleRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT vm, role, at, health, rpo_s, pending_bytes, avg_latency_ms, avg_size, network_bytes
                 FROM samples WHERE host_id = ?1 AND vm = ?2 AND at >= ?3 ORDER BY at",
            )?;
            let rows = st.query_map(params![host_id, vm, since], |r| {
                Ok(SampleRow {
                    vm: r.get(0)?,
                    role: r.get(1)?,
                    at: r.get(2)?,
                    health: r.get(3)?,
                    rpo_s: r.get(4)?,
                    pending_bytes: r.get(5)?,
                    avg_latency_ms: r.get(6)?,
                    avg_size: r.get(7)?,
                    network_bytes: r.get(8)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Records cycles seen as recovery points (already known ones are kept as they are).
    pub fn add_cycles(&self, host_id: i64, vm: &str, cycles: &[CycleRow]) -> Result<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            for p in cycles {
                tx.execute(
                    "INSERT OR IGNORE INTO cycles VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![host_id, vm, p.cycle, p.taken_at, p.applied_at, p.bytes],
                )?;
            }
            tx.commit()
        })
    }

    /// The newest cycle recorded for a relationship.
    pub fn last_cycle(&self, host_id: i64, vm: &str) -> Result<Option<i64>> {
        self.with(|c| {
            c.query_row(
                "SELECT max(cycle) FROM cycles WHERE host_id = ?1 AND vm = ?2",
                params![host_id, vm],
                |r| r.get(0),
            )
        })
    }

    /// A relationship's cycles since `since`, oldest first.
    pub fn cycles(&self, host_id: i64, vm: &str, since: i64) -> Result<Vec<CycleRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT cycle, taken_at, applied_at, bytes FROM cycles
                 WHERE host_id = ?1 AND vm = ?2 AND taken_at >= ?3 ORDER BY cycle",
            )?;
            let rows = st.query_map(params![host_id, vm, since], |r| {
                Ok(CycleRow {
                    cycle: r.get(0)?,
                    taken_at: r.get(1)?,
                    applied_at: r.get(2)?,
                    bytes: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    // ---- alerts ----

    /// Opens an alert; returns its id.
    pub fn open_alert(
        &self,
        key: &str,
        rule: &str,
        host: &str,
        vm: Option<&str>,
        message: &str,
        at: i64,
    ) -> Result<i64> {
        self.with(|c| {
            c.execute(
                "INSERT INTO alerts (key, rule, host, vm, message, started_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![key, rule, host, vm, message, at],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Closes the active alert with `key`; returns its id.
    pub fn clear_alert(&self, key: &str, at: i64) -> Result<Option<i64>> {
        self.with(|c| {
            let id: Option<i64> = c
                .query_row(
                    "SELECT id FROM alerts WHERE key = ?1 AND cleared_at IS NULL",
                    [key],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = id {
                c.execute(
                    "UPDATE alerts SET cleared_at = ?1 WHERE id = ?2",
                    params![at, id],
                )?;
            }
            Ok(id)
        })
    }

    /// Active alerts (newest first) and the latest `past` cleared ones.
    pub fn alerts(&self, past: u32) -> Result<(Vec<AlertRow>, Vec<AlertRow>)> {
        let read = |r: &rusqlite::Row<'_>| {
            Ok(AlertRow {
                id: r.get(0)?,
                key: r.get(1)?,
                rule: r.get(2)?,
                host: r.get(3)?,
                vm: r.get(4)?,
                message: r.get(5)?,
                started_at: r.get(6)?,
                cleared_at: r.get(7)?,
            })
        };
        self.with(|c| {
            let cols = "id, key, rule, host, vm, message, started_at, cleared_at";
            let active = c
                .prepare(&format!(
                    "SELECT {cols} FROM alerts WHERE cleared_at IS NULL ORDER BY id DESC"
                ))?
                .query_map([], read)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let cleared = c
                .prepare(&format!(
                    "SELECT {cols} FROM alerts WHERE cleared_at IS NOT NULL ORDER BY cleared_at DESC, id DESC LIMIT ?1"
                ))?
                .query_map([past], read)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((active, cleared))
        })
    }

    /// Records a delivery attempt.
    pub fn add_delivery(&self, alert_id: i64, d: &DeliveryRow) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO deliveries VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![alert_id, d.transition, d.channel, d.at, d.ok, d.error],
            )
            .map(drop)
        })
    }

    /// An alert's deliveries, oldest first.
    pub fn deliveries(&self, alert_id: i64) -> Result<Vec<DeliveryRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT transition, channel, at, ok, error FROM deliveries WHERE alert_id = ?1 ORDER BY rowid",
            )?;
            let rows = st.query_map([alert_id], |r| {
                Ok(DeliveryRow {
                    transition: r.get(0)?,
                    channel: r.get(1)?,
                    at: r.get(2)?,
                    ok: r.get(3)?,
                    error: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_sessions_end_together_and_only_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let far = crate::now() + 3600;
        s.add_session("a1", "alice", far).unwrap();
        s.add_session("a2", "alice", far).unwrap();
        s.add_session("b1", "bob", far).unwrap();
        assert_eq!(s.delete_user_sessions("alice").unwrap(), 2);
        assert_eq!(s.session_user("a1", crate::now()).unwrap(), None);
        assert_eq!(s.session_user("a2", crate::now()).unwrap(), None);
        assert_eq!(
            s.session_user("b1", crate::now()).unwrap().as_deref(),
            Some("bob")
        );
    }

    #[test]
    fn hosts_alerts_and_history_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let id = s
            .add_host("a", "https://127.0.0.1:1", "AA", "t", 1)
            .unwrap()
            .unwrap();
        assert_eq!(s.add_host("a", "https://x:1", "BB", "t", 1).unwrap(), None);
        assert_eq!(s.hosts().unwrap()[0].id, id);
        let a = s
            .open_alert("k", "health", "a", Some("vm"), "bad", 10)
            .unwrap();
        assert_eq!(s.alerts(10).unwrap().0.len(), 1);
        assert_eq!(s.clear_alert("k", 20).unwrap(), Some(a));
        assert_eq!(s.clear_alert("k", 21).unwrap(), None);
        let (active, past) = s.alerts(10).unwrap();
        assert!(active.is_empty());
        assert_eq!(past[0].cleared_at, Some(20));
        s.add_cycles(
            id,
            "vm",
            &[CycleRow {
                cycle: 3,
                taken_at: 5,
                applied_at: 6,
                bytes: 7,
            }],
        )
        .unwrap();
        assert_eq!(s.last_cycle(id, "vm").unwrap(), Some(3));
        assert_eq!(s.prune_history(6).unwrap(), 1);
        assert!(s.cycles(id, "vm", 0).unwrap().is_empty());
        s.add_cycles(
            id,
            "vm",
            &[CycleRow {
                cycle: 4,
                taken_at: 9,
                applied_at: 9,
                bytes: 1,
            }],
        )
        .unwrap();
        drop(s);
        // Reopening keeps everything and does not migrate again.
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.hosts().unwrap().len(), 1);
        assert_eq!(s.cycles(id, "vm", 0).unwrap().len(), 1);
        // A relationship whose numbering starts again forgets its old cycles.
        s.forget_cycles(id, "vm").unwrap();
        assert_eq!(s.last_cycle(id, "vm").unwrap(), None);
        // A removed host takes its history along, and its id is never given to another
        // host (which would inherit that history).
        s.add_cycles(
            id,
            "vm",
            &[CycleRow {
                cycle: 1,
                taken_at: 9,
                applied_at: 9,
                bytes: 1,
            }],
        )
        .unwrap();
        assert!(s.remove_host(id).unwrap());
        assert!(!s.remove_host(id).unwrap());
        assert_eq!(s.last_cycle(id, "vm").unwrap(), None);
        let again = s
            .add_host("b", "https://127.0.0.1:2", "CC", "t", 2)
            .unwrap()
            .unwrap();
        assert_ne!(again, id);
    }
}
