"""The published QAMRO losses as literal pair-by-pair double loops.

Only oracles: the parity tests check `losses.qamro_loss` and `losses.interval_table_loss`
against them, and `make bench` times the first. Never used for training (about B^2/2 Python
steps per call). `label_range` replaces the batch's min and max in q_ij's normalisation by a
fixed scale (`--norm range`)."""
from __future__ import annotations

import math

import torch


def qamro_loss_literal(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.2,
                       beta: float = 7.0, margin: float = 0.0,
                       label_range: tuple[float, float] | None = None) -> torch.Tensor:
    pred, target = pred.reshape(-1), target.reshape(-1)
    if target.max() == target.min():
        return pred.sum() * 0.0
    lo, hi = label_range if label_range is not None else (target.min(), target.max())
    norm = (target - lo) / (hi - lo)
    loss = pred.sum() * 0.0
    count = 0
    for i in range(len(pred)):
        for j in range(i + 1, len(pred)):
            diff = target[i] - target[j]
            if diff == 0:
                continue
            sign = 1.0 if diff > 0 else -1.0
            weight = 1.0 + (beta - 1.0) * torch.maximum(norm[i], norm[j])
            loss = loss + weight * torch.relu(-sign * (pred[i] - pred[j]) + alpha * diff.abs()
                                              + margin)
            count += 1
    return loss / count if count else loss


# The quality weights of github.com/JethroWangSir/QAMRO track2/loss.py (its weights_map per
# task), written out again here by hand, as lower bound of the MOS interval -> value, so that
# the oracle does not share the trainer's table (losses.INTERVAL_TABLES)
PUBLISHED_WEIGHTS = {
    "PQ": {6: 9.5, 7: 8.5, 5: 7.5, 4: 6.5, 8: 5.5, 3: 4.5, 1: 0.0, 2: 0.0, 9: 0.0},
    "PC": {3: 9.5, 1: 8.5, 4: 7.5, 2: 6.5, 6: 5.5, 5: 4.5, 7: 3.5, 8: 0.0, 9: 0.0},
    "CE": {6: 9.5, 5: 8.5, 3: 7.5, 4: 6.5, 7: 5.5, 2: 4.5, 1: 0.0, 8: 0.0, 9: 0.0},
    "CU": {6: 9.5, 7: 8.5, 5: 7.5, 4: 6.5, 3: 5.5, 8: 4.5, 1: 0.0, 2: 0.0, 9: 0.0},
}


def interval_table_loss_literal(pred: torch.Tensor, target: torch.Tensor, axis: str,
                                alpha: float = 0.2, beta: float = 7.0) -> torch.Tensor:
    """preference_aware_pamr_loss of track2/loss.py, pair by pair as it is written there:
    unordered pairs i < j with different labels, both labels inside [1, 10] (a label in no
    interval skips the pair, which then does not count); interval [k, k + 1) for k = 1..8 and
    [9, 10] for 9; weights scaled by the table's min and max; pair weight 1 + (beta - 1) *
    the larger of the two scaled weights; margin alpha * |label difference|; the mean over the
    pairs that counted, 0 when none did."""
    pred, target = pred.reshape(-1), target.reshape(-1)
    table = PUBLISHED_WEIGHTS[axis]
    lo, hi = min(table.values()), max(table.values())
    scaled = {k: (v - lo) / (hi - lo) if hi > lo else v for k, v in table.items()}

    def interval(label: float):
        for k in range(1, 10):
            if k <= label < k + 1 or (k == 9 and 9 <= label <= 10):
                return k
        return None

    loss = pred.sum() * 0.0
    count = 0
    for i in range(len(pred)):
        for j in range(i + 1, len(pred)):
            yi, yj = target[i].item(), target[j].item()
            if yi == yj:
                continue
            ki, kj = interval(yi), interval(yj)
            if ki is None or kj is None:
                continue
            weight = 1.0 + (beta - 1.0) * max(scaled.get(ki, 0.0), scaled.get(kj, 0.0))
            sign = 1.0 if yi > yj else -1.0
            loss = loss + weight * torch.relu(-sign * (pred[i] - pred[j]) + alpha * abs(yi - yj))
            count += 1
    return loss / count if count else pred.sum() * 0.0


# -- the listwise losses (listwise.py), each literally as its formula reads, clip by clip ----
def _known(pred, target):
    keep = [i for i in range(len(target)) if torch.isfinite(target[i])]
    return [pred[i] for i in keep], [target[i] for i in keep]


def listnet_loss_literal(pred, target, temperature: float = 1.0):
    """-sum_i softmax(y / T)_i log softmax(p / T)_i over the known labels."""
    p, y = _known(pred.reshape(-1), target.reshape(-1))
    zp = sum(torch.exp(v / temperature) for v in p)
    zy = sum(torch.exp(v / temperature) for v in y)
    loss = pred.sum() * 0.0
    for pi, yi in zip(p, y):
        loss = loss - torch.exp(yi / temperature) / zy * torch.log(torch.exp(pi / temperature) / zp)
    return loss


