"""Device choice, seeding and atomic file writes shared by training, evaluation and adaptation."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from .errors import UserError

        raise UserError(f"device {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def amp_dtype_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (no grad scaler needed); full precision on CPU."""
    return torch.bfloat16 if enabled and device.type == "cuda" else None


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write via a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
