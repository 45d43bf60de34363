//! SQLite persistence for ferryd: the host's inventory and settings, in one database file
//! in the data dir. WAL mode, one connection behind a mutex (the daemon's write rate is a
//! handful per second), numbered migrations tracked in `user_version`.
//!
//! Domain types are never persisted directly: each table has a `*Row` type, and blob
//! columns carry a version marker so their encoding can change later.

mod checkpoints;
mod events;
mod replication;

pub use checkpoints::CheckpointRow;
pub use events::EventRow;
pub use replication::{CounterRow, CycleRow, PointRow, ReplicationRow};

use std::path::Path;
use std::sync::Mutex;

use ferry_domain::{VmName, VmSpec, VmState};
use rusqlite::{params, Connection, OptionalExtension};

/// Schema migrations, applied in order; `user_version` holds how many have run.
/// Never edit a released migration: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: inventory and host settings.
    "CREATE TABLE vms (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        spec_version INTEGER NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        started_at INTEGER,
        created_at INTEGER NOT NULL,
        last_error TEXT
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 2: replication relationships, recovery points, cycle history.
    replication::MIGRATION,
    replication::MIGRATION_CONSISTENCY,
    events::MIGRATION,
    checkpoints::MIGRATION,
    // 6: relationship counters since creation (Prometheus).
    replication::MIGRATION_COUNTERS,
];

/// The encoding version of `vms.spec` (JSON of [`VmSpec`]).
pub(crate) const SPEC_VERSION: i64 = 1;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or migrating the database failed.
    #[error("cannot open the database {path}")]
    Open {
        /// The database file.
        path: String,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer ferryd.
    #[error("the database has schema version {found}, newer than this ferryd knows ({known}); upgrade ferryd")]
    TooNew {
        /// Version found.
        found: i64,
        /// Latest version known.
        known: i64,
    },
    /// A VM with that name exists already.
    #[error("a VM named {0:?} already exists")]
    Duplicate(String),
    /// No VM with that name.
    #[error("no VM named {0:?}")]
    NotFound(String),
    /// A stored row could not be decoded.
    #[error("stored VM {name:?} is unreadable: {why}")]
    Corrupt {
        /// Which VM.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// Any other SQLite failure.
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
}

/// One row of `vms`: the stored form of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRow {
    /// Short numeric id, used for runtime file names (unix sockets have a 108-byte limit).
    pub id: i64,
    /// The VM's spec.
    pub spec: VmSpec,
    /// Its last known lifecycle state.
    pub state: VmState,
    /// The QEMU process id while it has one.
    pub pid: Option<u32>,
    /// Unix time (s) at which the current QEMU process started.
    pub started_at: Option<i64>,
    /// Unix time (s) of creation.
    pub created_at: i64,
    /// The last failure worth showing (e.g. "QEMU exited while ferryd was down").
    pub last_error: Option<String>,
}

/// The store: the database behind a mutex.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // FULL: a committed inventory change survives power loss, not only a crash.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Inserts a new VM in state `off`; refuses a duplicate name.
    pub fn insert_vm(&self, spec: &VmSpec, now: i64) -> Result<VmRow, StoreError> {
        let json = serde_json::to_string(spec).expect("VmSpec serializes");
        let conn = self.conn();
        let res = conn.execute(
            "INSERT INTO vms (name, spec_version, spec, state, created_at) VALUES (?1, ?2, ?3, 'off', ?4)",
            params![spec.name.as_str(), SPEC_VERSION, json, now],
        );
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::Duplicate(spec.name.to_string()))
            }
            other => other?,
        };
        Ok(VmRow {
            id: conn.last_insert_rowid(),
            spec: spec.clone(),
            state: VmState::Off,
            pid: None,
            started_at: None,
            created_at: now,
            last_error: None,
        })
    }

    /// Every VM, by name.
    pub fn list_vms(&self) -> Result<Vec<VmRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, name, spec_version, spec, state, pid, started_at, created_at, last_error FROM vms ORDER BY name",
        )?;
        let rows = stmt.query_map([], raw_row)?;
        rows.map(|r| decode(r?)).collect()
    }

    /// One VM.
    pub fn get_vm(&self, name: &VmName) -> Result<VmRow, StoreError> {
        let conn = self.conn();
        let raw = conn
            .query_row(
                "SELECT id, name, spec_version, spec, state, pid, started_at, created_at, last_error FROM vms WHERE name = ?1",
                [name.as_str()],
                raw_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        decode(raw)
    }

    /// One VM by its id, if it exists.
    pub fn vm_by_id(&self, id: i64) -> Result<Option<VmRow>, StoreError> {
        let conn = self.conn();
        let raw = conn
            .query_row(
                "SELECT id, name, spec_version, spec, state, pid, started_at, created_at, last_error FROM vms WHERE id = ?1",
                [id],
                raw_row,
            )
            .optional()?;
        raw.map(decode).transpose()
    }

    /// Records a VM's runtime state: lifecycle state, QEMU pid and start time.
    pub fn set_runtime(
        &self,
        name: &VmName,
        state: VmState,
        pid: Option<u32>,
        started_at: Option<i64>,
    ) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET state = ?2, pid = ?3, started_at = ?4 WHERE name = ?1",
            params![name.as_str(), state.as_str(), pid, started_at],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Replaces a VM's spec (same name).
    pub fn set_vm_spec(&self, id: i64, spec: &VmSpec) -> Result<(), StoreError> {
        let json = serde_json::to_string(spec).expect("VmSpec serializes");
        self.conn().execute(
            "UPDATE vms SET spec = ?2, spec_version = ?3 WHERE id = ?1",
            params![id, json, SPEC_VERSION],
        )?;
        Ok(())
    }

    /// Records (or clears) the last error shown for a VM.
    pub fn set_last_error(&self, name: &VmName, error: Option<&str>) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE vms SET last_error = ?2 WHERE name = ?1",
            params![name.as_str(), error],
        )?;
        Ok(())
    }

    /// Removes a VM from the inventory.
    pub fn delete_vm(&self, name: &VmName) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM vms WHERE name = ?1", [name.as_str()])?;
        if n == 0 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// A host setting.
    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Sets a host setting.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    /// Removes a host setting.
    pub fn delete_setting(&self, key: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM settings WHERE key = ?1", [key])?;
        Ok(())
    }
}

