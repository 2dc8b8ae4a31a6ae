"""The KServe predictor's v2 message handling with kserve's own request/response types
(no server): element decoding, parameters, the response and its REST form."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("kserve", reason="the serve extra is not installed (pip install 'recontrast[serve]')")
pytest.importorskip("mlflow")

from kserve.protocol.infer_type import RequestedOutput  # noqa: E402

from recontrast_core.errors import UserError  # noqa: E402
from recontrast_core.mlops.serving.kserve_predictor import (  # noqa: E402
    decode_element,
    infer_response,
    kserve,
    kserve_errors,
    parse_model_uri,
    request_images,
    request_outputs,
    request_return_map,
)


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _request(data, datatype="BYTES", name="image", shape=None, parameters=None, outputs=None):
    inp = kserve.InferInput(name, shape or [len(data)], datatype, data=data)
    requested = None if outputs is None else [RequestedOutput(n, p) for n, p in outputs]
    return kserve.InferRequest("m", [inp], request_id="r1", parameters=parameters, request_outputs=requested)


def test_elements_decode_from_base64_text_base64_bytes_and_raw_bytes():
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    for fmt in ("PNG", "BMP", "TIFF"):
        raw = _png(rgb, fmt)
        b64 = base64.b64encode(raw)
        for value in (b64.decode(), b64, raw):
            assert np.array_equal(decode_element(0, value), rgb), (fmt, type(value))
    jpeg = decode_element(0, _png(rgb, "JPEG"))
    assert jpeg.shape == (5, 6, 3) and jpeg.dtype == np.uint8
    with pytest.raises(UserError, match=r"image\[2\]: not valid base64"):
        decode_element(2, "%%")
    with pytest.raises(UserError, match=r"image\[0\]: not a readable PNG/JPEG/BMP/TIFF/WebP image"):
        decode_element(0, b"\x89PNG\r\n\x1a\ncut")
    big = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(UserError, match=r"image\[1\]: not a readable .*: truncated or corrupt"):
        decode_element(1, _png(big)[:3000])
    with pytest.raises(UserError, match=r"image\[0\]: expected base64 text or image file bytes, got int"):
        decode_element(0, 3)


def test_request_checks():
    assert request_images(_request(["a", "b"])) == ["a", "b"]
    with pytest.raises(kserve_errors.InvalidInput, match="expected a BYTES input named 'image'"):
        request_images(_request([1.0], datatype="FP32"))
    with pytest.raises(kserve_errors.InvalidInput, match="expected a BYTES input named 'image'"):
        request_images(_request(["a"], name="images"))
    two = _request(["a"])
    two.inputs.append(kserve.InferInput("extra", [1], "FP32", data=[1.0]))
    with pytest.raises(kserve_errors.InvalidInput, match=r"and no other, got \['image \(BYTES\)', 'extra \(FP32\)'\]"):
        request_images(two)
    with pytest.raises(kserve_errors.InvalidInput, match="cannot reshape"):
        request_images(_request(["a"], shape=[2]))
    with pytest.raises(kserve_errors.InvalidInput, match="holds no image"):
        request_images(_request([], shape=[0]))
    assert request_return_map(_request(["a"])) is False
    assert request_return_map(_request(["a"], parameters={"return_map": True})) is True
    assert request_return_map(_request(["a"], parameters={"return_map": "TRUE"})) is True
    with pytest.raises(kserve_errors.InvalidInput, match="return_map must be true or false, not 1"):
        request_return_map(_request(["a"], parameters={"return_map": 1}))


def test_outputs_follow_the_request():
    assert request_outputs(_request(["a"])) == ["score", "normalized_score", "decision"]
    assert request_outputs(_request(["a"], parameters={"return_map": True})) == [
        "score", "normalized_score", "decision", "anomaly_map"]
    asked = _request(["a"], outputs=[("anomaly_map", None), ("score", {"binary_data": True})])
    assert request_outputs(asked) == ["anomaly_map", "score"]
    with pytest.raises(kserve_errors.InvalidInput,
                       match="unknown output 'nope': this model's outputs are score, normalized_score, decision, anomaly_map"):
        request_outputs(_request(["a"], outputs=[("score", None), ("nope", None)]))
    with pytest.raises(kserve_errors.InvalidInput, match="requested twice"):
        request_outputs(_request(["a"], outputs=[("score", None), ("score", None)]))
    with pytest.raises(kserve_errors.InvalidInput, match="return_map must be true or false"):
        request_outputs(_request(["a"], parameters={"return_map": "x"}, outputs=[("score", None)]))


def test_response_has_the_requested_outputs_json_or_binary():
    results = [{"score": 0.25, "normalized_score": 0.4, "decision": False, "anomaly_map": np.zeros((4, 4))},
               {"score": 0.75, "normalized_score": 0.6, "decision": True, "anomaly_map": np.ones((4, 4))}]
    req = _request(["a", "b"], outputs=[("anomaly_map", {"binary_data": True}), ("decision", {"binary_data": False})])
    body, json_length = infer_response(req, "m", "7", "reg", results, request_outputs(req)).to_rest()
    import orjson

    head = orjson.loads(body[:json_length])
    assert [o["name"] for o in head["outputs"]] == ["anomaly_map", "decision"]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 2 * 4 * 4 * 4}
    assert head["outputs"][1]["data"] == [False, True]
    maps = np.frombuffer(body[json_length:], np.float32).reshape(2, 4, 4)
    assert np.array_equal(maps, np.stack([r["anomaly_map"] for r in results]))
    all_binary = _request(["a", "b"], parameters={"binary_data_output": True})
    body, json_length = infer_response(all_binary, "m", "7", "reg", results, request_outputs(all_binary)).to_rest()
    assert np.array_equal(np.frombuffer(body[json_length:json_length + 16], np.float64), [0.25, 0.75])


def test_response_carries_outputs_and_the_version():
    results = [{"score": 0.25, "normalized_score": 0.4, "decision": False, "anomaly_map": np.zeros((4, 4))},
               {"score": 0.75, "normalized_score": 0.6, "decision": True, "anomaly_map": np.ones((4, 4))}]
    rest, _ = infer_response(_request(["a", "b"]), "m", "7", "reg", results,
                             ["score", "normalized_score", "decision", "anomaly_map"]).to_rest()
    out = {o["name"]: o for o in rest["outputs"]}
    assert out["score"] == {"name": "score", "shape": [2], "datatype": "FP64", "data": [0.25, 0.75]}
    assert out["decision"]["data"] == [False, True] and out["decision"]["datatype"] == "BOOL"
    assert out["anomaly_map"]["shape"] == [2, 4, 4] and out["anomaly_map"]["datatype"] == "FP32"
    assert rest["model_version"] == "7" and rest["id"] == "r1"
    assert rest["parameters"] == {"registered_model": "reg", "model_version": "7", "model_uri": "models:/reg/7"}
    rest, _ = infer_response(_request(["a"]), "m", "7", "reg", results[:1], request_outputs(_request(["a"]))).to_rest()
    assert [o["name"] for o in rest["outputs"]] == ["score", "normalized_score", "decision"]


@pytest.mark.parametrize("uri", ["models:/a", "models:/a@", "runs:/x/model", "models:/a/b", "models:/a@b/1"])
def test_model_uri_must_name_an_alias_or_a_version(uri):
    with pytest.raises(UserError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        parse_model_uri(uri)


def test_requests_over_the_image_cap_are_refused(monkeypatch):
    monkeypatch.setenv("RECONTRAST_MAX_IMAGES_PER_REQUEST", "2")
    assert request_images(_request(["a", "b"])) == ["a", "b"]
    with pytest.raises(kserve_errors.InvalidInput, match="holds 3 images, more than 2 per request"):
        request_images(_request(["a", "b", "c"]))
    monkeypatch.setenv("RECONTRAST_MAX_IMAGES_PER_REQUEST", "zero")
    with pytest.raises(UserError, match="RECONTRAST_MAX_IMAGES_PER_REQUEST must be a positive integer"):
        request_images(_request(["a"]))
