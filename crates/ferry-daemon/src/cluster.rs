//! This host as a node of a failover cluster (crate `ferry-cluster` for the stack itself):
//! creating, joining and leaving it, its status, making VMs highly available, and what the
//! OCF agent asks when Pacemaker starts, stops, monitors or migrates a VM here.
//!
//! A node's membership is one setting in its store (the shared directory); everything else
//! about the cluster is on the shared directory, where every node reads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_api_types::cluster::{
    AgentReply, AgentRequest, BrokerSetRequest, BrokerStatus, ClusterCreateRequest,
    ClusterJoinRequest, ClusterNodeStatus, ClusterReply, ClusterStatus, ClusterVmStatus,
    IncomingReply, IncomingRequest, MigrateReply,
};
use ferry_api_types::VmState;
use ferry_cluster::ocf::rc;
use ferry_cluster::shared::{
    BrokerConfig, ClusterConfig, NodeRecord, SharedDir, VmEntry, DEFAULT_TOKEN_MS,
};
use ferry_cluster::{corosync, ocf, pacemaker, resource_id, vm_of_resource, ClusterError};
use ferry_domain::{VmName, VmSpec};
use tracing::{info, warn};

use crate::error::ApiFailure;
use crate::replication::Shared;

/// The store setting that makes this host a cluster node: the shared directory.
const SHARED_DIR_KEY: &str = "cluster.shared_dir";

impl From<ClusterError> for ApiFailure {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Invalid(m) => ApiFailure::invalid(m),
            ClusterError::Missing(m) => ApiFailure::conflict(m),
            ClusterError::Tool(m) | ClusterError::Io(m) => ApiFailure::internal(m),
        }
    }
}

/// Runs a blocking cluster call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClusterError> + Send + 'static,
) -> Result<T, ApiFailure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiFailure::internal(format!("cluster call panicked: {e}")))?
        .map_err(ApiFailure::from)
}

/// The shared directory, if this host is a cluster node.
pub fn membership(s: &Shared) -> Option<SharedDir> {
    let dir = s.store.setting(SHARED_DIR_KEY).ok().flatten()?;
    SharedDir::open(Path::new(&dir)).ok()
}

fn member(s: &Shared) -> Result<SharedDir, ApiFailure> {
    membership(s).ok_or_else(|| {
        ApiFailure::conflict(format!(
            "{} is not a cluster node; create a cluster (ferry cluster create) or join one (ferry cluster join)",
            s.cfg.name
        ))
    })
}

/// The `ferry` CLI the OCF agent runs: beside ferryd.
fn ferry_cli() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("ferry")))
        .unwrap_or_else(|| PathBuf::from("/usr/bin/ferry"))
}

/// At ferryd's start: a cluster node brings its cluster stack up (as systemd would with
/// the units enabled), so that a rebooted node rejoins.
pub async fn boot(s: &Arc<Shared>) {
    spawn_exporter(s);
    let Some(shared) = membership(s) else { return };
    let r = blocking(move || {
        ocf::install_agent(&ferry_cli())?;
        let cfg = shared.config()?;
        corosync::configure_node(&shared, &cfg)?;
        corosync::start_stack()
    })
    .await;
    match r {
        Ok(()) => info!("cluster stack started"),
        Err(e) => warn!(error = %e.message, "cannot start the cluster stack"),
    }
}

