"""One training job from a recipe, a cache and a list of members to a finished run folder."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import LossConfig, Member, TrainConfig, cache_root, override, to_jsonable
from ..errors import QamroError
from .recipes import Recipe, load_recipe
from .runs import RUN_VERSION, check_out, clean_stale, save_run, summarise, versions
from ..store.reader import Cache, read_cache


def recipe_configs(recipe: Recipe, train: dict[str, Any] | None = None,
                   loss: dict[str, Any] | None = None) -> tuple[TrainConfig, LossConfig]:
    """Defaults (config.py) < recipe overrides < the user's options (None = not given)."""
    tcfg = override(TrainConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in recipe.train.items()})
    lcfg = override(LossConfig(), **recipe.loss)
    if lcfg.label_range is None and recipe.label_range is not None:
        lcfg = replace(lcfg, label_range=tuple(recipe.label_range))
    return override(tcfg, **(train or {})), override(lcfg, **(loss or {}))


def open_cache(recipe: Recipe, cache: str | Path | None) -> Cache:
    return read_cache(Path(cache) if cache else recipe.default_cache())


def default_out(recipe: Recipe, members: list[Member], kind: str = "run") -> Path:
    first = members[0].loss
    if kind == "sweep":
        name = f"{recipe.name}-sweep"
    elif first.kind == "qamro":
        name = f"{recipe.name}-qamro-a{first.alpha:g}-b{first.beta:g}"
    elif first.kind == "mr":
        name = f"{recipe.name}-mr-m{first.margin:g}"
    else:
        name = f"{recipe.name}-baseline"
    return cache_root() / "runs" / name


def run_experiment(recipe: Recipe | str, members: list[Member], tcfg: TrainConfig,
                   cache: str | Path | None = None, out: str | Path | None = None,
                   force: bool = False, kind: str = "run", progress=None, resume: bool = False):
    """Train, evaluate, and write the run folder. Returns (folder, metrics, result, cache).
    An interrupted run with the same settings resumes from its saved state (resume.py)."""
    from .resume import discard, fingerprint, training_state
    from .trainer import train

    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    data = open_cache(recipe, cache)
    out = Path(out) if out else default_out(recipe, members, kind)
    clean_stale(out)  # what a killed run left: removed, or an interrupted --force finished
    check_out(out, force, data.path)  # refuse before spending time training
    label_range = tuple(recipe.label_range) if recipe.label_range else None
    fp = fingerprint(data, recipe.heads, members, tcfg, label_range)
    with training_state(out, fp, tcfg, force, resume) as checkpoint:
        result = train(data, recipe.heads, members, tcfg, label_range=label_range,
                       progress=progress, checkpoint=checkpoint)
        folder, metrics = _write_run(recipe, data, members, tcfg, result, out, force, kind)
        discard(out)
    return folder, metrics, result, data


def cost(result) -> dict[str, Any]:
    """What a run cost: epochs, members, member-epochs computed, seconds."""
    return {"epochs_run": result.epochs_run, "members": len(result.members),
            "member_epochs": result.member_epochs, "seconds": round(result.seconds, 3),
            "member_epochs_per_second": round(result.member_epochs / max(result.seconds, 1e-9),
                                              3),
            "resumed_from_epoch": result.resumed_from}


def _write_run(recipe: Recipe, data: Cache, members: list[Member], tcfg: TrainConfig, result,
               out: Path, force: bool, kind: str) -> tuple[Path, dict[str, Any]]:
    metrics = summarise(data, result, tcfg)
    config = {
        "qamro_run_version": RUN_VERSION, "recipe": recipe.name,
        "recipe_path": str(recipe.path) if recipe.path else None,
        "cache": str(data.path), "backbone": data.meta.backbone, "dataset": data.meta.dataset,
        "cache_key": data.meta.key, "cache_config": data.meta.config,
        "label_names": list(data.label_names),
        "heads": to_jsonable(recipe.heads), "train": to_jsonable(tcfg),
        "members": [to_jsonable(m) for m in members], "validation": result.split.val_source,
        "rows": {"train": len(result.split.train), "validation": len(result.split.val),
                 "eval": len(result.split.eval)},
        "device": result.device, "seconds": round(result.seconds, 3),
        "epochs_run": result.epochs_run, "cost": cost(result), "versions": versions(),
        "label_stats": {h: list(v) for h, v in result.label_stats.items()},
        "failures": {str(k): v for k, v in result.failures.items()},
        "warnings": {str(k): v for k, v in result.warnings.items()}}
    def extra_files(folder: Path) -> None:  # join the folder before it is renamed in
        from ..report.curves import write_curves

        write_curves(folder, metrics["members"])  # from the history.csv save_run wrote
        if kind == "sweep":
            from ..report.plots import eval_counts, plot_sweep
            from .sweep import sweep_rows, write_sweep_csv

            rows = sweep_rows(metrics)
            write_sweep_csv(folder / "sweep.csv", rows)
            plot_sweep(folder / "sweep.png", rows, n_systems=eval_counts(metrics),
                       split=metrics["eval_split"])

    folder = save_run(out, config=config, metrics=metrics, cache=data, result=result,
                      force=force, extra=extra_files)
    return folder, metrics
