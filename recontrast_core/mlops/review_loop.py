"""The human review loop, MLOps side: a batch-scoring table -> a LabelMe project (export),
the reviewed project -> a new DVC version of the dataset (import).

The core does the images and the files (:mod:`recontrast_core.review`); this module reads
the results table (``results.parquet`` / ``results.csv`` of
:mod:`recontrast_core.mlops.batch_scoring`, in a folder or under an ``s3://`` prefix),
resolves the model that scored it (the exact version: ``model_version`` of the rows), fetches
``s3://`` images, and after an import checks the dataset (``recontrast data check``'s
report: the dataset card before and after, and their difference) and versions it with DVC
(:mod:`recontrast_core.mlops.dataset_version`).
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import UserError
from ..filenames import RESULTS_FILE
from ..review import (
    DEFAULT_BAND,
    DEFAULT_LABEL,
    IMPORT_FILE,
    card_diff,
    export_review,
    import_into_dataset,
    read_review,
    remove_files,
    select_for_review,
)
from ..runtime import atomic_write_json

PathLike = Union[str, os.PathLike]
RESULTS_PARQUET = "results.parquet"  # batch_scoring's merged table
DATASET_CARD_AFTER = "dataset_card.json"
_REGISTERED = re.compile(r"^(?P<name>[^/]+)/(?P<version>\d+)$")


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------
def _parse_csv(data: bytes) -> list[dict]:
    rows = []
    for row in csv.DictReader(io.StringIO(data.decode("utf-8"))):
        out: dict[str, Any] = dict(row)
        for key in ("score", "normalized_score"):
            out[key] = float(row[key]) if row.get(key) not in (None, "") else None
        d = (row.get("decision") or "").strip().lower()
        out["decision"] = None if d == "" else d in ("true", "1", "yes")
        rows.append(out)
    return rows


def _parse_parquet(data: bytes) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data)).to_pylist()


def _parse_table(where: str, data: bytes) -> list[dict]:
    """The rows of the table ``where`` (its name says parquet or CSV) read as ``data``."""
    try:
        rows = _parse_parquet(data) if where.endswith(".parquet") else _parse_csv(data)
    except Exception as exc:
        raise UserError(f"{where}: not a readable scores table ({exc})") from None
    if rows and not {"path", "score", "normalized_score", "decision"} <= set(rows[0]):
        raise UserError(f"{where}: not a scores table (needs path, score, normalized_score, decision)")
    return rows


def read_scores_table(table: PathLike) -> list[dict]:
    """The rows of a batch-scoring table: a ``results.parquet`` / ``results.csv`` file, the
    output folder holding it, or the same on S3 (``s3://bucket/prefix/`` or the object)."""
    text = str(table)
    if text.startswith("s3://"):
        from .locations import open_location

        is_file = text.endswith((".parquet", ".csv"))
        folder, _, name = text.rpartition("/") if is_file else (text, "", "")
        loc = open_location(folder)
        for candidate in ([name] if is_file else [RESULTS_PARQUET, RESULTS_FILE]):
            try:
                data = loc.read_bytes(candidate)
            except UserError:  # S3 errors (NoSuchKey among them) come as one line
                continue
            return _parse_table(loc.join(candidate), data)
        raise UserError(f"{text}: no {RESULTS_PARQUET} or {RESULTS_FILE} (run batch scoring first)")
    p = Path(text)
    if p.is_dir():
        p = p / RESULTS_PARQUET if (p / RESULTS_PARQUET).is_file() else p / RESULTS_FILE
    if not p.is_file():
        raise UserError(f"{table}: no scores table (a results.parquet / results.csv of `recontrast predict`, "
                        "or its output folder)")
    return _parse_table(str(p), p.read_bytes())


def _model_of(rows: list[dict], model_uri: Optional[str]) -> tuple[str, Optional[str]]:
    """The model to re-score with: ``model_uri`` when given, else the exact weights that
    scored the table (``models:/NAME/VERSION`` for a registered version, else its URI)."""
    if model_uri:
        return model_uri, None
    versions = {r.get("model_version") for r in rows if r.get("model_version")}
    uris = {r.get("model_uri") for r in rows if r.get("model_uri")}
    if len(versions) > 1:
        raise UserError(f"the table was scored by several models ({', '.join(sorted(versions))}); give --model")
    if not versions or not uris:
        raise UserError("the table does not say which model scored it (no model_uri / model_version); give --model")
    version = next(iter(versions))
    m = _REGISTERED.match(version)
    return (f"models:/{m['name']}/{m['version']}" if m else next(iter(uris))), version


def export_from_table(table: PathLike, out_dir: PathLike, *, band: Sequence[float] = DEFAULT_BAND,
                      model_uri: Optional[str] = None, tracking_uri: Optional[str] = None,
                      label: str = DEFAULT_LABEL, limit: Optional[int] = None, flagged: bool = True,
                      device: str = "auto", progress: bool = True) -> dict:
    """``recontrast review export``: the rows to review from ``table``
    (:func:`~recontrast_core.review.select_for_review`) as a LabelMe project in ``out_dir``
    with polygons from the model's maps. Returns the ``review.json`` payload."""
    from ..bundle import load_detector
    from .model_source import resolve_model

    rows = read_scores_table(table)
    picked = select_for_review(rows, band, flagged=flagged, limit=limit)
    uri, version = _model_of(rows, model_uri) if rows else (model_uri, None)
    if uri is None:
        raise UserError(f"{table}: the table is empty; nothing to review")
    with tempfile.TemporaryDirectory(prefix="recontrast-review-") as tmp:
        scratch = Path(tmp)
        model = resolve_model(uri, scratch / "model", tracking_uri)
        if version is not None and version.startswith("bundle:") and model.version != version:
            raise UserError(f"{uri}: the bundle changed since it scored the table ({model.version} != {version}); "
                            "give --model")
        detector = load_detector(model.bundle_dir, device)
        fetch = _fetcher(scratch / "images")
        return export_review(detector, picked, out_dir, local_path=fetch, band=band, label=label,
                             source_table=str(table), model={"uri": model.uri, "version": model.version},
                             progress=progress)


def _fetcher(dest: Path):
    """``row -> local file``: local paths as they are, ``s3://`` objects downloaded (one
    client for all; a running number keeps same-named objects apart)."""
    client = None
    count = itertools.count(1)

    def fetch(row: dict) -> Path:
        nonlocal client
        path = str(row["path"])
        if not path.startswith("s3://"):
            if not Path(path).is_file():
                raise UserError(f"{path}: image of the table not found")
            return Path(path)
        from .storage import parse_s3_uri, s3_client, s3_errors, with_retries

        client = client or s3_client()
        bucket, key = parse_s3_uri(path)
        target = dest / f"{next(count):05d}-{Path(key).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with s3_errors(path):
            with_retries(lambda: client.download_file(bucket, key, str(target)), f"get {path}")
        return target

    return fetch


# ---------------------------------------------------------------------------------------
# the import
# ---------------------------------------------------------------------------------------
def import_review(project: PathLike, dataset: PathLike, *, layout: str = "auto", dvc: bool = True,
                  remote: Optional[str] = None, push: bool = True, commit: bool = True, tag: Optional[str] = None,
                  progress: bool = True) -> dict:
    """``recontrast review import``: the reviewed images of ``project`` into the dataset at
    ``dataset`` (MVTec or LabelMe layout), checked (the dataset must pass ``recontrast data
    check`` before and after; otherwise the import is undone), then, with ``dvc``, a new DVC
    version of the folder pushed to the remote and committed. Writes ``project/import.json``
    (counts, the files written, the dataset card's difference, the DVC version) and
    ``project/dataset_card.json`` (the card after); returns the first."""
    from ..data.layouts import resolve_layout
    from ..data.report import check_dataset

    root = Path(dataset)
    meta, items = read_review(project)
    if dvc:
        from .dataset_version import dvc_repo_root

        dvc_repo_root(root)  # before any file is written
    layout = resolve_layout(root, layout)
    before, manifest = check_dataset(root, layout, progress=progress)
    if not before["ok"] or manifest is None:
        first = (before.get("problems") or [{"path": str(root), "problem": "cannot be read"}])[0]
        raise UserError(f"{root}: the dataset fails its checks before the import ({first['path']}: "
                        f"{first['problem']}); run `recontrast data check {root}`")
    before["fingerprint"] = manifest.with_hashes().fingerprint
    result = import_into_dataset(items, root, layout, manifest)
    written = [root / rel for rel in result["written"]]
    after, manifest_after = check_dataset(root, layout, progress=progress)
    if manifest_after is not None:
        after["fingerprint"] = manifest_after.with_hashes().fingerprint
    if not after["ok"]:
        remove_files(written)
        first = (after.get("problems") or [{"path": str(root), "problem": "?"}])[0]
        raise UserError(f"{root}: the import would break the dataset ({first['path']}: {first['problem']}); "
                        "nothing was imported")
    version = None
    if dvc:  # also with nothing new: a rerun after a failed push pushes and commits what is there
        from .dataset_version import version_dataset

        message = (f"data: review import of {Path(project).name}: {result['anomalies']} anomalies, "
                   f"{result['normals']} normals")
        try:
            version = version_dataset(root, message, remote=remote, push=push, commit=commit, tag=tag)
        except UserError as exc:
            raise UserError(f"{exc} (the reviewed images are in {root}: run the import again once fixed)") from None
    payload = {"project": str(Path(project).resolve()), "dataset": str(root.resolve()), "layout": layout,
               "model": meta.get("model"), **result, "dataset_card_diff": card_diff(before, after),
               "fingerprint": after.get("fingerprint"), "dvc": version}
    atomic_write_json(Path(project) / IMPORT_FILE, payload)
    atomic_write_json(Path(project) / DATASET_CARD_AFTER, after)
    return payload
