"""The published QAMRO losses as literal pair-by-pair double loops.

Only oracles: the parity tests check `losses.qamro_loss` and `losses.interval_table_loss`
against them, and `make bench` times the first. Never used for training (about B^2/2 Python
steps per call). `label_range` replaces the batch's min and max in q_ij's normalisation by a
fixed scale (`--norm range`)."""
from __future__ import annotations

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
