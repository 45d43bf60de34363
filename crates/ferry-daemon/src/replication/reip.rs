//! Re-IP at failover, Hyper-V's "Failover TCP/IP": the guest gets the replica site's
//! address, gateway and DNS per NIC, written through qemu-guest-agent as a
//! systemd-networkd `.network` file matched by the NIC's MAC, then systemd-networkd is
//! restarted. A failed-over VM takes a while to boot, so this runs in the background once
//! the VM has started and reports its outcome as an event (`failover_ip_applied` or
//! `failover_ip_failed`, saying plainly when the guest has no agent).

use std::sync::Arc;
use std::time::Duration;

use ferry_domain::spec::FailoverIp;
use ferry_qemu::agent::GuestAgent;
use tracing::info;

use super::Shared;

/// Each agent call's bound.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The restart of the guest's network stack.
const RESTART_TIMEOUT: Duration = Duration::from_secs(90);

/// The `.network` file for one NIC. Its name sorts before the distribution's own files
/// (`20-wired.network` and the like) so it is the one systemd-networkd picks for the NIC.
pub fn network_file(ip: &FailoverIp) -> (String, String) {
    let name = format!(
        "/etc/systemd/network/05-ferry-failover-{}.network",
        ip.mac.replace(':', "")
    );
    let mut text = format!(
        "# Written by Ferry at failover (ferry vm set --failover-ip); replaces DHCP on this NIC.\n[Match]\nMACAddress={}\n\n[Network]\nAddress={}\n",
        ip.mac.to_ascii_lowercase(),
        ip.address
    );
    if let Some(gw) = &ip.gateway {
        text.push_str(&format!("Gateway={gw}\n"));
    }
    for dns in &ip.dns {
        text.push_str(&format!("DNS={dns}\n"));
    }
    (name, text)
}

/// The store key marking a failed-over VM, not started by its failover, whose failover IP
/// is applied at its next start.
pub fn pending_key(vm_id: i64) -> String {
    format!("failover_ip_pending:{vm_id}")
}

/// The settings of `ips` (a spec's failover or test failover IPs) for the NICs `spec` has
/// (a failover may leave one out).
pub fn present(spec: &ferry_domain::VmSpec, ips: &[FailoverIp]) -> Vec<FailoverIp> {
    ips.iter()
        .filter(|ip| spec.nics.iter().any(|n| n.mac == ip.mac))
        .cloned()
        .collect()
}

/// After `ferry vm start`: a failed-over VM whose failover IP is pending gets it now.
pub fn on_start(shared: &Arc<Shared>, name: &str) {
    let Ok(vm) = ferry_domain::VmName::new(name) else {
        return;
    };
    let Ok(row) = shared.store.get_vm(&vm) else {
        return;
    };
    let key = pending_key(row.id);
    if shared.store.setting(&key).ok().flatten().is_some() {
        let _ = shared.store.delete_setting(&key);
        spawn_apply(
            shared,
            row.id,
            present(&row.spec, &row.spec.failover_ip),
            "failover",
        );
    }
}

/// Applies `ips` to the running VM `vm` (by id) in the background; `what` is `failover` or
/// `test failover`, for the event.
pub fn spawn_apply(shared: &Arc<Shared>, vm_id: i64, ips: Vec<FailoverIp>, what: &'static str) {
    if ips.is_empty() {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let (kind, message) = match apply(&shared, vm_id, &ips).await {
            Ok(done) => (
                "failover_ip_applied",
                format!("{what} IP applied in the guest: {done}"),
            ),
            Err(e) => ("failover_ip_failed", format!("{what} IP not applied: {e}")),
        };
        info!(vm_id, "{message}");
        shared.events.emit_id(vm_id, kind, &message);
    });
}

async fn apply(shared: &Shared, vm_id: i64, ips: &[FailoverIp]) -> Result<String, String> {
    let socket = shared.vms.agent_socket(vm_id);
    let wait = shared.cfg.failover_ip_wait;
    let deadline = tokio::time::Instant::now() + wait;
    // The channel exists from QEMU's start; the agent answers once the guest has booted.
    let mut agent = loop {
        match GuestAgent::connect(&socket, CALL_TIMEOUT).await {
            Ok(a) => break a,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "the guest has no agent: none answered within {} s of the start ({e}); set the addresses by hand",
                    wait.as_secs()
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(3)).await,
        }
    };
    let err = |e: ferry_qemu::agent::AgentError| format!("the guest agent failed: {e}");
    let networkd = agent
        .exec(
            "/bin/sh",
            &["-c".into(), "systemctl is-enabled systemd-networkd".into()],
            CALL_TIMEOUT,
        )
        .await
        .map_err(err)?;
    if networkd.exit_code != 0 {
        return Err(format!(
            "the guest does not use systemd-networkd ({}), the network stack Ferry configures; set the addresses by hand",
            networkd.stdout.trim()
        ));
    }
    let mut done = Vec::new();
    for ip in ips {
        let (path, text) = network_file(ip);
        agent
            .write_file(&path, text.as_bytes(), CALL_TIMEOUT)
            .await
            .map_err(err)?;
        done.push(format!("{} on NIC {}", ip.address, ip.mac));
    }
    // Without systemd-resolved, networkd's DNS= reaches no resolver: resolv.conf then.
    let dns: Vec<&String> = ips.iter().flat_map(|i| &i.dns).collect();
    let mut script = String::new();
    if !dns.is_empty() {
        script.push_str(
            "if ! systemctl -q is-active systemd-resolved; then printf 'nameserver %s\\n'",
        );
        for d in &dns {
            script.push_str(&format!(" '{d}'"));
        }
        script.push_str(" > /etc/resolv.conf; fi; ");
    }
    script.push_str("systemctl restart systemd-networkd");
    let out = agent
        .exec("/bin/sh", &["-c".into(), script], RESTART_TIMEOUT)
        .await
        .map_err(err)?;
    if out.exit_code != 0 {
        return Err(format!(
            "restarting systemd-networkd in the guest failed (exit {}): {}",
            out.exit_code,
            out.stderr.trim()
        ));
    }
    Ok(done.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_file_matches_the_mac() {
        let ip = FailoverIp::parse(
            "52:54:00:AB:cd:01",
            "10.9.0.5/24,gw=10.9.0.1,dns=10.9.0.2;1.1.1.1",
        )
        .unwrap();
        let (path, text) = network_file(&ip);
        assert_eq!(
            path,
            "/etc/systemd/network/05-ferry-failover-525400ABcd01.network"
        );
        assert!(text.contains("MACAddress=52:54:00:ab:cd:01\n"), "{text}");
        assert!(
            text.contains("Address=10.9.0.5/24\nGateway=10.9.0.1\nDNS=10.9.0.2\nDNS=1.1.1.1\n"),
            "{text}"
        );
    }
}
