//! A real failover cluster on one machine for tests: each node is a network, mount and UTS
//! namespace (its own Corosync, Pacemaker and ferryd, its own /run and /dev/shm, the
//! daemons' fixed directories bound to the node's own), the nodes are joined by a bridge in
//! a fourth namespace, and one host directory is the shared storage every node sees at the
//! same path. Fencing is real: `fence_netns` (cluster/fence_netns) SIGKILLs every process of
//! the victim node's network namespace, made visible to the nodes only (an overlay on their
//! /usr/sbin). The recipe and its pitfalls: ../shared/reference/CLUSTER.md.
//!
//! Dropping a [`TestCluster`] kills every process of its nodes and removes the namespaces.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::host::Host;

/// Where ferryd listens on each node (inside its namespace).
pub const NODE_API_PORT: u16 = 7443;

/// A test cluster's node.
pub struct Node {
    /// 1-based index.
    pub index: usize,
    /// `node1`, …
    pub name: String,
    /// Its address on the cluster network.
    pub address: String,
    /// Its ferryd.
    pub host: Host,
}

/// A cluster of nodes in namespaces (see the module's doc).
pub struct TestCluster {
    /// Prefix of the namespaces' names.
    pub prefix: String,
    /// The shared storage.
    pub shared: PathBuf,
    /// The nodes (dropped before `work`, which holds their directories): the first
    /// `members` form the cluster, the others are standalone hosts on its network.
    pub nodes: Vec<Node>,
    /// How many nodes [`TestCluster::form`] puts in the cluster.
    pub members: usize,
    /// Each cluster of nodes: which nodes (indexes into `nodes`) and its shared directory
    /// (the first is `shared`).
    pub groups: Vec<(std::ops::Range<usize>, PathBuf)>,
    /// Working directory (pins, fence state, overlay, the nodes' directories).
    pub work: tempfile::TempDir,
}

