"""CPU scoring speed of one bundle: torch eager (the bundle, fp32) vs onnxruntime vs OpenVINO.

    OMP_NUM_THREADS=1 python benchmarks/export_speed.py --image-size 128 --batches 4 --batch-size 8

Without ``--bundle`` it trains a throw-away bundle first (the default architecture,
tf_efficientnet_lite0 with its packaged ImageNet weights, 2 iterations: speed does not
depend on how well it is trained) on magnetic-tile-dev. The bundle is exported to ONNX and
OpenVINO in a temporary folder, then each backend scores the same real test images
(already resized: uint8 [N,3,S,S], so decoding is not timed), one warm-up batch each, then
``--rounds`` rounds that interleave the backends (background load hits them alike), all
with the same number of threads. Prints the median images/s per backend and the largest
score difference against torch; asserts nothing.
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


def _train_bundle(data: Path, size: int, work: Path) -> Path:
    from recontrast_core.config import TrainConfig
    from recontrast_core.data.layouts import read_mvtec
    from recontrast_core.train import train_model

    cfg = TrainConfig(image_size=size, iterations=2, batch_size=4, device="cpu", log_every=1)
    return train_model(read_mvtec(data), cfg, work / "train", progress=False).bundle_dir


def _images(data: Path, size: int, n: int) -> np.ndarray:
    from recontrast_core.bundle import to_model_input

    paths = sorted(p for p in (data / "test").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not paths:
        raise SystemExit(f"{data}/test: no images")
    paths = [paths[i % len(paths)] for i in range(n)]
    return np.stack([to_model_input(p, size) for p in paths])


def _time(score, images: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    scores = []
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        scores.append(score(images[i:i + batch_size]))
    elapsed = time.perf_counter() - start
    return len(images) / elapsed, np.concatenate(scores)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="a bundle folder (default: train a throw-away one)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic-tile-dev")
    p.add_argument("--image-size", type=int, default=128, help="for the throw-away bundle")
    p.add_argument("--batches", type=int, default=4, help="timed batches per backend")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each backend once per round)")
    p.add_argument("--threads", type=int, default=None, help="default: torch's (OMP_NUM_THREADS)")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = p.parse_args(argv)

    from recontrast_core.bundle import load_detector
    from recontrast_core.export import OnnxDetector, OpenVinoDetector, export_bundle

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        work = Path(tmp)
        bundle = args.bundle or _train_bundle(args.data, args.image_size, work)
        det = load_detector(bundle, device="cpu")
        size = det.image_size
        images = _images(args.data, size, args.batches * args.batch_size)
        t0 = time.perf_counter()
        onnx_path = export_bundle(bundle, work / "onnx", "onnx")
        t1 = time.perf_counter()
        ov_path = export_bundle(bundle, work / "openvino", "openvino")
        t2 = time.perf_counter()
        backends = {
            "torch eager (fp32)": lambda x: det.score_uint8(torch.from_numpy(x), batch_size=args.batch_size)[1],
        }
        ort_det = OnnxDetector(onnx_path, threads=threads, batch_size=args.batch_size)
        backends["onnxruntime"] = lambda x: ort_det.score_uint8(x)[1]
        ov_det = OpenVinoDetector(ov_path, threads=threads, batch_size=args.batch_size)
        backends["openvino (f32)"] = lambda x: ov_det.score_uint8(x)[1]
        for score in backends.values():
            score(images[:args.batch_size])  # warm-up (allocations, kernel choice)
        # rounds interleave the backends, so background load hits them alike; median per backend
        speeds: dict[str, list[float]] = {name: [] for name in backends}
        rows, ref = {}, None
        for _ in range(args.rounds):
            for name, score in backends.items():
                ips, scores = _time(score, images, args.batch_size)
                speeds[name].append(ips)
                ref = scores if ref is None else ref
                rows[name] = {"max_rel_score_diff_vs_torch": float(np.max(np.abs(scores - ref) / np.abs(ref)))}
        for name in backends:
            rows[name].update(images_per_s=round(float(np.median(speeds[name])), 2),
                              best_images_per_s=round(max(speeds[name]), 2),
                              all_images_per_s=[round(v, 2) for v in speeds[name]])
    info = {"backbone": det.config.backbone.name, "image_size": size, "decoder_blocks": list(det.config.decoder_blocks),
            "images": len(images), "batch_size": args.batch_size, "threads": threads, "rounds": args.rounds,
            "export_s": {"onnx": round(t1 - t0, 1), "openvino": round(t2 - t1, 1)},
            "torch": torch.__version__}
    print(f"{info['backbone']} @ {size} px (decoder blocks {info['decoder_blocks']}), {len(images)} images in batches "
          f"of {args.batch_size}, {threads} thread(s), median of {args.rounds} rounds; "
          f"export {info['export_s']['onnx']} s (onnx), {info['export_s']['openvino']} s (openvino)")
    base = rows["torch eager (fp32)"]["images_per_s"]
    for name, row in rows.items():
        print(f"  {name:20s} {row['images_per_s']:8.2f} images/s  x{row['images_per_s'] / base:4.2f}  "
              f"(best {row['best_images_per_s']:.2f})  max rel score diff vs torch {row['max_rel_score_diff_vs_torch']:.1e}")
    if args.json:
        print(json.dumps({**info, "backends": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
