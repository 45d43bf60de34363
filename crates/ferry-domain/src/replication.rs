//! Replication as the user sees it (Hyper-V Replica's vocabulary): a relationship's
//! settings and their validation, its state, and which recovery points the retention
//! policy keeps. Pure: times are passed in as UNIX seconds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The shortest replication interval Ferry accepts (Hyper-V's shortest is 30 s). A cycle
/// of a small delta takes well under a second since cycles stream (docs/BENCHMARKS.md).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest: a day. Longer gaps are a schedule, not replication.
pub const MAX_INTERVAL: Duration = Duration::from_secs(86_400);
/// Hyper-V allows 0–24 additional recovery points; Ferry allows up to this many.
pub const MAX_RECOVERY_POINTS: u32 = 96;

/// Which side of a relationship this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the VM and sends changes.
    Primary,
    /// Keeps recovery points of the VM.
    Replica,
}

impl Role {
    /// The role's name as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
        }
    }
}

/// A relationship's replication state (a subset of Hyper-V's `VMReplicationState`, same
/// meanings; failover states arrive with failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationState {
    /// Enabled; the initial copy has not started (e.g. scheduled for later).
    ReadyForInitialReplication,
    /// The initial copy is being sent.
    InitialReplicationInProgress,
    /// Replica side: waiting for the initial copy (network, or an import from a folder).
    WaitingForInitialReplication,
    /// Normal: cycles run at the interval.
    Replicating,
    /// Paused by an administrator; changes are still tracked on the primary.
    Suspended,
    /// Cycles fail; the reason is in `last_error`. Tracking continues; retried.
    Error,
    /// Change tracking was lost (QEMU or host crash, disk edited offline): the replica
    /// must be compared with the primary and the differences sent.
    ResynchronizationRequired,
    /// The comparison is running.
    Resynchronizing,
    /// Primary side: a planned failover shipped every change; the VM must not start here
    /// (cancel returns to replicating).
    PreparedForFailover,
    /// Replica side: failed over to a recovery point, not committed yet (cancel returns to
    /// replicating; complete commits).
    FailedOverWaitingCompletion,
    /// Replica side: failover committed; the other recovery points are gone.
    FailedOver,
}

impl ReplicationState {
    /// The state's name as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadyForInitialReplication => "ready_for_initial_replication",
            Self::InitialReplicationInProgress => "initial_replication_in_progress",
            Self::WaitingForInitialReplication => "waiting_for_initial_replication",
            Self::Replicating => "replicating",
            Self::Suspended => "suspended",
            Self::Error => "error",
            Self::ResynchronizationRequired => "resynchronization_required",
            Self::Resynchronizing => "resynchronizing",
            Self::PreparedForFailover => "prepared_for_failover",
            Self::FailedOverWaitingCompletion => "failed_over_waiting_completion",
            Self::FailedOver => "failed_over",
        }
    }

    /// Hyper-V's UI label for the state.
    pub fn label(self) -> &'static str {
        match self {
            Self::ReadyForInitialReplication | Self::WaitingForInitialReplication => {
                "Pending Initial Replication"
            }
            Self::InitialReplicationInProgress => "Initial Replication in Progress",
            Self::Replicating => "Replication Enabled",
            Self::Suspended => "Replication Paused",
            Self::Error => "Replication Error",
            Self::ResynchronizationRequired => "Resynchronization Required",
            Self::Resynchronizing => "Resynchronizing",
            Self::PreparedForFailover => "Prepared for planned failover",
            Self::FailedOverWaitingCompletion | Self::FailedOver => "Failover Complete",
        }
    }

    /// Whether the scheduler runs cycles in this state.
    pub fn runs_cycles(self) -> bool {
        matches!(
            self,
            Self::InitialReplicationInProgress
                | Self::Replicating
                | Self::Error
                | Self::Resynchronizing
        )
    }
}

