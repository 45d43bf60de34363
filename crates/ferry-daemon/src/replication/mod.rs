//! Replication: the primary's cycles ([`primary`]), the replica server ([`replica`]), the
//! session protocol between them ([`proto`]), and the operations the API exposes.

pub mod boot_files;
pub mod failover;
pub mod hashes;
pub mod health;
pub mod metrics;
pub mod primary;
pub mod proto;
pub mod reip;
pub mod replica;
pub mod rotation;
pub mod test_failover;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_api_types::{
    ActionReply, EnableReplicationRequest, Progress, RecoveryPointInfo, ReplicaServerInfo,
    ReplicaServerSetRequest, ReplicationHealthInfo, ReplicationInfo,
};
use ferry_domain::replication::{
    on_request, parse_duration, InitialMethod, ReplicationSettings, Request,
};
use ferry_domain::{Interval, ReplicationState, RetentionPolicy, Role, VmName, VmState};
use ferry_store::{ReplicationRow, Store};
use ferry_wire::RateLimiter;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::ApiFailure;
use crate::identity::Identity;
use crate::vms::VmManager;

/// UNIX seconds now.
pub fn now_unix() -> i64 {
    now_ms() / 1000
}

/// UNIX milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `qemu-nbd` next to the configured `qemu-img`.
pub fn qemu_nbd_path(cfg: &Config) -> PathBuf {
    match cfg.qemu_img.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("qemu-nbd"),
        _ => PathBuf::from("qemu-nbd"),
    }
}

/// Replication events: kept in the store (`ferry events`), and logged.
pub struct Events {
    store: Arc<Store>,
    /// Woken by every event but health changes: the health watcher re-evaluates at once.
    pub(crate) changed: Arc<tokio::sync::Notify>,
    /// Woken by every event but health changes too: a cluster node exports the changed
    /// relationship to the shared directory at once.
    pub(crate) cluster_changed: Arc<tokio::sync::Notify>,
}

/// Stable codes of event kinds (as Hyper-V's event ids), and their default severity.
pub fn event_code(kind: &str) -> (u32, &'static str) {
    match kind {
        "replication_enabled" => (1000, "info"),
        "replica_created" => (1001, "info"),
        "replication_removed" => (1002, "info"),
        "replication_state" => (1010, "info"),
        "health_changed" => (1020, "info"),
        "cycle_failed" => (1030, "warning"),
        "resync_started" => (1040, "warning"),
        "resync_finished" => (1041, "info"),
        "recovery_point_added" => (1050, "info"),
        "initial_copy_imported" => (1060, "info"),
        "app_consistent_skipped" => (1070, "warning"),
        "statistics_reset" => (1090, "info"),
        "failover_started" => (1110, "warning"),
        "planned_failover" => (1113, "info"),
        "replication_reversed" => (1114, "info"),
        "failover_cancelled" => (1111, "info"),
        "failover_completed" => (1112, "info"),
        "test_failover_started" => (1100, "info"),
        "test_failover_stopped" => (1101, "info"),
        "failover_ip_applied" => (1116, "info"),
        "failover_ip_failed" => (1117, "error"),
        "checkpoint_applied" => (1120, "warning"),
        "checkpoint_created" => (1121, "info"),
        "checkpoint_deleted" => (1122, "info"),
        "primary_refused" => (1200, "warning"),
        "reverse_accepted" => (1115, "warning"),
        _ => (1999, "info"),
    }
}

impl Events {
    /// Records an event about a VM (in the store, and in ferryd's log).
    pub fn emit(&self, vm: &VmName, kind: &str, message: &str) {
        self.record(Some(vm.as_str()), kind, None, message);
    }

    /// Records an event about a VM known by id.
    pub fn emit_id(&self, vm_id: i64, kind: &str, message: &str) {
        let name = self
            .store
            .vm_by_id(vm_id)
            .ok()
            .flatten()
            .map(|v| v.spec.name.to_string());
        self.record(name.as_deref(), kind, None, message);
    }

    /// Records an event about the host rather than one VM (a refused peer).
    pub fn emit_host(&self, kind: &str, message: &str) {
        self.record(None, kind, None, message);
    }

    /// Records an event with an explicit severity (`info`, `warning`, `error`).
    pub fn emit_with(&self, vm: &str, kind: &str, severity: &str, message: &str) {
        self.record(Some(vm), kind, Some(severity), message);
    }

