#!/bin/bash
# mmdebstrap customize hook for guest/debian/build.sh: configures the root at $1 (run on
# the build host, as root, after all packages are installed).
set -euo pipefail
R=$1

echo ferry-debian > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tferry-debian\n' > "$R/etc/hosts"
# A known root password for the console and SSH-less debugging: "ferry".
echo 'root:ferry' | chroot "$R" chpasswd

# Network: DHCP on any wired link. Nothing in the image waits for network-online.target,
# and a VM whose NIC has no DHCP server (most test bridges) would otherwise be "degraded"
# by systemd-networkd-wait-online timing out.
mkdir -p "$R/etc/systemd/network"
cat > "$R/etc/systemd/network/20-wired.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NET
chroot "$R" systemctl enable systemd-networkd.service
chroot "$R" systemctl disable systemd-networkd-wait-online.service
chroot "$R" systemctl mask systemd-networkd-wait-online.service

# Serial console: a root shell without a password prompt on ttyS0 (the console Ferry logs).
mkdir -p "$R/etc/systemd/system/serial-getty@ttyS0.service.d"
cat > "$R/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
UNIT
chroot "$R" systemctl enable serial-getty@ttyS0.service

# qemu-guest-agent has no [Install] section: Debian's udev rule starts it as soon as the
# virtio-serial port org.qemu.guest_agent.0 (Ferry's agent channel) appears. Check both
# are there, so a packaging change fails the build instead of a test much later.
grep -rqs 'org.qemu.guest_agent.0' "$R/lib/udev/rules.d/" "$R/usr/lib/udev/rules.d/" \
  || { echo "customize.sh: qemu-guest-agent's udev rule is missing" >&2; exit 1; }

# Boot: console on ttyS0 too (grub and the kernel), a short menu timeout.
mkdir -p "$R/etc/default/grub.d"
cat > "$R/etc/default/grub.d/ferry.cfg" <<'GRUB'
GRUB_TIMEOUT=1
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB

# ferry-writer: a small service tests can start through the guest agent
# (`systemctl start ferry-writer`): it appends a numbered row to an SQLite database each
# second and fsyncs it, so a replica's copy can be checked for a consistent prefix.
install -m 755 "$(dirname "$0")/ferry-writer" "$R/usr/local/bin/ferry-writer"
cat > "$R/etc/systemd/system/ferry-writer.service" <<'UNIT'
[Unit]
Description=Ferry test workload: numbered SQLite rows, one a second

[Service]
ExecStart=/usr/local/bin/ferry-writer /var/lib/ferry-writer/rows.db
Restart=on-failure
UNIT

# A small initramfs: only the drivers a VM's root disk needs (virtio, SATA, NVMe, SCSI;
# ext4), instead of MODULES=most's 33 MB, which grub and the kernel load and unpack slowly
# under TCG. A provisional fstab (the installer writes the real one, by UUID) tells the
# initramfs' fsck hook that the root is ext4, so the root is checked before it is mounted.
echo 'MODULES=list' > "$R/etc/initramfs-tools/conf.d/ferry.conf"
printf '%s\n' virtio_pci virtio_blk virtio_scsi sd_mod sr_mod ahci ata_piix nvme ext4 \
  crc32c_generic >> "$R/etc/initramfs-tools/modules"
echo 'LABEL=root / ext4 errors=remount-ro 0 1' > "$R/etc/fstab"
chroot "$R" update-initramfs -u -k all

# apt's lists are not needed in a test guest (and would be stale).
rm -rf "$R"/var/lib/apt/lists/*_* "$R"/var/cache/apt/*.bin
