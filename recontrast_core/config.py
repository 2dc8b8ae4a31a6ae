"""Typed configuration: the one schema and the one source of defaults.

:class:`PipelineConfig` is the whole configuration; ``params.yaml`` is a serialised
``PipelineConfig``, and CLI flags, ``--set key.path=value``, the DVC stages and the KFP
pipeline's settings parameter all map onto it through
:func:`recontrast_core.steps.settings.apply_overrides`.
Defaults follow the ReContrast paper (2,000 iterations, batch 16, 256 px) except the
backbone, which defaults to the offline-reachable EfficientNet-Lite0 (``wide_resnet50_2``
is the paper-parity option for clusters with hub access or a local weights file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .promotion import PromotionPolicy


def check_device(v: str) -> str:
    if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {v!r}")
    return v


class _Strict(BaseModel):
    # allow_inf_nan=False: every float setting is finite (nan / .inf refused by the schema,
    # before any work: a NaN learning rate used to train to the end and fail at calibration)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Adam's betas: each in [0, 1) (torch refuses others at the first step, with a traceback).
Beta = Annotated[float, Field(ge=0, lt=1)]
# Blocks per decoder stage / bottleneck: at least one.
Blocks = Annotated[int, Field(ge=1)]
Index = Annotated[int, Field(ge=0)]


class BackboneConfig(_Strict):
    name: str = "tf_efficientnet_lite0"
    # "imagenet": the packaged/hub ImageNet weights; "none": random init (speed tests only);
    # anything else: a local weights file (.safetensors / .pth state_dict) or s3:// URI.
    weights: str = "imagenet"
    # Which activations feed ReContrast. "auto" picks per family: post-activation
    # ("expansion") for EfficientNets, stage outputs for ResNets. See ARCHITECTURE.md.
    feature_location: Literal["auto", "bottleneck", "expansion", ""] = "auto"
    out_indices: tuple[Index, Index, Index] = (1, 2, 3)
    # Input statistics: "auto" = the weights' own (mean = std = 0.5, i.e. inputs in [-1, 1],
    # for the TF-converted EfficientNet-Lites; ImageNet mean/std for ResNets); "imagenet" or
    # "unit" force one. Stored in the bundle; older bundles keep the statistics they recorded.
    input_stats: Literal["auto", "imagenet", "unit"] = "auto"


class TrainConfig(_Strict):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    image_size: int = Field(256, ge=32, le=1024)
    iterations: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    # AdamW: learning rates > 0, weight decay >= 0, betas each in [0, 1); all finite.
    lr_decoder: float = Field(2e-3, gt=0)
    lr_encoder: float = Field(1e-5, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    # Hard-mining alpha ramps linearly from alpha_start to alpha_end over warmup_fraction.
    alpha_start: float = -3.0
    alpha_end: float = 1.0
    alpha_warmup_fraction: float = Field(0.1, ge=0, le=1)
    # Encoder BatchNorm mode: "train" (paper default) or "eval" (paper, some textures).
    encoder_bn: Literal["train", "eval"] = "train"
    decoder_blocks: tuple[Blocks, Blocks, Blocks] = (3, 4, 6)  # blocks per decoder stage, deep to shallow
    bottleneck_blocks: int = Field(3, ge=1)
    # Initialisation of bottleneck, decoder and heads: "kaiming" = the official code's
    # Kaiming-normal fan-out; "pytorch" = PyTorch's layer defaults (earlier releases).
    decoder_init: Literal["kaiming", "pytorch"] = "kaiming"
    seed: int = 111
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(50, ge=1)
    # Light geometric/photometric augmentation (flips, +-10% brightness/contrast).
    # None = on for few-shot training (shots set), off otherwise.
    augment: Optional[bool] = None
    # Under torchrun on GPUs (docs/distributed.md): BatchNorm statistics over the whole
    # global batch (SyncBatchNorm), as one process computes them. False: each GPU's own
    # slice (fewer collectives; a slightly different model). No effect in one process.
    sync_batchnorm: bool = True

    _device_ok = field_validator("device")(classmethod(lambda cls, v: check_device(v)))

    @field_validator("image_size")
    @classmethod
    def _size_fits_the_strides(cls, v: int) -> int:
        # Encoder taps at strides 4/8/16, the bottleneck halves once more: the decoder's
        # upsampled maps only line up with the encoder's when the size divides by 32.
        if v % 32:
            lo, hi = max(32, v // 32 * 32), (v // 32 + 1) * 32
            raise ValueError(f"image_size must be a multiple of 32 (the model's deepest stride), not {v}; "
                             f"use {lo} or {hi}")
        return v


class InferenceConfig(_Strict):
    # Scoring precision: "auto" = bf16 autocast on CUDA when the model trained with amp,
    # fp32 on CPU; "fp32" / "bf16" force one (the GPU suite's parity section measures both).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gaussian_sigma: float = Field(4.0, ge=0)
    score: Literal["max", "topk_mean"] = "max"
    topk_fraction: float = Field(0.01, gt=0, le=1)
    batch_size: int = Field(32, ge=1)


class BaselineConfig(_Strict):
    """The training-free baseline scored beside every evaluation (recontrast_core.baseline):
    frozen encoder, stride-8 + stride-16 taps with 3x3 averaging, nearest-neighbour patch
    distance to a memory bank of the training normals' patches."""

    enabled: bool = True
    # True: the strongest setting of model.auto's training-free grid, chosen on the
    # validation split and reported on the other half (an auto bundle records its choice;
    # otherwise evaluation runs the grid). False: patch-kNN on the detector's own frozen
    # encoder at its resolution, with the settings below (with grid: model.patchknn's bank
    # settings, as the shipped patch-kNN kind).
    grid: bool = True
    fraction: float = Field(0.1, gt=0, le=1)  # share of training patches kept in the bank
    sampler: Literal["random", "coreset"] = "random"  # seeded random subset or greedy k-center
    seed: int = 0
    gaussian_sigma: float = Field(4.0, ge=0)
    batch_size: int = Field(32, ge=1)
    levels: tuple[int, int] = (1, 2)  # encoder taps at strides 8 and 16
    projection_dim: int = Field(128, ge=0)  # coreset only: random projection for distances