    fn record(&self, vm: Option<&str>, kind: &str, severity: Option<&str>, message: &str) {
        let (code, default) = event_code(kind);
        // A state change into trouble is more than information.
        let severity = severity.unwrap_or(
            if kind == "replication_state" && message.contains("-> resynchronization_required") {
                "error"
            } else if kind == "replication_state" && message.contains("-> error") {
                "warning"
            } else {
                default
            },
        );
        // The relationship too, so failovers, state changes and failed cycles can be
        // followed by relationship in the log (a VM re-replicated gets a new one). As a
        // string, like in the cycle spans: the ids are random 64-bit numbers, which JSON
        // tools (jq, log stores with signed or float numbers) would not keep exact.
        let relationship = vm
            .and_then(|v| VmName::new(v).ok())
            .and_then(|v| self.store.get_vm(&v).ok())
            .and_then(|v| self.store.replication(v.id).ok().flatten())
            .map(|r| r.settings.relationship_id.to_string());
        info!(
            vm = vm.unwrap_or("-"),
            relationship = relationship.as_deref(),
            event = kind,
            code,
            severity,
            "{message}"
        );
        let row = ferry_store::EventRow {
            id: 0,
            at_ms: now_ms(),
            vm: vm.map(str::to_owned),
            code,
            kind: kind.to_owned(),
            severity: severity.to_owned(),
            message: message.to_owned(),
        };
        if let Err(e) = self.store.insert_event(&row) {
            warn!(error = %e, "cannot record an event");
        }
        if kind != "health_changed" {
            self.changed.notify_one();
            self.cluster_changed.notify_one();
        }
    }
}

/// What the replication engine shares between its tasks and the API.
pub struct Shared {
    /// ferryd's configuration.
    pub cfg: Arc<Config>,
    /// The store.
    pub store: Arc<Store>,
    /// This host's certificate and key.
    pub identity: Arc<Identity>,
    /// The VM manager (locks, QMP of running VMs).
    pub vms: Arc<VmManager>,
    /// The replica-server role.
    pub replica: replica::ReplicaServer,
    /// Events.
    pub events: Events,
    /// Host-wide bandwidth limit for outgoing replication.
    pub host_limiter: Option<Arc<RateLimiter>>,
    progress: Mutex<HashMap<i64, Progress>>,
    kicks: Mutex<HashMap<i64, Arc<Notify>>>,
    limiters: Mutex<HashMap<i64, Arc<RateLimiter>>>,
    tasks: Mutex<HashMap<i64, tokio::task::JoinHandle<()>>>,
    /// Recovery points in use (test failover, failover), never merged away.
    pinned: Mutex<HashMap<i64, Vec<i64>>>,
    /// Per replica VM: held by retention while it merges layers, and by whoever chooses a
    /// point to pin, so a point is never chosen from a list a running merge is rewriting.
    point_locks: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// When an application-consistent point was last attempted, per VM (UNIX s).
    pub(crate) app_consistent_tried: Mutex<HashMap<i64, i64>>,
    /// Frames (about 1 MiB each) that all streaming cycles together may hold in memory
    /// while their links catch up; beyond it a capture's frames wait in its spool.
    pub(crate) stream_budget: Arc<tokio::sync::Semaphore>,
    /// Live migrations arriving on this cluster node, by VM: says once the guest runs here
    /// (what the OCF agent's migrate_from waits for).
    pub(crate) cluster_incoming: Mutex<HashMap<String, IncomingDone>>,
    /// The cluster's replication identity, once loaded (its directory, the identity).
    pub(crate) cluster_identity: Mutex<Option<(std::path::PathBuf, Arc<Identity>)>>,
    /// Cluster VMs being live-migrated away: no new replication cycle starts.
    pub(crate) cluster_migrating: Mutex<std::collections::HashSet<i64>>,
    /// Where a replica cluster's Broker redirected each VM's replication (`address:port`
    /// of the node holding its replica), until that node stops answering or redirects back.
    pub(crate) redirects: Mutex<HashMap<i64, String>>,
}

/// The outcome of a live migration arriving here: `None` while it runs.
pub(crate) type IncomingDone = tokio::sync::watch::Receiver<Option<Result<(), String>>>;

/// The memory all streaming cycles of a host may queue together, in frames of about 1 MiB.
pub(crate) const STREAM_BUDGET_FRAMES: usize = 160;

