//! Host-side model of the verifiable test guest (`guest/init`, built by `guest/build.sh`).
//!
//! The guest writes 4 KiB blocks to `/dev/vda`. Write number `seq` (counting from 1) goes to
//! the block chosen by a linear congruential generator seeded with `guest.seed`
//! (`x = (x * 1103515245 + 12345) mod 2^31`, `blk = x mod nblocks`), and its content is a
//! 64-byte text line naming `seq`, `blk` and a checksum, repeated 64 times. Because every
//! write is `O_DIRECT` + `fsync`ed and announced on the console only afterwards, a consistent
//! copy of the disk (snapshot, replica, restored backup) must equal "zeros + writes `1..=M`
//! applied in order" for some `M`; [`verify_prefix`] checks exactly that.
//!
//! Console protocol (one line each, on ttyS0): `GUEST: NET <if>`, `GUEST: READY ...`,
//! `GUEST: WROTE seq=N blk=B`, `GUEST: DONE last_seq=N`, `GUEST: POWERDOWN`; see
//! [`parse_console`].
//!
//! Guest agent: when QEMU gives the guest a virtio-serial port named
//! `org.qemu.guest_agent.0`, the guest answers a subset of the QGA protocol on it (one JSON
//! command per line, one JSON reply per line): `guest-sync`, `guest-ping`,
//! `guest-fsfreeze-freeze` / `-thaw` / `-status`; anything else gets a `CommandNotFound`
//! error. Freezing lets the write in flight complete and pauses the writer before the next
//! one; the guest then prints `GUEST: FROZEN seq=N` (N = the last announced write, so a
//! disk copy taken while frozen verifies with `last_seq == N`) before replying
//! `{"return": 1}`. Thawing prints `GUEST: THAWED` and the writes resume. The agent also
//! prints `GUEST: AGENT <device>` once it listens.

/// Size of one guest write (and of one model block), in bytes.
pub const BLOCK_SIZE: usize = 4096;

/// Modulus of the guest's LCG (2^31).
const LCG_MOD: u64 = 1 << 31;

/// Parameters of the guest's write workload, passed on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestWorkload {
    /// LCG seed (`guest.seed`). Must be below 2^31 for the guest's shell arithmetic to
    /// match this model.
    pub seed: u64,
    /// Sequence number of the first write of this boot (`guest.start`, ≥ 1); use
    /// `last_seq + 1` to continue a sequence after a reboot.
    pub start: u64,
    /// Number of 4 KiB blocks the writes are confined to (`guest.span`); 0 = whole disk.
    /// The guest uses `min(span_blocks, disk blocks)`.
    pub span_blocks: u64,
}

impl Default for GuestWorkload {
    /// The guest's own defaults: seed 12345, start 1, whole disk.
    fn default() -> Self {
        GuestWorkload {
            seed: 12345,
            start: 1,
            span_blocks: 0,
        }
    }
}

impl GuestWorkload {
    /// Kernel command line for this workload: `console=ttyS0 quiet panic=-1` plus the
    /// `guest.*` parameters. `writes` is the number of writes (0 = forever), `interval_s`
    /// the pause after each write in seconds.
    pub fn kernel_args(&self, writes: u64, interval_s: f64) -> String {
        format!(
            "console=ttyS0 quiet panic=-1 guest.writes={writes} guest.interval={interval_s} \
             guest.seed={} guest.start={} guest.span={}",
            self.seed, self.start, self.span_blocks
        )
    }
}

/// One step of the guest's LCG.
fn lcg_next(x: u64) -> u64 {
    x.wrapping_mul(1_103_515_245).wrapping_add(12_345) % LCG_MOD
}

/// Block index (in 4 KiB units) written by write number `seq` (≥ 1) of the sequence seeded
/// with `seed`, on a disk of `nblocks` blocks. Independent of the boot's `start`: the guest
/// advances its LCG past writes `1..start` first. O(seq).
///
/// # Panics
/// If `seq == 0` or `nblocks == 0`.
pub fn block_for_seq(seed: u64, seq: u64, nblocks: u64) -> u64 {
    assert!(seq >= 1, "write sequence numbers start at 1");
    assert!(nblocks >= 1, "nblocks must be at least 1");
    let mut x = seed;
    for _ in 0..seq {
        x = lcg_next(x);
    }
    x % nblocks
}

