//! Application-consistent points: when one is due, the guest's filesystems are frozen
//! through its agent around the transaction that takes the point. A guest without an
//! agent, or one that fails, gets a crash-consistent point (and an event saying why).

use std::time::Duration;

use ferry_qemu::agent::GuestAgent;
use ferry_store::{ReplicationRow, VmRow};
use tracing::info;

use crate::replication::{now_unix, Shared};

/// How long the guest agent may take to answer a sync or a thaw.
pub(super) const AGENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long it may take to freeze the guest's filesystems.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this cycle should try an application-consistent point (and marks the attempt,
/// so a guest without an agent costs the wait once per period, not every cycle).
pub(super) fn due_app_consistent(shared: &Shared, rel: &ReplicationRow) -> bool {
    let Some(every) = rel.settings.app_consistent_every else {
        return false;
    };
    let now = now_unix();
    let mut tried = shared.app_consistent_tried.lock().expect("tried");
    let last = tried.get(&rel.vm_id).copied().unwrap_or(0);
    if now - last < every as i64 {
        return false;
    }
    tried.insert(rel.vm_id, now);
    true
}

/// Freezes the guest's filesystems through its agent; `None` (crash-consistent point,
/// reason logged and recorded as an event) when there is no agent or it fails.
pub(crate) async fn freeze_guest(shared: &Shared, vm: &VmRow) -> Option<GuestAgent> {
    let socket = shared.vms.agent_socket(vm.id);
    let mut agent = match GuestAgent::connect(&socket, AGENT_TIMEOUT).await {
        Ok(a) => a,
        Err(e) => {
            shared.events.emit_id(
                vm.id,
                "app_consistent_skipped",
                &format!("crash-consistent point instead of application-consistent: {e}"),
            );
            return None;
        }
    };
    match agent.freeze(FREEZE_TIMEOUT).await {
        Ok(n) => {
            info!(vm = %vm.spec.name, filesystems = n, "guest filesystems frozen");
            Some(agent)
        }
        Err(e) => {
            // A freeze that timed out may still happen: thaw to be sure.
            let _ = agent.thaw(AGENT_TIMEOUT).await;
            shared.events.emit_id(
                vm.id,
                "app_consistent_skipped",
                &format!("crash-consistent point instead of application-consistent: {e}"),
            );
            None
        }
    }
}
