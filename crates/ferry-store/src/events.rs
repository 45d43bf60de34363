//! The event log: every replication state and health change, error, resync and failover
//! step, with a stable numeric code per kind (as Hyper-V's event ids) and an ever-growing
//! sequence number, so `ferry events --follow` and monitors can resume where they stopped.

use rusqlite::params;
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError};

/// Migration 4: the event log, and when each relationship's statistics were last reset.
pub(crate) const MIGRATION: &str = "
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        vm TEXT,
        code INTEGER NOT NULL,
        kind TEXT NOT NULL,
        severity TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_by_vm ON events (vm, id);
    ALTER TABLE replications ADD COLUMN stats_reset_ms INTEGER NOT NULL DEFAULT 0;";

/// Decodes a row of `SELECT id, at_ms, vm, code, kind, severity, message`.
fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get(0)?,
        at_ms: r.get(1)?,
        vm: r.get(2)?,
        code: r.get(3)?,
        kind: r.get(4)?,
        severity: r.get(5)?,
        message: r.get(6)?,
    })
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRow {
    /// Sequence number (assigned by the store, increasing).
    pub id: i64,
    /// When (UNIX ms).
    pub at_ms: i64,
    /// The VM it is about, if any.
    pub vm: Option<String>,
    /// Stable code of the kind.
    pub code: u32,
    /// The kind's name.
    pub kind: String,
    /// `info`, `warning` or `error`.
    pub severity: String,
    /// What happened, for people.
    pub message: String,
}

impl Store {
    /// Appends an event; returns its sequence number.
    pub fn insert_event(&self, e: &EventRow) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO events (at_ms, vm, code, kind, severity, message) VALUES (?1,?2,?3,?4,?5,?6)",
            params![e.at_ms, e.vm, e.code, e.kind, e.severity, e.message],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Events after sequence number `after`, oldest first, at most `limit`; of one VM or all.
    pub fn list_events(
        &self,
        vm: Option<&str>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, at_ms, vm, code, kind, severity, message FROM events
             WHERE id > ?1 AND (?2 IS NULL OR vm = ?2) ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![after, vm, limit], event_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The newest event of `kind` for each VM (one indexed query, whatever the log's size).
    pub fn latest_events_by_vm(&self, kind: &str) -> Result<Vec<EventRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, at_ms, vm, code, kind, severity, message FROM events
             WHERE id IN (SELECT max(id) FROM events WHERE kind = ?1 AND vm IS NOT NULL GROUP BY vm)
             ORDER BY id",
        )?;
        let rows = stmt
            .query_map([kind], event_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// When the relationship's statistics were last reset (UNIX ms; 0 = never).
    pub fn stats_reset_ms(&self, vm_id: i64) -> Result<i64, StoreError> {
        let conn = self.conn();
        let v = conn
            .query_row(
                "SELECT stats_reset_ms FROM replications WHERE vm_id = ?1",
                [vm_id],
                |r| r.get(0),
            )
            .unwrap_or(0);
        Ok(v)
    }

    /// Resets the relationship's statistics window to start at `at_ms`.
    pub fn reset_stats(&self, vm_id: i64, at_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE replications SET stats_reset_ms = ?2 WHERE vm_id = ?1",
            params![vm_id, at_ms],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_sequenced_and_filtered_by_vm() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).unwrap();
        let ev = |vm: Option<&str>, code| EventRow {
            id: 0,
            at_ms: 1,
            vm: vm.map(str::to_owned),
            code,
            kind: "k".into(),
            severity: "info".into(),
            message: "m".into(),
        };
        let a = store.insert_event(&ev(Some("a"), 1)).unwrap();
        let b = store.insert_event(&ev(Some("b"), 2)).unwrap();
        store.insert_event(&ev(None, 3)).unwrap();
        assert!(b > a);
        assert_eq!(store.list_events(None, 0, 10).unwrap().len(), 3);
        let only_a = store.list_events(Some("a"), 0, 10).unwrap();
        assert_eq!((only_a.len(), only_a[0].code), (1, 1));
        assert_eq!(store.list_events(None, b, 10).unwrap().len(), 1);
        store.insert_event(&ev(Some("a"), 4)).unwrap();
        let latest = store.latest_events_by_vm("k").unwrap();
        assert_eq!(
            latest.iter().map(|e| e.code).collect::<Vec<_>>(),
            vec![2, 4]
        );
        assert_eq!(store.stats_reset_ms(42).unwrap(), 0);
    }
}