/// Checks that this host can be the node `cfg` names it, then configures and starts it.
async fn become_node(
    s: &Arc<Shared>,
    shared: SharedDir,
    cfg: ClusterConfig,
) -> Result<ClusterStatus, ApiFailure> {
    let name = s.cfg.name.clone();
    let Some(node) = cfg.node(&name).cloned() else {
        return Err(ApiFailure::invalid(format!(
            "this host is {name:?}, which is not a node of cluster {} ({}); its ferryd name must be one of them",
            cfg.name,
            cfg.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let vms = shared.vms_dir();
    if canonical(&s.cfg.vm_storage) != canonical(&vms) {
        return Err(ApiFailure::invalid(format!(
            "a cluster node keeps its VMs on the shared storage: set vm_storage = \"{}\" in ferryd's config and restart ferryd (it is {})",
            vms.display(),
            s.cfg.vm_storage.display()
        )));
    }
    let record = NodeRecord {
        name: name.clone(),
        api: format!("{}:{}", node.address, s.cfg.tls_listen.port()),
        fingerprint: s.identity.fingerprint.clone(),
    };
    let sh = shared.clone();
    blocking(move || {
        corosync::require_tools()?;
        ocf::install_agent(&ferry_cli())?;
        sh.set_node_record(&record)?;
        corosync::configure_node(&sh, &cfg)?;
        corosync::start_stack()
    })
    .await?;
    s.store
        .set_setting(SHARED_DIR_KEY, &shared.root().display().to_string())?;
    info!(shared = %shared.root().display(), "this host is a cluster node");
    // A node that left went to standby; joining again makes it host VMs again (once its
    // Pacemaker is connected).
    tokio::spawn(async move {
        for _ in 0..120 {
            let n = name.clone();
            if blocking(move || pacemaker::set_standby(&n, false))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        warn!("could not take this node out of standby; run `crm_attribute -t nodes -N NODE -n standby -v off`");
    });
    status(s).await
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

/// `ferry cluster create`.
pub async fn create(
    s: &Arc<Shared>,
    req: ClusterCreateRequest,
) -> Result<ClusterStatus, ApiFailure> {
    if let Some(m) = membership(s) {
        return Err(ApiFailure::conflict(format!(
            "this host is already a node of the cluster on {}; leave it first (ferry cluster leave)",
            m.root().display()
        )));
    }
    let shared = SharedDir::open(Path::new(&req.shared_dir))?;
    let cfg = ClusterConfig {
        name: req.name,
        nodes: req.nodes,
        fence: req.fence,
        token_ms: req.token_ms.unwrap_or(DEFAULT_TOKEN_MS),
    };
    cfg.validate()?;
    if cfg.node(&s.cfg.name).is_none() {
        return Err(ApiFailure::invalid(format!(
            "this host ({}) is not among the nodes given; add --node {}=ADDRESS",
            s.cfg.name, s.cfg.name
        )));
    }
    for f in &cfg.fence {
        if corosync::which(&f.agent).is_none() {
            return Err(ApiFailure::invalid(format!(
                "fence agent {} is not installed on this node (apt-get install fence-agents, or the agent your fencing hardware needs)",
                f.agent
            )));
        }
    }
    let sh = shared.clone();
    let c = cfg.clone();
    blocking(move || sh.create(&c)).await?;
    make_migration_certs(&shared, &cfg.name)?;
    // The cluster's own certificate: its VMs replicate as the cluster from any node.
    let dir = shared.identity_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiFailure::internal(format!("cannot create {}: {e}", dir.display())))?;
    crate::identity::Identity::load_or_create(&dir, &cfg.name)
        .map_err(|e| ApiFailure::internal(format!("cannot make the cluster's certificate: {e}")))?;
    info!(cluster = %cfg.name, "cluster created");
    become_node(s, shared, cfg).await
}

/// `ferry cluster join`.
pub async fn join(s: &Arc<Shared>, req: ClusterJoinRequest) -> Result<ClusterStatus, ApiFailure> {
    if let Some(m) = membership(s) {
        if m.root() != Path::new(&req.shared_dir) {
            return Err(ApiFailure::conflict(format!(
                "this host is already a node of the cluster on {}; leave it first (ferry cluster leave)",
                m.root().display()
            )));
        }
    }
    let shared = SharedDir::open(Path::new(&req.shared_dir))?;
    let cfg = shared.config()?;
    become_node(s, shared, cfg).await
}

/// `ferry cluster leave`: this node goes to standby (Pacemaker moves its HA VMs away),
/// stops its cluster stack and forgets the cluster. It is never fenced for it: it leaves
/// cleanly.
pub async fn leave(s: &Arc<Shared>) -> Result<ClusterReply, ApiFailure> {
    let shared = member(s)?;
    let name = s.cfg.name.clone();
    let n = name.clone();
    blocking(move || pacemaker::set_standby(&n, true)).await?;
    // Wait until no VM resource is active here.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let st = blocking(pacemaker::status).await?;
        let here = st.resources.iter().any(|r| {
            vm_of_resource(&r.id).is_some() && r.active && r.nodes.iter().any(|n| *n == name)
        });
        if !here {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ApiFailure::internal(
                "this node's VMs did not move away in 10 min; see `ferry cluster status`".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    blocking(|| corosync::stop_stack(Duration::from_secs(120))).await?;
    s.store.delete_setting(SHARED_DIR_KEY)?;
    info!(shared = %shared.root().display(), "left the cluster");
    Ok(ClusterReply {
        message: format!(
            "{name} left the cluster: its VMs run on the other nodes; `ferry cluster join --shared {}` brings it back",
            shared.root().display()
        ),
    })
}

/// `ferry cluster status`.
pub async fn status(s: &Arc<Shared>) -> Result<ClusterStatus, ApiFailure> {
    let shared = member(s)?;
    let sh = shared.clone();
    let (cfg, inventory) = blocking(move || Ok((sh.config()?, sh.vms()?))).await?;
    let stack = blocking(pacemaker::status).await;
    let (stack, stack_error): (pacemaker::StackStatus, _) = match stack {
        Ok(st) => (st, None),
        Err(e) => (Default::default(), Some(e.message)),
    };
    let nodes = cfg
        .nodes
        .iter()
        .map(|n| {
            let st = stack.nodes.iter().find(|m| m.name == n.name);
            ClusterNodeStatus {
                name: n.name.clone(),
                address: n.address.clone(),
                online: st.is_some_and(|m| m.online),
                standby: st.is_some_and(|m| m.standby),
                unclean: st.is_some_and(|m| m.unclean),
                dc: st.is_some_and(|m| m.dc),
            }
        })
        .collect();
    let vms = inventory
        .into_iter()
        .map(|(name, entry)| {
            let rsc = stack
                .resources
                .iter()
                .find(|r| vm_of_resource(&r.id) == Some(name.as_str()));
            let (node, state) = match rsc {
                Some(r) if r.failed => (r.nodes.first().cloned(), "failed"),
                Some(r) if r.role == "Migrating" => (r.nodes.first().cloned(), "migrating"),
                Some(r) if r.active => (r.nodes.first().cloned(), "started"),
                Some(_) if stack_error.is_none() => (None, "unplaced"),
                _ => {
                    let owner = shared.owner(&name);
                    let state = if owner.is_some() {
                        "started"
                    } else {
                        "stopped"
                    };
                    (owner, state)
                }
            };
            ClusterVmStatus {
                name,
                ha: entry.ha,
                node,
                state: state.to_owned(),
            }
        })
        .collect();
    let broker = broker_of(&shared, &stack);
    Ok(ClusterStatus {
        name: cfg.name,
        shared_dir: shared.root().display().to_string(),
        this_node: s.cfg.name.clone(),
        quorate: stack.quorate,
        dc: stack.dc,
        nodes,
        vms,
        broker,
        fencing: stack.fencing,
        stack_error,
        replication_fingerprint: cluster_identity(s, &shared).map(|i| i.fingerprint.clone()),
    })
}

/// After a VM is created or changed on a cluster node: its spec goes to the inventory, so
/// any node can run it.
pub fn record_vm(s: &Shared, name: &str) {
    let Some(shared) = membership(s) else { return };
    let r = (|| -> Result<(), ApiFailure> {
        let (_, row) = s.vms.get(name)?;
        let ha = shared.vm(name)?.is_some_and(|e| e.ha);
        let spec = serde_json::to_value(&row.spec)
            .map_err(|e| ApiFailure::internal(format!("cannot encode the spec: {e}")))?;
        shared.set_vm(name, &VmEntry { spec, ha })?;
        Ok(())
    })();
    if let Err(e) = r {
        warn!(vm = name, error = %e.message, "cannot record the VM in the cluster's inventory");
    }
}

/// Before a user's start, stop, set or delete of a VM of the cluster's inventory on this
/// node: refused when another node runs it (this node's row of it may be stale); a start
/// records this node as its owner first, so no other node replicates it meanwhile.
pub fn before_local_op(s: &Shared, name: &str, op: &str) -> Result<(), ApiFailure> {
    let Some(shared) = membership(s) else {
        return Ok(());
    };
    let vm = VmName::new(name).map_err(|e| ApiFailure::invalid(e.to_string()))?;
    if shared.vm(vm.as_str())?.is_none() {
        return Ok(());
    }
    if let Some(owner) = shared.owner(vm.as_str()) {
        if owner != s.cfg.name {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} runs on node {owner}: {op} it there"
            )));
        }
    }
    if op == "start" {
        shared.set_owner(vm.as_str(), Some(&s.cfg.name))?;
    }
    Ok(())
}

/// After a user's stop or shutdown of a cluster VM here: no node runs it now.
pub fn after_local_stop(s: &Shared, name: &str) {
    let Some(shared) = membership(s) else { return };
    if shared.owner(name).as_deref() == Some(s.cfg.name.as_str())
        && matches!(local_state(s, name), Ok(Some(VmState::Off)))
    {
        let _ = shared.set_owner(name, None);
    }
}

/// Whether the VM is highly available (the cluster, not the user, starts and stops it).
pub fn is_ha(s: &Shared, name: &str) -> bool {
    membership(s)
        .and_then(|sh| sh.vm(name).ok().flatten())
        .is_some_and(|e| e.ha)
}

/// Refuses a direct start, stop or delete of an HA VM.
pub fn refuse_if_ha(s: &Shared, name: &str, op: &str) -> Result<(), ApiFailure> {
    if is_ha(s, name) {
        return Err(ApiFailure::conflict(format!(
            "VM {name} is highly available: the cluster decides where it runs, so it cannot be {op} directly; move it with `ferry vm migrate {name} --to NODE`, or make it an ordinary VM first with `ferry vm ha disable {name}`"
        )));
    }
    Ok(())
}

/// `ferry vm ha enable|disable VM`.
pub async fn set_ha(
    s: &Arc<Shared>,
    name: &str,
    enabled: bool,
) -> Result<ClusterReply, ApiFailure> {
    let shared = member(s)?;
    let vm = VmName::new(name).map_err(|e| ApiFailure::invalid(e.to_string()))?;
    let id = resource_id(vm.as_str())?;
    let mut entry = match shared.vm(vm.as_str())? {
        Some(e) => e,
        None if enabled => into_inventory(s, &shared, &vm)?,
        None => {
            return Err(ApiFailure::not_found(format!(
                "VM {vm} is not in the cluster's inventory (run this on the node that has it)"
            )))
        }
    };
    if entry.ha == enabled {
        return Ok(ClusterReply {
            message: format!(
                "VM {vm} is already {}",
                if enabled {
                    "highly available"
                } else {
                    "an ordinary VM"
                }
            ),
        });
    }
    if enabled {
        let xml = pacemaker::vm_resource_xml(vm.as_str())?;
        entry.ha = true;
        shared.set_vm(vm.as_str(), &entry)?;
        if let Err(e) = blocking(move || pacemaker::create_resource(&xml)).await {
            entry.ha = false;
            shared.set_vm(vm.as_str(), &entry)?;
            return Err(e);
        }
        info!(vm = %vm, "highly available");
        Ok(ClusterReply {
            message: format!(
                "VM {vm} is highly available: the cluster keeps it running on one of its nodes"
            ),
        })
    } else {
        blocking(move || pacemaker::delete_resource(&id)).await?;
        entry.ha = false;
        shared.set_vm(vm.as_str(), &entry)?;
        info!(vm = %vm, "no longer highly available");
        Ok(ClusterReply {
            message: format!("VM {vm} is an ordinary VM again; it keeps running where it is"),
        })
    }
}

/// `ha enable` of a VM this node has that is not in the inventory yet (one made before
/// the node joined, or a replica the Broker placed here and that was failed over): it
/// joins the inventory, if its disks are on the shared directory and it is not a replica
/// still receiving replication.
fn into_inventory(s: &Shared, shared: &SharedDir, vm: &VmName) -> Result<VmEntry, ApiFailure> {
    let row = s.store.get_vm(vm)?;
    if let Some(rel) = s.store.replication(row.id)? {
        use ferry_domain::ReplicationState as St;
        let failed_over = matches!(rel.state, St::FailedOver | St::FailedOverWaitingCompletion);
        if rel.role == ferry_domain::Role::Replica && !failed_over {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} is a replica receiving replication: fail it over first (ferry failover start {vm})"
            )));
        }
    }
    if let Some(d) = row
        .spec
        .disks
        .iter()
        .find(|d| !Path::new(&d.file).starts_with(shared.root()))
    {
        return Err(ApiFailure::invalid(format!(
            "VM {vm}'s disk {} is not on the cluster's shared directory ({}), so no other node could run it",
            d.file,
            shared.root().display()
        )));
    }
    record_vm(s, vm.as_str());
    let entry = shared.vm(vm.as_str())?.ok_or_else(|| {
        ApiFailure::internal(format!(
            "VM {vm} could not be recorded in the cluster's inventory"
        ))
    })?;
    if local_state(s, vm.as_str())?.is_some_and(|st| st != VmState::Off) {
        shared.set_owner(vm.as_str(), Some(&s.cfg.name))?;
    }
    // A failed-over replica the Broker placed here is the cluster's VM now, not a replica
    // for the Broker to move.
    crate::broker::forget(s, vm.as_str());
    info!(vm = %vm, "recorded in the cluster's inventory");
    Ok(entry)
}

