"""Model kinds: the registry, the patch-kNN search, the fused normalisation, bundles of every
kind, and ``model.kind: auto`` choosing on the validation split (synthetic images: no
shared data needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recontrast_core.bundle import load_detector
from recontrast_core.config import AutoConfig, BackboneConfig, ModelConfig, PatchKnnConfig, TrainConfig
from recontrast_core.data.layouts import read_mvtec
from recontrast_core.errors import UserError
from recontrast_core.fit import fit_detector
from recontrast_core.models.backbones import create_encoder
from recontrast_core.models.fused import FusedScorer, fit_quantiles, resize_matrix
from recontrast_core.models.kinds import KINDS, get_kind
from recontrast_core.models.patchknn import PatchKnnScorer, nearest_distances
from recontrast_core.selection import in_validation_half, split_test
from tests.conftest import build_tiny_mvtec

SMALL = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                    device="cpu", log_every=1, checkpoint_every=2)


@pytest.fixture
def synth_set(tmp_path):
    return build_tiny_mvtec(tmp_path / "ds", n_train=10, n_test_good=6, defects={"crack": 6}, size=(64, 64))


def test_registry_lists_the_three_kinds_and_refuses_others():
    assert set(KINDS) == {"recontrast", "patchknn", "fused"}
    with pytest.raises(UserError, match="unknown model kind 'bogus'"):
        get_kind("bogus")


def test_patchknn_search_is_exact_nearest_neighbour():
    enc = create_encoder(BackboneConfig(weights="none"))
    cfg = PatchKnnConfig(image_size=64)
    g = torch.Generator().manual_seed(0)
    dim = sum(enc.channels[i] for i in cfg.levels)
    bank = torch.randn(500, dim, generator=g) * 3 + 5  # offset: the centring must not change the answer
    queries = torch.randn(3000, dim, generator=g) * 3 + 5
    scorer = PatchKnnScorer(enc, cfg, bank)
    got = scorer.nearest(queries)  # chunked in eager mode
    assert torch.allclose(got, nearest_distances(bank, queries), rtol=1e-4, atol=1e-3)
    # a bank row: zero up to the expansion's float32 error, sqrt(eps * |q - centre|^2) ~ 0.05
    # here (|q - centre|^2 ~ 8,000); real queries are units away from the bank
    assert scorer.nearest(bank[:7]).max() < 0.1


def test_resize_matrix_is_torch_antialiased_bilinear():
    x = torch.rand(2, 3, 96, 96)
    w = resize_matrix(96, 64)
    ours = w.T @ x @ w
    ref = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_fused_quantiles_map_normal_q_lo_to_0_and_q_hi_to_a_tenth():
    class Const(torch.nn.Module):
        def __init__(self, scale, size):
            super().__init__()
            self.scale, self.image_size = scale, size

        def forward(self, x):
            return x.float().mean(1) * self.scale

    fused = FusedScorer(Const(1.0, 32), Const(100.0, 32), ModelConfig().fusion)
    normals = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    q = fit_quantiles(fused, normals)
    r, p = fused.branch_maps(normals)
    assert q[0, 0] == pytest.approx(float(np.quantile(r.numpy(), 0.9)), rel=1e-5)
    assert q[1, 1] == pytest.approx(float(np.quantile(p.numpy(), 0.995)), rel=1e-5)
    out = fused(normals)  # both branches equally weighted after normalisation
    assert np.quantile(out.numpy(), 0.995) == pytest.approx(0.2, abs=0.02)


def test_fused_image_score_can_come_from_one_branch_while_the_map_stays_fused():
    from recontrast_core.config import FusionConfig, InferenceConfig
    from recontrast_core.fit import choose_image_source, fused_source_scores
    from recontrast_core.inference import image_scores
    from recontrast_core.scoring import ScoringHead

    class Channel(torch.nn.Module):  # a branch whose map is one colour channel, scaled
        def __init__(self, c, scale, size):
            super().__init__()
            self.c, self.scale, self.image_size = c, scale, size

        def forward(self, x):
            return x[:, self.c].float() * self.scale

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    inference = InferenceConfig(gaussian_sigma=2.0)
    heads = {}
    for source in ("fused", "patchknn", "recontrast"):
        fused = FusedScorer(Channel(0, 1.0, 32), Channel(1, 3.0, 32), FusionConfig(image_score=source))
        fit_quantiles(fused, images)
        heads[source] = ScoringHead(fused, inference).eval()
    with torch.no_grad():
        out = {k: h.maps_and_scores(images) for k, h in heads.items()}
        _, p = heads["fused"].scorer.normalised_maps(images)
        knn_alone = image_scores(heads["fused"].blur(p), inference)
    for k in ("patchknn", "recontrast"):  # the map is the fused one whatever the score's source
        assert torch.equal(out[k][0], out["fused"][0])
    assert torch.allclose(out["patchknn"][1], knn_alone)
    assert not torch.allclose(out["patchknn"][1], out["fused"][1])
    # the one-pass variant scores agree with the heads, source by source
    maps, by_source = fused_source_scores(heads["fused"].scorer, inference, images, torch.device("cpu"))
    assert np.allclose(maps, out["fused"][0].numpy(), atol=1e-5)
    for k in by_source:
        assert np.allclose(by_source[k], out[k][1].numpy(), atol=1e-5)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    chosen, aurocs = choose_image_source(labels, {"fused": np.arange(8.0), "patchknn": np.arange(8.0),
                                                  "recontrast": -np.arange(8.0)})
    assert chosen == "fused" and aurocs["recontrast"] == 0.0  # a tie keeps the fused map's score


@pytest.mark.parametrize("kind", ["patchknn", "fused"])
def test_every_kind_round_trips_through_its_bundle(synth_set, tmp_path, kind):
    m = read_mvtec(synth_set)
    model = ModelConfig(kind=kind, patchknn={"image_size": 64, "fraction": 0.3})
    res = fit_detector(m, model, SMALL, tmp_path / "out", progress=False)
    meta = json.loads((res.bundle_dir / "bundle.json").read_text())
    assert meta["model_kind"] == kind and res.kind == kind
    assert (meta["train_config"] is None) == (kind == "patchknn")
    det = load_detector(res.bundle_dir, "cpu")
    assert det.kind == kind and det.image_size == 64
    paths = [str(p) for p in m.select(split="test").image_paths()]
    a, b = det.predict(paths), load_detector(res.bundle_dir, "cpu").predict(paths)
    assert [r["score"] for r in a] == [r["score"] for r in b]
    assert all(0.0 <= r["normalized_score"] <= 1.0 for r in a)
    if kind == "patchknn":
        with pytest.raises(AttributeError):
            det.model  # no ReContrast network in a training-free bundle


def test_a_bundle_of_an_unknown_kind_is_one_line(synth_set, tmp_path):
    m = read_mvtec(synth_set)
    res = fit_detector(m, ModelConfig(kind="patchknn", patchknn={"image_size": 64}), SMALL, tmp_path / "o",
                       progress=False)
    meta_path = res.bundle_dir / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["model_kind"] = "bogus"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="bundle.json: unknown model kind 'bogus'"):
        load_detector(res.bundle_dir, "cpu")
    meta["model_kind"] = "patchknn"
    del meta["patchknn"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="invalid patchknn settings"):
        load_detector(res.bundle_dir, "cpu")


def test_auto_scores_every_candidate_on_the_validation_split_and_keeps_the_best(synth_set, tmp_path):
    m = read_mvtec(synth_set)
    auto = AutoConfig(backbones=("tf_efficientnet_lite0",), image_sizes=(64,), input_stats=("auto", "imagenet"))
    res = fit_detector(m, ModelConfig(kind="auto", auto=auto, patchknn={"image_size": 64}), SMALL, tmp_path / "o",
                       progress=False)
    sel = res.selection
    assert set(sel["candidates"]) == {"recontrast", "patchknn", "fused"}
    assert len(sel["grid"]) == 2 and all("image_auroc" in g for g in sel["grid"])
    from recontrast_core.selection import choose

    assert sel["chosen"] == choose(sel["candidates"], auto.tie) and res.kind == sel["chosen"]
    fis = sel["fused_image_score"]  # the fused candidate's image-score source, chosen on validation too
    assert fis["image_auroc"][fis["chosen"]] == max(fis["image_auroc"].values())
    assert sel["candidates"]["fused"]["image_auroc"] == fis["image_auroc"][fis["chosen"]]
    meta = json.loads((res.bundle_dir / "bundle.json").read_text())
    if res.kind == "fused":
        assert meta["fusion"]["image_score"] == fis["chosen"]
    assert meta["model_kind"] == sel["chosen"] and meta["selection"]["chosen"] == sel["chosen"]
    halves = split_test(m)
    if halves.rule == "hash half":  # ranked on the validation half only
        assert sel["validation"]["n_images"] == len(halves.validation)
        assert all(in_validation_half(e.path) for e in halves.validation.entries)
        assert not any(in_validation_half(e.path) for e in halves.report.entries)
    else:
        assert sel["validation"]["source"] == "synthetic"
    assert load_detector(res.bundle_dir, "cpu").predict([str(m.select(split="test").image_paths()[0])])


def test_choose_prefers_aupro_among_image_auroc_ties():
    from recontrast_core.selection import choose

    c = {"patchknn": {"image_auroc": 0.9263, "aupro": 0.758}, "fused": {"image_auroc": 0.9260, "aupro": 0.826},
         "recontrast": {"image_auroc": 0.8997, "aupro": 0.826}}
    assert choose(c) == "fused"  # tied on image AUROC (0.0003 apart): AUPRO decides
    assert choose(c, tie=0.0) == "patchknn"
    assert choose({**c, "fused": {"image_auroc": 0.90, "aupro": 0.9}}) == "patchknn"  # not tied: AUROC decides
    assert choose({"a": {"image_auroc": 0.9}, "b": {"image_auroc": 0.899}}) == "a"  # no AUPRO: AUROC


def test_the_train_step_ranks_on_the_test_splits_validation_half(synth_set, tmp_path):
    """The step hands fit_detector the whole manifest: auto ranks on the labelled validation
    half, not on synthesised anomalies (a step that kept only the training rows would)."""
    from recontrast_core.config import PipelineConfig
    from recontrast_core.steps.train import train as train_step

    m = read_mvtec(synth_set)
    assert split_test(m).rule == "hash half"
    settings = PipelineConfig(
        train=SMALL, tracking={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        model=ModelConfig(kind="auto", patchknn={"image_size": 64},
                          auto=AutoConfig(backbones=("tf_efficientnet_lite0",), image_sizes=(64,),
                                          input_stats=("auto",))))
    bundle = train_step(m, tmp_path / "out", settings, progress=False)
    sel = json.loads((bundle / "bundle.json").read_text())["selection"]
    assert sel["validation"]["rule"] == "hash half"
    assert sel["validation"]["n_images"] == len(split_test(m).validation)


def test_the_output_bundle_is_found_beside_the_kept_candidate(tmp_path):
    """A train output holds bundle/ and candidates/recontrast/ (auto): the steps, the model
    URIs and the KFP artifacts find bundle/, never the candidate."""
    from recontrast_core.steps.artifacts import find_bundle_dir

    for rel in ("bundle", "candidates/recontrast"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "bundle.json").write_text("{}")
    assert find_bundle_dir(tmp_path) == tmp_path / "bundle"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "bundle.json").write_text("{}")
    with pytest.raises(UserError, match="several model bundles"):
        find_bundle_dir(tmp_path)
