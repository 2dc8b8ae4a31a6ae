"""The KServe custom predictor: a registered model over the open inference protocol v2.

``POST /v2/models/<name>/infer`` takes one ``BYTES`` input named ``image``, one element
per image: base64 of an encoded image file (PNG, JPEG, BMP, TIFF, WebP) in JSON, or the
file itself in the binary tensor extension (``Inference-Header-Content-Length`` +
``binary_data_size``: what ``tritonclient.http`` and kserve's ``InferenceRESTClient``
send by default). An element that arrives as bytes is the file itself unless it is
base64 text. Optional request parameter ``return_map`` (bool). REST only (the gRPC port is
off: a KServe predictor container exposes one port).
Outputs: ``score`` FP64 [N], ``normalized_score`` FP64 [N] (0.5 = threshold), ``decision``
BOOL [N] and, with ``return_map``, ``anomaly_map`` FP32 [N, S, S]. A request's ``outputs``
list picks the outputs and their order (``anomaly_map`` among them computes the maps; an
unknown name is HTTP 400) and, per output, JSON or binary (``binary_data``).
``model_version`` and ``parameters`` name the registry version that scored. Bad input is
HTTP 400 with ``{"error": "<one line naming the element>"}``, logged as one line.
The REST side (body parsing, binary tensors, error bodies, the routes put in front of
kserve's) is :mod:`.v2_rest`.

Health (kserve's ModelServer): ``/v2/health/live`` answers while the process runs;
``/v2/models/<name>/ready`` is 200 once a model is loaded (503 before).

Reload: ``models:/NAME@ALIAS`` is re-resolved by a daemon thread every ``poll_s``
seconds; a new version is downloaded and loaded beside the served one and swapped in with
one assignment, so requests in flight finish on the old model and none waits for the
load. A failed load is logged and the old model keeps serving; the same version is tried
again after ``FAILED_RETRY_S`` (a newer one at the next poll).
Polling, not a restart on alias change: nothing outside the pod has to watch the registry,
the pod stays ready throughout, and MLflow has no change notifications to subscribe to.
``models:/NAME/VERSION`` is loaded once.

Score log (optional, off by default: ``score_log=`` / ``recontrast serve --score-log`` /
``RECONTRAST_SCORE_LOG``): every scored image becomes a row of a Parquet log under a folder
or ``s3://`` prefix (:mod:`recontrast_core.mlops.score_log`: batch-scoring columns, written
in parts by a background thread), the drift monitor's input (docs/operations.md). Logging
never blocks or fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...errors import UserError, first_line
from ...runtime import positive_env
from ..model_source import parse_model_uri
from . import v2_rest


def _import_kserve():
    """kserve parses ``sys.argv`` when imported (its server flags): hide ours from it."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
        from kserve import errors
    finally:
        sys.argv = argv
    return kserve, errors


kserve, kserve_errors = _import_kserve()

log = logging.getLogger("recontrast.serve")

INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "normalized_score", "decision", "anomaly_map")
DEFAULT_OUTPUTS = OUTPUT_NAMES[:3]  # anomaly_map: with return_map, or when named in outputs
DEFAULT_POLL_S = 30.0
RETRY_S = 10.0  # between load attempts while nothing is served yet (polling off)
FAILED_RETRY_S = 300.0  # a version that failed to load is tried again after this long
# Images per request: a bound on one request's memory (decoded images, maps); larger jobs
# belong to batch scoring (docs/batch_scoring.md). RECONTRAST_MAX_IMAGES_PER_REQUEST overrides.
DEFAULT_MAX_IMAGES = 64


def max_images_per_request() -> int:
    return positive_env("RECONTRAST_MAX_IMAGES_PER_REQUEST", DEFAULT_MAX_IMAGES,
                        "{name} must be a positive integer, got {raw!r}", integer=True)
_BASE64 = re.compile(rb"^(data:[^,]*,)?[A-Za-z0-9+/=\s]*$")


@dataclass(frozen=True)
class Served:
    """What answers requests: a registry version and its loaded detector."""

    version: str
    detector: Any


