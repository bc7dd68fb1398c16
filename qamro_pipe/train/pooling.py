"""`--pool attention`: a clip's prediction from its windows', weighted by a learned attention
over them, instead of the length-weighted mean (docs/beyond.md).

For clip c with windows w of n_w samples, member k's head gives each window a prediction p_w
and the input of its last layer h_w (the last hidden activations); with the member's query q:

    a_w = exp(log n_w + q . h_w) / sum_{w' in c} exp(log n_w' + q . h_w')
    p_c = sum_{w in c} a_w p_w

At q = 0, a_w = n_w / sum n_w': the length-weighted mean that `--pool mean` takes of a clip's
window predictions (inputs.Units.to_clips), so training starts from it. Pooling predictions
is pooling the last layer's input (the output layer is linear: sum a_w (v . h_w + b) =
v . (sum a_w h_w) + b), so this is attention pooling of the windows' embeddings at the head's
last layer, with one query per member (heads.POOL_QUERY).

A member that pools by attention trains on clips: each step takes a batch of clips with all
their windows, and every term of its objective reads the pooled clip predictions. A member
that pools by the mean trains on windows, as the paper's recipe does for per-window
features. An epoch is then a different sequence of steps, so the trainer runs the two kinds
of member as two engines over one training state (trainer.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..store.reader import Cache


@dataclass
class WindowIndex:
    """Where each clip's windows lie in a cache's window rows, on the device."""

    first: torch.Tensor  # [N] first window row of each clip
    count: torch.Tensor  # [N] windows of each clip
    log_w: torch.Tensor  # [M] log of each window's length (samples)

    @classmethod
    def of(cls, cache: Cache, device) -> "WindowIndex":
        off = np.asarray(cache.window_offsets, dtype=np.int64)
        return cls(torch.from_numpy(off[:-1].copy()).to(device),
                   torch.from_numpy(np.diff(off)).to(device),
                   torch.from_numpy(np.log(cache.window_weight.astype(np.float64))
                                    .astype(np.float32)).to(device))

    def expand(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The window rows of clips `idx` ([K, b] or [b]), each member's concatenated and
        padded to the longest: (rows, slot: the position in idx of each row's clip, valid),
        each [K, T] or [T]. Padding rows point at row 0 and are not valid."""
        cnt = self.count[idx]  # [.., b]
        end = cnt.cumsum(-1)
        total = end[..., -1:]  # [.., 1]
        t = int(total.max())  # one host sync per step: batches hold different window counts
        pos = torch.arange(t, device=idx.device).expand(*idx.shape[:-1], t).contiguous()
        valid = pos < total
        slot = torch.searchsorted(end, pos, right=True).clamp(max=idx.shape[-1] - 1)
        within = pos - (end - cnt).gather(-1, slot)
        rows = torch.where(valid, self.first[idx].gather(-1, slot) + within, 0)
        return rows, slot, valid


def pool(p: torch.Tensor, s: torch.Tensor, log_w: torch.Tensor, slot: torch.Tensor,
         valid: torch.Tensor | None, n: int) -> torch.Tensor:
    """[K, n] clip predictions from window predictions p and scores s [K, T]; log_w, slot
    (each row's clip, 0..n-1) and valid are [K, T] or [T] (valid None: every row). A clip
    without a valid row gets NaN (0/0), as Units.to_clips gives one without windows."""
    k = p.shape[0]
    logit = s + log_w
    if valid is not None:
        logit = torch.where(valid, logit, float("-inf"))
        p = torch.where(valid, p, 0.0)
    slot = slot.expand(k, -1)
    top = torch.full((k, n), float("-inf"), dtype=logit.dtype, device=logit.device)
    top = top.scatter_reduce(1, slot, logit.detach(), "amax")  # softmax is shift-invariant
    e = torch.exp(logit - top.gather(1, slot))
    den = torch.zeros_like(top).scatter_add(1, slot, e)
    num = torch.zeros_like(top).scatter_add(1, slot, e * p)
    return num / den


@torch.no_grad()
def pooled_clips(p: np.ndarray, s: np.ndarray, clip_of: np.ndarray, weight: np.ndarray,
                 n_clips: int) -> np.ndarray:
    """[K, N] float64 attention-pooled predictions from every window's prediction and score
    ([K, M]); clips without windows get NaN."""
    t = torch.from_numpy
    return pool(t(p), t(s), t(np.log(weight.astype(np.float64))), t(clip_of.astype(np.int64)),
                None, n_clips).numpy()
