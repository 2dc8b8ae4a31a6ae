"""Few-shot sampler and anomaly synthesiser."""

from __future__ import annotations

import pytest
import torch

from recontrast_core.adapt import sample_shots
from recontrast_core.adapt.synth import SYNTHESISERS, synthesize, synthesize_batch
from recontrast_core.data.manifest import Manifest, ManifestEntry
from recontrast_core.errors import UserError


def _manifest() -> Manifest:
    rows = []
    for i in range(5):  # test rows first, with normal labels: the sampler must skip them
        rows.append(ManifestEntry(f"test/good/{i:03d}.png", 0, "good", None, "test"))
        rows.append(ManifestEntry(f"test/crack/{i:03d}.png", 1, "crack", None, "test"))
    rows += [ManifestEntry(f"train/good/{i:03d}.png", 0, "good", None, "train") for i in range(12)]
    rows.append(ManifestEntry("train/odd/000.png", 1, "odd", None, "train"))  # anomalous train row
    return Manifest(root="/data", entries=rows)


def test_sampler_is_deterministic_and_only_draws_normal_train_rows() -> None:
    m = _manifest()
    for seed in range(6):
        for k in (1, 4, 12):
            shots = sample_shots(m, k, seed)
            assert len(shots) == k and len({e.path for e in shots.entries}) == k
            assert all(e.split == "train" and e.label == 0 for e in shots.entries)
            again = sample_shots(m, k, seed)
            assert [e.path for e in again.entries] == [e.path for e in shots.entries]
            # independent of the manifest's row order
            shuffled = m.subset(reversed(m.entries))
            assert {e.path for e in sample_shots(shuffled, k, seed).entries} == {e.path for e in shots.entries}
    # seeds give different draws, and a larger k extends a smaller one (nested)
    picks = {tuple(e.path for e in sample_shots(m, 4, s).entries) for s in range(6)}
    assert len(picks) > 1
    small, big = sample_shots(m, 2, 3), sample_shots(m, 8, 3)
    assert {e.path for e in small.entries} <= {e.path for e in big.entries}


def test_sampler_matches_pipeline_selection() -> None:
    from recontrast_core.steps.artifacts import select_shots

    m = _manifest()
    want = {e.path for e in select_shots(m, 5).entries if e.split == "train"}
    assert {e.path for e in sample_shots(m, 5, 0).entries} == want


@pytest.mark.parametrize("k", [13, 100])
def test_sampler_k_too_large_is_a_user_error(k: int) -> None:
    with pytest.raises(UserError, match=f"shots={k} but .* only 12 normal training images"):
        sample_shots(_manifest(), k, 0)


@pytest.mark.parametrize("k", [0, -1])
def test_sampler_rejects_non_positive_k(k: int) -> None:
    with pytest.raises(UserError, match="positive"):
        sample_shots(_manifest(), k, 0)


def _images(gray: bool, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if gray:
        x = torch.randint(0, 256, (1, 40, 48), generator=g, dtype=torch.uint8).expand(3, -1, -1).clone()
    else:
        x = torch.randint(0, 256, (3, 40, 48), generator=g, dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.float() / 255.0


@pytest.mark.parametrize("kind", sorted(SYNTHESISERS))
@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_synthesiser_changes_only_its_region(kind: str, gray: bool, dtype: torch.dtype) -> None:
    changed_any = 0
    for seed in range(25):
        img = _images(gray, dtype, seed)
        before = img.clone()
        out, region = SYNTHESISERS[kind](img, torch.Generator().manual_seed(seed))
        assert torch.equal(img, before), "the input must not be modified"
        assert out.shape == img.shape and out.dtype == img.dtype
        assert region.shape == img.shape[1:] and region.dtype == torch.bool
        assert region.any(), "the region is never empty"
        assert torch.equal(out[:, ~region], img[:, ~region]), "pixels outside the region changed"
        changed = (out != img).any(dim=0)
        assert not (changed & ~region).any()
        changed_any += int(changed.any())
        if gray:
            assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]), "gray stays gray"
    assert changed_any >= 20, f"{kind} rarely changes anything ({changed_any}/25)"


def test_synthesize_draws_kinds_and_is_seeded() -> None:
    img = _images(False, torch.uint8, 0)
    kinds = {synthesize(img, torch.Generator().manual_seed(s))[2] for s in range(30)}
    assert kinds == set(SYNTHESISERS)
    a = synthesize_batch(img[None].repeat(3, 1, 1, 1), torch.Generator().manual_seed(7))
    b = synthesize_batch(img[None].repeat(3, 1, 1, 1), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown anomaly kinds"):
        synthesize(img, torch.Generator(), kinds=("lasers",))
