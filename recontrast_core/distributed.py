"""Data-parallel training under ``torchrun``: this process's rank, device and process group.

``torchrun`` (or a Kubeflow TrainJob, which runs torchrun) sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them (env://
rendezvous), takes the GPU of ``LOCAL_RANK`` (NCCL) or stays on the CPU (gloo). Without
``WORLD_SIZE > 1`` nothing is initialised and training runs as one process, unchanged.
docs/distributed.md says what stays equal to one process and what does not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError
from .runtime import resolve_device


@dataclass(frozen=True)
class DistContext:
    """``world_size`` processes, this one is ``rank`` (``local_rank`` on its node);
    ``owns_group``: :func:`setup` created the process group, so :func:`teardown` ends it."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r}: not an integer (set by torchrun)") from None


def env_context() -> DistContext:
    """The ranks ``torchrun`` set in the environment (one process when unset)."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return DistContext(world, rank, local)


def is_main_process() -> bool:
    """True in the process that writes files and prints (rank 0, or the only one)."""
    return env_context().is_main


def per_process_batch(batch_size: int, world_size: int) -> int:
    """Each process's share of the global batch (``train.batch_size``); it must divide."""
    if batch_size % world_size:
        raise UserError(f"train.batch_size {batch_size} does not divide over {world_size} processes "
                        f"(WORLD_SIZE); use a multiple of {world_size}, it is the global batch")
    return batch_size // world_size


def rank_device(name: str, ctx: DistContext) -> torch.device:
    """``auto``/``cuda``: the GPU of ``LOCAL_RANK`` when CUDA is there; ``cpu``: the CPU.
    A fixed ``cuda:N`` would put every process on one GPU, so it is refused."""
    if not ctx.enabled:
        return resolve_device(name)
    if name.startswith("cuda:"):
        raise UserError(f"train.device {name!r} under torchrun: every process would use that one GPU; "
                        "use auto or cuda (each process takes the GPU of its LOCAL_RANK)")
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise UserError(f"LOCAL_RANK {ctx.local_rank} but this node has {count} GPU(s); "
                        f"start at most {count} processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", ctx.local_rank)


def setup(device_name: str) -> tuple[DistContext, torch.device]:
    """This process's context and device; joins (or reuses) the process group when
    ``WORLD_SIZE > 1``: NCCL on CUDA, gloo on the CPU."""
    ctx = env_context()
    device = rank_device(device_name, ctx)
    if not ctx.enabled:
        return ctx, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != ctx.world_size:
            raise UserError(f"a process group of {dist.get_world_size()} exists but WORLD_SIZE={ctx.world_size}")
        return ctx, device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", world_size=ctx.world_size, rank=ctx.rank,
                            device_id=device if device.type == "cuda" else None)
    return DistContext(ctx.world_size, ctx.rank, ctx.local_rank, owns_group=True), device


def teardown(ctx: DistContext) -> None:
    """End the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op for one)."""
    if ctx.enabled:
        dist.barrier()


def mean_across(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of ``t`` over the processes (every process gets it)."""
    if not ctx.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return t / ctx.world_size
