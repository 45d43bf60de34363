//! Crate tests. In-crate so they can forge headers with valid checksums.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::frame::Header;
use crate::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Hello {
    protocol_version: u32,
    primary: String,
    vm: String,
}

fn hello() -> Hello {
    Hello {
        protocol_version: 1,
        primary: "host-a".into(),
        vm: "vm-42".into(),
    }
}

/// Deterministic pseudo-random bytes (xorshift), no extra dependency.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    seed |= 1;
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn sample_batch(seq: u64) -> ExtentBatch {
    ExtentBatch {
        seq,
        extents: vec![
            Extent::data(0, 0, vec![0xAB; 8192]),
            Extent::zeroes(0, 8192, 1 << 30),
            Extent::data(1, 4096, noise(3000, seq + 7)),
            Extent::data(0, (1 << 30) + 8192, b"tail".to_vec()),
        ],
    }
}

/// (kind, payload) samples covering every frame kind.
fn samples() -> Vec<(FrameKind, Bytes)> {
    let v = vec![
        (FrameKind::Control, encode_control(&hello()).unwrap()),
        (FrameKind::ExtentBatch, sample_batch(3).encode().unwrap()),
        (
            FrameKind::Keepalive,
            encode_keepalive(0xDEAD_BEEF_0000_0001),
        ),
    ];
    for k in FrameKind::ALL {
        assert!(
            v.iter().any(|(kind, _)| *kind == k),
            "sample missing for {k:?}"
        );
    }
    v
}

async fn read_all(bytes: &[u8]) -> Result<Vec<Frame>> {
    let mut r = FrameReader::new(bytes);
    let mut out = Vec::new();
    while let Some(f) = r.read_frame().await? {
        out.push(f);
    }
    Ok(out)
}

async fn read_one(bytes: &[u8]) -> Result<Option<Frame>> {
    FrameReader::new(bytes).read_frame().await
}

/// A frame with a forged header whose header CRC is valid.
fn forged(
    kind: u8,
    flags: u8,
    reserved: u8,
    payload_len: u32,
    raw_len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Header::encode_raw(
        kind,
        flags,
        reserved,
        payload_len,
        raw_len,
        crc32c::crc32c(payload),
    )
    .to_vec();
    v.extend_from_slice(payload);
    v
}

// ---------------------------------------------------------------- frames

#[tokio::test]
async fn roundtrip_every_kind_compressed_and_not() {
    for compress in [false, true] {
        let mut w = FrameWriter::new(Vec::new());
        for (kind, payload) in samples() {
            w.write_frame(kind, &payload, compress).await.unwrap();
        }
        w.write_control(&hello()).await.unwrap();
        w.write_batch(&sample_batch(4), compress).await.unwrap();
        w.write_keepalive(9).await.unwrap();
        let stats = w.stats();
        let wire = w.into_inner();
        assert_eq!(stats.frames, 6);
        assert_eq!(stats.wire_bytes, wire.len() as u64);

        let frames = read_all(&wire).await.unwrap();
        assert_eq!(frames.len(), 6);
        for (f, (kind, payload)) in frames.iter().zip(samples()) {
            assert_eq!(f.kind, kind);
            assert_eq!(f.payload, payload);
        }
        assert_eq!(frames[3].control::<Hello>().unwrap(), hello());
        assert_eq!(frames[4].batch().unwrap(), sample_batch(4));
        assert_eq!(frames[5].keepalive().unwrap(), 9);
        assert_eq!(frames[2].keepalive().unwrap(), 0xDEAD_BEEF_0000_0001);
        // The batch is highly compressible: compression must actually happen.
        if compress {
            assert!(stats.wire_bytes < stats.raw_bytes, "{stats:?}");
        } else {
            assert!(stats.wire_bytes > stats.raw_bytes);
        }
    }
}

