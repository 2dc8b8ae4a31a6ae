#!/usr/bin/env bash
# The one command for the GPU machine (after benchmarks/gpu_prepare.sh here): installs the
# carried wheels offline into /tmp/site and runs the whole GPU suite; results land in
# $OUT (the device tool's folder that comes back) or ./gpu_out.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-gpu_out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mkdir -p "$OUTDIR"
python3 benchmarks/gpu_suite.py --out "$OUTDIR" --data .gpu/data/magnetic-tile-dev "$@" 2>&1 | tee "$OUTDIR/gpu_suite.log"
