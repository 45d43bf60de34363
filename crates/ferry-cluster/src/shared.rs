//! The shared directory: the cluster's configuration, each node's record, and the VM
//! inventory. Every node mounts it at the same path (NFS, CephFS, GFS2/OCFS2 on a SAN; in
//! tests one host directory). Layout:
//!
//! ```text
//! SHARED/cluster/cluster.json      the configuration (name, nodes, fence devices, token)
//! SHARED/cluster/authkey           Corosync's key (0600)
//! SHARED/cluster/token             the nodes' token for node-to-node calls (0600)
//! SHARED/cluster/nodes/NAME.json   a node's ferryd: its API address and certificate
//! SHARED/vms/NAME/                 a VM's disks (ferryd's vm_storage is SHARED/vms)
//! SHARED/vms/NAME/cluster-vm.json  the VM's spec and whether it is highly available
//! SHARED/vms/NAME/owner            the node running it (written by that node)
//! ```

use std::path::{Path, PathBuf};

use ferry_api_types::cluster::{FenceDeviceSpec, NodeSpec};
use serde::{Deserialize, Serialize};

use crate::{check_word, ClusterError};

/// Corosync's token timeout when the request gives none: a dead node is noticed in about
/// a second (Corosync's default of 3000 doubles failover time).
pub const DEFAULT_TOKEN_MS: u32 = 1000;

/// The cluster's configuration, as `cluster.json` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's name.
    pub name: String,
    /// Every node.
    pub nodes: Vec<NodeSpec>,
    /// Fence devices.
    pub fence: Vec<FenceDeviceSpec>,
    /// Corosync's token timeout (ms).
    pub token_ms: u32,
}

impl ClusterConfig {
    /// Checks names, addresses and fencing; a cluster with shared storage must fence.
    pub fn validate(&self) -> Result<(), ClusterError> {
        check_word("cluster name", &self.name)?;
        if self.nodes.len() < 2 {
            return Err(ClusterError::Invalid(
                "a cluster needs at least 2 nodes (3 keep quorum when one dies); give --node NAME=ADDRESS for each".into(),
            ));
        }
        if self.nodes.len() > 16 {
            return Err(ClusterError::Invalid("at most 16 nodes".into()));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            check_word("node name", &n.name)?;
            n.address.parse::<std::net::IpAddr>().map_err(|_| {
                ClusterError::Invalid(format!(
                    "node {}'s address {:?} is not an IP address",
                    n.name, n.address
                ))
            })?;
            if self.nodes[..i]
                .iter()
                .any(|m| m.name == n.name || m.address == n.address)
            {
                return Err(ClusterError::Invalid(format!(
                    "node {} ({}) is given twice",
                    n.name, n.address
                )));
            }
        }
        if self.fence.is_empty() {
            return Err(ClusterError::Invalid(
                "a cluster on shared storage needs fencing: give --fence AGENT[:NODE] [key=value ...] (fence_ipmilan, fence_redfish, fence_sbd, ...; see docs/CLUSTER.md)".into(),
            ));
        }
        for f in &self.fence {
            check_word("fence agent", &f.agent)?;
            if !f.agent.starts_with("fence_") {
                return Err(ClusterError::Invalid(format!(
                    "fence agent {:?} is not a fence agent (their names start with fence_)",
                    f.agent
                )));
            }
            if let Some(node) = &f.node {
                if self.node(node).is_none() {
                    return Err(ClusterError::Invalid(format!(
                        "fence device {} names node {node:?}, which is not in the cluster",
                        f.agent
                    )));
                }
            }
            for (k, v) in &f.options {
                check_word("fence option", k)?;
                if v.contains(['\n', '\0']) {
                    return Err(ClusterError::Invalid(format!(
                        "fence option {k} has a line break"
                    )));
                }
            }
        }
        for n in &self.nodes {
            let fenced = self
                .fence
                .iter()
                .any(|f| f.node.is_none() || f.node.as_deref() == Some(&n.name));
            if !fenced {
                return Err(ClusterError::Invalid(format!(
                    "no fence device fences node {}; add one for it",
                    n.name
                )));
            }
        }
        if !(200..=60_000).contains(&self.token_ms) {
            return Err(ClusterError::Invalid(format!(
                "token timeout {} ms is outside 200..60000",
                self.token_ms
            )));
        }
        Ok(())
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// The Replica Broker: a ferryd of its own, run by Pacemaker on one node at a time with a
/// floating address, its data on the shared directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerConfig {
    /// Its name.
    pub name: String,
    /// Its floating address.
    pub address: String,
    /// The address's prefix length.
    pub prefix_len: u8,
    /// Its TLS API port.
    pub api_port: u16,
}

/// A node's ferryd as the other nodes reach it (for live migration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's name.
    pub name: String,
    /// Its TLS API (`IP:PORT`).
    pub api: String,
    /// Its certificate's SHA-256 fingerprint.
    pub fingerprint: String,
}

