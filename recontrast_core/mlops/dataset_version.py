"""A new version of a DVC-tracked dataset folder: ``dvc add``, ``dvc push``, a git commit.

The folder lies in a git + DVC repository (the one training reads with ``data.dvc_repo`` /
``data.dvc_rev``, docs/dvc.md). :func:`version_dataset` re-adds it (``<folder>.dvc`` gets the
new content hash), pushes the new files to the DVC remote (the repository's default remote,
or ``remote``; endpoint and credentials from the repository's config and the environment, as
for every DVC command) and commits ``<folder>.dvc`` (and the ``.gitignore`` DVC keeps beside
it) to git, optionally tagged: the next training that reads the repository at its branch
sees the new version. Pushing the git commit to its own remote is left to the caller (it is
a code review step in most teams).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Optional, Union

import yaml

from ..errors import UserError, first_line

PathLike = Union[str, os.PathLike]


def dvc_repo_root(path: PathLike) -> Path:
    """The root of the DVC repository holding ``path`` (a :class:`UserError` if none)."""
    from dvc.repo import Repo

    p = Path(path).resolve()
    try:
        return Path(Repo.find_root(str(p if p.is_dir() else p.parent)))
    except Exception:
        raise UserError(f"{path}: not inside a DVC repository (`dvc init` in its git repository, or import "
                        "without versioning: --no-dvc)") from None


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise UserError(f"{repo}: git {' '.join(args[:2])} failed: {first_line(proc.stderr or proc.stdout)}")
    return proc.stdout.strip()


@contextlib.contextmanager
def _dvc_quiet():
    """DVC's own INFO lines (hints, progress) off while we drive it: stdout stays ours (--json)."""
    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _md5(dvc_file: Path) -> Optional[str]:
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        return str(outs[0].get("md5")) if outs else None
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def version_dataset(folder: PathLike, message: str, *, remote: Optional[str] = None, push: bool = True,
                    commit: bool = True, tag: Optional[str] = None) -> dict:
    """``dvc add`` ``folder``, ``dvc push`` it, commit its ``.dvc`` file (and tag). Returns
    ``{"repo", "path", "dvc_file", "md5", "previous_md5", "pushed", "remote", "commit", "tag"}``
    (``commit`` None when ``commit`` is false or nothing changed). Every failure of DVC or git
    is one line (:class:`UserError`)."""
    from dvc.repo import Repo

    folder = Path(folder).resolve()
    root = dvc_repo_root(folder)
    rel = folder.relative_to(root).as_posix()
    dvc_file = folder.with_name(folder.name + ".dvc")
    previous = _md5(dvc_file)  # None: the folder was not tracked yet
    pushed = 0
    try:
        with _dvc_quiet(), Repo(str(root)) as repo:
            repo.scm_context.quiet = True  # no "To track the changes with git, run ..." hint: we commit
            repo.add([str(folder)])
            if push:
                pushed = int(repo.push(targets=[str(dvc_file)], remote=remote) or 0)
            remote = remote or _default_remote(repo)
    except UserError:
        raise
    except Exception as exc:  # dvc: no remote, unreachable S3, credentials, a broken cache
        what = "push to the DVC remote" if push else "dvc add"
        raise UserError(f"{folder}: {what} failed: {first_line(exc)}") from exc
    md5 = _md5(dvc_file)
    sha = None
    if commit and _is_git(root):
        paths = [dvc_file.relative_to(root).as_posix()]
        ignore = folder.parent / ".gitignore"
        if ignore.is_file():
            paths.append(ignore.relative_to(root).as_posix())
        _git(root, "add", "--", *paths)
        if _git(root, "diff", "--cached", "--name-only", "--", *paths):
            _git(root, "commit", "-q", "-m", message, "--", *paths)
        sha = _git(root, "rev-parse", "HEAD")
        if tag:
            _git(root, "tag", tag)
    return {"repo": str(root), "path": rel, "dvc_file": dvc_file.relative_to(root).as_posix(), "md5": md5,
            "previous_md5": previous, "pushed": pushed, "remote": remote,
            "commit": sha, "tag": tag if sha else None}


def _is_git(root: Path) -> bool:
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--is-inside-work-tree"], capture_output=True,
                          text=True, timeout=60)
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def _default_remote(repo) -> Optional[str]:
    """The repository's default DVC remote (``core.remote``), or None."""
    try:
        return repo.config.get("core", {}).get("remote")
    except Exception:  # noqa: BLE001 - only reported, never needed
        return None
