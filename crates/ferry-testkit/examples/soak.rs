//! The fault soak: one test guest writing verifiable blocks, replicated every 5 s by two
//! real ferryd through a link the soak controls, and N faults injected at random moments:
//! SIGKILL of either ferryd, SIGKILL of QEMU, a link cut, a partition, the replica's
//! storage full, a slow link, the replica daemon restarted while retention merges, a test
//! failover started and stopped. After each fault it waits for the relationship to come
//! back to replicating by itself (or runs the documented command: after QEMU is killed,
//! `ferry vm start` and `ferry replication resume --resync`), then checks, with replication
//! suspended, that the newest recovery point is an exact prefix of the guest's writes and
//! holds every write an earlier point held (nothing acknowledged is lost).
//!
//! ```sh
//! cargo build --workspace --bins && cargo run --example soak -- --faults 200 --seed 1
//! ```
//! Prints one line per fault and a summary (recorded in docs/BENCHMARKS.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::guest::{verify_prefix, GuestWorkload};
use ferry_testkit::host::{pid_alive, Host};
use ferry_testkit::link::Link;
use ferry_testkit::replication::{
    enable_replica_server_at, free_port, layer, points, read_image, status,
};
use ferry_testkit::tmpfs::Tmpfs;

const SEED: u64 = 4242;
const SPAN: u64 = 2048; // 8 MiB of verifiable writes on a 16 MiB disk

/// The fault kinds, in the order of the summary.
const KINDS: [&str; 9] = [
    "kill primary ferryd",
    "kill replica ferryd",
    "kill QEMU",
    "link cut",
    "partition",
    "replica storage full",
    "slow link",
    "restart during retention",
    "test failover",
];

/// xorshift64*: reproducible from `--seed`, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn until(timeout: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

/// `ferry ARGS` whose failure is only reported (the soak goes on).
fn ferry_soft(host: &Host, args: &[&str]) -> bool {
    let r = host.ferry(args);
    if r.code != 0 {
        println!("    ({} {:?}: {})", host.name, args, r.stderr.trim());
    }
    r.code == 0
}

fn last_cycle(a: &Host) -> i64 {
    status(a, "app")["last_cycle"].as_i64().unwrap_or(0)
}

/// The newest point's last guest write, read with replication suspended so retention does
/// not merge the layer away under the reader; `Err` if it is not an exact prefix.
fn check_newest(a: &Host, b: &Host) -> Result<u64, String> {
    a.ferry_ok(&["replication", "suspend", "app"]);
    let quiet = until(Duration::from_secs(120), || {
        status(a, "app")["progress"].is_null()
    });
    let mut last = points(b, "app");
    until(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(400));
        let now = points(b, "app");
        let same = now == last;
        last = now;
        same
    });
    let result = match (quiet, last.last()) {
        (false, _) => Err("a cycle did not end within 120 s of suspending".to_owned()),
        (true, None) => Err("no recovery point".to_owned()),
        (true, Some(p)) => verify_prefix(&read_image(&layer(p)), SEED, SPAN).map(|v| v.last_seq),
    };
    a.ferry_ok(&["replication", "resume", "app"]);
    result
}

