"""The evaluation's overlay grid: which tiles, how each is marked (hit, miss, false alarm,
correct normal), the ground-truth outline, the legend, and the atomic write."""

from __future__ import annotations

import numpy as np
import pytest

from recontrast_core import plots
from recontrast_core.calibration import Calibration
from recontrast_core.plots import TILE_KINDS, overlay_grid, pick_tiles, tile_kind

CALIB = Calibration(threshold=1.0, lo=0.0, hi=2.0, method="f1", target_fpr=None, n_normal=10, n_anomalous=4)
S = 32


def _rows(spec):
    """``spec``: (label, score) pairs -> per-image rows as evaluation writes them."""
    return [{"path": f"test/{'crack' if y else 'good'}/{i}.png", "label": y, "defect_type": "crack" if y else "good",
             "score": s, "normalized_score": min(s / 2, 1.0), "decision": s >= CALIB.threshold}
            for i, (y, s) in enumerate(spec)]


def _data(rows):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (len(rows), 3, S, S), dtype=np.uint8)
    maps = np.stack([np.full((S, S), r["score"], np.float32) for r in rows])
    return images, maps


def test_tile_kinds():
    assert tile_kind(1, True) == "HIT" and tile_kind(1, False) == "MISS"
    assert tile_kind(0, True) == "FALSE ALARM" and tile_kind(0, False) == "OK"
    assert len({colour for colour, _ in TILE_KINDS.values()}) == 4  # four frames told apart


def test_picks_show_the_mistakes_first():
    # anomalous: hits 1.9, 1.7, 1.5, 1.3; misses 0.2, 0.6; normal: alarms 1.2; oks 0.9, 0.5, 0.1
    rows = _rows([(1, 1.9), (1, 0.2), (1, 1.7), (1, 0.6), (1, 1.5), (1, 1.3),
                  (0, 0.5), (0, 1.2), (0, 0.9), (0, 0.1)])
    picks = pick_tiles(rows, n=4)
    kinds = [tile_kind(rows[i]["label"], rows[i]["decision"]) for i in picks]
    assert kinds == ["MISS", "MISS", "HIT", "HIT", "FALSE ALARM", "OK", "OK", "OK"]
    assert [rows[i]["score"] for i in picks] == [0.2, 0.6, 1.9, 1.7, 1.2, 0.9, 0.5, 0.1]
    # many misses: they take half of the places while hits can fill the rest...
    rows = _rows([(1, 0.1 * k) for k in range(6)] + [(1, 1.5), (1, 1.6), (1, 1.7)])
    kinds = [tile_kind(1, rows[i]["decision"]) for i in pick_tiles(rows, n=4)]
    assert kinds == ["MISS", "MISS", "HIT", "HIT"]
    # ...and all of them when there are too few hits
    rows = _rows([(1, 0.1 * k) for k in range(6)] + [(1, 1.5)])
    kinds = [tile_kind(1, rows[i]["decision"]) for i in pick_tiles(rows, n=4)]
    assert kinds == ["MISS", "MISS", "MISS", "HIT"]
    assert pick_tiles(rows, n=0) == [] and pick_tiles([], n=8) == []


class _Recorder:
    """Captures the figure overlay_grid saves (its legend, badges, contours)."""

    def __init__(self, monkeypatch):
        self.figs = []
        real = plots._save

        def save(fig, path, **kw):
            self.figs.append(_describe(fig))
            return real(fig, path, **kw)

        monkeypatch.setattr(plots, "_save", save)


def _describe(fig):
    legend = fig.legends[0]
    badges, frames, contours = [], [], 0
    for ax in fig.axes:
        if not ax.images:
            continue
        badge = next(t for t in ax.texts if t.get_text() in TILE_KINDS)
        badges.append((badge.get_text(), badge.get_bbox_patch().get_facecolor()))
        frames.append(ax.spines["top"].get_edgecolor())
        contours += len([c for c in ax.collections if c.__class__.__name__ == "QuadContourSet"])
    entries = [(t.get_text(), h.get_facecolor() if hasattr(h, "get_facecolor") else h.get_color())
               for t, h in zip(legend.get_texts(), legend.legend_handles)]
    return {"legend": entries, "badges": badges, "frames": frames, "contours": contours,
            "title_sizes": [ax.title.get_fontsize() for ax in fig.axes if ax.images]}


