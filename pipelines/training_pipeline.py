"""The training pipeline: ingest -> [adapt] -> train -> evaluate -> register.

Parameters default to :class:`recontrast_core.config.PipelineConfig` (the one source of
defaults). ``adapt_method`` ``"none"`` trains ReContrast from the backbone's ImageNet
weights; ``"msc"`` / ``"coft"`` run the adaptation step first (``dsl.If``) and start
training from the adapted encoder. ``shots`` > 0 is few-shot mode (that many normal
training images, the same ones in adapt and train). Empty strings mean "not set"
(``dvc_repo``, ``dvc_rev``, ``s3_endpoint_url``, ``tracking_uri``: then the environment
decides, see docs); ``pipeline_run_id`` empty means KFP's run id.

Cluster settings (kfp-kubernetes; ignored by the local runner, compiled into the YAML):

* train (and adapt): one GPU (``nvidia.com/gpu``), CPU/memory requests, node selector
  :data:`GPU_NODE_SELECTOR`, a toleration for the GPU taint, a memory-backed
  ``/dev/shm`` (PyTorch data loader workers share tensors through it);
* every step: S3 credentials from the Secret :data:`S3_SECRET` and MLflow credentials
  from :data:`MLFLOW_SECRET` (optional), both as env; endpoints / tracking URI from the
  ConfigMap :data:`CONFIG_MAP` (optional). No credential value is in the YAML.
* retries with backoff on the I/O steps (ingest, register; evaluate reads artifacts);
* caching: adapt, train and evaluate are deterministic given their inputs and are cached;
  ingest (reads mutable external data) and register (writes the registry) never are.

The adapt branch and the no-adapt branch each hold their own train -> evaluate ->
register tasks (display names are the same): KFP's local runner cannot yet route an
artifact out of a condition with ``dsl.OneOf``, so the tail is wired by one helper in
both branches instead.
"""

import contextlib
import io
import os
import re
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import adapt_op, evaluate_op, ingest_op, register_op, train_op
from recontrast_core.config import PipelineConfig

PIPELINE_NAME = "recontrast-training"
_D = PipelineConfig()

# Kubernetes objects the compiled pipeline refers to (see infra/k8s/base).
S3_SECRET = "recontrast-s3"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_SECRET = "recontrast-mlflow"
MLFLOW_SECRET_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
CONFIG_MAP = "recontrast-config"
CONFIG_MAP_KEYS = {
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = ("nvidia.com/gpu.present", "true")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SHM_SIZE = "8Gi"


def _cluster_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
    kubernetes.use_secret_as_env(
        task, secret_name=MLFLOW_SECRET, secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True
    )
    kubernetes.use_config_map_as_env(
        task, config_map_name=CONFIG_MAP, config_map_key_to_env=CONFIG_MAP_KEYS, optional=True
    )
    return task


def _gpu(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.add_node_selector(task, *GPU_NODE_SELECTOR)
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
    )
    return task


def _io_retry(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0,
                          backoff_max_duration="600s")


def _train_evaluate_register(dataset, tracking: dict, settings: dict, registry: dict,
                             encoder=None):
    """train -> evaluate -> register (wired the same in both branches)."""
    extra = {"init_encoder": encoder} if encoder is not None else {}
    train = train_op(dataset=dataset, **settings, **tracking, **extra)
    _cluster_env(_gpu(train.set_display_name("train"), cpu="8", memory="32Gi"))
    train.set_caching_options(True)

    evaluate = evaluate_op(bundle=train.outputs["bundle"], dataset=dataset,
                           device=settings["device"], **tracking)
    _cluster_env(_io_retry(evaluate.set_display_name("evaluate")))
    evaluate.set_cpu_request("4").set_memory_request("16Gi")
    evaluate.set_caching_options(True)

    register = register_op(bundle=train.outputs["bundle"], report=evaluate.outputs["report"],
                           dataset=dataset, device=settings["device"], **registry, **tracking)
    _cluster_env(_io_retry(register.set_display_name("register")))
    register.set_caching_options(False)
    return register


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="ReContrast anomaly detection: ingest -> adapt -> train -> evaluate -> register",
)
def training_pipeline(
    source: str = _D.data.source,
    layout: str = _D.data.layout,
    dvc_repo: str = "",
    dvc_rev: str = "",
    s3_endpoint_url: str = "",
    copy_local: bool = _D.data.copy_local,
    check_decode: bool = _D.data.check_decode,
    adapt_method: str = _D.adapt_method,
    shots: int = 0,
    adapt_epochs: int = _D.adapt.epochs,
    adapt_batch_size: int = _D.adapt.batch_size,
    backbone: str = _D.train.backbone.name,
    backbone_weights: str = _D.train.backbone.weights,
    feature_location: str = _D.train.backbone.feature_location,
    image_size: int = _D.train.image_size,
    iterations: int = _D.train.iterations,
    batch_size: int = _D.train.batch_size,
    encoder_bn: str = _D.train.encoder_bn,
    seed: int = _D.train.seed,
    device: str = _D.train.device,
    extra_settings: dict = {},
    model_name: str = _D.registry.model_name,
    primary_metric: str = _D.registry.primary_metric,
    margin: float = _D.registry.margin,
    floors: dict = dict(_D.registry.floors),
    tracking_uri: str = "",
    experiment: str = _D.tracking.experiment,
    pipeline_run_id: str = "",
) -> str:
    """Returns the register step's decision JSON (model name, version, promoted, champion)."""
    tracking = dict(pipeline_run_id=pipeline_run_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    tracking_uri=tracking_uri, experiment=experiment)
    ingest = ingest_op(source=source, layout=layout, dvc_repo=dvc_repo, dvc_rev=dvc_rev,
                       s3_endpoint_url=s3_endpoint_url, copy_local=copy_local,
                       check_decode=check_decode, **tracking)
    _cluster_env(_io_retry(ingest.set_display_name("ingest")))
    ingest.set_cpu_request("2").set_memory_request("4Gi")
    ingest.set_caching_options(False)
    dataset = ingest.outputs["dataset"]

    backbone_kw = dict(image_size=image_size, backbone=backbone,
                       backbone_weights=backbone_weights, feature_location=feature_location,
                       seed=seed, device=device)
    settings = dict(shots=shots, iterations=iterations, batch_size=batch_size,
                    encoder_bn=encoder_bn, extra_settings=extra_settings, **backbone_kw)
    registry = dict(model_name=model_name, primary_metric=primary_metric, margin=margin,
                    floors=floors, extra_settings=extra_settings)

    with dsl.If(adapt_method != "none", name="adapt-encoder"):
        adapt = adapt_op(dataset=dataset, method=adapt_method, shots=shots, epochs=adapt_epochs,
                         batch_size=adapt_batch_size, extra_settings=extra_settings, **backbone_kw,
                         **tracking)
        _cluster_env(_gpu(adapt.set_display_name("adapt"), cpu="8", memory="32Gi"))
        adapt.set_caching_options(True)
        adapted = _train_evaluate_register(dataset, tracking, settings, registry,
                                           encoder=adapt.outputs["encoder"])
    with dsl.Else(name="from-backbone-weights"):
        plain = _train_evaluate_register(dataset, tracking, settings, registry)
    return dsl.OneOf(adapted.outputs["result"], plain.outputs["result"])


