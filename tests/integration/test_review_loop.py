"""The review loop against real servers on loopback: batch scoring -> ``recontrast review
export`` -> a reviewer's edits -> ``recontrast review import`` into a DVC-tracked dataset
whose remote is a moto S3 server.

Checked: the import creates a new DVC version (a new ``data/tiles.dvc`` hash, a git commit),
its files are on the S3 remote (the cache is deleted and the new revision is read back
through ``DVCFileSystem`` from S3 alone, as the next training's ingest reads it), and
``recontrast data check`` accepts the dataset; a second import adds nothing and makes no new
commit. Data: a few images of ``tiles_root`` (the real magnetic-tile-dev, or its synthetic
stand-in). Fails (not skips) where the ``dvc`` executable is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_dev_tool
from tests.integration.test_ingest import DVC, GIT_ENV, _run, copy_subset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLI = [sys.executable, "-m", "recontrast_core.cli"]
BUCKET = "review-dvc-store"


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.fixture
def data_repo(moto_s3, tiles_root: Path, tmp_path: Path, monkeypatch) -> dict:
    """git + DVC repository holding data/tiles (MVTec layout), default remote on moto S3."""
    dvc = require_dev_tool(DVC, "dvc (the pipeline extra)")
    for key, value in {**moto_s3.env(), **GIT_ENV}.items():
        monkeypatch.setenv(key, value)
    moto_s3.client().create_bucket(Bucket=BUCKET)
    env = {**os.environ}
    repo = tmp_path / "datarepo"
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    _run([dvc, "config", "core.analytics", "false"], repo, env)
    _run([dvc, "remote", "add", "-d", "s3remote", f"s3://{BUCKET}/tiles"], repo, env)
    _run([dvc, "remote", "modify", "s3remote", "endpointurl", moto_s3.endpoint_url], repo, env)
    copy_subset(tiles_root, repo / "data" / "tiles", n_train=8)
    _run([dvc, "add", "-q", "data/tiles"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "data v1"], repo, env)
    _run([dvc, "push", "-q"], repo, env)
    return {"repo": repo, "env": env, "dvc": dvc}


@pytest.fixture
def scored(tiles_root: Path, tmp_path: Path) -> dict:
    """A small bundle (patch-kNN, 64 px) and a batch-scoring table over 6 images the dataset
    does not hold, scored by it; the threshold put low so that some are flagged."""
    from recontrast_core.config import ModelConfig, TrainConfig
    from recontrast_core.data.layouts import read_mvtec
    from recontrast_core.fit import fit_detector
    from recontrast_core.mlops.batch_scoring import run_batch_scoring

    ds = copy_subset(tiles_root, tmp_path / "fit-ds", n_train=8)
    small = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                        device="cpu")
    bundle = fit_detector(read_mvtec(ds), ModelConfig(kind="patchknn", patchknn={"image_size": 64, "fraction": 0.3}),
                          small, tmp_path / "fit", progress=False).bundle_dir
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["calibration"].update(lo=-1.0, threshold=0.0, hi=1.0)  # every image scores above: all flagged
    (bundle / "bundle.json").write_text(json.dumps(meta))
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for folder, n in (("train/good", 3), ("test/blowhole", 3)):
        files = sorted((tiles_root / folder).iterdir())
        for f in files[-n:]:  # the last files: copy_subset takes the first ones
            shutil.copy2(f, incoming / f.name)
    summary = run_batch_scoring(str(bundle), [incoming], tmp_path / "scores", overlays=False, device="cpu",
                                progress=False)
    assert summary["images"] == 6 and summary["anomalous"] == 6
    return {"bundle": bundle, "table": tmp_path / "scores" / "results.parquet"}


def test_review_round_trip_makes_a_new_dvc_version_on_s3(data_repo, scored, tiles_root, tmp_path):
    repo, env = data_repo["repo"], data_repo["env"]
    project = tmp_path / "review"
    r = cli("review", "export", "--scores", scored["table"], "--out", project, "--band", "0.4,0.6", "--label",
            "blowhole", "--no-progress", "--json", env=env)
    assert r.returncode == 0, r.stderr
    exported = json.loads(r.stdout)
    assert len(exported["items"]) == 6 and exported["counts"]["flagged"] == 6
    assert exported["model"]["version"].startswith("bundle:")
    assert all(i["polygons"] >= 1 for i in exported["items"])  # the map is above a threshold of 0 everywhere

    # the reviewer: the blowhole images keep one polygon each; the good ones become normal
    blowholes = {f.name for f in (tiles_root / "test" / "blowhole").iterdir()}
    for item in exported["items"]:
        path = project / item["annotation"]
        doc = json.loads(path.read_text())
        doc["flags"]["reviewed"] = True
        doc["shapes"] = doc["shapes"][:1] if Path(item["source"]).name in blowholes else []
        path.write_text(json.dumps(doc))

    old_md5 = (repo / "data" / "tiles.dvc").read_text()
    r = cli("review", "import", project, "--dataset", repo / "data" / "tiles", "--tag", "review-1", "--no-progress",
            "--json", env=env)
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert (payload["anomalies"], payload["normals"]) == (3, 3), payload
    assert payload["dataset_card_diff"]["splits"]["test"]["defect_types"]["blowhole"][1] \
        == payload["dataset_card_diff"]["splits"]["test"]["defect_types"]["blowhole"][0] + 3
    assert payload["dataset_card_diff"]["splits"]["train"]["normal"][1] == 8 + 3
    version = payload["dvc"]
    assert version["md5"] != version["previous_md5"] and version["remote"] == "s3remote" and version["pushed"] >= 6
    assert (repo / "data" / "tiles.dvc").read_text() != old_md5
    log = subprocess.run(["git", "-C", repo, "log", "--format=%H %s"], capture_output=True, text=True).stdout
    assert log.splitlines()[0].startswith(version["commit"]) and "review import" in log.splitlines()[0]
    assert subprocess.run(["git", "-C", repo, "status", "--porcelain", "data"], capture_output=True,
                          text=True).stdout.strip() == ""
    assert (project / "import.json").is_file() and (project / "dataset_card.json").is_file()

    # the dataset passes `recontrast data check`
    r = cli("data", "check", repo / "data" / "tiles", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stderr

    # the next training reads the new revision from S3 alone (cache deleted, workspace not used)
    from recontrast_core.data.layouts import read_dataset
    from recontrast_core.mlops.storage import fetch_dvc_path

    shutil.rmtree(repo / ".dvc" / "cache")
    fetched = tmp_path / "fetched"
    commit = fetch_dvc_path(str(repo), "data/tiles", fetched, rev="review-1")
    assert commit == version["commit"]
    m = read_dataset(fetched)
    assert sum(1 for e in m.entries if e.defect_type == "blowhole") >= 3
    assert sum(1 for e in m.entries if e.split == "train") == 11

    # a second import adds nothing and makes no new commit
    r = cli("review", "import", project, "--dataset", repo / "data" / "tiles", "--no-progress", "--json", env=env)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["written"] == [] and len(again["skipped_duplicates"]) == 6
    assert again["dvc"]["commit"] == version["commit"]


def test_import_refuses_a_folder_outside_dvc_and_bad_projects(scored, tmp_path, tiles_root):
    ds = copy_subset(tiles_root, tmp_path / "plain", n_train=4)
    r = cli("review", "import", tmp_path, "--dataset", ds, "--no-progress")
    assert r.returncode == 2 and "not a review folder" in r.stderr and "Traceback" not in r.stderr
    project = tmp_path / "review"
    assert cli("review", "export", "--scores", scored["table"], "--out", project, "--no-progress").returncode == 0
    r = cli("review", "import", project, "--dataset", ds, "--no-progress")
    assert r.returncode == 2 and "not inside a DVC repository" in r.stderr
    r = cli("review", "import", project, "--dataset", ds, "--no-dvc", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["unreviewed"] == 6  # nobody ticked "reviewed": nothing imported
    r = cli("review", "export", "--scores", tmp_path / "nothing.parquet", "--out", tmp_path / "r2", "--no-progress")
    assert r.returncode == 2 and "no scores table" in r.stderr
