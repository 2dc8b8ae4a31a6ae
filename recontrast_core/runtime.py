"""Process-level plumbing shared by every layer: device choice, threads, seeding, atomic file
writes (the one atomic writer), JSON files, and the S3 endpoint rule."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import contextlib
import errno
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


# ---------------------------------------------------------------------------------------
# the one write path: every output file is counted (the disk-full failpoint), fsynced and
# renamed into place; a full disk becomes one line naming the file
# ---------------------------------------------------------------------------------------
# benchmarks/faults.py and tests set these; never set otherwise.
FAILPOINT_ENOSPC_ENV = "RECONTRAST_FAILPOINT_ENOSPC_AT"  # N: the Nth write of the process fails
WRITE_LOG_ENV = "RECONTRAST_WRITE_LOG"  # a file: each write point's target path appended
_WRITE_COUNT = 0
_WRITE_LOCK = threading.Lock()
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "QuotaExceeded", "Disk quota exceeded",
                   "file write failed", "FileTooLarge")


class _StepFrame:
    """The files one step wrote under its output folder (removed when the step fails)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir).resolve()
        self.written: list[Path] = []

    def note(self, path: Path) -> None:
        try:
            path.resolve().relative_to(self.out_dir)
        except ValueError:
            return
        with _WRITE_LOCK:
            self.written.append(path)


_STEP_FRAMES: list[_StepFrame] = []


def note_output(path: Path) -> None:
    """Record ``path`` as an output of the running step (every write point does; a folder
    renamed into place whole, a bundle or overlays/, is noted by its writer): removed with
    the step's files when the step fails."""
    for frame in _STEP_FRAMES:
        frame.note(Path(path))