def compile_pipeline(path: os.PathLike | str) -> Path:
    """Write the pipeline's KFP IR YAML to ``path``; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=training_pipeline, package_path=str(path))
    return path


GOLDEN_PATH = Path(__file__).resolve().parent / "compiled" / "training_pipeline.yaml"
REPO_ROOT = Path(__file__).resolve().parents[1]


# Fields that have their own pipeline parameter (or, for adapt, follow train's); the
# others travel in ``extra_settings`` when they differ from the defaults.
_COVERED = {
    "train": {"backbone.name", "backbone.weights", "backbone.feature_location", "image_size",
              "iterations", "batch_size", "encoder_bn", "seed", "device"},
    "adapt": {"method", "shots", "epochs", "batch_size", "image_size", "device", "backbone.name",
              "backbone.weights", "backbone.feature_location", "backbone.out_indices"},
    "registry": {"model_name", "primary_metric", "margin", "floors"},
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def extra_settings_of(cfg: PipelineConfig) -> dict:
    """``{"train": {dotted: value}, "inference": ..., "calibration": ..., "adapt": ...,
    "registry": ...}`` with the settings that differ from the defaults and have no pipeline
    parameter of their own. The adapt seed always travels (it is not the training seed)."""
    out = {}
    for section in ("train", "inference", "calibration", "adapt", "registry"):
        now = _flat(getattr(cfg, section).model_dump(mode="json"))
        default = _flat(getattr(_D, section).model_dump(mode="json"))
        covered = _COVERED.get(section, set())
        diff = {k: v for k, v in now.items() if v != default.get(k)
                and not any(k == c or k.startswith(c + ".") for c in covered)}  # floors.* too
        if section == "adapt" and cfg.adapt_method != "none":
            diff["seed"] = cfg.adapt.seed
            if cfg.train.backbone.out_indices != _D.train.backbone.out_indices:  # adapt uses train's encoder
                diff["backbone.out_indices"] = list(cfg.train.backbone.out_indices)
        if diff:
            out[section] = diff
    return out


def pipeline_arguments(cfg: PipelineConfig, pipeline_run_id: str = "") -> dict:
    """The pipeline parameters for a :class:`PipelineConfig` (``None`` -> ``""`` / 0)."""
    d, t, a, r = cfg.data, cfg.train, cfg.adapt, cfg.registry
    return {
        "source": d.source,
        "layout": d.layout,
        "dvc_repo": d.dvc_repo or "",
        "dvc_rev": d.dvc_rev or "",
        "s3_endpoint_url": d.s3_endpoint_url or "",
        "copy_local": d.copy_local,
        "check_decode": d.check_decode,
        "adapt_method": cfg.adapt_method,
        "shots": cfg.shots or 0,
        "adapt_epochs": a.epochs,
        "adapt_batch_size": a.batch_size,
        "backbone": t.backbone.name,
        "backbone_weights": t.backbone.weights,
        "feature_location": t.backbone.feature_location,
        "image_size": t.image_size,
        "iterations": t.iterations,
        "batch_size": t.batch_size,
        "encoder_bn": t.encoder_bn,
        "seed": t.seed,
        "device": t.device,
        "extra_settings": extra_settings_of(cfg),
        "model_name": r.model_name,
        "primary_metric": r.primary_metric,
        "margin": r.margin,
        "floors": dict(r.floors),
        "tracking_uri": cfg.tracking.tracking_uri or "",
        "experiment": cfg.tracking.experiment,
        "pipeline_run_id": pipeline_run_id,
    }


# The last line of a Python traceback: "package.module.SomeError: message".
_EXCEPTION_LINE = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception|Invalid|Exit)\w*: \S")


class _RunnerLog(io.TextIOBase):
    """Where the local runner's output goes: every line to ``log_path``; the lines that
    say which step runs / finished / failed (or all, ``verbose``) also to stderr."""

    KEY = re.compile(r"Executing task|finished with status|Traceback|Error|error:")
    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, log_path: Path, verbose: bool = False):
        self._file = open(log_path, "a", encoding="utf-8")
        self._verbose = verbose
        self._buf = ""
        self.tail: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        import sys

        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            plain = self.ANSI.sub("", line)
            self._file.write(plain + "\n")
            self.tail = (self.tail + [plain])[-60:]
            if self._verbose or self.KEY.search(plain):
                sys.stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        if self._buf:
            self.write("\n")
        self._file.close()
        super().close()


@contextlib.contextmanager
def _without_retries(pipeline):
    """Run ``pipeline`` (a compiled ``@dsl.pipeline``) with every task's retry policy
    cleared; the pipeline's own spec (what ``compile`` writes) is restored afterwards."""
    graph = pipeline.component_spec.implementation.graph
    local_graph = type(graph)()
    local_graph.CopyFrom(graph)
    dags = [local_graph.root.dag] + [c.dag for c in local_graph.components.values() if c.HasField("dag")]
    for dag in dags:
        for task in dag.tasks.values():
            task.ClearField("retry_policy")
    pipeline.component_spec.implementation.graph = local_graph
    try:
        yield pipeline
    finally:
        pipeline.component_spec.implementation.graph = graph


