//! The failover-cluster part of the API: a cluster of Ferry hosts on Pacemaker/Corosync with
//! shared VM storage, highly available VMs and live migration.
//!
//! | method | path | body → reply |
//! |---|---|---|
//! | GET | `/v1/cluster` | → [`ClusterStatus`] |
//! | POST | `/v1/cluster` | [`ClusterCreateRequest`] → [`ClusterStatus`] |
//! | POST | `/v1/cluster/join` | [`ClusterJoinRequest`] → [`ClusterStatus`] |
//! | POST | `/v1/cluster/leave` | → [`ClusterReply`] |
//! | POST | `/v1/vms/{name}/ha` | [`HaRequest`] → [`ClusterReply`] |
//! | POST | `/v1/vms/{name}/migrate` | [`MigrateRequest`] → [`MigrateReply`] |
//! | POST | `/v1/cluster/agent` | [`AgentRequest`] → [`AgentReply`] (the OCF agent's calls) |
//! | POST | `/v1/cluster/incoming` | [`IncomingRequest`] → [`IncomingReply`] (node to node) |
//! | GET | `/v1/cluster/broker` | → [`BrokerStatus`] |
//! | POST | `/v1/cluster/broker` | [`BrokerSetRequest`] → [`BrokerStatus`] |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A fence device: a fence agent (`fence_ipmilan`, `fence_sbd`, …) and its options. A
/// device without `node` fences every node (one shared device, e.g. SBD); with `node` it
/// fences only that node (one BMC per node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceDeviceSpec {
    /// The agent's program name in /usr/sbin, e.g. `fence_ipmilan`.
    pub agent: String,
    /// The node it fences; none: all nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The agent's options (`ip`, `username`, `password`, …).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// One node of a cluster as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// The node's name: its ferryd's name (and Pacemaker's node name).
    pub name: String,
    /// Its address on the cluster network (Corosync's ring 0 and live migration).
    pub address: String,
}

/// `POST /v1/cluster`: makes this host the first node of a new cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterCreateRequest {
    /// The cluster's name.
    pub name: String,
    /// The shared directory every node mounts at the same path.
    pub shared_dir: String,
    /// Every node, this host included.
    pub nodes: Vec<NodeSpec>,
    /// Fence devices; at least one (a cluster with shared storage must fence).
    pub fence: Vec<FenceDeviceSpec>,
    /// Corosync's token timeout in ms (how fast a dead node is noticed); default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ms: Option<u32>,
}

/// `POST /v1/cluster/join`: this host joins the cluster whose configuration is in the
/// shared directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterJoinRequest {
    /// The shared directory.
    pub shared_dir: String,
}

/// A node as the cluster sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNodeStatus {
    /// Its name.
    pub name: String,
    /// Its cluster address.
    pub address: String,
    /// A member of the cluster now.
    pub online: bool,
    /// In standby (runs no VM).
    pub standby: bool,
    /// Lost and not yet fenced.
    pub unclean: bool,
    /// The designated controller.
    pub dc: bool,
}

/// A VM of the cluster's inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterVmStatus {
    /// The VM's name.
    pub name: String,
    /// Highly available (a Pacemaker resource).
    pub ha: bool,
    /// The node it runs on, if any.
    pub node: Option<String>,
    /// `started`, `stopped`, `migrating`, `failed` or `unplaced` (HA but no node can run it).
    pub state: String,
}

/// One fencing action of the cluster's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceEvent {
    /// The node fenced.
    pub target: String,
    /// `reboot` or `off`.
    pub action: String,
    /// `success` or `failed`.
    pub status: String,
    /// The node that did it.
    pub delegate: Option<String>,
    /// When it completed (`YYYY-MM-DD HH:MM:SSZ`).
    pub completed: Option<String>,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub name: String,
    /// The shared directory.
    pub shared_dir: String,
    /// The node answering.
    pub this_node: String,
    /// Quorate as this node sees it.
    pub quorate: bool,
    /// The designated controller.
    pub dc: Option<String>,
    /// Every configured node.
    pub nodes: Vec<ClusterNodeStatus>,
    /// The cluster's VMs.
    pub vms: Vec<ClusterVmStatus>,
    /// Fencing history, oldest first.
    pub fencing: Vec<FenceEvent>,
    /// The certificate fingerprint the cluster's VMs replicate with (one primary identity
    /// for every node): replica servers authorize `--allow NAME=FINGERPRINT` with the
    /// cluster's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_fingerprint: Option<String>,
    /// The Replica Broker, if the cluster has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerStatus>,
    /// Set when the cluster stack does not answer on this node (then only the
    /// configuration is shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_error: Option<String>,
}

