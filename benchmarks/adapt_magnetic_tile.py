"""magnetic-tile-dev: image AUROC of frozen-feature kNN vs MSC kNN, and few-shot COFT-AD vs
frozen-feature kNN on the same shots (several seeds, mean and standard deviation).

All scorers use the same backbone and embedding: lite0 ImageNet weights, global average
pool of the deepest feature level (672 channels, stride 16), L2-normalised.

* (a) frozen kNN: kNN (k=2) over the 341 normal training images;
* (b) MSC kNN: the same after MSC fine-tuning on those images;
* few-shot, for each k and seed: the shots are ``sample_shots(manifest, k, seed)``;
  frozen kNN (bank = the k shots), frozen Mahalanobis (the COFT scorer without
  fine-tuning: shots + augmented views, Ledoit-Wolf), COFT-AD (fine-tuned on the shots,
  Mahalanobis) and COFT-AD kNN.

The test split is all 364 test images (107 good, 257 defective). Run from the repository
root::

    PYTHONPATH=. nice -n 5 .venv/bin/python benchmarks/adapt_magnetic_tile.py --out docs/results/adapt_magnetic_tile.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from recontrast_core.adapt import Embedder, MahalanobisScorer, knn_scores, sample_shots, train_coft, train_msc
from recontrast_core.adapt import save_adapted
from recontrast_core.config import AdaptConfig, BackboneConfig
from recontrast_core.data.cache import load_resized
from recontrast_core.data.layouts import read_dataset
from recontrast_core.metrics import image_auroc
from recontrast_core.models.backbones import create_encoder
from recontrast_core.runtime import resolve_device, seed_everything

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "magnetic-tile-dev"


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64, help="MSC batch")
    ap.add_argument("--msc-epochs", type=int, default=12)
    ap.add_argument("--msc-lr", type=float, default=3e-3)
    ap.add_argument("--msc-momentum", type=float, default=0.0)
    ap.add_argument("--msc-angular", type=float, default=32.0, help="angular center term weight (reference code: 1)")
    ap.add_argument("--msc-crop-min", type=float, default=0.6, help="MSC views: RandomResizedCrop lower scale (paper: 0.2)")
    ap.add_argument("--msc-hflip", action="store_true", help="MSC views with horizontal flips (paper: on)")
    ap.add_argument("--freeze-levels", type=int, default=2)
    ap.add_argument("--shots", default="2,4,8,16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--coft-epochs", type=int, default=20, help="x coft.steps_per_epoch (1) steps")
    ap.add_argument("--coft-batch-size", type=int, default=16, help="normal views + synthesised anomalies")
    ap.add_argument("--coft-lr", type=float, default=5e-2)
    ap.add_argument("--fit-views", type=int, default=16, help="augmented views per shot for the Gaussian")
    ap.add_argument("--skip-msc", action="store_true")
    ap.add_argument("--skip-fewshot", action="store_true")
    ap.add_argument("--save-msc", type=Path, default=None, help="also write the MSC encoder (encoder.safetensors) here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t_all = time.perf_counter()
    manifest = read_dataset(args.root)
    train_rows = manifest.select(split="train", label=0)
    test_rows = manifest.select(split="test")
    train_imgs, _, _ = load_resized(train_rows, args.image_size)
    test_imgs, _, test_labels = load_resized(test_rows, args.image_size)
    y = test_labels.numpy()
    path_index = {e.path: i for i, e in enumerate(train_rows.entries)}
    base = AdaptConfig(image_size=args.image_size, freeze_levels=args.freeze_levels, device=str(device))
    msc_cfg = base.model_copy(update={"epochs": args.msc_epochs, "batch_size": args.batch_size, "lr": args.msc_lr,
                                      "momentum": args.msc_momentum, "angular_weight": args.msc_angular,
                                      "crop_scale": (args.msc_crop_min, 1.0), "hflip": args.msc_hflip})
    coft_cfg = base.model_copy(update={
        "method": "coft", "epochs": args.coft_epochs, "batch_size": args.coft_batch_size,
        "coft": base.coft.model_copy(update={"lr": args.coft_lr, "fit_views": args.fit_views}),
    })

    def embedder(encoder) -> Embedder:
        return Embedder(encoder, base.level, base.pool, device, batch_size=64)

    frozen = embedder(create_encoder(BackboneConfig()))
    f_train, f_test = frozen.embed(train_imgs), frozen.embed(test_imgs)
    results: dict = {"benchmark": "magnetic_tile_dev", "n_train": len(train_rows), "n_test": len(test_rows),
                     "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "msc_config": msc_cfg.model_dump(mode="json"), "coft_config": coft_cfg.model_dump(mode="json"),
                     "device": str(device)}
    results["frozen_knn"] = float(image_auroc(y, knn_scores(f_train, f_test, base.knn_k).numpy()))
    print(f"(a) frozen kNN image AUROC {results['frozen_knn']:.4f}", flush=True)

    if not args.skip_msc:
        t0 = time.perf_counter()
        gen = seed_everything(msc_cfg.seed)
        emb = embedder(create_encoder(BackboneConfig()))
        res = train_msc(emb, train_imgs, msc_cfg, progress=False, generator=gen)
        a_train, a_test = emb.embed(train_imgs), emb.embed(test_imgs)
        results["msc_knn"] = float(image_auroc(y, knn_scores(a_train, a_test, base.knn_k).numpy()))
        results["msc_history"] = res.history
        results["msc_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"(b) MSC kNN image AUROC {results['msc_knn']:.4f}  loss {res.history[0]['loss']:.3f}->"
              f"{res.final_loss:.3f}  {results['msc_seconds']}s", flush=True)
        if args.save_msc:
            save_adapted(emb.encoder, {"method": "msc", "backbone": BackboneConfig().model_dump(mode="json"),
                                       "settings": msc_cfg.model_dump(mode="json"), "center": res.center.tolist(),
                                       "final_loss": res.final_loss, "history": res.history,
                                       "n_images": len(train_rows)}, args.save_msc)

    if not args.skip_fewshot:
        few: dict = {}
        for k in _ints(args.shots):
            rows = {"frozen_knn": [], "frozen_mahalanobis": [], "coft_mahalanobis": [], "coft_knn": []}
            for seed in _ints(args.seeds):
                t0 = time.perf_counter()
                idx = [path_index[e.path] for e in sample_shots(manifest, k, seed).entries]
                shots = train_imgs[idx]
                rows["frozen_knn"].append(image_auroc(y, knn_scores(f_train[idx], f_test, base.knn_k).numpy()))
                maha = MahalanobisScorer(frozen, args.fit_views, coft_cfg.coft.crop_scale, seed=seed).fit(shots)
                rows["frozen_mahalanobis"].append(image_auroc(y, maha.score_features(f_test)))
                cfg = coft_cfg.model_copy(update={"seed": seed})
                gen = seed_everything(seed)
                emb = embedder(create_encoder(BackboneConfig()))
                res = train_coft(emb, shots, cfg, progress=False, generator=gen)
                c_test = emb.embed(test_imgs)
                scorer = MahalanobisScorer(emb, args.fit_views, cfg.coft.crop_scale, seed=seed).fit(shots)
                rows["coft_mahalanobis"].append(image_auroc(y, scorer.score_features(c_test)))
                rows["coft_knn"].append(image_auroc(y, knn_scores(emb.embed(shots), c_test, base.knn_k).numpy()))
                print(f"k={k:2d} seed={seed}: frozen kNN {rows['frozen_knn'][-1]:.4f}  frozen Maha "
                      f"{rows['frozen_mahalanobis'][-1]:.4f}  COFT {rows['coft_mahalanobis'][-1]:.4f}  COFT kNN "
                      f"{rows['coft_knn'][-1]:.4f}  loss {res.history[0]['loss']:.3f}->{res.final_loss:.3f}  "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
            few[str(k)] = {name: _mean_std(v) for name, v in rows.items()}
            print(f"k={k:2d} mean+-std: " + "  ".join(f"{n} {s['mean']:.4f}+-{s['std']:.4f}" for n, s in few[str(k)].items()),
                  flush=True)
        results["few_shot"] = few
    results["wall_time_s"] = round(time.perf_counter() - t_all, 1)
    print(f"total {results['wall_time_s']}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
