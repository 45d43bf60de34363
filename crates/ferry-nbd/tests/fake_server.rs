//! The client against a scripted in-process server over `tokio::io::duplex`.
//!
//! Real servers (see `qemu_nbd.rs`) never send malformed replies, so these
//! tests play a broken or hostile server byte by byte and check that each
//! violation surfaces as the specific error, without a panic or a hang.

use std::future::Future;
use std::time::Duration;

use ferry_nbd::{Errno, Extent, NbdClient, NbdError, OptionError, ProtocolError, BASE_ALLOCATION};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const SIMPLE: u32 = 0x6744_6698;
const STRUCTURED: u32 = 0x668e_33ef;
const DONE: u16 = 1;
const OFFSET_DATA: u16 = 1;
const OFFSET_HOLE: u16 = 2;
const BLOCK_STATUS: u16 = 5;
const ERROR: u16 = 0x8001;
const ERROR_OFFSET: u16 = 0x8002;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_BLOCK_STATUS: u16 = 7;
/// HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_WRITE_ZEROES
const FLAGS: u16 = 1 | 4 | 8 | 64;
const SIZE: u64 = 1 << 20;
const CONTEXT_ID: u32 = 7;

/// How the scripted server negotiates.
#[derive(Clone)]
struct Setup {
    structured: bool,
    contexts: Vec<(&'static str, u32)>,
    block_size: Option<(u32, u32, u32)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            structured: true,
            contexts: vec![(BASE_ALLOCATION, CONTEXT_ID)],
            block_size: None,
        }
    }
}

struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    data: Vec<u8>,
}

/// The server end of the duplex pipe.
struct Fake {
    io: DuplexStream,
}

