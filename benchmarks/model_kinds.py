"""All three model kinds on one dataset at the CPU profile, selection and report kept apart.

    python benchmarks/model_kinds.py --data ../shared/data/magnetic-tile-dev --name mt
    python benchmarks/model_kinds.py --data /tmp/elpv-mono --name elpv --make elpv
    python benchmarks/model_kinds.py --data /tmp/mnist-1 --name mnist --make mnist

1. ``model.kind: auto`` at the CPU profile (``--config cpu``, ``--set`` to override), timed:
   ReContrast trained, the training-free grid ranked, the three kinds scored on the
   validation split, the best kept.
2. The chosen bundle evaluated (the report half, beside the baseline): what a user gets.
3. For the record, the two kinds not chosen are built from the same run (the ReContrast
   candidate's bundle; the grid's best setting refitted; the fused detector from both) and
   evaluated on the same report half. Nothing here chooses anything: the choice was made in 1.

``--make elpv`` writes an MVTec-layout subset of the ``elpv-dataset`` package (solar cells,
image labels, non-commercial licence; monocrystalline cells: defect probability 0 = normal,
1 = defective; 290 normals train, 100 + 100 test, chosen by file-name hash); ``--make
mnist`` the demo's MNIST one-class folder (digit 1 normal). Appends one JSON line to
``docs/results/model_kinds_runs.jsonl``. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_elpv(dest: Path, n_train: int = 290, n_test_each: int = 100) -> Path:
    """An MVTec-layout folder of mono-crystalline elpv cells (see the module doc)."""
    import importlib.util

    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None:
        raise SystemExit("pip install elpv-dataset (non-commercial licence) to build the elpv subset")
    data = Path(spec.origin).parent / "data"
    rows = [line.split() for line in (data / "labels.csv").read_text().splitlines() if line.strip()]
    key = lambda r: hashlib.sha1(r[0].encode()).hexdigest()  # noqa: E731
    normal = sorted((r for r in rows if r[2] == "mono" and float(r[1]) == 0.0), key=key)
    defect = sorted((r for r in rows if r[2] == "mono" and float(r[1]) == 1.0), key=key)
    parts = {"train/good": normal[:n_train], "test/good": normal[n_train:n_train + n_test_each],
             "test/defect": defect[:n_test_each]}
    for sub, items in parts.items():
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for r in items:
            shutil.copy(data / r[0], dest / sub / Path(r[0]).name)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--make", choices=["elpv", "mnist"], default=None, help="build the dataset at --data first")
    p.add_argument("--config", default="cpu")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE (dotted), repeatable")
    p.add_argument("--out", type=Path, default=Path("/tmp/model_kinds"))
    p.add_argument("--log", type=Path, default=REPO / "docs" / "results" / "model_kinds_runs.jsonl")
    args = p.parse_args(argv)

    import torch

    from recontrast_core.config import ModelConfig
    from recontrast_core.data.layouts import read_dataset
    from recontrast_core.evaluate import evaluate_bundle
    from recontrast_core.fit import fit_detector, fuse_existing
    from recontrast_core.steps.settings import load_settings, parse_assignment

    if args.make and not (args.data / "train").is_dir():
        if args.make == "elpv":
            make_elpv(args.data)
        else:
            from recontrast_core.cli.demo import build_mnist_one_class

            build_mnist_one_class(args.data)
    overrides = dict(parse_assignment(item) for item in args.set)
    settings = load_settings(args.config, overrides)
    manifest = read_dataset(args.data)
    out = args.out / args.name
    shutil.rmtree(out, ignore_errors=True)
    rec: dict = {"name": args.name, "data": str(args.data), "config": args.config, "set": overrides,
                 "threads": torch.get_num_threads(), "n_train": len(manifest.select(split="train")),
                 "n_test": len(manifest.select(split="test"))}
    t0 = time.perf_counter()
    res = fit_detector(manifest, settings.model, settings.train, out / "auto", calibration=settings.calibration,
                       inference=settings.inference, progress=False, log=lambda s: print(s, flush=True))
    rec["auto_wall_s"] = round(time.perf_counter() - t0, 1)
    sel = res.selection
    rec.update(chosen=res.kind, selection={k: sel.get(k) for k in ("candidates", "grid", "validation", "wall_time_s",
                                                                     "best_training_free", "fused_image_score")})
    source = (sel.get("fused_image_score") or {}).get("chosen", "fused") if res.kind == "fused" else "fused"
    label = res.kind if source == "fused" else f"fused (image score: {source})"
    print(f"auto: {rec['auto_wall_s']} s, chosen {res.kind}", flush=True)
    t0 = time.perf_counter()
    payload = evaluate_bundle(res.bundle_dir, manifest, progress=False, baseline=settings.baseline,
                              model_settings=settings.model)
    rec["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    keep = ("image_auroc", "pixel_auroc", "aupro", "recall_at_threshold", "fpr_at_threshold",
            "precision_at_threshold", "recall_at_target_fpr")
    rec["report"] = {label: {k: payload["metrics"][k] for k in keep if k in payload["metrics"]}}
    rec["baseline"] = {k[len("baseline_"):]: v for k, v in payload["metrics"].items() if k.startswith("baseline_")}
    rec["evaluation_split"] = payload["evaluation_split"]
    print(json.dumps({"report": rec["report"], "baseline": rec["baseline"]}), flush=True)

    best = sel["best_training_free"]
    others = {}
    if res.kind != "recontrast" and (out / "auto" / "candidates" / "recontrast").is_dir():
        others["recontrast"] = out / "auto" / "candidates" / "recontrast"
    if res.kind != "patchknn":
        others["patchknn"] = fit_detector(manifest, ModelConfig(kind="patchknn", patchknn=best), settings.train,
                                          out / "patchknn", calibration=settings.calibration,
                                          inference=settings.inference, progress=False).bundle_dir
    if label != "fused" and "recontrast" in others:  # the fused map's own image score, for the record
        others["fused"] = fuse_existing(others["recontrast"], manifest, ModelConfig(kind="fused", patchknn=best),
                                        out / "fused", calibration=settings.calibration)
    for kind, bundle in others.items():
        m = evaluate_bundle(bundle, manifest, progress=False, baseline=None)["metrics"]
        rec["report"][kind] = {k: m[k] for k in keep if k in m}
        print(kind, json.dumps(rec["report"][kind]), flush=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec["report"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
