#!/usr/bin/env bash
# (c) ReContrast from ImageNet vs (d) MSC-adapted encoder -> ReContrast, same CPU-sized settings.
# Usage: bash benchmarks/msc_then_recontrast.sh [DATA] [OUT]
# The MSC encoder comes from: recontrast adapt DATA --method msc --image-size 64 --epochs 12 \
#   --lr 3e-3 --angular-weight 32 --crop-min 0.6 --no-hflip --out OUT/msc
# (benchmarks/adapt_magnetic_tile.py --save-msc OUT/msc writes the same file).
set -euo pipefail
DATA=${1:-../shared/data/magnetic-tile-dev}
OUT=${2:-runs}
COMMON=(--image-size 96 --iterations 100 --batch-size 8 --config benchmarks/cpu_small.yaml --no-progress)
for variant in imagenet msc; do
  init=()
  [ "$variant" = msc ] && init=(--init-encoder "$OUT/msc/encoder.safetensors")
  /usr/bin/time -f "$variant train wall %e s" .venv/bin/recontrast train "$DATA" --out "$OUT/cd-$variant" "${COMMON[@]}" "${init[@]}" --json > "$OUT/cd-$variant.train.json"
  .venv/bin/recontrast evaluate "$OUT/cd-$variant/bundle" "$DATA" --out "$OUT/cd-$variant/eval" --no-progress --json > "$OUT/cd-$variant.eval.json"
done
