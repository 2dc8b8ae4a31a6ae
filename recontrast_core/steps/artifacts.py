"""The artifact contract: the files each step reads and writes, and how to find them.

==========  ====================================  ===========================================
step        reads                                 writes (in its output folder)
==========  ====================================  ===========================================
ingest      a folder, s3://bucket/prefix or a     ``manifest.json``, ``ingest.json``,
            path in a DVC repository              ``data/`` (remote sources, copy_local)
adapt       manifest                              ``encoder.safetensors`` + ``encoder.json``
                                                  (or ``adapt_skipped.json``)
train       manifest (+ adapted encoder)          ``bundle/`` (``model.safetensors``,
                                                  ``bundle.json``), ``checkpoints/last.pt``
evaluate    bundle + manifest (test split)        ``metrics.json``, ``metrics_summary.json``,
                                                  ``scores.csv``, ``plots/``
register    bundle + metrics.json (+ manifest)    the MLflow registry; ``register.json``
==========  ====================================  ===========================================

Formats: docs/contracts.md. A manifest whose dataset was materialised under the ingest
output (``data/``) stays usable when the folder moves (KFP passes artifacts between pods,
DVC caches them): :func:`load_manifest` re-anchors its root on ``<manifest dir>/data``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from ..data.manifest import Manifest
from ..errors import UserError
from ..filenames import BUNDLE_META_FILE, CANDIDATES_DIR, ENCODER_FILE, ENCODER_META_FILE, METRICS_FILE, SCORES_FILE  # noqa: F401
from ..runtime import read_json, require_complete

PathLike = Union[str, os.PathLike]

MANIFEST_FILE = "manifest.json"
INGEST_FILE = "ingest.json"
DATA_DIR = "data"
ADAPT_SKIPPED_FILE = "adapt_skipped.json"
METRICS_SUMMARY_FILE = "metrics_summary.json"  # scalar metrics only (DVC `metrics show`)
PLOTS_DIR = "plots"
SHOTS_SEED = 0  # the few-shot selection is the same in adapt and train


def manifest_file(path: PathLike) -> Path:
    """The manifest file of ``path`` (a manifest.json or an ingest output folder)."""
    p = Path(path)
    return p / MANIFEST_FILE if p.is_dir() else p


def load_manifest(path: Union[PathLike, Manifest]) -> Manifest:
    """The one way steps read a manifest: a :class:`Manifest` passes through; a path (an
    ingest output or a manifest.json) is loaded, its root re-anchored on the materialised
    ``data/`` folder beside it when the recorded root no longer exists (moved artifact)."""
    if isinstance(path, Manifest):
        return path
    mpath = manifest_file(path)
    if not mpath.is_file():
        raise UserError(f"{mpath}: manifest not found (run the ingest step first)")
    require_complete(mpath.parent, "ingest")
    manifest = Manifest.load(mpath)
    if Path(manifest.root).is_dir():
        return manifest
    info = read_json(mpath.parent / INGEST_FILE) or {}
    data_dir = info.get("data_dir")
    if data_dir and (mpath.parent / data_dir).is_dir():
        return replace(manifest, root=str((mpath.parent / data_dir).resolve()))
    raise UserError(f"{mpath}: dataset root {manifest.root} not found")


def find_bundle_dir(path: PathLike) -> Path:
    """The model bundle folder in ``path`` (itself, or the one folder below it holding
    ``bundle.json``: KFP Model artifacts and train outputs nest it; the ``candidates/``
    bundles that ``model.kind: auto`` keeps beside it do not count)."""
    p = Path(path)
    if (p / BUNDLE_META_FILE).is_file():
        return p
    hits = sorted(h for h in p.rglob(BUNDLE_META_FILE) if CANDIDATES_DIR not in h.relative_to(p).parts) \
        if p.is_dir() else []
    if len(hits) == 1:
        return hits[0].parent
    if not hits:
        raise UserError(f"{p}: no model bundle ({BUNDLE_META_FILE}) found")
    raise UserError(f"{p}: several model bundles found: {[str(h.parent) for h in hits]}")


def find_encoder(path: Optional[PathLike]) -> Optional[Path]:
    """The adapted encoder weights in ``path`` (file or adapt output folder); None when
    ``path`` is None or the adapt step was skipped."""
    if path is None or str(path) == "":
        return None
    p = Path(path)
    if p.is_file():
        return p
    require_complete(p, "adapt")
    if (p / ADAPT_SKIPPED_FILE).is_file():
        return None
    if (p / ENCODER_FILE).is_file():
        return p / ENCODER_FILE
    hits = sorted(p.rglob("*.safetensors")) if p.is_dir() else []
    if len(hits) == 1:
        return hits[0]
    raise UserError(f"{p}: no adapted encoder ({ENCODER_FILE}) found")


def select_shots(manifest: Manifest, shots: Optional[int], seed: int = SHOTS_SEED) -> Manifest:
    """Few-shot view: keep ``shots`` normal training images (the adapt step's sampler, so
    adapt and train see the same shots) and every test row. ``None``/0 = all."""
    if not shots:
        return manifest
    from ..adapt.shots import sample_shots

    keep = {e.path for e in sample_shots(manifest, shots, seed).entries}
    return manifest.subset(e for e in manifest.entries if e.split != "train" or e.path in keep)


def bundle_run_id(bundle_dir: PathLike) -> str:
    """A stable pipeline run id from the bundle's content (``bundle-<sha256[:16]>``), for
    callers without one (DVC stages): registering the same bundle twice is a no-op."""
    bundle = find_bundle_dir(bundle_dir)
    h = hashlib.sha256()
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(bundle)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "bundle-" + h.hexdigest()[:16]


def with_local_weights(cfg, out_dir: PathLike):
    """``cfg`` (a TrainConfig or AdaptConfig) with ``backbone.weights`` made local: an
    ``s3://`` URI is downloaded into ``out_dir/.weights`` first (the core reads files only)."""
    from ..mlops.storage import localize_weights

    weights = localize_weights(cfg.backbone.weights, Path(out_dir) / ".weights")
    return cfg.model_copy(update={"backbone": cfg.backbone.model_copy(update={"weights": weights})})


def bundle_metadata(cfg, bundle_dir: PathLike, artifact_path: PathLike, adapted: bool, **extra) -> dict:
    """The KFP Model artifact's metadata for a trained bundle (both train components)."""
    return {
        "framework": "recontrast",
        "backbone": cfg.train.backbone.name,
        "adapted_encoder": adapted,
        "bundle_subdir": str(Path(bundle_dir).relative_to(Path(artifact_path))),
        **extra,
    }
