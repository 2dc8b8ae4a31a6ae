"""Step plumbing without models or servers: the one settings shape and its override
function, artifact lookup, few-shot selection, and that every field of PipelineConfig
reaches its step through the CLI, the DVC stage and the compiled KFP pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from recontrast_core import steps
from recontrast_core.config import PipelineConfig, TrainConfig
from recontrast_core.data.manifest import Manifest, ManifestEntry
from recontrast_core.errors import UserError
from recontrast_core.runtime import S3_ENDPOINT_ENV, s3_endpoint
from recontrast_core.steps import artifacts
from recontrast_core.steps.settings import adapt_settings, apply_overrides, dump_settings, load_settings, with_run_values

REPO = Path(__file__).resolve().parents[2]


def test_dotted_overrides_from_strings_and_mappings() -> None:
    cfg = apply_overrides(None, ["train.iterations=7", "train.backbone.name=wide_resnet50_2",
                                 "train.decoder_blocks=[1,1,1]", "registry.floors.pixel_auroc=0.8", "shots=null"])
    assert cfg.train.iterations == 7 and cfg.train.backbone.name == "wide_resnet50_2"
    assert cfg.train.decoder_blocks == (1, 1, 1) and cfg.registry.floors == {"image_auroc": 0.7, "pixel_auroc": 0.8}
    assert cfg.train.image_size == TrainConfig().image_size  # untouched: the default
    p = apply_overrides(cfg, {"train.batch_size": 4, "registry.margin": 0.1, "train.seed": None})
    assert p.train.batch_size == 4 and p.registry.margin == 0.1 and p.train.seed == cfg.train.seed
    with pytest.raises(UserError, match=r"train.imagesize.*did you mean train.image_size"):
        apply_overrides(None, ["train.imagesize=64"])
    with pytest.raises(UserError, match="train.iterations"):
        apply_overrides(None, ["train.iterations=0"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_overrides(None, ["train.iterations"])


def test_adapt_follows_the_trainer_and_refuses_conflicts() -> None:
    p = apply_overrides(None, {"adapt_method": "coft", "shots": 5, "train.image_size": 96,
                               "train.backbone.name": "resnet18"})
    a = adapt_settings(p)
    assert (a.method, a.shots, a.image_size, a.backbone.name, a.device) == ("coft", 5, 96, "resnet18", "auto")
    with pytest.raises(UserError, match=r"adapt.image_size.*train.image_size"):
        adapt_settings(apply_overrides(p, {"adapt.image_size": 64}))
    with pytest.raises(UserError, match=r"adapt.method.*adapt_method"):
        adapt_settings(apply_overrides(p, {"adapt.method": "msc"}))
    assert adapt_settings(apply_overrides(p, {"adapt.image_size": 96})).image_size == 96  # the same: fine


def test_run_values_override_the_settings_parameter() -> None:
    base = PipelineConfig().model_dump(mode="json", exclude_none=True)
    cfg = with_run_values(base, source="s3://b/p", adapt_method="msc", shots=4, model_name="m")
    assert (cfg.data.source, cfg.adapt_method, cfg.shots, cfg.registry.model_name) == ("s3://b/p", "msc", 4, "m")
    assert with_run_values(base) == PipelineConfig()  # empty run values keep the settings
    job = with_run_values(base, train_backend="trainjob", num_nodes=2, gpus_per_node=4)
    assert (job.train_backend, job.trainjob.num_nodes, job.trainjob.gpus_per_node) == ("trainjob", 2, 4)


def _manifest(root: Path) -> Manifest:
    rows = [ManifestEntry(f"train/good/{i:03d}.png", 0, split="train") for i in range(10)]
    rows += [ManifestEntry("test/good/a.png", 0, split="test"), ManifestEntry("test/crack/b.png", 1, "crack", split="test")]
    return Manifest(root=str(root), entries=rows)


def test_select_shots_is_stable_and_keeps_the_test_split(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    a, b = artifacts.select_shots(m, 3), artifacts.select_shots(m, 3)
    train = [e.path for e in a.entries if e.split == "train"]
    assert len(train) == 3 and train == [e.path for e in b.entries if e.split == "train"]
    assert len(a.select(split="test")) == 2
    assert artifacts.select_shots(m, None) is m
    with pytest.raises(UserError, match="only 10"):
        artifacts.select_shots(m, 11)


def test_load_manifest_reanchors_a_moved_dataset(tmp_path: Path) -> None:
    out = tmp_path / "ingest"
    (out / "data" / "train" / "good").mkdir(parents=True)
    m = _manifest(tmp_path / "gone")
    m.save(out / "manifest.json")
    with pytest.raises(UserError, match="not found"):
        artifacts.load_manifest(out)
    (out / "ingest.json").write_text(json.dumps({"data_dir": "data"}))
    assert Path(artifacts.load_manifest(out).root) == (out / "data").resolve()
    assert artifacts.load_manifest(m) is m  # a Manifest passes through


def test_find_bundle_and_encoder(tmp_path: Path) -> None:
    (tmp_path / "model" / "bundle").mkdir(parents=True)
    (tmp_path / "model" / "bundle" / "bundle.json").write_text("{}")
    assert artifacts.find_bundle_dir(tmp_path / "model") == tmp_path / "model" / "bundle"
    with pytest.raises(UserError, match="no model bundle"):
        artifacts.find_bundle_dir(tmp_path / "nothing")
    skipped = steps.skip_adapt(tmp_path / "adapt")
    assert skipped.name == artifacts.ADAPT_SKIPPED_FILE and artifacts.find_encoder(tmp_path / "adapt") is None
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "encoder.safetensors").write_bytes(b"x")
    assert artifacts.find_encoder(tmp_path / "enc") == tmp_path / "enc" / "encoder.safetensors"
    assert artifacts.find_encoder("") is None


def test_one_s3_endpoint_rule(monkeypatch) -> None:
    from recontrast_core.mlops.storage import parse_s3_uri

    for name in S3_ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    assert s3_endpoint() is None
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://minio:9000")
    assert s3_endpoint() == "http://minio:9000"
    assert s3_endpoint("http://explicit:1") == "http://explicit:1"
    assert parse_s3_uri("s3://b/a/b/") == ("b", "a/b/")
    with pytest.raises(UserError):
        parse_s3_uri("/local/path")


def test_pipeline_parameters_are_the_settings_plus_run_values() -> None:
    from recontrast_core.pipelines.training_pipeline import pipeline_arguments, training_pipeline

    args = pipeline_arguments(PipelineConfig())
    inputs = training_pipeline.component_spec.inputs
    assert set(inputs) == {"settings", "source", "adapt_method", "shots", "model_name", "pipeline_run_id",
                           "train_backend", "num_nodes", "gpus_per_node"}
    assert (args["train_backend"], args["num_nodes"], args["gpus_per_node"]) == ("pod", 1, 1)
    assert inputs["settings"].default == args["settings"]  # the defaults come from PipelineConfig only
    assert PipelineConfig.model_validate(inputs["settings"].default) == PipelineConfig()


def test_params_yaml_is_a_whole_serialised_pipeline_config() -> None:
    p = load_settings(REPO / "params.yaml")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert data == yaml.safe_load(dump_settings(p))  # every field present, nothing extra
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(steps.STEPS)
    for stage in dvc["stages"].values():
        for param in stage.get("params", []):
            node = data
            for part in param.split("."):
                assert part in node, param
                node = node[part]


def test_dispatcher_requires_its_inputs(capsys) -> None:
    from recontrast_core.steps.__main__ import main

    with pytest.raises(SystemExit):
        main(["train", "--out", "x"])
    assert "--manifest" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# every field reaches its step through the CLI, the DVC stage and the compiled pipeline
# ---------------------------------------------------------------------------------------
def _leaves(model, prefix=""):
    """(dotted key, field info) for every leaf setting of PipelineConfig."""
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        sub = [a for a in (getattr(ann, "__args__", ()) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub:
            yield from _leaves(sub[0], key + ".")
        else:
            yield key, info


def _changed_value(key: str, cfg: PipelineConfig, info=None):
    """A valid non-default value for ``key`` (as a YAML literal): a Literal field's next
    choice; otherwise from the table below or by the value's type."""
    import typing

    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    special = {"adapt_method": "msc", "shots": 3, "data.layout": "mvtec", "train.backbone.feature_location": "bottleneck",
               "train.backbone.input_stats": "imagenet", "train.encoder_bn": "eval", "train.decoder_init": "pytorch",
               "inference.score": "topk_mean", "inference.precision": "fp32", "baseline.sampler": "coreset", "adapt.pool": "max",
               "adapt.method": "msc", "adapt.backbone": None, "adapt.image_size": 96, "adapt.device": "cpu",
               "adapt.shots": 3, "train.device": "cpu", "adapt.coft.synth": ["scar"], "train.augment": True,
               "data.layout_options": {"normal_dir": "good"}, "registry.floors": {"aupro": 0.1},
               "registry.secondary_metrics": ["aupro"], "train.backbone.out_indices": [0, 1, 2],
               "baseline.levels": [0, 2], "train.betas": [0.8, 0.99], "adapt.crop_scale": [0.5, 1.0],
               "adapt.coft.crop_scale": [0.4, 1.0], "train.decoder_blocks": [1, 1, 1], "train.image_size": 96,
               "adapt.level": -2, "adapt.freeze_levels": 1, "calibration.validation_fraction": 0.2,
               "adapt.coft.anomaly_fraction": 0.25, "adapt.coft.momentum": 0.5, "adapt.momentum": 0.5,
               "adapt.coft.np_margin": 0.1, "baseline.fraction": 0.2, "inference.topk_fraction": 0.02,
               "calibration.target_fpr": 0.02, "train.alpha_warmup_fraction": 0.2, "train_backend": "trainjob",
               "train.sync_batchnorm": False, "trainjob.cpu_per_node": "16", "trainjob.memory_per_node": "64Gi",
               "model.kind": "patchknn", "model.patchknn.backbone": "tf_efficientnet_lite2",
               "model.patchknn.input_stats": "imagenet", "model.patchknn.sampler": "random",
               "model.patchknn.levels": [0, 2], "model.patchknn.image_size": 160, "model.fusion.q_lo": 0.8,
               "model.fusion.q_hi": 0.99, "model.auto.backbones": ["tf_efficientnet_lite0"],
               "model.auto.image_sizes": [128], "model.auto.input_stats": ["auto"], "model.auto.kinds": ["patchknn"],
               "registry.baseline_rule": "flat", "monitor.window": "1d", "monitor.confidence": 0.9}
    if key in special:
        return special[key]
    ann = getattr(info, "annotation", None)
    if typing.get_origin(ann) is typing.Literal and not isinstance(node, (tuple, list)):
        return next(a for a in typing.get_args(ann) if a != node)
    if isinstance(node, bool):
        return not node
    if isinstance(node, int):
        return node + 1
    if isinstance(node, float):
        return node * 2 if node else 0.5
    if isinstance(node, str):
        return node + "-x"
    if node is None:
        return "x"
    raise AssertionError(f"no test value for {key} ({node!r})")


