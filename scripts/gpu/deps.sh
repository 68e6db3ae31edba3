#!/usr/bin/env bash
# Run HERE, before a device run: the packages tvserve's bench imports that the lent GPU
# machine lacks or may lack (it has Python 3.12, torch, torchvision, numpy, pillow, scikit-learn; no network),
# as Python 3.12 wheels unpacked into .gpu/site (ignored by git; carried with `carry: [".gpu"]`).
# TorchServe's Java frontend (44 MB) is left out: that machine has no Java, and the working tree that
# travels is limited to 64 MiB, so only the in-process rows run there (README: Serving on a GPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
"$PIP" download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --no-deps -d .gpu/wheels \
    pyyaml tqdm requests urllib3 idna certifi charset-normalizer psutil \
    torch-model-archiver==0.12.0 torchserve==0.12.0
python3 - <<'PY'
import pathlib, zipfile
for wheel in sorted(pathlib.Path(".gpu/wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(".gpu/site", [n for n in archive.namelist() if not n.startswith("ts/frontend/")])
PY
rm -rf .gpu/wheels
du -sh .gpu