impl Shared {
    /// The engine's shared state.
    pub fn new(
        cfg: Arc<Config>,
        store: Arc<Store>,
        identity: Arc<Identity>,
        vms: Arc<VmManager>,
    ) -> Arc<Self> {
        // With a schedule the host limiter always exists; its rate follows the clock.
        let host_limiter = if cfg.replication_bandwidth_schedule.is_empty() {
            RateLimiter::shared(cfg.replication_bandwidth_limit)
        } else {
            Some(Arc::new(RateLimiter::new(host_limit_now(&cfg))))
        };
        let events = Events {
            store: store.clone(),
            changed: Arc::new(tokio::sync::Notify::new()),
            cluster_changed: Arc::new(tokio::sync::Notify::new()),
        };
        Arc::new(Self {
            cfg,
            store,
            identity,
            vms,
            replica: replica::ReplicaServer::default(),
            events,
            host_limiter,
            progress: Mutex::new(HashMap::new()),
            kicks: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashMap::new()),
            point_locks: Mutex::new(HashMap::new()),
            app_consistent_tried: Mutex::new(HashMap::new()),
            cluster_incoming: Mutex::new(HashMap::new()),
            cluster_identity: Mutex::new(None),
            cluster_migrating: Mutex::new(Default::default()),
            redirects: Mutex::new(HashMap::new()),
            stream_budget: Arc::new(tokio::sync::Semaphore::new(STREAM_BUDGET_FRAMES)),
        })
    }

    /// Records the progress of what a relationship is doing.
    pub fn set_progress(&self, vm_id: i64, phase: &str, done: u64, total: u64) {
        let percent = if total == 0 {
            0
        } else {
            (done.min(total) * 100 / total) as u8
        };
        self.progress.lock().expect("progress").insert(
            vm_id,
            Progress {
                phase: phase.to_owned(),
                done_bytes: done,
                total_bytes: total,
                percent,
            },
        );
    }

    /// Whether a cycle of the relationship is under way (it shows progress).
    pub fn cycle_busy(&self, vm_id: i64) -> bool {
        self.progress.lock().expect("progress").contains_key(&vm_id)
    }

    /// Clears a relationship's progress.
    pub fn clear_progress(&self, vm_id: i64) {
        self.progress.lock().expect("progress").remove(&vm_id);
    }

    /// The notifier that wakes a relationship's task early.
    pub fn kick(&self, vm_id: i64) -> Arc<Notify> {
        self.kicks
            .lock()
            .expect("kicks")
            .entry(vm_id)
            .or_default()
            .clone()
    }

    /// The relationship's own limiter, following its current setting.
    pub fn limiter(&self, rel: &ReplicationRow) -> Option<Arc<RateLimiter>> {
        let limit = rel.settings.bandwidth_limit?;
        let mut map = self.limiters.lock().expect("limiters");
        let l = map
            .entry(rel.vm_id)
            .or_insert_with(|| Arc::new(RateLimiter::new(limit)));
        if l.rate() != Some(limit) {
            l.set_rate(limit);
        }
        Some(l.clone())
    }

    /// Locks a replica VM's recovery points against retention's merges. Retention holds it
    /// for its whole run; test failover and failover hold it from reading the point list
    /// until their point is pinned (a merge already under way would otherwise delete the
    /// layer they chose).
    pub async fn lock_points(&self, vm_id: i64) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .point_locks
            .lock()
            .expect("point locks")
            .entry(vm_id)
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Pins a recovery point: retention neither drops it nor merges anything it is built on.
    pub fn pin(&self, vm_id: i64, point: i64) {
        self.pinned
            .lock()
            .expect("pinned")
            .entry(vm_id)
            .or_default()
            .push(point);
    }

    /// Releases a pin.
    pub fn unpin(&self, vm_id: i64, point: i64) {
        if let Some(v) = self.pinned.lock().expect("pinned").get_mut(&vm_id) {
            if let Some(i) = v.iter().position(|p| *p == point) {
                v.remove(i);
            }
        }
    }

    /// Recovery points that must not be merged away.
    pub fn pinned_points(&self, vm_id: i64) -> Vec<i64> {
        self.pinned
            .lock()
            .expect("pinned")
            .get(&vm_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Starts the task of a primary relationship (once).
    pub fn spawn_primary(self: &Arc<Self>, vm_id: i64) {
        let mut tasks = self.tasks.lock().expect("tasks");
        if tasks.get(&vm_id).is_some_and(|t| !t.is_finished()) {
            return;
        }
        tasks.insert(vm_id, tokio::spawn(primary::run(self.clone(), vm_id)));
    }

    fn stop_primary(&self, vm_id: i64) {
        if let Some(t) = self.tasks.lock().expect("tasks").remove(&vm_id) {
            t.abort();
        }
    }
}

/// The host-wide limit the schedule sets for the current local time (0 = unlimited).
fn host_limit_now(cfg: &Config) -> u64 {
    ferry_domain::replication::bandwidth_at(
        &cfg.replication_bandwidth_schedule,
        cfg.replication_bandwidth_limit.unwrap_or(0),
        local_minute_of_day(),
    )
}

/// Minutes since local midnight (the schedule is in the host's time zone).
fn local_minute_of_day() -> u32 {
    // SAFETY: localtime_r only writes the tm we pass; time(NULL) has no preconditions.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return ((t / 60) % 1440) as u32;
        }
        (tm.tm_hour * 60 + tm.tm_min) as u32
    }
}

