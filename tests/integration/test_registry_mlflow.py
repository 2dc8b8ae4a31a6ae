"""Registry promotion, tracking and the pyfunc model against a real `mlflow server` on
loopback whose artifact store is S3 on a moto server (see conftest.py)."""

from __future__ import annotations

import json
import sys
import types
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recontrast_core.errors import UserError
from recontrast_core.mlops import registry, tracking
from recontrast_core.mlops.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    promote_if_better,
    register_candidate,
)
from recontrast_core.promotion import PromotionPolicy

pytestmark = pytest.mark.integration

# These tests are about the registry's mechanics (aliases, tags, re-evaluation, locks); their
# synthetic metrics carry no training-free baseline, so the baseline floor (which fails
# closed) is off here. test_baseline_floor_through_the_registry turns it on.
POLICY = PromotionPolicy(floors={"image_auroc": 0.7}, primary_metric="image_auroc", margin=0.005,
                         baseline_floor=False)
FP_A = "a" * 64
FP_B = "b" * 64


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _fake_bundle(root: Path, tag: str) -> Path:
    bundle = root / f"bundle-{tag}"
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "bundle.json").write_text(json.dumps({"format": "fake", "tag": tag}))
    return bundle


def _candidate(client, tmp_path, model_name, metrics, fingerprint, pipeline_run_id=None):
    """A run with a fake bundle artifact, registered as a candidate. Returns (version, pid)."""
    pid = pipeline_run_id or _uid("pr")
    run = client.create_run(_experiment_id(client), tags={"pipeline_run_id": pid})
    tracking.log_bundle(_fake_bundle(tmp_path, pid), run.info.run_id, "bundle", client=client)
    tracking.log_metrics(metrics, run.info.run_id, client=client)
    version = register_candidate(
        run.info.run_id, model_name, pid, metrics, fingerprint,
        artifact_path="bundle", client=client,
    )
    return version, pid


def _experiment_id(client, name="registry-tests"):
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def _alias(client, model_name, alias):
    return registry.alias_version(client, model_name, alias)


@pytest.fixture
def client(mlflow_tracking):
    return tracking.get_client()


def test_register_is_idempotent_per_pipeline_run(client, tmp_path):
    name = _uid("m")
    v1, pid = _candidate(client, tmp_path, name, {"image_auroc": 0.9}, FP_A)
    assert _alias(client, name, CHALLENGER).version == v1
    # the retried register step: same pipeline run -> same version, no second one
    run = client.create_run(_experiment_id(client))
    v_again = register_candidate(run.info.run_id, name, pid, {"image_auroc": 0.9}, FP_A,
                                 artifact_path="bundle", client=client)
    assert v_again == v1
    assert [v["version"] for v in registry.status(name, client=client)["versions"]] == [v1]
    mv = client.get_model_version(name, v1)
    assert mv.tags["pipeline_run_id"] == pid
    assert mv.tags["dataset_fingerprint"] == FP_A
    # a bundle folder registered directly has no logged model: its metrics stay version tags
    assert registry.version_model_id(mv) is None
    assert float(mv.tags["metric.image_auroc"]) == pytest.approx(0.9)


