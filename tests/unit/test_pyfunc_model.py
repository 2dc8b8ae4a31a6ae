"""The MLflow pyfunc model: input forms (path, image, image_b64), bad-input errors, the
logged signature, the ``path`` input's allowed root, and the model as MLflow stores it:
code + safetensors bundle + the project's wheel (no MLflow server; a stand-in detector for
the input tests, a real tiny patch-kNN bundle for the saved model; serving over HTTP is in
tests/integration/test_serving.py and test_mlflow_virtualenv.py)."""

import base64
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("mlflow")

from recontrast_core.mlops.serving.pyfunc_model import (  # noqa: E402
    PATH_OFF,
    PATH_REFUSED,
    PATH_ROOT_ENV,
    ReContrastModel,
    _as_inputs,
    allowed_path_root,
    model_signature,
)

pytestmark = pytest.mark.timeout(600)


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


@pytest.fixture
def no_root(monkeypatch):
    monkeypatch.delenv(PATH_ROOT_ENV, raising=False)


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """An allowed root (``tmp_path/root``, symlinks resolved) set in the environment."""
    r = tmp_path / "root"
    r.mkdir()
    monkeypatch.setenv(PATH_ROOT_ENV, str(r))
    return r.resolve()


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


def test_predict_output_frame(root):
    m = _model()
    out = m.predict(None, pd.DataFrame({"path": ["a", "b", "c"]}))
    assert list(out.columns) == ["score", "normalized_score", "decision"]
    assert out["decision"].tolist() == [False, False, True]
    assert out.dtypes["score"] == np.float64 and out.dtypes["decision"] == bool
    assert m._detector.calls[0] == [str(root / n) for n in "abc"]  # relative paths: under the root
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


def test_predict_reports_bad_input_as_invalid_parameter(root):
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
    ok = root / "ok.png"
    _png_b64(ok, np.zeros((4, 4), np.uint8))
    # under the allowed root a missing file is named (the client may read that folder)
    with pytest.raises(MlflowException, match=r"row 1: .*missing\.png: file not found"):
        m.predict(None, pd.DataFrame({"path": [str(ok), str(root / "missing.png")]}))


# -- the path input: off by default, confined to the allowed root --------------------------


def test_path_input_is_off_by_default(no_root, tmp_path):
    from mlflow.exceptions import MlflowException

    img = tmp_path / "x.png"
    b64 = _png_b64(img, np.zeros((4, 4), np.uint8))
    m = _model()
    assert allowed_path_root() is None
    for frame in (pd.DataFrame({"path": [str(img)]}), pd.DataFrame({"path": ["relative.png"]})):
        with pytest.raises(MlflowException) as err:
            m.predict(None, frame)
        assert str(err.value.message) == f"row 0 (path): {PATH_OFF}"
        assert err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="path input is off"):
        m.predict(None, [str(img)])  # the list form of the Python model too
    assert m._detector.calls == []  # nothing reached the detector
    assert len(m.predict(None, pd.DataFrame({"image_b64": [b64]}))) == 1  # base64 keeps working
    assert len(m.predict(None, pd.DataFrame({"image": [np.zeros((4, 4), np.uint8)]}))) == 1


def test_path_outside_the_root_gets_one_message(root, tmp_path):
    from mlflow.exceptions import MlflowException

    (root / "ok.png").write_bytes(b"x")
    (root / "sub").mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    (root / "link.png").symlink_to(secret)  # a symlink inside the root leaving it
    (root / "dirlink").symlink_to(tmp_path)  # a folder symlink leaving it
    (root / "loop").symlink_to(root / "loop")
    outside = [
        str(secret), str(tmp_path / "absent.png"),  # an existing and a missing file: same answer
        "../secret.png", "../absent.png", "sub/../../secret.png",
        "link.png", "dirlink/secret.png", "dirlink/absent.png",
        "/etc/passwd", "/no/such/dir/x.png", "/", str(root), ".", "loop", "bad\x00name.png",
    ]
    m = _model()
    messages = set()
    for p in outside:
        with pytest.raises(MlflowException) as err:
            m.predict(None, pd.DataFrame({"path": [p]}))
        messages.add(err.value.message)
        assert err.value.get_http_status_code() == 400
    assert messages == {f"row 0 (path): {PATH_REFUSED}"}, messages  # names neither the path nor its target
    assert m._detector.calls == []

    # inside: relative, absolute, through a symlink that stays inside, with ".." that stays inside
    (root / "inner.png").symlink_to(root / "ok.png")
    inside = ["ok.png", str(root / "ok.png"), "sub/../ok.png", "inner.png", str(tmp_path / "root" / "ok.png")]
    m.predict(None, pd.DataFrame({"path": inside}))
    assert m._detector.calls[-1] == [str(root / "ok.png")] * len(inside)
    # a refused row among good ones is named by its number
    with pytest.raises(MlflowException, match=r"^row 2 \(path\): path refused"):
        m.predict(None, pd.DataFrame({"path": ["ok.png", "ok.png", str(secret)]}))


