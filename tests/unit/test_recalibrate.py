"""Recalibration (recontrast_core.recalibrate): the new bundle shares the weights and differs
only in its calibration, fitted by the training rule on the new normals; the gate; the step
registers a new version with lineage tags and moves the champion only through the gate
(an embedded SQLite registry); the KFP component compiles."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from recontrast_core.calibration import fit_calibration
from recontrast_core.config import ModelConfig, PipelineConfig, TrainConfig
from recontrast_core.errors import UserError
from recontrast_core.promotion import PromotionPolicy
from recontrast_core.recalibrate import (
    RECALIBRATION_FILE,
    decide_recalibration,
    fpr_bound,
    images_digest,
    recalibrate_bundle,
)
from tests.conftest import build_tiny_mvtec, write_image


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A small patch-kNN bundle (64 px, one pass over 8 synthetic images)."""
    from recontrast_core.data.layouts import read_mvtec
    from recontrast_core.fit import fit_detector

    tmp = tmp_path_factory.mktemp("recal-bundle")
    m = read_mvtec(build_tiny_mvtec(tmp / "ds", n_train=8, n_test_good=2, size=(64, 64)))
    small = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                        device="cpu")
    return fit_detector(m, ModelConfig(kind="patchknn", patchknn={"image_size": 64, "fraction": 0.3}), small,
                        tmp / "out", progress=False).bundle_dir


@pytest.fixture(scope="module")
def normals(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("normals")
    for i in range(24):
        write_image(folder / f"n{i:02d}.png", (64, 64), seed=1000 + i)
    return folder


def _meta(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "bundle.json").read_text())


def test_the_new_bundle_shares_the_weights_and_changes_only_the_calibration(bundle, normals, tmp_path):
    from recontrast_core.bundle import load_detector

    paths = sorted(normals.iterdir())
    result = recalibrate_bundle(bundle, paths, tmp_path / "out", target_fpr=0.1, device="cpu", progress=False)
    new = result.bundle_dir
    assert new == tmp_path / "out" / "bundle"
    # the weights: the same file (hard link) or the same bytes
    a, b = (bundle / "model.safetensors").stat(), (new / "model.safetensors").stat()
    assert (a.st_ino == b.st_ino) or (bundle / "model.safetensors").read_bytes() == (new / "model.safetensors").read_bytes()
    old_meta, new_meta = _meta(bundle), _meta(new)
    assert {k: v for k, v in old_meta.items() if k != "calibration"} == {k: v for k, v in new_meta.items()
                                                                         if k != "calibration"}
    # the calibration: the training rule on these scores
    det = load_detector(new, "cpu")
    scores = np.array([r["score"] for r in det.predict(paths)])
    np.testing.assert_allclose(np.sort(scores), np.sort(result.scores), rtol=1e-6)
    want = fit_calibration(result.scores, None, target_fpr=0.1)
    assert new_meta["calibration"]["threshold"] == pytest.approx(want.threshold)
    assert new_meta["calibration"]["method"] == "fpr" and new_meta["calibration"]["target_fpr"] == 0.1
    assert new_meta["calibration"]["n_normal"] == len(paths)
    assert result.fpr == pytest.approx(float(np.mean(result.scores >= want.threshold)))
    assert result.fpr <= fpr_bound(0.1, len(paths))
    # the drift monitor's reference follows the new normals
    assert new_meta["calibration"]["reference"]["n_scores"] == len(paths)
    assert new_meta["calibration"]["reference"]["input"]["n_images"] == len(paths)
    # the record: lineage, images, both FPRs
    record = json.loads((tmp_path / "out" / RECALIBRATION_FILE).read_text())
    assert record["n_images"] == len(paths) and len(record["images"]) == len(paths)
    assert record["images_sha256"] == images_digest(paths)[0]
    assert record["parent"]["bundle"] == str(bundle.resolve())
    assert record["parent_calibration"]["threshold"] == pytest.approx(old_meta["calibration"]["threshold"])


def test_the_images_digest_ignores_order_and_place(normals, tmp_path):
    paths = sorted(normals.iterdir())[:5]
    moved = [Path(shutil.copy(p, tmp_path / f"other-{i}.png")) for i, p in enumerate(paths)]
    assert images_digest(paths)[0] == images_digest(list(reversed(moved)))[0]
    assert images_digest(paths)[0] != images_digest(paths[:4])[0]


