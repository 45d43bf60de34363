//! A client of ferryd's API, over the local unix socket (admin) or over TLS to a remote
//! host, whose certificate is pinned by its SHA-256 fingerprint and which is authorized
//! with a bearer token. Used by the `ferry` CLI, the console and the tests.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_api_types::ApiError;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// How long connecting may take before we give up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where ferryd is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The local admin socket.
    Unix(PathBuf),
    /// A remote host's TLS API.
    Tls {
        /// `host:port`.
        addr: String,
        /// The certificate fingerprint to pin (`AA:BB:…`, SHA-256).
        fingerprint: String,
        /// The host's API token.
        token: String,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "{}", p.display()),
            Self::Tls { addr, .. } => write!(f, "https://{addr}"),
        }
    }
}

/// What went wrong talking to ferryd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made.
    #[error("cannot connect to ferryd at {endpoint} (is ferryd running there?)")]
    Connect {
        /// Where we tried.
        endpoint: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong fingerprint, not a ferryd, …).
    #[error("TLS handshake with {endpoint} failed")]
    Tls {
        /// Where we tried.
        endpoint: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with ferryd failed: {0}")]
    Http(#[from] hyper::Error),
    /// ferryd answered with an error.
    #[error("{}", .error.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error.
        error: ApiError,
    },
    /// The reply could not be decoded.
    #[error("ferryd's reply could not be decoded: {0}")]
    Decode(String),
}

impl ClientError {
    /// The API error code, if ferryd answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { error, .. } => Some(&error.code),
            _ => None,
        }
    }
}

/// Anything we can speak HTTP over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A bidirectional raw stream, e.g. the serial console after an upgrade.
pub type RawStream = Pin<Box<dyn Io>>;

/// A client of one ferryd.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    /// A client for `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        let tls = match &endpoint {
            Endpoint::Unix(_) => None,
            Endpoint::Tls { fingerprint, .. } => Some(Arc::new(pinned_config(fingerprint))),
        };
        Self { endpoint, tls }
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let endpoint = self.endpoint.to_string();
        let timeout = |e: tokio::time::error::Elapsed| ClientError::Connect {
            endpoint: endpoint.clone(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, e),
        };
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let s = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
                    .await
                    .map_err(timeout)?
                    .map_err(|source| ClientError::Connect {
                        endpoint: endpoint.clone(),
                        source,
                    })?;
                Ok(Box::new(s))
            }
            Endpoint::Tls { addr, .. } => {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .map_err(timeout)?
                    .map_err(|source| ClientError::Connect {
                        endpoint: endpoint.clone(),
                        source,
                    })?;
                let connector =
                    tokio_rustls::TlsConnector::from(self.tls.clone().expect("tls config"));
                // The certificate is pinned by fingerprint, so the name only feeds SNI.
                let name = ServerName::try_from("ferryd").expect("static name");
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(timeout)?
                    .map_err(|source| ClientError::Tls { endpoint, source })?;
                Ok(Box::new(tls))
            }
        }
    }

    fn request(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Request<Full<Bytes>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "ferryd");
        if let Endpoint::Tls { token, .. } = &self.endpoint {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        req.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("valid request")
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        let resp = sender
            .send_request(self.request(method, path, body))
            .await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        Ok(bytes)
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        decode(&self.send(Method::GET, path, None).await?)
    }

    /// `GET path`, the body as it is (e.g. an image).
    pub async fn get_bytes(&self, path: &str) -> Result<Bytes, ClientError> {
        self.send(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body, decoded.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("request serializes");
        decode(&self.send(Method::POST, path, Some(body)).await?)
    }

    /// `DELETE path`, decoded.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        decode(&self.send(Method::DELETE, path, None).await?)
    }

    /// `GET path` with an HTTP upgrade to `protocol`: the raw stream afterwards.
    pub async fn upgrade(&self, path: &str, protocol: &str) -> Result<RawStream, ClientError> {
        Ok(self.upgrade_with(path, protocol, &[]).await?.1)
    }

    /// The same with `headers` added to the request (e.g. a websocket handshake's
    /// `Sec-WebSocket-Key`, relayed by a proxy); returns the `101` reply's headers too.
    pub async fn upgrade_with(
        &self,
        path: &str,
        protocol: &str,
        headers: &[(hyper::header::HeaderName, hyper::header::HeaderValue)],
    ) -> Result<(hyper::HeaderMap, RawStream), ClientError> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn.with_upgrades());
        let mut req = self.request(Method::GET, path, None);
        req.headers_mut().insert(
            hyper::header::CONNECTION,
            "upgrade".parse().expect("static"),
        );
        req.headers_mut().insert(
            hyper::header::UPGRADE,
            protocol
                .parse()
                .map_err(|_| ClientError::Decode("bad protocol".into()))?,
        );
        for (name, value) in headers {
            req.headers_mut().insert(name, value.clone());
        }
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let bytes = resp.into_body().collect().await?.to_bytes();
            return Err(api_error(status, &bytes));
        }
        let reply_headers = resp.headers().clone();
        let upgraded = hyper::upgrade::on(resp).await?;
        Ok((reply_headers, Box::pin(TokioIo::new(upgraded))))
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let error = serde_json::from_slice::<ApiError>(body).unwrap_or_else(|_| ApiError {
        code: "http".into(),
        message: format!(
            "ferryd answered {status}: {}",
            String::from_utf8_lossy(body).trim()
        ),
    });
    ClientError::Api {
        status: status.as_u16(),
        error,
    }
}

/// What [`percent_encode`] leaves as it is: RFC 3986's unreserved characters.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one URL path segment or query value (RFC 3986 unreserved characters
/// stay): VM and checkpoint names may hold spaces and other characters paths cannot.
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// SHA-256 of a DER certificate as `AA:BB:…` (what `ferry server show` prints).
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Normalizes a fingerprint as users may paste it (any case, with or without colons).
pub fn normalize_fingerprint(fp: &str) -> String {
    let hex: String = fp
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

fn pinned_config(fingerprint: &str) -> rustls::ClientConfig {
    pinned_client_config(fingerprint, None).expect("no client certificate to refuse")
}

/// A TLS client config that trusts exactly the certificate with `fingerprint` and, for
/// host-to-host connections (mutual TLS), presents `client_auth` (certificate chain, key).
pub fn pinned_client_config(
    fingerprint: &str,
    client_auth: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    pinned_client_config_any(&[fingerprint], client_auth)
}

/// [`pinned_client_config`] trusting any of `fingerprints` (a host's certificate and the
/// successor it announced while rotating it).
pub fn pinned_client_config_any(
    fingerprints: &[&str],
    client_auth: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCert {
        fingerprints: fingerprints
            .iter()
            .map(|f| normalize_fingerprint(f))
            .collect(),
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match client_auth {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Accepts exactly one certificate, by fingerprint: hosts use self-signed certificates
/// created at first start, and trust is established by pinning, as with SSH host keys.
#[derive(Debug)]
struct PinnedCert {
    fingerprints: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if self.fingerprints.contains(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint {got} is not the pinned {}",
                self.fingerprints.join(" or ")
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalize() {
        assert_eq!(normalize_fingerprint("ab:cd:0f"), "AB:CD:0F");
        assert_eq!(normalize_fingerprint("abcd0f"), "AB:CD:0F");
        assert_eq!(fingerprint(b"").len(), 32 * 3 - 1);
    }
}