/// The text unit the guest repeats: `printf '%-63s|'` of the line
/// `CBT seq=%08d blk=%08d sum=%010d` (64 bytes while `seq` and `blk` have ≤ 8 digits).
fn content_unit(seq: u64, blk: u64) -> Vec<u8> {
    let sum = seq
        .wrapping_mul(2_654_435_761)
        .wrapping_add(blk.wrapping_mul(40_503))
        .wrapping_add(12_345)
        & 0xffff_ffff;
    let line = format!("CBT seq={seq:08} blk={blk:08} sum={sum:010}");
    format!("{line:<63}|").into_bytes()
}

/// The exact 4096 bytes the guest writes for write `seq` at block `blk`.
pub fn block_content(seq: u64, blk: u64) -> Vec<u8> {
    let unit = content_unit(seq, blk);
    // The guest writes 64 copies of the unit and `dd` takes the first 4096 bytes.
    unit.iter().copied().cycle().take(BLOCK_SIZE).collect()
}

/// Result of a successful [`verify_prefix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Highest write sequence number found on the disk (0 if the disk holds no writes).
    pub last_seq: u64,
    /// Number of 4 KiB blocks compared against the model.
    pub blocks_checked: u64,
}

/// What one disk block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// All zeros.
    Zeros,
    /// The exact content of write `seq` at this block's position.
    Write(u64),
    /// Anything else; `header` is `(seq, blk)` if the first line parses as a guest line.
    Other { header: Option<(u64, u64)> },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Zeros => write!(f, "zeros"),
            Found::Write(seq) => write!(f, "write seq={seq}"),
            Found::Other {
                header: Some((seq, blk)),
            } => {
                write!(
                    f,
                    "torn or corrupt data (first line claims seq={seq} blk={blk})"
                )
            }
            Found::Other { header: None } => write!(f, "unrecognised data"),
        }
    }
}

/// Parses `CBT seq=<digits> blk=<digits> ` at the start of a block.
fn parse_header(block: &[u8]) -> Option<(u64, u64)> {
    let rest = block.strip_prefix(b"CBT seq=")?;
    let (seq, rest) = take_number(rest)?;
    let rest = rest.strip_prefix(b" blk=")?;
    let (blk, _) = take_number(rest)?;
    Some((seq, blk))
}

/// Splits off a leading decimal number (at most 19 digits).
fn take_number(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 19 {
        return None;
    }
    let v = std::str::from_utf8(&s[..n]).ok()?.parse().ok()?;
    Some((v, &s[n..]))
}

/// Classifies block number `index` of a disk image.
fn classify(block: &[u8], index: u64) -> Found {
    if block.iter().all(|&b| b == 0) {
        return Found::Zeros;
    }
    let header = parse_header(block);
    if let Some((seq, blk)) = header {
        if blk == index && seq >= 1 {
            let unit = content_unit(seq, blk);
            if block.chunks(unit.len()).all(|c| c == &unit[..c.len()]) {
                return Found::Write(seq);
            }
        }
    }
    Found::Other { header }
}

