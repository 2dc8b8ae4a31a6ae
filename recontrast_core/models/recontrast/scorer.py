"""The ``recontrast`` scorer: the trained network's anomaly map as one module.

``forward(images)`` takes ``[N,3,S,S]`` images in 0..255 (uint8 or float), normalises them
with the encoder's statistics (``x / 255``, then ``(x - mean) / std``: the operations and
order of ``data.cache.normalize``), runs both encoders, the bottleneck and the two-headed
decoder, and returns the sum of the six ``1 - cos`` maps upsampled to ``S`` (unblurred).
"""

from __future__ import annotations

import torch
from torch import nn

from ...inference import anomaly_map
from .network import ReContrast


class ReContrastScorer(nn.Module):
    kind = "recontrast"

    def __init__(self, model: ReContrast, image_size: int):
        super().__init__()
        self.model = model
        self.image_size = int(image_size)
        self.amp_dtype = None  # bf16 autocast around the network (CUDA scoring); maps stay float32
        stats = model.encoder.stats
        self.register_buffer("mean", torch.tensor(stats.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(stats.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def refresh_stats(self) -> None:
        """Re-read the encoder's statistics (a bundle may record others than the backbone's)."""
        stats = self.model.encoder.stats
        self.mean = torch.tensor(stats.mean, dtype=torch.float32, device=self.mean.device).view(1, 3, 1, 1)
        self.std = torch.tensor(stats.std, dtype=torch.float32, device=self.std.device).view(1, 3, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(torch.float32) / 255.0 - self.mean) / self.std
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            frozen, feats, head1, head2 = self.model(x)
        return anomaly_map(frozen, feats, head1, head2, (self.image_size, self.image_size))

    def bundle_state(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def bundle_meta(self) -> dict:
        return {}
