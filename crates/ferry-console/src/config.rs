//! The console's config file (TOML): where it listens, where its store lives, how often it
//! polls the hosts, and how users are authenticated. Hosts, alert channels and alert
//! rules are not here: they are edited in the console and kept in its store (with the
//! secrets they need), so one place holds them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The file as written; validated into [`Config`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Address of the web console (HTTP; put a TLS reverse proxy in front, or listen on
    /// loopback).
    listen: String,
    /// Directory of the console's store (`console.db`).
    data_dir: PathBuf,
    /// Seconds between two polls of every host (default 10).
    poll_interval_s: Option<u64>,
    /// Where noVNC's ES modules are (`core/`, `vendor/`): Debian's `novnc` package.
    novnc_dir: Option<PathBuf>,
    /// How users are authenticated.
    #[serde(default)]
    auth: RawAuth,
    /// The URL users reach the console at (`https://…` when a TLS proxy serves it): the
    /// session cookie is then marked `Secure`.
    public_url: Option<String>,
    /// Addresses of the reverse proxies in front of the console: only they may pass the
    /// user header (proxy mode), `X-Forwarded-Proto` and `X-Forwarded-For`. Empty: the
    /// console's own loopback peers.
    #[serde(default)]
    trusted_proxies: Vec<String>,
    /// Internal networks (`IP` or `IP/PREFIX`) a webhook may target; every other loopback,
    /// link-local, private or reserved address is refused.
    #[serde(default)]
    webhook_allow: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    /// `password` (default): users log in with a name and password (argon2id-hashed).
    /// `proxy_header`: a reverse proxy authenticates and passes the user in `header`.
    mode: Option<AuthModeName>,
    /// The header carrying the authenticated user name (proxy mode).
    header: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum AuthModeName {
    Password,
    ProxyHeader,
}

/// How the console knows who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Login form, sessions in the store.
    Password,
    /// A trusted reverse proxy sets this header to the user's name; requests without it
    /// are refused. The console must then be reachable only through that proxy.
    ProxyHeader(String),
}

/// Where Debian's `novnc` package installs noVNC.
pub const DEFAULT_NOVNC_DIR: &str = "/usr/share/novnc";

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the web console listens.
    pub listen: SocketAddr,
    /// The store's directory.
    pub data_dir: PathBuf,
    /// Time between polls.
    pub poll_interval: Duration,
    /// noVNC's files, served to the Connect view.
    pub novnc_dir: PathBuf,
    /// Authentication.
    pub auth: AuthMode,
    /// Whether users reach the console over https (`public_url` starts with `https://`):
    /// the session cookie is then `Secure`.
    pub https: bool,
    /// Peers trusted to pass the proxy headers; empty means loopback peers.
    pub trusted_proxies: Vec<IpAddr>,
    /// Internal networks webhooks may target.
    pub webhook_allow: Vec<Net>,
}

/// An IP network, `IP/PREFIX` (a bare IP is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// Parses `IP` or `IP/PREFIX`; the error is one line.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: use IP or IP/PREFIX");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr = ip.parse::<IpAddr>().map_err(|_| bad())?.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A config that cannot be used, with the reason in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML or unknown fields.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's one-line message.
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: p, message },
            ConfigError::Invalid { message, .. } => ConfigError::Invalid { path: p, message },
            other => other,
        })
    }

    /// Parses and validates the text of a config file.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            message: e.message().to_owned(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: String::new(),
            message,
        };
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|_| invalid(format!("listen = {:?}: use IP:PORT", raw.listen)))?;
        if !raw.data_dir.is_absolute() {
            return Err(invalid(format!(
                "data_dir = {:?}: use an absolute path",
                raw.data_dir.display().to_string()
            )));
        }
        let poll = raw.poll_interval_s.unwrap_or(10);
        if !(1..=3600).contains(&poll) {
            return Err(invalid(format!(
                "poll_interval_s = {poll}: use 1 to 3600 seconds"
            )));
        }
        let auth =
            match (
                raw.auth.mode.unwrap_or(AuthModeName::Password),
                raw.auth.header,
            ) {
                (AuthModeName::Password, None) => AuthMode::Password,
                (AuthModeName::Password, Some(_)) => {
                    return Err(invalid(
                        "auth.header is only for auth.mode = \"proxy_header\"".into(),
                    ))
                }
                (AuthModeName::ProxyHeader, Some(h)) if valid_header_name(&h) => {
                    AuthMode::ProxyHeader(h.to_ascii_lowercase())
                }
                (AuthModeName::ProxyHeader, Some(h)) => {
                    return Err(invalid(format!("auth.header = {h:?}: not a header name")))
                }
                (AuthModeName::ProxyHeader, None) => return Err(invalid(
                    "auth.mode = \"proxy_header\" needs auth.header (e.g. \"X-Forwarded-User\")"
                        .into(),
                )),
            };
        let https = match raw.public_url.as_deref() {
            None => false,
            Some(u) if u.starts_with("https://") && u.len() > 8 => true,
            Some(u) if u.starts_with("http://") && u.len() > 7 => false,
            Some(u) => {
                return Err(invalid(format!(
                    "public_url = {u:?}: use https://HOST[:PORT] (or http://)"
                )))
            }
        };
        let mut trusted_proxies = Vec::new();
        for p in &raw.trusted_proxies {
            trusted_proxies.push(
                p.parse::<IpAddr>()
                    .map_err(|_| invalid(format!("trusted_proxies: {p:?} is not an IP address")))?
                    .to_canonical(),
            );
        }
        // Anyone who reaches the console directly could set the user header: header mode
        // needs the console on loopback (behind a local proxy) or a list of the proxies.
        if matches!(auth, AuthMode::ProxyHeader(_))
            && !listen.ip().is_loopback()
            && trusted_proxies.is_empty()
        {
            return Err(invalid(format!(
                "auth.mode = \"proxy_header\" with listen = \"{listen}\" would take the user header from anyone: listen on loopback or set trusted_proxies = [\"PROXY-IP\"]"
            )));
        }
        let mut webhook_allow = Vec::new();
        for n in &raw.webhook_allow {
            webhook_allow.push(Net::parse(n).map_err(|e| invalid(format!("webhook_allow: {e}")))?);
        }
        Ok(Self {
            listen,
            data_dir: raw.data_dir,
            novnc_dir: raw
                .novnc_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_NOVNC_DIR)),
            poll_interval: Duration::from_secs(poll),
            auth,
            https,
            trusted_proxies,
            webhook_allow,
        })
    }
}