/// A cluster operation's one-line result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReply {
    /// For the user.
    pub message: String,
}

/// `POST /v1/vms/{name}/ha`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaRequest {
    /// Make it highly available (true) or not (false; it keeps running where it is).
    pub enabled: bool,
}

/// `POST /v1/vms/{name}/migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The node to move the running VM to.
    pub to: String,
}

/// What a live migration did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateReply {
    /// For the user.
    pub message: String,
    /// The node it runs on now.
    pub node: String,
    /// The guest's pause at the switch-over, as QEMU measured it (ms).
    pub downtime_ms: Option<u64>,
    /// The whole migration (ms).
    pub total_ms: Option<u64>,
    /// The migration stream was mutual TLS (the cluster's migration certificates).
    #[serde(default)]
    pub encrypted: bool,
}

/// `POST /v1/cluster/agent`: what the OCF resource agent asks its node's ferryd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRequest {
    /// `start`, `stop`, `monitor`, `migrate_to` or `migrate_from`.
    pub action: String,
    /// The VM.
    pub vm: String,
    /// `migrate_to`: the target node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `stop`: seconds the guest has to shut down before it is powered off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_s: Option<u64>,
    /// Pacemaker's timeout of this operation (ms): the work must end well before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The OCF exit code the agent returns, with a line for Pacemaker's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReply {
    /// 0 success, 1 generic error, 5 not installed, 6 not configured, 7 not running.
    pub rc: i32,
    /// Why.
    pub message: String,
}

/// `POST /v1/cluster/incoming` (node to node, cluster token): start the VM here as a
/// live-migration target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// The VM.
    pub vm: String,
    /// The node sending it.
    pub source: String,
    /// The source's replication state of the VM, carried to the target (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<String>,
}

/// Where the target listens for the migration stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingReply {
    /// `IP:PORT`.
    pub listen: String,
}

/// `POST /v1/cluster/broker`: the cluster's Replica Broker, a cluster role with its own
/// name, floating address and certificate that holds the replica-server settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSetRequest {
    /// Enable (true) or remove (false) the Broker.
    pub enable: bool,
    /// Its floating IP address on the cluster's network (needed to enable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The address's prefix length; default 24.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_len: Option<u8>,
    /// The Broker's API port (TLS); default 7445. Its replication port is set with
    /// `replica-server set --port` on the Broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_port: Option<u16>,
    /// Its name (what primaries see); default `CLUSTER-broker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The Replica Broker as configured and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerStatus {
    /// Its name.
    pub name: String,
    /// Its floating address.
    pub address: String,
    /// Its TLS API, `IP:PORT`.
    pub api: String,
    /// Its certificate's fingerprint (primaries pin it).
    pub fingerprint: String,
    /// The file holding its API token (on the shared directory).
    pub token_file: String,
    /// Its admin socket on the node that runs it.
    pub admin_socket: String,
    /// The node running it now.
    pub node: Option<String>,
    /// `started`, `stopped` or `failed`.
    pub state: String,
    /// The replica VMs it placed, and the node holding each.
    #[serde(default)]
    pub replicas: Vec<BrokerReplica>,
}

/// A replica VM the Replica Broker placed on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerReplica {
    /// The VM.
    pub vm: String,
    /// The node holding its replica (and its recovery points on the shared directory).
    pub node: String,
    /// The last cycle that node committed.
    pub last_cycle: i64,
}
