"""The training-free baseline: nearest neighbours against brute force, subsampling rules,
and a real-image check that it separates defects from normals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recontrast_core.config import BaselineConfig
from recontrast_core.baseline import (
    PatchBaseline,
    greedy_coreset,
    nearest_distances,
    random_subsample,
)
from recontrast_core.config import BackboneConfig
from recontrast_core.models.backbones import create_encoder


def test_nearest_distances_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 17, generator=g), torch.randn(1000, 17, generator=g)
    brute = torch.stack([(bank - q).norm(dim=1).min() for q in queries])
    got = nearest_distances(bank, queries, chunk=97)  # several uneven chunks
    assert torch.allclose(got, brute, atol=1e-4)
    # a query that is in the bank has distance 0 (clamped, never NaN)
    assert nearest_distances(bank, bank[:5]).abs().max() < 1e-3


def test_random_subsample_is_seeded_and_sized():
    a, b = random_subsample(1000, 0.1, seed=3), random_subsample(1000, 0.1, seed=3)
    assert torch.equal(a, b) and len(a) == 100 and len(set(a.tolist())) == 100
    assert not torch.equal(a, random_subsample(1000, 0.1, seed=4))
    assert len(random_subsample(5, 0.01)) == 1


def test_greedy_coreset_covers_better_than_random():
    g = torch.Generator().manual_seed(1)
    # two tight clusters, one tiny: k-center must pick from both; coverage radius is smaller
    x = torch.cat([torch.randn(990, 8, generator=g) * 0.1, torch.randn(10, 8, generator=g) * 0.1 + 5])
    idx = greedy_coreset(x, 0.01, seed=0, projection_dim=0)
    assert len(idx) == 10 and (idx >= 990).any()
    cover = nearest_distances(x[idx], x).max()
    rand = nearest_distances(x[random_subsample(1000, 0.01, seed=0)], x).max()
    assert cover < rand


def test_baseline_maps_scores_and_bank(tiny_tile):
    from recontrast_core.data.cache import load_resized
    from recontrast_core.data.layouts import read_dataset

    torch.manual_seed(0)
    m = read_dataset(tiny_tile)
    enc = create_encoder(BackboneConfig())
    train = load_resized(m.select(split="train", label=0), 64)
    test = load_resized(m.select(split="test"), 64, with_masks=True)
    base = PatchBaseline(enc, BaselineConfig(fraction=0.5)).fit(train.images)
    # bank = half of (images x 8 x 8) stride-8 patches of 240 + 672 channels
    assert base.n_train_patches == train.images.shape[0] * 64
    assert tuple(base.bank.shape) == (base.n_train_patches // 2, 240 + 672)
    maps, scores = base.score(test.images)
    assert maps.shape == (len(test.labels), 64, 64) and np.allclose(scores, maps.reshape(len(scores), -1).max(1))
    # a training image scores ~0 where its own patches are in the bank (fraction 1)
    full = PatchBaseline(enc, BaselineConfig(fraction=1.0, gaussian_sigma=0)).fit(train.images)
    _, own = full.score(train.images[:2])
    assert own.max() < 1e-2
    with pytest.raises(RuntimeError):
        PatchBaseline(enc).score(test.images)
