"""The open inference protocol v2 over REST for ``recontrast serve``: request bodies (JSON
and the binary tensor extension), response bodies, error bodies and the routes.

kserve's own v2 routes decode a binary ``BYTES`` tensor by UTF-8-decoding every element
(``InferRequest.from_bytes``), so raw image files fail with HTTP 500 and an error that
echoes the payload; a body without ``Content-Type: application/json`` and without the
binary header is refused; malformed JSON gets FastAPI's 422; each client error is logged
with a traceback. This module parses the body itself and registers its routes on kserve's
FastAPI app *before* kserve registers its own (:func:`install`), so for the served model
these answer first:

* ``POST /v2/models/<name>[/versions/<v>]/infer``: JSON, or JSON + binary tensors when the
  ``Inference-Header-Content-Length`` header is present (``binary_data_size`` per input;
  ``BYTES`` elements are 4-byte little-endian length + bytes, kept as bytes). The body is
  JSON whatever its ``Content-Type`` (tritonclient sends none). ``gzip``/``deflate``
  ``Content-Encoding`` is inflated. Outputs are binary where the request says so: an
  output's ``binary_data`` parameter, else the request parameter ``binary_data_output``;
  the response then carries ``Inference-Header-Content-Length``.
* ``GET /v2/models/<name>[/versions/<v>]`` (metadata, with ``versions`` and
  ``platform``), ``GET /v2/models/<name>[/versions/<v>]/ready`` and ``GET /v2`` (server
  metadata, listing the ``binary_tensor_data`` extension).

Every client error is ``{"error": "<one line>"}`` with a 4xx status, never echoes the
payload, and is logged as one line without a traceback (:class:`V2Error`).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from typing import Any, Callable, Optional

import numpy as np
from fastapi import Request  # resolved by FastAPI from this module's globals (string annotations)

from ...errors import UserError
from ...runtime import positive_env

log = logging.getLogger("recontrast.serve")

HEADER_LENGTH = "inference-header-content-length"
DEFAULT_MAX_REQUEST_MB = 256
MESSAGE_LIMIT = 300  # characters of an error message: one line, never the payload
PLATFORM = "pytorch"
EXTENSIONS = ["binary_tensor_data", "model_repository_extension"]


class V2Error(Exception):
    """A request the server refuses: ``status`` and a one-line message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str, *, quiet: bool = False):
        self.status = status
        self.quiet = quiet  # an expected answer (readiness before the load): not logged
        self.message = clip(message)
        super().__init__(self.message)


def quote(name: str, limit: int = 40) -> str:
    """A client-given name for a message: quoted, cut to ``limit`` characters."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def bad_request(message: str) -> V2Error:
    return V2Error(400, message)


def clip(message: str) -> str:
    """One line of at most MESSAGE_LIMIT characters (a message must not carry a payload)."""
    line = " ".join(str(message).split())
    return line if len(line) <= MESSAGE_LIMIT else line[: MESSAGE_LIMIT - 3] + "..."


def max_request_bytes() -> int:
    mb = positive_env("RECONTRAST_MAX_REQUEST_MB", DEFAULT_MAX_REQUEST_MB, "{name} must be a positive number, got {raw!r}")
    return int(mb * 2**20)


# ---------------------------------------------------------------------- request bodies
async def read_body(request, limit: int) -> bytes:
    """The request body, inflated when ``Content-Encoding`` says so; 413 past ``limit``
    bytes (sent or inflated), 415 for an encoding other than gzip, deflate or identity."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise V2Error(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes "
                           "(RECONTRAST_MAX_REQUEST_MB)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise V2Error(413, f"request body is over the limit of {limit} bytes (RECONTRAST_MAX_REQUEST_MB)")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(415, f"Content-Encoding {encoding[:40]!r} is not supported (gzip, deflate or none)")
    return inflate(body, limit, encoding)


