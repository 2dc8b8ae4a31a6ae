"""The v2 REST layer of ``recontrast serve`` without a server process: request bodies as
``tritonclient.http`` and kserve's client build them (JSON and the binary tensor
extension), malformed bodies (one-line 4xx messages that never quote the payload),
inflation limits, and the routes on a fresh FastAPI app (in-process ASGI client) with a
stand-in detector. tests/integration/test_kserve.py drives the real server over HTTP."""

from __future__ import annotations

import base64
import gzip
import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("kserve", reason="the serve extra is not installed (pip install 'recontrast[serve]')")
pytest.importorskip("mlflow")

from recontrast_core.mlops.serving import kserve_predictor as kp  # noqa: E402
from recontrast_core.mlops.serving import v2_rest  # noqa: E402
from recontrast_core.mlops.serving.v2_rest import V2Error, parse_infer_request, split_bytes_tensor  # noqa: E402

NOT_UTF8 = b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x80"


def _png(value: int, size: int = 5) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _binary_body(header: dict, *tensors: bytes) -> tuple[bytes, str]:
    import orjson

    head = orjson.dumps(header)
    return head + b"".join(tensors), str(len(head))


def _error(body: bytes, header_length=None, status=400) -> str:
    with pytest.raises(V2Error) as info:
        parse_infer_request(body, header_length, "m")
    assert info.value.status == status
    message = info.value.message
    assert "\n" not in message and len(message) <= v2_rest.MESSAGE_LIMIT
    return message


def test_tritonclient_bodies_binary_and_json_parse_to_the_same_elements():
    import tritonclient.http as tc
    files = [_png(10), NOT_UTF8]
    for binary in (True, False):
        inp = tc.InferInput("image", [2], "BYTES")
        values = files if binary else [base64.b64encode(f) for f in files]
        inp.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
        outputs = [tc.InferRequestedOutput("anomaly_map", binary_data=binary), tc.InferRequestedOutput("score")]
        body, json_size = tc.InferenceServerClient.generate_request_body(
            [inp], outputs=outputs, request_id="r7", parameters={"return_map": False})
        request = parse_infer_request(body, None if json_size is None else str(json_size), "m")
        got = kp.request_images(request)
        assert got == (files if binary else [base64.b64encode(f).decode() for f in files])
        assert request.id == "r7" and request.parameters["return_map"] is False
        assert [(o.name, o.binary_data) for o in request.request_outputs] == [("anomaly_map", binary), ("score", True)]
        assert kp.request_outputs(request) == ["anomaly_map", "score"]
    # no outputs named: tritonclient asks for every output in binary
    body, json_size = tc.InferenceServerClient.generate_request_body([inp])
    assert parse_infer_request(body, None if json_size is None else str(json_size), "m").use_binary_outputs


def test_kserve_client_bodies_binary_and_json():
    import kserve

    for binary in (True, False):
        inp = kserve.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([NOT_UTF8 if binary else b"aGk="], dtype=np.object_), binary_data=binary)
        body, json_length = kserve.InferRequest("m", [inp], request_id="k").to_rest()
        if not binary:
            import orjson

            body = orjson.dumps(body)
        request = parse_infer_request(body, None if json_length is None else str(json_length), "m")
        assert kp.request_images(request) == ([NOT_UTF8] if binary else ["aGk="])


def test_binary_tensors_follow_in_input_order():
    header = {"inputs": [
        {"name": "image", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + 3 + 4 + 0}},
        {"name": "extra", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
    ]}
    body, n = _binary_body(header, _bytes_tensor(b"\xff\x00\x80", b""), np.array([1.5, -2], np.float32).tobytes())
    request = parse_infer_request(body, n, "m")
    assert request.inputs[0].as_numpy().tolist() == [b"\xff\x00\x80", b""]
    assert request.inputs[1].as_numpy().tolist() == [1.5, -2.0]
    assert request.inputs[0].parameters == {}  # binary_data_size is the transport's, not the model's
    assert split_bytes_tensor(b"") == []


