"""Brute-force kNN anomaly scores (MSC's scorer) with batched ``torch.cdist``.

The score of a query is the mean squared Euclidean distance to its ``k`` nearest
neighbours in the bank of normal embeddings. MSC's reference code sums faiss
``IndexFlatL2`` distances (squared) over k=2 neighbours: the same ranking.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .embed import Embedder


def knn_scores(bank: torch.Tensor, queries: torch.Tensor, k: int = 2, batch_size: int = 1024) -> torch.Tensor:
    """``bank [N,D]``, ``queries [M,D]`` -> ``[M]`` mean squared distance to the k nearest.

    ``k`` larger than the bank is capped at its size (a 1-shot bank has one neighbour).
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be [N,D] and [M,D]")
    if bank.shape[0] == 0:
        raise ValueError("the kNN bank is empty")
    if k < 1:
        raise ValueError("k must be >= 1")
    k = min(k, bank.shape[0])
    bank = bank.float()
    out = []
    for start in range(0, queries.shape[0], batch_size):
        q = queries[start:start + batch_size].float().to(bank.device)
        d2 = torch.cdist(q, bank).pow_(2)
        out.append(d2.topk(k, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(out) if out else torch.empty(0)


class KNNScorer:
    """Fit on normal images (the bank), score images: kNN on L2-normalised embeddings."""

    def __init__(self, embedder: Embedder, k: int = 2):
        self.embedder = embedder
        self.k = int(k)
        self.bank: Optional[torch.Tensor] = None

    def fit(self, images_uint8: torch.Tensor) -> "KNNScorer":
        return self.fit_features(self.embedder.embed(images_uint8))

    def fit_features(self, features: torch.Tensor) -> "KNNScorer":
        self.bank = torch.nn.functional.normalize(features.float(), dim=1)
        return self

    def score(self, images_uint8: torch.Tensor) -> np.ndarray:
        return self.score_features(self.embedder.embed(images_uint8))

    def score_features(self, features: torch.Tensor) -> np.ndarray:
        if self.bank is None:
            raise RuntimeError("KNNScorer.fit must be called before score")
        q = torch.nn.functional.normalize(features.float(), dim=1)
        return knn_scores(self.bank, q, self.k).numpy()