#[test]
fn compression_only_kept_when_smaller() {
    let mut enc = FrameEncoder::new();
    let compressible = vec![0u8; 100_000];
    let f = enc
        .encode(FrameKind::ExtentBatch, &compressible, true)
        .unwrap();
    assert!(f.is_compressed());
    assert!(f.wire_len() < 1000);
    assert_eq!(f.raw_len(), 100_000);

    let random = noise(100_000, 1);
    let f = enc.encode(FrameKind::ExtentBatch, &random, true).unwrap();
    assert!(!f.is_compressed(), "random data must be sent raw");
    assert_eq!(f.wire_len(), HEADER_LEN + random.len());

    // The encoder stays usable after zstd failed on a too-small buffer.
    let f = enc
        .encode(FrameKind::ExtentBatch, &compressible, true)
        .unwrap();
    assert!(f.is_compressed());

    let empty = enc.encode(FrameKind::Control, b"", true).unwrap();
    assert!(!empty.is_compressed());
    assert_eq!(empty.wire_len(), HEADER_LEN);
}

#[tokio::test]
async fn empty_stream_is_clean_eof_and_empty_payload_roundtrips() {
    assert_eq!(read_one(&[]).await.unwrap(), None);
    let f = encode_frame(FrameKind::Control, b"", false).unwrap();
    let frames = read_all(f.as_bytes()).await.unwrap();
    assert_eq!(frames, vec![Frame::new(FrameKind::Control, Bytes::new())]);
}

/// Every single-bit flip anywhere in a frame is rejected, with the error
/// naming the damaged part.
#[tokio::test]
async fn every_bit_flip_is_rejected() {
    let payloads: [(&[u8], bool); 2] = [
        (b"{\"a\":1,\"b\":\"some control payload\"}", false),
        (&[7u8; 4000], true),
    ];
    for (payload, compress) in payloads {
        let good = encode_frame(FrameKind::Control, payload, compress).unwrap();
        assert_eq!(good.is_compressed(), compress);
        let good = good.as_bytes().to_vec();
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let err = read_one(&bad)
                .await
                .expect_err("flipped frame must be rejected");
            let ok = match bit / 8 {
                0..=3 => matches!(err, WireError::BadMagic { .. }),
                4 => matches!(err, WireError::UnsupportedVersion { .. }),
                5..=23 => matches!(err, WireError::HeaderChecksum { .. }),
                _ => matches!(err, WireError::Checksum { .. }),
            };
            assert!(ok, "bit {bit}: unexpected error {err}");
        }
    }
}

/// Cutting a stream at any byte inside a frame gives `Truncated`, never a
/// hang, a panic or a partial frame; cutting at a boundary gives clean EOF.
#[tokio::test]
async fn truncation_at_every_position() {
    let mut w = FrameWriter::new(Vec::new());
    w.write_control(&hello()).await.unwrap();
    w.write_batch(&sample_batch(1), true).await.unwrap();
    let wire = w.into_inner();
    let first_len = HEADER_LEN + encode_control(&hello()).unwrap().len();
    for cut in 0..wire.len() {
        let res = tokio::time::timeout(Duration::from_secs(5), read_all(&wire[..cut]))
            .await
            .expect("no hang");
        match cut {
            0 => assert!(res.unwrap().is_empty()),
            c if c == first_len => assert_eq!(res.unwrap().len(), 1),
            _ => assert!(
                matches!(res, Err(WireError::Truncated)),
                "cut at {cut}: {res:?}"
            ),
        }
    }
    assert_eq!(read_all(&wire).await.unwrap().len(), 2);
}

#[tokio::test]
async fn oversized_lengths_rejected_before_reading_or_allocating() {
    let max = MAX_FRAME as u32;
    // No payload bytes follow: if the reader tried to read the payload it
    // would report Truncated, so TooLarge proves the check comes first.
    for (flags, payload_len, raw_len) in [
        (0, max + 1, max + 1),
        (0, u32::MAX, u32::MAX),
        (FLAG_ZSTD, 10, max + 1),
        (FLAG_ZSTD, u32::MAX, 10),
    ] {
        let bytes = forged(1, flags, 0, payload_len, raw_len, b"");
        let mut r = FrameReader::new(&bytes[..]);
        let err = r.read_frame().await.unwrap_err();
        assert!(
            matches!(err, WireError::TooLarge { max: m, .. } if m == MAX_FRAME as u64),
            "{err}"
        );
        assert!(
            r.buf.capacity() <= 128 * 1024,
            "allocated {} bytes",
            r.buf.capacity()
        );
        // And the reader is poisoned afterwards.
        assert!(matches!(r.read_frame().await, Err(WireError::Poisoned)));
    }
    // A configured smaller limit applies on both sides.
    let f = encode_frame(FrameKind::ExtentBatch, &[1u8; 2000], false).unwrap();
    let err = FrameReader::new(&f.as_bytes()[..])
        .with_max_frame(1024)
        .read_frame()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            WireError::TooLarge {
                len: 2000,
                max: 1024
            }
        ),
        "{err}"
    );
    let err = FrameEncoder::new()
        .with_max_frame(1024)
        .encode(FrameKind::ExtentBatch, &[1u8; 2000], false)
        .unwrap_err();
    assert!(matches!(err, WireError::TooLarge { .. }));
    // The writer refuses what the reader would refuse.
    let too_big = vec![0u8; MAX_FRAME + 1];
    let err = FrameWriter::new(Vec::new())
        .write_frame(FrameKind::ExtentBatch, &too_big, true)
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::TooLarge { .. }));
}