/// Makes the local store's row of a cluster VM match the inventory (the VM may have been
/// created or changed on another node).
fn adopt(s: &Arc<Shared>, shared: &SharedDir, name: &str) -> Result<(), ApiFailure> {
    let entry = shared.vm(name)?.ok_or_else(|| {
        ApiFailure::not_found(format!("VM {name} is not in the cluster's inventory"))
    })?;
    let spec: VmSpec = serde_json::from_value(entry.spec).map_err(|e| {
        ApiFailure::invalid(format!("the inventory's spec of VM {name} is damaged: {e}"))
    })?;
    let vm = VmName::new(name).map_err(|e| ApiFailure::invalid(e.to_string()))?;
    let vm_id = match s.store.get_vm(&vm) {
        Ok(row) if row.spec == spec => row.id,
        Ok(row) => {
            s.store.set_vm_spec(row.id, &spec)?;
            row.id
        }
        Err(ferry_store::StoreError::NotFound(_)) => {
            let row = s.store.insert_vm(&spec, crate::replication::now_unix())?;
            info!(vm = name, "adopted from the cluster's inventory");
            row.id
        }
        Err(e) => return Err(e.into()),
    };
    import_relationship(s, shared, name, vm_id)
}

/// What the OCF agent asks: Pacemaker's action on a VM on this node.
pub async fn agent(s: &Arc<Shared>, req: AgentRequest) -> AgentReply {
    let reply = |rc: i32, message: String| AgentReply { rc, message };
    let Some(shared) = membership(s) else {
        return reply(
            rc::ERR_INSTALLED,
            format!("{} is not a cluster node", s.cfg.name),
        );
    };
    if VmName::new(&req.vm).is_err() {
        return reply(rc::ERR_CONFIGURED, format!("bad VM name {:?}", req.vm));
    }
    let vm = req.vm.as_str();
    // Only a VM this node does not know, or knows as off with no QEMU left, is "not
    // running": Pacemaker starts it elsewhere on that word, so anything unsure is an error
    // (and Pacemaker fences this node rather than risk two copies).
    let state = match local_state(s, vm) {
        Ok(st) => st,
        Err(e) => return reply(rc::ERR_GENERIC, e.message),
    };
    let running = matches!(state, Some(VmState::Running | VmState::Paused));
    let r: Result<AgentReply, ApiFailure> = async {
        match req.action.as_str() {
            "monitor" => Ok(match state {
                Some(VmState::Running | VmState::Paused) => {
                    reply(rc::SUCCESS, format!("{vm} runs here"))
                }
                None | Some(VmState::Off) => {
                    reply(rc::NOT_RUNNING, format!("{vm} does not run here"))
                }
                Some(other) => reply(rc::ERR_GENERIC, format!("{vm} is {other} here")),
            }),
            "start" => {
                if running {
                    return Ok(reply(rc::SUCCESS, format!("{vm} already runs here")));
                }
                // The owner file still naming another node: that node died with the VM
                // (a clean stop or a migration hands it over).
                let failed_node = shared.owner(vm).filter(|o| *o != s.cfg.name);
                adopt(s, &shared, vm)?;
                if let Some(node) = failed_node {
                    resync_after_failure(s, vm, &node)?;
                }
                // The owner first: from this moment no other node replicates the VM.
                shared.set_owner(vm, Some(&s.cfg.name))?;
                s.vms.start(vm).await?;
                info!(vm, "started by the cluster");
                Ok(reply(rc::SUCCESS, format!("{vm} started")))
            }
            "stop" => {
                if state.is_none() || state == Some(VmState::Off) {
                    return Ok(reply(rc::SUCCESS, format!("{vm} is not running here")));
                }
                let timeout = Duration::from_secs(req.shutdown_timeout_s.unwrap_or(60));
                let after = s.vms.shutdown(vm, timeout).await;
                if !matches!(after, Ok(ref a) if a.state == VmState::Off) {
                    s.vms.stop(vm).await?;
                }
                // Success only once QEMU is really gone (one stuck in I/O on the shared
                // storage survives SIGKILL): otherwise Pacemaker must fence this node.
                if let Some(st) = local_state(s, vm)? {
                    if st != VmState::Off {
                        return Ok(reply(
                            rc::ERR_GENERIC,
                            format!("{vm} did not stop here (it is {st}); fence this node"),
                        ));
                    }
                }
                if shared.owner(vm).as_deref() == Some(s.cfg.name.as_str()) {
                    if let Err(e) = export_relationship(s, &shared, vm) {
                        warn!(vm, error = %e.message, "cannot export the replication state");
                    }
                    let _ = shared.set_owner(vm, None);
                }
                info!(vm, "stopped by the cluster");
                Ok(reply(rc::SUCCESS, format!("{vm} stopped")))
            }
            "migrate_to" => {
                let Some(target) = req.target.as_deref() else {
                    return Ok(reply(
                        rc::ERR_CONFIGURED,
                        "migrate_to without a target".into(),
                    ));
                };
                // Everything must end before Pacemaker gives up on the operation (it would
                // then stop the VM on both nodes while the migration goes on).
                let budget = req
                    .timeout_ms
                    .map(|ms| Duration::from_millis(ms.saturating_sub(30_000)))
                    .unwrap_or(Duration::from_secs(570))
                    .max(Duration::from_secs(30));
                let outcome = migrate_to(s, &shared, vm, target, budget).await?;
                Ok(reply(
                    rc::SUCCESS,
                    format!(
                        "{vm} migrated to {target} (downtime {} ms)",
                        outcome.downtime_ms.unwrap_or(0)
                    ),
                ))
            }
            "migrate_from" => {
                let rx = s.cluster_incoming.lock().expect("incoming").remove(vm);
                let Some(mut rx) = rx else {
                    // No migration this ferryd received: nothing vouches for the guest.
                    return Ok(reply(
                        rc::ERR_GENERIC,
                        format!("no migration of {vm} arrived here"),
                    ));
                };
                let done =
                    tokio::time::timeout(Duration::from_secs(110), rx.wait_for(Option::is_some))
                        .await
                        .map_err(|_| {
                            ApiFailure::internal(format!(
                                "the migration of {vm} did not finish in time"
                            ))
                        })?
                        .map_err(|_| ApiFailure::internal("the migration watcher ended".into()))?
                        .clone();
                match done {
                    Some(Ok(())) => {
                        let _ = shared.set_owner(vm, Some(&s.cfg.name));
                        if let Ok((_, row)) = s.vms.get(vm) {
                            import_relationship(s, &shared, vm, row.id)?;
                        }
                        Ok(reply(rc::SUCCESS, format!("{vm} arrived and runs here")))
                    }
                    Some(Err(e)) => Ok(reply(
                        rc::ERR_GENERIC,
                        format!("the migration of {vm} failed: {e}"),
                    )),
                    None => Ok(reply(rc::ERR_GENERIC, "no result".into())),
                }
            }
            other => Ok(reply(
                rc::ERR_UNIMPLEMENTED,
                format!("unknown action {other:?}"),
            )),
        }
    }
    .await;
    match r {
        Ok(r) => r,
        Err(e) => {
            warn!(vm, action = %req.action, error = %e.message, "cluster action failed");
            reply(rc::ERR_GENERIC, e.message)
        }
    }
}

