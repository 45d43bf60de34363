//! Corosync's configuration and key on this node, Pacemaker's first CIB, and starting and
//! stopping the stack. Under systemd the stack runs as its units (`systemctl start corosync
//! pacemaker`); without systemd (a container, a test's network namespace) the daemons are
//! started detached in ferryd's namespaces, as systemd would.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::pacemaker;
use crate::shared::{write_atomic, write_atomic_mode, ClusterConfig, SharedDir};
use crate::ClusterError;

/// Corosync's configuration directory.
pub const COROSYNC_DIR: &str = "/etc/corosync";
/// Pacemaker's CIB directory.
pub const CIB_DIR: &str = "/var/lib/pacemaker/cib";

/// `corosync.conf` for the cluster: knet with encryption (the shared authkey), every node
/// in the nodelist, votequorum.
pub fn corosync_conf(cfg: &ClusterConfig) -> String {
    let mut s = format!(
        "# Written by Ferry (ferry cluster create/join) from the cluster's configuration.\n\
         totem {{\n    version: 2\n    cluster_name: {}\n    transport: knet\n    crypto_cipher: aes256\n    crypto_hash: sha256\n    token: {}\n}}\nnodelist {{\n",
        cfg.name, cfg.token_ms
    );
    for (i, n) in cfg.nodes.iter().enumerate() {
        s.push_str(&format!(
            "    node {{\n        ring0_addr: {}\n        name: {}\n        nodeid: {}\n    }}\n",
            n.address,
            n.name,
            i + 1
        ));
    }
    s.push_str(
        "}\nquorum {\n    provider: corosync_votequorum\n}\nlogging {\n    to_logfile: yes\n    logfile: /var/log/corosync/corosync.log\n    to_syslog: no\n    to_stderr: no\n    timestamp: on\n}\n",
    );
    s
}

/// Writes this node's Corosync files and, the first time, Pacemaker's CIB.
pub fn configure_node(shared: &SharedDir, cfg: &ClusterConfig) -> Result<(), ClusterError> {
    require_tools()?;
    let dir = Path::new(COROSYNC_DIR);
    std::fs::create_dir_all(dir).map_err(|e| ClusterError::io("create", dir, e))?;
    write_atomic(&dir.join("corosync.conf"), corosync_conf(cfg).as_bytes())?;
    let key = std::fs::read(shared.authkey_path())
        .map_err(|e| ClusterError::io("read", &shared.authkey_path(), e))?;
    write_atomic_mode(&dir.join("authkey"), &key, 0o400)?;
    // A CIB left by another cluster would win the first sync with its higher epoch (its
    // resources back): a node seeds a fresh one for each cluster it joins.
    let cib = Path::new(CIB_DIR).join("cib.xml");
    let marker = Path::new(CIB_DIR).join("ferry-cluster");
    let seeded_for = std::fs::read_to_string(&marker).unwrap_or_default();
    if !cib.exists() || seeded_for.trim() != cfg.name {
        if let Ok(rd) = std::fs::read_dir(CIB_DIR) {
            for ent in rd.flatten() {
                if ent.file_name().to_string_lossy().starts_with("cib") {
                    let _ = std::fs::remove_file(ent.path());
                }
            }
        }
        seed_cib(&cib, cfg)?;
        write_atomic(&marker, cfg.name.as_bytes())?;
    }
    Ok(())
}

/// The first CIB: cluster options and the fence devices, so the first DC election does not
/// wait Pacemaker's default 20 s and no VM ever starts before fencing is configured.
fn seed_cib(cib: &Path, cfg: &ClusterConfig) -> Result<(), ClusterError> {
    let dir = cib.parent().expect("cib.xml has a parent");
    std::fs::create_dir_all(dir).map_err(|e| ClusterError::io("create", dir, e))?;
    let tmp = dir.join("cib.xml.ferry-seed");
    let _ = std::fs::remove_file(&tmp);
    let empty = run(Command::new("cibadmin").arg("--empty"))?;
    // 0600 from the start: the fence devices' passwords go in.
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(empty.as_bytes()))
            .map_err(|e| ClusterError::io("write", &tmp, e))?;
    }
    for (name, value) in pacemaker::CLUSTER_PROPERTIES {
        run(Command::new("crm_attribute").env("CIB_file", &tmp).args([
            "-t",
            "crm_config",
            "-n",
            name,
            "-v",
            value,
        ]))?;
    }
    for (i, dev) in cfg.fence.iter().enumerate() {
        run(Command::new("cibadmin")
            .env("CIB_file", &tmp)
            .args(["-C", "-o", "resources", "-X"])
            .arg(pacemaker::fence_device_xml(i, dev, cfg)))?;
    }
    run(Command::new("chown").arg("hacluster:haclient").arg(&tmp))?;
    set_mode(&tmp, 0o600)?;
    std::fs::rename(&tmp, cib).map_err(|e| ClusterError::io("write", cib, e))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ClusterError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ClusterError::io("chmod", path, e))
}

/// Refuses early when the stack is not installed.
pub fn require_tools() -> Result<(), ClusterError> {
    for tool in [
        "corosync",
        "pacemakerd",
        "crm_mon",
        "cibadmin",
        "crm_attribute",
    ] {
        if which(tool).is_none() {
            return Err(ClusterError::Missing(format!(
                "{tool} is not installed; install the cluster stack: apt-get install corosync pacemaker pacemaker-cli-utils"
            )));
        }
    }
    Ok(())
}

