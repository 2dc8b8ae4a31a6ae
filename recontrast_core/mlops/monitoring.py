"""The drift monitor's adapters: the model (any model URI: its calibration and reference),
the score table (a batch-scoring output or a score log, folder or ``s3://``), the images
(for their input statistics), the report (``monitor.json`` + ``monitor.png``, written whole),
one MLflow run per window, and the retrain decision. The statistics and the verdict rules
are the core's (:mod:`recontrast_core.monitor`); docs/operations.md is the user's page.

MLflow: experiment ``monitor.experiment``; each window is a run found again by its tag
``monitor.window_key`` (model version, score source, window spec, window bounds), so a
rerun over the same scores updates its runs instead of adding new ones. Tags:
``monitor.verdict``, ``monitor.window_start`` / ``_end``, ``monitor.model_version``,
``monitor.reasons``; metrics: the window's numbers (``alarm_rate``, ``ks_p_below``, ...);
artifacts: the report and the plot. The monitor pipeline marks the windows that triggered a
retraining with ``monitor.retrain_submitted`` (the KFP run id): a marked window no longer
counts towards the next ``retrain_after`` consecutive ones (:func:`retrain_due`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..bundle import read_bundle_meta
from ..calibration import INPUT_STATS, Calibration, CalibrationFieldError, image_statistics, normalise
from ..config import MonitorConfig
from ..data.images import decode_image_bytes, is_image_filename, load_image_rgb
from ..errors import UserError, first_line
from ..filenames import BUNDLE_META_FILE
from ..monitor import (EXIT_CODES, Rules, monitor_windows, parse_window, plot_report, should_retrain, split_windows,
                       worst)
from .locations import S3Prefix, is_s3, open_location
from .model_source import resolve_model
from .score_log import read_score_table

REPORT_FILE = "monitor.json"
PLOT_FILE = "monitor.png"
REPORT_FORMAT = "recontrast-monitor/1"
TAG_KEY = "monitor.window_key"
TAG_SUBMITTED = "monitor.retrain_submitted"
MAX_PLOT_VALUES = 5000


def rules_of(cfg: MonitorConfig) -> Rules:
    return Rules(alpha=cfg.alpha, psi_moderate=cfg.psi_moderate, psi_major=cfg.psi_major,
                 confidence=cfg.confidence, min_images=cfg.min_images)


def model_calibration(model_uri: str, dest: Path, tracking_uri: Optional[str]) -> tuple[Any, Calibration]:
    """(the resolved model, its calibration); a bundle without a valid calibration is one line."""
    model = resolve_model(str(model_uri), dest, tracking_uri)
    meta = read_bundle_meta(model.bundle_dir)
    try:
        calib = Calibration.from_dict(meta.get("calibration"))
    except (TypeError, ValueError, ArithmeticError) as exc:
        detail = f"calibration.{exc}" if isinstance(exc, CalibrationFieldError) else first_line(exc)
        raise UserError(f"{model.bundle_dir / BUNDLE_META_FILE}: invalid calibration ({detail})") from None
    return model, calib


# ----------------------------------------------------------------------------- images
def _image_uris(images: str, client) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(uri, its decoded RGB on call) of every image under ``images`` (a folder, a file, or
    an s3:// prefix: read into memory, decoded as serving decodes request bytes)."""
    if is_s3(images):
        loc = S3Prefix(images, client)
        return [(loc.join(rel), lambda rel=rel: decode_image_bytes(loc.read_bytes(rel), loc.join(rel)))
                for page in loc.pages() for rel in page
                if is_image_filename(rel) and not rel.rsplit("/", 1)[-1].startswith(".")]
    if "://" in images:
        raise UserError(f"{images}: unsupported location for --images (a folder or s3://bucket/prefix/)")
    p = Path(images)
    if p.is_file():
        files = [p.resolve()]
    elif p.is_dir():
        files = [f.resolve() for f in sorted(p.rglob("*"))
                 if f.is_file() and is_image_filename(f) and not f.name.startswith(".")]
    else:
        raise UserError(f"{images}: no such file or folder")
    return [(str(f), lambda f=f: load_image_rgb(f)) for f in files]


def image_stats(images: str, progress: bool = True, client=None) -> tuple[dict[str, np.ndarray], list[str]]:
    """``{uri: [brightness, contrast, width, height]}`` of the images under ``images``, and
    the ones that could not be read."""
    from ..progress import track_steps

    found = _image_uris(str(images), client)
    if not found:
        raise UserError(f"{images}: no images found")
    stats, bad = {}, []
    with track_steps("input statistics", len(found), enabled=progress) as bar:
        for uri, rgb in found:
            try:
                stats[uri] = np.asarray(image_statistics(rgb()), dtype=np.float64)
            except Exception:  # noqa: BLE001 - an unreadable image is reported, not fatal
                bad.append(uri)
            bar.advance(1)
    return stats, bad