/// The VM's state here: `None` if this node does not know it; `Off` only if its QEMU is
/// gone too.
fn local_state(s: &Shared, vm: &str) -> Result<Option<VmState>, ApiFailure> {
    let name = VmName::new(vm).map_err(|e| ApiFailure::invalid(e.to_string()))?;
    match s.store.get_vm(&name) {
        Ok(row) => {
            if row.state == VmState::Off && row.pid.is_some_and(ferry_qemu::process::pid_alive) {
                return Ok(Some(VmState::Stopping));
            }
            Ok(Some(row.state))
        }
        Err(ferry_store::StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The cluster's live-migration CA and the certificate every node presents to it (QEMU's
/// TLS verifies against a CA; the nodes' own certificates are self-signed).
fn make_migration_certs(shared: &SharedDir, cluster: &str) -> Result<(), ApiFailure> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let fail = |e: rcgen::Error| {
        ApiFailure::internal(format!("cannot make the migration certificates: {e}"))
    };
    let dir = shared.migration_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiFailure::internal(format!("cannot create {}: {e}", dir.display())))?;
    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, format!("{cluster} live-migration CA"));
    let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;
    let key = KeyPair::generate().map_err(fail)?;
    let mut leaf = CertificateParams::new(vec![cluster.to_owned()]).map_err(fail)?;
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.distinguished_name.push(DnType::CommonName, cluster);
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).map_err(fail)?;
    ferry_cluster::shared::write_atomic(&dir.join("ca-cert.pem"), ca_cert.pem().as_bytes())?;
    ferry_cluster::shared::write_atomic(&dir.join("cert.pem"), cert.pem().as_bytes())?;
    ferry_cluster::shared::write_atomic_mode(
        &dir.join("key.pem"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    Ok(())
}

/// QEMU's credentials directory for this node's end of a migration, from the cluster's
/// migration certificates (`None` for a cluster made without them: plain TCP).
fn migration_tls(
    s: &Shared,
    shared: &SharedDir,
    end: ferry_qemu::migration::TlsEnd,
) -> Result<Option<ferry_qemu::migration::MigrationTls>, ApiFailure> {
    let src = shared.migration_dir();
    if !src.join("ca-cert.pem").is_file() {
        return Ok(None);
    }
    let (sub, prefix) = match end {
        ferry_qemu::migration::TlsEnd::Target => ("server", "server"),
        ferry_qemu::migration::TlsEnd::Source => ("client", "client"),
    };
    let dir = s.cfg.data_dir.join("migration-tls").join(sub);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiFailure::internal(format!("cannot create {}: {e}", dir.display())))?;
    let read = |f: &str| {
        std::fs::read(src.join(f))
            .map_err(|e| ApiFailure::internal(format!("cannot read the cluster's {f}: {e}")))
    };
    ferry_cluster::shared::write_atomic(&dir.join("ca-cert.pem"), &read("ca-cert.pem")?)?;
    ferry_cluster::shared::write_atomic(
        &dir.join(format!("{prefix}-cert.pem")),
        &read("cert.pem")?,
    )?;
    ferry_cluster::shared::write_atomic_mode(
        &dir.join(format!("{prefix}-key.pem")),
        &read("key.pem")?,
        0o600,
    )?;
    Ok(Some(ferry_qemu::migration::MigrationTls {
        dir,
        hostname: shared.config()?.name,
    }))
}

