//! Replication relationships, recovery points and the history of cycles.

use ferry_domain::replication::ReplicationSettings;
use ferry_domain::{ReplicationState, Role};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError};

/// One relationship, as stored on either side (keyed by the local VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationRow {
    /// The local VM's id.
    pub vm_id: i64,
    /// Which side this host is.
    pub role: Role,
    /// The other host's name.
    pub partner_name: String,
    /// Primary: the replica server's `host:port`. Replica: the primary's last address.
    pub partner_addr: String,
    /// The other host's certificate fingerprint (pinned).
    pub partner_fingerprint: String,
    /// Settings chosen at enable.
    pub settings: ReplicationSettings,
    /// Where it stands.
    pub state: ReplicationState,
    /// Primary: the number of the current dirty-bitmap generation (0 = none yet).
    pub generation: i64,
    /// The last cycle committed on the replica (0 = none).
    pub last_cycle: i64,
    /// When the newest recovery point was taken (UNIX s).
    pub last_point_at: Option<i64>,
    /// The last failure, shown until a cycle succeeds.
    pub last_error: Option<String>,
    /// When replication was enabled.
    pub created_at: i64,
}

/// One recovery point on the replica: a complete, crash-consistent image of every
/// replicated disk as of `taken_at` on the primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRow {
    /// Id, stable for the point's life.
    pub id: i64,
    /// The local (replica) VM.
    pub vm_id: i64,
    /// The primary's cycle number that produced it.
    pub cycle: i64,
    /// The instant the primary froze the disks (UNIX s).
    pub taken_at: i64,
    /// When the replica committed it (UNIX s).
    pub applied_at: i64,
    /// `initial`, `delta`, `resync`, `final`.
    pub kind: String,
    /// Per replicated disk index, the top qcow2 layer that holds this point.
    pub layers: Vec<(usize, String)>,
    /// Bytes received for it.
    pub bytes: i64,
    /// `crash` or `application` (guest filesystems were frozen).
    pub consistency: String,
}

/// A relationship's totals since its creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterRow {
    /// Successful cycles.
    pub cycles: i64,
    /// Failed cycles.
    pub errors: i64,
    /// Bytes sent (primary) or received (replica) by successful cycles.
    pub network_bytes: i64,
    /// Data bytes (before compression) of successful cycles.
    pub data_bytes: i64,
    /// Bytes of successful resynchronizations.
    pub resynchronized_bytes: i64,
}

/// One finished cycle (either outcome), for statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleRow {
    /// The local VM.
    pub vm_id: i64,
    /// Cycle number.
    pub cycle: i64,
    /// `initial`, `delta`, `resync`, `final`.
    pub kind: String,
    /// UNIX ms.
    pub started_ms: i64,
    /// UNIX ms.
    pub ended_ms: i64,
    /// Bytes marked dirty (or allocated, for a full copy).
    pub dirty_bytes: i64,
    /// Bytes sent on the wire.
    pub sent_bytes: i64,
    /// Success?
    pub ok: bool,
    /// The failure.
    pub error: Option<String>,
}