#[tokio::test]
async fn invalid_header_fields_rejected() {
    let cases: [(u8, u8, u8, u32, u32); 4] = [
        (9, 0, 0, 4, 4),    // unknown kind
        (1, 0b10, 0, 4, 4), // unknown flag
        (1, 0, 1, 4, 4),    // reserved byte set
        (1, 0, 0, 4, 5),    // uncompressed with raw_len != payload_len
    ];
    for (kind, flags, reserved, pl, rl) in cases {
        let err = read_one(&forged(kind, flags, reserved, pl, rl, b"abcd"))
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::BadHeader(_)), "{err}");
    }
    let mut v = forged(1, 0, 0, 4, 4, b"abcd");
    v[4] = 2;
    assert!(matches!(
        read_one(&v).await,
        Err(WireError::UnsupportedVersion { got: 2 })
    ));
}

#[tokio::test]
async fn zstd_bomb_and_garbage_rejected() {
    let big = zstd::bulk::compress(&vec![0u8; 4 * 1024 * 1024], 1).unwrap();
    assert!(big.len() < 1024);
    // Declares 100 bytes but expands to 4 MiB.
    let err = read_one(&forged(2, FLAG_ZSTD, 0, big.len() as u32, 100, &big))
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::Decompress(_)), "{err}");
    // Declares more than it expands to.
    let small = zstd::bulk::compress(&[5u8; 1000], 1).unwrap();
    let err = read_one(&forged(2, FLAG_ZSTD, 0, small.len() as u32, 2000, &small))
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::Decompress(_)), "{err}");
    // Not zstd at all, with valid checksums.
    let err = read_one(&forged(2, FLAG_ZSTD, 0, 16, 64, &[0x55; 16]))
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::Decompress(_)), "{err}");
    // The exact declared size is fine.
    let f = read_one(&forged(2, FLAG_ZSTD, 0, small.len() as u32, 1000, &small))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&f.payload[..], &[5u8; 1000][..]);
}

#[tokio::test]
async fn typed_decoders_check_kind_and_content() {
    let ka = Frame::new(FrameKind::Keepalive, encode_keepalive(1));
    assert!(matches!(
        ka.control::<Hello>(),
        Err(WireError::UnexpectedKind {
            expected: FrameKind::Control,
            got: FrameKind::Keepalive
        })
    ));
    assert!(matches!(ka.batch(), Err(WireError::UnexpectedKind { .. })));
    let bad_json = Frame::new(
        FrameKind::Control,
        Bytes::from_static(b"{\"protocol_version\": \"x\""),
    );
    let err = bad_json.control::<Hello>().unwrap_err();
    assert!(matches!(err, WireError::BadControl(_)));
    assert!(err.to_string().starts_with("invalid control message"));
    let short = Frame::new(FrameKind::Keepalive, Bytes::from_static(b"1234"));
    assert!(matches!(
        short.keepalive(),
        Err(WireError::BadKeepalive { len: 4 })
    ));
}

