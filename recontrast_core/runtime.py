"""Process-level plumbing shared by every layer: device choice, threads, seeding, atomic file
writes (the one atomic writer), JSON files, and the S3 endpoint rule."""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

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


# benchmarks/faults.py sets this to kill processes in the middle of writes; never set otherwise.
_FAILPOINT_WRITE_SLEEP = float(os.environ.get("RECONTRAST_FAILPOINT_WRITE_SLEEP", "0") or 0)


def remove_stale_temps(path: Path) -> int:
    """Delete temporary files :func:`atomic_write` left beside ``path`` when its process was
    killed mid-write (``kill -9`` skips clean-up); returns how many."""
    path = Path(path)
    n = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
        tmp.unlink(missing_ok=True)
        n += 1
    return n


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def honour_umask(path: Path, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (0644 / 0755 under umask
    022): temporary files and folders are made 0600 / 0700, and a server or pod running as
    another user must be able to read what is renamed into place."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write via a temporary file in the same folder, then rename: never a half-written file.
    The file gets the umask's mode (not the temporary file's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        honour_umask(Path(tmp))
        if _FAILPOINT_WRITE_SLEEP:  # fault injection only (benchmarks/faults.py): widen the window
            import time

            time.sleep(_FAILPOINT_WRITE_SLEEP)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, payload: Any) -> Path:
    """``payload`` as indented JSON, written atomically."""
    text = json.dumps(payload, indent=2, default=str) + "\n"
    return atomic_write(Path(path), lambda p: p.write_text(text))


def read_json(path: Path) -> Optional[Any]:
    """The JSON in ``path``, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# Environment variables naming an S3-compatible endpoint (MinIO, moto), first match wins.
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def s3_endpoint(endpoint_url: Optional[str] = None) -> Optional[str]:
    """The project's one S3 endpoint rule: the argument, else the first of
    :data:`S3_ENDPOINT_ENV` that is set, else None (AWS itself)."""
    if endpoint_url:
        return endpoint_url
    for name in S3_ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


# ---------------------------------------------------------------------------------------
# threads: follow the CPU quota (a Kubernetes pod's limit), not the host's core count
# ---------------------------------------------------------------------------------------
THREAD_ENV = ("RECONTRAST_NUM_THREADS", "OMP_NUM_THREADS")


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """CPUs this process may use by its cgroup quota (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None when unlimited or unknown."""
    try:
        fields = (cgroup_root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        if fields:
            return None
    except (OSError, ValueError, IndexError):
        pass
    for base in (cgroup_root / "cpu", cgroup_root / "cpu,cpuacct", cgroup_root):
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text())
            period = int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def default_threads(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Threads for torch: the CPUs this process may run on (affinity), capped by the
    cgroup quota (rounded down, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def configure_threads(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Set torch's intra-op threads from the CPU quota unless the user set them
    (``RECONTRAST_NUM_THREADS`` or ``OMP_NUM_THREADS``, which win). Torch otherwise sees the
    host's cores inside a CPU-limited pod and oversubscribes. Returns the thread count."""
    for name in THREAD_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            n = int(value)
            break
    else:
        n = default_threads(cgroup_root)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def ensure_output_dir(path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it is a writable folder, before any work starts
    (a run must not train for an hour and then fail at its first write)."""
    from .errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: the {what} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{path}: the {what} is not writable ({exc.strerror or exc})") from None
    return path


def load_torch_file(path: Path, what: str, map_location="cpu", error: Optional[type] = None):
    """``torch.load(path, weights_only=True)`` with a one-line :class:`UserError` naming the
    file on any failure (corrupt, truncated, or holding objects other than tensors: those
    are refused, never loaded unsafely)."""
    from .errors import UserError

    error = error or UserError
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc).strip()
        if "Unsupported global" in text:
            reason = "it holds objects other than tensors; refused (only tensor files are loaded)"
        elif "WeightsUnpickler error:" in text:  # torch's advice to load unsafely is dropped
            detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0][:120]
            reason = f"corrupt or truncated (not a tensor file: {detail})"
        else:
            first = (text.splitlines() or [type(exc).__name__])[0][:160]
            reason = f"corrupt or truncated ({type(exc).__name__}: {first})"
        raise error(f"{path}: cannot read the {what}: {reason}") from None


def read_safetensors(path: Path, what: str, error: Optional[type] = None) -> dict:
    """A safetensors file as a dict of tensors, or a one-line UserError naming the file."""
    from .errors import UserError, first_line

    error = error or UserError
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as exc:  # truncated, not a safetensors file
        raise error(f"{path}: cannot read the {what}: corrupt or truncated ({first_line(exc, 160)})") from None
