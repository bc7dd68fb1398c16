"""The offline demo, both stages end to end: it sits above them (stage 2 never imports
stage 1)."""
from __future__ import annotations

from typing import Any

from .config import ExtractConfig, cache_root
from .extract.datasets import load_dataset
from .extract.loop import extract
from .experiments.run import recipe_configs, run_experiment
from .train.recipes import load_recipe
from .experiments.sweep import expand_grid, sweep_rows


def run_demo(progress: bool = True) -> dict[str, Any]:
    """The offline demo end to end: synthetic corpus -> melstats cache -> QAMRO run -> beta
    sweep. Everything lands under the cache root; rerunning reuses the corpus and cache."""
    recipe = load_recipe("demo")
    records = load_dataset("demo", cache_root() / "demo-corpus", rewrite=True)
    ext = extract(records, ExtractConfig(backbone=recipe.backbone, device="cpu"),
                  recipe.default_cache(), progress=progress)
    tcfg, lcfg = recipe_configs(recipe)
    run = run_experiment(recipe, expand_grid(lcfg, {"seeds": 1}), tcfg, force=True)
    members = expand_grid(lcfg, recipe.grids["beta"])
    sweep = run_experiment(recipe, members, tcfg, force=True, kind="sweep")
    rows = sweep_rows(sweep[1])
    return {"extract": ext, "run": run, "sweep": sweep, "sweep_rows": rows}
