"""ReContrast training: one plain function the CLI, the KFP component and DVC call.

Fast by design: images decoded and resized once and kept as uint8 on the device,
batches sampled by index on the device, bf16 autocast on CUDA, channels_last, fused
AdamW on CUDA, and no host synchronisation per iteration (the loss is read back only
every ``log_every`` iterations). Checkpoints are written atomically every
``checkpoint_every`` iterations; ``resume=True`` continues with the same optimizer state,
iteration count and batch order.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop runs data-parallel
(:mod:`.distributed`, docs/distributed.md): every process draws the same global batch of
``batch_size`` images and trains on its slice, gradients are averaged by
DistributedDataParallel, BatchNorm is synchronised on CUDA (``sync_batchnorm``), rank 0
alone writes checkpoints and the bundle and calibrates, and a resumed run loads the same
checkpoint on every process.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import distributed, runtime
from .bundle import Detector, save_bundle
from .models import build_model
from .calibration import fit_calibration, input_reference
from .config import CalibrationConfig, InferenceConfig, TrainConfig
from .data.manifest import Manifest, split_validation
from .errors import UserError, first_line
from .losses import alpha_at, recontrast_loss
from .models.recontrast import ReContrast, ReContrastScorer
from .progress import track_steps
from .runtime import amp_dtype_for, atomic_write, load_torch_file, remove_stale_temps, seed_everything

CHECKPOINT_NAME = "last.pt"
FEW_SHOT_CALIBRATION_VIEWS = 8  # the shot itself + 7 augmented views
# Settings that must match for --resume to continue the same run.
_RESUME_KEYS = ("backbone", "image_size", "batch_size", "lr_decoder", "lr_encoder", "weight_decay",
                "decoder_blocks", "bottleneck_blocks", "encoder_bn", "seed", "augment")


@dataclass
class TrainResult:
    bundle_dir: Path
    history: list[dict] = field(default_factory=list)
    iterations: int = 0
    wall_time_s: float = 0.0
    images_per_s: float = 0.0
    checkpoint: Optional[Path] = None


def _to_host(obj):
    """A copy of a (nested) state with every tensor in host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------
# memory: a batch that cannot fit is refused before the first step (not OOM-killed at it)
# ---------------------------------------------------------------------------------------
MEMORY_CHECK_ENV = "RECONTRAST_MEMORY_CHECK"  # "off" trains without the check
# Peak memory of a training step per input pixel of one image (activations kept for the
# backward pass and their gradients, fp32), by backbone family, measured on the CPU
# (peak RSS of two steps, batch 4 -> 8 at 256 px and 2 -> 6 at 64 px; docs/reliability.md)
# plus ~10%: lite0 5,130 bytes, wide_resnet50_2 8,770, resnet18 1,730.
_STEP_BYTES_PER_PIXEL = {"tf_efficientnet_lite": 5700, "resnet18": 2000, "wide_resnet50_2": 9700}
# Parameters of the whole ReContrast model (both encoder copies, bottleneck, decoder at the
# default blocks) by backbone; each costs 16 bytes (weights, gradients, AdamW's two moments).
_MODEL_PARAMS = {"tf_efficientnet_lite0": 36.1e6, "tf_efficientnet_lite1": 36.6e6, "tf_efficientnet_lite2": 42.8e6,
                 "resnet18": 11.0e6, "wide_resnet50_2": 136.3e6}
_UNKNOWN_BACKBONE = ("wide_resnet50_2", 136.3e6)  # other timm names: the largest known (conservative)
_PROCESS_OVERHEAD = 512 * 2**20  # allocator, library and framework state beyond the tensors


def estimate_training_memory(cfg: TrainConfig, n_images: int, batch: Optional[int] = None) -> int:
    """Bytes a training run needs at its peak (conservative): model and optimiser state,
    one step's activations for ``batch`` images (default ``cfg.batch_size``) at
    ``cfg.image_size``, and the ``n_images`` training images kept as uint8 on the device."""
    name = cfg.backbone.name
    family = next((k for k in _STEP_BYTES_PER_PIXEL if name.startswith(k)), None)
    per_pixel = _STEP_BYTES_PER_PIXEL[family] if family else _STEP_BYTES_PER_PIXEL[_UNKNOWN_BACKBONE[0]]
    params = _MODEL_PARAMS.get(name, _UNKNOWN_BACKBONE[1])
    pixels = cfg.image_size * cfg.image_size
    batch = cfg.batch_size if batch is None else batch
    return int(_PROCESS_OVERHEAD + params * 16 + batch * pixels * per_pixel + n_images * 3 * pixels)