/// `read_frame` can be cancelled mid-frame (timeout / select!) without
/// losing bytes.
#[tokio::test(start_paused = true)]
async fn read_frame_is_cancel_safe() {
    let (mut tx, rx) = tokio::io::duplex(1 << 20);
    let mut r = FrameReader::new(rx);
    let f = encode_frame(
        FrameKind::ExtentBatch,
        &sample_batch(1).encode().unwrap(),
        false,
    )
    .unwrap();
    let bytes = f.as_bytes();
    for part in [&bytes[..10], &bytes[10..HEADER_LEN + 100]] {
        tx.write_all(part).await.unwrap();
        let res = r.read_frame_timeout(Duration::from_millis(50)).await;
        assert!(matches!(res, Err(WireError::IdleTimeout { .. })), "{res:?}");
    }
    tx.write_all(&bytes[HEADER_LEN + 100..]).await.unwrap();
    let got = r.read_frame().await.unwrap().unwrap();
    assert_eq!(got.batch().unwrap(), sample_batch(1));
    drop(tx);
    assert_eq!(r.read_frame().await.unwrap(), None);
    assert_eq!(r.stats().frames, 1);
}

#[tokio::test]
async fn encoded_frames_forward_verbatim() {
    let mut w = FrameWriter::new(Vec::new());
    for (kind, payload) in samples() {
        w.write_frame(kind, &payload, true).await.unwrap();
    }
    let wire = w.into_inner();
    let mut r = FrameReader::new(&wire[..]);
    let mut w2 = FrameWriter::new(Vec::new());
    while let Some(e) = r.read_encoded().await.unwrap() {
        w2.write_encoded(&e).await.unwrap();
    }
    assert_eq!(w2.into_inner(), wire);
}

// ---------------------------------------------------------------- batches

fn raw_batch(seq: u64, extents: &[(u16, u8, u64, u64, &[u8])]) -> Bytes {
    let mut v = Vec::new();
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    for (disk, tag, off, len, data) in extents {
        v.extend_from_slice(&disk.to_le_bytes());
        v.push(*tag);
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(data);
    }
    v.into()
}

#[test]
fn batch_roundtrip_and_zero_copy() {
    let b = sample_batch(77);
    let enc = b.encode().unwrap();
    assert_eq!(enc.len(), b.encoded_len());
    let dec = ExtentBatch::decode(enc.clone()).unwrap();
    assert_eq!(dec, b);
    assert_eq!(dec.data_bytes(), 8192 + 3000 + 4);
    dec.expect_seq(77).unwrap();
    assert!(matches!(dec.expect_seq(76), Err(WireError::BadBatch(_))));
    if let ExtentKind::Data(d) = &dec.extents[0].kind {
        assert!(
            enc.as_ptr_range().contains(&d.as_ptr()),
            "data extents must slice the payload"
        );
    }
    let empty = ExtentBatch::new(5);
    assert_eq!(ExtentBatch::decode(empty.encode().unwrap()).unwrap(), empty);
    // Extents touching the very end of the u64 range are legal.
    let edge = ExtentBatch {
        seq: 1,
        extents: vec![Extent::zeroes(0, u64::MAX - 10, 10)],
    };
    assert_eq!(ExtentBatch::decode(edge.encode().unwrap()).unwrap(), edge);
}

