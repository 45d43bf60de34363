//! `ferry-tls-baseline BYTES [IP] [--durable DIR]`: copies BYTES bytes from a client to a
//! server through one TLS connection over loopback, in one process, and prints
//! `{"bytes":N,"secs":S,"mib_per_s":R,"durable":B}`.
//!
//! With `--durable DIR` the server writes what it receives into a new file in DIR (the
//! replica's storage) and fdatasyncs it before it answers, and the sender's clock stops at
//! that answer: the physical limit of a replication — read, send over mutual TLS, write
//! durably on the receiver (issue 12's honest baseline). Without it, memory to memory.
//!
//! It is the baseline of the benchmark harness's delta-throughput figure
//! (`crates/ferry-testkit/examples/bench.rs`): the same TLS stack as ferryd's host-to-host
//! link (rustls with the ring provider, safe default protocol versions, ferry-client's
//! pinned-certificate client config, mutual TLS, TCP_NODELAY, 4 MiB writes like one extent
//! batch), and nothing else: no disk reads, no spool, no NBD writes on the far side.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Bytes per write, like one extent batch of ferryd's.
const CHUNK: usize = 4 << 20;

/// A self-signed certificate and its key, like a ferryd host identity.
fn identity(name: &str) -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])?.self_signed(&key)?;
    Ok((
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    ))
}

/// Accepts any client certificate (ferryd decides by fingerprint after the handshake).
#[derive(Debug)]
struct AnyClient(Arc<rustls::crypto::CryptoProvider>);

impl rustls::server::danger::ClientCertVerifier for AnyClient {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Fills `buf` with xorshift output: incompressible, cheap to make.
fn fill_random(buf: &mut [u8], mut x: u64) {
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let total: u64 = args
        .next()
        .context("usage: ferry-tls-baseline BYTES [IP]")?
        .parse()
        .context("BYTES must be a number")?;
    let mut ip = "127.0.0.2".to_owned();
    let mut durable: Option<std::path::PathBuf> = None;
    while let Some(a) = args.next() {
        if a == "--durable" {
            durable = Some(args.next().context("--durable DIR")?.into());
        } else {
            ip = a;
        }
    }
    let sink_path = match &durable {
        Some(dir) => Some(dir.join(format!("ferry-tls-baseline-{}.bin", std::process::id()))),
        None => None,
    };
    let sink_for_server = sink_path.clone();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (server_cert, server_key) = identity("replica")?;
    let (client_cert, client_key) = identity("primary")?;
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(AnyClient(provider.clone())))
        .with_single_cert(vec![server_cert.clone()], server_key)?;
    let client_config = ferry_client::pinned_client_config(
        &ferry_client::fingerprint(&server_cert),
        Some((vec![client_cert], client_key)),
    )?;

    let listener = TcpListener::bind((ip.as_str(), 0)).await?;
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut file = match &sink_for_server {
            Some(p) => Some(
                tokio::fs::File::create(p)
                    .await
                    .with_context(|| format!("create {}", p.display()))?,
            ),
            None => None,
        };
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            if let Some(f) = file.as_mut() {
                f.write_all(&buf[..n]).await?;
            }
            got += n as u64;
            if got == total {
                break;
            }
        }
        if let Some(f) = file.as_mut() {
            f.flush().await?;
            f.sync_data().await?;
        }
        tls.write_all(&got.to_le_bytes()).await?;
        tls.flush().await?;
        tls.shutdown().await.ok();
        anyhow::Ok(got)
    });

    let mut data = vec![0u8; CHUNK];
    fill_random(&mut data, 0x9e37_79b9_7f4a_7c15);
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connector = TlsConnector::from(Arc::new(client_config));
    let mut tls = connector
        .connect(ServerName::try_from("replica")?, tcp)
        .await?;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(CHUNK as u64) as usize;
        tls.write_all(&data[..n]).await?;
        sent += n as u64;
    }
    tls.flush().await?;
    let mut ack = [0u8; 8];
    tls.read_exact(&mut ack).await?;
    let secs = start.elapsed().as_secs_f64();
    let got = server.await??;
    if let Some(p) = &sink_path {
        let _ = std::fs::remove_file(p);
    }
    if got != total || u64::from_le_bytes(ack) != total {
        bail!("the server received {got} of {total} bytes");
    }
    println!(
        "{{\"bytes\":{total},\"secs\":{secs:.6},\"mib_per_s\":{:.3},\"durable\":{}}}",
        total as f64 / (1 << 20) as f64 / secs,
        durable.is_some()
    );
    Ok(())
}
