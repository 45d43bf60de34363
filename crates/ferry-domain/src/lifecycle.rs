//! The VM lifecycle state machine: which operations a VM in a given state accepts, what
//! the daemon must do for each, and where observations of the QEMU process lead.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Off
//!     Off --> Starting: start
//!     Starting --> Running: started
//!     Starting --> Off: exited (start failed)
//!     Running --> Paused: pause
//!     Paused --> Running: resume
//!     Running --> ShuttingDown: shutdown (ACPI)
//!     ShuttingDown --> Running: shutdown timed out
//!     Running --> Stopping: stop
//!     Paused --> Stopping: stop
//!     ShuttingDown --> Stopping: stop
//!     Running --> Off: exited
//!     Paused --> Off: exited
//!     ShuttingDown --> Off: exited
//!     Stopping --> Off: exited
//! ```
//!
//! `step` is pure: the daemon feeds it the current state and an [`Operation`] (a user's
//! request or an observation of QEMU), applies the returned state, then performs the
//! returned [`Action`]s.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a VM is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// No QEMU process.
    Off,
    /// QEMU is being started.
    Starting,
    /// The guest runs.
    Running,
    /// The guest's vCPUs are stopped; QEMU lives.
    Paused,
    /// An ACPI power-off was sent; waiting for the guest to power off.
    ShuttingDown,
    /// QEMU was told to quit; waiting for the process to end.
    Stopping,
}

impl VmState {
    /// The state's name as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShuttingDown => "shutting_down",
            Self::Stopping => "stopping",
        }
    }

    /// True while a QEMU process exists (or is being created) for the VM.
    pub fn has_process(self) -> bool {
        !matches!(self, Self::Off)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "off" => Self::Off,
            "starting" => Self::Starting,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "shutting_down" => Self::ShuttingDown,
            "stopping" => Self::Stopping,
            other => return Err(format!("unknown VM state {other:?}")),
        })
    }
}

/// A user's request or an observation of the QEMU process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// User: start the VM.
    Start,
    /// Observed: QEMU started and answers QMP.
    Started,
    /// User: pause the vCPUs.
    Pause,
    /// User: resume the vCPUs.
    Resume,
    /// User: ask the guest to power off (ACPI).
    Shutdown,
    /// Observed: the guest did not power off in time.
    ShutdownTimedOut,
    /// User: power off now.
    Stop,
    /// Observed: the QEMU process is gone.
    Exited,
    /// User: delete the VM.
    Delete,
}

impl Operation {
    fn verb(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Started => "mark started",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Shutdown => "shut down",
            Self::ShutdownTimedOut => "time out the shutdown of",
            Self::Stop => "stop",
            Self::Exited => "mark exited",
            Self::Delete => "delete",
        }
    }
}

/// What the daemon must do after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Spawn the QEMU process.
    SpawnQemu,
    /// QMP `stop`.
    PauseVcpus,
    /// QMP `cont`.
    ResumeVcpus,
    /// QMP `system_powerdown`, then wait for the process to end.
    SendAcpiPowerdown,
    /// QMP `quit` (QEMU closes its images cleanly), SIGKILL if QMP fails.
    QuitQemu,
    /// Forget the process: sockets and pid.
    CleanUpProcess,
    /// Remove the VM's disks, directory and inventory entry.
    RemoveVm,
}

/// An operation the current state does not allow, with what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {verb} a VM that is {state}{hint}")]
pub struct LifecycleError {
    verb: &'static str,
    /// The state the VM was in.
    pub state: VmState,
    hint: &'static str,
}