/// A VM of the cluster's inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmEntry {
    /// ferryd's spec of the VM (JSON), so that any node can run it.
    pub spec: serde_json::Value,
    /// Highly available: a Pacemaker resource.
    pub ha: bool,
}

/// The shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    root: PathBuf,
}

impl SharedDir {
    /// The shared directory at `root`, which must exist and be absolute.
    pub fn open(root: &Path) -> Result<Self, ClusterError> {
        if !root.is_absolute() {
            return Err(ClusterError::Invalid(format!(
                "the shared directory {} must be an absolute path (the same on every node)",
                root.display()
            )));
        }
        if !root.is_dir() {
            return Err(ClusterError::Missing(format!(
                "the shared directory {} does not exist; mount the cluster's shared storage there on every node",
                root.display()
            )));
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// Its path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where VMs' directories are: every node's ferryd has it as `vm_storage`.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    fn cluster_dir(&self) -> PathBuf {
        self.root.join("cluster")
    }

    /// `cluster.json`.
    pub fn config_path(&self) -> PathBuf {
        self.cluster_dir().join("cluster.json")
    }

    /// Corosync's key.
    pub fn authkey_path(&self) -> PathBuf {
        self.cluster_dir().join("authkey")
    }

    /// Whether a cluster was created here.
    pub fn has_cluster(&self) -> bool {
        self.config_path().exists()
    }

    /// Writes a new cluster's configuration, its Corosync key and its node token; refuses
    /// when a cluster is there already.
    pub fn create(&self, cfg: &ClusterConfig) -> Result<(), ClusterError> {
        cfg.validate()?;
        if self.has_cluster() {
            return Err(ClusterError::Invalid(format!(
                "{} already holds a cluster; join it with `ferry cluster join --shared {}`",
                self.root.display(),
                self.root.display()
            )));
        }
        let dir = self.cluster_dir();
        std::fs::create_dir_all(dir.join("nodes"))
            .map_err(|e| ClusterError::io("create", &dir, e))?;
        std::fs::create_dir_all(self.vms_dir())
            .map_err(|e| ClusterError::io("create", &self.vms_dir(), e))?;
        // Corosync's key is 256 random bytes (what corosync-keygen writes).
        write_secret(&self.authkey_path(), &random_bytes(256)?)?;
        let token = hex(&random_bytes(32)?);
        write_secret(&dir.join("token"), token.as_bytes())?;
        // It holds the fence devices' passwords.
        let json = serde_json::to_vec_pretty(cfg).expect("serializable");
        write_atomic_mode(&self.config_path(), &json, 0o600)
    }

    /// The configuration.
    pub fn config(&self) -> Result<ClusterConfig, ClusterError> {
        let path = self.config_path();
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ClusterError::Missing(format!(
                    "{} holds no cluster; create one with `ferry cluster create`",
                    self.root.display()
                ))
            } else {
                ClusterError::io("read", &path, e)
            }
        })?;
        let cfg: ClusterConfig = serde_json::from_slice(&bytes)
            .map_err(|e| ClusterError::Invalid(format!("{} is damaged: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Replaces the configuration (a node left).
    pub fn set_config(&self, cfg: &ClusterConfig) -> Result<(), ClusterError> {
        write_atomic_mode(
            &self.config_path(),
            &serde_json::to_vec_pretty(cfg).expect("serializable"),
            0o600,
        )
    }

    /// The nodes' shared token.
    pub fn token(&self) -> Result<String, ClusterError> {
        let path = self.cluster_dir().join("token");
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| ClusterError::io("read", &path, e))
    }

    /// Records how the other nodes reach this node's ferryd.
    pub fn set_node_record(&self, rec: &NodeRecord) -> Result<(), ClusterError> {
        check_word("node name", &rec.name)?;
        let path = self
            .cluster_dir()
            .join("nodes")
            .join(format!("{}.json", rec.name));
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(rec).expect("serializable"),
        )
    }

    /// How to reach node `name`'s ferryd.
    pub fn node_record(&self, name: &str) -> Result<NodeRecord, ClusterError> {
        check_word("node name", name)?;
        let path = self
            .cluster_dir()
            .join("nodes")
            .join(format!("{name}.json"));
        let bytes = std::fs::read(&path).map_err(|_| {
            ClusterError::Missing(format!(
                "node {name} has not joined the cluster yet (no {})",
                path.display()
            ))
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClusterError::Invalid(format!("{} is damaged: {e}", path.display())))
    }

    fn vm_entry_path(&self, vm: &str) -> PathBuf {
        self.vms_dir().join(vm).join("cluster-vm.json")
    }

    /// A VM's inventory entry, if the VM is in the inventory.
    pub fn vm(&self, vm: &str) -> Result<Option<VmEntry>, ClusterError> {
        let path = self.vm_entry_path(vm);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ClusterError::Invalid(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClusterError::io("read", &path, e)),
        }
    }

    /// Writes a VM's inventory entry (its directory must exist).
    pub fn set_vm(&self, vm: &str, entry: &VmEntry) -> Result<(), ClusterError> {
        write_atomic(
            &self.vm_entry_path(vm),
            &serde_json::to_vec_pretty(entry).expect("serializable"),
        )
    }

    /// Every VM of the inventory, by name.
    pub fn vms(&self) -> Result<Vec<(String, VmEntry)>, ClusterError> {
        let dir = self.vms_dir();
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(ClusterError::io("list", &dir, e)),
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(entry) = self.vm(&name)? {
                out.push((name, entry));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Records which node runs the VM (`None`: none). The last node that ran it is kept
    /// apart (`last-owner`): it replicates the VM while it is off.
    pub fn set_owner(&self, vm: &str, node: Option<&str>) -> Result<(), ClusterError> {
        let path = self.vms_dir().join(vm).join("owner");
        match node {
            Some(n) => {
                write_atomic(&self.vms_dir().join(vm).join("last-owner"), n.as_bytes())?;
                write_atomic(&path, n.as_bytes())
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ClusterError::io("remove", &path, e)),
            },
        }
    }

    /// The node that ran the VM last (running it or not).
    pub fn last_owner(&self, vm: &str) -> Option<String> {
        std::fs::read_to_string(self.vms_dir().join(vm).join("last-owner"))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    /// The Replica Broker's directory: its ferryd's config, data (store, certificate,
    /// token) and VMs.
    pub fn broker_dir(&self) -> PathBuf {
        self.root.join("broker")
    }

    /// The Broker's configuration, if it was set up.
    pub fn broker(&self) -> Result<Option<BrokerConfig>, ClusterError> {
        let path = self.broker_dir().join("broker.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ClusterError::Invalid(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClusterError::io("read", &path, e)),
        }
    }

    /// Writes (or with `None` removes) the Broker's configuration.
    pub fn set_broker(&self, cfg: Option<&BrokerConfig>) -> Result<(), ClusterError> {
        let path = self.broker_dir().join("broker.json");
        match cfg {
            Some(c) => {
                std::fs::create_dir_all(self.broker_dir())
                    .map_err(|e| ClusterError::io("create", &self.broker_dir(), e))?;
                write_atomic(&path, &serde_json::to_vec_pretty(c).expect("serializable"))
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ClusterError::io("remove", &path, e)),
            },
        }
    }

    /// The live-migration CA and the nodes' migration certificate (QEMU's TLS needs a CA).
    pub fn migration_dir(&self) -> PathBuf {
        self.cluster_dir().join("migration")
    }

    /// The cluster's own certificate and key (one primary identity for every node).
    pub fn identity_dir(&self) -> PathBuf {
        self.cluster_dir().join("identity")
    }

    /// The node that last said it runs the VM.
    pub fn owner(&self, vm: &str) -> Option<String> {
        std::fs::read_to_string(self.vms_dir().join(vm).join("owner"))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }
}

/// Writes through a temporary file and a rename, so a reader on another node never sees
/// half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    write_atomic_mode(path, bytes, 0o644)
}