def test_every_field_reaches_its_step_through_cli_dvc_and_kfp(tmp_path, monkeypatch) -> None:
    """For each leaf setting: ``--set key=value`` (the CLI and DVC path) and the compiled
    pipeline's settings parameter (what each KFP component receives) both produce a
    PipelineConfig in which the step's section holds the new value."""
    from kfp import compiler

    from recontrast_core.pipelines.training_pipeline import pipeline_arguments, training_pipeline
    from recontrast_core.cli.common import settings_from

    base = PipelineConfig()
    package = tmp_path / "p.yaml"
    compiler.Compiler().compile(training_pipeline, str(package))
    spec = next(yaml.safe_load_all(package.read_text()))  # the pipeline spec (then the platform spec)
    compiled_default = spec["root"]["inputDefinitions"]["parameters"]["settings"]["defaultValue"]
    assert PipelineConfig.model_validate(compiled_default) == base
    checked = 0
    for key, info in _leaves(PipelineConfig):
        if key.startswith("adapt.backbone."):
            continue  # follows train.backbone (adapt_settings; a different value is refused)
        value = _changed_value(key, base, info)
        item = f"{key}={json.dumps(value)}"
        via_cli = settings_from(None, {}, [item])  # recontrast ... --set (the CLI)
        params = tmp_path / "params.yaml"  # python -m recontrast_core.steps --params (DVC)
        params.write_text(dump_settings(apply_overrides(base, [item])))
        via_dvc = load_settings(params)
        via_kfp = with_run_values(pipeline_arguments(via_cli)["settings"])  # what a component builds
        for cfg in (via_cli, via_dvc, via_kfp):
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            want = value
            if isinstance(node, tuple):
                want = tuple(value)
            elif isinstance(node, float):
                want = float(value)
            assert node == want, (key, node, value)
        checked += 1
    assert checked > 80


