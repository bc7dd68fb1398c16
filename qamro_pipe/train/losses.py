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

The published track 2 code weighs pairs differently (`interval_weights`): q_ij = 1 + (beta - 1)
max(w(y_i), w(y_j)) with w a per-axis table over MOS intervals that is not monotone in the
label, and pairs with a label outside [1, 10] left out. That needs the whole pair-weight
matrix (`_PairHingeMatrix`); Eq. 3 keeps its per-row fast path (`_PairHinge`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The published track 2 quality weight (github.com/JethroWangSir/QAMRO, track2/loss.py,
# preference_aware_pamr_loss): per axis, a hand-set value for each MOS interval [1, 2), [2, 3),
# ..., [8, 9), [9, 10], here in that order, scaled to [0, 1] by the table's min and max there.
INTERVAL_TABLES = {
    "PQ": (0.0, 0.0, 4.5, 6.5, 7.5, 9.5, 8.5, 5.5, 0.0),
    "PC": (8.5, 6.5, 9.5, 7.5, 4.5, 5.5, 3.5, 0.0, 0.0),
    "CE": (0.0, 4.5, 7.5, 6.5, 8.5, 9.5, 5.5, 0.0, 0.0),
    "CU": (0.0, 0.0, 5.5, 6.5, 7.5, 9.5, 8.5, 4.5, 0.0),
}
INTERVAL_SCALE = (1.0, 10.0)  # the intervals' span; a label outside it is in no pair


def interval_table(axis: str) -> torch.Tensor:
    """An axis's table scaled to [0, 1] as the published code scales it: [9] float64."""
    if axis not in INTERVAL_TABLES:
        raise ValueError(f"no published interval table for label {axis!r} (the tables are "
                         f"for {', '.join(INTERVAL_TABLES)})")
    v = torch.tensor(INTERVAL_TABLES[axis], dtype=torch.float64)
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else v


def interval_weights(y: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [..., B] and tables [..., 9] (one per leading row, or one for all) -> (each
    label's table value w [..., B], whether it takes part in pairs [..., B]: lies in
    [1, 10]). A row whose table is all NaN has no table: w = 0 and every label takes part
    (L_MR and regression-only members of a run whose QAMRO members use the tables)."""
    lo, hi = INTERVAL_SCALE
    n = table.shape[-1]
    free = torch.isnan(table).all(-1, keepdim=True)  # [..., 1]
    inside = ((y >= lo) & (y <= hi)) | free
    idx = (y.clamp(lo, hi).floor() - lo).clamp(max=n - 1).long()  # 10 belongs to [9, 10]
    table = table.to(y.dtype).nan_to_num(0.0).expand(*y.shape[:-1], n)
    return torch.gather(table, -1, idx), inside


def _per_member(x, k: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a [K] (or [1]) tensor -> [K] on like's device and dtype."""
    return torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(-1).expand(k)


def as_batched(pred: torch.Tensor, target: torch.Tensor):
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


class LabelTerms(NamedTuple):
    """Everything both loss terms need from a batch of labels [..., B] alone. Training
    computes it once per epoch for all of that epoch's steps ([steps, K, B]) and once for the
    fixed validation chunks, so a step runs only the parts that depend on the predictions.
    The means' denominators are folded into the weights, so a step never divides."""

    y: torch.Tensor  # [..., B] labels, 0 where unknown
    yn: torch.Tensor  # [..., B] labels, NaN where unknown (NaN compares False: no pair)
    q: torch.Tensor  # [..., B] quality weight of a pair whose better clip is this one,
    # divided by the number of pairs
    y_reg: torch.Tensor  # [..., B] the regression target ((y - mean) / std), 0 where unknown
    w_reg: torch.Tensor  # [..., B] 1 / (known labels) where the label is known, else 0
    n_pairs: torch.Tensor  # [..., 1] pairs with y_i > y_j, at least 1 (none: loss 0)
    w: torch.Tensor | None = None  # [..., B] interval-table weight of each label (then q is
    # 1 / n_pairs and the pair weight is q (1 + (beta - 1) max(w_i, w_j))); None: Eq. 3

    def select(self, index) -> "LabelTerms":
        """The same index (e.g. a step number) applied to every field's leading dims."""
        return LabelTerms(*(None if t is None else t[index] for t in self))


def _per_batch(x, like: torch.Tensor) -> torch.Tensor:
    """A float or a per-batch tensor [...] -> a tensor broadcasting against [..., B]."""
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)[..., None]


def published_labels(y: torch.Tensor, mean=0.0, std=1.0) -> torch.Tensor:
    """Labels as the published track 2 code hands them to its loss (mos_track2.py): in
    float32, standardised by (mean, std + 1e-9), then de-standardised by (mean, std), every
    step rounded. A label on an interval's edge can come back just below it (5.0 as
    4.9999995, in [4, 5)); a 1.0, below 1, then takes part in no pair."""
    y32 = y.to(torch.float32)
    m, s = _per_batch(mean, y32), _per_batch(std, y32)
    return ((y32 - m) / (s + 1e-9) * s + m).to(y.dtype)


def label_terms(target: torch.Tensor, beta=1.0, norm: str = "batch",
                label_range: tuple[float, float] | None = None, mean=0.0,
                std=1.0, table: torch.Tensor | None = None) -> LabelTerms:
    """Labels [..., B] (NaN = unknown) -> LabelTerms. beta, mean and std are floats or
    tensors of the leading shape (per member). `table` ([..., 9], `interval_table`) gives the
    published track 2 quality weight instead of Eq. 3's, looked up as that code looks it up,
    on `published_labels`; labels outside [1, 10] then take part in no pair (they still
    count in the regression term)."""
    with torch.no_grad():
        known = torch.isfinite(target)
        y = torch.where(known, target, 0.0)
        if table is None:
            paired, w = known, None
            q = 1 + (_per_batch(beta, y) - 1) * normalise_labels(y, known, norm, label_range)
        else:
            w, inside = interval_weights(published_labels(y, mean, std), table)
            paired, q = known & inside, torch.ones_like(y)
        # pairs with y_i > y_j, counted without the [B, B] matrix: for each paired label,
        # how many labels sort strictly below it (unpaired ones sort above everything)
        ranked = torch.where(paired, target, math.inf).sort(-1).values
        below = torch.searchsorted(ranked, y, side="left")
        n_pairs = (below * paired).sum(-1, keepdim=True).clamp_min(1).to(y.dtype)
        y_reg = torch.where(known, (target - _per_batch(mean, y)) / _per_batch(std, y), 0.0)
        n_known = known.sum(-1, keepdim=True).clamp_min(1).to(y.dtype)
        return LabelTerms(y, torch.where(paired, target, math.nan), q / n_pairs, y_reg,
                          known / n_known, n_pairs, w)


class _PairHinge(torch.autograd.Function):
    """sum_{y_i > y_j} q_i relu(a_i - u_j) per member (q already divided by the pair count),
    gradient in closed form.

    With u = alpha y - p and a = u + margin, a pair's term is symmetric in (i, j), so the mean
    over ordered pairs equals the mean over the pairs with y_i > y_j; on those the quality
    weight max(ny_i, ny_j) is ny_i (normalisation is monotone), a per-row factor q_i. So one
    broadcast subtraction gives every hinge argument, and with A = 1[hinge > 0] the gradient is
    dL/dp_a = sum_i q_i A_ia - q_a sum_j A_aj: a handful of [K, B, B] passes in all, none of
    autograd's temporaries."""

    @staticmethod
    def forward(ctx, pred, y, yn, q, alpha, margin):
        # pred, y, yn, q [K, B]; alpha, margin [K, 1]
        u = torch.addcmul(-pred, alpha, y)  # [K, B]
        above = yn[:, :, None] > yn[:, None, :]  # [K, B, B]: the pairs with y_i > y_j
        hinge = ((u + margin)[:, :, None] - u[:, None, :]).clamp_min_(0).mul_(above)
        qt = q[:, None, :]  # [K, 1, B]
        loss = torch.bmm(qt, hinge).sum((1, 2))
        if ctx.needs_input_grad[0]:
            act = hinge.sign_()  # 0/1 (hinge >= 0)
            grad = torch.bmm(qt, act)[:, 0] - q * act.sum(2)  # [K, B]
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad):  # grad [K]
        (g,) = ctx.saved_tensors
        return grad[:, None] * g, None, None, None, None, None


class _PairHingeMatrix(torch.autograd.Function):
    """sum_{y_i > y_j} W_ij relu(a_i - u_j) per member, for a pair weight that is no per-row
    factor: W_ij = q_i (1 + (beta - 1) max(w_i, w_j)) (q_i: the weight over the pair count,
    the same in a row). With A = 1[hinge > 0], dL/dp_a = sum_i W_ia A_ia - sum_j W_aj A_aj:
    the column sums of W A minus its row sums."""

    @staticmethod
    def forward(ctx, pred, y, yn, q, w, alpha, margin, beta):
        # pred, y, yn, q, w [K, B]; alpha, margin, beta [K, 1]
        u = torch.addcmul(-pred, alpha, y)  # [K, B]
        above = yn[:, :, None] > yn[:, None, :]  # [K, B, B]: the pairs with y_i > y_j
        hinge = ((u + margin)[:, :, None] - u[:, None, :]).clamp_min_(0)
        weight = torch.maximum(w[:, :, None], w[:, None, :]).mul_((beta - 1)[:, :, None])
        weight = weight.add_(1).mul_(q[:, :, None]).mul_(above)  # [K, B, B]
        loss = (weight * hinge).sum((1, 2))
        if ctx.needs_input_grad[0]:
            act = weight.mul_(hinge > 0)
            ctx.save_for_backward(act.sum(1) - act.sum(2))  # [K, B]
        return loss

    @staticmethod
    def backward(ctx, grad):  # grad [K]
        (g,) = ctx.saved_tensors
        return grad[:, None] * g, None, None, None, None, None, None, None


def pair_hinge(pred: torch.Tensor, t: LabelTerms, alpha, margin, beta=None) -> torch.Tensor:
    """The pair loss of predictions [K, B] given their LabelTerms: [K]. Terms with
    interval-table weights (t.w) take the pair-weight matrix path, which needs `beta` (float
    or [K])."""
    if t.w is not None:
        return _PairHingeMatrix.apply(pred, t.y, t.yn, t.q, t.w, _per_batch(alpha, pred),
                                      _per_batch(margin, pred), _per_batch(beta, pred))
    return _PairHinge.apply(pred, t.y, t.yn, t.q, _per_batch(alpha, pred), _per_batch(margin, pred))


def regression(pred: torch.Tensor, t: LabelTerms, kind: str = "huber",
               delta: float = 1.0) -> torch.Tensor:
    """Mean regression loss of predictions [K, B] against t.y_reg over known labels: [K]."""
    if kind == "huber":
        per = F.huber_loss(pred, t.y_reg, reduction="none", delta=delta)
    elif kind == "mse":
        per = (pred - t.y_reg) ** 2
    elif kind == "mse+mae":
        per = (pred - t.y_reg) ** 2 + (pred - t.y_reg).abs()
    else:
        raise ValueError(f"unknown regression loss {kind!r}")
    return (per * t.w_reg).sum(-1)


def pairwise_ranking_loss(pred: torch.Tensor, target: torch.Tensor, alpha=0.0, beta=1.0,
                          margin=0.0, norm: str = "batch",
                          label_range: tuple[float, float] | None = None,
                          table: torch.Tensor | None = None) -> torch.Tensor:
    """The general pair loss both QAMRO and L_MR are instances of (see module docstring);
    with `table`, the published track 2 quality weight instead of Eq. 3's."""
    pred, target, squeeze = as_batched(pred, target)
    k = pred.shape[0]
    beta = _per_member(beta, k, pred)
    t = label_terms(target, beta, norm, label_range, table=table)
    loss = pair_hinge(pred, t, _per_member(alpha, k, pred), _per_member(margin, k, pred),
                      beta=beta)
    return loss[0] if squeeze else loss


def interval_table_loss(pred: torch.Tensor, target: torch.Tensor, axis: str, alpha=0.2,
                        beta=7.0) -> torch.Tensor:
    """The published track 2 ranking loss of one axis (PQ, PC, CE or CU): Eq. 2 with the
    interval-table quality weight, on the labels' 0-10 scale."""
    return pairwise_ranking_loss(pred, target, alpha=alpha, beta=beta,
                                 table=interval_table(axis))


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
    pred, target, squeeze = as_batched(pred, target)
    loss = regression(pred, label_terms(target), kind, delta)
    return loss[0] if squeeze else loss
