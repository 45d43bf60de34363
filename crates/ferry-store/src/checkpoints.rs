//! User checkpoints of a VM (Hyper-V's "snapshots"): a tree per VM, and the VM's current
//! position in it (the checkpoint its running state descends from). The disk and memory
//! data live in the VM's qcow2 images as internal snapshots named by `tag`; a checkpoint
//! exists once its row is committed.

use rusqlite::{params, OptionalExtension};

use crate::{Store, StoreError};

/// Migration 5: checkpoints and each VM's position among them.
pub(crate) const MIGRATION: &str = "
    CREATE TABLE checkpoints (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        tag TEXT NOT NULL,
        parent_id INTEGER,
        kind TEXT NOT NULL,
        consistency TEXT NOT NULL,
        with_memory INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE INDEX checkpoints_by_vm ON checkpoints (vm_id, id);
    CREATE TABLE checkpoint_positions (vm_id INTEGER PRIMARY KEY, checkpoint_id INTEGER);";

/// One checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRow {
    /// Id, unique on this host.
    pub id: i64,
    /// The VM.
    pub vm_id: i64,
    /// Name shown to people (≤ 100 characters).
    pub name: String,
    /// Name of the internal snapshot in every disk of the VM.
    pub tag: String,
    /// The checkpoint this one was taken after (the VM's position then).
    pub parent_id: Option<i64>,
    /// `production` or `standard`.
    pub kind: String,
    /// `application-consistent`, `crash-consistent` or `saved-state`.
    pub consistency: String,
    /// Holds memory and device state (applying it resumes the VM).
    pub with_memory: bool,
    /// Creation time (UNIX ms).
    pub created_ms: i64,
}

const COLUMNS: &str = "id, vm_id, name, tag, parent_id, kind, consistency, with_memory, created_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CheckpointRow> {
    Ok(CheckpointRow {
        id: r.get(0)?,
        vm_id: r.get(1)?,
        name: r.get(2)?,
        tag: r.get(3)?,
        parent_id: r.get(4)?,
        kind: r.get(5)?,
        consistency: r.get(6)?,
        with_memory: r.get(7)?,
        created_ms: r.get(8)?,
    })
}

impl Store {
    /// Records a checkpoint (its `id` is ignored and assigned) and makes it the VM's
    /// current position, in one transaction.
    pub fn insert_checkpoint(&self, cp: &CheckpointRow) -> Result<CheckpointRow, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO checkpoints (vm_id, name, tag, parent_id, kind, consistency, with_memory, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                cp.vm_id,
                cp.name,
                cp.tag,
                cp.parent_id,
                cp.kind,
                cp.consistency,
                cp.with_memory,
                cp.created_ms
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO checkpoint_positions (vm_id, checkpoint_id) VALUES (?1, ?2)
             ON CONFLICT(vm_id) DO UPDATE SET checkpoint_id = excluded.checkpoint_id",
            params![cp.vm_id, id],
        )?;
        tx.commit()?;
        Ok(CheckpointRow { id, ..cp.clone() })
    }

    /// A VM's checkpoints, oldest first.
    pub fn checkpoints(&self, vm_id: i64) -> Result<Vec<CheckpointRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM checkpoints WHERE vm_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([vm_id], row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The checkpoint the VM's current state descends from, if any.
    pub fn checkpoint_position(&self, vm_id: i64) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT checkpoint_id FROM checkpoint_positions WHERE vm_id = ?1",
                [vm_id],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Moves the VM's current position (after applying a checkpoint).
    pub fn set_checkpoint_position(&self, vm_id: i64, id: Option<i64>) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO checkpoint_positions (vm_id, checkpoint_id) VALUES (?1, ?2)
             ON CONFLICT(vm_id) DO UPDATE SET checkpoint_id = excluded.checkpoint_id",
            params![vm_id, id],
        )?;
        Ok(())
    }

    /// Renames a checkpoint.
    pub fn rename_checkpoint(&self, id: i64, name: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE checkpoints SET name = ?2 WHERE id = ?1",
            params![id, name],
        )?;
        Ok(())
    }

    /// Forgets a checkpoint: its children (and the VM's position, if it was there) move to
    /// its parent, so the tree stays connected. One transaction.
    pub fn delete_checkpoint(&self, vm_id: i64, id: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let parent: Option<i64> = tx
            .query_row(
                "SELECT parent_id FROM checkpoints WHERE id = ?1 AND vm_id = ?2",
                params![id, vm_id],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        tx.execute(
            "UPDATE checkpoints SET parent_id = ?2 WHERE parent_id = ?1",
            params![id, parent],
        )?;
        tx.execute(
            "UPDATE checkpoint_positions SET checkpoint_id = ?2 WHERE checkpoint_id = ?1",
            params![id, parent],
        )?;
        tx.execute("DELETE FROM checkpoints WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets every checkpoint of a VM (the VM is deleted).
    pub fn delete_checkpoints_of(&self, vm_id: i64) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute("DELETE FROM checkpoints WHERE vm_id = ?1", [vm_id])?;
        conn.execute("DELETE FROM checkpoint_positions WHERE vm_id = ?1", [vm_id])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(vm_id: i64, name: &str, parent_id: Option<i64>) -> CheckpointRow {
        CheckpointRow {
            id: 0,
            vm_id,
            name: name.into(),
            tag: format!("tag-{name}"),
            parent_id,
            kind: "production".into(),
            consistency: "crash-consistent".into(),
            with_memory: false,
            created_ms: 1,
        }
    }

    #[test]
    fn tree_position_rename_and_delete_keep_the_tree_connected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        assert_eq!(store.checkpoint_position(7).unwrap(), None);
        let a = store.insert_checkpoint(&cp(7, "a", None)).unwrap();
        let b = store.insert_checkpoint(&cp(7, "b", Some(a.id))).unwrap();
        let c = store.insert_checkpoint(&cp(7, "c", Some(b.id))).unwrap();
        store.insert_checkpoint(&cp(8, "other", None)).unwrap();
        assert_eq!(store.checkpoint_position(7).unwrap(), Some(c.id));
        store.set_checkpoint_position(7, Some(a.id)).unwrap();
        assert_eq!(store.checkpoint_position(7).unwrap(), Some(a.id));
        store.rename_checkpoint(b.id, "bee").unwrap();
        // Deleting b re-parents c onto a.
        store.delete_checkpoint(7, b.id).unwrap();
        let left = store.checkpoints(7).unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left[1].name, "c");
        assert_eq!(left[1].parent_id, Some(a.id));
        // Deleting the position's checkpoint moves the position to its parent (none).
        store.delete_checkpoint(7, a.id).unwrap();
        assert_eq!(store.checkpoint_position(7).unwrap(), None);
        assert_eq!(store.checkpoints(7).unwrap()[0].parent_id, None);
        store.delete_checkpoints_of(7).unwrap();
        assert!(store.checkpoints(7).unwrap().is_empty());
        assert_eq!(store.checkpoints(8).unwrap().len(), 1);
    }
}
