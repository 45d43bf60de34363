//! The hosts the console manages and the poller: every poll interval (or at once when an
//! action asks for it) each host's TLS API is read — server, VMs, relationships and their
//! health, and whether it is a failover cluster node (`GET /v1/cluster`) — into an
//! in-memory [`Fleet`] snapshot for the pages; the figures are appended to the store's
//! history, new recovery points are recorded as cycles, and the alerter runs on what was
//! seen. Hosts that are nodes of one cluster are grouped into one [`ClusterView`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_api_types::cluster::{ClusterStatus, FenceEvent};
use ferry_api_types::{
    RecoveryPointInfo, ReplicaServerInfo, ReplicationHealthInfo, ReplicationInfo, ServerInfo,
    VmInfo,
};
use ferry_client::{Client, Endpoint};
use tokio::sync::{Notify, RwLock};

use crate::alerts::rules::{
    cluster_id, ClusterObservation, Observations, RelationshipObservation, StorageObservation,
};
use crate::alerts::Alerter;
use crate::store::{CycleRow, HostRow, SampleRow, Store};

/// The client of a stored host.
pub fn client(h: &HostRow) -> Client {
    Client::new(Endpoint::Tls {
        addr: url_addr(&h.url).unwrap_or_default(),
        fingerprint: h.fingerprint.clone(),
        token: h.token.clone(),
    })
}

/// `ADDR:PORT` of `https://ADDR:PORT[/]`.
pub fn url_addr(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("URL {url:?}: use https://ADDRESS:PORT (ferryd's TLS API)"))?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() && !rest.contains('/') => {
            Ok(rest.to_owned())
        }
        _ => Err(format!(
            "URL {url:?}: use https://ADDRESS:PORT (the port is ferryd's tls_listen port)"
        )),
    }
}

/// One host as last polled.
#[derive(Debug, Clone)]
pub struct HostView {
    /// The stored host.
    pub row: HostRow,
    /// When it was last polled (UNIX s); 0 = not yet.
    pub polled_at: i64,
    /// Why the last poll failed.
    pub error: Option<String>,
    /// What it says about itself.
    pub server: Option<ServerInfo>,
    /// Its VMs.
    pub vms: Vec<VmInfo>,
    /// Its relationships.
    pub replication: Vec<ReplicationInfo>,
    /// Their health.
    pub health: Vec<ReplicationHealthInfo>,
    /// Its replica-server role (with its storage's free space).
    pub replica_server: Option<ReplicaServerInfo>,
    /// Its failover cluster as it sees it; `None`: not a cluster node (or unknown).
    pub cluster: Option<ClusterStatus>,
    /// Why its cluster status could not be read although the host answered.
    pub cluster_error: Option<String>,
    /// The cluster (identity, name) it was last seen a node of: kept while the host does
    /// not answer, so that an unreachable node still shows under its cluster.
    pub last_cluster: Option<(String, String)>,
}

impl HostView {
    /// The relationship of `vm` on this host.
    pub fn replication_of(&self, vm: &str) -> Option<&ReplicationInfo> {
        self.replication.iter().find(|r| r.vm == vm)
    }

    /// The health of `vm`'s relationship on this host.
    pub fn health_of(&self, vm: &str) -> Option<&ReplicationHealthInfo> {
        self.health.iter().find(|h| h.vm == vm)
    }
}

/// Every host as last polled, by host id.
#[derive(Debug, Default)]
pub struct Fleet {
    /// The hosts.
    pub hosts: BTreeMap<i64, HostView>,
}

/// One failover cluster, made of the answers of every managed host that is a node of it.
#[derive(Debug)]
pub struct ClusterView<'a> {
    /// `NAME@SHARED_DIR`.
    pub id: String,
    /// The cluster's name.
    pub name: String,
    /// The answer shown: a quorate node's (the designated controller's if it is managed),
    /// else any node's whose stack answers, else any node's. `None` while no node answers.
    pub status: Option<&'a ClusterStatus>,
    /// Managed hosts that are nodes of it and answered, with what each said.
    pub answering: Vec<&'a HostView>,
    /// Managed hosts known to be nodes of it that do not answer now.
    pub silent: Vec<&'a HostView>,
    /// The fencing history of every answer merged, oldest first.
    pub fencing: Vec<FenceEvent>,
}

impl ClusterView<'_> {
    /// The managed host named `node`, if the console manages it.
    pub fn host_of(&self, node: &str) -> Option<&HostView> {
        self.answering
            .iter()
            .chain(&self.silent)
            .find(|v| v.row.name == node)
            .copied()
    }
}