/// What the last live migration of a VM cost, kept beside its disks.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LastMigration {
    from: String,
    to: String,
    downtime_ms: Option<u64>,
    total_ms: u64,
    #[serde(default)]
    encrypted: bool,
}

/// Live-migrates `vm` from this node to `target`: the target's ferryd (reached over TLS with
/// the cluster's node token, its certificate pinned from its node record) starts the VM as
/// a migration target, then QEMU sends it over the cluster network.
async fn migrate_to(
    s: &Arc<Shared>,
    shared: &SharedDir,
    vm: &str,
    target: &str,
    budget: Duration,
) -> Result<ferry_qemu::migration::MigrationOutcome, ApiFailure> {
    let started = tokio::time::Instant::now();
    let sh = shared.clone();
    let t = target.to_owned();
    let (rec, token) = blocking(move || Ok((sh.node_record(&t)?, sh.token()?))).await?;
    let client = ferry_client::Client::new(ferry_client::Endpoint::Tls {
        addr: rec.api.clone(),
        fingerprint: rec.fingerprint.clone(),
        token,
    });
    let reply: IncomingReply = client
        .post(
            "/v1/cluster/incoming",
            &IncomingRequest {
                vm: vm.to_owned(),
                source: s.cfg.name.clone(),
                replication: None,
            },
        )
        .await
        .map_err(|e| ApiFailure::internal(format!("node {target} cannot receive {vm}: {e}")))?;
    let listen: std::net::SocketAddr = reply.listen.parse().map_err(|_| {
        ApiFailure::internal(format!(
            "node {target} answered a bad address {:?}",
            reply.listen
        ))
    })?;
    // A cycle under way finishes first (its capture holds the VM's bitmaps; its commit
    // moves the relationship on), so the target takes the relationship as it stands.
    // No new cycle starts from now on (the flag), and the one under way ends first.
    let (_, row) = s.vms.get(vm)?;
    s.cluster_migrating
        .lock()
        .expect("migrating")
        .insert(row.id);
    let deadline = started + budget / 4;
    while s.cycle_busy(row.id) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = budget
        .saturating_sub(started.elapsed())
        .max(Duration::from_secs(10));
    let tls = migration_tls(s, shared, ferry_qemu::migration::TlsEnd::Source)?;
    let outcome = s.vms.migrate_out(vm, listen, left, tls.as_ref()).await;
    s.cluster_migrating
        .lock()
        .expect("migrating")
        .remove(&row.id);
    let outcome = outcome?;
    if let Err(e) = export_relationship(s, shared, vm) {
        warn!(vm, error = %e.message, "cannot export the replication state");
    }
    let last = LastMigration {
        from: s.cfg.name.clone(),
        to: target.to_owned(),
        downtime_ms: outcome.downtime_ms,
        total_ms: outcome.total_ms,
        encrypted: tls.is_some(),
    };
    let _ = ferry_cluster::shared::write_atomic(
        &shared.vms_dir().join(vm).join("last-migration.json"),
        &serde_json::to_vec(&last).expect("serializable"),
    );
    let _ = shared.set_owner(vm, Some(target));
    Ok(outcome)
}

/// `POST /v1/cluster/incoming` (from another node): start `vm` here as a migration target.
pub async fn incoming(s: &Arc<Shared>, req: IncomingRequest) -> Result<IncomingReply, ApiFailure> {
    VmName::new(&req.vm).map_err(|e| ApiFailure::invalid(e.to_string()))?;
    let shared = member(s)?;
    let cfg = shared.config()?;
    let me = cfg.node(&s.cfg.name).ok_or_else(|| {
        ApiFailure::conflict(format!("{} is not in the cluster's node list", s.cfg.name))
    })?;
    let ip: std::net::IpAddr = me
        .address
        .parse()
        .map_err(|_| ApiFailure::internal(format!("bad node address {}", me.address)))?;
    adopt(s, &shared, &req.vm)?;
    let tls = migration_tls(s, &shared, ferry_qemu::migration::TlsEnd::Target)?;
    let (listen, rx) = s.vms.incoming(&req.vm, ip, tls.as_ref()).await?;
    s.cluster_incoming
        .lock()
        .expect("incoming")
        .insert(req.vm.clone(), rx);
    info!(vm = %req.vm, from = %req.source, %listen, "receiving a live migration");
    Ok(IncomingReply {
        listen: listen.to_string(),
    })
}

