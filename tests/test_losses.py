import pytest
import torch

from qamro_pipe.train.losses import (margin_ranking_loss, normalise_labels, pairwise_ranking_loss,
                               qamro_loss, regression_loss)
from qamro_pipe.train.losses_reference import qamro_loss_literal


def _batch(seed, b=24, ties=True):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, generator=g, dtype=torch.float64)
    # MOS-like labels on a 0.2 grid: many exact ties
    target = (torch.randint(5, 26, (b,), generator=g) / 5).double() if ties else \
        torch.rand(b, generator=g, dtype=torch.float64) * 4 + 1
    return pred, target


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha,beta", [(0.2, 7.0), (0.5, 1.0), (0.0, 3.0)])
def test_qamro_matches_literal_value_and_gradient(seed, alpha, beta):
    pred, target = _batch(seed)
    assert len(set(target.tolist())) < len(target)  # the batch has ties
    p1 = pred.clone().requires_grad_()
    p2 = pred.clone().requires_grad_()
    fast = qamro_loss(p1, target, alpha=alpha, beta=beta)
    slow = qamro_loss_literal(p2, target, alpha=alpha, beta=beta)
    fast.backward()
    slow.backward()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_margin_ranking_matches_literal(seed):
    pred, target = _batch(seed)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    fast = margin_ranking_loss(p1, target, margin=0.3)
    slow = qamro_loss_literal(p2, target, alpha=0.0, beta=1.0, margin=0.3)
    fast.backward()
    slow.backward()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-10, atol=1e-12)


def test_batched_members_equal_separate_calls():
    k, b = 5, 30
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(k, b, generator=g, dtype=torch.float64)
    target = (torch.randint(5, 26, (k, b), generator=g) / 5).double()
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.2], dtype=torch.float64)
    beta = torch.tensor([1.0, 7.0, 3.0, 5.0, 11.0], dtype=torch.float64)
    out = qamro_loss(pred, target, alpha=alpha, beta=beta)
    assert out.shape == (k,)
    for i in range(k):
        assert out[i].item() == pytest.approx(
            qamro_loss(pred[i], target[i], alpha=alpha[i].item(), beta=beta[i].item()).item())
    shared = qamro_loss(pred, target[0], alpha=0.2, beta=7.0)  # one target row for all
    for i in range(k):
        assert shared[i].item() == pytest.approx(qamro_loss(pred[i], target[0]).item())


def test_no_valid_pair_gives_zero_and_finite_gradient():
    pred = torch.randn(8, requires_grad=True)
    target = torch.full((8,), 3.0)
    loss = qamro_loss(pred, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(pred.grad).all()
    lone = torch.randn(1, requires_grad=True)
    qamro_loss(lone, torch.tensor([2.0])).backward()
    assert torch.isfinite(lone.grad).all()


def test_unknown_labels_are_left_out():
    pred, target = _batch(1)
    with_nan = torch.cat([target, torch.tensor([float("nan")] * 3, dtype=torch.float64)])
    pred_ext = torch.cat([pred, torch.tensor([9.0, -9.0, 0.0], dtype=torch.float64)])
    assert qamro_loss(pred_ext, with_nan).item() == pytest.approx(qamro_loss(pred, target).item())
    assert regression_loss(pred_ext, with_nan).item() == pytest.approx(
        regression_loss(pred, target).item())


def test_ordered_pair_mean_equals_unordered_and_loss_orders():
    # a perfectly ordered prediction with gaps larger than the margin costs nothing
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert qamro_loss(target * 2, target).item() == 0.0
    assert qamro_loss(-target, target).item() > 0


def test_range_normalisation():
    target = torch.tensor([[1.0, 3.0, 5.0]])
    known = torch.ones_like(target, dtype=torch.bool)
    assert torch.allclose(normalise_labels(target, known, "range", (1, 5)),
                          torch.tensor([[0.0, 0.5, 1.0]]))
    # batch normalisation of a batch spanning [2, 4] differs from the dataset range
    t2 = torch.tensor([2.0, 3.0, 4.0])
    p = torch.zeros(3)
    assert pairwise_ranking_loss(p, t2, 0.2, 7.0, norm="batch").item() != pytest.approx(
        pairwise_ranking_loss(p, t2, 0.2, 7.0, norm="range", label_range=(1, 5)).item())


def test_label_terms_count_pairs_and_keep_unknown_labels_out():
    from qamro_pipe.train.losses import label_terms

    g = torch.Generator().manual_seed(3)
    y = (torch.randint(5, 26, (4, 7, 32), generator=g) / 5).float()
    y[0, 0, :5] = float("nan")
    y[1, 2, :] = float("nan")  # nothing known: no pair, no known label
    y[2, 3, 4] = float("inf")  # not finite counts as unknown
    t = label_terms(y, beta=3.0)
    known = torch.isfinite(y)
    brute = ((y[..., :, None] > y[..., None, :]) & known[..., :, None]
             & known[..., None, :]).sum((-1, -2))
    assert torch.equal(t.n_pairs[..., 0], brute.clamp_min(1).float())
    n_known = known.sum(-1, keepdim=True).clamp_min(1).float()
    assert torch.allclose(t.w_reg, known / n_known) and (t.w_reg[~known] == 0).all()
    assert torch.isnan(t.yn[~known]).all()
    # chunk-wise terms are those of each chunk on its own: the batch dims are independent
    one = label_terms(y[2, 3], beta=3.0)
    for a, b in zip(t.select((2, 3)), one):
        assert torch.allclose(a, b, equal_nan=True)


def test_padding_with_unknown_labels_changes_nothing():
    pred, target = _batch(9, b=20)
    p1, p2 = pred.clone().requires_grad_(), torch.cat([pred, torch.randn(6).double()])
    p2.requires_grad_()
    padded = torch.cat([target, torch.full((6,), float("nan"), dtype=target.dtype)])
    a, b = qamro_loss(p1, target), qamro_loss(p2, padded)
    (a + regression_loss(p1, target)).backward()
    (b + regression_loss(p2, padded)).backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert torch.allclose(p1.grad, p2.grad[:20], rtol=1e-12) and (p2.grad[20:] == 0).all()
