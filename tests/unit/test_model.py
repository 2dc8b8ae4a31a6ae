"""ReContrast model shapes per backbone, the frozen copy, and the encoder BN setting."""

import pytest
import torch

from recontrast_core.models import build_model
from recontrast_core.config import BackboneConfig, TrainConfig
from recontrast_core.errors import UserError, WeightsUnavailableError
from recontrast_core.models.backbones import create_encoder, map_lukemelas_lite_keys


@pytest.mark.parametrize(
    "name, channels",
    [("tf_efficientnet_lite0", [144, 240, 672]), ("resnet18", [64, 128, 256]), ("wide_resnet50_2", [256, 512, 1024])],
)
def test_output_shapes_per_backbone(name, channels):
    cfg = TrainConfig(backbone=BackboneConfig(name=name, weights="none"), image_size=64, decoder_blocks=(1, 1, 1), bottleneck_blocks=1)
    model = build_model(cfg).eval()
    frozen, feats, head1, head2 = model(torch.randn(2, 3, 64, 64))
    for group in (frozen, feats, head1, head2):
        assert [t.shape[1] for t in group] == channels
        assert [t.shape[-1] for t in group] == [16, 8, 4]  # strides 4/8/16
        assert all(t.shape[0] == 2 for t in group)


def test_lite0_bottleneck_taps_are_block_outputs():
    enc = create_encoder(BackboneConfig(weights="none", feature_location="bottleneck"))
    assert enc.channels == [24, 40, 112]


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite_imagenet_weights_load_strictly_and_reach_the_encoder(name):
    import timm

    from recontrast_core.models.backbones import REGISTRY

    full = timm.create_model(name, pretrained=False)
    full.load_state_dict(REGISTRY[name].imagenet_loader(), strict=True)  # the key map is complete
    enc = create_encoder(BackboneConfig(name=name))  # imagenet default, offline
    # the encoder's stem must carry the packaged weights, not a random init
    assert torch.equal(enc.body.conv_stem.weight, full.conv_stem.weight)


def test_key_map_covers_every_block_kind():
    raw = {
        "_conv_stem.weight": 1, "_bn0.weight": 2,
        "_blocks.0._depthwise_conv.weight": 3, "_blocks.0._project_conv.weight": 4,
        "_blocks.1._expand_conv.weight": 5, "_blocks.1._bn2.bias": 6,
        "_blocks.15._project_conv.weight": 7, "_fc.bias": 8,
    }
    mapped = map_lukemelas_lite_keys(raw)
    assert mapped == {
        "conv_stem.weight": 1, "bn1.weight": 2,
        "blocks.0.0.conv_dw.weight": 3, "blocks.0.0.conv_pw.weight": 4,
        "blocks.1.0.conv_pw.weight": 5, "blocks.1.0.bn3.bias": 6,
        "blocks.6.0.conv_pwl.weight": 7, "classifier.bias": 8,
    }


def test_unreachable_weights_are_an_error_never_random(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="could not be downloaded"):
        create_encoder(BackboneConfig(name="resnet18", weights="imagenet"))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_encoder(BackboneConfig(name="resnet18", weights=str(tmp_path / "missing.pth")))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsUnavailableError, match="missing"):
        create_encoder(BackboneConfig(name="resnet18", weights=str(wrong)))
    with pytest.raises(UserError, match="not a timm model"):
        create_encoder(BackboneConfig(name="no_such_net", weights="none"))


def test_local_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = create_encoder(BackboneConfig(name="resnet18", weights="none"))
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.body.state_dict().items()}, str(path))
    enc = create_encoder(BackboneConfig(name="resnet18", weights=str(path)))
    for k, v in src.body.state_dict().items():
        assert torch.equal(v, enc.body.state_dict()[k]), k


def test_frozen_copy_is_frozen_and_starts_equal():
    cfg = TrainConfig(image_size=64, decoder_blocks=(1, 1, 1), bottleneck_blocks=1)
    model = build_model(cfg, weights="none")
    for (k, a), (_, b) in zip(model.encoder.state_dict().items(), model.frozen.state_dict().items()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in model.frozen.parameters())
    model.train()
    assert not model.frozen.training and model.encoder.training


def test_encoder_bn_eval_setting_keeps_running_stats():
    cfg = TrainConfig(image_size=64, decoder_blocks=(1, 1, 1), bottleneck_blocks=1, encoder_bn="eval")
    model = build_model(cfg, weights="none")
    model.train()
    bn = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not bn.training and torch.equal(bn.running_mean, before)


def test_kaiming_fan_out_initialisation_of_decoder_side():
    """Bottleneck, decoder and heads start as in the official code: Conv2d weights with
    std sqrt(2 / fan_out), BatchNorm 1/0; the encoders are untouched."""
    import math

    from torch import nn

    from recontrast_core.config import BackboneConfig, TrainConfig
    from recontrast_core.models import build_model

    torch.manual_seed(0)
    model = build_model(TrainConfig(backbone=BackboneConfig(weights="none"), decoder_blocks=(1, 1, 1), bottleneck_blocks=1))
    convs = [m for part in (model.bottleneck, model.decoder, model.head1, model.head2) for m in part.modules()
             if isinstance(m, nn.Conv2d)]
    assert len(convs) > 10
    big = [c for c in convs if c.weight.numel() >= 20_000]
    for c in big:
        fan_out = c.out_channels * c.kernel_size[0] * c.kernel_size[1]
        assert c.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.08)
    bns = [m for part in (model.bottleneck, model.decoder) for m in part.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    # a default-initialised Conv2d (kaiming uniform, a=sqrt(5)) has std 1/sqrt(3 fan_in): far from this
    head = model.head1[2]
    assert head.weight.std().item() == pytest.approx(math.sqrt(2.0 / head.out_channels), rel=0.08)


def test_input_statistics_are_the_weights_own():
    from recontrast_core.models.backbones import IMAGENET_STATS, UNIT_STATS, input_stats

    assert input_stats(BackboneConfig()) == UNIT_STATS  # TF-converted lite0: inputs in [-1, 1]
    assert input_stats(BackboneConfig(name="wide_resnet50_2")) == IMAGENET_STATS
    assert input_stats(BackboneConfig(input_stats="imagenet")) == IMAGENET_STATS
    assert input_stats(BackboneConfig(name="resnet18", input_stats="unit")) == UNIT_STATS
    enc = create_encoder(BackboneConfig(weights="none"))
    assert enc.stats == UNIT_STATS


@pytest.mark.parametrize("variant, channels", [(1, [144, 240, 672]), (2, [144, 288, 720])])
def test_lite1_lite2_taps_and_statistics(variant, channels):
    from recontrast_core.models.backbones import UNIT_STATS

    enc = create_encoder(BackboneConfig(name=f"tf_efficientnet_lite{variant}", weights="none"))
    assert enc.channels == channels and enc.strides == [4, 8, 16] and enc.stats == UNIT_STATS
