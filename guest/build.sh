#!/bin/bash
# Build Ferry's test guest from Debian packages:
#   OUTDIR/vmlinuz       - the newest kernel found in /boot
#   OUTDIR/initramfs.gz  - newc cpio (gzip): static busybox + guest/init + the virtio/ACPI modules
# Usage: guest/build.sh [OUTDIR]      (default: <repo>/guest/out)
# Needs: apt-get install linux-image-amd64 busybox-static cpio kmod
# Idempotent: does nothing when the outputs are newer than guest/init and this script
# and were built for the same kernel.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-$HERE/out}
INIT_SRC=$HERE/init
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
PKGS="linux-image-amd64 busybox-static cpio kmod"

die() { echo "guest/build.sh: $* (install with: apt-get install $PKGS)" >&2; exit 1; }

# Modules the guest needs, in no particular order (dependencies are resolved below).
# button+evdev: the ACPI power button becomes /dev/input/eventN, which /init watches.
# virtio_console: virtio-serial ports (the guest agent channel org.qemu.guest_agent.0).
WANT="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_net virtio_console button evdev"

# --- find the kernel --------------------------------------------------------
KIMG=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$KIMG" ] || die "no kernel found in /boot/vmlinuz-*"
[ -r "$KIMG" ] || die "kernel $KIMG is not readable"
KVER=${KIMG#/boot/vmlinuz-}
MODDIR=/lib/modules/$KVER
[ -d "$MODDIR" ] || die "no module directory $MODDIR for kernel $KVER"
for tool in cpio gzip modinfo; do
  command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool'"
done
[ -f "$INIT_SRC" ] || { echo "guest/build.sh: missing $INIT_SRC" >&2; exit 1; }

# --- busybox must be the static one (it runs alone in the initramfs) ---------
BB=/bin/busybox
[ -x "$BB" ] || die "missing $BB"
if command -v file >/dev/null 2>&1; then
  file -L "$BB" | grep -q 'statically linked' || die "$BB is not statically linked (need busybox-static)"
elif command -v dpkg >/dev/null 2>&1; then
  dpkg -S "$(readlink -f "$BB")" 2>/dev/null | grep -q '^busybox-static:' \
    || die "$BB does not come from busybox-static"
fi

# --- up to date? -------------------------------------------------------------
STAMP=$OUT/.kernel
if [ -f "$OUT/initramfs.gz" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$STAMP" ] \
   && [ "$(cat "$STAMP")" = "$KIMG" ] \
   && [ "$OUT/initramfs.gz" -nt "$INIT_SRC" ] && [ "$OUT/initramfs.gz" -nt "$SELF" ] \
   && ! [ "$KIMG" -nt "$OUT/vmlinuz" ]; then
  echo "$OUT/vmlinuz"
  echo "$OUT/initramfs.gz"
  exit 0
fi

# --- resolve module load order (dependencies first, built-ins skipped) -------
ORDER=()
declare -A SEEN=()
add_module() {
  local m=${1//-/_} f dep
  [ -n "${SEEN[$m]:-}" ] && return 0
  SEEN[$m]=1
  f=$(modinfo -k "$KVER" -F filename "$m" 2>/dev/null | head -n 1) || true
  [ -n "$f" ] || die "module $m not found for kernel $KVER"
  case "$f" in *"(builtin)"*) return 0;; esac   # compiled into the kernel
  for dep in $(modinfo -k "$KVER" -F depends "$m" | tr ',' ' '); do
    add_module "$dep"
  done
  ORDER+=("$m")
}
for m in $WANT; do add_module "$m"; done

# --- assemble the initramfs tree ---------------------------------------------
mkdir -p "$OUT"
TMP=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
R=$TMP/root
mkdir -p "$R"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$BB" "$R/bin/busybox"
cp "$INIT_SRC" "$R/init"
chmod 755 "$R/init" "$R/bin/busybox"
for m in "${ORDER[@]}"; do
  f=$(modinfo -k "$KVER" -F filename "$m" | head -n 1)
  case "$f" in
    *.ko)     cp "$f" "$R/lib/modules/$m.ko" ;;
    *.ko.xz)  xz -dc "$f" > "$R/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -dc "$f" > "$R/lib/modules/$m.ko" ;;
    *.ko.gz)  gzip -dc "$f" > "$R/lib/modules/$m.ko" ;;
    *) die "unsupported module file $f" ;;
  esac
done
# /init loads the modules in this order
printf '%s\n' "${ORDER[@]}" > "$R/lib/modules/order"
# /dev/console must exist before devtmpfs is mounted so the kernel can hand it to /init
# (without root this fails; /init then reopens /dev/console after mounting devtmpfs).
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true

(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6) > "$TMP/initramfs.gz"
cp "$KIMG" "$TMP/vmlinuz"
echo "$KIMG" > "$TMP/kernel"
mv -f "$TMP/vmlinuz" "$OUT/vmlinuz"
mv -f "$TMP/kernel" "$STAMP"
mv -f "$TMP/initramfs.gz" "$OUT/initramfs.gz"   # last: its mtime marks the build as complete

echo "guest/build.sh: kernel $KVER, modules: ${ORDER[*]}" >&2
echo "$OUT/vmlinuz"
echo "$OUT/initramfs.gz"
