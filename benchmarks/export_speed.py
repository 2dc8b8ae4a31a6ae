"""CPU scoring latency and accuracy of one bundle: torch eager (the bundle, fp32) vs the
exported graphs: onnxruntime and OpenVINO, fp32 and INT8.

    OMP_NUM_THREADS=1 python benchmarks/export_speed.py --bundle runs/train/bundle        # 256 px bundle
    OMP_NUM_THREADS=1 python benchmarks/export_speed.py --quick                           # smoke run, ~40 s

Without ``--bundle`` it trains a throw-away bundle first (the default architecture,
tf_efficientnet_lite0 with its packaged ImageNet weights, ``--iterations`` iterations;
``--quick``: 64 px, one block per decoder stage) on ``--data`` (magnetic-tile-dev). The
bundle is exported in a temporary folder to ``onnx``, ``openvino``, ``onnx-int8`` and
``openvino-int8`` (INT8 calibrated on ``--calibration-images`` normal training images of
``--data``). Then:

* **latency**: each backend scores the same real test images one at a time (batch 1, uint8
  [1,3,S,S] already resized: decoding is not timed) with ``--threads`` threads (default 1),
  after a warm-up; ``--rounds`` rounds interleave the backends (the order rotates each round)
  so background load hits them alike. Prints p50 and p95 of the per-image latencies and the
  p50 speed-up against torch eager.
* **accuracy**: each backend scores the whole test split (``--eval-images`` to cut it),
  batches of 8; prints image AUROC and pixel AUROC (at the bundle's size, all pixels of all
  test images) and their change against torch eager, the largest relative score difference
  and the rank correlation of the scores with torch's.

Asserts nothing; ``--json`` adds one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TORCH = "torch eager (fp32)"


def _train_bundle(data: Path, size: int, iterations: int, small: bool, work: Path) -> Path:
    from recontrast_core.config import TrainConfig
    from recontrast_core.data.layouts import read_mvtec
    from recontrast_core.train import train_model

    extra = dict(decoder_blocks=(1, 1, 1), bottleneck_blocks=1) if small else {}
    cfg = TrainConfig(image_size=size, iterations=iterations, batch_size=4, device="cpu", log_every=1,
                      checkpoint_every=max(iterations, 1), **extra)
    return train_model(read_mvtec(data), cfg, work / "train", progress=False).bundle_dir


def _test_set(data: Path, size: int, limit: int | None):
    """(images uint8 [N,3,S,S], masks bool [N,S,S], labels [N]) of the test split, an evenly
    spaced subset of ``limit`` images (anomalous and normal alike) when given."""
    from recontrast_core.data.cache import load_resized
    from recontrast_core.data.layouts import read_mvtec

    test = read_mvtec(data).select(split="test")
    if limit and limit < len(test):
        step = len(test) / limit
        test = test.subset(test.entries[int(i * step)] for i in range(limit))
    images, masks, labels = load_resized(test, size, with_masks=True)
    return images.numpy(), masks.numpy(), labels.numpy()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="a bundle folder (default: train a throw-away one)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic-tile-dev",
                   help="MVTec-layout dataset: test images (latency, accuracy) and normal training images (INT8)")
    p.add_argument("--image-size", type=int, default=256, help="for the throw-away bundle")
    p.add_argument("--iterations", type=int, default=2, help="for the throw-away bundle")
    p.add_argument("--rounds", type=int, default=5, help="latency rounds (each backend once per round)")
    p.add_argument("--latency-images", type=int, default=8, help="images timed one by one per backend and round")
    p.add_argument("--eval-images", type=int, default=None, help="accuracy on this many test images (default: all)")
    p.add_argument("--calibration-images", type=int, default=128, help="INT8 calibration images (normal, train)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-accuracy", action="store_true", help="latency only")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64 px throw-away bundle (one block per decoder stage), 2 rounds of 3 images, "
                        "24 test images, 8 calibration images")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.rounds, args.latency_images = 64, 2, 3
        args.eval_images, args.calibration_images = args.eval_images or 24, min(args.calibration_images, 8)

    from recontrast_core.bundle import load_detector
    from recontrast_core.export import OnnxDetector, OpenVinoDetector, export_bundle
    from recontrast_core.metrics import image_auroc, pixel_auroc
    from scipy.stats import spearmanr

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        bundle = args.bundle or _train_bundle(args.data, args.image_size, args.iterations, args.quick, work)
        train_s = time.perf_counter() - t0 if args.bundle is None else None
        det = load_detector(bundle, device="cpu")
        size = det.image_size
        export_s, paths = {}, {}
        for fmt in ("onnx", "openvino", "onnx-int8", "openvino-int8"):
            t0 = time.perf_counter()
            kw = dict(calibration_data=args.data, calibration_images=args.calibration_images) if "int8" in fmt else {}
            paths[fmt] = export_bundle(bundle, work / fmt, fmt, **kw)
            export_s[fmt] = round(time.perf_counter() - t0, 1)
            print(f"exported {fmt} in {export_s[fmt]} s", file=sys.stderr, flush=True)

        def torch_run(x: np.ndarray):
            with torch.inference_mode():
                return det.score_uint8(torch.from_numpy(x), batch_size=len(x))

        def exported(d):
            return lambda x: tuple(d.score_uint8(x)[:2])

        t = args.threads
        backends = {
            TORCH: torch_run,
            "onnxruntime fp32": exported(OnnxDetector(paths["onnx"], threads=t)),
            "openvino fp32": exported(OpenVinoDetector(paths["openvino"], threads=t)),
            "onnxruntime int8": exported(OnnxDetector(paths["onnx-int8"], threads=t)),
            "openvino int8": exported(OpenVinoDetector(paths["openvino-int8"], threads=t)),
        }
        images, masks, labels = _test_set(args.data, size, args.eval_images)
        lat_idx = np.linspace(0, len(images) - 1, min(args.latency_images, len(images))).round().astype(int)
        lat_images = images[lat_idx]

        # latency: batch 1, interleaved rounds, the order rotating each round
        for run in backends.values():
            run(lat_images[:1])  # warm-up (allocations, kernel choice)
        times: dict[str, list[float]] = {name: [] for name in backends}
        names = list(backends)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for i in range(len(lat_images)):
                    start = time.perf_counter()
                    backends[name](lat_images[i:i + 1])
                    times[name].append(time.perf_counter() - start)
            print(f"latency round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

        # accuracy: the test split, batches of 8
        rows: dict[str, dict] = {}
        ref_scores = None
        for name, run in backends.items():
            row = {"p50_ms": round(1000 * _percentile(times[name], 50), 1),
                   "p95_ms": round(1000 * _percentile(times[name], 95), 1)}
            if not args.no_accuracy:
                start = time.perf_counter()
                parts = [run(images[i:i + 8]) for i in range(0, len(images), 8)]
                maps = np.concatenate([m for m, _ in parts])
                scores = np.concatenate([s for _, s in parts]).astype(np.float64)
                ref_scores = scores if ref_scores is None else ref_scores
                row.update(image_auroc=round(image_auroc(labels, scores), 4),
                           pixel_auroc=round(pixel_auroc(masks, maps), 4) if masks.any() else None,
                           max_rel_score_diff=float(np.max(np.abs(scores - ref_scores) / np.abs(ref_scores))),
                           spearman_vs_torch=round(float(spearmanr(scores, ref_scores)[0]), 5),
                           eval_s=round(time.perf_counter() - start, 1))
                print(f"accuracy {name} done ({row['eval_s']} s)", file=sys.stderr, flush=True)
            rows[name] = row
    base = rows[TORCH]
    for row in rows.values():
        row["speedup_p50"] = round(base["p50_ms"] / row["p50_ms"], 2)
        if not args.no_accuracy:
            row["d_image_auroc"] = round(row["image_auroc"] - base["image_auroc"], 4)
            row["d_pixel_auroc"] = (round(row["pixel_auroc"] - base["pixel_auroc"], 4)
                                    if row["pixel_auroc"] is not None else None)
    cfg = det.config
    info = {"backbone": cfg.backbone.name if cfg else det.kind, "kind": det.kind, "image_size": size,
            "decoder_blocks": list(cfg.decoder_blocks) if cfg else None,
            "bottleneck_blocks": cfg.bottleneck_blocks if cfg else None,
            "threads": args.threads, "rounds": args.rounds, "latency_images": len(lat_images),
            "eval_images": int(len(images)), "eval_anomalous": int(labels.sum()),
            "calibration_images": args.calibration_images, "export_s": export_s, "train_s": train_s,
            "torch": torch.__version__}
    print(f"{info['backbone']} ({det.kind}) @ {size} px, decoder {info['decoder_blocks']} + "
          f"{info['bottleneck_blocks']} bottleneck block(s); batch 1, {args.threads} thread(s); latency: "
          f"{args.rounds} interleaved rounds x {len(lat_images)} images; accuracy: {len(images)} test images "
          f"({info['eval_anomalous']} anomalous); INT8 calibrated on {args.calibration_images} normal train images")
    print(f"export s: {export_s}")
    head = f"  {'backend':20s} {'p50 ms':>8s} {'p95 ms':>8s} {'x torch':>8s}"
    if not args.no_accuracy:
        head += f" {'image AUROC':>16s} {'pixel AUROC':>16s} {'max rel score diff':>19s} {'spearman':>9s}"
    print(head)
    for name, row in rows.items():
        line = f"  {name:20s} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f} {row['speedup_p50']:8.2f}"
        if not args.no_accuracy:
            pix = (f"{row['pixel_auroc']:.4f} ({row['d_pixel_auroc']:+.4f})" if row["pixel_auroc"] is not None
                   else "n/a")
            line += (f" {row['image_auroc']:.4f} ({row['d_image_auroc']:+.4f}) {pix:>16s}"
                     f" {row['max_rel_score_diff']:19.1e} {row['spearman_vs_torch']:9.4f}")
        print(line)
    if args.json:
        print(json.dumps({**info, "backends": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