fn sh(script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{script}\nfailed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCluster {
    /// Makes `n` nodes' namespaces and starts their ferryd (not yet in a cluster). Needs
    /// root and the cluster stack (scripts/install-deps.sh installs it).
    pub fn new(n: usize) -> Self {
        Self::with_standalone(n, 0)
    }

    /// `members` cluster nodes plus `standalone` hosts on the same network that keep their
    /// VMs on their own storage (e.g. a replica server outside the cluster).
    pub fn with_standalone(members: usize, standalone: usize) -> Self {
        Self::with_groups(&[members], standalone)
    }

    /// Several clusters' nodes on one network, each group with a shared directory of its
    /// own (`shared`, `shared-2`, …), then `standalone` hosts.
    pub fn with_groups(sizes: &[usize], standalone: usize) -> Self {
        let members = sizes[0];
        let n = sizes.iter().sum::<usize>() + standalone;
        for tool in [
            "corosync",
            "pacemakerd",
            "crm_mon",
            "nsenter",
            "unshare",
            "ip",
        ] {
            assert!(
                Path::new("/usr/sbin").join(tool).exists() || Path::new("/usr/bin").join(tool).exists(),
                "{tool} is missing: run scripts/install-deps.sh (corosync, pacemaker, pacemaker-cli-utils)"
            );
        }
        let id = std::process::id() % 100_000;
        let prefix = format!("fc{id}");
        // A /24 of its own per test process: 10.(80 + id/250 % 100).(id % 250).X
        let subnet = format!("10.{}.{}", 80 + (id / 250) % 100, id % 250);
        let work = tempfile::Builder::new()
            .prefix("fcl-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let w = work.path().to_owned();
        let shared = w.join("shared");
        std::fs::create_dir_all(shared.join("vms")).expect("shared dir");
        let fence_dir = w.join("fence-targets");
        std::fs::create_dir_all(&fence_dir).expect("fence dir");
        std::fs::create_dir_all(w.join("sbin-upper")).expect("sbin-upper");
        let agent = include_str!("../cluster/fence_netns")
            .replace("@STATE_DIR@", &fence_dir.display().to_string());
        let agent_path = w.join("sbin-upper/fence_netns");
        std::fs::write(&agent_path, agent).expect("fence agent");
        sh(&format!(
            "chmod 755 {a}; chmod 755 {w}; mkdir -p {w}/ns /usr/lib/ocf/resource.d/ferry
             mount --bind {w}/ns {w}/ns; mount --make-private {w}/ns
             ip netns add {prefix}-sw; ip -n {prefix}-sw link add br0 type bridge; ip -n {prefix}-sw link set br0 up",
            a = agent_path.display(),
            w = w.display()
        ));
        let mut cluster = TestCluster {
            prefix: prefix.clone(),
            work,
            shared: shared.clone(),
            nodes: Vec::new(),
            members,
            groups: Vec::new(),
        };
        let mut start = 0;
        for (g, size) in sizes.iter().enumerate() {
            let dir = if g == 0 {
                shared.clone()
            } else {
                w.join(format!("shared-{}", g + 1))
            };
            std::fs::create_dir_all(dir.join("vms")).expect("shared dir");
            cluster.groups.push((start..start + size, dir));
            start += size;
        }
        for i in 1..=n {
            let name = format!("node{i}");
            let address = format!("{subnet}.{i}");
            let d = w.join(format!("node{i}"));
            for sub in [
                "etc-corosync",
                "lib-corosync",
                "log-corosync",
                "log-pacemaker",
                "lib-pacemaker/cib",
                "lib-pacemaker/pengine",
                "lib-pacemaker/blackbox",
                "lib-pacemaker/cores",
                "run-ferry",
                "ocf",
                "sbin-work",
            ] {
                std::fs::create_dir_all(d.join(sub)).expect("node dir");
            }
            sh(&format!(
                "ip netns add {prefix}-n{i}
                 ip -n {prefix}-sw link add sw-n{i} type veth peer name eth0 netns {prefix}-n{i}
                 ip -n {prefix}-sw link set sw-n{i} master br0 up
                 ip -n {prefix}-n{i} addr add {address}/24 dev eth0
                 ip -n {prefix}-n{i} link set eth0 up; ip -n {prefix}-n{i} link set lo up
                 ip netns exec {prefix}-n{i} readlink /proc/self/ns/net > {fence}/{name}.netns
                 chown -R hacluster:haclient {d}/lib-pacemaker {d}/log-pacemaker
                 chmod 750 {d}/lib-pacemaker/*; chmod 770 {d}/log-pacemaker
                 touch {w}/ns/n{i}.mnt {w}/ns/n{i}.uts
                 nsenter --net=/run/netns/{prefix}-n{i} unshare --mount={w}/ns/n{i}.mnt --uts={w}/ns/n{i}.uts --propagation private /bin/sh -ec '
                   hostname {name}; mount -t sysfs sysfs /sys
                   mount --bind {d}/etc-corosync /etc/corosync
                   mount --bind {d}/lib-corosync /var/lib/corosync
                   mount --bind {d}/log-corosync /var/log/corosync
                   mount --bind {d}/lib-pacemaker /var/lib/pacemaker
                   mount --bind {d}/log-pacemaker /var/log/pacemaker
                   mount --bind {d}/ocf /usr/lib/ocf/resource.d/ferry
                   mount -t overlay overlay -o lowerdir=/usr/sbin,upperdir={w}/sbin-upper,workdir={d}/sbin-work /usr/sbin'",
                fence = fence_dir.display(),
                d = d.display(),
                w = w.display(),
            ));
            let node_dir = tempfile::Builder::new()
                .prefix(&format!("{name}-"))
                .tempdir_in(&d)
                .expect("node tempdir");
            let tls_addr = format!("{address}:{NODE_API_PORT}");
            let vm_storage = match cluster.groups.iter().find(|(r, _)| r.contains(&(i - 1))) {
                Some((_, dir)) => dir.join("vms"),
                None => node_dir.path().join("vms"),
            };
            std::fs::write(
                node_dir.path().join("ferryd.toml"),
                format!(
                    "name = \"{name}\"\ndata_dir = \"{}/data\"\nvm_storage = \"{}\"\nadmin_socket = \"/run/ferry/ferryd.sock\"\ntls_listen = \"{tls_addr}\"\naccel = \"tcg\"\nfile_roots = [\"/tmp\", \"{}\", \"/var/cache/ferry-debian\"]\n",
                    node_dir.path().display(),
                    vm_storage.display(),
                    crate::repo_root().display()
                ),
            )
            .expect("node config");
            let launcher = cluster.launcher(i);
            let host = Host::in_namespaces(
                &name,
                node_dir,
                d.join("run-ferry/ferryd.sock"),
                tls_addr,
                vm_storage,
                launcher,
            );
            cluster.nodes.push(Node {
                index: i,
                name,
                address,
                host,
            });
            cluster.fresh_run(i);
        }
        for node in &mut cluster.nodes {
            node.host.launch();
        }
        cluster
    }

    fn launcher(&self, i: usize) -> Vec<String> {
        let w = self.work.path().display();
        vec![
            "nsenter".into(),
            format!("--net=/run/netns/{}-n{i}", self.prefix),
            format!("--mount={w}/ns/n{i}.mnt"),
            format!("--uts={w}/ns/n{i}.uts"),
            "--".into(),
        ]
    }

    /// Runs a command in node `i`'s namespaces; its stdout.
    pub fn on(&self, i: usize, args: &[&str]) -> String {
        let l = self.launcher(i);
        let out = Command::new(&l[0])
            .args(&l[1..])
            .args(args)
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A fresh /run and /dev/shm for node `i` (what a boot gives), with ferryd's socket
    /// directory bound where the test can reach it.
    fn fresh_run(&self, i: usize) {
        let d = self.work.path().join(format!("node{i}"));
        let l = self.launcher(i).join(" ");
        sh(&format!(
            "{l} /bin/sh -ec '
               umount -l /dev/shm 2>/dev/null || true; mount -t tmpfs -o mode=1777 tmpfs /dev/shm
               if mountpoint -q /run; then umount -l /run; fi; mount -t tmpfs -o mode=755 tmpfs /run
               mkdir -p /run/crm /run/resource-agents /run/lock /run/ferry; chown hacluster:haclient /run/crm
               mount --bind {}/run-ferry /run/ferry'",
            d.display()
        ));
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Node `name`, mutably.
    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The `--fence` option for the test fence agent.
    pub fn fence_option(&self) -> String {
        "fence_netns".to_owned()
    }

    /// `ferry cluster create` on node 1 and `join` on the others; waits until every node
    /// is online in a quorate partition.
    pub fn form(&self, name: &str) {
        self.form_group(0, name);
    }

    /// Forms cluster number `g` of [`TestCluster::with_groups`] as `name`.
    pub fn form_group(&self, g: usize, name: &str) {
        let (range, dir) = self.groups[g].clone();
        let shared = dir.display().to_string();
        let mut args = vec![
            "cluster".to_owned(),
            "create".to_owned(),
            name.to_owned(),
            "--shared".to_owned(),
            shared.clone(),
            "--fence".to_owned(),
            self.fence_option(),
        ];
        for n in &self.nodes[range.clone()] {
            args.push("--node".into());
            args.push(format!("{}={}", n.name, n.address));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.nodes[range.start].host.ferry_ok(&args);
        for n in &self.nodes[range.start + 1..range.end] {
            n.host.ferry_ok(&["cluster", "join", "--shared", &shared]);
        }
        self.wait_group_online(g, Duration::from_secs(90));
    }

    /// Waits until `ferry cluster status` on every running node shows all nodes online
    /// and quorum.
    pub fn wait_all_online(&self, timeout: Duration) {
        self.wait_group_online(0, timeout);
    }

    /// [`TestCluster::wait_all_online`] for cluster number `g`.
    pub fn wait_group_online(&self, g: usize, timeout: Duration) {
        let range = self.groups[g].0.clone();
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.nodes[range.clone()].iter().all(|n| {
                let r = n.host.ferry(&["--output", "json", "cluster", "status"]);
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.stdout) else {
                    return false;
                };
                v["quorate"] == true
                    && v["nodes"]
                        .as_array()
                        .is_some_and(|a| a.iter().all(|n| n["online"] == true))
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not come up in {timeout:?}:\n{}",
                self.on(range.start + 1, &["crm_mon", "-1"])
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Connects this machine's own network namespace to the cluster network (a veth on
    /// the nodes' bridge, address `.254`), so that processes of the test (a console, the
    /// CLI over TLS) reach the nodes' TLS APIs. Returns the address given to this side.
    pub fn reach_from_host(&self) -> String {
        let subnet = self.nodes[0]
            .address
            .rsplit_once('.')
            .map(|(net, _)| net.to_owned())
            .expect("node address");
        let ip = format!("{subnet}.254");
        sh(&format!(
            "ip link add {p}-h type veth peer name sw-h netns {p}-sw
             ip -n {p}-sw link set sw-h master br0 up
             ip addr add {ip}/24 dev {p}-h; ip link set {p}-h up",
            p = self.prefix
        ));
        ip
    }

    /// `https://ADDR:PORT`, certificate fingerprint and API token of node `name`'s ferryd
    /// (reachable after [`TestCluster::reach_from_host`]).
    pub fn node_credentials(&self, name: &str) -> (String, String, String) {
        let n = self.node(name);
        let (token, fp) = n.host.credentials();
        (format!("https://{}", n.host.tls_addr), fp, token)
    }

    /// `ferry --output json cluster status` asked on node `name`.
    pub fn status(&self, name: &str) -> serde_json::Value {
        self.node(name).host.ferry_json(&["cluster", "status"])
    }

    /// Pids of every process of node `i`'s network namespace.
    pub fn node_pids(&self, i: usize) -> Vec<u32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &format!("{}-n{i}", self.prefix)])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The nodes on which a QEMU process of VM `vm` runs now (ground truth from /proc,
    /// not from the cluster).
    pub fn qemu_nodes(&self, vm: &str) -> Vec<String> {
        let needle = format!("{}/vms/{vm}/", self.shared.display());
        let mut out = Vec::new();
        for n in &self.nodes {
            let here = self.node_pids(n.index).into_iter().any(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| {
                        let c = String::from_utf8_lossy(&c);
                        c.contains("qemu-system") && c.contains(&needle)
                    })
                    .unwrap_or(false)
                    && crate::host::pid_alive(p)
            });
            if here {
                out.push(n.name.clone());
            }
        }
        out
    }

    /// Power loss of node `name`: SIGKILL every process of its namespace (corosync,
    /// pacemaker, ferryd, QEMU).
    pub fn crash(&mut self, name: &str) {
        let i = self.node(name).index;
        for _ in 0..20 {
            let pids = self.node_pids(i);
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill(2) on a process of this test's own namespace.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(self.node_pids(i).is_empty(), "{name} still has processes");
        // A machine without power answers nothing on the network: not even a reset, nor
        // for an address it held (the Broker's, which a survivor takes over).
        sh(&format!("ip -n {}-n{i} link set eth0 down", self.prefix));
        self.node_mut(name).host.reap();
    }

    /// Cuts node `name` off the cluster network (or reconnects it).
    pub fn set_link(&self, name: &str, up: bool) {
        let i = self.node(name).index;
        sh(&format!(
            "ip -n {}-sw link set sw-n{i} {}",
            self.prefix,
            if up { "up" } else { "down" }
        ));
    }

    /// Boots node `name` again after a crash or fencing: fresh /run, ferryd (which starts
    /// its cluster stack), and waits until the cluster is whole again.
    pub fn reboot(&mut self, name: &str) {
        let i = self.node(name).index;
        assert!(self.node_pids(i).is_empty(), "{name} is still running");
        self.node_mut(name).host.reap();
        // Boots with its own address only (a floating address it held is gone) and its
        // network up.
        let address = self.node(name).address.clone();
        sh(&format!(
            "ip -n {p}-n{i} addr flush dev eth0 && ip -n {p}-n{i} addr add {address}/24 dev eth0 && ip -n {p}-n{i} link set eth0 up",
            p = self.prefix
        ));
        self.fresh_run(i);
        self.node_mut(name).host.launch();
        let g = self
            .groups
            .iter()
            .position(|(r, _)| r.contains(&(i - 1)))
            .expect("a cluster node");
        self.wait_group_online(g, Duration::from_secs(90));
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!(
                    "--- {}: crm_mon ---\n{}",
                    n.name,
                    self.on(n.index, &["crm_mon", "-1", "--include=fencing"])
                );
                let log = self
                    .work
                    .path()
                    .join(format!("node{}/log-pacemaker/pacemaker.log", n.index));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                eprintln!(
                    "--- {}: pacemaker.log (last 25 lines, newest first) ---\n{}",
                    n.name,
                    tail.join("\n")
                );
            }
        }
        for n in &mut self.nodes {
            for _ in 0..20 {
                let pids = {
                    let out = Command::new("ip")
                        .args(["netns", "pids", &format!("{}-n{}", self.prefix, n.index)])
                        .output();
                    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default()
                };
                if pids.trim().is_empty() {
                    break;
                }
                for p in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill(2) on a process of this test's own namespace.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            n.host.reap();
        }
        let w = self.work.path().display().to_string();
        let mut script = String::new();
        for n in &self.nodes {
            script.push_str(&format!(
                "umount {w}/ns/n{i}.mnt 2>/dev/null || true; umount {w}/ns/n{i}.uts 2>/dev/null || true; ip netns del {p}-n{i} 2>/dev/null || true\n",
                i = n.index,
                p = self.prefix
            ));
        }
        script.push_str(&format!(
            "ip link del {p}-h 2>/dev/null || true\nip netns del {p}-sw 2>/dev/null || true\nwhile mountpoint -q {w}/ns; do umount {w}/ns || break; done\n",
            p = self.prefix
        ));
        let _ = Command::new("sh").arg("-c").arg(&script).status();
    }
}
