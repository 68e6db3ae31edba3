#!/usr/bin/env bash
# Run HERE, before a device run: the packages tvserve's bench imports that the lent GPU
# machine lacks or may lack (it has Python 3.12, torch, torchvision, numpy, pillow, scikit-learn; no network),
# as Python 3.12 wheels unpacked into .gpu/site (ignored by git; carried with `carry: [".gpu"]`).
# Then TorchServe's frontend for the HTTP rows, since that machine has no Java: a Java runtime made small
# with jlink, the frontend jar's contents, tvserve's compiled plugin, and wrk with the libraries it
# links, in .gpu/frontend.tar.xz. The runtime (the modules TorchServe 0.12's frontend loads) is 75 MB
# unpacked and the frontend jar 44 MB, together over the 64 MiB a call carries; xz over their
# uncompressed forms packs them, with wrk, into 38 MB (.gpu in all: 44 MB). scripts/gpu/unpack_frontend.py
# puts them back together there.
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

JAVA_MODULES=java.base,java.desktop,java.logging,java.management,java.naming,java.sql,java.xml,jdk.unsupported,jdk.crypto.ec
STAGE=$(mktemp -d) && trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/frontend/jar" "$STAGE/frontend/bin" "$STAGE/frontend/lib"
jlink --add-modules "$JAVA_MODULES" --strip-debug --no-header-files --no-man-pages --compress=0 \
    --output "$STAGE/frontend/jre"
JAR=$("${PIP%/pip}/python" -c 'from tvserve.ops.plugin import frontend_jar; print(frontend_jar())')
(cd "$STAGE/frontend/jar" && unzip -q "$JAR")
PLUGIN=$("${PIP%/pip}/python" -m tvserve.ops.plugin | tail -1)
cp "$PLUGIN/tvserve-protocols.jar" "$STAGE/frontend/"
WRK=$(command -v wrk) || { echo "deps.sh: wrk is missing: apt-get install wrk" >&2; exit 1; }
cp "$WRK" "$STAGE/frontend/bin/wrk.bin"
ldd "$WRK" | awk '/=> \// && !/libc\.so|libm\.so|libpthread|libdl|librt|ld-linux|libgcc_s/ {print $3}' \
    | xargs -r -I{} cp -L {} "$STAGE/frontend/lib/"
cat > "$STAGE/frontend/bin/wrk" <<'SH'
#!/bin/sh
# wrk with the libraries it was built against (carried beside it), for the lent GPU machine
here=$(dirname "$0")
LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/wrk.bin" "$@"
SH
chmod +x "$STAGE/frontend/bin/wrk"
tar -C "$STAGE" -cf - frontend | xz -9 -T2 > .gpu/frontend.tar.xz
du -sh .gpu .gpu/frontend.tar.xz