type RawRow = (
    i64,
    String,
    i64,
    String,
    String,
    Option<u32>,
    Option<i64>,
    i64,
    Option<String>,
);

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn decode(raw: RawRow) -> Result<VmRow, StoreError> {
    let (id, name, spec_version, spec, state, pid, started_at, created_at, last_error) = raw;
    let corrupt = |why: String| StoreError::Corrupt {
        name: name.clone(),
        why,
    };
    if spec_version != SPEC_VERSION {
        return Err(corrupt(format!("unknown spec version {spec_version}")));
    }
    let spec: VmSpec = serde_json::from_str(&spec).map_err(|e| corrupt(e.to_string()))?;
    let state: VmState = state.parse().map_err(corrupt)?;
    Ok(VmRow {
        id,
        spec,
        state,
        pid,
        started_at,
        created_at,
        last_error,
    })
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use ferry_domain::{Boot, DiskSpec};

    use super::*;

    pub(crate) fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: VmName::new(name).unwrap(),
            cpus: 2,
            memory_mib: 512,
            disks: vec![DiskSpec {
                file: "disk0.qcow2".into(),
                size_bytes: 1 << 30,
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
        }
    }

    #[test]
    fn vm_round_trip_and_runtime_updates_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.db");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
            let row = store.insert_vm(&spec("b"), 100).unwrap();
            store.insert_vm(&spec("a"), 101).unwrap();
            store
                .set_runtime(&row.spec.name, VmState::Running, Some(4242), Some(150))
                .unwrap();
            store.set_setting("k", "v1").unwrap();
            store.set_setting("k", "v2").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let vms = store.list_vms().unwrap();
        assert_eq!(
            vms.iter().map(|v| v.spec.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let b = store.get_vm(&VmName::new("b").unwrap()).unwrap();
        assert_eq!(b.spec, spec("b"));
        assert_eq!(
            (b.state, b.pid, b.started_at, b.created_at),
            (VmState::Running, Some(4242), Some(150), 100)
        );
        assert_eq!(store.setting("k").unwrap().as_deref(), Some("v2"));
    }

    #[test]
    fn duplicate_and_missing_names_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("f.db")).unwrap();
        store.insert_vm(&spec("x"), 1).unwrap();
        assert!(matches!(
            store.insert_vm(&spec("x"), 2),
            Err(StoreError::Duplicate(n)) if n == "x"
        ));
        let y = VmName::new("y").unwrap();
        assert!(matches!(store.get_vm(&y), Err(StoreError::NotFound(_))));
        assert!(matches!(store.delete_vm(&y), Err(StoreError::NotFound(_))));
        store.delete_vm(&VmName::new("x").unwrap()).unwrap();
        assert!(store.list_vms().unwrap().is_empty());
    }

    #[test]
    fn refuses_a_database_from_a_newer_ferryd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn corrupt_rows_are_reported_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let store = Store::open(&path).unwrap();
        store.insert_vm(&spec("x"), 1).unwrap();
        store
            .conn()
            .execute("UPDATE vms SET spec = '{bad'", [])
            .unwrap();
        assert!(matches!(store.list_vms(), Err(StoreError::Corrupt { .. })));
    }

    /// A database left at any earlier schema version (a host that skipped releases)
    /// migrates to the latest one, and what it held before stays readable.
    #[test]
    fn every_older_schema_version_migrates_to_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        for stop in 1..=MIGRATIONS.len() {
            let path = dir.path().join(format!("v{stop}.db"));
            {
                let conn = Connection::open(&path).unwrap();
                for sql in &MIGRATIONS[..stop] {
                    conn.execute_batch(sql).unwrap();
                }
                conn.pragma_update(None, "user_version", stop as i64)
                    .unwrap();
                conn.execute(
                    "INSERT INTO vms (name, spec_version, spec, state, created_at)
                     VALUES ('old', ?1, ?2, 'off', 5)",
                    params![SPEC_VERSION, serde_json::to_string(&spec("old")).unwrap()],
                )
                .unwrap();
            }
            let store = Store::open(&path).unwrap();
            assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
            let vm = store.get_vm(&VmName::new("old").unwrap()).unwrap();
            assert_eq!(
                (vm.spec, vm.created_at),
                (spec("old"), 5),
                "from version {stop}"
            );
        }
    }
}
