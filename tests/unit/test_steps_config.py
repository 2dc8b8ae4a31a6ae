"""Step plumbing without models or servers: settings mapping, artifact lookup, few-shot
selection, and that the pipeline's parameters and params.yaml share PipelineConfig's
defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from recontrast_core import steps
from recontrast_core.config import AdaptConfig, PipelineConfig, RegistryConfig, TrainConfig
from recontrast_core.data.manifest import Manifest, ManifestEntry
from recontrast_core.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_build_config_flat_and_dotted_overrides() -> None:
    cfg = steps.build_config(TrainConfig, None, iterations=7, backbone="wide_resnet50_2",
                             backbone_weights="/w.pth", image_size=None)
    assert cfg.iterations == 7 and cfg.image_size == TrainConfig().image_size  # None = default
    assert cfg.backbone.name == "wide_resnet50_2" and cfg.backbone.weights == "/w.pth"
    p = steps.build_config(PipelineConfig, PipelineConfig(), **{"train.batch_size": 4, "registry.margin": 0.1})
    assert p.train.batch_size == 4 and p.registry.margin == 0.1
    with pytest.raises(UserError, match="TrainConfig"):
        steps.build_config(TrainConfig, None, no_such_setting=1)
    with pytest.raises(UserError):
        steps.build_config(TrainConfig, None, iterations=0)


def test_adapt_config_follows_the_trainer() -> None:
    p = steps.build_config(PipelineConfig, None, **{
        "adapt_method": "coft", "shots": 5, "train.image_size": 96, "train.backbone.name": "resnet18",
    })
    a = steps.build_config(AdaptConfig, steps.adapt_config_for(p))
    assert (a.method, a.shots, a.image_size, a.backbone.name) == ("coft", 5, 96, "resnet18")


def _manifest(root: Path) -> Manifest:
    rows = [ManifestEntry(f"train/good/{i:03d}.png", 0, split="train") for i in range(10)]
    rows += [ManifestEntry("test/good/a.png", 0, split="test"), ManifestEntry("test/crack/b.png", 1, "crack", split="test")]
    return Manifest(root=str(root), entries=rows)


def test_select_shots_is_stable_and_keeps_the_test_split(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    a, b = steps.select_shots(m, 3), steps.select_shots(m, 3)
    train = [e.path for e in a.entries if e.split == "train"]
    assert len(train) == 3 and train == [e.path for e in b.entries if e.split == "train"]
    assert len(a.select(split="test")) == 2
    assert steps.select_shots(m, None) is m
    with pytest.raises(UserError, match="only 10"):
        steps.select_shots(m, 11)


def test_load_manifest_reanchors_a_moved_dataset(tmp_path: Path) -> None:
    out = tmp_path / "ingest"
    (out / "data" / "train" / "good").mkdir(parents=True)
    m = _manifest(tmp_path / "gone")
    m.save(out / "manifest.json")
    with pytest.raises(UserError, match="not found"):
        steps.load_manifest(out)
    (out / "ingest.json").write_text(json.dumps({"data_dir": "data"}))
    assert Path(steps.load_manifest(out).root) == (out / "data").resolve()
    with steps.anchored_manifest_file(out) as p:
        assert Path(Manifest.load(p).root) == (out / "data").resolve()


def test_find_bundle_and_encoder(tmp_path: Path) -> None:
    (tmp_path / "model" / "bundle").mkdir(parents=True)
    (tmp_path / "model" / "bundle" / "bundle.json").write_text("{}")
    assert steps.find_bundle_dir(tmp_path / "model") == tmp_path / "model" / "bundle"
    with pytest.raises(UserError, match="no model bundle"):
        steps.find_bundle_dir(tmp_path / "nothing")
    skipped = steps.skip_adapt(tmp_path / "adapt")
    assert skipped.name == steps.ADAPT_SKIPPED_FILE and steps.find_encoder(tmp_path / "adapt") is None
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "encoder.safetensors").write_bytes(b"x")
    assert steps.find_encoder(tmp_path / "enc") == tmp_path / "enc" / "encoder.safetensors"
    assert steps.find_encoder("") is None


def test_s3_endpoint_resolution(monkeypatch) -> None:
    for name in steps.S3_ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    assert steps.s3_endpoint() is None
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://minio:9000")
    assert steps.s3_endpoint() == "http://minio:9000"
    assert steps.s3_endpoint("http://explicit:1") == "http://explicit:1"
    assert steps.parse_s3_uri("s3://b/a/b/") == ("b", "a/b/")
    with pytest.raises(UserError):
        steps.parse_s3_uri("/local/path")


def test_pipeline_parameters_default_to_pipeline_config() -> None:
    from pipelines.training_pipeline import pipeline_arguments, training_pipeline

    args = pipeline_arguments(PipelineConfig())
    inputs = training_pipeline.component_spec.inputs
    assert set(args) == set(inputs)
    for name, spec in inputs.items():
        assert spec.default == args[name], name


def test_adapt_and_registry_settings_travel_in_extra_settings() -> None:
    """Every adapt / registry setting without its own pipeline parameter reaches the steps,
    as steps.adapt / steps.register overrides (what the components pass on)."""
    from pipelines.training_pipeline import extra_settings_of

    assert "adapt" not in extra_settings_of(PipelineConfig())  # no adaptation, nothing to carry
    cfg = PipelineConfig.model_validate({
        "adapt_method": "msc",
        "adapt": {"lr": 0.003, "angular_weight": 32, "crop_scale": [0.6, 1.0], "hflip": False, "seed": 4,
                  "epochs": 3, "coft": {"lr": 0.1}},
        "registry": {"secondary_metrics": ["pixel_auroc"], "secondary_tolerance": 0.02, "margin": 0.01,
                     "floors": {"image_auroc": 0.0, "pixel_auroc": 0.5}},  # floors has its own parameter
        "train": {"seed": 9},
    })
    extra = extra_settings_of(cfg)
    assert extra["adapt"] == {"lr": 0.003, "angular_weight": 32.0, "crop_scale": [0.6, 1.0], "hflip": False,
                              "seed": 4, "coft.lr": 0.1}  # epochs has its own parameter
    assert extra["registry"] == {"secondary_metrics": ["pixel_auroc"], "secondary_tolerance": 0.02}
    settings = {"seed": 9, **extra["adapt"]}  # as components/adapt.py: the training seed unless given
    adapt_cfg = steps.build_config(AdaptConfig, None, method="msc", epochs=3, **settings)
    assert (adapt_cfg.lr, adapt_cfg.angular_weight, adapt_cfg.crop_scale, adapt_cfg.hflip) == (0.003, 32.0, (0.6, 1.0), False)
    assert adapt_cfg.seed == 4 and adapt_cfg.coft.lr == 0.1  # the adapt seed, not the training seed
    assert adapt_cfg == steps.adapt_config_for(cfg)  # KFP and DVC adapt with the same settings
    policy = steps.build_config(RegistryConfig, {"primary_metric": "image_auroc", "margin": 0.01,
                                                 "floors": {"image_auroc": 0.0, "pixel_auroc": 0.5},
                                                 **extra["registry"]})
    assert policy == cfg.registry


def test_params_yaml_is_a_valid_pipeline_config() -> None:
    p = steps.load_params(REPO / "params.yaml")
    assert isinstance(p, PipelineConfig)
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(steps.STEPS)
    for stage in dvc["stages"].values():
        for param in stage.get("params", []):
            node = data
            for part in param.split("."):
                assert part in node, param
                node = node[part]


def test_dispatcher_requires_its_inputs(capsys) -> None:
    with pytest.raises(SystemExit):
        steps.main(["train", "--out", "x"])
    assert "--manifest" in capsys.readouterr().err
