"""The memory bank: subsampling rules and exact nearest-neighbour distances."""

from __future__ import annotations

import torch

from ...data.cache import batch_slices


def nearest_distances(bank: torch.Tensor, queries: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest bank row: ``[Q]`` float32.

    The nearest row is found with chunked ``|b|^2 - 2 q.b`` (one matrix product; memory
    ``chunk x len(bank)``), then its distance is recomputed exactly as ``|q - b|``, which
    avoids the expansion's cancellation error for near-identical rows."""
    bank = bank.float()
    b2 = (bank * bank).sum(1)
    out = []
    for sl in batch_slices(queries.shape[0], chunk):
        q = queries[sl].float()
        nearest = (b2.unsqueeze(0) - 2.0 * q @ bank.T).argmin(dim=1)
        out.append((q - bank[nearest]).norm(dim=1))
    return torch.cat(out) if out else torch.empty(0)


def random_subsample(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of a seeded random ``fraction`` of ``n`` rows (at least one)."""
    k = max(1, int(round(n * fraction)))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def greedy_coreset(features: torch.Tensor, fraction: float, seed: int = 0, projection_dim: int = 128) -> torch.Tensor:
    """PatchCore's greedy k-center selection on a seeded random projection of ``features``.

    Each step adds the row farthest from the rows chosen so far; the running distance to the
    chosen set is updated with one matrix-vector product per step (``|x|^2 - 2 x.c + |c|^2``
    on the projected rows), so 1% of 300,000 patches takes seconds, not minutes."""
    n = features.shape[0]
    k = max(1, int(round(n * fraction)))
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim and x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=g) / projection_dim**0.5
        x = x @ proj.to(x.device)
    x = x - x.mean(0, keepdim=True)  # smaller norms: a more accurate expansion
    x2 = (x * x).sum(1)
    first = int(torch.randint(0, n, (1,), generator=g))
    chosen = [first]
    mind = torch.clamp(x2 - 2.0 * (x @ x[first]) + x2[first], min=0.0)
    for _ in range(k - 1):
        nxt = int(mind.argmax())
        chosen.append(nxt)
        mind = torch.minimum(mind, torch.clamp(x2 - 2.0 * (x @ x[nxt]) + x2[nxt], min=0.0))
    return torch.tensor(sorted(set(chosen)))


def subsample(patches: torch.Tensor, sampler: str, fraction: float, seed: int, projection_dim: int) -> torch.Tensor:
    """The bank rows of ``patches`` [P, C] that ``sampler`` keeps."""
    if sampler == "coreset":
        idx = greedy_coreset(patches, fraction, seed, projection_dim)
    elif sampler == "random":
        idx = random_subsample(patches.shape[0], fraction, seed)
    else:
        raise ValueError(f"sampler must be 'random' or 'coreset', not {sampler!r}")
    return patches[idx.to(patches.device)].contiguous()
