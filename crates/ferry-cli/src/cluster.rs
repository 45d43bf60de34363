//! `ferry cluster …`, `ferry vm ha …`, `ferry vm migrate`, and the OCF resource agent
//! (`ferry ocf-agent ACTION`, which Pacemaker runs through /usr/lib/ocf/resource.d/ferry/vm).

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::Subcommand;
use ferry_api_types::cluster::{
    AgentReply, AgentRequest, BrokerSetRequest, BrokerStatus, ClusterCreateRequest,
    ClusterJoinRequest, ClusterReply, ClusterStatus, FenceDeviceSpec, HaRequest, MigrateReply,
    MigrateRequest, NodeSpec,
};
use ferry_client::{Client, Endpoint};

use crate::output::Output;
use crate::vm_path;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Make this host the first node of a new failover cluster (Corosync + Pacemaker,
    /// configured by Ferry). Every node mounts the shared directory at the same path and
    /// has vm_storage = SHARED/vms in its ferryd config; the other nodes then `join`.
    Create {
        /// The cluster's name.
        name: String,
        /// The shared directory (the same path on every node).
        #[arg(long)]
        shared: String,
        /// A node, NAME=ADDRESS (its ferryd name and its cluster-network IP); give one
        /// per node, this host included.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// A fence device: "AGENT[@NODE] key=value ...", e.g. "fence_ipmilan@node1
        /// ip=10.0.0.101 username=admin password=secret" (one per BMC) or "fence_sbd
        /// devices=/dev/disk/by-id/..." (one for all). Required: see docs/CLUSTER.md.
        #[arg(long = "fence", required = true)]
        fence: Vec<String>,
        /// Corosync's token timeout in ms: how fast a dead node is noticed.
        #[arg(long, default_value_t = 1000)]
        token_ms: u32,
    },
    /// Join the cluster whose configuration is in the shared directory.
    Join {
        /// The shared directory.
        #[arg(long)]
        shared: String,
    },
    /// Nodes, quorum, where each VM runs, and the fencing history.
    Status,
    /// Leave the cluster cleanly: this node's HA VMs move to the others first.
    Leave,
}

#[derive(Subcommand)]
pub enum BrokerCmd {
    /// Create (--enable) or remove (--disable) the cluster's Replica Broker: a cluster
    /// role with its own name, floating address and certificate, where primaries replicate
    /// to. Then configure it as a replica server through its own API (`replica-server set`
    /// with `--host` pointing at it, or its admin socket on the node running it).
    Set {
        /// Create it.
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Remove it (its data stays on the shared directory).
        #[arg(long)]
        disable: bool,
        /// Its floating IP address on the cluster network.
        #[arg(long)]
        address: Option<String>,
        /// The address's prefix length.
        #[arg(long, default_value_t = 24)]
        prefix: u8,
        /// Its API port (TLS).
        #[arg(long, default_value_t = 7445)]
        api_port: u16,
        /// Its name, what primaries see; default CLUSTER-broker.
        #[arg(long)]
        name: Option<String>,
    },
    /// The Broker: name, address, certificate, where it runs.
    Show,
}

#[derive(Subcommand)]
pub enum HaCmd {
    /// Make a VM highly available: the cluster keeps it running on one of its nodes,
    /// restarting it elsewhere when its node fails.
    Enable {
        /// The VM.
        vm: String,
    },
    /// Make it an ordinary VM again (it keeps running where it is).
    Disable {
        /// The VM.
        vm: String,
    },
}

fn parse_fence(s: &str) -> anyhow::Result<FenceDeviceSpec> {
    let mut words = s.split_whitespace();
    let Some(head) = words.next() else {
        bail!("--fence is empty; give \"AGENT[@NODE] key=value ...\"");
    };
    let (agent, node) = match head.split_once('@') {
        Some((a, n)) => (a.to_owned(), Some(n.to_owned())),
        None => (head.to_owned(), None),
    };
    let mut options = BTreeMap::new();
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            bail!("fence option {w:?} is not key=value");
        };
        options.insert(k.to_owned(), v.to_owned());
    }
    Ok(FenceDeviceSpec {
        agent,
        node,
        options,
    })
}

fn parse_node(s: &str) -> anyhow::Result<NodeSpec> {
    let Some((name, address)) = s.split_once('=') else {
        bail!("--node {s:?} is not NAME=ADDRESS");
    };
    Ok(NodeSpec {
        name: name.to_owned(),
        address: address.to_owned(),
    })
}

