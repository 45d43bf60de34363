//! Content hashes of disk chunks, for resynchronization and for an initial copy from an
//! existing copy on the replica: both sides hash the same chunks of a disk (the primary its
//! frozen view, the replica its latest recovery point or the existing copy), and only the
//! chunks whose hashes differ are shipped. Holes are never read: a chunk the NBD server
//! reports as zeros gets the hash of zeros.

use ferry_nbd::{Extent as NbdExtent, NbdClient, BASE_ALLOCATION, STATE_ZERO};

/// Smallest chunk hashed.
pub const MIN_CHUNK: u64 = 1 << 20;
/// Chunks get larger for big disks so one disk's hashes stay within one control frame.
const MAX_CHUNKS: u64 = 65_536;

/// A chunk's hash: BLAKE3, first 128 bits.
pub type Hash = [u8; 16];

/// The chunk size both sides use for a disk of `size` bytes.
pub fn chunk_size(size: u64) -> u64 {
    let mut c = MIN_CHUNK;
    while size.div_ceil(c) > MAX_CHUNKS {
        c *= 2;
    }
    c
}

/// Number of chunks of a disk.
pub fn chunks(size: u64) -> u64 {
    size.div_ceil(chunk_size(size))
}

/// Hash of some bytes.
pub fn hash(data: &[u8]) -> Hash {
    let h = blake3::hash(data);
    h.as_bytes()[..16].try_into().expect("16 bytes")
}

/// Hash of `len` zero bytes.
pub fn zero_hash(len: u64) -> Hash {
    static ZEROS: [u8; 65_536] = [0; 65_536];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        h.update(&ZEROS[..n as usize]);
        left -= n;
    }
    h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
}

/// For each chunk of `[0, size)`, whether the allocation map says it reads as zeros.
pub fn zero_chunks(map: &[NbdExtent], size: u64) -> Vec<bool> {
    let chunk = chunk_size(size);
    let mut zeros = vec![true; chunks(size) as usize];
    for e in map.iter().filter(|e| e.flags & STATE_ZERO == 0) {
        if e.length == 0 || e.offset >= size {
            continue;
        }
        let first = e.offset / chunk;
        let last = (e.offset + e.length).min(size).saturating_sub(1) / chunk;
        for z in &mut zeros[first as usize..=last as usize] {
            *z = false;
        }
    }
    zeros
}

/// Hashes every chunk of a disk exported over NBD (with `base:allocation`).
pub async fn hash_disk(client: &mut NbdClient, size: u64) -> anyhow::Result<Vec<Hash>> {
    let chunk = chunk_size(size);
    let map = client.map(BASE_ALLOCATION).await?;
    let zeros = zero_chunks(&map, size);
    let mut out = Vec::with_capacity(zeros.len());
    // Chunks grow with the disk (1 GiB on a 64 TiB one): read each in bounded pieces.
    let mut buf = Vec::new();
    for (i, zero) in zeros.iter().enumerate() {
        let offset = i as u64 * chunk;
        let len = chunk.min(size - offset);
        if *zero {
            out.push(zero_hash(len));
        } else {
            let mut h = blake3::Hasher::new();
            let mut done = 0;
            while done < len {
                let n = (len - done).min(READ_PIECE);
                buf.resize(n as usize, 0);
                client.read(offset + done, &mut buf).await?;
                h.update(&buf);
                done += n;
            }
            out.push(h.finalize().as_bytes()[..16].try_into().expect("16 bytes"));
        }
    }
    Ok(out)
}

/// The most read from a disk at once while hashing.
const READ_PIECE: u64 = 4 << 20;

/// Hashes as one hex string (compact in a JSON control message).
pub fn encode(hashes: &[Hash]) -> String {
    super::proto::to_hex(hashes.as_flattened())
}

/// The inverse of [`encode`].
pub fn decode(s: &str) -> anyhow::Result<Vec<Hash>> {
    let bytes = s.as_bytes();
    if bytes.len() % 32 != 0 {
        anyhow::bail!(
            "a hash list of {} hex digits is not a multiple of 32",
            bytes.len()
        );
    }
    let digit = |c: u8| -> anyhow::Result<u8> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => anyhow::bail!("{:?} is not a hex digit", c as char),
        }
    };
    bytes
        .chunks_exact(32)
        .map(|h| {
            let mut out = [0u8; 16];
            for (i, o) in out.iter_mut().enumerate() {
                *o = digit(h[2 * i])? << 4 | digit(h[2 * i + 1])?;
            }
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_keeps_hash_lists_bounded() {
        assert_eq!(chunk_size(64 << 20), MIN_CHUNK);
        assert_eq!(chunks(64 << 20), 64);
        assert_eq!(chunks((64 << 20) + 1), 65);
        assert_eq!(chunk_size(64 << 30), MIN_CHUNK);
        assert_eq!(chunk_size(1 << 40), 16 << 20);
        assert!(chunks(1 << 40) <= MAX_CHUNKS);
    }

    #[test]
    fn zero_hash_equals_hash_of_zeros_and_hex_round_trips() {
        assert_eq!(zero_hash(100_000), hash(&vec![0u8; 100_000]));
        assert_ne!(zero_hash(4096), hash(&[1u8; 4096]));
        let hs = vec![hash(b"a"), zero_hash(7)];
        assert_eq!(decode(&encode(&hs)).unwrap(), hs);
        assert!(decode("abc").is_err());
        assert!(decode(&"g".repeat(32)).is_err());
    }

    #[test]
    fn zero_chunks_follow_the_allocation_map() {
        let mb = 1 << 20;
        let map = [
            NbdExtent {
                offset: 0,
                length: mb,
                flags: STATE_ZERO,
            },
            NbdExtent {
                offset: mb,
                length: 10,
                flags: 0,
            },
            NbdExtent {
                offset: mb + 10,
                length: 3 * mb - 10,
                flags: STATE_ZERO | 1,
            },
        ];
        assert_eq!(zero_chunks(&map, 4 * mb), vec![true, false, true, true]);
    }
}
