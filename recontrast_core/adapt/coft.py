"""COFT-AD few-shot adaptation (Liao et al., "COFT-AD: Contrastive Fine-Tuning for Few-Shot
Anomaly Detection", IEEE TIP 2024): our implementation of the published outline.

Training batch (``AdaptConfig.batch_size`` images per step): ``Bn`` augmented views of the
k normal shots (every shot appears before any repeats) and ``Ba`` synthesised anomalies
(an augmented view of a random shot plus one :mod:`.synth` defect). Embeddings are the
L2-normalised global-pooled features (:class:`~recontrast_core.adapt.embed.Embedder`).

loss = L_con + lambda_pp * L_pp + lambda_np * L_np, with cosine similarities ``s``:

* ``L_con``: supervised contrastive loss with the normal views as anchors; the positives
  of an anchor are *all other normal views* (cross-instance positives: other shots as well
  as other views of the same shot); the denominator runs over every other view, normal
  and synthesised-anomalous (the negatives); temperature ``coft.temperature``.
* ``L_pp`` (positive-pair term) = mean over normal pairs of ``1 - s`` (cluster tightness).
* ``L_np`` (negative-pair term) = mean over normal/anomaly pairs of ``relu(s - np_margin)``.

Scoring (:class:`MahalanobisScorer`): a Gaussian with a Ledoit-Wolf shrinkage covariance
fitted on the L2-normalised embeddings of the shots and ``fit_views`` augmented views of
each; the score is the squared Mahalanobis distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AdaptConfig
from ..progress import track_steps
from .embed import Embedder, to_unit, trainable_parameters
from .synth import synthesize_batch
from .views import MocoViews


def coft_loss(normals: torch.Tensor, anomalies: torch.Tensor, temperature: float = 0.2, lambda_pp: float = 1.0,
              lambda_np: float = 1.0, np_margin: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``normals [Bn,D]`` (Bn >= 2), ``anomalies [Ba,D]`` -> (loss, parts) as described above."""
    if normals.ndim != 2 or normals.shape[0] < 2:
        raise ValueError("coft_loss needs at least 2 normal embeddings")
    bn = normals.shape[0]
    zn = F.normalize(normals, dim=1)
    za = F.normalize(anomalies, dim=1)
    everything = torch.cat([zn, za])
    sims = zn @ everything.t()  # [Bn, Bn+Ba]
    eye = torch.zeros_like(sims, dtype=torch.bool)
    eye[:, :bn] = torch.eye(bn, dtype=torch.bool, device=sims.device)
    logits = (sims / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = torch.zeros_like(eye)
    pos[:, :bn] = ~eye[:, :bn]
    con = -(log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1)).mean()
    off = ~torch.eye(bn, dtype=torch.bool, device=sims.device)
    pp = (1.0 - sims[:, :bn][off]).mean()
    npair = F.relu(sims[:, bn:] - np_margin).mean() if anomalies.shape[0] else sims.new_zeros(())
    loss = con + lambda_pp * pp + lambda_np * npair
    return loss, {"con": float(con.detach()), "pp": float(pp.detach()), "np": float(npair.detach())}


@dataclass
class COFTResult:
    history: list[dict] = field(default_factory=list)  # per epoch: {"epoch", "loss", "con", "pp", "np"}

    @property
    def final_loss(self) -> Optional[float]:
        return self.history[-1]["loss"] if self.history else None


def batch_split(batch_size: int, anomaly_fraction: float) -> tuple[int, int]:
    """(normal views, synthesised anomalies) per step; at least 2 normals and 1 anomaly."""
    ba = max(1, int(round(batch_size * anomaly_fraction)))
    bn = max(2, batch_size - ba)
    return bn, ba