def test_promotion_rules_and_rollback(client, tmp_path):
    name = _uid("m")
    # first candidate: no champion -> promoted
    v1, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.90}, FP_A)
    d = promote_if_better(client, name, v1, POLICY)
    assert d.promote, d.reason
    assert _alias(client, name, CHAMPION).version == v1

    # better by more than the margin -> champion; v1 -> previous_champion
    v2, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.95}, FP_A)
    d = promote_if_better(client, name, v2, POLICY)
    assert d.promote, d.reason
    assert _alias(client, name, CHAMPION).version == v2
    assert _alias(client, name, PREVIOUS_CHAMPION).version == v1
    assert client.get_model_version(name, v2).tags["promotion_decision"] == "promoted"

    # worse -> stays challenger, champion unchanged
    v3, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.80}, FP_A)
    d = promote_if_better(client, name, v3, POLICY)
    assert not d.promote
    assert _alias(client, name, CHAMPION).version == v2
    assert _alias(client, name, CHALLENGER).version == v3
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion_decision"] == "rejected"
    assert "worse" in tags["promotion_reason"]
    assert tags["compared_with_version"] == v2

    # within the margin -> not promoted
    v4, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.953}, FP_A)
    d = promote_if_better(client, name, v4, POLICY)
    assert not d.promote and "margin" in d.reason
    assert _alias(client, name, CHAMPION).version == v2

    # below the floor -> not promoted
    v5, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.65}, FP_A)
    assert not promote_if_better(client, name, v5, POLICY).promote

    # rollback: previous champion comes back, the demoted one keeps a tag
    result = registry.rollback(name, reason="bad in production", client=client)
    assert result == {"champion": v1, "demoted": v2}
    assert _alias(client, name, CHAMPION).version == v1
    assert _alias(client, name, PREVIOUS_CHAMPION) is None
    assert client.get_model_version(name, v2).tags["promotion_decision"] == "rolled_back"
    with pytest.raises(UserError):
        registry.rollback(name, client=client)

    info = registry.status(name, client=client)
    assert info["aliases"][CHAMPION] == v1
    assert info["aliases"][CHALLENGER] == v5
    assert {v["version"]: v["metrics"]["image_auroc"] for v in info["versions"]}[v2] == 0.95


def test_baseline_floor_through_the_registry(client, tmp_path):
    """The baseline keys round-trip through the version's metric tags (a bundle folder: no
    logged model) and the gate uses them; the logged model path: test_version_metrics_are_..."""
    name = _uid("m")
    policy = POLICY.model_copy(update={"baseline_floor": True})  # baseline_rule="bootstrap"
    # no baseline in the metrics: refused, however good (the floor fails closed)
    v1, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.97}, FP_A)
    d = promote_if_better(client, name, v1, policy)
    assert not d.promote and "fails closed" in d.reason
    assert client.get_model_version(name, v1).tags["promotion_decision"] == "rejected"
    assert _alias(client, name, CHAMPION) is None
    # significantly worse than the baseline (interval wholly below 0): refused
    v2, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.88, "baseline_image_auroc": 0.93,
                                                "baseline_delta_image_auroc_lo": -0.081,
                                                "baseline_delta_image_auroc_hi": -0.02}, FP_A)
    d = promote_if_better(client, name, v2, policy)
    assert not d.promote and "paired bootstrap interval [-0.081, -0.020]" in d.reason
    # not distinguishable from the baseline: promoted, the interval in the recorded reason
    v3, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.92, "baseline_image_auroc": 0.93,
                                                "baseline_delta_image_auroc_lo": -0.03,
                                                "baseline_delta_image_auroc_hi": 0.006}, FP_A)
    d = promote_if_better(client, name, v3, policy)
    assert d.promote, d.reason
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion_decision"] == "promoted"
    assert "baseline delta -0.010 [-0.030, +0.006]" in tags["promotion_reason"]
    assert float(tags["metric.baseline_delta_image_auroc_hi"]) == pytest.approx(0.006)
    assert _alias(client, name, CHAMPION).version == v3


def _logged_model_candidate(client, model_name, metrics, fingerprint, *, tags=None):
    """A run with an (empty) MLflow 3 logged model, registered from ``models:/<model_id>``
    as the register step does with log_pyfunc's model. Returns (version, model_id, run_id)."""
    pid = _uid("pr")
    run = client.create_run(_experiment_id(client), tags={"pipeline_run_id": pid})
    lm = client.create_logged_model(_experiment_id(client), name="model", source_run_id=run.info.run_id)
    version = register_candidate(run.info.run_id, model_name, pid, metrics, fingerprint,
                                 model_uri=f"models:/{lm.model_id}", client=client, tags=tags)
    return version, lm.model_id, run.info.run_id


