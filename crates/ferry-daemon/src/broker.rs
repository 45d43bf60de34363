//! The Replica Broker's placement and redirection (Hyper-V's "initial placement" and
//! "redirection"), and a cluster node's side of them.
//!
//! Primaries know a replica cluster by its Broker's address. The Broker authorizes a
//! primary's greeting with its replica-server settings, places the replica VM on a node
//! that is online (the one holding fewest), and answers `Redirect` with that node; the
//! primary then greets the node, which keeps the replica VM in its own store and its
//! recovery points on the shared directory. When that node dies the primary cannot reach
//! it, asks the Broker again, and the Broker places the VM on a surviving node, which takes
//! the replica over from what the dead node last committed: replication goes on with
//! deltas, without a new initial copy.
//!
//! Everything the Broker and the nodes share is on the cluster's shared directory, under
//! `broker/`:
//! - `replica-server.json`: the Broker's replica-server settings (authorization, storage
//!   on the shared directory) and its replication address, published by the Broker
//!   whenever they change (Hyper-V's central configuration); nodes authorize the Broker's
//!   primaries with them.
//! - `placement/VM`: the node holding VM's replica.
//! - `held/VM.json`: the replica VM as its node last committed it (spec, relationship,
//!   recovery points). Written before the primary hears a cycle was committed, and after
//!   every retention step, so the next node never builds on a point that is gone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_api_types::cluster::BrokerReplica;
use ferry_api_types::ReplicaServerConfig;
use ferry_cluster::pacemaker;
use ferry_cluster::shared::{write_atomic, SharedDir};
use ferry_domain::{ReplicationState, Role, VmName, VmSpec};
use ferry_store::{PointRow, ReplicationRow, StoreError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::replication::replica::{authorize, load_config};
use crate::replication::Shared;

/// What the Broker publishes for the nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// The Broker's name.
    pub broker: String,
    /// Its replication `address:port` (nodes send primaries of VMs they no longer hold
    /// back there).
    pub address: String,
    /// Its replica-server settings.
    pub config: ReplicaServerConfig,
}

/// A replica VM as the node holding it last committed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Held {
    node: String,
    spec: VmSpec,
    partner_name: String,
    partner_addr: String,
    partner_fingerprint: String,
    settings: ferry_domain::replication::ReplicationSettings,
    state: String,
    last_cycle: i64,
    last_point_at: Option<i64>,
    created_at: i64,
    points: Vec<PointRow>,
    last_capture: Option<u64>,
}

fn published_path(shared: &SharedDir) -> PathBuf {
    shared.broker_dir().join("replica-server.json")
}

fn placement_path(shared: &SharedDir, vm: &str) -> PathBuf {
    shared.broker_dir().join("placement").join(vm)
}

fn held_path(shared: &SharedDir, vm: &str) -> PathBuf {
    shared.broker_dir().join("held").join(format!("{vm}.json"))
}

/// The cluster whose Broker this ferryd is.
pub fn brokered_cluster(s: &Shared) -> Option<SharedDir> {
    SharedDir::open(s.cfg.broker_for.as_deref()?).ok()
}

/// On the Broker: publishes its replica-server settings for the nodes.
pub fn publish(s: &Shared) -> anyhow::Result<()> {
    let Some(shared) = brokered_cluster(s) else {
        return Ok(());
    };
    let config = load_config(&s.store);
    let p = Published {
        broker: s.cfg.name.clone(),
        address: format!("{}:{}", s.cfg.tls_listen.ip(), config.port),
        config,
    };
    let bytes = serde_json::to_vec_pretty(&p).expect("serializable");
    write_atomic(&published_path(&shared), &bytes)
        .map_err(|e| anyhow::anyhow!("cannot publish the Broker's settings: {e}"))?;
    Ok(())
}

/// On the Broker: a replica storage must be on the shared directory, where every node
/// can hold the replicas.
pub fn check_storage(s: &Shared, dir: &Path) -> Result<(), String> {
    let Some(shared) = brokered_cluster(s) else {
        return Ok(());
    };
    if dir.starts_with(shared.root()) {
        Ok(())
    } else {
        Err(format!(
            "the Replica Broker's storage must be on the cluster's shared directory ({}), where every node can hold the replicas",
            shared.root().display()
        ))
    }
}