def match_inputs(paths: Sequence[str], stats: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """Per row, its image's statistics (NaN where none): the row's ``path`` equal to an
    image's URI, else its file name equal to exactly one image's. Returns (the [n, 4]
    array, the rows matched)."""
    by_name: dict[str, list[str]] = {}
    for uri in stats:
        by_name.setdefault(uri.rsplit("/", 1)[-1], []).append(uri)
    out = np.full((len(paths), len(INPUT_STATS)), np.nan)
    for i, p in enumerate(paths):
        uri = p if p in stats else None
        if uri is None:
            hits = by_name.get(str(p).rsplit("/", 1)[-1], [])
            uri = hits[0] if len(hits) == 1 else None
        if uri is not None:
            out[i] = stats[uri]
    return out, int(np.isfinite(out).all(axis=1).sum())


# ----------------------------------------------------------------------------- the run
def run_monitor(model_uri: str, scores_uri: str, *, cfg: MonitorConfig = MonitorConfig(), window: Optional[str] = None,
                since: Optional[str] = None, images: Optional[str] = None, out: Optional[str] = None,
                tracking_uri: Optional[str] = None, track: bool = True, any_version: bool = False,
                progress: bool = True, now: Optional[float] = None) -> dict:
    """Judge the scores in ``scores_uri`` against ``model_uri``'s reference (module doc);
    returns the report (also written to ``out`` when given). Bad input (a model, table or
    folder that is not there, a bad window) is a :class:`UserError` before anything is written."""
    window = window or cfg.window
    try:
        parse_window(window)
        since_kind, since_s = parse_window(since) if since else ("time", 0)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if since_kind != "time":
        raise UserError(f"since {since!r}: expected a duration (30m, 6h, 1d, 1w)")
    rules = rules_of(cfg)
    location = open_location(out) if out else None
    with tempfile.TemporaryDirectory(prefix="recontrast-monitor-") as tmp:
        model, calib = model_calibration(model_uri, Path(tmp) / "model", tracking_uri)
    table = read_score_table(scores_uri)
    score, times, paths, versions = table["score"], table["scored_at"], table["path"], table["model_version"]
    readable = np.isfinite(score)
    other = np.array([bool(v) and v != model.version for v in versions], dtype=bool)
    keep = readable & (np.ones_like(readable) if any_version else ~other)
    if since_s:
        cutoff = (now if now is not None else _dt.datetime.now(_dt.timezone.utc).timestamp()) - since_s
        keep &= np.isfinite(times) & (times >= cutoff)
    if not keep.any():
        seen = sorted({v for v in versions if v})[:5]
        why = (f"no row was scored by {model.version} (the table's: {', '.join(seen)}; --any-version uses them anyway)"
               if readable.any() and (other & readable).all() else "no scored rows" + (" in --since" if since else ""))
        raise UserError(f"{table['source']}: {why}")
    idx = np.flatnonzero(keep)
    kept_paths = [paths[i] for i in idx]
    inputs = unmatched = None
    images_info = None
    if images:
        stats, bad = image_stats(images, progress)
        inputs, matched = match_inputs(kept_paths, stats)
        if matched == 0:
            unmatched = np.stack(list(stats.values())) if stats else None
            inputs = None
        images_info = {"uri": str(images), "images": len(stats) + len(bad), "unreadable": bad[:20],
                       "n_unreadable": len(bad), "rows_matched": matched,
                       "assigned": "per row (path or file name)" if matched else
                                   "the last window (no row names these images)"}
    if location is not None:
        location.check_writable()  # once the inputs are known good: a bad call writes nothing
    try:
        windows = monitor_windows(score[idx], calib, rules, window=window, times=times[idx], inputs=inputs,
                                  unmatched_inputs=unmatched)
    except ValueError as exc:
        raise UserError(f"{table['source']}: {exc}") from None
    report = {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"uri": model.uri, "version": model.version, "threshold": calib.threshold, "method": calib.method,
                  "target_fpr": calib.target_fpr, "n_calibration_normals": calib.n_normal,
                  "reference": {"scores": bool((calib.reference or {}).get("scores")),
                                "input": bool((calib.reference or {}).get("input"))}},
        "scores": {"uri": str(scores_uri), "source": table["source"], "rows": len(score),
                   "unreadable": int((~readable).sum()), "other_model": int((other & readable).sum()),
                   "used": int(idx.size), "any_version": any_version, "since": since},
        "images": images_info,
        "window": window, "rules": rules.to_dict(), "retrain_after": cfg.retrain_after,
        "windows": windows,
    }
    if not report["model"]["reference"]["scores"]:
        report["note"] = ("the model's calibration has no reference (trained before the monitor existed): "
                          "only the alarm rate is judged; retrain or recalibrate to get one")
    verdicts = [w["verdict"] for w in windows]
    report["verdict"], report["worst"] = verdicts[-1], worst(verdicts)
    report["exit_code"] = EXIT_CODES[report["verdict"]]
    if track:
        report["mlflow"] = log_windows(report, cfg.experiment, tracking_uri)
    report["retrain"] = retrain_due(report)
    if location is not None:
        last_rows = split_windows(idx.size, window, times[idx])[-1]["rows"]
        write_report(report, location, calib, score[idx][last_rows])  # sets report["outputs"]
        if track:
            _log_report_artifacts(report, tracking_uri)
    return report


