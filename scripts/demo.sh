#!/bin/bash
# Ferry demo: two hosts (ferryd on 127.0.0.1 and 127.0.0.2, each with its own data dir),
# a test VM created and started on the first, its serial console shown while it writes
# verifiable blocks to its disk. The second host is managed remotely over TLS (pinned
# certificate + token) to show both are real hosts. Then the second host becomes a replica
# server and the VM replicates to it every 5 s: recovery points arrive while the guest
# writes (each shown with the newest guest write it holds), the replica VM refuses to
# start (only failover starts it), and after an ACPI shutdown one last cycle leaves the
# newest recovery point byte-identical to the primary's disk (qemu-img compare).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/ferry-target}
BIN=$CARGO_TARGET_DIR/debug
command -v cargo >/dev/null || { echo "demo.sh: Rust's cargo is needed to build Ferry (https://rustup.rs)" >&2; exit 1; }
cargo build --workspace --bins -q
guest/build.sh >/dev/null

# TCG by default: the guest is tiny, and on some machines (nested virtualization) a
# kernel hangs under KVM even though the daemon's KVM probe boots. FERRY_DEMO_ACCEL=auto
# (or kvm) uses KVM where it works.
ACCEL=${FERRY_DEMO_ACCEL:-tcg}
DEMO=$(mktemp -d /tmp/ferry-demo.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$DEMO"/*/data/run/*.pid; do [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

start_host() { # name ip port
  mkdir -p "$DEMO/$1"
  cat > "$DEMO/$1/ferryd.toml" <<TOML
name = "$1"
data_dir = "$DEMO/$1/data"
admin_socket = "$DEMO/$1/ferryd.sock"
tls_listen = "$2:$3"
accel = "$ACCEL"
file_roots = ["$DEMO", "$PWD/guest/out", "/var/cache/ferry-debian"]
TOML
  "$BIN/ferryd" --config "$DEMO/$1/ferryd.toml" 2>"$DEMO/$1/ferryd.log" &
  PIDS+=($!)
  for _ in $(seq 100); do
    "$BIN/ferry" --socket "$DEMO/$1/ferryd.sock" server show >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "ferryd $1 did not start; its log:" >&2; cat "$DEMO/$1/ferryd.log" >&2; exit 1
}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Starting two hosts: host-a on 127.0.0.1:17443, host-b on 127.0.0.2:17443"
start_host host-a 127.0.0.1 17443
start_host host-b 127.0.0.2 17443
A() { "$BIN/ferry" --socket "$DEMO/host-a/ferryd.sock" "$@"; }
B() { "$BIN/ferry" --socket "$DEMO/host-b/ferryd.sock" "$@"; }
A server show

say "host-a manages host-b over TLS (certificate pinned by fingerprint, token auth)"
FP=$(B --output json server show | sed -n 's/.*"fingerprint": "\([^"]*\)".*/\1/p')
A host add host-b https://127.0.0.2:17443 --fingerprint "$FP" --token "$(cat "$DEMO/host-b/data/api.token")"
A --host host-b server show | sed -n 1,3p

say "Creating the test VM 'demo' on host-a (busybox guest writing checksummed blocks)"
A vm create demo --cpus 1 --memory 256M --disk 64M \
  --kernel "$PWD/guest/out/vmlinuz" --initrd "$PWD/guest/out/initramfs.gz" \
  --append "console=ttyS0 quiet panic=-1 guest.span=4096 guest.interval=0.5" --nic user
A vm start demo
A vm list

say "Its serial console (ferry vm console demo --log) while it boots and writes"
for _ in $(seq 120); do A vm console demo --log | grep -q 'WROTE seq=5 ' && break; sleep 0.5; done
if ! A vm console demo --log | grep -q 'WROTE seq=5 '; then
  echo "the guest did not write 5 blocks in 60 s; its console:" >&2
  A vm console demo --log >&2; exit 1
fi
A vm console demo --log | grep GUEST
A vm show demo

say "host-b becomes a replica server (replication port 7444) for host-a, by its certificate"
FP_A=$(A --output json server show | sed -n 's/.*"fingerprint": "\([^"]*\)".*/\1/p')
B replica-server set --enable --allow "host-a=$FP_A" --storage "$DEMO/host-b/replicas" \
  --allow-primary-start yes

say "Replicating 'demo' to host-b: every 5 s, latest + 3 recovery points at least 10 s apart"
A replication enable demo --to "$DEMO/host-b/ferryd.sock" --interval 5s \
  --recovery-points 3 --point-spacing 10s --wait
B vm list

# "<cycle> <taken_at> <image of disk 0>" of host-b's newest recovery point (from the JSON
# of `ferry replication points`, without needing jq).
newest_point() {
  B --output json replication points demo | awk -F': ' '
    /"cycle":/    { c = $2 + 0 }
    /"taken_at":/ { t = $2 + 0 }
    /"layers":/   { inl = 1; next }
    inl && /^ *[0-9]+,$/ { idx = $0 + 0 }
    inl && /^ *"/ { if (idx == 0 && c >= bc) { p = $0; sub(/^ *"/, "", p); sub(/",?$/, "", p); bc = c; bt = t; bp = p } inl = 0 }
    END { if (bp != "") print bc, bt, bp }'
}
# The newest guest write a disk image holds: the guest's blocks start "CBT seq=N".
newest_write() {
  local s=""
  if qemu-img convert -U -O raw "$1" "$DEMO/scan.raw" 2>/dev/null; then
    s=$(grep -a -o 'CBT seq=[0-9]*' "$DEMO/scan.raw" | sort | tail -n 1 || true)
  fi
  rm -f "$DEMO/scan.raw"
  s=${s#CBT seq=}
  if [ -n "$s" ]; then echo "seq=$((10#$s))"; else echo "(unreadable: its image changed while being read)"; fi
}
guest_wrote() { A vm console demo --log | grep -a -o 'WROTE seq=[0-9]*' | tail -n 1 | sed 's/WROTE //'; }

say "Recovery points arriving on host-b while the guest keeps writing (about 30 s)"
for round in 1 2 3; do
  sleep 9
  printf '\n-- after %2d s of replication (host-b: ferry replication points demo)\n' $((round * 9))
  B replication points demo
  read -r cyc _ layer < <(newest_point) || true
  echo "newest point (cycle $cyc) holds the guest's writes up to $(newest_write "$layer"); the guest has written up to $(guest_wrote) by now"
done
A replication status demo

say "The replica VM on host-b does not start: a replica starts only through failover"
if B vm start demo; then
  echo "unexpected: host-b started the replica VM" >&2; exit 1
fi

say "ACPI shutdown of the primary VM"
A vm shutdown demo --timeout 60
A vm console demo --log | tail -n 2
A vm list
OFF_AT=$(date +%s)

say "One last replication cycle now that the VM is off (ferry replication now), then suspend"
last_cycle() { A --output json replication status demo | sed -n 's/^ *"last_cycle": \(-\{0,1\}[0-9]*\),*$/\1/p'; }
sleep 1
# Until a point taken after the shutdown is on host-b (a cycle that was already running
# when the VM went off may complete first).
for _ in 1 2 3; do
  before=$(last_cycle)
  A replication now demo >/dev/null
  for _ in $(seq 150); do [ "$(last_cycle)" -gt "$before" ] && break; sleep 0.2; done
  [ "$(last_cycle)" -gt "$before" ] || { echo "no replication cycle completed in 30 s" >&2; A replication status demo >&2; exit 1; }
  read -r cyc taken layer < <(newest_point) || true
  [ "${taken:-0}" -gt "$OFF_AT" ] && break
done
[ "${taken:-0}" -gt "$OFF_AT" ] || { echo "no recovery point taken after the shutdown" >&2; exit 1; }
# Suspended, no further cycle adds a point (and merges this one's layer) during the compare.
A replication suspend demo
B replication points demo

say "The newest recovery point on host-b is byte-identical to the primary's disk"
# (sed reads all of it: quitting early would make ferry die of SIGPIPE under pipefail)
PRIMARY_DISK=$(A --output json vm show demo | sed -n '/"path":/{s/^ *"path": "\(.*\)",*$/\1/p;}')
PRIMARY_DISK=${PRIMARY_DISK%%$'\n'*}
echo "host-a disk:             $PRIMARY_DISK"
echo "host-b point (cycle $cyc): $layer"
echo "guest's last write: $(guest_wrote); the point holds writes up to $(newest_write "$layer")"
qemu-img compare -U "$PRIMARY_DISK" "$layer"

say "Planned failover to host-b with reverse replication (host-a accepts replication too)"
A replica-server set --enable --allow "host-b=$FP" --storage "$DEMO/host-a/replicas" \
  --allow-primary-start yes >/dev/null
A replication resume demo >/dev/null
A failover planned demo --start --reverse
B vm list
B replication status demo
A replication status demo

say "The guest runs on host-b; only what it writes goes back to host-a"
for _ in $(seq 120); do B vm console demo --log | grep -q 'WROTE seq=3 ' && break; sleep 0.5; done
b_cycle() { B --output json replication status demo | sed -n 's/^ *"last_cycle": \(-\{0,1\}[0-9]*\),*$/\1/p'; }
c0=$(b_cycle)
for _ in $(seq 120); do [ "$(b_cycle)" -ge $((c0 + 2)) ] && break; sleep 0.5; done
A replication points demo

say "Failback: a planned failover back to host-a, replication reversed again"
B vm shutdown demo --timeout 60
ready0=$(A vm console demo --log | grep -c 'GUEST: READY' || true)
B failover planned demo --start --reverse
A vm list
A replication status demo
B replication status demo

say "ACPI shutdown of the VM, back on host-a (once its guest is up again)"
for _ in $(seq 120); do
  [ "$(A vm console demo --log | grep -c 'GUEST: READY' || true)" -gt "$ready0" ] && break; sleep 0.5
done
sleep 2
A vm shutdown demo --timeout 60

if [ "${FERRY_DEMO_DEBIAN:-1}" = 0 ]; then
  say "Demo done (data in $DEMO; the real Debian guest part was skipped: FERRY_DEMO_DEBIAN=0)"
  exit 0
fi

# A real server, the way an administrator installs one: an empty disk, an installer ISO,
# UEFI firmware. The ISO is built from Debian's packages (guest/debian/build.sh; cached under
# /var/cache/ferry-debian, about 4 min the first time) and installs itself unattended.
say "A real Debian guest: VM 'web' with UEFI (q35), an empty 4 GiB disk and the installer ISO"
ISO=$(guest/debian/build.sh)
A vm create web --cpus 1 --memory 512M --machine q35 --firmware uefi --disk 4G \
  --cdrom "$ISO" --boot cdrom,disk --nic user
A vm start web
say "Installing from the ISO (its serial console; about 2-3 min under TCG)"
for _ in $(seq 600); do
  A vm console web --log | grep -q 'FERRY-INSTALL: \(DONE\|FAILED\)' && break; sleep 1
done
A vm console web --log | grep 'FERRY-INSTALL' || true
if ! A vm console web --log | grep -q 'FERRY-INSTALL: DONE'; then
  echo "the installer did not finish; its console:" >&2; A vm console web --log | tail -40 >&2; exit 1
fi
for _ in $(seq 120); do [ "$(A --output json vm show web | sed -n 's/^  "state": "\(.*\)",$/\1/p')" = off ] && break; sleep 1; done
say "Installed: the disc is ejected and the VM boots from its disk with UEFI"
A vm set web --eject --boot disk
A vm start web
for _ in $(seq 300); do A vm console web --log | grep -q 'login:\|root@' && break; sleep 1; done
A vm console web --log | grep -a 'Debian GNU/Linux\|login:\|root@' | tail -3 || true
say "Replicating 'web' to host-b every 30 s (the initial copy ships the installed system)"
A replication enable web --to "$DEMO/host-b/ferryd.sock" --interval 30s --wait
B replication points web
say "Planned failover of 'web' to host-b: shut down, every change shipped, started there"
A vm shutdown web --timeout 120
A failover planned web --start
for _ in $(seq 300); do B vm console web --log | grep -q 'login:\|root@' && break; sleep 1; done
B vm console web --log | grep -a 'Debian GNU/Linux\|login:\|root@' | tail -3 || true
B vm list
B vm shutdown web --timeout 120
say "Demo done (data in $DEMO)"