def run_local(
    arguments: dict,
    pipeline_root: os.PathLike | str = "runs/kfp-local",
    *,
    verbose: bool = False,
    retries: bool = False,
) -> dict:
    """Run the whole pipeline on this machine with KFP's local ``SubprocessRunner``
    (``use_venv=False``: the components run in this Python environment; kfp-kubernetes
    settings are ignored). Returns the register step's decision.

    The cluster's task retries (30 s, 60 s, 120 s backoff) are off unless ``retries``:
    KFP's local runner honours them, and locally they would only repeat a deterministic
    failure (a bad dataset) for minutes; the steps retry transient S3/HTTP errors
    themselves.

    The runner's full log goes to ``<pipeline_root>/<pipeline_run_id>.log``; stderr shows
    the step transitions (everything with ``verbose``) and, on failure, the log's tail.
    When a step fails the MLflow parent run is closed as FAILED and a UserError raised.
    """
    import contextlib
    import json
    import sys
    import uuid
    import warnings

    from kfp import local

    from recontrast_core import tracking
    from recontrast_core.errors import UserError

    # Component subprocesses must import recontrast_core and components from this checkout
    # even when the package is not installed.
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"{arguments.get('pipeline_run_id') or uuid.uuid4().hex[:12]}.log"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True)
    log = _RunnerLog(log_path, verbose=verbose)
    try:
        # The local runner logs (its own and the steps') to stdout: keep stdout for results.
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            # Expected locally: cluster settings are ignored, the project image is not used.
            warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner")
            warnings.filterwarnings("ignore", message=r".*non-Python base image")
            with contextlib.nullcontext() if retries else _without_retries(training_pipeline):
                task = training_pipeline(**arguments)
    except RuntimeError as exc:
        if not verbose:
            sys.stderr.write("\n".join(log.tail[-40:]) + "\n")
        if arguments.get("pipeline_run_id"):
            try:
                with contextlib.redirect_stdout(log):  # MLflow prints "View run ..." links
                    tracking.end_pipeline_run(
                        arguments["pipeline_run_id"], "FAILED",
                        experiment=arguments.get("experiment") or "recontrast",
                        tracking_uri=arguments.get("tracking_uri") or None,
                    )
            except Exception:  # the tracking store itself may be the problem
                pass
        # The failed step's exception (e.g. the dataset validation error naming the file).
        cause = next((line.strip() for line in reversed(log.tail) if _EXCEPTION_LINE.match(line)), "")
        raise UserError(f"local pipeline run failed: {log.ANSI.sub('', str(exc)).rstrip('.')}"
                        + (f"; {cause}" if cause else "") + f" (full log: {log_path})") from exc
    finally:
        log.close()
    result = json.loads(task.output)
    result["log"] = str(log_path)
    return result


if __name__ == "__main__":  # pragma: no cover
    print(compile_pipeline(GOLDEN_PATH))