#[test]
fn bad_batches_rejected() {
    let cases: Vec<(&str, Bytes)> = vec![
        ("short header", Bytes::from_static(&[0u8; 11])),
        (
            "offset+len overflow (zeroes)",
            raw_batch(1, &[(0, 1, u64::MAX - 5, 6, b"")]),
        ),
        (
            "offset+len overflow (data)",
            raw_batch(1, &[(0, 0, u64::MAX, 1, b"x")]),
        ),
        ("empty extent", raw_batch(1, &[(0, 1, 0, 0, b"")])),
        ("unknown tag", raw_batch(1, &[(0, 7, 0, 1, b"")])),
        ("data len past end", raw_batch(1, &[(0, 0, 0, 10, b"abc")])),
        (
            "data len huge",
            raw_batch(1, &[(0, 0, 0, u64::MAX, b"abc")]),
        ),
        (
            "overlap",
            raw_batch(1, &[(3, 1, 0, 4096, b""), (3, 0, 4095, 2, b"ab")]),
        ),
        (
            "duplicate extent",
            raw_batch(1, &[(0, 0, 8, 2, b"ab"), (0, 0, 8, 2, b"ab")]),
        ),
        ("trailing bytes", {
            let mut v = raw_batch(1, &[(0, 0, 0, 2, b"ab")]).to_vec();
            v.push(0);
            v.into()
        }),
        ("count too large", {
            let mut v = raw_batch(1, &[(0, 0, 0, 2, b"ab")]).to_vec();
            v[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
            v.into()
        }),
        ("count too small", {
            let mut v = raw_batch(1, &[(0, 0, 0, 2, b"ab"), (0, 1, 2, 2, b"")]).to_vec();
            v[8..12].copy_from_slice(&1u32.to_le_bytes());
            v.into()
        }),
    ];
    for (what, payload) in cases {
        let res = ExtentBatch::decode(payload);
        assert!(
            matches!(res, Err(WireError::BadBatch(_))),
            "{what}: {res:?}"
        );
    }
    // Same extents on different disks do not overlap.
    ExtentBatch::decode(raw_batch(1, &[(0, 0, 8, 2, b"ab"), (1, 0, 8, 2, b"ab")])).unwrap();
    // The encoder enforces the same invariants.
    for bad in [
        vec![Extent::zeroes(0, u64::MAX, 1)],
        vec![Extent::data(0, 0, Bytes::new())],
        vec![Extent::zeroes(0, 0, 10), Extent::zeroes(0, 5, 10)],
    ] {
        let res = ExtentBatch {
            seq: 0,
            extents: bad,
        }
        .encode();
        assert!(matches!(res, Err(WireError::BadBatch(_))), "{res:?}");
    }
}

/// Truncated or mutated batch payloads never panic and never decode to
/// something that breaks the invariants.
#[test]
fn garbled_batches_never_panic() {
    let good = sample_batch(9).encode().unwrap();
    for cut in 0..good.len() {
        assert!(ExtentBatch::decode(good.slice(..cut)).is_err(), "cut {cut}");
    }
    // Small batch so every byte position gets mutated.
    let small = raw_batch(2, &[(0, 0, 100, 3, b"abc"), (1, 1, 5, 9, b"")]);
    for pos in 0..small.len() {
        for val in [0u8, 1, 2, 0x7f, 0xff] {
            let mut v = small.to_vec();
            v[pos] = val;
            if let Ok(b) = ExtentBatch::decode(v.into()) {
                b.validate().unwrap();
            }
        }
    }
}

#[test]
fn batch_builder_splits_and_numbers() {
    let max = 64 * 1024;
    let mut b = BatchBuilder::new(10, max);
    let big = noise(300_000, 3);
    let mut out = b.push(Extent::data(2, 1 << 20, big.clone()));
    out.extend(b.push(Extent::zeroes(2, 0, 4096)));
    out.extend(b.push(Extent::zeroes(2, 8192, 0))); // ignored
    for i in 0..5000u64 {
        out.extend(b.push(Extent::zeroes(3, i * 8192, 4096)));
    }
    out.extend(b.finish());
    assert!(b.finish().is_none());
    assert_eq!(b.next_seq(), 10 + out.len() as u64);
    let mut data = Vec::new();
    let mut zero_extents = 0;
    for (i, batch) in out.iter().enumerate() {
        assert_eq!(batch.seq, 10 + i as u64);
        let enc = batch.encode().unwrap();
        assert!(enc.len() <= max, "batch {i} is {} bytes", enc.len());
        for e in &batch.extents {
            match &e.kind {
                ExtentKind::Data(d) => {
                    assert_eq!(e.offset, (1 << 20) + data.len() as u64);
                    data.extend_from_slice(d);
                }
                ExtentKind::Zeroes(_) => zero_extents += 1,
            }
        }
    }
    assert_eq!(data, big);
    assert_eq!(zero_extents, 5001);
}

// ---------------------------------------------------------------- spool

async fn write_spool(path: &std::path::Path, n: u64) -> SpoolSummary {
    let mut s = SpoolWriter::create(path).await.unwrap();
    assert_eq!(s.append_control(&hello()).await.unwrap(), 0);
    for i in 1..n - 1 {
        assert_eq!(
            s.append_batch(&sample_batch(i), i % 2 == 0).await.unwrap(),
            i
        );
    }
    s.sync().await.unwrap();
    s.append(FrameKind::Keepalive, &encode_keepalive(n), false)
        .await
        .unwrap();
    assert_eq!(s.frames(), n);
    s.finish().await.unwrap()
}

#[tokio::test]
async fn spool_write_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cycle.spool");
    let sum = write_spool(&path, 20).await;
    assert_eq!(sum.frames, 20);
    assert_eq!(sum.bytes, std::fs::metadata(&path).unwrap().len());

    let mut r = SpoolReader::open(&path).await.unwrap();
    assert_eq!(
        r.next_frame()
            .await
            .unwrap()
            .unwrap()
            .control::<Hello>()
            .unwrap(),
        hello()
    );
    for i in 1..19 {
        assert_eq!(r.index(), i);
        assert_eq!(
            r.next_frame().await.unwrap().unwrap().batch().unwrap(),
            sample_batch(i)
        );
    }
    assert_eq!(
        r.next_frame().await.unwrap().unwrap().keepalive().unwrap(),
        20
    );
    assert_eq!(r.next_frame().await.unwrap(), None);
    assert_eq!(r.index(), 20);
}

