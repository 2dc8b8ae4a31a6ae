"""A CI-sized subset of the fault-injection suite (benchmarks/faults.py): kill -9 during
training then resume, concurrent registry writers against a real mlflow server, S3
behind a proxy that resets connections, answers 500 and stalls, and a full disk at every
write point of evaluate. The full suite's figures
are in docs/reliability.md.

The images are ``tiles_root``'s (magnetic-tile-dev, or its synthetic stand-in where that is
absent), copied where the suite looks first (``faults.tiny_dataset``). A missing or broken
benchmarks/faults.py is an error, not a skip."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import faults  # noqa: E402  (benchmarks/faults.py: a missing module fails, never skips)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_kill_9_then_resume_gives_the_uninterrupted_result(tiles_root, tmp_path):
    faults.tiny_dataset(tmp_path, src=tiles_root)  # the trials reuse tmp_path/tiles
    report = faults.kill_trials(2, tmp_path, seed=1)
    assert report["ok"] == 2, report["trials"]
    assert report["killed"] >= 1, report["trials"]  # at least one trial really was killed mid-run


def test_concurrent_registry_writers(mlflow_server_local, tmp_path):
    from recontrast_core.mlops import tracking

    client = tracking.get_client(mlflow_server_local.url)
    reg = faults.concurrent_register(client, 4, tmp_path / "reg")
    assert reg["distinct_versions_returned"] == 1 and reg["versions_in_registry"] == 1
    seq = faults.promotion_sequences(client, 3, tmp_path / "seq", seed=2)
    assert seq["worse_promotions"] == 0 and seq["broken_invariants"] == 0, seq["details"]


def test_s3_faults_ingest_and_bundle_upload_finish_intact(tiles_root, tmp_path):
    faults.tiny_dataset(tmp_path, src=tiles_root)  # the trials reuse tmp_path/tiles
    report = faults.s3_faults(1, tmp_path)
    assert report["ingest"][0] == {**report["ingest"][0], "ok": True, "identical": True, "partial_files": []}
    assert report["mlflow_bundle"][0]["ok"] and report["mlflow_bundle"][0]["identical"]
    conns = report["proxy_connections"]
    assert conns["reset"] + conns["500"] > 0  # faults were really injected


def test_disk_full_at_every_write_point_of_evaluate_registers_nothing(tiles_root, tmp_path, mlflow_server_local):
    """The disk-full section (real processes): evaluate failing at each write point leaves
    no metrics.json, no temporary file, and the register step refuses its folder."""
    faults.tiny_dataset(tmp_path, src=tiles_root)
    report = faults.disk_full_points(tmp_path, mlflow_server_local.url, commands=("evaluate",), batch=False)
    ev = report["evaluate"]
    assert ev["write_points"] >= 5, ev
    assert ev["clean_exit_2_one_line"] == ev["write_points"] and ev["names_the_file"] == ev["write_points"], ev
    assert ev["half_written"] == 0 and ev["registered_from_failed"] == 0, ev["failures"]
    assert report["registered_versions"] == 0