impl Fake {
    async fn option_reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        self.io.write_u64(REPLY_MAGIC).await.unwrap();
        self.io.write_u32(option).await.unwrap();
        self.io.write_u32(reply_type).await.unwrap();
        self.io.write_u32(data.len() as u32).await.unwrap();
        self.io.write_all(data).await.unwrap();
    }

    async fn greet(&mut self) {
        self.io.write_u64(NBDMAGIC).await.unwrap();
        self.io.write_u64(IHAVEOPT).await.unwrap();
        self.io.write_u16(3).await.unwrap();
        assert_eq!(self.io.read_u32().await.unwrap(), 3, "client flags");
    }

    /// Reads one option: (option, data).
    async fn read_option(&mut self) -> (u32, Vec<u8>) {
        assert_eq!(self.io.read_u64().await.unwrap(), IHAVEOPT);
        let option = self.io.read_u32().await.unwrap();
        let len = self.io.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.io.read_exact(&mut data).await.unwrap();
        (option, data)
    }

    /// Serves options until `NBD_OPT_GO` succeeds.
    async fn handshake(&mut self, setup: &Setup) {
        self.greet().await;
        loop {
            let (option, data) = self.read_option().await;
            match option {
                8 if setup.structured => self.option_reply(8, 1, &[]).await,
                8 => self.option_reply(8, 0x8000_0001, &[]).await,
                10 => {
                    for (name, id) in &setup.contexts {
                        if contains(&data, name.as_bytes()) {
                            let mut reply = id.to_be_bytes().to_vec();
                            reply.extend_from_slice(name.as_bytes());
                            self.option_reply(10, 4, &reply).await;
                        }
                    }
                    self.option_reply(10, 1, &[]).await;
                }
                7 => {
                    let mut export = vec![0, 0];
                    export.extend_from_slice(&SIZE.to_be_bytes());
                    export.extend_from_slice(&FLAGS.to_be_bytes());
                    self.option_reply(7, 3, &export).await;
                    if let Some((min, pref, max)) = setup.block_size {
                        let mut info = vec![0, 3];
                        for v in [min, pref, max] {
                            info.extend_from_slice(&v.to_be_bytes());
                        }
                        self.option_reply(7, 3, &info).await;
                    }
                    self.option_reply(7, 1, &[]).await;
                    return;
                }
                other => panic!("unexpected option {other}"),
            }
        }
    }

    async fn request(&mut self) -> Request {
        assert_eq!(self.io.read_u32().await.unwrap(), 0x2560_9513);
        let flags = self.io.read_u16().await.unwrap();
        let command = self.io.read_u16().await.unwrap();
        let cookie = self.io.read_u64().await.unwrap();
        let offset = self.io.read_u64().await.unwrap();
        let length = self.io.read_u32().await.unwrap();
        let mut data = Vec::new();
        if command == CMD_WRITE {
            data.resize(length as usize, 0);
            self.io.read_exact(&mut data).await.unwrap();
        }
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
            data,
        }
    }

    async fn simple(&mut self, error: u32, cookie: u64, data: &[u8]) {
        self.io.write_u32(SIMPLE).await.unwrap();
        self.io.write_u32(error).await.unwrap();
        self.io.write_u64(cookie).await.unwrap();
        self.io.write_all(data).await.unwrap();
    }

    async fn chunk(&mut self, flags: u16, chunk_type: u16, cookie: u64, payload: &[u8]) {
        self.chunk_with_length(flags, chunk_type, cookie, payload.len() as u32, payload)
            .await;
    }

    /// A chunk whose header length need not match the payload sent.
    async fn chunk_with_length(
        &mut self,
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        length: u32,
        payload: &[u8],
    ) {
        self.io.write_u32(STRUCTURED).await.unwrap();
        self.io.write_u16(flags).await.unwrap();
        self.io.write_u16(chunk_type).await.unwrap();
        self.io.write_u64(cookie).await.unwrap();
        self.io.write_u32(length).await.unwrap();
        self.io.write_all(payload).await.unwrap();
    }

    async fn data(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(data);
        self.chunk(flags, OFFSET_DATA, cookie, &payload).await;
    }

    async fn hole(&mut self, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(&len.to_be_bytes());
        self.chunk(flags, OFFSET_HOLE, cookie, &payload).await;
    }

    async fn status(&mut self, cookie: u64, context_id: u32, descriptors: &[(u32, u32)]) {
        let mut payload = context_id.to_be_bytes().to_vec();
        for (len, flags) in descriptors {
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
        }
        self.chunk(DONE, BLOCK_STATUS, cookie, &payload).await;
    }

    async fn error(&mut self, flags: u16, cookie: u64, errno: u32, message: &str) {
        let mut payload = errno.to_be_bytes().to_vec();
        payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
        payload.extend_from_slice(message.as_bytes());
        self.chunk(flags, ERROR, cookie, &payload).await;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs `script` as the server and `client` against it; both must finish
/// within a few seconds (a hang is a failure). Returns the client's result.
async fn run<S, SF, C, CF, T>(setup: Setup, script: S, client: C) -> T
where
    S: FnOnce(Fake) -> SF,
    SF: Future<Output = ()> + Send + 'static,
    C: FnOnce(NbdClient) -> CF,
    CF: Future<Output = T>,
{
    let (client_io, server_io) = duplex(1 << 16);
    let server_setup = setup.clone();
    let server = tokio::spawn({
        let mut fake = Fake { io: server_io };
        async move {
            fake.handshake(&server_setup).await;
            fake
        }
    });
    let contexts: Vec<&str> = setup.contexts.iter().map(|(n, _)| *n).collect();
    let nbd = NbdClient::connect(client_io, "exp", &contexts)
        .await
        .expect("handshake");
    let fake = server.await.unwrap();
    let server = tokio::spawn(script(fake));
    let result = tokio::time::timeout(Duration::from_secs(5), client(nbd))
        .await
        .expect("client hung");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server script hung")
        .expect("server script panicked");
    result
}

fn protocol(err: NbdError) -> ProtocolError {
    match err {
        NbdError::Protocol(p) => p,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_reply_magic_is_a_protocol_error() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            s.request().await;
            s.io.write_u32(0xdead_beef).await.unwrap();
        },
        |mut c| async move { c.read(0, &mut [0; 512]).await.unwrap_err() },
    )
    .await;
    assert_eq!(
        protocol(err),
        ProtocolError::BadMagic {
            expected: "reply magic",
            got: 0xdead_beef
        }
    );
}