/// Whether `token` is the cluster's node token (accepted by the TLS API for node-to-node
/// calls only).
pub fn is_node_token(s: &Shared, token: &str) -> bool {
    membership(s)
        .and_then(|sh| sh.token().ok())
        .is_some_and(|t| {
            !t.is_empty() && crate::identity::constant_time_eq(t.as_bytes(), token.as_bytes())
        })
}

/// `ferry vm migrate VM --to NODE`: Pacemaker moves the HA VM (it calls the agent's
/// migrate_to on the VM's node and migrate_from on the target), and the preference the
/// move leaves is dropped once the VM runs there.
pub async fn migrate(s: &Arc<Shared>, vm: &str, to: &str) -> Result<MigrateReply, ApiFailure> {
    VmName::new(vm).map_err(|e| ApiFailure::invalid(e.to_string()))?;
    let shared = member(s)?;
    let cfg = shared.config()?;
    if cfg.node(to).is_none() {
        return Err(ApiFailure::invalid(format!(
            "{to} is not a node of cluster {}",
            cfg.name
        )));
    }
    if !is_ha(s, vm) {
        return Err(ApiFailure::conflict(format!(
            "VM {vm} is not highly available; make it so first (ferry vm ha enable {vm}): the cluster moves it"
        )));
    }
    let id = resource_id(vm)?;
    let before = shared.owner(vm);
    if before.as_deref() == Some(to) {
        return Err(ApiFailure::conflict(format!(
            "VM {vm} already runs on {to}"
        )));
    }
    let last_path = shared.vms_dir().join(vm).join("last-migration.json");
    let _ = std::fs::remove_file(&last_path);
    let (i, t) = (id.clone(), to.to_owned());
    blocking(move || pacemaker::move_resource(&i, &t)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let result = loop {
        let st = blocking(pacemaker::status).await?;
        if let Some(r) = st.resources.iter().find(|r| r.id == id) {
            if r.active && r.role == "Started" && r.nodes == [to.to_owned()] {
                break Ok(());
            }
            if r.failed {
                break Err(ApiFailure::qemu(format!(
                    "the cluster could not move {vm} to {to}; see `ferry cluster status` and the nodes' logs"
                )));
            }
        }
        if tokio::time::Instant::now() > deadline {
            break Err(ApiFailure::internal(format!(
                "{vm} did not arrive on {to} in 10 min"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let i = id.clone();
    let _ = blocking(move || pacemaker::clear_move(&i)).await;
    result?;
    let last: Option<LastMigration> = std::fs::read(&last_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let (downtime_ms, total_ms, encrypted) = match &last {
        Some(l) if l.to == to => (l.downtime_ms, Some(l.total_ms), l.encrypted),
        _ => (None, None, false),
    };
    Ok(MigrateReply {
        message: match (downtime_ms, total_ms) {
            (Some(d), Some(t)) => format!(
                "VM {vm} moved live to {to} in {:.1} s; the guest paused for {d} ms",
                t as f64 / 1000.0
            ),
            _ => format!("VM {vm} runs on {to} now"),
        },
        node: to.to_owned(),
        downtime_ms,
        total_ms,
        encrypted,
    })
}

/// A replicated VM restarted here after its node failed: its QEMU died with the node, and
/// with it the change tracking since the last saved bitmap, so the next cycle compares
/// both sides by chunk hashes (as `ferry replication resume --resync` would) instead of
/// waiting for an administrator, and replication goes on without a new initial copy.
fn resync_after_failure(s: &Arc<Shared>, vm: &str, node: &str) -> Result<(), ApiFailure> {
    use ferry_domain::ReplicationState as St;
    let (name, row) = s.vms.get(vm)?;
    let Some(rel) = s.store.replication(row.id)? else {
        return Ok(());
    };
    if rel.role != ferry_domain::Role::Primary
        || !matches!(
            rel.state,
            St::Replicating | St::Error | St::ResynchronizationRequired
        )
    {
        return Ok(());
    }
    s.store
        .set_replication_state(row.id, St::Resynchronizing, None)?;
    s.events.emit(
        &name,
        "replication_state",
        &format!(
            "{} -> {} (restarted on {} after node {node} failed)",
            rel.state,
            St::Resynchronizing,
            s.cfg.name
        ),
    );
    s.events.emit(
        &name,
        "resync_started",
        "resynchronization started: both sides are compared by chunk hashes",
    );
    s.kick(row.id).notify_one();
    Ok(())
}

/// The identity a VM replicates with, and the name it gives the replica: the cluster's for
/// a VM of the cluster's inventory (whichever node runs it, the replica sees one primary)
/// or a replica its Broker placed here, else this host's own.
pub fn replication_identity(s: &Shared, vm: &str) -> (Arc<crate::identity::Identity>, String) {
    if let Some(shared) = membership(s) {
        // A VM of the inventory, or a replica the Broker placed here (replicating back
        // after a failover): the cluster's, named as its Broker when it has one (what
        // the other site authorizes, as Hyper-V's primaries authorize a Broker's name).
        let ours = shared.vm(vm).ok().flatten().is_some()
            || crate::broker::placement(&shared, vm).as_deref() == Some(s.cfg.name.as_str());
        if ours {
            if let (Some(id), Ok(cfg)) = (cluster_identity(s, &shared), shared.config()) {
                let name = shared.broker().ok().flatten().map_or(cfg.name, |b| b.name);
                return (id, name);
            }
        }
    }
    (s.identity.clone(), s.cfg.name.clone())
}

/// The certificate this host's replica server presents: the cluster's on a cluster node
/// (reverse replication of a cluster VM pins it), else the host's.
pub fn replica_server_identity(s: &Shared) -> Arc<crate::identity::Identity> {
    membership(s)
        .and_then(|shared| cluster_identity(s, &shared))
        .unwrap_or_else(|| s.identity.clone())
}

fn cluster_identity(s: &Shared, shared: &SharedDir) -> Option<Arc<crate::identity::Identity>> {
    let dir = shared.identity_dir();
    let mut cached = s.cluster_identity.lock().expect("cluster identity");
    if let Some((d, id)) = cached.as_ref() {
        if *d == dir {
            return Some(id.clone());
        }
    }
    if !dir.join("host.crt").exists() {
        return None;
    }
    let name = shared.config().ok()?.name;
    match crate::identity::Identity::load_or_create(&dir, &name) {
        Ok(id) => {
            let id = Arc::new(id);
            *cached = Some((dir, id.clone()));
            Some(id)
        }
        Err(e) => {
            warn!(error = %e, "cannot load the cluster's certificate");
            None
        }
    }
}

/// Whether this node runs the VM's replication cycles: always for a VM of its own; for a
/// cluster VM, only on the node running it, or, while it is off, on the node that ran it
/// last (a node it left must not read its disks).
pub fn replicates_here(s: &Shared, vm_id: i64) -> bool {
    let Some(shared) = membership(s) else {
        return true;
    };
    let Ok(Some(row)) = s.store.vm_by_id(vm_id) else {
        return true;
    };
    let name = row.spec.name.as_str();
    match shared.vm(name) {
        Ok(None) => return true,
        Ok(Some(_)) => {}
        // The inventory unreadable: not sure the VM is still ours.
        Err(_) => return false,
    }
    if s.cluster_migrating
        .lock()
        .expect("migrating")
        .contains(&vm_id)
    {
        return false;
    }
    let me = s.cfg.name.as_str();
    match shared.owner(name) {
        Some(owner) => owner == me,
        None => shared.last_owner(name).is_none_or(|l| l == me),
    }
}

/// A primary relationship as the shared directory carries it between nodes.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct RelationshipExport {
    partner_name: String,
    partner_addr: String,
    partner_fingerprint: String,
    settings: ferry_domain::replication::ReplicationSettings,
    state: String,
    generation: i64,
    last_cycle: i64,
    last_point_at: Option<i64>,
    last_error: Option<String>,
    created_at: i64,
}

fn relationship_path(shared: &SharedDir, vm: &str) -> PathBuf {
    shared.vms_dir().join(vm).join("replication.json")
}

/// Writes the VM's primary relationship to the shared directory (when it changed), so the
/// node that runs the VM next goes on with it: same cycle numbers, same bitmaps.
fn export_relationship(s: &Shared, shared: &SharedDir, vm: &str) -> Result<(), ApiFailure> {
    let name = VmName::new(vm).map_err(|e| ApiFailure::invalid(e.to_string()))?;
    let row = s.store.get_vm(&name)?;
    let path = relationship_path(shared, vm);
    let Some(rel) = s.store.replication(row.id)? else {
        // Replication removed here: nobody goes on with it.
        let _ = std::fs::remove_file(&path);
        return Ok(());
    };
    if rel.role != ferry_domain::Role::Primary {
        return Ok(());
    }
    let export = RelationshipExport {
        partner_name: rel.partner_name,
        partner_addr: rel.partner_addr,
        partner_fingerprint: rel.partner_fingerprint,
        settings: rel.settings,
        state: rel.state.as_str().to_owned(),
        generation: rel.generation,
        last_cycle: rel.last_cycle,
        last_point_at: rel.last_point_at,
        last_error: rel.last_error,
        created_at: rel.created_at,
    };
    let bytes = serde_json::to_vec_pretty(&export).expect("serializable");
    if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
        ferry_cluster::shared::write_atomic(&path, &bytes)?;
    }
    Ok(())
}

/// Takes the VM's primary relationship from the shared directory into this node's store
/// (unless this node's own is newer) and starts its replication task here.
fn import_relationship(
    s: &Arc<Shared>,
    shared: &SharedDir,
    vm: &str,
    vm_id: i64,
) -> Result<(), ApiFailure> {
    let path = relationship_path(shared, vm);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(());
    };
    let e: RelationshipExport = serde_json::from_slice(&bytes)
        .map_err(|err| ApiFailure::internal(format!("{} is damaged: {err}", path.display())))?;
    let state = e
        .state
        .parse()
        .map_err(|err: String| ApiFailure::internal(format!("{}: {err}", path.display())))?;
    let rel = ferry_store::ReplicationRow {
        vm_id,
        role: ferry_domain::Role::Primary,
        partner_name: e.partner_name,
        partner_addr: e.partner_addr,
        partner_fingerprint: e.partner_fingerprint,
        settings: e.settings,
        state,
        generation: e.generation,
        last_cycle: e.last_cycle,
        last_point_at: e.last_point_at,
        last_error: e.last_error,
        created_at: e.created_at,
    };
    match s.store.replication(vm_id)? {
        None => s.store.insert_replication(&rel)?,
        Some(mine) if mine.last_cycle > rel.last_cycle => return Ok(()),
        Some(mine) if mine == rel => {}
        Some(_) => s.store.update_replication(&rel)?,
    }
    info!(
        vm,
        cycle = rel.last_cycle,
        "replication taken over from the cluster's inventory"
    );
    s.spawn_primary(vm_id);
    s.kick(vm_id).notify_one();
    Ok(())
}

/// The relationships of the cluster VMs this node replicates go to the shared directory at
/// each replication event (a cycle replicated, suspended, resumed, …) and every 2 s.
pub fn spawn_exporter(s: &Arc<Shared>) {
    let s = s.clone();
    let changed = s.events.cluster_changed.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = changed.notified() => {}
            }
            let Some(shared) = membership(&s) else {
                continue;
            };
            crate::broker::node_tick(&s).await;
            let Ok(rels) = s.store.list_replications() else {
                continue;
            };
            for rel in rels {
                if rel.role != ferry_domain::Role::Primary || !replicates_here(&s, rel.vm_id) {
                    continue;
                }
                let Ok(Some(row)) = s.store.vm_by_id(rel.vm_id) else {
                    continue;
                };
                let name = row.spec.name.to_string();
                if shared.vm(&name).ok().flatten().is_none() {
                    continue;
                }
                if let Err(e) = export_relationship(&s, &shared, &name) {
                    warn!(vm = %name, error = %e.message, "cannot export the replication state");
                }
            }
        }
    });
}