@pytest.mark.parametrize("body, header_length, expected", [
    (b"", None, "empty request"),
    (b"{\"inputs\": [", None, "request is not valid JSON (unexpected end of data"),
    (NOT_UTF8 * 100, None, "a binary request needs the Inference-Header-Content-Length header"),
    (b"[1, 2]", None, "request must be a JSON object, not a list"),
    (b"{}", None, "'inputs' must be a non-empty list of tensors"),
    (b'{"inputs": [3]}', None, "inputs[0] must be an object, not a number"),
    (b'{"inputs": [{"shape": [1], "datatype": "BYTES", "data": ["x"]}]}', None, "inputs[0] needs a string 'name'"),
    (b'{"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": ["x"]}]}', None,
     "input 'image': 'shape' must be a list of non-negative integers"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}', None,
     "input 'image' has no 'data' and no binary_data_size parameter"),
    (b'{"id": 5, "inputs": []}', None, "'id' must be a string, not a number"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "parameters": [1]}', None,
     "request parameters must be an object, not a list"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]},'
     b' {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["y"]}]}', None, "input 'image' appears twice"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4}}]}',
     None, "has binary_data_size but the request has no Inference-Header-Content-Length header"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "outputs": {"name": "score"}}',
     None, "'outputs' must be a list"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "outputs": [{"name": "s",'
     b' "parameters": {"binary_data": 1}}]}', None, "output 's': parameter binary_data must be true or false"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "outputs": [{"name": "s",'
     b' "parameters": {"classification": 3}}]}', None, "the classification extension is not supported"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "outputs": ['
     b'{"name": "score"}, {"name": "score"}]}', None, "output 'score' is requested twice"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}],'
     b' "parameters": {"binary_data_output": "yes"}}', None, "parameter binary_data_output must be true or false"),
    (b"{}", "x", "the Inference-Header-Content-Length header must be an integer"),
    (b"{}", "3", "Inference-Header-Content-Length is 3 but the body has 2 bytes"),
])
def test_malformed_requests_get_one_line_400s(body, header_length, expected):
    assert expected in _error(body, header_length)


def test_malformed_binary_data():
    image = {"name": "image", "shape": [1], "datatype": "BYTES"}
    body, n = _binary_body({"inputs": [{**image, "parameters": {"binary_data_size": 20}}]}, _bytes_tensor(NOT_UTF8))
    assert "binary_data_size 20 runs past the end of the body (16 binary bytes left)" in _error(body, n)
    body, n = _binary_body({"inputs": [{**image, "parameters": {"binary_data_size": 3}}]}, b"\x05\x00\x00")
    assert "truncated in the length of element 0" in _error(body, n)
    body, n = _binary_body({"inputs": [{**image, "parameters": {"binary_data_size": 7}}]}, b"\x09\x00\x00\x00abc")
    assert "binary BYTES element 0 claims 9 bytes, 3 are left" in _error(body, n)
    body, n = _binary_body({"inputs": [{**image, "parameters": {"binary_data_size": 4}}]}, _bytes_tensor(b""), b"zz")
    assert "2 bytes after the JSON header are not claimed" in _error(body, n)
    body, n = _binary_body({"inputs": [{**image, "data": ["x"], "parameters": {"binary_data_size": 4}}]},
                           _bytes_tensor(b""))
    assert "has both 'data' and a binary_data_size parameter" in _error(body, n)
    body, n = _binary_body({"inputs": [{**image, "parameters": {"binary_data_size": -1}}]})
    assert "binary_data_size must be a non-negative integer" in _error(body, n)
    fp = {"name": "f", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 3}}
    body, n = _binary_body({"inputs": [fp]}, b"abc")
    assert "3 binary bytes are not a whole number of FP32 values" in _error(body, n)


def test_messages_never_carry_the_payload():
    payload = "A" * 5000
    message = _error(f'{{"inputs": [{{"name": "{payload}", "shape": [1], "datatype": "BYTES"}}]}}'.encode())
    assert payload not in message and len(message) <= v2_rest.MESSAGE_LIMIT
    assert v2_rest.clip("x\ny " * 500).count("\n") == 0


def test_inflate_limits():
    data = b"\0" * 5000
    assert v2_rest.inflate(gzip.compress(data), 5000) == data
    assert v2_rest.inflate(zlib.compress(data), 5000, "deflate") == data
    with pytest.raises(V2Error) as info:
        v2_rest.inflate(gzip.compress(data), 4999)
    assert info.value.status == 413
    with pytest.raises(V2Error, match="not valid gzip data"):
        v2_rest.inflate(b"not gzip", 100)
    with pytest.raises(V2Error, match="truncated"):
        v2_rest.inflate(gzip.compress(data)[:20], 10000)


def test_request_limit_setting(monkeypatch):
    monkeypatch.setenv("RECONTRAST_MAX_REQUEST_MB", "0.5")
    assert v2_rest.max_request_bytes() == 2**19
    monkeypatch.setenv("RECONTRAST_MAX_REQUEST_MB", "none")
    with pytest.raises(v2_rest.UserError, match="RECONTRAST_MAX_REQUEST_MB must be a positive number"):
        v2_rest.max_request_bytes()