fn main() {
    let mut faults = 200u64;
    let mut seed = 1u64;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for w in args.windows(2) {
        match w[0].as_str() {
            "--faults" => faults = w[1].parse().expect("--faults N"),
            "--seed" => seed = w[1].parse().expect("--seed N"),
            _ => {}
        }
    }
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);

    let mut a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let mut b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let storage = b.dir.path().join("replicas");
    let _tmpfs = Tmpfs::mount(&storage, "160M", "ferry-soak");
    let port: u16 = free_port("127.0.0.2").parse().unwrap();
    enable_replica_server_at(&b, &port.to_string());
    let b_fp = b.ferry_json(&["server", "show"])["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let link = Link::start("127.0.0.1", SocketAddr::from(([127, 0, 0, 2], port)));
    a.create_guest_vm(
        "app",
        GuestWorkload {
            seed: SEED,
            start: 1,
            span_blocks: SPAN,
        },
        0.05,
        &["--memory", "256M", "--disk", "16M"],
    );
    a.ferry_ok(&["vm", "start", "app"]);
    a.ferry_ok(&[
        "replication",
        "enable",
        "app",
        "--to",
        &link.addr.to_string(),
        "--replica-fingerprint",
        &b_fp,
        "--interval",
        "5s",
        "--recovery-points",
        "2",
        "--point-spacing",
        "1s",
        "--wait",
    ]);
    let started = Instant::now();
    let mut best = check_newest(&a, &b).expect("the initial point");
    let mut by_kind: BTreeMap<&str, [u64; 3]> = BTreeMap::new(); // itself, command, failed
    let (mut lost, mut not_prefix) = (0u64, 0u64);

    for i in 1..=faults {
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        std::thread::sleep(Duration::from_millis(rng.below(5000)));
        let before = last_cycle(&a);
        let t = Instant::now();
        let mut needs_resync = false;
        match kind {
            "kill primary ferryd" => {
                a.kill_daemon();
                a.launch();
            }
            "kill replica ferryd" => {
                b.kill_daemon();
                b.launch();
            }
            "kill QEMU" => {
                if let Some(pid) = a.ferry_json(&["vm", "show", "app"])["pid"].as_u64() {
                    // SAFETY: kill(2) of the soak's own QEMU.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    until(Duration::from_secs(10), || !pid_alive(pid as u32));
                }
                until(Duration::from_secs(20), || a.vm_state("app") == "off");
                needs_resync = true;
            }
            "link cut" => link.cut(),
            "partition" => {
                link.partition();
                std::thread::sleep(Duration::from_millis(2000 + rng.below(6000)));
                link.heal();
            }
            "replica storage full" => {
                let filler = storage.join("filler");
                let _ = Command::new("dd")
                    .args(["if=/dev/zero", "bs=1M", "status=none"])
                    .arg(format!("of={}", filler.display()))
                    .status();
                until(Duration::from_secs(40), || {
                    status(&a, "app")["last_error"]
                        .as_str()
                        .is_some_and(|e| e.to_lowercase().contains("space"))
                });
                let _ = std::fs::remove_file(&filler);
            }
            "slow link" => {
                link.set_rate(Some(64 << 10));
                std::thread::sleep(Duration::from_secs(8));
                link.set_rate(None);
            }
            "restart during retention" => {
                // A commit is followed at once by retention's merges: restart the replica
                // as soon as a new point appears.
                let n = points(&b, "app");
                until(Duration::from_secs(30), || points(&b, "app") != n);
                b.stop_daemon();
                b.launch();
            }
            "test failover" => {
                ferry_soft(&b, &["failover", "test", "app"]);
                std::thread::sleep(Duration::from_secs(3));
                ferry_soft(&b, &["failover", "stop-test", "app"]);
            }
            _ => unreachable!(),
        }
        // Recovery: by itself, or with the documented command.
        let mut how = 0;
        let mut before = before;
        if needs_resync {
            // Change tracking died with QEMU: the next cycle must say so (a cycle that was
            // in flight may still complete first), then the documented commands.
            let said = until(Duration::from_secs(60), || {
                status(&a, "app")["state"] == "resynchronization_required"
            });
            if !said {
                println!("    QEMU was killed but no resynchronization was asked for");
            }
            ferry_soft(&a, &["vm", "start", "app"]);
            ferry_soft(&a, &["replication", "resume", "app", "--resync"]);
            before = last_cycle(&a);
            how = 1;
        }
        let recovered = |a: &Host| {
            let st = status(a, "app");
            st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap_or(0) > before
        };
        if !until(Duration::from_secs(120), || recovered(&a)) {
            let st = status(&a, "app");
            println!("    not recovered by itself: {st}");
            how = 1;
            let cmd: &[&str] = if st["state"] == "resynchronization_required" {
                &["replication", "resume", "app", "--resync"]
            } else {
                &["replication", "resume", "app"]
            };
            ferry_soft(&a, cmd);
            if !until(Duration::from_secs(180), || recovered(&a)) {
                how = 2;
            }
        }
        let took = t.elapsed();
        let check = check_newest(&a, &b);
        let verdict = match &check {
            Ok(seq) if *seq >= best => {
                best = *seq;
                format!("newest point holds writes 1..={seq}")
            }
            Ok(seq) => {
                lost += 1;
                format!("LOST: newest point ends at write {seq}, an earlier one held {best}")
            }
            Err(e) => {
                not_prefix += 1;
                format!("NOT A PREFIX: {e}")
            }
        };
        by_kind.entry(kind).or_default()[how] += 1;
        println!(
            "fault {i:>3} {kind:<26} recovered {} in {:>5.1} s; {verdict}",
            ["by itself", "with the documented command", "NOT"][how],
            took.as_secs_f64()
        );
    }

    let (mut itself, mut command, mut failed) = (0, 0, 0);
    println!("\n| fault | injected | recovered by itself | with the documented command | not recovered |");
    println!("|---|---|---|---|---|");
    for kind in KINDS {
        let [s, c, f] = by_kind.get(kind).copied().unwrap_or_default();
        itself += s;
        command += c;
        failed += f;
        println!("| {kind} | {} | {s} | {c} | {f} |", s + c + f);
    }
    println!(
        "\n{faults} faults in {:.0} min (seed {seed}): {} recovered ({itself} by themselves, {command} with the documented command), {failed} not; {lost} points lost acknowledged writes; {not_prefix} points failed the prefix check; the guest's writes reached 1..={best}",
        started.elapsed().as_secs_f64() / 60.0,
        itself + command,
    );
    if failed + lost + not_prefix > 0 {
        std::process::exit(1);
    }
}
