//! The hosts the console manages and the poller: every poll interval (or at once when an
//! action asks for it) each host's TLS API is read — server, VMs, relationships and their
//! health — into an in-memory [`Fleet`] snapshot for the pages; the figures are appended
//! to the store's history, new recovery points are recorded as cycles, and the alerter
//! runs on what was seen.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_api_types::{
    RecoveryPointInfo, ReplicaServerInfo, ReplicationHealthInfo, ReplicationInfo, ServerInfo,
    VmInfo,
};
use ferry_client::{Client, Endpoint};
use tokio::sync::{Notify, RwLock};

use crate::alerts::rules::{Observations, RelationshipObservation, StorageObservation};
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
            for v in views {
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
    view
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
