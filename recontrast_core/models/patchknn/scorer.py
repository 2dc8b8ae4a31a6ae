"""The ``patchknn`` scorer: frozen backbone patches against a memory bank, as one module.

``forward(images)`` takes ``[N,3,S,S]`` images in 0..255 (uint8 or float) and returns the raw
(unblurred) anomaly map ``[N,S,S]``: per stride-8 patch the Euclidean distance to the nearest
bank row, upsampled (bilinear) to ``S``. The search is exact and written as exportable ops
(one matrix product and a min, queries and bank centred on the bank's mean to keep the
expansion ``|q|^2 - 2 q.b + |b|^2`` accurate in float32), so the ONNX/OpenVINO graph holds the
bank and searches it itself. In eager mode the queries go in chunks to bound memory; the
result is the same row for row.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import BackboneConfig, PatchKnnConfig
from ..backbones import Encoder, create_encoder

QUERY_CHUNK = 2048  # eager mode: query rows per matrix product (memory: chunk x bank rows)


@functools.lru_cache(maxsize=None)
def bf16_matmul_pays(device_type: str = "cpu") -> bool:
    """Whether a bfloat16 matrix product is at least 3x faster than float32 here (CPUs with
    AMX or AVX512-BF16 make it ~7x; elsewhere it is emulated and slower). Measured once."""
    if device_type != "cpu":
        return False
    import time

    a, b = torch.randn(512, 1024), torch.randn(1024, 2048)

    def best(x, y) -> float:
        x @ y
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            t.append(time.perf_counter() - t0)
        return min(t)

    return best(a, b) > 3.0 * best(a.bfloat16(), b.bfloat16())


def encoder_for(cfg: PatchKnnConfig, weights: str = "imagenet") -> Encoder:
    """The frozen encoder ``cfg`` names (``weights="none"`` when a bundle supplies them)."""
    return create_encoder(BackboneConfig(name=cfg.backbone, weights=weights, input_stats=cfg.input_stats))


class PatchKnnScorer(nn.Module):
    kind = "patchknn"

    def __init__(self, encoder: Encoder, cfg: PatchKnnConfig, bank: Optional[torch.Tensor] = None):
        super().__init__()
        if len(encoder.channels) < 3:
            raise ValueError("patch-kNN needs an encoder with three feature levels")
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.image_size = int(cfg.image_size)
        stats = encoder.stats
        self.register_buffer("mean", torch.tensor(stats.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(stats.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        dim = sum(encoder.channels[i] for i in cfg.levels)
        self.register_buffer("bank", torch.zeros(0, dim), persistent=False)
        self.register_buffer("centre", torch.zeros(1, dim), persistent=False)
        self.register_buffer("bank_centred", torch.zeros(dim, 0), persistent=False)  # [C, M]
        self.register_buffer("bank_sq", torch.zeros(1, 0), persistent=False)  # [1, M]
        # True: a faster approximate search for ranking settings (auto's grid), never for the
        # shipped detector's scores (bundles load with False; the export always searches exactly)
        self.fast_search = False
        if bank is not None:
            self.set_bank(bank)

    def train(self, mode: bool = True):  # frozen: BatchNorm always uses its running statistics
        return super().train(False)

    def set_bank(self, bank: torch.Tensor) -> None:
        bank = bank.detach().float().to(self.mean.device)
        self.bank = bank.contiguous()
        self.centre = bank.mean(0, keepdim=True)
        c = bank - self.centre
        self.bank_centred = c.T.contiguous()
        self.bank_sq = (c * c).sum(1).unsqueeze(0)
        self.__dict__.pop("_bank_bf16", None)

    @property
    def bank_size(self) -> int:
        return int(self.bank.shape[0])

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,S,S]`` 0..255 -> ``float32 [B, C, S/8, S/8]`` patch descriptors."""
        x = (images.to(torch.float32) / 255.0 - self.mean) / self.std
        feats = self.encoder(x)
        a, b = (feats[i].float() for i in self.cfg.levels)
        a = F.avg_pool2d(a, 3, stride=1, padding=1)
        b = F.avg_pool2d(b, 3, stride=1, padding=1)
        b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([a, b], dim=1)

    def _nearest(self, q: torch.Tensor) -> torch.Tensor:
        q = q - self.centre
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * (q @ self.bank_centred) + self.bank_sq
        return torch.sqrt(torch.clamp(d2.amin(dim=1), min=0.0))

    def _nearest_fast(self, q: torch.Tensor) -> torch.Tensor:
        """Ranking only (``fast_search``): the neighbour found by a bfloat16 product, its
        distance recomputed exactly in float32 (never below the true minimum; above it only
        when two bank rows are within bfloat16's precision of each other)."""
        q = q - self.centre
        if not hasattr(self, "_bank_bf16"):
            self._bank_bf16 = self.bank_centred.to(torch.bfloat16)
        approx = self.bank_sq - 2.0 * (q.to(torch.bfloat16) @ self._bank_bf16).float()
        idx = approx.argmin(dim=1)
        return (q - (self.bank[idx] - self.centre)).norm(dim=1)

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Distance of each row ``[Q, C]`` to its nearest bank row: ``[Q]``."""
        if self.bank_size == 0:
            raise RuntimeError("patch-kNN scorer has an empty memory bank (fit it first)")
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return self._nearest(queries)
        search = self._nearest_fast if self.fast_search and bf16_matmul_pays(queries.device.type) else self._nearest
        return torch.cat([search(queries[i:i + QUERY_CHUNK]) for i in range(0, queries.shape[0], QUERY_CHUNK)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.patch_features(images)
        b, c, h, w = f.shape
        d = self.nearest(f.permute(0, 2, 3, 1).reshape(-1, c)).view(b, 1, h, w)
        return F.interpolate(d, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False).squeeze(1)

    # -- the bundle ---------------------------------------------------------------------
    def bundle_state(self) -> dict[str, torch.Tensor]:
        state = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        state["bank"] = self.bank
        return state

    def bundle_meta(self) -> dict:
        return {"patchknn": self.cfg.model_dump(mode="json"), "bank_size": self.bank_size,
                "input_stats": {"mean": list(self.encoder.stats.mean), "std": list(self.encoder.stats.std)}}

    @classmethod
    def from_bundle(cls, meta: dict, state: dict[str, torch.Tensor]) -> "PatchKnnScorer":
        from ..backbones import InputStats

        cfg = PatchKnnConfig.model_validate(meta["patchknn"])
        encoder = encoder_for(cfg, weights="none")
        stats = meta.get("input_stats")
        if stats:
            encoder.stats = InputStats(tuple(stats["mean"]), tuple(stats["std"]))
        enc_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        encoder.load_state_dict(enc_state, strict=True)
        if "bank" not in state:
            raise KeyError("bank")
        return cls(encoder, cfg, state["bank"])


@torch.no_grad()
def fit_patchknn(images_uint8: torch.Tensor, cfg: PatchKnnConfig, device: torch.device,
                 encoder: Optional[Encoder] = None, fraction: Optional[float] = None,
                 progress: bool = False) -> PatchKnnScorer:
    """Fit the bank on normal ``uint8 [N,3,S,S]`` images (``S = cfg.image_size``); one pass.
    ``encoder``: an encoder to use instead of the one ``cfg`` names (e.g. an adapted one)."""
    from ...data.cache import batch_slices
    from ...progress import track_steps
    from .bank import subsample

    if images_uint8.shape[0] == 0:
        raise ValueError("patch-kNN needs at least one normal training image")
    scorer = PatchKnnScorer(encoder if encoder is not None else encoder_for(cfg), cfg).to(device)
    rows = []
    with track_steps("fit patch-kNN bank", images_uint8.shape[0], enabled=progress) as bar:
        for sl in batch_slices(images_uint8.shape[0], cfg.batch_size):
            f = scorer.patch_features(images_uint8[sl].to(device))
            rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
            bar.advance(sl.stop - sl.start)
    patches = torch.cat(rows)
    scorer.n_train_patches = int(patches.shape[0])
    scorer.set_bank(subsample(patches, cfg.sampler, cfg.fraction if fraction is None else fraction, cfg.seed,
                              cfg.projection_dim))
    return scorer