impl fmt::Display for ReplicationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReplicationState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Self::ReadyForInitialReplication,
            Self::InitialReplicationInProgress,
            Self::WaitingForInitialReplication,
            Self::Replicating,
            Self::Suspended,
            Self::Error,
            Self::ResynchronizationRequired,
            Self::Resynchronizing,
            Self::PreparedForFailover,
            Self::FailedOverWaitingCompletion,
            Self::FailedOver,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| format!("unknown replication state {s:?}"))
    }
}

/// What an administrator asks of a relationship.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Start the initial copy now.
    StartInitial,
    /// Pause replication.
    Suspend,
    /// Resume replication.
    Resume,
    /// Resume by comparing both sides first (resynchronization).
    Resync,
}

/// A request refused in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {request} while replication is {state}: {hint}")]
pub struct StateError {
    /// What was asked.
    pub request: &'static str,
    /// The state it was asked in.
    pub state: ReplicationState,
    /// What to do instead.
    pub hint: &'static str,
}

/// The state a request leads to, or why it is refused (Hyper-V's preconditions).
pub fn on_request(state: ReplicationState, req: Request) -> Result<ReplicationState, StateError> {
    use ReplicationState as S;

    let refuse = |request, hint| {
        Err(StateError {
            request,
            state,
            hint,
        })
    };
    match (req, state) {
        (Request::StartInitial, S::ReadyForInitialReplication) => {
            Ok(S::InitialReplicationInProgress)
        }
        (Request::StartInitial, _) => {
            refuse("start the initial replication", "it has already started")
        }
        (Request::Suspend, S::Suspended) => refuse("suspend", "it is already suspended"),
        (Request::Suspend, _) => Ok(S::Suspended),
        (Request::Resume, S::Suspended) | (Request::Resume, S::Error) => Ok(S::Replicating),
        (Request::Resume, S::ResynchronizationRequired) => refuse(
            "resume",
            "resume with --resync to compare both sides and send the differences",
        ),
        (Request::Resume, _) => refuse("resume", "it is not suspended"),
        (Request::Resync, S::ReadyForInitialReplication | S::WaitingForInitialReplication) => {
            refuse("resynchronize", "the initial replication has not run yet")
        }
        (Request::Resync, _) => Ok(S::Resynchronizing),
    }
}

/// A replication interval: any duration from 1 s to a day; `30s`, `5m` and `15m` are
/// Hyper-V's choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interval(pub Duration);

impl Interval {
    /// The presets Hyper-V offers.
    pub const PRESETS: [&'static str; 3] = ["30s", "5m", "15m"];

    /// The interval in whole seconds.
    pub fn secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl FromStr for Interval {
    type Err = String;
    /// `30s`, `5m`, `15m`, `1h`, `90` (seconds), `2m30s`.
    fn from_str(s: &str) -> Result<Self, String> {
        let d = parse_duration(s)?;
        if d < MIN_INTERVAL || d > MAX_INTERVAL {
            return Err(format!(
                "interval {s:?} is out of range: use 1s to 24h (Hyper-V's are 30s, 5m, 15m)"
            ));
        }
        Ok(Interval(d))
    }
}

/// Parses `1h30m`, `45s`, `5m`, `2h 30min`, `120` (bare seconds) with `humantime`, to
/// whole seconds (intervals and schedules are kept in seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration: use e.g. 30s, 5m, 1h30m");
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    // Whole units only, as before humantime (which would take `1.5m`).
    if t.contains('.') {
        return Err(bad());
    }
    let d = humantime::parse_duration(t).map_err(|_| bad())?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?} is not a whole number of seconds"));
    }
    Ok(d)
}

/// Which recovery points to keep: the latest, plus the newest point of each of up to
/// `additional` earlier periods of `spacing` (Hyper-V: 0–24 additional points, hourly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Additional recovery points besides the latest.
    pub additional: u32,
    /// Length of the periods that each keep one point, in seconds (Hyper-V: 3600).
    pub spacing_secs: u64,
}

impl RetentionPolicy {
    /// Hyper-V's policy: latest + `additional` hourly points.
    pub fn hourly(additional: u32) -> Self {
        Self {
            additional,
            spacing_secs: 3600,
        }
    }