def test_version_metrics_are_the_logged_models_metrics(client):
    """With a logged model, the evaluation goes to the model's metrics (shown on its page),
    not to ~20 ``metric.*`` version tags; the gate reads them from there."""
    name = _uid("m")
    metrics = {"image_auroc": 0.91, "pixel_auroc": 0.95, "baseline_image_auroc": 0.88,
               "baseline_delta_image_auroc_lo": -0.01, "baseline_delta_image_auroc_hi": 0.07,
               "aupro": None, "calibrated": True, "note": "text"}
    v1, model_id, run_id = _logged_model_candidate(client, name, metrics, FP_A, tags={"model_kind": "recontrast"})
    mv = client.get_model_version(name, v1)
    assert registry.version_model_id(mv) == model_id
    assert not [k for k in mv.tags if k.startswith(registry.METRIC_TAG_PREFIX)], mv.tags
    assert set(mv.tags) == {"pipeline_run_id", "dataset_fingerprint", "model_kind"}
    logged = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert logged == pytest.approx({"image_auroc": 0.91, "pixel_auroc": 0.95, "baseline_image_auroc": 0.88,
                                    "baseline_delta_image_auroc_lo": -0.01, "baseline_delta_image_auroc_hi": 0.07})
    assert all(m.run_id == run_id for m in client.get_logged_model(model_id).metrics)
    assert registry.version_metrics(client, mv) == pytest.approx(logged)
    assert registry.status(name, client=client)["versions"][0]["metrics"]["image_auroc"] == pytest.approx(0.91)
    # the gate: the baseline floor and the champion comparison both read the model's metrics
    policy = POLICY.model_copy(update={"baseline_floor": True})
    d = promote_if_better(client, name, v1, policy)
    assert d.promote and "baseline delta +0.030 [-0.010, +0.070]" in d.reason, d.reason
    v2, _, _ = _logged_model_candidate(client, name, {"image_auroc": 0.912, "baseline_image_auroc": 0.5}, FP_A)
    d = promote_if_better(client, name, v2, policy)
    assert not d.promote and "0.9120 vs 0.9100" in d.reason, d.reason
    assert client.get_model_version(name, v2).tags["champion_image_auroc"] == "0.91"


def test_versions_registered_before_keep_their_metric_tags(client):
    """A version registered before metrics moved to the logged model (``metric.*`` tags,
    a logged model without metrics) is still read, and compared, through its tags."""
    name = _uid("m")
    registry.ensure_registered_model(client, name)
    run = client.create_run(_experiment_id(client))
    lm = client.create_logged_model(_experiment_id(client), name="model", source_run_id=run.info.run_id)
    old = client.create_model_version(name, f"models:/{lm.model_id}", run_id=run.info.run_id, model_id=lm.model_id,
                                      tags={"pipeline_run_id": _uid("pr"), "dataset_fingerprint": FP_A,
                                            "metric.image_auroc": "0.93", "metric.pixel_auroc": "0.9"})
    assert registry.version_metrics(client, old) == {"image_auroc": 0.93, "pixel_auroc": 0.9}
    assert registry.force_promote(name, old.version, "the old champion", client=client).promote
    v2, _, _ = _logged_model_candidate(client, name, {"image_auroc": 0.95}, FP_A)
    d = promote_if_better(client, name, v2, POLICY)
    assert d.promote and "0.9500 vs 0.9300" in d.reason, d.reason


def test_fingerprint_mismatch_reevaluates_champion(client, tmp_path):
    name = _uid("m")
    v1, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.97}, FP_A)
    assert promote_if_better(client, name, v1, POLICY).promote

    # a candidate evaluated on other data: stored champion metrics (0.97) must not be used
    v2, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.90}, FP_B)
    d = promote_if_better(client, name, v2, POLICY)  # no re-evaluation function given
    assert not d.promote and "other data" in d.reason
    assert _alias(client, name, CHAMPION).version == v1

    calls = []

    def reevaluate(champion_mv):
        calls.append(champion_mv.version)
        bundle = registry.download_bundle(client, name, champion_mv, tmp_path / "dl")
        assert json.loads((bundle / "bundle.json").read_text())["format"] == "fake"
        return {"image_auroc": 0.85}  # the champion on the new evaluation set

    d = promote_if_better(client, name, v2, POLICY, evaluate_champion_fn=reevaluate)
    assert calls == [v1]
    assert d.promote, d.reason
    assert _alias(client, name, CHAMPION).version == v2
    assert _alias(client, name, PREVIOUS_CHAMPION).version == v1

    # same fingerprint -> stored metrics, the function is not called
    v3, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.99}, FP_B)
    d = promote_if_better(client, name, v3, POLICY, evaluate_champion_fn=lambda mv: 1 / 0)
    assert d.promote, d.reason


