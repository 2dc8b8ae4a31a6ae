"""The exportable pieces of the scoring graph against the eager code they replace
(recontrast_core/export.py): blur padding by fixed indices, the float32 calibration map,
the float32 threshold. No data, no ONNX runtime: fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recontrast_core.calibration import Calibration, decide, normalise
from recontrast_core.scoring import CalibrationMap, GaussianBlur, symmetric_pad_index
from recontrast_core.scoring import float32_at_or_above as _float32_at_or_above
from recontrast_core.inference import _pad_symmetric, gaussian_blur


@pytest.mark.parametrize("n,r", [(8, 3), (16, 16), (5, 9), (1, 2), (64, 16)])
def test_pad_index_is_the_eager_padding(n: int, r: int) -> None:
    x = torch.arange(n, dtype=torch.float32).view(1, 1, 1, n)
    eager = _pad_symmetric(x, r, -1).flatten()
    assert torch.equal(x.flatten()[symmetric_pad_index(n, r)], eager)


@pytest.mark.parametrize("size,sigma", [(64, 4.0), (32, 4.0), (16, 4.0), (24, 1.5), (20, 0.0)])
def test_blur_module_equals_the_eager_blur(size: int, sigma: float) -> None:
    maps = torch.rand(3, size, size, generator=torch.Generator().manual_seed(size))
    eager = gaussian_blur(maps, sigma)
    ours = GaussianBlur(sigma, size)(maps)
    assert ours.shape == eager.shape
    assert torch.allclose(ours, eager, rtol=0, atol=1e-6), float((ours - eager).abs().max())


def test_float32_threshold_keeps_every_decision() -> None:
    rng = np.random.default_rng(0)
    for t in rng.normal(5.0, 1.0, 200):
        t32 = np.float32(_float32_at_or_above(float(t)))
        assert float(t32) >= t and float(np.nextafter(t32, np.float32(-np.inf))) < t
        near = np.array([np.nextafter(t32, np.float32(-np.inf)), t32, np.nextafter(t32, np.float32(np.inf))],
                        dtype=np.float32)
        assert np.array_equal(near >= t32, near.astype(np.float64) >= t)


def test_calibration_map_matches_normalise_and_decide() -> None:
    cal = Calibration(threshold=5.03, lo=4.9, hi=5.2, method="fpr", target_fpr=0.01, n_normal=3, n_anomalous=0)
    scores = np.concatenate([np.linspace(4.5, 5.6, 1001), [cal.threshold]]).astype(np.float32)
    norm, decision = CalibrationMap(cal)(torch.from_numpy(scores))
    norm, decision = norm.numpy(), decision.numpy()
    assert np.abs(norm - normalise(scores, cal)).max() < 1e-5
    assert np.array_equal(decision, decide(scores, cal))
    assert np.array_equal(norm >= 0.5, decision)
    assert norm.min() == 0.0 and norm.max() == 1.0
