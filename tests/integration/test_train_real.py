"""Training on real images: checkpoint/resume, bundle round-trip, train -> evaluate -> predict."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from recontrast_core.bundle import load_detector
from recontrast_core.config import CalibrationConfig, TrainConfig
from recontrast_core.data.cache import load_resized
from recontrast_core.data.layouts import read_mvtec
from recontrast_core.data.manifest import split_validation
from recontrast_core.errors import UserError
from recontrast_core.evaluate import evaluate_bundle
from recontrast_core.predict import predict_paths
from recontrast_core.train import Trainer, train_model

SMALL = dict(image_size=64, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1, log_every=1, checkpoint_every=2)


def test_resume_continues_exactly(tiny_tile, tmp_path, monkeypatch):
    manifest = read_mvtec(tiny_tile)
    cfg = TrainConfig(iterations=4, **SMALL)
    straight = train_model(manifest, cfg, tmp_path / "a", progress=False)

    calls = {"n": 0}
    real_step = Trainer.step

    def crashing_step(self, x, alpha):
        if calls["n"] == 3:  # after the checkpoint at iteration 2, mid-way to 4
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_step(self, x, alpha)

    monkeypatch.setattr(Trainer, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_model(manifest, cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(Trainer, "step", real_step)
    ckpt_dir = tmp_path / "b" / "checkpoints"
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.pt"]  # no temp files left behind
    assert torch.load(ckpt_dir / "last.pt", weights_only=True)["iteration"] == 2
    assert not (tmp_path / "b" / "bundle").exists()  # nothing half-written

    resumed = train_model(manifest, cfg, tmp_path / "b", progress=False, resume=True)
    a = load_file(str(straight.bundle_dir / "model.safetensors"))
    b = load_file(str(resumed.bundle_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], rel=1e-5)

    with pytest.raises(UserError, match="different settings"):
        train_model(manifest, cfg.model_copy(update={"batch_size": 2}), tmp_path / "b", progress=False, resume=True)
    with pytest.raises(UserError, match="no checkpoint"):
        train_model(manifest, cfg, tmp_path / "c", progress=False, resume=True)


def test_bundle_round_trip_scores_and_threshold(tiny_tile, tmp_path):
    manifest = read_mvtec(tiny_tile)
    cfg = TrainConfig(iterations=2, **SMALL)
    result = train_model(manifest, cfg, tmp_path / "run", progress=False)
    meta = json.loads((result.bundle_dir / "bundle.json").read_text())
    assert meta["train_config"]["image_size"] == 64 and meta["library_version"]
    det = load_detector(result.bundle_dir)
    # the stored threshold is one of the calibration scores; reloaded weights reproduce it
    fit, val = split_validation(manifest.select(split="train", label=0), CalibrationConfig().validation_fraction, cfg.seed)
    images, _, _ = load_resized(val, 64)
    _, scores = det.score_uint8(images)
    assert np.isclose(scores, det.calibration.threshold, rtol=1e-5).any()
    # the same image as a path and as an array scores the same
    path = manifest.abspath(manifest.select(split="test").entries[0].path)
    from PIL import Image

    arr = np.asarray(Image.open(path))
    by_path, by_array = det.predict([path]), det.predict([arr])
    assert by_path[0]["score"] == pytest.approx(by_array[0]["score"], rel=1e-6)
    again = load_detector(result.bundle_dir).predict([path])
    assert again[0]["score"] == pytest.approx(by_path[0]["score"], rel=1e-6)
    assert (by_path[0]["normalized_score"] >= 0.5) == by_path[0]["decision"]
    # the bundle records the weights' own input statistics (lite0: inputs scaled to [-1, 1])
    assert meta["preprocessing"]["mean"] == [0.5] * 3 and meta["preprocessing"]["std"] == [0.5] * 3
    assert det.model.encoder.stats.mean == (0.5, 0.5, 0.5)
    # a bundle written before statistics were a setting recorded ImageNet's and loads with them
    from recontrast_core.models.backbones import IMAGENET_STATS

    meta["preprocessing"].update(mean=list(IMAGENET_STATS.mean), std=list(IMAGENET_STATS.std))
    del meta["train_config"]["backbone"]["input_stats"]
    meta["train_config"]["num_workers"] = 0  # a retired setting older bundles recorded
    (result.bundle_dir / "bundle.json").write_text(json.dumps(meta))
    old = load_detector(result.bundle_dir)
    assert old.model.encoder.stats == IMAGENET_STATS and old.model.frozen.stats == IMAGENET_STATS
    assert old.predict([path])[0]["score"] != pytest.approx(by_path[0]["score"], rel=1e-3)


def test_train_evaluate_predict_on_real_images(tiny_tile, tmp_path):
    manifest = read_mvtec(tiny_tile)
    cfg = TrainConfig(iterations=3, image_size=64, batch_size=4, log_every=1)  # default architecture
    result = train_model(manifest, cfg, tmp_path / "run", progress=False)
    assert all(np.isfinite(h["loss"]) for h in result.history)
    payload = evaluate_bundle(result.bundle_dir, manifest, out_dir=tmp_path / "eval", progress=False)
    m = payload["metrics"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "aupro_per_image", "image_f1_max", "image_f1_threshold"):
        assert 0.0 <= m[key] <= (1.0 if key != "image_f1_threshold" else np.inf), key
    from recontrast_core.selection import split_test

    report = split_test(manifest).report  # the half that never chose a setting
    assert payload["evaluation_split"]["rule"] == "hash half" and 0 < len(report) < 10
    assert payload["n_images"] == len(report) and len(payload["per_image"]) == len(report)
    assert {r["path"] for r in payload["per_image"]} == {e.path for e in report.entries}
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "eval" / "scores.csv").is_file()
    rows = predict_paths(result.bundle_dir, [tiny_tile / "test"], tmp_path / "pred", progress=False)
    assert len(rows) == 10
    assert (tmp_path / "pred" / "results.csv").read_text().count("\n") == 11
    pngs = list((tmp_path / "pred" / "overlays").glob("*.png"))
    assert len(pngs) == 10
    from PIL import Image

    assert Image.open(pngs[0]).size == (128, 64)  # image | overlay side by side


def test_background_checkpoint_write_equals_the_synchronous_one(tmp_path):
    """The GPU path writes intermediate checkpoints from a thread on a host snapshot; on
    CPU the same code must produce the same file content as a synchronous write."""
    from recontrast_core.config import BackboneConfig
    from recontrast_core.models import build_model

    cfg = TrainConfig(backbone=BackboneConfig(weights="none"), image_size=32, batch_size=2, decoder_blocks=(1, 1, 1),
                      bottleneck_blocks=1, device="cpu")
    torch.manual_seed(0)
    trainer = Trainer(build_model(cfg), cfg, torch.device("cpu"))
    trainer.step(torch.randn(2, 3, 32, 32), 1.0)
    history = [{"iteration": 1, "loss": 0.5, "alpha": 1.0}]
    trainer.save(tmp_path / "bg.pt", 1, history, background=True)
    history.append({"iteration": 2, "loss": 0.4, "alpha": 1.0})  # later appends do not leak in
    trainer.step(torch.randn(2, 3, 32, 32), 1.0)  # training goes on while the file is written
    trainer.wait()
    bg = torch.load(tmp_path / "bg.pt", weights_only=True)
    assert bg["iteration"] == 1 and bg["history"] == history[:1]
    # the snapshot is the state at save time, not after the next step
    fresh = Trainer(build_model(cfg), cfg, torch.device("cpu"))
    fresh.model.load_state_dict(bg["model"])
    assert not torch.equal(fresh.model.head1[0].weight, trainer.model.head1[0].weight)
    bad = tmp_path / "missing_dir_is_a_file"
    bad.write_text("x")
    trainer.save(bad / "ckpt.pt", 2, history, background=True)
    with pytest.raises(OSError):
        trainer.wait()  # the writer's error surfaces in the training thread


def test_resume_restores_the_loss_window_and_the_elapsed_time(tiny_tile, tmp_path, monkeypatch):
    """A crash between log points: the resumed run reports the same loss history and final
    loss as an uninterrupted one, and wall time over both segments."""
    manifest = read_mvtec(tiny_tile)
    cfg = TrainConfig(iterations=4, **{**SMALL, "log_every": 3, "checkpoint_every": 2})
    straight = train_model(manifest, cfg, tmp_path / "a", progress=False)
    calls = {"n": 0}
    real_step = Trainer.step

    def crashing_step(self, x, alpha):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_step(self, x, alpha)

    monkeypatch.setattr(Trainer, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_model(manifest, cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(Trainer, "step", real_step)
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["pending_losses"]) == 2 and state["elapsed_s"] > 0  # iterations 1-2, not yet logged
    resumed = train_model(manifest, cfg, tmp_path / "b", progress=False, resume=True)
    assert [h["iteration"] for h in resumed.history] == [3, 4]
    for h_a, h_b in zip(straight.history, resumed.history):
        assert h_b["loss"] == pytest.approx(h_a["loss"], rel=1e-5)
    meta = json.loads((resumed.bundle_dir / "bundle.json").read_text())
    assert meta["training"]["final_loss"] == pytest.approx(straight.history[-1]["loss"], rel=1e-5)
    assert resumed.wall_time_s >= state["elapsed_s"]


@pytest.mark.parametrize("content", [b"garbage, not a checkpoint", None])
def test_resume_from_a_corrupt_checkpoint_is_a_user_error(tiny_tile, tmp_path, content):
    manifest = read_mvtec(tiny_tile)
    cfg = TrainConfig(iterations=2, **SMALL)
    train_model(manifest, cfg, tmp_path / "r", progress=False)
    ckpt = tmp_path / "r" / "checkpoints" / "last.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(content if content is not None else data[: len(data) // 2])  # garbage / truncated
    with pytest.raises(UserError, match=r"last\.pt: cannot read the checkpoint: corrupt or truncated"):
        train_model(manifest, cfg, tmp_path / "r", progress=False, resume=True)