def retrain_due(report: dict) -> dict:
    """Whether the last ``retrain_after`` windows are all ``retrain`` (windows already marked
    as having triggered a retraining do not count), and why."""
    n = int(report["retrain_after"])
    windows = report["windows"]
    verdicts = ["submitted" if w.get("retrain_submitted") else w["verdict"] for w in windows]
    due = should_retrain(verdicts, n)
    out = {"after": n, "due": due, "consecutive": _trailing(verdicts, "retrain")}
    if due:
        tail = windows[-n:]
        out["windows"] = [w["label"] for w in tail]
        out["mlflow_runs"] = [w.get("mlflow_run_id") for w in tail if w.get("mlflow_run_id")]
        out["reason"] = (f"drift monitor: {n} consecutive retrain windows ({', '.join(out['windows'])}) for "
                         f"{report['model']['version']}: " + "; ".join(tail[-1]["reasons"]))[:4000]
    return out


def _trailing(verdicts: Sequence[str], value: str) -> int:
    k = 0
    for v in reversed(verdicts):
        if v != value:
            break
        k += 1
    return k


# ----------------------------------------------------------------------------- outputs
def write_report(report: dict, location, calib: Calibration, last_scores: np.ndarray) -> dict:
    """``monitor.json`` and ``monitor.png`` into the folder or prefix, each written whole."""
    ref = (calib.reference or {}).get("scores") or []
    ref_norm = normalise(np.asarray(ref), calib) if ref else np.empty(0)
    last = normalise(last_scores, calib) if last_scores.size else np.empty(0)
    if last.size > MAX_PLOT_VALUES:
        last = np.quantile(last, np.linspace(0, 1, MAX_PLOT_VALUES))
    outputs = {"report": location.join(REPORT_FILE), "plot": location.join(PLOT_FILE)}
    report["outputs"] = outputs
    with tempfile.TemporaryDirectory(prefix="recontrast-monitor-") as tmp:
        png = Path(tmp) / PLOT_FILE
        plot_report(report, png, reference_normalised=ref_norm, last_normalised=last)
        location.write_file(PLOT_FILE, png)
    location.write_bytes(REPORT_FILE, (json.dumps(report, indent=2, default=str) + "\n").encode())
    return outputs


def _window_key(report: dict, w: dict) -> str:
    raw = "|".join(str(x) for x in (report["model"]["version"], report["scores"]["uri"], report["window"],
                                    w["label"], w["start"], w["end"]))
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def _metrics(w: dict) -> dict[str, float]:
    m = {"n_images": w["n"], "alarm_rate": w["alarm"]["rate"], "alarm_rate_lo": w["alarm"]["interval"][0],
         "alarm_rate_hi": w["alarm"]["interval"][1], "expected_alarm_rate": w["alarm"]["expected"],
         "verdict_code": EXIT_CODES[w["verdict"]]}
    for key, suffix in (("scores", "all"), ("scores_below_threshold", "below")):
        t = w.get(key) or {}
        for name in ("ks_d", "ks_p", "psi"):
            if name in t:
                m[f"{name}_{suffix}"] = t[name]
    for stat in INPUT_STATS:
        t = (w.get("input") or {}).get(stat) or {}
        for name in ("ks_d", "ks_p", "psi"):
            if name in t:
                m[f"input_{stat}_{name}"] = t[name]
    return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}