class PatchKnnConfig(_Strict):
    """The ``patchknn`` model kind (PatchCore-style, training-free): frozen backbone taps at
    strides 8 and 16, each averaged over its 3x3 neighbourhood, concatenated per stride-8
    patch; a memory bank of the normal training images' patches (``random`` seeded subset or
    greedy ``coreset``); patch score = Euclidean distance to the nearest bank patch (exact)."""

    backbone: str = "tf_efficientnet_lite0"
    # The weights' own statistics by default ("auto"); "imagenet" / "unit" force one.
    input_stats: Literal["auto", "imagenet", "unit"] = "auto"
    image_size: int = Field(256, ge=32, le=1024)
    levels: tuple[int, int] = (1, 2)  # encoder taps at strides 8 and 16
    # PatchCore's greedy coreset of 1% of the patches (its paper: within 0.1 point of 10% on
    # MVTec) keeps the exact search cheap: ~3,000 rows for 300 training images at 256 px.
    sampler: Literal["random", "coreset"] = "coreset"
    fraction: float = Field(0.01, gt=0, le=1)  # share of the training patches kept in the bank
    seed: int = 0
    projection_dim: int = Field(128, ge=0)  # coreset only: random projection for the selection
    batch_size: int = Field(16, ge=1)

    @field_validator("image_size")
    @classmethod
    def _size_fits_the_strides(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"patchknn image_size must be a multiple of 16 (the deepest tap's stride), not {v}")
        return v


