//! ferryd's configuration file (TOML): parsed into a raw struct that refuses unknown keys,
//! then validated into [`Config`] with defaults filled in.
//!
//! ```toml
//! name = "host-a"                       # shown to other hosts; default: the hostname
//! data_dir = "/var/lib/ferry"           # database, certificate, token, runtime sockets
//! vm_storage = "/var/lib/ferry/vms"     # VM disks; default: <data_dir>/vms
//! admin_socket = "/run/ferry/ferryd.sock"
//! tls_listen = "0.0.0.0:7443"           # remote admin API (token auth)
//! default_bridge = "br0"                # NICs with no bridge named attach here
//! accel = "auto"                        # auto | kvm | tcg
//! qemu_binary = "qemu-system-x86_64"
//! qemu_img = "qemu-img"
//! firmware_dir = "/usr/share/OVMF"     # OVMF_CODE_4M*.fd, OVMF_VARS_4M*.fd (Debian's ovmf)
//! replication_bandwidth_limit = "50M"  # bytes/s for all outgoing replication
//! replication_bandwidth_schedule = ["08:00-18:00=10M", "22:00-06:00=unlimited"]
//! file_roots = ["/srv/ferry"]          # the only folders the API reads or writes files in
//! failover_ip_wait_s = 600             # how long a failed-over guest has to answer its agent
//! broker_for = "/srv/cluster"          # this ferryd is the Replica Broker of that cluster
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferry_domain::replication::BandwidthWindow;
use serde::Deserialize;

/// Which accelerator VMs get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM if a bounded test boot under KVM succeeds, else TCG.
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// The file as written; every key optional except the data dir.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// The host's name, shown to other hosts and in the console.
    name: Option<String>,
    /// Where ferryd keeps its database, certificate, token and runtime sockets.
    data_dir: PathBuf,
    /// Where VM disks live (one directory per VM).
    vm_storage: Option<PathBuf>,
    /// The admin API's unix socket.
    admin_socket: Option<PathBuf>,
    /// The TLS API's listen address.
    tls_listen: Option<String>,
    /// The bridge for NICs created without one.
    default_bridge: Option<String>,
    /// `auto`, `kvm` or `tcg`.
    #[serde(default)]
    accel: AccelChoice,
    /// The QEMU system emulator.
    qemu_binary: Option<PathBuf>,
    /// qemu-img.
    qemu_img: Option<PathBuf>,
    /// Where the UEFI firmware (OVMF) files are.
    firmware_dir: Option<PathBuf>,
    /// Host-wide limit on outgoing replication traffic, e.g. `"100M"` (bytes/s).
    replication_bandwidth_limit: Option<String>,
    /// Time-of-day windows overriding it, e.g. `["08:00-18:00=10M"]`.
    #[serde(default)]
    replication_bandwidth_schedule: Vec<String>,
    /// The folders API requests may name files in (images, ISOs, kernels, imports,
    /// exports); default [`DEFAULT_FILE_ROOTS`] and the VM storage.
    file_roots: Option<Vec<PathBuf>>,
    /// Seconds a failed-over guest has to boot until its agent answers, for re-IP.
    failover_ip_wait_s: Option<u64>,
    /// The shared directory of the cluster whose Replica Broker this ferryd is (written by
    /// `ferry replica-broker set`).
    broker_for: Option<PathBuf>,
}