    /// Checks the limits.
    pub fn validate(&self) -> Result<(), String> {
        if self.additional > MAX_RECOVERY_POINTS {
            return Err(format!(
                "{} additional recovery points is too many: at most {MAX_RECOVERY_POINTS}",
                self.additional
            ));
        }
        if self.spacing_secs == 0 {
            return Err("recovery point spacing must be at least 1s".into());
        }
        Ok(())
    }

    /// Given points as `(id, created_at)` in any order, the ids to drop.
    ///
    /// Time is cut into periods of `spacing` (hours, by default, aligned on the clock). The
    /// newest point is always kept; besides it, the newest point of each of the `additional`
    /// most recent earlier periods is kept, as Hyper-V keeps "one point per hour". The choice
    /// is stable as points arrive: a kept point is dropped only when a newer point of its
    /// own period arrives (while that period is the current one) or when its period falls
    /// out of the window — so hourly points accumulate at any cycle interval. `pinned`
    /// points (in use by a test failover or a failover) are never dropped and do not count.
    pub fn to_drop(&self, points: &[(i64, i64)], pinned: &[i64]) -> Vec<i64> {
        let mut sorted: Vec<(i64, i64)> = points.to_vec();
        sorted.sort_by_key(|&(id, at)| std::cmp::Reverse((at, id)));
        let mut drop = Vec::new();
        let Some(&(_, newest_at)) = sorted.first() else {
            return drop;
        };
        let spacing = self.spacing_secs.max(1) as i64;
        let period = |at: i64| at.div_euclid(spacing);
        let mut last_period = period(newest_at);
        let mut kept = 0u32;
        for &(id, at) in sorted.iter().skip(1) {
            if pinned.contains(&id) {
                continue;
            }
            let p = period(at);
            if p < last_period && kept < self.additional {
                kept += 1;
                last_period = p;
            } else {
                drop.push(id);
            }
        }
        drop
    }
}

/// One window of a bandwidth schedule: from `from` to `to` (minutes of the day, local
/// time; `to < from` wraps past midnight), outgoing replication is limited to `limit`
/// bytes/s (0 = unlimited). Written `HH:MM-HH:MM=RATE`, e.g. `08:00-18:00=10M` or
/// `22:00-06:00=unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthWindow {
    /// Start, minutes after midnight (inclusive).
    pub from: u32,
    /// End, minutes after midnight (exclusive; 1440 = midnight).
    pub to: u32,
    /// Bytes per second; 0 = unlimited.
    pub limit: u64,
}

impl BandwidthWindow {
    /// Whether minute-of-day `m` falls in the window.
    pub fn contains(&self, m: u32) -> bool {
        if self.from <= self.to {
            (self.from..self.to).contains(&m)
        } else {
            m >= self.from || m < self.to
        }
    }
}

impl FromStr for BandwidthWindow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("{s:?} is not a schedule window such as \"08:00-18:00=10M\" or \"22:00-06:00=unlimited\"")
        };
        let (times, rate) = s.split_once('=').ok_or_else(bad)?;
        let (from, to) = times.split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Result<u32, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if m >= 60 || h > 24 || (h == 24 && m != 0) {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let (from, to) = (minute(from)?, minute(to)?);
        if from == to || from == 1440 {
            return Err(bad());
        }
        let rate = rate.trim();
        let limit = if rate.eq_ignore_ascii_case("unlimited") {
            0
        } else {
            match crate::parse_size(rate) {
                Ok(n) if n > 0 => n,
                _ => return Err(bad()),
            }
        };
        Ok(Self { from, to, limit })
    }
}

