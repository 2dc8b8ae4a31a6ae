"""Training and evaluation throughput of ReContrast (prints numbers; asserts nothing).

    python benchmarks/speed.py --device cuda                 # paper + lite0 configs on a GPU
    python benchmarks/speed.py --device cpu --configs lite0 --train-iters 3 --eval-batches 2

Configurations:
- ``paper``: wide_resnet50_2 (random weights are fine for speed), batch 16, 256 px.
- ``lite0``: tf_efficientnet_lite0 with post-activation taps, batch 16, 256 px.

Training images/s counts optimiser steps x batch (the frozen copy's forward included);
evaluation images/s counts the whole scoring path: forward, six-pair anomaly map,
upsample, Gaussian blur (sigma 4) and image score, all on the device. Peak GPU memory
is reported per phase. Timed regions end with a device synchronisation.

``--compile`` compiles ``trainer.net`` (the module ``Trainer.step`` calls; ``trainer.model``
is the bare network it wraps) and times the first step apart (``compile_s``); evaluation
then runs the uncompiled network. On CUDA the optimisers are fused AdamW, or the unfused
one when constructing or stepping the fused one fails (``adamw`` in each result says which);
``versions`` (torch, timm, CUDA, cuDNN, the device) is printed first.
"""

from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_suite import environment, make_trainer, probe_fused_adamw, trainer_step, unfused_adamw  # noqa: E402

from recontrast_core.models import build_model  # noqa: E402
from recontrast_core.config import BackboneConfig, InferenceConfig, TrainConfig  # noqa: E402
from recontrast_core.inference import predict_batch  # noqa: E402
from recontrast_core.runtime import amp_dtype_for  # noqa: E402

CONFIGS = {
    "paper": dict(backbone=BackboneConfig(name="wide_resnet50_2", weights="none")),
    "lite0": dict(backbone=BackboneConfig(name="tf_efficientnet_lite0", weights="none")),
    "lite1": dict(backbone=BackboneConfig(name="tf_efficientnet_lite1", weights="none")),
    "lite2": dict(backbone=BackboneConfig(name="tf_efficientnet_lite2", weights="none")),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, device: torch.device, args) -> dict:
    cfg = TrainConfig(image_size=args.image_size, batch_size=args.batch_size, device=str(device), amp=not args.fp32,
                      channels_last=not args.no_channels_last, decoder_blocks=tuple(args.decoder_blocks),
                      bottleneck_blocks=args.bottleneck_blocks, **CONFIGS[name])
    trainer = make_trainer(build_model(cfg), cfg, device)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    compile_s = None
    if args.compile:
        t0 = time.perf_counter()
        trainer.net = torch.compile(trainer.net)  # what Trainer.step calls (trainer.model is never called)
        trainer_step(trainer, x, 1.0)  # compilation happens here, on the timed input's layout
        _sync(device)
        compile_s = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        trainer_step(trainer, x, 1.0)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.train_iters):
        trainer_step(trainer, x, 1.0)
    _sync(device)
    train_s = time.perf_counter() - t0
    train_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    model = trainer.model.eval()
    inf = InferenceConfig()
    xe = torch.randn(args.eval_batch, 3, cfg.image_size, cfg.image_size, device=device)
    if cfg.channels_last:
        xe = xe.contiguous(memory_format=torch.channels_last)
    amp = amp_dtype_for(device, cfg.amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        predict_batch(model, xe, inf, amp)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.eval_batches):
        predict_batch(model, xe, inf, amp)
    _sync(device)
    eval_s = time.perf_counter() - t0
    eval_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "config": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": "fp32" if amp is None else "bf16 autocast",
        "train_images_per_s": round(args.train_iters * cfg.batch_size / train_s, 2),
        "eval_images_per_s": round(args.eval_batches * args.eval_batch / eval_s, 2),
        "train_peak_gib": None if train_mem is None else round(train_mem, 2),
        "eval_peak_gib": None if eval_mem is None else round(eval_mem, 2),
        "batch": cfg.batch_size,
        "eval_batch": args.eval_batch,
        "image_size": cfg.image_size,
        "decoder_blocks": list(cfg.decoder_blocks),
        "bottleneck_blocks": cfg.bottleneck_blocks,
        "channels_last": cfg.channels_last,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "compiled": "trainer.net" if args.compile else None,
        "compile_s": compile_s,
        "adamw": trainer.adamw,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", default="paper,lite0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=50)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fp32", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--decoder-blocks", type=int, nargs=3, default=[3, 4, 6], help="paper: 3 4 6; CPU profile: 1 1 1")
    p.add_argument("--bottleneck-blocks", type=int, default=3)
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time reported apart)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: the CPU quota)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        from recontrast_core.runtime import configure_threads

        torch.set_num_threads(args.threads) if args.threads else configure_threads()
    env = environment(device, tiny=False, data=None)
    print("versions: " + json.dumps({k: env.get(k) for k in ("python", "torch", "timm", "cuda", "cudnn", "device", "tf32")}),
          flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fused_error = probe_fused_adamw(device)
    if fused_error is not None:
        print(f"fused AdamW failed ({fused_error}); using the unfused one", flush=True)
    with unfused_adamw(active=fused_error is not None):
        results = [bench(name, device, args) for name in args.configs.split(",")]
    for r in results:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
