#!/usr/bin/env bash
# Builds (once) the throwaway Debian bookworm VM image the real-systemd test boots, and prints
# the directory holding it: rootfs.raw (ext4, root=/dev/vda), vmlinuz, initrd.img.
#
# Cached in ${TASKFLOW_CACHE:-/var/cache/taskflow}/vm-image-<hash of this file>, so editing
# the recipe builds a new image and an unchanged one is reused. Built under a lock (two
# `make test` runs share the cache); ~3-5 min cold, from Debian's mirror only.
#
# Contents: systemd as PID 1, PostgreSQL 15, Redis, python3 (the SMTP sink: smtpd's
# DebuggingServer; maildev needs node >= 20, bookworm has 18), curl, jq. Nothing of ours:
# binaries, units and the check script arrive per run over a 9p share (tests/systemd/run.sh).
# The image runs one unit of its own, taskflow-vmtest.service, which mounts that share, runs
# its guest/run.sh once and powers the machine off.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TASKFLOW_CACHE:-/var/cache/taskflow}"
MIRROR="${TASKFLOW_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The recipe: this file and the unit it installs.
key="$(cat "$here/image.sh" "$here/taskflow-vmtest.service" | sha256sum | cut -c1-12)"
OUT="$CACHE/vm-image-$key"

log() { printf 'vm-image: %s\n' "$*" >&2; }

if [ -f "$OUT/done" ]; then
  echo "$OUT"
  exit 0
fi

missing=()
for tool in mmdebstrap mkfs.ext4; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "cannot build the VM image: missing ${missing[*]} (scripts/install-deps.sh installs mmdebstrap, e2fsprogs)"
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  log "cannot build the VM image: mmdebstrap needs root here (run make test as root, or build $OUT once as root)"
  exit 1
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/vm-image.lock"
flock 9
if [ -f "$OUT/done" ]; then
  echo "$OUT"
  exit 0
fi

work="$CACHE/vm-image-$key.tmp"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

log "building $OUT with mmdebstrap (bookworm, from $MIRROR); a few minutes, once"
start=$(date +%s)
mmdebstrap --variant=apt --mode=root --quiet \
  --include=systemd,systemd-sysv,udev,dbus,kmod,linux-image-amd64,initramfs-tools,e2fsprogs,procps,util-linux,postgresql-15,redis-server,python3,curl,jq,libstdc++6 \
  --customize-hook='echo taskflow-vm >"$1/etc/hostname"' \
  --customize-hook='printf "127.0.0.1 localhost taskflow-vm\n::1 localhost\n" >"$1/etc/hosts"' \
  --customize-hook='printf "/dev/vda / ext4 rw,errors=remount-ro 0 1\n" >"$1/etc/fstab"' \
  --customize-hook='printf "9p\n9pnet_virtio\n" >"$1/etc/modules-load.d/taskflow-9p.conf"' \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook='printf "max_prepared_transactions = 64\nfsync = off\n" >"$1/etc/postgresql/15/main/conf.d/taskflow.conf"' \
  --customize-hook='for u in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer e2scrub_reap.service; do ln -sf /dev/null "$1/etc/systemd/system/$u"; done' \
  --customize-hook="cp '$here/taskflow-vmtest.service' \"\$1/etc/systemd/system/\"" \
  --customize-hook='mkdir -p "$1/etc/systemd/system/multi-user.target.wants" "$1/mnt/taskflow" && ln -sf ../taskflow-vmtest.service "$1/etc/systemd/system/multi-user.target.wants/"' \
  bookworm "$work/root" "$MIRROR" >&2

cp -L "$work"/root/boot/vmlinuz-* "$work/vmlinuz"
cp -L "$work"/root/boot/initrd.img-* "$work/initrd.img"
# (stdout is the image path the caller reads: tools' chatter goes to stderr — mkfs.ext4
# says "Creating regular file …" even with -q, which broke the first run on a fresh machine)
mkfs.ext4 -q -L taskflow-root -d "$work/root" "$work/rootfs.raw" 3G >&2
rm -rf "$work/root"
rm -rf "$OUT"
mkdir -p "$OUT"
mv "$work/vmlinuz" "$work/initrd.img" "$work/rootfs.raw" "$OUT/"
touch "$OUT/done"
log "built $OUT in $(( $(date +%s) - start )) s"
echo "$OUT"