pub async fn cluster(client: &Client, cmd: ClusterCmd, out: &Output) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Create {
            name,
            shared,
            nodes,
            fence,
            token_ms,
        } => {
            let req = ClusterCreateRequest {
                name,
                shared_dir: shared,
                nodes: nodes
                    .iter()
                    .map(|n| parse_node(n))
                    .collect::<Result<_, _>>()?,
                fence: fence
                    .iter()
                    .map(|f| parse_fence(f))
                    .collect::<Result<_, _>>()?,
                token_ms: Some(token_ms),
            };
            let st: ClusterStatus = client.post("/v1/cluster", &req).await?;
            print_status(&st, out);
        }
        ClusterCmd::Join { shared } => {
            let st: ClusterStatus = client
                .post(
                    "/v1/cluster/join",
                    &ClusterJoinRequest { shared_dir: shared },
                )
                .await?;
            print_status(&st, out);
        }
        ClusterCmd::Status => {
            let st: ClusterStatus = client.get("/v1/cluster").await?;
            print_status(&st, out);
        }
        ClusterCmd::Leave => {
            out.progress("moving this node's VMs away, then stopping its cluster stack…");
            let r: ClusterReply = client.post("/v1/cluster/leave", &()).await?;
            out.message(&r.message);
        }
    }
    Ok(())
}

pub async fn broker(client: &Client, cmd: BrokerCmd, out: &Output) -> anyhow::Result<()> {
    let b: BrokerStatus = match cmd {
        BrokerCmd::Set {
            enable,
            disable,
            address,
            prefix,
            api_port,
            name,
        } => {
            if !enable && !disable {
                bail!("give --enable (with --address IP) or --disable");
            }
            out.progress("configuring the Replica Broker…");
            client
                .post(
                    "/v1/cluster/broker",
                    &BrokerSetRequest {
                        enable,
                        address,
                        prefix_len: Some(prefix),
                        api_port: Some(api_port),
                        name,
                    },
                )
                .await?
        }
        BrokerCmd::Show => client.get("/v1/cluster/broker").await?,
    };
    if !out.json(&b) {
        println!("Replica Broker {} ({})", b.name, b.state);
        println!("  address      {}", b.address);
        println!("  API          https://{}", b.api);
        println!("  fingerprint  {}", b.fingerprint);
        println!("  token file   {}", b.token_file);
        println!(
            "  runs on      {} (admin socket {} there)",
            b.node.as_deref().unwrap_or("-"),
            b.admin_socket
        );
        if b.replicas.is_empty() {
            println!("  replicas     none placed yet");
        } else {
            println!("  replicas     (each held by a node; run failovers there)");
            for r in &b.replicas {
                println!("    {:<20} on {:<16} cycle {}", r.vm, r.node, r.last_cycle);
            }
        }
    }
    Ok(())
}

pub async fn ha(client: &Client, cmd: HaCmd, out: &Output) -> anyhow::Result<()> {
    let (vm, enabled) = match cmd {
        HaCmd::Enable { vm } => (vm, true),
        HaCmd::Disable { vm } => (vm, false),
    };
    let r: ClusterReply = client
        .post(&vm_path(&vm, "/ha"), &HaRequest { enabled })
        .await?;
    out.message(&r.message);
    Ok(())
}

pub async fn migrate(client: &Client, vm: &str, to: &str, out: &Output) -> anyhow::Result<()> {
    out.progress(&format!("live-migrating {vm} to {to}…"));
    let r: MigrateReply = client
        .post(
            &vm_path(vm, "/migrate"),
            &MigrateRequest { to: to.to_owned() },
        )
        .await?;
    if !out.json(&r) {
        println!("{}", r.message);
    }
    Ok(())
}

