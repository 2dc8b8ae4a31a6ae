"""Adaptation math against hand computations and brute-force numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recontrast_core.adapt import GaussianModel, KNNScorer, MahalanobisScorer, coft_loss, knn_scores
from recontrast_core.adapt.msc import angular_term, compute_center, mean_shift, msc_loss, nt_xent


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _nt_xent_numpy(a: np.ndarray, b: np.ndarray, t: float) -> float:
    """SimCLR NT-Xent written out as loops: 2B anchors, positive = the other view."""
    out = _unit(np.concatenate([a, b]))
    n = a.shape[0]
    losses = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = math.exp(out[i] @ out[pos] / t)
        den = sum(math.exp(out[i] @ out[j] / t) for j in range(2 * n) if j != i)
        losses.append(-math.log(num / den))
    return float(np.mean(losses))


def test_msc_loss_hand_computed_two_pairs() -> None:
    # Two images, 2-D embeddings, center 0: view pairs are identical and orthogonal to the
    # other image. Every anchor: positive cos 1, two negatives cos 0 ->
    # -log(e^4 / (e^4 + 2)) = log(1 + 2 e^-4) = 0.0359763...
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = msc_loss(z, z.clone(), torch.zeros(2), temperature=0.25)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-4)), abs=1e-6)
    assert loss.item() == pytest.approx(0.0359763, abs=1e-6)


def test_msc_loss_shifts_by_center_like_numpy() -> None:
    rng = np.random.default_rng(0)
    z1 = _unit(rng.normal(size=(2, 2)))
    z2 = _unit(rng.normal(size=(2, 2)))
    c = np.array([0.3, -0.2])
    want = _nt_xent_numpy(z1 - c, z2 - c, 0.25)  # normalise(z - c) happens inside
    got = msc_loss(torch.tensor(z1), torch.tensor(z2), torch.tensor(c), temperature=0.25)
    assert got.item() == pytest.approx(want, abs=1e-9)
    # the shift matters: without it the value differs
    assert nt_xent(torch.tensor(z1), torch.tensor(z2), 0.25).item() != pytest.approx(want, abs=1e-3)
    # angular center term: mean ||z - c||^2 of each view, added with its weight
    ang = ((z1 - c) ** 2).sum(1).mean() + ((z2 - c) ** 2).sum(1).mean()
    got_ang = msc_loss(torch.tensor(z1), torch.tensor(z2), torch.tensor(c), 0.25, angular_weight=0.5)
    assert got_ang.item() == pytest.approx(want + 0.5 * ang, abs=1e-9)
    assert angular_term(torch.tensor(z1), torch.tensor(z2), torch.tensor(c)).item() == pytest.approx(ang)


def test_nt_xent_larger_batch_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    assert nt_xent(torch.tensor(a), torch.tensor(b), 0.25).item() == pytest.approx(_nt_xent_numpy(a, b, 0.25), abs=1e-9)


def test_center_and_mean_shift() -> None:
    rng = np.random.default_rng(2)
    f = rng.normal(size=(6, 4)) * rng.uniform(0.5, 3, size=(6, 1))  # unnormalised features
    center = compute_center(torch.tensor(f))
    np.testing.assert_allclose(center.numpy(), _unit(f).mean(0), atol=1e-6)  # float32
    shifted = mean_shift(torch.tensor(f), center).numpy()
    np.testing.assert_allclose(shifted, _unit(_unit(f) - _unit(f).mean(0)), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(shifted, axis=1), 1.0, atol=1e-6)
    # the normalised features minus the center have zero mean over the set
    np.testing.assert_allclose((_unit(f) - center.numpy()).mean(0), 0.0, atol=1e-6)


def _knn_numpy(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for q in queries:
        d2 = sorted(float(((q - b) ** 2).sum()) for b in bank)
        out.append(np.mean(d2[: min(k, len(bank))]))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_knn_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(3)
    bank, queries = _unit(rng.normal(size=(40, 8))), _unit(rng.normal(size=(23, 8)))
    got = knn_scores(torch.tensor(bank), torch.tensor(queries), k=k, batch_size=7).numpy()
    np.testing.assert_allclose(got, _knn_numpy(bank, queries, k), atol=1e-5)


def test_knn_caps_k_and_scorer_normalises() -> None:
    rng = np.random.default_rng(4)
    bank, queries = rng.normal(size=(2, 5)), rng.normal(size=(4, 5))
    np.testing.assert_allclose(knn_scores(torch.tensor(bank), torch.tensor(queries), k=5).numpy(),
                               _knn_numpy(bank, queries, 2), atol=1e-5)
    scorer = KNNScorer(embedder=None, k=2).fit_features(torch.tensor(bank * 7.0))
    np.testing.assert_allclose(scorer.score_features(torch.tensor(queries * 3.0)),
                               _knn_numpy(_unit(bank), _unit(queries), 2), atol=1e-5)
    with pytest.raises(ValueError):
        knn_scores(torch.empty(0, 5), torch.tensor(queries))


def test_mahalanobis_matches_brute_force() -> None:
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(5)
    train = _unit(rng.normal(size=(12, 20)))  # fewer samples than dimensions: shrinkage needed
    test = _unit(rng.normal(size=(9, 20)))
    lw = LedoitWolf().fit(train)
    inv = np.linalg.inv(lw.covariance_)
    mu = train.mean(0)
    want = np.array([(x - mu) @ inv @ (x - mu) for x in test])
    got = GaussianModel().fit(train).score(test)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the scorer L2-normalises embeddings before fitting and scoring
    scorer = MahalanobisScorer(embedder=None).fit_features(torch.tensor(train * 4.0))
    np.testing.assert_allclose(scorer.score_features(torch.tensor(test * 0.5)), want, rtol=1e-5)
    assert 0 < scorer.gaussian.shrinkage <= 1


def test_coft_loss_matches_numpy() -> None:
    rng = np.random.default_rng(6)
    normals, anomalies = _unit(rng.normal(size=(4, 6))), _unit(rng.normal(size=(3, 6)))
    t, lpp, lnp, margin = 0.2, 0.7, 1.3, 0.1
    allv = np.concatenate([normals, anomalies])
    con = []
    for i in range(4):
        den = sum(math.exp(normals[i] @ allv[j] / t) for j in range(7) if j != i)
        con.append(np.mean([-math.log(math.exp(normals[i] @ normals[p] / t) / den) for p in range(4) if p != i]))
    pp = np.mean([1 - normals[i] @ normals[j] for i in range(4) for j in range(4) if i != j])
    npair = np.mean([max(0.0, normals[i] @ anomalies[a] - margin) for i in range(4) for a in range(3)])
    want = np.mean(con) + lpp * pp + lnp * npair
    loss, parts = coft_loss(torch.tensor(normals), torch.tensor(anomalies), t, lpp, lnp, margin)
    assert loss.item() == pytest.approx(want, abs=1e-9)
    assert parts["pp"] == pytest.approx(pp) and parts["np"] == pytest.approx(npair)


def test_coft_loss_gradient_pulls_normals_together_and_pushes_anomalies() -> None:
    normals = torch.tensor([[1.0, 0.2, 0.0], [0.9, -0.3, 0.1]], requires_grad=True)
    anomaly = torch.tensor([[0.8, 0.0, 0.6]], requires_grad=True)
    loss, _ = coft_loss(normals, anomaly, lambda_pp=1.0, lambda_np=1.0)
    loss.backward()
    with torch.no_grad():
        step = 0.05
        n2 = normals - step * normals.grad
        a2 = anomaly - step * anomaly.grad
        cos = torch.nn.functional.cosine_similarity
        assert cos(n2[0:1], n2[1:2]) > cos(normals[0:1], normals[1:2])
        assert cos(n2[0:1], a2) < cos(normals[0:1], anomaly)