def log_windows(report: dict, experiment: str, tracking_uri: Optional[str]) -> dict:
    """One MLflow run per window (found again by its key); sets ``mlflow_run_id`` and
    ``retrain_submitted`` (from the run's tags) on each window of the report."""
    from mlflow.entities import Metric, RunTag

    from . import tracking
    from .redaction import redact_tags

    exp_id = tracking.configure(tracking_uri, experiment)
    client = tracking.get_client(tracking_uri)
    now = int(_dt.datetime.now(_dt.timezone.utc).timestamp() * 1000)
    runs = []
    for w in report["windows"]:
        key = _window_key(report, w)
        run = tracking.find_run(exp_id, {TAG_KEY: key}, client)
        if run is None:
            run = client.create_run(exp_id, run_name=f"monitor {w['label']}"[:250], tags={TAG_KEY: key})
        rid = run.info.run_id
        w["mlflow_run_id"] = rid
        w["retrain_submitted"] = run.data.tags.get(TAG_SUBMITTED) or None
        tags = {"monitor.verdict": w["verdict"], "monitor.window": report["window"], "monitor.window_label": w["label"],
                "monitor.window_start": w["start"] or "", "monitor.window_end": w["end"] or "",
                "monitor.model_uri": report["model"]["uri"], "monitor.model_version": report["model"]["version"],
                "monitor.scores": report["scores"]["uri"], "monitor.reasons": "; ".join(w["reasons"])[:4900]}
        client.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in _metrics(w).items()],
                         tags=[RunTag(k, str(v)) for k, v in redact_tags(tags).items()])
        with tracking.own_run_links():  # MLflow's "View run" lines would go to stdout before --json
            client.set_terminated(rid)
        runs.append(rid)
    _tag_version_verdict(client, report)
    return {"experiment": experiment, "experiment_id": exp_id, "runs": runs}


def _tag_version_verdict(client, report: dict) -> None:
    """The last window's verdict as the registry version's ``monitor_verdict`` tag (with
    ``monitor_verdict_at``): what ``registry status --all`` shows per line. Only for a
    registered model (``NAME/VERSION``); best effort, the runs hold the verdicts anyway."""
    from .fleet import TAG_MONITOR_VERDICT, TAG_MONITOR_VERDICT_AT

    version = str(report["model"].get("version") or "")
    if not report["windows"] or not report["model"]["uri"].startswith("models:/") or "/" not in version:
        return
    name, _, number = version.rpartition("/")
    try:
        client.set_model_version_tag(name, number, TAG_MONITOR_VERDICT, report["windows"][-1]["verdict"])
        client.set_model_version_tag(name, number, TAG_MONITOR_VERDICT_AT,
                                     _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    except Exception as exc:  # noqa: BLE001 - a read-only registry token: the runs still say it
        sys.stderr.write(f"warning: could not tag {version} with the monitor verdict ({type(exc).__name__})\n")


def _log_report_artifacts(report: dict, tracking_uri: Optional[str]) -> None:
    """The report and the plot on the last window's run (best effort: the report is written)."""
    from . import tracking

    outputs = report.get("outputs") or {}
    run_id = (report["windows"][-1] if report["windows"] else {}).get("mlflow_run_id")
    if not run_id or not outputs or is_s3(outputs.get("report", "")):
        return
    try:
        client = tracking.get_client(tracking_uri)
        for path in (outputs["report"], outputs["plot"]):
            client.log_artifact(run_id, path, "monitor")
    except Exception:  # noqa: BLE001
        pass


def mark_submitted(run_ids: Sequence[str], kfp_run_id: str, reason: str, tracking_uri: Optional[str] = None) -> None:
    """Mark the windows that triggered a retraining (their MLflow runs)."""
    from . import tracking

    client = tracking.get_client(tracking_uri)
    for rid in run_ids:
        client.set_tag(rid, TAG_SUBMITTED, kfp_run_id)
        client.set_tag(rid, "monitor.retrain_reason", reason[:4900])


def summary_of(report: dict) -> dict:
    """The few numbers a person reads first (the CLI table, the KFP task's output)."""
    last = report["windows"][-1]
    below = last.get("scores_below_threshold") or {}
    out = {"verdict": report["verdict"], "windows": len(report["windows"]), "worst": report["worst"],
           "model_version": report["model"]["version"], "rows_used": report["scores"]["used"],
           "last_window": last["label"], "last_n": last["n"],
           "last_alarm_rate": last["alarm"]["rate"], "last_expected_alarm_rate": last["alarm"]["expected"]}
    if below:
        out.update(last_ks_p_below=below["ks_p"], last_psi_below=below["psi"])
    out["retrain_due"] = report["retrain"]["due"]
    if report.get("outputs"):
        out["report"] = report["outputs"]["report"]
    return out


__all__ = ["run_monitor", "retrain_due", "mark_submitted", "summary_of", "REPORT_FILE", "PLOT_FILE"]