/// The program `name` on the PATH (or in /usr/sbin, where the daemons live).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

fn systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Processes named `comm` in this process's network and mount namespaces (another test
/// node's daemons on the same kernel are not ours).
pub fn running_here(comm: &str) -> Vec<u32> {
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    let (my_net, my_mnt) = (ns("self", "net"), ns("self", "mnt"));
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for ent in rd.flatten() {
        let pid = ent.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if c.trim() == comm && ns(&pid, "net") == my_net && ns(&pid, "mnt") == my_mnt {
            out.extend(pid.parse::<u32>().ok());
        }
    }
    out
}

/// Processes named `comm` in this process's namespaces whose command line holds `needle`.
pub fn processes_here(comm: &str, needle: &str) -> Vec<u32> {
    running_here(comm)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Starts Corosync, waits until it answers, then Pacemaker; nothing if they run.
pub fn start_stack() -> Result<(), ClusterError> {
    require_tools()?;
    if systemd() {
        run(Command::new("systemctl").args(["start", "corosync", "pacemaker"]))?;
        return Ok(());
    }
    for d in [
        "/run/crm",
        "/run/resource-agents",
        "/var/log/pacemaker",
        "/var/log/corosync",
    ] {
        let _ = std::fs::create_dir_all(d);
    }
    let _ = Command::new("chown")
        .args(["hacluster:haclient", "/run/crm", "/var/log/pacemaker"])
        .status();
    if running_here("corosync").is_empty() {
        spawn_detached(
            Command::new("corosync").arg("-f"),
            "/var/log/corosync/corosync.out",
        )?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = Command::new("corosync-cfgtool")
            .arg("-s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if up {
            break;
        }
        if Instant::now() > deadline {
            return Err(ClusterError::Tool(
                "corosync did not start in 20 s; see /var/log/corosync/corosync.log".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if running_here("pacemakerd").is_empty() {
        spawn_detached(
            Command::new("pacemakerd")
                .env("PCMK_logfacility", "none")
                .env("PCMK_logfile", "/var/log/pacemaker/pacemaker.log"),
            "/var/log/pacemaker/pacemakerd.out",
        )?;
    }
    Ok(())
}

/// Stops Pacemaker (which first moves or stops this node's resources) and Corosync.
pub fn stop_stack(timeout: Duration) -> Result<(), ClusterError> {
    if systemd() {
        run(Command::new("systemctl").args(["stop", "pacemaker", "corosync"]))?;
        return Ok(());
    }
    for (comm, prefix) in [("pacemakerd", "pacemaker"), ("corosync", "corosync")] {
        for pid in running_here(comm) {
            // SAFETY: kill(2) on a pid just read from /proc.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + timeout;
        while !running_like(prefix).is_empty() {
            if Instant::now() > deadline {
                return Err(ClusterError::Tool(format!(
                    "{comm} did not stop in {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn running_like(prefix: &str) -> Vec<u32> {
    [
        "pacemakerd",
        "pacemaker-based",
        "pacemaker-fenced",
        "pacemaker-execd",
        "pacemaker-attrd",
        "pacemaker-schedulerd",
        "pacemaker-controld",
        "corosync",
    ]
    .iter()
    .filter(|c| c.starts_with(prefix))
    .flat_map(|c| running_here(c))
    .collect()
}

/// Starts `cmd` in its own session, not a child of the caller (`setsid -f` forks): the stack
/// outlives ferryd, as it would under systemd.
pub fn spawn_detached(cmd: &mut Command, log: &str) -> Result<(), ClusterError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| ClusterError::io("open", Path::new(log), e))?;
    let program = cmd.get_program().to_owned();
    let mut setsid = Command::new("setsid");
    setsid.arg("-f").arg(&program).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            setsid.env(k, v);
        }
    }
    let status = setsid
        .stdin(Stdio::null())
        .stdout(
            out.try_clone()
                .map_err(|e| ClusterError::io("open", Path::new(log), e))?,
        )
        .stderr(out)
        .status()
        .map_err(|e| ClusterError::Tool(format!("cannot start {program:?}: {e}")))?;
    if !status.success() {
        return Err(ClusterError::Tool(format!(
            "cannot start {program:?}: {status}"
        )));
    }
    Ok(())
}

/// Runs a cluster tool; its stdout, or its stderr's last line as the error.
pub(crate) fn run(cmd: &mut Command) -> Result<String, ClusterError> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClusterError::Missing(format!("cannot run {name}: {e}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim();
    Err(ClusterError::Tool(format!("{name} failed: {line}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api_types::cluster::{FenceDeviceSpec, NodeSpec};

    #[test]
    fn corosync_conf_lists_every_node_with_its_id() {
        let cfg = ClusterConfig {
            name: "c1".into(),
            nodes: (1..=3)
                .map(|i| NodeSpec {
                    name: format!("node{i}"),
                    address: format!("10.0.0.{i}"),
                })
                .collect(),
            fence: vec![FenceDeviceSpec {
                agent: "fence_sbd".into(),
                node: None,
                options: Default::default(),
            }],
            token_ms: 1000,
        };
        let conf = corosync_conf(&cfg);
        assert!(conf.contains("cluster_name: c1"));
        assert!(conf.contains("token: 1000"));
        assert!(conf.contains("ring0_addr: 10.0.0.3\n        name: node3\n        nodeid: 3"));
        assert!(conf.contains("crypto_cipher: aes256"));
    }
}