def test_bad_input_is_one_line(bundle, normals, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        recalibrate_bundle(bundle, [*sorted(normals.iterdir())[:3], bad], tmp_path / "o1", device="cpu",
                           progress=False)
    with pytest.raises(UserError, match="no normal images"):
        recalibrate_bundle(bundle, [], tmp_path / "o2", device="cpu", progress=False)
    with pytest.raises(UserError, match="cannot replace its parent"):
        recalibrate_bundle(bundle, sorted(normals.iterdir())[:3], bundle.parent, device="cpu", progress=False)


@pytest.mark.parametrize("fpr, n, labelled, champion, promote, words", [
    (0.02, 50, None, True, True, "FPR 0.0200 on 50"),
    (0.02, 10, None, True, False, "only 10 normal images"),
    (0.05, 50, None, True, False, "exceeds 0.0300"),
    (0.02, 50, {"image_auroc": 0.6}, True, False, "labelled data: below floor"),
    (0.02, 50, {"image_auroc": 0.9}, True, True, "floors pass"),
    (0.02, 50, None, False, False, "not the champion"),
])
def test_the_gate(fpr, n, labelled, champion, promote, words):
    d = decide_recalibration(fpr, n, 0.01, labelled_metrics=labelled, policy=PromotionPolicy(),
                             parent_is_champion=champion, parent="m v1")
    assert d.promote is promote and words in d.reason, d.reason


# ---------------------------------------------------------------------------------------
# the step: a new registry version through the gate
# ---------------------------------------------------------------------------------------
def _settings(tmp_path: Path, **kw) -> PipelineConfig:
    from recontrast_core.steps.settings import apply_overrides

    return apply_overrides(None, {"tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                  "train.device": "cpu", **kw})


def test_the_step_registers_a_version_with_lineage_and_moves_the_champion(bundle, normals, tmp_path):
    pytest.importorskip("mlflow")
    from recontrast_core.mlops import registry
    from recontrast_core.mlops.tracking import get_client
    from recontrast_core.steps.recalibrate import recalibrate

    s = _settings(tmp_path, line="unit", **{"calibration.target_fpr": 0.1})
    # a bundle folder as parent: registered under the line's model; no champion yet -> promoted
    first = recalibrate(str(bundle), [normals], tmp_path / "r1", s, min_normals=10, progress=False)
    assert first["model_name"] == "recontrast-unit" and first["decision"] == "promoted", first
    client = get_client(s.tracking.tracking_uri)
    v1 = client.get_model_version("recontrast-unit", first["version"])
    assert v1.tags["recalibration_images"] == "24" and v1.tags["recalibrated_from"].startswith("bundle:")
    # the champion recalibrated: lineage points at it, and it is replaced
    second = recalibrate(f"models:/recontrast-unit@champion", [normals], tmp_path / "r2",
                         _settings(tmp_path, line="unit", **{"calibration.target_fpr": 0.2}), min_normals=10,
                         progress=False)
    assert second["decision"] == "promoted" and second["champion"] == second["version"], second
    v2 = client.get_model_version("recontrast-unit", second["version"])
    tags = v2.tags
    assert tags["recalibrated_from"] == first["version"] and tags["recalibrated_from_uri"].endswith("@champion")
    assert tags["recalibration_images_sha256"] == first["images_sha256"]
    assert tags["promotion_decision"] == "promoted" and tags["promotion_rule"] == "recalibration"
    assert "FPR" in tags["promotion_reason"] and tags["recalibration_decision"] == "passed"
    assert registry.version_metrics(client, v2)["recalibration_n_normals"] == 24
    assert registry.check_invariants(client, "recontrast-unit") == []
    # the same recalibration again (same parent, images, target): the same version, nothing new
    again = recalibrate(f"models:/recontrast-unit/{first['version']}", [normals], tmp_path / "r3",
                        _settings(tmp_path, line="unit", **{"calibration.target_fpr": 0.2}), min_normals=10,
                        progress=False)
    assert again["version"] == second["version"] and again["decision"] == "promoted"
    assert len(registry.all_versions(client, "recontrast-unit")) == 2
    # an older version recalibrated: registered, never promoted by the gate
    old = recalibrate(f"models:/recontrast-unit/{first['version']}", [normals], tmp_path / "r5",
                      _settings(tmp_path, line="unit", **{"calibration.target_fpr": 0.15}), min_normals=10,
                      progress=False)
    assert old["decision"] == "rejected" and "is not the champion" in old["reason"], old
    assert str(client.get_registered_model("recontrast-unit").aliases["champion"]) == second["version"]
    # too few normals: registered, not promoted
    few = recalibrate("models:/recontrast-unit@champion", sorted(normals.iterdir())[:5], tmp_path / "r4",
                      _settings(tmp_path, line="unit"), min_normals=10, progress=False)
    assert few["decision"] == "rejected" and "only 5 normal images" in few["reason"]
    assert str(client.get_registered_model("recontrast-unit").aliases["champion"]) == second["version"]


def test_the_recalibrate_component_compiles(tmp_path):
    from kfp import compiler, dsl

    from recontrast_core.components import OPS, recalibrate_op  # noqa: F401  (generated from the record)

    @dsl.pipeline(name="recalibrate-test")
    def pipe(model_uri: str = "models:/recontrast@champion", normals_uri: str = "s3://b/normals/"):
        recalibrate_op(model_uri=model_uri, normals_uri=normals_uri, min_normals=20,
                       settings=PipelineConfig().model_dump(mode="json", exclude_none=True), pipeline_run_id="",
                       kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipe, str(out))
    text = out.read_text()
    assert "recalibrate_op" in text and "run_component('recalibrate'" in text
    spec = OPS["recalibrate_op"].component_spec
    assert {"model_uri", "normals_uri", "min_normals", "settings"} <= set(spec.inputs)
    assert {"bundle", "promoted", "version", "decision", "result"} <= set(spec.outputs)
