"""Batch scoring: images in folders or under ``s3://`` prefixes, scored by a bundle or a
registered model, results written to a folder or an ``s3://`` prefix; restart-safe.

Output (``OUT`` = the output folder or prefix):

* ``OUT/parts/part-NNNNN.parquet``: one per chunk of images, written whole (an S3 PUT or a
  renamed temp file) after the chunk's overlays;
* ``OUT/overlays/<stem>-<hash>.png``: the calibrated anomaly map on each scored image;
* ``OUT/results.parquet`` and ``OUT/results.csv``: the parts merged (each image once), written
  at the end of a run that completes.

A run first reads the parts already in ``OUT`` and skips the images they hold, so a
restarted run (after a crash, a kill, a retried pipeline task) scores only the rest; parts
written by a different model are refused. Images are listed page by page and downloaded a
chunk at a time (the next chunk while the current one is scored), so memory stays bounded.
The scoring itself is the core's (:func:`recontrast_core.predict.score_files`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from ..bundle import Detector, load_detector
from ..data.images import is_image_filename
from ..errors import UserError
from ..filenames import RESULTS_FILE
from ..predict import OVERLAYS_DIR, expand_inputs, score_files, write_results
from .locations import LocalFolder, S3Prefix, is_s3, open_location, s3_object_exists
from .model_source import ResolvedModel, resolve_model
from .storage import parse_s3_uri, s3_client, s3_errors, with_retries

COLUMNS = ("path", "score", "normalized_score", "decision", "error", "overlay", "model_uri", "model_version",
           "scored_at")
PARTS_DIR = "parts"
RESULTS_PARQUET = "results.parquet"
PART_NAME = re.compile(r"^part-(\d{5,})\.parquet$")
# tests/integration/test_batch_scoring.py sets this to kill a run between parts; never set otherwise.
FAILPOINT_PART_SLEEP = "RECONTRAST_FAILPOINT_PART_SLEEP"

Location = Union[LocalFolder, S3Prefix]


def schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("score", pa.float64()), ("normalized_score", pa.float64()),
                      ("decision", pa.bool_()), ("error", pa.string()), ("overlay", pa.string()),
                      ("model_uri", pa.string()), ("model_version", pa.string()),
                      ("scored_at", pa.timestamp("ms", tz="UTC"))])


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
class _Source:
    """One input: a local file or folder, an ``s3://`` object or prefix."""

    def __init__(self, spec: str, client_fn):
        self.spec = str(spec)
        self.s3 = is_s3(self.spec)
        if self.s3:
            self.bucket, key = parse_s3_uri(self.spec)
            self.single = bool(key) and not key.endswith("/") and is_image_filename(key)
            self.prefix = key if self.single or not key or key.endswith("/") else key + "/"
            self.client = client_fn()
        elif "://" in self.spec:
            raise UserError(f"{self.spec}: unsupported input (files, folders or s3://bucket/prefix/)")

    def check(self) -> None:
        """The input exists (the bucket answers), before any work."""
        if not self.s3:
            if not Path(self.spec).exists():
                raise UserError(f"{self.spec}: no such file or folder")
            return
        with s3_errors(self.spec):
            if self.single:
                if s3_object_exists(self.client, self.bucket, self.prefix) is None:
                    raise UserError(f"{self.spec}: no such object")
            else:
                with_retries(lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1),
                             f"list {self.spec}")

    def pages(self) -> Iterator[list[str]]:
        """Image URIs (the ``path`` column), a listing page at a time."""
        if not self.s3:
            yield [str(p.resolve()) for p in expand_inputs([self.spec])]
            return
        if self.single:
            yield [f"s3://{self.bucket}/{self.prefix}"]
            return
        for page in S3Prefix(f"s3://{self.bucket}/{self.prefix}", self.client).pages():
            yield [f"s3://{self.bucket}/{self.prefix}{rel}" for rel in page
                   if is_image_filename(rel) and not rel.rsplit("/", 1)[-1].startswith(".")]

    def fetch(self, uri: str, dest: Path) -> tuple[Optional[Path], str]:
        """A local file holding ``uri``, or None and why (an object deleted since listed)."""
        if not self.s3:
            return Path(uri), ""
        from botocore.exceptions import ClientError

        key = uri[len(f"s3://{self.bucket}/"):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with s3_errors(uri):
                with_retries(lambda: self.client.download_file(self.bucket, key, str(dest)), f"get {uri}")
        except UserError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None, "object not found (deleted after it was listed)"
            raise
        return dest, ""


# ---------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------
def _part_names(out: Location) -> list[tuple[int, str]]:
    found = []
    for page in out.pages(PARTS_DIR + "/"):
        for rel in page:
            m = PART_NAME.match(rel.rsplit("/", 1)[-1])
            if m and rel.startswith(PARTS_DIR + "/"):
                found.append((int(m.group(1)), rel))
    return sorted(found)


def _read_part(out: Location, rel: str, columns: Optional[list[str]] = None):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(out.read_bytes(rel)), columns=columns)