impl Fleet {
    /// The clusters the managed hosts are nodes of, by name.
    pub fn clusters(&self) -> Vec<ClusterView<'_>> {
        let mut map: BTreeMap<String, ClusterView<'_>> = BTreeMap::new();
        for v in self.hosts.values() {
            let Some((id, name)) = v.last_cluster.clone() else {
                continue;
            };
            let c = map.entry(id.clone()).or_insert_with(|| ClusterView {
                id,
                name,
                status: None,
                answering: Vec::new(),
                silent: Vec::new(),
                fencing: Vec::new(),
            });
            match &v.cluster {
                Some(_) if v.error.is_none() => c.answering.push(v),
                _ => c.silent.push(v),
            }
        }
        for c in map.values_mut() {
            let rank = |st: &ClusterStatus| {
                (
                    st.stack_error.is_none(),
                    st.quorate,
                    st.dc.as_deref() == Some(st.this_node.as_str()),
                )
            };
            c.status = c
                .answering
                .iter()
                .filter_map(|v| v.cluster.as_ref())
                .max_by_key(|st| rank(st));
            let mut events: Vec<FenceEvent> = Vec::new();
            for e in c
                .answering
                .iter()
                .filter_map(|v| v.cluster.as_ref())
                .flat_map(|st| &st.fencing)
            {
                if !events.contains(e) {
                    events.push(e.clone());
                }
            }
            events.sort_by(|a, b| a.completed.cmp(&b.completed));
            c.fencing = events;
        }
        let mut out: Vec<ClusterView<'_>> = map.into_values().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }
}

/// How long the history is kept.
pub const HISTORY_DAYS: i64 = 30;

/// Polls hosts and keeps the fleet snapshot.
pub struct Poller {
    store: Arc<Store>,
    alerter: Arc<Alerter>,
    /// The snapshot the pages read.
    pub fleet: RwLock<Fleet>,
    wake: Notify,
    interval: Duration,
    last_prune: std::sync::atomic::AtomicI64,
}

impl Poller {
    /// A poller over the store's hosts.
    pub fn new(store: Arc<Store>, alerter: Arc<Alerter>, interval: Duration) -> Self {
        Self {
            store,
            alerter,
            fleet: RwLock::new(Fleet::default()),
            wake: Notify::new(),
            interval,
            last_prune: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Asks for a poll now (after an action, or a host added).
    pub fn poll_soon(&self) {
        self.wake.notify_one();
    }

    /// Polls forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.poll_once().await;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Polls every host once, records history and runs the alerter.
    pub async fn poll_once(&self) {
        let rows = match self.store.hosts() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot list hosts: {e}");
                return;
            }
        };
        let now = crate::now();
        let views = futures_join(rows.iter().map(|row| poll_host(row.clone(), now))).await;
        let mut obs = Observations::default();
        for v in &views {
            let name = v.row.name.clone();
            match &v.error {
                Some(e) => {
                    obs.unreachable.insert(name, e.clone());
                }
                None => {
                    obs.reachable.insert(name);
                }
            }
            for h in &v.health {
                let interval_s = v.replication_of(&h.vm).map(|r| r.interval_s).unwrap_or(0);
                obs.relationships.push(RelationshipObservation {
                    host: v.row.name.clone(),
                    vm: h.vm.clone(),
                    primary: h.primary_server.clone(),
                    replica: h.replica_server.clone(),
                    role: h.role.clone(),
                    state: h.state.clone(),
                    health: h.health.clone(),
                    details: h.details.clone(),
                    interval_s,
                    rpo_s: h.rpo_s,
                    last_test_failover_at: h.last_test_failover_at,
                });
            }
            if let Some(st) = v.cluster.as_ref().filter(|_| v.error.is_none()) {
                obs.clusters.push(ClusterObservation {
                    host: v.row.name.clone(),
                    status: st.clone(),
                });
            }
            if let Some(rs) = v.replica_server.as_ref().filter(|rs| rs.config.enabled) {
                for s in &rs.storage {
                    obs.storage.push(StorageObservation {
                        host: v.row.name.clone(),
                        path: s.path.clone(),
                        free_bytes: s.free_bytes,
                        total_bytes: s.total_bytes,
                    });
                }
            }
            self.record_history(v, now).await;
        }
        // The console names hosts as they named themselves when added; relationships name
        // them as ferryd does. Both are the host's `name`, so reachability matches.
        {
            let mut fleet = self.fleet.write().await;
            let ids: BTreeSet<i64> = views.iter().map(|v| v.row.id).collect();
            fleet.hosts.retain(|id, _| ids.contains(id));
            for mut v in views {
                // A host that does not answer (or whose cluster status could not be read)
                // stays under the cluster it was last seen in.
                if v.error.is_some() || v.cluster_error.is_some() {
                    v.last_cluster = fleet
                        .hosts
                        .get(&v.row.id)
                        .and_then(|old| old.last_cluster.clone());
                }
                fleet.hosts.insert(v.row.id, v);
            }
        }
        self.alerter.evaluate(&obs, now).await;
        // Old history goes once an hour (a full scan: not worth doing every poll).
        use std::sync::atomic::Ordering;
        if now - self.last_prune.load(Ordering::Relaxed) >= 3600 {
            self.last_prune.store(now, Ordering::Relaxed);
            match self.store.prune_history(now - HISTORY_DAYS * 86_400) {
                Ok(n) if n > 0 => tracing::info!("pruned {n} history rows"),
                Ok(_) => {}
                Err(e) => tracing::error!("cannot prune history: {e}"),
            }
        }
    }

