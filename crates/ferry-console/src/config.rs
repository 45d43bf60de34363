//! The console's config file (TOML): where it listens, where its store lives, how often it
//! polls the hosts, and how users are authenticated. Hosts, alert channels and alert
//! rules are not here: they are edited in the console and kept in its store (with the
//! secrets they need), so one place holds them.

use std::net::SocketAddr;
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
        Ok(Self {
            listen,
            data_dir: raw.data_dir,
            novnc_dir: raw
                .novnc_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_NOVNC_DIR)),
            poll_interval: Duration::from_secs(poll),
            auth,
        })
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
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
