#!/usr/bin/env bash
# Run ON the lent GPU machine (device `run`, after scripts/gpu/deps.sh here), e.g.
#   run(command="scripts/gpu/measure.sh", carry=[".gpu"], timeout_s=540)
# The GPU issue's in-process figures in one go: resnet18 and resnet50 (random-init weights saved to a
# file: no network there), 0.5 MP JPEGs, batch 1, 8, 32 and 64, each precision and decode path, the
# handler's pipeline against the forward alone, and fp32's parity with the CPU. Results land in
# $OUT/bench (latest.md, latest.json) as they are written; the log in $OUT/log.txt.
# Then, where .gpu/frontend.tar.xz came along (deps.sh makes it), the HTTP rows: resnet18 served by
# TorchServe on the GPU, PIL and tensor decoding, sized at serve time, wrk at concurrency 1, 64 and 256,
# in $OUT/http. PART=inprocess or PART=http runs one half (two calls, if one would run past its limit).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/tvserve-gpu}
mkdir -p "$OUT/bench"
PYTHON=${PYTHON:-python3}
PART=${PART:-all}
export PYTHONPATH="$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/log.txt"
"$PYTHON" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/log.txt"
[ "$PART" = http ] || "$PYTHON" -m tvserve.cli bench --no-http --systems tvserve --models "${MODELS:-resnet18,resnet50}" --images 0.5MP \
    --batches "${BATCHES:-1,8,32,64}" --precisions "${PRECISIONS:-fp32,tf32,bf16,fp16}" --decodes pil,tensor \
    --duration "${DURATION:-2}" --warmup "${WARMUP:-1}" --out "$OUT/bench" --work /tmp/tvserve-bench 2>&1 | tee -a "$OUT/log.txt"

if [ "$PART" != inprocess ] && [ -f .gpu/frontend.tar.xz ]; then
    JAVA_HOME=$("$PYTHON" scripts/gpu/unpack_frontend.py .gpu/frontend.tar.xz /tmp/tvserve-frontend) || exit 1
    export JAVA_HOME PATH="/tmp/tvserve-frontend/frontend/bin:$JAVA_HOME/bin:$PATH"
    { "$JAVA_HOME/bin/java" -version 2>&1; echo "wrk: $(command -v wrk)"; } | tee -a "$OUT/log.txt"
    mkdir -p "$OUT/http"
    "$PYTHON" -m tvserve.cli bench --systems "${HTTP_SYSTEMS:-tvserve,tensor}" --models "${HTTP_MODELS:-resnet18}" \
        --images 0.5MP --concurrency "${CONCURRENCY:-1,64,256}" --batches none --duration "${DURATION:-2}" \
        --warmup "${WARMUP:-1}" --out "$OUT/http" --work /tmp/tvserve-http 2>&1 | tee -a "$OUT/log.txt"
    "$PYTHON" - "$OUT/http/latest.json" <<'PY' | tee -a "$OUT/log.txt"  # the exit status: every HTTP row answered, no error
import json, sys
rows = [row for model in json.load(open(sys.argv[1]))["models"].values() for row in model["rows"]
        if row["system"].startswith("(c)")]
for row in rows:
    print(f"HTTP {row['system']} {row['model']} c={row['concurrency']}: {row['rps']:.1f} req/s, "
          f"p99 {row['p99_ms']:.1f} ms, {row['errors']} errors")
sys.exit(0 if rows and all(row["requests"] > 0 and row["errors"] == 0 for row in rows) else 1)
PY
fi
