//! Pacemaker through its command-line tools, run in ferryd's own namespaces (they talk to
//! the local daemons over abstract sockets and /dev/shm): the CIB's properties and
//! resources, `crm_mon`'s view of nodes, resources and fencing, and moving a resource.

use std::process::Command;

use ferry_api_types::cluster::{FenceDeviceSpec, FenceEvent};

use crate::corosync::run;
use crate::shared::ClusterConfig;
use crate::{resource_id, xml_escape, ClusterError};

/// Cluster options Ferry sets, and why:
/// - `stonith-enabled=true`: shared storage must never be written by two nodes;
/// - `no-quorum-policy=stop`: a partition without quorum stops its VMs (and is fenced);
/// - `dc-deadtime=2s`: the first election does not wait 20 s;
/// - `stop-orphan-resources=false`: `ferry vm ha disable` removes a VM's resource and
///   leaves the VM running where it is;
/// - `cluster-recheck-interval=1min`: failure timeouts expire promptly.
pub const CLUSTER_PROPERTIES: [(&str, &str); 5] = [
    ("stonith-enabled", "true"),
    ("no-quorum-policy", "stop"),
    ("dc-deadtime", "2s"),
    ("stop-orphan-resources", "false"),
    ("cluster-recheck-interval", "1min"),
];

/// The stonith resource of fence device number `i`.
pub fn fence_device_xml(i: usize, dev: &FenceDeviceSpec, cfg: &ClusterConfig) -> String {
    let id = format!("fence-{}", i + 1);
    let hosts = match &dev.node {
        Some(n) => n.clone(),
        None => cfg
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(" "),
    };
    let mut pairs = vec![
        ("pcmk_host_list".to_owned(), hosts),
        ("pcmk_host_check".to_owned(), "static-list".to_owned()),
    ];
    pairs.extend(dev.options.iter().map(|(k, v)| (k.clone(), v.clone())));
    let nv: String = pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "<nvpair id=\"{id}-{k}\" name=\"{k}\" value=\"{}\"/>",
                xml_escape(v)
            )
        })
        .collect();
    format!(
        "<primitive id=\"{id}\" class=\"stonith\" type=\"{}\"><instance_attributes id=\"{id}-ia\">{nv}</instance_attributes><operations><op id=\"{id}-monitor\" name=\"monitor\" interval=\"60s\"/></operations></primitive>",
        dev.agent
    )
}

/// A VM's resource: Ferry's OCF agent, sticky (a VM does not move back when a node
/// returns), live-migratable, monitored every 5 s.
pub fn vm_resource_xml(vm: &str) -> Result<String, ClusterError> {
    let id = resource_id(vm)?;
    let name = xml_escape(vm);
    // Children's ids put their kind first ("ia.vm-web"), so that no VM's resource id
    // ("vm-web-ia") can equal another VM's child id.
    Ok(format!(
        "<primitive id=\"{id}\" class=\"ocf\" provider=\"ferry\" type=\"vm\">\
<instance_attributes id=\"ia.{id}\"><nvpair id=\"ia.vm.{id}\" name=\"vm\" value=\"{name}\"/></instance_attributes>\
<meta_attributes id=\"meta.{id}\"><nvpair id=\"meta.stick.{id}\" name=\"resource-stickiness\" value=\"100\"/>\
<nvpair id=\"meta.migrate.{id}\" name=\"allow-migrate\" value=\"true\"/></meta_attributes>\
<operations><op id=\"op.start.{id}\" name=\"start\" interval=\"0\" timeout=\"120s\"/>\
<op id=\"op.stop.{id}\" name=\"stop\" interval=\"0\" timeout=\"120s\"/>\
<op id=\"op.monitor.{id}\" name=\"monitor\" interval=\"5s\" timeout=\"30s\"/>\
<op id=\"op.migrate_to.{id}\" name=\"migrate_to\" interval=\"0\" timeout=\"600s\"/>\
<op id=\"op.migrate_from.{id}\" name=\"migrate_from\" interval=\"0\" timeout=\"120s\"/></operations></primitive>"
    ))
}