def test_artifacts_land_in_s3(client, tmp_path, moto_s3):
    name = _uid("m")
    v1, pid = _candidate(client, tmp_path, name, {"image_auroc": 0.9}, FP_A)
    keys = [
        o["Key"]
        for page in moto_s3.client().get_paginator("list_objects_v2").paginate(Bucket="mlflow-artifacts")
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("bundle/bundle.json") for k in keys), keys[:20]
    # and the registered version downloads back through the server
    bundle = registry.download_bundle(client, name, client.get_model_version(name, v1), tmp_path / "d")
    assert json.loads((bundle / "bundle.json").read_text())["tag"] == pid


def test_no_credential_in_params_or_tags(client, tmp_path, monkeypatch):
    secret = "some-unique-secret-" + uuid.uuid4().hex[:6]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDUNIQUE" + uuid.uuid4().hex[:6].upper())
    key_id = __import__("os").environ["AWS_ACCESS_KEY_ID"]
    pid = _uid("pr")
    config = {
        "train": {"iterations": 3, "lr": 0.002},
        "storage": {
            "endpoint_url": "http://127.0.0.1:9000",
            "aws_secret_access_key": secret,
            "aws_access_key_id": key_id,
            "password": "hunter2-xyz",
            "note": f"copied {secret} by mistake",
        },
    }
    with tracking.step_run(pid, "train", experiment="cred-tests", params=config,
                           tags={"dataset_uri": f"s3://{key_id}:{secret}@bucket/x"}) as run_id:
        tracking.log_params({"extra_token": "tok-abc", "more": secret}, run_id)
        tracking.log_dataset_input(f"s3://bucket/data?k={secret}", FP_A, run_id, dvc_rev="v1")
    parent = tracking.find_pipeline_run(pid, "cred-tests", client)
    version = register_candidate(run_id, _uid("m"), pid, {"image_auroc": 0.9}, FP_A,
                                 artifact_path="none", client=client,
                                 tags={"storage_secret": secret, "who": secret})
    assert version
    runs = [client.get_run(run_id), client.get_run(parent.info.run_id)]
    logged = []
    for run in runs:
        logged += list(run.data.params.items()) + list(run.data.tags.items())
        for ds in run.inputs.dataset_inputs:
            logged.append(ds.dataset.source)
    blob = json.dumps(logged)
    assert "iterations" in blob  # params were logged at all
    for value in (secret, key_id, "hunter2-xyz", "tok-abc"):
        assert value not in blob, value
    assert client.get_run(run_id).data.params["storage.aws_secret_access_key"] == "***"
    mv_blob = json.dumps(
        [client.get_model_version(m.name, m.version).tags for m in client.search_model_versions(
            f"run_id = '{run_id}'")]
    )
    assert secret not in mv_blob


