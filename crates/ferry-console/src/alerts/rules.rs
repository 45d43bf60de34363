//! Alert rules, evaluated without IO or clock (callers pass `now`): what the poller saw
//! becomes a set of [`Condition`]s ([`conditions`]), and [`Engine::step`] turns the
//! conditions of successive polls into [`Transition`]s — exactly one `Start` when a
//! condition has held for its hold time, exactly one `Clear` when it has been gone for the
//! debounce time. A condition that flaps within those times sends nothing (no storms); a
//! relationship whose hosts could not be polled keeps its alerts as they are (unknown is
//! not cleared).
//!
//! One relationship is one alert even though both of its hosts report it: conditions are
//! keyed by rule, primary, replica and VM.
//!
//! A failover cluster is one item however many of its nodes the console manages: its
//! conditions are keyed by the cluster (name and shared directory), and any node of it that
//! answers decides them (the engine sees the pseudo-host `cluster:NAME@DIR` as observed, see
//! [`Observations::observed`]). A fencing is an event, not a lasting condition: its alert
//! starts at once (no hold) when the console first sees the newest successful fencing of a
//! node in the cluster's history while that node is not back, and clears (after the
//! debounce) when the node is online in the cluster again — or when a newer fencing of the
//! same node supersedes it, which is then its own alert. A fencing the console sees only
//! after the node is back (a poll interval longer than a reboot) is not announced.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Pending: condition seen
//!     Pending --> [*]: gone before hold time (nothing sent)
//!     Pending --> Active: held for hold time / Start sent
//!     Active --> Clearing: condition gone
//!     Clearing --> Active: seen again before debounce
//!     Clearing --> [*]: gone for debounce time / Clear sent
//! ```

use std::collections::{BTreeMap, BTreeSet};

use ferry_api_types::cluster::ClusterStatus;
use serde::{Deserialize, Serialize};

/// The rules an operator chose (stored in the console's store, edited on the alerts page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuleSettings {
    /// Alert on replication health at or above this: `warning`, `critical`, or `off`.
    pub health_min: String,
    /// Alert when the RPO exceeds N × the replication interval (0 = off).
    pub rpo_factor: u32,
    /// Alert when a relationship needs resynchronization.
    pub resync_required: bool,
    /// Alert when the initial replication has not finished after this many minutes (0 = off).
    pub initial_not_finished_min: u32,
    /// Alert when a failed-over VM has not been reversed after this many minutes (0 = off).
    pub failover_not_reversed_min: u32,
    /// Alert when a host cannot be polled.
    pub host_unreachable: bool,
    /// Alert when a replica's last test failover is older than this many days (0 = off).
    pub test_failover_max_age_days: u32,
    /// Alert when a replica storage location has less than this percent free (0 = off).
    pub storage_free_min_percent: u32,
    /// Alert when a node of a failover cluster reports that the cluster has no quorum.
    pub cluster_quorum: bool,
    /// Alert when a cluster node was fenced (once per fencing).
    pub node_fenced: bool,
    /// Alert when a highly available VM cannot be placed (`unplaced`) or has `failed`.
    pub ha_vm_unplaced: bool,
    /// Seconds a condition must hold before it alerts, and be gone before it clears.
    pub debounce_s: u32,
}

impl Default for RuleSettings {
    fn default() -> Self {
        Self {
            health_min: "warning".into(),
            rpo_factor: 3,
            resync_required: true,
            initial_not_finished_min: 60,
            failover_not_reversed_min: 60,
            host_unreachable: true,
            test_failover_max_age_days: 30,
            storage_free_min_percent: 10,
            cluster_quorum: true,
            node_fenced: true,
            ha_vm_unplaced: true,
            debounce_s: 60,
        }
    }
}

impl RuleSettings {
    /// Checks the values; the error is one line.
    pub fn validate(&self) -> Result<(), String> {
        if !["warning", "critical", "off"].contains(&self.health_min.as_str()) {
            return Err(format!(
                "health alert level {:?}: use warning, critical or off",
                self.health_min
            ));
        }
        if self.rpo_factor > 1000 {
            return Err("RPO factor: use 0 (off) to 1000".into());
        }
        if self.storage_free_min_percent > 100 {
            return Err("free space: use 0 (off) to 100 percent".into());
        }
        if self.debounce_s > 86_400 {
            return Err("debounce: use 0 to 86400 seconds".into());
        }
        Ok(())
    }
}

/// The rules about failover clusters, with how many `|`-separated fields their keys hold
/// before the cluster's identity (`rule:FIELD|…|NAME@DIR`).
const CLUSTER_RULES: [(&str, usize); 3] = [
    ("cluster_quorum", 0),
    ("node_fenced", 3),
    ("ha_vm_unplaced", 1),
];

/// The identity of a cluster: its name and shared directory (two clusters may share a
/// name, never a directory).
pub fn cluster_id(st: &ClusterStatus) -> String {
    format!("{}@{}", st.name, st.shared_dir)
}

/// The pseudo-host that stands for "a node of this cluster answered": conditions about a
/// cluster are decided by it (see [`Observations::observed`]).
pub fn cluster_host(cluster_id: &str) -> String {
    format!("cluster:{cluster_id}")
}

