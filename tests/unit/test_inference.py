"""Anomaly maps, the on-device Gaussian blur (vs scipy), image scores."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from recontrast_core.config import InferenceConfig
from recontrast_core.inference import anomaly_map, gaussian_blur, image_scores


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma):
    rng = np.random.default_rng(0)
    maps = rng.random((2, 64, 48)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    want = np.stack([gaussian_filter(m, sigma=sigma, mode="reflect") for m in maps])
    assert np.allclose(got, want, atol=1e-5)  # borders included: same 'reflect' convention


def test_gaussian_blur_on_maps_smaller_than_the_kernel():
    maps = torch.rand(1, 8, 8)
    out = gaussian_blur(maps, 4.0)
    assert out.shape == maps.shape and torch.isfinite(out).all()


def test_anomaly_map_sums_six_pairs_and_upsamples():
    a = [torch.ones(1, 4, 8, 8), torch.ones(1, 4, 4, 4), torch.ones(1, 4, 2, 2)]
    neg = [-t for t in a]
    # identical pairs give 0; opposite vectors give distance 2 per pair
    assert torch.allclose(anomaly_map(a, a, a, a, (32, 32)), torch.zeros(1, 32, 32))
    m = anomaly_map(a, a, neg, neg, (32, 32))
    assert m.shape == (1, 32, 32) and torch.allclose(m, torch.full((1, 32, 32), 12.0))


def test_image_scores_max_and_topk():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, :3] = torch.tensor([5.0, 3.0, 1.0])
    assert image_scores(maps, InferenceConfig(score="max")).tolist() == [5.0, 0.0]
    top = image_scores(maps, InferenceConfig(score="topk_mean", topk_fraction=0.02)).tolist()
    assert top == [4.0, 0.0]


def test_threads_follow_the_cgroup_quota(tmp_path, monkeypatch):
    import torch

    from recontrast_core.runtime import configure_threads, cpu_quota, default_threads

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert cpu_quota(v2) == 1.5 and default_threads(v2) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("400000")
    (v1 / "cpu.cfs_period_us").write_text("100000")
    assert cpu_quota(tmp_path / "v1") == 4.0
    (v1 / "cpu.cfs_quota_us").write_text("-1")
    assert cpu_quota(tmp_path / "v1") is None
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("RECONTRAST_NUM_THREADS", raising=False)
        (v2 / "cpu.max").write_text("100000 100000\n")
        assert configure_threads(v2) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # set explicitly: the user's choice wins
        assert configure_threads(v2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