def test_parent_and_child_runs_by_tag(client, tmp_path):
    pid = _uid("pr")
    exp = "tracking-tests"
    parent_id = tracking.start_pipeline_run(pid, experiment=exp, dataset_fingerprint=FP_A,
                                            dvc_rev="abc123", params={"seed": 1})
    assert tracking.start_pipeline_run(pid, experiment=exp) == parent_id  # found by tag
    with tracking.step_run(pid, "train", experiment=exp) as child1:
        tracking.log_loss_curve(
            [{"iteration": i, "loss": 1.0 / (i + 1), "alpha": -3 + i} for i in range(5)], child1
        )
    with tracking.step_run(pid, "train", experiment=exp) as child_again:  # a retried step
        pass
    assert child_again == child1
    with tracking.step_run(pid, "evaluate", experiment=exp) as child2:
        payload = {
            "metrics": {"image_auroc": 0.91, "pixel_auroc": 0.95, "aupro": None},
            "dataset_fingerprint": FP_A,
            "n_images": 6,
            "per_image": [
                {"path": f"{i}.png", "label": i % 2, "score": 0.1 * i + 0.3 * (i % 2)}
                for i in range(6)
            ],
        }
        from recontrast_core.plots import plot_roc_pr

        plots = tmp_path / "plots"  # the evaluate step draws them once; tracking uploads them
        plot_roc_pr([r["label"] for r in payload["per_image"]], [r["score"] for r in payload["per_image"]], plots)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.imsave(plots / "overlay_grid.png", np.random.default_rng(0).random((16, 16)))
        logged = tracking.log_evaluation(payload, child2, plots_dir=plots)
        tracking.log_dataset_input(str(tmp_path), FP_A, child2, dvc_rev="abc123", context="evaluation")
    assert logged == {"image_auroc": 0.91, "pixel_auroc": 0.95}
    assert child2 != child1
    for cid in (child1, child2):
        tags = client.get_run(cid).data.tags
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags["pipeline_run_id"] == pid
        assert tags["dataset_fingerprint"] == FP_A and tags["dvc_rev"] == "abc123"
    ptags = client.get_run(parent_id).data.tags
    assert ptags["dvc_rev"] == "abc123" and ptags["dataset_fingerprint"] == FP_A
    history = client.get_metric_history(child1, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2, 3, 4]
    files = {f.path for f in client.list_artifacts(child2, "evaluation/plots")}
    assert {"evaluation/plots/roc.png", "evaluation/plots/pr.png",
            "evaluation/plots/overlay_grid.png"} <= files
    run2 = client.get_run(child2)
    assert run2.data.metrics["image_auroc"] == pytest.approx(0.91)
    (ds,) = run2.inputs.dataset_inputs
    assert ds.dataset.digest == FP_A[:36]
    assert {t.key: t.value for t in ds.tags}["dvc_rev"] == "abc123"
    assert tracking.end_pipeline_run(pid, experiment=exp) == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"


@pytest.fixture
def fake_bundle_module(monkeypatch):
    """A stand-in for recontrast_core.bundle.load_detector (the real model is not needed)."""

    class Detector:
        def __init__(self, bundle_dir):
            self.meta = json.loads((Path(bundle_dir) / "bundle.json").read_text())

        def predict(self, images):
            out = []
            for im in images:
                s = float(len(im)) if isinstance(im, str) else float(np.asarray(im).mean())
                out.append({"score": s, "normalized_score": s / 20.0, "decision": s > 10,
                            "anomaly_map": np.full((4, 4), s, dtype=np.float32)})
            return out

    mod = types.ModuleType("recontrast_core.bundle")
    mod.load_detector = lambda bundle_dir, device="auto": Detector(bundle_dir)
    monkeypatch.setitem(sys.modules, "recontrast_core.bundle", mod)
    import recontrast_core

    monkeypatch.setattr(recontrast_core, "bundle", mod, raising=False)
    return mod


