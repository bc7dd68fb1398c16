"""The offline demo, both stages end to end: it sits above them (stage 2 never imports
stage 1)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

from .config import ExtractConfig, cache_root
from .experiments.run import recipe_configs, run_experiment
from .experiments.sweep import expand_grid, sweep_rows
from .extract.datasets import load_dataset
from .extract.loop import extract
from .train.recipes import load_recipe

Watch = Callable[[str], ContextManager[Any]]


def run_demo(progress: bool = True, watch: Watch | None = None,
             done: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """The offline demo end to end: synthetic corpus -> melstats cache -> QAMRO run -> beta
    sweep. Everything lands under the cache root; rerunning reuses the corpus and cache.
    `watch(what)` gives each training its progress display (a context manager yielding
    `train(progress=...)`'s callable, or None); `done(stage, result)` hears of each stage
    ("extract", "run", "sweep") as it finishes, so its results show while the next runs."""
    watch = watch or (lambda what: contextlib.nullcontext())
    done = done or (lambda stage, result: None)
    recipe = load_recipe("demo")
    records = load_dataset("demo", cache_root() / "demo-corpus", rewrite=True)
    ext = extract(records, ExtractConfig(backbone=recipe.backbone, device="cpu"),
                  recipe.default_cache(), progress=progress)
    done("extract", ext)
    tcfg, lcfg = recipe_configs(recipe)
    with watch("demo run") as display:
        run = run_experiment(recipe, expand_grid(lcfg, {"seeds": 1}), tcfg, force=True,
                             progress=display)
    done("run", run)
    members = expand_grid(lcfg, recipe.grids["beta"])
    with watch("demo sweep") as display:
        sweep = run_experiment(recipe, members, tcfg, force=True, kind="sweep",
                               progress=display)
    rows = sweep_rows(sweep[1])
    out = {"extract": ext, "run": run, "sweep": sweep, "sweep_rows": rows}
    done("sweep", out)
    return out