def test_dvc_yaml_deps_agree_with_the_import_graph() -> None:
    """dvc.yaml is generated from the import graph; the file and the graph must agree, and
    a stage depends on its own step module but not on the other steps'."""
    from recontrast_core.pipelines.dvc_stages import main as dvc_stages

    assert dvc_stages(["--check"]) == 0, "run: python -m recontrast_core.pipelines.dvc_stages"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for step, stage in stages.items():
        code = [d for d in stage["deps"] if d.startswith("recontrast_core/")]
        assert f"recontrast_core/steps/{step}.py" in code
        others = {f"recontrast_core/steps/{s}.py" for s in stages if s != step}
        assert not others & set(code), (step, others & set(code))
    assert "recontrast_core/train.py" in stages["train"]["deps"] and "recontrast_core/losses.py" in stages["train"]["deps"]
    assert "recontrast_core/mlops/registry.py" in stages["register"]["deps"]
    assert not any("models/" in d for d in stages["ingest"]["deps"])  # model code does not re-run ingest


def test_public_api_resolves_every_name() -> None:
    import recontrast_core as rc

    for name in rc.__all__:
        assert getattr(rc, name) is not None, name
    assert rc.TrainConfig is TrainConfig and rc.load_detector.__module__ == "recontrast_core.bundle"
    with pytest.raises(AttributeError):
        rc.no_such_name  # noqa: B018


def test_packaged_cpu_profile_loads_by_name_and_overrides_apply_on_top() -> None:
    cfg = load_settings("cpu", ["train.iterations=50"])
    assert (cfg.train.image_size, cfg.train.decoder_blocks, cfg.train.bottleneck_blocks) == (160, (1, 1, 1), 1)
    assert cfg.train.iterations == 50 and cfg.train.lr_decoder == TrainConfig().lr_decoder
    with pytest.raises(UserError, match="no-such-profile"):
        load_settings("no-such-profile")
