//! Certificate rotation without stopping replication. A host that rotates its certificate
//! first *prepares* a successor (`host.next.crt`/`.key`) and announces its fingerprint in
//! every replication session (`Hello::next_fingerprint` as a primary,
//! `Welcome::next_fingerprint` as a replica), over the connection its current certificate
//! authenticates. Each partner records the successor of that fingerprint. When the host
//! *commits* (every partner has had a session since it prepared) it restarts with the new
//! certificate; a partner that sees the successor where it pinned the old one re-pins:
//! the replica's authorization entry and every relationship with that partner move to the
//! new fingerprint, and the old one stops working there.

use std::collections::BTreeMap;

use ferry_store::Store;
use tracing::info;

/// Settings key: the successors partners announced, old fingerprint → new.
const SUCCESSORS_KEY: &str = "fingerprint_successors";
/// Settings key: when this host prepared its own successor (UNIX s).
pub const PREPARED_AT_KEY: &str = "certificate_rotation_prepared_at";

fn told_key(vm_id: i64) -> String {
    format!("rotation_told:{vm_id}")
}

/// Records that the partner of relationship `vm_id` has learnt this host's successor
/// `next` (a session carried it, and went on).
pub fn told(store: &Store, vm_id: i64, next: &str) {
    let _ = store.set_setting(&told_key(vm_id), next);
}

/// Whether the partner of relationship `vm_id` has learnt `next`.
pub fn was_told(store: &Store, vm_id: i64, next: &str) -> bool {
    store.setting(&told_key(vm_id)).ok().flatten().as_deref() == Some(next)
}

fn successors(store: &Store) -> BTreeMap<String, String> {
    store
        .setting(SUCCESSORS_KEY)
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default()
}

/// The successor a partner with certificate `fp` announced, if any.
pub fn successor(store: &Store, fp: &str) -> Option<String> {
    successors(store).remove(fp)
}

/// Records that the partner authenticated by `fp` announced `next` (ignored unless it is a
/// well-formed fingerprint other than `fp`).
pub fn learn(store: &Store, fp: &str, next: Option<&str>) {
    let Some(next) = next.map(ferry_client::normalize_fingerprint) else {
        return;
    };
    if next.len() != 95 || next == fp || fp.is_empty() {
        return;
    }
    let mut all = successors(store);
    if all.get(fp) != Some(&next) {
        all.insert(fp.to_owned(), next.clone());
        let _ = store.set_setting(
            SUCCESSORS_KEY,
            &serde_json::to_string(&all).expect("serialize"),
        );
        info!(old = fp, new = %next, "a partner announced its next certificate");
    }
}

/// A partner presented `fp`: if it is the announced successor of a certificate pinned
/// here, re-pin everything from the old one to it (authorization entries, relationships)
/// and forget the old one. Returns whether anything moved.
pub fn adopt(store: &Store, fp: &str) -> bool {
    let mut all = successors(store);
    let Some(old) = all
        .iter()
        .find(|(_, new)| new.as_str() == fp)
        .map(|(old, _)| old.clone())
    else {
        return false;
    };
    all.remove(&old);
    let mut cfg = super::replica::load_config(store);
    let mut moved = 0;
    for e in cfg.entries.iter_mut().filter(|e| e.fingerprint == old) {
        e.fingerprint = fp.to_owned();
        moved += 1;
    }
    if moved > 0 {
        let _ = store.set_setting(
            super::replica::CONFIG_KEY,
            &serde_json::to_string(&cfg).expect("serialize"),
        );
    }
    let rels = store.replace_partner_fingerprint(&old, fp).unwrap_or(0);
    let _ = store.set_setting(
        SUCCESSORS_KEY,
        &serde_json::to_string(&all).expect("serialize"),
    );
    info!(old = %old, new = fp, entries = moved, relationships = rels, "a partner's rotated certificate is now pinned");
    moved + rels > 0
}
