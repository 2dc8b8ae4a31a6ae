"""One command that checks everything that needs a GPU, and writes what it measured.

    python benchmarks/gpu_suite.py --out DIR            # on one H100/H200 (about 5-8 min)
    python benchmarks/gpu_suite.py --out DIR --tiny     # CPU, tiny sizes, < 1 min (the tests run this)

On the bare, offline GPU machines, prepare the inputs here first and run it there with
``bash benchmarks/gpu_run.sh`` (see ``benchmarks/gpu_prepare.sh`` and docs/results.md).

Sections (``--sections``, default all; each is recorded even when it fails):

* ``smoke``: training (bf16 autocast, channels_last, fused AdamW), MSC and COFT-AD
  adaptation, evaluation and prediction on the device, a few iterations each.
* ``speed``: training images/s (index sampling, normalisation, forward, loss, backward,
  both optimisers: the whole hot loop, checkpoint writes outside the timed region) and
  end-to-end evaluation images/s (decoded ``uint8`` host images -> transfer, normalise,
  forward, six-pair map, upsample, blur, score, results back on the host), with peak GPU
  memory, at the paper configuration (wide_resnet50_2, random weights, batch 16, 256 px)
  and the lite0 configuration; levers measured beside: ``cudnn.benchmark`` off, and a
  checkpoint write (size, seconds).
* ``accuracy``: the paper schedule on ``magnetic-tile-dev`` with lite0 (2,000 iterations,
  batch 16, 256 px) against the training-free baseline on the same test images (the
  evaluation reports both, as every evaluation does).
* ``parity``: the accuracy run's model scored in fp32 and under bf16 autocast: max abs
  difference of calibrated (normalised) maps, Spearman of image scores, AUROC deltas,
  decision agreement; it recommends the default inference precision
  (``inference.precision``).
* ``levers``: ``torch.compile`` of the lite0 training step (images/s and compile time);
  last, so it cannot eat the other sections' time (``--no-compile`` skips it).

Prints a markdown table and writes ``DIR/gpu_suite.json`` and ``DIR/gpu_suite.md``.
Numbers only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a bare checkout (no pip install) on the GPU machine
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recontrast_core.config import (  # noqa: E402
    AdaptConfig,
    BackboneConfig,
    BaselineConfig,
    CalibrationConfig,
    InferenceConfig,
    TrainConfig,
)

DATA_CANDIDATES = (REPO / ".gpu" / "data" / "magnetic-tile-dev", REPO.parent / "shared" / "data" / "magnetic-tile-dev")
SECTIONS = ("smoke", "speed", "accuracy", "parity", "levers")


# ----------------------------------------------------------------------------- plumbing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _guard(record: dict, name: str, fn):
    """Run one check; a failure is recorded (one line + the traceback's tail), never raised."""
    t0 = time.perf_counter()
    try:
        out = fn() or {}
        record[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 2), **out}
    except Exception as exc:  # the suite reports every failure and goes on
        tb = traceback.format_exc().strip().splitlines()
        record[name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 2),
                        "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300], "traceback": tb[-6:]}
        print(f"  !! {name} failed: {record[name]['error']}", flush=True)
    return record[name]


