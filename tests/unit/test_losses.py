"""The hard-mined global cosine loss: value, gradient mask, alpha ramp."""

import pytest
import torch
import torch.nn.functional as F

from recontrast_core.losses import alpha_at, global_cosine_hm, hard_mining_weight, recontrast_loss


def _plain_gcos(target, pred):
    return (1 - F.cosine_similarity(target.flatten(1), pred.flatten(1), dim=1)).mean()


@pytest.mark.parametrize("alpha", [-3.0, 0.0, 1.0])
def test_mining_mask_zeroes_exactly_the_easy_pixels(alpha):
    torch.manual_seed(0)
    target = torch.randn(3, 5, 6, 7)
    pred = torch.randn(3, 5, 6, 7, requires_grad=True)
    global_cosine_hm([target], [pred], alpha).backward()
    mined = pred.grad.clone()

    pred2 = pred.detach().clone().requires_grad_(True)
    _plain_gcos(target, pred2).backward()
    d = 1 - F.cosine_similarity(target, pred2.detach(), dim=1)
    hard = (d >= d.mean() + alpha * d.flatten().std()).unsqueeze(1)  # [B,1,H,W]
    expected = pred2.grad * hard
    assert torch.allclose(mined, expected, atol=1e-7)
    easy = ~hard.expand_as(mined)
    assert torch.all(mined[easy] == 0)
    if alpha > -3:
        assert easy.any(), "the test must exercise some masked pixels"
    assert (mined[~easy] != 0).any()


def test_forward_value_is_the_plain_global_cosine_sum():
    torch.manual_seed(1)
    targets = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    preds = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    got = global_cosine_hm(targets, preds, alpha=1.0)
    want = sum(_plain_gcos(t, p) for t, p in zip(targets, preds))
    assert torch.allclose(got, want, atol=1e-6)


def test_targets_receive_no_gradient():
    target = torch.randn(2, 3, 4, 4, requires_grad=True)
    pred = torch.randn(2, 3, 4, 4, requires_grad=True)
    global_cosine_hm([target], [pred], alpha=-3.0).backward()
    assert target.grad is None and pred.grad is not None


def test_recontrast_loss_pairs_frozen_with_head1_and_trainable_with_head2():
    torch.manual_seed(2)
    frozen, feats = [torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 4, 4)]
    head1, head2 = [frozen[0].clone()], [feats[0].clone()]  # perfect reconstructions
    assert recontrast_loss(frozen, feats, head1, head2, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    swapped = recontrast_loss(frozen, feats, head2, head1, 1.0).item()
    assert swapped > 0.1


def test_factor_keeps_a_fraction_of_easy_gradients():
    target, pred = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    w = hard_mining_weight(target, pred, alpha=0.0, factor=0.25)
    assert set(torch.unique(w).tolist()) <= {0.25, 1.0}


def test_alpha_ramps_from_minus_three_to_one_over_first_ten_percent():
    assert alpha_at(0, 2000) == -3.0
    assert alpha_at(100, 2000) == pytest.approx(-1.0)
    assert alpha_at(200, 2000) == pytest.approx(1.0)
    assert alpha_at(1500, 2000) == 1.0