/// [`write_atomic`] with the file's permissions set when it is created (secrets: 0600).
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ClusterError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Unique across the nodes writing the shared directory (their pids may be equal).
    let suffix: String = random_bytes(6)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tmp = path.with_extension(format!("tmp.{suffix}"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| ClusterError::io("write", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| ClusterError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ClusterError::io("write", path, e))
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ClusterError::io("create", path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| ClusterError::io("write", path, e))
}

pub(crate) fn random_bytes(n: usize) -> Result<Vec<u8>, ClusterError> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| ClusterError::io("read", Path::new("/dev/urandom"), e))?;
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClusterConfig {
        ClusterConfig {
            name: "c1".into(),
            nodes: vec![
                NodeSpec {
                    name: "node1".into(),
                    address: "10.0.0.1".into(),
                },
                NodeSpec {
                    name: "node2".into(),
                    address: "10.0.0.2".into(),
                },
            ],
            fence: vec![FenceDeviceSpec {
                agent: "fence_sbd".into(),
                node: None,
                options: Default::default(),
            }],
            token_ms: DEFAULT_TOKEN_MS,
        }
    }

    #[test]
    fn configurations_without_fencing_or_with_bad_nodes_are_refused() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.fence.clear();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("needs fencing"));
        let mut c = cfg();
        c.nodes[1].address = "10.0.0.1".into();
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        let mut c = cfg();
        c.nodes[1].address = "not-an-ip".into();
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.fence[0].node = Some("node1".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("fences node node2"));
        let mut c = cfg();
        c.fence[0].agent = "rm".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_cluster_is_created_once_and_its_inventory_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SharedDir::open(dir.path()).unwrap();
        shared.create(&cfg()).unwrap();
        assert!(shared.create(&cfg()).is_err());
        assert_eq!(shared.config().unwrap(), cfg());
        assert_eq!(shared.token().unwrap().len(), 64);
        std::fs::create_dir_all(shared.vms_dir().join("web")).unwrap();
        let entry = VmEntry {
            spec: serde_json::json!({"name": "web"}),
            ha: true,
        };
        shared.set_vm("web", &entry).unwrap();
        assert_eq!(shared.vms().unwrap(), vec![("web".to_owned(), entry)]);
        shared.set_owner("web", Some("node2")).unwrap();
        assert_eq!(shared.owner("web").as_deref(), Some("node2"));
        shared.set_owner("web", None).unwrap();
        assert_eq!(shared.owner("web"), None);
        assert!(SharedDir::open(Path::new("relative")).is_err());
    }
}
