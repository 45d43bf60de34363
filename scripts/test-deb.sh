#!/bin/bash
# CI step (scripts/test.sh): builds the Debian package from the debug binaries test.sh just
# built, checks what it holds (control fields, conffiles, maintainer scripts, every file),
# unpacks it into a throwaway root (never installs it on this machine), has
# `systemd-analyze verify` check its units there, runs the packaged binaries, reads the
# packaged man pages and loads the completions in real bash, zsh and fish, and starts the
# packaged ferryd with the packaged default config (paths moved into the throwaway dir) on a
# store written by an older release (crates/ferry-store/tests/fixtures), which it upgrades
# and then serves. Any mismatch: one line on stderr, exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/ferry-target}

fail() {
  echo "test-deb: $*" >&2
  exit 1
}
has() { # has TEXT NEEDLE WHAT
  grep -qF -- "$2" <<<"$1" || fail "$3: no \"$2\""
}

start=$(date +%s)
deb=$(scripts/build-deb.sh --profile dev --fast | tail -n 1)
version=$(cargo metadata --no-deps --format-version 1 | python3 -c \
  'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="ferry-daemon"))')

# Control fields.
info=$(dpkg-deb -f "$deb" Package Version Depends Section)
has "$info" "Package: ferry" "control"
has "$info" "Version: $version-1" "control"
for dep in qemu-system-x86 qemu-utils qemu-block-extra iproute2 systemd "libc6 (>="; do
  has "$(dpkg-deb -f "$deb" Depends)" "$dep" "Depends"
done
conffiles=$(dpkg-deb -I "$deb" conffiles)
has "$conffiles" "/etc/ferry/ferryd.toml" "conffiles"
has "$conffiles" "/etc/ferry/console.toml" "conffiles"
postinst=$(dpkg-deb -I "$deb" postinst)
has "$postinst" "systemd-sysusers" "postinst (the ferry-console user)"
has "$postinst" "systemd-tmpfiles" "postinst (/var/lib/ferry-console, the user's)"
[ "$(grep -n systemd-sysusers <<<"$postinst" | cut -d: -f1 | head -n 1)" -lt \
  "$(grep -n systemd-tmpfiles <<<"$postinst" | cut -d: -f1 | head -n 1)" ] ||
  fail "postinst makes /var/lib/ferry-console before its user"
has "$postinst" "deb-systemd-helper enable ferryd.service" "postinst"
has "$postinst" "deb-systemd-invoke \$_dh_action ferryd.service" "postinst"
# ferry-console is enabled only where it was before (upgrades), and never started: it needs a
# user first.
has "$postinst" "if deb-systemd-helper debian-installed ferry-console.service" "postinst"
grep -q 'deb-systemd-invoke start ferry-console' <<<"$postinst" && fail "postinst starts ferry-console (it needs a user first)"

# Every file, with its mode.
contents=$(dpkg-deb -c "$deb" | awk '{print $1, $6}')
for f in "-rwxr-xr-x ./usr/sbin/ferryd" "-rwxr-xr-x ./usr/bin/ferry" "-rwxr-xr-x ./usr/bin/ferry-console" \
  "-rw-r--r-- ./etc/ferry/ferryd.toml" "-rw-r--r-- ./etc/ferry/console.toml" \
  "-rw-r--r-- ./usr/lib/systemd/system/ferryd.service" "-rw-r--r-- ./usr/lib/systemd/system/ferry-console.service" \
  "-rw-r--r-- ./usr/lib/sysusers.d/ferry.conf" "-rw-r--r-- ./usr/lib/tmpfiles.d/ferry-console.conf" "-rw-r--r-- ./usr/share/doc/ferry/copyright" \
  "-rw-r--r-- ./usr/share/doc/ferry/README.md" "-rw-r--r-- ./usr/share/doc/ferry/CONFIG.md"; do
  has "$contents" "$f" "package contents"
done
for b in ferry ferryd ferry-console; do
  has "$contents" "./usr/share/bash-completion/completions/$b" "package contents"
  has "$contents" "./usr/share/zsh/vendor-completions/_$b" "package contents"
  has "$contents" "./usr/share/fish/vendor_completions.d/$b.fish" "package contents"
  has "$contents" "./usr/share/man/man1/$b.1.gz" "package contents"
done
# One page per subcommand too, as git has.
for p in ferry-vm-create ferry-replication-enable ferry-failover-planned ferry-checkpoint-apply ferry-console-set-password; do
  has "$contents" "./usr/share/man/man1/$p.1.gz" "package contents"
done
pages=$(grep -c 'usr/share/man/man1/.*\.1\.gz$' <<<"$contents")

