#!/bin/bash
# The installer of Ferry's Debian guest, run by the ISO's live system (live-init) inside
# the Debian root it carries (read-only; /run and /tmp are tmpfs). Installs that root onto
# the first virtio disk, unattended, erasing it:
#   GPT: partition 1 = EFI system partition (FAT32, 200 MiB), partition 2 = root (ext4)
#   grub for EFI at the removable-media path EFI/BOOT/BOOTX64.EFI (boots with any NVRAM,
#   e.g. a fresh OVMF vars file) and, when the firmware's variables are writable, a
#   "debian" boot entry too; fstab by UUID.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C
step() { echo "FERRY-INSTALL: $*"; }
T0=$(date +%s)

for m in virtio_pci virtio_blk ext4 vfat nls_cp437 nls_ascii efivarfs; do
  modprobe "$m" 2>/dev/null || true   # some are built in
done
DISK=
for i in $(seq 1 100); do
  DISK=$(ls -1 /sys/block 2>/dev/null | grep '^vd' | sort | head -n 1 || true)
  [ -n "$DISK" ] && break
  sleep 0.2
done
[ -n "$DISK" ] || { echo "no virtio disk found" >&2; exit 1; }
DEV=/dev/$DISK
step "target $DEV ($(( $(cat /sys/block/$DISK/size) / 2048 )) MiB)"

wipefs -a -q "$DEV"
sfdisk -q "$DEV" <<PART
label: gpt
size=200MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system partition"
type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
PART
for i in $(seq 1 50); do [ -b "${DEV}2" ] && break; sleep 0.1; done
[ -b "${DEV}2" ] || { echo "partitions of $DEV did not appear" >&2; exit 1; }
mkfs.vfat -F 32 -n ESP "${DEV}1" >/dev/null
mkfs.ext4 -q -F -L root "${DEV}2"

mount "${DEV}2" /mnt
step "copying the root"
# -x: one filesystem, so /proc, /sys, /dev, /run, /tmp and /mnt itself stay behind (as
# empty mount points).
cp -ax /. /mnt/
mkdir -p /mnt/boot/efi
mount "${DEV}1" /mnt/boot/efi
ROOT_UUID=$(blkid -s UUID -o value "${DEV}2")
ESP_UUID=$(blkid -s UUID -o value "${DEV}1")
cat > /mnt/etc/fstab <<FSTAB
# <file system>  <mount point>  <type>  <options>  <dump>  <pass>
UUID=$ROOT_UUID  /          ext4  errors=remount-ro  0  1
UUID=$ESP_UUID   /boot/efi  vfat  umask=0077         0  2
FSTAB

step "installing grub"
for d in dev proc sys run; do mount --bind "/$d" "/mnt/$d"; done
# No udev in the live system: grub-mkconfig puts root=UUID= on the kernel line only when
# /dev/disk/by-uuid/<uuid> exists.
mkdir -p /dev/disk/by-uuid
ln -sf "../../${DISK}2" "/dev/disk/by-uuid/$ROOT_UUID"
ln -sf "../../${DISK}1" "/dev/disk/by-uuid/$ESP_UUID"
chroot /mnt grub-install --target=x86_64-efi --efi-directory=/boot/efi --removable --no-nvram
if [ -d /sys/firmware/efi ] && mount -t efivarfs efivarfs /mnt/sys/firmware/efi/efivars 2>/dev/null; then
  if chroot /mnt grub-install --target=x86_64-efi --efi-directory=/boot/efi --bootloader-id=debian; then
    step "NVRAM boot entry written"
  else
    step "no NVRAM boot entry (the removable path boots anyway)"
  fi
  umount /mnt/sys/firmware/efi/efivars
fi
chroot /mnt update-grub 2>&1 | sed 's/^/  /'
grep -q "root=UUID=$ROOT_UUID" /mnt/boot/grub/grub.cfg \
  || { echo "grub.cfg does not boot root=UUID=$ROOT_UUID" >&2; exit 1; }

for d in run sys proc dev; do umount "/mnt/$d"; done
umount /mnt/boot/efi
umount /mnt
sync
step "installed in $(( $(date +%s) - T0 )) s"
