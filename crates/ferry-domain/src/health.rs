//! Replication health (Hyper-V's Normal / Warning / Critical) from a relationship's state
//! and the statistics of its monitoring window. Pure: the caller passes the figures and
//! the time. The formula (also in docs/HEALTH.md):
//!
//! - **Critical** when replication cannot go on without an administrator:
//!   resynchronization required (or running); replication suspended on the replica; or the
//!   primary failed its last [`CRITICAL_FAILURES`] cycles in a row (it cannot send:
//!   network, or storage on either side).
//! - **Warning** when any of: a cycle failed (fewer in a row than the above); more than
//!   20 % of the cycles expected in the window were missed; the real-time RPO (now minus
//!   the newest complete recovery point) is over 3 intervals, or over 1 hour (Hyper-V's
//!   "behind by more than an hour"); the initial copy is not done; replication suspended
//!   on the primary; a failover was not followed by reverse replication.
//! - **Normal** otherwise.
//!
//! Resetting the statistics starts a new window, which clears the "missed cycles" rule
//! (Hyper-V: Reset Statistics turns Warning into Normal).

use serde::{Deserialize, Serialize};

use crate::{ReplicationState, Role};

/// Failed cycles in a row that make health Critical.
pub const CRITICAL_FAILURES: u32 = 3;
/// Share of expected cycles that may be missed before Warning (Hyper-V: 20 %).
pub const MAX_MISSED_PERCENT: u64 = 20;
/// RPO beyond which health is Warning whatever the interval (Hyper-V: 1 hour).
pub const MAX_RPO_SECS: i64 = 3600;
/// RPO beyond this many intervals is Warning.
pub const MAX_RPO_INTERVALS: i64 = 3;

/// Hyper-V's replication health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// All is well.
    Normal,
    /// Needs watching.
    Warning,
    /// Needs an administrator.
    Critical,
}

impl Health {
    /// Name as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }

    /// Numeric value for metrics: 0 normal, 1 warning, 2 critical.
    pub fn level(self) -> u8 {
        self as u8
    }
}

/// What health is judged on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthInput {
    /// The VM.
    pub vm: String,
    /// This side.
    pub role: Role,
    /// State of the relationship on this side.
    pub state: ReplicationState,
    /// The primary's last error mentions a suspension on the replica.
    pub suspended_on_replica: bool,
    /// Replication interval (s).
    pub interval_s: i64,
    /// Now (UNIX s).
    pub now: i64,
    /// Start of the monitoring window (UNIX s).
    pub window_start: i64,
    /// When the newest complete recovery point was taken (UNIX s).
    pub last_point_at: Option<i64>,
    /// Successful cycles in the window.
    pub successful: u64,
    /// Failed cycles in a row, ending with the latest.
    pub failures_in_a_row: u32,
    /// A failover happened and replication was not reversed yet (Hyper-V: Warning).
    pub failover_not_reversed: bool,
}

/// The verdict, with the reasons as sentences (Hyper-V's health details).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Health.
    pub health: Health,
    /// Why, one sentence per rule that applies.
    pub details: Vec<String>,
    /// Cycles expected in the window.
    pub expected: u64,
    /// Cycles missed in the window.
    pub missed: u64,
    /// Now minus the newest complete point (s), if there is one.
    pub rpo_s: Option<i64>,
}

/// Cycles expected in a window: one per interval, the first one at the window's start not
/// counted (its cycle may still be running).
pub fn expected_cycles(window_s: i64, interval_s: i64) -> u64 {
    if interval_s <= 0 || window_s <= 0 {
        return 0;
    }
    ((window_s / interval_s) as u64).saturating_sub(1)
}