def test_grid_marks_each_tile_and_the_legend_matches(tmp_path, monkeypatch):
    from matplotlib.colors import to_rgba

    rec = _Recorder(monkeypatch)
    rows = _rows([(1, 1.8), (1, 0.4), (0, 1.3), (0, 0.3), (0, 0.2)])
    images, maps = _data(rows)
    masks = [np.zeros((S, S), bool) for _ in rows]
    masks[0][8:20, 10:22] = True
    masks[1][2:6, 2:30] = True
    out = overlay_grid(rows, images, maps, CALIB, tmp_path / "plots" / "overlay_grid.png", n=8, masks=masks)
    assert out == tmp_path / "plots" / "overlay_grid.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["overlay_grid.png"]  # no temporary file left
    fig = rec.figs[0]
    assert [b[0] for b in fig["badges"]] == ["MISS", "HIT", "FALSE ALARM", "OK", "OK"]
    # each tile's frame and badge have its kind's colour, and the legend the same colour and name
    for (kind, face), frame in zip(fig["badges"], fig["frames"]):
        assert face == to_rgba(TILE_KINDS[kind][0]) == frame
    legend = dict(fig["legend"])
    for kind, (colour, meaning) in TILE_KINDS.items():
        label = next(text for text in legend if text.startswith(kind + ":"))
        assert meaning in label and legend[label] == to_rgba(colour)
    assert "MISS: defect, below threshold (1 of 1)" in legend and "OK: normal, below threshold (2 of 2)" in legend
    # the outline: both halves of each anomalous tile with a mask, and a legend entry for it
    assert fig["contours"] == 4
    assert "ground-truth defect outline" in legend
    assert min(fig["title_sizes"]) >= 12  # readable when MLflow's preview scales the PNG down
    from PIL import Image

    with Image.open(out) as im:
        assert 800 <= im.width <= 1000  # shown near its own size in the preview


def test_grid_without_masks_or_anomalies_has_no_outline_entry(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    rows = _rows([(0, 1.3), (0, 0.3)])  # normal-only evaluation data
    images, maps = _data(rows)
    assert overlay_grid(rows, images, maps, CALIB, tmp_path / "g.png", masks=None) is not None
    fig = rec.figs[0]
    assert [text for text, _ in fig["legend"]] == ["FALSE ALARM: normal, flagged (1 of 1)",
                                                  "OK: normal, below threshold (1 of 1)"]
    assert fig["contours"] == 0


def test_manifest_masks_reads_only_what_is_drawn(tmp_path):
    from PIL import Image

    from recontrast_core.data.manifest import Manifest, ManifestEntry

    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:40] = 255
    (tmp_path / "m.png").parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(tmp_path / "m.png")
    entries = [ManifestEntry(path="test/crack/a.png", label=1, defect_type="crack", mask_path="m.png", split="test"),
               ManifestEntry(path="test/good/b.png", label=0, defect_type="good", split="test")]
    manifest = Manifest(root=str(tmp_path), entries=entries, has_masks=True)
    rows = [{"path": "test/good/b.png"}, {"path": "test/crack/a.png"}]
    get = plots.manifest_masks(manifest, rows, 32)
    assert get(0) is None
    m = get(1)
    assert m.shape == (32, 32) and m.dtype == bool and m[5:15, 10:20].all() and not m[:5].any()
    assert plots.manifest_masks(Manifest(root=str(tmp_path), entries=entries[1:], has_masks=False), rows, 32) is None


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    """A full disk mid-write leaves no PNG and no temporary file (runtime.atomic_write)."""
    from recontrast_core import runtime

    rows = _rows([(1, 1.8), (0, 0.3)])
    images, maps = _data(rows)
    runtime.reset_write_points()
    monkeypatch.setenv(runtime.FAILPOINT_ENOSPC_ENV, "1")
    with pytest.raises(Exception, match="no space left on device"):
        overlay_grid(rows, images, maps, CALIB, tmp_path / "g.png")
    assert list(tmp_path.iterdir()) == []
    runtime.reset_write_points()
    monkeypatch.setenv(runtime.FAILPOINT_ENOSPC_ENV, "2")
    with pytest.raises(Exception, match="no space left on device"):
        plots.plot_roc_pr([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], tmp_path / "curves")
    assert [p.name for p in (tmp_path / "curves").iterdir()] == ["roc.png"]  # the second write failed whole
    runtime.reset_write_points()