def test_kserve_client_errors_are_logged_as_one_line():
    from kserve.errors import InvalidInput

    record = logging.LogRecord("kserve", logging.ERROR, __file__, 1, "Exception:", (), None)
    try:
        raise InvalidInput("bad\nthing")
    except InvalidInput:
        import sys

        record.exc_info = sys.exc_info()
    v2_rest.OneLineClientErrors().filter(record)
    assert record.getMessage() == "rejected: InvalidInput: bad thing" and record.exc_info is None
    assert record.levelno == logging.WARNING
    fault = logging.LogRecord("kserve", logging.ERROR, __file__, 1, "Exception:", (), (ValueError, ValueError("x"), None))
    v2_rest.OneLineClientErrors().filter(fault)
    assert fault.exc_info is not None  # a server fault keeps its traceback


# ---------------------------------------------------------------------- routes, in process
class _Detector:
    image_size = 4

    def predict(self, images, return_map=False):
        out = []
        for im in images:
            r = {"score": float(im.mean()), "normalized_score": float(im.mean()) / 255, "decision": bool(im.mean() > 100)}
            if return_map:
                r["anomaly_map"] = np.full((4, 4), im.mean(), np.float32)
            out.append(r)
        return out


@pytest.fixture
def app_client(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    predictor = kp.ReContrastPredictor("m", "models:/m/3", client=object(), poll_s=0)
    app = FastAPI()
    v2_rest.install(app, predictor, max_bytes=4096)
    with TestClient(app) as client:
        yield client, predictor


def test_routes_answer_v2(app_client, caplog):
    client, predictor = app_client
    assert client.get("/v2/models/m/ready").status_code == 503
    meta = client.get("/v2/models/m").json()
    assert meta["versions"] == [] and meta["platform"] == "pytorch"
    predictor.served = kp.Served("3", _Detector())
    meta = client.get("/v2/models/m").json()
    assert meta["versions"] == ["3"] and meta["outputs"][3]["shape"] == [-1, 4, 4]
    assert client.get("/v2/models/m/versions/3/ready").json() == {"name": "m", "ready": True}
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]

    files = [_png(10), _png(200)]
    header = {"id": "a", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(_bytes_tensor(*files))}}],
              "outputs": [{"name": "decision", "parameters": {"binary_data": True}}, {"name": "score"}]}
    body, n = _binary_body(header, _bytes_tensor(*files))
    resp = client.post("/v2/models/m/infer", content=body, headers={"Inference-Header-Content-Length": n})
    assert resp.status_code == 200, resp.text
    json_length = int(resp.headers["inference-header-content-length"])
    import orjson

    head = orjson.loads(resp.content[:json_length])
    assert [o["name"] for o in head["outputs"]] == ["decision", "score"] and head["model_version"] == "3"
    assert head["outputs"][1]["data"] == [10.0, 200.0]
    assert resp.content[json_length:] == b"\x00\x01"

    resp = client.post("/v2/models/m/versions/3/infer", json={"inputs": [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(files[0]).decode()]}]})
    assert resp.status_code == 200 and "inference-header-content-length" not in resp.headers
    assert resp.json()["outputs"][0] == {"name": "score", "shape": [1], "datatype": "FP64", "data": [10.0]}

    caplog.set_level(logging.WARNING, logger="recontrast.serve")
    for method, path, kwargs, status, expected in (
        ("post", "/v2/models/m/infer", {"content": b"{nope"}, 400, "request is not valid JSON"),
        ("post", "/v2/models/x/infer", {"content": b"{}"}, 404, "model 'x' is not served here"),
        ("post", "/v2/models/m/versions/2/infer", {"content": b"{}"}, 404, "version '2' is not served (version 3 is"),
        ("post", "/v2/models/m/infer", {"content": b"x" * 5000}, 413, "over the limit of 4096 bytes"),
        ("post", "/v2/models/m/infer", {"content": b"{}", "headers": {"Content-Encoding": "br"}}, 415, "'br'"),
        ("post", "/v2/models/m/infer", {"json": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                              "data": ["%%%"]}]}}, 400, "image[0]: not valid base64"),
        ("post", "/v2/models/m/infer", {"json": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                              "data": ["aGk="]}], "outputs": [{"name": "map"}]}},
         400, "unknown output 'map'"),
        ("get", "/v2/nothing-here", {}, 404, "Not Found"),
    ):
        caplog.clear()
        resp = getattr(client, method)(path, **kwargs)
        assert resp.status_code == status and expected in resp.json()["error"], (path, resp.text)
        lines = [r for r in caplog.records if r.name == "recontrast.serve"]
        assert len(lines) == 1 and lines[0].exc_info is None and expected in lines[0].getMessage()