#[tokio::test]
async fn wrong_cookie_is_rejected_and_connection_is_then_broken() {
    let (first, second) = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.simple(0, r.cookie + 1, &[]).await;
        },
        |mut c| async move {
            let first = c.flush().await.unwrap_err();
            let second = c.flush().await.unwrap_err();
            (first, second)
        },
    )
    .await;
    assert!(matches!(
        protocol(first),
        ProtocolError::UnexpectedCookie(_)
    ));
    assert!(matches!(second, NbdError::ConnectionBroken));
}

#[tokio::test]
async fn oversized_read_chunk_is_rejected_before_reading_it() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            // Claims 8 KiB of data for a 4 KiB read; the data is never sent,
            // so a client that trusted the length would hang here.
            s.chunk_with_length(
                DONE,
                OFFSET_DATA,
                r.cookie,
                8 + 8192,
                &r.offset.to_be_bytes(),
            )
            .await;
        },
        |mut c| async move { c.read(4096, &mut [0; 4096]).await.unwrap_err() },
    )
    .await;
    assert_eq!(
        protocol(err),
        ProtocolError::ReadChunkOutOfBounds {
            offset: 4096,
            length: 8192
        }
    );
}

#[tokio::test]
async fn huge_block_status_chunk_is_rejected() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.chunk_with_length(DONE, BLOCK_STATUS, r.cookie, u32::MAX - 3, &[])
                .await;
        },
        |mut c| async move { c.block_status(BASE_ALLOCATION, 0, 4096).await.unwrap_err() },
    )
    .await;
    assert!(matches!(
        protocol(err),
        ProtocolError::BadChunkLength {
            chunk_type: BLOCK_STATUS,
            ..
        }
    ));
}

#[tokio::test]
async fn zero_length_extent_is_rejected() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.status(r.cookie, CONTEXT_ID, &[(512, 0), (0, 1)]).await;
        },
        |mut c| async move { c.block_status(BASE_ALLOCATION, 0, 4096).await.unwrap_err() },
    )
    .await;
    assert_eq!(protocol(err), ProtocolError::ZeroLengthExtent);
}

#[tokio::test]
async fn descriptors_past_the_request_are_rejected() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.status(r.cookie, CONTEXT_ID, &[(4096, 0), (512, 1)]).await;
        },
        |mut c| async move { c.block_status(BASE_ALLOCATION, 0, 4096).await.unwrap_err() },
    )
    .await;
    assert_eq!(protocol(err), ProtocolError::ExtentBeyondRequest);
}

#[tokio::test]
async fn block_status_for_unknown_context_id_is_rejected() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.status(r.cookie, CONTEXT_ID + 1, &[(4096, 0)]).await;
        },
        |mut c| async move { c.block_status(BASE_ALLOCATION, 0, 4096).await.unwrap_err() },
    )
    .await;
    assert_eq!(
        protocol(err),
        ProtocolError::UnknownContextId(CONTEXT_ID + 1)
    );
}

#[tokio::test]
async fn block_status_loops_over_short_replies_and_clamps_the_last_extent() {
    let extents = run(
        Setup::default(),
        |mut s| async move {
            // One 4 KiB extent per reply, alternating flags, except that the
            // last reply claims far more than was asked.
            for i in 0..4u64 {
                let r = s.request().await;
                assert_eq!(r.command, CMD_BLOCK_STATUS);
                assert_eq!(r.offset, i * 4096);
                assert_eq!(u64::from(r.length), 16384 - i * 4096);
                let len = if i == 3 { 1 << 19 } else { 4096 };
                s.status(r.cookie, CONTEXT_ID, &[(len, (i % 2) as u32)])
                    .await;
            }
        },
        |mut c| async move { c.block_status(BASE_ALLOCATION, 0, 16384).await.unwrap() },
    )
    .await;
    assert_eq!(
        extents,
        vec![
            Extent::new(0, 4096, 0),
            Extent::new(4096, 4096, 1),
            Extent::new(8192, 4096, 0),
            Extent::new(12288, 4096, 1),
        ]
    );
}

