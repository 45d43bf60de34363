#!/bin/bash
# Ferry's fuzz targets (fuzz/, cargo-fuzz + libFuzzer; docs/FUZZING.md).
#
#   scripts/fuzz.sh smoke [SECONDS]        every target for SECONDS (default 5) from its
#                                          corpus; fails loudly on a crash, hang or
#                                          oversized allocation (what CI runs)
#   scripts/fuzz.sh run TARGET SECONDS [RUNS]  one long run (nice'd), log in fuzz/logs/
#   scripts/fuzz.sh list
#
# libFuzzer needs nightly compiler flags (-Zsanitizer, coverage passes). The stable
# toolchain accepts them with RUSTC_BOOTSTRAP=1, so no nightly toolchain is installed.
# cargo-fuzz is installed with `cargo install --locked` when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/ferry-target}
export RUSTC_BOOTSTRAP=1

# libFuzzer itself is C++ (built by libfuzzer-sys).
if ! command -v c++ >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  # Its own target dir beside the shared one, so a reinstall on this machine is cached.
  CARGO_TARGET_DIR="$CARGO_TARGET_DIR/cargo-install" cargo install --locked cargo-fuzz
fi

TARGETS=(frame_reader batch_decode spool_reader replication_msg export_import qcow2_metadata nbd_client api_requests)

# Limits per target. Every allocation above -malloc_limit_mb is a failure: for the wire
# targets that is the frame limit (8 MiB, ferry_wire::MAX_FRAME) plus its header, for the qcow2 reader QEMU's own L1 table limit (32 MiB), for JSON and NBD a
# few MiB. -timeout is the per-input hang limit in seconds.
malloc_limit() {
  case "$1" in
    qcow2_metadata) echo 40 ;;
    # One maximal frame is 8 MiB + its 24-byte header (the corpus has a frame declaring it).
    frame_reader | spool_reader | export_import) echo 9 ;;
    nbd_client) echo 17 ;;
    *) echo 8 ;;
  esac
}

build() {
  (cd fuzz && cargo fuzz build --fuzz-dir . "$@")
}

fuzz_one() {
  local target=$1 secs=$2 runs=${3:-0}
  local corpus=fuzz/corpus/$target
  local work
  work=$(mktemp -d)
  # New inputs go to a scratch directory, so the committed corpus changes only when a
  # developer minimizes and commits on purpose (docs/FUZZING.md).
  local args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048
    -malloc_limit_mb="$(malloc_limit "$target")" -max_len=65536 -print_final_stats=1
    -artifact_prefix="fuzz/artifacts/$target/")
  [ "$runs" != 0 ] && args+=(-runs="$runs")
  mkdir -p "fuzz/artifacts/$target"
  local bin=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/$target
  set +e
  "$bin" "${args[@]}" "$work" "$corpus"
  local rc=$?
  set -e
  rm -rf "$work"
  # The spool and qcow2 targets' scratch files (one per fuzzing process; a running fuzzer
  # rewrites its own for every input, so removing them under it is harmless).
  rm -f /dev/shm/ferry-fuzz-{spool,qcow2}-* "${TMPDIR:-/tmp}"/ferry-fuzz-{spool,qcow2}-*
  return $rc
}

case "${1:-}" in
  list) printf '%s\n' "${TARGETS[@]}" ;;
  smoke)
    secs=${2:-5}
    # fuzz/ is its own workspace: the main `cargo fmt --all --check` does not see it.
    (cd fuzz && cargo fmt --check)
    build
    failed=()
    for t in "${TARGETS[@]}"; do
      echo "=== fuzz $t (${secs}s from fuzz/corpus/$t)"
      if ! fuzz_one "$t" "$secs" >"/tmp/ferry-fuzz-$t.log" 2>&1; then
        tail -n 60 "/tmp/ferry-fuzz-$t.log"
        failed+=("$t")
      else
        grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "/tmp/ferry-fuzz-$t.log" | tr '\n' ' '
        echo
      fi
    done
    if [ ${#failed[@]} -gt 0 ]; then
      echo "FUZZ FAILURE in: ${failed[*]} (reproducers in fuzz/artifacts/; docs/FUZZING.md)" >&2
      exit 1
    fi
    echo "fuzz: ${#TARGETS[@]} passed, 0 failed"
    ;;
  run)
    t=${2:?target}; secs=${3:?seconds}
    build
    mkdir -p fuzz/logs
    nice -n 10 bash -c "$(declare -f fuzz_one malloc_limit); CARGO_TARGET_DIR=$CARGO_TARGET_DIR fuzz_one $t $secs ${4:-0}" 2>&1 | tee "fuzz/logs/$t.log"
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
