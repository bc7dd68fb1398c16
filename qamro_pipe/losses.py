"""QAMRO, margin ranking and regression losses: pure tensor functions, batched over K.

Shapes: `pred` is [B] or [K, B] (K configurations trained at once); `target` is [B] (shared)
or [K, B]. alpha, beta and margin may be floats or [K] tensors. Results are a scalar for
[B] input and [K] otherwise. NaN targets are unknown labels: their rows are left out.

For pairs P = {(i, j): y_i != y_j}:
    L = 1/|P| sum_P q_ij * max(0, -sign(y_i - y_j) (p_i - p_j) + alpha |y_i - y_j| + m)
    q_ij = 1 + (beta - 1) max(ny_i, ny_j),  ny = labels normalised to [0, 1]
QAMRO is m = 0; the fixed-margin ranking loss L_MR is alpha = 0, beta = 1, m = margin.
Ordered pairs are used: each unordered pair appears twice with the same term, so the mean
equals the mean over unordered pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_member(x, k: int, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(-1)[:, None, None] \
        .expand(k, 1, 1)


def _as_batched(pred: torch.Tensor, target: torch.Tensor):
    squeeze = pred.dim() == 1
    pred = pred[None] if squeeze else pred  # [K, B]
    target = target.to(pred.dtype).expand_as(pred)  # [K, B]
    return pred, target, squeeze


def normalise_labels(target: torch.Tensor, known: torch.Tensor, norm: str = "batch",
                     label_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Labels to [0, 1]: by each row's min/max over known labels (published) or a fixed range.

    A row whose known labels are all equal gets 0 (it has no valid pair anyway)."""
    if norm == "range":
        if label_range is None:
            raise ValueError("norm='range' needs label_range=(lo, hi)")
        lo, hi = label_range
        return ((target - lo) / (hi - lo)).clamp(0, 1)
    if norm != "batch":
        raise ValueError(f"unknown norm {norm!r}")
    inf = torch.finfo(target.dtype).max
    lo = torch.where(known, target, inf).amin(-1, keepdim=True)
    hi = torch.where(known, target, -inf).amax(-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (target - lo) / span.clamp_min(1e-12), torch.zeros_like(target))


class _PairHinge(torch.autograd.Function):
    """sum_{y_i > y_j} q_i relu(a_i - u_j) / count per member, gradient in closed form.

    With u = alpha y - p and a = u + margin, a pair's term is symmetric in (i, j), so the mean
    over ordered pairs equals the mean over the pairs with y_i > y_j; on those the quality
    weight max(ny_i, ny_j) is ny_i (normalisation is monotone), a per-row factor q_i. So one
    broadcast subtraction gives every hinge argument, and with A = 1[hinge > 0] the gradient is
    dL/dp_a = (sum_i q_i A_ia - q_a sum_j A_aj) / count: a handful of [K, B, B] passes in all,
    none of autograd's temporaries."""

    @staticmethod
    def forward(ctx, pred, y, q, above, alpha, margin, count):
        # pred, y, q [K, B]; above [K, B, B] bool; alpha, margin, count [K, 1]
        u = torch.addcmul(-pred, alpha, y)  # [K, B]
        hinge = ((u + margin)[:, :, None] - u[:, None, :]).clamp_min_(0).mul_(above)
        qt = q[:, None, :]  # [K, 1, B]
        loss = torch.bmm(qt, hinge).sum((1, 2)) / count[:, 0]
        if ctx.needs_input_grad[0]:
            act = hinge.sign_()  # 0/1 (hinge >= 0)
            grad = (torch.bmm(qt, act)[:, 0] - q * act.sum(2)) / count  # [K, B]
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad):  # grad [K]
        (g,) = ctx.saved_tensors
        return grad[:, None] * g, None, None, None, None, None, None


def pairwise_ranking_loss(pred: torch.Tensor, target: torch.Tensor, alpha=0.0, beta=1.0,
                          margin=0.0, norm: str = "batch",
                          label_range: tuple[float, float] | None = None) -> torch.Tensor:
    """The general pair loss both QAMRO and L_MR are instances of (see module docstring)."""
    pred, target, squeeze = _as_batched(pred, target)
    k = pred.shape[0]
    with torch.no_grad():  # everything but the hinge depends on the labels alone
        known = torch.isfinite(target)  # [K, B]
        y = torch.where(known, target, torch.zeros_like(target))
        ny = normalise_labels(y, known, norm, label_range)  # [K, B]
        q = 1 + (_per_member(beta, k, pred)[:, :, 0] - 1) * ny
        yn = torch.where(known, target, torch.nan)  # unknown labels compare False
        above = yn[:, :, None] > yn[:, None, :]  # [K, B, B]: pairs with y_i > y_j
        count = above.sum((1, 2)).clamp_min(1).to(pred.dtype)[:, None]  # none -> 0 loss
    loss = _PairHinge.apply(pred, y, q, above, _per_member(alpha, k, pred)[:, :, 0],
                            _per_member(margin, k, pred)[:, :, 0], count)
    return loss[0] if squeeze else loss


def qamro_loss(pred: torch.Tensor, target: torch.Tensor, alpha=0.2, beta=7.0,
               norm: str = "batch", label_range: tuple[float, float] | None = None) -> torch.Tensor:
    """L_QAMRO (paper Eq. 2-3). beta=1 is the 'w/o quality-aware weighting' ablation."""
    return pairwise_ranking_loss(pred, target, alpha=alpha, beta=beta, margin=0.0, norm=norm,
                                 label_range=label_range)


def margin_ranking_loss(pred: torch.Tensor, target: torch.Tensor, margin=0.1) -> torch.Tensor:
    """L_MR (paper Eq. 1): a fixed margin, all pairs weighted equally."""
    return pairwise_ranking_loss(pred, target, alpha=0.0, beta=1.0, margin=margin)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber",
                    delta: float = 1.0) -> torch.Tensor:
    """Mean regression loss over known labels, per member: huber, mse or mse+mae."""
    pred, target, squeeze = _as_batched(pred, target)
    known = torch.isfinite(target)
    y = torch.where(known, target, pred.detach())
    if kind == "huber":
        per = F.huber_loss(pred, y, reduction="none", delta=delta)
    elif kind == "mse":
        per = (pred - y) ** 2
    elif kind == "mse+mae":
        per = (pred - y) ** 2 + (pred - y).abs()
    else:
        raise ValueError(f"unknown regression loss {kind!r}")
    per = torch.where(known, per, torch.zeros_like(per))
    loss = per.sum(-1) / known.sum(-1).clamp_min(1).to(pred.dtype)
    return loss[0] if squeeze else loss
