#!/usr/bin/env bash
# `make image`: builds the Dockerfile with buildah (no Docker engine needed) as $TVSERVE_IMAGE.
#   BASE_IMAGE    default: a local Debian bookworm + Python 3.11 image made by base-image.sh
#                 (set docker.io/library/python:3.11-slim-bookworm where it can be pulled)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL   passed as build arguments when set. Otherwise, where
#                 PyTorch's CPU index cannot be reached, the extra index is this machine's pip
#                 mirror (file:// URLs from `pip config`), mounted read-only into the build,
#                 and so is pip's CA bundle (`pip config`'s cert) where one is set.
#   TVSERVE_IMAGE_DISK_GB  the free disk the build asks for first (default 33: measured below)
# --format docker: OCI images have no HEALTHCHECK.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
cd "$(dirname "$0")/../.."
source scripts/container/common.sh
CPU_INDEX=https://download.pytorch.org/whl/cpu

need_commands buildah
if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE=localhost/debian-python:bookworm
  scripts/container/base-image.sh "$BASE_IMAGE"
fi
args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -z "${PIP_INDEX_URL:-}" ] || args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")

reachable() { python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" "$1" 2>/dev/null; }
extra=${PIP_EXTRA_INDEX_URL:-}
if [ -z "$extra" ] && ! reachable "$CPU_INDEX/torch/"; then
  extra=$(python3 -m pip config list 2>/dev/null | sed -nE "s/^[^=]*extra-index-url='(.*)'$/\1/p" | tail -n 1)
  echo "PyTorch's CPU index is not reachable: using this machine's mirror (${extra:-none}) and PyPI." \
       "The image is smaller where the CPU index can be used (CUDA wheels: several GB more)."
fi
if [ -n "$extra" ]; then
  args+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra")
  for url in $extra; do  # a file:// index links to files beside it (../../files): mount its parent
    case $url in file://*) root=$(dirname "${url#file://}"); args+=(--volume "$root:$root:ro") ;; esac
  done
fi

# pip's CA bundle here (a TLS-inspecting proxy's), over the image's own during the build.
cert=$(python3 -m pip config list 2>/dev/null | sed -nE "s/^global\.cert='(.*)'$/\1/p" | tail -n 1)
[ -z "$cert" ] || args+=(--volume "$cert:/etc/ssl/certs/ca-certificates.crt:ro")

# Disk, measured 2026-12-04 with PyPI's CUDA torch (a 7.3 GB image): the build holds 32.5 GB at
# its peak. vfs keeps each stage's container whole, and the last layer is written once as a file
# in $TMPDIR (else /var/tmp) and once unpacked into the store. Short of it, buildah fails late with
# "io: read/write on closed pipe"; say so first.
store=$("${BUILDAH[@]}" info --format '{{.store.GraphRoot}}')
need_free "$store" "${TVSERVE_IMAGE_DISK_GB:-33}" "the image build's store ($store) and its layer file"
need_free "${TMPDIR:-/var/tmp}" 8 "the image's last layer, written as one file"

previous=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)
echo "Building $IMAGE from $BASE_IMAGE (first build: several minutes) ..."
"${BUILDAH[@]}" build --isolation chroot --network host --layers=false --format docker "${args[@]}" -t "$IMAGE" .
current=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then  # vfs keeps every image whole: drop the old one
  "${BUILDAH[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi
"${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