/// The Broker's admin socket on the node that runs it.
pub const BROKER_SOCKET: &str = "/run/ferry/broker.sock";

/// The Broker as configured and as Pacemaker runs it.
fn broker_of(shared: &SharedDir, stack: &pacemaker::StackStatus) -> Option<BrokerStatus> {
    let cfg = shared.broker().ok().flatten()?;
    let data = shared.broker_dir().join("data");
    let fingerprint = std::fs::read(data.join("host.crt"))
        .ok()
        .and_then(|pem| {
            rustls_pemfile::certs(&mut pem.as_slice())
                .next()
                .and_then(Result::ok)
        })
        .map(|c| ferry_client::fingerprint(&c))
        .unwrap_or_default();
    let rsc = stack.resources.iter().find(|r| r.id == "broker");
    let (node, state) = match rsc {
        Some(r) if r.failed => (r.nodes.first().cloned(), "failed"),
        Some(r) if r.active => (r.nodes.first().cloned(), "started"),
        _ => (None, "stopped"),
    };
    Some(BrokerStatus {
        name: cfg.name,
        api: format!("{}:{}", cfg.address, cfg.api_port),
        address: cfg.address,
        fingerprint,
        token_file: data.join("api.token").display().to_string(),
        admin_socket: BROKER_SOCKET.to_owned(),
        node,
        state: state.to_owned(),
        replicas: crate::broker::replicas(shared),
    })
}

