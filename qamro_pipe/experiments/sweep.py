"""Sweeps as data: a grid over loss, alpha, beta and seed becomes the members of one batched
run; results go to sweep.csv (one row per point, head and level); report/plots.py draws
sweep.png (Figure 1) from the same rows."""
from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any

from ..config import DEFAULT_SEEDS, LossConfig, Member, check_seeds, check_used, override
from ..errors import QamroError
from ..loss_kinds import GRID_SETTINGS, KINDS, USED_SETTINGS


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


GRID_KEYS = ("loss", *GRID_SETTINGS, "seeds")


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
    for key in ("loss", *GRID_SETTINGS):
        if key in grid and (not isinstance(grid[key], (list, tuple)) or not grid[key]):
            raise QamroError(f"--{key} {grid[key]!r}: give a non-empty list of values")
        if key != "loss" and key in grid and any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in grid[key]):
            raise QamroError(f"--{key} {grid[key]!r}: the values must be numbers")
    kinds = list(grid.get("loss") or [base.kind])
    check_used(kinds, [k for k in GRID_SETTINGS if k in grid])
    values = {s: grid.get(s) or [getattr(base, s)] for s in GRID_SETTINGS}
    check_seeds(grid.get("seeds", DEFAULT_SEEDS))
    seeds = seeds_of(grid.get("seeds", DEFAULT_SEEDS))
    members, seen = [], set()
    for kind in kinds:
        own = KINDS[kind].grid  # the settings this kind's points differ in
        points = [dict(zip(own, combo))
                  for combo in itertools.product(*(values[s] for s in own))]
        for point, seed in itertools.product(points, seeds):
            loss = override(base, kind=kind, **{k: float(v) for k, v in point.items()})
            m = Member(loss=loss, seed=int(seed))
            if m not in seen:
                seen.add(m)
                members.append(m)
    return members


def sweep_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per member, head and level. A loss kind's unused settings are None (blank in
    the CSV, "-" in the table): QAMRO has no margin, L_MR no alpha or beta."""
    rows = []
    for entry in metrics["members"]:
        loss = entry["loss"]
        base = {"loss": loss["kind"], "seed": entry["seed"], "best_epoch": entry["best_epoch"],
                **{k: loss[k] if k in USED_SETTINGS[loss["kind"]] else None
                   for k in GRID_SETTINGS}}
        if "failed" in entry:
            rows.append({**base, "head": "", "level": "", "failed": entry["failed"]})
            continue
        for head, levels in entry["heads"].items():
            for level, figs in levels.items():
                rows.append({**base, "head": head, "level": level,
                             **{f: figs.get(f) for f in ("mse", "lcc", "srcc", "ktau")}})
    return rows


def write_sweep_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = ["loss", *GRID_SETTINGS, "seed", "head", "level", "mse", "lcc", "srcc",
            "ktau", "best_epoch", "failed"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