/// The hosts whose answers decide a stored alert after a console restart: both servers of a
/// relationship (from its key, `rule:primary>replica:vm`), the cluster of a cluster rule,
/// else the alert's host.
pub fn hosts_of_key(key: &str, host: &str) -> Vec<String> {
    if let Some((rule, rest)) = key.split_once(':') {
        if let Some((_, fields)) = CLUSTER_RULES.iter().find(|(r, _)| *r == rule) {
            if let Some(id) = rest.splitn(fields + 1, '|').nth(*fields) {
                return vec![cluster_host(id)];
            }
        }
    }
    let relationship = key
        .split_once(':')
        .filter(|(rule, _)| !matches!(*rule, "host_unreachable" | "storage_free"))
        .and_then(|(_, rest)| rest.split_once('>'))
        .and_then(|(primary, rest)| rest.split_once(':').map(|(replica, _)| (primary, replica)));
    match relationship {
        Some((p, r)) => vec![p.to_owned(), r.to_owned()],
        None => vec![host.to_owned()],
    }
}

/// What the poller saw of one relationship on one host.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationshipObservation {
    /// The host that reported it.
    pub host: String,
    /// The VM.
    pub vm: String,
    /// Primary server's name.
    pub primary: String,
    /// Replica server's name.
    pub replica: String,
    /// `primary` or `replica`.
    pub role: String,
    /// State (API name).
    pub state: String,
    /// `normal`, `warning`, `critical`.
    pub health: String,
    /// The health's reasons.
    pub details: Vec<String>,
    /// Replication interval (s).
    pub interval_s: u64,
    /// RPO now (s).
    pub rpo_s: Option<i64>,
    /// When the last test failover started (replica side).
    pub last_test_failover_at: Option<i64>,
}

/// Space on a replica server's storage location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageObservation {
    /// The replica server.
    pub host: String,
    /// The location.
    pub path: String,
    /// Free bytes.
    pub free_bytes: u64,
    /// Size of its filesystem.
    pub total_bytes: u64,
}

/// What a cluster node said about its cluster (`GET /v1/cluster`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterObservation {
    /// The console host that answered (a node of the cluster).
    pub host: String,
    /// Its answer.
    pub status: ClusterStatus,
}

/// What one poll saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    /// Hosts that answered.
    pub reachable: BTreeSet<String>,
    /// Hosts that did not, with the error.
    pub unreachable: BTreeMap<String, String>,
    /// Every relationship reported by a reachable host.
    pub relationships: Vec<RelationshipObservation>,
    /// Replica storage locations of reachable replica servers.
    pub storage: Vec<StorageObservation>,
    /// The cluster status of every reachable host that is a cluster node.
    pub clusters: Vec<ClusterObservation>,
}

impl Observations {
    /// What answered: the reachable hosts, and the pseudo-host of each cluster of which a
    /// node answered with its cluster stack running (only such an answer can say that a
    /// cluster condition is gone).
    pub fn observed(&self) -> BTreeSet<String> {
        let mut o = self.reachable.clone();
        for c in self
            .clusters
            .iter()
            .filter(|c| c.status.stack_error.is_none())
        {
            o.insert(cluster_host(&cluster_id(&c.status)));
        }
        o
    }
}

/// A condition found now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Identity: one alert per key.
    pub key: String,
    /// The rule's name.
    pub rule: &'static str,
    /// The host it concerns (the reporting host; for relationships, its primary).
    pub host: String,
    /// Hosts whose answers decide whether it still holds.
    pub hosts: Vec<String>,
    /// The VM, for relationship rules.
    pub vm: Option<String>,
    /// What was found.
    pub message: String,
    /// How long it must hold before it alerts (s).
    pub hold_s: i64,
}