pub(crate) const MIGRATION: &str = "
    CREATE TABLE replications (
        vm_id INTEGER PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        partner_name TEXT NOT NULL,
        partner_addr TEXT NOT NULL,
        partner_fingerprint TEXT NOT NULL,
        settings TEXT NOT NULL,
        state TEXT NOT NULL,
        generation INTEGER NOT NULL DEFAULT 0,
        last_cycle INTEGER NOT NULL DEFAULT 0,
        last_point_at INTEGER,
        last_error TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE recovery_points (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        cycle INTEGER NOT NULL,
        taken_at INTEGER NOT NULL,
        applied_at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        layers TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        UNIQUE (vm_id, cycle)
    );
    CREATE TABLE cycles (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        cycle INTEGER NOT NULL,
        kind TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        ended_ms INTEGER NOT NULL,
        dirty_bytes INTEGER NOT NULL,
        sent_bytes INTEGER NOT NULL,
        ok INTEGER NOT NULL,
        error TEXT
    );
    CREATE INDEX cycles_by_vm ON cycles (vm_id, id);";

/// Migration 6: each relationship's totals since its creation, for Prometheus counters
/// (never lowered by a statistics reset, kept across restarts). Filled from the cycle
/// history of the relationships that exist.
pub(crate) const MIGRATION_COUNTERS: &str = "
    CREATE TABLE replication_counters (
        vm_id INTEGER PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        cycles INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        network_bytes INTEGER NOT NULL DEFAULT 0,
        data_bytes INTEGER NOT NULL DEFAULT 0,
        resynchronized_bytes INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO replication_counters
        (vm_id, cycles, errors, network_bytes, data_bytes, resynchronized_bytes)
    SELECT r.vm_id,
        coalesce(sum(c.ok), 0),
        coalesce(sum(1 - c.ok), 0),
        coalesce(sum(CASE WHEN c.ok THEN max(c.sent_bytes, 0) ELSE 0 END), 0),
        coalesce(sum(CASE WHEN c.ok THEN max(c.dirty_bytes, 0) ELSE 0 END), 0),
        coalesce(sum(CASE WHEN c.ok AND c.kind = 'resync' THEN max(c.sent_bytes, 0) ELSE 0 END), 0)
    FROM replications r
    LEFT JOIN cycles c ON c.vm_id = r.vm_id AND c.ended_ms >= r.created_at * 1000
    GROUP BY r.vm_id;";

/// Migration 3: whether a recovery point is crash- or application-consistent.
pub(crate) const MIGRATION_CONSISTENCY: &str =
    "ALTER TABLE recovery_points ADD COLUMN consistency TEXT NOT NULL DEFAULT 'crash';";

const COLS: &str = "vm_id, role, partner_name, partner_addr, partner_fingerprint, settings, state, generation, last_cycle, last_point_at, last_error, created_at";

fn corrupt(what: &str, why: impl ToString) -> StoreError {
    StoreError::Corrupt {
        name: what.to_owned(),
        why: why.to_string(),
    }
}

fn read_rel(r: &rusqlite::Row<'_>) -> rusqlite::Result<[Option<String>; 12]> {
    let mut out: [Option<String>; 12] = Default::default();
    for (i, slot) in out.iter_mut().enumerate() {
        let v: rusqlite::types::Value = r.get(i)?;
        *slot = match v {
            rusqlite::types::Value::Null => None,
            rusqlite::types::Value::Integer(n) => Some(n.to_string()),
            rusqlite::types::Value::Text(s) => Some(s),
            _ => None,
        };
    }
    Ok(out)
}

fn decode_rel(c: [Option<String>; 12]) -> Result<ReplicationRow, StoreError> {
    let get = |i: usize| c[i].clone().unwrap_or_default();
    let int = |i: usize| get(i).parse::<i64>().map_err(|e| corrupt("replication", e));
    let role = match get(1).as_str() {
        "primary" => Role::Primary,
        "replica" => Role::Replica,
        other => return Err(corrupt("replication", format!("unknown role {other:?}"))),
    };
    Ok(ReplicationRow {
        vm_id: int(0)?,
        role,
        partner_name: get(2),
        partner_addr: get(3),
        partner_fingerprint: get(4),
        settings: serde_json::from_str(&get(5)).map_err(|e| corrupt("replication settings", e))?,
        state: get(6)
            .parse()
            .map_err(|e: String| corrupt("replication", e))?,
        generation: int(7)?,
        last_cycle: int(8)?,
        last_point_at: c[9]
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| corrupt("replication", e))?,
        last_error: c[10].clone(),
        created_at: int(11)?,
    })
}

/// Inserts relationship `r` for VM `vm_id`.
fn insert_relationship(
    tx: &rusqlite::Transaction<'_>,
    r: &ReplicationRow,
    vm_id: i64,
) -> rusqlite::Result<usize> {
    tx.execute(
        &format!(
            "INSERT INTO replications ({COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"
        ),
        params![
            vm_id,
            r.role.as_str(),
            r.partner_name,
            r.partner_addr,
            r.partner_fingerprint,
            serde_json::to_string(&r.settings).expect("settings serialize"),
            r.state.as_str(),
            r.generation,
            r.last_cycle,
            r.last_point_at,
            r.last_error,
            r.created_at
        ],
    )
}

/// Inserts recovery point `p` of VM `vm_id` (a new id).
fn insert_point(
    tx: &rusqlite::Transaction<'_>,
    p: &PointRow,
    vm_id: i64,
) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO recovery_points (vm_id, cycle, taken_at, applied_at, kind, layers, bytes, consistency) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
        params![
            vm_id,
            p.cycle,
            p.taken_at,
            p.applied_at,
            p.kind,
            serde_json::to_string(&p.layers).expect("layers serialize"),
            p.bytes,
            p.consistency
        ],
    )
}

