"""``recontrast serve --score-log``: the predictor puts one row per scored image in the score
log (buffered, written in parts by the log's thread) and a log that fails never fails a
request (kserve's own request types, a stand-in detector; no server)."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("kserve", reason="the serve extra is not installed (pip install 'recontrast[serve]')")
pytest.importorskip("mlflow")

from recontrast_core.mlops.score_log import ScoreLog, read_score_table  # noqa: E402
from recontrast_core.mlops.serving.kserve_predictor import ReContrastPredictor, Served, kserve  # noqa: E402


class _Detector:
    image_size = 64

    def predict(self, images, return_map=False):
        return [{"score": 0.1 * (i + 1), "normalized_score": 0.2 * (i + 1), "decision": i == 1}
                for i, _ in enumerate(images)]


def _request(n: int, request_id: str):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    data = [base64.b64encode(buf.getvalue()).decode()] * n
    return kserve.InferRequest("recontrast", [kserve.InferInput("image", [n], "BYTES", data=data)],
                               request_id=request_id)


def _predictor(log) -> ReContrastPredictor:
    p = ReContrastPredictor("recontrast", "models:/recontrast@champion", client=object(), score_log=log)
    p.served = Served("3", _Detector())
    p.ready = True
    return p


def test_scored_images_reach_the_score_log(tmp_path):
    log = ScoreLog(str(tmp_path / "log"), flush_s=3600).start()
    p = _predictor(log)
    asyncio.run(p.predict(_request(2, "req-1")))
    asyncio.run(p.predict(_request(1, "req-2")))
    p.stop()  # kserve's shutdown hook: the log writes what it holds
    t = read_score_table(tmp_path / "log")
    assert t["path"] == ["request:req-1/0", "request:req-1/1", "request:req-2/0"]
    assert t["score"].tolist() == pytest.approx([0.1, 0.2, 0.1])
    assert t["model_version"] == ["recontrast/3"] * 3 and np.isfinite(t["scored_at"]).all()


def test_a_failing_log_never_fails_a_request(tmp_path):
    class Broken:
        def append(self, rows):
            raise OSError("disk on fire")

        def close(self):
            pass

    response = asyncio.run(_predictor(Broken()).predict(_request(2, "req-3")))
    assert [o.name for o in response.outputs] == ["score", "normalized_score", "decision"]
    blocked = tmp_path / "file"
    blocked.write_text("x")  # the log's folder cannot be made: rows are kept, the request answers
    log = ScoreLog(str(blocked), flush_s=3600).start()
    p = _predictor(log)
    response = asyncio.run(p.predict(_request(1, "req-4")))
    assert response.outputs[0].data == [pytest.approx(0.1)]
    p.stop()
    assert log.failures >= 1 and log.written == 0


def test_a_bad_score_log_location_stops_the_start_in_one_line(tmp_path):
    from tests.unit.test_serve_cli import _run

    proc = _run(["serve", "--model", "models:/m@champion", "--score-log", "ftp://host/log"], tmp_path)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "unsupported location" in errors[0], proc.stderr