class FusionConfig(_Strict):
    """The ``fused`` kind: each map normalised by quantiles of its maps on the held-out normal
    images (EfficientAD's rule: q_lo -> 0, q_hi -> 0.1), then summed and blurred."""

    q_lo: float = Field(0.9, ge=0, lt=1)
    q_hi: float = Field(0.995, gt=0, le=1)
    # Where the image score comes from: the top of the fused map (EfficientAD), or one branch's
    # normalised map (the anomaly map stays fused, for localisation). ``auto`` picks it on the
    # validation split: patch-kNN often ranks images better while the fused map localises better.
    image_score: Literal["fused", "patchknn", "recontrast"] = "fused"


class AutoConfig(_Strict):
    """``model.kind: auto``: train ReContrast, fit patch-kNN over a small grid of training-free
    settings, score every candidate on the validation split and keep the best (image AUROC,
    then AUPRO). docs/model_kinds.md lists the grid and why."""

    # lite1 left out by default: it never led lite0 and lite2 on a validation half (results.md),
    # and each 256 px setting costs ~30 s of the CPU budget
    backbones: tuple[str, ...] = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")
    image_sizes: tuple[int, ...] = (160, 256)
    input_stats: tuple[Literal["auto", "imagenet", "unit"], ...] = ("auto", "imagenet")
    # The grid's banks are a seeded random share of the patches (one pass over the training
    # images each, no coreset: cheap); the winner is refitted with model.patchknn's sampler
    # and fraction before it competes with the other kinds. Ranking (grid and candidates)
    # uses a bfloat16 search where the CPU makes it pay (AMX / AVX512-BF16), each distance
    # recomputed exactly in float32; the shipped detector always searches exactly.
    grid_fraction: float = Field(0.02, gt=0, le=1)
    # Candidates besides the grid's best patch-kNN; drop "recontrast" and "fused" for a
    # training-free run.
    kinds: tuple[Literal["recontrast", "patchknn", "fused"], ...] = ("recontrast", "patchknn", "fused")
    # Kinds whose validation image AUROC is within this of the best are tied; AUPRO breaks
    # the tie (0.0003 apart on 193 images is one swapped pair of images, not a better model).
    tie: float = Field(0.005, ge=0, le=1)


