//! The host's identity: a self-signed certificate and key created at first start (other
//! hosts pin its fingerprint), and the API token that authorizes remote admin over TLS.
//! Files are written temp → fsync → rename, mode 0600, so a crash never leaves half a key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::rand::SecureRandom;

use crate::replication::proto::{from_hex, to_hex};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The host's certificate, key and API token.
pub struct Identity {
    /// The certificate followed by any intermediate CA certificates from `host.crt` (a
    /// certificate issued by an organization's CA, for replica servers that trust the CA).
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key (DER).
    key: PrivateKeyDer<'static>,
    /// SHA-256 fingerprint of the certificate, `AA:BB:…`.
    pub fingerprint: String,
    /// The bearer token for the TLS API.
    pub token: String,
    /// Where the token is stored (shown to the admin).
    pub token_path: PathBuf,
    /// The fingerprint of the certificate being rotated to (`host.next.crt`), announced to
    /// replication partners until the rotation is committed.
    pub next_fingerprint: std::sync::Mutex<Option<String>>,
    /// The data dir the identity lives in.
    pub dir: PathBuf,
}

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file failed.
    #[error("cannot {action} {path}")]
    File {
        /// What we were doing.
        action: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The stored certificate or key is unusable.
    #[error("{path} is not a valid PEM {what}; move it away to have a new one created")]
    BadPem {
        /// The file.
        path: String,
        /// `certificate` or `private key`.
        what: &'static str,
    },
    /// Generating the certificate failed.
    #[error("cannot generate the host certificate")]
    Generate(#[from] rcgen::Error),
    /// The API token file is unsafe to use.
    #[error("{path}: {problem}")]
    Token {
        /// The token file.
        path: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// rustls refused the certificate/key pair.
    #[error("the host certificate and key do not form a usable TLS identity")]
    Tls(#[from] rustls::Error),
}

impl Identity {
    /// Loads the identity from `dir`, creating whatever is missing.
    pub fn load_or_create(dir: &Path, host_name: &str) -> Result<Self, IdentityError> {
        let cert_path = dir.join("host.crt");
        let key_path = dir.join("host.key");
        let token_path = dir.join("api.token");
        if !cert_path.exists() || !key_path.exists() {
            let mut params =
                rcgen::CertificateParams::new(vec!["ferryd".to_owned(), host_name.to_owned()])?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, format!("ferryd {host_name}"));
            let key = rcgen::KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            // Key first: a cert without its key is useless, a key without cert is remade.
            write_secret(&key_path, key.serialize_pem().as_bytes())?;
            write_secret(&cert_path, cert.pem().as_bytes())?;
        }
        if !token_path.exists() {
            let mut bytes = [0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut bytes)
                .expect("system randomness");
            let token = to_hex(&bytes);
            write_secret(&token_path, format!("{token}\n").as_bytes())?;
        }
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| IdentityError::File {
                action: "read",
                path: path.display().to_string(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let bad_cert = || IdentityError::BadPem {
            path: cert_path.display().to_string(),
            what: "certificate",
        };
        let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad_cert())?;
        let cert = chain.first().ok_or_else(bad_cert)?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .ok()
            .flatten()
            .ok_or_else(|| IdentityError::BadPem {
                path: key_path.display().to_string(),
                what: "private key",
            })?;
        let token = String::from_utf8_lossy(&read(&token_path)?)
            .trim()
            .to_owned();
        check_token(&token_path, &token)?;
        let next_fingerprint = std::fs::read(dir.join(NEXT_CERT))
            .ok()
            .and_then(|pem| rustls_pemfile::certs(&mut pem.as_slice()).next()?.ok())
            .map(|c| fingerprint(&c));
        Ok(Self {
            fingerprint: fingerprint(cert),
            next_fingerprint: std::sync::Mutex::new(next_fingerprint),
            dir: dir.to_owned(),
            chain,
            key,
            token,
            token_path,
        })
    }

    /// The private key, for TLS configs.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// A rustls server config presenting this identity.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// The successor certificate and key while a rotation is prepared.
pub const NEXT_CERT: &str = "host.next.crt";
/// See [`NEXT_CERT`].
pub const NEXT_KEY: &str = "host.next.key";

impl Identity {
    /// The successor's fingerprint while a rotation is prepared.
    pub fn next(&self) -> Option<String> {
        self.next_fingerprint.lock().expect("next").clone()
    }

    /// Prepares a certificate rotation: `pem` (certificate chain and key, e.g. issued by
    /// the organization's CA) or a new self-signed certificate with a new key becomes
    /// `host.next.*`; returns its fingerprint.
    pub fn prepare_rotation(
        &self,
        host_name: &str,
        given: Option<(&str, &str)>,
    ) -> Result<String, IdentityError> {
        let bad = |what: &'static str| IdentityError::BadPem {
            path: format!("the given {what}"),
            what,
        };
        let (cert_pem, key_pem) = match given {
            Some((c, k)) => (c.to_owned(), k.to_owned()),
            None => {
                let mut params =
                    rcgen::CertificateParams::new(vec!["ferryd".to_owned(), host_name.to_owned()])?;
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, format!("ferryd {host_name}"));
                let key = rcgen::KeyPair::generate()?;
                let cert = params.self_signed(&key)?;
                (cert.pem(), key.serialize_pem())
            }
        };
        let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("certificate"))?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .ok()
            .flatten()
            .ok_or_else(|| bad("private key"))?;
        let first = chain.first().cloned().ok_or_else(|| bad("certificate"))?;
        // The pair must work as a TLS identity (rustls checks the key against the
        // certificate) before it is written.
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        write_secret(&self.dir.join(NEXT_KEY), key_pem.as_bytes())?;
        write_secret(&self.dir.join(NEXT_CERT), cert_pem.as_bytes())?;
        let fp = fingerprint(&first);
        *self.next_fingerprint.lock().expect("next") = Some(fp.clone());
        Ok(fp)
    }

    /// Commits a prepared rotation: the successor becomes `host.crt`/`host.key`, the
    /// current pair is kept as `host.prev.*`. Takes effect when ferryd starts again.
    pub fn commit_rotation(&self) -> Result<(), IdentityError> {
        let err = |action, path: &Path, source| IdentityError::File {
            action,
            path: path.display().to_string(),
            source,
        };
        for (next, cur, prev) in [
            (NEXT_KEY, "host.key", "host.prev.key"),
            (NEXT_CERT, "host.crt", "host.prev.crt"),
        ] {
            let (next, cur, prev) = (self.dir.join(next), self.dir.join(cur), self.dir.join(prev));
            if !next.exists() {
                return Err(err(
                    "find",
                    &next,
                    std::io::Error::other("no rotation is prepared"),
                ));
            }
            std::fs::copy(&cur, &prev).map_err(|e| err("keep", &prev, e))?;
            std::fs::rename(&next, &cur).map_err(|e| err("install", &cur, e))?;
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("fsync", &self.dir, e))?;
        Ok(())
    }
}

/// The API tokens this host accepts: the current one, and after a rotation the previous
/// one until its grace period ends (so consoles and scripts can be updated without an
/// outage). The previous token is kept only as a SHA-256 hash, in the store, so a restart
/// during the grace period keeps honouring it.
pub struct ApiTokens {
    tokens: std::sync::RwLock<Tokens>,
    path: PathBuf,
}

struct Tokens {
    current: String,
    /// SHA-256 of the previous token, and until when (UNIX s) it is accepted.
    previous: Option<([u8; 32], i64)>,
}

/// Store setting holding the previous token's hash and deadline.
pub const PREVIOUS_TOKEN_KEY: &str = "api_token_previous";

fn sha256(s: &str) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .try_into()
        .expect("32 bytes")
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiTokens {
    /// The current token (from the identity) and the previous one's stored record
    /// (`"HEX:UNTIL"`), if any.
    pub fn new(current: String, path: PathBuf, previous: Option<&str>) -> Self {
        let previous = previous.and_then(|v| {
            let (hex, until) = v.split_once(':')?;
            Some((from_hex(hex)?.try_into().ok()?, until.parse().ok()?))
        });
        Self {
            tokens: std::sync::RwLock::new(Tokens { current, previous }),
            path,
        }
    }

    /// Whether `given` is the current token, or the previous one within its grace period.
    pub fn accepts(&self, given: &str, now: i64) -> bool {
        let t = self.tokens.read().expect("tokens");
        let current = constant_time_eq(given.as_bytes(), t.current.as_bytes());
        let previous = t
            .previous
            .is_some_and(|(hash, until)| now <= until && constant_time_eq(&sha256(given), &hash));
        current | previous
    }

    /// Makes a new token, written to the token file (0600, atomically), keeping the
    /// current one valid until `previous_until`; returns the new token and the record to
    /// store for the previous one.
    pub fn rotate(&self, previous_until: i64) -> Result<(String, String), IdentityError> {
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .expect("system randomness");
        let token = to_hex(&bytes);
        write_secret(&self.path, format!("{token}\n").as_bytes())?;
        let mut t = self.tokens.write().expect("tokens");
        let old = sha256(&t.current);
        t.previous = Some((old, previous_until));
        t.current = token.clone();
        let record = format!("{}:{previous_until}", to_hex(&old));
        Ok((token, record))
    }
}

/// Least length of an API token: it is root on this host over the network.
pub const MIN_TOKEN_LEN: usize = 32;

/// Refuses a token that is short (guessable) or a token file others can read.
fn check_token(path: &Path, token: &str) -> Result<(), IdentityError> {
    let problem = |problem: String| IdentityError::Token {
        path: path.display().to_string(),
        problem,
    };
    if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace()) {
        return Err(problem(format!(
            "the API token is {} characters; it must be at least {MIN_TOKEN_LEN} without spaces (e.g. `openssl rand -hex 32 > {}`), or delete the file to have one made",
            token.len(),
            path.display()
        )));
    }
    let mode = std::fs::metadata(path)
        .map_err(|source| IdentityError::File {
            action: "stat",
            path: path.display().to_string(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(problem(format!(
            "the API token file is readable by others (mode {:o}): run `chmod 600 {}`",
            mode & 0o777,
            path.display()
        )));
    }
    Ok(())
}

/// SHA-256 of a DER certificate as `AA:BB:…`.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Writes `bytes` to `path` with mode 0600: temp file, fsync, rename, fsync the directory.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let err = |action, source| IdentityError::File {
        action,
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err("create", e))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("chmod", e))?;
    f.write_all(bytes).map_err(|e| err("write", e))?;
    f.sync_all().map_err(|e| err("fsync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| err("rename", e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("fsync the directory of", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), "h").unwrap();
        let b = Identity::load_or_create(dir.path(), "h").unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.token, b.token);
        assert_eq!(a.token.len(), 64);
        let mode = std::fs::metadata(dir.path().join("host.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        a.server_config().unwrap();
    }

    #[test]
    fn a_rotated_token_keeps_the_old_one_for_its_grace_only() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::load_or_create(dir.path(), "h").unwrap();
        let tokens = ApiTokens::new(id.token.clone(), id.token_path.clone(), None);
        assert!(tokens.accepts(&id.token, 0));
        let (new, record) = tokens.rotate(100).unwrap();
        assert!(tokens.accepts(&new, 50) && tokens.accepts(&id.token, 100));
        assert!(
            !tokens.accepts(&id.token, 101),
            "the old token outlived its grace"
        );
        assert!(!tokens.accepts("x", 50));
        // The file holds the new token; the record brings the grace back after a restart.
        let reloaded = Identity::load_or_create(dir.path(), "h").unwrap();
        assert_eq!(reloaded.token, new);
        let again = ApiTokens::new(reloaded.token, reloaded.token_path, Some(&record));
        assert!(again.accepts(&id.token, 99) && !again.accepts(&id.token, 101));
    }

    #[test]
    fn short_or_exposed_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path(), "h").unwrap();
        let token = dir.path().join("api.token");
        for short in ["", "\n", "abc\n"] {
            std::fs::write(&token, short).unwrap();
            let err = Identity::load_or_create(dir.path(), "h")
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("at least 32"), "{err}");
        }
        std::fs::write(&token, "a".repeat(64)).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load_or_create(dir.path(), "h")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            Identity::load_or_create(dir.path(), "h").unwrap().token,
            "a".repeat(64)
        );
    }

    #[test]
    fn corrupt_certificate_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path(), "h").unwrap();
        std::fs::write(dir.path().join("host.crt"), "garbage").unwrap();
        let err = Identity::load_or_create(dir.path(), "h")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a valid PEM certificate"), "{err}");
    }
}
