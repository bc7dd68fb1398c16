"""The objective of every member of a batched run at once: per-member loss settings as
[H*K] tensors (H heads, K members), the regression term, the pair hinge of the pair kinds,
the listwise terms, the distribution's KL and the system-level term, each member reading
only its own kind's (loss_kinds.KINDS) and the system term where it adds one."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import LossConfig, Member
from ..errors import QamroError
from ..loss_kinds import KINDS, kinds_of, uses_system_term
from .distribution import kl_term
from .listwise import LIST_TERMS
from .losses import LabelTerms, interval_table, label_terms, pair_hinge, regression
from .system_level import system_term


class Losses:
    """Per-member loss settings as [H*K] tensors, so one call scores every head of every
    member: predictions of the H heads are stacked along the member axis."""

    def __init__(self, members: list[Member], stats: list[tuple[float, float]],
                 device: torch.device, label_range, labels: list[str] | None = None,
                 n_systems: int = 0):
        n_heads = len(stats)
        first = members[0].loss
        shared = ("norm", "regression", "huber_delta", "quality_weight")
        for m in members:
            if any(getattr(m.loss, s) != getattr(first, s) for s in shared):
                raise QamroError("members of one run must share norm, quality weight and "
                                 "regression loss")
        self.k, self.n_heads = len(members), n_heads

        def t(vals):
            return torch.tensor(vals * n_heads, dtype=torch.float32, device=device)
        def reads(m: Member, setting: str) -> bool:
            return setting in KINDS[m.loss.kind].settings
        # the pair hinge's settings: 0 margin and q = 1 for the members whose kind has none
        self.alpha = t([m.loss.alpha if reads(m, "alpha") else 0.0 for m in members])
        self.beta = t([m.loss.beta if reads(m, "beta") else 1.0 for m in members])
        self.margin = t([m.loss.margin if reads(m, "margin") else 0.0 for m in members])
        self.weight = t([m.loss.rank_weight if KINDS[m.loss.kind].family == "pair" else 0.0
                         for m in members])
        # each listwise kind some member uses: (its term, its setting [H*K], its weight
        # [H*K], 0 for the other members: they get an exact 0 from it, whatever shares the run)
        self.listwise = [(fn, t([getattr(m.loss, setting) if setting else 0.0
                                 for m in members]),
                          t([m.loss.rank_weight if m.loss.kind == kind else 0.0
                             for m in members]))
                         for kind, (fn, setting) in LIST_TERMS.items()
                         if any(m.loss.kind == kind for m in members)]
        self.reg_weight = t([m.loss.regression_weight for m in members])  # [H*K]
        self.kl_weight = t([m.loss.rank_weight if m.loss.kind in kinds_of("distribution")
                            else 0.0 for m in members])
        # the system-level term (system_level.py): the weight of kind "system", or the
        # system_weight any other kind adds beside its own term
        self.system_weight = t([m.loss.rank_weight if KINDS[m.loss.kind].family == "system"
                                else m.loss.system_weight for m in members])
        self.system_tau = t([m.loss.tau for m in members])
        self.n_systems = n_systems
        self.uses_systems = any(uses_system_term(m.loss) for m in members)
        # [K]: the members with a ranking term (uncertainty weighting learns its weight only
        # there: a term that is always 0 would drive its log-variance down without end)
        self.has_rank = torch.tensor([KINDS[m.loss.kind].family != "none"
                                      or uses_system_term(m.loss) or m.loss.pair_weight > 0
                                      for m in members],
                                     device=device)
        if self.uses_systems and n_systems < 2:
            raise QamroError("the system-level term needs clips of at least 2 systems in "
                             "the training split")
        self.cfg: LossConfig = first
        # head outputs are standardised scores where a head standardises: the regression term
        # compares them with standardised labels, the ranking term sees the labels' own scale
        self.scaled = any(st != (0.0, 1.0) for st in stats)
        self.mean = torch.tensor([m for m, _ in stats], device=device).repeat_interleave(
            self.k)[:, None]  # [H*K, 1]
        self.std = torch.tensor([s for _, s in stats], device=device).repeat_interleave(
            self.k)[:, None]
        self.label_range = first.label_range or label_range
        if first.norm == "range" and self.label_range is None:
            raise QamroError("norm='range' needs a label range (the recipe's label_range)")
        self.table = None  # [H*K, 9]: each head's interval table (by its label) for its
        # QAMRO members; NaN rows (no table) for the others, whose pairs stay Eq. 1's
        if first.quality_weight == "interval-table":
            if labels is None or len(labels) != n_heads:
                raise QamroError("the interval-table quality weight needs the heads' labels")
            uses = torch.tensor([reads(m, "quality_weight") for m in members] * n_heads)
            tables = torch.stack([interval_table(lab) for lab in labels])  # [H, 9]
            self.table = torch.where(uses[:, None], tables.repeat_interleave(self.k, dim=0),
                                     math.nan).to(device, torch.float32)

    def terms(self, ys: list[torch.Tensor], bs: int) -> LabelTerms:
        """Per head labels [K or 1, n], in the order the rows are visited, cut into chunks of
        bs (the last padded with unknown labels) -> the label terms of every chunk at once,
        fields [n_chunks, H*K, bs]: chunk c's are `.select((c, slice(None), slice(None, b)))`
        with b its real size (padding is unknown: it changes no count)."""
        n = ys[0].shape[-1]
        chunks = -(-n // bs)
        y = torch.cat([t.expand(self.k, n) for t in ys])  # [H*K, n]
        y = F.pad(y, (0, chunks * bs - n), value=math.nan)
        y = y.view(len(y), chunks, bs).transpose(0, 1).contiguous()
        t = label_terms(y, self.beta, self.cfg.norm, self.label_range, self.mean[:, 0],
                        self.std[:, 0], self.table)
        return t._replace(q=t.q * self.weight[:, None])  # the ranking term's weight, folded in

    def __call__(self, preds: list[torch.Tensor], t: LabelTerms, dist=None,
                 systems: torch.Tensor | None = None, per_head: bool = False) -> torch.Tensor:
        """Per head [K, b] predictions and the stacked batch's label terms ([H*K, b]) ->
        [2, K]: the regression and the ranking term, each summed over heads. `dist`: per
        head (logits [K, b, n], target distributions [K or 1, b, n]), where a member is
        gaussian-kl (its KL is its ranking term's place). `systems`: the batch's system
        index of each row ([K, b] or [b], -1 none), where a member uses the system term.
        per_head: [2, H, K], each head's terms apart (for uncertainty weighting)."""
        pred = torch.cat(preds)  # [H*K, b]
        raw = pred * self.std + self.mean if self.scaled else pred
        reg = regression(pred, t, self.cfg.regression, self.cfg.huber_delta)
        # an exact 0 where a member trains without it (a regression term of inf or NaN
        # predictions times 0 would still be NaN)
        reg = torch.where(self.reg_weight > 0, reg * self.reg_weight, 0.0)
        rank = pair_hinge(raw, t, self.alpha, self.margin, self.beta)  # weight: in t.q
        for fn, setting, weight in self.listwise:
            rank = rank + torch.where(weight > 0, fn(raw, t.yn, setting) * weight, 0.0)
        if self.uses_systems:
            sys = systems.repeat(self.n_heads, 1) if systems.dim() == 2 else systems[None]
            st = system_term(raw, t.yn, sys, self.n_systems, self.system_tau)
            rank = rank + torch.where(self.system_weight > 0, st * self.system_weight, 0.0)
        if dist is not None:
            z = torch.cat([d[0] for d in dist])  # [H*K, b, n]
            target = torch.cat([d[1].expand(self.k, *d[1].shape[-2:]) for d in dist])
            kl = kl_term(z, target, t.w_reg)
            rank = rank + torch.where(self.kl_weight > 0, kl * self.kl_weight, 0.0)
        parts = torch.stack([reg, rank]).view(2, self.n_heads, self.k)
        return parts if per_head else parts.sum(1)


def uncertainty_objective(parts: torch.Tensor, log_vars: torch.Tensor,
                          has_rank: torch.Tensor, learned: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """The objective under --loss-weighting uncertainty (homoscedastic uncertainty, Kendall,
    Gal and Cipolla 2018), summed over heads and members:

        sum_{h, k} sum_t [ exp(-s_hkt) L_hkt + s_hkt ]

    t over config.OBJECTIVE_TERMS (regression, ranking), L the term's batch value, s its
    learned log-variance (a parameter of member k's head h): the weight exp(-s) settles at
    1 / L. At s = 0 it is the fixed objective, so training starts where fixed weighting
    does. A member without a ranking term (`has_rank` [K] False) has no ranking part at all.
    The members not `learned` ([K] bool; None: all are) keep the fixed sum of their terms
    (and their log-variances get no gradient). parts [2, H, K], log_vars [H, K, 2] -> a
    scalar."""
    s = log_vars.permute(2, 0, 1)  # [2, H, K]
    used = torch.stack([torch.ones_like(has_rank), has_rank])[:, None, :]  # [2, 1, K]
    weighted = torch.where(used, torch.exp(-s) * parts + s, 0.0)
    if learned is None:
        return weighted.sum()
    return torch.where(learned, weighted, parts).sum()