fn print_status(st: &ClusterStatus, out: &Output) {
    if out.json(st) {
        return;
    }
    println!(
        "Cluster {} ({}), asked {}: {}{}",
        st.name,
        st.shared_dir,
        st.this_node,
        if st.quorate { "quorate" } else { "NO QUORUM" },
        st.dc
            .as_ref()
            .map(|d| format!(", DC {d}"))
            .unwrap_or_default()
    );
    if let Some(e) = &st.stack_error {
        println!("  cluster stack: {e}");
    }
    println!("\n{:<16} {:<16} STATE", "NODE", "ADDRESS");
    for n in &st.nodes {
        let mut state = vec![if n.online { "online" } else { "offline" }];
        if n.unclean {
            state.push("unclean (to be fenced)");
        }
        if n.standby {
            state.push("standby");
        }
        if n.dc {
            state.push("DC");
        }
        println!("{:<16} {:<16} {}", n.name, n.address, state.join(", "));
    }
    println!("\n{:<20} {:<4} {:<16} STATE", "VM", "HA", "NODE");
    for v in &st.vms {
        println!(
            "{:<20} {:<4} {:<16} {}",
            v.name,
            if v.ha { "yes" } else { "no" },
            v.node.as_deref().unwrap_or("-"),
            v.state
        );
    }
    if !st.fencing.is_empty() {
        println!("\nFencing history:");
        for f in &st.fencing {
            println!(
                "  {} {} {}: {}{}",
                f.completed.as_deref().unwrap_or("(pending)"),
                f.action,
                f.target,
                f.status,
                f.delegate
                    .as_ref()
                    .map(|d| format!(" (by {d})"))
                    .unwrap_or_default()
            );
        }
    }
}

