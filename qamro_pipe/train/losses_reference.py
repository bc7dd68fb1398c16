"""The published QAMRO loss as a literal pair-by-pair double loop.

Only an oracle: the parity test checks `losses.qamro_loss` against it, and `make bench`
times it. Never used for training (about B^2/2 Python steps per call)."""
from __future__ import annotations

import torch


def qamro_loss_literal(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.2,
                       beta: float = 7.0, margin: float = 0.0) -> torch.Tensor:
    pred, target = pred.reshape(-1), target.reshape(-1)
    if target.max() == target.min():
        return pred.sum() * 0.0
    norm = (target - target.min()) / (target.max() - target.min())
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