/// The conditions present in `obs` under `rules` at `now`.
pub fn conditions(obs: &Observations, rules: &RuleSettings, now: i64) -> Vec<Condition> {
    let debounce = i64::from(rules.debounce_s);
    let mut out: BTreeMap<String, Condition> = BTreeMap::new();
    if rules.host_unreachable {
        for (host, error) in &obs.unreachable {
            let key = format!("host_unreachable:{host}");
            out.insert(
                key.clone(),
                Condition {
                    key,
                    rule: "host_unreachable",
                    host: host.clone(),
                    hosts: vec![host.clone()],
                    vm: None,
                    message: format!("Host {host} cannot be reached: {error}"),
                    hold_s: debounce,
                },
            );
        }
    }
    if rules.storage_free_min_percent > 0 {
        for s in &obs.storage {
            let min = u128::from(rules.storage_free_min_percent);
            if s.total_bytes == 0
                || u128::from(s.free_bytes) * 100 >= min * u128::from(s.total_bytes)
            {
                continue;
            }
            let key = format!("storage_free:{}:{}", s.host, s.path);
            out.insert(
                key.clone(),
                Condition {
                    key,
                    rule: "storage_free",
                    host: s.host.clone(),
                    hosts: vec![s.host.clone()],
                    vm: None,
                    message: format!(
                        "Replica storage {} on {} has {} MiB free of {} MiB ({} %), under {} %",
                        s.path,
                        s.host,
                        s.free_bytes >> 20,
                        s.total_bytes >> 20,
                        u128::from(s.free_bytes) * 100 / u128::from(s.total_bytes),
                        rules.storage_free_min_percent
                    ),
                    hold_s: debounce,
                },
            );
        }
    }
    cluster_conditions(obs, rules, &mut out);
    for r in &obs.relationships {
        let mut add = |rule: &'static str, message: String, hold_s: i64| {
            let key = format!("{rule}:{}>{}:{}", r.primary, r.replica, r.vm);
            // Both sides may report it: the first report's text wins, the alert is one. Its
            // hosts are the ones that reported it: only their answers can clear it (a
            // condition only the replica sees is not cleared by the primary's answer while
            // the replica is unreachable).
            out.entry(key.clone())
                .and_modify(|c| {
                    if !c.hosts.contains(&r.host) {
                        c.hosts.push(r.host.clone());
                    }
                })
                .or_insert(Condition {
                    key,
                    rule,
                    host: r.primary.clone(),
                    hosts: vec![r.host.clone()],
                    vm: Some(r.vm.clone()),
                    message,
                    hold_s,
                });
        };
        let level = match r.health.as_str() {
            "critical" => 2,
            "warning" => 1,
            _ => 0,
        };
        let min = match rules.health_min.as_str() {
            "warning" => 1,
            "critical" => 2,
            _ => 3,
        };
        if level >= min {
            add(
                "health",
                format!(
                    "Replication health of {} ({} -> {}) is {} on {}: {}",
                    r.vm,
                    r.primary,
                    r.replica,
                    r.health.to_uppercase(),
                    r.host,
                    r.details.join(" ")
                ),
                debounce,
            );
        }
        let cycles_expected = matches!(r.state.as_str(), "replicating" | "error");
        if rules.rpo_factor > 0 && cycles_expected {
            let limit = i64::from(rules.rpo_factor) * r.interval_s as i64;
            if let Some(rpo) = r.rpo_s.filter(|&rpo| rpo > limit) {
                add(
                    "rpo",
                    format!(
                        "RPO of {} is {rpo} s, over {} x its {} s interval ({limit} s)",
                        r.vm, rules.rpo_factor, r.interval_s
                    ),
                    debounce,
                );
            }
        }
        if rules.resync_required && r.state == "resynchronization_required" {
            add(
                "resync_required",
                format!(
                    "Resynchronization is required for {}: resume replication with resync",
                    r.vm
                ),
                debounce,
            );
        }
        if rules.initial_not_finished_min > 0
            && matches!(
                r.state.as_str(),
                "ready_for_initial_replication"
                    | "initial_replication_in_progress"
                    | "waiting_for_initial_replication"
            )
        {
            add(
                "initial_not_finished",
                format!(
                    "The initial replication of {} has not finished after {} min",
                    r.vm, rules.initial_not_finished_min
                ),
                i64::from(rules.initial_not_finished_min) * 60,
            );
        }
        if rules.failover_not_reversed_min > 0
            && matches!(
                r.state.as_str(),
                "failed_over_waiting_completion" | "failed_over"
            )
        {
            add(
                "failover_not_reversed",
                format!(
                    "{} failed over and replication has not been reversed after {} min",
                    r.vm, rules.failover_not_reversed_min
                ),
                i64::from(rules.failover_not_reversed_min) * 60,
            );
        }
        if rules.test_failover_max_age_days > 0 && r.role == "replica" {
            let max = i64::from(rules.test_failover_max_age_days) * 86_400;
            match r.last_test_failover_at {
                // Never tested: alert once it has been observed untested for the whole age.
                None => add(
                    "test_failover_age",
                    format!(
                        "No test failover of {} in {} days",
                        r.vm, rules.test_failover_max_age_days
                    ),
                    max,
                ),
                Some(t) if now - t > max => add(
                    "test_failover_age",
                    format!(
                        "The last test failover of {} was {} days ago",
                        r.vm,
                        (now - t) / 86_400
                    ),
                    debounce,
                ),
                Some(_) => {}
            }
        }
    }
    out.into_values().collect()
}

