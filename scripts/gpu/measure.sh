#!/usr/bin/env bash
# Run ON the lent GPU machine (device `run`, after scripts/gpu/deps.sh here), e.g.
#   run(command="scripts/gpu/measure.sh", carry=[".gpu"], timeout_s=540)
# The GPU issue's in-process figures in one go: resnet18 and resnet50 (random-init weights saved to a
# file: no network there), 0.5 MP JPEGs, batch 1, 8, 32 and 64, each precision and decode path, the
# handler's pipeline against the forward alone, and fp32's parity with the CPU. Results land in
# $OUT/bench (latest.md, latest.json) as they are written; the log in $OUT/log.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/tvserve-gpu}
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/log.txt"
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/log.txt"
python3 -m tvserve.cli bench --no-http --systems tvserve --models "${MODELS:-resnet18,resnet50}" --images 0.5MP \
    --batches "${BATCHES:-1,8,32,64}" --precisions "${PRECISIONS:-fp32,tf32,bf16,fp16}" --decodes pil,tensor \
    --duration "${DURATION:-2}" --warmup "${WARMUP:-1}" --out "$OUT/bench" --work /tmp/tvserve-bench 2>&1 | tee -a "$OUT/log.txt"
