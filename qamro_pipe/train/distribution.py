"""The distributional loss of the AudioMOS 2025 track-1 winner (ASTAR-NTU, arXiv 2507.09904):
a head predicts a distribution over score bins; its target is the raters' scores, smoothed.

Bins: `bins` centres c_1..c_n evenly spaced over the recipe's label_range [lo, hi], ends
included (MusicEval 1-5 with the default 21 bins: a 0.2 grid, the grid means of 5 ratings
sit on). Target of a clip with individual ratings r_1..r_R in the cache (/ratings/<label>:
AES-Natural's evaluation annotations, MusicEval's per-rater scores where released):

    t_b ∝ sum_r exp(-(c_b - r)^2 / (2 sigma^2)),   sigma = sigma_share * (hi - lo)

their histogram smoothed by a Gaussian; a clip with only a mean label m: the same with the
single "rating" m (a Gaussian around the mean). t is normalised over the bins. The loss is

    KL(t || p) = sum_b t_b (log t_b - log p_b),   p = softmax(logits)

averaged over the batch's known labels, per member; the predicted score is the mean of p,
sum_b p_b c_b, which is what predictions, metrics, evaluate and predict see.

In a run, the heads' last hidden layer feeds a second output layer of n units for every
member when any member is gaussian-kl (heads.py); the others keep their one output unit and
never read the second layer (zero gradient), and their initial weights are drawn first, so
they are what they would be in a run without it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import LossConfig, Member
from ..errors import QamroError
from ..loss_kinds import kinds_of


def bin_centres(label_range: tuple[float, float], bins: int) -> np.ndarray:
    """[n] centres over [lo, hi], ends included."""
    lo, hi = label_range
    return np.linspace(lo, hi, bins)


def smoothed_targets(labels: np.ndarray, ratings: np.ndarray | None, centres: np.ndarray,
                     sigma: float) -> np.ndarray:
    """labels [N] (NaN unknown), ratings [N, R] (NaN-padded) or None -> [N, n] targets; a
    clip with any rating uses its ratings, else its label; unknown label: a row of zeros."""
    points = labels[:, None].astype(np.float64)  # [N, 1]
    if ratings is not None and ratings.size:
        rated = np.isfinite(ratings).any(1)
        width = max(ratings.shape[1], 1)
        points = np.where(rated[:, None], ratings.astype(np.float64),
                          np.pad(points, ((0, 0), (0, width - 1)), constant_values=np.nan))
    z = (centres[None, None, :] - points[:, :, None]) / sigma  # [N, R, n]
    dens = np.where(np.isfinite(z), np.exp(-0.5 * np.nan_to_num(z) ** 2), 0.0).sum(1)
    total = dens.sum(1, keepdims=True)
    known = np.isfinite(labels)[:, None] & (total > 0)
    return np.where(known, dens / np.where(total > 0, total, 1.0), 0.0)


def kl_term(logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """logits, target [K, B, n]; w [K, B] each clip's share of the mean (0: unknown) -> [K]."""
    logp = torch.log_softmax(logits, dim=-1)
    per = (torch.xlogy(target, target) - target * logp).sum(-1)  # [K, B]
    return (per * w).sum(-1)


def gaussian_kl_loss(logits: torch.Tensor, target: torch.Tensor, label_range=(1.0, 5.0),
                     sigma: float = 0.1, ratings: torch.Tensor | None = None) -> torch.Tensor:
    """KL(smoothed target || softmax(logits)) (module docstring). logits [B, n] or
    [K, B, n]; target [B] or [K, B] mean labels (NaN unknown); ratings [B, R] or None;
    sigma a share of the label range. -> scalar for [B, n], [K] otherwise."""
    squeeze = logits.dim() == 2
    logits = logits[None] if squeeze else logits  # [K, B, n]
    k, b, n = logits.shape
    centres = bin_centres(label_range, n)
    y = target.detach().cpu().numpy().astype(np.float64).reshape(-1, b)
    r = None if ratings is None else ratings.detach().cpu().numpy()
    t = np.stack([smoothed_targets(row, r, centres, sigma * (label_range[1] - label_range[0]))
                  for row in np.broadcast_to(y, (k, b))])
    known = torch.from_numpy(np.isfinite(np.broadcast_to(y, (k, b))).copy()).to(logits)
    w = known / known.sum(-1, keepdim=True).clamp_min(1)  # [K, B] the mean's weights
    loss = kl_term(logits, torch.as_tensor(t).to(logits), w)
    return loss[0] if squeeze else loss


@dataclass(frozen=True)
class OutputBins:
    """A run's distribution output: its bin centres (label units) and which members use it."""

    centres: tuple[float, ...]
    uses: tuple[bool, ...]  # per member
    sigma: float  # in label units

    def subset(self, rows) -> "OutputBins":
        return OutputBins(self.centres, tuple(self.uses[i] for i in rows), self.sigma)

    def scaled(self, mean: float, std: float) -> torch.Tensor:
        """The centres in a head's output units (standardised where it standardises)."""
        return (torch.tensor(self.centres, dtype=torch.float32) - mean) / std


def output_bins(members: list[Member], label_range=None) -> OutputBins | None:
    """The run's OutputBins, or None when no member is gaussian-kl. Its members must share
    bins, sigma and label range (one output layer, one target per clip)."""
    dist = [m.loss for m in members if m.loss.kind in kinds_of("distribution")]
    if not dist:
        return None
    first: LossConfig = dist[0]
    if any((c.bins, c.sigma, c.label_range) != (first.bins, first.sigma, first.label_range)
           for c in dist):
        raise QamroError("gaussian-kl members of one run must share bins, sigma and the label "
                         "range")
    scale = first.label_range or label_range
    if scale is None:
        raise QamroError("--loss gaussian-kl needs the labels' scale for its bins: the recipe "
                         "declares no label_range")
    sigma = first.sigma * (scale[1] - scale[0])
    return OutputBins(tuple(bin_centres(scale, first.bins).tolist()),
                      tuple(m.loss.kind in kinds_of("distribution") for m in members), sigma)
