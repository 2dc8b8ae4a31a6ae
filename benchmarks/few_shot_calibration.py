"""Few-shot ReContrast: all K shots train (threshold from augmented views of the shots)
against the earlier rule (15% of the shots held out for the threshold).

    python benchmarks/few_shot_calibration.py --shots 8 --seeds 0 1 2

Same shots (the pipeline's deterministic sampler), same schedule; reports test image AUROC,
pixel AUROC and the threshold's recall / false-positive rate on magnetic-tile-dev's test
split. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic-tile-dev")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--iterations", type=int, default=100)
    args = p.parse_args(argv)

    from recontrast_core.config import BaselineConfig, TrainConfig
    from recontrast_core.data.layouts import read_dataset
    from recontrast_core.evaluate import evaluate_bundle
    from recontrast_core.steps.artifacts import select_shots
    from recontrast_core.train import train_model

    full = read_dataset(args.data)
    rows = []
    for seed in args.seeds:
        manifest = select_shots(full, args.shots, seed)
        cfg = TrainConfig(image_size=args.image_size, iterations=args.iterations, batch_size=8, decoder_blocks=(1, 1, 1),
                          bottleneck_blocks=1, device="cpu", augment=True, seed=111 + seed, checkpoint_every=10_000)
        for rule, few_shot in (("hold out 15% of the shots (before)", False), ("all shots train (now)", True)):
            with tempfile.TemporaryDirectory() as tmp:
                res = train_model(manifest, cfg, Path(tmp), progress=False, few_shot=few_shot)
                info = json.loads((res.bundle_dir / "bundle.json").read_text())["training"]
                payload = evaluate_bundle(res.bundle_dir, manifest, progress=False, device="cpu",
                                          baseline=BaselineConfig() if few_shot else None)
            m = payload["metrics"]
            row = {"seed": seed, "rule": rule, "train_images": info["n_train_images"],
                   "image_auroc": round(m["image_auroc"], 4), "pixel_auroc": round(m["pixel_auroc"], 4),
                   "recall_at_threshold": round(m["recall_at_threshold"], 4),
                   "fpr_at_threshold": round(m["fpr_at_threshold"], 4)}
            if "baseline" in payload:
                row["baseline_image_auroc"] = round(payload["baseline"]["metrics"]["image_auroc"], 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
