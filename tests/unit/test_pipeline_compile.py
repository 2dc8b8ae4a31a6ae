"""The compiled KFP pipeline: golden-file comparison and the cluster settings in it.

The pipeline is compiled in a fresh interpreter (the component image is read from
``RECONTRAST_IMAGE`` at import time) with a unique fake credential in the environment,
which must not appear anywhere in the YAML. Regenerate the golden file after an intended
change with::

    env -u RECONTRAST_IMAGE python -m recontrast_core.pipelines.training_pipeline
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "pipelines" / "compiled" / "training_pipeline.yaml"
FAKE_SECRET = "fake-secret-" + uuid.uuid4().hex
FAKE_KEY_ID = "AKIAFAKE" + uuid.uuid4().hex[:12].upper()

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kfp") / "training_pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if k != "RECONTRAST_IMAGE"}
    env.update({
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "MLFLOW_TRACKING_PASSWORD": FAKE_SECRET,
        "PYTHONPATH": str(REPO),
    })
    code = "import sys; from recontrast_core.pipelines.training_pipeline import compile_pipeline; compile_pipeline(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, env=env, check=True, timeout=240)
    return out


def _without_settings_defaults(node):
    """The spec with the ``settings`` parameter's default (the serialised PipelineConfig)
    taken out wherever it is declared: the golden file pins the DAG and the task specs, not
    the defaults (config.py holds those; a new setting must not need a regenerated golden)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "settings" and isinstance(v, dict) and "defaultValue" in v:
                v = {kk: vv for kk, vv in v.items() if kk != "defaultValue"}
            out[k] = _without_settings_defaults(v)
        return out
    if isinstance(node, list):
        return [_without_settings_defaults(x) for x in node]
    return node


def _normalise(text: str) -> list:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for d in docs:
        d.pop("sdkVersion", None)  # the only field that changes with the kfp release
    return [_without_settings_defaults(d) for d in docs]


def test_the_golden_comparison_ignores_the_settings_defaults_only(compiled: Path) -> None:
    """A new setting changes the compiled ``settings`` default and nothing the golden test sees;
    a changed task spec still fails it."""
    golden = next(yaml.safe_load_all(GOLDEN.read_text()))
    default = golden["root"]["inputDefinitions"]["parameters"]["settings"]["defaultValue"]
    assert "model" in default  # the whole PipelineConfig is there
    changed = dict(golden, root={**golden["root"], "inputDefinitions": {"parameters": {
        **golden["root"]["inputDefinitions"]["parameters"],
        "settings": {**golden["root"]["inputDefinitions"]["parameters"]["settings"],
                     "defaultValue": {**default, "a_new_section": {"x": 1}}}}}})
    assert _normalise(yaml.safe_dump(changed)) == _normalise(GOLDEN.read_text())[:1]
    retried = next(yaml.safe_load_all(GOLDEN.read_text()))
    first = next(iter(retried["deploymentSpec"]["executors"].values()))
    first["container"]["image"] = "somewhere/else:1"
    assert _normalise(yaml.safe_dump(retried)) != _normalise(GOLDEN.read_text())[:1]


def _docs(path: Path):
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return spec, platform


def _executors_of(spec: dict, component_prefix: str) -> list[str]:
    """Executor labels of every task that runs the given component (both branches)."""
    return sorted(
        comp["executorLabel"]
        for name, comp in spec["components"].items()
        if name.startswith(f"comp-{component_prefix}") and "executorLabel" in comp
    )


def test_compiled_pipeline_matches_golden(compiled: Path) -> None:
    assert GOLDEN.is_file(), f"golden file missing: {GOLDEN}"
    assert _normalise(compiled.read_text()) == _normalise(GOLDEN.read_text()), (
        "the compiled pipeline differs from pipelines/compiled/training_pipeline.yaml; "
        "if the change is intended, regenerate it: env -u RECONTRAST_IMAGE python -m recontrast_core.pipelines.training_pipeline"
    )