/// Starts the engine: partly received cycles recovered (or their layers removed), the
/// replica server listening if enabled, one task per primary relationship.
pub async fn start(shared: &Arc<Shared>) -> anyhow::Result<()> {
    if let (false, Some(limiter)) = (
        shared.cfg.replication_bandwidth_schedule.is_empty(),
        shared.host_limiter.clone(),
    ) {
        let cfg = shared.cfg.clone();
        tokio::spawn(async move {
            loop {
                let now = host_limit_now(&cfg);
                if limiter.rate().unwrap_or(0) != now {
                    limiter.set_rate(now);
                    info!(
                        bytes_per_sec = now,
                        "host replication bandwidth limit changed by the schedule (0 = unlimited)"
                    );
                }
                tokio::time::sleep(std::time::Duration::from_secs(15)).await;
            }
        });
    }
    health::spawn_watcher(shared.clone());
    // Points in use by a test failover or an uncompleted failover stay pinned across a
    // restart: pinned before the replica server takes points again (retention merges).
    let relationships = shared.store.list_replications()?;
    for rel in &relationships {
        let test = test_failover::current(shared, rel.vm_id).map(|t| t.point);
        let failover = failover::current(shared, rel.vm_id).map(|f| f.point);
        for point in test.into_iter().chain(failover) {
            shared.pin(rel.vm_id, point);
        }
    }
    // Before staged cycles are recovered (which removes layers no point of this node
    // references): replicas a Broker moved to another node are that node's now.
    crate::broker::release_moved(shared);
    let staged = replica::recover_staging(&shared.store)?;
    shared
        .replica
        .staging
        .lock()
        .expect("staging")
        .extend(staged);
    replica::apply_config(shared).await?;
    if let Err(e) = crate::broker::publish(shared) {
        warn!(
            error = format!("{e:#}"),
            "the Replica Broker's nodes cannot see its settings"
        );
    }
    for rel in relationships {
        if rel.role == Role::Primary {
            shared.spawn_primary(rel.vm_id);
        }
    }
    Ok(())
}

fn vm_of(shared: &Shared, name: &str) -> Result<(VmName, ferry_store::VmRow), ApiFailure> {
    let vm = VmName::new(name).map_err(|e| ApiFailure::invalid(e.to_string()))?;
    match shared.store.get_vm(&vm) {
        Ok(row) => Ok((vm, row)),
        // On a Replica Broker: the replica lives on the node the Broker placed it on.
        Err(e) => match crate::broker::brokered_cluster(shared)
            .and_then(|c| crate::broker::placement(&c, vm.as_str()))
        {
            Some(node) if matches!(e, ferry_store::StoreError::NotFound(_)) => {
                Err(ApiFailure::not_found(format!(
                    "the replica of {vm} is held by node {node} of this cluster (the Replica Broker placed it there): run this on {node}"
                )))
            }
            _ => Err(e.into()),
        },
    }
}

pub(crate) fn rel_of(
    shared: &Shared,
    name: &str,
) -> Result<(VmName, ferry_store::VmRow, ReplicationRow), ApiFailure> {
    let (vm, row) = vm_of(shared, name)?;
    let rel = shared.store.replication(row.id)?.ok_or_else(|| {
        ApiFailure::not_found(format!(
            "VM {vm} is not replicated: enable it with `ferry replication enable {vm} --to HOST`"
        ))
    })?;
    Ok((vm, row, rel))
}

/// The API view of a relationship.
pub fn info(shared: &Shared, vm: &VmName, rel: &ReplicationRow) -> ReplicationInfo {
    let pending = if rel.role == Role::Primary {
        primary::pending(shared, rel.vm_id)
            .map(|p| p.spool_bytes)
            .unwrap_or(0)
    } else {
        0
    };
    ReplicationInfo {
        vm: vm.to_string(),
        role: rel.role.as_str().to_owned(),
        state: rel.state.as_str().to_owned(),
        state_label: rel.state.label().to_owned(),
        partner: rel.partner_name.clone(),
        partner_addr: rel.partner_addr.clone(),
        interval_s: rel.settings.interval.secs(),
        recovery_points: rel.settings.retention.additional,
        compression: rel.settings.compression,
        excluded_disks: rel.settings.excluded_disks.clone(),
        granularity: rel.settings.granularity,
        app_consistent_every_s: rel.settings.app_consistent_every,
        bandwidth_limit: rel.settings.bandwidth_limit,
        last_cycle: rel.last_cycle,
        last_point_at: rel.last_point_at,
        last_error: rel.last_error.clone(),
        pending_bytes: pending,
        progress: shared
            .progress
            .lock()
            .expect("progress")
            .get(&rel.vm_id)
            .cloned(),
        points: shared
            .store
            .list_points(rel.vm_id)
            .map(|p| p.len())
            .unwrap_or(0),
    }
}

/// `GET /v1/vms/{name}/replication`.
pub fn status(shared: &Shared, name: &str) -> Result<ReplicationInfo, ApiFailure> {
    let (vm, _, rel) = rel_of(shared, name)?;
    Ok(info(shared, &vm, &rel))
}

/// `GET /v1/replication`.
pub fn list(shared: &Shared) -> Result<Vec<ReplicationInfo>, ApiFailure> {
    let vms = shared.store.list_vms()?;
    let mut out = Vec::new();
    for rel in shared.store.list_replications()? {
        if let Some(vm) = vms.iter().find(|v| v.id == rel.vm_id) {
            out.push(info(shared, &vm.spec.name, &rel));
        }
    }
    Ok(out)
}

