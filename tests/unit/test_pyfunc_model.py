"""ReContrastModel.predict input forms and the logged signature (no MLflow server)."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("mlflow")

from recontrast_core.mlops.pyfunc_model import ReContrastModel, _as_inputs, model_signature  # noqa: E402


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
    with pytest.raises(ValueError, match="'path' or 'image'"):
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
    assert sig.inputs.input_names() == ["path", "image"]
    assert sig.outputs.input_names() == ["score", "normalized_score", "decision"]
    assert [p.name for p in sig.params.params] == ["return_map"]
    d = sig.to_dict()
    assert '"boolean"' in d["outputs"]
