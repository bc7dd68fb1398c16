"""How well P(A over B) answers labelled pairs: accuracy, expected calibration error (ECE)
with its reliability diagram, Brier score, each with a bootstrap interval over pairs. Ties
(both clips judged alike) have no right answer for a two-way choice: they are counted and
reported apart, never scored."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .plots import new_figure

BINS = 10  # reliability bins of P(A over B), equal width over [0, 1]
LEVEL = 0.95  # the bootstrap intervals' coverage


def pair_figures(p: np.ndarray, a_won: np.ndarray) -> dict[str, float]:
    """accuracy (P >= 0.5 read as A), ECE over BINS equal-width bins (the bins' |mean P -
    share of A wins|, weighted by their counts) and Brier score (mean (P - [A won])^2)."""
    p, y = np.asarray(p, np.float64), np.asarray(a_won, np.float64)
    bins = np.minimum((p * BINS).astype(int), BINS - 1)
    ece = 0.0
    for b in range(BINS):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return {"accuracy": float(((p >= 0.5) == (y == 1)).mean()), "ece": float(ece),
            "brier": float(((p - y) ** 2).mean())}


def evaluate_pairs(p: np.ndarray, winners: list[str], n_boot: int = 1000, seed: int = 0
                   ) -> dict[str, Any]:
    """Figures with bootstrap intervals (pairs resampled with replacement) over the decided
    pairs; ties apart, with the mean P the model gave them."""
    p = np.asarray(p, np.float64)
    tie = np.array([w == "tie" for w in winners])
    won = np.array([w == "A" for w in winners])
    pd, yd = p[~tie], won[~tie]
    out: dict[str, Any] = {"pairs": len(p), "decided": int((~tie).sum()),
                           "ties": {"count": int(tie.sum()),
                                    "mean_p_a_over_b": float(p[tie].mean()) if tie.any()
                                    else None}}
    if len(pd) == 0:
        out["why"] = "every pair is a tie: nothing to score"
        return out
    out.update(pair_figures(pd, yd))
    rng = np.random.default_rng(seed)
    draws = [pair_figures(pd[i], yd[i]) for i in
             (rng.integers(0, len(pd), len(pd)) for _ in range(n_boot))]
    tail = (1 - LEVEL) / 2 * 100
    for k in ("accuracy", "ece", "brier"):
        vals = np.array([d[k] for d in draws])
        out[f"{k}_ci"] = [float(np.percentile(vals, tail)), float(np.percentile(vals, 100 - tail))]
    out["resamples"] = n_boot
    out["reliability"] = reliability(pd, yd)
    return out


def reliability(p: np.ndarray, a_won: np.ndarray) -> list[dict[str, float]]:
    """Per non-empty bin: its range, count, mean P and share of A wins."""
    bins = np.minimum((p * BINS).astype(int), BINS - 1)
    return [{"lo": b / BINS, "hi": (b + 1) / BINS, "n": int((bins == b).sum()),
             "mean_p": float(p[bins == b].mean()), "share_a": float(a_won[bins == b].mean())}
            for b in range(BINS) if (bins == b).any()]


def plot_reliability(path: Path, figures: dict[str, Any], head: str, what: str) -> None:
    """reliability-HEAD.png: share of A wins against mean P per bin (point size: pairs in
    it), the diagonal a calibrated model lies on, and the figures in the title."""
    fig = new_figure(5.2, 5.4)
    ax = fig.add_axes([0.13, 0.15, 0.8, 0.73])
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    bins = figures.get("reliability", [])
    if bins:
        n = np.array([b["n"] for b in bins])
        x, y = [b["mean_p"] for b in bins], [b["share_a"] for b in bins]
        ax.plot(x, y, color="tab:blue", lw=1)
        ax.scatter(x, y, s=20 + 200 * n / n.max(), color="tab:blue", zorder=3,
                   label="bins (size: pairs)")
        for b in bins:
            ax.annotate(str(b["n"]), (b["mean_p"], b["share_a"]), fontsize=7,  # off the axes
                        xytext=(4, 6 if b["share_a"] < 0.1 else -10), textcoords="offset points")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted P(A preferred over B), bin mean")
    ax.set_ylabel("share of pairs where A was preferred")
    ax.legend(loc="lower right", fontsize=8)
    title = f"{head}: reliability on {figures.get('decided', 0)} decided pairs"
    if "accuracy" in figures:
        title += (f"\naccuracy {figures['accuracy']:.3f}  ECE {figures['ece']:.3f}  "
                  f"Brier {figures['brier']:.3f}")
    ax.set_title(title, fontsize=9)
    ties = figures.get("ties", {}).get("count", 0)
    fig.text(0.02, 0.02, f"{what}. {BINS} equal-width bins; {ties} tie(s) left out.",
             fontsize=7, wrap=True)
    fig.savefig(path, dpi=130)