/// `ferry replica-broker set`: makes (or removes) the cluster's Replica Broker, a
/// Pacemaker group of a floating address and a ferryd of its own whose store, certificate
/// and replicas live on the shared directory, so that whichever node runs it, primaries
/// find the same replica server with the same recovery points.
pub async fn set_broker(
    s: &Arc<Shared>,
    req: BrokerSetRequest,
) -> Result<BrokerStatus, ApiFailure> {
    let shared = member(s)?;
    let cluster = shared.config()?;
    if !req.enable {
        let Some(mut removed) = broker_of(&shared, &Default::default()) else {
            return Err(ApiFailure::conflict(format!(
                "cluster {} has no Replica Broker",
                cluster.name
            )));
        };
        blocking(pacemaker::delete_broker_group).await?;
        shared.set_broker(None)?;
        info!("Replica Broker removed; its data stays in the shared directory's broker/");
        removed.state = "removed".to_owned();
        return Ok(removed);
    }
    if let Some(b) = shared.broker()? {
        return Err(ApiFailure::conflict(format!(
            "cluster {} already has a Replica Broker ({} at {}); remove it first with --disable",
            cluster.name, b.name, b.address
        )));
    }
    let address = req.address.ok_or_else(|| {
        ApiFailure::invalid("--address IP is needed: the Broker's floating address".into())
    })?;
    let ip: std::net::IpAddr = address
        .parse()
        .map_err(|_| ApiFailure::invalid(format!("{address:?} is not an IP address")))?;
    if cluster.nodes.iter().any(|n| n.address == address) {
        return Err(ApiFailure::invalid(format!(
            "{address} is a node's address; the Broker needs an address of its own"
        )));
    }
    let prefix_len = req.prefix_len.unwrap_or(24);
    if prefix_len == 0 || prefix_len > if ip.is_ipv4() { 32 } else { 128 } {
        return Err(ApiFailure::invalid(format!(
            "prefix length {prefix_len} is out of range"
        )));
    }
    let api_port = req.api_port.unwrap_or(7445);
    let name = req
        .name
        .unwrap_or_else(|| format!("{}-broker", cluster.name));
    ferry_cluster::check_name(&name).map_err(ApiFailure::from)?;
    let cfg = BrokerConfig {
        name: name.clone(),
        address: address.clone(),
        prefix_len,
        api_port,
    };
    let dir = shared.broker_dir();
    let data = dir.join("data");
    std::fs::create_dir_all(&data)
        .map_err(|e| ApiFailure::internal(format!("cannot create {}: {e}", data.display())))?;
    // Its certificate is the cluster's: the one identity the cluster's VMs replicate with
    // and its nodes' replica servers answer with, so that a replica (or a primary
    // reversing to this cluster) knows the cluster by the Broker's certificate. Copied
    // now, so it can be pinned before the Broker first runs.
    let ident = shared.identity_dir();
    for f in ["host.crt", "host.key"] {
        let bytes = std::fs::read(ident.join(f))
            .map_err(|e| ApiFailure::internal(format!("cannot read the cluster's {f}: {e}")))?;
        ferry_cluster::shared::write_atomic_mode(&data.join(f), &bytes, 0o600)?;
    }
    crate::identity::Identity::load_or_create(&data, &name)
        .map_err(|e| ApiFailure::internal(format!("cannot load the Broker's certificate: {e}")))?;
    let accel = match s.cfg.accel {
        crate::config::AccelChoice::Auto => "auto",
        crate::config::AccelChoice::Kvm => "kvm",
        crate::config::AccelChoice::Tcg => "tcg",
    };
    let mut roots: Vec<String> = s
        .cfg
        .file_roots
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    roots.push(shared.root().display().to_string());
    let roots = roots
        .iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let toml = format!(
        "# The Replica Broker's ferryd (written by `ferry replica-broker set`; Pacemaker runs it).\n\
name = {name:?}\ndata_dir = {:?}\nvm_storage = {:?}\nadmin_socket = {BROKER_SOCKET:?}\n\
tls_listen = \"{}\"\naccel = \"{accel}\"\nfile_roots = [{roots}]\nbroker_for = {:?}\n",
        data.display().to_string(),
        dir.join("vms").display().to_string(),
        std::net::SocketAddr::new(ip, api_port),
        shared.root().display().to_string(),
    );
    let config = dir.join("ferryd.toml");
    ferry_cluster::shared::write_atomic(&config, toml.as_bytes())?;
    shared.set_broker(Some(&cfg))?;
    let ferryd = std::env::current_exe()
        .map_err(|e| ApiFailure::internal(format!("cannot find ferryd: {e}")))?;
    let xml = pacemaker::broker_group_xml(
        &address,
        prefix_len,
        &config.display().to_string(),
        &ferryd.display().to_string(),
    );
    if let Err(e) = blocking(move || pacemaker::create_resource(&xml)).await {
        shared.set_broker(None)?;
        return Err(e);
    }
    info!(broker = %name, %address, "Replica Broker created");
    // Wait (briefly) until it runs, so the reply says where, and until the online nodes
    // listen on its port (they hold the replicas it places).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = blocking(pacemaker::status).await?;
        let b = broker_of(&shared, &st).expect("just configured");
        let ready = b.state == "started" && {
            let (shared, st) = (shared.clone(), st.clone());
            tokio::task::spawn_blocking(move || crate::broker::nodes_listen(&shared, &st))
                .await
                .unwrap_or(false)
        };
        if ready || tokio::time::Instant::now() > deadline {
            return Ok(b);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `ferry replica-broker show`.
pub async fn broker(s: &Arc<Shared>) -> Result<BrokerStatus, ApiFailure> {
    let shared = member(s)?;
    let st = blocking(pacemaker::status).await.unwrap_or_default();
    broker_of(&shared, &st).ok_or_else(|| {
        ApiFailure::not_found(
            "this cluster has no Replica Broker; create one with `ferry replica-broker set --enable --address IP`".into(),
        )
    })
}
