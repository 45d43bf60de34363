//! A hostile (or compromised) primary: it speaks the replication wire protocol with
//! whatever identity a test gives it, and sends whatever the test crafts — messages a real
//! ferryd would never send, frames larger than any greeting, greetings it has no right to.
//! The replica server under test must refuse each one in one line and store nothing.

use std::time::Duration;

use ferry_wire::{FrameKind, FrameReader, FrameWriter};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

type Stream = TlsStream<TcpStream>;

/// One connection to a replica server's replication port.
pub struct HostilePeer {
    rt: tokio::runtime::Runtime,
    reader: FrameReader<ReadHalf<Stream>>,
    writer: FrameWriter<WriteHalf<Stream>>,
}

impl HostilePeer {
    /// Connects to `addr`, pinning the replica's `fingerprint`, presenting the certificate
    /// chain and key in `cert_pem`/`key_pem` (e.g. another host's `host.crt`/`host.key`: a
    /// compromised host).
    pub fn connect(
        addr: &str,
        fingerprint: &str,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, String> {
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate PEM: {e}"))?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| format!("key PEM: {e}"))?
            .ok_or("no private key in the key PEM")?;
        let config = ferry_client::pinned_client_config(fingerprint, Some((chain, key)))
            .map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let stream = rt.block_on(async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(ServerName::try_from("ferryd").expect("name"), tcp)
                .await
                .map_err(|e| format!("TLS with {addr}: {e}"))
        })?;
        let (r, w) = tokio::io::split(stream);
        Ok(Self {
            rt,
            reader: FrameReader::new(r),
            writer: FrameWriter::new(w),
        })
    }

    /// Sends a control message (JSON, as the protocol's `Msg` would serialize).
    pub fn send(&mut self, msg: &Value) -> Result<(), String> {
        let writer = &mut self.writer;
        self.rt
            .block_on(async { writer.write_control(msg).await.map_err(|e| e.to_string()) })
    }

    /// Sends one frame of `kind` with `payload`, as is.
    pub fn send_frame(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), String> {
        let frame = ferry_wire::encode_frame(kind, payload, false).map_err(|e| e.to_string())?;
        let writer = &mut self.writer;
        self.rt.block_on(async {
            writer
                .write_encoded(&frame)
                .await
                .map_err(|e| e.to_string())?;
            writer.flush().await.map_err(|e| e.to_string())
        })
    }

    /// Sends one batch of extents (disk, offset, data) numbered `seq`.
    pub fn send_batch(&mut self, seq: u64, extents: &[(u16, u64, Vec<u8>)]) -> Result<(), String> {
        let batch = ferry_wire::ExtentBatch {
            seq,
            extents: extents
                .iter()
                .map(|(disk, offset, data)| ferry_wire::Extent::data(*disk, *offset, data.clone()))
                .collect(),
        };
        let writer = &mut self.writer;
        self.rt.block_on(async {
            writer
                .write_batch(&batch, false)
                .await
                .map_err(|e| e.to_string())?;
            writer.flush().await.map_err(|e| e.to_string())
        })
    }

    /// The next control message, `Ok(None)` when the replica closed the connection, `Err`
    /// on a broken stream or after `timeout` with nothing.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Value>, String> {
        let reader = &mut self.reader;
        self.rt.block_on(async {
            loop {
                let frame = match tokio::time::timeout(timeout, reader.read_frame()).await {
                    Err(_) => return Err(format!("nothing within {timeout:?}")),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Ok(Ok(None)) => return Ok(None),
                    Ok(Ok(Some(f))) => f,
                };
                if frame.kind != FrameKind::Keepalive {
                    return frame.control().map(Some).map_err(|e| e.to_string());
                }
            }
        })
    }
}
