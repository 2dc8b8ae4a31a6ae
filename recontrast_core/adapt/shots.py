"""The deterministic few-shot sampler."""

from __future__ import annotations

from ..data.layouts import hash_fraction
from ..data.manifest import Manifest
from ..errors import UserError


def sample_shots(manifest: Manifest, k: int, seed: int = 0) -> Manifest:
    """``k`` normal training images (``split == "train"``, ``label == 0``) of ``manifest``.

    The choice orders the candidates by ``sha1("<seed>:<path>")`` (ties by path) and keeps
    the first ``k``: deterministic for a seed, independent of row order, never a test row,
    and the same rows the pipeline's ``steps.select_shots`` keeps for that seed (so adapt
    and train see the same shots). Raises :class:`UserError` when ``k`` is not positive or
    larger than the number of normal training images.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"shots must be a positive integer, not {k!r}")
    normal = [e for e in manifest.entries if e.split == "train" and e.label == 0]
    if k > len(normal):
        raise UserError(
            f"shots={k} but {manifest.root} has only {len(normal)} normal training images"
        )
    chosen = sorted(normal, key=lambda e: (hash_fraction(e.path, seed), e.path))[:k]
    return manifest.subset(chosen)
