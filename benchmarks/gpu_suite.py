"""One command that checks everything that needs a GPU, and writes what it measured.

    python benchmarks/gpu_suite.py --out DIR            # on one H100/H200 (estimate: 6-9 min)
    python benchmarks/gpu_suite.py --out DIR --tiny     # CPU, tiny sizes, < 1 min (the tests run this)
    python benchmarks/gpu_suite.py --out DIR --sections speed,levers   # rerun only some sections

On the bare, offline GPU machines, prepare the inputs here first and run it there with
``bash benchmarks/gpu_run.sh [--sections ...]`` (see ``benchmarks/gpu_prepare.sh`` and
docs/results.md); that script runs the suite under ``timeout`` (``GPU_SUITE_TIMEOUT``,
default 520 s: give the device call a few tens of seconds more). Sections run in a fixed
order (the cheap ones first, ``torch.compile`` last), so a run cut short keeps the most; where
one call's limit is too short for all, split them, e.g. ``--sections smoke,speed,levers``
then ``--sections accuracy,parity``.

Versions first: python, torch, timm, CUDA, cuDNN, the device's name, the TF32 settings and
which AdamW is used are printed before anything else and recorded in the JSON
(``environment``). Fused AdamW is probed on the device first; when constructing or stepping
it fails, every optimiser of the run is the unfused one, and ``environment.adamw`` (and each
speed entry's ``adamw``) says which was used and why.

Sections (``--sections``, comma-separated, default all; they run in the order below
whatever order is given, and a rerun's JSON holds only the sections it ran):

* ``smoke``: training (bf16 autocast, channels_last, fused AdamW), MSC and COFT-AD
  adaptation, evaluation and prediction on the device, a few iterations each.
* ``speed``: training images/s (index sampling, normalisation, forward, loss, backward,
  both optimisers: the whole hot loop, checkpoint writes outside the timed region) and
  end-to-end evaluation images/s (decoded ``uint8`` host images -> transfer, normalise,
  forward, six-pair map, upsample, blur, score, results back on the host), with peak GPU
  memory, at the paper configuration (wide_resnet50_2, random weights, batch 16, 256 px)
  and the lite0 configuration. Beside them: the paper configuration in fp32
  (``paper_fp32``: bf16 autocast off) and in NCHW (``paper_nchw``: channels_last off),
  ``cudnn.benchmark`` off, and a checkpoint write (size, seconds). With ``--tiny`` lite0
  stands in for wide_resnet50_2 in the two paper variants (each entry records its backbone).
* ``accuracy``: the paper schedule on ``magnetic-tile-dev`` with lite0 (2,000 iterations,
  batch 16, 256 px) against the training-free baseline on the same test images (the
  evaluation reports both, as every evaluation does). :meth:`Suite.accuracy_kinds` is where
  model kinds other than ReContrast (``model.kind``) are to be scored on the same images.
* ``parity``: the accuracy run's model (or ``--bundle``) scored in fp32, with TF32 off for
  the reference (``cuda.matmul`` and ``cudnn``, restored after), and under bf16 autocast:
  max abs difference of calibrated (normalised) maps, Spearman of image scores, AUROC
  deltas, decision agreement; it recommends the default inference precision
  (``inference.precision``). Run alone, it trains the accuracy configuration itself first
  (``--iterations`` sets its length).
* ``levers``: ``torch.compile`` of the lite0 training step (``trainer.net``, the module
  ``Trainer.step`` calls; images/s and compile time); last, so it cannot eat the other
  sections' time (``--no-compile`` skips it).

Every check is guarded: a failure is recorded (error line and the traceback's tail) and the
suite goes on. ``DIR/gpu_suite.json`` and ``DIR/gpu_suite.md`` are rewritten (atomically)
after every check and every section, so a run that is killed or hangs still leaves the
finished sections' numbers (``completed_sections``, ``in_progress``, ``status``: running,
complete or interrupted; SIGTERM from ``timeout`` marks it interrupted and exits 124).
Prints a markdown table at the end. Numbers only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

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
JSON_NAME, MD_NAME = "gpu_suite.json", "gpu_suite.md"
PAPER = dict(backbone=BackboneConfig(name="wide_resnet50_2", weights="none"))
LITE0 = dict(backbone=BackboneConfig(name="tf_efficientnet_lite0", weights="none"))
# Model kinds besides ReContrast that the accuracy section scores (Suite.accuracy_kinds);
# empty until they are wired in there (e.g. ("patchknn", "fused"), selected by model.kind).
ACCURACY_KINDS: tuple[str, ...] = ("patchknn", "fused")


class Interrupted(BaseException):
    """SIGTERM (``timeout``): not an ``Exception``, so no check's guard swallows it."""


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


