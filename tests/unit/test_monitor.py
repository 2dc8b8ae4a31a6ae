"""The drift monitor's statistics and rules (recontrast_core.monitor), the calibration's
reference (recontrast_core.calibration), the retrain decision and the score log's writer and
reader (recontrast_core.mlops.score_log): pure functions, checked against scipy where it
has the same statistic."""

from __future__ import annotations

import datetime as dt
import json
import logging

import numpy as np
import pytest

from recontrast_core.calibration import (INPUT_QUANTILES, Calibration, CalibrationFieldError, fit_calibration,
                                         image_statistics, summarise_inputs)
from recontrast_core.monitor import (EXIT_CODES, Rules, judge_window, kolmogorov_sf, ks_two_sample, monitor_windows,
                                     parse_window, psi, should_retrain, split_windows, verdict_of, wilson_interval)


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 100), (37, 40), (10, 10), (3, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_interval_matches_scipy(k, n, confidence):
    from scipy.stats import binomtest

    want = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    lo, hi = wilson_interval(k, n, confidence)
    assert lo == pytest.approx(want.low, abs=1e-12) and hi == pytest.approx(want.high, abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_kolmogorov_and_two_sample_ks_match_scipy():
    from scipy import special
    from scipy.stats import ks_2samp, kstwobign

    for x in (0.0, 0.05, 0.3, 0.7, 0.99, 1.0, 1.01, 1.5, 3.0):
        assert kolmogorov_sf(x) == pytest.approx(float(special.kolmogorov(x)), abs=1e-12)
    rng = np.random.default_rng(0)
    for n, m, shift in [(30, 50, 0.0), (30, 50, 0.8), (200, 1000, 0.1), (10, 300, 2.0)]:
        a, b = rng.normal(shift, 1, n), rng.normal(0, 1, m)
        d, p = ks_two_sample(a, b)
        assert d == pytest.approx(ks_2samp(a, b).statistic, abs=1e-12)
        assert p == pytest.approx(float(kstwobign.sf(np.sqrt(n * m / (n + m)) * d)), rel=1e-9)
    # ties: two identical samples of a few values
    assert ks_two_sample([1, 1, 2, 2], [1, 2, 1, 2]) == (0.0, 1.0)
    # a reference kept as quantiles: D within 1/len, p from its true size
    big = rng.normal(size=5000)
    d_full, p_full = ks_two_sample(big[:100] + 0.5, big)
    d_q, p_q = ks_two_sample(big[:100] + 0.5, np.quantile(big, np.linspace(0, 1, 101)), n_reference=5000)
    assert abs(d_full - d_q) < 0.02 and p_q == pytest.approx(p_full, rel=0.5) and p_q < 0.01


def test_alarm_p_value_is_beta_binomial_with_a_reference_and_binomial_without():
    from scipy.stats import betabinom, binom

    from recontrast_core.monitor import alarm_p_value

    # 26 reference normals, the threshold their maximum: a new normal exceeds it with a
    # probability ~ Beta(1, 26), so 6 of 32 is not that rare (p 0.022); 13 of 42 is
    for alarms, n in ((6, 32), (13, 42), (1, 5)):
        assert alarm_p_value(alarms, n, 1, 26) == pytest.approx(betabinom(n, 1, 26).sf(alarms - 1), rel=1e-9)
    tail = betabinom(100, 10, 981).pmf(np.arange(20, 101)).sum()  # (scipy's sf is inexact this far out)
    assert alarm_p_value(20, 100, 10.0, 990) == pytest.approx(tail, rel=1e-9)
    assert alarm_p_value(5, 100, rate=0.01) == pytest.approx(binom(100, 0.01).sf(4), rel=1e-9)
    assert alarm_p_value(0, 10, 1, 26) == 1.0


def test_psi_reads_as_documented():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=2000)
    assert psi(rng.normal(size=2000), ref) < 0.02  # same population
    assert 0.1 < psi(rng.normal(0.45, 1, 2000), ref) < 0.25  # moderate
    assert psi(rng.normal(1.0, 1, 2000), ref) > 0.25  # major
    # a constant reference (one image size): anything else is a bin of its own
    sizes = np.full(300, 512.0)
    assert psi(np.full(50, 512.0), sizes) < 0.01
    assert psi(np.full(50, 640.0), sizes) > 1 and psi(np.full(50, 300.0), sizes) > 1


def test_image_statistics_are_luma_mean_std_and_size():
    rgb = np.zeros((6, 10, 3), np.uint8)
    rgb[:, :5] = (255, 255, 255)
    b, c, w, h = image_statistics(rgb)
    assert (w, h) == (10, 6) and b == pytest.approx(127.5, abs=0.01) and c == pytest.approx(127.5, abs=0.01)
    grey = np.full((4, 4), 100, np.uint8)
    assert image_statistics(grey) == (pytest.approx(100.0), 0.0, 4, 4)
    dark = image_statistics((rgb * 0.7).astype(np.uint8))
    assert dark[0] == pytest.approx(0.7 * 255 / 2, abs=0.5)


# ----------------------------------------------------------------------------- the reference
def _calibration(n: int = 300, seed: int = 0, with_input: bool = True) -> tuple[Calibration, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.gamma(4.0, 1.0, n)
    inputs = np.c_[rng.normal(100, 10, 200), rng.normal(30, 3, 200), np.full(200, 256), np.full(200, 192)]
    return fit_calibration(normal, target_fpr=0.01, input_ref=summarise_inputs(inputs) if with_input else None), normal


def test_fit_calibration_stores_the_reference_and_old_dicts_still_load():
    cal, normal = _calibration()
    ref = cal.reference
    assert ref["scores"] == sorted(normal.tolist()) and ref["n_scores"] == 300
    assert ref["input"]["n_images"] == 200 and len(ref["input"]["brightness"]) == INPUT_QUANTILES
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    old = {k: v for k, v in cal.to_dict().items() if k != "reference"}  # a bundle from before the reference
    loaded = Calibration.from_dict(old)
    assert loaded.reference is None and "reference" not in loaded.to_dict()
    many = fit_calibration(np.random.default_rng(2).normal(size=5000))
    assert len(many.reference["scores"]) == 1001 and many.reference["n_scores"] == 5000
    assert cal.with_input_reference(None) is cal
    plain = fit_calibration(normal)
    assert plain.with_input_reference(ref["input"]) == cal


@pytest.mark.parametrize("change, field", [
    (lambda r: r.update(scores=[1.0, float("nan")]), "reference.scores"),
    (lambda r: r.update(scores=[3.0, 1.0]), "reference.scores"),
    (lambda r: r.update(scores="many"), "reference.scores"),
    (lambda r: r.update(n_scores=-1), "reference.n_scores"),
    (lambda r: r.update(n_scores=1), "reference.n_scores"),
    (lambda r: r["input"].update(brightness=[1.0] * 5), "reference.input.brightness"),
    (lambda r: r["input"].update(width=[0.0] * INPUT_QUANTILES), "reference.input.width"),
    (lambda r: r["input"].update(n_images=1e400), "reference.input.n_images"),
    (lambda r: r["input"].update(colour=[]), "reference.input"),
    (lambda r: r.update(extra=1), "reference"),
])
def test_a_bad_reference_is_refused_naming_the_field(change, field):
    cal, _ = _calibration()
    data = json.loads(json.dumps(cal.to_dict()))
    change(data["reference"])
    with pytest.raises(CalibrationFieldError) as exc:
        Calibration.from_dict(data)
    assert exc.value.field == field


def test_a_bundle_with_a_bad_reference_is_one_line(tmp_path):
    from recontrast_core.bundle import load_detector
    from recontrast_core.errors import UserError

    cal, _ = _calibration()
    meta = {"format": "recontrast-bundle/1", "model_kind": "patchknn", "inference": {},
            "calibration": {**cal.to_dict(), "reference": {"scores": [2.0, 1.0], "n_scores": 2}}}
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"invalid calibration \(calibration\.reference\.scores: expected numbers "
                                        r"in ascending order\)"):
        load_detector(tmp_path, "cpu")


# ----------------------------------------------------------------------------- one window, the rules
def test_judge_window_ok_drift_and_alarms():
    cal, normal = _calibration(n=400)
    rng = np.random.default_rng(5)
    same = rng.gamma(4.0, 1.0, 300)
    ok = judge_window(same, cal)
    assert ok["verdict"] == "ok" and ok["reasons"] == [] and not ok["alarm"]["high"]
    # the expected alarm rate is the threshold's own on the reference normals, k / (n + 1)
    k = int(np.sum(normal >= cal.threshold))
    assert ok["alarm"]["expected"] == pytest.approx(k / 401)
    # normal population drifted up: the scores below the threshold move -> retrain
    drifted = judge_window(rng.gamma(4.0, 1.0, 300) * 1.35, cal)
    assert drifted["scores_below_threshold"]["level"] == "major" and drifted["verdict"] == "retrain"
    # defects on top of normal images: only the alarm rate moves -> watch
    defects = judge_window(np.r_[rng.gamma(4.0, 1.0, 200), np.full(60, cal.threshold * 3)], cal)
    assert defects["alarm"]["high"] and defects["scores_below_threshold"]["level"] == "none"
    assert defects["verdict"] == "watch" and "alarm rate" in defects["reasons"][0]
    assert defects["scores"]["level"] == "major"  # reported over all scores, not used for the verdict
    # too few images: reported, not judged
    few = judge_window(same[:5] * 3, cal)
    assert few["too_few"] and few["verdict"] == "ok" and few["scores"] is None


def test_input_drift_gives_retrain_and_small_windows_need_significance():
    cal, _ = _calibration(n=400)
    rng = np.random.default_rng(6)
    scores = rng.gamma(4.0, 1.0, 100)
    same = np.c_[rng.normal(100, 10, 100), rng.normal(30, 3, 100), np.full(100, 256), np.full(100, 192)]
    assert judge_window(scores, cal, inputs=same)["verdict"] == "ok"
    dark = same * [0.7, 0.7, 1, 1]  # 30 % darker: brightness and contrast drop
    w = judge_window(scores, cal, inputs=dark)
    assert w["verdict"] == "retrain"
    assert w["input"]["brightness"]["level"] == "major" and w["input"]["width"]["level"] == "none"
    bigger = same * [1, 1, 2, 2]
    assert judge_window(scores, cal, inputs=bigger)["input"]["width"]["level"] == "major"
    # PSI alone is noisy in small windows: 20 images of the reference's own population
    # reach PSI > 0.25, but KS does not call it significant, so there is no drift
    rng = np.random.default_rng(0)
    same20 = np.c_[rng.normal(100, 10, 20), rng.normal(30, 3, 20), np.full(20, 256), np.full(20, 192)]
    tiny = judge_window(rng.gamma(4.0, 1.0, 20), cal, rules=Rules(min_images=5), inputs=same20)
    b = tiny["input"]["brightness"]
    assert b["psi"] > 0.25 and b["ks_p"] > 0.5 and b["level"] == "none" and tiny["verdict"] == "ok"


def test_verdict_rules_table():
    def window(below="none", inp="none", high=False):
        t = lambda level: {"level": level, "ks_d": 0.5, "ks_p": 1e-5, "psi": 0.3, "median": 1.0,  # noqa: E731
                           "reference_median": 0.5}
        return {"n": 100, "too_few": False, "scores_below_threshold": t(below), "input": {"brightness": t(inp)},
                "alarm": {"high": high, "rate": 0.1, "alarms": 10, "interval": [0.05, 0.17], "confidence": 0.95,
                          "expected": 0.01, "p_value": 1e-4}}

    assert verdict_of(window())[0] == "ok"
    assert verdict_of(window(high=True))[0] == "watch"
    assert verdict_of(window(below="moderate"))[0] == "watch"
    assert verdict_of(window(inp="moderate"))[0] == "watch"
    assert verdict_of(window(below="major"))[0] == "retrain"
    assert verdict_of(window(inp="major", high=True)) == ("retrain", verdict_of(window(inp="major", high=True))[1])
    assert len(verdict_of(window(inp="major", high=True))[1]) == 2
    assert EXIT_CODES == {"ok": 0, "watch": 10, "retrain": 11}


def test_a_calibration_without_reference_judges_the_alarm_rate_only():
    cal, _ = _calibration()
    old = Calibration.from_dict({k: v for k, v in cal.to_dict().items() if k != "reference"})
    w = judge_window(np.full(100, cal.threshold * 2), old)
    assert w["alarm"]["expected"] == 0.01 and "target_fpr" in w["alarm"]["expected_from"]
    assert w["scores"] is None and w["verdict"] == "watch"


# ----------------------------------------------------------------------------- windows and the retrain decision
def test_windows_by_count_and_by_time():
    assert parse_window("all") == ("all", 0) and parse_window("500") == ("count", 500)
    assert parse_window("6h") == ("time", 21600) and parse_window("1w") == ("time", 604800)
    for bad in ("0", "1y", "-3", "h", "1.5d"):
        with pytest.raises(ValueError):
            parse_window(bad)
    times = np.array([30.0, 10.0, 20.0, np.nan, 40.0])
    w = split_windows(5, "2", times)
    assert [list(x["rows"]) for x in w] == [[1, 2], [0, 4], [3]]  # time order, unknown times last
    day = 86400.0
    t = np.array([0.5, 0.2, 1.7, 2.1, 2.9]) * day
    w = split_windows(5, "1d", t)
    assert [list(x["rows"]) for x in w] == [[1, 0], [2], [3, 4]]
    assert w[1]["label"] == "1970-01-02T00:00:00+00:00" and w[1]["end"] - w[1]["start"] == day
    with pytest.raises(ValueError, match="needs a time for every row"):
        split_windows(5, "1d", times)
    assert split_windows(0, "all") == []


def test_should_retrain_needs_n_consecutive_windows():
    assert should_retrain(["ok", "retrain", "retrain"], 2)
    assert not should_retrain(["retrain", "watch", "retrain"], 2)
    assert not should_retrain(["retrain"], 2)
    assert should_retrain(["retrain"], 1)
    with pytest.raises(ValueError):
        should_retrain([], 0)


def test_retrain_due_skips_windows_that_already_triggered_one():
    from recontrast_core.mlops.monitoring import retrain_due

    def report(verdicts, submitted=()):
        windows = [{"label": f"w{i}", "verdict": v, "reasons": [f"r{i}"], "mlflow_run_id": f"run{i}",
                    "retrain_submitted": "kfp-1" if i in submitted else None} for i, v in enumerate(verdicts)]
        return {"retrain_after": 2, "windows": windows, "model": {"version": "recontrast/3"}}

    due = retrain_due(report(["ok", "retrain", "retrain"]))
    assert due["due"] and due["windows"] == ["w1", "w2"] and due["mlflow_runs"] == ["run1", "run2"]
    assert due["reason"].startswith("drift monitor: 2 consecutive retrain windows (w1, w2) for recontrast/3: r2")
    assert not retrain_due(report(["ok", "retrain", "retrain"], submitted={1, 2}))["due"]
    # after a submission, two new retrain windows are needed
    assert not retrain_due(report(["retrain", "retrain", "retrain"], submitted={0, 1}))["due"]
    assert retrain_due(report(["retrain", "retrain", "retrain", "retrain"], submitted={0, 1}))["due"]


def test_monitor_windows_puts_unmatched_images_on_the_last_window():
    cal, _ = _calibration(n=400)
    rng = np.random.default_rng(7)
    scores = rng.gamma(4.0, 1.0, 120)
    dark = np.c_[rng.normal(70, 7, 60), rng.normal(21, 2, 60), np.full(60, 256), np.full(60, 192)]
    out = monitor_windows(scores, cal, window="60", unmatched_inputs=dark)
    assert [w["verdict"] for w in out] == ["ok", "retrain"] and out[0]["input"] is None
    assert out[1]["input"]["n"] == 60


def test_monitor_settings_are_checked():
    from pydantic import ValidationError

    from recontrast_core.config import MonitorConfig

    assert MonitorConfig(window="1d").window == "1d"
    for bad in ({"window": "daily"}, {"psi_moderate": 0.3}, {"retrain_after": 0}, {"alpha": 1.5}):
        with pytest.raises(ValidationError):
            MonitorConfig(**bad)


# ----------------------------------------------------------------------------- the score log
def _rows(n, version="recontrast/3", start=0):
    return [{"score": 1.0 + i, "normalized_score": 0.1, "decision": False} for i in range(start, start + n)]


def test_score_log_writes_parts_the_monitor_reads(tmp_path):
    from recontrast_core.mlops.score_log import ScoreLog, log_rows, read_score_table

    log = ScoreLog(str(tmp_path / "log"), flush_rows=5, flush_s=3600).start()
    log.append(log_rows(_rows(3), "req-a", "recontrast", "3"))
    log.append(log_rows(_rows(4, start=3), "req-b", "recontrast", "3"))  # 7 >= 5: the thread writes a part
    for _ in range(100):
        if log.written:
            break
        import time

        time.sleep(0.05)
    assert log.written == 7
    log.append(log_rows(_rows(2, start=7), "req-c", "recontrast", "3"))
    log.close()  # the rest, on the way out
    parts = sorted((tmp_path / "log" / "parts").rglob("*.parquet"))
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    assert len(parts) == 2 and all(p.parent.name == day for p in parts)
    table = read_score_table(tmp_path / "log")
    assert table["path"][:2] == ["request:req-a/0", "request:req-a/1"] and len(table["path"]) == 9
    assert table["score"].tolist() == [1.0 + i for i in range(9)]
    assert set(table["model_version"]) == {"recontrast/3"} and np.isfinite(table["scored_at"]).all()


def test_score_log_never_raises_and_logs_a_failure_once(tmp_path, caplog):
    from recontrast_core.mlops.score_log import ScoreLog, log_rows

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    log = ScoreLog(str(blocker), flush_rows=1000, flush_s=3600, max_pending=10)
    with caplog.at_level(logging.WARNING, logger="recontrast.score_log"):
        log.append(log_rows(_rows(4), "r", "m", "1"))
        assert log.flush() == 0 and log.flush() == 0  # kept for the next attempt
        log.append(log_rows(_rows(8), "r2", "m", "1"))  # over the bound: counted, not raised
    assert log.failures == 2 and log.dropped == 2
    assert len([r for r in caplog.records if "writing a part failed" in r.message]) == 1


def test_read_score_table_batch_outputs_csv_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recontrast_core.errors import UserError
    from recontrast_core.mlops.batch_scoring import schema
    from recontrast_core.mlops.score_log import read_score_table

    now = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    rows = [{"path": f"/x/{i}.png", "score": float(i), "normalized_score": 0.1, "decision": False, "error": "",
             "overlay": "", "model_uri": "m", "model_version": "bundle:abc", "scored_at": now} for i in range(3)]
    rows.append({**rows[0], "path": "/x/bad.png", "score": None, "decision": None, "error": "unreadable"})
    out = tmp_path / "batch"
    (out / "parts").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:2], schema=schema()), out / "parts" / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:], schema=schema()), out / "parts" / "part-00001.parquet")
    t = read_score_table(out)  # parts only (a run not finished): each image once
    assert t["path"] == ["/x/0.png", "/x/1.png", "/x/2.png", "/x/bad.png"] and np.isnan(t["score"][3])
    assert t["scored_at"][0] == now.timestamp()
    pq.write_table(pa.Table.from_pylist(rows[:3], schema=schema()), out / "results.parquet")
    assert read_score_table(out)["source"].endswith("results.parquet")
    csv = tmp_path / "r.csv"
    csv.write_text("path,score,scored_at\n/a.png,0.5,2026-01-02T00:00:00+00:00\n/b.png,,\n")
    t = read_score_table(csv)
    assert t["score"][0] == 0.5 and np.isnan(t["score"][1]) and np.isnan(t["scored_at"][1])
    for bad, message in ((tmp_path / "none", "no such folder"), (tmp_path / "none.csv", "no such file"),
                         (tmp_path, "no score table")):
        with pytest.raises(UserError, match=message):
            read_score_table(bad)
    (tmp_path / "noscore.csv").write_text("path\n/a.png\n")
    with pytest.raises(UserError, match="no 'score' column"):
        read_score_table(tmp_path / "noscore.csv")