def inflate(body: bytes, limit: int, encoding: str = "gzip") -> bytes:
    """gzip or zlib (``deflate``) data -> bytes, 413 past ``limit``, 400 when corrupt."""
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad_request(f"request body is not valid {encoding} data ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise V2Error(413, f"inflated request body is over the limit of {limit} bytes (RECONTRAST_MAX_REQUEST_MB)")
    if not inflater.eof:
        raise bad_request(f"request body is not valid {encoding} data (truncated)")
    return out


def parse_infer_request(body: bytes, header_length: Optional[str], model_name: str):
    """A v2 REST inference request body -> kserve ``InferRequest``.

    Without ``header_length`` the whole body is the JSON request. With it, the first
    ``header_length`` bytes are, and the tensors of inputs with a ``binary_data_size``
    parameter follow in input order. A binary ``BYTES`` tensor's elements stay ``bytes``
    (an encoded image file is not text). Requested outputs get their ``binary_data``
    resolved to a bool (the output's own, else ``binary_data_output``, else false).
    Every problem is a :class:`V2Error` naming the field, never quoting its value."""
    import orjson
    from kserve import InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    if header_length is None:
        json_bytes, tail = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise bad_request("the Inference-Header-Content-Length header must be an integer") from None
        if not 0 <= n <= len(body):
            raise bad_request(f"Inference-Header-Content-Length is {n} but the body has {len(body)} bytes")
        json_bytes, tail = body[:n], body[n:]
    if not json_bytes.strip():
        raise bad_request("empty request: expected a v2 inference request (JSON)")
    try:
        doc = orjson.loads(json_bytes)
    except orjson.JSONDecodeError as exc:
        binary = header_length is None and ("trailing" in str(exc) or not _is_utf8(json_bytes))
        hint = "; a binary request needs the Inference-Header-Content-Length header" if binary else ""
        raise bad_request(f"request is not valid JSON ({clip(str(exc))}){hint}") from None
    if not isinstance(doc, dict):
        raise bad_request(f"request must be a JSON object, not {_json_type(doc)}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request(f"'id' must be a string, not {_json_type(request_id)}")
    parameters = _parameters(doc.get("parameters"), "request")
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise bad_request("parameter binary_data_output must be true or false")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad_request("'inputs' must be a non-empty list of tensors")
    inputs, seen, offset = [], set(), 0
    for k, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise bad_request(f"inputs[{k}] must be an object, not {_json_type(item)}")
        name, shape, datatype = _tensor_head(item, f"inputs[{k}]")
        if name in seen:
            raise bad_request(f"input {quote(name)} appears twice")
        seen.add(name)
        params = _parameters(item.get("parameters"), f"input {quote(name)}")
        size = params.pop("binary_data_size", None)
        if size is not None:
            if item.get("data") is not None:
                raise bad_request(f"input {quote(name)} has both 'data' and a binary_data_size parameter")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request(f"input {quote(name)}: binary_data_size must be a non-negative integer")
            if header_length is None:
                raise bad_request(f"input {quote(name)} has binary_data_size but the request has no "
                                  "Inference-Header-Content-Length header")
            if offset + size > len(tail):
                raise bad_request(f"input {quote(name)}: binary_data_size {size} runs past the end of the "
                                  f"body ({len(tail) - offset} binary bytes left)")
            data = _binary_tensor(tail[offset:offset + size], datatype, name)
            offset += size
        else:
            data = item.get("data")
            if data is None:
                raise bad_request(f"input {quote(name)} has no 'data' and no binary_data_size parameter")
            if not isinstance(data, list):
                data = [data]
        inputs.append(InferInput(name, shape, datatype, data=data, parameters=params))
    if offset != len(tail):
        raise bad_request(f"{len(tail) - offset} bytes after the JSON header are not claimed by any "
                          "input's binary_data_size")

    requested = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise bad_request("'outputs' must be a list")
        requested, names = [], set()
        for k, item in enumerate(raw_outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise bad_request(f"outputs[{k}] must be an object with a string 'name'")
            name = item["name"]
            if name in names:
                raise bad_request(f"output {quote(name)} is requested twice")
            names.add(name)
            params = _parameters(item.get("parameters"), f"output {quote(name)}")
            binary = params.get("binary_data", default_binary)
            if not isinstance(binary, bool):
                raise bad_request(f"output {quote(name)}: parameter binary_data must be true or false")
            if params.get("classification", 0):
                raise bad_request(f"output {quote(name)}: the classification extension is not supported")
            params["binary_data"] = binary
            requested.append(RequestedOutput(name, params))
    return InferRequest(model_name, inputs, request_id=request_id, parameters=parameters or None,
                        request_outputs=requested or None)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _parameters(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where} parameters must be an object, not {_json_type(value)}")
    return dict(value)


def _tensor_head(item: dict, where: str) -> tuple[str, list[int], str]:
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{where} needs a string 'name'")
    if not isinstance(datatype, str):
        raise bad_request(f"input {quote(name)} needs a string 'datatype'")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise bad_request(f"input {quote(name)}: 'shape' must be a list of non-negative integers")
    return name, shape, datatype


def _binary_tensor(raw: bytes, datatype: str, name: str) -> list:
    """The raw bytes of one input -> its elements (flat): ``BYTES`` as bytes objects
    (length-prefixed, checked), numeric types through numpy."""
    if datatype == "BYTES":
        return split_bytes_tensor(raw, name)
    from kserve.utils.numpy_codec import to_np_dtype

    dtype = to_np_dtype(datatype)
    if dtype is None:
        raise bad_request(f"input {quote(name)}: unknown datatype {datatype[:20]!r}")
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise bad_request(f"input {quote(name)}: {len(raw)} binary bytes are not a whole number of {datatype} values")
    return np.frombuffer(raw, dtype=dtype).tolist()


def split_bytes_tensor(raw: bytes, name: str = "input") -> list[bytes]:
    """The binary form of a ``BYTES`` tensor (each element: uint32 little-endian length,
    then that many bytes) -> the elements, as bytes."""
    out, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad_request(f"input {quote(name)}: binary BYTES data is truncated in the length of element {len(out)}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise bad_request(f"input {quote(name)}: binary BYTES element {len(out)} claims {length} bytes, "
                              f"{len(raw) - offset} are left")
        out.append(bytes(view[offset:offset + length]))
        offset += length
    return out


# ---------------------------------------------------------------------- responses
def encode_infer_response(response) -> tuple[bytes, dict[str, str]]:
    """kserve ``InferResponse`` -> (body, headers): JSON, or JSON + binary tensors with the
    ``Inference-Header-Content-Length`` header when any output is binary."""
    import orjson

    try:
        rest, json_length = response.to_rest()
    except Exception as exc:  # an output the request names but the model did not produce
        from kserve.errors import InvalidInput

        if isinstance(exc, InvalidInput):
            raise bad_request(str(exc)) from None
        raise
    if json_length is None:
        return orjson.dumps(rest), {"content-type": "application/json"}
    return rest, {"content-type": "application/octet-stream", "inference-header-content-length": str(json_length)}


def error_response(status: int, message: str, request=None, headers: Optional[dict] = None):
    """``{"error": message}`` with ``status``, and one log line (no traceback)."""
    from fastapi.responses import JSONResponse

    message = clip(message)
    where = f"{request.method} {request.url.path}" if request is not None else "request"
    log.warning("rejected %s: %d %s", where, status, message)
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


# ---------------------------------------------------------------------- routes
def install(app, model, *, max_bytes: Optional[int] = None) -> None:
    """Put the v2 routes of ``model`` (a :class:`~.kserve_predictor.ReContrastPredictor`)
    first on ``app`` (kserve's FastAPI app, before ``ModelServer.start`` adds kserve's own
    routes), a v2 error body for FastAPI's request validation and HTTP errors on kserve's
    remaining routes, and one-line logging of the client errors kserve handles itself."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limit = max_request_bytes() if max_bytes is None else max_bytes

    def answer(handler: Callable) -> Callable:
        async def endpoint(request: Request):
            try:
                result = await handler(request, **request.path_params)
            except V2Error as exc:
                if exc.quiet:
                    return JSONResponse(status_code=exc.status, content={"error": exc.message})
                return error_response(exc.status, exc.message, request)
            except Exception as exc:
                status = client_error_status(exc)
                if status is None:
                    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
                    return JSONResponse(status_code=500, content={"error": clip(
                        f"internal error ({type(exc).__name__}); the server log has the details")})
                return error_response(status, str(exc), request)
            if isinstance(result, Response):
                return result
            return JSONResponse(content=result)

        endpoint.__name__ = handler.__name__
        return endpoint

    def check(model_name: str, model_version: Optional[str] = None) -> None:
        if model_name != model.name:
            raise V2Error(404, f"model {model_name[:80]!r} is not served here (this server serves {model.name!r})")
        served = model.served
        if model_version is not None and (served is None or served.version != model_version):
            now = f"version {served.version} is served" if served else "no version is loaded yet"
            raise V2Error(404, f"model {model.name!r} version {model_version[:40]!r} is not served ({now})")

    async def infer(request, model_name: str, model_version: Optional[str] = None):
        check(model_name, model_version)
        if model.served is None:
            raise V2Error(503, f"model {model.name!r} is not ready: {model.loading_state()}")
        body = await read_body(request, limit)
        infer_request = parse_infer_request(body, request.headers.get(HEADER_LENGTH), model.name)
        response, _ = await model(infer_request, headers=dict(request.headers))  # kserve's metrics, timing
        content, headers = encode_infer_response(response)
        return Response(content=content, headers=headers)

    async def metadata(request, model_name: str, model_version: Optional[str] = None):
        check(model_name, model_version)
        return model.metadata()

    async def ready(request, model_name: str, model_version: Optional[str] = None):
        check(model_name, model_version)
        if model.served is None:  # the readiness probe's answer until the first load: no log line
            raise V2Error(503, f"model {model.name!r} is not ready: {model.loading_state()}", quiet=True)
        return {"name": model.name, "ready": True}

    async def server_metadata(request):
        from ... import __version__

        return {"name": "recontrast", "version": __version__, "extensions": EXTENSIONS}

    routes = [("/v2", server_metadata, "GET")]
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        routes += [(prefix, metadata, "GET"), (prefix + "/ready", ready, "GET"), (prefix + "/infer", infer, "POST")]
    for path, handler, method in routes:
        app.add_api_route(path, answer(handler), methods=[method], include_in_schema=False)

    async def validation_error(request, exc):
        errors = exc.errors() if hasattr(exc, "errors") else []
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(400, f"invalid request: {where}: {first.get('msg', 'invalid')}", request)

    async def http_error(request, exc):
        if exc.status_code >= 500:
            return JSONResponse(status_code=exc.status_code, content={"error": clip(str(exc.detail))})
        return error_response(exc.status_code, str(exc.detail), request, getattr(exc, "headers", None))

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    quiet_kserve_client_errors()


def client_error_status(exc: BaseException) -> Optional[int]:
    """The HTTP status of a client error raised by the model or by kserve; None for a fault."""
    from kserve import errors

    if isinstance(exc, (errors.InvalidInput, UserError)):
        return 400
    if isinstance(exc, errors.ModelNotFound):
        return 404
    if isinstance(exc, (errors.ModelNotReady, errors.ServerNotReady, errors.ServerNotLive)):
        return 503
    if isinstance(exc, (NotImplementedError, errors.UnsupportedProtocol)):
        return 501
    return None


class OneLineClientErrors(logging.Filter):
    """kserve's exception handlers log every exception with its traceback; for a client
    error (bad input, unknown model, not ready) keep one line, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and client_error_status(exc) is not None:
            record.msg, record.args = "rejected: %s: %s", (type(exc).__name__, clip(str(exc)))
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"  # the client's fault
        return True


def quiet_kserve_client_errors() -> None:
    from kserve.logging import logger

    if not any(isinstance(f, OneLineClientErrors) for f in logger.filters):
        logger.addFilter(OneLineClientErrors())
