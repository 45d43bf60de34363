#!/bin/bash
# Builds the Debian package `ferry` (ferryd, ferry, ferry-console, systemd units, default
# configs in /etc/ferry, shell completions, man pages) with cargo-deb, and prints its path.
#
#   scripts/build-deb.sh                 # release build: the package to install
#   scripts/build-deb.sh --profile dev --fast   # CI: packages the debug binaries test.sh built
#
# Needs cargo-deb: `cargo install --locked --version 3.8.0 cargo-deb` (installed here when
# missing; pinned: newer releases mean to refuse `--profile dev`, which CI packages).
# The completions and man pages come from the binaries' own clap definitions (their hidden
# `completions SHELL` and `man DIR` subcommands), so they always match `--help`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/ferry-target}

profile=release
fast=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --fast) fast=(--fast); shift ;;
    *) echo "build-deb.sh: unknown argument $1 (use --profile NAME, --fast)" >&2; exit 2 ;;
  esac
done
case "$profile" in
  dev | debug) dir=debug ;;
  *) dir=$profile ;;
esac

if ! command -v cargo-deb >/dev/null; then
  cargo install --locked --version 3.8.0 cargo-deb
fi

cargo build --profile "$profile" -p ferry-daemon -p ferry-cli -p ferry-console --bins >&2
bin=$CARGO_TARGET_DIR/$dir
docs=$bin/ferry-docs
rm -rf "$docs"
mkdir -p "$docs/man" "$docs/bash" "$docs/zsh" "$docs/fish"
for b in ferry ferryd ferry-console; do
  "$bin/$b" man "$docs/man"
  "$bin/$b" completions bash >"$docs/bash/$b"
  "$bin/$b" completions zsh >"$docs/zsh/_$b"
  "$bin/$b" completions fish >"$docs/fish/$b.fish"
done
# Debian policy: man pages compressed, reproducibly (-n: no name or time stamp).
gzip -9n "$docs"/man/*.1

# --no-build: the binaries were built above (cargo-deb reads them from target/release/...,
# which it maps to $CARGO_TARGET_DIR/$dir).
deb=$(cargo deb -p ferry-daemon --no-build --profile "$profile" "${fast[@]}" --output "$CARGO_TARGET_DIR/debian/" 2>&1 | tee /dev/stderr | tail -n 1)
[ -f "$deb" ] || { echo "build-deb.sh: cargo deb made no package" >&2; exit 1; }
echo "$deb"
