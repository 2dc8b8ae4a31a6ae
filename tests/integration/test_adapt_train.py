"""CI-sized end to end: MSC adapt -> ReContrast training from the adapted encoder.

A few normal training images of ``tiles_root`` (magnetic-tile-dev, or its synthetic
stand-in where that is absent) at 64 px, one MSC epoch, then
``train_model(..., init_encoder=<encoder.safetensors>)`` for 2 iterations. Checks that the
trainable encoder and its frozen copy both *start* from the adapted weights (captured when
the trainer is built) and that the frozen copy still holds them in the written bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recontrast_core import train as train_module
from recontrast_core.adapt import ENCODER_FILE, META_FILE, run_adapt, sample_shots
from recontrast_core.config import AdaptConfig, BackboneConfig, CalibrationConfig, TrainConfig
from recontrast_core.data.layouts import read_dataset
from recontrast_core.models.backbones import create_encoder, read_state_dict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_msc_adapt_then_train_starts_from_adapted_weights(tiles_root: Path, tmp_path: Path, monkeypatch) -> None:
    manifest = read_dataset(tiles_root)
    few = sample_shots(manifest, 8, seed=0)
    # lr 1e-3 (not the paper's 1e-5) so two steps move the weights measurably
    cfg = AdaptConfig(method="msc", image_size=64, epochs=1, batch_size=4, device="cpu", lr=1e-3, freeze_levels=2)
    path = run_adapt(few, cfg, tmp_path / "adapt", progress=False)
    assert path.name == ENCODER_FILE
    meta = json.loads((tmp_path / "adapt" / META_FILE).read_text())
    assert meta["method"] == "msc" and meta["n_images"] == 8 and meta["final_loss"] > 0

    adapted = read_state_dict(str(path))
    imagenet = create_encoder(BackboneConfig()).body.state_dict()
    assert set(adapted) == set(imagenet)
    moved = [k for k in adapted if adapted[k].is_floating_point() and not torch.equal(adapted[k], imagenet[k])]
    assert moved and all(k.startswith(("blocks.3", "blocks.4")) for k in moved), "adaptation changed nothing"

    captured: dict[str, dict[str, torch.Tensor]] = {}
    original_init = train_module.Trainer.__init__

    def spy(self, model, train_cfg, device, *args, **kwargs):
        captured["encoder"] = {k: v.detach().clone() for k, v in model.encoder.body.state_dict().items()}
        captured["frozen"] = {k: v.detach().clone() for k, v in model.frozen.body.state_dict().items()}
        original_init(self, model, train_cfg, device, *args, **kwargs)

    monkeypatch.setattr(train_module.Trainer, "__init__", spy)
    tcfg = TrainConfig(image_size=64, iterations=2, batch_size=4, device="cpu", log_every=1, checkpoint_every=2)
    result = train_module.train_model(few, tcfg, tmp_path / "train", init_encoder=str(path), progress=False,
                                      calibration=CalibrationConfig(validation_fraction=0.25))
    for copy in ("encoder", "frozen"):
        assert set(captured[copy]) == set(adapted)
        for k, v in adapted.items():
            assert torch.equal(captured[copy][k], v), f"{copy} does not start from the adapted {k}"
    assert len(result.history) == 2 and all(h["loss"] == h["loss"] for h in result.history)

    from safetensors.torch import load_file

    bundle = load_file(str(result.bundle_dir / "model.safetensors"))
    frozen_keys = {k.split("body.", 1)[1]: k for k in bundle if k.startswith("frozen.body.")}
    assert set(frozen_keys) == set(adapted)
    for k in moved:
        assert torch.equal(bundle[frozen_keys[k]], adapted[k].float()), "the frozen copy drifted from the adapted weights"
    info = json.loads((result.bundle_dir / "bundle.json").read_text())
    assert info["training"]["init_encoder"] == str(path)
