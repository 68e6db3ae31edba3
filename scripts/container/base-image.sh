#!/usr/bin/env bash
# Makes a local Debian bookworm image with Python 3.11 (Debian's python3) from Debian's own
# packages with debootstrap, for machines that cannot pull python:3.11-slim-bookworm.
# Usage: scripts/container/base-image.sh [IMAGE]   (default localhost/debian-python:bookworm)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
BASE=${1:-localhost/debian-python:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

need_commands buildah debootstrap
if "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "$BASE exists"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root: run as root (or with sudo)."
rootfs=$(mktemp -d /var/tmp/tvserve-rootfs.XXXXXX)
trap 'rm -rf "$rootfs" "$rootfs.tar"' EXIT
echo "debootstrap: Debian bookworm (minbase, python3) from $MIRROR into $rootfs (a few minutes) ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
  > "$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
rm -f "$rootfs.log"
# The host's apt settings for reaching the archive (e.g. a snapshot mirror's dates), so that the
# Dockerfile's apt-get works inside the image as it does here.
grep -h '^Acquire::' /etc/apt/apt.conf.d/* > "$rootfs/etc/apt/apt.conf.d/99host-acquire" 2>/dev/null || true
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -cf "$rootfs.tar" . && rm -rf "$rootfs"
container=$("${BUILDAH[@]}" from scratch)
"${BUILDAH[@]}" add "$container" "$rootfs.tar" / >/dev/null  # a tar archive is unpacked
"${BUILDAH[@]}" config --cmd /bin/bash --env LANG=C.UTF-8 "$container"
"${BUILDAH[@]}" commit --rm "$container" "$BASE" >/dev/null
echo "$BASE built"