/// Applies `op` to a VM in `state`: the next state and the actions to perform, or why not.
pub fn step(state: VmState, op: Operation) -> Result<(VmState, Vec<Action>), LifecycleError> {
    use Action::*;
    use Operation as O;
    use VmState as S;
    let next = match (state, op) {
        (S::Off, O::Start) => (S::Starting, vec![SpawnQemu]),
        (S::Starting, O::Started) => (S::Running, vec![]),
        (S::Running, O::Pause) => (S::Paused, vec![PauseVcpus]),
        (S::Paused, O::Resume) => (S::Running, vec![ResumeVcpus]),
        (S::Running, O::Shutdown) => (S::ShuttingDown, vec![SendAcpiPowerdown]),
        (S::ShuttingDown, O::ShutdownTimedOut) => (S::Running, vec![]),
        (S::Running | S::Paused | S::ShuttingDown, O::Stop) => (S::Stopping, vec![QuitQemu]),
        (S::Off, O::Exited) => (S::Off, vec![]),
        (_, O::Exited) => (S::Off, vec![CleanUpProcess]),
        (S::Off, O::Delete) => (S::Off, vec![RemoveVm]),
        (state, op) => {
            let hint = match (state, op) {
                (S::Off, O::Stop | O::Shutdown | O::Pause | O::Resume) => " (it is already off)",
                (S::Paused, O::Shutdown) => "; resume it first, or stop it",
                (S::Running | S::Paused, O::Start) => " (it is already started)",
                (S::Running | S::Paused | S::ShuttingDown, O::Delete) => "; stop it first",
                (S::Starting | S::Stopping | S::ShuttingDown, _) => {
                    "; wait for the current operation to finish"
                }
                _ => "",
            };
            return Err(LifecycleError {
                verb: op.verb(),
                state,
                hint,
            });
        }
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;
    use Operation as O;
    use VmState as S;

    const ALL_STATES: [S; 6] = [
        S::Off,
        S::Starting,
        S::Running,
        S::Paused,
        S::ShuttingDown,
        S::Stopping,
    ];
    const ALL_OPS: [O; 9] = [
        O::Start,
        O::Started,
        O::Pause,
        O::Resume,
        O::Shutdown,
        O::ShutdownTimedOut,
        O::Stop,
        O::Exited,
        O::Delete,
    ];

    #[test]
    fn allowed_transitions() {
        let table: &[(S, O, S, &[Action])] = &[
            (S::Off, O::Start, S::Starting, &[SpawnQemu]),
            (S::Starting, O::Started, S::Running, &[]),
            (S::Starting, O::Exited, S::Off, &[CleanUpProcess]),
            (S::Running, O::Pause, S::Paused, &[PauseVcpus]),
            (S::Paused, O::Resume, S::Running, &[ResumeVcpus]),
            (
                S::Running,
                O::Shutdown,
                S::ShuttingDown,
                &[SendAcpiPowerdown],
            ),
            (S::ShuttingDown, O::ShutdownTimedOut, S::Running, &[]),
            (S::ShuttingDown, O::Exited, S::Off, &[CleanUpProcess]),
            (S::Running, O::Stop, S::Stopping, &[QuitQemu]),
            (S::Paused, O::Stop, S::Stopping, &[QuitQemu]),
            (S::ShuttingDown, O::Stop, S::Stopping, &[QuitQemu]),
            (S::Stopping, O::Exited, S::Off, &[CleanUpProcess]),
            (S::Running, O::Exited, S::Off, &[CleanUpProcess]),
            (S::Off, O::Delete, S::Off, &[RemoveVm]),
        ];
        for (from, op, to, actions) in table {
            let (got, got_actions) = step(*from, *op).unwrap();
            assert_eq!(
                (got, got_actions.as_slice()),
                (*to, *actions),
                "{from} {op:?}"
            );
        }
    }

    #[test]
    fn everything_else_is_refused_with_a_reason() {
        let mut refused = 0;
        for state in ALL_STATES {
            for op in ALL_OPS {
                if let Err(e) = step(state, op) {
                    refused += 1;
                    assert_eq!(e.state, state);
                    assert!(e.to_string().starts_with("cannot "), "{e}");
                }
            }
        }
        // 6 × 9 pairs, 16 allowed (Exited from every state, Off+Exited a no-op).
        assert_eq!(refused, 6 * 9 - 16);
        assert_eq!(
            step(S::Running, O::Delete).unwrap_err().to_string(),
            "cannot delete a VM that is running; stop it first"
        );
        assert_eq!(
            step(S::Paused, O::Shutdown).unwrap_err().to_string(),
            "cannot shut down a VM that is paused; resume it first, or stop it"
        );
    }

    #[test]
    fn every_state_reaches_off() {
        for state in ALL_STATES {
            assert_eq!(step(state, O::Exited).unwrap().0, S::Off);
        }
    }

    #[test]
    fn state_names_round_trip() {
        for state in ALL_STATES {
            assert_eq!(state.as_str().parse::<S>().unwrap(), state);
        }
    }
}