/// The conditions of failover clusters: every node's answer is grouped by cluster; answers
/// of nodes whose cluster stack does not answer say nothing and are left out.
fn cluster_conditions(
    obs: &Observations,
    rules: &RuleSettings,
    out: &mut BTreeMap<String, Condition>,
) {
    let debounce = i64::from(rules.debounce_s);
    let mut by_cluster: BTreeMap<String, Vec<&ClusterStatus>> = BTreeMap::new();
    for c in obs
        .clusters
        .iter()
        .filter(|c| c.status.stack_error.is_none())
    {
        by_cluster
            .entry(cluster_id(&c.status))
            .or_default()
            .push(&c.status);
    }
    for (id, views) in by_cluster {
        let name = views[0].name.clone();
        let hosts = vec![cluster_host(&id)];
        let mut add = |key: String,
                       rule: &'static str,
                       host: String,
                       vm: Option<String>,
                       message: String,
                       hold_s: i64| {
            out.insert(
                key.clone(),
                Condition {
                    key,
                    rule,
                    host,
                    hosts: hosts.clone(),
                    vm,
                    message,
                    hold_s,
                },
            );
        };
        // Where the nodes disagree, the quorate ones (the partition that runs the cluster)
        // say where VMs run and which nodes are members.
        let quorate: Vec<&ClusterStatus> = views.iter().copied().filter(|v| v.quorate).collect();
        let best = if quorate.is_empty() {
            views.clone()
        } else {
            quorate
        };
        if rules.cluster_quorum {
            // A node that sees a majority of the nodes online but no quorum yet is joining
            // (Corosync forms the membership a moment later): not a lost quorum.
            let lost: Vec<&ClusterStatus> = views
                .iter()
                .copied()
                .filter(|v| {
                    let online = v.nodes.iter().filter(|n| n.online).count();
                    !v.quorate && online * 2 <= v.nodes.len()
                })
                .collect();
            if let Some(first) = lost.first() {
                let online = first.nodes.iter().filter(|n| n.online).count();
                let who: Vec<&str> = lost.iter().map(|v| v.this_node.as_str()).collect();
                add(
                    format!("cluster_quorum:{id}"),
                    "cluster_quorum",
                    name.clone(),
                    None,
                    format!(
                        "Cluster {name} has no quorum as {} {} it ({online} of {} nodes online): a partition without quorum stops its VMs and starts or moves none",
                        who.join(", "),
                        if who.len() == 1 { "sees" } else { "see" },
                        first.nodes.len()
                    ),
                    debounce,
                );
            }
        }
        if rules.node_fenced {
            // The newest successful fencing of each node, as any node's history has it.
            let mut newest: BTreeMap<&str, &ferry_api_types::cluster::FenceEvent> = BTreeMap::new();
            for e in views
                .iter()
                .flat_map(|v| &v.fencing)
                .filter(|e| e.status == "success")
            {
                let slot = newest.entry(e.target.as_str()).or_insert(e);
                if e.completed > slot.completed {
                    *slot = e;
                }
            }
            for (target, e) in newest {
                let back = best.iter().any(|v| {
                    v.nodes
                        .iter()
                        .any(|n| n.name == target && n.online && !n.unclean)
                });
                if back {
                    continue;
                }
                let completed = e.completed.as_deref().unwrap_or("-");
                add(
                    format!("node_fenced:{target}|{}|{completed}|{id}", e.action),
                    "node_fenced",
                    target.to_owned(),
                    None,
                    format!(
                        "Node {target} of cluster {name} was fenced ({}) by {} at {completed}: the cluster restarts its highly available VMs on the other nodes. This alert clears when {target} is back online in the cluster",
                        e.action,
                        e.delegate.as_deref().unwrap_or("an unknown node"),
                    ),
                    0,
                );
            }
        }
        if rules.ha_vm_unplaced {
            let mut seen = BTreeSet::new();
            for vm in best.iter().flat_map(|v| &v.vms) {
                if !vm.ha || !seen.insert(vm.name.as_str()) {
                    continue;
                }
                let why = match vm.state.as_str() {
                    "unplaced" => "no node can run it (unplaced)".to_owned(),
                    "failed" => format!(
                        "it failed on {} (Pacemaker could not start, monitor or stop it there)",
                        vm.node.as_deref().unwrap_or("its node")
                    ),
                    _ => continue,
                };
                add(
                    format!("ha_vm_unplaced:{}|{id}", vm.name),
                    "ha_vm_unplaced",
                    name.clone(),
                    Some(vm.name.clone()),
                    format!(
                        "Highly available VM {} of cluster {name} does not run: {why}",
                        vm.name
                    ),
                    debounce,
                );
            }
        }
    }
}

/// Start or clear of one alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransitionKind {
    /// The condition began (held for its hold time).
    Start,
    /// The condition ended (gone for the debounce time).
    Clear,
}

/// A notification to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Start or clear.
    pub kind: TransitionKind,
    /// The condition (for a clear: as it was last seen).
    pub condition: Condition,
    /// When (UNIX s).
    pub at: i64,
}

#[derive(Debug, Clone)]
struct Tracker {
    condition: Condition,
    first_seen: i64,
    active: bool,
    gone_since: Option<i64>,
}

/// The rules engine's memory between polls.
#[derive(Debug, Default, Clone)]
pub struct Engine {
    trackers: BTreeMap<String, Tracker>,
}

impl Engine {
    /// An engine that knows these alerts are already active (e.g. from the store after a
    /// restart), so it does not announce them again.
    pub fn with_active(active: impl IntoIterator<Item = (Condition, i64)>) -> Self {
        let trackers = active
            .into_iter()
            .map(|(condition, started)| {
                (
                    condition.key.clone(),
                    Tracker {
                        condition,
                        first_seen: started,
                        active: true,
                        gone_since: None,
                    },
                )
            })
            .collect();
        Self { trackers }
    }

    /// Keys of the active alerts.
    pub fn active(&self) -> impl Iterator<Item = &str> {
        self.trackers
            .values()
            .filter(|t| t.active)
            .map(|t| t.condition.key.as_str())
    }

