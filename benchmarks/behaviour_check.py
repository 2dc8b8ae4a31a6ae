"""Behaviour check: the same metrics before and after a refactor.

Fits a patch-kNN detector (160 px, 1% coreset) and trains a small ReContrast (lite0, 128 px,
20 iterations) on magnetic-tile-dev, one thread, then evaluates both on the whole test split
(no baseline). Run it on two trees and compare the JSON files:

    git worktree add /tmp/before <rev>
    (cd /tmp/before && OMP_NUM_THREADS=1 PYTHONPATH=/tmp/before python /path/to/benchmarks/behaviour_check.py /tmp/b1)
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/behaviour_check.py /tmp/b2

Uses only APIs both trees have (fit_detector, evaluate_bundle, read_dataset). Prints numbers;
asserts nothing.
"""
import json
import sys
import time
from pathlib import Path
import torch
torch.set_num_threads(1)
from recontrast_core.config import ModelConfig, TrainConfig, BackboneConfig
from recontrast_core.data.layouts import read_dataset
from recontrast_core.fit import fit_detector
from recontrast_core.evaluate import evaluate_bundle
import recontrast_core
out = Path(sys.argv[1])
data = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic-tile-dev"
m = read_dataset(data)
res = {"code": recontrast_core.__file__}
t = TrainConfig(backbone=BackboneConfig(name="tf_efficientnet_lite0"), image_size=128, iterations=20, batch_size=8,
                decoder_blocks=(1, 1, 1), bottleneck_blocks=1, device="cpu", log_every=10, checkpoint_every=20)
for kind, model in (("patchknn", ModelConfig(kind="patchknn", patchknn={"image_size": 160})),
                    ("recontrast", ModelConfig(kind="recontrast"))):
    t0 = time.time()
    b = fit_detector(m, model, t, out / kind, progress=False).bundle_dir
    payload = evaluate_bundle(b, m, progress=False, baseline=None)
    res[kind] = {k: v for k, v in payload["metrics"].items() if isinstance(v, float)}
    res[kind]["wall_s"] = round(time.time() - t0, 1)
    print(kind, json.dumps(res[kind]), flush=True)
(out / "metrics.json").write_text(json.dumps(res, indent=1))
