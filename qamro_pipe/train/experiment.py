"""One training job from a recipe, a cache and a list of members to a finished run folder."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import (CVConfig, LossConfig, Member, TrainConfig, cache_root, check_used,
                      override, to_jsonable)
from ..errors import QamroError
from .joined import Source, join, rows_digest, split_feature
from .recipes import Recipe, load_recipe
from .runs import RUN_VERSION, check_out, clean_stale, save_run, summarise, versions
from ..store.reader import Cache, read_cache

# adds files to a run folder before it is renamed into place: (folder, metrics, cache)
Extra = Callable[[Path, dict[str, Any], Cache], None]


def recipe_configs(recipe: Recipe, train: dict[str, Any] | None = None,
                   loss: dict[str, Any] | None = None,
                   kinds: list[str] | None = None) -> tuple[TrainConfig, LossConfig]:
    """Defaults (config.py) < recipe overrides < the user's options (None = not given).

    Every setting is checked here, before any work: the recipe's (errors name its file),
    then the user's, and a loss setting that none of the loss kinds to be trained (`kinds`,
    default the resolved kind) reads is refused."""
    try:
        tcfg = override(TrainConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in recipe.train.items()})
        lcfg = override(LossConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in recipe.loss.items()})
        if lcfg.label_range is None and recipe.label_range is not None:
            lcfg = replace(lcfg, label_range=tuple(recipe.label_range))
    except (QamroError, TypeError) as e:
        raise QamroError(f"{recipe.where()}: {e}") from None
    tcfg, lcfg = override(tcfg, **(train or {})), override(lcfg, **(loss or {}))
    given = [k for k, v in (loss or {}).items() if v is not None and k != "kind"]
    check_used(kinds if kinds is not None else [lcfg.kind], given)
    if "gaussian-kl" in (kinds or [lcfg.kind]) and lcfg.label_range is None:
        raise QamroError(f"--loss gaussian-kl needs the labels' scale for its bins: "
                         f"{recipe.where()} declares no label_range")
    if lcfg.norm == "range" and lcfg.label_range is None:
        raise QamroError(f"--norm range needs the labels' scale: {recipe.where()} declares no "
                         f"label_range")
    if lcfg.quality_weight == "interval-table":
        check_interval_tables(recipe, tcfg)
    return tcfg, lcfg


def check_interval_tables(recipe: Recipe, tcfg: TrainConfig) -> None:
    """The published track 2 tables exist for its four axes, on the torch pair kernel."""
    from .losses import INTERVAL_TABLES

    other = [f"{h.name!r} ({h.label})" for h in recipe.heads if h.label not in INTERVAL_TABLES]
    if other:
        raise QamroError(f"--quality-weight interval-table: the published tables are for the "
                         f"labels {', '.join(INTERVAL_TABLES)}; {recipe.where()} has heads "
                         f"{', '.join(other)}")
    if tcfg.pair_kernel != "torch":
        raise QamroError("--quality-weight interval-table runs on --pair-kernel torch only "
                         "(the fused kernel computes Eq. 3's weight)")


def read_release_for(data: Cache, recipe: Recipe, tcfg: TrainConfig):
    """The released heads the run starts from or takes its label statistics from (None when
    neither): read once, before anything is written, since its file decides the numbers."""
    if "release" not in (tcfg.init, tcfg.label_stats):
        return None
    from .aes_release import read_release

    release = read_release(data, tcfg.release_checkpoint)
    release.for_heads(recipe.heads)
    return release


def open_cache(recipe: Recipe, cache: str | Path | None) -> tuple[Cache, list[Source]]:
    """The run's cache (--cache, else the recipe's default) joined with every other cache its
    heads read features from (joined.py), and those others."""
    return join(read_cache(Path(cache) if cache else recipe.default_cache()), recipe.heads)


def default_out(recipe: Recipe, members: list[Member], kind: str = "run") -> Path:
    first = members[0].loss
    if kind == "sweep":
        name = f"{recipe.name}-sweep"
    elif first.kind == "qamro":
        name = f"{recipe.name}-qamro-a{first.alpha:g}-b{first.beta:g}"
    elif first.kind == "mr":
        name = f"{recipe.name}-mr-m{first.margin:g}"
    elif first.kind != "none":
        name = f"{recipe.name}-{first.kind}"
    else:
        name = f"{recipe.name}-baseline"
    return cache_root() / "runs" / name


def run_experiment(recipe: Recipe | str, members: list[Member], tcfg: TrainConfig,
                   cache: str | Path | None = None, out: str | Path | None = None,
                   force: bool = False, kind: str = "run", progress=None, resume: bool = False,
                   cv: CVConfig | None = None, extra: Extra | None = None):
    """Train, evaluate, and write the run folder. Returns (folder, metrics, result, cache).
    An interrupted run with the same settings resumes from its saved state (resume.py).
    `cv` cross-validates instead (cv.py); `extra(folder, metrics, cache)` adds files to the
    folder before it is renamed into place (a table's table.md)."""
    from .resume import discard, fingerprint, training_state
    from .trainer import train

    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    data, sources = open_cache(recipe, cache)
    out = Path(out) if out else default_out(recipe, members, kind)
    clean_stale(out)  # what a killed run left: removed, or an interrupted --force finished
    check_out(out, force, data.path)  # refuse before spending time training
    release = read_release_for(data, recipe, tcfg)  # before anything is written
    if cv is not None:
        from .cv import run_cv

        return run_cv(recipe, data, members, tcfg, cv, out, force, kind, progress, resume,
                      extra, sources, release)
    system_note = system_level_note(data, recipe.heads, tcfg)  # before, not after, training
    label_range = tuple(recipe.label_range) if recipe.label_range else None
    fp = fingerprint(data, recipe.heads, members, tcfg, label_range, sources,
                     release.sha256 if release else None)
    with training_state(out, fp, tcfg, force, resume) as checkpoint:
        result = train(data, recipe.heads, members, tcfg, label_range=label_range,
                       progress=progress, checkpoint=checkpoint, release=release)
        folder, metrics = write_run(recipe, data, members, tcfg, result, out, force, kind,
                                    system_note, extra=extra, sources=sources)
        discard(out)
    return folder, metrics, result, data


def cost(result) -> dict[str, Any]:
    """What a run cost: epochs, members, member-epochs computed, seconds."""
    return {"epochs_run": result.epochs_run, "members": len(result.members),
            "member_epochs": result.member_epochs, "seconds": round(result.seconds, 3),
            "member_epochs_per_second": round(result.member_epochs / max(result.seconds, 1e-9),
                                              3),
            "resumed_from_epoch": result.resumed_from}


def base_config(recipe: Recipe, data: Cache, members: list[Member], tcfg: TrainConfig,
                sources: list[Source] = ()) -> dict[str, Any]:
    """What every run folder's config.json says of the recipe, cache (and the other caches its
    features come from), settings and members."""
    return {
        "qamro_run_version": RUN_VERSION, "recipe": recipe.name,
        "recipe_path": str(recipe.path) if recipe.path else None,
        "recipe_derived": recipe.derived,
        "cache": str(data.path.absolute()), "backbone": data.meta.backbone, "dataset": data.meta.dataset,
        "cache_key": data.meta.key, "cache_config": data.meta.config,
        "cache_rows": rows_digest(data, [f for h in recipe.heads for f in h.features
                                          if split_feature(f)[0] is None]),
        "feature_caches": [s.record() for s in sources],
        "label_names": list(data.label_names),
        "heads": to_jsonable(recipe.heads), "train": to_jsonable(tcfg),
        "members": [to_jsonable(m) for m in members], "versions": versions()}


def write_run(recipe: Recipe, data: Cache, members: list[Member], tcfg: TrainConfig, result,
              out: Path, force: bool, kind: str, system_note: dict[str, str],
              more_config: dict[str, Any] | None = None, extra: Extra | None = None,
              sources: list[Source] = ()) -> tuple[Path, dict[str, Any]]:
    metrics = summarise(data, result, tcfg)
    mark_system_level(metrics, system_note)
    config = {
        **base_config(recipe, data, members, tcfg, sources), "validation": result.split.val_source,
        "rows": {"train": len(result.split.train), "validation": len(result.split.val),
                 "eval": len(result.split.eval)},
        "device": result.device, "seconds": round(result.seconds, 3),
        "epochs_run": result.epochs_run, "cost": cost(result),
        "label_stats": {h: list(v) for h, v in result.label_stats.items()},
        "release": result.release,
        "failures": {str(k): v for k, v in result.failures.items()},
        "warnings": {str(k): v for k, v in result.warnings.items()}, **(more_config or {})}

    def extra_files(folder: Path) -> None:  # join the folder before it is renamed in
        from ..report.curves import write_curves

        write_curves(folder, metrics["members"])  # from the history.csv save_run wrote
        if kind == "sweep":
            write_sweep_files(folder, metrics, system_note)
        if extra is not None:
            extra(folder, metrics, data)

    folder = save_run(out, config=config, metrics=metrics, cache=data, result=result,
                      force=force, extra=extra_files)
    return folder, metrics


def write_sweep_files(folder: Path, metrics: dict[str, Any], system_note: dict[str, str]) -> None:
    """sweep.csv and sweep.png from the members' figures in metrics.json."""
    from ..report.plots import eval_counts, plot_sweep
    from .sweep import sweep_rows, write_sweep_csv

    rows = sweep_rows(metrics)
    write_sweep_csv(folder / "sweep.csv", rows)
    plot_sweep(folder / "sweep.png", rows, n_systems=eval_counts(metrics),
               split=metrics["eval_split"], level="utterance" if system_note else "system")


def system_level_note(cache: Cache, heads, tcfg: TrainConfig) -> dict[str, str]:
    """head -> why the eval split gives it no system-level figures (fewer than 2 systems
    among its labelled rows); heads left out have them. Decided before training."""
    from ..report.metrics import system_level_problem
    from .inputs import label_col

    rows = cache.rows(tcfg.eval_split)
    notes = {}
    for h in heads:
        labelled = rows[np.isfinite(cache.labels[rows, label_col(cache, h)])]
        problem = system_level_problem(cache.systems[labelled])
        if problem and len(labelled):
            notes[h.name] = f"eval split {tcfg.eval_split!r}: {problem}"
    return notes


def mark_system_level(metrics: dict[str, Any], notes: dict[str, str]) -> None:
    """Say in metrics.json whether system-level figures exist, and for which heads not."""
    why = "; ".join(dict.fromkeys(notes.values())) or None
    if why and len(notes) < len(metrics["heads"]):
        why = f"heads {', '.join(notes)}: {why}"
    metrics["system_level"] = {"computable": not notes, "why": why}
    for head, note in notes.items():
        metrics["heads"][head]["system"]["not_computable"] = note
