#!/bin/bash
# Builds Ferry's real Debian test guest from Debian packages, and an installer ISO for it:
#   CACHE/root.squashfs  - a bookworm root (mmdebstrap --variant=apt): systemd, udev, the
#                          Debian kernel, qemu-guest-agent, systemd-networkd (DHCP on en*/eth*),
#                          sqlite3, grub for EFI and BIOS, root password "ferry" and an
#                          autologin root shell on ttyS0
#   CACHE/vmlinuz, CACHE/live-initrd.gz - the installer's kernel and busybox initramfs
#   CACHE/ferry-debian.iso - grub-mkrescue (BIOS + EFI) ISO whose live system installs the root
#                          onto the VM's first virtio disk unattended and powers off
# CACHE is /var/cache/ferry-debian/<key> (FERRY_DEBIAN_CACHE overrides the parent), where
# <key> hashes every file of guest/debian/, so a changed script rebuilds and an unchanged
# one costs nothing; the three newest builds are kept. Builds are serialized by a lock in the
# cache. Prints the ISO's path on stdout (progress goes to stderr).
# Needs (as root): apt-get install mmdebstrap squashfs-tools grub-common grub-pc-bin
#   grub-efi-amd64-bin xorriso mtools busybox-static kmod cpio (scripts/install-deps.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PARENT=${FERRY_DEBIAN_CACHE:-/var/cache/ferry-debian}
PKGS="mmdebstrap squashfs-tools grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools busybox-static kmod cpio"

die() { echo "guest/debian/build.sh: $*" >&2; exit 1; }
log() { echo "guest/debian/build.sh: $*" >&2; }

for tool in mmdebstrap mksquashfs grub-mkrescue xorriso mformat cpio gzip modinfo sha256sum flock file; do
  command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool' (install with: apt-get install $PKGS)"
done
for d in /usr/lib/grub/i386-pc /usr/lib/grub/x86_64-efi; do
  [ -d "$d" ] || die "missing $d (install with: apt-get install grub-pc-bin grub-efi-amd64-bin)"
done
[ -x /bin/busybox ] && file -L /bin/busybox | grep -q 'statically linked' \
  || die "/bin/busybox must be the static one (apt-get install busybox-static)"
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap builds the root with real ownership)"

# --- the cache key: every file of guest/debian/, names and contents -----------------------
KEY=$(cd "$HERE" && find . -type f ! -name '*~' -print0 | LC_ALL=C sort -z \
  | xargs -0 sha256sum | sha256sum | cut -c1-16)
OUT=$PARENT/$KEY
if [ -f "$OUT/ferry-debian.iso" ]; then
  echo "$OUT/ferry-debian.iso"
  exit 0
fi
mkdir -p "$PARENT"
# One build at a time on this machine (tests, scripts/test.sh and other checkouts share the
# cache); whoever waited may find the build done.
exec 9>"$PARENT/.lock"
flock 9
if [ -f "$OUT/ferry-debian.iso" ]; then
  echo "$OUT/ferry-debian.iso"
  exit 0
