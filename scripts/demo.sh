#!/bin/bash
# Ferry demo: two hosts (ferryd on 127.0.0.1 and 127.0.0.2, each with its own data dir),
# a test VM created and started on the first, its serial console shown while it writes
# verifiable blocks to its disk, then an ACPI shutdown. The second host is managed
# remotely over TLS (pinned certificate + token) to show both are real hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/ferry-target}
BIN=$CARGO_TARGET_DIR/debug
cargo build --workspace --bins -q
guest/build.sh >/dev/null

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
accel = "auto"
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
A --host host-b server show | head -n 3

say "Creating the test VM 'demo' on host-a (busybox guest writing checksummed blocks)"
A vm create demo --cpus 1 --memory 256M --disk 64M \
  --kernel "$PWD/guest/out/vmlinuz" --initrd "$PWD/guest/out/initramfs.gz" \
  --append "console=ttyS0 quiet panic=-1 guest.span=4096 guest.interval=0.5" --nic user
A vm start demo
A vm list

say "Its serial console (ferry vm console demo --log) while it boots and writes"
for _ in $(seq 60); do A vm console demo --log | grep -q 'WROTE seq=5 ' && break; sleep 0.5; done
A vm console demo --log | grep GUEST
A vm show demo

say "ACPI shutdown"
A vm shutdown demo --timeout 60
A vm console demo --log | tail -n 2
A vm list
say "Demo done (data in $DEMO)"
