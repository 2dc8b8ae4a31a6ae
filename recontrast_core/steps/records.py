"""One record per pipeline step, and the registry that holds them.

A :class:`StepRecord` says what a step is: its name, the step function, the artifacts it
reads and writes, the settings sections it reads, the per-run values it takes, and two
thin adapters (the DVC entry point's arguments -> the step; a KFP component's values ->
the step -> the component's outputs). Everything else is derived from the records:

* ``python -m recontrast_core.steps STEP`` (:mod:`.__main__`): its flags and checks;
* ``dvc.yaml`` (``pipelines/dvc_stages.py``): each stage's command, data deps, params
  (the record's ``sections``) and outs;
* the KFP components (``components/``): one lightweight component per record, its
  signature built from the ports and values (:func:`component_source`).

Adding a step: its module under ``recontrast_core/steps`` ending in ``register_step(...)``,
its import in :mod:`recontrast_core.steps` (the order is the DVC stage order), and its edge
in ``pipelines/training_pipeline.py``. docs/architecture.md walks through it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..registries import Registry

# KFP's artifact types by name: the components module maps them onto kfp.dsl classes
ARTIFACT_TYPES = ("Dataset", "Model", "Artifact", "Metrics")


@dataclass(frozen=True)
class Port:
    """An artifact a step reads or writes.

    ``name``: the KFP component's parameter; ``kfp_type``: one of :data:`ARTIFACT_TYPES`;
    ``flag``: the DVC entry point's flag (``--flag PATH``; "" = not on the command line);
    ``dvc_path``: where the DVC stages keep it (inputs: the upstream stage's output);
    ``optional``: the step runs without it."""

    name: str
    kfp_type: str
    flag: str = ""
    dvc_path: str = ""
    optional: bool = False

    def __post_init__(self):
        if self.kfp_type not in ARTIFACT_TYPES:
            raise ValueError(f"port {self.name}: kfp_type must be one of {ARTIFACT_TYPES}")


@dataclass(frozen=True)
class DvcStage:
    """How the step runs as a DVC stage (records without one are KFP-only)."""

    out: str  # the --out path, DVC's out
    cached: bool = True  # False: an uncached out (register.json: the registry is the state)
    extra_args: str = ""  # more flags on the command line (``--summary FILE``)
    metrics: tuple[str, ...] = ()
    data: tuple[str, ...] = ()  # external data deps (``${data.source}``)


@dataclass(frozen=True)
class StepRecord:
    """A pipeline step (module doc). ``sections``: the top-level settings sections (or dotted
    fields, for a narrower DVC cache key) the step reads; a test runs every step with a
    settings object that records what it reads and fails on an undeclared section.

    ``run_values``: per-run values the KFP pipeline passes beside ``settings`` (``shots``,
    ``model_name``...), applied by :func:`recontrast_core.steps.settings.with_run_values`;
    ``kfp_params``: other component parameters (``(name, type)``); ``returns``: the
    component's outputs (``(name, type)``; one unnamed ``("Output", str)`` for a plain
    return); ``settings``: whether the component takes the settings at all."""

    name: str
    summary: str
    run: Callable[..., Any]
    sections: tuple[str, ...]
    cli: Optional[Callable[[Any, Any, bool, Optional[str]], Any]]
    component: Callable[[dict], Any]
    inputs: tuple[Port, ...] = ()
    outputs: tuple[Port, ...] = ()
    run_values: tuple[tuple[str, type], ...] = ()
    kfp_params: tuple[tuple[str, type], ...] = ()
    returns: tuple[tuple[str, type], ...] = ()
    settings: bool = True
    dvc: Optional[DvcStage] = None

    @property
    def op_name(self) -> str:
        return f"{self.name}_op"

    def section_roots(self) -> set[str]:
        return {s.split(".")[0] for s in self.sections}


_RECORDS: Registry[StepRecord] = Registry("step")


def register_step(record: StepRecord) -> StepRecord:
    """Add a step (at import of its module); a second record of one name is an error."""
    return _RECORDS.add(record)


def get_step(name: str) -> StepRecord:
    return _RECORDS.lookup(name)


def step_records() -> tuple[StepRecord, ...]:
    """Every record, in registration order (the DVC stage order)."""
    return tuple(_RECORDS.values())


def dvc_steps() -> tuple[str, ...]:
    """The steps that are DVC stages, in order."""
    return tuple(r.name for r in _RECORDS.values() if r.dvc is not None)


# ----------------------------------------------------------------------------- KFP side
def _type_name(t: type) -> str:
    return t.__name__


def component_source(record: StepRecord) -> str:
    """The Python source of the record's KFP lightweight component: a signature built from
    the record (artifacts, settings, run values, params, the two run ids, outputs) and a
    body that hands its values to :func:`run_component`. KFP embeds this source in the
    compiled pipeline; it runs on the project image."""
    required, optional = [], []
    for p in record.inputs:
        (optional if p.optional else required).append(
            f"{p.name}: Input[{p.kfp_type}]" + (" = None" if p.optional else ""))
    if record.settings:
        required.append("settings: dict")
    required += [f"{n}: {_type_name(t)}" for n, t in record.run_values + record.kfp_params]
    if record.settings:
        required += ["pipeline_run_id: str"]
    required += ["kfp_run_id: str"]
    required += [f"{p.name}: Output[{p.kfp_type}]" for p in record.outputs]
    params = ",\n    ".join(required + optional)
    if not record.returns:
        ret = ""
    elif len(record.returns) == 1 and record.returns[0][0] == "Output":
        ret = f" -> {_type_name(record.returns[0][1])}"
    else:
        fields = ", ".join(f"({n!r}, {_type_name(t)})" for n, t in record.returns)
        ret = f" -> NamedTuple({_outputs_name(record)!r}, [{fields}])"
    doc = record.summary.replace('"""', "'''")
    return (f"def {record.op_name}(\n    {params},\n){ret}:\n"
            f'    """{doc}"""\n'
            f"    from recontrast_core.steps import run_component\n\n"
            f"    return run_component({record.name!r}, locals())\n")


def _outputs_name(record: StepRecord) -> str:
    return "".join(part.capitalize() for part in record.name.split("_")) + "Outputs"


def run_component(name: str, values: dict) -> Any:
    """What every generated component runs: the record's adapter, its outputs as the
    component's return value (a NamedTuple for several)."""
    record = get_step(name)
    out = record.component(values)
    if len(record.returns) > 1:
        return collections.namedtuple(_outputs_name(record), [n for n, _ in record.returns])(*out)
    return out


def component_run_id(values: dict) -> Optional[str]:
    """The pipeline run id a component logs under (the KFP run's when none was given)."""
    return values.get("pipeline_run_id") or values.get("kfp_run_id") or None


def path_of(values: dict, port: str) -> Optional[str]:
    """The local path of an artifact value (None when an optional input is absent)."""
    art = values.get(port)
    return art.path if art is not None else None


__all__ = ["ARTIFACT_TYPES", "DvcStage", "Port", "StepRecord", "component_source", "dvc_steps", "get_step",
           "path_of", "register_step", "run_component", "component_run_id", "step_records"]
