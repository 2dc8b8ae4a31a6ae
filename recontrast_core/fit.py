"""Fit any model kind into a bundle: the one function the train step, its KFP component, its
DVC stage and ``recontrast train`` call (docs/model_kinds.md).

* ``recontrast``: :func:`recontrast_core.train.train_model` (unchanged).
* ``patchknn``: one pass over the normal training images fills the memory bank.
* ``fused``: ReContrast trained, the bank fitted, each map's quantiles taken on the held-out
  normal images (:mod:`recontrast_core.models.fused`).
* ``auto``: ReContrast trained once; the training-free grid (``model.auto``: backbones x
  sizes x input statistics) fitted with a small bank and ranked on the validation split
  (:mod:`recontrast_core.selection`); its best setting refitted with the full bank; the
  fused detector built from both; the three candidates scored on the validation split and
  the best kept (image AUROC, then AUPRO). Every candidate and grid setting is recorded in
  ``bundle.json`` under ``selection``.

Every kind is calibrated the same way: its threshold and normalisation come from the
held-out normal training images (``calibration.validation_fraction``; few-shot: augmented
views of the shots) scored through the shared scoring head. Banks are filled from the
remaining training images only, so no calibration image is in the bank.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import distributed
from .bundle import load_detector, save_bundle
from .calibration import Calibration, fit_calibration, input_reference
from .config import CalibrationConfig, InferenceConfig, ModelConfig, PatchKnnConfig, TrainConfig
from .data.cache import batch_slices, load_resized
from .data.manifest import Manifest, split_validation
from .errors import UserError
from .filenames import CANDIDATES_DIR
from .inference import image_scores
from .models.fused import FusedScorer, fit_quantiles
from .models.patchknn import fit_patchknn
from .progress import track_steps
from .runtime import output_lock, resolve_device
from .scoring import ScoringHead
from .selection import SelectionSet, choose, rank_key, rank_metrics, split_test
from .train import FEW_SHOT_CALIBRATION_VIEWS, train_model



@dataclass
class FitResult:
    bundle_dir: Path
    kind: str
    selection: Optional[dict] = None
    history: list = field(default_factory=list)
    iterations: int = 0
    wall_time_s: float = 0.0
    images_per_s: float = 0.0
    checkpoint: Optional[Path] = None


# ----------------------------------------------------------------------------- helpers
def score_images(scorer: torch.nn.Module, inference: InferenceConfig, images: torch.Tensor, device: torch.device,
                 batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(blurred maps, image scores) through the shared scoring head."""
    head = ScoringHead(scorer, inference).to(device).eval()
    maps, scores = [], []
    with torch.inference_mode():
        for sl in batch_slices(images.shape[0], batch_size):
            m, s = head.maps_and_scores(images[sl].to(device))
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
    return torch.cat(maps).numpy(), torch.cat(scores).numpy()


IMAGE_SOURCES = ("fused", "patchknn", "recontrast")  # fusion.image_score's values, preferred first on a tie


def fused_source_scores(fused: FusedScorer, inference: InferenceConfig, images: torch.Tensor, device: torch.device,
                        batch_size: int = 8) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(blurred fused maps, image scores per ``fusion.image_score`` source) in one pass: the
    blur is linear, so the fused map's blur is the sum of the branches' blurs."""
    head = ScoringHead(fused, inference).to(device).eval()
    maps, scores = [], {k: [] for k in IMAGE_SOURCES}
    with torch.inference_mode():
        for sl in batch_slices(images.shape[0], batch_size):
            r, p = fused.normalised_maps(images[sl].to(device))
            br, bp = head.blur(r.float()), head.blur(p.float())
            m = br + bp
            maps.append(m.cpu())
            for src, sm in (("fused", m), ("patchknn", bp), ("recontrast", br)):
                scores[src].append(image_scores(sm, inference).float().cpu())
    return torch.cat(maps).numpy(), {k: torch.cat(v).numpy() for k, v in scores.items()}


def choose_image_source(labels: np.ndarray, by_source: dict[str, np.ndarray]) -> tuple[str, dict[str, float]]:
    """The ``fusion.image_score`` with the highest validation image AUROC (the map, hence
    AUPRO, is the same for all), and every source's AUROC."""
    from .metrics import image_auroc

    aurocs = {src: round(float(image_auroc(labels, by_source[src])), 6) for src in IMAGE_SOURCES}
    best = max(aurocs.values())
    return next(src for src in IMAGE_SOURCES if aurocs[src] >= best), aurocs


