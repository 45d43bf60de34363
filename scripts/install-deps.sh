#!/bin/bash
# Installs the system packages Ferry and its tests need (Debian bookworm, as root):
# QEMU 7.2 (system emulator and qemu-utils from the same release: the machine may carry a
# newer qemu-utils from backports, which must be replaced together), the test guest's
# kernel and busybox, UEFI firmware (OVMF) for `--firmware uefi` VMs, and tools the tests
# use (the console's: headless Chromium with chromedriver, Python's aiosmtpd as a real SMTP
# server; Prometheus with promtool for the shipped rules and the scrape test; grub-mkrescue
# with BIOS and EFI GRUB, xorriso and mtools to build the bootable test ISO; openssl for the
# CA recipe); and what the real Debian guest (guest/debian/build.sh) and its UEFI install
# test need: mmdebstrap, squashfs-tools, sfdisk and e2fsck; Corosync and Pacemaker for the
# failover-cluster test. Does nothing when all is in place.
set -euo pipefail

need_apt=0
if ! command -v qemu-system-x86_64 >/dev/null || ! qemu-img --version 2>/dev/null | grep -q 'version 7\.2'; then
  need_apt=1
fi
for f in /bin/busybox /usr/sbin/modinfo /usr/bin/cpio /usr/bin/flock /usr/bin/nbdinfo /usr/bin/sqlite3 /usr/bin/curl \
  /usr/bin/chromium /usr/bin/chromedriver /usr/bin/openssl /usr/bin/prometheus /usr/bin/promtool \
  /usr/share/OVMF/OVMF_CODE_4M.fd /usr/bin/grub-mkrescue \
  /usr/lib/grub/i386-pc/boot.img /usr/lib/grub/x86_64-efi/linux.mod /usr/bin/xorriso /usr/bin/mformat \
  /usr/bin/mmdebstrap /usr/bin/mksquashfs /sbin/sfdisk /sbin/e2fsck \
  /usr/sbin/corosync /usr/sbin/pacemakerd /usr/sbin/crm_mon /usr/sbin/cibadmin; do
  [ -e "$f" ] || need_apt=1
done
ls /boot/vmlinuz-* >/dev/null 2>&1 || need_apt=1
command -v python3 >/dev/null || need_apt=1
# ping: the re-IP test pings a failed-over guest on its replica-site address.
command -v ping >/dev/null || need_apt=1
# Debian's python3 (not a pyenv shim's): the console's alert test runs /usr/bin/python3.
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || need_apt=1
if [ -e /bin/busybox ] && ! file -L /bin/busybox 2>/dev/null | grep -q 'statically linked'; then
  need_apt=1
fi

if [ "$need_apt" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The bookworm QEMU, pinned by version so a newer installed qemu-utils is replaced.
  V=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  apt-get install -y -qq --allow-downgrades \
    "qemu-system-x86=$V" "qemu-utils=$V" "qemu-block-extra=$V" \
    busybox-static linux-image-amd64 cpio kmod file util-linux libnbd-bin iproute2 \
    sqlite3 curl openssl python3 python3-aiosmtpd chromium chromium-driver iputils-ping >/dev/null
  # Binary-only grub packages: they do not touch this machine's own boot loader.
  apt-get install -y -qq --no-install-recommends mmdebstrap squashfs-tools grub-common \
    grub-pc-bin grub-efi-amd64-bin xorriso mtools ovmf fdisk e2fsprogs >/dev/null
  # The Linux HA stack for failover clusters (the cluster test runs three nodes of it in
  # network namespaces): Corosync, Pacemaker and its command-line tools.
  apt-get install -y -qq --no-install-recommends corosync pacemaker pacemaker-cli-utils >/dev/null
  # Prometheus and promtool only (not the node exporter it recommends, a daemon the tests
  # do not need).
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# noVNC, which the console serves in its Connect view: only its ES modules in
# /usr/share/novnc are used (the websockify and Python parts it depends on never run).
if [ ! -e /usr/share/novnc/core/rfb.js ]; then
  [ "$need_apt" = 1 ] || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends novnc >/dev/null
fi
qemu-system-x86_64 --version | head -n 1
qemu-img --version | head -n 1
# The package test (scripts/test-deb.sh) loads the shell completions in real zsh and fish.
if ! command -v zsh >/dev/null || ! command -v fish >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zsh fish >/dev/null
fi