/// The limit in force at minute-of-day `minute`: the first window containing it, else
/// `default` (0 = unlimited).
pub fn bandwidth_at(windows: &[BandwidthWindow], default: u64, minute: u32) -> u64 {
    windows
        .iter()
        .find(|w| w.contains(minute))
        .map_or(default, |w| w.limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;

    #[test]
    fn bandwidth_schedule_windows_parse_and_wrap_midnight() {
        let day: BandwidthWindow = "08:00-18:00=10M".parse().unwrap();
        assert_eq!((day.from, day.to, day.limit), (480, 1080, 10 << 20));
        let night: BandwidthWindow = "22:00-06:00=unlimited".parse().unwrap();
        assert!(night.contains(23 * 60) && night.contains(0) && night.contains(359));
        assert!(!night.contains(360) && !night.contains(12 * 60));
        let all: BandwidthWindow = "00:00-24:00=1M".parse().unwrap();
        assert!(all.contains(0) && all.contains(1439));
        for bad in [
            "",
            "08:00-18:00",
            "8-18=1M",
            "08:00-08:00=1M",
            "25:00-01:00=1M",
            "08:60-09:00=1M",
            "08:00-09:00=0",
            "08:00-09:00=fast",
        ] {
            assert!(bad.parse::<BandwidthWindow>().is_err(), "{bad}");
        }
        let w = [day, night];
        assert_eq!(bandwidth_at(&w, 50, 9 * 60), 10 << 20);
        assert_eq!(bandwidth_at(&w, 50, 23 * 60), 0);
        assert_eq!(bandwidth_at(&w, 50, 20 * 60), 50);
    }

    #[test]
    fn intervals_parse_presets_and_any_value_from_1s() {
        assert_eq!("30s".parse::<Interval>().unwrap().secs(), 30);
        assert_eq!("5m".parse::<Interval>().unwrap().secs(), 300);
        assert_eq!("15m".parse::<Interval>().unwrap().secs(), 900);
        assert_eq!("5".parse::<Interval>().unwrap().secs(), 5);
        assert_eq!("1s".parse::<Interval>().unwrap().secs(), 1);
        assert_eq!("1m30s".parse::<Interval>().unwrap().secs(), 90);
        assert_eq!("1h 30min".parse::<Interval>().unwrap().secs(), 5400);
        for bad in [
            "0s",
            "0",
            "",
            "5x",
            "m",
            "25h",
            "1.5m",
            "-5s",
            "99999999999999999999h",
            "5500ms",
        ] {
            assert!(bad.parse::<Interval>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn retention_keeps_latest_and_spaced_points() {
        // Points every 10 minutes over 3 hours; keep latest + 2 hourly.
        let points: Vec<(i64, i64)> = (0..19).map(|i| (i, i * 600)).collect();
        let drop = RetentionPolicy::hourly(2).to_drop(&points, &[]);
        let kept: Vec<i64> = points
            .iter()
            .map(|p| p.0)
            .filter(|id| !drop.contains(id))
            .collect();
        // The newest (3:00), and the last point of the hours 2:00-3:00 and 1:00-2:00.
        assert_eq!(kept, vec![11, 17, 18]);
        // Stable as points arrive every 10 minutes: hourly points accumulate (the old
        // policy, "at least an hour older than the last kept", merged them all away).
        let mut live: Vec<(i64, i64)> = Vec::new();
        for i in 0..19 {
            live.push((i, i * 600));
            let drop = RetentionPolicy::hourly(2).to_drop(&live, &[]);
            live.retain(|p| !drop.contains(&p.0));
        }
        assert_eq!(
            live.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![11, 17, 18]
        );
    }

    #[test]
    fn retention_zero_keeps_only_latest_and_pins_survive() {
        let points = [(1, 100), (2, 200), (3, 300)];
        assert_eq!(RetentionPolicy::hourly(0).to_drop(&points, &[]), vec![2, 1]);
        assert_eq!(RetentionPolicy::hourly(0).to_drop(&points, &[1]), vec![2]);
        assert!(RetentionPolicy::hourly(0).to_drop(&[], &[]).is_empty());
        let p = RetentionPolicy {
            additional: 2,
            spacing_secs: 1,
        };
        assert!(p.to_drop(&points, &[]).is_empty());
        assert!(RetentionPolicy::hourly(MAX_RECOVERY_POINTS + 1)
            .validate()
            .is_err());
    }

    #[test]
    fn requests_follow_hyper_v_preconditions() {
        assert_eq!(
            on_request(S::Replicating, Request::Suspend),
            Ok(S::Suspended)
        );
        assert_eq!(
            on_request(S::Suspended, Request::Resume),
            Ok(S::Replicating)
        );
        assert!(on_request(S::Replicating, Request::Resume).is_err());
        let e = on_request(S::ResynchronizationRequired, Request::Resume).unwrap_err();
        assert!(e.to_string().contains("--resync"), "{e}");
        assert_eq!(
            on_request(S::ResynchronizationRequired, Request::Resync),
            Ok(S::Resynchronizing)
        );
        assert!(on_request(S::ReadyForInitialReplication, Request::Resync).is_err());
        assert_eq!(
            on_request(S::ReadyForInitialReplication, Request::StartInitial),
            Ok(S::InitialReplicationInProgress)
        );
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for s in [
            S::Replicating,
            S::Suspended,
            S::ResynchronizationRequired,
            S::Error,
        ] {
            assert_eq!(s.as_str().parse::<S>().unwrap(), s);
        }
        assert!("bogus".parse::<S>().is_err());
    }
}

/// How the initial copy reaches the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "method", content = "arg")]
pub enum InitialMethod {
    /// Over the network, as soon as replication is enabled.
    Network,
    /// Over the network at this UNIX time.
    At(i64),
    /// Written to a folder on the primary, carried over, and imported on the replica.
    Export(String),
    /// The replica already holds a copy: compare by hash and send only the differences.
    Existing,
}

/// A relationship's settings, chosen at `replication enable` (Hyper-V's wizard pages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationSettings {
    /// Time between cycles.
    pub interval: Interval,
    /// Which recovery points the replica keeps.
    pub retention: RetentionPolicy,
    /// zstd-compress what is sent.
    pub compression: bool,
    /// Disk indexes not replicated.
    pub excluded_disks: Vec<usize>,
    /// How the initial copy is made.
    pub initial: InitialMethod,
    /// Bandwidth limit for this relationship, bytes/s; `None` = unlimited.
    pub bandwidth_limit: Option<u64>,
    /// Change-tracking granularity in bytes (4 KiB ships what a 4 KiB write changed;
    /// QEMU's default 64 KiB ships ~15x more for random small writes).
    pub granularity: u32,
    /// Take an application-consistent point (guest filesystems frozen through the guest
    /// agent) at most this often, in seconds; `None` = crash-consistent points only.
    #[serde(default)]
    pub app_consistent_every: Option<u64>,
    /// Identifies this relationship on both sides (chosen at enable): a replica built by an
    /// earlier relationship of the same VM is never mistaken for this one's.
    #[serde(default)]
    pub relationship_id: u64,
}

impl ReplicationSettings {
    /// Checks the settings against the VM's disk count.
    pub fn validate(&self, disks: usize) -> Result<(), String> {
        self.retention.validate()?;
        if let Some(&d) = self.excluded_disks.iter().find(|&&d| d >= disks) {
            return Err(format!(
                "cannot exclude disk {d}: the VM has {disks} disk(s), numbered from 0"
            ));
        }
        if self.excluded_disks.len() >= disks {
            return Err("every disk is excluded: at least one disk must be replicated".into());
        }
        if !self.granularity.is_power_of_two() || !(4096..=1 << 20).contains(&self.granularity) {
            return Err(format!(
                "granularity {} is invalid: use a power of two from 4K to 1M",
                self.granularity
            ));
        }
        if let Some(n) = self.app_consistent_every {
            if n < self.interval.secs() {
                return Err(format!(
                    "application-consistent points every {n}s is more often than the interval ({}s): use at least the interval",
                    self.interval.secs()
                ));
            }
        }
        if self.bandwidth_limit == Some(0) {
            return Err(
                "a bandwidth limit of 0 would stop replication: use suspend instead".into(),
            );
        }
        Ok(())
    }

    /// Indexes of the replicated disks.
    pub fn replicated_disks(&self, disks: usize) -> Vec<usize> {
        (0..disks)
            .filter(|d| !self.excluded_disks.contains(d))
            .collect()
    }
}