def test_pyfunc_model_roundtrip(client, tmp_path, fake_bundle_module, monkeypatch):
    import mlflow

    from recontrast_core.mlops.serving.pyfunc_model import log_pyfunc

    name = _uid("m")
    pid = _uid("pr")
    with tracking.step_run(pid, "register", experiment="pyfunc-tests") as run_id:
        info = log_pyfunc(_fake_bundle(tmp_path, "py"))  # default example: a grey image
    assert info.saved_input_example_info is not None
    assert info.signature.inputs.input_names() == ["path", "image", "image_b64"]
    assert info.signature.outputs.input_names() == ["score", "normalized_score", "decision"]
    version = register_candidate(run_id, name, pid, {"image_auroc": 0.9}, FP_A, client=client)
    assert promote_if_better(client, name, version, POLICY).promote
    # the pyfunc is the version's logged model, and the evaluation its metrics (not tags)
    mv = client.get_model_version(name, version)
    assert registry.version_model_id(mv) == info.model_id
    assert {m.key: m.value for m in client.get_logged_model(info.model_id).metrics} == {"image_auroc": 0.9}
    assert "metric.image_auroc" not in mv.tags

    root = tmp_path.resolve()  # the `path` input is off unless the server allows a folder
    monkeypatch.setenv("RECONTRAST_ALLOWED_PATH_ROOT", str(root))
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame({"path": ["a.png", "abcdefghijklmnop.png"]}))
    assert list(out.columns) == ["score", "normalized_score", "decision"]
    # the stand-in scores len(path); paths arrive resolved under the root
    assert out["score"].tolist() == [float(len(str(root / "a.png"))), float(len(str(root / "abcdefghijklmnop.png")))]
    assert out["score"].dtype == np.float64 and out["decision"].dtype == bool
    out = model.predict(pd.DataFrame({"image": [np.full((3, 3), 20, np.uint8), np.zeros((2, 2), np.uint8)]}))
    assert out["decision"].tolist() == [True, False]
    out = model.predict(pd.DataFrame({"image": [np.full((3, 3), 20, np.uint8)]}),
                        params={"return_map": True})
    assert out["decision"].tolist() == [True]
    assert np.asarray(out["anomaly_map"][0]).shape == (4, 4)
    raw = model.unwrap_python_model().predict(None, ["a.png", np.zeros((2, 2))])
    assert raw["score"].tolist() == [float(len(str(root / "a.png"))), 0.0]
    # the downloaded registered model carries the bundle
    bundle = registry.download_bundle(client, name, client.get_model_version(name, version),
                                      tmp_path / "dl")
    assert json.loads((bundle / "bundle.json").read_text())["tag"] == "py"


def test_cli_status_promote_rollback(client, tmp_path, mlflow_server):
    from typer.testing import CliRunner

    from recontrast_core.cli.registry import registry_app

    name = _uid("m")
    # `registry promote --gate` applies the default policy, the baseline floor included:
    # these candidates carry a training-free baseline (flat rule, no bootstrap interval)
    v1, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.9, "baseline_image_auroc": 0.86}, FP_A)
    v2, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.8, "baseline_image_auroc": 0.79}, FP_A)
    runner = CliRunner()
    common = ["--model-name", name, "--tracking-uri", mlflow_server.url]

    r = runner.invoke(registry_app, ["promote", v1, "--gate", "--json", *common])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["promoted"] is True
    r = runner.invoke(registry_app, ["promote", "--gate", "--json", *common])  # the challenger
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) | {"reason": ""} == {
        "model_name": name, "version": v2, "promoted": False, "reason": ""}
    assert "worse than champion" in json.loads(r.stdout)["reason"]  # refused for the comparison
    r = runner.invoke(registry_app, ["promote", v2, *common])  # forced needs a reason
    assert r.exit_code == 2 and "reason" in r.output
    r = runner.invoke(registry_app, ["promote", "abc", "--reason", "x", *common])  # not a version number
    assert r.exit_code == 2 and "version must be a number" in r.output and "Traceback" not in r.output
    r = runner.invoke(registry_app, ["promote", v2, "--reason", "manual override", "--json", *common])
    assert r.exit_code == 0 and json.loads(r.stdout)["promoted"] is True
    r = runner.invoke(registry_app, ["status", "--json", *common])
    status = json.loads(r.stdout)
    assert status["aliases"] == {CHAMPION: v2, PREVIOUS_CHAMPION: v1}
    r = runner.invoke(registry_app, ["rollback", "--json", *common])
    assert r.exit_code == 0 and json.loads(r.stdout)["champion"] == v1
    r = runner.invoke(registry_app, ["rollback", *common])
    assert r.exit_code == 2 and "previous_champion" in r.output
    r = runner.invoke(registry_app, ["status", "--model-name", _uid("nope"),
                                     "--tracking-uri", mlflow_server.url])
    assert r.exit_code == 2 and "no registered model" in r.output
    r = runner.invoke(registry_app, ["status", *common])
    assert r.exit_code == 0 and "champion" in r.output