def memory_check_enabled() -> bool:
    raw = os.environ.get(MEMORY_CHECK_ENV, "").strip().lower()
    if raw in ("", "on", "1", "true", "yes"):
        return True
    if raw in ("off", "0", "false", "no"):
        return False
    raise UserError(f"{MEMORY_CHECK_ENV}={raw!r}: expected on or off")


def check_training_memory(cfg: TrainConfig, n_images: int, device: torch.device, batch: Optional[int] = None) -> None:
    """Refuse, before any image is loaded or any step taken, a run whose estimated peak
    (:func:`estimate_training_memory`) is more than ``device`` has free
    (:func:`recontrast_core.runtime.available_memory`). ``RECONTRAST_MEMORY_CHECK=off``
    skips the check; an unknown amount free is no refusal."""
    if not memory_check_enabled():
        return
    need = estimate_training_memory(cfg, n_images, batch)
    if device.type == "cpu":  # the processes of a data-parallel run on one host share its memory
        local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
        need *= int(local) if local.isdigit() and int(local) > 1 else 1
    free = runtime.available_memory(device)
    if free is None or need <= free:
        return
    from .runtime import human_bytes

    per_process = "" if batch is None or batch == cfg.batch_size else f" ({batch} per process)"
    raise UserError(
        f"train.batch_size={cfg.batch_size}{per_process} at train.image_size={cfg.image_size} needs about "
        f"{human_bytes(need)} of memory on {device} ({cfg.backbone.name}, {n_images} training images; a "
        f"conservative estimate), {human_bytes(free)} available; lower train.batch_size or train.image_size, "
        f"or set {MEMORY_CHECK_ENV}=off to train anyway")


