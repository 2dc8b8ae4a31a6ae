"""ReContrast training: one plain function the CLI, the KFP component and DVC call.

Fast by design: images decoded and resized once and kept as uint8 on the device,
batches sampled by index on the device, bf16 autocast on CUDA, channels_last, fused
AdamW on CUDA, and no host synchronisation per iteration (the loss is read back only
every ``log_every`` iterations). Checkpoints are written atomically every
``checkpoint_every`` iterations; ``resume=True`` continues with the same optimizer state,
iteration count and batch order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .bundle import Detector, build_model, save_bundle
from .calibration import fit_calibration
from .config import CalibrationConfig, InferenceConfig, TrainConfig
from .data.manifest import Manifest, split_validation
from .errors import UserError
from .losses import alpha_at, recontrast_loss
from .models.recontrast import ReContrast
from .progress import track_steps
from .runtime import amp_dtype_for, atomic_write, resolve_device, seed_everything

CHECKPOINT_NAME = "last.pt"
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


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the host: pinned memory makes the copy truly async."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def augment_batch(x: torch.Tensor, iteration: int, seed: int) -> torch.Tensor:
    """Light augmentation for few-shot training: flips and +-10% brightness/contrast per image."""
    g = torch.Generator().manual_seed(seed * 7_919 + iteration)
    b = x.shape[0]
    r = _to_device(torch.rand(b, 4, generator=g), x.device)
    x = torch.where((r[:, 0] < 0.5).view(b, 1, 1, 1), x.flip(-1), x)
    x = torch.where((r[:, 1] < 0.5).view(b, 1, 1, 1), x.flip(-2), x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (0.9 + 0.2 * r[:, 2]).view(b, 1, 1, 1)
    brightness = (r[:, 3] - 0.5).view(b, 1, 1, 1) * 0.2
    return (x - mean) * contrast + mean + brightness


class Trainer:
    """Owns the model, the two AdamW optimisers, the step, and checkpoint state."""

    def __init__(self, model: ReContrast, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = model.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        fused = device.type == "cuda"
        common = dict(betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)
        self.opt_decoder = torch.optim.AdamW(list(model.decoder_parameters()), lr=cfg.lr_decoder, **common)
        self.opt_encoder = torch.optim.AdamW(list(model.encoder.parameters()), lr=cfg.lr_encoder, **common)
        self.amp_dtype = amp_dtype_for(device, cfg.amp)

    def step(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            frozen, feats, head1, head2 = self.model(x)
        loss = recontrast_loss(frozen, feats, head1, head2, alpha)
        self.opt_decoder.zero_grad(set_to_none=True)
        self.opt_encoder.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_decoder.step()
        self.opt_encoder.step()
        return loss.detach()

    def state(self, iteration: int, history: list[dict]) -> dict:
        return {
            "iteration": iteration,
            "model": self.model.state_dict(),
            "opt_decoder": self.opt_decoder.state_dict(),
            "opt_encoder": self.opt_encoder.state_dict(),
            "history": history,
            "config": self.cfg.model_dump_json(),
        }

    def save(self, path: Path, iteration: int, history: list[dict]) -> Path:
        state = self.state(iteration, history)
        return atomic_write(path, lambda tmp: torch.save(state, tmp))

    def load(self, path: Path) -> tuple[int, list[dict]]:
        if not path.is_file():
            raise UserError(f"{path}: no checkpoint to resume from")
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(state["config"])
        now = self.cfg.model_dump(mode="json")
        diff = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
        if diff:
            raise UserError(f"{path}: checkpoint was written with different settings ({', '.join(diff)}); "
                            "use the same settings to resume or start a new output folder")
        self.model.load_state_dict(state["model"])
        self.opt_decoder.load_state_dict(state["opt_decoder"])
        self.opt_encoder.load_state_dict(state["opt_encoder"])
        return int(state["iteration"]), list(state["history"])


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
) -> TrainResult:
    """Train on the manifest's normal training images; write checkpoints and the bundle."""
    from .data.cache import load_resized

    out_dir = Path(out_dir)
    normal_train = manifest.select(split="train", label=0)
    if len(normal_train) == 0:
        raise UserError(f"{manifest.root}: no normal training images in the manifest")
    fit, val = split_validation(normal_train, calibration.validation_fraction, cfg.seed)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    images, _, _ = load_resized(fit, cfg.image_size, with_masks=False, progress=progress, cache_dir=cache_dir)
    images = images.to(device)

    # Resuming restores every tensor from the checkpoint, so no weights need to be fetched.
    model = build_model(cfg, weights="none" if resume else init_encoder)
    trainer = Trainer(model, cfg, device)
    ckpt = out_dir / "checkpoints" / CHECKPOINT_NAME
    start, history = trainer.load(ckpt) if resume else (0, [])

    losses: list[torch.Tensor] = []
    t0 = time.perf_counter()
    with track_steps("train", cfg.iterations, enabled=progress, completed=start) as bar:
        for it in range(start, cfg.iterations):
            idx = _to_device(batch_indices(it, images.shape[0], cfg.batch_size, cfg.seed), device)
            x = _prepare(images[idx], cfg, device, it, model.encoder.stats)
            alpha = alpha_at(it, cfg.iterations, cfg.alpha_start, cfg.alpha_end, cfg.alpha_warmup_fraction)
            losses.append(trainer.step(x, alpha))
            done = it + 1
            if done % cfg.log_every == 0 or done == cfg.iterations:
                mean_loss = torch.stack(losses).mean().item()  # the only host sync, every log_every
                losses.clear()
                history.append({"iteration": done, "loss": mean_loss, "alpha": alpha})
                bar.advance(0, info=f"loss {mean_loss:.4f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                trainer.save(ckpt, done, history)
            bar.advance(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    trained = cfg.iterations - start

    detector = Detector(model=trainer.model.eval(), config=cfg, inference=inference, calibration=None, meta={}, device=device)
    calib = _calibrate(detector, val if len(val) else fit, calibration, cfg, progress, cache_dir)
    bundle_dir = save_bundle(
        out_dir / "bundle", trainer.model, cfg, inference, calib,
        dataset_fingerprint=manifest.fingerprint,
        training={
            "iterations": cfg.iterations,
            "final_loss": history[-1]["loss"] if history else None,
            "wall_time_s": round(wall, 2),
            "init_encoder": init_encoder,
            "n_train_images": len(fit),
            "n_calibration_images": len(val) if len(val) else len(fit),
            "device": str(device),
        },
    )
    return TrainResult(
        bundle_dir=bundle_dir,
        history=history,
        iterations=cfg.iterations,
        wall_time_s=wall,
        images_per_s=trained * cfg.batch_size / wall if wall > 0 else 0.0,
        checkpoint=ckpt,
    )


def _prepare(batch_uint8: torch.Tensor, cfg: TrainConfig, device, iteration: int, stats) -> torch.Tensor:
    from .inference import normalize_images

    x = normalize_images(batch_uint8, device, stats=stats)
    if cfg.augment:
        x = augment_batch(x, iteration, cfg.seed)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def _calibrate(detector: Detector, calib_set: Manifest, calibration: CalibrationConfig, cfg: TrainConfig, progress: bool, cache_dir):
    """Production threshold from held-out normal images (target false-positive rate)."""
    from .data.cache import load_resized

    images, _, _ = load_resized(calib_set, cfg.image_size, with_masks=False, progress=progress, cache_dir=cache_dir)
    _, scores = detector.score_uint8(images)
    return fit_calibration(np.asarray(scores), None, target_fpr=calibration.target_fpr)