/// The Broker's resource group: its floating address (`ocf:heartbeat:IPaddr2`), then its
/// ferryd (`ocf:ferry:broker`), kept together and started in that order.
pub fn broker_group_xml(address: &str, prefix_len: u8, config: &str, ferryd: &str) -> String {
    let (address, config, ferryd) = (xml_escape(address), xml_escape(config), xml_escape(ferryd));
    format!(
        "<group id=\"{BROKER_GROUP}\">\
<primitive id=\"broker-ip\" class=\"ocf\" provider=\"heartbeat\" type=\"IPaddr2\">\
<instance_attributes id=\"broker-ip-ia\"><nvpair id=\"broker-ip-ip\" name=\"ip\" value=\"{address}\"/>\
<nvpair id=\"broker-ip-mask\" name=\"cidr_netmask\" value=\"{prefix_len}\"/></instance_attributes>\
<operations><op id=\"broker-ip-monitor\" name=\"monitor\" interval=\"5s\" timeout=\"20s\"/></operations></primitive>\
<primitive id=\"broker\" class=\"ocf\" provider=\"ferry\" type=\"broker\">\
<instance_attributes id=\"broker-ia\"><nvpair id=\"broker-config\" name=\"config\" value=\"{config}\"/>\
<nvpair id=\"broker-ferryd\" name=\"ferryd\" value=\"{ferryd}\"/></instance_attributes>\
<meta_attributes id=\"broker-meta\"><nvpair id=\"broker-stick\" name=\"resource-stickiness\" value=\"100\"/></meta_attributes>\
<operations><op id=\"broker-start\" name=\"start\" interval=\"0\" timeout=\"90s\"/>\
<op id=\"broker-stop\" name=\"stop\" interval=\"0\" timeout=\"60s\"/>\
<op id=\"broker-monitor\" name=\"monitor\" interval=\"5s\" timeout=\"20s\"/></operations></primitive></group>"
    )
}

/// The Broker's group id.
pub const BROKER_GROUP: &str = "ferry-broker";

/// Removes the Broker's group (its ferryd stops, its address goes away).
pub fn delete_broker_group() -> Result<(), ClusterError> {
    // Stopped first: with stop-orphan-resources off, a deleted running group would stay.
    let _ = run(Command::new("crm_resource").args([
        "-r",
        BROKER_GROUP,
        "--meta",
        "-p",
        "target-role",
        "-v",
        "Stopped",
    ]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let active = status()
            .map(|st| {
                st.resources
                    .iter()
                    .any(|r| (r.id == "broker" || r.id == "broker-ip") && r.active)
            })
            .unwrap_or(false);
        if !active {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let xml = format!("<group id=\"{BROKER_GROUP}\"/>");
    run(Command::new("cibadmin").args(["-D", "-o", "resources", "-X", &xml])).map(drop)
}

/// Adds a resource to the live CIB.
pub fn create_resource(xml: &str) -> Result<(), ClusterError> {
    run(Command::new("cibadmin").args(["-C", "-o", "resources", "-X", xml])).map(drop)
}

/// Removes a resource (and the constraints naming it) from the live CIB.
pub fn delete_resource(id: &str) -> Result<(), ClusterError> {
    let _ = run(Command::new("crm_resource").args(["--clear", "-r", id]));
    let xml = format!("<primitive id=\"{id}\"/>");
    run(Command::new("cibadmin").args(["-D", "-o", "resources", "-X", &xml])).map(drop)
}

/// Asks Pacemaker to move a resource to `node` (it live-migrates an HA VM); the location
/// preference it leaves is cleared with [`clear_move`] once the move is done.
pub fn move_resource(id: &str, node: &str) -> Result<(), ClusterError> {
    run(Command::new("crm_resource").args(["--move", "-r", id, "-N", node])).map(drop)
}

/// Drops the preference a move left (stickiness keeps the resource where it is).
pub fn clear_move(id: &str) -> Result<(), ClusterError> {
    run(Command::new("crm_resource").args(["--clear", "-r", id])).map(drop)
}

/// Puts this node in standby (its resources move away) or takes it out.
pub fn set_standby(node: &str, on: bool) -> Result<(), ClusterError> {
    run(Command::new("crm_attribute").args([
        "-t",
        "nodes",
        "-N",
        node,
        "-n",
        "standby",
        "-v",
        if on { "on" } else { "off" },
    ]))
    .map(drop)
}

/// A node as `crm_mon` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// Name.
    pub name: String,
    /// Member now.
    pub online: bool,
    /// In standby.
    pub standby: bool,
    /// Lost, not yet fenced.
    pub unclean: bool,
    /// Designated controller.
    pub dc: bool,
}

/// A resource as `crm_mon` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceState {
    /// Its id.
    pub id: String,
    /// `Started`, `Stopped`, `Migrating`, …
    pub role: String,
    /// Where it is active.
    pub nodes: Vec<String>,
    /// Failed.
    pub failed: bool,
    /// Active somewhere.
    pub active: bool,
}

/// `crm_mon`'s view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StackStatus {
    /// Quorate partition.
    pub quorate: bool,
    /// The DC.
    pub dc: Option<String>,
    /// Nodes.
    pub nodes: Vec<NodeState>,
    /// Resources.
    pub resources: Vec<ResourceState>,
    /// Fencing history.
    pub fencing: Vec<FenceEvent>,
}

/// Asks the local Pacemaker.
pub fn status() -> Result<StackStatus, ClusterError> {
    let xml = run(Command::new("crm_mon").args(["-1", "--output-as=xml", "--include=fencing"]))
        .map_err(|e| {
            ClusterError::Tool(format!(
                "the cluster stack does not answer on this node ({e}); is it started? (ferry cluster join)"
            ))
        })?;
    parse_crm_mon(&xml)
}