def shot_views(images: torch.Tensor, views: int, seed: int) -> torch.Tensor:
    """The images and ``views - 1`` augmented views of each (flips, +-10% brightness and
    contrast, the few-shot training augmentation in pixel units), float 0..255."""
    g = torch.Generator().manual_seed(seed)
    x = images.float()
    out = [x]
    for _ in range(views - 1):
        r = torch.rand(x.shape[0], 4, generator=g)
        b = x.shape[0]
        v = torch.where((r[:, 0] < 0.5).view(b, 1, 1, 1), x.flip(-1), x)
        v = torch.where((r[:, 1] < 0.5).view(b, 1, 1, 1), v.flip(-2), v)
        mean = v.mean(dim=(1, 2, 3), keepdim=True)
        v = (v - mean) * (0.9 + 0.2 * r[:, 2]).view(b, 1, 1, 1) + mean + (r[:, 3] - 0.5).view(b, 1, 1, 1) * 0.1 * 255
        out.append(v.clamp(0, 255))
    return torch.cat(out)


class ImagesBySize:
    """Resized images of a manifest part, loaded once per size."""

    def __init__(self, rows: Manifest, cache_dir, progress: bool):
        self.rows, self.cache_dir, self.progress, self._by_size = rows, cache_dir, progress, {}

    def at(self, size: int) -> torch.Tensor:
        if size not in self._by_size:
            self._by_size[size] = load_resized(self.rows, size, with_masks=False, progress=self.progress,
                                               cache_dir=self.cache_dir).images
        return self._by_size[size]


class _CalibrationImages:
    """What thresholds and fusion quantiles are fitted on: the held-out normals, or (few-shot,
    nothing held out) augmented views of the shots."""

    def __init__(self, held: "ImagesBySize", shots: "ImagesBySize", use_views: bool, seed: int):
        self.held, self.shots, self.use_views, self.seed = held, shots, use_views, seed

    def at(self, size: int) -> torch.Tensor:
        if self.use_views:
            return shot_views(self.shots.at(size), FEW_SHOT_CALIBRATION_VIEWS, self.seed + 1)
        return self.held.at(size)

    def describe(self) -> dict:
        """The bundle's training-summary fields, as :func:`recontrast_core.train.train_model` writes them."""
        if self.use_views:
            return {"n_calibration_images": len(self.shots.rows), "calibration_views": FEW_SHOT_CALIBRATION_VIEWS,
                    "calibration_set": "augmented views of the shots"}
        return {"n_calibration_images": len(self.held.rows), "calibration_views": 1,
                "calibration_set": "held-out normal training images"}


def calibrate(scorer, inference: InferenceConfig, images: torch.Tensor, calibration: CalibrationConfig,
              device: torch.device) -> Calibration:
    _, scores = score_images(scorer, inference, images, device)
    return fit_calibration(scores, None, target_fpr=calibration.target_fpr)


def _input_reference(normal_train: Manifest, trained, progress: bool) -> Optional[dict]:
    """The training images' input statistics (the drift monitor's reference): the trained
    ReContrast detector's where it has them (same images), else measured now."""
    ref = getattr(getattr(trained, "calibration", None), "reference", None) or {}
    if ref.get("input"):
        return ref["input"]
    return input_reference([normal_train.source(e.path) for e in normal_train.entries], progress)