def _error_line(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0][:300]


def _failure(exc: BaseException, t0: float) -> dict:
    tb = traceback.format_exc().strip().splitlines()
    return {"ok": False, "seconds": round(time.perf_counter() - t0, 2), "error": _error_line(exc), "traceback": tb[-6:]}


def _guard(record: dict, name: str, fn):
    """Run one check; a failure is recorded (one line + the traceback's tail), never raised."""
    t0 = time.perf_counter()
    try:
        out = fn() or {}
        record[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 2), **out}
    except Exception as exc:  # the suite reports every failure and goes on
        record[name] = _failure(exc, t0)
        print(f"  !! {name} failed: {record[name]['error']}", flush=True)
    return record[name]


def _precision(cfg: TrainConfig, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    if cfg.amp:
        return "bf16 autocast"
    return "fp32 (cuDNN TF32 allowed)" if torch.backends.cudnn.allow_tf32 else "fp32"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a kill)
    never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- environment
def tf32_flags() -> dict:
    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


@contextlib.contextmanager
def tf32_off():
    """Full fp32 matmuls and convolutions (no TF32) inside; the previous settings after."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)  # also restores cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def environment(device: torch.device, tiny: bool, data) -> dict:
    """Versions and the device, recorded first (a run that dies early still says what ran)."""
    try:
        import timm

        timm_version = timm.__version__
    except Exception as exc:  # the suite still runs what it can
        timm_version = f"unavailable ({_error_line(exc)})"
    cuda = device.type == "cuda" and torch.cuda.is_available()
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm_version,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "tiny": tiny, "data": str(data),
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        env.update({"capability": f"{props.major}.{props.minor}", "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "cuda_devices": torch.cuda.device_count()})
    env["tf32"] = tf32_flags()
    return env


# ----------------------------------------------------------------------------- AdamW fallback
class _UnfusedAdamW(torch.optim.AdamW):
    """AdamW that ignores ``fused=True`` (installed as ``torch.optim.AdamW`` when the fused one fails)."""

    def __init__(self, params, *args, **kwargs):
        kwargs["fused"] = False
        super().__init__(params, *args, **kwargs)


@contextlib.contextmanager
def unfused_adamw(active: bool = True):
    """Inside, every ``torch.optim.AdamW(...)`` (the Trainer's included) is the unfused one."""
    if not active:
        yield
        return
    saved = torch.optim.AdamW
    torch.optim.AdamW = _UnfusedAdamW
    try:
        yield
    finally:
        torch.optim.AdamW = saved


def probe_fused_adamw(device: torch.device) -> Optional[str]:
    """None when a fused AdamW constructs and steps on ``device`` (channels_last and plain
    parameters); otherwise the error line. Not CUDA: None (the Trainer uses the unfused one)."""
    if device.type != "cuda":
        return None
    try:
        w = torch.nn.Parameter(torch.randn(8, 4, 3, 3, device=device).contiguous(memory_format=torch.channels_last))
        b = torch.nn.Parameter(torch.zeros(8, device=device))
        opt = torch.optim.AdamW([w, b], lr=1e-3, weight_decay=1e-5, fused=True)
        (w.square().sum() + b.sum()).backward()
        opt.step()
        _sync(device)
        return None
    except Exception as exc:
        return _error_line(exc)


def _is_fused(opt) -> bool:
    return any(bool(g.get("fused")) for g in opt.param_groups)


def _from_optim(exc: BaseException) -> bool:
    """The error was raised inside ``torch.optim`` (constructing or stepping an optimiser)."""
    return any("torch/optim/" in f.filename.replace("\\", "/") for f in traceback.extract_tb(exc.__traceback__))


def _unfused_copy(opt):
    groups = [{k: v for k, v in g.items() if k != "fused"} for g in opt.param_groups]
    return _UnfusedAdamW(groups)


def make_trainer(model, cfg: TrainConfig, device: torch.device):
    """A :class:`~recontrast_core.train.Trainer`; with the unfused AdamW when constructing
    the fused one fails. ``trainer.adamw`` says which is used."""
    from recontrast_core.train import Trainer

    try:
        trainer = Trainer(model, cfg, device)
    except Exception as exc:
        if device.type != "cuda" or not _from_optim(exc):
            raise
        with unfused_adamw():
            trainer = Trainer(model, cfg, device)
        trainer.adamw = f"unfused (fused AdamW failed to construct: {_error_line(exc)})"
        return trainer
    trainer.adamw = "fused" if _is_fused(trainer.opt_decoder) else "unfused"
    return trainer


def trainer_step(trainer, x: torch.Tensor, alpha: float):
    """``trainer.step``; when a fused AdamW step fails, both optimisers are rebuilt unfused
    (same parameters and settings) and the step is retried once."""
    try:
        return trainer.step(x, alpha)
    except Exception as exc:
        if not (_is_fused(trainer.opt_decoder) or _is_fused(trainer.opt_encoder)) or not _from_optim(exc):
            raise
        trainer.opt_decoder = _unfused_copy(trainer.opt_decoder)
        trainer.opt_encoder = _unfused_copy(trainer.opt_encoder)
        trainer.adamw = f"unfused (fused AdamW step failed: {_error_line(exc)})"
        print(f"  !! {trainer.adamw}", flush=True)
        return trainer.step(x, alpha)


def _detector(model, cfg: TrainConfig, inference: InferenceConfig, device: torch.device):
    """An in-memory Detector around a ReContrast network (no bundle on disk)."""
    from dataclasses import fields

    from recontrast_core.bundle import Detector
    from recontrast_core.calibration import Calibration

    calib = Calibration(threshold=1.0, lo=0.0, hi=2.0, method="fpr", target_fpr=0.01, n_normal=1, n_anomalous=0)
    common = dict(config=cfg, inference=inference, calibration=calib, meta={}, device=device)
    if "scorer" in {f.name for f in fields(Detector)}:  # model kinds: the network inside its scorer
        from recontrast_core.models.recontrast import ReContrastScorer

        return Detector(scorer=ReContrastScorer(model, cfg.image_size), **common)
    return Detector(model=model, **common)


# ----------------------------------------------------------------------------- the suite
class Suite:
    def __init__(self, args, sections=SECTIONS, env: Optional[dict] = None):
        self.args = args
        self.tiny = args.tiny
        self.sections = list(sections)
        self.device = torch.device("cpu" if self.tiny else args.device)
        self.out: Optional[Path] = getattr(args, "out", None)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.manifest = None
        self.results: dict = {"environment": env or environment(self.device, self.tiny, args.data), "status": "running",
                              "sections_requested": self.sections, "completed_sections": [], "in_progress": None,
                              "section_seconds": {}, "wall_s": 0.0, "sections": {}}
        self.adamw = "fused" if self.device.type == "cuda" else "unfused (CPU)"
        self.accuracy_bundle = None
        self.smoke_bundle = None
        self._t_all = time.perf_counter()

    # -- output ---------------------------------------------------------------------------
    def write(self) -> None:
        """Rewrite gpu_suite.json and gpu_suite.md with what is known now (atomic renames)."""
        if self.out is None:
            return
        self.results["wall_s"] = round(time.perf_counter() - self._t_all, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.out / JSON_NAME, json.dumps(self.results, indent=1, default=str))
        _write_atomic(self.out / MD_NAME, to_markdown(self.results))

    def guard(self, record: dict, name: str, fn):
        """One guarded check; the files are rewritten after it."""
        print(f"   - {name}", flush=True)
        out = _guard(record, name, fn)
        self.write()
        return out

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
    def smoke(self, rec: dict) -> None:
        from recontrast_core.adapt import run_adapt
        from recontrast_core.evaluate import evaluate_bundle
        from recontrast_core.predict import predict_paths
        from recontrast_core.train import train_model

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
                    "channels_last": cfg.channels_last, "adamw": self.adamw,
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

        self.guard(rec, "train", train)
        self.guard(rec, "adapt_msc", adapt("msc"))
        self.guard(rec, "adapt_coft", adapt("coft"))
        if self.smoke_bundle is not None:
            self.guard(rec, "evaluate", evaluate)
            self.guard(rec, "predict", predict)

    def speed(self, rec: dict) -> None:
        # --tiny: lite0 stands in for wide_resnet50_2 in the variants (their code path, not their numbers).
        variant_base = LITE0 if self.tiny else PAPER
        self.guard(rec, "paper", lambda: self._speed_one(PAPER))
        self.guard(rec, "paper_fp32", lambda: self._speed_one(dict(variant_base, amp=False)))
        self.guard(rec, "paper_nchw", lambda: self._speed_one(dict(variant_base, channels_last=False)))
        if not self.tiny and self.device.type == "cuda":
            self.guard(rec, "paper_no_cudnn_benchmark", lambda: self._speed_one(PAPER, cudnn_benchmark=False, eval_too=False))
        self.guard(rec, "lite0", lambda: self._speed_one(LITE0))
        if not self.tiny and self.device.type == "cuda":
            self.guard(rec, "lite0_no_cudnn_benchmark", lambda: self._speed_one(LITE0, cudnn_benchmark=False, eval_too=False))

    def levers(self, rec: dict) -> None:
        """Optional levers, last so they never eat the other sections' time: torch.compile of
        the lite0 training step (compile time reported apart)."""
        if not self.args.compile:
            rec["lite0_torch_compile"] = {"ok": True, "skipped": "--no-compile (default with --tiny)"}
            return
        self.guard(rec, "lite0_torch_compile", lambda: self._speed_one(LITE0, compile_model=True))

    def _speed_one(self, kw: dict, cudnn_benchmark: bool = True, eval_too: bool = True, compile_model: bool = False) -> dict:
        from recontrast_core.models import build_model
        from recontrast_core.train import batch_indices, prepare_batch, to_device

        batch = 2 if self.tiny else 16
        cfg = self.train_cfg(batch_size=batch, iterations=10_000, **kw)
        s = cfg.image_size
        n_img = 8 if self.tiny else 256
        g = torch.Generator().manual_seed(0)
        host = torch.randint(0, 256, (n_img, 3, s, s), dtype=torch.uint8, generator=g)
        images = host.to(self.device)
        model = build_model(cfg)
        trainer = make_trainer(model, cfg, self.device)
        saved_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = cudnn_benchmark  # after the Trainer, which turns it on
        try:
            warm, iters = (1, 2) if self.tiny else (10, 60)

            def step(i):
                idx = to_device(batch_indices(i, n_img, batch, cfg.seed), self.device)
                trainer_step(trainer, prepare_batch(images[idx], cfg, self.device, i, model.encoder.stats), 1.0)

            compile_s = None
            if compile_model:
                # The module Trainer.step calls is trainer.net (trainer.model is the bare
                # network it wraps): compile that one, or nothing compiled runs.
                t0 = time.perf_counter()
                trainer.net = torch.compile(trainer.net)
                step(0)  # compilation happens here
                _sync(self.device)
                compile_s = round(time.perf_counter() - t0, 1)
                eval_too = False

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
                   **({"compile_s": compile_s, "compiled": "trainer.net"} if compile_model else {}),
                   "backbone": cfg.backbone.name, "batch": batch, "image_size": s, "cudnn_benchmark": cudnn_benchmark,
                   "precision": _precision(cfg, self.device),
                   "channels_last": cfg.channels_last, "adamw": trainer.adamw}
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
            det = _detector(trainer.model.eval(), cfg, inf, self.device)
            n_eval = 8 if self.tiny else 1024
            eval_host = host.repeat((n_eval + n_img - 1) // n_img, 1, 1, 1)[:n_eval]
            del images
            _reset_peak(self.device)
            det.score_uint8(eval_host[: inf.batch_size * 2])  # warm-up (cudnn autotune)
            _sync(self.device)
            t0 = time.perf_counter()
            det.score_uint8(eval_host)
            _sync(self.device)
            eval_s = time.perf_counter() - t0
            out.update({"eval_images_per_s": round(n_eval / eval_s, 1), "eval_peak_gib": _peak_gib(self.device),
                        "eval_batch": inf.batch_size, "eval_scope": "uint8 on host -> maps [N,S,S] and scores on host"})
            return out
        finally:
            torch.backends.cudnn.benchmark = saved_benchmark

    # accuracy -----------------------------------------------------------------------------
    def accuracy_manifest(self):
        return self.small(12, 6) if self.tiny else self.data()

    def accuracy_cfg(self) -> TrainConfig:
        return self.train_cfg(iterations=3 if self.tiny else self.args.iterations,
                              batch_size=2 if self.tiny else 16,
                              log_every=1 if self.tiny else 50, checkpoint_every=10_000)

    def train_accuracy_model(self, manifest) -> dict:
        """Train the accuracy configuration (lite0, the paper schedule); sets ``accuracy_bundle``."""
        from recontrast_core.train import train_model

        cfg = self.accuracy_cfg()
        t0 = time.perf_counter()
        res = train_model(manifest, cfg, self.work / "accuracy", progress=not self.tiny,
                          calibration=CalibrationConfig(), inference=InferenceConfig())
        self.accuracy_bundle = res.bundle_dir
        return {"backbone": cfg.backbone.name, "iterations": cfg.iterations, "batch": cfg.batch_size,
                "image_size": cfg.image_size, "train_wall_s": round(time.perf_counter() - t0, 1),
                "train_images_per_s": round(res.images_per_s, 1),
                "final_loss": res.history[-1]["loss"] if res.history else None}

    def accuracy(self, rec: dict) -> None:
        from recontrast_core.evaluate import evaluate_bundle

        manifest = self.accuracy_manifest()

        def run():
            trained = self.train_accuracy_model(manifest)
            t0 = time.perf_counter()
            payload = evaluate_bundle(self.accuracy_bundle, manifest, device=str(self.device), progress=False,
                                      baseline=BaselineConfig())
            eval_wall = time.perf_counter() - t0
            mt, base = payload["metrics"], payload["baseline"]["metrics"]
            return {
                "kind": "recontrast", **{k: trained[k] for k in ("backbone", "iterations", "batch", "image_size")},
                "image_auroc": round(mt["image_auroc"], 4), "pixel_auroc": round(mt.get("pixel_auroc", float("nan")), 4),
                "aupro": round(mt.get("aupro", float("nan")), 4),
                "baseline_image_auroc": round(base["image_auroc"], 4),
                "baseline_pixel_auroc": round(base.get("pixel_auroc", float("nan")), 4),
                "baseline_aupro": round(base.get("aupro", float("nan")), 4),
                "train_wall_s": trained["train_wall_s"], "train_images_per_s": trained["train_images_per_s"],
                "eval_wall_s": round(eval_wall, 1), "baseline_wall_s": payload["baseline"]["wall_time_s"],
                "final_loss": trained["final_loss"],
            }

        self.guard(rec, "lite0_paper_schedule", run)
        self.accuracy_kinds(rec, manifest)

    # ---------------------------------------------------------------------------------------
    # EXTENSION POINT: model kinds other than ReContrast in the accuracy section.
    # Each kind named in ACCURACY_KINDS (the pipeline's ``model.kind`` values, e.g. "patchknn",
    # "fused") is scored by ``accuracy_kind`` on the same manifest as the ReContrast run above,
    # one guarded check per kind recorded under the kind's name, beside "lite0_paper_schedule"
    # (same metric keys: image_auroc, pixel_auroc, aupro, wall times). The ReContrast bundle of
    # this run is ``self.accuracy_bundle`` (None when its training failed), for a kind that
    # builds on it (fused).
    # ---------------------------------------------------------------------------------------
    def accuracy_kinds(self, rec: dict, manifest, kinds: Optional[tuple[str, ...]] = None) -> None:
        """Score every model kind in ``kinds`` (default :data:`ACCURACY_KINDS`) besides ReContrast."""
        for kind in ACCURACY_KINDS if kinds is None else kinds:
            self.guard(rec, kind, lambda kind=kind: self.accuracy_kind(kind, manifest))

    def accuracy_kind(self, kind: str, manifest) -> dict:
        """Fit model kind ``kind`` on ``manifest`` and evaluate it (the same evaluation as the
        ReContrast run: the report half, beside the baseline); returns its figures.
        ``patchknn``: the kind's defaults (lite0, 256 px, 1% coreset; --tiny: 64 px).
        ``fused``: the accuracy run's ReContrast bundle fused with that bank (no retraining)."""
        from recontrast_core.config import ModelConfig
        from recontrast_core.evaluate import evaluate_bundle
        from recontrast_core.fit import fit_detector, fuse_existing

        model = ModelConfig(kind=kind, patchknn={"image_size": 64} if self.tiny else {})
        out = self.work / f"accuracy_{kind}"
        t0 = time.perf_counter()
        if kind == "patchknn":
            cfg = TrainConfig(device=str(self.device))
            bundle = fit_detector(manifest, model, cfg, out, progress=False).bundle_dir
        elif kind == "fused":
            if self.accuracy_bundle is None:
                raise RuntimeError("fused needs the accuracy run's ReContrast bundle (it failed or did not run)")
            bundle = fuse_existing(self.accuracy_bundle, manifest, model, out, device=str(self.device))
        else:
            raise ValueError(f"unknown model kind {kind!r}")
        fit_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        payload = evaluate_bundle(bundle, manifest, device=str(self.device), progress=False, baseline=None)
        mt = payload["metrics"]
        return {"kind": kind, "image_auroc": round(mt["image_auroc"], 4),
                "pixel_auroc": round(mt.get("pixel_auroc", float("nan")), 4),
                "aupro": round(mt.get("aupro", float("nan")), 4),
                "recall_at_threshold": round(mt.get("recall_at_threshold", float("nan")), 4),
                "fpr_at_threshold": round(mt.get("fpr_at_threshold", float("nan")), 4),
                "fit_wall_s": round(fit_wall, 1), "eval_wall_s": round(time.perf_counter() - t0, 1),
                "evaluation_split": payload.get("evaluation_split", {}).get("rule")}

    # parity -------------------------------------------------------------------------------
    def parity(self, rec: dict) -> None:
        manifest = self.accuracy_manifest()
        bundle, source = self.args.bundle, "--bundle"
        if bundle is None and self.accuracy_bundle is None and "accuracy" not in self.sections:
            # Run alone (--sections parity): train the accuracy configuration first.
            self.guard(rec, "train_reference", lambda: self.train_accuracy_model(manifest))
            if self.accuracy_bundle is not None:
                bundle, source = self.accuracy_bundle, "train_reference (the accuracy configuration)"
        if bundle is None and self.accuracy_bundle is not None:
            bundle, source = self.accuracy_bundle, "accuracy"
        if bundle is None and self.smoke_bundle is not None:
            bundle, source = self.smoke_bundle, "smoke"
        if bundle is None:
            rec["skipped"] = {"ok": False, "error": "no trained bundle (accuracy and smoke both failed or did not run)"}
            return
        self.guard(rec, "fp32_vs_bf16", lambda: {"bundle": source, **parity_report(bundle, manifest, self.device)})

    # -- driver ---------------------------------------------------------------------------
    def run(self, sections=None) -> dict:
        sections = self.sections if sections is None else list(sections)
        self._t_all = time.perf_counter()
        self.write()
        for name in sections:
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            rec = self.results["sections"][name] = {}
            self.results["in_progress"] = name
            self.write()
            try:
                getattr(self, name)(rec)
            except Exception as exc:  # outside every check (e.g. reading the data): the next section runs
                rec["section_error"] = _failure(exc, t0)
                print(f"  !! {name} failed: {rec['section_error']['error']}", flush=True)
            self.results["section_seconds"][name] = round(time.perf_counter() - t0, 1)
            self.results["completed_sections"].append(name)
            self.results["in_progress"] = None
            self.write()
            print(f"   {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        self.results["status"] = "complete"
        self.write()
        return self.results


def parity_report(bundle_dir, manifest, device) -> dict:
    """fp32 (TF32 off: the reference) against bf16 autocast on the same model and test images."""
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
        with tf32_off() if dtype is None else contextlib.nullcontext():
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
        "fp32_reference": "TF32 off (cuda.matmul and cudnn), restored after",
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
    completed = results.get("completed_sections", [])
    lines = [f"# GPU suite: {env.get('device')}", "",
             f"torch {env.get('torch')}, timm {env.get('timm')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"python {env.get('python')}; AdamW: {env.get('adamw')}", "",
             f"Status: {results.get('status')}"
             + (f" ({results['interrupted']})" if results.get("interrupted") else "")
             + f"; wall time {results.get('wall_s')} s{' (--tiny)' if env.get('tiny') else ''}", ""]
    for section, checks in results.get("sections", {}).items():
        unfinished = "" if section in completed else " (unfinished)"
        lines += [f"## {section}{unfinished}", "", "| check | ok | s | figures |", "|---|---|---|---|"]
        for name, r in checks.items():
            figures = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("ok", "seconds", "traceback"))
            lines.append(f"| {name} | {'yes' if r.get('ok') else 'NO'} | {r.get('seconds', '')} | {figures} |")
        lines.append("")
    return "\n".join(lines)


def parse_sections(text: str):
    """``--sections``: comma-separated names -> (the known ones in the suite's order, the unknown ones)."""
    asked = [s.strip() for s in text.split(",") if s.strip()]
    return [s for s in SECTIONS if s in asked], [s for s in asked if s not in SECTIONS]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help=f"folder for {JSON_NAME} and {MD_NAME} (rewritten after every check)")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: checks the suite itself in < 1 min")
    p.add_argument("--data", type=Path, default=next((d for d in DATA_CANDIDATES if d.is_dir()), DATA_CANDIDATES[-1]))
    p.add_argument("--device", default="cuda")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (run in that order; default all)")
    p.add_argument("--iterations", type=int, default=2000, help="accuracy run length (paper: 2000); parity's own run when alone")
    p.add_argument("--bundle", type=Path, default=None, help="parity: score this bundle instead of the accuracy run's")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the lite0 training step (default: on with CUDA, off with --tiny)")
    args = p.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    device = torch.device("cpu" if args.tiny else args.device)
    env = environment(device, args.tiny, args.data)
    env["argv"] = list(sys.argv[1:] if argv is None else argv)
    env["adamw"] = "unfused (CPU)" if device.type != "cuda" else None
    print(f"versions: torch {env['torch']}, timm {env['timm']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
          f"python {env['python']}; device {env['device']}", flush=True)
    sections, bad = parse_sections(args.sections)
    if bad or not sections:
        print(f"error: --sections: unknown {bad or args.sections!r}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"error: --data {args.data}: not found (benchmarks/gpu_prepare.sh copies magnetic-tile-dev)", file=sys.stderr)
        return 2
    if args.bundle is not None and not args.bundle.is_dir():
        print(f"error: --bundle {args.bundle}: not a folder", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --tiny for the CPU check", file=sys.stderr)
        return 2
    if args.compile is None:
        args.compile = not args.tiny
    fused_error = probe_fused_adamw(device)
    if device.type == "cuda":
        env["adamw"] = "fused" if fused_error is None else f"unfused (fused AdamW failed: {fused_error})"
    print(json.dumps(env), flush=True)
    suite = Suite(args, sections, env)
    suite.adamw = env["adamw"]

    def on_sigterm(signum, frame):
        raise Interrupted(f"signal {signum} (timeout?)")

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: no handler (the files are still written as it goes)
        previous = None
    try:
        with unfused_adamw(active=fused_error is not None):
            suite.run()
    except (Interrupted, KeyboardInterrupt) as exc:
        suite.results["status"] = "interrupted"
        suite.results["interrupted"] = f"{exc or type(exc).__name__} during {suite.results.get('in_progress')}"
        suite.write()
        print(f"!! interrupted: {suite.results['interrupted']}; {args.out / JSON_NAME} holds the finished sections",
              file=sys.stderr, flush=True)
        return 124 if isinstance(exc, Interrupted) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(suite.work, ignore_errors=True)  # bundles and checkpoints of this run
    print(to_markdown(suite.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
