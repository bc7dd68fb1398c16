"""The system-level objective: a soft-rank Spearman between each system's mean prediction
and its mean label inside a batch, the level MusicEval and the song-aesthetics challenge rank
systems at.

For a batch with predictions p, labels y (NaN unknown) and system s_i of each clip, the
systems with at least MIN_CLIPS labelled clips in the batch are S; for each s in S

    P_s = mean_{i: s_i = s, y_i known} p_i        Y_s = mean_{i: s_i = s, y_i known} y_i

and the loss is listwise.spearman_term over the list (P_s, Y_s)_{s in S}: 1 - rho, rho
the Pearson correlation of the sigmoid soft ranks of P (temperature tau, in label units)
with the average ranks of Y. The labels are the batch's own means, not a published system
MOS: what the batch holds is what is compared. A batch with fewer than two such systems, or
whose systems' mean labels are all tied, scores 0 with a zero gradient. Random batches of
256 MusicEval clips hold about 8 clips of each of its 31 systems; --batch-by system holds
whole systems, few per batch (groups.py).

Shapes as listwise.py: pred [K, B], yn [K, B], systems [K or 1, B] int64 (-1: no system);
the result is [K]."""
from __future__ import annotations

import torch

from .listwise import spearman_term
from .losses import as_batched

MIN_CLIPS = 2  # labelled clips a system needs in a batch to take part (one clip's label is
# a clip's, not a system's mean)


def system_means(pred: torch.Tensor, yn: torch.Tensor, systems: torch.Tensor,
                 n_systems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, S] mean prediction and mean label of each system's labelled clips in the batch;
    the label NaN where the system has fewer than MIN_CLIPS of them (the term leaves it
    out), the prediction 0 there."""
    known = torch.isfinite(yn)
    ids = torch.arange(n_systems, device=pred.device)
    member = (systems[..., None] == ids) & known[..., None]  # [K, B, S]
    w = member.to(pred.dtype)
    count = w.sum(1)  # [K, S]
    den = count.clamp_min(1)
    mean_pred = (w * pred[..., None]).sum(1) / den
    mean_label = (w * torch.where(known, yn, 0.0)[..., None]).sum(1) / den
    return mean_pred, torch.where(count >= MIN_CLIPS, mean_label, torch.nan)


def system_term(pred: torch.Tensor, yn: torch.Tensor, systems: torch.Tensor,
                n_systems: int, tau=0.1) -> torch.Tensor:
    """1 - soft Spearman of the systems' mean predictions against their mean labels: [K]."""
    mean_pred, mean_label = system_means(pred, yn, systems.expand_as(pred), n_systems)
    return spearman_term(mean_pred, mean_label, tau)


def system_spearman_loss(pred: torch.Tensor, target: torch.Tensor, systems,
                         tau=0.1) -> torch.Tensor:
    """The system-level objective of predictions [B] or [K, B] against labels (NaN or inf
    unknown) of clips of `systems` ([B] ints, -1 none): a scalar or [K]."""
    pred, target, squeeze = as_batched(pred, target)
    yn = torch.where(torch.isfinite(target), target, torch.nan)
    systems = torch.as_tensor(systems, device=pred.device).reshape(1, -1)
    n = int(systems.max()) + 1 if systems.numel() else 0
    loss = system_term(pred, yn, systems, max(n, 1),
                       torch.as_tensor(tau, dtype=pred.dtype, device=pred.device).reshape(-1))
    return loss[0] if squeeze else loss
