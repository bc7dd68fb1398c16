"""Per-system predicted MOS with an interval, and P(system A ranks above system B): what a
person comparing generation systems asks of a run.

One bootstrap answers both. A resample draws, for every system on its own, as many of its
clips as it has, with replacement (the prompts it happened to be scored on), and, when the
run has several members, as many members as there are, with replacement (the seeds and
settings the score is the mean of). A system's resampled score is the mean over its drawn
clips of the mean over the drawn members. The interval is the central 95% of those scores;
P(A > B) is the share of resamples in which A's score exceeds B's (ties count for neither,
so P(A > B) + P(B > A) = 1 - P(tie)).

It is an interval for the *predicted* MOS: how far the number would move with other clips of
the same system and other members of the same recipe. The predictor's own error against
human ratings is not in it; the run's system-level figures say how large that is."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class SystemScores:
    """Systems ordered by predicted MOS, highest first."""

    names: np.ndarray  # [S] str
    clips: np.ndarray  # [S] clips of each system
    mos: np.ndarray  # [S] predicted MOS: mean over clips of the mean over members
    lo: np.ndarray  # [S] interval ends (NaN without resamples)
    hi: np.ndarray
    member_sd: np.ndarray | None  # [S] sd over members of the system's mean (ddof=1)
    above: np.ndarray | None  # [S, S] P(row's resampled score > column's); None: no resamples
    ties: np.ndarray | None  # [S, S] P(equal scores)
    resamples: int
    members: int
    level: float

    def separated_neighbours(self, threshold: float = 0.95) -> int:
        """How many pairs of neighbours in the ranking the resamples order the same way in at
        least `threshold` of the cases."""
        if self.above is None:
            return 0
        return int(sum(self.above[i, i + 1] >= threshold for i in range(len(self.names) - 1)))


def _member_weights(rng: np.random.Generator, members: int, n_boot: int) -> np.ndarray:
    """[R, M]: each resample's draw of members as weights summing to 1."""
    if members == 1:
        return np.ones((n_boot, 1))
    return rng.multinomial(members, np.full(members, 1 / members), size=n_boot) / members


def system_scores(preds: np.ndarray, systems: np.ndarray, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> SystemScores:
    """preds [M, N]: each member's score of N clips; systems [N]. Resamples as the module
    docstring says; n_boot=0 gives the point scores alone."""
    preds = np.atleast_2d(np.asarray(preds, np.float64))
    systems = np.asarray(systems)
    names = np.unique(systems)
    rows = [np.flatnonzero(systems == s) for s in names]
    mos = np.array([preds[:, r].mean() for r in rows])
    member_sd = (np.array([preds[:, r].mean(1).std(ddof=1) for r in rows])
                 if len(preds) > 1 else None)
    boot = None
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        weights = _member_weights(rng, len(preds), n_boot)  # [R, M]
        boot = np.empty((n_boot, len(names)))
        for s, r in enumerate(rows):  # one system at a time: [R, n_s], never [R, N]
            scores = weights @ preds[:, r]
            pick = rng.integers(0, len(r), size=(n_boot, len(r)))
            boot[:, s] = np.take_along_axis(scores, pick, axis=1).mean(1)
    order = np.argsort(-mos, kind="stable")
    q = (1 - level) / 2
    lo = np.quantile(boot, q, axis=0)[order] if boot is not None else np.full(len(names), np.nan)
    hi = np.quantile(boot, 1 - q, axis=0)[order] if boot is not None \
        else np.full(len(names), np.nan)
    above = ties = None
    if boot is not None:
        b = boot[:, order]
        above = (b[:, :, None] > b[:, None, :]).mean(0)  # [S, S]
        ties = (b[:, :, None] == b[:, None, :]).mean(0)
        np.fill_diagonal(above, np.nan)
        np.fill_diagonal(ties, np.nan)
    return SystemScores(names=names[order], clips=np.array([len(r) for r in rows])[order],
                        mos=mos[order], lo=lo, hi=hi,
                        member_sd=member_sd[order] if member_sd is not None else None,
                        above=above, ties=ties, resamples=n_boot if boot is not None else 0,
                        members=len(preds), level=level)


def _num(v) -> str:
    return "" if v is None or not np.isfinite(v) else f"{v:.6g}"


def write_systems_csv(path: Path, by_head: dict[str, tuple[SystemScores, dict[str, float]]]
                      ) -> None:
    """systems.csv: per head and system (best first) the rank, clips, predicted MOS, its
    interval, the sd over members and the true MOS where known (blank where not)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["head", "rank", "system", "clips", "pred_mos", "ci_lo", "ci_hi",
                    "sd_members", "true_mos"])
        for head, (s, true) in by_head.items():
            for i, name in enumerate(s.names):
                sd = s.member_sd[i] if s.member_sd is not None else None
                w.writerow([head, i + 1, name, int(s.clips[i]), _num(s.mos[i]), _num(s.lo[i]),
                            _num(s.hi[i]), _num(sd), _num(true.get(str(name)))])


def write_rank_csv(path: Path, s: SystemScores) -> None:
    """The matrix: row system, then P(row ranks above column) per column system, systems in
    the order of their predicted MOS; the diagonal is blank."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", *s.names])
        for i, name in enumerate(s.names):
            w.writerow([name, *(_num(v) for v in s.above[i])])