/// `GET /v1/vms/{name}/replication/points`.
pub fn points(shared: &Shared, name: &str) -> Result<Vec<RecoveryPointInfo>, ApiFailure> {
    let (vm, _, rel) = rel_of(shared, name)?;
    if rel.role != Role::Replica {
        return Err(ApiFailure::invalid(format!(
            "VM {vm} is the primary: its recovery points are on the replica server {} (ferry --host {} replication points {vm})",
            rel.partner_name, rel.partner_name
        )));
    }
    Ok(shared
        .store
        .list_points(rel.vm_id)?
        .into_iter()
        .map(|p| RecoveryPointInfo {
            id: p.id,
            cycle: p.cycle,
            taken_at: p.taken_at,
            applied_at: p.applied_at,
            kind: p.kind,
            bytes: p.bytes,
            layers: p.layers,
            consistency: p.consistency,
        })
        .collect())
}

fn parse_settings(
    shared: &Shared,
    req: &EnableReplicationRequest,
    disks: usize,
) -> Result<ReplicationSettings, ApiFailure> {
    let bad = |m: String| ApiFailure::invalid(m);
    let interval: Interval = req.interval.parse().map_err(bad)?;
    let spacing = match &req.point_spacing {
        Some(s) => parse_duration(s).map_err(bad)?.as_secs(),
        None => 3600,
    };
    let initial = match req.initial.as_deref().unwrap_or("network") {
        "network" => InitialMethod::Network,
        "existing" => InitialMethod::Existing,
        s if s.starts_with("export:") => {
            let dir = &s["export:".len()..];
            if !dir.starts_with('/') {
                return Err(bad(format!("{s:?}: the export folder must be an absolute path")));
            }
            shared
                .cfg
                .allowed_path("export folder", std::path::Path::new(dir))
                .map_err(bad)?;
            InitialMethod::Export(dir.to_owned())
        }
        s if s.starts_with("at:") => {
            let t: i64 = s[3..].parse().map_err(|_| bad(format!("{s:?}: use at:UNIX_TIME")))?;
            if t > now_unix() + 7 * 86_400 {
                return Err(bad("an initial replication can be scheduled at most 7 days ahead".into()));
            }
            InitialMethod::At(t)
        }
        other => {
            return Err(bad(format!(
                "initial replication method {other:?} is not known: use network, at:UNIX_TIME, export:DIR or existing"
            )))
        }
    };
    let settings = ReplicationSettings {
        interval,
        retention: RetentionPolicy {
            additional: req.recovery_points,
            spacing_secs: spacing,
        },
        compression: req.compression,
        excluded_disks: req.exclude_disks.clone(),
        initial,
        bandwidth_limit: req.bandwidth_limit,
        granularity: req.granularity.unwrap_or(4096),
        relationship_id: {
            let h = blake3::hash(
                format!(
                    "{}{}{:?}",
                    req.replica_fingerprint,
                    now_ms(),
                    std::thread::current().id()
                )
                .as_bytes(),
            );
            u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | 1
        },
        app_consistent_every: match &req.app_consistent_every {
            Some(s) => Some(parse_duration(s).map_err(bad)?.as_secs()),
            None => None,
        },
    };
    settings.validate(disks).map_err(bad)?;
    Ok(settings)
}

/// `POST /v1/vms/{name}/replication`: the VM becomes the primary of a new relationship.
pub async fn enable(
    shared: &Arc<Shared>,
    name: &str,
    req: EnableReplicationRequest,
) -> Result<ReplicationInfo, ApiFailure> {
    let (vm, row) = vm_of(shared, name)?;
    if let Some(rel) = shared.store.replication(row.id)? {
        return Err(ApiFailure::conflict(format!(
            "VM {vm} is already replicated ({} of {}): remove replication first",
            rel.role.as_str(),
            rel.partner_name
        )));
    }
    let settings = parse_settings(shared, &req, row.spec.disks.len())?;
    let fp = ferry_client::normalize_fingerprint(&req.replica_fingerprint);
    if fp.len() != 95 {
        return Err(ApiFailure::invalid(format!(
            "{:?} is not a SHA-256 certificate fingerprint (AA:BB:… as `ferry replica-server show` prints it)",
            req.replica_fingerprint
        )));
    }
    if fp == shared.identity.fingerprint {
        return Err(ApiFailure::invalid(
            "a VM cannot replicate to its own host".into(),
        ));
    }
    if req.replica_addr.parse::<std::net::SocketAddr>().is_err() && !req.replica_addr.contains(':')
    {
        return Err(ApiFailure::invalid(format!(
            "{:?} is not host:port",
            req.replica_addr
        )));
    }
    let state = match settings.initial {
        InitialMethod::At(_) => ReplicationState::ReadyForInitialReplication,
        _ => ReplicationState::InitialReplicationInProgress,
    };
    let rel = ReplicationRow {
        vm_id: row.id,
        role: Role::Primary,
        partner_name: req.replica_name.clone(),
        partner_addr: req.replica_addr.clone(),
        partner_fingerprint: fp,
        settings,
        state,
        generation: 0,
        last_cycle: 0,
        last_point_at: None,
        last_error: None,
        created_at: now_unix(),
    };
    // Introduce the VM now, so that a refusal (unauthorized primary, name taken, wrong
    // certificate) fails the command with the replica's reason and nothing is stored, and
    // the replica VM appears on the replica server right away.
    let mut rel = rel;
    match primary::handshake(shared, &row, &rel).await {
        Ok(session) => {
            // The replica's own name (--to may have been an address).
            rel.partner_name = session.replica.clone();
            session.close().await;
        }
        Err(e) => return Err(ApiFailure::invalid(format!("{e:#}"))),
    }
    shared.store.insert_replication(&rel)?;
    primary::discard_spool(shared, row.id);
    shared.events.emit(
        &vm,
        "replication_enabled",
        &format!("replication to {} enabled", rel.partner_name),
    );
    shared.spawn_primary(row.id);
    Ok(info(shared, &vm, &rel))
}