    /// One evaluation: `present` are the conditions found now, `observed` the hosts that
    /// answered (conditions only they could report are not cleared while unobserved).
    pub fn step(
        &mut self,
        present: Vec<Condition>,
        observed: &BTreeSet<String>,
        debounce_s: i64,
        now: i64,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        let seen: BTreeSet<String> = present.iter().map(|c| c.key.clone()).collect();
        for c in present {
            let t = self.trackers.entry(c.key.clone()).or_insert(Tracker {
                condition: c.clone(),
                first_seen: now,
                active: false,
                gone_since: None,
            });
            t.gone_since = None;
            let hold = c.hold_s;
            t.condition = c;
            if !t.active && now - t.first_seen >= hold {
                t.active = true;
                out.push(Transition {
                    kind: TransitionKind::Start,
                    condition: t.condition.clone(),
                    at: now,
                });
            }
        }
        let mut remove = Vec::new();
        for (key, t) in self.trackers.iter_mut() {
            if seen.contains(key) {
                continue;
            }
            // Host-unreachable conditions are decided by the poll itself; others only by
            // an answer from one of their hosts.
            let decided = t.condition.rule == "host_unreachable"
                || t.condition.hosts.iter().any(|h| observed.contains(h));
            if !decided {
                continue;
            }
            if !t.active {
                remove.push(key.clone());
                continue;
            }
            let since = *t.gone_since.get_or_insert(now);
            if now - since >= debounce_s {
                out.push(Transition {
                    kind: TransitionKind::Clear,
                    condition: t.condition.clone(),
                    at: now,
                });
                remove.push(key.clone());
            }
        }
        for k in remove {
            self.trackers.remove(&k);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(health: &str, state: &str, rpo: Option<i64>) -> RelationshipObservation {
        RelationshipObservation {
            host: "a".into(),
            vm: "app".into(),
            primary: "a".into(),
            replica: "b".into(),
            role: "primary".into(),
            state: state.into(),
            health: health.into(),
            details: vec!["why".into()],
            interval_s: 10,
            rpo_s: rpo,
            last_test_failover_at: None,
        }
    }

    fn obs(rels: Vec<RelationshipObservation>) -> Observations {
        Observations {
            reachable: ["a".to_string(), "b".to_string()].into(),
            unreachable: BTreeMap::new(),
            relationships: rels,
            storage: Vec::new(),
            clusters: Vec::new(),
        }
    }

    fn rules(debounce: u32) -> RuleSettings {
        RuleSettings {
            debounce_s: debounce,
            ..RuleSettings::default()
        }
    }

    /// Runs the engine over (time, observations) and returns the transitions as
    /// `(time, start|clear, rule)`.
    fn run(
        rules: &RuleSettings,
        polls: &[(i64, Observations)],
    ) -> Vec<(i64, &'static str, &'static str)> {
        let mut e = Engine::default();
        let mut out = Vec::new();
        for (now, o) in polls {
            let c = conditions(o, rules, *now);
            for t in e.step(c, &o.observed(), i64::from(rules.debounce_s), *now) {
                let k = if t.kind == TransitionKind::Start {
                    "start"
                } else {
                    "clear"
                };
                out.push((*now, k, t.condition.rule));
            }
        }
        out
    }

    #[test]
    fn one_start_and_one_clear_per_episode() {
        let r = rules(20);
        let bad = || obs(vec![rel("critical", "error", Some(5))]);
        let good = || obs(vec![rel("normal", "replicating", Some(5))]);
        let t = run(
            &r,
            &[
                (0, good()),
                (10, bad()),
                (20, bad()),
                (30, bad()), // held 20 s: start
                (40, bad()),
                (50, bad()),
                (60, good()),
                (70, good()),
                (80, good()), // gone 20 s: clear
                (90, good()),
            ],
        );
        assert_eq!(t, vec![(30, "start", "health"), (80, "clear", "health")]);
    }

    #[test]
    fn flapping_within_the_debounce_sends_nothing() {
        let r = rules(30);
        let bad = || obs(vec![rel("warning", "replicating", Some(5))]);
        let good = || obs(vec![rel("normal", "replicating", Some(5))]);
        let t = run(
            &r,
            &[
                (0, bad()),
                (10, good()),
                (20, bad()),
                (30, good()),
                (40, bad()),
                (50, good()),
            ],
        );
        assert!(t.is_empty(), "{t:?}");
        // Active, then flapping back within the debounce: still one alert, no clear.
        let t = run(
            &r,
            &[
                (0, bad()),
                (30, bad()),
                (40, good()),
                (50, bad()),
                (60, good()),
                (70, bad()),
            ],
        );
        assert_eq!(t, vec![(30, "start", "health")]);
    }

    #[test]
    fn both_sides_reporting_make_one_alert_and_unreachable_hosts_do_not_clear() {
        let r = rules(0);
        let mut replica_side = rel("critical", "error", Some(5));
        replica_side.host = "b".into();
        replica_side.role = "replica".into();
        replica_side.last_test_failover_at = Some(0);
        let both = obs(vec![rel("critical", "error", Some(5)), replica_side]);
        let c = conditions(&both, &r, 0);
        assert_eq!(c.iter().filter(|c| c.rule == "health").count(), 1, "{c:?}");

        let mut down = Observations::default();
        down.unreachable
            .insert("a".into(), "connection refused".into());
        down.unreachable
            .insert("b".into(), "connection refused".into());
        let t = run(
            &r,
            &[
                (0, both.clone()),
                (10, down.clone()),
                (20, down),
                (30, obs(vec![])),
            ],
        );
        assert_eq!(
            t,
            vec![
                (0, "start", "health"),
                (10, "start", "host_unreachable"),
                (10, "start", "host_unreachable"),
                // The hosts answer again: both hosts back, and the relationship is gone.
                (30, "clear", "health"),
                (30, "clear", "host_unreachable"),
                (30, "clear", "host_unreachable"),
            ]
        );
    }

    #[test]
    fn a_condition_only_the_replica_reports_is_not_cleared_by_the_primary() {
        let r = RuleSettings {
            debounce_s: 0,
            failover_not_reversed_min: 1,
            health_min: "off".into(),
            ..RuleSettings::default()
        };
        // Failed over: only the replica's side is in a failed-over state.
        let mut replica_side = rel("normal", "failed_over", None);
        replica_side.host = "b".into();
        replica_side.role = "replica".into();
        replica_side.last_test_failover_at = Some(0);
        let primary_side = rel("normal", "suspended", None);
        let both = obs(vec![primary_side.clone(), replica_side]);
        let mut replica_down = obs(vec![primary_side]);
        replica_down.reachable.remove("b");
        replica_down
            .unreachable
            .insert("b".into(), "connection refused".into());
        let t = run(
            &r,
            &[
                (0, both.clone()),
                (60, both),
                (70, replica_down.clone()),
                (200, replica_down),
            ],
        );
        assert_eq!(
            t,
            vec![
                (60, "start", "failover_not_reversed"),
                (70, "start", "host_unreachable"),
            ],
            "the primary's answer cleared what only the replica can report"
        );
    }

    #[test]
    fn stored_alerts_are_decided_by_both_servers_after_a_restart() {
        assert_eq!(
            hosts_of_key("health:site-a>site-b:web1", "site-a"),
            ["site-a", "site-b"]
        );
        assert_eq!(
            hosts_of_key("host_unreachable:site-a", "site-a"),
            ["site-a"]
        );
        assert_eq!(
            hosts_of_key("storage_free:site-b:/srv/a>b", "site-b"),
            ["site-b"]
        );
    }

    #[test]
    fn each_rule_fires_on_its_condition() {
        let r = RuleSettings {
            debounce_s: 0,
            initial_not_finished_min: 1,
            failover_not_reversed_min: 1,
            test_failover_max_age_days: 1,
            ..RuleSettings::default()
        };
        let table: Vec<(RelationshipObservation, i64, &[&str])> = vec![
            (rel("normal", "replicating", Some(20)), 0, &[]),
            (rel("normal", "replicating", Some(31)), 0, &["rpo"]),
            // RPO grows while suspended: that is the health rule's business, not RPO's.
            (rel("warning", "suspended", Some(999)), 0, &["health"]),
            (
                rel("critical", "resynchronization_required", None),
                0,
                &["health", "resync_required"],
            ),
            // Hold times: initial replication and failover rules wait their minutes.
            (
                rel("warning", "initial_replication_in_progress", None),
                59,
                &["health"],
            ),
            (
                rel("warning", "initial_replication_in_progress", None),
                60,
                &["health", "initial_not_finished"],
            ),
            (
                rel("warning", "failed_over", None),
                60,
                &["failover_not_reversed", "health"],
            ),
        ];
        for (o, after, want) in table {
            let mut e = Engine::default();
            let ob = obs(vec![o.clone()]);
            e.step(conditions(&ob, &r, 0), &ob.reachable, 0, 0);
            let mut got: Vec<&str> = e
                .trackers
                .values()
                .filter(|t| t.active || after >= t.condition.hold_s)
                .map(|t| t.condition.rule)
                .collect();
            got.sort();
            assert_eq!(got, want, "{o:?} after {after}s");
        }
        // Test failover age, replica side.
        let mut o = rel("normal", "replicating", Some(5));
        o.role = "replica".into();
        o.last_test_failover_at = Some(0);
        let c = conditions(&obs(vec![o.clone()]), &r, 2 * 86_400);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].rule, "test_failover_age");
        assert!(conditions(&obs(vec![o]), &r, 3600).is_empty());
    }