/// Parses `crm_mon --output-as=xml --include=fencing`.
pub fn parse_crm_mon(xml: &str) -> Result<StackStatus, ClusterError> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| ClusterError::Tool(format!("crm_mon printed XML Ferry cannot read: {e}")))?;
    let attr = |n: roxmltree::Node, a: &str| n.attribute(a).unwrap_or("").to_owned();
    let yes = |n: roxmltree::Node, a: &str| n.attribute(a) == Some("true");
    let mut st = StackStatus::default();
    for n in doc.descendants() {
        match n.tag_name().name() {
            "current_dc" if yes(n, "present") => {
                st.dc = n.attribute("name").map(str::to_owned);
                st.quorate = yes(n, "with_quorum");
            }
            "node" if n.parent().is_some_and(|p| p.tag_name().name() == "nodes") => {
                st.nodes.push(NodeState {
                    name: attr(n, "name"),
                    online: yes(n, "online"),
                    standby: yes(n, "standby"),
                    unclean: yes(n, "unclean"),
                    dc: yes(n, "is_dc"),
                })
            }
            "resource" => st.resources.push(ResourceState {
                id: attr(n, "id"),
                role: attr(n, "role"),
                nodes: n
                    .children()
                    .filter(|c| c.tag_name().name() == "node")
                    .map(|c| attr(c, "name"))
                    .collect(),
                failed: yes(n, "failed"),
                active: yes(n, "active"),
            }),
            "fence_event" => st.fencing.push(FenceEvent {
                target: attr(n, "target"),
                action: attr(n, "action"),
                status: attr(n, "status"),
                delegate: n.attribute("delegate").map(str::to_owned),
                completed: n.attribute("completed").map(str::to_owned),
            }),
            _ => {}
        }
    }
    // crm_mon lists the newest fencing first.
    st.fencing.reverse();
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"<pacemaker-result api-version="2.25" request="crm_mon -1 --output-as=xml --include=fencing">
  <summary>
    <current_dc present="true" version="2.1.5" name="node1" id="1" with_quorum="true" mixed_version="false"/>
  </summary>
  <nodes>
    <node name="node1" id="1" online="true" standby="false" unclean="false" is_dc="true" type="member"/>
    <node name="node2" id="2" online="false" standby="false" unclean="true" is_dc="false" type="member"/>
  </nodes>
  <resources>
    <resource id="fence-1" resource_agent="stonith:fence_sbd" role="Started" active="true" failed="false" nodes_running_on="1">
      <node name="node1" id="1" cached="true"/>
    </resource>
    <resource id="vm-web" resource_agent="ocf:ferry:vm" role="Started" active="true" failed="false" nodes_running_on="1">
      <node name="node1" id="1" cached="true"/>
    </resource>
  </resources>
  <node_history><node name="node1"/></node_history>
  <fence_history>
    <fence_event action="reboot" target="node2" status="success" delegate="node1" completed="2026-12-07 05:28:31Z"/>
    <fence_event action="reboot" target="node3" status="success" delegate="node1" completed="2026-12-07 05:20:00Z"/>
  </fence_history>
  <status code="0" message="OK"/>
</pacemaker-result>"#;

    #[test]
    fn crm_mon_xml_is_read() {
        let st = parse_crm_mon(SAMPLE).unwrap();
        assert!(st.quorate);
        assert_eq!(st.dc.as_deref(), Some("node1"));
        assert_eq!(st.nodes.len(), 2, "node_history's nodes are not nodes");
        assert!(st.nodes[1].unclean && !st.nodes[1].online);
        let vm = st.resources.iter().find(|r| r.id == "vm-web").unwrap();
        assert_eq!(vm.nodes, vec!["node1".to_owned()]);
        assert_eq!(st.fencing[0].target, "node3", "oldest first");
        assert_eq!(st.fencing[1].target, "node2");
        assert!(parse_crm_mon("<not xml").is_err());
    }

    #[test]
    fn resource_xml_escapes_and_names_the_agent() {
        let xml = vm_resource_xml("web").unwrap();
        assert!(xml.contains("provider=\"ferry\" type=\"vm\""));
        assert!(xml.contains("allow-migrate"));
        roxmltree::Document::parse(&xml).unwrap();
        let cfg = ClusterConfig {
            name: "c".into(),
            nodes: vec![],
            fence: vec![],
            token_ms: 1000,
        };
        let dev = FenceDeviceSpec {
            agent: "fence_ipmilan".into(),
            node: Some("node1".into()),
            options: [("password".to_owned(), "a\"<b".to_owned())].into(),
        };
        let xml = fence_device_xml(0, &dev, &cfg);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert!(doc
            .descendants()
            .any(|n| n.attribute("value") == Some("a\"<b")));
        assert!(xml.contains("value=\"node1\""));
    }
}