#[tokio::test]
async fn server_error_is_typed_and_connection_survives() {
    let (err, data) = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.error(DONE, r.cookie, 5, "disk on fire").await;
            let r = s.request().await;
            s.data(DONE, r.cookie, r.offset, &[7; 512]).await;
        },
        |mut c| async move {
            let err = c.read(0, &mut [0; 512]).await.unwrap_err();
            let mut buf = [0; 512];
            c.read(512, &mut buf).await.unwrap();
            (err, buf)
        },
    )
    .await;
    match err {
        NbdError::Server {
            command,
            errno,
            offset,
            message,
        } => {
            assert_eq!(command, "NBD_CMD_READ");
            assert_eq!(errno, Errno::Eio);
            assert_eq!(offset, None);
            assert_eq!(message, "disk on fire");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(data, [7; 512]);
}

#[tokio::test]
async fn error_offset_outside_the_request_is_rejected() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            let mut payload = 5u32.to_be_bytes().to_vec();
            payload.extend_from_slice(&0u16.to_be_bytes());
            payload.extend_from_slice(&(r.offset + u64::from(r.length)).to_be_bytes());
            s.chunk(DONE, ERROR_OFFSET, r.cookie, &payload).await;
        },
        |mut c| async move { c.read(0, &mut [0; 512]).await.unwrap_err() },
    )
    .await;
    assert_eq!(protocol(err), ProtocolError::ErrorOffsetOutOfBounds(512));
}

#[tokio::test]
async fn error_message_longer_than_chunk_is_rejected() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            let mut payload = 5u32.to_be_bytes().to_vec();
            payload.extend_from_slice(&100u16.to_be_bytes());
            payload.extend_from_slice(b"short");
            s.chunk(DONE, ERROR, r.cookie, &payload).await;
        },
        |mut c| async move { c.read(0, &mut [0; 512]).await.unwrap_err() },
    )
    .await;
    assert!(matches!(
        protocol(err),
        ProtocolError::BadChunkLength {
            chunk_type: ERROR,
            ..
        }
    ));
}

#[tokio::test]
async fn unknown_chunk_type_is_rejected() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.chunk(DONE, 42, r.cookie, &[]).await;
        },
        |mut c| async move { c.read(0, &mut [0; 512]).await.unwrap_err() },
    )
    .await;
    assert_eq!(protocol(err), ProtocolError::UnexpectedChunkType(42));
}

#[tokio::test]
async fn read_reassembles_out_of_order_data_and_holes() {
    let buf = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            let base = r.offset;
            s.data(0, r.cookie, base + 3072, &[3; 1024]).await;
            s.hole(0, r.cookie, base + 1024, 2048).await;
            s.data(0, r.cookie, base, &[1; 1024]).await;
            s.chunk(DONE, 0, r.cookie, &[]).await;
        },
        |mut c| async move {
            let mut buf = vec![0xff; 4096];
            c.read(8192, &mut buf).await.unwrap();
            buf
        },
    )
    .await;
    assert_eq!(&buf[..1024], &[1; 1024][..]);
    assert_eq!(&buf[1024..3072], &[0; 2048][..]);
    assert_eq!(&buf[3072..], &[3; 1024][..]);
}

#[tokio::test]
async fn overlapping_read_chunks_are_rejected() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.data(0, r.cookie, 0, &[1; 1024]).await;
            s.hole(DONE, r.cookie, 512, 1024).await;
        },
        |mut c| async move { c.read(0, &mut [0; 2048]).await.unwrap_err() },
    )
    .await;
    assert_eq!(
        protocol(err),
        ProtocolError::ReadChunkOutOfBounds {
            offset: 512,
            length: 1024
        }
    );
}