/// The Broker's published settings, on a node of a cluster that has a Broker.
pub fn published(s: &Shared) -> Option<(SharedDir, Published)> {
    let shared = crate::cluster::membership(s)?;
    shared.broker().ok().flatten()?;
    let p = read_published(&shared)?;
    Some((shared, p))
}

fn read_published(shared: &SharedDir) -> Option<Published> {
    let bytes = std::fs::read(published_path(shared)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether node `name`'s replica server accepts connections on `port`.
fn node_listens(cluster: &ferry_cluster::shared::ClusterConfig, name: &str, port: u16) -> bool {
    node_address(cluster, name, port)
        .ok()
        .and_then(|a| a.parse().ok())
        .is_some_and(|addr: std::net::SocketAddr| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        })
}

/// Whether every online node listens on the port the Broker published (they hold the
/// replicas it places).
pub fn nodes_listen(shared: &SharedDir, st: &pacemaker::StackStatus) -> bool {
    let (Some(p), Ok(cluster)) = (read_published(shared), shared.config()) else {
        return false;
    };
    st.nodes
        .iter()
        .filter(|n| n.online)
        .all(|n| node_listens(&cluster, &n.name, p.config.port))
}

/// The node holding VM's replica.
pub fn placement(shared: &SharedDir, vm: &str) -> Option<String> {
    std::fs::read_to_string(placement_path(shared, vm))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Every placed replica VM, with its node and the last cycle its node committed.
pub fn replicas(shared: &SharedDir) -> Vec<BrokerReplica> {
    let Ok(dir) = std::fs::read_dir(shared.broker_dir().join("placement")) else {
        return Vec::new();
    };
    let mut out: Vec<BrokerReplica> = dir
        .flatten()
        .filter_map(|e| {
            let vm = e.file_name().to_str()?.to_owned();
            if vm.contains(".tmp.") {
                return None;
            }
            let node = placement(shared, &vm)?;
            let last_cycle = std::fs::read(held_path(shared, &vm))
                .ok()
                .and_then(|b| serde_json::from_slice::<Held>(&b).ok())
                .map_or(0, |h| h.last_cycle);
            Some(BrokerReplica {
                vm,
                node,
                last_cycle,
            })
        })
        .collect();
    out.sort_by(|a, b| a.vm.cmp(&b.vm));
    out
}

/// On the Broker: the node that holds (or now gets) VM's replica, and its replication
/// address. A VM stays on its node while that node is a member of the cluster; once the
/// node is out (and fenced) it goes to the online node holding fewest replicas.
pub fn place(s: &Shared, vm: &str) -> Result<(String, String), String> {
    // One decision at a time (greetings and the watcher): a replica is never placed on
    // two nodes at once.
    static ONE_PLACEMENT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_PLACEMENT.lock().unwrap_or_else(|e| e.into_inner());
    let shared = brokered_cluster(s).ok_or("this ferryd is not a Replica Broker")?;
    let cluster = shared.config().map_err(|e| e.to_string())?;
    let port = load_config(&s.store).port;
    let current = placement(&shared, vm);
    let member = |st: &pacemaker::StackStatus, name: &str| {
        st.nodes
            .iter()
            .any(|n| n.name == name && n.online && !n.unclean)
    };
    // The common case answers from the recent view: the replica stays on its node.
    let recent = stack_view()?;
    let unclean = |st: &pacemaker::StackStatus, name: &str| {
        st.nodes.iter().any(|x| x.name == name && x.unclean)
    };
    let not_fenced = |n: &str| {
        format!(
            "node {n}, which holds the replica of {vm}, is lost and not yet fenced: the replica moves once it is (seconds; see `ferry cluster status`)"
        )
    };
    let node = match current {
        Some(n) if member(&recent, &n) => n,
        // Fencing first: a node lost but not yet fenced may still write the replica's
        // files. (Answered from the recent view: asking Pacemaker now may take seconds.)
        Some(n) if unclean(&recent, &n) => return Err(not_fenced(&n)),
        _ => {
            // Placing or moving a replica takes a fresh, quorate view.
            let stack = refresh_view()?;
            if !stack.quorate {
                return Err(format!(
                    "replica cluster {} has no quorum here: no replica is placed until it has (see `ferry cluster status`)",
                    cluster.name
                ));
            }
            if let Some(n) = &current {
                if member(&stack, n) {
                    return Ok((n.clone(), node_address(&cluster, n, port)?));
                }
                if unclean(&stack, n) {
                    return Err(not_fenced(n));
                }
            }
            // Fewest replicas first; like Hyper-V's Broker, only a node whose replica
            // server answers (its ferryd listens on the Broker's port).
            let taken = replicas(&shared);
            let mut candidates: Vec<&pacemaker::NodeState> = stack
                .nodes
                .iter()
                .filter(|n| n.online && !n.unclean && !n.standby)
                .collect();
            candidates
                .sort_by_key(|n| (taken.iter().filter(|r| r.node == n.name).count(), &n.name));
            let chosen = candidates
                .iter()
                .find(|n| node_listens(&cluster, &n.name, port))
                .ok_or_else(|| {
                    if candidates.is_empty() {
                        format!(
                            "replica cluster {} has no node online to hold the replica of {vm}: bring a node back (ferry cluster status)",
                            cluster.name
                        )
                    } else {
                        format!(
                            "no node of replica cluster {} accepts replication on port {port} yet (a node's ferryd listens there within seconds of the Broker's `replica-server set`): try again shortly, or check the nodes' ferryd",
                            cluster.name
                        )
                    }
                })?
                .name
                .clone();
            let path = placement_path(&shared, vm);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            write_atomic(&path, chosen.as_bytes()).map_err(|e| e.to_string())?;
            let msg = match &current {
                Some(old) => format!(
                    "the replica of {vm} moves from node {old} (not a cluster member now) to node {chosen}"
                ),
                None => format!("the replica of {vm} is placed on node {chosen}"),
            };
            info!(vm, node = %chosen, "{msg}");
            s.events.emit_with(vm, "replica_placed", "info", &msg);
            chosen
        }
    };
    let address = node_address(&cluster, &node, port)?;
    Ok((node, address))
}

/// A node's replication address: its cluster address and the Broker's port.
fn node_address(
    cluster: &ferry_cluster::shared::ClusterConfig,
    node: &str,
    port: u16,
) -> Result<String, String> {
    cluster
        .node(node)
        .map(|n| format!("{}:{port}", n.address))
        .ok_or_else(|| format!("node {node} is not in the cluster's configuration"))
}

/// The Broker's view of the cluster, refreshed every second by its watcher: asking
/// Pacemaker while a node is being lost can take many seconds, which a primary's greeting
/// must not wait for (it would time out and retry only a cycle later).
static VIEW: std::sync::Mutex<Option<(std::time::Instant, pacemaker::StackStatus)>> =
    std::sync::Mutex::new(None);

/// The freshest view (at most 15 s old), else Pacemaker asked now.
fn stack_view() -> Result<pacemaker::StackStatus, String> {
    if let Some((at, st)) = VIEW.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        if at.elapsed() < Duration::from_secs(15) {
            return Ok(st.clone());
        }
    }
    refresh_view()
}

fn refresh_view() -> Result<pacemaker::StackStatus, String> {
    let st = pacemaker::status().map_err(|e| e.to_string())?;
    *VIEW.lock().unwrap_or_else(|e| e.into_inner()) = Some((std::time::Instant::now(), st.clone()));
    Ok(st)
}

/// On a node, for a greeting whose primary the Broker's settings authorize.
pub enum NodeAnswer {
    /// This node holds the replica: it goes into this storage.
    Here(PathBuf),
    /// Another node (or the Broker) does: the primary is sent there.
    Elsewhere {
        /// Its name.
        node: String,
        /// Its replication address.
        address: String,
    },
}

/// The store setting that marks a replica as the Broker's (placed on this node once):
/// its files are on the shared directory, and only while the Broker places it here may
/// this node write them.
fn held_key(vm_id: i64) -> String {
    format!("broker_held:{vm_id}")
}

/// Whether replica VM `vm_id` is one the Broker placed on this node (now or before).
pub fn is_brokers(s: &Shared, vm_id: i64) -> bool {
    s.store.setting(&held_key(vm_id)).ok().flatten().is_some()
}

/// On a node: whether a primary's greeting for `vm` is the Broker's business here, and
/// then whether this node holds the replica (taken over from the node that held it before,
/// if that node died). `None`: the Broker's settings do not authorize this primary (the
/// node's own replica-server settings decide). `broker_via_ca`: how the Broker's settings
/// admitted the primary's certificate (`None`: they did not).
pub async fn node_answer(
    s: &Shared,
    primary: &str,
    fingerprint: &str,
    broker_via_ca: Option<bool>,
    vm: &VmName,
) -> Option<Result<NodeAnswer, String>> {
    let via_ca = broker_via_ca?;
    let (shared, p) = published(s)?;
    let (storage, _) = authorize(&p.config, &p.broker, primary, fingerprint, via_ca).ok()?;
    Some(match placement(&shared, vm.as_str()) {
        Some(n) if n == s.cfg.name => take_over(s, &shared, vm)
            .await
            .map(|()| NodeAnswer::Here(storage)),
        _ => Ok(NodeAnswer::Elsewhere {
            node: p.broker,
            address: p.address,
        }),
    })
}

/// On a node, once a greeting the Broker sent here created or found the replica: it is
/// marked as the Broker's, and what this node holds is on the shared directory before
/// the primary hears anything (a cycle committed just before a failed write, say).
pub fn held_here(s: &Shared, vm_id: i64) -> Result<(), String> {
    s.store
        .set_setting(&held_key(vm_id), "1")
        .map_err(|e| e.to_string())?;
    hold(s, vm_id).map_err(|e| format!("{e:#}"))
}

/// The certificate-level admission of a node for the Broker's primaries (see
/// `replica::admit`).
pub fn node_config(s: &Shared) -> Option<(String, ReplicaServerConfig)> {
    published(s).map(|(_, p)| (p.broker, p.config))
}

/// One takeover at a time on this node (a greeting and the periodic check).
static TAKE_OVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Makes this node's store hold the replica VM as the shared directory says its last
/// node committed it, unless this node's own copy is as new. Under the VM's point lock,
/// so no retention merge is half done here, and in one store transaction.
async fn take_over(s: &Shared, shared: &SharedDir, vm: &VmName) -> Result<(), String> {
    let _one = TAKE_OVER.lock().await;
    let store_err = |e: StoreError| format!("cannot take over the replica of {vm}: {e}");
    let existing = match s.store.get_vm(vm) {
        Ok(row) => Some(row),
        Err(StoreError::NotFound(_)) => None,
        Err(e) => return Err(store_err(e)),
    };
    // The snapshot is read under the point lock: read before it, it may be one a retention
    // merge on this very node has since moved past (its layer deleted).
    let _points = match &existing {
        Some(row) => Some(s.lock_points(row.id).await),
        None => None,
    };
    let path = held_path(shared, vm.as_str());
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        // Not replicated yet: the greeting creates the replica VM here.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let held: Held = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is damaged: {e}", path.display()))?;
    let state: ReplicationState = held.state.parse()?;
    let rel = ReplicationRow {
        vm_id: 0,
        role: Role::Replica,
        partner_name: held.partner_name.clone(),
        partner_addr: held.partner_addr.clone(),
        partner_fingerprint: held.partner_fingerprint.clone(),
        settings: held.settings.clone(),
        state,
        generation: 0,
        last_cycle: held.last_cycle,
        last_point_at: held.last_point_at,
        last_error: None,
        created_at: held.created_at,
    };
    if let Some(row) = &existing {
        let mine = s.store.replication(row.id).map_err(store_err)?;
        // Only a replica this node held for the Broker before is replaced: a VM of the
        // node's own with the same name is not the Broker's to overwrite.
        let brokers = is_brokers(s, row.id)
            && mine.as_ref().is_some_and(|m| {
                m.role == Role::Replica
                    && m.settings.relationship_id == held.settings.relationship_id
            });
        if !brokers {
            return Err(format!(
                "node {} has a VM of its own named {vm}, so it cannot hold this replica: rename or remove that VM there",
                s.cfg.name
            ));
        }
        // Written by this node: its own store is the truth (a change since, such as a
        // failover's state, is written out within seconds, never taken back).
        if held.node == s.cfg.name {
            return Ok(());
        }
        let m = mine.expect("checked");
        let points = s.store.list_points(row.id).map_err(store_err)?;
        let same = points.len() == held.points.len()
            && points
                .iter()
                .zip(&held.points)
                .all(|(x, y)| x.cycle == y.cycle && x.layers == y.layers);
        if m.last_cycle == held.last_cycle && m.state == state && same {
            return Ok(());
        }
    }
    let vm_id = s
        .store
        .adopt_replica(
            existing.as_ref().map(|r| r.id),
            &held.spec,
            &rel,
            &held.points,
            crate::replication::now_unix(),
        )
        .map_err(store_err)?;
    s.store
        .set_setting(&held_key(vm_id), "1")
        .map_err(store_err)?;
    match held.last_capture {
        Some(c) => s.store.set_setting(
            &crate::replication::replica::last_capture_key(vm_id),
            &c.to_string(),
        ),
        None => s
            .store
            .delete_setting(&crate::replication::replica::last_capture_key(vm_id)),
    }
    .map_err(store_err)?;
    info!(vm = %vm, from = %held.node, cycle = held.last_cycle, "took over the replica the Broker placed here");
    s.events.emit(
        vm,
        "replica_placed",
        &format!(
            "took over the replica of {vm} from node {} at cycle {}",
            held.node, held.last_cycle
        ),
    );
    Ok(())
}

/// On a node: writes the replica VM `vm_id` to the shared directory when the Broker
/// placed it here, so the node that holds it next starts from exactly this. Called
/// before a cycle's commit is acknowledged and after each retention step. A replica of
/// the Broker's that is no longer placed here fails: this node must not acknowledge a
/// cycle another node will not have.
pub fn hold(s: &Shared, vm_id: i64) -> anyhow::Result<()> {
    // One writer at a time: a slower writer's older snapshot must never land after a
    // newer one (the point a primary was told of would be missing on the next node).
    static ONE_WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    let brokers = is_brokers(s, vm_id);
    let Some(shared) = crate::cluster::membership(s) else {
        if brokers {
            anyhow::bail!("this node is no longer a cluster node, so it cannot hold a replica of the Replica Broker's");
        }
        return Ok(());
    };
    let Some(row) = s.store.vm_by_id(vm_id)? else {
        return Ok(());
    };
    let name = row.spec.name.to_string();
    let here = placement(&shared, &name).as_deref() == Some(s.cfg.name.as_str());
    if !here {
        if brokers {
            anyhow::bail!(
                "the Replica Broker placed the replica of {name} on another node (see `ferry replica-broker show`)"
            );
        }
        return Ok(());
    }
    let Some(rel) = s.store.replication(vm_id)? else {
        return Ok(());
    };
    if rel.role != Role::Replica {
        return Ok(());
    }
    let held = Held {
        node: s.cfg.name.clone(),
        spec: row.spec,
        partner_name: rel.partner_name,
        partner_addr: rel.partner_addr,
        partner_fingerprint: rel.partner_fingerprint,
        settings: rel.settings,
        state: rel.state.as_str().to_owned(),
        last_cycle: rel.last_cycle,
        last_point_at: rel.last_point_at,
        created_at: rel.created_at,
        points: s.store.list_points(vm_id)?,
        last_capture: s
            .store
            .setting(&crate::replication::replica::last_capture_key(vm_id))?
            .and_then(|v| v.parse().ok()),
    };
    let path = held_path(&shared, &name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let before = std::fs::read(&path).ok();
    if let Some(old) = before
        .as_deref()
        .and_then(|b| serde_json::from_slice::<Held>(b).ok())
    {
        // Never back: a newer snapshot of the same relationship is another node's.
        if old.settings.relationship_id == held.settings.relationship_id
            && old.last_cycle > held.last_cycle
        {
            anyhow::bail!(
                "node {} holds the replica of {name} at cycle {}, newer than this node's {}",
                old.node,
                old.last_cycle,
                held.last_cycle
            );
        }
    }
    let bytes = serde_json::to_vec_pretty(&held).expect("serializable");
    if before.as_deref() != Some(&bytes[..]) {
        write_atomic(&path, &bytes)?;
    }
    Ok(())
}

/// Whether this node may delete replica VM `vm_id`'s files: always for its own replicas;
/// for the Broker's, only while the Broker places it here (else they are another node's).
pub fn owns_files(s: &Shared, vm_id: i64, vm: &str) -> bool {
    if !is_brokers(s, vm_id) {
        return true;
    }
    crate::cluster::membership(s)
        .and_then(|shared| placement(&shared, vm))
        .as_deref()
        == Some(s.cfg.name.as_str())
}

/// On the node holding it: a removed replica, or one that became this node's own VM (a
/// failover and reverse replication, or `ha enable`), is no longer placed anywhere.
pub fn forget(s: &Shared, vm: &str) {
    let Some(shared) = crate::cluster::membership(s) else {
        return;
    };
    if placement(&shared, vm).as_deref() == Some(s.cfg.name.as_str()) {
        let _ = std::fs::remove_file(held_path(&shared, vm));
        let _ = std::fs::remove_file(placement_path(&shared, vm));
        info!(vm, "the Broker's placement of this replica is removed");
    }
    if let Ok(name) = VmName::new(vm) {
        if let Ok(row) = s.store.get_vm(&name) {
            let _ = s.store.delete_setting(&held_key(row.id));
        }
    }
}

/// On a node (at startup, before staged cycles are recovered, and every few seconds):
/// forgets, in its store only, the Broker's replicas it held once and that the Broker has
/// since placed on another node. Their files are that node's now; keeping the stale rows
/// would make this node clean up layers it no longer knows of, or serve a stale copy.
pub fn release_moved(s: &Shared) {
    let Some(shared) = crate::cluster::membership(s) else {
        return;
    };
    let Ok(rels) = s.store.list_replications() else {
        return;
    };
    for rel in rels.into_iter().filter(|r| r.role == Role::Replica) {
        if !is_brokers(s, rel.vm_id) {
            continue;
        }
        let Ok(Some(row)) = s.store.vm_by_id(rel.vm_id) else {
            continue;
        };
        match placement(&shared, row.spec.name.as_str()) {
            Some(node) if node != s.cfg.name => {
                info!(vm = %row.spec.name, %node, "the Broker moved this replica to another node; forgetting it here");
                s.replica.staging.lock().expect("staging").remove(&row.id);
                match s.store.delete_vm(&row.spec.name) {
                    Ok(()) => {
                        let _ = s.store.delete_setting(&held_key(row.id));
                    }
                    Err(e) => {
                        warn!(vm = %row.spec.name, error = %e, "cannot forget a moved replica")
                    }
                }
            }
            _ => {}
        }
    }
}

/// On a node, every few seconds: listens for the Broker's primaries once the Broker has
/// published its settings, writes the replicas held here to the shared directory, takes
/// over those the Broker moved here, and forgets those it moved away.
pub async fn node_tick(s: &std::sync::Arc<Shared>) {
    let Some((shared, p)) = published(s) else {
        return;
    };
    let want = std::net::SocketAddr::new(s.cfg.tls_listen.ip(), p.config.port).to_string();
    let listening = s.replica.listening.lock().expect("listening").clone();
    if listening.as_deref() != Some(want.as_str()) {
        if let Err(e) = crate::replication::replica::apply_config(s).await {
            warn!(
                error = format!("{e:#}"),
                "cannot listen for the Replica Broker's primaries"
            );
        }
    }
    release_moved(s);
    for r in replicas(&shared) {
        if r.node != s.cfg.name {
            continue;
        }
        let Ok(vm) = VmName::new(&r.vm) else {
            continue;
        };
        match s.store.get_vm(&vm) {
            // Moved here while no primary greets (the primary site is down: exactly when
            // a failover on this cluster is needed).
            Err(StoreError::NotFound(_)) => {
                if let Err(e) = take_over(s, &shared, &vm).await {
                    warn!(vm = %vm, error = %e, "cannot take over a replica the Broker placed here");
                }
            }
            Ok(row) => match s.store.replication(row.id) {
                Ok(Some(rel)) if rel.role == Role::Replica => {
                    if let Err(e) = hold(s, row.id) {
                        warn!(vm = %vm, error = format!("{e:#}"), "cannot write a held replica to the shared directory");
                    }
                }
                // Reversed (this node's VM replicates now) or replication removed.
                Ok(_) => forget(s, vm.as_str()),
                Err(_) => {}
            },
            Err(_) => {}
        }
    }
}

/// On the Broker, every second: a replica whose node left the cluster (died, was
/// fenced, left) is placed on another node at once, so that it can be failed over even
/// while its primary is gone.
pub fn spawn_watcher(s: &std::sync::Arc<Shared>) {
    if s.cfg.broker_for.is_none() {
        return;
    }
    let s = s.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s2 = s.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let Some(shared) = brokered_cluster(&s2) else {
                    return;
                };
                let Ok(stack) = refresh_view() else {
                    return;
                };
                let placed = replicas(&shared);
                // Only a quorate view decides that a node is gone.
                if !stack.quorate {
                    return;
                }
                for r in placed {
                    // Offline and fenced (or left cleanly): never while it may still write.
                    let gone = !stack
                        .nodes
                        .iter()
                        .any(|n| n.name == r.node && (n.online || n.unclean));
                    if gone {
                        if let Err(e) = place(&s2, &r.vm) {
                            warn!(vm = %r.vm, error = %e, "cannot move a replica off a lost node");
                        }
                    }
                }
            })
            .await;
        }
    });
}