root=$(mktemp -d /tmp/ferry-deb.XXXXXX)
ferryd_pid=
console_pid=
cleanup() {
  [ -n "$console_pid" ] && kill "$console_pid" 2>/dev/null
  # A daemonized QEMU outlives ferryd: stop the test VM by its pid file, then ferryd.
  for pidfile in "$root"/var/lib/ferry/run/*.pid; do
    [ -f "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null
  done
  [ -n "$ferryd_pid" ] && kill "$ferryd_pid" 2>/dev/null && wait "$ferryd_pid" 2>/dev/null
  rm -rf "$root"
}
trap cleanup EXIT
dpkg -x "$deb" "$root"

# The units, checked against the unpacked root (with this machine's systemd units beside
# them, for the targets they refer to; man pages looked up in the package's own).
cp -an /usr/lib/systemd/system/. "$root/usr/lib/systemd/system/"
verify=$(cd "$root" && MANPATH="$root/usr/share/man" systemd-analyze verify --root="$root" \
  usr/lib/systemd/system/ferryd.service usr/lib/systemd/system/ferry-console.service 2>&1) ||
  fail "systemd-analyze verify failed: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify warns: $verify"
exposure=$(for u in ferryd ferry-console; do
  systemd-analyze security --offline=yes --root="$root" "$root/usr/lib/systemd/system/$u.service" 2>/dev/null |
    sed -n "s/.*Overall exposure level for $u.service: \([0-9.]*\).*/$u \1/p"
done | paste -sd ' ')

# The postinst's user and store directory, made from the packaged sysusers.d and tmpfiles.d
# entries inside the root; then the console's documented first steps as that user: the
# first user's password, and serving with the packaged console.toml (on a free port).
systemd-sysusers --root="$root" ferry.conf >/dev/null 2>&1 || fail "systemd-sysusers refused ferry.conf"
uid=$(awk -F: '$1 == "ferry-console" {print $3}' "$root/etc/passwd")
[ -n "$uid" ] || fail "sysusers made no ferry-console user"
systemd-tmpfiles --create --root="$root" ferry-console.conf || fail "systemd-tmpfiles refused ferry-console.conf"
[ "$(stat -c '%u %a' "$root/var/lib/ferry-console")" = "$uid 700" ] ||
  fail "/var/lib/ferry-console is $(stat -c '%u %a' "$root/var/lib/ferry-console"), not the console user's 0700"
chmod 755 "$root"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -e "s#^data_dir = .*#data_dir = \"$root/var/lib/ferry-console\"#" -e "s#^listen = .*#listen = \"127.0.0.1:$port\"#" \
  "$root/etc/ferry/console.toml" >"$root/console.toml"
as_console() { setpriv --reuid "$uid" --regid "$uid" --clear-groups "$root/usr/bin/ferry-console" --config "$root/console.toml" "$@"; }
echo 'a long password' | as_console set-password admin >/dev/null || fail "set-password as the console's user failed"
# Not through the function: $! must be ferry-console itself (setpriv execs it), which gets
# the SIGINT below.
setpriv --reuid "$uid" --regid "$uid" --clear-groups "$root/usr/bin/ferry-console" --config "$root/console.toml" \
  serve 2>"$root/console.log" &
console_pid=$!
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$port/login" && break
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$port/login" || fail "the packaged console does not serve: $(tail -n 2 "$root/console.log")"
kill -INT "$console_pid"
for _ in $(seq 50); do
  kill -0 "$console_pid" 2>/dev/null || break
  sleep 0.1
done
kill -0 "$console_pid" 2>/dev/null && fail "the console did not stop in 5 s on SIGINT (its KillSignal)"
wait "$console_pid" || fail "the console exited with status $? on SIGINT (its KillSignal)"
console_pid=

# The packaged binaries run.
[ "$("$root/usr/bin/ferry" --version)" = "ferry $version" ] || fail "ferry --version: $("$root/usr/bin/ferry" --version)"
[ "$("$root/usr/sbin/ferryd" --version)" = "ferryd $version" ] || fail "ferryd --version"
[ "$("$root/usr/bin/ferry-console" --version)" = "ferry-console $version" ] || fail "ferry-console --version"
has "$("$root/usr/sbin/ferryd" --help)" "/etc/ferry/ferryd.toml" "ferryd --help"
has "$("$root/usr/bin/ferry-console" --help)" "set-password" "ferry-console --help"

# Man pages render, and say what --help says.
page=$(MANWIDTH=200 man -l "$root/usr/share/man/man1/ferry-replication-enable.1.gz" 2>/dev/null)
has "$page" "--recovery-points" "man ferry-replication-enable"
has "$(MANWIDTH=200 man -l "$root/usr/share/man/man1/ferryd.1.gz" 2>/dev/null)" "FERRYD_CONFIG" "man ferryd"