    async fn record_history(&self, v: &HostView, now: i64) {
        let samples: Vec<SampleRow> = v
            .health
            .iter()
            .map(|h| SampleRow {
                vm: h.vm.clone(),
                role: h.role.clone(),
                at: now,
                health: h.health.clone(),
                rpo_s: h.rpo_s,
                pending_bytes: h.pending_bytes as i64,
                avg_latency_ms: h.average_latency_ms as i64,
                avg_size: h.average_size as i64,
                network_bytes: h.network_bytes as i64,
            })
            .collect();
        if let Err(e) = self.store.add_samples(v.row.id, &samples) {
            tracing::error!("cannot record history: {e}");
        }
        // Cycle sizes and latencies come from the replica's recovery points: read them only
        // when the relationship has a cycle the store does not hold yet.
        let client = client(&v.row);
        for r in v.replication.iter().filter(|r| r.role == "replica") {
            let mut known = self.store.last_cycle(v.row.id, &r.vm).ok().flatten();
            if known.is_some_and(|k| k > r.last_cycle) {
                // The numbering went back: replication was removed and enabled again, or
                // reversed. The old relationship's cycles are not this one's history.
                if let Err(e) = self.store.forget_cycles(v.row.id, &r.vm) {
                    tracing::error!("cannot reset cycle history: {e}");
                }
                known = None;
            }
            if known.is_some_and(|k| k >= r.last_cycle) {
                continue;
            }
            let path = format!(
                "/v1/vms/{}/replication/points",
                ferry_client::percent_encode(&r.vm)
            );
            let points: Vec<RecoveryPointInfo> = match client.get(&path).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("points of {} on {}: {e}", r.vm, v.row.name);
                    continue;
                }
            };
            let rows: Vec<CycleRow> = points
                .iter()
                .filter(|p| known.is_none_or(|k| p.cycle > k))
                .map(|p| CycleRow {
                    cycle: p.cycle,
                    taken_at: p.taken_at,
                    applied_at: p.applied_at,
                    bytes: p.bytes,
                })
                .collect();
            if let Err(e) = self.store.add_cycles(v.row.id, &r.vm, &rows) {
                tracing::error!("cannot record cycles: {e}");
            }
        }
    }
}

/// Runs the futures concurrently (hosts are polled in parallel: one slow host must not
/// delay the others' view).
async fn futures_join<F: std::future::Future<Output = HostView> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<HostView> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// Reads one host; a failure anywhere marks it unreachable with the error.
pub async fn poll_host(row: HostRow, now: i64) -> HostView {
    let c = client(&row);
    let read = async {
        let server: ServerInfo = c.get("/v1/server").await?;
        let vms: Vec<VmInfo> = c.get("/v1/vms").await?;
        let replication: Vec<ReplicationInfo> = c.get("/v1/replication").await?;
        let health: Vec<ReplicationHealthInfo> = c.get("/v1/replication/health").await?;
        let replica_server: ReplicaServerInfo = c.get("/v1/replica-server").await?;
        Ok::<_, ferry_client::ClientError>((server, vms, replication, health, replica_server))
    };
    let mut view = HostView {
        row,
        polled_at: now,
        error: None,
        server: None,
        vms: Vec::new(),
        replication: Vec::new(),
        health: Vec::new(),
        replica_server: None,
        cluster: None,
        cluster_error: None,
        last_cluster: None,
    };
    match tokio::time::timeout(Duration::from_secs(20), read).await {
        Ok(Ok((server, vms, replication, health, replica_server))) => {
            view.replica_server = Some(replica_server);
            view.server = Some(server);
            view.vms = vms;
            view.replication = replication;
            view.health = health;
        }
        Ok(Err(e)) => view.error = Some(error_chain(&e)),
        Err(_) => view.error = Some("no answer in 20 s".into()),
    }
    if view.error.is_none() {
        // Its own request and time limit: a cluster stack that is slow to answer does not
        // make the host unreachable.
        let read = c.get::<ClusterStatus>("/v1/cluster");
        match tokio::time::timeout(Duration::from_secs(20), read).await {
            Ok(Ok(st)) => {
                view.last_cluster = Some((cluster_id(&st), st.name.clone()));
                view.cluster = Some(st);
            }
            Ok(Err(e)) if standalone(&e) => {}
            Ok(Err(e)) => view.cluster_error = Some(error_chain(&e)),
            Err(_) => view.cluster_error = Some("no answer in 20 s".into()),
        }
    }
    view
}