def batch_indices(iteration: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of the images in one batch: a fresh permutation per epoch, last partial batch dropped.

    Stateless in ``iteration`` so a resumed run draws exactly the batches it would have.
    With fewer images than the batch size (few-shot), images repeat within a batch.
    """
    if n >= batch:
        per_epoch = n // batch
        epoch, pos = divmod(iteration, per_epoch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g)[pos * batch : (pos + 1) * batch]
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    return torch.randint(0, n, (batch,), generator=g)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the host: pinned memory makes the copy truly async."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def augment_batch(x: torch.Tensor, iteration: int, seed: int, offset: int = 0, total: Optional[int] = None) -> torch.Tensor:
    """Light augmentation for few-shot training: flips and +-10% brightness/contrast per image.

    ``x`` is images ``offset ..`` of a batch of ``total`` (default: all of it): a process of a
    data-parallel run draws the whole batch's random values and keeps its slice."""
    g = torch.Generator().manual_seed(seed * 7_919 + iteration)
    b = x.shape[0]
    r = to_device(torch.rand(total or b, 4, generator=g)[offset : offset + b], x.device)
    x = torch.where((r[:, 0] < 0.5).view(b, 1, 1, 1), x.flip(-1), x)
    x = torch.where((r[:, 1] < 0.5).view(b, 1, 1, 1), x.flip(-2), x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (0.9 + 0.2 * r[:, 2]).view(b, 1, 1, 1)
    brightness = (r[:, 3] - 0.5).view(b, 1, 1, 1) * 0.2
    return (x - mean) * contrast + mean + brightness


class Trainer:
    """Owns the model, the two AdamW optimisers, the step, and checkpoint state.

    ``dist``: a data-parallel context (:mod:`.distributed`); the model is then wrapped in
    DistributedDataParallel (``self.net``), its BatchNorm layers synchronised on CUDA when
    ``cfg.sync_batchnorm``, and :meth:`step` returns the loss of the whole global batch."""

    def __init__(self, model: ReContrast, cfg: TrainConfig, device: torch.device,
                 dist: distributed.DistContext = distributed.DistContext()):
        self.cfg, self.device, self.dist = cfg, device, dist
        self.model = model.to(device)
        if dist.enabled and cfg.sync_batchnorm and device.type == "cuda":
            from timm.layers import convert_sync_batchnorm  # keeps timm's BatchNormAct activations

            self.model = model = convert_sync_batchnorm(model)  # same parameters, synchronised statistics
        elif dist.enabled and cfg.sync_batchnorm and dist.is_main:
            warnings.warn("sync_batchnorm needs CUDA (PyTorch's SyncBatchNorm); on the CPU each process "
                          "normalises its own slice of the batch (docs/distributed.md)", stacklevel=2)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        fused = device.type == "cuda"
        common = dict(betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)
        self.opt_decoder = torch.optim.AdamW(list(model.decoder_parameters()), lr=cfg.lr_decoder, **common)
        self.opt_encoder = torch.optim.AdamW(list(model.encoder.parameters()), lr=cfg.lr_encoder, **common)
        self.amp_dtype = amp_dtype_for(device, cfg.amp)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input shape all run long
        self.net = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: the encoder's last block ends past its deepest tap
            # (lite0's conv_pwl/bn3 take no part in the loss).
            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=True)

    def step(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            frozen, feats, head1, head2 = self.net(x)
        loss = recontrast_loss(frozen, feats, head1, head2, alpha, distributed=self.dist.enabled)
        self.opt_decoder.zero_grad(set_to_none=True)
        self.opt_encoder.zero_grad(set_to_none=True)
        loss.backward()  # DDP: gradients averaged over the processes = the global batch's mean
        self.opt_decoder.step()
        self.opt_encoder.step()
        return distributed.mean_across(loss.detach(), self.dist)

    def state(self, iteration: int, history: list[dict], pending_losses=(), elapsed_s: float = 0.0) -> dict:
        return {
            "iteration": iteration,
            "pending_losses": [float(x) for x in pending_losses],  # the open log window
            "elapsed_s": float(elapsed_s),
            "model": self.model.state_dict(),
            "opt_decoder": self.opt_decoder.state_dict(),
            "opt_encoder": self.opt_encoder.state_dict(),
            "history": history,
            "config": self.cfg.model_dump_json(),
        }

    def save(self, path: Path, iteration: int, history: list[dict], background: bool = False,
             pending_losses=(), elapsed_s: float = 0.0) -> Path:
        """Write the checkpoint atomically. ``background``: snapshot every tensor to host
        memory now and write the file in a thread, so a GPU keeps training meanwhile (one
        write in flight; :meth:`wait` joins it and re-raises its error)."""
        state = self.state(iteration, list(history), pending_losses, elapsed_s)
        if not background:
            self.wait()
            return atomic_write(path, lambda tmp: torch.save(state, tmp))
        self.wait()
        snapshot = _to_host(state)

        def write() -> None:
            try:
                atomic_write(path, lambda tmp: torch.save(snapshot, tmp))
            except BaseException as exc:  # re-raised by wait() in the training thread
                self._save_error = exc

        self._saver = threading.Thread(target=write, name="checkpoint-writer")
        self._saver.start()
        return path

    def wait(self) -> None:
        """Finish a background checkpoint write (re-raising its error, if any)."""
        saver, self._saver = getattr(self, "_saver", None), None
        if saver is not None:
            saver.join()
        error, self._save_error = getattr(self, "_save_error", None), None
        if error is not None:
            raise error

    def load(self, path: Path) -> tuple[int, list[dict], list[float], float]:
        """Restore a checkpoint; returns (iteration, history, the loss values since the last
        log point, training seconds so far), so a resumed run reports what an uninterrupted
        one would."""
        if not path.is_file():
            raise UserError(f"{path}: no checkpoint to resume from")
        state = load_torch_file(path, "checkpoint", map_location=self.device)
        missing = [k for k in ("iteration", "model", "opt_decoder", "opt_encoder", "history", "config")
                   if not isinstance(state, dict) or k not in state]
        if missing:
            raise UserError(f"{path}: not a recontrast checkpoint (missing {', '.join(missing)})")
        try:
            saved = json.loads(state["config"])
        except (TypeError, ValueError):
            raise UserError(f"{path}: not a recontrast checkpoint (its config is not JSON)") from None
        now = self.cfg.model_dump(mode="json")
        diff = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
        if diff:
            raise UserError(f"{path}: checkpoint was written with different settings ({', '.join(diff)}); "
                            "use the same settings to resume or start a new output folder")
        try:
            self.model.load_state_dict(state["model"])
            self.opt_decoder.load_state_dict(state["opt_decoder"])
            self.opt_encoder.load_state_dict(state["opt_encoder"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"{path}: checkpoint does not fit this model ({first_line(exc, 160)})") from None
        return (int(state["iteration"]), list(state["history"]), [float(x) for x in state.get("pending_losses", [])],
                float(state.get("elapsed_s", 0.0)))


def train_model(
    manifest: Manifest,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    init_encoder: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    calibration: CalibrationConfig = CalibrationConfig(),
    inference: InferenceConfig = InferenceConfig(),
    cache_dir: Optional[Path] = None,
    few_shot: bool = False,
    bundle_dir: Optional[Path] = None,
) -> TrainResult:
    """Train on the manifest's normal training images; write checkpoints and the bundle.

    ``few_shot``: every image trains (no calibration hold-out: with a handful of shots each
    one counts) and the threshold is set on :data:`FEW_SHOT_CALIBRATION_VIEWS` augmented
    views of each shot (the training augmentation) at the target false-positive rate;
    augmentation is on unless ``cfg.augment`` says otherwise. Otherwise
    ``calibration.validation_fraction`` of the normals is held out to set the threshold.

    ``bundle_dir``: where the bundle goes (default ``out_dir/bundle``; checkpoints always in
    ``out_dir/checkpoints``). Under ``torchrun`` every process calls this with the same arguments (module docstring);
    ``cfg.batch_size`` is the global batch and must divide by ``WORLD_SIZE``.
    """
    out_dir = Path(out_dir)
    normal_train = manifest.select(split="train", label=0)
    if len(normal_train) == 0:
        raise UserError(f"{manifest.root}: no normal training images in the manifest")
    if cfg.augment is None:
        cfg = cfg.model_copy(update={"augment": few_shot})
    if few_shot:
        fit, val = normal_train, normal_train.subset([])
    else:
        fit, val = split_validation(normal_train, calibration.validation_fraction, cfg.seed)
    distributed.per_process_batch(cfg.batch_size, distributed.env_context().world_size)
    ctx, device = distributed.setup(cfg.device)
    try:
        check_training_memory(cfg, len(fit), device, distributed.per_process_batch(cfg.batch_size, ctx.world_size))
        history, wall, trainer, ckpt = _fit(fit, cfg, out_dir, device, ctx, init_encoder=init_encoder, resume=resume,
                                            progress=progress and ctx.is_main, cache_dir=cache_dir)
        bundle_dir = Path(bundle_dir) if bundle_dir is not None else out_dir / "bundle"
        if ctx.is_main:  # one writer; the other processes wait at the barrier below
            detector = Detector(scorer=ReContrastScorer(trainer.model.eval(), cfg.image_size), config=cfg,
                                inference=inference, calibration=None, meta={}, device=device)
            calib = _calibrate(detector, val if len(val) else fit, calibration, cfg, progress, cache_dir,
                               views=FEW_SHOT_CALIBRATION_VIEWS if few_shot else 1)
            calib = calib.with_input_reference(  # the drift monitor's input reference (calibration.py)
                input_reference([normal_train.source(e.path) for e in normal_train.entries], progress))
            bundle_dir = save_bundle(
                bundle_dir, trainer.model, cfg, inference, calib,
                dataset_fingerprint=manifest.fingerprint,
                training={
                    "iterations": cfg.iterations,
                    "final_loss": history[-1]["loss"] if history else None,
                    "wall_time_s": round(wall, 2),
                    "images_per_s": round(cfg.iterations * cfg.batch_size / wall, 3) if wall > 0 else None,
                    "history": history,
                    "init_encoder": init_encoder,
                    "n_train_images": len(fit),
                    "n_calibration_images": len(val) if len(val) else len(fit),
                    "calibration_views": FEW_SHOT_CALIBRATION_VIEWS if few_shot else 1,
                    "calibration_set": ("augmented views of the shots" if few_shot else
                                        "held-out normal training images" if len(val) else "the training images"),
                    "device": str(device),
                    "world_size": ctx.world_size,
                },
            )
        distributed.barrier(ctx)
    finally:
        distributed.teardown(ctx)
    return TrainResult(
        bundle_dir=bundle_dir,
        history=history,
        iterations=cfg.iterations,
        wall_time_s=wall,
        images_per_s=cfg.iterations * cfg.batch_size / wall if wall > 0 else 0.0,
        checkpoint=ckpt,
    )


def _fit(fit: Manifest, cfg: TrainConfig, out_dir: Path, device: torch.device, ctx: distributed.DistContext, *,
         init_encoder: Optional[str], resume: bool, progress: bool, cache_dir: Optional[Path]):
    """The training loop; returns (history, wall seconds, the trainer, the checkpoint path).
    Each process takes its slice of every global batch; rank 0 writes the checkpoints."""
    from .data.cache import load_resized

    seed_everything(cfg.seed)
    images, _, _ = load_resized(fit, cfg.image_size, with_masks=False, progress=progress, cache_dir=cache_dir)
    images = images.to(device)

    # Resuming restores every tensor from the checkpoint, so no weights need to be fetched.
    model = build_model(cfg, weights="none" if resume else init_encoder)
    trainer = Trainer(model, cfg, device, ctx)
    ckpt = out_dir / "checkpoints" / CHECKPOINT_NAME
    if ctx.is_main:
        remove_stale_temps(ckpt)  # a run killed mid-write (kill -9) leaves its temp file behind
    start, history, pending, elapsed_before = trainer.load(ckpt) if resume else (0, [], [], 0.0)
    per = distributed.per_process_batch(cfg.batch_size, ctx.world_size)
    mine = slice(ctx.rank * per, (ctx.rank + 1) * per)  # this process's part of each global batch

    losses: list[torch.Tensor] = [torch.tensor(x, device=device) for x in pending]
    t0 = time.perf_counter()
    with track_steps("train", cfg.iterations, enabled=progress, completed=start) as bar:
        for it in range(start, cfg.iterations):
            idx = to_device(batch_indices(it, images.shape[0], cfg.batch_size, cfg.seed)[mine], device)
            x = prepare_batch(images[idx], cfg, device, it, trainer.model.encoder.stats, offset=mine.start,
                         total=cfg.batch_size)
            alpha = alpha_at(it, cfg.iterations, cfg.alpha_start, cfg.alpha_end, cfg.alpha_warmup_fraction)
            losses.append(trainer.step(x, alpha))
            done = it + 1
            if done % cfg.log_every == 0 or done == cfg.iterations:
                mean_loss = torch.stack(losses).mean().item()  # the only host sync, every log_every
                losses.clear()
                history.append({"iteration": done, "loss": mean_loss, "alpha": alpha})
                bar.advance(0, info=f"loss {mean_loss:.4f}")
            if ctx.is_main and (done % cfg.checkpoint_every == 0 or done == cfg.iterations):
                # On a GPU, intermediate checkpoints are written by a thread (off the hot path).
                trainer.save(ckpt, done, history, background=device.type == "cuda" and done < cfg.iterations,
                             pending_losses=[x.item() for x in losses],
                             elapsed_s=elapsed_before + time.perf_counter() - t0)
            bar.advance(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = elapsed_before + time.perf_counter() - t0  # training time over every segment of the run
    return history, wall, trainer, ckpt


def prepare_batch(batch_uint8: torch.Tensor, cfg: TrainConfig, device, iteration: int, stats, offset: int = 0,
             total: Optional[int] = None) -> torch.Tensor:
    from .inference import normalize_images

    x = normalize_images(batch_uint8, device, stats=stats)
    if cfg.augment:
        x = augment_batch(x, iteration, cfg.seed, offset, total)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def _calibrate(detector: Detector, calib_set: Manifest, calibration: CalibrationConfig, cfg: TrainConfig, progress: bool,
               cache_dir, views: int = 1):
    """Production threshold from normal images (target false-positive rate); with
    ``views > 1`` also from augmented views of them (view 0 is the image itself)."""
    from .data.cache import batch_slices, load_resized
    from .inference import predict_batch

    images, _, _ = load_resized(calib_set, cfg.image_size, with_masks=False, progress=progress, cache_dir=cache_dir)
    if views <= 1:
        _, scores = detector.score_uint8(images)
        return fit_calibration(np.asarray(scores), None, target_fpr=calibration.target_fpr)
    model, device = detector.model, detector.device
    amp = detector.scoring_dtype
    out = []
    for view in range(views):
        for chunk in batch_slices(images.shape[0], detector.inference.batch_size):
            x = prepare_batch(images[chunk], cfg.model_copy(update={"augment": False}), device, 0, model.encoder.stats)
            if view:
                x = augment_batch(x, 1_000_000 + view * 10_000 + chunk.start, cfg.seed + 1)
            out.append(predict_batch(model, x, detector.inference, amp)[1].float().cpu())
    return fit_calibration(torch.cat(out).numpy(), None, target_fpr=calibration.target_fpr)
