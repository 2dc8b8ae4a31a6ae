"""Choosing settings without touching the numbers we report: the validation split.

When the test split has labelled anomalies, it is cut in two by a fixed rule: an image is in
the **validation half** when the SHA-1 of its file name is even (the rule
``benchmarks/cpu_profile.py`` has used since the CPU profile was chosen), else in the
**report half**. Model kinds, the training-free grid and the baseline's setting are chosen
on the validation half; evaluation, the registry's gate and promotion use only the report
half. When the test split has no anomalies, or too few images for both halves to hold
normal and anomalous ones, the validation set is the held-out normal training images plus
one synthesised anomaly of each (COFT-AD's cut-paste / scar / noise synthesiser, seeded),
and the report set is the whole test split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data.manifest import Manifest

SYNTHETIC_SEED = 0


def in_validation_half(path: str) -> bool:
    return int(hashlib.sha1(Path(path).name.encode()).hexdigest(), 16) % 2 == 0


@dataclass
class Halves:
    validation: Optional[Manifest]  # None: validation on synthesised anomalies instead
    report: Manifest
    rule: str  # "hash half" | "synthetic"
    note: str

    def describe(self) -> dict:
        out = {"rule": self.rule, "note": self.note, "n_report": len(self.report),
               "n_report_anomalous": int(sum(self.report.labels))}
        if self.validation is not None:
            out.update(n_validation=len(self.validation), n_validation_anomalous=int(sum(self.validation.labels)))
        return out


def split_test(manifest: Manifest) -> Halves:
    """The validation and report halves of ``manifest``'s test split (module doc)."""
    test = manifest.select(split="test")
    labels = set(test.labels)
    if labels != {0, 1}:
        return Halves(None, test, "synthetic",
                      "no labelled anomalies in the test split: candidates are ranked on held-out normal "
                      "training images against synthesised anomalies; the whole test split is reported")
    val = [e for e in test.entries if in_validation_half(e.path)]
    rep = [e for e in test.entries if not in_validation_half(e.path)]
    if not all({e.label for e in half} == {0, 1} for half in (val, rep)):
        return Halves(None, test, "synthetic",
                      "too few labelled test images to halve (a half would miss normal or anomalous images): "
                      "candidates are ranked on synthesised anomalies; the whole test split is reported")
    return Halves(test.subset(val), test.subset(rep), "hash half",
                  f"validation half ({len(val)} of {len(test)} test images, sha1 of the file name even) chose the "
                  f"settings; metrics are on the other {len(rep)}")


class SelectionSet:
    """The images candidates are ranked on, at any resolution (cached per size):
    ``at(size) -> (uint8 [N,3,S,S], labels [N], masks [N,S,S] or None)``."""

    def __init__(self, halves: Halves, heldout_normals: Manifest, cache_dir=None, progress: bool = False):
        self.halves, self.heldout, self.cache_dir, self.progress = halves, heldout_normals, cache_dir, progress
        self._cache: dict[int, tuple] = {}
        if halves.validation is None and len(heldout_normals) == 0:
            raise ValueError("no validation data: the test split cannot be halved and no normal image is held out")

    @property
    def synthetic(self) -> bool:
        return self.halves.validation is None

    def describe(self) -> dict:
        if self.synthetic:
            return {"source": "synthetic", "n_images": 2 * len(self.heldout), "n_anomalous": len(self.heldout)}
        v = self.halves.validation
        return {"source": "validation half of the test split", "n_images": len(v), "n_anomalous": int(sum(v.labels))}

    def at(self, size: int) -> tuple[torch.Tensor, np.ndarray, Optional[np.ndarray]]:
        if size not in self._cache:
            from .data.cache import load_resized

            if self.synthetic:
                from .adapt.synth import synthesize

                normal, _, _ = load_resized(self.heldout, size, with_masks=False, cache_dir=self.cache_dir)
                gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
                made = [synthesize(img, gen)[:2] for img in normal]
                images = torch.cat([normal, torch.stack([m[0] for m in made])])
                masks = np.concatenate([np.zeros((len(normal), size, size), bool),
                                        np.stack([m[1].cpu().numpy().astype(bool) for m in made])])
                labels = np.concatenate([np.zeros(len(normal), int), np.ones(len(made), int)])
                self._cache[size] = (images, labels, masks)
            else:
                v = self.halves.validation
                with_masks = bool(v.has_masks)
                images, masks, _ = load_resized(v, size, with_masks=with_masks, cache_dir=self.cache_dir)
                masks_np = masks.numpy() if with_masks and masks is not None and masks.numpy().any() else None
                self._cache[size] = (images, np.asarray(v.labels), masks_np)
        return self._cache[size]


def rank_metrics(labels: np.ndarray, scores: np.ndarray, masks: Optional[np.ndarray], maps: Optional[np.ndarray],
                 pixel: bool = True) -> dict[str, float]:
    """``image_auroc`` (+ ``pixel_auroc`` and ``aupro`` with masks and ``pixel``)."""
    from .metrics import aupro, image_auroc, pixel_auroc

    out = {"image_auroc": round(float(image_auroc(labels, scores)), 6)}
    if pixel and masks is not None and maps is not None:
        out["pixel_auroc"] = round(float(pixel_auroc(masks, maps)), 6)
        out["aupro"] = round(float(aupro(masks, maps)), 6)
    return out


def rank_key(metrics: dict) -> tuple[float, float]:
    """Best first when sorted descending: image AUROC, then AUPRO (absent: lowest)."""
    return (metrics.get("image_auroc", float("-inf")), metrics.get("aupro", float("-inf")))


def choose(candidates: dict[str, dict], tie: float = 0.005) -> str:
    """The candidate to ship: the highest image AUROC; among those within ``tie`` of it
    (a difference that one or two swapped image pairs make on ~200 validation images), the
    highest AUPRO (then the higher image AUROC)."""
    top = max(c.get("image_auroc", float("-inf")) for c in candidates.values())
    close = [k for k, c in candidates.items() if c.get("image_auroc", float("-inf")) >= top - tie - 1e-12]
    return max(close, key=lambda k: (candidates[k].get("aupro", float("-inf")), candidates[k].get("image_auroc")))