/// Whether `GET /v1/cluster` failed because the host is not a cluster node: 409 "conflict"
/// ("… is not a cluster node …"), or 404 from a ferryd older than clusters.
fn standalone(e: &ferry_client::ClientError) -> bool {
    matches!(
        e,
        ferry_client::ClientError::Api { status: 409, error } if error.code == "conflict"
    ) || matches!(e, ferry_client::ClientError::Api { status: 404, .. })
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: i64, name: &str, cluster: Option<(&str, &str, bool, &[&str])>) -> HostView {
        let status = cluster.map(|(cname, dir, quorate, fenced)| ClusterStatus {
            name: cname.into(),
            shared_dir: dir.into(),
            this_node: name.into(),
            quorate,
            dc: None,
            nodes: Vec::new(),
            vms: Vec::new(),
            fencing: fenced
                .iter()
                .map(|t| FenceEvent {
                    target: (*t).into(),
                    action: "reboot".into(),
                    status: "success".into(),
                    delegate: Some("node1".into()),
                    completed: Some("2026-01-01 10:00:00Z".into()),
                })
                .collect(),
            stack_error: None,
            replication_fingerprint: None,
            broker: None,
        });
        HostView {
            row: HostRow {
                id,
                name: name.into(),
                url: String::new(),
                fingerprint: String::new(),
                token: String::new(),
            },
            polled_at: 1,
            error: None,
            server: None,
            vms: Vec::new(),
            replication: Vec::new(),
            health: Vec::new(),
            replica_server: None,
            last_cluster: status.as_ref().map(|s| (cluster_id(s), s.name.clone())),
            cluster: status,
            cluster_error: None,
        }
    }

    #[test]
    fn nodes_of_one_cluster_make_one_item() {
        let mut fleet = Fleet::default();
        // c1's three nodes: node3 does not answer now (its last known cluster is kept),
        // node2 has no quorum; a second cluster also named c1 on other storage; a host
        // that is no cluster node.
        fleet
            .hosts
            .insert(1, view(1, "node1", Some(("c1", "/srv/a", true, &["n4"]))));
        fleet
            .hosts
            .insert(2, view(2, "node2", Some(("c1", "/srv/a", false, &["n4"]))));
        let mut silent = view(3, "node3", Some(("c1", "/srv/a", true, &[])));
        silent.cluster = None;
        silent.error = Some("connection refused".into());
        fleet.hosts.insert(3, silent);
        fleet
            .hosts
            .insert(4, view(4, "other", Some(("c1", "/srv/b", true, &[]))));
        fleet.hosts.insert(5, view(5, "alone", None));
        let clusters = fleet.clusters();
        assert_eq!(clusters.len(), 2);
        let a = clusters.iter().find(|c| c.id == "c1@/srv/a").unwrap();
        let names = |v: &[&HostView]| v.iter().map(|v| v.row.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&a.answering), ["node1", "node2"]);
        assert_eq!(names(&a.silent), ["node3"]);
        // The quorate node's answer is shown; the same fencing reported twice is one.
        assert_eq!(a.status.unwrap().this_node, "node1");
        assert_eq!(a.fencing.len(), 1);
        assert!(a.host_of("node3").is_some() && a.host_of("n4").is_none());
        let b = clusters.iter().find(|c| c.id == "c1@/srv/b").unwrap();
        assert_eq!(names(&b.answering), ["other"]);
    }

    #[test]
    fn host_urls() {
        assert_eq!(
            url_addr("https://127.0.0.1:7443").unwrap(),
            "127.0.0.1:7443"
        );
        assert_eq!(
            url_addr("https://h.example:7443/").unwrap(),
            "h.example:7443"
        );
        assert!(url_addr("http://127.0.0.1:7443")
            .unwrap_err()
            .contains("https://"));
        assert!(url_addr("https://127.0.0.1").is_err());
        assert!(url_addr("https://h:1/x").is_err());
    }
}