def write_point(path: Path) -> None:
    """Count one output write (of ``path``); with ``RECONTRAST_FAILPOINT_ENOSPC_AT=N`` the Nth
    write of this process raises ``OSError(ENOSPC)``, as a full disk would."""
    global _WRITE_COUNT
    with _WRITE_LOCK:
        _WRITE_COUNT += 1
        n = _WRITE_COUNT
    note_output(path)
    log = os.environ.get(WRITE_LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(f"{n}\t{path}\n")
    at = os.environ.get(FAILPOINT_ENOSPC_ENV, "").strip()
    if at.isdigit() and int(at) == n:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def reset_write_points() -> None:
    """Start counting writes from 1 again (tests run several commands in one process)."""
    global _WRITE_COUNT
    with _WRITE_LOCK:
        _WRITE_COUNT = 0


def is_disk_full(exc: BaseException) -> bool:
    """A full disk or quota, however the writer reports it (OSError errno; torch's
    "file write failed"; safetensors' "StorageFull")."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return any(t in str(exc) for t in _DISK_FULL_TEXT)


# A writer that reports a full disk in its own words (torch: "unexpected pos N vs M") is
# recognised by the file system itself: less than this free in the target's folder.
DISK_NEARLY_FULL_BYTES = 1 << 20


def disk_nearly_full(folder: Path) -> bool:
    """Less than :data:`DISK_NEARLY_FULL_BYTES` free for this user in ``folder``'s file system."""
    try:
        return shutil.disk_usage(folder).free < DISK_NEARLY_FULL_BYTES
    except OSError:
        return False


def _failed_on_full_disk(exc: BaseException, folder: Path) -> bool:
    """A write into ``folder`` that raised ``exc`` failed because the disk is full: then its
    traceback is dropped (:func:`_drop`) so that the writer's open file is closed."""
    if isinstance(exc, Exception) and (is_disk_full(exc) or disk_nearly_full(folder)):
        return _drop(exc)
    return False


def disk_full_message(exc: BaseException) -> Optional[str]:
    """One line for a full-disk failure raised outside :func:`atomic_write` (a dataset copy,
    a download): the file when the error names it; None when ``exc`` is no full disk."""
    if not is_disk_full(exc):
        return None
    where = getattr(exc, "filename", None)
    return f"{where or 'an output'}: cannot write, no space left on device (free space, then run again)"


def disk_full_error(path: Path):
    """The one-line error for a write of ``path`` that failed on a full disk."""
    from .errors import DiskFullError

    return DiskFullError(f"{path}: cannot write, no space left on device (free space, then run again; "
                         "nothing was left half-written)")


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a folder's entries) to the disk; best effort where the
    file system cannot (some network mounts refuse fsync on folders)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in _DISK_FULL_ERRNOS:
            raise
    finally:
        os.close(fd)


def staged_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` inside a staging folder that is renamed into place as a whole (a
    bundle, an overlays folder): counted, fsynced, a full disk reported in one line. The
    caller removes the staging folder when this raises."""
    path = Path(path)
    full = False
    try:
        write_point(path)
        write(path)
        fsync_path(path)
    except Exception as exc:
        full = _failed_on_full_disk(exc, path.parent)
        if not full:
            raise
    if full:
        path.unlink(missing_ok=True)
        raise disk_full_error(path)
    return path


def _drop(exc: BaseException) -> bool:
    """Forget a failed writer's traceback: its frames keep the writer (and its open file)
    alive, and an open deleted file keeps the full disk full. Returns True."""
    exc.__traceback__ = None
    exc.__context__ = None
    return True


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write via a temporary file in the same folder, fsync, then rename (and fsync the
    folder): never a half-written file. The file gets the umask's mode (not the temporary
    file's 0600). Every output of the tool goes through here (or :func:`staged_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    full = False
    try:
        write_point(path)
        write(Path(tmp))
        fsync_path(Path(tmp))
        honour_umask(Path(tmp))
        if _FAILPOINT_WRITE_SLEEP:  # fault injection only (benchmarks/faults.py): widen the window
            import time

            time.sleep(_FAILPOINT_WRITE_SLEEP)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    except BaseException as exc:
        full = _failed_on_full_disk(exc, path.parent)
        if not full:
            Path(tmp).unlink(missing_ok=True)
            raise
    if full:  # raised outside the handler: the writer's frames are gone, its file closed
        Path(tmp).unlink(missing_ok=True)
        raise disk_full_error(path)
    return path


def atomic_write_json(path: Path, payload: Any) -> Path:
    """``payload`` as indented JSON, written atomically."""
    text = json.dumps(payload, indent=2, default=str) + "\n"
    return atomic_write(Path(path), lambda p: p.write_text(text))


# ---------------------------------------------------------------------------------------
# bounded JSON: every JSON file the tool reads goes through load_json (or read_json)
# ---------------------------------------------------------------------------------------
# No file the tool reads nests deeper than ~6 levels (COCO segmentation); Python's parser
# dies with a RecursionError near 1,000. Refused before parsing, naming the file.
JSON_MAX_DEPTH = 100
# Size limit of one JSON file, in MB (10**6 bytes); a large COCO file is a few hundred MB.
JSON_MAX_MB_ENV = "RECONTRAST_JSON_MAX_MB"
JSON_MAX_MB_DEFAULT = 1024.0


def human_bytes(n: float) -> str:
    """``5.0 KB``, ``3.2 GB``: decimal units (1 KB = 1000 bytes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def positive_env(name: str, default: float, message: str = "{name}={raw!r}: expected a number > 0",
                 integer: bool = False) -> float:
    """A finite number > 0 (a whole one with ``integer``) from the environment variable
    ``name``; unset or blank: ``default``. Anything else is a UserError: ``message`` formatted
    with ``name`` and ``raw``."""
    from .errors import UserError

    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
        if not 0 < value < float("inf") or (integer and value < 1):
            raise ValueError
    except ValueError:
        raise UserError(message.format(name=name, raw=raw)) from None
    return value


def json_max_bytes() -> int:
    """The size limit of a JSON file: ``RECONTRAST_JSON_MAX_MB`` (default 1024 MB)."""
    mb = positive_env(JSON_MAX_MB_ENV, JSON_MAX_MB_DEFAULT, "{name}={raw!r}: expected a size in MB > 0, e.g. 2048")
    return int(mb * 1e6)


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in UTF-8 JSON ``data`` (brackets inside
    strings do not count), without parsing: one vectorised pass (~0.5 s per 100 MB). Where
    the file holds at most :data:`JSON_MAX_DEPTH` opening brackets, their count (a bound)."""
    opening = data.count(b"[") + data.count(b"{")
    if opening <= JSON_MAX_DEPTH:
        return opening  # a bound, and within the limit: no scan needed
    arr = np.frombuffer(data, dtype=np.uint8)
    quotes = np.flatnonzero(arr == 0x22)
    if len(quotes):  # drop escaped quotes: preceded by an odd number of backslashes
        maybe = quotes[(quotes > 0) & (arr[np.maximum(quotes - 1, 0)] == 0x5C)]
        escaped = []
        for i in maybe.tolist():
            j = i - 1
            while j >= 0 and data[j] == 0x5C:
                j -= 1
            if (i - 1 - j) % 2:
                escaped.append(i)
        if escaped:
            quotes = np.setdiff1d(quotes, np.asarray(escaped, dtype=quotes.dtype), assume_unique=True)
    table = np.zeros(256, dtype=np.int8)
    table[[0x5B, 0x7B]] = 1  # [ {
    table[[0x5D, 0x7D]] = -1  # ] }
    step = table[arr]
    where = np.flatnonzero(step)
    outside = np.searchsorted(quotes, where) % 2 == 0  # an even number of quotes before: not in a string
    moves = step[where[outside]].astype(np.int32)
    return int(np.cumsum(moves).max()) if len(moves) else 0


def _json_problem(path: Path) -> tuple[Optional[str], Any]:
    """(problem, None) or (None, the parsed JSON) for the file at ``path``."""
    limit = json_max_bytes()
    try:
        size = path.stat().st_size
        if size > limit:
            return (f"JSON file of {human_bytes(size)} is over the {human_bytes(limit)} limit "
                    f"(set {JSON_MAX_MB_ENV} to raise it)"), None
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read ({exc.strerror or type(exc).__name__})", None
    try:
        if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors)
            data = data[3:]
        elif data[:4].count(b"\x00"):  # UTF-16/32, which json accepts: scan its UTF-8 form
            data = data.decode(json.detect_encoding(data)).encode("utf-8")
    except (UnicodeError, LookupError) as exc:
        return f"invalid JSON ({type(exc).__name__}: {exc})"[:200], None
    if json_depth(data) > JSON_MAX_DEPTH:
        return f"JSON nested deeper than {JSON_MAX_DEPTH} levels (refused before parsing)", None
    try:
        return None, json.loads(data)
    except RecursionError:  # pragma: no cover - the depth check comes first
        return f"JSON nested deeper than {JSON_MAX_DEPTH} levels", None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        line = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        return f"invalid JSON ({line})", None


