//! Ferry's failover clusters, built on the Linux HA stack rather than a membership protocol
//! of its own: Corosync decides who is a member and who has quorum, Pacemaker decides where
//! each highly available VM runs and fences a node before its VMs start elsewhere, and each
//! node's ferryd runs the VMs Pacemaker places on it (through the OCF agent in [`ocf`]).
//!
//! This crate holds what Ferry knows about that stack, and nothing of ferryd's own state:
//! - [`shared`]: the cluster's configuration and the VM inventory on the shared directory
//!   every node mounts at the same path;
//! - [`corosync`]: `corosync.conf`, the authkey, and starting and stopping the stack;
//! - [`pacemaker`]: the CIB's resources and properties and `crm_mon`'s view, through
//!   Pacemaker's own command-line tools (Pacemaker has no network API);
//! - [`ocf`]: the resource agent Pacemaker calls for each HA VM.
//!
//! Every call is synchronous (it runs a short program): callers in async code use
//! `spawn_blocking`.

pub mod corosync;
pub mod ocf;
pub mod pacemaker;
pub mod shared;

/// Why a cluster operation failed: one line for the user, saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The request or configuration is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Something the cluster needs is not installed or not set up.
    #[error("{0}")]
    Missing(String),
    /// A cluster tool failed.
    #[error("{0}")]
    Tool(String),
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
}

impl ClusterError {
    pub(crate) fn io(what: &str, path: &std::path::Path, e: std::io::Error) -> Self {
        ClusterError::Io(format!("cannot {what} {}: {e}", path.display()))
    }
}

/// Pacemaker's id of a VM's resource: `vm-NAME`. Names with spaces are refused: XML ids
/// cannot hold them, and replacing them could make two VMs one resource.
pub fn resource_id(vm: &str) -> Result<String, ClusterError> {
    if vm.contains(' ') {
        return Err(ClusterError::Invalid(format!(
            "VM {vm:?} has a space in its name, which a cluster resource id cannot hold; rename it (ferry vm set) first"
        )));
    }
    Ok(format!("vm-{vm}"))
}

/// The VM a resource id names, if it is one of Ferry's.
pub fn vm_of_resource(id: &str) -> Option<&str> {
    id.strip_prefix("vm-")
}

/// Escapes text for an XML attribute value.
pub(crate) fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Checks a name that appears in Ferry's and Corosync's configuration files.
pub fn check_name(s: &str) -> Result<(), ClusterError> {
    check_word("name", s)
}

/// A name or option key: what may appear in ids and config files unquoted.
pub(crate) fn check_word(what: &str, s: &str) -> Result<(), ClusterError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Invalid(format!(
            "{what} {s:?} must start with a letter and hold only letters, digits, '-', '_' and '.' (at most 63)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_round_trip_and_refuse_spaces() {
        assert_eq!(resource_id("web1").unwrap(), "vm-web1");
        assert_eq!(vm_of_resource("vm-web1"), Some("web1"));
        assert_eq!(vm_of_resource("fence-1"), None);
        assert!(resource_id("my vm").is_err());
    }

    #[test]
    fn words_are_checked() {
        assert!(check_word("node", "node1").is_ok());
        assert!(check_word("node", "1node").is_err());
        assert!(check_word("node", "no de").is_err());
        assert!(check_word("node", "").is_err());
    }
}