#[tokio::test]
async fn read_done_with_a_gap_is_rejected() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.data(DONE, r.cookie, 0, &[1; 1024]).await;
        },
        |mut c| async move { c.read(0, &mut [0; 2048]).await.unwrap_err() },
    )
    .await;
    assert_eq!(
        protocol(err),
        ProtocolError::IncompleteRead {
            covered: 1024,
            requested: 2048
        }
    );
}

#[tokio::test]
async fn server_hanging_up_mid_reply_is_an_io_error() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            let r = s.request().await;
            s.chunk_with_length(
                DONE,
                OFFSET_DATA,
                r.cookie,
                8 + 512,
                &r.offset.to_be_bytes(),
            )
            .await;
            drop(s);
        },
        |mut c| async move { c.read(0, &mut [0; 512]).await.unwrap_err() },
    )
    .await;
    assert!(matches!(err, NbdError::Io(_)), "{err:?}");
}

#[tokio::test]
async fn pipelined_reads_accept_replies_in_any_order() {
    let setup = Setup {
        block_size: Some((512, 4096, 4096)),
        ..Setup::default()
    };
    let (buf, other) = run(
        setup,
        |mut s| async move {
            // 16 KiB + 1 KiB elsewhere, at most 4 KiB per request: five
            // requests, all sent before any reply; answer them backwards.
            let mut requests = Vec::new();
            for _ in 0..5 {
                let r = s.request().await;
                assert_eq!(r.command, CMD_READ);
                assert!(r.length <= 4096);
                requests.push(r);
            }
            for r in requests.iter().rev() {
                let fill = (r.offset / 4096) as u8 + 1;
                s.data(DONE, r.cookie, r.offset, &vec![fill; r.length as usize])
                    .await;
            }
        },
        |mut c| async move {
            let mut buf = vec![0; 16384];
            let mut other = vec![0; 1024];
            c.read_many([(0, &mut buf[..]), (65536, &mut other[..])])
                .await
                .unwrap();
            (buf, other)
        },
    )
    .await;
    for (i, piece) in buf.chunks(4096).enumerate() {
        assert!(piece.iter().all(|&b| b == i as u8 + 1), "piece {i}");
    }
    assert!(other.iter().all(|&b| b == 17));
}