def listmle_loss_literal(pred, target):
    """1/n sum_i [log(exp(p_i) + sum_{j: y_j < y_i} exp(p_j)) - p_i]: tied clips do not
    compete with each other."""
    p, y = _known(pred.reshape(-1), target.reshape(-1))
    loss = pred.sum() * 0.0
    for i in range(len(p)):
        den = torch.exp(p[i])
        for j in range(len(p)):
            if y[j] < y[i]:
                den = den + torch.exp(p[j])
        loss = loss + torch.log(den) - p[i]
    return loss / max(len(p), 1)


def spearman_loss_literal(pred, target, tau: float = 0.1):
    """1 - Pearson(soft ranks of p, average ranks of y); soft rank r_i = 1/2 + sum_j
    sigmoid((p_i - p_j) / tau)."""
    p, y = _known(pred.reshape(-1), target.reshape(-1))
    n = len(p)
    soft = [0.5 + sum(torch.sigmoid((p[i] - p[j]) / tau) for j in range(n)) for i in range(n)]
    ranks = [sum(1.0 for j in range(n) if y[j] < y[i])
             + (sum(1.0 for j in range(n) if y[j] == y[i]) + 1) / 2 for i in range(n)]
    ms, mr = sum(soft) / n, sum(ranks) / n
    cov = sum((s - ms) * (r - mr) for s, r in zip(soft, ranks))
    vs = sum((s - ms) ** 2 for s in soft)
    vr = sum((r - mr) ** 2 for r in ranks)
    if vr == 0:
        return pred.sum() * 0.0
    return 1 - cov / torch.sqrt(vs * vr)


def gaussian_kl_loss_literal(logits, target, label_range=(1.0, 5.0), sigma: float = 0.1,
                             ratings=None):
    """KL(t || softmax(logits)) averaged over clips with a label, bin by bin; t_b is
    proportional to sum over the clip's ratings (else its label) of exp(-(c_b - r)^2 /
    (2 s^2)), s = sigma (hi - lo), c_b evenly spaced over [lo, hi]."""
    lo, hi = label_range
    n = logits.shape[-1]
    centres = [lo + (hi - lo) * b / (n - 1) for b in range(n)]
    s = sigma * (hi - lo)
    loss, count = logits.sum() * 0.0, 0
    for i in range(len(target)):
        if not math.isfinite(float(target[i])):
            continue
        points = [float(target[i])]
        if ratings is not None and any(math.isfinite(float(r)) for r in ratings[i]):
            points = [float(r) for r in ratings[i] if math.isfinite(float(r))]
        dens = [sum(math.exp(-(c - r) ** 2 / (2 * s * s)) for r in points) for c in centres]
        t = [d / sum(dens) for d in dens]
        z = sum(torch.exp(logits[i][b]) for b in range(n))
        for b in range(n):
            if t[b] > 0:
                loss = loss + t[b] * (math.log(t[b]) - torch.log(torch.exp(logits[i][b]) / z))
        count += 1
    return loss / max(count, 1)


def system_spearman_loss_literal(pred, target, systems, tau: float = 0.1, min_clips: int = 2):
    """The system-level objective system by system: each system's (>= min_clips labelled
    clips, system >= 0) mean prediction and mean label, then spearman_loss_literal over them."""
    means_p, means_y = [], []
    for s in sorted({int(v) for v in systems if int(v) >= 0}):
        rows = [i for i in range(len(target))
                if int(systems[i]) == s and math.isfinite(float(target[i]))]
        if len(rows) < min_clips:
            continue
        means_p.append(sum(pred[i] for i in rows) / len(rows))
        means_y.append(sum(float(target[i]) for i in rows) / len(rows))
    if not means_p:
        return pred.sum() * 0.0
    return spearman_loss_literal(torch.stack(means_p),
                                 torch.tensor(means_y, dtype=pred.dtype), tau)


def attention_pool_literal(preds, scores, lengths):
    """Attention pooling (pooling.py) of one clip, window by window: the softmax of
    log(length) + score over the clip's windows, then the weighted sum of their predictions.
    `preds`, `scores`: the windows' scalars (tensors), `lengths` their lengths (floats)."""
    logits = [math.log(n) + s for n, s in zip(lengths, scores)]
    top = max(float(v.detach()) for v in logits)
    e = [torch.exp(v - top) for v in logits]
    z = sum(e)
    return sum(w / z * p for w, p in zip(e, preds))


def bradley_terry_loss_literal(pa, pb, outcome):
    """The preference pairs' Bradley-Terry term pair by pair: for each pair with an outcome
    o (1 a won, 0 b won, 1/2 a tie; NaN none: left out), -[o log P(a) + (1-o) log P(b)]
    with P(a) = 1 / (1 + exp(-(p_a - p_b))), averaged over the pairs with an outcome."""
    loss, count = pa.sum() * 0.0, 0
    for i in range(len(pa)):
        o = float(outcome[i])
        if math.isnan(o):
            continue
        p_a = 1.0 / (1.0 + torch.exp(-(pa[i] - pb[i])))
        loss = loss - (o * torch.log(p_a) + (1.0 - o) * torch.log(1.0 - p_a))
        count += 1
    return loss / max(count, 1)
