"""Score tables: the online score log that ``recontrast serve --score-log`` writes, and the
reader the drift monitor (``recontrast monitor``) uses for both it and batch-scoring
outputs (docs/operations.md, "Monitor").

The log: one row per scored image, in the batch-scoring table's columns
(:data:`recontrast_core.mlops.batch_scoring.COLUMNS`, its Parquet schema) so one reader
serves both: ``path`` holds the key (``request:<v2 request id>/<element index>``),
``score``, ``normalized_score``, ``decision``, ``error`` and ``overlay`` (empty),
``model_uri`` (``models:/NAME/VERSION``), ``model_version`` (``NAME/VERSION``) and
``scored_at`` (UTC). Rows go to ``LOG/parts/<UTC date>/scores-<time>-<host>-<pid>-<n>.parquet``
(a folder or an ``s3://`` prefix; each part written whole: a renamed temp file or one S3 PUT;
replicas never collide: host and process in the name).

:class:`ScoreLog` never blocks or fails a request: :meth:`ScoreLog.append` only puts rows in
a bounded buffer (:data:`MAX_PENDING` rows; beyond it rows are dropped and counted); a
daemon thread writes a part every :data:`FLUSH_S` seconds (``RECONTRAST_SCORE_LOG_FLUSH_S``)
or every :data:`FLUSH_ROWS` rows, and at :meth:`ScoreLog.close`. A failed write keeps its
rows for the next attempt (within the bound) and is logged once, with a count of later
failures when one finally succeeds.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import UserError
from ..runtime import positive_env
from .locations import LocalFolder, S3Prefix, is_s3, open_location
from .storage import parse_s3_uri

log = logging.getLogger("recontrast.score_log")

FLUSH_ROWS = 1000
FLUSH_S = 60.0
MAX_PENDING = 100_000
PARTS_DIR = "parts"
FLUSH_ENV = "RECONTRAST_SCORE_LOG_FLUSH_S"
LOG_ENV = "RECONTRAST_SCORE_LOG"


def flush_seconds() -> float:
    return positive_env(FLUSH_ENV, FLUSH_S, "{name} must be a number of seconds > 0, got {raw!r}")


class ScoreLog:
    """Appends scored rows to parts under ``uri`` (module doc), off the request path."""

    def __init__(self, uri: str, *, flush_rows: int = FLUSH_ROWS, flush_s: Optional[float] = None,
                 max_pending: int = MAX_PENDING, client=None):
        self.uri = str(uri)
        self.location = open_location(self.uri, client)  # S3: a client of its own when none is given
        self.flush_rows, self.max_pending = int(flush_rows), int(max_pending)
        self.flush_s = float(flush_s if flush_s is not None else flush_seconds())
        now = _dt.datetime.now(_dt.timezone.utc)
        host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40] or "host"
        self._stem = f"{now:%Y%m%dT%H%M%S}-{host}-{os.getpid()}"
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seq = 0
        self.written = self.dropped = self.failures = 0
        self._failing = False
        self._warned_drop = False
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ writer side
    def start(self) -> "ScoreLog":
        """Check the location (a problem is logged, not raised: the log retries) and start
        the writer thread."""
        try:
            self.location.check_writable()
        except Exception as exc:  # noqa: BLE001 - never stop serving for the log
            log.warning("score log %s: not writable now (%s); will keep trying", self.uri, exc)
        self._thread = threading.Thread(target=self._loop, name="recontrast-score-log", daemon=True)
        self._thread.start()
        return self

    def append(self, rows: Sequence[dict]) -> None:
        """Buffer ``rows`` (never raises, never waits on I/O)."""
        try:
            with self._lock:
                room = self.max_pending - len(self._rows)
                if room < len(rows):
                    self.dropped += len(rows) - max(room, 0)
                    rows = list(rows)[:max(room, 0)]
                    if not self._warned_drop:
                        self._warned_drop = True
                        log.warning("score log %s: buffer full (%d rows); dropping rows until a write succeeds",
                                    self.uri, self.max_pending)
                self._rows.extend(rows)
                full = len(self._rows) >= self.flush_rows
            if full:
                self._wake.set()
        except Exception:  # noqa: BLE001 - a request must never fail for the log
            pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Write the buffered rows as one part; returns the rows written (0 on failure: kept)."""
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows:
                return 0
            day = f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}"
            name = f"{PARTS_DIR}/{day}/scores-{self._stem}-{self._seq:06d}.parquet"
            try:
                self.location.write_bytes(name, table_bytes(rows))
            except Exception as exc:  # noqa: BLE001
                with self._lock:  # back in front, within the bound
                    keep = max(0, self.max_pending - len(self._rows))
                    self.dropped += max(0, len(rows) - keep)
                    self._rows = rows[:keep] + self._rows
                self.failures += 1
                if not self._failing:
                    self._failing = True
                    log.warning("score log %s: writing a part failed (%s: %s); rows are kept and retried, "
                                "further failures are counted", self.uri, type(exc).__name__, exc)
                return 0
            self._seq += 1
            self.written += len(rows)
            if self._failing:
                self._failing = False
                log.warning("score log %s: writing again after %d failed attempts", self.uri, self.failures)
            return len(rows)

    def close(self) -> None:
        """Stop the thread and write what is left (best effort)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()


def table_bytes(rows: Sequence[dict]) -> bytes:
    """Rows (batch-scoring columns; missing ones empty) -> Parquet bytes (the batch parts' writer)."""
    from .batch_scoring import _part_bytes

    return _part_bytes([{"error": "", "overlay": "", **r} for r in rows])


def log_rows(results: Sequence[dict], request_id: str, registered_name: str, version: str) -> list[dict]:
    """The log's rows for one served request (``results``: the detector's rows)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return [{"path": f"request:{request_id}/{i}", "score": float(r["score"]),
             "normalized_score": float(r["normalized_score"]), "decision": bool(r["decision"]),
             "model_uri": f"models:/{registered_name}/{version}", "model_version": f"{registered_name}/{version}",
             "scored_at": now} for i, r in enumerate(results)]


# ---------------------------------------------------------------------------------------
# reading score tables (batch outputs, score logs)
# ---------------------------------------------------------------------------------------
TABLE_SUFFIXES = (".parquet", ".csv")


def _read_bytes_table(data: bytes, name: str):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if name.endswith(".csv"):
            return pacsv.read_csv(io.BytesIO(data))
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{name}: not a readable score table ({str(exc).splitlines()[0][:160]})") from None


def _single_file(uri: str, client) -> Optional[tuple[bytes, str]]:
    """The bytes of ``uri`` when it names one table file (local or S3), else None."""
    if not uri.lower().endswith(TABLE_SUFFIXES):
        return None
    if is_s3(uri):
        bucket, key = parse_s3_uri(uri)
        return S3Prefix(f"s3://{bucket}", client).read_bytes(key), uri
    p = Path(uri)
    if not p.is_file():
        raise UserError(f"{uri}: no such file")
    return p.read_bytes(), uri


def read_score_table(uri: Union[str, os.PathLike], client=None) -> dict[str, Any]:
    """The rows of a score table as arrays: ``path`` (list), ``score`` (float64, NaN where
    unreadable), ``scored_at`` (epoch seconds, NaN where absent), ``model_version`` (list),
    plus ``source`` (what was read). ``uri``: a ``.parquet`` / ``.csv`` file or object; or
    a folder / ``s3://`` prefix holding ``results.parquet`` (a batch output: read that), else
    ``parts/**.parquet`` (a score log, or a batch run that has not finished: every part,
    each image once); a folder with only ``results.csv`` (``recontrast predict BUNDLE
    FOLDER``'s output) is read from that. A missing or unreadable table is a :class:`UserError`."""
    text = str(uri)
    tables, source = [], text
    single = _single_file(text, client)
    if single is not None:
        tables.append(_read_bytes_table(*single))
    else:
        loc: Union[LocalFolder, S3Prefix] = open_location(text, client)
        if isinstance(loc, LocalFolder) and not loc.root.is_dir():
            raise UserError(f"{text}: no such folder")
        names = [rel for page in loc.pages() for rel in page]
        final = next((n for n in ("results.parquet", "results.csv") if n in names), None)
        if final is not None:  # a finished batch run (or `recontrast predict BUNDLE ...`'s results.csv)
            tables.append(_read_bytes_table(loc.read_bytes(final), loc.join(final)))
            source = loc.join(final)
        else:
            parts = sorted(n for n in names if n.startswith(PARTS_DIR + "/") and n.endswith(".parquet")
                           and not n.rsplit("/", 1)[-1].startswith("."))
            for rel in parts:
                tables.append(_read_bytes_table(loc.read_bytes(rel), loc.join(rel)))
            source = f"{loc.join(PARTS_DIR)}/ ({len(parts)} parts)"
        if not tables:
            raise UserError(f"{text}: no score table (results.parquet, results.csv, parts/*.parquet, or give a "
                            ".parquet/.csv file)")
    columns: dict[str, list] = {"path": [], "score": [], "scored_at": [], "model_version": []}
    for t in tables:
        if "score" not in t.column_names:
            raise UserError(f"{source}: no 'score' column (columns: {', '.join(t.column_names[:12])})")
        n = t.num_rows
        columns["path"] += [str(x) if x is not None else "" for x in t.column("path").to_pylist()] \
            if "path" in t.column_names else [""] * n
        columns["score"] += [np.nan if x is None else float(x) for x in t.column("score").to_pylist()]
        columns["model_version"] += [x or "" for x in t.column("model_version").to_pylist()] \
            if "model_version" in t.column_names else [""] * n
        columns["scored_at"] += _epochs(t.column("scored_at")) if "scored_at" in t.column_names else [np.nan] * n
    # each image once (the batch merge's rule: the first part that holds it)
    seen: set[str] = set()
    keep = [not p or not (p in seen or seen.add(p)) for p in columns["path"]]
    out = {k: [v for v, ok in zip(vals, keep) if ok] for k, vals in columns.items()}
    return {"path": out["path"], "score": np.asarray(out["score"], dtype=np.float64),
            "scored_at": np.asarray(out["scored_at"], dtype=np.float64), "model_version": out["model_version"],
            "source": source, "rows": int(sum(t.num_rows for t in tables))}


def _epochs(column) -> list[float]:
    """A timestamp or ISO-text column -> UTC epoch seconds (NaN where empty or unparsable)."""
    out = []
    for x in column.to_pylist():
        if x is None or x == "":
            out.append(np.nan)
            continue
        if isinstance(x, str):
            try:
                x = _dt.datetime.fromisoformat(x.replace("Z", "+00:00"))
            except ValueError:
                out.append(np.nan)
                continue
        if isinstance(x, _dt.datetime):
            if x.tzinfo is None:
                x = x.replace(tzinfo=_dt.timezone.utc)
            out.append(x.timestamp())
        else:
            out.append(np.nan)
    return out