/// Suspend, resume, resync, start the initial copy now, or run a cycle now.
pub fn request(
    shared: &Arc<Shared>,
    name: &str,
    what: &str,
) -> Result<ReplicationInfo, ApiFailure> {
    let (vm, _, mut rel) = rel_of(shared, name)?;
    let req = match what {
        "suspend" => Request::Suspend,
        "resume" => Request::Resume,
        "resync" => Request::Resync,
        "start" => Request::StartInitial,
        "accept-reverse" => {
            if rel.role != Role::Primary {
                return Err(ApiFailure::invalid(format!(
                    "VM {vm} is not a primary here: accept-reverse is run on the old primary of a failed-over VM"
                )));
            }
            shared.store.set_setting(
                &replica::reverse_accept_key(rel.vm_id),
                &(now_unix() + replica::REVERSE_ACCEPT_FOR_S).to_string(),
            )?;
            shared.events.emit(
                &vm,
                "reverse_accepted",
                &format!(
                    "{vm} may become the replica of its failed-over copy on {} within the next hour (its disk will be overwritten by reverse replication)",
                    rel.partner_name
                ),
            );
            return Ok(info(shared, &vm, &rel));
        }
        "cycle" => {
            if rel.role != Role::Primary {
                return Err(ApiFailure::invalid(format!(
                    "VM {vm} is a replica: cycles are run by its primary {}",
                    rel.partner_name
                )));
            }
            shared.kick(rel.vm_id).notify_one();
            return Ok(info(shared, &vm, &rel));
        }
        other => {
            return Err(ApiFailure::not_found(format!(
                "unknown replication request {other:?}"
            )))
        }
    };
    if rel.role == Role::Replica && matches!(req, Request::Resync | Request::StartInitial) {
        return Err(ApiFailure::invalid(format!(
            "run this on the primary {}: it compares and sends",
            rel.partner_name
        )));
    }
    // Resuming after an initial copy never finished goes back to it.
    let next = match (req, rel.state, rel.last_cycle) {
        (Request::Resume, ReplicationState::Suspended | ReplicationState::Error, 0)
            if rel.role == Role::Primary =>
        {
            ReplicationState::InitialReplicationInProgress
        }
        (Request::Resume, ReplicationState::Suspended, 0) => {
            ReplicationState::WaitingForInitialReplication
        }
        _ => on_request(rel.state, req).map_err(|e| ApiFailure::conflict(e.to_string()))?,
    };
    let before = rel.state;
    rel.state = next;
    if req != Request::Suspend {
        rel.last_error = None;
        shared.store.set_replication_state(rel.vm_id, next, None)?;
    } else {
        shared.store.set_replication_state_only(rel.vm_id, next)?;
    }
    shared.events.emit(
        &vm,
        "replication_state",
        &format!("{before} -> {next} ({what})"),
    );
    if next == ReplicationState::Resynchronizing {
        shared.events.emit(
            &vm,
            "resync_started",
            "resynchronization started: both sides are compared by chunk hashes",
        );
    }
    if rel.role == Role::Primary {
        shared.kick(rel.vm_id).notify_one();
    }
    Ok(info(shared, &vm, &rel))
}

/// `GET /v1/vms/{name}/replication/health`.
pub fn health_of(shared: &Shared, name: &str) -> Result<ReplicationHealthInfo, ApiFailure> {
    let (vm, _, rel) = rel_of(shared, name)?;
    health::report(shared, &vm, &rel).map_err(|e| ApiFailure::internal(format!("{e:#}")))
}

/// `POST /v1/vms/{name}/replication/health/reset`: a new statistics window starts.
pub fn reset_health(shared: &Shared, name: &str) -> Result<ReplicationHealthInfo, ApiFailure> {
    let (vm, _, rel) = rel_of(shared, name)?;
    health::reset(shared, &vm, &rel).map_err(|e| ApiFailure::internal(format!("{e:#}")))?;
    health::report(shared, &vm, &rel).map_err(|e| ApiFailure::internal(format!("{e:#}")))
}

/// `POST /v1/vms/{name}/replication/import`: applies an exported initial copy (replica).
pub async fn import(
    shared: &Arc<Shared>,
    name: &str,
    dir: &str,
) -> Result<ReplicationInfo, ApiFailure> {
    let (vm, _, rel) = rel_of(shared, name)?;
    shared
        .cfg
        .allowed_path("import folder", std::path::Path::new(dir))
        .map_err(ApiFailure::invalid)?;
    replica::import_initial(shared, rel.vm_id, std::path::Path::new(dir))
        .await
        .map_err(|e| ApiFailure::invalid(format!("{e:#}")))?;
    let rel = shared.store.replication(rel.vm_id)?.unwrap_or(rel);
    shared.events.emit(
        &vm,
        "initial_copy_imported",
        &format!("initial copy imported from {dir}"),
    );
    Ok(info(shared, &vm, &rel))
}