#[tokio::test]
async fn writes_are_split_to_the_maximum_payload_and_unaligned_calls_refused() {
    let setup = Setup {
        block_size: Some((512, 4096, 4096)),
        ..Setup::default()
    };
    let unaligned = run(
        setup,
        |mut s| async move {
            let mut data = Vec::new();
            for i in 0..3u64 {
                let r = s.request().await;
                assert_eq!(r.command, CMD_WRITE);
                assert_eq!(r.flags, 1, "FUA");
                assert_eq!(r.offset, 8192 + i * 4096);
                data.extend_from_slice(&r.data);
                s.simple(0, r.cookie, &[]).await;
            }
            assert_eq!(data.len(), 10240);
            assert!(data.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        },
        |mut c| async move {
            let unaligned = c.write(100, &[0; 512]).await.unwrap_err();
            let data: Vec<u8> = (0..10240).map(|i| (i % 251) as u8).collect();
            c.write_with(8192, &data, ferry_nbd::WriteOptions { fua: true })
                .await
                .unwrap();
            unaligned
        },
    )
    .await;
    assert!(matches!(unaligned, NbdError::InvalidRequest(_)));
}

#[tokio::test]
async fn reads_work_with_simple_replies_only() {
    let setup = Setup {
        structured: false,
        contexts: vec![],
        block_size: None,
    };
    let (structured, buf) = run(
        setup,
        |mut s| async move {
            let r = s.request().await;
            s.simple(0, r.cookie, &vec![9; r.length as usize]).await;
        },
        |mut c| async move {
            let mut buf = vec![0; 1000];
            c.read(24, &mut buf).await.unwrap();
            (c.structured_replies(), buf)
        },
    )
    .await;
    assert!(!structured);
    assert!(buf.iter().all(|&b| b == 9));
}

#[tokio::test]
async fn requests_beyond_the_export_are_refused_locally() {
    let err = run(
        Setup::default(),
        |_s| async move {},
        |mut c| async move { c.read(SIZE - 512, &mut [0; 1024]).await.unwrap_err() },
    )
    .await;
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
}

#[tokio::test]
async fn cancelled_call_leaves_the_connection_broken() {
    let err = run(
        Setup::default(),
        |mut s| async move {
            s.request().await;
            // Never answer, but keep the pipe open past the client's timeout.
            tokio::time::sleep(Duration::from_millis(300)).await;
        },
        |mut c| async move {
            let mut buf = [0; 512];
            let cancelled =
                tokio::time::timeout(Duration::from_millis(50), c.read(0, &mut buf)).await;
            assert!(cancelled.is_err(), "read cannot finish without a reply");
            c.read(0, &mut buf).await.unwrap_err()
        },
    )
    .await;
    assert!(matches!(err, NbdError::ConnectionBroken), "{err:?}");
}

// ---- Handshake failures -------------------------------------------------

#[tokio::test]
async fn bad_greeting_magic_is_rejected() {
    let (client_io, mut server_io) = duplex(4096);
    server_io.write_all(b"HTTP/1.1 400 Bad\r\n").await.unwrap();
    let err = NbdClient::connect(client_io, "exp", &[]).await.unwrap_err();
    assert!(matches!(
        protocol(err),
        ProtocolError::BadMagic {
            expected: "NBDMAGIC",
            ..
        }
    ));
}

#[tokio::test]
async fn refused_go_returns_the_reason_and_aborts() {
    let (client_io, server_io) = duplex(4096);
    let server = tokio::spawn(async move {
        let mut s = Fake { io: server_io };
        s.greet().await;
        let (option, _) = s.read_option().await;
        assert_eq!(option, 8);
        s.option_reply(8, 1, &[]).await;
        let (option, _) = s.read_option().await;
        assert_eq!(option, 7);
        s.option_reply(7, 0x8000_0006, b"no such export").await;
        let (option, _) = s.read_option().await;
        assert_eq!(option, 2, "client must send NBD_OPT_ABORT");
    });
    let err = NbdClient::connect(client_io, "nope", &[])
        .await
        .unwrap_err();
    match err {
        NbdError::OptionRefused {
            option,
            reply,
            message,
        } => {
            assert_eq!(option, "NBD_OPT_GO");
            assert_eq!(reply, OptionError(0x8000_0006));
            assert_eq!(message, "no such export");
        }
        other => panic!("expected OptionRefused, got {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn missing_meta_context_is_reported_and_aborts() {
    let (client_io, server_io) = duplex(4096);
    let server = tokio::spawn(async move {
        let mut s = Fake { io: server_io };
        s.greet().await;
        s.read_option().await;
        s.option_reply(8, 1, &[]).await;
        let (option, _) = s.read_option().await;
        assert_eq!(option, 10);
        s.option_reply(10, 1, &[]).await; // selects nothing
        let (option, _) = s.read_option().await;
        assert_eq!(option, 2, "client must send NBD_OPT_ABORT");
    });
    let err = NbdClient::connect(client_io, "exp", &["qemu:dirty-bitmap:b9"])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NbdError::ContextNotAvailable(name) if name == "qemu:dirty-bitmap:b9"),
        "{err:?}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn invalid_block_size_info_is_rejected() {
    let (client_io, server_io) = duplex(4096);
    tokio::spawn(async move {
        let mut s = Fake { io: server_io };
        let setup = Setup {
            contexts: vec![],
            block_size: Some((3, 4096, 1 << 20)),
            ..Setup::default()
        };
        s.handshake(&setup).await;
        // Keep the pipe open until the client gives up.
        let _ = s.io.read_u8().await;
    });
    let err = NbdClient::connect(client_io, "exp", &[]).await.unwrap_err();
    assert!(matches!(
        protocol(err),
        ProtocolError::BadBlockSize { minimum: 3, .. }
    ));
}
