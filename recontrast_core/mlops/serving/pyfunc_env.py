"""What a logged pyfunc model needs to install its environment offline.

* The project's wheel (:func:`project_wheel`), logged inside the model as the artifact
  ``artifacts/recontrast-<version>-py3-none-any.whl``; ``requirements.txt`` names it by that
  path, relative to the model folder, so ``mlflow models serve --env-manager virtualenv``
  (or ``uv``), ``mlflow models prepare-env`` and ``mlflow models build-docker`` install the
  exact code that logged the model, with no index holding a ``recontrast`` package.
  Where it comes from: ``RECONTRAST_WHEEL`` (a ``.whl`` file, or a folder holding one), else
  built from the source tree when the package is imported from a checkout (``pip wheel
  --no-deps``, from a copy of the tree, cached per process by the sources' content), else
  repacked from the installed distribution's files (the project image installs it
  non-editable into site-packages).
* Pins (:func:`environment_pins`): ``name==version`` of every installed distribution that
  the wheel and MLflow pull in, written as the model's ``constraints.txt``: the serving
  environment gets the versions the model was logged (and its example scored) with, and pip
  does not backtrack. Local version labels are dropped (``torch==2.14.1`` also matches a
  ``2.14.1+cpu`` build from an extra index).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Optional

DIST_NAME = "recontrast"
WHEEL_ENV = "RECONTRAST_WHEEL"
# the files of a source tree that go into the wheel (pyproject's package-dir mapping)
_SOURCE_DIRS = ("recontrast_core", "components", "pipelines")
_SOURCE_FILES = ("pyproject.toml", "README.md")
# dist-info files an install adds: not part of the wheel
_INSTALL_ONLY = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}

_cache: dict[str, Path] = {}
_cache_dir: Optional[Path] = None


class WheelError(RuntimeError):
    """The project's wheel could not be found, built or repacked."""


def _work_dir() -> Path:
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="recontrast-wheel-"))
        atexit.register(shutil.rmtree, _cache_dir, True)
    return _cache_dir


