"""The step records: every DVC step runs, through its record's CLI adapter, with a settings
object that records which sections it reads; a section the record does not declare fails.
The records also drive the entry point's flags, dvc.yaml and the KFP components."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recontrast_core.config import ModelConfig, PipelineConfig, TrainConfig
from recontrast_core.steps import STEPS, get_step, step_records
from recontrast_core.steps.__main__ import parser
from recontrast_core.steps.records import StepRecord, component_source
from tests.conftest import build_tiny_mvtec

READ: list[str] = []


class RecordingSettings(PipelineConfig):
    """A PipelineConfig that notes every top-level section read through it."""

    def __getattribute__(self, name):
        if name in PipelineConfig.model_fields:
            READ.append(name)
        return super().__getattribute__(name)


def _run(step: str, settings: PipelineConfig, *argv: str) -> set[str]:
    READ.clear()
    args = parser().parse_args([step, *argv])
    get_step(step).cli(args, RecordingSettings.model_validate(settings.model_dump()), False, None)
    return set(READ)


def test_every_step_reads_only_the_sections_its_record_declares(tmp_path: Path) -> None:
    data = build_tiny_mvtec(tmp_path / "ds", n_train=8, n_test_good=4, defects={"crack": 4}, size=(64, 64))
    small = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                        device="cpu", log_every=1, checkpoint_every=2)
    settings = PipelineConfig(
        data={"source": str(data)}, train=small, adapt_method="msc",
        adapt={"epochs": 1, "batch_size": 4}, baseline={"enabled": False},
        model=ModelConfig(kind="recontrast"),
        registry={"model_name": "records-test", "floors": {}},
        tracking={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    # every DVC step in order, its flags and paths from its record (as dvc.yaml runs them)
    a = tmp_path
    for step in STEPS:
        record = get_step(step)
        argv = [x for p in record.inputs if p.flag and p.dvc_path for x in (f"--{p.flag}", str(a / p.dvc_path))]
        read = _run(step, settings, *argv, "--out", str(a / record.dvc.out))
        declared = record.section_roots()
        assert read, step  # the recorder sees the step's reads
        assert read <= declared, f"step {step} reads {sorted(read - declared)} but its record does not declare it"
    assert json.loads((a / get_step("register").dvc.out).read_text())["version"]


def test_an_undeclared_section_fails_the_check(tmp_path: Path) -> None:
    """The recorder catches a read of a section outside the record (here: the step reads
    ``registry`` but claims only ``data``)."""
    rec = StepRecord(name="probe", summary="", run=lambda: None, sections=("data",),
                     cli=lambda args, s, progress, run: (s.data, s.registry), component=lambda v: None)
    READ.clear()
    rec.cli(None, RecordingSettings(), False, None)
    assert set(READ) - rec.section_roots() == {"registry"}


def test_the_entry_point_flags_and_components_come_from_the_records() -> None:
    import recontrast_core.components as components

    flags = {a.dest for a in parser()._actions}
    for record in step_records():
        assert record.op_name in components.OPS
        spec = components.OPS[record.op_name].component_spec
        assert set(spec.inputs) >= {p.name for p in record.inputs} | {n for n, _ in record.run_values}
        assert set(spec.outputs or {}) >= {p.name for p in record.outputs}
        assert f"run_component({record.name!r}, locals())" in component_source(record)
        for port in record.inputs:
            if port.flag:
                assert port.flag in flags


def test_the_dispatcher_names_missing_inputs_from_the_record(capsys) -> None:
    from recontrast_core.steps.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--out", "x"])
    assert exc.value.code == 2
    assert "evaluate needs --bundle, --manifest" in capsys.readouterr().err