impl Store {
    /// Records a new relationship; refuses a second one for the same VM.
    pub fn insert_replication(&self, r: &ReplicationRow) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let res = insert_relationship(&tx, r, r.vm_id);
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Duplicate(format!(
                    "replication of VM #{}",
                    r.vm_id
                )))
            }
            Err(e) => Err(e.into()),
            Ok(_) => {
                // A new relationship counts from zero.
                tx.execute(
                    "DELETE FROM replication_counters WHERE vm_id = ?1",
                    [r.vm_id],
                )?;
                tx.commit()?;
                Ok(())
            }
        }
    }

    /// Makes this store hold a replica exactly as another host committed it, in one
    /// transaction (a crash leaves the old rows or the new ones, never a relationship
    /// without its points): the VM (created, or row `existing` given this spec), its
    /// relationship (`rel.vm_id` is ignored) and its recovery points, the old ones dropped.
    /// Returns the VM's id.
    pub fn adopt_replica(
        &self,
        existing: Option<i64>,
        spec: &ferry_domain::VmSpec,
        rel: &ReplicationRow,
        points: &[PointRow],
        now: i64,
    ) -> Result<i64, StoreError> {
        let json = serde_json::to_string(spec).expect("VmSpec serializes");
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let vm_id = match existing {
            Some(id) => {
                tx.execute(
                    "UPDATE vms SET spec = ?2, spec_version = ?3 WHERE id = ?1",
                    params![id, json, crate::SPEC_VERSION],
                )?;
                tx.execute("DELETE FROM recovery_points WHERE vm_id = ?1", [id])?;
                tx.execute("DELETE FROM replications WHERE vm_id = ?1", [id])?;
                id
            }
            None => {
                tx.execute(
                    "INSERT INTO vms (name, spec_version, spec, state, created_at) VALUES (?1, ?2, ?3, 'off', ?4)",
                    params![spec.name.as_str(), crate::SPEC_VERSION, json, now],
                )
                .map_err(|e| match e {
                    rusqlite::Error::SqliteFailure(f, _)
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        StoreError::Duplicate(spec.name.to_string())
                    }
                    e => e.into(),
                })?;
                tx.last_insert_rowid()
            }
        };
        insert_relationship(&tx, rel, vm_id)?;
        for p in points {
            insert_point(&tx, p, vm_id)?;
        }
        tx.commit()?;
        Ok(vm_id)
    }

    /// Writes every field of an existing relationship.
    pub fn update_replication(&self, r: &ReplicationRow) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE replications SET partner_name=?2, partner_addr=?3, partner_fingerprint=?4, settings=?5, state=?6, generation=?7, last_cycle=?8, last_point_at=?9, last_error=?10 WHERE vm_id=?1",
            params![
                r.vm_id,
                r.partner_name,
                r.partner_addr,
                r.partner_fingerprint,
                serde_json::to_string(&r.settings).expect("settings serialize"),
                r.state.as_str(),
                r.generation,
                r.last_cycle,
                r.last_point_at,
                r.last_error
            ],
        )?;
        Ok(())
    }

    /// Re-pins every relationship with a partner whose certificate was `old` to `new` (the
    /// partner rotated its certificate); returns how many.
    pub fn replace_partner_fingerprint(&self, old: &str, new: &str) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE replications SET partner_fingerprint=?2 WHERE partner_fingerprint=?1",
            params![old, new],
        )?)
    }

    // Targeted updates: the API and a relationship's task change different columns of the
    // same row concurrently; rewriting the whole row could roll the other's change back.

    /// Sets the state, and the last error (`None` clears it).
    pub fn set_replication_state(
        &self,
        vm_id: i64,
        state: ReplicationState,
        last_error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE replications SET state=?2, last_error=?3 WHERE vm_id=?1",
            params![vm_id, state.as_str(), last_error],
        )?;
        Ok(())
    }

    /// Sets only the state (the last error stays).
    pub fn set_replication_state_only(
        &self,
        vm_id: i64,
        state: ReplicationState,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE replications SET state=?2 WHERE vm_id=?1",
            params![vm_id, state.as_str()],
        )?;
        Ok(())
    }

    /// Sets only the last error.
    pub fn set_replication_error(&self, vm_id: i64, error: Option<&str>) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE replications SET last_error=?2 WHERE vm_id=?1",
            params![vm_id, error],
        )?;
        Ok(())
    }

    /// Sets the change-tracking generation.
    pub fn set_generation(&self, vm_id: i64, generation: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE replications SET generation=?2 WHERE vm_id=?1",
            params![vm_id, generation],
        )?;
        Ok(())
    }

    /// Records a cycle the replica committed: last cycle and point time move forward only,
    /// the generation is at least the cycle's, the error clears, and the state becomes
    /// `replicating` unless suspended, or waiting for a resynchronization that this cycle
    /// (not a `resync` one: it was captured before the request) does not do. Returns the
    /// state before.
    pub fn record_shipped(
        &self,
        vm_id: i64,
        cycle: i64,
        taken_at: i64,
        generation: i64,
        kind: &str,
    ) -> Result<Option<ReplicationState>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let before: Option<String> = tx
            .query_row(
                "SELECT state FROM replications WHERE vm_id=?1",
                [vm_id],
                |r| r.get(0),
            )
            .ok();
        tx.execute(
            "UPDATE replications SET
                last_cycle = max(last_cycle, ?2),
                last_point_at = CASE WHEN ?2 >= last_cycle THEN ?3 ELSE last_point_at END,
                generation = max(generation, ?4),
                last_error = NULL,
                state = CASE
                    WHEN state = 'suspended' THEN state
                    WHEN state IN ('resynchronizing', 'resynchronization_required') AND ?5 <> 'resync' THEN state
                    ELSE 'replicating' END
             WHERE vm_id=?1",
            params![vm_id, cycle, taken_at, generation, kind],
        )?;
        tx.commit()?;
        Ok(before.and_then(|s| s.parse().ok()))
    }

    /// The relationship of a VM, if it has one.
    pub fn replication(&self, vm_id: i64) -> Result<Option<ReplicationRow>, StoreError> {
        let conn = self.conn();
        let raw = conn
            .query_row(
                &format!("SELECT {COLS} FROM replications WHERE vm_id = ?1"),
                [vm_id],
                read_rel,
            )
            .optional()?;
        raw.map(decode_rel).transpose()
    }

    /// Every relationship.
    pub fn list_replications(&self) -> Result<Vec<ReplicationRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLS} FROM replications ORDER BY vm_id"))?;
        let raws = stmt
            .query_map([], read_rel)?
            .collect::<Result<Vec<_>, _>>()?;
        raws.into_iter().map(decode_rel).collect()
    }

    /// Removes a relationship and its recovery points' records (not their files).
    pub fn delete_replication(&self, vm_id: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM recovery_points WHERE vm_id = ?1", [vm_id])?;
        tx.execute("DELETE FROM replications WHERE vm_id = ?1", [vm_id])?;
        tx.execute("DELETE FROM replication_counters WHERE vm_id = ?1", [vm_id])?;
        tx.commit()?;
        Ok(())
    }

    /// Commits a recovery point and the relationship's progress in one transaction: the
    /// point exists exactly when the relationship says its cycle was applied.
    pub fn commit_point(&self, p: &PointRow, rel: &ReplicationRow) -> Result<i64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_point(&tx, p, p.vm_id)?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "UPDATE replications SET state=?2, last_cycle=?3, last_point_at=?4, last_error=NULL WHERE vm_id=?1",
            params![rel.vm_id, rel.state.as_str(), rel.last_cycle, rel.last_point_at],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// A VM's recovery points, oldest first.
    pub fn list_points(&self, vm_id: i64) -> Result<Vec<PointRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, vm_id, cycle, taken_at, applied_at, kind, layers, bytes, consistency FROM recovery_points WHERE vm_id = ?1 ORDER BY cycle",
        )?;
        let rows = stmt
            .query_map([vm_id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, String>(8)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(
                |(id, vm_id, cycle, taken_at, applied_at, kind, layers, bytes, consistency)| {
                    Ok(PointRow {
                        id,
                        vm_id,
                        cycle,
                        taken_at,
                        applied_at,
                        kind,
                        layers: serde_json::from_str(&layers)
                            .map_err(|e| corrupt("recovery point", e))?,
                        bytes,
                        consistency,
                    })
                },
            )
            .collect()
    }

    /// Replaces a point's layer paths (after retention merged layers under it).
    pub fn set_point_layers(&self, id: i64, layers: &[(usize, String)]) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE recovery_points SET layers = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(layers).expect("layers serialize")],
        )?;
        Ok(())
    }

    /// Forgets a recovery point (its files are the caller's).
    pub fn delete_point(&self, id: i64) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM recovery_points WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Appends a finished cycle to the history and adds it to the relationship's counters
    /// (in one transaction: the counters always match the history).
    pub fn record_cycle(&self, c: &CycleRow) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO cycles (vm_id, cycle, kind, started_ms, ended_ms, dirty_bytes, sent_bytes, ok, error) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
            params![c.vm_id, c.cycle, c.kind, c.started_ms, c.ended_ms, c.dirty_bytes, c.sent_bytes, c.ok, c.error],
        )?;
        let (ok, sent, data) = if c.ok {
            (1, c.sent_bytes.max(0), c.dirty_bytes.max(0))
        } else {
            (0, 0, 0)
        };
        let resync = if c.kind == "resync" { sent } else { 0 };
        tx.execute(
            "INSERT INTO replication_counters (vm_id, cycles, errors, network_bytes, data_bytes, resynchronized_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (vm_id) DO UPDATE SET
                cycles = cycles + excluded.cycles,
                errors = errors + excluded.errors,
                network_bytes = network_bytes + excluded.network_bytes,
                data_bytes = data_bytes + excluded.data_bytes,
                resynchronized_bytes = resynchronized_bytes + excluded.resynchronized_bytes",
            params![c.vm_id, ok, 1 - ok, sent, data, resync],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A relationship's counters since it was created (zero before its first cycle).
    pub fn counters(&self, vm_id: i64) -> Result<CounterRow, StoreError> {
        let row = self
            .conn()
            .query_row(
                "SELECT cycles, errors, network_bytes, data_bytes, resynchronized_bytes FROM replication_counters WHERE vm_id = ?1",
                [vm_id],
                |r| {
                    Ok(CounterRow {
                        cycles: r.get(0)?,
                        errors: r.get(1)?,
                        network_bytes: r.get(2)?,
                        data_bytes: r.get(3)?,
                        resynchronized_bytes: r.get(4)?,
                    })
                },
            )
            .optional()?;
        Ok(row.unwrap_or_default())
    }

    /// A VM's cycles that ended at or after `since_ms`, oldest first.
    pub fn cycles_since(&self, vm_id: i64, since_ms: i64) -> Result<Vec<CycleRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT vm_id, cycle, kind, started_ms, ended_ms, dirty_bytes, sent_bytes, ok, error FROM cycles WHERE vm_id = ?1 AND ended_ms >= ?2 ORDER BY id",
        )?;
        let rows = stmt
            .query_map(params![vm_id, since_ms], cycle_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The newest `limit` cycles of a VM, newest first.
    pub fn recent_cycles(&self, vm_id: i64, limit: u32) -> Result<Vec<CycleRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT vm_id, cycle, kind, started_ms, ended_ms, dirty_bytes, sent_bytes, ok, error FROM cycles WHERE vm_id = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![vm_id, limit], cycle_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

/// Decodes a row of `SELECT vm_id, cycle, kind, started_ms, ended_ms, dirty_bytes,
/// sent_bytes, ok, error FROM cycles`.
fn cycle_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CycleRow> {
    Ok(CycleRow {
        vm_id: r.get(0)?,
        cycle: r.get(1)?,
        kind: r.get(2)?,
        started_ms: r.get(3)?,
        ended_ms: r.get(4)?,
        dirty_bytes: r.get(5)?,
        sent_bytes: r.get(6)?,
        ok: r.get(7)?,
        error: r.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use ferry_domain::replication::{InitialMethod, RetentionPolicy};
    use ferry_domain::{Boot, DiskSpec, Interval, VmName, VmSpec};

    use super::*;

    fn rel(vm_id: i64) -> ReplicationRow {
        ReplicationRow {
            vm_id,
            role: Role::Primary,
            partner_name: "b".into(),
            partner_addr: "127.0.0.2:7444".into(),
            partner_fingerprint: "AB".into(),
            settings: ReplicationSettings {
                interval: "30s".parse::<Interval>().unwrap(),
                retention: RetentionPolicy::hourly(4),
                compression: true,
                excluded_disks: vec![],
                initial: InitialMethod::Network,
                bandwidth_limit: None,
                granularity: 4096,
                app_consistent_every: None,
                relationship_id: 7,
            },
            state: ReplicationState::InitialReplicationInProgress,
            generation: 1,
            last_cycle: 0,
            last_point_at: None,
            last_error: None,
            created_at: 10,
        }
    }

    fn cycle(vm_id: i64, n: i64, kind: &str, ok: bool, sent: i64) -> CycleRow {
        CycleRow {
            vm_id,
            cycle: n,
            kind: kind.into(),
            started_ms: 20_000 + n,
            ended_ms: 20_500 + n,
            dirty_bytes: sent * 2,
            sent_bytes: sent,
            ok,
            error: (!ok).then(|| "x".into()),
        }
    }

    #[test]
    fn counters_count_from_creation_survive_reset_and_reopen_and_migrate_from_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let vm_id;
        {
            let store = Store::open(&path).unwrap();
            // The VM's row as such does not matter here (its spec is not read).
            vm_id = {
                let conn = store.conn();
                conn.execute(
                    "INSERT INTO vms (name, spec_version, spec, state, created_at) VALUES ('v', 1, '{}', 'off', 1)",
                    [],
                )
                .unwrap();
                conn.last_insert_rowid()
            };
            // A cycle of an earlier relationship of the same VM does not count.
            store
                .record_cycle(&cycle(vm_id, 1, "delta", true, 999))
                .unwrap();
            store.insert_replication(&rel(vm_id)).unwrap();
            assert_eq!(store.counters(vm_id).unwrap(), CounterRow::default());
            store
                .record_cycle(&cycle(vm_id, 1, "initial", true, 100))
                .unwrap();
            store
                .record_cycle(&cycle(vm_id, 2, "failed", false, 0))
                .unwrap();
            store.reset_stats(vm_id, 30_000).unwrap();
            store
                .record_cycle(&cycle(vm_id, 2, "resync", true, 40))
                .unwrap();
        }
        let want = CounterRow {
            cycles: 2,
            errors: 1,
            network_bytes: 140,
            data_bytes: 280,
            resynchronized_bytes: 40,
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(store.counters(vm_id).unwrap(), want);
        // A store from before the counters (schema 5) fills them from its history: the
        // cycles that ended since the relationship was created (created_at 10 s).
        {
            let conn = store.conn();
            conn.execute_batch("DROP TABLE replication_counters; PRAGMA user_version = 5;")
                .unwrap();
            conn.execute(
                "UPDATE cycles SET ended_ms = 5000 WHERE sent_bytes = 999",
                [],
            )
            .unwrap();
        }
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.counters(vm_id).unwrap(), want);
        // Removed and enabled again: a new relationship counts from zero.
        store.delete_replication(vm_id).unwrap();
        store.insert_replication(&rel(vm_id)).unwrap();
        assert_eq!(store.counters(vm_id).unwrap(), CounterRow::default());
    }

    #[test]
    fn relationship_and_points_commit_together_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let vm_id;
        {
            let store = Store::open(&path).unwrap();
            let spec = VmSpec {
                name: VmName::new("v").unwrap(),
                cpus: 1,
                memory_mib: 64,
                disks: vec![DiskSpec {
                    file: "disk0.qcow2".into(),
                    size_bytes: 1 << 20,
                    ..Default::default()
                }],
                vnc: false,
                boot: Boot::Disk,
                nics: vec![],
                machine: Default::default(),
                firmware: Default::default(),
                secure_boot: false,
                cdrom: None,
                boot_order: vec![],
                rng: false,
                failover_ip: Vec::new(),
                test_failover_ip: Vec::new(),
            };
            vm_id = store.insert_vm(&spec, 1).unwrap().id;
            let mut r = rel(vm_id);
            store.insert_replication(&r).unwrap();
            assert!(matches!(
                store.insert_replication(&r),
                Err(StoreError::Duplicate(_))
            ));
            r.state = ReplicationState::Replicating;
            r.last_cycle = 1;
            r.last_point_at = Some(100);
            let p = PointRow {
                id: 0,
                vm_id,
                cycle: 1,
                taken_at: 100,
                applied_at: 101,
                kind: "initial".into(),
                layers: vec![(0, "/x/p1/disk0.qcow2".into())],
                bytes: 4096,
                consistency: "application".into(),
            };
            store.commit_point(&p, &r).unwrap();
            // The same cycle twice is refused: a point is committed once.
            assert!(store.commit_point(&p, &r).is_err());
        }
        let store = Store::open(&path).unwrap();
        let got = store.replication(vm_id).unwrap().unwrap();
        assert_eq!(got.state, ReplicationState::Replicating);
        assert_eq!((got.last_cycle, got.last_point_at), (1, Some(100)));
        assert_eq!(got.settings, rel(vm_id).settings);
        let points = store.list_points(vm_id).unwrap();
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].layers, vec![(0, "/x/p1/disk0.qcow2".to_owned())]);
        assert_eq!(points[0].consistency, "application");
        store.delete_replication(vm_id).unwrap();
        assert!(store.replication(vm_id).unwrap().is_none());
        assert!(store.list_points(vm_id).unwrap().is_empty());
    }

    #[test]
    fn an_adopted_replica_replaces_the_old_rows_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("f.db")).unwrap();
        let spec = crate::tests::spec("app");
        let point = |cycle: i64| PointRow {
            id: 0,
            vm_id: 0,
            cycle,
            taken_at: 100 + cycle,
            applied_at: 100 + cycle,
            kind: "delta".into(),
            layers: vec![(0, format!("/s/app/disk0.c{cycle}.qcow2"))],
            bytes: 1,
            consistency: "crash".into(),
        };
        let mut r = rel(0);
        r.role = Role::Replica;
        r.last_cycle = 2;
        let id = store
            .adopt_replica(None, &spec, &r, &[point(1), point(2)], 5)
            .unwrap();
        assert_eq!(store.replication(id).unwrap().unwrap().last_cycle, 2);
        assert_eq!(store.list_points(id).unwrap().len(), 2);
        // A second adoption with the same name but no row given is refused, changing nothing.
        assert!(matches!(
            store.adopt_replica(None, &spec, &r, &[point(1)], 5),
            Err(StoreError::Duplicate(_))
        ));
        assert_eq!(store.list_points(id).unwrap().len(), 2);
        // Adopted again over the row: the old points go, the new ones are all there.
        r.last_cycle = 4;
        let again = store
            .adopt_replica(Some(id), &spec, &r, &[point(3), point(4)], 5)
            .unwrap();
        assert_eq!(again, id);
        let cycles: Vec<i64> = store
            .list_points(id)
            .unwrap()
            .iter()
            .map(|p| p.cycle)
            .collect();
        assert_eq!(cycles, vec![3, 4]);
        assert_eq!(store.replication(id).unwrap().unwrap().last_cycle, 4);
    }
}