def load_json(path: Path, error: Optional[Callable[[Path, str], Exception]] = None) -> Any:
    """The JSON in ``path``, parsed within the depth (:data:`JSON_MAX_DEPTH`) and size
    (``RECONTRAST_JSON_MAX_MB``) limits. Any problem raises ``error(path, problem)``
    (default: a one-line :class:`~recontrast_core.errors.UserError` ``"<path>: <problem>"``)."""
    from .errors import UserError

    path = Path(path)
    problem, value = _json_problem(path)
    if problem is not None:
        raise (error or (lambda p, m: UserError(f"{p}: {m}")))(path, problem)
    return value


def read_json(path: Path) -> Optional[Any]:
    """The JSON in ``path``, or None when the file is missing, not valid JSON, or over the
    limits of :func:`load_json`."""
    json_max_bytes()  # a bad RECONTRAST_JSON_MAX_MB is an error, not "no file"
    return _json_problem(Path(path))[1]


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
# memory: what a device has free (training checks its estimate against it before starting)
# ---------------------------------------------------------------------------------------
def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_memory_free(cgroup_root: Path) -> Optional[int]:
    """Bytes this process's cgroup may still use (its limit minus its working set: usage
    less reclaimable file cache), cgroup v2 or v1; None when unlimited or unknown."""
    for limit_file, usage_file, stat_key in (("memory.max", "memory.current", "inactive_file"),
                                             ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                              "total_inactive_file")):
        limit = _read_int(cgroup_root / limit_file)
        if limit is None or limit >= 1 << 60:  # "max", or v1's "unlimited" (~2**63)
            continue
        usage = _read_int(cgroup_root / usage_file) or 0
        inactive = 0
        try:
            for line in (cgroup_root / limit_file).with_name("memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == stat_key and value.strip().isdigit():
                    inactive = int(value)
        except OSError:
            pass
        return max(0, limit - max(0, usage - inactive))
    return None


def _host_memory_available() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: torch.device, cgroup_root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """Bytes free for this process on ``device``: CUDA's free memory on that GPU; on the
    CPU the host's available memory (psutil, else /proc/meminfo), capped by the cgroup's
    memory limit (a Kubernetes pod's). None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    host = _host_memory_available()
    cgroup = _cgroup_memory_free(cgroup_root)
    known = [x for x in (host, cgroup) if x is not None]
    return min(known) if known else None


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
        # torch names the refused global as "Unsupported global: GLOBAL x.y" (torch < 2.14)
        # or "unsupported GLOBAL x.y whose module x is blocked" (2.14): matched in any case
        unsafe = re.search(r"unsupported\s+global\W+(?:global\s+)?([\w.]+)", text, re.IGNORECASE)
        if unsafe:
            reason = (f"refused: it would run code on load (weights_only; it names {unsafe.group(1)}, "
                      "not a tensor; only tensor files are loaded)")
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


LOCK_FILE = ".recontrast.lock"
_HELD_LOCKS: set[str] = set()  # output folders this process holds


@contextlib.contextmanager
def output_lock(out_dir: Path, what: str = "output folder"):
    """Hold ``out_dir`` for one writer: a second run into the same folder gets one line
    ("in use by pid N") instead of colliding on its temporary files. An OS file lock
    (``flock``) on ``out_dir/.recontrast.lock``: a killed run (kill -9) releases it with its
    process; a finished run removes the file (outputs stay the same bytes, for DVC's cache)."""
    import fcntl

    from .errors import UserError

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    key = str(out_dir.resolve())
    if key in _HELD_LOCKS:  # this process holds it already (a step around the core function)
        yield out_dir
        return
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise UserError(f"{out_dir}: {what} in use by another recontrast run (pid {holder}); "
                            "wait for it or choose another folder") from None
        try:  # the holder before us may have removed the file we opened: lock the one on disk
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        _HELD_LOCKS.add(key)
        yield out_dir
    finally:
        _HELD_LOCKS.discard(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        f.close()


# ---------------------------------------------------------------------------------------
# completion markers: a step's outputs count only when its marker says "complete"
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def step_outputs(out_dir: Path, step: str):
    """Mark ``out_dir`` as the ``step``'s output folder being written: its marker
    (:data:`~recontrast_core.filenames.STEP_MARKER_FILE`) says ``running`` first and
    ``complete`` last. When the body raises, the files it wrote are
    removed and the marker says ``failed`` (kill -9 leaves ``running``): the next step's
    :func:`require_complete` refuses the folder either way. The marker holds no times, so a
    rerun writes the same bytes (DVC's cache). The folder is held (:func:`output_lock`) for
    the step, and temporaries of killed runs are removed first."""
    out = Path(out_dir)
    with output_lock(out, f"{step} output folder"):
        remove_stale_staging(out)
        with _marked(out, step):
            yield out


def remove_stale_staging(out: Path) -> int:
    """Remove what killed runs left in ``out`` (kill -9 skips every clean-up): temporary
    files of :func:`atomic_write` (``.NAME.*.tmp``), staging folders (``.NAME.tmp``,
    ``.NAME.old``, ``.overlays.*``) in ``out`` and its sub-folders one level down (a copied
    dataset deeper down is left alone). Only called with ``out`` locked; returns how many."""
    n = 0
    for p in [*Path(out).glob(".*"), *Path(out).glob("*/.*")]:
        name = p.name
        if name.endswith((".tmp", ".old")) or name.startswith(".overlays."):
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                n += 1
    return n


@contextlib.contextmanager
def _marked(out: Path, step: str):
    from .filenames import STEP_MARKER_FILE

    marker = out / STEP_MARKER_FILE
    atomic_write_json(marker, {"step": step, "status": "running"})
    frame = _StepFrame(out)
    _STEP_FRAMES.append(frame)
    try:
        yield out
        atomic_write_json(marker, {"step": step, "status": "complete"})
    except BaseException:
        for path in frame.written:
            if path != marker:
                with contextlib.suppress(OSError):
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.is_file():
                        path.unlink()
        with contextlib.suppress(Exception):
            atomic_write_json(marker, {"step": step, "status": "failed"})
        raise
    finally:
        _STEP_FRAMES.remove(frame)


def require_complete(folder: Path, step: str) -> None:
    """Refuse ``folder`` when its marker says the ``step`` that wrote it did not finish
    (``running``: killed, or still at work; ``failed``). A folder without a marker (made by
    hand, downloaded from a registry, written before markers existed) is accepted."""
    from .errors import UserError
    from .filenames import STEP_MARKER_FILE

    marker = Path(folder) / STEP_MARKER_FILE
    if not marker.is_file():
        return
    info = read_json(marker)
    status = info.get("status") if isinstance(info, dict) else None
    if status != "complete":
        wrote = info.get("step", step) if isinstance(info, dict) else step
        raise UserError(f"{folder}: the {wrote} step that wrote this folder did not finish "
                        f"({STEP_MARKER_FILE}: {status or 'unreadable'}); run it again")