#[tokio::test]
async fn spool_resume_from_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cycle.spool");
    write_spool(&path, 20).await;
    for start in [1u64, 7, 18] {
        let mut r = SpoolReader::open_at(&path, start).await.unwrap();
        let mut seq = start;
        while let Some(f) = r.next_frame().await.unwrap() {
            if f.kind == FrameKind::ExtentBatch {
                assert_eq!(f.batch().unwrap().seq, seq);
            }
            seq += 1;
        }
        assert_eq!(seq, 20);
    }
    let mut r = SpoolReader::open_at(&path, 20).await.unwrap();
    assert_eq!(r.next_encoded().await.unwrap(), None);
    let err = SpoolReader::open_at(&path, 21).await.unwrap_err();
    assert!(
        matches!(
            err,
            WireError::SpoolIndex {
                requested: 21,
                available: 20
            }
        ),
        "{err}"
    );

    // Resume and forward verbatim: the receiver sees frames 7.. intact.
    let mut r = SpoolReader::open_at(&path, 7).await.unwrap();
    let mut w = FrameWriter::new(Vec::new());
    while let Some(e) = r.next_encoded().await.unwrap() {
        w.write_encoded(&e).await.unwrap();
    }
    let frames = read_all(&w.into_inner()).await.unwrap();
    assert_eq!(frames.len(), 13);
    assert_eq!(frames[0].batch().unwrap(), sample_batch(7));
}

