"""Train one ReContrast setting on CPU and score it on a validation half and a held-out half
of magnetic-tile-dev's test split, with the training-free baseline beside it.

    python benchmarks/cpu_profile.py --name demo --set image_size=96 --set iterations=100 \\
        --set batch_size=8 --set decoder_blocks=[1,1,1] --set bottleneck_blocks=1

Settings are chosen on ``validation`` only (a deterministic half of the test images:
sha1 of the file name, per defect type); ``holdout`` and ``test`` (the whole split) are
reported for the record, never used to choose. Appends one JSON line per run to
``docs/results/cpu_profile_runs.jsonl`` (``--log``). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from recontrast_core.config import BackboneConfig, TrainConfig  # noqa: E402


def validation_half(name: str) -> bool:
    return int(hashlib.sha1(Path(name).name.encode()).hexdigest(), 16) % 2 == 0


def split_test(manifest):
    test = manifest.select(split="test")
    val = [e for e in test.entries if validation_half(e.path)]
    hold = [e for e in test.entries if not validation_half(e.path)]
    return {"validation": test.subset(val), "holdout": test.subset(hold), "test": test}


def _metrics(labels, scores, masks, maps) -> dict:
    from recontrast_core.metrics import aupro, image_auroc, pixel_auroc

    return {"image_auroc": round(image_auroc(labels, scores), 4), "pixel_auroc": round(pixel_auroc(masks, maps), 4),
            "aupro": round(aupro(masks, maps), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic-tile-dev")
    p.add_argument("--set", action="append", default=[], help="TrainConfig KEY=VALUE (YAML value), repeatable")
    p.add_argument("--init-encoder", default=None)
    p.add_argument("--msc", action="store_true",
                   help="adapt the encoder with MSC first (the measured small-data setting, docs/adaptation.md); "
                        "its wall time counts towards the run")
    p.add_argument("--msc-image-size", type=int, default=64)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--log", type=Path, default=REPO / "docs" / "results" / "cpu_profile_runs.jsonl")
    p.add_argument("--out", type=Path, default=Path("/tmp/cpu_profile"))
    args = p.parse_args(argv)

    from recontrast_core.baseline import PatchBaseline
    from recontrast_core.bundle import load_detector
    from recontrast_core.data.cache import load_resized
    from recontrast_core.data.layouts import read_dataset
    from recontrast_core.train import train_model

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    cfg = TrainConfig.model_validate({"device": "cpu", "checkpoint_every": 10_000, "log_every": 25, **overrides})
    manifest = read_dataset(args.data)
    parts = split_test(manifest)
    adapt_wall = 0.0
    init = args.init_encoder
    if args.msc:
        from recontrast_core.adapt import run_adapt
        from recontrast_core.config import AdaptConfig

        acfg = AdaptConfig(method="msc", backbone=cfg.backbone, image_size=args.msc_image_size, device="cpu",
                           epochs=12, lr=3e-3, angular_weight=32, crop_scale=(0.6, 1.0), hflip=False)
        t0 = time.perf_counter()
        init = str(run_adapt(manifest, acfg, args.out / args.name / "adapt", progress=False))
        adapt_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = train_model(manifest, cfg, args.out / args.name, init_encoder=init, progress=False)
    train_wall = time.perf_counter() - t0
    det = load_detector(res.bundle_dir, "cpu")
    test = load_resized(parts["test"], cfg.image_size, with_masks=True)
    t0 = time.perf_counter()
    maps, scores = det.score_uint8(test.images)
    eval_wall = time.perf_counter() - t0
    from recontrast_core.metrics import image_auroc

    flat = maps.reshape(len(maps), -1)
    k = max(1, int(np.ceil(flat.shape[1] * 0.01)))
    topk = np.sort(flat, axis=1)[:, -k:].mean(axis=1)
    base_maps = base_scores = None
    if not args.no_baseline:
        train = load_resized(manifest.select(split="train", label=0), cfg.image_size)
        t0 = time.perf_counter()
        base = PatchBaseline(det.model.frozen).fit(train.images)
        base_maps, base_scores = base.score(test.images)
        base_wall = time.perf_counter() - t0
    index = {e.path: i for i, e in enumerate(parts["test"].entries)}
    row = {"name": args.name, "settings": overrides, "init_encoder": init, "msc": args.msc,
           "adapt_wall_s": round(adapt_wall, 1), "train_wall_s": round(train_wall, 1), "train_images_per_s": round(res.images_per_s, 2),
           "eval_images_per_s": round(len(scores) / eval_wall, 2), "threads": torch.get_num_threads(),
           "final_loss": res.history[-1]["loss"] if res.history else None}
    for part in ("validation", "holdout", "test"):
        rows = [index[e.path] for e in parts[part].entries]
        labels = test.labels.numpy()[rows]
        masks = test.masks.numpy()[rows]
        row[part] = _metrics(labels, scores[rows], masks, maps[rows])
        row[part]["image_auroc_topk"] = round(image_auroc(labels, topk[rows]), 4)  # top-1% mean score
        if base_scores is not None:
            row[f"baseline_{part}"] = _metrics(labels, base_scores[rows], masks, base_maps[rows])
    if base_scores is not None:
        row["baseline_wall_s"] = round(base_wall, 1)
    print(json.dumps(row), flush=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
