"""Where a CPU training step spends its time: per part of the model (forward) and the
backward + optimiser, and the top operators (torch.profiler).

    python benchmarks/cpu_breakdown.py --image-size 160 --decoder-blocks 1 1 1 --bottleneck-blocks 1

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from recontrast_core.config import BackboneConfig, TrainConfig  # noqa: E402
from recontrast_core.losses import recontrast_loss  # noqa: E402
from recontrast_core.models import build_model  # noqa: E402
from recontrast_core.train import Trainer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--decoder-blocks", type=int, nargs=3, default=[1, 1, 1])
    p.add_argument("--bottleneck-blocks", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(backbone=BackboneConfig(weights="none"), image_size=args.image_size, batch_size=args.batch_size,
                      decoder_blocks=tuple(args.decoder_blocks), bottleneck_blocks=args.bottleneck_blocks, device="cpu")
    trainer = Trainer(build_model(cfg), cfg, torch.device("cpu"))
    model = trainer.model
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size).contiguous(memory_format=torch.channels_last)
    trainer.step(x, 1.0)  # warm-up
    parts = {"encoder (trainable)": 0.0, "encoder (frozen copy)": 0.0, "bottleneck": 0.0, "decoder + heads": 0.0,
             "loss + backward + optimisers": 0.0}
    for _ in range(args.steps):
        t = time.perf_counter()
        feats = model.encoder(x)
        parts["encoder (trainable)"] += time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            frozen = model.frozen(x)
        parts["encoder (frozen copy)"] += time.perf_counter() - t
        t = time.perf_counter()
        paired = [torch.cat([a, b], dim=0) for a, b in zip(feats, frozen)]
        z = model.bottleneck(paired)
        parts["bottleneck"] += time.perf_counter() - t
        t = time.perf_counter()
        decoded = model.decoder(z)
        head1 = [h(d[: cfg.batch_size]) for h, d in zip(model.head1, decoded)]
        head2 = [h(d[cfg.batch_size:]) for h, d in zip(model.head2, decoded)]
        parts["decoder + heads"] += time.perf_counter() - t
        t = time.perf_counter()
        loss = recontrast_loss(frozen, feats, head1, head2, 1.0)
        trainer.opt_decoder.zero_grad(set_to_none=True)
        trainer.opt_encoder.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt_decoder.step()
        trainer.opt_encoder.step()
        parts["loss + backward + optimisers"] += time.perf_counter() - t
    total = sum(parts.values())
    out = {"image_size": cfg.image_size, "batch": cfg.batch_size, "threads": torch.get_num_threads(),
           "decoder_blocks": list(cfg.decoder_blocks), "bottleneck_blocks": cfg.bottleneck_blocks,
           "step_s": round(total / args.steps, 3),
           "share": {k: round(v / total, 3) for k, v in parts.items()}}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step(x, 1.0)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    step_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    out["top_ops"] = {e.key: round(e.self_cpu_time_total / step_us, 3) for e in rows}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
