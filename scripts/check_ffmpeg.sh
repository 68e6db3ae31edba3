#!/usr/bin/env bash
# FFmpeg's shared libraries, which torchcodec decodes clips with (video models: handlers/clips.py).
# Debian bookworm's FFmpeg 5.1; installed here where this runs as root with apt, else one line says how.
set -euo pipefail
PACKAGES=(libavcodec59 libavformat59 libavutil57 libavdevice59 libavfilter8 libswscale6 libswresample4)
if ldconfig -p 2>/dev/null | grep -q 'libavdevice\.so\.59'; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing FFmpeg's libraries for video decoding (Debian: ${PACKAGES[*]}) ..."
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
else
  echo "tvserve decodes video with FFmpeg's libraries: install them (Debian bookworm: apt-get install -y ${PACKAGES[*]}) and retry." >&2
  exit 1
fi