class ModelConfig(_Strict):
    """Which detector the pipeline ships (``model.kind``; dotted keys work everywhere)."""

    # recontrast: the trained ReContrast network; patchknn: the training-free memory bank;
    # fused: both maps, quantile-normalised and summed; auto: the best of the three on the
    # validation split (docs/model_kinds.md).
    kind: Literal["auto", "recontrast", "patchknn", "fused"] = "auto"
    patchknn: PatchKnnConfig = Field(default_factory=PatchKnnConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    auto: AutoConfig = Field(default_factory=AutoConfig)


class CalibrationConfig(_Strict):
    # Fraction of the normal training images held out to choose the production threshold.
    validation_fraction: float = Field(0.15, ge=0.0, lt=0.9)
    # Used when the validation split has no labelled anomalies: threshold at this FPR.
    target_fpr: float = Field(0.01, gt=0, lt=1)


def _crop_scale_ok(v: tuple[float, float]) -> tuple[float, float]:
    if not 0 < v[0] <= v[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, not {v!r}")
    return v


class CoftConfig(_Strict):
    """COFT-AD few-shot settings (the paper publishes no code: docs/adaptation.md says why
    each default was chosen)."""

    # One COFT "epoch" = this many optimisation steps (so AdaptConfig.epochs is a training
    # length for both methods); default 20 epochs x 1 = 20 steps (the measured setting).
    steps_per_epoch: int = Field(1, ge=1)
    # Share of each batch (AdaptConfig.batch_size) that is synthesised anomalies; the rest
    # are augmented views of the normal shots.
    anomaly_fraction: float = Field(0.5, gt=0, lt=1)
    temperature: float = Field(0.2, gt=0)
    # loss = supervised contrastive (cross-instance positives) + lambda_pp * mean(1 - cos)
    # over normal pairs + lambda_np * mean(relu(cos - np_margin)) over normal/anomaly pairs.
    lambda_pp: float = Field(1.0, ge=0)
    lambda_np: float = Field(1.0, ge=0)
    np_margin: float = Field(0.0, ge=-1, le=1)
    # Anomaly synthesis: any of "cutpaste", "scar", "noise", drawn uniformly.
    synth: tuple[str, ...] = ("cutpaste", "scar", "noise")
    # Optimiser: SGD with momentum. 20 steps need a large rate: on magnetic-tile-dev the
    # loss did not move at 1e-3 and 1e-2 and fell at 5e-2 (docs/adaptation.md).
    lr: float = Field(5e-2, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-5, ge=0)
    # Views of the shots (training and the Gaussian fit): RandomResizedCrop scale range.
    crop_scale: tuple[float, float] = (0.5, 1.0)
    # Mahalanobis scorer: augmented views per shot (plus the shot itself), Ledoit-Wolf.
    fit_views: int = Field(16, ge=0)

    @field_validator("crop_scale")
    @classmethod
    def _scale_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _crop_scale_ok(v)

    @field_validator("synth")
    @classmethod
    def _synth_ok(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        known = ("cutpaste", "scar", "noise")
        bad = [k for k in v if k not in known]
        if not v or bad:
            raise ValueError(f"synth must be a non-empty subset of {known}, not {v!r}")
        return v


class AdaptConfig(_Strict):
    """Encoder adaptation before ReContrast: MSC (many normals) or COFT-AD (few shots).

    Defaults follow Mean-Shifted Contrastive learning (Reiss & Hoshen 2023): SGD lr 1e-5,
    weight decay 5e-5, temperature 0.25, batch 64, 20 epochs, BatchNorm frozen, kNN k=2.
    """

    # In a pipeline, method/shots follow the pipeline's adapt_method/shots and backbone,
    # image_size and device follow train.* (None = follow; see steps.settings.adapt_settings).
    # Standalone (``recontrast adapt``) a method is required and None means TrainConfig's default.
    method: Optional[Literal["msc", "coft"]] = None
    backbone: Optional[BackboneConfig] = None
    image_size: Optional[int] = Field(None, ge=32, le=1024)
    # Few-shot: adapt on this many normal training images (adapt.sample_shots); None = all.
    shots: Optional[int] = Field(None, ge=1)
    shots_seed: int = 0  # which shots (the pipeline's steps.SHOTS_SEED is 0 too)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=2)
    seed: int = 0
    device: Optional[str] = None
    # Embedding: global `pool` of feature level `level` (index into the encoder's three
    # levels; -1 = the last, deepest one).
    level: int = Field(-1, ge=-3, le=2)
    pool: Literal["avg", "max"] = "avg"
    # Parameters up to and including the stage of this level's tap stay frozen (0 = train
    # all). 2 = MSC's reference setting for ResNets (conv1..layer2 frozen); for lite0 the
    # stem and blocks 0-2 stay fixed and blocks 3-4 (the deepest level) adapt.
    freeze_levels: int = Field(2, ge=0, le=3)
    # MSC optimiser and loss.
    lr: float = Field(1e-5, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(5e-5, ge=0)
    temperature: float = Field(0.25, gt=0)
    angular_weight: float = Field(0.0, ge=0)  # MSC's optional angular center term (1.0 = --angular)
    # MoCo-v2 views (MSC): RandomResizedCrop scale range; horizontal flips (turn off where
    # orientation matters, e.g. digits or parts that always face one way).
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    knn_k: int = Field(2, ge=1)
    coft: CoftConfig = Field(default_factory=CoftConfig)

    _device_ok = field_validator("device")(classmethod(lambda cls, v: v if v is None else check_device(v)))

    @field_validator("crop_scale")
    @classmethod
    def _scale_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _crop_scale_ok(v)

    def resolved(self, train: Optional["TrainConfig"] = None) -> "AdaptConfig":
        """Unset encoder settings (backbone, image size, device) taken from ``train``
        (default: :class:`TrainConfig`'s defaults), so the adapted encoder fits the trainer."""
        t = train or TrainConfig()
        return self.model_copy(update={
            "backbone": self.backbone or t.backbone,
            "image_size": self.image_size or t.image_size,
            "device": self.device or t.device,
        })



# ---------------------------------------------------------------------------------------
# The whole pipeline (ingest -> adapt -> train -> evaluate -> register): params.yaml,
# the KFP pipeline parameters and `recontrast pipeline run` all map onto this.
# ---------------------------------------------------------------------------------------
class DataConfig(_Strict):
    # A local folder, an s3://bucket/prefix, or (with dvc_repo) a path inside a
    # DVC-tracked git repository.
    source: str = "../shared/data/magnetic-tile-dev"
    # docs/data.md: mvtec, folder, labelme, coco, visa, manifest; "auto" recognises mvtec,
    # a manifest .json, visa (split_csv/1cls.csv) and labelme (LabelMe .json files).
    layout: Literal["auto", "mvtec", "folder", "labelme", "coco", "visa", "manifest"] = "auto"
    dvc_repo: Optional[str] = None  # local path or git URL of a DVC repository
    dvc_rev: Optional[str] = None  # git revision (branch, tag, commit); None = HEAD
    # S3/MinIO endpoint; None = AWS_ENDPOINT_URL / S3_ENDPOINT_URL from the environment.
    s3_endpoint_url: Optional[str] = None
    # Copy a local folder into the ingest output (needed when later steps run elsewhere,
    # e.g. KFP pods); s3:// and DVC sources are always materialised there.
    copy_local: bool = False
    check_decode: bool = True
    # The same image content in train and test is refused (leakage) unless this is true.
    allow_duplicates: bool = False
    # Options of the layout (data.layouts.LAYOUT_OPTIONS): folder: normal_dir, abnormal_dir,
    # mask_dir, test_fraction, seed; labelme: normal_label, test_fraction, seed, split;
    # coco: annotations, images, normal_label, test_fraction, seed, split; visa: split_csv,
    # object. Paths are relative to the dataset root or absolute.
    layout_options: dict[str, Any] = Field(default_factory=dict)


class RegistryConfig(PromotionPolicy):
    """The register step: which registered model, and the promotion rule
    (:class:`~recontrast_core.promotion.PromotionPolicy`, whose defaults are the only ones)."""

    model_name: str = "recontrast"


class TrackingConfig(_Strict):
    # None = MLFLOW_TRACKING_URI, else the embedded sqlite:///<cwd>/mlflow.db
    tracking_uri: Optional[str] = None
    experiment: str = "recontrast"


class TrainJobConfig(_Strict):
    """The train step as a Kubeflow Trainer TrainJob (``train_backend: trainjob``, KFP only;
    docs/distributed.md): ``num_nodes`` nodes with ``gpus_per_node`` GPUs each, one training
    process per GPU; ``train.batch_size`` is the global batch and must divide by their product."""

    num_nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=1)
    cpu_per_node: str = "8"
    memory_per_node: str = "32Gi"
    # The cluster stops the job after this (activeDeadlineSeconds); the pipeline waits as long.
    timeout_s: int = Field(86400, ge=60)


class MonitorConfig(_Strict):
    """The drift monitor (``recontrast monitor``, the monitor pipeline; docs/operations.md).
    The tests and verdict rules: :mod:`recontrast_core.monitor`."""

    # Windows of the scores: "all", a number of images ("500") or a UTC duration (30m, 6h, 1d, 1w).
    window: str = Field("all", pattern=r"^(all|[1-9][0-9]*|[1-9][0-9]*[smhdw])$")
    # A drift counts only when the KS test's p < alpha AND the PSI reaches psi_moderate
    # (verdict watch) or psi_major (verdict retrain).
    alpha: float = Field(0.01, gt=0, lt=1)
    psi_moderate: float = Field(0.1, gt=0)
    psi_major: float = Field(0.25, gt=0)
    # The alarm rate's Wilson interval.
    confidence: float = Field(0.95, gt=0, lt=1)
    # Windows with fewer scored images are reported, not judged (verdict ok).
    min_images: int = Field(20, ge=1)
    # The monitor pipeline submits the training pipeline after this many consecutive retrain windows.
    retrain_after: int = Field(2, ge=1)
    # The MLflow experiment of the monitor's runs (one per window).
    experiment: str = "recontrast-monitor"

    @model_validator(mode="after")
    def _psi_order(self) -> "MonitorConfig":
        if self.psi_major < self.psi_moderate:
            raise ValueError(f"psi_major ({self.psi_major}) must be at least psi_moderate ({self.psi_moderate})")
        return self


DEFAULT_NAME = "recontrast"  # the registered model, the MLflow experiment: without a product line


def line_names(line: Optional[str] = None) -> dict[str, str]:
    """The names of a product line's resources: its registered model and MLflow experiment
    (``recontrast-<line>``), the monitor's experiment (``recontrast-<line>-monitor``) and the
    retraining schedule (``recontrast-<line>-retrain``). No line: today's names."""
    base = f"{DEFAULT_NAME}-{line}" if line else DEFAULT_NAME
    return {"model_name": base, "experiment": base, "monitor_experiment": f"{base}-monitor",
            "schedule": f"{base}-retrain"}


# (section, field, line_names key): the settings a product line names
_LINE_FIELDS = (("registry", "model_name", "model_name"), ("tracking", "experiment", "experiment"),
                ("monitor", "experiment", "monitor_experiment"))


class PipelineConfig(_Strict):
    # A product line ("tiles-a"): its registered model and MLflow experiment are named
    # recontrast-<line>, its monitor experiment recontrast-<line>-monitor and its retraining
    # schedule recontrast-<line>-retrain (line_names). Those settings left at their defaults
    # follow the line; None (the default) keeps today's names.
    line: Optional[str] = Field(None, pattern=r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
    data: DataConfig = Field(default_factory=DataConfig)
    # "none": ReContrast from ImageNet weights; "msc" / "coft": adapt the encoder first.
    adapt_method: Literal["none", "msc", "coft"] = "none"
    # Few-shot: use only this many normal training images (adapt and train); None = all.
    shots: Optional[int] = Field(None, ge=1)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # Where the KFP pipeline trains: "pod" (one GPU in the train step's pod) or "trainjob"
    # (a TrainJob across nodes and GPUs, settings in `trainjob`). The CLI and DVC train here.
    train_backend: Literal["pod", "trainjob"] = "pod"
    trainjob: TrainJobConfig = Field(default_factory=TrainJobConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def _line_names(self) -> "PipelineConfig":
        """With a line, the names left at their defaults become the line's; a name of the
        form another line would get (``recontrast-<other>``, e.g. from a params.yaml written
        for another line) is refused rather than silently mixing two lines' models."""
        fields = self.__dict__  # not attribute reads: a step's settings recorder counts those as its reads
        line = fields.get("line")
        if not line:
            return self
        ours, plain = line_names(line), line_names(None)
        for section, name, key in _LINE_FIELDS:
            obj = fields.get(section)
            if obj is None or not hasattr(obj, name):
                continue
            value = getattr(obj, name)
            if value == plain[key]:
                setattr(obj, name, ours[key])
            elif value != ours[key] and value.startswith(DEFAULT_NAME + "-"):
                raise ValueError(f"{section}.{name} {value!r} is not line {line!r}'s name ({ours[key]!r}): "
                                 f"set it to {plain[key]!r} (follows the line) or to {ours[key]!r}")
        return self
