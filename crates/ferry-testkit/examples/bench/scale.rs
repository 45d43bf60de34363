//! 9. Scale (issue 12 item 4): one primary host replicating 100 VMs every 30 s to one
//! replica server.
//!
//! G of the VMs (`--guests G`, default 8) are the real test guest under TCG, writing a
//! 4 KiB block every 0.5 s; the other 100 - G are off, and a writer changes their images
//! between their cycles with `qemu-io` (four 64 KiB writes of random data each interval,
//! incompressible like the 1 MiB each image starts with). Ferry has no
//! API to write to an off VM's disk, and its offline capture opens the image itself
//! (`qemu-img bitmap`, a read-only `qemu-nbd`), so the writer reads each VM's last cycle
//! row from the primary's store and writes only in the middle of the gap before the next
//! one (15 to 25 s after the last cycle started; the next starts 30 s after it). QEMU's
//! image locks make a collision an error on one side, never a silent mix: a write that
//! finds the image locked is skipped and counted, and a cycle that fails on a lock is
//! counted apart from other failures.
//!
//! The 100 relationships are enabled with the CLI in a loop, without `--wait`, as an
//! administrator's script would: the initial copies run concurrently (the loop itself
//! spreads their starts over the seconds it takes). Once all are done, the window of M
//! minutes (default 10) starts; during it the harness reads only /proc and the store's
//! file (read-only), never ferryd's API, so its own polling costs ferryd nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

/// Relationships.
const VMS: usize = 100;
/// Their interval, seconds.
const INTERVAL_S: u64 = 30;
/// The target: ferryd at most this share of one core, on each side.
const CPU_TARGET_PCT: f64 = 10.0;
/// Every VM's one disk (a new sparse qcow2).
const DISK: &str = "64M";
const DISK_BYTES: u64 = 64 * MIB;
/// A running guest writes one 4 KiB block every this many seconds.
const GUEST_WRITE_S: f64 = 0.5;
/// Writes into an off VM's image per interval, and their size.
const OFF_WRITES: u64 = 4;
const OFF_WRITE_LEN: u64 = 64 * 1024;
/// The writer's window in a VM's gap, ms after its last cycle started.
const WRITE_FROM_MS: i64 = 15_000;
const WRITE_UNTIL_MS: i64 = 25_000;
/// qemu-io processes the writer runs at once.
const WRITERS: usize = 4;

fn vm_name(i: usize, guests: usize) -> String {
    if i < guests {
        format!("g{i:03}")
    } else {
        format!("s{i:03}")
    }
}