def read_done(out: Location, model: ResolvedModel) -> tuple[set[str], int, int]:
    """The images the parts in ``out`` hold, the next part number and the number of parts;
    parts scored by another model are refused (a UserError, nothing written)."""
    done: set[str] = set()
    parts = _part_names(out)
    for _, rel in parts:
        table = _read_part(out, rel, ["path", "model_version"])
        other = set(table.column("model_version").to_pylist()) - {model.version}
        if other:
            raise UserError(f"{out.uri}: holds results of model {sorted(other)[0]}, this run uses {model.version} "
                            f"({model.uri}); choose another output, or delete {out.join(PARTS_DIR)}/ to start over")
        done.update(table.column("path").to_pylist())
    return done, (parts[-1][0] + 1 if parts else 0), len(parts)


def _part_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema()), buf)
    return buf.getvalue()


def overlay_name(uri: str) -> str:
    """``<stem>-<10 hex of the URI's SHA-1>.png``: the same for the same image, on every run."""
    stem = Path(uri.rsplit("/", 1)[-1]).stem[:80]
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}.png"


def _png(img) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
class _Scorer:
    """Scores chunks and commits each as a part (overlays first)."""

    def __init__(self, detector: Detector, model: ResolvedModel, out: Location, pool: ThreadPoolExecutor,
                 next_part: int, overlays: bool):
        self.detector, self.model, self.out, self.pool = detector, model, out, pool
        self.next_part, self.overlays = next_part, overlays
        self.scored = 0
        self.parts_written = 0

    def commit(self, chunk: list[tuple[str, "_Source"]], fetched: list[Future]) -> None:
        rows: list[Optional[dict]] = [None] * len(chunk)
        files, where = [], []
        for i, fut in enumerate(fetched):
            path, err = fut.result()
            if path is None:
                rows[i] = {"path": chunk[i][0], "error": err}
            else:
                files.append(path)
                where.append(i)
        uploads: list[Future] = []
        bs = self.detector.inference.batch_size
        for start in range(0, len(files), bs):
            scored = score_files(self.detector, files[start:start + bs], overlays=self.overlays)
            for (row, img), i in zip(scored, where[start:start + bs]):
                row["error"] = row["error"].replace(row["path"], chunk[i][0])  # name the image, not its temp copy
                row["path"] = chunk[i][0]
                if img is not None:
                    rel = f"{OVERLAYS_DIR}/{overlay_name(row['path'])}"
                    uploads.append(self.pool.submit(lambda rel=rel, img=img: self.out.write_bytes(rel, _png(img))))
                    row["overlay"] = self.out.join(rel)
                rows[i] = row
        for fut in uploads:
            fut.result()  # every overlay is stored before the part that names it
        now = _dt.datetime.now(_dt.timezone.utc)
        for row in rows:
            row.update(model_uri=self.model.uri, model_version=self.model.version, scored_at=now)
            row.setdefault("overlay", "")
        self.out.write_bytes(f"{PARTS_DIR}/part-{self.next_part:05d}.parquet", _part_bytes(rows))
        self.next_part += 1
        self.parts_written += 1
        self.scored += len(rows)
        delay = float(os.environ.get(FAILPOINT_PART_SLEEP, "0") or 0)
        if delay:  # fault injection only: widen the window between parts
            time.sleep(delay)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(islice(items, size))
        if not chunk:
            return
        yield chunk


def _todo(sources: Sequence[_Source], done: set[str], skip_prefix: str, bar) -> Iterator[tuple[str, _Source]]:
    """The images still to score, listing lazily; the bar's total grows page by page."""
    for src in sources:
        for page in src.pages():
            page = [u for u in page if not u.startswith(skip_prefix)]
            bar.grow(len(page))
            fresh = [u for u in page if u not in done]
            if len(fresh) < len(page):
                bar.advance(len(page) - len(fresh))
            done.update(fresh)  # an image listed twice (overlapping inputs) is scored once
            for uri in fresh:
                yield uri, src


def _score(sources, detector, model, out, done: set[str], next_part: int, *, chunk_size: int, overlays: bool,
           workers: int, progress: bool, tmp: Path) -> _Scorer:
    from ..progress import track_steps

    skip = out.uri.rstrip("/") + "/"  # never score the run's own outputs (an output inside an input)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            track_steps("batch scoring", 0, enabled=progress) as bar:
        scorer = _Scorer(detector, model, out, pool, next_part, overlays)
        pending = None
        for k, chunk in enumerate(_chunks(_todo(sources, done, skip, bar), chunk_size)):
            folder = tmp / f"chunk-{k}"
            fetched = [pool.submit(src.fetch, uri, folder / f"{i:05d}-{uri.rsplit('/', 1)[-1]}")
                       for i, (uri, src) in enumerate(chunk)]  # downloads while the last chunk is scored
            if pending is not None:
                _commit(scorer, pending, bar)
            pending = (chunk, fetched, folder)
        if pending is not None:
            _commit(scorer, pending, bar)
    return scorer