def test_a_bad_root_stops_the_load_and_turns_paths_off(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModelContext

    (tmp_path / "file").write_text("x")
    for value in (str(tmp_path / "missing"), str(tmp_path / "file")):
        monkeypatch.setenv(PATH_ROOT_ENV, value)
        with pytest.raises(ValueError, match="not an existing folder"):
            allowed_path_root()
        with pytest.raises(MlflowException, match=f"{PATH_ROOT_ENV}=.*not an existing folder"):
            ReContrastModel().load_context(PythonModelContext(artifacts={"bundle": str(tmp_path)}, model_config={}))
        with pytest.raises(MlflowException, match="path input is off"):
            _model().predict(None, pd.DataFrame({"path": ["x.png"]}))
    monkeypatch.setenv(PATH_ROOT_ENV, "  ")  # blank: off, not an error
    assert allowed_path_root() is None


# -- the model as MLflow stores it: code, a safetensors bundle, the wheel --------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real patch-kNN bundle (64 px, trained in about a second on synthetic images)."""
    from recontrast_core.config import ModelConfig, TrainConfig
    from recontrast_core.data.layouts import read_mvtec
    from recontrast_core.fit import fit_detector
    from tests.conftest import build_tiny_mvtec

    tmp = tmp_path_factory.mktemp("pyfunc-bundle")
    data = build_tiny_mvtec(tmp / "ds", n_train=8, n_test_good=2, defects={"crack": 2}, size=(64, 64))
    small = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                        device="cpu")
    return fit_detector(read_mvtec(data), ModelConfig(kind="patchknn", patchknn={"image_size": 64, "fraction": 0.3}),
                        small, tmp / "out", progress=False).bundle_dir


@pytest.fixture(scope="module")
def saved_model(tiny_bundle, tmp_path_factory) -> Path:
    from recontrast_core.mlops.serving.pyfunc_model import save_pyfunc

    return save_pyfunc(tiny_bundle, tmp_path_factory.mktemp("pyfunc-model") / "model", device="cpu")


def _test_images(bundle: Path) -> list[Path]:
    return sorted((bundle.parents[1] / "ds" / "test").rglob("*.png"))


def test_the_model_is_code_and_scores_like_the_bundle(saved_model, tiny_bundle, root):
    import mlflow
    import yaml

    from recontrast_core.bundle import load_detector

    flavor = yaml.safe_load((saved_model / "MLmodel").read_text())["flavors"]["python_function"]
    assert Path(flavor["model_code_path"]).name == "model_code.py" and (saved_model / "model_code.py").is_file()
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor and not list(saved_model.rglob("*.pkl"))  # no pickle anywhere
    assert flavor["config"] == {"device": "cpu"}
    assert sorted(p.name for p in (saved_model / "artifacts" / "bundle").iterdir()) == ["bundle.json",
                                                                                        "model.safetensors"]

    images = _test_images(tiny_bundle)
    reference = load_detector(tiny_bundle, device="cpu").predict(images, return_map=True)
    loaded = mlflow.pyfunc.load_model(str(saved_model))
    assert isinstance(loaded.unwrap_python_model(), ReContrastModel)
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
    names = [f"{i}-{p.name}" for i, p in enumerate(images)]  # good/000.png and crack/000.png
    for p, name in zip(images, names):
        shutil.copy(p, root / name)
    for frame, params in ((pd.DataFrame({"image_b64": b64}), None),
                          (pd.DataFrame({"path": names}), {"return_map": True})):
        out = loaded.predict(frame, params=params)
        assert out["score"].tolist() == [r["score"] for r in reference]  # bit-identical: same code, same process
        assert out["normalized_score"].tolist() == [r["normalized_score"] for r in reference]
        assert out["decision"].tolist() == [r["decision"] for r in reference]
    for got, ref in zip(out["anomaly_map"], reference):
        assert np.array_equal(np.asarray(got), ref["anomaly_map"])