/// `ferry ocf-agent ACTION`: Pacemaker's OCF agent for a Ferry VM. Parameters come in
/// `OCF_RESKEY_*`; the exit code is the OCF result. Each action asks the node's ferryd.
pub fn ocf_agent(args: &[String]) -> i32 {
    use ferry_cluster::ocf::rc;
    if args.first().map(String::as_str) == Some("broker") {
        return broker_agent(args.get(1).map(String::as_str).unwrap_or(""));
    }
    let action = args.first().map(String::as_str).unwrap_or("");
    let env = |k: &str| std::env::var(format!("OCF_RESKEY_{k}")).ok();
    match action {
        "meta-data" => {
            print!("{}", ferry_cluster::ocf::META_DATA);
            return rc::SUCCESS;
        }
        "usage" | "help" => {
            println!(
                "usage: vm {{start|stop|monitor|migrate_to|migrate_from|meta-data|validate-all}}"
            );
            return rc::SUCCESS;
        }
        _ => {}
    }
    let Some(vm) = env("vm") else {
        eprintln!("ocf:ferry:vm: the resource has no 'vm' parameter");
        return rc::ERR_CONFIGURED;
    };
    let socket = env("socket").unwrap_or_else(|| "/run/ferry/ferryd.sock".to_owned());
    if action == "validate-all" {
        if ferry_api_types::VmName::new(&vm).is_err() {
            eprintln!("ocf:ferry:vm: {vm:?} is not a VM name");
            return rc::ERR_CONFIGURED;
        }
        if !std::path::Path::new(&socket).exists() {
            eprintln!("ocf:ferry:vm: ferryd is not running here ({socket} is missing)");
            return rc::ERR_INSTALLED;
        }
        return rc::SUCCESS;
    }
    if !matches!(
        action,
        "start" | "stop" | "monitor" | "migrate_to" | "migrate_from"
    ) {
        eprintln!("ocf:ferry:vm: action {action:?} is not implemented");
        return rc::ERR_UNIMPLEMENTED;
    }
    let req = AgentRequest {
        action: action.to_owned(),
        vm,
        target: env("CRM_meta_migrate_target"),
        shutdown_timeout_s: env("shutdown_timeout").and_then(|t| t.parse().ok()),
        timeout_ms: env("CRM_meta_timeout").and_then(|t| t.parse().ok()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let client = Client::new(Endpoint::Unix(socket.clone().into()));
    let r: anyhow::Result<AgentReply> = runtime.block_on(async {
        client
            .post("/v1/cluster/agent", &req)
            .await
            .with_context(|| format!("ferryd at {socket} does not answer"))
    });
    match r {
        Ok(reply) => {
            eprintln!("ocf:ferry:vm {action} {}: {}", req.vm, reply.message);
            reply.rc
        }
        Err(e) => {
            eprintln!("ocf:ferry:vm {action} {}: {e:#}", req.vm);
            rc::ERR_GENERIC
        }
    }
}

/// `ocf:ferry:broker`: runs the Replica Broker's ferryd on this node (its config, store and
/// certificate on the shared directory; its address is the group's IPaddr2, started first).
fn broker_agent(action: &str) -> i32 {
    use ferry_cluster::ocf::rc;
    let env = |k: &str| std::env::var(format!("OCF_RESKEY_{k}")).ok();
    if action == "meta-data" {
        print!("{}", ferry_cluster::ocf::BROKER_META_DATA);
        return rc::SUCCESS;
    }
    let Some(config) = env("config") else {
        eprintln!("ocf:ferry:broker: the resource has no 'config' parameter");
        return rc::ERR_CONFIGURED;
    };
    let ferryd = env("ferryd").unwrap_or_else(|| "/usr/sbin/ferryd".to_owned());
    let socket = "/run/ferry/broker.sock";
    let pids = || ferry_cluster::corosync::processes_here("ferryd", &config);
    let answers = || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = Client::new(Endpoint::Unix(socket.into()));
        runtime
            .block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    client.get::<serde_json::Value>("/v1/server"),
                )
                .await
            })
            .is_ok_and(|r| r.is_ok())
    };
    match action {
        "validate-all" => {
            if !std::path::Path::new(&config).is_file() {
                eprintln!(
                    "ocf:ferry:broker: {config} is missing (is the shared directory mounted?)"
                );
                return rc::ERR_INSTALLED;
            }
            rc::SUCCESS
        }
        "monitor" => match (pids().is_empty(), answers()) {
            (true, _) => rc::NOT_RUNNING,
            (false, true) => rc::SUCCESS,
            (false, false) => {
                eprintln!("ocf:ferry:broker: its ferryd runs but does not answer on {socket}");
                rc::ERR_GENERIC
            }
        },
        "start" => {
            if !pids().is_empty() && answers() {
                return rc::SUCCESS;
            }
            let log = std::path::Path::new(&config).with_file_name(format!(
                "ferryd-{}.log",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .unwrap_or_default()
                    .trim()
            ));
            let mut cmd = std::process::Command::new(&ferryd);
            cmd.arg("--config").arg(&config);
            if let Err(e) =
                ferry_cluster::corosync::spawn_detached(&mut cmd, &log.display().to_string())
            {
                eprintln!("ocf:ferry:broker: {e}");
                return rc::ERR_GENERIC;
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(80);
            while std::time::Instant::now() < deadline {
                if answers() {
                    eprintln!("ocf:ferry:broker: started");
                    return rc::SUCCESS;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            eprintln!(
                "ocf:ferry:broker: ferryd did not answer in 80 s; see {}",
                log.display()
            );
            rc::ERR_GENERIC
        }
        "stop" => {
            for sig in [libc::SIGTERM, libc::SIGKILL] {
                for pid in pids() {
                    // SAFETY: kill(2) on the Broker's ferryd, found in /proc just now.
                    unsafe { libc::kill(pid as i32, sig) };
                }
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while !pids().is_empty() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                if pids().is_empty() {
                    break;
                }
            }
            // The VMs it started (failovers, test failovers) go with it: the Broker's data
            // moves to another node, which must be the only one to use it.
            let data = std::path::Path::new(&config).with_file_name("data");
            let needle = data.display().to_string();
            // (comm is cut to 15 characters: "qemu-system-x86_64" reads "qemu-system-x86")
            let qemus = || ferry_cluster::corosync::processes_here("qemu-system-x86", &needle);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !qemus().is_empty() && std::time::Instant::now() < deadline {
                for pid in qemus() {
                    // SAFETY: kill(2) on a QEMU of the Broker's, found in /proc just now.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if pids().is_empty() && qemus().is_empty() {
                rc::SUCCESS
            } else {
                rc::ERR_GENERIC
            }
        }
        other => {
            eprintln!("ocf:ferry:broker: action {other:?} is not implemented");
            rc::ERR_UNIMPLEMENTED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_and_node_options_parse() {
        let f = parse_fence("fence_ipmilan@node1 ip=10.0.0.1 username=admin").unwrap();
        assert_eq!(f.agent, "fence_ipmilan");
        assert_eq!(f.node.as_deref(), Some("node1"));
        assert_eq!(f.options["ip"], "10.0.0.1");
        assert!(parse_fence("fence_x novalue").is_err());
        assert!(parse_fence("  ").is_err());
        let n = parse_node("node1=10.0.0.1").unwrap();
        assert_eq!((n.name.as_str(), n.address.as_str()), ("node1", "10.0.0.1"));
        assert!(parse_node("node1").is_err());
    }
}