impl Config {
    /// Whether `peer` may pass the proxy headers: one of `trusted_proxies`, or with none
    /// listed, a loopback peer (a proxy on this machine).
    pub fn trusted_peer(&self, peer: Option<IpAddr>) -> bool {
        trusted_peer(&self.trusted_proxies, peer)
    }
}

/// See [`Config::trusted_peer`]; an unknown peer is never trusted.
pub fn trusted_peer(trusted: &[IpAddr], peer: Option<IpAddr>) -> bool {
    let Some(peer) = peer.map(|p| p.to_canonical()) else {
        return false;
    };
    if trusted.is_empty() {
        peer.is_loopback()
    } else {
        trusted.contains(&peer)
    }
}

fn valid_header_name(h: &str) -> bool {
    !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_and_proxy_configs() {
        let c = Config::parse("listen = \"127.0.0.1:8080\"\ndata_dir = \"/var/lib/fc\"\n").unwrap();
        assert_eq!(c.auth, AuthMode::Password);
        assert_eq!(c.poll_interval, Duration::from_secs(10));
        let c = Config::parse(
            "listen = \"127.0.0.1:8080\"\ndata_dir = \"/x\"\n[auth]\nmode = \"proxy_header\"\nheader = \"X-Forwarded-User\"\n",
        )
        .unwrap();
        assert_eq!(c.auth, AuthMode::ProxyHeader("x-forwarded-user".into()));
        assert!(!c.https);
        // Header mode on a public address is fine with the proxies listed.
        let c = Config::parse(
            "listen = \"0.0.0.0:8080\"\ndata_dir = \"/x\"\npublic_url = \"https://console.example.org\"\ntrusted_proxies = [\"10.0.0.5\"]\nwebhook_allow = [\"10.1.0.0/16\", \"::1\"]\n[auth]\nmode = \"proxy_header\"\nheader = \"X-Forwarded-User\"\n",
        )
        .unwrap();
        assert!(c.https);
        assert_eq!(
            c.trusted_proxies,
            vec!["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert!(c.webhook_allow[0].contains("10.1.200.3".parse().unwrap()));
        assert!(!c.webhook_allow[0].contains("10.2.0.1".parse().unwrap()));
        assert!(c.webhook_allow[1].contains("::1".parse().unwrap()));
        assert!(!c.webhook_allow[1].contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn only_listed_proxies_or_loopback_are_trusted() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // No list: loopback peers (a proxy on this machine), including v4-mapped ones.
        assert!(trusted_peer(&[], ip("127.0.0.1")));
        assert!(trusted_peer(&[], ip("::ffff:127.0.0.1")));
        assert!(!trusted_peer(&[], ip("10.0.0.5")));
        assert!(!trusted_peer(&[], None));
        // A list: exactly those, loopback included only if listed.
        let list = ["10.0.0.5".parse().unwrap()];
        assert!(trusted_peer(&list, ip("10.0.0.5")));
        assert!(trusted_peer(&list, ip("::ffff:10.0.0.5")));
        assert!(!trusted_peer(&list, ip("10.0.0.6")));
        assert!(!trusted_peer(&list, ip("127.0.0.1")));
        let all = Net::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
    }

    #[test]
    fn bad_configs_get_one_line_errors() {
        for (text, want) in [
            ("listen = \"nope\"\ndata_dir = \"/x\"", "use IP:PORT"),
            ("listen = \"127.0.0.1:1\"\ndata_dir = \"rel\"", "absolute"),
            (
                "listen = \"127.0.0.1:1\"\ndata_dir = \"/x\"\npoll_interval_s = 0",
                "1 to 3600",
            ),
            (
                "listen = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nbogus = 1",
                "unknown field",
            ),
            (
                "listen = \"127.0.0.1:1\"\ndata_dir = \"/x\"\n[auth]\nmode = \"proxy_header\"",
                "needs auth.header",
            ),
            (
                "listen = \"0.0.0.0:1\"\ndata_dir = \"/x\"\n[auth]\nmode = \"proxy_header\"\nheader = \"X-User\"",
                "set trusted_proxies",
            ),
            (
                "listen = \"127.0.0.1:1\"\ndata_dir = \"/x\"\ntrusted_proxies = [\"proxy\"]",
                "not an IP address",
            ),
            (
                "listen = \"127.0.0.1:1\"\ndata_dir = \"/x\"\npublic_url = \"console\"",
                "use https://",
            ),
            (
                "listen = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nwebhook_allow = [\"10.0.0.0/33\"]",
                "use IP or IP/PREFIX",
            ),
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