    #[test]
    fn low_replica_storage_alerts_per_location() {
        let r = rules(0);
        let space = |free: u64| StorageObservation {
            host: "b".into(),
            path: "/srv/replicas".into(),
            free_bytes: free,
            total_bytes: 1000 << 20,
        };
        let o = |free| Observations {
            storage: vec![space(free)],
            ..obs(vec![])
        };
        assert!(
            conditions(&o(100 << 20), &r, 0).is_empty(),
            "10 % free is not under 10 %"
        );
        let c = conditions(&o(99 << 20), &r, 0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].key, "storage_free:b:/srv/replicas");
        assert!(
            c[0].message.contains("99 MiB free of 1000 MiB (9 %)"),
            "{}",
            c[0].message
        );
        let t = run(&r, &[(0, o(1 << 20)), (10, o(1 << 20)), (20, o(500 << 20))]);
        assert_eq!(
            t,
            vec![(0, "start", "storage_free"), (20, "clear", "storage_free")]
        );
    }

    #[test]
    fn a_restarted_engine_does_not_announce_known_alerts_again() {
        let r = rules(0);
        let o = obs(vec![rel("critical", "error", Some(5))]);
        let c = conditions(&o, &r, 0);
        let mut e = Engine::with_active(c.clone().into_iter().map(|c| (c, 0)));
        assert!(e.step(c, &o.reachable, 0, 10).is_empty());
        assert_eq!(e.active().count(), 1);
    }

    use ferry_api_types::cluster::{ClusterNodeStatus, ClusterVmStatus, FenceEvent};

    /// What `this` node of cluster c1 (node1..node3) says: `online` nodes, quorum, VMs,
    /// fencing history.
    fn node_says(
        this: &str,
        online: &[&str],
        quorate: bool,
        vms: &[(&str, bool, Option<&str>, &str)],
        fencing: &[(&str, &str, &str)],
    ) -> ClusterObservation {
        ClusterObservation {
            host: this.into(),
            status: ClusterStatus {
                name: "c1".into(),
                shared_dir: "/srv/shared".into(),
                this_node: this.into(),
                quorate,
                dc: Some(online[0].into()),
                nodes: ["node1", "node2", "node3"]
                    .iter()
                    .map(|n| ClusterNodeStatus {
                        name: (*n).into(),
                        address: "10.0.0.1".into(),
                        online: online.contains(n),
                        standby: false,
                        unclean: false,
                        dc: *n == online[0],
                    })
                    .collect(),
                vms: vms
                    .iter()
                    .map(|(name, ha, node, state)| ClusterVmStatus {
                        name: (*name).into(),
                        ha: *ha,
                        node: node.map(Into::into),
                        state: (*state).into(),
                    })
                    .collect(),
                fencing: fencing
                    .iter()
                    .map(|(target, status, completed)| FenceEvent {
                        target: (*target).into(),
                        action: "reboot".into(),
                        status: (*status).into(),
                        delegate: Some("node1".into()),
                        completed: Some((*completed).into()),
                    })
                    .collect(),
                stack_error: None,
                replication_fingerprint: None,
                broker: None,
            },
        }
    }

    /// A poll in which these nodes answered.
    fn cluster_poll(says: Vec<ClusterObservation>) -> Observations {
        Observations {
            reachable: says.iter().map(|c| c.host.clone()).collect(),
            clusters: says,
            ..Observations::default()
        }
    }

    #[test]
    fn a_cluster_without_quorum_is_one_alert_and_clears_when_quorate_again() {
        let r = rules(10);
        let all = ["node1", "node2", "node3"];
        let whole = || {
            cluster_poll(vec![
                node_says("node1", &all, true, &[], &[]),
                node_says("node2", &all, true, &[], &[]),
            ])
        };
        // node2 and node3 died: node1 alone has no quorum (node2 does not answer).
        let alone = || cluster_poll(vec![node_says("node1", &["node1"], false, &[], &[])]);
        let c = conditions(&alone(), &r, 0);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].key, "cluster_quorum:c1@/srv/shared");
        assert_eq!(c[0].host, "c1");
        assert!(
            c[0].message
                .contains("no quorum as node1 sees it (1 of 3 nodes online)"),
            "{}",
            c[0].message
        );
        let t = run(
            &r,
            &[
                (0, whole()),
                (10, alone()),
                (15, alone()), // a short loss sends nothing
                (20, alone()), // held 10 s: start
                (30, alone()),
                (40, whole()),
                (45, whole()),
                (50, whole()), // gone 10 s: clear
            ],
        );
        assert_eq!(
            t,
            vec![
                (20, "start", "cluster_quorum"),
                (50, "clear", "cluster_quorum")
            ]
        );
        // Two nodes of the same cluster reporting it make one alert.
        let two = cluster_poll(vec![
            node_says("node1", &["node1"], false, &[], &[]),
            node_says("node2", &["node2"], false, &[], &[]),
        ]);
        let c = conditions(&two, &r, 0);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(
            c[0].message.contains("as node1, node2 see it"),
            "{}",
            c[0].message
        );
        // A node rejoining sees every node online before Corosync gives it quorum: not
        // a lost quorum.
        let joining = cluster_poll(vec![node_says("node2", &all, false, &[], &[])]);
        assert!(conditions(&joining, &r, 0).is_empty());
        // No answer from the cluster (node1 unreachable too): the alert stays.
        let mut gone = Observations::default();
        gone.unreachable.insert("node1".into(), "refused".into());
        let t = run(
            &r,
            &[(0, alone()), (10, alone()), (20, gone.clone()), (100, gone)],
        );
        assert_eq!(
            t,
            vec![
                (10, "start", "cluster_quorum"),
                (100, "start", "host_unreachable")
            ]
        );
        // Nor does a node whose cluster stack does not answer decide anything.
        let mut dead_stack = alone();
        dead_stack.clusters[0].status.stack_error = Some("crm_mon: connection refused".into());
        assert!(conditions(&dead_stack, &r, 0).is_empty());
        assert!(!dead_stack.observed().contains("cluster:c1@/srv/shared"));
        let t = run(
            &r,
            &[
                (0, alone()),
                (10, alone()),
                (20, dead_stack.clone()),
                (100, dead_stack),
            ],
        );
        assert_eq!(t, vec![(10, "start", "cluster_quorum")]);
    }

    #[test]
    fn a_fencing_alerts_once_at_once_and_clears_when_the_node_is_back() {
        let r = rules(10);
        let all = ["node1", "node2", "node3"];
        let two = ["node1", "node3"];
        let fenced = [("node2", "success", "2026-01-01 10:00:00Z")];
        // Both survivors report the fencing: one alert, started at first sight.
        let after = || {
            cluster_poll(vec![
                node_says("node1", &two, true, &[], &fenced),
                node_says("node3", &two, true, &[], &fenced),
            ])
        };
        let back = || cluster_poll(vec![node_says("node1", &all, true, &[], &fenced)]);
        let c = conditions(&after(), &r, 0);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].rule, "node_fenced");
        assert_eq!(c[0].host, "node2");
        assert_eq!(
            c[0].key,
            "node_fenced:node2|reboot|2026-01-01 10:00:00Z|c1@/srv/shared"
        );
        assert!(
            c[0].message.starts_with(
                "Node node2 of cluster c1 was fenced (reboot) by node1 at 2026-01-01 10:00:00Z"
            ),
            "{}",
            c[0].message
        );
        let before = || cluster_poll(vec![node_says("node1", &all, true, &[], &[])]);
        let t = run(
            &r,
            &[
                (0, before()),
                (2, after()), // start at once: a fencing is an event
                (4, after()),
                (30, after()),
                (40, back()), // node2 rejoined
                (50, back()), // gone 10 s: clear
                (60, back()),
            ],
        );
        assert_eq!(
            t,
            vec![(2, "start", "node_fenced"), (50, "clear", "node_fenced")]
        );
        // A fencing already over when first seen (the node is back) is not announced, nor
        // is a failed one (Pacemaker retries; the node stays unclean).
        let t = run(&r, &[(0, back()), (10, back())]);
        assert!(t.is_empty(), "{t:?}");
        let failed = cluster_poll(vec![node_says(
            "node1",
            &two,
            true,
            &[],
            &[("node2", "failed", "2026-01-01 10:00:00Z")],
        )]);
        assert!(conditions(&failed, &r, 0).is_empty());
        // node2 fenced again later, while the first alert is over: a new alert, and only
        // the newest fencing counts (the old one does not come back).
        let again = [
            ("node2", "success", "2026-01-01 10:00:00Z"),
            ("node2", "success", "2026-01-02 08:00:00Z"),
        ];
        let later = || cluster_poll(vec![node_says("node1", &two, true, &[], &again)]);
        let c = conditions(&later(), &r, 0);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].key.contains("2026-01-02 08:00:00Z"), "{}", c[0].key);
        let t = run(
            &r,
            &[(0, after()), (40, back()), (50, back()), (60, later())],
        );
        assert_eq!(
            t,
            vec![
                (0, "start", "node_fenced"),
                (50, "clear", "node_fenced"),
                (60, "start", "node_fenced")
            ]
        );
        // Turned off: nothing.
        let off = RuleSettings {
            node_fenced: false,
            ..rules(10)
        };
        assert!(conditions(&after(), &off, 0).is_empty());
    }

    #[test]
    fn an_ha_vm_that_cannot_be_placed_alerts_after_the_hold() {
        let r = rules(10);
        let all = ["node1", "node2", "node3"];
        let vms = |state: &str, node: Option<&'static str>| {
            cluster_poll(vec![node_says(
                "node1",
                &all,
                true,
                &[
                    ("app", true, node, state),
                    ("scratch", false, None, "stopped"),
                ],
                &[],
            )])
        };
        let c = conditions(&vms("unplaced", None), &r, 0);
        assert_eq!(c.len(), 1, "a stopped VM that is not HA is no alert: {c:?}");
        assert_eq!(c[0].rule, "ha_vm_unplaced");
        assert_eq!(c[0].vm.as_deref(), Some("app"));
        assert_eq!(c[0].key, "ha_vm_unplaced:app|c1@/srv/shared");
        assert!(
            c[0].message.contains("no node can run it"),
            "{}",
            c[0].message
        );
        let c = conditions(&vms("failed", Some("node3")), &r, 0);
        assert!(
            c[0].message.contains("it failed on node3"),
            "{}",
            c[0].message
        );
        for ok in ["started", "migrating"] {
            assert!(
                conditions(&vms(ok, Some("node1")), &r, 0).is_empty(),
                "{ok}"
            );
        }
        // A failover's few seconds without a node send nothing; a lasting one alerts once.
        let t = run(
            &r,
            &[
                (0, vms("started", Some("node1"))),
                (2, vms("unplaced", None)),
                (6, vms("started", Some("node2"))),
                (20, vms("unplaced", None)),
                (25, vms("failed", Some("node2"))),
                (30, vms("unplaced", None)), // held 10 s (unplaced or failed): start
                (40, vms("started", Some("node3"))),
                (50, vms("started", Some("node3"))),
            ],
        );
        assert_eq!(
            t,
            vec![
                (30, "start", "ha_vm_unplaced"),
                (50, "clear", "ha_vm_unplaced")
            ]
        );
        // A node cut off from the others (no quorum, its VMs stopped) does not say where VMs
        // run: the quorate partition does.
        let split = cluster_poll(vec![
            node_says(
                "node1",
                &["node1", "node2"],
                true,
                &[("app", true, Some("node2"), "started")],
                &[],
            ),
            node_says(
                "node3",
                &["node3"],
                false,
                &[("app", true, None, "unplaced")],
                &[],
            ),
        ]);
        let rules_only_vm = RuleSettings {
            cluster_quorum: false,
            ..rules(10)
        };
        assert!(conditions(&split, &rules_only_vm, 0).is_empty());
    }

    #[test]
    fn stored_cluster_alerts_are_decided_by_their_cluster() {
        assert_eq!(
            hosts_of_key("cluster_quorum:c1@/srv/shared", "c1"),
            ["cluster:c1@/srv/shared"]
        );
        assert_eq!(
            hosts_of_key(
                "node_fenced:node2|reboot|2026-01-01 10:00:00Z|c1@/srv/a|b",
                "node2"
            ),
            ["cluster:c1@/srv/a|b"]
        );
        assert_eq!(
            hosts_of_key("ha_vm_unplaced:app|c1@/srv/shared", "c1"),
            ["cluster:c1@/srv/shared"]
        );
    }

    #[test]
    fn settings_validate() {
        assert!(RuleSettings::default().validate().is_ok());
        let bad = RuleSettings {
            health_min: "loud".into(),
            ..RuleSettings::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("warning, critical or off"));
    }
}
