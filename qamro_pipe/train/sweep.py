"""Sweeps as data: a grid over loss, alpha, beta and seed becomes the members of one batched
run; results go to sweep.csv (one row per point, head and level) and sweep.png (Figure 1)."""
from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..config import (DEFAULT_SEEDS, USED_SETTINGS, LossConfig, Member, check_seeds,
                      check_used, override)
from ..errors import QamroError


def parse_list(text: str | None, cast=float) -> list | None:
    """"1,3,5" -> [1.0, 3.0, 5.0]; None stays None (not given)."""
    if text is None:
        return None
    try:
        return [cast(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise QamroError(f"cannot read {text!r} as a comma-separated list") from None


def seeds_of(seeds: int | list[int]) -> list[int]:
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


GRID_KEYS = ("loss", "alpha", "beta", "margin", "seeds")


def named_grid(recipe, name: str | None) -> dict[str, Any]:
    """A copy of the recipe's grid `name` ({} for None), refused if the recipe has none."""
    if name is None:
        return {}
    if name not in recipe.grids:
        raise QamroError(f"recipe {recipe.name!r} has no grid {name!r} "
                         f"(it has: {', '.join(recipe.grids) or 'none'})")
    return dict(recipe.grids[name])


def expand_grid(base: LossConfig, grid: dict[str, Any]) -> list[Member]:
    """{"loss": [...], "alpha": [...], "beta": [...], "margin": [...], "seeds": 3} -> members.

    Options a loss kind ignores (beta for "mr", all for "none") do not multiply its points;
    a setting that no kind of the grid reads is refused (it would change nothing)."""
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise QamroError(f"unknown sweep grid keys: {', '.join(sorted(unknown))} "
                         f"(a grid has {', '.join(GRID_KEYS)})")
    for key in ("loss", "alpha", "beta", "margin"):
        if key in grid and (not isinstance(grid[key], (list, tuple)) or not grid[key]):
            raise QamroError(f"--{key} {grid[key]!r}: give a non-empty list of values")
        if key != "loss" and key in grid and any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in grid[key]):
            raise QamroError(f"--{key} {grid[key]!r}: the values must be numbers")
    kinds = list(grid.get("loss") or [base.kind])
    check_used(kinds, [k for k in ("alpha", "beta", "margin") if k in grid])
    alphas = grid.get("alpha") or [base.alpha]
    betas = grid.get("beta") or [base.beta]
    margins = grid.get("margin") or [base.margin]
    check_seeds(grid.get("seeds", DEFAULT_SEEDS))
    seeds = seeds_of(grid.get("seeds", DEFAULT_SEEDS))
    members, seen = [], set()
    for kind in kinds:
        if kind == "qamro":
            points = [dict(alpha=a, beta=b) for a, b in itertools.product(alphas, betas)]
        elif kind == "mr":
            points = [dict(margin=m) for m in margins]
        else:
            points = [{}]
        for point, seed in itertools.product(points, seeds):
            loss = override(base, kind=kind, **{k: float(v) for k, v in point.items()})
            m = Member(loss=loss, seed=int(seed))
            if m not in seen:
                seen.add(m)
                members.append(m)
    return members


def setting_order(x) -> float:
    """Sort key for a row's alpha, beta or margin: numeric, a kind's unused ones (None) first."""
    return -np.inf if x is None else x


def sweep_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per member, head and level. A loss kind's unused settings are None (blank in
    the CSV, "-" in the table): QAMRO has no margin, L_MR no alpha or beta."""
    rows = []
    for entry in metrics["members"]:
        loss = entry["loss"]
        base = {"loss": loss["kind"], "seed": entry["seed"], "best_epoch": entry["best_epoch"],
                **{k: loss[k] if k in USED_SETTINGS[loss["kind"]] else None
                   for k in ("alpha", "beta", "margin")}}
        if "failed" in entry:
            rows.append({**base, "head": "", "level": "", "failed": entry["failed"]})
            continue
        for head, levels in entry["heads"].items():
            for level, figs in levels.items():
                rows.append({**base, "head": head, "level": level,
                             **{f: figs.get(f) for f in ("mse", "lcc", "srcc", "ktau")}})
    return rows


def write_sweep_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = ["loss", "alpha", "beta", "margin", "seed", "head", "level", "mse", "lcc", "srcc",
            "ktau", "best_epoch", "failed"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


def plot_sweep(path: Path, rows: list[dict[str, Any]], metric: str = "srcc",
               level: str = "system") -> None:
    """Metric against beta per head: mean and spread over seeds, one line per (loss, alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("level") == level and r.get(metric) is not None]
    heads = sorted({r["head"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(heads)), figsize=(5 * max(1, len(heads)), 3.6),
                             squeeze=False)
    for ax, head in zip(axes[0], heads):
        hr = [r for r in rows if r["head"] == head]
        baselines = iter(("dimgrey", "darkorange", "darkgreen", "purple", "brown", "black"))
        for (kind, alpha, margin), group in itertools.groupby(
                sorted(hr, key=lambda r: (r["loss"], setting_order(r["alpha"]),
                                          setting_order(r["margin"]))),
                key=lambda r: (r["loss"], r["alpha"], r["margin"])):
            group = list(group)
            betas = sorted({r["beta"] for r in group}, key=setting_order)
            vals = [[r[metric] for r in group if r["beta"] == b] for b in betas]
            mean = np.array([np.mean(v) for v in vals])
            std = np.array([np.std(v) for v in vals])
            if kind == "qamro" and len(betas) > 1:
                ax.errorbar(betas, mean, yerr=std, marker="o", capsize=3,
                            label=f"qamro alpha={alpha:g}")
            else:  # a flat reference line: L_MR per margin, no ranking term, a single beta
                if kind == "qamro":
                    label = f"qamro alpha={alpha:g} beta={betas[0]:g}"
                else:
                    label = f"mr margin={margin:g}" if kind == "mr" else "regression only"
                ax.axhline(mean.mean(), linestyle="--", color=next(baselines, "grey"),
                           label=label)
        ax.set_title(f"{head}: {level} {metric.upper()}")
        ax.set_xlabel("beta (quality preference)")
        ax.set_ylabel(metric.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
