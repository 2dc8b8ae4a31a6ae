"""ReContrastModel.predict input forms (path, image, image_b64), bad-input errors and the
logged signature (no MLflow server; a stand-in detector, the real one is in
tests/integration/test_serving.py)."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("mlflow")

from recontrast_core.mlops.serving.pyfunc_model import ReContrastModel, _as_inputs, model_signature  # noqa: E402


class _FakeDetector:
    def __init__(self):
        self.calls = []

    def predict(self, images):
        self.calls.append(images)
        return [
            {"score": float(i), "normalized_score": i / 4, "decision": i >= 2,
             "anomaly_map": np.full((2, 3), i, dtype=np.float32)}
            for i, _ in enumerate(images)
        ]


def _model():
    m = ReContrastModel()
    m._detector = _FakeDetector()
    return m


def test_input_forms():
    arr = np.zeros((4, 4, 3), np.uint8)
    assert _as_inputs(pd.DataFrame({"path": ["a.png", "b.png"]})) == ["a.png", "b.png"]
    imgs = _as_inputs(pd.DataFrame({"image": [arr, arr[..., 0]]}))
    assert [i.shape for i in imgs] == [(4, 4, 3), (4, 4)]
    mixed = _as_inputs(["a.png", arr])
    assert mixed[0] == "a.png" and mixed[1].shape == (4, 4, 3)
    assert _as_inputs("one.png") == ["one.png"]
    assert len(_as_inputs(arr)) == 1  # one HxWxC image
    assert len(_as_inputs(np.zeros((5, 8, 8)))) == 5  # a batch of HxW images
    assert _as_inputs({"path": ["x.png"]}) == ["x.png"]
    from_json = _as_inputs(pd.DataFrame({"image": [[[0, 255], [3, 4]], [[0.5, 1.0]]]}))
    assert from_json[0].dtype == np.uint8 and from_json[1].dtype.kind == "f"
    with pytest.raises(ValueError, match="'path', 'image' or 'image_b64'"):
        _as_inputs(pd.DataFrame({"other": [1]}))


def test_predict_output_frame():
    m = _model()
    out = m.predict(None, pd.DataFrame({"path": ["a", "b", "c"]}))
    assert list(out.columns) == ["score", "normalized_score", "decision"]
    assert out["decision"].tolist() == [False, False, True]
    assert out.dtypes["score"] == np.float64 and out.dtypes["decision"] == bool
    out = m.predict(None, ["a"], params={"return_map": True})
    assert list(out.columns) == ["score", "normalized_score", "decision", "anomaly_map"]
    assert out["anomaly_map"][0].shape == (2, 3)
    assert m.predict(None, pd.DataFrame({"path": []})).empty


def test_unloaded_model_says_so():
    with pytest.raises(RuntimeError, match="not loaded"):
        ReContrastModel().predict(None, ["a.png"])


def test_signature():
    sig = model_signature()
    assert sig.inputs.input_names() == ["path", "image", "image_b64"]
    assert not any(c.required for c in sig.inputs.inputs)  # one of them per row
    assert sig.outputs.input_names() == ["score", "normalized_score", "decision"]
    assert [p.name for p in sig.params.params] == ["return_map"]
    d = sig.to_dict()
    assert '"boolean"' in d["outputs"]


def _png_b64(path, array) -> str:
    import base64

    from PIL import Image

    Image.fromarray(array).save(path)
    return base64.b64encode(path.read_bytes()).decode()


def test_image_b64_decodes_like_the_file(tmp_path):
    from recontrast_core.data.images import load_image_rgb

    gray = np.random.default_rng(0).integers(0, 256, (7, 9), dtype=np.uint8)
    b64 = _png_b64(tmp_path / "g.png", gray)
    (arr,) = _as_inputs(pd.DataFrame({"image_b64": [b64]}))
    assert arr.dtype == np.uint8 and np.array_equal(arr, load_image_rgb(tmp_path / "g.png"))
    # rows may mix the forms; a data URL prefix and line breaks (base64 -w76) are accepted
    wrapped = "data:image/png;base64," + "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    mixed = _as_inputs(pd.DataFrame({"path": ["a.png", None], "image_b64": [None, wrapped]}))
    assert mixed[0] == "a.png" and np.array_equal(mixed[1], arr)
    assert np.array_equal(_as_inputs([{"image_b64": b64}])[0], arr)


@pytest.mark.parametrize("frame, message", [
    ({"image_b64": ["aGVsbG8=", "!!not base64!!"]}, r"row 0 \(image_b64\): not a readable PNG/JPEG"),
    ({"image_b64": [None, "!!not base64!!"]}, "row 0: give exactly one of"),
    ({"path": ["a.png", None], "image_b64": [None, "%%%"]}, r"row 1 \(image_b64\): not valid base64"),
    ({"path": ["a.png"], "image_b64": ["aGVsbG8="]}, r"row 0: give exactly one of .* \(got path, image_b64\)"),
    ({"image_b64": [""]}, r"row 0 \(image_b64\): empty image data"),
])
def test_bad_rows_are_named(frame, message):
    from recontrast_core.errors import UserError

    with pytest.raises((ValueError, UserError), match=message):
        _as_inputs(pd.DataFrame(frame))


def test_predict_reports_bad_input_as_invalid_parameter(tmp_path):
    from mlflow.exceptions import MlflowException

    m = _model()
    with pytest.raises(MlflowException, match=r"row 1 \(image_b64\): not valid base64") as err:
        m.predict(None, pd.DataFrame({"path": ["a", None], "image_b64": [None, "@@"]}))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE" and err.value.get_http_status_code() == 400

    class FileReadingDetector(_FakeDetector):  # reads files like the real one (to_model_input)
        def predict(self, images):
            from recontrast_core.bundle import to_model_input

            return super().predict([to_model_input(i, 8) for i in images])

    m._detector = FileReadingDetector()
    ok = tmp_path / "ok.png"
    _png_b64(ok, np.zeros((4, 4), np.uint8))
    with pytest.raises(MlflowException, match=r"row 1: .*missing\.png: file not found"):
        m.predict(None, pd.DataFrame({"path": [str(ok), str(tmp_path / "missing.png")]}))