# ----------------------------------------------------------------------------- the grid
def grid_settings(model: ModelConfig) -> list[PatchKnnConfig]:
    """The training-free grid of ``model.auto``, on top of ``model.patchknn``'s other settings."""
    auto = model.auto
    return [model.patchknn.model_copy(update={"backbone": b, "image_size": s, "input_stats": st})
            for b, s, st in itertools.product(auto.backbones, auto.image_sizes, auto.input_stats)]


def run_grid(model: ModelConfig, fit_images: Callable[[int], torch.Tensor], selection: SelectionSet,
             inference: InferenceConfig, device: torch.device, progress: bool = True,
             log: Callable[[str], None] = lambda _: None) -> tuple[PatchKnnConfig, list[dict], torch.nn.Module]:
    """Fit every grid setting with ``auto.grid_fraction`` of the patches and rank it on the
    validation split (the fast search: ranking only); returns (the best setting, one record
    per setting, the best setting's fitted scorer)."""
    records, best, best_key, best_scorer = [], None, None, None
    settings = grid_settings(model)
    with track_steps("auto: training-free grid", len(settings), enabled=progress) as bar:
        for pk in settings:
            t0 = time.perf_counter()
            ranking = pk.model_copy(update={"sampler": "random", "fraction": model.auto.grid_fraction})
            scorer = fit_patchknn(fit_images(pk.image_size), ranking, device)
            scorer.fast_search = True
            images, labels, masks = selection.at(pk.image_size)
            maps, scores = score_images(scorer, inference, images, device)
            metrics = rank_metrics(labels, scores, masks, maps, pixel=False)
            rec = {"backbone": pk.backbone, "image_size": pk.image_size, "input_stats": pk.input_stats,
                   **metrics, "wall_time_s": round(time.perf_counter() - t0, 2)}
            records.append(rec)
            log(f"grid {pk.backbone} {pk.image_size}px stats={pk.input_stats}: image AUROC {metrics['image_auroc']:.4f}")
            if best_key is None or rank_key(metrics) > best_key:
                best, best_key, best_scorer = pk, rank_key(metrics), scorer
            bar.advance(1, info=f"{pk.backbone.replace('tf_efficientnet_', '')} {pk.image_size} {pk.input_stats}")
            del scorer
    return best, records, best_scorer