def test_no_credential_values_in_yaml(compiled: Path) -> None:
    text = compiled.read_text()
    assert FAKE_SECRET not in text
    assert FAKE_KEY_ID not in text
    assert FAKE_SECRET not in GOLDEN.read_text()


def test_train_requests_gpu_with_node_placement_and_shm(compiled: Path) -> None:
    spec, platform = _docs(compiled)
    train_execs = _executors_of(spec, "train-op")
    assert len(train_execs) == 2, train_execs  # the adapt branch and the plain branch (train in its pod)
    for label in train_execs:
        res = spec["deploymentSpec"]["executors"][label]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert str(res["accelerator"]["resourceCount"]) == "1"
        assert res["resourceCpuRequest"] and res["resourceMemoryRequest"]
        k8s = platform[label]
        assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
        shm = [m for m in k8s["emptyDirMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and shm[0]["medium"] == "Memory"


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline and its sub-pipelines, by ``<dag>/<task>``."""
    dags = {"root": spec["root"]["dag"], **{n: c["dag"] for n, c in spec["components"].items() if "dag" in c}}
    return {f"{d}/{name}": task for d, dag in dags.items() for name, task in dag.get("tasks", {}).items()}


def _conditions(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        if "triggerPolicy" in node:
            found.append(node["triggerPolicy"]["condition"])
        for v in node.values():
            found += _conditions(v)
    elif isinstance(node, list):
        for v in node:
            found += _conditions(v)
    return found


def test_train_backend_trainjob_is_a_branch_with_a_small_launcher_pod(compiled: Path) -> None:
    """train_backend "trainjob": the train task is ``train_job_op`` (in both adapt branches),
    a pod without a GPU that starts the TrainJob on the project image with the node and GPU
    counts of the run; "pod" (the default) keeps the GPU train pod."""
    spec, platform = _docs(compiled)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["train_backend"]["defaultValue"] == "pod"
    assert params["num_nodes"]["defaultValue"] == 0 and params["gpus_per_node"]["defaultValue"] == 0
    conditions = _conditions(spec)
    assert any("train_backend" in c and "== 'trainjob'" in c and not c.startswith("!") for c in conditions)
    assert any(c.startswith("!(") and "train_backend" in c for c in conditions)  # the pod branch

    jobs = {k: t for k, t in _tasks(spec).items() if t["componentRef"]["name"].startswith("comp-train-job-op")}
    assert len(jobs) == 2, list(jobs)  # adapted encoder or backbone weights
    for task in jobs.values():
        inputs = task["inputs"]["parameters"]
        assert inputs["image"]["runtimeValue"]["constant"] == "ghcr.io/recontrast/recontrast:0.1.0"
        assert "num_nodes" in inputs["num_nodes"]["componentInputParameter"]
        assert "gpus_per_node" in inputs["gpus_per_node"]["componentInputParameter"]
        assert task["taskInfo"]["name"] == "train (TrainJob)"
    for label in _executors_of(spec, "train-job-op"):
        res = spec["deploymentSpec"]["executors"][label]["container"]["resources"]
        assert "accelerator" not in res and res["resourceCpuRequest"] == "1"  # the GPUs are the TrainJob's
        assert "nodeSelector" not in platform[label]
        assert "train_job_op" in " ".join(spec["deploymentSpec"]["executors"][label]["container"]["args"])


def test_every_step_gets_secrets_as_env(compiled: Path) -> None:
    spec, platform = _docs(compiled)
    for prefix in ("ingest-op", "adapt-op", "train-op", "train-job-op", "evaluate-op", "register-op"):
        labels = _executors_of(spec, prefix)
        assert labels, prefix
        for label in labels:
            secrets = {s["secretName"]: s for s in platform[label]["secretAsEnv"]}
            s3 = secrets["recontrast-s3"]
            assert {e["envVar"] for e in s3["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            assert "recontrast-mlflow" in secrets
            assert platform[label]["configMapAsEnv"][0]["configMapName"] == "recontrast-config"


def test_retries_on_io_steps_and_caching(compiled: Path) -> None:
    spec, _ = _docs(compiled)
    tasks = {}

    def walk(dag: dict) -> None:
        for name, task in dag.get("tasks", {}).items():
            tasks[name] = task
    walk(spec["root"]["dag"])
    for comp in spec["components"].values():
        if "dag" in comp:
            walk(comp["dag"])
    by_comp: dict[str, list[dict]] = {}
    for task in tasks.values():
        ref = task.get("componentRef", {}).get("name", "")
        by_comp.setdefault(ref.rsplit("-", 1)[0] if ref[-1:].isdigit() else ref, []).append(task)
    for comp in ("comp-ingest-op", "comp-register-op", "comp-evaluate-op"):
        for task in by_comp[comp]:
            assert task["retryPolicy"]["maxRetryCount"] == 3, comp
    for comp in ("comp-train-op", "comp-train-job-op", "comp-adapt-op", "comp-evaluate-op"):
        for task in by_comp[comp]:
            assert task["cachingOptions"].get("enableCache") is True, comp
    for comp in ("comp-ingest-op", "comp-register-op"):
        for task in by_comp[comp]:
            assert not task["cachingOptions"].get("enableCache"), comp


def test_adapt_is_conditional_and_images_are_the_project_image(compiled: Path) -> None:
    spec, _ = _docs(compiled)
    text = compiled.read_text()
    assert "adapt_method" in spec["root"]["inputDefinitions"]["parameters"]
    conditions = []

    def walk(node):
        if isinstance(node, dict):
            if "triggerPolicy" in node:
                conditions.append(node["triggerPolicy"]["condition"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(spec)
    assert any("adapt_method" in c and "!= 'none'" in c and not c.startswith("!") for c in conditions)
    assert any(c.startswith("!(") for c in conditions)  # the else branch
    assert "adapt_method" in text
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/recontrast/recontrast:0.1.0"}
    for e in spec["deploymentSpec"]["executors"].values():
        joined = " ".join(e["container"]["command"])
        assert "pip install" not in joined  # install_kfp_package=False, no packages_to_install


def test_image_is_overridable_at_compile_time(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    env = dict(os.environ, RECONTRAST_IMAGE="registry.example/ml/recontrast:test", PYTHONPATH=str(REPO))
    code = "import sys; from recontrast_core.pipelines.training_pipeline import compile_pipeline; compile_pipeline(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, env=env, check=True, timeout=240)
    spec, _ = _docs(out)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/ml/recontrast:test"}
    job_images = {t["inputs"]["parameters"]["image"]["runtimeValue"]["constant"]
                  for t in _tasks(spec).values() if t["componentRef"]["name"].startswith("comp-train-job-op")}
    assert job_images == {"registry.example/ml/recontrast:test"}  # the TrainJob's nodes run the same image


def test_local_runs_drop_the_cluster_retries() -> None:
    """KFP's local runner honours retry policies; ``run_local`` runs a copy of the spec
    without them (a bad dataset would otherwise be re-validated for minutes) and leaves
    the pipeline's own spec, the one ``compile`` writes, as it was."""
    from recontrast_core.pipelines.local_runner import _without_retries
    from recontrast_core.pipelines.training_pipeline import training_pipeline

    def retries(spec) -> list[int]:
        dags = [spec.root.dag] + [c.dag for c in spec.components.values() if c.HasField("dag")]
        return [t.retry_policy.max_retry_count for d in dags for t in d.tasks.values()]

    before = retries(training_pipeline.pipeline_spec)
    assert before.count(3) == 9  # ingest + evaluate and register in both adapt branches of both backends
    with _without_retries(training_pipeline):
        assert set(retries(training_pipeline.pipeline_spec)) == {0}
    assert retries(training_pipeline.pipeline_spec) == before
