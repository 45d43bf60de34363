#!/bin/bash
# Runs Ferry's whole test suite: installs what it needs, builds the test guest, then
# unit and integration tests (real QEMU guests under TCG, real ferryd daemons).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/ferry-target}
scripts/install-deps.sh
guest/build.sh
# The real Debian guest's installer ISO: a few minutes once, then cached under
# /var/cache/ferry-debian (keyed on guest/debian/'s content).
guest/debian/build.sh >/dev/null
cargo fmt --all --check
# ferryd and ferry are run by the integration tests: build them first (nextest builds
# only test targets).
cargo build --workspace --bins
# The Debian package, from those binaries: contents, units, completions, man pages, and its
# ferryd upgrading an older release's store (about 30 s; never installed on this machine).
scripts/test-deb.sh
# Every fuzz target briefly from its committed corpus (fuzz/, docs/FUZZING.md): a crash,
# hang or oversized allocation fails the run.
scripts/fuzz.sh smoke 5
cargo nextest run --workspace --profile ci