class Suite:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device("cpu" if self.tiny else args.device)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.manifest = None
        self.results: dict = {"sections": {}}
        self.accuracy_bundle = None
        self.smoke_bundle = None

    # -- data ---------------------------------------------------------------------------
    def data(self):
        if self.manifest is None:
            from recontrast_core.data.layouts import read_dataset

            self.manifest = read_dataset(self.args.data)
        return self.manifest

    def small(self, n_train: int, n_test_each: int):
        """A deterministic subset: the first normal training images, first normal and
        anomalous test images (sorted by path)."""
        m = self.data()
        rows = sorted(m.select(split="train", label=0).entries, key=lambda e: e.path)[:n_train]
        test = sorted(m.select(split="test").entries, key=lambda e: e.path)
        good = [e for e in test if e.label == 0][:n_test_each]
        bad = [e for e in test if e.label == 1][:n_test_each]
        return m.subset(rows + good + bad)

    # -- configurations -------------------------------------------------------------------
    def size(self, full: int = 256) -> int:
        return 64 if self.tiny else full

    def train_cfg(self, **kw) -> TrainConfig:
        base = dict(device=str(self.device), image_size=self.size(), log_every=10, checkpoint_every=10_000)
        if self.tiny:
            base.update(decoder_blocks=(1, 1, 1), bottleneck_blocks=1, batch_size=2)
        base.update(kw)
        return TrainConfig(**base)

    # -- sections -------------------------------------------------------------------------
    def smoke(self) -> dict:
        from recontrast_core.adapt import run_adapt
        from recontrast_core.evaluate import evaluate_bundle
        from recontrast_core.predict import predict_paths
        from recontrast_core.train import train_model

        rec: dict = {}
        small = self.small(8 if self.tiny else 32, 4 if self.tiny else 16)
        it = 2 if self.tiny else 20

        def train():
            cfg = self.train_cfg(iterations=it, batch_size=2 if self.tiny else 8)
            res = train_model(small, cfg, self.work / "smoke", progress=False)
            self.smoke_bundle = res.bundle_dir
            losses = [h["loss"] for h in res.history]
            return {"iterations": it, "final_loss": losses[-1] if losses else None,
                    "loss_finite": bool(losses and all(np.isfinite(losses))),
                    "amp": "bf16" if (cfg.amp and self.device.type == "cuda") else "fp32",
                    "channels_last": cfg.channels_last, "fused_adamw": self.device.type == "cuda",
                    "images_per_s": round(res.images_per_s, 1)}

        def adapt(method: str):
            def run():
                cfg = AdaptConfig(method=method, image_size=self.size(), device=str(self.device),
                                  epochs=1 if method == "msc" else 2, batch_size=4 if self.tiny else 16,
                                  shots=4 if method == "coft" else None)
                path = run_adapt(small, cfg, self.work / f"adapt_{method}", progress=False)
                meta = json.loads((path.parent / "encoder.json").read_text())
                return {"final_loss": meta["final_loss"], "loss_finite": bool(np.isfinite(meta["final_loss"]))}
            return run

        def evaluate():
            p = evaluate_bundle(self.smoke_bundle, small, device=str(self.device), progress=False)
            mt = p["metrics"]
            return {"image_auroc": round(mt["image_auroc"], 4), "pixel_auroc": round(mt.get("pixel_auroc", float("nan")), 4),
                    "n_images": p["n_images"]}

        def predict():
            files = [small.abspath(e.path) for e in small.select(split="test").entries[:4]]
            rows = predict_paths(self.smoke_bundle, files, self.work / "predict", device=str(self.device), progress=False)
            return {"n_scored": len(rows), "scores_finite": bool(all(np.isfinite(r["score"]) for r in rows))}

        _guard(rec, "train", train)
        _guard(rec, "adapt_msc", adapt("msc"))
        _guard(rec, "adapt_coft", adapt("coft"))
        if self.smoke_bundle is not None:
            _guard(rec, "evaluate", evaluate)
            _guard(rec, "predict", predict)
        return rec

    def speed(self) -> dict:
        rec: dict = {}
        configs = {
            "paper": dict(backbone=BackboneConfig(name="wide_resnet50_2", weights="none")),
            "lite0": dict(backbone=BackboneConfig(name="tf_efficientnet_lite0", weights="none")),
        }
        for name, kw in configs.items():
            _guard(rec, f"{name}", lambda kw=kw: self._speed_one(kw, cudnn_benchmark=True))
            if not self.tiny and self.device.type == "cuda":
                _guard(rec, f"{name}_no_cudnn_benchmark", lambda kw=kw: self._speed_one(kw, cudnn_benchmark=False, eval_too=False))
        return rec

    def levers(self) -> dict:
        """Optional levers, last so they never eat the other sections' time: torch.compile of
        the lite0 training step (compile time reported apart)."""
        rec: dict = {}
        if not self.args.compile:
            rec["lite0_torch_compile"] = {"ok": True, "skipped": "--no-compile (default with --tiny)"}
            return rec
        lite0 = dict(backbone=BackboneConfig(name="tf_efficientnet_lite0", weights="none"))
        _guard(rec, "lite0_torch_compile", lambda: self._speed_one(lite0, cudnn_benchmark=True, compile_model=True))
        return rec

    def _speed_one(self, kw: dict, cudnn_benchmark: bool, eval_too: bool = True, compile_model: bool = False) -> dict:
        from recontrast_core.bundle import Detector
        from recontrast_core.models import build_model
        from recontrast_core.calibration import Calibration
        from recontrast_core.train import Trainer, _prepare, _to_device, batch_indices

        torch.backends.cudnn.benchmark = cudnn_benchmark
        batch = 2 if self.tiny else 16
        cfg = self.train_cfg(batch_size=batch, iterations=10_000, **kw)
        s = cfg.image_size
        n_img = 8 if self.tiny else 256
        g = torch.Generator().manual_seed(0)
        host = torch.randint(0, 256, (n_img, 3, s, s), dtype=torch.uint8, generator=g)
        images = host.to(self.device)
        model = build_model(cfg)
        trainer = Trainer(model, cfg, self.device)
        warm, iters = (1, 2) if self.tiny else (10, 60)
        compile_s = None
        if compile_model:
            t0 = time.perf_counter()
            trainer.model = torch.compile(trainer.model)
            step_probe = _prepare(images[:batch], cfg, self.device, 0, model.encoder.stats)
            trainer.step(step_probe, 1.0)  # compile happens here
            _sync(self.device)
            compile_s = round(time.perf_counter() - t0, 1)
            eval_too = False

        def step(i):
            idx = _to_device(batch_indices(i, n_img, batch, cfg.seed), self.device)
            trainer.step(_prepare(images[idx], cfg, self.device, i, model.encoder.stats), 1.0)

        _reset_peak(self.device)
        for i in range(warm):
            step(i)
        _sync(self.device)
        t0 = time.perf_counter()
        for i in range(warm, warm + iters):
            step(i)
        _sync(self.device)
        train_s = time.perf_counter() - t0
        out = {"train_images_per_s": round(iters * batch / train_s, 1), "train_peak_gib": _peak_gib(self.device),
               **({"compile_s": compile_s} if compile_s is not None else {}),
               "batch": batch, "image_size": s, "cudnn_benchmark": cudnn_benchmark,
               "precision": "bf16 autocast" if (cfg.amp and self.device.type == "cuda") else "fp32"}
        if compile_model:
            return out
        ckpt = self.work / "speed_ckpt" / "last.pt"
        t0 = time.perf_counter()
        trainer.save(ckpt, warm + iters, [])
        out["checkpoint_write_s"] = round(time.perf_counter() - t0, 2)
        out["checkpoint_gib"] = round(ckpt.stat().st_size / 2**30, 3)
        ckpt.unlink()
        if not eval_too:
            return out

        inf = InferenceConfig(batch_size=4 if self.tiny else 64)
        det = Detector(model=trainer.model.eval(), config=cfg, inference=inf,
                       calibration=Calibration(threshold=1.0, lo=0.0, hi=2.0, method="fpr", target_fpr=0.01, n_normal=1, n_anomalous=0), meta={}, device=self.device)
        n_eval = 8 if self.tiny else 1024
        eval_host = host.repeat((n_eval + n_img - 1) // n_img, 1, 1, 1)[:n_eval]
        del images
        _reset_peak(self.device)
        det.score_uint8(eval_host[: inf.batch_size * 2])  # warm-up (cudnn autotune)
        _sync(self.device)
        t0 = time.perf_counter()
        maps, scores = det.score_uint8(eval_host)
        _sync(self.device)
        eval_s = time.perf_counter() - t0
        out.update({"eval_images_per_s": round(n_eval / eval_s, 1), "eval_peak_gib": _peak_gib(self.device),
                    "eval_batch": inf.batch_size, "eval_scope": "uint8 on host -> maps [N,S,S] and scores on host"})
        del trainer, model, det
        return out

    def accuracy(self) -> dict:
        from recontrast_core.evaluate import evaluate_bundle
        from recontrast_core.train import train_model

        rec: dict = {}
        manifest = self.small(12, 6) if self.tiny else self.data()
        cfg = self.train_cfg(iterations=3 if self.tiny else self.args.iterations,
                             batch_size=2 if self.tiny else 16,
                             log_every=1 if self.tiny else 50, checkpoint_every=10_000)

        def run():
            t0 = time.perf_counter()
            res = train_model(manifest, cfg, self.work / "accuracy", progress=not self.tiny,
                              calibration=CalibrationConfig(), inference=InferenceConfig())
            train_wall = time.perf_counter() - t0
            self.accuracy_bundle = res.bundle_dir
            t0 = time.perf_counter()
            payload = evaluate_bundle(res.bundle_dir, manifest, device=str(self.device), progress=False,
                                      baseline=BaselineConfig())
            eval_wall = time.perf_counter() - t0
            mt, base = payload["metrics"], payload["baseline"]["metrics"]
            return {
                "backbone": cfg.backbone.name, "iterations": cfg.iterations, "batch": cfg.batch_size,
                "image_size": cfg.image_size,
                "image_auroc": round(mt["image_auroc"], 4), "pixel_auroc": round(mt.get("pixel_auroc", float("nan")), 4),
                "aupro": round(mt.get("aupro", float("nan")), 4),
                "baseline_image_auroc": round(base["image_auroc"], 4),
                "baseline_pixel_auroc": round(base.get("pixel_auroc", float("nan")), 4),
                "baseline_aupro": round(base.get("aupro", float("nan")), 4),
                "train_wall_s": round(train_wall, 1), "train_images_per_s": round(res.images_per_s, 1),
                "eval_wall_s": round(eval_wall, 1), "baseline_wall_s": payload["baseline"]["wall_time_s"],
                "final_loss": res.history[-1]["loss"] if res.history else None,
            }

        _guard(rec, "lite0_paper_schedule", run)
        return rec

    def parity(self) -> dict:
        rec: dict = {}
        bundle = self.accuracy_bundle or self.smoke_bundle
        if bundle is None:
            rec["skipped"] = {"ok": False, "error": "no trained bundle (accuracy and smoke both failed)"}
            return rec
        manifest = self.small(12, 6) if self.tiny else self.data()
        _guard(rec, "fp32_vs_bf16", lambda: parity_report(bundle, manifest, self.device))
        return rec

    # -- driver ---------------------------------------------------------------------------
    def run(self, sections) -> dict:
        env = {
            "python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "tiny": self.tiny, "data": str(self.args.data),
        }
        self.results["environment"] = env
        print(json.dumps(env), flush=True)
        t_all = time.perf_counter()
        for name in sections:
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            self.results["sections"][name] = getattr(self, name)()
            print(f"   {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        self.results["wall_s"] = round(time.perf_counter() - t_all, 1)
        return self.results



def parity_report(bundle_dir, manifest, device) -> dict:
    """fp32 against bf16 autocast on the same model and test images."""
    from scipy.stats import spearmanr

    from recontrast_core.bundle import load_detector
    from recontrast_core.calibration import decide, normalise
    from recontrast_core.data.cache import batch_slices, load_resized
    from recontrast_core.inference import normalize_images, predict_batch
    from recontrast_core.metrics import compute_all

    det = load_detector(bundle_dir, str(device))
    test = load_resized(manifest.select(split="test"), det.image_size, with_masks=manifest.has_masks)
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        maps, scores = [], []
        for sl in batch_slices(test.images.shape[0], det.inference.batch_size):
            x = normalize_images(test.images[sl], det.device, det.config.channels_last, det.model.encoder.stats)
            m, s = predict_batch(det.model, x, det.inference, dtype)
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
        out[name] = (torch.cat(maps).numpy(), torch.cat(scores).numpy())
    (m32, s32), (m16, s16) = out["fp32"], out["bf16"]
    labels = test.labels.numpy()
    masks = test.masks.numpy() if test.masks is not None else None
    r32 = compute_all(labels, s32, masks, m32 if masks is not None else None)
    r16 = compute_all(labels, s16, masks, m16 if masks is not None else None)
    n32, n16 = normalise(m32, det.calibration), normalise(m16, det.calibration)
    agree = float(np.mean(decide(s32, det.calibration) == decide(s16, det.calibration)))
    report = {
        "max_abs_diff_normalised_map": float(np.abs(n32 - n16).max()),
        "mean_abs_diff_normalised_map": float(np.abs(n32 - n16).mean()),
        "spearman_image_scores": float(spearmanr(s32, s16).statistic),
        "image_auroc_fp32": round(r32["image_auroc"], 4), "image_auroc_bf16": round(r16["image_auroc"], 4),
        "image_auroc_delta": round(r16["image_auroc"] - r32["image_auroc"], 4),
        "decision_agreement": round(agree, 4),
        "n_images": int(len(labels)),
    }
    if "pixel_auroc" in r32:
        report.update({"pixel_auroc_fp32": round(r32["pixel_auroc"], 4), "pixel_auroc_bf16": round(r16["pixel_auroc"], 4),
                       "pixel_auroc_delta": round(r16["pixel_auroc"] - r32["pixel_auroc"], 4)})
    ok = (abs(report["image_auroc_delta"]) <= 0.002 and abs(report.get("pixel_auroc_delta", 0.0)) <= 0.002
          and report["spearman_image_scores"] >= 0.999 and agree >= 0.995)
    report["recommended_inference_precision"] = "bf16" if ok else "fp32"
    report["rule"] = "bf16 when |AUROC deltas| <= 0.002, Spearman >= 0.999 and decisions agree on >= 99.5% of images"
    return report


def to_markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [f"# GPU suite: {env.get('device')} (torch {env.get('torch')}, python {env.get('python')})", "",
             f"Total wall time: {results.get('wall_s')} s{' (--tiny)' if env.get('tiny') else ''}", ""]
    for section, checks in results.get("sections", {}).items():
        lines += [f"## {section}", "", "| check | ok | s | figures |", "|---|---|---|---|"]
        for name, r in checks.items():
            figures = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("ok", "seconds", "traceback"))
            lines.append(f"| {name} | {'yes' if r.get('ok') else 'NO'} | {r.get('seconds', '')} | {figures} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_suite.json and gpu_suite.md")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: checks the suite itself in < 1 min")
    p.add_argument("--data", type=Path, default=next((d for d in DATA_CANDIDATES if d.is_dir()), DATA_CANDIDATES[-1]))
    p.add_argument("--device", default="cuda")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--iterations", type=int, default=2000, help="accuracy run length (paper: 2000)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the lite0 training step (default: on with CUDA, off with --tiny)")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: --sections: unknown {bad}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"error: --data {args.data}: not found (benchmarks/gpu_prepare.sh copies magnetic-tile-dev)", file=sys.stderr)
        return 2
    if not args.tiny and args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; use --tiny for the CPU check", file=sys.stderr)
        return 2
    if args.compile is None:
        args.compile = not args.tiny
    if args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    results = Suite(args).run(sections)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_suite.json").write_text(json.dumps(results, indent=1, default=str))
    md = to_markdown(results)
    (args.out / "gpu_suite.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
