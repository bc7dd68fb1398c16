"""Listwise ranking losses, batched over K like the pair losses (losses.py).

Shapes: `pred` [B] or [K, B]; `target` [B] (shared) or [K, B], NaN = unknown label (left
out: it neither scores nor competes). Each public function returns a scalar for [B] input
and [K] otherwise; the `*_term` functions take a batch's LabelTerms (`yn`: labels, NaN
where unknown) and per-member settings as [K] tensors or floats, as the engine calls them.
A list with no known label scores 0; ListMLE and Spearman also give 0 (and a zero gradient)
to a list whose known labels are all tied, which carries no order.

- ListNet (Cao et al. 2007), top-one probabilities:
      L = -sum_{i known} softmax(y / T)_i log softmax(p / T)_i
- ListMLE (Xia et al. 2008), the Plackett-Luce negative log-likelihood of the order the
  labels give, with ties: clips with equal labels do not compete with each other. Clip i's
  denominator sums over itself and the clips labelled strictly below it:
      L = 1/n sum_{i known} [ log(exp(p_i) + sum_{j: y_j < y_i} exp(p_j)) - p_i ]
  (n = known clips). Without ties this is the usual ListMLE (up to the 1/n); with ties it
  is the same for every order of the tied clips, so no arbitrary tie-break enters.
- Spearman through soft ranks: loss = 1 - rho, rho the Pearson correlation between the
  soft ranks of the predictions, r_i = 1/2 + sum_{j known} sigmoid((p_i - p_j) / tau)
  (-> the 1-based rank as tau -> 0), and the labels' exact ranks (ties get their average
  rank, as scipy.stats.spearmanr). O(B^2) per member, like the pair losses. We write the
  soft rank ourselves: torchsort 0.1.10 is published as source only, and pip compiles its
  C++ (and, where nvcc is found, CUDA) extension against the installed torch; on our CPU
  machine, which has nvcc but no GPU, that build fails inside torch's cpp_extension (no
  CUDA architecture to target) unless TORCH_CUDA_ARCH_LIST is set, and every user would
  need a compiler and a CUDA toolkit matching their torch. diffsort (pure Python) builds a
  [B, B] relaxed permutation per layer of a sorting network (about log^2 B layers). The
  sigmoid soft rank is one [B, B] pass, needs nothing new, is exact in float64 for the
  tests, and is captured in CUDA graphs like the rest of a training step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import as_batched


def _member_column(x, like: torch.Tensor) -> torch.Tensor:
    """A float or a [K] tensor -> a column [K or 1, 1] broadcasting against [K, B]."""
    return torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(-1, 1)


def _known(yn: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(yn)


def listnet_term(pred: torch.Tensor, yn: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """ListNet of predictions [K, B] against labels yn [K, B] (NaN unknown): [K]."""
    known, t = _known(yn), _member_column(temperature, pred)  # t [K or 1, 1]
    neg = torch.finfo(pred.dtype).min  # not -inf: 0 * -inf would be NaN
    logp = F.log_softmax(torch.where(known, pred / t, neg), dim=-1)  # [K, B]
    q = torch.softmax(torch.where(known, yn / t, neg), dim=-1)  # [K, B]
    return -torch.where(known, q * logp, 0.0).sum(-1)


def listmle_term(pred: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
    """ListMLE with tie groups (module docstring) of predictions [K, B]: [K]."""
    known = _known(yn)
    below = yn[:, None, :] < yn[:, :, None]  # [K, B(i), B(j)]: y_j < y_i (NaN: never)
    eye = torch.eye(pred.shape[-1], dtype=torch.bool, device=pred.device)
    compete = below | (eye & known[:, :, None])  # [K, B, B]
    neg = torch.finfo(pred.dtype).min
    logden = torch.logsumexp(torch.where(compete, pred[:, None, :], neg), dim=-1)  # [K, B]
    per = torch.where(known, logden - pred, 0.0)
    n = known.sum(-1).clamp_min(1).to(pred.dtype)
    return per.sum(-1) / n


def soft_rank(pred: torch.Tensor, known: torch.Tensor, tau=0.1) -> torch.Tensor:
    """[K, B] -> soft ranks among the known entries (module docstring); 0 where unknown."""
    t = _member_column(tau, pred)[..., None]  # [K or 1, 1, 1]
    diff = (pred[:, :, None] - pred[:, None, :]) / t  # [K, B, B]
    r = 0.5 + (torch.sigmoid(diff) * known[:, None, :]).sum(-1)
    return torch.where(known, r, 0.0)


def label_ranks(yn: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) of the known labels [K, B]; 0 where unknown."""
    known = _known(yn)
    lower = (yn[:, None, :] < yn[:, :, None]).sum(-1)  # [K, B]
    equal = (yn[:, None, :] == yn[:, :, None]).sum(-1)
    return torch.where(known, lower + (equal + 1) / 2, 0.0).to(yn.dtype)


def _pearson(a: torch.Tensor, b: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    n = known.sum(-1, keepdim=True).clamp_min(1).to(a.dtype)
    a = torch.where(known, a - (a * known).sum(-1, keepdim=True) / n, 0.0)
    b = torch.where(known, b - (b * known).sum(-1, keepdim=True) / n, 0.0)
    va, vb = (a * a).sum(-1), (b * b).sum(-1)
    ok = (va > 0) & (vb > 0)
    den = torch.sqrt(torch.where(ok, va * vb, 1.0))
    return torch.where(ok, (a * b).sum(-1) / den, 1.0)  # no spread: no order to learn


def spearman_term(pred: torch.Tensor, yn: torch.Tensor, tau=0.1) -> torch.Tensor:
    """1 - soft Spearman correlation of predictions [K, B] with labels yn [K, B]: [K]."""
    known = _known(yn)
    return 1 - _pearson(soft_rank(pred, known, tau), label_ranks(yn), known)


def _public(term, pred, target, *args):
    pred, target, squeeze = as_batched(pred, target)
    yn = torch.where(torch.isfinite(target), target, torch.nan)  # inf is unknown too
    loss = term(pred, yn, *(_member(a, pred) for a in args))
    return loss[0] if squeeze else loss


def _member(x, pred: torch.Tensor) -> torch.Tensor:
    """A float or a [K] tensor -> [K or 1] on pred's device and dtype."""
    return torch.as_tensor(x, dtype=pred.dtype, device=pred.device).reshape(-1)


def listnet_loss(pred: torch.Tensor, target: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """ListNet: -sum_i softmax(target/T)_i log_softmax(pred/T)_i over known labels;
    temperature T a float or one per member."""
    return _public(listnet_term, pred, target, temperature)


def listmle_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ListMLE, tied clips not competing (module docstring)."""
    return _public(listmle_term, pred, target)


def spearman_loss(pred: torch.Tensor, target: torch.Tensor, tau=0.1) -> torch.Tensor:
    """1 - Spearman correlation through sigmoid soft ranks of temperature tau (a float or
    one per member)."""
    return _public(spearman_term, pred, target, tau)


# the listwise kinds of loss_kinds.KINDS: name -> (its term, the LossConfig setting it takes
# as its third argument, or None)
LIST_TERMS = {"listnet": (listnet_term, "temperature"),
              "listmle": (lambda pred, yn, _: listmle_term(pred, yn), None),
              "spearman": (spearman_term, "tau")}