/// Judges health.
pub fn evaluate(i: &HealthInput) -> HealthReport {
    use ReplicationState as S;
    let vm = &i.vm;
    let mut critical = Vec::new();
    let mut warning = Vec::new();
    let cycles_expected = matches!(i.state, S::Replicating | S::Error);
    let expected = if cycles_expected {
        expected_cycles(i.now - i.window_start, i.interval_s)
    } else {
        0
    };
    let missed = expected.saturating_sub(i.successful);
    let rpo_s = i.last_point_at.map(|t| (i.now - t).max(0));

    match i.state {
        S::ResynchronizationRequired => critical.push(format!(
            "Resynchronization is required for the virtual machine {vm}. Resume replication with --resync to start resynchronization."
        )),
        S::Resynchronizing => critical.push(format!(
            "Virtual machine {vm} is being resynchronized: its replica is not usable until this ends."
        )),
        S::Suspended if i.role == Role::Replica => critical.push(format!(
            "Replication of {vm} is suspended on the replica server."
        )),
        S::Suspended => warning.push(format!("Replication of {vm} is suspended on the primary server.")),
        S::ReadyForInitialReplication
        | S::InitialReplicationInProgress
        | S::WaitingForInitialReplication => {
            warning.push(format!("Initial replication of {vm} is not complete."))
        }
        S::PreparedForFailover => warning.push(format!(
            "Virtual machine {vm} is prepared for a planned failover: it runs on the replica server now, or cancel the failover."
        )),
        S::FailedOverWaitingCompletion => warning.push(format!(
            "Virtual machine {vm} was failed over to a recovery point: complete the failover (or cancel it)."
        )),
        S::FailedOver => warning.push(format!(
            "Virtual machine {vm} was failed over, but reverse replication has not started."
        )),
        S::Replicating | S::Error => {}
    }
    if i.failover_not_reversed {
        warning.push(format!(
            "Virtual machine {vm} was failed over, but reverse replication has not started."
        ));
    }
    if i.suspended_on_replica && i.state == S::Error {
        critical.push(format!(
            "Replication of {vm} is suspended on the replica server."
        ));
    } else if i.failures_in_a_row >= CRITICAL_FAILURES {
        critical.push(format!(
            "Replication for virtual machine {vm} is in error: the last {} cycles failed. Fix the error(s) and replication resumes by itself.",
            i.failures_in_a_row
        ));
    } else if i.failures_in_a_row > 0 {
        warning.push(format!(
            "The last replication cycle of {vm} failed ({} in a row).",
            i.failures_in_a_row
        ));
    }
    if expected > 0 && missed * 100 > expected * MAX_MISSED_PERCENT {
        warning.push(format!(
            "More than {MAX_MISSED_PERCENT} percent of replication cycles have been missed for virtual machine {vm} ({missed} of {expected}). Replication might be encountering problems."
        ));
    }
    if let (Some(rpo), true) = (rpo_s, cycles_expected) {
        if rpo > MAX_RPO_SECS {
            warning.push(format!(
                "Replica virtual machine {vm} is behind the primary by more than an hour."
            ));
        } else if rpo > MAX_RPO_INTERVALS * i.interval_s {
            warning.push(format!(
                "Replica virtual machine {vm} is behind the primary by {rpo} s, more than {MAX_RPO_INTERVALS} intervals."
            ));
        }
    }
    let health = if !critical.is_empty() {
        Health::Critical
    } else if !warning.is_empty() {
        Health::Warning
    } else {
        Health::Normal
    };
    critical.extend(warning);
    HealthReport {
        health,
        details: critical,
        expected,
        missed,
        rpo_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;

    fn input() -> HealthInput {
        HealthInput {
            vm: "app".into(),
            role: Role::Primary,
            state: S::Replicating,
            suspended_on_replica: false,
            interval_s: 30,
            now: 10_000,
            window_start: 10_000 - 300,
            last_point_at: Some(10_000 - 20),
            successful: 9,
            failures_in_a_row: 0,
            failover_not_reversed: false,
        }
    }

    #[test]
    fn normal_when_cycles_run_and_the_rpo_is_small() {
        let r = evaluate(&input());
        assert_eq!(r.health, Health::Normal, "{r:?}");
        assert_eq!((r.expected, r.missed, r.rpo_s), (9, 0, Some(20)));
    }

    #[test]
    fn failures_go_warning_then_critical() {
        let mut i = input();
        i.state = S::Error;
        i.failures_in_a_row = 1;
        assert_eq!(evaluate(&i).health, Health::Warning);
        i.failures_in_a_row = CRITICAL_FAILURES;
        let r = evaluate(&i);
        assert_eq!(r.health, Health::Critical);
        assert!(r.details[0].contains("in error"), "{r:?}");
    }

    #[test]
    fn missed_cycles_and_rpo_warn() {
        let mut i = input();
        i.successful = 7; // 2 of 9 missed: 22 %
        let r = evaluate(&i);
        assert_eq!(r.health, Health::Warning);
        assert!(r.details[0].contains("More than 20 percent"), "{r:?}");
        let mut i = input();
        i.last_point_at = Some(i.now - 100); // > 3 intervals
        assert_eq!(evaluate(&i).health, Health::Warning);
        i.interval_s = 3600;
        i.window_start = i.now - 7200;
        i.successful = 1;
        i.last_point_at = Some(i.now - 3700);
        assert!(evaluate(&i)
            .details
            .iter()
            .any(|d| d.contains("more than an hour")));
    }

    #[test]
    fn states_map_to_hyper_v_health() {
        let mut i = input();
        for (state, role, want) in [
            (
                S::ResynchronizationRequired,
                Role::Primary,
                Health::Critical,
            ),
            (S::Suspended, Role::Replica, Health::Critical),
            (S::Suspended, Role::Primary, Health::Warning),
            (
                S::InitialReplicationInProgress,
                Role::Primary,
                Health::Warning,
            ),
            (
                S::WaitingForInitialReplication,
                Role::Replica,
                Health::Warning,
            ),
        ] {
            i.state = state;
            i.role = role;
            assert_eq!(evaluate(&i).health, want, "{state:?} {role:?}");
        }
        let mut i = input();
        i.state = S::Error;
        i.suspended_on_replica = true;
        i.failures_in_a_row = 1;
        assert_eq!(evaluate(&i).health, Health::Critical);
    }

    #[test]
    fn a_failover_not_reversed_warns() {
        let mut i = input();
        i.failover_not_reversed = true;
        let r = evaluate(&i);
        assert_eq!(r.health, Health::Warning);
        assert!(r.details[0].contains("reverse replication"), "{r:?}");
    }

    #[test]
    fn expected_cycles_leave_the_running_one_out() {
        assert_eq!(expected_cycles(300, 30), 9);
        assert_eq!(expected_cycles(29, 30), 0);
        assert_eq!(expected_cycles(0, 30), 0);
    }
}
