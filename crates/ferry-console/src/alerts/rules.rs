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

/// The hosts whose answers decide a stored alert after a console restart: both servers of a
/// relationship (from its key, `rule:primary>replica:vm`), else the alert's host.
pub fn hosts_of_key(key: &str, host: &str) -> Vec<String> {
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
            for t in e.step(c, &o.reachable, i64::from(rules.debounce_s), *now) {
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