def _commit(scorer: _Scorer, pending, bar) -> None:
    chunk, fetched, folder = pending
    scorer.commit(chunk, fetched)
    shutil.rmtree(folder, ignore_errors=True)
    bar.advance(len(chunk))


def merge_parts(out: Location, tmp: Path) -> dict:
    """Merge the parts into ``results.parquet`` and ``results.csv`` (each image once, in
    part order); returns counts and the unreadable rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    seen: set[str] = set()
    counts = {"images": 0, "anomalous": 0}
    failed: list[dict] = []
    local_pq, local_csv = tmp / RESULTS_PARQUET, tmp / RESULTS_FILE
    with pq.ParquetWriter(local_pq, schema()) as writer:
        for _, rel in _part_names(out):
            table = _read_part(out, rel).cast(schema())
            paths = table.column("path").to_pylist()
            keep = [not (p in seen or seen.add(p)) for p in paths]
            table = table.filter(pa.array(keep))
            writer.write_table(table)
            counts["images"] += table.num_rows
            counts["anomalous"] += int(pc.sum(pc.fill_null(table.column("decision"), False).cast(pa.int64())).as_py() or 0)
            bad = table.filter(pc.not_equal(pc.fill_null(table.column("error"), ""), ""))
            failed += bad.select(["path", "error"]).to_pylist()
    write_results(_csv_rows(local_pq), local_csv, COLUMNS)
    out.write_file(RESULTS_PARQUET, local_pq)
    out.write_file(RESULTS_FILE, local_csv)
    return {**counts, "unreadable": len(failed), "failed": failed}


def _csv_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            if row["scored_at"] is not None:
                row["scored_at"] = row["scored_at"].isoformat()
            yield row


def output_for_run(output: str, run_id: str) -> str:
    """``output/run_id/``: one folder per pipeline run (a retried task resumes inside it)."""
    return f"{str(output).rstrip('/')}/{run_id}/" if run_id else str(output)


def run_batch_scoring(model_uri: str, inputs: Sequence[Union[str, os.PathLike]], output: Union[str, os.PathLike], *,
                      chunk_size: int = 64, overlays: bool = True, device: str = "auto", workers: int = 8,
                      progress: bool = True, tracking_uri: Optional[str] = None) -> dict:
    """Score every image of ``inputs`` (files, folders, ``s3://`` objects or prefixes) with
    ``model_uri`` (:func:`model_source.resolve_model`) into ``output`` (a folder or an
    ``s3://`` prefix), resuming from the parts already there. Bad input (an unknown bucket or
    model, a bad URI) is a :class:`UserError` raised before anything is written. Returns a
    summary: ``images``, ``scored`` (this run), ``reused`` (earlier parts), ``unreadable``,
    ``anomalous``, ``failed`` (path and error of each unreadable image), ``results``."""
    if chunk_size < 1:
        raise UserError(f"chunk size must be at least 1, not {chunk_size}")
    if not inputs:
        raise UserError("no inputs given (files, folders or s3://bucket/prefix/)")
    clients: list = []

    def client():
        if not clients:
            clients.append(s3_client())
        return clients[0]

    out = open_location(output, client() if is_s3(output) else None)
    sources = [_Source(str(i), client) for i in inputs]
    out.check_writable()
    for src in sources:
        src.check()
    with tempfile.TemporaryDirectory(prefix="recontrast-batch-") as tmp:
        model = resolve_model(str(model_uri), Path(tmp) / "model", tracking_uri)
        detector = load_detector(model.bundle_dir, device)
        done, next_part, n_parts = read_done(out, model)
        t0 = time.perf_counter()
        reused = len(done)
        if isinstance(out, LocalFolder):  # temp files of a killed run's last writes
            for tmp_file in [*out.root.glob(f"{PARTS_DIR}/.*.tmp"), *out.root.glob(f"{OVERLAYS_DIR}/.*.tmp")]:
                tmp_file.unlink(missing_ok=True)
        scorer = _score(sources, detector, model, out, done, next_part, chunk_size=chunk_size, overlays=overlays,
                        workers=workers, progress=progress, tmp=Path(tmp))
        wall = time.perf_counter() - t0
        if n_parts + scorer.parts_written == 0:
            raise UserError(f"no images found in {', '.join(map(str, inputs))}")
        merged = merge_parts(out, Path(tmp))
    return {"images": merged["images"], "scored": scorer.scored, "reused": reused,
            "unreadable": merged["unreadable"], "anomalous": merged["anomalous"],
            "parts": n_parts + scorer.parts_written, "model_uri": model.uri, "model_version": model.version,
            "results": out.join(RESULTS_PARQUET), "results_csv": out.join(RESULTS_FILE),
            "scoring_s": round(wall, 2), "images_per_s": round(scorer.scored / wall, 2) if wall > 0 else None,
            "failed": merged["failed"]}
