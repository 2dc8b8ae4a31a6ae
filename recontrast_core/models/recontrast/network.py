"""ReContrast: trainable encoder + frozen copy, fusion bottleneck, two-headed decoder.

Built from the encoder's channels (C1, C2, C3 at strides 4/8/16), so any backbone works.
For ``wide_resnet50_2`` (256/512/1024) the shapes match the published RD4AD/ReContrast
bottleneck and decoder exactly (latent 2048 @ stride 32, decoder stages of 3/4/6 blocks).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ...config import TrainConfig
from ..backbones import Encoder, create_encoder


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def kaiming_fan_out_init(*modules: nn.Module) -> None:
    """The official code's initialisation (RD4AD/ReContrast ``de_resnet``/``BN_layer``):
    Kaiming-normal fan-out weights for every ``Conv2d`` (transposed convs keep PyTorch's
    default, as there), BatchNorm weight 1 and bias 0."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


class Bottleneck(nn.Module):
    """ResNet bottleneck block; ``upsample=True`` swaps the strided 3x3 for a 2x2 transposed conv."""

    def __init__(self, cin: int, cout: int, width: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if upsample:
            self.conv2 = nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if upsample:
            self.shortcut = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout))
        elif stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class FusionBottleneck(nn.Module):
    """Brings levels 1 and 2 to level 3's resolution, concatenates, one residual stage (stride 2)."""

    def __init__(self, channels: Sequence[int], blocks: int = 3):
        super().__init__()
        c1, c2, c3 = channels
        self.level1 = nn.Sequential(_conv_bn_relu(c1, c2, 3, 2), _conv_bn_relu(c2, c3, 3, 2))
        self.level2 = _conv_bn_relu(c2, c3, 3, 2)
        latent = 2 * c3
        layers = [Bottleneck(3 * c3, latent, width=c3, stride=2)]
        layers += [Bottleneck(latent, latent, width=c3) for _ in range(blocks - 1)]
        self.stage = nn.Sequential(*layers)
        self.out_channels = latent

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([self.level1(feats[0]), self.level2(feats[1]), feats[2]], dim=1)
        return self.stage(x)


class Decoder(nn.Module):
    """Mirror of the encoder: three upsampling stages back to C3@16, C2@8, C1@4."""

    def __init__(self, latent: int, channels: Sequence[int], blocks: Sequence[int] = (3, 4, 6)):
        super().__init__()
        stages, cin = [], latent
        for cout, n in zip(reversed(channels), blocks):  # deep to shallow
            width = max(cout // 2, 8)
            layers = [Bottleneck(cin, cout, width, upsample=True)]
            layers += [Bottleneck(cout, cout, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            z = stage(z)
            outs.append(z)
        return outs[::-1]  # shallow to deep, like the encoder


class ReContrast(nn.Module):
    """Returns ``(frozen_feats, trainable_feats, head1, head2)``, three levels each.

    head1 decodes the trainable encoder's half of the batch and is compared with the
    frozen encoder's features; head2 decodes the frozen half and is compared with the
    trainable encoder's features (the "contrastive reconstruction" pairing).
    """

    def __init__(self, encoder: Encoder, frozen: Encoder, decoder_blocks=(3, 4, 6), bottleneck_blocks: int = 3,
                 init: str = "kaiming"):
        super().__init__()
        self.encoder = encoder
        self.frozen = frozen
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        channels = encoder.channels
        self.bottleneck = FusionBottleneck(channels, bottleneck_blocks)
        self.decoder = Decoder(self.bottleneck.out_channels, channels, decoder_blocks)
        self.head1 = nn.ModuleList(nn.Conv2d(c, c, 1) for c in channels)
        self.head2 = nn.ModuleList(nn.Conv2d(c, c, 1) for c in channels)
        if init == "kaiming":
            kaiming_fan_out_init(self.bottleneck, self.decoder, self.head1, self.head2)
        self.encoder_bn_train = True

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # the frozen copy never updates BN statistics
        if mode and not self.encoder_bn_train:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def decoder_parameters(self):
        for module in (self.bottleneck, self.decoder, self.head1, self.head2):
            yield from module.parameters()

    def forward(self, x: torch.Tensor):
        feats = self.encoder(x)
        with torch.no_grad():
            frozen = self.frozen(x)
        batch = x.shape[0]
        paired = [torch.cat([a, b], dim=0) for a, b in zip(feats, frozen)]
        decoded = self.decoder(self.bottleneck(paired))
        head1 = [h(d[:batch]) for h, d in zip(self.head1, decoded)]
        head2 = [h(d[batch:]) for h, d in zip(self.head2, decoded)]
        return frozen, feats, head1, head2


def build_recontrast(encoder: Encoder, frozen: Encoder, decoder_blocks=(3, 4, 6), bottleneck_blocks=3, encoder_bn="train",
                     init: str = "kaiming") -> ReContrast:
    model = ReContrast(encoder, frozen, tuple(decoder_blocks), bottleneck_blocks, init)
    model.encoder_bn_train = encoder_bn == "train"
    return model


def build_model(cfg: TrainConfig, weights: Optional[str] = None) -> ReContrast:
    """The ReContrast model a :class:`TrainConfig` describes: the encoder with its weights
    (``weights`` overrides ``cfg.backbone.weights``), its frozen copy, bottleneck, decoder."""
    backbone = cfg.backbone if weights is None else cfg.backbone.model_copy(update={"weights": weights})
    encoder = create_encoder(backbone)
    frozen = create_encoder(backbone.model_copy(update={"weights": "none"}))
    frozen.load_state_dict(encoder.state_dict())
    return build_recontrast(encoder, frozen, cfg.decoder_blocks, cfg.bottleneck_blocks, cfg.encoder_bn, cfg.decoder_init)