/// Where the API may read and write files when the config does not say: the API token is
/// root on the host, and must not reach /etc, /root or other hosts' secrets through an
/// import or export path.
pub const DEFAULT_FILE_ROOTS: [&str; 4] = ["/srv", "/var/lib/ferry", "/media", "/mnt"];

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The host's name.
    pub name: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// VM storage directory.
    pub vm_storage: PathBuf,
    /// Admin unix socket.
    pub admin_socket: PathBuf,
    /// TLS listen address.
    pub tls_listen: SocketAddr,
    /// Default bridge.
    pub default_bridge: Option<String>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// QEMU binary.
    pub qemu_binary: PathBuf,
    /// qemu-img binary.
    pub qemu_img: PathBuf,
    /// Directory of the OVMF firmware files.
    pub firmware_dir: PathBuf,
    /// Host-wide outgoing replication limit, bytes/s.
    pub replication_bandwidth_limit: Option<u64>,
    /// Time-of-day windows overriding the host-wide limit (local time).
    pub replication_bandwidth_schedule: Vec<BandwidthWindow>,
    /// The folders API requests may name files in.
    pub file_roots: Vec<PathBuf>,
    /// How long a failed-over guest has to boot until its agent answers, for re-IP.
    pub failover_ip_wait: std::time::Duration,
    /// This ferryd is the Replica Broker of the cluster on this shared directory: it places
    /// replica VMs on the cluster's nodes and redirects primaries there.
    pub broker_for: Option<PathBuf>,
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message, on one line.
        message: String,
    },
    /// A value is not acceptable.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// `path` (absolute), resolved through symlinks and `..`, if it lies in one of
    /// [`Config::file_roots`]; else why not, in one line. A path that does not exist yet (an
    /// export target) is judged by its nearest existing ancestor.
    pub fn allowed_path(&self, what: &str, path: &Path) -> Result<PathBuf, String> {
        if !path.is_absolute() {
            return Err(format!(
                "{what} {} must be an absolute path",
                path.display()
            ));
        }
        let mut existing = path.to_path_buf();
        let mut rest = Vec::new();
        let resolved = loop {
            match std::fs::canonicalize(&existing) {
                Ok(c) => break c,
                Err(_) => match (existing.file_name(), existing.parent()) {
                    (Some(name), Some(parent)) => {
                        rest.push(name.to_owned());
                        existing = parent.to_path_buf();
                    }
                    _ => return Err(format!("{what} {} cannot be resolved", path.display())),
                },
            }
        };
        if rest.iter().any(|c| c == ".." || c == ".") {
            return Err(format!(
                "{what} {} must not contain . or ..",
                path.display()
            ));
        }
        let full = rest.iter().rev().fold(resolved, |p, c| p.join(c));
        let inside = self.file_roots.iter().any(|root| {
            let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
            full.starts_with(&root)
        });
        if !inside {
            let roots: Vec<String> = self
                .file_roots
                .iter()
                .map(|r| r.display().to_string())
                .collect();
            return Err(format!(
                "{what} {} is outside the folders this host lets the API use ({}): move it there, or add its folder to file_roots in ferryd's config",
                path.display(),
                roots.join(", ")
            ));
        }
        Ok(full)
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: one_line(&e.to_string()),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        };
        let absolute = |key: &str, p: &Path| {
            if p.is_absolute() {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{key} must be an absolute path, got {:?}",
                    p
                )))
            }
        };
        absolute("data_dir", &raw.data_dir)?;
        let vm_storage = raw.vm_storage.unwrap_or_else(|| raw.data_dir.join("vms"));
        absolute("vm_storage", &vm_storage)?;
        let admin_socket = raw
            .admin_socket
            .unwrap_or_else(|| PathBuf::from("/run/ferry/ferryd.sock"));
        absolute("admin_socket", &admin_socket)?;
        let tls_listen = raw.tls_listen.as_deref().unwrap_or("0.0.0.0:7443");
        let tls_listen: SocketAddr = tls_listen.parse().map_err(|_| {
            invalid(format!(
                "tls_listen {tls_listen:?} is not an address:port such as 0.0.0.0:7443"
            ))
        })?;
        if let Some(br) = &raw.default_bridge {
            if !ferry_domain::spec::is_valid_ifname(br) {
                return Err(invalid(format!(
                    "default_bridge {br:?} is not a valid interface name"
                )));
            }
        }
        let name = match raw.name {
            Some(n) => n,
            None => hostname(),
        };
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(format!(
                "name {name:?} must be 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        let replication_bandwidth_limit = match &raw.replication_bandwidth_limit {
            None => None,
            Some(s) => match ferry_domain::parse_size(s) {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(invalid(format!(
                        "replication_bandwidth_limit {s:?} is not a rate such as \"50M\" (bytes per second)"
                    )))
                }
            },
        };
        let replication_bandwidth_schedule = raw
            .replication_bandwidth_schedule
            .iter()
            .map(|w| w.parse::<BandwidthWindow>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("replication_bandwidth_schedule: {e}")))?;
        let mut file_roots = raw
            .file_roots
            .unwrap_or_else(|| DEFAULT_FILE_ROOTS.iter().map(PathBuf::from).collect());
        for r in &file_roots {
            absolute("file_roots", r)?;
        }
        file_roots.push(vm_storage.clone());
        let failover_ip_wait = match raw.failover_ip_wait_s {
            Some(0) => return Err(invalid("failover_ip_wait_s must be at least 1".into())),
            // TCG boots of a real distribution take minutes on a loaded host.
            s => std::time::Duration::from_secs(s.unwrap_or(600)),
        };
        if let Some(b) = &raw.broker_for {
            absolute("broker_for", b)?;
        }
        Ok(Self {
            broker_for: raw.broker_for,
            failover_ip_wait,
            file_roots,
            replication_bandwidth_limit,
            replication_bandwidth_schedule,
            name,
            data_dir: raw.data_dir,
            vm_storage,
            admin_socket,
            tls_listen,
            default_bridge: raw.default_bridge,
            accel: raw.accel,
            qemu_binary: raw
                .qemu_binary
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            qemu_img: raw.qemu_img.unwrap_or_else(|| PathBuf::from("qemu-img")),
            firmware_dir: raw
                .firmware_dir
                .unwrap_or_else(|| PathBuf::from("/usr/share/OVMF")),
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| matches!(c, '|' | '^' | ' ')))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse("data_dir = \"/var/lib/ferry\"\nname = \"a\"", "t").unwrap();
        assert_eq!(c.vm_storage, PathBuf::from("/var/lib/ferry/vms"));
        assert_eq!(c.admin_socket, PathBuf::from("/run/ferry/ferryd.sock"));
        assert_eq!(c.tls_listen.to_string(), "0.0.0.0:7443");
        assert_eq!(c.accel, AccelChoice::Auto);
        assert_eq!(c.default_bridge, None);
    }

    #[test]
    fn full_config_parses() {
        let c = Config::parse(
            r#"
            name = "host-b"
            data_dir = "/d"
            vm_storage = "/s"
            admin_socket = "/d/sock"
            tls_listen = "127.0.0.2:7443"
            default_bridge = "br0"
            accel = "tcg"
            qemu_binary = "/usr/bin/qemu-system-x86_64"
            qemu_img = "/usr/bin/qemu-img"
            "#,
            "t",
        )
        .unwrap();
        assert_eq!(
            (c.name.as_str(), c.accel, c.default_bridge.as_deref()),
            ("host-b", AccelChoice::Tcg, Some("br0"))
        );
    }

    #[test]
    fn bandwidth_schedule_parses() {
        let c = Config::parse(
            "data_dir = \"/d\"\nreplication_bandwidth_limit = \"50M\"\nreplication_bandwidth_schedule = [\"08:00-18:00=10M\", \"22:00-06:00=unlimited\"]",
            "t",
        )
        .unwrap();
        assert_eq!(c.replication_bandwidth_limit, Some(50 << 20));
        assert_eq!(c.replication_bandwidth_schedule.len(), 2);
        assert_eq!(c.replication_bandwidth_schedule[1].limit, 0);
    }

    #[test]
    fn bad_configs_are_refused_with_one_line() {
        let cases = [
            ("data_dir = \"/d\"\nbogus = 1", "unknown field `bogus`"),
            ("data_dir = \"rel\"", "data_dir must be an absolute path"),
            ("data_dir = \"/d\"\ntls_listen = \"nope\"", "tls_listen"),
            (
                "data_dir = \"/d\"\naccel = \"xen\"",
                "unknown variant `xen`",
            ),
            (
                "data_dir = \"/d\"\ndefault_bridge = \"a/b\"",
                "default_bridge",
            ),
            ("name = \"x\"", "missing field `data_dir`"),
            ("data_dir = \"/d\"\nname = \"a b\"", "name"),
            ("data_dir = [", "config file t"),
            (
                "data_dir = \"/d\"\nreplication_bandwidth_schedule = [\"8-18=1M\"]",
                "replication_bandwidth_schedule: \"8-18=1M\" is not a schedule window",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(text, "t").unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