# ----------------------------------------------------------------------------- fit
def _fit_detector(
    manifest: Manifest,
    model: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    init_encoder: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    calibration: CalibrationConfig = CalibrationConfig(),
    inference: InferenceConfig = InferenceConfig(),
    cache_dir: Optional[Path] = None,
    few_shot: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> FitResult:
    """Fit ``model.kind`` on the manifest's normal training images; the bundle is
    ``out_dir/bundle`` (module doc). ``auto`` and ``fused`` train ReContrast as ``recontrast``
    does (checkpoints in ``out_dir/checkpoints``, so ``resume`` works the same) and keep its
    bundle as the candidate ``out_dir/candidates/recontrast``."""
    out_dir = Path(out_dir)
    kind = model.kind
    train_kw = dict(init_encoder=init_encoder, resume=resume, progress=progress, calibration=calibration,
                    inference=inference, cache_dir=cache_dir, few_shot=few_shot)
    if kind == "recontrast":
        r = train_model(manifest, cfg, out_dir, **train_kw)
        return FitResult(r.bundle_dir, kind, None, r.history, r.iterations, r.wall_time_s, r.images_per_s, r.checkpoint)

    t_start = time.perf_counter()
    normal_train = manifest.select(split="train", label=0)
    if len(normal_train) == 0:
        raise UserError(f"{manifest.root}: no normal training images in the manifest")
    if few_shot:
        fit, held = normal_train, normal_train.subset([])
    else:
        fit, held = split_validation(normal_train, calibration.validation_fraction, cfg.seed)
    trained = None
    wants_recontrast = kind == "fused" or (kind == "auto" and any(k in model.auto.kinds for k in ("recontrast", "fused")))
    if wants_recontrast:
        t0 = time.perf_counter()
        trained = train_model(manifest, cfg, out_dir, bundle_dir=out_dir / CANDIDATES_DIR / "recontrast", **train_kw)
        recontrast_s = time.perf_counter() - t0
    if not distributed.is_main_process():  # under torchrun rank 0 alone fits, selects and writes
        return FitResult(out_dir / "bundle", kind)

    device = resolve_device(cfg.device)
    fit_images = ImagesBySize(fit, cache_dir, progress)
    calib_images = _CalibrationImages(ImagesBySize(held, cache_dir, progress), fit_images,
                                      use_views=few_shot or len(held) == 0, seed=cfg.seed)
    if init_encoder and kind != "recontrast":
        log("the patch-kNN bank uses the backbone's ImageNet weights; the adapted encoder is ReContrast's")
    candidate = load_detector(trained.bundle_dir, str(device)) if trained is not None else None
    rc_scorer = candidate.scorer if candidate is not None else None
    selection = None
    if kind == "auto":
        halves = split_test(manifest)
        sel = SelectionSet(halves, held if len(held) else fit, cache_dir)
        t0 = time.perf_counter()
        best_pk, grid, pk_scorer = run_grid(model, fit_images.at, sel, inference, device, progress, log)
        grid_s = time.perf_counter() - t0
        candidates: dict[str, dict] = {}
        scorers: dict[str, torch.nn.Module] = {}
        t0 = time.perf_counter()
        if (best_pk.sampler, best_pk.fraction) != ("random", model.auto.grid_fraction):  # refit the winner
            pk_scorer = fit_patchknn(fit_images.at(best_pk.image_size), best_pk, device)
            pk_scorer.fast_search = True
        if "patchknn" in model.auto.kinds or "fused" in model.auto.kinds:
            scorers["patchknn"] = pk_scorer
        if rc_scorer is not None and "recontrast" in model.auto.kinds:
            scorers["recontrast"] = rc_scorer
        if rc_scorer is not None and "fused" in model.auto.kinds:
            fused = FusedScorer(rc_scorer, pk_scorer, model.fusion).to(device)
            fit_quantiles(fused, calib_images.at(fused.image_size))
            scorers["fused"] = fused
        image_sources = None
        for name, scorer in scorers.items():
            if name not in model.auto.kinds:
                continue
            images, labels, masks = sel.at(scorer.image_size)
            if name == "fused":  # its image score's source is chosen here too
                maps, by_source = fused_source_scores(scorer, inference, images, device)
                source, image_sources = choose_image_source(labels, by_source)
                scorer.fusion = scorer.fusion.model_copy(update={"image_score": source})
                scores = by_source[source]
                log(f"fused image score from {source}: " + ", ".join(f"{k} {v:.4f}" for k, v in image_sources.items()))
            else:
                maps, scores = score_images(scorer, inference, images, device)
            candidates[name] = rank_metrics(labels, scores, masks, maps)
            log(f"candidate {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in candidates[name].items()))
        chosen = choose(candidates, model.auto.tie)
        scorer = scorers[chosen]
        pk_scorer.fast_search = False  # the shipped detector searches exactly
        selection = {
            "chosen": chosen, "rule": f"image_auroc (within {model.auto.tie:g} a tie), then aupro, on the validation split",
            "validation": {**sel.describe(), **halves.describe()},
            "candidates": candidates, "grid": grid, "grid_fraction": model.auto.grid_fraction,
            "fused_image_score": ({"chosen": scorers["fused"].fusion.image_score, "image_auroc": image_sources}
                                  if image_sources else None),
            "best_training_free": best_pk.model_dump(mode="json"),
            "wall_time_s": {"recontrast": round(recontrast_s, 2) if trained else 0.0, "grid": round(grid_s, 2),
                            "candidates": round(time.perf_counter() - t0, 2)},
        }
    elif kind == "patchknn":
        scorer = fit_patchknn(fit_images.at(model.patchknn.image_size), model.patchknn, device, progress=progress)
        chosen = kind
    elif kind == "fused":
        pk_scorer = fit_patchknn(fit_images.at(model.patchknn.image_size), model.patchknn, device, progress=progress)
        scorer = FusedScorer(rc_scorer, pk_scorer, model.fusion).to(device)
        fit_quantiles(scorer, calib_images.at(scorer.image_size))
        chosen = kind
    else:  # pragma: no cover - the config's Literal forbids it
        raise UserError(f"unknown model kind {kind!r}")

    calib = calibrate(scorer, inference, calib_images.at(scorer.image_size), calibration, device)
    calib = calib.with_input_reference(_input_reference(normal_train, candidate, progress))
    train_summary = {}
    if candidate is not None:  # the ReContrast run's own summary (loss history, speed)
        train_summary = dict(candidate.meta.get("training") or {})
    train_summary.update({
        "model_kind": chosen,
        "n_train_images": len(fit),
        **calib_images.describe(),
        "fit_wall_time_s": round(time.perf_counter() - t_start, 2),
        "device": str(device),
    })
    if hasattr(scorer, "bank_size") or hasattr(scorer, "patchknn"):
        pk = scorer if hasattr(scorer, "bank_size") else scorer.patchknn
        train_summary["bank_size"] = pk.bank_size
    bundle = save_bundle(out_dir / "bundle", scorer, cfg if chosen != "patchknn" else None, inference, calib,
                         dataset_fingerprint=manifest.fingerprint, training=train_summary, selection=selection)
    r = trained
    return FitResult(bundle, chosen, selection, r.history if r else [], r.iterations if r else 0,
                     r.wall_time_s if r else 0.0, r.images_per_s if r else 0.0, r.checkpoint if r else None)


def fit_detector(manifest: Manifest, model: ModelConfig, cfg: TrainConfig, out_dir: Path, **kw) -> FitResult:
    """Fit ``model.kind`` into ``out_dir`` (:func:`_fit_detector`), holding the folder for this
    run: a second run into the same ``out_dir`` is refused in one line (under torchrun the
    main process holds it)."""
    if not distributed.is_main_process():
        return _fit_detector(manifest, model, cfg, out_dir, **kw)
    with output_lock(Path(out_dir), "training output folder"):
        return _fit_detector(manifest, model, cfg, out_dir, **kw)


def fuse_existing(recontrast_bundle: Path, manifest: Manifest, model: ModelConfig, out_dir: Path, *,
                  calibration: CalibrationConfig = CalibrationConfig(), device: str = "auto",
                  progress: bool = False) -> Path:
    """A ``fused`` bundle from an already trained ReContrast bundle (no retraining): the bank
    (``model.patchknn``) fitted on the same training images, quantiles and threshold on the
    same held-out normals (``calibration`` and the bundle's seed, as :func:`fit_detector`)."""
    det = load_detector(recontrast_bundle, device)
    if det.kind != "recontrast" or det.config is None:
        raise UserError(f"{recontrast_bundle}: a {det.kind} bundle; fusing needs a recontrast bundle")
    normal_train = manifest.select(split="train", label=0)
    fit, held = split_validation(normal_train, calibration.validation_fraction, det.config.seed)
    fit_images = ImagesBySize(fit, None, progress)
    calib_images = _CalibrationImages(ImagesBySize(held, None, progress), fit_images, use_views=len(held) == 0,
                                      seed=det.config.seed)
    pk = fit_patchknn(fit_images.at(model.patchknn.image_size), model.patchknn, det.device, progress=progress)
    scorer = FusedScorer(det.scorer, pk, model.fusion).to(det.device)
    fit_quantiles(scorer, calib_images.at(scorer.image_size))
    calib = calibrate(scorer, det.inference, calib_images.at(scorer.image_size), calibration, det.device)
    calib = calib.with_input_reference(_input_reference(normal_train, det, progress))
    training = {**(det.meta.get("training") or {}), "model_kind": "fused", "bank_size": pk.bank_size,
                "fused_from": str(recontrast_bundle)}
    return save_bundle(Path(out_dir) / "bundle", scorer, det.config, det.inference, calib,
                       dataset_fingerprint=manifest.fingerprint, training=training)