/// `DELETE /v1/vms/{name}/replication`: removes the relationship on this side. On the
/// primary, change tracking and spooled data go; on the replica, the replica VM and its
/// recovery points go.
pub async fn remove(shared: &Arc<Shared>, name: &str) -> Result<ActionReply, ApiFailure> {
    let (vm, row, rel) = rel_of(shared, name)?;
    match rel.role {
        Role::Primary => {
            shared.stop_primary(row.id);
            let _lock = shared.vms.lock_vm(&vm).await;
            primary::remove_tracking(shared, &vm, &row, &rel).await;
            primary::discard_spool(shared, row.id);
            shared.store.delete_replication(row.id)?;
            shared.events.emit(
                &vm,
                "replication_removed",
                "replication removed on the primary",
            );
            Ok(ActionReply {
                state: row.state,
                message: format!(
                    "replication of {vm} removed on this primary; its replica on {} stays until removed there",
                    rel.partner_name
                ),
            })
        }
        Role::Replica => {
            if row.state != VmState::Off {
                return Err(ApiFailure::conflict(format!(
                    "replica VM {vm} is running: stop it first"
                )));
            }
            if let Some(t) = test_failover::current(shared, row.id) {
                return Err(ApiFailure::conflict(format!(
                    "a test failover of {vm} is running ({}): stop it first with `ferry failover stop-test {vm}`",
                    t.test_vm
                )));
            }
            if failover::current(shared, row.id).is_some() {
                return Err(ApiFailure::conflict(format!(
                    "{vm} is failed over and not completed: complete (`ferry failover complete {vm}`) or cancel it first"
                )));
            }
            if rel.state == ReplicationState::FailedOver {
                // The VM lives on (it was failed over to): only the relationship goes.
                shared.store.delete_replication(row.id)?;
                shared.events.emit(
                    &vm,
                    "replication_removed",
                    "replication removed on the failed-over replica; the VM stays",
                );
                return Ok(ActionReply {
                    state: row.state,
                    message: format!("replication of {vm} removed; the failed-over VM stays"),
                });
            }
            replica::remove_replica(shared, &vm)
                .map_err(|e| ApiFailure::internal(format!("{e:#}")))?;
            shared.events.emit(
                &vm,
                "replication_removed",
                "replica VM and its recovery points removed",
            );
            Ok(ActionReply {
                state: VmState::Off,
                message: format!("replica VM {vm} and its recovery points removed"),
            })
        }
    }
}

/// `GET /v1/replica-server`.
pub fn replica_server_info(shared: &Shared) -> ReplicaServerInfo {
    let config = replica::load_config(&shared.store);
    let mut paths: Vec<&str> = config
        .default_storage
        .iter()
        .map(String::as_str)
        .chain(config.entries.iter().map(|e| e.storage.as_str()))
        .filter(|p| !p.is_empty())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    let storage = paths.into_iter().filter_map(storage_space).collect();
    ReplicaServerInfo {
        name: shared.cfg.name.clone(),
        fingerprint: crate::cluster::replica_server_identity(shared)
            .fingerprint
            .clone(),
        listening: shared.replica.listening.lock().expect("listening").clone(),
        config,
        storage,
    }
}

/// Free and total bytes of the filesystem holding `path` (or, before the first replica
/// creates it, its nearest existing ancestor).
fn storage_space(path: &str) -> Option<ferry_api_types::StorageSpace> {
    use std::os::unix::ffi::OsStrExt;
    let mut dir = std::path::Path::new(path);
    while !dir.exists() {
        dir = dir.parent()?;
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into the struct we pass; the path is NUL-terminated.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        st
    };
    let frsize = st.f_frsize as u64;
    Some(ferry_api_types::StorageSpace {
        path: path.to_owned(),
        free_bytes: (st.f_bavail as u64).saturating_mul(frsize),
        total_bytes: (st.f_blocks as u64).saturating_mul(frsize),
    })
}

