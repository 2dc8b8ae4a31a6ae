#!/usr/bin/env bash
# The one command for the GPU machine (after benchmarks/gpu_prepare.sh here): installs the
# carried wheels offline into /tmp/site and runs the GPU suite; results land in $OUT (the
# device tool's folder that comes back) or ./gpu_out. Arguments go to the suite, e.g.
#   bash benchmarks/gpu_run.sh --sections speed,levers     # rerun only some sections
# The suite runs under `timeout` (GPU_SUITE_TIMEOUT seconds, default 520: set the device
# call's limit a few tens of seconds above it). The suite rewrites gpu_suite.json and
# gpu_suite.md after every check, so a run stopped by the timeout (exit 124: SIGTERM, then
# SIGKILL 15 s later) or killed still leaves the finished sections' numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-gpu_out}
LIMIT=${GPU_SUITE_TIMEOUT:-520}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mkdir -p "$OUTDIR"
set +e
timeout -k 15 "$LIMIT" python3 benchmarks/gpu_suite.py --out "$OUTDIR" --data .gpu/data/magnetic-tile-dev "$@" 2>&1 \
  | tee "$OUTDIR/gpu_suite.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "gpu_run: the suite ran past ${LIMIT}s and was stopped; $OUTDIR/gpu_suite.json holds the finished sections" >&2
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("completed:", r.get("completed_sections"), "in progress:", r.get("in_progress"))' \
    "$OUTDIR/gpu_suite.json" 2>/dev/null || true
fi
exit "$rc"
