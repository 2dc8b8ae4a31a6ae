"""Training loops (frozen BatchNorm, frozen stages), run_adapt's files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from recontrast_core.adapt import ENCODER_FILE, META_FILE, Embedder, load_adapted, run_adapt, train_coft, train_msc
from recontrast_core.adapt.embed import trainable_parameters
from recontrast_core.config import AdaptConfig, BackboneConfig
from recontrast_core.data.layouts import read_dataset
from recontrast_core.errors import UserError
from recontrast_core.models.backbones import create_encoder, load_encoder_state, read_state_dict

NO_WEIGHTS = BackboneConfig(weights="none")  # random init: the unit tests need no weights file


@pytest.fixture(scope="module")
def encoder_factory():
    def make():
        torch.manual_seed(0)
        return create_encoder(NO_WEIGHTS)

    return make


def _bn_buffers(enc) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in enc.body.state_dict().items() if "running_" in k or "num_batches" in k}


def test_freeze_levels_follow_the_feature_taps(encoder_factory) -> None:
    enc = encoder_factory()
    names = [n for n, _ in enc.body.named_parameters()]
    assert len(trainable_parameters(enc, 0)) == len(names)
    trainable_parameters(enc, 2)  # lite0 tap 2 lies in blocks.2: stem and blocks.0-2 frozen
    frozen = [n for n, p in enc.body.named_parameters() if not p.requires_grad]
    assert frozen[0] == "conv_stem.weight" and all(not n.startswith(("blocks.3", "blocks.4")) for n in frozen)
    assert any(n.startswith("blocks.2.") for n in frozen)
    first_trainable = next(n for n, p in enc.body.named_parameters() if p.requires_grad)
    assert first_trainable.startswith("blocks.3.")
    with pytest.raises(ValueError):
        trainable_parameters(enc, 4)


@pytest.mark.parametrize("method", ["msc", "coft"])
def test_training_keeps_batchnorm_and_frozen_stages(encoder_factory, method: str) -> None:
    enc = encoder_factory()
    before = {k: v.clone() for k, v in enc.body.state_dict().items()}
    bn_before = _bn_buffers(enc)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cfg = AdaptConfig(method=method, image_size=32, epochs=1, batch_size=4, freeze_levels=2, lr=0.05,
                      coft={"steps_per_epoch": 2, "lr": 0.05})
    emb = Embedder(enc, device=torch.device("cpu"))
    if method == "msc":
        result = train_msc(emb, images, cfg, progress=False)
        assert result.center.shape == (emb.dim,)
    else:
        result = train_coft(emb, images[:2], cfg, progress=False)
    assert result.final_loss is not None and result.final_loss == result.final_loss  # not NaN
    after = enc.body.state_dict()
    for k, v in bn_before.items():
        assert torch.equal(after[k], v), f"BatchNorm buffer {k} changed: BN must stay frozen"
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("conv_stem", "bn1", "blocks.0", "blocks.2")))
    changed = [k for k in before if k.startswith("blocks.4") and not torch.equal(after[k], before[k])]
    assert changed, "the trainable stage did not move"
    assert all(p.requires_grad for p in enc.parameters()), "requires_grad is restored"


def test_msc_reports_every_epoch_in_order(encoder_factory) -> None:
    emb = Embedder(encoder_factory(), device=torch.device("cpu"))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    cfg = AdaptConfig(image_size=32, epochs=3, batch_size=3, lr=0.01, angular_weight=4.0, crop_scale=(0.6, 1.0),
                      hflip=False)
    seen = []
    result = train_msc(emb, images, cfg, progress=False, on_epoch_end=lambda e, loss: seen.append((e, loss)))
    assert [e for e, _ in seen] == [1, 2, 3]
    assert [loss for _, loss in seen] == [h["loss"] for h in result.history]


def test_run_adapt_writes_a_loadable_encoder(tiny_mvtec: Path, tmp_path: Path) -> None:
    manifest = read_dataset(tiny_mvtec)
    cfg = AdaptConfig(method="msc", backbone=NO_WEIGHTS, image_size=32, epochs=1, batch_size=4, device="cpu", lr=0.01)
    with pytest.raises(UserError, match="needs a method"):
        run_adapt(manifest, cfg.model_copy(update={"method": None}), tmp_path / "none", progress=False)
    path = run_adapt(manifest, cfg, tmp_path / "msc", progress=False)
    assert path == tmp_path / "msc" / ENCODER_FILE
    meta = json.loads((tmp_path / "msc" / META_FILE).read_text())
    assert meta["method"] == "msc" and meta["n_images"] == 6 and len(meta["center"]) == 672
    assert meta["backbone"]["name"] == "tf_efficientnet_lite0" and meta["settings"]["lr"] == 0.01
    assert meta["final_loss"] > 0
    state = read_state_dict(str(path))
    fresh = create_encoder(NO_WEIGHTS)
    assert set(state) == set(fresh.body.state_dict())
    load_encoder_state(fresh, state, source=str(path))  # every tensor covered, shapes match
    loaded = load_adapted(tmp_path / "msc")
    assert all(torch.equal(loaded.encoder.body.state_dict()[k], v) for k, v in state.items())
    assert loaded.settings.method == "msc"


def _cli() -> typer.Typer:
    from recontrast_core.cli.adapt import adapt_command

    app = typer.Typer()
    app.command("adapt")(adapt_command)

    @app.command("noop")
    def _noop() -> None:  # a second command, so "adapt" stays a sub-command
        pass

    return app


def test_cli_rejects_unknown_method_and_too_many_shots(tiny_mvtec: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(_cli(), ["adapt", str(tiny_mvtec), "--method", "simclr", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "unknown adaptation method 'simclr'" in res.output and "Traceback" not in res.output
    res = runner.invoke(_cli(), ["adapt", str(tiny_mvtec), "--method", "coft", "--shots", "7", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "shots=7" in res.output and "only 6 normal training images" in res.output
    assert not (tmp_path / ENCODER_FILE).exists()


def test_cli_view_and_angular_flags_reach_the_config(tmp_path: Path) -> None:
    from recontrast_core.cli.common import settings_from
    from recontrast_core.errors import UserError
    from recontrast_core.steps.settings import adapt_settings

    flags = {"adapt_method": "msc", "adapt.angular_weight": 16.0, "adapt.hflip": False, "adapt.crop_scale": [0.6, 1.0]}
    cfg = adapt_settings(settings_from(None, flags))
    assert (cfg.angular_weight, cfg.hflip, cfg.crop_scale) == (16.0, False, (0.6, 1.0))
    unset = adapt_settings(settings_from(None, {"adapt_method": "msc", "adapt.hflip": None}))
    assert unset.hflip is True  # unset flags keep defaults
    with pytest.raises(UserError, match="crop_scale"):
        settings_from(None, {"adapt.crop_scale": [1.5, 1.0]})


def test_cli_adapts_and_prints_json(tiny_mvtec: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(_cli(), [
        "adapt", str(tiny_mvtec), "--method", "coft", "--shots", "2", "--epochs", "1", "--batch-size", "4",
        "--image-size", "32", "--weights", "none", "--device", "cpu", "--seed", "3", "--no-progress", "--json",
        "--out", str(tmp_path / "out"),
    ])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout[res.stdout.index("{"):])
    assert payload["method"] == "coft" and payload["images"] == 2
    meta = json.loads(Path(payload["metadata"]).read_text())
    assert meta["method"] == "coft" and meta["n_images"] == 2 and meta["center"] is None
    assert meta["settings"]["seed"] == 3 and meta["backbone"]["weights"] == "none"
    assert all(p.startswith("train/good/") for p in meta["images"])
    assert set(meta["history"][0]) == {"epoch", "loss", "con", "pp", "np"}
    assert set(read_state_dict(payload["encoder"])) == set(create_encoder(NO_WEIGHTS).body.state_dict())