class ReContrastPredictor(kserve.Model):
    """A registered recontrast model as a kserve ``Model`` (see the module docstring)."""

    def __init__(self, name: str, model_uri: str, *, poll_s: float = DEFAULT_POLL_S, device: str = "auto",
                 tracking_uri: Optional[str] = None, client=None, score_log=None):
        super().__init__(name)
        self.score_log = score_log  # a started score_log.ScoreLog, or None
        self.model_uri = model_uri
        self.registered_name, self.alias, self.fixed_version = parse_model_uri(model_uri)
        self.poll_s = float(poll_s)
        self.device = device
        if client is None:
            from ..registry_lookup import get_client

            client = get_client(tracking_uri)
        self.client = client
        self.served: Optional[Served] = None
        self.last_error: Optional[str] = None
        self._failed: tuple[str, float] = ("", 0.0)  # (version, when) of the last failed load
        self._load_lock = threading.Lock()
        self._score_lock = threading.Lock()  # one batch at a time on the device
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ loading
    def target_version(self) -> str:
        """The version the URI points at now; UserError when the model or alias is missing."""
        from ..registry_lookup import alias_version, get_registered_model, get_version

        if self.fixed_version is not None:
            return str(get_version(self.client, self.registered_name, self.fixed_version).version)
        mv = alias_version(self.client, self.registered_name, self.alias)
        if mv is None:
            get_registered_model(self.client, self.registered_name)  # "no registered model named ..."
            raise UserError(f"{self.registered_name}: no version has the alias {self.alias!r}")
        return str(mv.version)

    def refresh(self) -> bool:
        """Load the target version if it is not the served one; True when a new one was swapped in."""
        with self._load_lock:
            version = self.target_version()
            old = self.served
            if old is not None and old.version == version:
                return False
            failed, when = self._failed
            if old is not None and failed == version and time.monotonic() - when < FAILED_RETRY_S:
                return False  # failed a moment ago: keep the served one, no download every poll
            try:
                detector = self._load(version)
            except Exception:
                self._failed = (version, time.monotonic())
                raise
            self.served = Served(version, detector)  # the swap: one assignment
            self.ready = True
            self.last_error = None
            log.info("%s: serving %s version %s%s", self.name, self.registered_name, version,
                     f" (was {old.version})" if old else "")
            return True

    def _load(self, version: str):
        from ...bundle import load_detector
        from ..registry_lookup import download_bundle, get_version

        mv = get_version(self.client, self.registered_name, version)
        with tempfile.TemporaryDirectory(prefix="recontrast-serve-") as tmp:
            bundle = download_bundle(self.client, self.registered_name, mv, tmp)
            return load_detector(bundle, device=self.device)  # weights are in memory after this

    def poll_once(self) -> None:
        """One refresh; a failure is logged and the served model stays."""
        try:
            self.refresh()
        except Exception as exc:  # registry down, bad bundle, out of memory: keep serving
            self.last_error = f"{type(exc).__name__}: {exc}"
            kept = f"still serving version {self.served.version}" if self.served else "nothing served yet"
            log.warning("%s: loading %s failed, %s: %s", self.name, self.model_uri, kept, self.last_error)

    def start_polling(self) -> threading.Thread:
        """The loader thread: loads now, then re-resolves the URI every ``poll_s`` seconds."""

        def loop() -> None:
            while not self._stop.is_set():
                self.poll_once()
                polling = self.poll_s > 0 and self.fixed_version is None
                if self.served is not None and not polling:
                    return
                self._stop.wait(self.poll_s if polling else RETRY_S)

        self._thread = threading.Thread(target=loop, name="recontrast-model-loader", daemon=True)
        self._thread.start()
        return self._thread

    # ------------------------------------------------------------------ kserve hooks
    def load(self) -> bool:
        """kserve calls this on requests to a model that is not ready: never load in the
        event loop (the loader thread does), just report."""
        return self.ready

    def start(self) -> None:
        """Readiness means a loaded model: not set here."""

    def stop(self) -> None:
        self._stop.set()
        self.ready = False
        if self.score_log is not None:
            self.score_log.close()

    def get_input_types(self) -> list[dict]:
        return [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        size = self.served.detector.image_size if self.served else -1
        return [{"name": "score", "datatype": "FP64", "shape": [-1]},
                {"name": "normalized_score", "datatype": "FP64", "shape": [-1]},
                {"name": "decision", "datatype": "BOOL", "shape": [-1]},
                {"name": "anomaly_map", "datatype": "FP32", "shape": [-1, size, size]}]

    def metadata(self) -> dict:
        """The v2 model metadata: ``versions`` is the served version (the one
        ``/v2/models/<name>/versions/<v>/...`` answers for), empty before the first load."""
        served = self.served
        return {"name": self.name, "versions": [served.version] if served else [], "platform": v2_rest.PLATFORM,
                "inputs": self.get_input_types(), "outputs": self.get_output_types()}

    def loading_state(self) -> str:
        """Why nothing is served yet, in one line (for 503 bodies)."""
        return f"loading failed: {self.last_error}" if self.last_error else f"loading {self.model_uri}"

    async def predict(self, payload, headers=None, response_headers=None):
        served = self.served
        if served is None:
            raise kserve_errors.ModelNotReady(self.name)
        if not isinstance(payload, kserve.InferRequest):
            raise kserve_errors.InvalidInput("use the open inference protocol v2 (POST /v2/models/<name>/infer)")
        values = request_images(payload)
        outputs = request_outputs(payload)
        return_map = "anomaly_map" in outputs
        results = await asyncio.to_thread(self._score, served.detector, values, return_map)
        response = infer_response(payload, self.name, served.version, self.registered_name, results, outputs)
        self._log_scores(response.id, served.version, results)
        return response

    def _log_scores(self, request_id: str, version: str, results: list[dict]) -> None:
        """The score log's rows for this request (buffered: no I/O here, never raises)."""
        if self.score_log is None:
            return
        try:
            from ..score_log import log_rows

            self.score_log.append(log_rows(results, request_id, self.registered_name, version))
        except Exception:  # noqa: BLE001 - the log never fails a request
            pass

    def _score(self, detector, values: list, return_map: bool) -> list[dict]:
        try:
            images = [decode_element(i, v) for i, v in enumerate(values)]
        except UserError as exc:
            raise kserve_errors.InvalidInput(str(exc)) from None
        with self._score_lock:
            return detector.predict(images, return_map=return_map)


# ---------------------------------------------------------------------- the v2 messages
def request_images(request) -> list:
    """The elements of the request's ``image`` input (str or bytes each)."""
    inputs = {i.name: i for i in request.inputs}
    if set(inputs) != {INPUT_NAME} or inputs[INPUT_NAME].datatype != "BYTES":
        got = [f"{i.name[:40]} ({i.datatype[:10]})" for i in request.inputs][:5]
        raise kserve_errors.InvalidInput(
            f"expected a BYTES input named {INPUT_NAME!r} (base64 or encoded image files) and no other, got {got}")
    try:
        values = inputs[INPUT_NAME].as_numpy().ravel().tolist()
    except Exception as exc:  # shape does not fit the data
        raise kserve_errors.InvalidInput(f"input {INPUT_NAME!r}: {exc}") from None
    if not values:
        raise kserve_errors.InvalidInput(f"input {INPUT_NAME!r} holds no image")
    limit = max_images_per_request()
    if len(values) > limit:
        raise kserve_errors.InvalidInput(
            f"input {INPUT_NAME!r} holds {len(values)} images, more than {limit} per request "
            "(RECONTRAST_MAX_IMAGES_PER_REQUEST; score folders and buckets with `recontrast predict`)")
    return values


def request_return_map(request) -> bool:
    params = request.parameters or {}
    if not isinstance(params, dict):  # gRPC parameters
        from kserve.protocol.infer_type import to_http_parameters

        params = to_http_parameters(params)
    value = params.get("return_map", False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise kserve_errors.InvalidInput(f"parameter return_map must be true or false, not {value!r}")
    return value


def request_outputs(request) -> list[str]:
    """The output names to answer, in order: the request's ``outputs`` when it has them
    (an unknown or repeated name is InvalidInput), else score, normalized_score and
    decision, plus anomaly_map with ``return_map``."""
    return_map = request_return_map(request)  # checked even where ``outputs`` decides
    if not request.request_outputs:
        return list(DEFAULT_OUTPUTS) + (["anomaly_map"] if return_map else [])
    names = [o.name for o in request.request_outputs]
    for name in names:
        if name not in OUTPUT_NAMES:
            raise kserve_errors.InvalidInput(
                f"unknown output {name[:60]!r}: this model's outputs are {', '.join(OUTPUT_NAMES)}")
    if len(set(names)) != len(names):
        raise kserve_errors.InvalidInput(f"an output is requested twice: {names}")
    return names


def decode_element(i: int, value) -> np.ndarray:
    """Element ``i`` of the ``image`` input -> uint8 [H, W, 3]: text is base64; bytes are
    base64 when they are base64 text, else the encoded file itself."""
    from ...data.images import decode_base64_image, decode_image_bytes

    name = f"image[{i}]"
    if isinstance(value, str):
        return decode_base64_image(value, name)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value)
        if value and _BASE64.match(value):
            return decode_base64_image(value, name)
        return decode_image_bytes(value, name)
    raise UserError(f"{name}: expected base64 text or image file bytes, got {type(value).__name__}")


def infer_response(request, model_name: str, version: str, registered_name: str, results: list[dict],
                   outputs: list[str]):
    """Detector results -> the v2 response with ``outputs`` in that order (the version that
    scored in ``parameters``). JSON or binary per output: the request's requested outputs'
    ``binary_data``, else its ``binary_data_output`` parameter (kserve's ``to_rest``)."""
    n = len(results)

    def tensor(name: str):
        if name == "decision":
            return kserve.InferOutput(name, [n], "BOOL", data=np.array([r[name] for r in results], np.bool_))
        if name == "anomaly_map":
            maps = np.ascontiguousarray(np.stack([np.asarray(r[name], np.float32) for r in results]))
            return kserve.InferOutput(name, list(maps.shape), "FP32", data=maps)
        return kserve.InferOutput(name, [n], "FP64", data=np.array([r[name] for r in results], np.float64))

    return kserve.InferResponse(
        response_id=request.id or str(uuid.uuid4()), model_name=model_name,
        infer_outputs=[tensor(name) for name in outputs], model_version=version,
        use_binary_outputs=request.use_binary_outputs, requested_outputs=request.request_outputs,
        parameters={"registered_model": registered_name, "model_version": version,
                    "model_uri": f"models:/{registered_name}/{version}"},
    )


# ---------------------------------------------------------------------- the server
def serve(model_uri: str, *, name: Optional[str] = None, port: int = 8080, poll_s: float = DEFAULT_POLL_S,
          device: str = "auto", tracking_uri: Optional[str] = None, score_log: Optional[str] = None) -> None:
    """Serve ``model_uri`` on ``port`` (REST, v2) until stopped; the model loads in the
    background (ready when loaded). An unknown model or alias is a UserError before start.
    ``score_log``: a folder or ``s3://`` prefix for the score log (module doc); a location of
    another kind is a UserError, an unreachable one is logged and retried."""
    _configure_logging()
    max_images_per_request()  # a bad value stops the start (exit 2), not every request
    max_bytes = v2_rest.max_request_bytes()  # likewise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the pod's log
    registered, _, _ = parse_model_uri(model_uri)
    sink = None
    if score_log:
        from ..score_log import ScoreLog, flush_seconds

        flush_seconds()  # a bad RECONTRAST_SCORE_LOG_FLUSH_S stops the start (exit 2)
        sink = ScoreLog(score_log)
    predictor = ReContrastPredictor(name or registered, model_uri, poll_s=poll_s, device=device,
                                    tracking_uri=tracking_uri, score_log=sink)
    try:
        version = predictor.target_version()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot resolve {model_uri} in the MLflow registry: {first_line(exc)}") from None
    log.info("%s: %s is version %s; loading it, polling every %ss", predictor.name, model_uri, version,
             poll_s if poll_s > 0 and predictor.fixed_version is None else "- (off)")
    predictor.start_polling()
    if sink is not None:
        sink.start()
        log.info("%s: logging scores to %s (a part every %gs or %d rows)", predictor.name, sink.uri, sink.flush_s,
                 sink.flush_rows)
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1)
    server.register_model(predictor)
    # our v2 routes go on kserve's app before start() adds kserve's: for this model they answer first
    v2_rest.install(sys.modules["kserve.model_server"].app, predictor, max_bytes=max_bytes)
    try:
        server.start([])  # registered above, not ready yet: readiness follows the loader thread
    finally:
        if sink is not None:
            sink.close()  # what is buffered is written on the way out


def _configure_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