def test_requirements_install_the_logged_wheel(saved_model):
    import mlflow

    reqs = (saved_model / "requirements.txt").read_text().splitlines()
    wheel = saved_model / "artifacts" / "recontrast-0.1.0-py3-none-any.whl"
    assert reqs == [f"mlflow=={mlflow.__version__}", "artifacts/recontrast-0.1.0-py3-none-any.whl",
                    "-c constraints.txt"]
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("recontrast_core/mlops/serving/model_code.py", "recontrast_core/mlops/serving/pyfunc_model.py",
              "recontrast_core/bundle.py", "recontrast_core/components/factory.py"):
        assert f in names, f
    pins = (saved_model / "constraints.txt").read_text().splitlines()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins and f"mlflow=={mlflow.__version__}" in pins
    assert not any(p.startswith("recontrast==") or "+" in p for p in pins)  # local labels dropped
    assert all(p.count("==") == 1 for p in pins)


class _Marker:
    """Unpickling this creates ``path``: proof that a pickle was read."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _tampered_copy(saved_model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(saved_model, copy)
    return copy


def test_an_injected_pickle_is_never_read(saved_model, tmp_path):
    import mlflow

    marker = tmp_path / "pwned"
    model = _tampered_copy(saved_model, tmp_path)
    payload = pickle.dumps(_Marker(marker))
    for rel in ("python_model.pkl", "artifacts/python_model.pkl", "artifacts/bundle/model.pkl",
                "artifacts/bundle/model.pt", "artifacts/bundle/weights.pickle"):
        (model / rel).write_bytes(payload)
    loaded = mlflow.pyfunc.load_model(str(model))
    out = loaded.predict(pd.DataFrame({"image": [np.full((8, 8), 7, np.uint8)]}))
    assert len(out) == 1
    assert not marker.exists()
    pickle.loads(payload)  # the payload does work: it is the load that never reads it
    assert marker.exists()


def test_an_mlmodel_pointed_at_a_pickle_is_refused(saved_model, tmp_path, monkeypatch):
    """A tampered MLmodel that swaps the code for a pickle: MLflow refuses pickles when
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (docs/serving.md: set it on the server)."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    marker = tmp_path / "pwned"
    model = _tampered_copy(saved_model, tmp_path)
    (model / "python_model.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    del flavor["model_code_path"]
    flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(MlflowException, match="Deserializing model using pickle is disallowed"):
        mlflow.pyfunc.load_model(str(model))
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    ("weights_pickle", "model.safetensors"),
    ("weights_torch_save", "model.safetensors"),
    ("format", "unsupported bundle format"),
    ("kind", "unknown model kind"),
])
def test_an_edited_bundle_is_refused_at_load(saved_model, tmp_path, edit, message):
    import json

    import mlflow
    import torch

    from recontrast_core.errors import UserError

    marker = tmp_path / "pwned"
    model = _tampered_copy(saved_model, tmp_path)
    bundle = model / "artifacts" / "bundle"
    meta = json.loads((bundle / "bundle.json").read_text())
    if edit == "weights_pickle":
        (bundle / "model.safetensors").write_bytes(pickle.dumps(_Marker(marker)))
    elif edit == "weights_torch_save":  # a torch checkpoint (zip + pickle) in place of the safetensors
        torch.save({"x": _Marker(marker)}, bundle / "model.safetensors")
    elif edit == "format":
        (bundle / "bundle.json").write_text(json.dumps({**meta, "format": "pickle"}))
    else:
        (bundle / "bundle.json").write_text(json.dumps({**meta, "model_kind": "__import__('os')"}))
    with pytest.raises(UserError, match=message):
        mlflow.pyfunc.load_model(str(model))
    assert not marker.exists()