/// Checks that the first `nblocks` 4 KiB blocks of `disk` (a raw image) are exactly
/// "zeros + writes `1..=M` of the sequence seeded with `seed` applied in order", where `M` is
/// the highest write sequence number found intact on the disk: every block written by some
/// write ≤ `M` holds the content of the latest such write, every other block is zero.
/// `nblocks` is the guest's block count (`guest.span`, or the disk size / 4096 when the span
/// is 0 or larger); bytes beyond it are ignored.
///
/// Returns a one-line description of the first mismatch (torn, corrupt, stale, lost or
/// misplaced block). Runs in O(image size + M).
pub fn verify_prefix(disk: &[u8], seed: u64, nblocks: u64) -> Result<Verified, String> {
    let needed = usize::try_from(nblocks)
        .ok()
        .and_then(|n| n.checked_mul(BLOCK_SIZE))
        .ok_or_else(|| format!("nblocks={nblocks} is too large"))?;
    if disk.len() < needed {
        return Err(format!(
            "disk image has {} bytes, fewer than nblocks={nblocks} x {BLOCK_SIZE} = {needed}",
            disk.len()
        ));
    }
    let found: Vec<Found> = disk[..needed]
        .chunks_exact(BLOCK_SIZE)
        .zip(0u64..)
        .map(|(block, i)| classify(block, i))
        .collect();
    let last_seq = found
        .iter()
        .filter_map(|f| match f {
            Found::Write(seq) => Some(*seq),
            _ => None,
        })
        .max()
        .unwrap_or(0);

    // latest[i] = the last write <= last_seq to block i (0 = never written)
    let mut latest = vec![0u64; found.len()];
    let mut x = seed;
    for seq in 1..=last_seq {
        x = lcg_next(x);
        latest[(x % nblocks) as usize] = seq;
    }

    for (i, (&want, &got)) in latest.iter().zip(&found).enumerate() {
        let ok = match got {
            Found::Zeros => want == 0,
            Found::Write(seq) => want == seq,
            Found::Other { .. } => false,
        };
        if !ok {
            let expected = if want == 0 {
                "zeros (never written by writes 1..=M)".to_string()
            } else {
                format!("write seq={want}")
            };
            let why = match got {
                Found::Write(seq) if seq < want => " (stale)",
                Found::Write(_) => " (that write belongs elsewhere or later)",
                Found::Zeros => " (write lost)",
                Found::Other { .. } => "",
            };
            return Err(format!(
                "block {i} (byte offset {}): expected {expected}, found {got}{why}; \
                 highest intact write M={last_seq}",
                i as u64 * BLOCK_SIZE as u64
            ));
        }
    }
    Ok(Verified {
        last_seq,
        blocks_checked: nblocks,
    })
}

/// What the guest reported on its serial console.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleReport {
    /// A `GUEST: READY` line was seen (disk or `no-disk`).
    pub ready: bool,
    /// Sequence number of the last `GUEST: WROTE seq=N` line.
    pub last_wrote_seq: Option<u64>,
    /// `N` from `GUEST: DONE last_seq=N` (a finite run completed).
    pub done: Option<u64>,
    /// A `GUEST: POWERDOWN` line was seen (the guest handled the ACPI power button).
    pub powerdown: bool,
    /// `N` of every `GUEST: FROZEN seq=N` line, in order: the guest agent froze the writer
    /// after write `N` (the last write announced before the freeze).
    pub frozen: Vec<u64>,
    /// Number of `GUEST: THAWED` lines (the guest agent let the writer resume).
    pub thawed: u64,
}

impl ConsoleReport {
    /// The writer is frozen at the end of the log: more `FROZEN` than `THAWED` lines.
    pub fn is_frozen(&self) -> bool {
        self.frozen.len() as u64 > self.thawed
    }
}

