"""Preference pairs train heads: a Bradley-Terry term on the pairs of a pairs file
(TrainConfig.pairs, joined to the cache's training clips by pairs_join.py), added to a
member's objective with its LossConfig.pair_weight.

For pairs (a, b) with outcome o (1: a won, 0: b won, 1/2: a tie) and the head's outputs
p_a, p_b (its own units: label units, MOS points for the MusicEval heads; standardised
scores for a head that standardises its labels), d = p_a - p_b and

    L_BT = -1/|P| sum_P [ o log sigmoid(d) + (1 - o) log sigmoid(-d) ]

the Bradley-Terry likelihood of P(a over b) = sigmoid(d) (no temperature: T = 1 output
unit), a tie counting half a win each way (-1/2 [log s(d) + log s(-d)], least at d = 0). A
pair without an outcome (NaN) takes no part; none left scores 0 with a zero gradient.

Each step, each member draws its own batch of training pairs: at each epoch a permutation
of the P pairs from a counter-based hash of (member seed, epoch) (shuffle.py, salted
"pairs"), cut into as many chunks as the epoch has steps, so an epoch visits every pair
once. It depends on the seed and the epoch only: nothing to save, a resumed run draws the
same pairs, a member of a sweep draws as the single run with its seed. Members with
pair_weight 0 get an exact 0 from the term, whatever shares the run."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Member, TrainConfig
from ..errors import QamroError
from ..store.reader import Cache
from .heads import HeadSpec, member_seed
from .losses import as_batched
from .pairs_join import PairSet, join_pairs, training_clips, validation_pairs
from .shuffle import member_permutations


def bt_term(pa: torch.Tensor, pb: torch.Tensor, outcome: torch.Tensor) -> torch.Tensor:
    """[K, P] outputs of clips a and b, [K or 1, P] outcomes (NaN: none) -> [K] L_BT."""
    known = torch.isfinite(outcome)
    o = torch.where(known, outcome, 0.0)
    d = pa - pb
    nll = -(o * F.logsigmoid(d) + (1 - o) * F.logsigmoid(-d))
    nll = torch.where(known, nll, 0.0)
    return nll.sum(-1) / known.sum(-1).clamp_min(1)


def bradley_terry_loss(pa: torch.Tensor, pb: torch.Tensor, outcome) -> torch.Tensor:
    """L_BT of outputs [P] or [K, P] against outcomes (1, 0, 1/2, NaN): a scalar or [K]."""
    pa, outcome, squeeze = as_batched(pa, torch.as_tensor(outcome))
    loss = bt_term(pa, pb.reshape(pa.shape), outcome)
    return loss[0] if squeeze else loss


def uses_pairs(members: list[Member]) -> bool:
    return any(m.loss.pair_weight > 0 for m in members)


def check_pairs_setting(members: list[Member], cfg: TrainConfig, heads=None) -> None:
    """A member with a pair_weight needs a pairs file; --pair-head names a head."""
    if uses_pairs(members) and not cfg.pairs:
        raise QamroError("--pair-weight trains on preference pairs: give them with --pairs FILE")
    if cfg.pair_head is not None and heads is not None and \
            cfg.pair_head not in [h.name for h in heads]:
        raise QamroError(f"--pair-head {cfg.pair_head}: the heads are "
                         f"{', '.join(h.name for h in heads)}")


def pair_context(cache: Cache, split, units, heads: tuple[HeadSpec, ...],
                 members: list[Member], cfg: TrainConfig, device) -> dict:
    """Context's `pairs` where a member has a pair_weight: the training pairs' unit rows
    and outcomes, on the device; {} otherwise. A cache whose heads read per-window features
    is refused: a pair compares clips, and its rows are windows."""
    check_pairs_setting(members, cfg, heads)
    if not uses_pairs(members):
        return {}
    if units.clip_of is not None:
        raise QamroError(f"{cache.path}: --pairs trains heads on clip-level features; these "
                         f"heads read per-window features (one row per window), which a pair "
                         f"of clips does not order; with --pool attention a member trains on "
                         f"clips, its windows pooled, and pairs can train it")
    joined = join_pairs(cache, cfg.pairs, training_clips(cache, split.val, split.eval))
    if not len(joined.outcome):
        raise QamroError(f"{cfg.pairs}: no pair has both clips among the training clips "
                         f"({joined.note()})")
    joined = validation_pairs(joined, cfg.val_fraction, cfg.split_seed)
    return {"pairs": PairRows.of(joined, heads, cfg.pair_head, device, joined.train),
            "val_pairs": PairRows.of(joined, heads, cfg.pair_head, device, joined.val)
            if len(joined.val) else None}


class PairRows:
    """The training pairs on the device: unit rows of clips a and b, outcomes, and which
    heads they train."""

    def __init__(self, first, second, outcome, head_mask, device):
        self.first = torch.as_tensor(first, dtype=torch.int64, device=device)  # [P]
        self.second = torch.as_tensor(second, dtype=torch.int64, device=device)
        self.outcome = torch.as_tensor(outcome, dtype=torch.float32, device=device)
        self.head_mask = torch.as_tensor(head_mask, dtype=torch.bool, device=device)  # [H]

    @classmethod
    def of(cls, joined: PairSet, heads, pair_head: str | None, device,
           take: np.ndarray) -> "PairRows":
        """The pairs `take` (indices into the joined pairs) on the device."""
        mask = np.array([pair_head is None or h.name == pair_head for h in heads])
        return cls(joined.first[take], joined.second[take], joined.outcome[take], mask,
                   device)


class PairTerm:
    """The Bradley-Terry part of each member's objective, step by step (module docstring).
    Called with the epoch, the step and a function giving each head's [K, R] outputs for
    unit rows [K, R] -> [2, H, K]: 0 in the regression part, w_k * L_BT in the ranking
    part of the heads the pairs train."""

    def __init__(self, rows: PairRows, members: list[Member], n_steps: int, device):
        self.rows = rows
        self.n = len(rows.outcome)
        self.per_step = math.ceil(self.n / max(n_steps, 1))
        self.weight = torch.tensor([m.loss.pair_weight for m in members], device=device)
        self.seeds = torch.tensor([member_seed(m.seed, "pairs") >> 1 for m in members],
                                  device=device)
        self.order: torch.Tensor | None = None

    def __call__(self, epoch, step: int,
                 outputs: Callable[[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        if step == 0:
            self.order = member_permutations(self.seeds, epoch, self.n)  # [K, P]
        m = self.per_step
        cols = torch.remainder(torch.arange(step * m, (step + 1) * m,
                                            device=self.order.device), self.n)
        take = self.order[:, cols]  # [K, m] pair indices
        units = torch.cat([self.rows.first[take], self.rows.second[take]], 1)  # [K, 2m]
        outcome = self.rows.outcome[take]
        per_head = []
        for p, on in zip(outputs(units), self.rows.head_mask):
            term = bt_term(p[:, :m], p[:, m:], outcome)  # [K]
            per_head.append(torch.where((self.weight > 0) & on, term * self.weight, 0.0))
        rank = torch.stack(per_head)  # [H, K]
        return torch.stack([torch.zeros_like(rank), rank])

    @torch.no_grad()
    def validate(self, rows: PairRows, outputs: Callable[[torch.Tensor], list[torch.Tensor]]
                 ) -> torch.Tensor:
        """[K] w_k * L_BT over every validation pair, mean over heads (as the validation
        loss's other terms): what early stopping adds for the members with a pair_weight."""
        p = len(rows.outcome)
        out = torch.zeros_like(self.weight)
        heads = 0
        for o, on in zip(outputs(torch.cat([rows.first, rows.second])), rows.head_mask):
            heads += 1
            if on:  # [K, 2P]: the same pairs for every member
                term = bt_term(o[:, :p], o[:, p:], rows.outcome[None])
                out = out + torch.where(self.weight > 0, term * self.weight, 0.0)
        return out / max(heads, 1)
