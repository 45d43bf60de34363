//! The hosts this CLI knows by name (`ferry host add`), stored as JSON in
//! `$FERRY_HOSTS_FILE` or `~/.config/ferry/hosts.json` (mode 0600: it holds tokens).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context};
use ferry_client::{normalize_fingerprint, Endpoint};
use serde::{Deserialize, Serialize};

use crate::output::Output;

/// One remembered host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnownHost {
    /// https://ADDR:PORT.
    pub url: String,
    /// Pinned certificate fingerprint.
    pub fingerprint: String,
    /// API token.
    pub token: String,
}

/// The hosts file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Hosts {
    /// Hosts by name.
    pub hosts: BTreeMap<String, KnownHost>,
}

/// What `ferry host …` asked for.
pub enum HostAction {
    /// List.
    List,
    /// Add or replace.
    Add {
        /// Name.
        name: String,
        /// URL.
        url: String,
        /// Fingerprint.
        fingerprint: String,
        /// Token.
        token: String,
    },
    /// Remove.
    Remove {
        /// Name.
        name: String,
    },
}

fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_HOSTS_FILE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".config/ferry/hosts.json")
}

/// Reads the hosts file (empty if there is none).
pub fn load() -> anyhow::Result<Hosts> {
    let p = path();
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid hosts file", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Hosts::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

impl Hosts {
    /// The endpoint of a named host.
    pub fn endpoint(&self, name: &str) -> anyhow::Result<Endpoint> {
        let Some(h) = self.hosts.get(name) else {
            bail!("unknown host {name:?}: add it with `ferry host add {name} https://ADDR:PORT --fingerprint F --token T`, or pass a URL or socket path");
        };
        Ok(Endpoint::Tls {
            addr: h
                .url
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_owned(),
            fingerprint: h.fingerprint.clone(),
            token: h.token.clone(),
        })
    }

    fn save(&self) -> anyhow::Result<()> {
        let p = path();
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = p.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }
}

/// Runs a `ferry host` command.
pub fn run(action: HostAction, out: &Output) -> anyhow::Result<()> {
    let mut hosts = load()?;
    match action {
        HostAction::List => {
            let view: BTreeMap<_, _> = hosts
                .hosts
                .iter()
                .map(|(n, h)| {
                    (
                        n.clone(),
                        serde_json::json!({"url": h.url, "fingerprint": h.fingerprint}),
                    )
                })
                .collect();
            out.hosts(&view);
        }
        HostAction::Add {
            name,
            url,
            fingerprint,
            token,
        } => {
            if name.is_empty() || name.starts_with("https://") || name.starts_with('/') {
                bail!("host name {name:?} must be a short name, not a URL or path");
            }
            if !url.starts_with("https://") {
                bail!("host URL {url:?} must start with https://");
            }
            let fp = normalize_fingerprint(&fingerprint);
            if fp.len() != 32 * 3 - 1 {
                bail!("fingerprint {fingerprint:?} is not a SHA-256 fingerprint (32 hex bytes)");
            }
            hosts.hosts.insert(
                name.clone(),
                KnownHost {
                    url,
                    fingerprint: fp,
                    token,
                },
            );
            hosts.save()?;
            out.message(&format!("host {name} added"));
        }
        HostAction::Remove { name } => {
            if hosts.hosts.remove(&name).is_none() {
                bail!("unknown host {name:?}; `ferry host list` shows the known hosts");
            }
            hosts.save()?;
            out.message(&format!("host {name} removed"));
        }
    }
    Ok(())
}
