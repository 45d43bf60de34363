//! Host-to-host TLS: both hosts present their host certificates (mutual TLS). The primary
//! pins the replica's certificate by fingerprint; the replica completes the handshake with
//! any client certificate whose key the peer proves it holds, and then, before reading a
//! byte from it, decides whether that primary is authorized: by the certificate's
//! fingerprint (a listed primary), or because the certificate chains to the CA the replica
//! server trusts (`--allow-any`). A self-signed certificate is never "any authenticated
//! primary". Refusing after the handshake gives an unknown primary a clear "not
//! authorized" reply instead of an opaque handshake failure.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use crate::identity::{fingerprint, Identity};

/// How long connecting + handshaking may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Requires a client certificate; authorization happens after the handshake.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Possession of the key is proven by the handshake signature (below); who the
        // certificate belongs to is decided by its fingerprint, after the handshake.
        Ok(ClientCertVerified::assertion())
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

/// The replica server's acceptor: presents the host certificate, requires the primary's.
pub fn replica_acceptor(identity: &Identity) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(AnyClientCert { provider }))
        .with_single_cert(identity.chain.clone(), identity.key())?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The fingerprint of the certificate the peer presented.
pub fn peer_fingerprint(conn: &server::TlsStream<TcpStream>) -> Option<String> {
    conn.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| fingerprint(c))
}

/// The certificates the peer presented: its own first, then intermediates.
pub fn peer_chain(conn: &server::TlsStream<TcpStream>) -> Vec<CertificateDer<'static>> {
    conn.get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}

/// The CA certificates in `pem`; an error says what is wrong with it in one line.
pub fn parse_ca(pem: &str) -> Result<rustls::RootCertStore, String> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the trusted CA is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(
            "the trusted CA file holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        );
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("the trusted CA certificate is unusable: {e}"))?;
    }
    Ok(roots)
}

/// Whether `chain` (leaf first) was issued, directly or through its intermediates, by a CA
/// in `ca_pem`, and is valid now for client authentication. `Err` says why not.
pub fn chain_trusted(ca_pem: &str, chain: &[CertificateDer<'static>]) -> Result<(), String> {
    let roots = parse_ca(ca_pem)?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "the peer presented no certificate".to_owned())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("the trusted CA cannot verify certificates: {e}"))?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| format!("its certificate was not issued by the trusted CA ({e})"))
}

/// The fingerprint of the certificate the replica presented.
pub fn server_fingerprint(conn: &PeerStream) -> Option<String> {
    conn.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| fingerprint(c))
}

/// The primary's side of a host-to-host connection.
pub type PeerStream = client::TlsStream<TcpStream>;

/// Connects to a replica server at `addr`, trusting any of `fingerprints` (its pinned
/// certificate and the successor
/// it announced while rotating), presenting this host's certificate;
/// [`server_fingerprint`] tells which one it presented.
pub async fn connect_any(
    identity: &Identity,
    addr: &str,
    fingerprints: &[&str],
) -> anyhow::Result<PeerStream> {
    let config = ferry_client::pinned_client_config_any(
        fingerprints,
        Some((identity.chain.clone(), identity.key())),
    )?;
    let connector = TlsConnector::from(Arc::new(config));
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .unwrap_or_else(|_| ServerName::try_from("ferry-replica").expect("valid name"));
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the replica server at {addr}: {e}"))?;
        tcp.set_nodelay(true)?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| anyhow::anyhow!("TLS with the replica server at {addr} failed: {e}"))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, work)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the replica server at {addr} did not answer within {CONNECT_TIMEOUT:?}"
            )
        })?
}