fi
rm -rf "$PARENT"/.build.*   # left by a build that was killed (we hold the lock)
TMP=$(mktemp -d "$PARENT/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
START=$(date +%s)

# --- 1. the root ---------------------------------------------------------------------------
# Documentation, man pages, locales and hardware drivers no VM has are left out: the root
# is copied by the installer under TCG, so every megabyte costs install time.
INCLUDE="systemd-sysv,udev,dbus,libpam-systemd,linux-image-amd64,qemu-guest-agent,sqlite3,grub-efi-amd64,grub-pc-bin,efibootmgr,e2fsprogs,dosfstools,fdisk,iproute2,kmod,procps,less"
EXCLUDES=()
for p in '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*' \
  '/usr/share/lintian/*' \
  '/lib/modules/*/kernel/drivers/gpu/*' '/lib/modules/*/kernel/drivers/media/*' \
  '/lib/modules/*/kernel/drivers/net/wireless/*' '/lib/modules/*/kernel/drivers/infiniband/*' \
  '/lib/modules/*/kernel/drivers/staging/*' '/lib/modules/*/kernel/sound/*' \
  '/lib/modules/*/kernel/drivers/bluetooth/*' '/lib/modules/*/kernel/net/bluetooth/*' \
  '/lib/modules/*/kernel/drivers/isdn/*' \
  '/lib/modules/*/kernel/drivers/iio/*' '/lib/modules/*/kernel/drivers/hid/*' \
  '/lib/modules/*/kernel/drivers/usb/*' '/lib/modules/*/kernel/net/wireless/*' \
  '/lib/modules/*/kernel/net/mac80211/*'; do
  EXCLUDES+=(--dpkgopt="path-exclude=$p")
done
# dbus + libpam-systemd bring systemd-logind, which acts on the ACPI power button (QMP
# system_powerdown) and on qemu-guest-agent's guest-shutdown (shutdown -P +0).
# (drivers/usb: USB storage/host; drivers/hid: keyboards; none is needed by a VM with a
# serial console and virtio devices. The qemu ps2 keyboard driver is built in.)
EXCLUDES+=(--dpkgopt='path-include=/usr/share/doc/*/copyright')

log "mmdebstrap bookworm (cold build, a few minutes)"
mmdebstrap --variant=apt \
  --aptopt='Apt::Install-Recommends "false"' \
  "${EXCLUDES[@]}" \
  --include="$INCLUDE" \
  --customize-hook="\"$HERE/customize.sh\" \"\$1\"" \
  bookworm "$TMP/root" >"$TMP/mmdebstrap.log" 2>&1 \
  || { tail -n 40 "$TMP/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
ROOT=$TMP/root
T1=$(date +%s)
log "root built in $((T1 - START)) s: $(du -sm "$ROOT" | cut -f1) MB"

# --- 2. the installer's kernel and initramfs ------------------------------------------------
KIMG=$(ls -1 "$ROOT"/boot/vmlinuz-* | sort -V | tail -n 1)
KVER=${KIMG##*/vmlinuz-}
MODDIR=$ROOT/lib/modules/$KVER
[ -d "$MODDIR" ] || die "no modules for $KVER in the root"
# What the live system needs to reach the root on the ISO: the q35 AHCI CD-ROM, iso9660,
# loop + squashfs. The installer itself loads the rest (virtio, ext4, vfat) with modprobe
# from the root.
WANT="ahci sr_mod isofs loop squashfs virtio_pci virtio_blk virtio_console"
ORDER=()
declare -A SEEN=()
add_module() {
  local m=${1//-/_} f dep
  [ -n "${SEEN[$m]:-}" ] && return 0
  SEEN[$m]=1
  f=$(modinfo -b "$ROOT" -k "$KVER" -F filename "$m" 2>/dev/null | head -n 1) || true
  [ -n "$f" ] || die "module $m not found for kernel $KVER"
  case "$f" in *"(builtin)"*) return 0;; esac
  for dep in $(modinfo -b "$ROOT" -k "$KVER" -F depends "$m" | tr ',' ' '); do
    add_module "$dep"
  done
  ORDER+=("$m")
}
for m in $WANT; do add_module "$m"; done
I=$TMP/initrd
mkdir -p "$I"/{bin,dev,proc,sys,cdrom,live,lib/modules}
cp /bin/busybox "$I/bin/busybox"
cp "$HERE/live-init" "$I/init"
chmod 755 "$I/init" "$I/bin/busybox"
for m in "${ORDER[@]}"; do
  f=$(modinfo -b "$ROOT" -k "$KVER" -F filename "$m" | head -n 1)
  [ -e "$f" ] || f=$ROOT$f   # (modinfo -b may print the path inside the root)
  case "$f" in
    *.ko)     cp "$f" "$I/lib/modules/$m.ko" ;;
    *.ko.xz)  xz -dc "$f" > "$I/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -dc "$f" > "$I/lib/modules/$m.ko" ;;
    *) die "unsupported module file $f" ;;
  esac
done
printf '%s\n' "${ORDER[@]}" > "$I/lib/modules/order"
(cd "$I" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6) > "$TMP/live-initrd.gz"

# --- 3. the ISO ----------------------------------------------------------------------------
ISO=$TMP/iso
mkdir -p "$ISO/live" "$ISO/boot/grub"
cp "$KIMG" "$ISO/live/vmlinuz"
cp "$TMP/live-initrd.gz" "$ISO/live/initrd.gz"
cp "$HERE/install.sh" "$ISO/live/install.sh"
# The root's machine identity is made on the installed system's first boot.
: > "$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
# zstd at a low level: quick to make, quickest to unpack under TCG.
# (The journal's POSIX ACLs are not kept: squashfs has no place for them, and journald
# sets them again.)
mksquashfs "$ROOT" "$ISO/live/root.squashfs" -comp zstd -Xcompression-level 6 \
  -noappend -quiet -no-progress >"$TMP/mksquashfs.log" 2>&1 \
  || { cat "$TMP/mksquashfs.log" >&2; die "mksquashfs failed"; }
grep -v 'Unrecognised xattr prefix system.posix_acl' "$TMP/mksquashfs.log" >&2 || true
T2=$(date +%s)
log "squashfs $(du -m "$ISO/live/root.squashfs" | cut -f1) MB in $((T2 - T1)) s"
cat > "$ISO/boot/grub/grub.cfg" <<'CFG'
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
menuentry "Install Ferry's Debian guest (erases the first virtio disk)" {
  linux /live/vmlinuz console=tty0 console=ttyS0,115200 panic=10
  initrd /live/initrd.gz
}
CFG
grub-mkrescue -o "$TMP/ferry-debian.iso" "$ISO" -- -volid FERRY_DEBIAN >/dev/null 2>"$TMP/mkrescue.log" \
  || { cat "$TMP/mkrescue.log" >&2; die "grub-mkrescue failed"; }

# --- publish: the ISO last, its presence marks the build complete ---------------------------
mkdir -p "$OUT"
cp "$KIMG" "$OUT/vmlinuz"
mv "$TMP/live-initrd.gz" "$OUT/live-initrd.gz"
mv "$ISO/live/root.squashfs" "$OUT/root.squashfs.tmp"
mv "$TMP/ferry-debian.iso" "$OUT/ferry-debian.iso.tmp"
mv "$OUT/root.squashfs.tmp" "$OUT/root.squashfs"
mv "$OUT/ferry-debian.iso.tmp" "$OUT/ferry-debian.iso"
# Only the three newest builds are kept: older versions of these scripts are of no further
# use, but another checkout on this machine may still be using a recent one.
ls -1dt "$PARENT"/*/ | tail -n +4 | xargs -r rm -rf
log "built in $(( $(date +%s) - START )) s: $OUT/ferry-debian.iso ($(du -m "$OUT/ferry-debian.iso" | cut -f1) MB)"
echo "$OUT/ferry-debian.iso"