def test_embedded_default_store(tmp_path, monkeypatch):
    """No MLFLOW_TRACKING_URI: SQLite file + mlartifacts/ under the working directory."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        pid = _uid("pr")
        with tracking.step_run(pid, "train", git_sha=None) as run_id:
            mlflow.log_metric("x", 1.0)
            tracking.log_bundle(_fake_bundle(tmp_path / "src", "e"), run_id)
        assert (tmp_path / "mlflow.db").is_file()
        assert list((tmp_path / "mlartifacts").rglob("bundle.json"))
        client = tracking.get_client()
        version = register_candidate(run_id, "local-model", pid, {"image_auroc": 0.8}, FP_A,
                                     artifact_path="bundle", client=client)
        assert registry.status("local-model", client=client)["aliases"] == {CHALLENGER: version}
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


# ---------------------------------------------------------------------------------------
# concurrency: one writer at a time per model (a lock kept in the registry), invariants
# ---------------------------------------------------------------------------------------
def test_concurrent_register_for_one_pipeline_run_makes_one_version(client, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    name, pid = _uid("m"), _uid("pr")
    runs = []
    for i in range(4):  # four retries of the same register step, each with its own run
        run = client.create_run(_experiment_id(client), tags={"pipeline_run_id": pid})
        tracking.log_bundle(_fake_bundle(tmp_path / str(i), pid), run.info.run_id, "bundle", client=client)
        runs.append(run.info.run_id)
    registry.ensure_registered_model(client, name)
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda rid: register_candidate(rid, name, pid, {"image_auroc": 0.9}, FP_A,
                                                                  artifact_path="bundle", client=client), runs))
    assert len(set(versions)) == 1, versions
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert registry.LOCK_TAG not in (client.get_registered_model(name).tags or {})  # released


def test_concurrent_promotions_and_rollbacks_keep_the_invariants(client, tmp_path):
    """Forced promotions and rollbacks racing from threads end in a state some serial order
    gives: previous_champion is the version the champion replaced, no forced promotion is
    skipped, and the lock is released."""
    from concurrent.futures import ThreadPoolExecutor

    name = _uid("m")
    versions = [_candidate(client, tmp_path, name, {"image_auroc": 0.8 + 0.01 * i}, FP_A)[0] for i in range(4)]
    registry.force_promote(name, versions[0], "seed", client=client)

    def act(i):
        if i % 3 == 2:
            try:
                return ("rollback", registry.rollback(name, client=client)["champion"])
            except UserError:  # nothing to roll back to at that moment: a serial outcome too
                return ("rollback", None)
        return ("force", registry.force_promote(name, versions[1 + i % 3], f"race {i}", client=client).promote)

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(act, range(6)))
    assert registry.check_invariants(client, name) == [], outcomes
    tags = client.get_registered_model(name).tags or {}
    assert registry.LOCK_TAG not in tags
    aliases = registry.status(name, client=client)["aliases"]
    assert aliases.get(CHAMPION) in versions


def test_a_held_lock_makes_writers_wait_and_then_give_up(client, tmp_path, monkeypatch):
    import time as _time

    name = _uid("m")
    v1, _ = _candidate(client, tmp_path, name, {"image_auroc": 0.9}, FP_A)
    client.set_registered_model_tag(name, registry.LOCK_TAG,
                                    json.dumps({"owner": "other-host:1:abc", "expires": _time.time() + 60}))
    with pytest.raises(registry.RegistryBusy, match="other-host:1:abc"):
        with registry.model_lock(client, name, timeout_s=1.0):
            pass
    assert _alias(client, name, CHAMPION) is None
    # an expired lock (its holder died) is taken over
    client.set_registered_model_tag(name, registry.LOCK_TAG,
                                    json.dumps({"owner": "dead:1:abc", "expires": _time.time() - 1}))
    assert registry.force_promote(name, v1, "after a crash", client=client).promote
