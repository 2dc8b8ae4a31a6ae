"""Pictures a person looks at: ROC and PR curves, image | anomaly-map overlays, and the
overlay grid of an evaluation. Matplotlib (Agg) only; no tracking here. Every figure is
written through :func:`recontrast_core.runtime.atomic_write` (never a half-written PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from .runtime import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, **savefig_kw) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically) and close it."""
    try:
        return atomic_write(Path(path), lambda p: fig.savefig(p, format="png", **savefig_kw))
    finally:
        _pyplot().close(fig)


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
    files.append(_save(fig, out / "roc.png"))
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(rec, prec, lw=2, label=f"AP = {average_precision_score(y, s):.4f}")
    ax.axhline(y.mean(), color="k", ls="--", lw=1)
    ax.set(xlabel="recall", ylabel="precision", title=f"PR {title}".strip(), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    fig.tight_layout()
    files.append(_save(fig, out / "pr.png"))
    return files


# ----------------------------------------------------------------------------- overlay grid
# What a tile of the grid shows, by ground truth (label) and decision (score >= threshold):
# (name, frame colour, meaning). Okabe-Ito colours (told apart with colour-blindness too),
# and each tile also says its name in words.
TILE_KINDS: dict[str, tuple[str, str]] = {
    "HIT": ("#009E73", "defect, flagged"),
    "MISS": ("#D55E00", "defect, below threshold"),
    "FALSE ALARM": ("#CC79A7", "normal, flagged"),
    "OK": ("#0072B2", "normal, below threshold"),
}
MASK_OUTLINE_COLOUR = "#F0E442"  # ground-truth outline (yellow, black edge)
MaskSource = Union[Sequence[Optional[np.ndarray]], Callable[[int], Optional[np.ndarray]], None]


def tile_kind(label: int, flagged: bool) -> str:
    """``HIT`` / ``MISS`` (anomalous by ground truth) or ``FALSE ALARM`` / ``OK`` (normal)."""
    if label:
        return "HIT" if flagged else "MISS"
    return "FALSE ALARM" if flagged else "OK"


def pick_tiles(rows: Sequence[Mapping[str, Any]], n: int = 8) -> list[int]:
    """Up to ``n`` anomalous then up to ``n`` normal test images for the grid, the mistakes
    first: misses (lowest score first) then hits (highest first); false alarms (highest
    first) then correct normals (highest first, the nearest to the threshold). Mistakes
    take at most half of a group's places while there are enough of the other kind."""
    def by_score(idx, reverse=True):
        return sorted(idx, key=lambda i: (-rows[i]["score"] if reverse else rows[i]["score"], i))

    def group(wrong: list[int], right: list[int]) -> list[int]:
        k = max(min(len(wrong), (n + 1) // 2), n - len(right))
        return wrong[:k] + right[: n - min(k, len(wrong))]

    anomalous = [i for i in range(len(rows)) if rows[i]["label"] == 1]
    normal = [i for i in range(len(rows)) if rows[i]["label"] != 1]
    misses = by_score([i for i in anomalous if not rows[i]["decision"]], reverse=False)
    hits = by_score([i for i in anomalous if rows[i]["decision"]])
    alarms = by_score([i for i in normal if rows[i]["decision"]])
    oks = by_score([i for i in normal if not rows[i]["decision"]])
    return group(misses, hits) + group(alarms, oks)


def manifest_masks(manifest, rows: Sequence[Mapping[str, Any]],
                   size: int) -> Optional[Callable[[int], Optional[np.ndarray]]]:
    """``mask(i)``: the ground-truth mask of ``rows[i]`` (``bool [size, size]``, nearest
    resize) read from ``manifest`` when asked (only the tiles drawn), or None for a row
    without one; None when the manifest has no masks."""
    if manifest is None or not getattr(manifest, "has_masks", False):
        return None
    from .data.annotations import load_source_mask
    from .data.cache import resize_mask

    mask_of = {e.path: e.mask_path for e in manifest.entries if e.mask_path}
    if not mask_of:
        return None

    def mask(i: int) -> Optional[np.ndarray]:
        rel = mask_of.get(rows[i].get("path"))
        return resize_mask(load_source_mask(manifest.source(rel)), size) if rel else None

    return mask


def overlay_grid(rows: list[dict], images, maps, calibration, path: Path, n: int = 8, *,
                 masks: MaskSource = None) -> Optional[Path]:
    """A PNG grid of test images, each as [image | calibrated anomaly-map overlay]: up to
    ``n`` anomalous then ``n`` normal ones (:func:`pick_tiles`: misses and false alarms
    first). Each tile has a coloured frame and a badge saying what it is (:data:`TILE_KINDS`:
    hit, miss, false alarm, correct normal), its defect type and normalised score (the
    threshold is 0.50) in the title; ``masks`` (a sequence aligned with ``rows``, or
    ``mask(i)``; None entries for images without one) outlines the ground-truth region on
    both halves. The legend names exactly the frames and the outline drawn. Sized for
    MLflow's artifact preview (900 px wide, two tiles a row, 13-16 pt text)."""
    from matplotlib import patheffects
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .calibration import normalise

    picks = pick_tiles(rows, n)
    if not picks:
        return None
    plt = _pyplot()
    mask_of = masks if callable(masks) or masks is None else (lambda i: masks[i])

    # Two tiles a row, 9 inches at 100 dpi (900 px): MLflow's artifact preview shows it at
    # 600-1,000 px, so 14-16 pt text stays 13 px or more on screen.
    cols = 2
    nrows = (len(picks) + cols - 1) // cols
    header_in = 1.2 + 0.32 * 3  # the title, the legend (up to 3 rows) and the first tiles' titles
    fig, axes = plt.subplots(nrows, cols, figsize=(9.2, nrows * 2.62 + header_in), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    outlined = False
    counts: dict[str, int] = {k: 0 for k in TILE_KINDS}
    totals: dict[str, int] = {k: 0 for k in TILE_KINDS}
    for r in rows:
        totals[tile_kind(int(r["label"]), bool(r["decision"]))] += 1
    for ax, i in zip(axes.ravel(), picks):
        r = rows[i]
        kind = tile_kind(int(r["label"]), bool(r["decision"]))
        counts[kind] += 1
        colour = TILE_KINDS[kind][0]
        tile = overlay(np.asarray(images[i]), normalise(np.asarray(maps[i]), calibration))
        ax.axis("on")
        ax.imshow(tile, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set(edgecolor=colour, linewidth=5)
        mask = mask_of(i) if mask_of is not None and r["label"] else None
        if mask is not None and np.any(mask):
            width = tile.shape[1] // 2
            m = np.asarray(mask, dtype=float)
            for dx in (0, width):
                cs = ax.contour(np.arange(m.shape[1]) + dx, np.arange(m.shape[0]), m, levels=[0.5],
                                colors=MASK_OUTLINE_COLOUR, linewidths=1.8)
                cs.set_path_effects([patheffects.withStroke(linewidth=3.2, foreground="black")])
            ax.set_xlim(-0.5, tile.shape[1] - 0.5)
            ax.set_ylim(tile.shape[0] - 0.5, -0.5)
            outlined = True
        ax.text(0.012, 0.97, kind, transform=ax.transAxes, ha="left", va="top", fontsize=14, fontweight="bold",
                color="white", bbox={"boxstyle": "square,pad=0.25", "facecolor": colour, "edgecolor": "none"})
        ax.set_title(f"{r.get('defect_type', '')}   s = {float(r['normalized_score']):.2f}", fontsize=15, pad=5)
    def entry(kind: str) -> Patch:
        colour, meaning = TILE_KINDS[kind]
        return Patch(facecolor=colour, edgecolor=colour, label=f"{kind}: {meaning} ({counts[kind]} of {totals[kind]})")

    # defects in the legend's first column, normal images in the second
    handles = [entry(k) for k in ("HIT", "MISS") if totals[k]]
    if outlined:
        handles.append(Line2D([], [], color=MASK_OUTLINE_COLOUR, linewidth=2.5, label="ground-truth defect outline",
                              path_effects=[patheffects.withStroke(linewidth=4, foreground="black")]))
    handles += [entry(k) for k in ("FALSE ALARM", "OK") if totals[k]]
    height = fig.get_figheight()
    fig.suptitle("Test images: photo | anomaly map (blue low, red high)\n"
                 "s = normalised score; flagged (anomalous) at s >= 0.50", fontsize=16, y=1 - 0.08 / height, va="top")
    fig.legend(handles=handles, loc="upper center", ncol=2, fontsize=13.5, frameon=False, handlelength=1.5,
               columnspacing=1.2, bbox_to_anchor=(0.5, 1 - 0.72 / height))
    legend_rows = (len(handles) + 1) // 2
    fig.subplots_adjust(left=0.015, right=0.985, bottom=0.2 / height, wspace=0.05, hspace=0.24,
                        top=1 - (1.2 + 0.32 * legend_rows) / height)
    return _save(fig, Path(path))