/// Rows of a read-only query of the primary's store, as JSON objects.
fn sql_json(db: &Path, sql: &str) -> Vec<Value> {
    let out = Command::new("sqlite3")
        .args(["-readonly", "-json"])
        .arg(db)
        .arg(sql)
        .output()
        .expect("run sqlite3 (apt-get install sqlite3)");
    assert!(
        out.status.success(),
        "sqlite3 {}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str::<Vec<Value>>(&text).expect("sqlite3 -json")
}

/// Each VM's newest cycle row: name -> (started_ms, ended_ms).
fn last_rows(db: &Path) -> HashMap<String, (i64, i64)> {
    sql_json(
        db,
        "SELECT v.name AS name, c.started_ms AS s, c.ended_ms AS e FROM cycles c \
         JOIN vms v ON v.id = c.vm_id \
         WHERE c.id IN (SELECT max(id) FROM cycles GROUP BY vm_id)",
    )
    .into_iter()
    .map(|r| {
        (
            r["name"].as_str().expect("name").to_owned(),
            (r["s"].as_i64().expect("s"), r["e"].as_i64().expect("e")),
        )
    })
    .collect()
}

fn max_cycle_id(db: &Path) -> i64 {
    sql_json(db, "SELECT coalesce(max(id), 0) AS id FROM cycles")[0]["id"]
        .as_i64()
        .expect("id")
}

/// A cycle row of any VM, with its VM's name and error.
struct Row {
    vm: String,
    kind: String,
    started_ms: i64,
    ended_ms: i64,
    dirty_bytes: u64,
    sent_bytes: u64,
    ok: bool,
    error: String,
}

fn rows_after(db: &Path, id: i64) -> Vec<Row> {
    sql_json(
        db,
        &format!(
            "SELECT v.name AS vm, c.kind AS kind, c.started_ms AS s, c.ended_ms AS e, \
             c.dirty_bytes AS d, c.sent_bytes AS b, c.ok AS ok, coalesce(c.error, '') AS err \
             FROM cycles c JOIN vms v ON v.id = c.vm_id WHERE c.id > {id} ORDER BY c.id"
        ),
    )
    .into_iter()
    .map(|r| Row {
        vm: r["vm"].as_str().expect("vm").to_owned(),
        kind: r["kind"].as_str().expect("kind").to_owned(),
        started_ms: r["s"].as_i64().expect("s"),
        ended_ms: r["e"].as_i64().expect("e"),
        dirty_bytes: r["d"].as_u64().unwrap_or(0),
        sent_bytes: r["b"].as_u64().unwrap_or(0),
        ok: r["ok"].as_i64() == Some(1),
        error: r["err"].as_str().unwrap_or("").to_owned(),
    })
    .collect()
}

/// `ferry replication list`: VM -> (last cycle, state), of the relationships on this host.
fn last_cycles(a: &Host) -> BTreeMap<String, (i64, String)> {
    a.ferry_json(&["replication", "list"])
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| {
            (
                r["vm"].as_str().expect("vm").to_owned(),
                (
                    r["last_cycle"].as_i64().expect("last_cycle"),
                    r["state"].as_str().unwrap_or("?").to_owned(),
                ),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------

/// CPU seconds of the children a process has reaped (cutime + cstime): ferryd's
/// `qemu-img` and `qemu-nbd` helpers.
fn reaped_children_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // cutime and cstime are fields 16 and 17 of stat(5): 14 and 15 after the state field.
    let ticks: f64 = f[13].parse::<f64>().unwrap() + f[14].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A `/proc/PID/status` figure: `key` ("VmRSS:", "Threads:") as a number (kB for sizes).
fn proc_status(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The whole machine's CPU time so far: (busy, total) in ticks, from /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let v: Vec<u64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    (total - v[3] - v[4], total)
}

fn du_bytes(path: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(path)
        .output()
        .expect("run du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The writer of the off VMs' images
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct WriterCounts {
    /// qemu-io runs that wrote (OFF_WRITES writes each).
    writes: AtomicU64,
    /// Runs that found the image locked (ferryd capturing it): skipped.
    collisions: AtomicU64,
    /// Gaps that passed without a write (the writer too late, or the cycle too long).
    skipped: AtomicU64,
    /// Other qemu-io failures.
    errors: AtomicU64,
    last_error: Mutex<String>,
}

impl WriterCounts {
    fn snapshot(&self) -> [u64; 4] {
        [
            self.writes.load(Ordering::Relaxed),
            self.collisions.load(Ordering::Relaxed),
            self.skipped.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        ]
    }
}

struct Writer {
    stop: Arc<AtomicBool>,
    counts: Arc<WriterCounts>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts writing into `images` (VM name, image), each once per gap between its cycles.
    /// `scratch` holds the random data it writes.
    fn start(db: PathBuf, scratch: PathBuf, images: Vec<(String, PathBuf)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(WriterCounts::default());
        let thread = {
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || write_loop(&db, &scratch, &images, &stop, &counts))
        };
        Self {
            stop,
            counts,
            thread: Some(thread),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    db: &Path,
    scratch: &Path,
    images: &[(String, PathBuf)],
    stop: &AtomicBool,
    counts: &WriterCounts,
) {
    let image_of: HashMap<&str, &Path> = images
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    // The cycle (its start) whose following gap each VM was handled for.
    let mut handled: HashMap<String, i64> = HashMap::new();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = now_ms();
        let mut due = Vec::new();
        for (vm, (started, ended)) in last_rows(db) {
            let Some(image) = image_of.get(vm.as_str()) else {
                continue; // a running guest
            };
            if handled.get(&vm) == Some(&started) {
                continue;
            }
            let from = (started + WRITE_FROM_MS).max(ended + 500);
            let until = started + WRITE_UNTIL_MS;
            if now > until {
                counts.skipped.fetch_add(1, Ordering::Relaxed);
                handled.insert(vm, started);
            } else if now >= from {
                due.push(*image);
                handled.insert(vm, started);
            }
        }
        round += 1;
        let per = due.len().div_ceil(WRITERS).max(1);
        std::thread::scope(|s| {
            for (k, chunk) in due.chunks(per).enumerate() {
                s.spawn(move || {
                    for (j, image) in chunk.iter().enumerate() {
                        let seed = round
                            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                            .wrapping_add((k * per + j) as u64 + 1);
                        write_off(image, &scratch.join(format!("w{k}")), seed, counts);
                    }
                });
            }
        });
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// OFF_WRITES writes of OFF_WRITE_LEN random bytes at random aligned offsets, one qemu-io
/// run; the data goes through files named `src`-N.
fn write_off(image: &Path, src: &Path, seed: u64, counts: &WriterCounts) {
    let mut x = seed | 1;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for n in 0..OFF_WRITES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (DISK_BYTES / OFF_WRITE_LEN)) * OFF_WRITE_LEN;
        let file = src.with_extension(n.to_string());
        // Its own stream: seeding with `x` itself would make the next buffer this one
        // shifted by a few words, which compresses.
        random_file(&file, OFF_WRITE_LEN, x.wrapping_mul(0x2545_f491_4f6c_dd1d));
        cmd.arg("-c").arg(format!(
            "write -q -s {} {off} {OFF_WRITE_LEN}",
            file.display()
        ));
    }
    let out = cmd.arg(image).output().expect("run qemu-io");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !stderr.contains("rror") {
        counts.writes.fetch_add(1, Ordering::Relaxed);
    } else if stderr.contains("lock") {
        counts.collisions.fetch_add(1, Ordering::Relaxed);
    } else {
        counts.errors.fetch_add(1, Ordering::Relaxed);
        *counts.last_error.lock().expect("last error") =
            format!("{}: {}", image.display(), stderr.trim());
    }
}

// ---------------------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------------------

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

pub(super) fn bench_scale(o: &Opts) -> Vec<Figure> {
    let minutes = o.minutes.unwrap_or(10.0);
    let guests = o.guests.min(VMS);
    let (a, b, storage) = pair();
    let db = a.data_dir.join("ferry.db");
    let names: Vec<String> = (0..VMS).map(|i| vm_name(i, guests)).collect();

    // The running guests, started one after the other (booting eight at once under TCG
    // on two cores is slow, but they all get there).
    let t = Instant::now();
    for (i, vm) in names.iter().take(guests).enumerate() {
        a.create_guest_vm(
            vm,
            GuestWorkload {
                seed: 9000 + i as u64,
                start: 1,
                span_blocks: 4096,
            },
            GUEST_WRITE_S,
            &["--memory", "128M", "--disk", DISK, "--no-vnc"],
        );
        a.ferry_ok(&["vm", "start", vm]);
    }
    for vm in names.iter().take(guests) {
        a.wait_console(vm, Duration::from_secs(600), "guest writes", |c| {
            parse_console(c).last_wrote_seq.unwrap_or(0) >= 3
        });
    }
    println!(
        "  {guests} test guests running (TCG, 128 MiB, a 4 KiB write every {GUEST_WRITE_S} s): all writing after {:.0} s",
        t.elapsed().as_secs_f64()
    );

    // The off VMs, 1 MiB of random data each for their initial copies.
    let t = Instant::now();
    let mut images = Vec::new();
    for (i, vm) in names.iter().enumerate().skip(guests) {
        a.ferry_ok(&[
            "vm", "create", vm, "--memory", "128M", "--disk", DISK, "--no-vnc",
        ]);
        let image = disk_path(&a, vm);
        write_random(&a, &image, 0, MIB, 9100 + i as u64);
        images.push((vm.clone(), image));
    }
    println!(
        "  {} VMs off created ({DISK} disks, 1 MiB written) in {:.0} s",
        VMS - guests,
        t.elapsed().as_secs_f64()
    );

    // Enabling: one `ferry replication enable` after the other, without --wait.
    let t_enable = Instant::now();
    let to = b.socket.to_str().expect("utf-8").to_owned();
    let interval = format!("{INTERVAL_S}s");
    for vm in &names {
        a.ferry_ok(&[
            "replication",
            "enable",
            vm,
            "--to",
            &to,
            "--interval",
            &interval,
        ]);
    }
    let enable_loop = t_enable.elapsed().as_secs_f64();
    println!("  {VMS} relationships enabled by the CLI in {enable_loop:.1} s");
    let writer = Writer::start(db.clone(), a.dir.path().to_owned(), images);
    let deadline = t_enable + Duration::from_secs(1800);
    let mut shown = Instant::now();
    loop {
        let cycles = last_cycles(&a);
        let done = cycles.values().filter(|c| c.0 >= 1).count();
        if done == VMS {
            break;
        }
        if shown.elapsed() >= Duration::from_secs(30) {
            println!(
                "  {:.0} s: {done} of {VMS} initial copies done",
                t_enable.elapsed().as_secs_f64()
            );
            shown = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {VMS} initial copies after 30 min"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let initial_secs = t_enable.elapsed().as_secs_f64();
    let before = rows_after(&db, 0);
    let initial_rows: Vec<&Row> = before.iter().filter(|r| r.kind == "initial").collect();
    let mut initial_durations: Vec<f64> = initial_rows
        .iter()
        .map(|r| (r.ended_ms - r.started_ms) as f64 / 1000.0)
        .collect();
    let failed_before = before.iter().filter(|r| !r.ok).count();
    println!(
        "  all {VMS} initial copies done {initial_secs:.1} s after the first enable ({:.1} MiB sent; each took median {:.2} s, max {:.2} s); {} cycles failed before the window{}",
        mib(initial_rows.iter().map(|r| r.sent_bytes).sum()),
        quantile(&mut initial_durations, 0.5),
        quantile(&mut initial_durations, 1.0),
        failed_before,
        before
            .iter()
            .find(|r| !r.ok)
            .map_or(String::new(), |r| format!(" (first: {}: {})", r.vm, r.error))
    );

    // The window.
    let (pa, pb) = (a.pid().expect("ferryd a"), b.pid().expect("ferryd b"));
    let guest_pids = a.qemu_pids();
    let qemu_cpu = |pids: &[u32]| pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
    let seq = |vm: &str| parse_console(&a.console(vm)).last_wrote_seq.unwrap_or(0);
    let seq0: Vec<u64> = names.iter().take(guests).map(|vm| seq(vm)).collect();
    let id0 = max_cycle_id(&db);
    let w0 = writer.counts.snapshot();
    let (cpu_a0, cpu_b0) = (cpu_secs(pa), cpu_secs(pb));
    let (kid_a0, kid_b0) = (reaped_children_cpu_secs(pa), reaped_children_cpu_secs(pb));
    let guests_cpu0 = qemu_cpu(&guest_pids);
    let harness0 = children_cpu_secs();
    let m0 = machine_ticks();
    let t0 = Instant::now();
    let start_ms = now_ms();
    let run = Duration::from_secs_f64(minutes * 60.0);
    let (mut rss_max, mut fds_max, mut threads_max) = ([0f64; 2], [0usize; 2], [0f64; 2]);
    let mut next_report = Duration::from_secs(60);
    while t0.elapsed() < run {
        std::thread::sleep(Duration::from_secs(5).min(run.saturating_sub(t0.elapsed())));
        for (k, pid) in [pa, pb].into_iter().enumerate() {
            rss_max[k] = rss_max[k].max(proc_status(pid, "VmRSS:") / 1024.0);
            threads_max[k] = threads_max[k].max(proc_status(pid, "Threads:"));
            fds_max[k] = fds_max[k].max(open_fds(pid));
        }
        if t0.elapsed() >= next_report && t0.elapsed() < run {
            let secs = t0.elapsed().as_secs_f64();
            let rows = rows_after(&db, id0);
            println!(
                "  {secs:.0} s: {} cycles ok, {} failed; ferryd CPU primary {:.1} %, replica {:.1} %; RSS {:.0} / {:.0} MiB",
                rows.iter().filter(|r| r.ok).count(),
                rows.iter().filter(|r| !r.ok).count(),
                100.0 * (cpu_secs(pa) - cpu_a0) / secs,
                100.0 * (cpu_secs(pb) - cpu_b0) / secs,
                proc_status(pa, "VmRSS:") / 1024.0,
                proc_status(pb, "VmRSS:") / 1024.0,
            );
            next_report += Duration::from_secs(60);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let end_ms = now_ms();
    let (cpu_a, cpu_b) = (cpu_secs(pa) - cpu_a0, cpu_secs(pb) - cpu_b0);
    let (kid_a, kid_b) = (
        reaped_children_cpu_secs(pa) - kid_a0,
        reaped_children_cpu_secs(pb) - kid_b0,
    );
    let guests_cpu = qemu_cpu(&guest_pids) - guests_cpu0;
    let harness = children_cpu_secs() - harness0;
    let m1 = machine_ticks();
    let machine_busy = (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64;
    let w1 = writer.counts.snapshot();
    let writer_error = writer.counts.last_error.lock().expect("last error").clone();
    let rows = rows_after(&db, id0);
    drop(writer);
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for (_, state) in last_cycles(&a).into_values() {
        *states.entry(state).or_default() += 1;
    }
    let seq1: Vec<u64> = names.iter().take(guests).map(|vm| seq(vm)).collect();

    // Cycles: those that ended within the window, as the CPU was counted.
    let rows: Vec<Row> = rows
        .into_iter()
        .filter(|r| r.ended_ms >= start_ms && r.ended_ms <= end_ms)
        .collect();
    let ok_rows: Vec<&Row> = rows.iter().filter(|r| r.ok).collect();
    let expected = (elapsed / INTERVAL_S as f64).floor() as i64;
    let mut done_total = 0i64;
    let (mut missed, mut missed_beyond_phase) = (0i64, 0i64);
    let mut short: Vec<String> = Vec::new();
    let mut per_vm: BTreeMap<i64, usize> = BTreeMap::new();
    for vm in &names {
        let done = ok_rows.iter().filter(|r| &r.vm == vm).count() as i64;
        *per_vm.entry(done).or_default() += 1;
        done_total += done;
        missed += (expected - done).max(0);
        missed_beyond_phase += (expected - done - 1).max(0);
        if done < expected - 1 {
            short.push(format!("{vm} {done}"));
        }
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.ok).collect();
    let lock_failures = failed.iter().filter(|r| r.error.contains("lock")).count();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for r in &failed {
        *errors
            .entry(r.error.chars().take(160).collect())
            .or_default() += 1;
    }
    let secs_of = |running: bool| -> Vec<f64> {
        ok_rows
            .iter()
            .filter(|r| r.vm.starts_with('g') == running)
            .map(|r| (r.ended_ms - r.started_ms) as f64 / 1000.0)
            .collect()
    };
    // The longest time between two cycle starts of one VM (30 s when none is late).
    let mut starts: HashMap<&str, Vec<i64>> = HashMap::new();
    for r in &rows {
        starts.entry(&r.vm).or_default().push(r.started_ms);
    }
    let max_gap = starts
        .values()
        .flat_map(|s| s.windows(2).map(|w| (w[1] - w[0]) as f64 / 1000.0))
        .fold(0.0, f64::max);
    let vms_seen: HashSet<&str> = ok_rows.iter().map(|r| r.vm.as_str()).collect();
    println!(
        "  {elapsed:.0} s window: cycles done {done_total}, expected {} ({expected} per VM), missed {missed} ({missed_beyond_phase} beyond 1 per VM for phase), failed {} ({lock_failures} on an image lock); {} VMs cycled, done per VM {}; states at the end {states:?}{}",
        expected * VMS as i64,
        failed.len(),
        vms_seen.len(),
        per_vm
            .iter()
            .map(|(d, n)| format!("{d} x{n}"))
            .collect::<Vec<_>>()
            .join(", "),
        if short.is_empty() {
            String::new()
        } else {
            format!("; short: {}", short.join(", "))
        }
    );
    for (running, label) in [(true, "running guests"), (false, "off VMs")] {
        let mut s = secs_of(running);
        let n = s.len();
        let dirty: u64 = ok_rows
            .iter()
            .filter(|r| r.vm.starts_with('g') == running)
            .map(|r| r.dirty_bytes)
            .sum();
        println!(
            "  cycles of {label}: {n}, time median {:.2} s, p95 {:.2} s, max {:.2} s; {:.1} KiB dirty per cycle",
            quantile(&mut s, 0.5),
            quantile(&mut s, 0.95),
            quantile(&mut s, 1.0),
            dirty as f64 / 1024.0 / n.max(1) as f64
        );
    }
    println!(
        "  longest time between two cycle starts of one VM: {max_gap:.1} s; shipped {:.1} MiB in all",
        mib(ok_rows.iter().map(|r| r.sent_bytes).sum())
    );
    for (e, n) in &errors {
        println!("  failed x{n}: {e}");
    }
    println!(
        "  writer: {} qemu-io runs wrote ({OFF_WRITES} x {} KiB each), {} found the image locked (skipped), {} gaps missed, {} other errors{}",
        w1[0] - w0[0],
        OFF_WRITE_LEN / 1024,
        w1[1] - w0[1],
        w1[2] - w0[2],
        w1[3] - w0[3],
        if w1[3] > w0[3] {
            format!(" (last: {writer_error})")
        } else {
            String::new()
        }
    );
    let rates: Vec<f64> = seq0
        .iter()
        .zip(&seq1)
        .map(|(s0, s1)| (s1 - s0) as f64 / elapsed)
        .collect();
    println!(
        "  guests: {} blocks written, {:.2} to {:.2} writes/s each (one per {GUEST_WRITE_S} s asked); their QEMUs {:.1} % of a core each",
        seq1.iter().sum::<u64>() - seq0.iter().sum::<u64>(),
        rates.iter().copied().fold(f64::INFINITY, f64::min),
        rates.iter().copied().fold(0.0, f64::max),
        100.0 * guests_cpu / elapsed / guests.max(1) as f64
    );

    // Resources.
    let (pct_a, pct_b) = (100.0 * cpu_a / elapsed, 100.0 * cpu_b / elapsed);
    let ok_n = ok_rows.len();
    let (ms_a, ms_b) = (
        1000.0 * cpu_a / ok_n.max(1) as f64,
        1000.0 * cpu_b / ok_n.max(1) as f64,
    );
    let (peak_a, peak_b) = (peak_rss_mib(pa), peak_rss_mib(pb));
    println!(
        "  ferryd CPU: primary {cpu_a:.1} s = {pct_a:.2} % of a core ({ms_a:.1} ms per cycle), replica {cpu_b:.1} s = {pct_b:.2} % ({ms_b:.1} ms per cycle)"
    );
    let (pct_a_all, pct_b_all) = (
        100.0 * (cpu_a + kid_a) / elapsed,
        100.0 * (cpu_b + kid_b) / elapsed,
    );
    println!(
        "  with the helpers ferryd ran and reaped (qemu-img, qemu-nbd): primary {pct_a_all:.2} % ({:.1} ms per cycle), replica {pct_b_all:.2} % ({:.1} ms per cycle)",
        1000.0 * (cpu_a + kid_a) / ok_n.max(1) as f64,
        1000.0 * (cpu_b + kid_b) / ok_n.max(1) as f64,
    );
    println!(
        "  ferryd memory: peak RSS primary {peak_a:.0} MiB, replica {peak_b:.0} MiB; RSS now {:.0} / {:.0} MiB (max sampled {:.0} / {:.0}); threads max {:.0} / {:.0}; open fds max {} / {}",
        proc_status(pa, "VmRSS:") / 1024.0,
        proc_status(pb, "VmRSS:") / 1024.0,
        rss_max[0],
        rss_max[1],
        threads_max[0],
        threads_max[1],
        fds_max[0],
        fds_max[1],
    );
    println!(
        "  machine: {:.0} % busy over the window ({} cores; the harness's own processes, qemu-io and sqlite3, {:.1} % of a core)",
        100.0 * machine_busy,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        100.0 * harness / elapsed
    );
    println!(
        "  disk: primary data dir {:.1} MiB, VM images {:.1} MiB; replica data dir {:.1} MiB, replica storage {:.1} MiB",
        mib(du_bytes(&a.data_dir)),
        mib(du_bytes(&a.vm_storage)),
        mib(du_bytes(&b.data_dir)),
        mib(du_bytes(&storage)),
    );

    // The budget the target gives one cycle: 10 % of a core over one interval, shared by
    // the VMs' cycles of that interval.
    let budget_ms = CPU_TARGET_PCT / 100.0 * INTERVAL_S as f64 * 1000.0 / VMS as f64;
    let target = format!("<= {CPU_TARGET_PCT:.0} % of a core");
    vec![
        Figure {
            bench: "scale",
            what: format!(
                "{VMS} VMs ({guests} running) at {INTERVAL_S} s, {minutes:.1} min: cycles"
            ),
            measured: format!("{done_total} done, {} failed", failed.len()),
            baseline: format!("{} expected", expected * VMS as i64),
            ratio: Some(done_total as f64 / (expected * VMS as i64).max(1) as f64),
            target: "missed 0 (1/VM for phase)".into(),
            pass: Some(missed_beyond_phase == 0 && failed.is_empty()),
        },
        Figure {
            bench: "scale",
            what: "ferryd CPU, primary".into(),
            measured: format!("{pct_a:.2} % of a core"),
            baseline: format!("{CPU_TARGET_PCT:.0} % (the target)"),
            ratio: Some(pct_a / CPU_TARGET_PCT),
            target: target.clone(),
            pass: Some(pct_a <= CPU_TARGET_PCT),
        },
        Figure {
            bench: "scale",
            what: "ferryd CPU, replica".into(),
            measured: format!("{pct_b:.2} % of a core"),
            baseline: format!("{CPU_TARGET_PCT:.0} % (the target)"),
            ratio: Some(pct_b / CPU_TARGET_PCT),
            target,
            pass: Some(pct_b <= CPU_TARGET_PCT),
        },
        Figure {
            bench: "scale",
            what: "ferryd CPU per cycle, primary / replica".into(),
            measured: format!("{ms_a:.1} / {ms_b:.1} ms"),
            baseline: format!("{budget_ms:.0} ms budget/side"),
            ratio: Some(ms_a.max(ms_b) / budget_ms),
            target: "(reported)".into(),
            pass: Some(true),
        },
        Figure {
            bench: "scale",
            what: "ferryd + qemu-img/qemu-nbd CPU, primary / replica".into(),
            measured: format!("{:.2} / {:.2} %", pct_a_all, pct_b_all),
            baseline: format!("{CPU_TARGET_PCT:.0} % (the target)"),
            ratio: Some(pct_a_all.max(pct_b_all) / CPU_TARGET_PCT),
            target: "(reported)".into(),
            pass: Some(true),
        },
        Figure {
            bench: "scale",
            what: "ferryd peak RSS, primary / replica".into(),
            measured: format!("{peak_a:.0} / {peak_b:.0} MiB"),
            baseline: "256 MiB".into(),
            ratio: Some(peak_a.max(peak_b) / 256.0),
            target: "<= 256 MiB (as bench 8)".into(),
            pass: Some(peak_a.max(peak_b) <= 256.0),
        },
        Figure {
            bench: "scale",
            what: format!("{VMS} initial copies, enable loop to all done"),
            measured: format!("{initial_secs:.1} s"),
            baseline: format!("{enable_loop:.1} s enable loop"),
            ratio: None,
            target: "(reported)".into(),
            pass: Some(true),
        },
    ]
}