# Completions load in each shell and complete subcommands.
words=$(bash -c 'source "$1"; COMP_WORDS=(ferry repl); COMP_CWORD=1; COMP_LINE="ferry repl"; COMP_POINT=10;
  _ferry ferry repl ferry; echo "${COMPREPLY[*]}"' _ "$root/usr/share/bash-completion/completions/ferry")
has "$words" "replication" "bash completion of \"ferry repl\""
has "$words" "replica-server" "bash completion of \"ferry repl\""
for b in ferry ferryd ferry-console; do
  bash -n "$root/usr/share/bash-completion/completions/$b" || fail "bash: $b completion"
  zsh -n "$root/usr/share/zsh/vendor-completions/_$b" || fail "zsh: _$b completion"
  fish -n "$root/usr/share/fish/vendor_completions.d/$b.fish" || fail "fish: $b completion"
done
words=$(fish -c "source $root/usr/share/fish/vendor_completions.d/ferry.fish; complete -C 'ferry failover '" | cut -f1)
has "$words" "planned" "fish completion of \"ferry failover \""

# The packaged ferryd, with the packaged config (paths moved into the throwaway dir, TCG,
# loopback), upgrades a store written by release a16d500 and serves what it held.
lib=$root/var/lib/ferry
mkdir -p "$lib"
sqlite3 "$lib/ferry.db" <crates/ferry-store/tests/fixtures/store-a16d500.sql
sed -e "s#^data_dir = .*#data_dir = \"$lib\"#" -e "s#^vm_storage = .*#vm_storage = \"$lib/vms\"#" \
  -e "s#^admin_socket = .*#admin_socket = \"$root/run/ferryd.sock\"#" -e 's#^tls_listen = .*#tls_listen = "127.0.0.1:0"#' \
  -e 's#^accel = .*#accel = "tcg"#' "$root/etc/ferry/ferryd.toml" >"$root/ferryd.toml"
grep -q "^data_dir = \"$lib\"" "$root/ferryd.toml" || fail "the packaged ferryd.toml has no data_dir line"
mkdir -p "$root/run"
# Under the unit's main restrictions, approximated without systemd (none runs here): a
# mount namespace where everything is read-only but the state and runtime directories
# (ProtectSystem=strict + StateDirectory/RuntimeDirectory), CAP_NET_ADMIN as the only
# capability left (CapabilityBoundingSet), no new privileges (NoNewPrivileges).
unshare -m sh -c 'mount --make-rprivate / && mount --bind "$1" "$1" && mount --bind "$2" "$2" &&
  mount -o remount,bind,ro / && exec setpriv --bounding-set -all,+net_admin --inh-caps -all \
  --no-new-privs "$3" --config "$4"' _ "$lib" "$root/run" "$root/usr/sbin/ferryd" "$root/ferryd.toml" \
  2>"$root/ferryd.log" &
ferryd_pid=$!
for _ in $(seq 100); do
  [ -S "$root/run/ferryd.sock" ] && break
  kill -0 "$ferryd_pid" 2>/dev/null || fail "the packaged ferryd exited: $(tail -n 3 "$root/ferryd.log")"
  sleep 0.1
done
[ -S "$root/run/ferryd.sock" ] || fail "the packaged ferryd made no admin socket in 10 s"
ferry() { "$root/usr/bin/ferry" --socket "$root/run/ferryd.sock" --output json "$@"; }
vms=$(ferry vm list)
has "$vms" '"name": "web1"' "ferry vm list"
has "$vms" '"name": "db1"' "ferry vm list"
points=$(ferry replication points db1)
[ "$(grep -c '"cycle"' <<<"$points")" = 3 ] || fail "ferry replication points db1: $points"
has "$(ferry events --last 10)" "replica storage 91% full" "ferry events"
has "$(ferry replica-server show)" '"trust_group": "g1"' "ferry replica-server show"
has "$(ferry checkpoint list web1)" "before upgrade" "ferry checkpoint list web1"
# (unshare, sh and setpriv exec'd each other: the pid is ferryd's.) CAP_NET_ADMIN is bit 12.
[ "$(cat "/proc/$ferryd_pid/comm")" = ferryd ] || fail "pid $ferryd_pid is not ferryd"
grep -q '^CapBnd:[[:space:]]*0000000000001000$' "/proc/$ferryd_pid/status" ||
  fail "ferryd's capability bounding set is not CAP_NET_ADMIN alone"

# ...where it creates and runs a VM: the test guest boots under TCG and writes its blocks.
# Its kernel and initrd inside the VM storage, which API requests may always name.
guest/build.sh >/dev/null
mkdir -p "$lib/vms"
cp guest/out/vmlinuz guest/out/initramfs.gz "$lib/vms/"
ferry vm create pkgtest --cpus 1 --memory 256M --disk 64M --kernel "$lib/vms/vmlinuz" \
  --initrd "$lib/vms/initramfs.gz" --nic user \
  --append "console=ttyS0 quiet panic=-1 guest.span=4096 guest.interval=0.5" >/dev/null
ferry vm start pkgtest >/dev/null
for _ in $(seq 120); do
  "$root/usr/bin/ferry" --socket "$root/run/ferryd.sock" vm console pkgtest --log | grep -q 'WROTE seq=2 ' && break
  sleep 0.5
done
"$root/usr/bin/ferry" --socket "$root/run/ferryd.sock" vm console pkgtest --log | grep -q 'WROTE seq=2 ' ||
  fail "the test guest did not write under the packaged, restricted ferryd in 60 s: $(tail -n 3 "$root/ferryd.log")"
ferry vm stop pkgtest >/dev/null

echo "test-deb: ok in $(($(date +%s) - start)) s: $(basename "$deb"), $(du -k "$deb" | cut -f1) KiB, $pages man pages, exposure $exposure"