/// `POST /v1/replica-server`.
pub async fn replica_server_set(
    shared: &Arc<Shared>,
    req: ReplicaServerSetRequest,
) -> Result<ReplicaServerInfo, ApiFailure> {
    let mut cfg = replica::load_config(&shared.store);
    let check_dir = |s: &str| -> Result<String, ApiFailure> {
        let p = std::path::Path::new(s);
        if !p.is_absolute() {
            return Err(ApiFailure::invalid(format!(
                "storage {s:?} must be an absolute path"
            )));
        }
        shared
            .cfg
            .allowed_path("storage", p)
            .map_err(ApiFailure::invalid)?;
        crate::broker::check_storage(shared, p).map_err(ApiFailure::invalid)?;
        std::fs::create_dir_all(p)
            .map_err(|e| ApiFailure::invalid(format!("cannot use storage {s}: {e}")))?;
        Ok(s.to_owned())
    };
    if let Some(port) = req.port {
        if port == 0 {
            return Err(ApiFailure::invalid("port 0 is not a port".into()));
        }
        cfg.port = port;
    }
    // Checked before anything is created: a bad CA changes nothing.
    match req.trusted_ca.as_deref().map(str::trim) {
        None => {}
        Some("") => cfg.trusted_ca = None,
        Some(pem) => {
            crate::peer::parse_ca(pem).map_err(ApiFailure::invalid)?;
            cfg.trusted_ca = Some(pem.to_owned());
        }
    }
    if req.allow_any == Some(true) || (cfg.allow_any && req.trusted_ca.is_some()) {
        if cfg.trusted_ca.is_none() {
            return Err(ApiFailure::invalid(
                "--allow-any needs --trust-ca CA.pem: \"any\" means any primary whose host certificate that CA issued, never any self-signed one (or list each primary with --allow NAME=FINGERPRINT)".into(),
            ));
        }
    }
    if let Some(v) = req.allow_primary_start {
        cfg.allow_primary_start = v;
    }
    if let Some((from, to)) = &req.map_bridge {
        let (primary, bridge) = from.rsplit_once('/').unwrap_or(("", from));
        let ok = |b: &str| ferry_domain::spec::is_valid_ifname(b);
        if !ok(bridge) || !ok(to) || primary.contains('/') {
            return Err(ApiFailure::invalid(format!(
                "--map-bridge {from}={to}: use [PRIMARY/]BRIDGE=LOCAL_BRIDGE with interface names (1-15 characters, no spaces or slashes)"
            )));
        }
        crate::vms::require_bridge(to)?;
        cfg.bridge_map.insert(from.clone(), to.clone());
    }
    if let Some(n) = req.max_vms_per_primary {
        cfg.max_vms_per_primary = (n > 0).then_some(n);
    }
    if let Some(q) = req.storage_quota_bytes {
        cfg.storage_quota_bytes = (q > 0).then_some(q);
    }
    if let Some(from) = &req.unmap_bridge {
        if cfg.bridge_map.remove(from).is_none() {
            return Err(ApiFailure::not_found(format!(
                "no network mapping for {from:?}"
            )));
        }
    }
    if let Some(mut entry) = req.allow.clone() {
        if entry.primary.trim().is_empty() {
            return Err(ApiFailure::invalid(
                "--allow needs a primary name: NAME=FINGERPRINT".into(),
            ));
        }
        entry.fingerprint = ferry_client::normalize_fingerprint(&entry.fingerprint);
        if entry.fingerprint.len() != 95 {
            return Err(ApiFailure::invalid(format!(
                "{:?} is not a SHA-256 certificate fingerprint (AA:BB:…, from `ferry server show` on the primary)",
                req.allow.as_ref().map(|a| a.fingerprint.clone()).unwrap_or_default()
            )));
        }
        let storage = req
            .storage
            .as_deref()
            .or(Some(entry.storage.as_str()))
            .filter(|s| !s.is_empty());
        entry.storage = check_dir(storage.ok_or_else(|| {
            ApiFailure::invalid(
                "--allow needs --storage DIR: where that primary's replicas go".into(),
            )
        })?)?;
        if entry.trust_group.is_empty() {
            entry.trust_group = "DEFAULT".into();
        }
        replica::upsert_entry(&mut cfg, entry);
    } else if let Some(s) = &req.storage {
        cfg.default_storage = Some(check_dir(s)?);
    }
    if let Some(any) = req.allow_any {
        if any && cfg.default_storage.is_none() {
            return Err(ApiFailure::invalid(
                "--allow-any needs --storage DIR: where replicas go".into(),
            ));
        }
        cfg.allow_any = any;
    }
    if let Some(p) = &req.disallow {
        let before = cfg.entries.len();
        cfg.entries.retain(|e| &e.primary != p);
        if cfg.entries.len() == before {
            return Err(ApiFailure::not_found(format!(
                "no authorization entry for primary {p:?}"
            )));
        }
    }
    if let Some(e) = req.enabled {
        cfg.enabled = e;
    }
    let old = replica::load_config(&shared.store);
    shared.store.set_setting(
        replica::CONFIG_KEY,
        &serde_json::to_string(&cfg).expect("config serializes"),
    )?;
    if let Err(e) = replica::apply_config(shared).await {
        // Put the previous configuration back: a bad port must not leave the role half-set.
        let _ = shared.store.set_setting(
            replica::CONFIG_KEY,
            &serde_json::to_string(&old).expect("config serializes"),
        );
        let _ = replica::apply_config(shared).await;
        return Err(ApiFailure::invalid(format!("{e:#}")));
    }
    // A Replica Broker's nodes authorize its primaries with these settings.
    crate::broker::publish(shared).map_err(|e| ApiFailure::internal(format!("{e:#}")))?;
    Ok(replica_server_info(shared))
}
