"""The published QAMRO loss as a literal pair-by-pair double loop.

Only an oracle: the parity test checks `losses.qamro_loss` against it, and `make bench`
times it. Never used for training (about B^2/2 Python steps per call). `label_range`
replaces the batch's min and max in q_ij's normalisation by a fixed scale (`--norm range`)."""
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
