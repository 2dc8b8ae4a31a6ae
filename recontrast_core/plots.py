"""Pictures a person looks at: ROC and PR curves, image | anomaly-map overlays, and the
overlay grid of an evaluation. Matplotlib (Agg) only; no tracking here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def overlay(image_chw: np.ndarray, norm_map: np.ndarray) -> np.ndarray:
    """[image | heat-map overlay] side by side, uint8 HxWx3."""
    from matplotlib import colormaps

    rgb = image_chw.transpose(1, 2, 0).astype(np.float32)
    heat = colormaps["jet"](np.clip(norm_map, 0, 1))[..., :3] * 255.0
    blend = 0.55 * rgb + 0.45 * heat
    return np.concatenate([rgb, blend], axis=1).clip(0, 255).astype(np.uint8)


def plot_roc_pr(
    labels: Sequence[int], scores: Sequence[float], out_dir: os.PathLike, title: str = ""
) -> list[Path]:
    """Write ``roc.png`` and ``pr.png`` (matplotlib, Agg); returns the files written.

    Nothing is written when only one class is present (the curves are undefined).
    """
    plt = _pyplot()
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    if y.size == 0 or len(np.unique(y)) < 2:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = roc_curve(y, s)
    prec, rec, _ = precision_recall_curve(y, s)
    files = []
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {auc(fpr, tpr):.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {title}".strip())
    ax.legend(loc="lower right")
    fig.tight_layout()
    files.append(out / "roc.png")
    fig.savefig(files[-1])
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(rec, prec, lw=2, label=f"AP = {average_precision_score(y, s):.4f}")
    ax.axhline(y.mean(), color="k", ls="--", lw=1)
    ax.set(xlabel="recall", ylabel="precision", title=f"PR {title}".strip(), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    fig.tight_layout()
    files.append(out / "pr.png")
    fig.savefig(files[-1])
    plt.close(fig)
    return files


def overlay_grid(rows: list[dict], images, maps, calibration, path: Path, n: int = 8) -> Optional[Path]:
    """A PNG grid: up to ``n`` anomalous then ``n`` normal test images (highest scores
    first), each as [image | calibrated anomaly-map overlay] with its score in the title."""
    from .calibration import normalise

    order = sorted(range(len(rows)), key=lambda i: -rows[i]["score"])
    picks = [i for i in order if rows[i]["label"] == 1][:n] + [i for i in order if rows[i]["label"] == 0][:n]
    if not picks:
        return None
    plt = _pyplot()

    cols = 4
    nrows = (len(picks) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 3.2, nrows * 1.9), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), picks):
        tile = overlay(np.asarray(images[i]), normalise(np.asarray(maps[i]), calibration))
        ax.imshow(tile)
        r = rows[i]
        ax.set_title(f"{r['defect_type']} s={r['normalized_score']:.2f}" + (" *" if r["decision"] else ""),
                     fontsize=8, color="red" if r["label"] else "black")
    fig.suptitle("anomaly maps (red = above threshold; * = flagged)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