def source_tree() -> Optional[Path]:
    """The checkout ``recontrast_core`` is imported from (pyproject.toml naming this
    project beside it), else None (an installed package)."""
    import recontrast_core

    root = Path(recontrast_core.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or not all((root / d).is_dir() for d in _SOURCE_DIRS):
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
    except (OSError, ValueError):
        return None
    return root if name == DIST_NAME else None


def _source_files(root: Path) -> list[Path]:
    """The files of ``root`` that go into the wheel (what :func:`build_from_source` copies
    and :func:`project_wheel` hashes): no __pycache__, *.pyc, build/, *.egg-info, compiled/."""
    files = [root / f for f in _SOURCE_FILES if (root / f).is_file()]
    for d in _SOURCE_DIRS:
        for p in sorted((root / d).rglob("*")):
            rel = p.relative_to(root).parts
            if p.is_file() and not any(x == "__pycache__" or x == "build" or x.endswith(".egg-info") or x == "compiled"
                                       for x in rel) and p.suffix != ".pyc":
                files.append(p)
    return files


def _content_key(root: Path) -> str:
    h = hashlib.sha256()
    for p in _source_files(root):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def build_from_source(root: Path, out_dir: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of ``root`` (setuptools writes build/ and
    *.egg-info beside the sources) into ``out_dir``; returns the wheel."""
    import importlib.util

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recontrast-src-") as tmp:
        src = Path(tmp) / "src"
        for p in _source_files(root):  # the files hashed for the cache key, no other
            dst = src / p.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out_dir), str(src)]
        if importlib.util.find_spec("setuptools") is not None:
            cmd.insert(4, "--no-build-isolation")  # offline and fast: the build backend is here
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as exc:
            raise WheelError(f"building the {DIST_NAME} wheel took over {exc.timeout:.0f}s") from None
    if res.returncode != 0:
        raise WheelError(f"building the {DIST_NAME} wheel failed: {(res.stderr or res.stdout).strip()[-2000:]}")
    wheels = sorted(out_dir.glob(f"{DIST_NAME}-*.whl"))
    if len(wheels) != 1:
        raise WheelError(f"building the {DIST_NAME} wheel left {len(wheels)} wheels in {out_dir}")
    return wheels[0]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack_installed(out_dir: Path, dist: Optional[md.Distribution] = None) -> Path:
    """The installed distribution's files (its RECORD) zipped back into a wheel: the same
    files the wheel it was installed from had, RECORD rewritten, install-only files and
    scripts outside site-packages (regenerated on install from entry_points.txt) left out."""
    dist = dist or md.distribution(DIST_NAME)
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    if isinstance(direct, dict) and (direct.get("dir_info") or {}).get("editable"):
        raise WheelError(f"{DIST_NAME} is installed editable outside its source tree: set {WHEEL_ENV} to a built wheel")
    name, version = dist.metadata["Name"], dist.version
    tag = "py3-none-any"
    for line in (dist.read_text("WHEEL") or "").splitlines():
        if line.startswith("Tag:"):
            tag = line.split(":", 1)[1].strip()
            break
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    entries: list[tuple[str, bytes]] = []
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0] == ".." or "__pycache__" in parts or f.suffix == ".pyc":
            continue
        if parts[0].endswith(".dist-info") and f.name in _INSTALL_ONLY:
            continue
        path = Path(dist.locate_file(f))
        if not path.is_file():
            raise WheelError(f"{DIST_NAME} {version}: installed file {f} is missing; reinstall it or set {WHEEL_ENV}")
        arc = "/".join(parts)
        if parts[0].endswith(".dist-info"):
            arc = "/".join((dist_info, *parts[1:]))
        entries.append((arc, path.read_bytes()))
    if not any(a.startswith("recontrast_core/") for a, _ in entries):
        raise WheelError(f"{DIST_NAME} {version}: no package files listed in its RECORD; set {WHEEL_ENV}")
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    record = [f"{a},{_record_hash(d)},{len(d)}" for a, d in entries] + [f"{dist_info}/RECORD,,"]
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for arc, data in sorted(entries, key=lambda e: (e[0].startswith(dist_info), e[0])):
            z.writestr(arc, data)
        z.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return wheel


def _explicit_wheel(value: str) -> Path:
    p = Path(value).expanduser()
    if p.is_dir():
        found = sorted(p.glob(f"{DIST_NAME}-*.whl"))
        if len(found) != 1:
            raise WheelError(f"{WHEEL_ENV}={value}: expected one {DIST_NAME}-*.whl in the folder, found {len(found)}")
        p = found[0]
    if not (p.is_file() and p.name.startswith(f"{DIST_NAME}-") and p.suffix == ".whl"):
        raise WheelError(f"{WHEEL_ENV}={value}: not a {DIST_NAME}-*.whl file")
    return p


def project_wheel(wheel: Optional[os.PathLike] = None) -> Path:
    """The wheel to log with the model: ``wheel``, else ``RECONTRAST_WHEEL``, else built from
    the source tree (cached per process by content), else repacked from the installation."""
    if wheel is not None:
        return _explicit_wheel(os.fspath(wheel))
    if os.environ.get(WHEEL_ENV, "").strip():
        return _explicit_wheel(os.environ[WHEEL_ENV].strip())
    root = source_tree()
    if root is not None:
        key = "src:" + _content_key(root)
    else:
        dist = md.distribution(DIST_NAME)
        key = f"dist:{dist.version}:{hashlib.sha256((dist.read_text('RECORD') or '').encode()).hexdigest()}"
    cached = _cache.get(key)
    if cached is not None and cached.is_file():
        return cached
    out = _work_dir() / hashlib.sha256(key.encode()).hexdigest()[:16]
    shutil.rmtree(out, ignore_errors=True)
    built = build_from_source(root, out) if root is not None else repack_installed(out)
    _cache[key] = built
    return built


def wheel_requires(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
        if meta is None:
            raise WheelError(f"{wheel.name}: no METADATA")
        text = z.read(meta).decode()
    from email.parser import Parser

    return Parser().parsestr(text).get_all("Requires-Dist") or []


def environment_pins(requirements: Iterable[str], skip: Iterable[str] = (DIST_NAME,)) -> list[str]:
    """``name==version`` (public version) of every installed distribution ``requirements``
    pull in, markers evaluated for this interpreter and the extras asked for; sorted.
    Requirements that are not installed here are left unpinned."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    skipped = {canonicalize_name(s) for s in skip}
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo: list[tuple[str, frozenset]] = [(r, frozenset()) for r in requirements]
    while todo:
        line, parent_extras = todo.pop()
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (parent_extras | {""})):
            continue
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if name in skipped or key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        try:
            pins[name] = f"{name}=={Version(dist.version).public}"
        except InvalidVersion:
            pins[name] = f"{name}=={dist.version}"
        todo.extend((r, frozenset(req.extras)) for r in (dist.requires or []))
    return sorted(pins.values())