/// Parses a guest console log. Tolerates `\r`, kernel messages and partial last lines;
/// `GUEST:` markers may appear anywhere within a line.
pub fn parse_console(log: &str) -> ConsoleReport {
    fn number(s: &str) -> Option<u64> {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        s[..n].parse().ok()
    }
    let mut report = ConsoleReport::default();
    for line in log.lines() {
        for (pos, _) in line.match_indices("GUEST: ") {
            let msg = &line[pos + "GUEST: ".len()..];
            if msg.starts_with("READY") {
                report.ready = true;
            } else if let Some(rest) = msg.strip_prefix("WROTE seq=") {
                if let Some(n) = number(rest) {
                    report.last_wrote_seq = Some(n);
                }
            } else if let Some(rest) = msg.strip_prefix("DONE last_seq=") {
                if let Some(n) = number(rest) {
                    report.done = Some(n);
                }
            } else if msg.starts_with("POWERDOWN") {
                report.powerdown = true;
            } else if let Some(rest) = msg.strip_prefix("FROZEN seq=") {
                if let Some(n) = number(rest) {
                    report.frozen.push(n);
                }
            } else if msg.starts_with("THAWED") {
                report.thawed += 1;
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies writes `from..=to` of `seed` to a zeroed-or-given image of `nblocks` blocks.
    fn apply(img: &mut [u8], seed: u64, nblocks: u64, from: u64, to: u64) {
        let mut x = seed;
        for seq in 1..=to {
            x = lcg_next(x);
            if seq >= from {
                let blk = x % nblocks;
                let off = blk as usize * BLOCK_SIZE;
                img[off..off + BLOCK_SIZE].copy_from_slice(&block_content(seq, blk));
            }
        }
    }

    fn image(seed: u64, nblocks: u64, writes: u64) -> Vec<u8> {
        let mut img = vec![0u8; nblocks as usize * BLOCK_SIZE];
        apply(&mut img, seed, nblocks, 1, writes);
        img
    }

    #[test]
    fn lcg_matches_real_guest_run() {
        // From a real boot: seed=12345 span=4096.
        assert_eq!(block_for_seq(12345, 1, 4096), 1662);
        assert_eq!(block_for_seq(12345, 2, 4096), 2015);
        assert_eq!(block_for_seq(12345, 20, 4096), 1893);
    }

    #[test]
    fn block_content_format() {
        let b = block_content(1, 1662);
        assert_eq!(b.len(), BLOCK_SIZE);
        let line = format!("{:<63}|", "CBT seq=00000001 blk=00001662 sum=2721764092");
        assert_eq!(line.len(), 64);
        assert_eq!(&b[..64], line.as_bytes());
        assert!(b.chunks(64).all(|c| c == line.as_bytes()));
        // sum wraps modulo 2^32
        let b = block_content(2, 0);
        assert!(b.starts_with(b"CBT seq=00000002 blk=00000000 sum=1013916571 "));
    }

    #[test]
    fn kernel_args_format() {
        let w = GuestWorkload {
            seed: 7,
            start: 21,
            span_blocks: 4096,
        };
        assert_eq!(
            w.kernel_args(0, 0.2),
            "console=ttyS0 quiet panic=-1 guest.writes=0 guest.interval=0.2 \
             guest.seed=7 guest.start=21 guest.span=4096"
        );
        assert!(GuestWorkload::default()
            .kernel_args(5, 1.0)
            .contains("guest.interval=1 "));
    }

    #[test]
    fn verify_ok_and_empty() {
        let img = image(7, 64, 500);
        assert_eq!(
            verify_prefix(&img, 7, 64),
            Ok(Verified {
                last_seq: 500,
                blocks_checked: 64
            })
        );
        let zero = vec![0u8; 64 * BLOCK_SIZE];
        assert_eq!(
            verify_prefix(&zero, 7, 64),
            Ok(Verified {
                last_seq: 0,
                blocks_checked: 64
            })
        );
        // bytes beyond nblocks are ignored; a reboot continuing at start=501 extends the prefix
        let mut img2 = image(7, 64, 300);
        apply(&mut img2, 7, 64, 301, 320);
        img2.extend_from_slice(&[0xaa; BLOCK_SIZE]);
        assert_eq!(verify_prefix(&img2, 7, 64).unwrap().last_seq, 320);
    }

    #[test]
    fn verify_detects_corruption() {
        let img = image(7, 64, 500);
        let blk = block_for_seq(7, 500, 64) as usize;

        let mut bad = img.clone();
        bad[blk * BLOCK_SIZE + 1000] ^= 1;
        let e = verify_prefix(&bad, 7, 64).unwrap_err();
        assert!(e.contains(&format!("block {blk} ")), "{e}");

        // torn: first half of the newest write over the previous content
        let mut torn = image(7, 64, 499);
        let off = blk * BLOCK_SIZE;
        torn[off..off + 2048].copy_from_slice(&block_content(500, blk as u64)[..2048]);
        let e = verify_prefix(&torn, 7, 64).unwrap_err();
        assert!(e.contains("torn or corrupt"), "{e}");

        // unknown garbage
        let mut junk = img.clone();
        junk[3 * BLOCK_SIZE..4 * BLOCK_SIZE].fill(0x5a);
        assert!(verify_prefix(&junk, 7, 64)
            .unwrap_err()
            .contains("block 3 "));

        // image too short
        assert!(verify_prefix(&img[..10], 7, 64).is_err());
    }

    #[test]
    fn verify_detects_out_of_order_and_lost_writes() {
        let nb = 64;
        // Two writes to the same block, the older one applied last -> stale.
        let m = 500;
        let (b, newest, older) = (0..nb)
            .filter(|&b| b != block_for_seq(7, m, nb))
            .find_map(|b| {
                let mut hits = (1..=m)
                    .filter(|&s| block_for_seq(7, s, nb) == b)
                    .collect::<Vec<_>>();
                let newest = hits.pop()?;
                Some((b, newest, hits.pop()?))
            })
            .unwrap();
        let mut img = image(7, nb, m);
        let off = b as usize * BLOCK_SIZE;
        img[off..off + BLOCK_SIZE].copy_from_slice(&block_content(older, b));
        let e = verify_prefix(&img, 7, nb).unwrap_err();
        assert!(e.contains(&format!("block {b} ")), "{e}");
        assert!(
            e.contains(&format!("seq={newest}")) && e.contains("stale"),
            "{e}"
        );

        // A write lost: writes 1..=99 and 101 applied, 100 skipped (to an otherwise fresh
        // block or over an older write) -> error at write 100's block.
        let nb = 4096;
        let mut img = vec![0u8; nb as usize * BLOCK_SIZE];
        apply(&mut img, 7, nb, 1, 99);
        apply(&mut img, 7, nb, 101, 101);
        let b100 = block_for_seq(7, 100, nb);
        let e = verify_prefix(&img, 7, nb).unwrap_err();
        assert!(
            e.contains(&format!("block {b100} ")) && e.contains("seq=100"),
            "{e}"
        );

        // A block with a valid write but at the wrong position.
        let mut img = image(7, 64, 10);
        let b3 = block_for_seq(7, 3, 64);
        let other = (0..64)
            .find(|&i| (1..=10).all(|s| block_for_seq(7, s, 64) != i))
            .unwrap();
        let off = other as usize * BLOCK_SIZE;
        img[off..off + BLOCK_SIZE].copy_from_slice(&block_content(3, b3));
        assert!(verify_prefix(&img, 7, 64)
            .unwrap_err()
            .contains(&format!("block {other} ")));
    }

    #[test]
    fn verify_large_image_is_fast() {
        // 16 MiB, 20k writes (debug build); 64 MiB / 100k is the same code path.
        let nb = 4096;
        let img = image(12345, nb, 20_000);
        let t = std::time::Instant::now();
        assert_eq!(verify_prefix(&img, 12345, nb).unwrap().last_seq, 20_000);
        assert!(t.elapsed().as_secs() < 10);
    }

    #[test]
    fn parse_console_report() {
        let log = "[    0.1] booting\r\n\
                   GUEST: NET eth0\r\n\
                   GUEST: READY vda_blocks=4096 writes=0 interval=0.2 seed=12345 start=1\n\
                   GUEST: WROTE seq=1 blk=1662\n\
                   [  3.2] random kernel noise GUEST: WROTE seq=2 blk=2015\n\
                   GUEST: DONE last_seq=2\n\
                   GUEST: POWERDOWN\n\
                   GUEST: WRO";
        assert_eq!(
            parse_console(log),
            ConsoleReport {
                ready: true,
                last_wrote_seq: Some(2),
                done: Some(2),
                powerdown: true,
                frozen: vec![],
                thawed: 0,
            }
        );
        assert_eq!(parse_console(""), ConsoleReport::default());
        let r = parse_console("GUEST: READY no-disk\n");
        assert!(r.ready && r.last_wrote_seq.is_none() && !r.powerdown);
    }

    #[test]
    fn parse_console_freeze_thaw() {
        // Shape of a real boot with the guest agent port (freeze, thaw, freeze).
        let log = "GUEST: AGENT /dev/vport0p1\r\n\
                   GUEST: READY vda_blocks=1024 writes=0 interval=0.1 seed=12345 start=1\r\n\
                   GUEST: WROTE seq=4 blk=757\r\n\
                   GUEST: WROTE seq=5 blk=12\r\n\
                   GUEST: FROZEN seq=5\r\n\
                   GUEST: THAWED\r\n\
                   GUEST: WROTE seq=6 blk=300\r\n\
                   [  9.1] noise GUEST: FROZEN seq=6\r\n\
                   GUEST: FROZEN seq=";
        let r = parse_console(log);
        assert_eq!(r.frozen, vec![5, 6]);
        assert_eq!(r.thawed, 1);
        assert!(r.is_frozen());
        assert_eq!(r.last_wrote_seq, Some(6));
        let r = parse_console(&format!("{log}\nGUEST: THAWED\nGUEST: WROTE seq=7 blk=1\n"));
        assert_eq!((r.frozen.len(), r.thawed), (2, 2));
        assert!(!r.is_frozen());
        let r = parse_console("GUEST: READY no-disk\n");
        assert!(r.frozen.is_empty() && r.thawed == 0 && !r.is_frozen());
    }
}
