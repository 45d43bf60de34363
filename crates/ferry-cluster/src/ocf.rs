//! Ferry's OCF resource agent, `ocf:ferry:vm`: what Pacemaker runs to start, stop, monitor
//! and live-migrate a highly available VM on a node. The agent itself is `ferry ocf-agent
//! ACTION` (a small script in the OCF directory execs it); each action asks the node's own
//! ferryd, which runs the VM as any other.

use std::path::{Path, PathBuf};

use crate::shared::write_atomic;
use crate::ClusterError;

/// Where OCF agents live; Ferry's is `ferry/vm` below it.
pub const OCF_ROOT: &str = "/usr/lib/ocf/resource.d";

/// OCF exit codes.
pub mod rc {
    /// Done / running.
    pub const SUCCESS: i32 = 0;
    /// Failed.
    pub const ERR_GENERIC: i32 = 1;
    /// Wrong arguments.
    pub const ERR_ARGS: i32 = 2;
    /// Unknown action.
    pub const ERR_UNIMPLEMENTED: i32 = 3;
    /// Something is not installed on this node.
    pub const ERR_INSTALLED: i32 = 5;
    /// The resource's configuration is wrong.
    pub const ERR_CONFIGURED: i32 = 6;
    /// Cleanly not running.
    pub const NOT_RUNNING: i32 = 7;
}

/// The agent's meta-data (OCF 1.1).
pub const META_DATA: &str = r#"<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="vm" version="1.0">
  <version>1.1</version>
  <longdesc lang="en">A Ferry VM on the cluster's shared storage, run by the node's ferryd. Start adopts the VM from the cluster's inventory and boots it; stop shuts the guest down (powering it off after shutdown_timeout); migrate_to live-migrates it to the target node's ferryd over the cluster network.</longdesc>
  <shortdesc lang="en">Ferry virtual machine</shortdesc>
  <parameters>
    <parameter name="vm" unique="1" required="1">
      <longdesc lang="en">The VM's name in the cluster's inventory.</longdesc>
      <shortdesc lang="en">VM name</shortdesc>
      <content type="string"/>
    </parameter>
    <parameter name="socket" unique="0" required="0">
      <longdesc lang="en">ferryd's admin socket on each node.</longdesc>
      <shortdesc lang="en">ferryd socket</shortdesc>
      <content type="string" default="/run/ferry/ferryd.sock"/>
    </parameter>
    <parameter name="shutdown_timeout" unique="0" required="0">
      <longdesc lang="en">Seconds the guest has to shut down (ACPI) before it is powered off.</longdesc>
      <shortdesc lang="en">Shutdown timeout</shortdesc>
      <content type="integer" default="60"/>
    </parameter>
  </parameters>
  <actions>
    <action name="start" timeout="120s"/>
    <action name="stop" timeout="120s"/>
    <action name="monitor" timeout="30s" interval="5s" depth="0"/>
    <action name="migrate_to" timeout="600s"/>
    <action name="migrate_from" timeout="120s"/>
    <action name="meta-data" timeout="5s"/>
    <action name="validate-all" timeout="5s"/>
  </actions>
</resource-agent>
"#;

/// The meta-data of `ocf:ferry:broker`, the Replica Broker's ferryd.
pub const BROKER_META_DATA: &str = r#"<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="broker" version="1.0">
  <version>1.1</version>
  <longdesc lang="en">The Replica Broker of a Ferry cluster: a ferryd of its own (its store, certificate and replica storage on the shared directory) serving replication at the Broker's floating address. Grouped after the address (ocf:heartbeat:IPaddr2).</longdesc>
  <shortdesc lang="en">Ferry Replica Broker</shortdesc>
  <parameters>
    <parameter name="config" unique="1" required="1">
      <longdesc lang="en">The Broker ferryd's configuration file on the shared directory.</longdesc>
      <shortdesc lang="en">ferryd config</shortdesc>
      <content type="string"/>
    </parameter>
    <parameter name="ferryd" unique="0" required="0">
      <longdesc lang="en">The ferryd program.</longdesc>
      <shortdesc lang="en">ferryd</shortdesc>
      <content type="string" default="/usr/sbin/ferryd"/>
    </parameter>
  </parameters>
  <actions>
    <action name="start" timeout="90s"/>
    <action name="stop" timeout="60s"/>
    <action name="monitor" timeout="20s" interval="5s" depth="0"/>
    <action name="meta-data" timeout="5s"/>
    <action name="validate-all" timeout="5s"/>
  </actions>
</resource-agent>
"#;

/// An agent script: it execs `ferry ocf-agent [KIND]` with Pacemaker's arguments.
pub fn agent_script(ferry_cli: &Path, kind: &str) -> String {
    let arg = if kind == "vm" {
        String::new()
    } else {
        format!(" {kind}")
    };
    format!(
        "#!/bin/sh\n# ocf:ferry:{kind} - Ferry's OCF resource agent (installed by ferryd: ferry cluster create/join).\n# The logic is in `ferry ocf-agent`.\nexec '{}' ocf-agent{arg} \"$@\"\n",
        ferry_cli.display()
    )
}

/// The VM agent's path.
pub fn agent_path() -> PathBuf {
    Path::new(OCF_ROOT).join("ferry").join("vm")
}

/// Installs (or refreshes) the agents (`vm`, `broker`) so that they run `ferry_cli`.
pub fn install_agent(ferry_cli: &Path) -> Result<(), ClusterError> {
    use std::os::unix::fs::PermissionsExt;
    if !ferry_cli.is_file() {
        return Err(ClusterError::Missing(format!(
            "the ferry CLI is not at {}, where the cluster's resource agent runs it; install ferry beside ferryd",
            ferry_cli.display()
        )));
    }
    let dir = Path::new(OCF_ROOT).join("ferry");
    std::fs::create_dir_all(&dir).map_err(|e| ClusterError::io("create", &dir, e))?;
    for kind in ["vm", "broker"] {
        let path = dir.join(kind);
        write_atomic(&path, agent_script(ferry_cli, kind).as_bytes())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| ClusterError::io("chmod", &path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_data_is_xml_with_every_action() {
        let opts = roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        };
        let doc = roxmltree::Document::parse_with_options(META_DATA, opts).unwrap();
        let actions: Vec<_> = doc
            .descendants()
            .filter(|n| n.tag_name().name() == "action")
            .filter_map(|n| n.attribute("name"))
            .collect();
        for a in [
            "start",
            "stop",
            "monitor",
            "migrate_to",
            "migrate_from",
            "meta-data",
            "validate-all",
        ] {
            assert!(actions.contains(&a), "{a}");
        }
        assert!(agent_script(Path::new("/usr/bin/ferry"), "vm")
            .contains("exec '/usr/bin/ferry' ocf-agent \"$@\""));
        assert!(agent_script(Path::new("/usr/bin/ferry"), "broker")
            .contains("exec '/usr/bin/ferry' ocf-agent broker \"$@\""));
        roxmltree::Document::parse_with_options(BROKER_META_DATA, opts).unwrap();
    }
}