def test_models_pickled_the_old_way_still_load(tiny_bundle, tmp_path):
    """A model logged before the change (a pickled ReContrastModel, python_model.pkl) loads
    through the same class; MLflow warns about the pickle, it is not refused by default."""
    import mlflow

    from recontrast_core.bundle import load_detector
    from recontrast_core.mlops import pyfunc_model as old_home

    assert old_home.ReContrastModel is ReContrastModel
    path = tmp_path / "old"
    mlflow.pyfunc.save_model(path=str(path), python_model=ReContrastModel(device="cpu"),
                             artifacts={"bundle": str(tiny_bundle)}, signature=model_signature(),
                             input_example=pd.DataFrame({"image": [np.full((8, 8), 1, np.uint8)]}),
                             pip_requirements=[f"mlflow=={mlflow.__version__}"])
    assert (path / "python_model.pkl").is_file()
    images = _test_images(tiny_bundle)
    out = mlflow.pyfunc.load_model(str(path)).predict(
        pd.DataFrame({"image_b64": [base64.b64encode(p.read_bytes()).decode() for p in images]}))
    assert out["score"].tolist() == [r["score"] for r in load_detector(tiny_bundle, device="cpu").predict(images)]


# -- where the wheel comes from ------------------------------------------------------------------


def test_the_wheel_repacked_from_an_installation_equals_the_built_one(tmp_path, monkeypatch):
    import importlib.metadata as md
    import json

    from recontrast_core.mlops.serving import pyfunc_env

    monkeypatch.delenv(pyfunc_env.WHEEL_ENV, raising=False)
    built = pyfunc_env.project_wheel()
    assert pyfunc_env.project_wheel() == built  # cached per process
    site = tmp_path / "site"
    with zipfile.ZipFile(built) as z:
        z.extractall(site)  # what an install lays out (RECORD included)
    dist_info = next(site.glob("recontrast-*.dist-info"))
    (dist_info / "INSTALLER").write_text("pip\n")
    repacked = pyfunc_env.repack_installed(tmp_path / "out", md.Distribution.at(dist_info))
    assert repacked.name == built.name
    with zipfile.ZipFile(built) as a, zipfile.ZipFile(repacked) as b:
        files_a = {n: a.read(n) for n in a.namelist() if not n.endswith("/RECORD")}
        files_b = {n: b.read(n) for n in b.namelist() if not n.endswith("/RECORD")}
        assert files_a == files_b
        record = b.read(f"{dist_info.name}/RECORD").decode()
    assert "recontrast_core/bundle.py,sha256=" in record and "INSTALLER" not in record
    (dist_info / "direct_url.json").write_text(json.dumps({"url": "file:///src", "dir_info": {"editable": True}}))
    with pytest.raises(pyfunc_env.WheelError, match="editable"):
        pyfunc_env.repack_installed(tmp_path / "out2", md.Distribution.at(dist_info))


def test_an_explicit_wheel_is_used_as_given(tmp_path, monkeypatch):
    from recontrast_core.mlops.serving import pyfunc_env

    folder = tmp_path / "wheels"
    folder.mkdir()
    whl = folder / "recontrast-0.1.0-py3-none-any.whl"
    shutil.copy(pyfunc_env.project_wheel(), whl)
    monkeypatch.setenv(pyfunc_env.WHEEL_ENV, str(folder))
    assert pyfunc_env.project_wheel() == whl
    assert pyfunc_env.project_wheel(whl) == whl
    monkeypatch.setenv(pyfunc_env.WHEEL_ENV, str(tmp_path))
    with pytest.raises(pyfunc_env.WheelError, match="expected one recontrast-\\*.whl"):
        pyfunc_env.project_wheel()
    with pytest.raises(pyfunc_env.WheelError, match="not a recontrast"):
        pyfunc_env.project_wheel(tmp_path / "other.whl")