def train_coft(embedder: Embedder, shots_uint8: torch.Tensor, cfg: AdaptConfig, *, progress: bool = True,
               generator: Optional[torch.Generator] = None) -> COFTResult:
    """Fine-tune ``embedder.encoder`` in place on ``k`` normal shots ``uint8 [k,3,S,S]``."""
    k = shots_uint8.shape[0]
    if k < 1:
        raise ValueError("COFT needs at least one normal shot")
    c = cfg.coft
    device = embedder.device
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    encoder = embedder.encoder
    encoder.eval()  # BatchNorm frozen: a few shots give no usable batch statistics
    params = trainable_parameters(encoder, cfg.freeze_levels)
    opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    views = MocoViews(shots_uint8.shape[-1], crop_scale=c.crop_scale, hflip=cfg.hflip)
    bn, ba = batch_split(cfg.batch_size, c.anomaly_fraction)
    shots01 = to_unit(shots_uint8, device)
    history: list[dict] = []
    with track_steps("coft", cfg.epochs * c.steps_per_epoch, enabled=progress) as bar:
        for epoch in range(cfg.epochs):
            sums = {"loss": 0.0, "con": 0.0, "pp": 0.0, "np": 0.0}
            for _ in range(c.steps_per_epoch):
                idx_n = torch.randperm(k, generator=gen).repeat(math.ceil(bn / k))[:bn]
                idx_a = torch.randint(0, k, (ba,), generator=gen)
                x_n = views(shots01[idx_n])
                x_a = synthesize_batch(views(shots01[idx_a]), gen, c.synth)
                z = embedder.pooled(embedder.standardize(torch.cat([x_n, x_a])))
                loss, parts = coft_loss(z[:bn], z[bn:], c.temperature, c.lambda_pp, c.lambda_np, c.np_margin)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["loss"] += float(loss.detach())
                for key, value in parts.items():
                    sums[key] += value
                bar.advance(1, info=f"epoch {epoch + 1} loss {float(loss.detach()):.4f}")
            history.append({"epoch": epoch + 1, **{key: v / c.steps_per_epoch for key, v in sums.items()}})
    for p in encoder.parameters():
        p.requires_grad_(True)
    return COFTResult(history=history)


class GaussianModel:
    """Gaussian with a Ledoit-Wolf shrinkage covariance; scores are squared Mahalanobis distances."""

    def __init__(self):
        self.mean: Optional[np.ndarray] = None
        self.precision: Optional[np.ndarray] = None
        self.shrinkage: Optional[float] = None

    def fit(self, features) -> "GaussianModel":
        from sklearn.covariance import LedoitWolf

        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError("the Gaussian needs at least 2 embeddings [N,D]")
        lw = LedoitWolf().fit(x)
        self.mean, self.precision, self.shrinkage = lw.location_, lw.precision_, float(lw.shrinkage_)
        return self

    def score(self, features) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("GaussianModel.fit must be called before score")
        d = np.asarray(features, dtype=np.float64) - self.mean
        return np.einsum("nd,de,ne->n", d, self.precision, d)


class MahalanobisScorer:
    """Fit on the shots (plus ``fit_views`` augmented views of each), score images."""

    def __init__(self, embedder: Embedder, fit_views: int = 16, crop_scale: tuple[float, float] = (0.5, 1.0),
                 seed: int = 0, hflip: bool = True):
        self.embedder = embedder
        self.fit_views = int(fit_views)
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.seed = int(seed)
        self.gaussian = GaussianModel()

    def fit(self, shots_uint8: torch.Tensor) -> "MahalanobisScorer":
        feats = [self.embedder.embed(shots_uint8)]
        if self.fit_views:
            views = MocoViews(shots_uint8.shape[-1], crop_scale=self.crop_scale, hflip=self.hflip)
            shots01 = to_unit(shots_uint8, self.embedder.device)
            state = torch.get_rng_state()
            torch.manual_seed(self.seed)  # the views draw from the global generator
            try:
                for _ in range(self.fit_views):
                    feats.append(self.embedder.embed_views(views(shots01)))
            finally:
                torch.set_rng_state(state)
        return self.fit_features(torch.cat(feats))

    def fit_features(self, features: torch.Tensor) -> "MahalanobisScorer":
        self.gaussian.fit(F.normalize(features.float(), dim=1).numpy())
        return self

    def score(self, images_uint8: torch.Tensor) -> np.ndarray:
        return self.score_features(self.embedder.embed(images_uint8))

    def score_features(self, features: torch.Tensor) -> np.ndarray:
        return self.gaussian.score(F.normalize(features.float(), dim=1).numpy())
