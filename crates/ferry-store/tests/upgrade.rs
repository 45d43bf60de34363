//! Upgrades: a database written by an earlier release's ferryd is migrated by this one and
//! every row it held is still read back, unchanged, through the store's API.
//!
//! The fixture `fixtures/store-a16d500.sql` is the dump of a database that the store of
//! commit a16d500 (schema version 5) wrote through its own API (the program that wrote it
//! is `fixtures/mkfixture-a16d500.rs`); it is loaded with SQLite as it is, never rewritten.

use std::path::Path;

use ferry_domain::replication::InitialMethod;
use ferry_domain::{Boot, NicKind, ReplicationState, Role, VmName, VmState};
use ferry_store::{EventRow, PointRow, Store};
use rusqlite::Connection;

const FIXTURE: &str = include_str!("fixtures/store-a16d500.sql");

/// The schema a database gets from this ferryd, as SQLite stores it (tables and indexes in
/// name order), without the data.
fn schema(path: &Path) -> Vec<(String, String, Option<String>)> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

fn user_version(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_release_a16d500_database_migrates_and_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("ferry.db");
    Connection::open(&old)
        .unwrap()
        .execute_batch(FIXTURE)
        .unwrap();
    assert_eq!(user_version(&old), 5, "the fixture is schema version 5");

    // What a fresh install of this ferryd gets: every migration, from none.
    let fresh_path = dir.path().join("fresh.db");
    let latest = Store::open(&fresh_path).unwrap().schema_version().unwrap();
    assert!(
        latest >= 5,
        "this store knows fewer migrations ({latest}) than the fixture's"
    );

    let store = Store::open(&old).unwrap();
    // Every migration after the fixture's ran, and the result is the very schema a fresh
    // database has (same tables, columns, defaults and indexes).
    assert_eq!(store.schema_version().unwrap(), latest);
    drop(store);
    assert_eq!(schema(&old), schema(&fresh_path));
    let store = Store::open(&old).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        latest,
        "reopening is a no-op"
    );

    // VMs: both specs decode (a bridged NIC; a direct-kernel boot with the primary's old
    // host paths, which the replica localizes at its next session), runtime fields intact.
    let vms = store.list_vms().unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v.spec.name.as_str()).collect();
    assert_eq!(names, ["db1", "web1"]);
    let web1 = store.get_vm(&VmName::new("web1").unwrap()).unwrap();
    assert_eq!(web1.id, 1);
    assert_eq!(web1.spec.cpus, 2);
    assert_eq!(web1.spec.memory_mib, 1024);
    assert_eq!(web1.spec.disks.len(), 2);
    assert_eq!(web1.spec.disks[0].size_bytes, 20 << 30);
    assert_eq!(web1.spec.disks[1].file, "data.qcow2");
    assert_eq!(web1.spec.boot, Boot::Disk);
    assert_eq!(web1.spec.nics[0].kind, NicKind::Bridge("br0".into()));
    assert_eq!(web1.spec.nics[0].mac, "52:54:00:12:34:56");
    assert_eq!(web1.state, VmState::Running);
    assert_eq!(web1.pid, Some(4242));
    assert_eq!(web1.started_at, Some(1_700_000_100));
    assert_eq!(web1.created_at, 1_700_000_000);
    let db1 = store.get_vm(&VmName::new("db1").unwrap()).unwrap();
    assert_eq!(
        db1.spec.boot,
        Boot::Kernel {
            kernel: "/boot/vmlinuz-6.1.0-13-amd64".into(),
            initrd: Some("/srv/initrd.img".into()),
            append: Some("console=ttyS0".into()),
        }
    );
    assert_eq!(db1.spec.nics[0].kind, NicKind::User);
    assert_eq!(db1.state, VmState::Off);
    assert_eq!(
        db1.last_error.as_deref(),
        Some("QEMU exited while ferryd was down")
    );

    // Settings, among them the replica-server role as that release stored it.
    let rs = store.setting("replica_server").unwrap().unwrap();
    assert!(
        rs.contains(r#""storage":"/srv/replicas","trust_group":"g1""#),
        "{rs}"
    );

    // Replication relationships, on both sides, with their settings.
    let rels = store.list_replications().unwrap();
    assert_eq!(rels.len(), 2);
    let prim = store.replication(web1.id).unwrap().unwrap();
    assert_eq!(prim.role, Role::Primary);
    assert_eq!(prim.partner_name, "site-b");
    assert_eq!(prim.partner_addr, "10.0.0.2:7444");
    assert_eq!(prim.partner_fingerprint, "AB:CD:EF");
    assert_eq!(prim.state, ReplicationState::Replicating);
    assert_eq!(prim.generation, 3);
    assert_eq!(prim.last_cycle, 42);
    assert_eq!(prim.last_point_at, Some(1_700_003_000));
    assert_eq!(prim.created_at, 1_700_000_200);
    let s = &prim.settings;
    assert_eq!(s.interval.secs(), 300);
    assert_eq!(s.retention.additional, 4);
    assert_eq!(s.retention.spacing_secs, 3600);
    assert!(s.compression);
    assert_eq!(s.excluded_disks, vec![1]);
    assert_eq!(s.initial, InitialMethod::Network);
    assert_eq!(s.bandwidth_limit, Some(50_000_000));
    assert_eq!(s.granularity, 65536);
    assert_eq!(s.app_consistent_every, Some(4 * 3600));
    assert_eq!(s.relationship_id, 11);
    let repl = store.replication(db1.id).unwrap().unwrap();
    assert_eq!(repl.role, Role::Replica);
    assert_eq!(repl.partner_name, "site-a");
    assert_eq!(repl.last_cycle, 3);
    assert_eq!(repl.settings.relationship_id, 12);

    // Recovery points: all three, in order, with their layers and consistency.
    let points = store.list_points(db1.id).unwrap();
    let summary: Vec<(i64, &str, &str, i64)> = points
        .iter()
        .map(|p| (p.cycle, p.kind.as_str(), p.consistency.as_str(), p.bytes))
        .collect();
    assert_eq!(
        summary,
        [
            (1, "initial", "crash", 1000),
            (2, "delta", "application", 2000),
            (3, "delta", "crash", 3000)
        ]
    );
    assert_eq!(points[2].layers, vec![(0, "disk0.c3.qcow2".to_owned())]);
    assert_eq!(points[2].taken_at, 1_700_001_300);
    assert_eq!(points[2].applied_at, 1_700_001_310);

    // Cycle history, the failed one with its error.
    let cycles = store.recent_cycles(db1.id, 10).unwrap();
    assert_eq!(cycles.len(), 3);
    let failed = store.recent_cycles(web1.id, 10).unwrap();
    assert_eq!(failed.len(), 1);
    assert!(!failed[0].ok);
    assert_eq!(failed[0].error.as_deref(), Some("connection reset"));
    assert_eq!(failed[0].dirty_bytes, 65536);

    // Events, including one about no VM.
    let events = store.list_events(None, 0, 100).unwrap();
    let ev: Vec<(Option<&str>, u32, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e.vm.as_deref(),
                e.code,
                e.kind.as_str(),
                e.severity.as_str(),
            )
        })
        .collect();
    assert_eq!(
        ev,
        [
            (Some("web1"), 1001, "replication_state", "info"),
            (Some("db1"), 2003, "cycle_failed", "error"),
            (None, 9001, "server", "warning")
        ]
    );
    assert_eq!(events[2].message, "replica storage 91% full");
    assert_eq!(store.list_events(Some("db1"), 0, 100).unwrap().len(), 1);

    // Checkpoints: the tree and where "Now" hangs.
    let cps = store.checkpoints(web1.id).unwrap();
    assert_eq!(cps.len(), 2);
    assert_eq!(cps[0].name, "before upgrade");
    assert_eq!(cps[1].parent_id, Some(cps[0].id));
    assert!(cps[1].with_memory);
    assert_eq!(cps[1].consistency, "saved-state");
    assert_eq!(store.checkpoint_position(web1.id).unwrap(), Some(cps[1].id));

    // The upgraded database takes new rows after the old ones (AUTOINCREMENT sequences came
    // along), and a point commit moves the relationship as it would have before.
    let mut rel = repl.clone();
    rel.last_cycle = 4;
    rel.last_point_at = Some(1_700_001_600);
    let id = store
        .commit_point(
            &PointRow {
                id: 0,
                vm_id: db1.id,
                cycle: 4,
                taken_at: 1_700_001_600,
                applied_at: 1_700_001_610,
                kind: "delta".into(),
                layers: vec![(0, "disk0.c4.qcow2".into())],
                bytes: 4000,
                consistency: "crash".into(),
            },
            &rel,
        )
        .unwrap();
    assert!(id > points[2].id);
    assert_eq!(store.replication(db1.id).unwrap().unwrap().last_cycle, 4);
    let eid = store
        .insert_event(&EventRow {
            id: 0,
            at_ms: 1_700_009_000_000,
            vm: Some("db1".into()),
            code: 1001,
            kind: "replication_state".into(),
            severity: "info".into(),
            message: "after upgrade".into(),
        })
        .unwrap();
    assert!(eid > events[2].id);
}