#[tokio::test]
async fn damaged_spool_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cycle.spool");
    let sum = write_spool(&path, 5).await;
    let good = std::fs::read(&path).unwrap();

    // Torn tail (crash during write): Truncated, both reading and skipping.
    std::fs::write(&path, &good[..good.len() - 3]).unwrap();
    let mut r = SpoolReader::open(&path).await.unwrap();
    let mut res = Ok(None);
    for _ in 0..5 {
        res = r.next_frame().await;
        if res.is_err() {
            break;
        }
    }
    assert!(matches!(res, Err(WireError::Truncated)), "{res:?}");
    let err = SpoolReader::open_at(&path, 5).await.unwrap_err();
    assert!(matches!(err, WireError::Truncated), "{err}");

    // Flipped payload byte in the middle of the file.
    let mut bad = good.clone();
    let mid = (sum.bytes / 2) as usize;
    bad[mid] ^= 0x40;
    std::fs::write(&path, &bad).unwrap();
    let mut r = SpoolReader::open(&path).await.unwrap();
    let err = loop {
        match r.next_frame().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("corruption not detected"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            err,
            WireError::Checksum { .. } | WireError::HeaderChecksum { .. }
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------- rate limiting

const MB: u64 = 1_000_000;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn rate_limiter_math() {
    // 10 MB at 5 MB/s, starting with a 0.5 MB (0.1 s) burst: 1.9 s.
    let l = RateLimiter::new(5 * MB);
    let t = tokio::time::Instant::now();
    for _ in 0..10 {
        l.acquire(MB).await;
    }
    let e = secs(t.elapsed());
    assert!((1.89..1.92).contains(&e), "took {e}");

    // After idling, only one burst worth is free again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let t = tokio::time::Instant::now();
    l.acquire(MB / 2).await;
    assert_eq!(t.elapsed(), Duration::ZERO);
    l.acquire(MB).await;
    let e = secs(t.elapsed());
    assert!((0.19..0.21).contains(&e), "took {e}");

    // A single request larger than the burst works.
    let l = RateLimiter::new(MB);
    let t = tokio::time::Instant::now();
    l.acquire(3 * MB).await;
    let e = secs(t.elapsed());
    assert!((2.89..2.92).contains(&e), "took {e}");

    // Unlimited never waits.
    let t = tokio::time::Instant::now();
    let u = RateLimiter::unlimited();
    u.acquire(u64::MAX).await;
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(u.rate(), None);
    assert!(RateLimiter::shared(None).is_none());
    assert!(RateLimiter::shared(Some(0)).is_none());
    assert_eq!(RateLimiter::shared(Some(7)).unwrap().rate(), Some(7));
}

#[tokio::test(start_paused = true)]
async fn rate_limiter_shared_and_stacked() {
    // Two tasks share one 5 MB/s limiter: 10 MB total still takes ~1.9 s.
    let l = Arc::new(RateLimiter::new(5 * MB));
    let t = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let l = l.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    l.acquire(MB / 10).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let e = secs(t.elapsed());
    assert!((1.89..1.92).contains(&e), "took {e}");

    // Relationship limit 5 MB/s and host limit 2 MB/s: the host limit
    // governs (10 MB - 0.2 MB burst) / 2 MB/s = 4.9 s, not the sum.
    let rel = Arc::new(RateLimiter::new(5 * MB));
    let host = Arc::new(RateLimiter::new(2 * MB));
    let both = [rel, host];
    let t = tokio::time::Instant::now();
    for _ in 0..100 {
        RateLimiter::acquire_all(&both, MB / 10).await;
    }
    let e = secs(t.elapsed());
    assert!((4.89..4.92).contains(&e), "took {e}");

    // Rate can be changed on the fly.
    let l = RateLimiter::new(MB);
    l.acquire(MB / 10).await; // spend the burst
    l.set_rate(4 * MB);
    let t = tokio::time::Instant::now();
    l.acquire(2 * MB).await;
    let e = secs(t.elapsed());
    assert!((0.49..0.51).contains(&e), "took {e}");
    l.set_rate(0);
    let t = tokio::time::Instant::now();
    l.acquire(100 * MB).await;
    assert_eq!(t.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn frame_writer_honours_limiter() {
    let mut w = FrameWriter::new(tokio::io::sink());
    w.add_limiter(Arc::new(RateLimiter::new(5 * MB)));
    let payload = noise(1_000_000 - HEADER_LEN, 5);
    let t = tokio::time::Instant::now();
    for _ in 0..10 {
        w.write_frame(FrameKind::ExtentBatch, &payload, false)
            .await
            .unwrap();
    }
    assert_eq!(w.stats().wire_bytes, 10 * MB);
    let e = secs(t.elapsed());
    assert!((1.88..1.92).contains(&e), "took {e}");
}

#[test]
fn errors_are_one_line() {
    let errs = [
        WireError::BadMagic { got: *b"HTTP" },
        WireError::UnsupportedVersion { got: 9 },
        WireError::TooLarge {
            len: 1 << 30,
            max: MAX_FRAME as u64,
        },
        WireError::HeaderChecksum {
            expected: 1,
            got: 2,
        },
        WireError::Checksum {
            expected: 1,
            got: 2,
        },
        WireError::Truncated,
        WireError::Decompress("x".into()),
        WireError::BadBatch("x".into()),
        WireError::SpoolIndex {
            requested: 3,
            available: 2,
        },
        WireError::IdleTimeout { secs: 60.0 },
    ];
    for e in errs {
        let s = e.to_string();
        assert!(!s.contains('\n') && !s.is_empty(), "{s}");
    }
}

#[test]
fn a_batch_frame_encoded_in_one_copy_is_the_same_frame() {
    for seq in [0u64, 7, 1 << 40] {
        let batch = sample_batch(seq);
        for compress in [false, true] {
            let two_steps = FrameEncoder::new()
                .encode(FrameKind::ExtentBatch, &batch.encode().unwrap(), compress)
                .unwrap();
            let one_copy = FrameEncoder::new().encode_batch(&batch, compress).unwrap();
            assert_eq!(one_copy, two_steps, "seq {seq}, compress {compress}");
        }
    }
    // Over the frame limit: refused, as `encode` refuses the payload.
    let big = ExtentBatch {
        seq: 1,
        extents: vec![Extent::data(0, 0, Bytes::from(vec![7u8; 4096]))],
    };
    let err = FrameEncoder::new()
        .with_max_frame(1024)
        .encode_batch(&big, false)
        .unwrap_err();
    assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
}
