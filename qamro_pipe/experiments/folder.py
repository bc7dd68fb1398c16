"""What every experiment shares: the job it runs (Job), and its run folder assembled beside
its name and then published (Staged), with the config, curves and sweep files every run
folder carries. run.py trains one job; cv.py cross-validates one."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from ..config import CVConfig, Member, TrainConfig, to_jsonable
from ..metrics import few_systems, system_level_problem
from ..report.curves import write_curves
from ..report.plots import eval_counts, plot_sweep
from ..store.reader import Cache
from ..train.inputs import label_col
from ..train.joined import Source, rows_digest, split_feature
from ..train.recipes import Recipe
from ..train.runs import RUN_VERSION, publish, stage_run_folder, summarise, versions
from .sweep import sweep_rows, write_sweep_csv


@dataclass(frozen=True)
class Job:
    """One training job, checked and ready: what run.py and cv.py read."""

    recipe: Recipe
    data: Cache  # the run's cache, joined with the caches its heads also read (sources)
    sources: list[Source]
    members: list[Member]
    tcfg: TrainConfig
    out: Path  # the run folder to publish (checked: ours to write)
    force: bool = False  # replace a run folder this tool wrote there
    kind: str = "run"  # "run", or "sweep" (adds sweep.csv and sweep.png)
    progress: Any = None  # train/progress.py's display, or None
    resume: bool = False  # insist on a saved state to resume
    cv: CVConfig | None = None  # cross-validate instead of one held-out split
    release: Any = None  # the released heads read for --init/--label-stats release, or None

    @property
    def label_range(self) -> tuple[float, float] | None:
        return tuple(self.recipe.label_range) if self.recipe.label_range else None


class Outcome(NamedTuple):
    """A published experiment: its folder, metrics.json, the training result, the cache."""

    folder: Path
    metrics: dict[str, Any]
    result: Any
    data: Cache


@dataclass
class Staged:
    """A run folder assembled in its staging folder and not yet published: add files to
    `folder`, then `publish()` renames it to `out` (whole or not at all) and runs the
    clean-ups that must wait until then (discarding the saved training states)."""

    folder: Path
    out: Path
    metrics: dict[str, Any]
    result: Any
    data: Cache
    after_publish: list[Callable[[], None]] = field(default_factory=list)
    published: Path | None = None

    def publish(self) -> Outcome:
        self.published = publish(self.folder, self.out)
        for done in self.after_publish:
            done()
        return self.outcome()

    def abandon(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def outcome(self) -> Outcome:
        return Outcome(self.published or self.out, self.metrics, self.result, self.data)


def cost(result) -> dict[str, Any]:
    """What a run cost: epochs, members, member-epochs computed, seconds."""
    return {"epochs_run": result.epochs_run, "members": len(result.members),
            "member_epochs": result.member_epochs, "seconds": round(result.seconds, 3),
            "member_epochs_per_second": round(result.member_epochs / max(result.seconds, 1e-9),
                                              3),
            "resumed_from_epoch": result.resumed_from}


def base_config(job: Job, data: Cache | None = None) -> dict[str, Any]:
    """What every run folder's config.json says of the recipe, cache (and the other caches its
    features come from), settings and members. `data`: a view of the job's cache (a fold's)."""
    data = job.data if data is None else data
    recipe = job.recipe
    return {
        "qamro_run_version": RUN_VERSION, "recipe": recipe.name,
        "recipe_path": str(recipe.path) if recipe.path else None,
        "recipe_derived": recipe.derived,
        "cache": str(data.path.absolute()), "backbone": data.meta.backbone,
        "dataset": data.meta.dataset,
        "cache_key": data.meta.key, "cache_config": data.meta.config,
        "cache_rows": rows_digest(data, [f for h in recipe.heads for f in h.features
                                          if split_feature(f)[0] is None]),
        "feature_caches": [s.record() for s in job.sources],
        "label_names": list(data.label_names),
        "heads": to_jsonable(recipe.heads), "train": to_jsonable(job.tcfg),
        "members": [to_jsonable(m) for m in job.members], "versions": versions()}


def stage_run(job: Job, result, out: Path, system_note: dict[str, str], *,
              data: Cache | None = None, tcfg: TrainConfig | None = None,
              kind: str | None = None, force: bool | None = None,
              more_config: dict[str, Any] | None = None,
              more_metrics: dict[str, Any] | None = None) -> Staged:
    """A trained result as a staged run folder: config.json, metrics.json, predictions,
    heads, history, curves.png (and sweep.csv/.png for a sweep). `data`, `tcfg`, `kind` and
    `force` default to the job's (a cross-validation fold passes its own)."""
    data = job.data if data is None else data
    tcfg = job.tcfg if tcfg is None else tcfg
    metrics = {**summarise(data, result, tcfg), **(more_metrics or {})}
    mark_system_level(metrics, system_note)
    config = {
        **base_config(replace(job, tcfg=tcfg), data), "validation": result.split.val_source,
        "rows": {"train": len(result.split.train), "validation": len(result.split.val),
                 "eval": len(result.split.eval)},
        "device": result.device, "seconds": round(result.seconds, 3),
        "epochs_run": result.epochs_run, "cost": cost(result),
        "label_stats": {h: list(v) for h, v in result.label_stats.items()},
        "release": result.release,
        "failures": {str(k): v for k, v in result.failures.items()},
        "warnings": {str(k): v for k, v in result.warnings.items()}, **(more_config or {})}
    folder = stage_run_folder(out, config=config, metrics=metrics, cache=data, result=result,
                              force=job.force if force is None else force)
    try:
        write_curves(folder, metrics["members"])  # from the history.csv just written
        if (job.kind if kind is None else kind) == "sweep":
            write_sweep_files(folder, metrics, system_note)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Staged(folder, Path(out), metrics, result, data)


def write_sweep_files(folder: Path, metrics: dict[str, Any], system_note: dict[str, str]) -> None:
    """sweep.csv and sweep.png from the members' figures in metrics.json."""
    rows = sweep_rows(metrics)
    write_sweep_csv(folder / "sweep.csv", rows)
    plot_sweep(folder / "sweep.png", rows, n_systems=eval_counts(metrics),
               split=metrics["eval_split"], level="utterance" if system_note else "system")


def system_level_note(cache: Cache, heads, tcfg: TrainConfig) -> dict[str, str]:
    """head -> why the eval split gives it no system-level figures (fewer than 2 systems
    among its labelled rows); heads left out have them. Decided before training."""
    rows = cache.rows(tcfg.eval_split)
    notes = {}
    for h in heads:
        labelled = rows[np.isfinite(cache.labels[rows, label_col(cache, h)])]
        problem = system_level_problem(cache.systems[labelled])
        if problem and len(labelled):
            notes[h.name] = f"eval split {tcfg.eval_split!r}: {problem}"
    return notes


def few_systems_warning(cache: Cache, heads, tcfg: TrainConfig) -> str | None:
    """A caution when the eval split's labelled clips come from only a few systems."""
    rows = cache.rows(tcfg.eval_split)
    labelled = rows[np.isfinite(cache.labels[rows][:, [label_col(cache, h) for h in heads]])
                    .any(axis=1)]
    why = few_systems(cache.systems[labelled])
    return why and f"eval split {tcfg.eval_split!r}: {why}"


def mark_system_level(metrics: dict[str, Any], notes: dict[str, str]) -> None:
    """Say in metrics.json whether system-level figures exist, and for which heads not."""
    why = "; ".join(dict.fromkeys(notes.values())) or None
    if why and len(notes) < len(metrics["heads"]):
        why = f"heads {', '.join(notes)}: {why}"
    metrics["system_level"] = {"computable": not notes, "why": why}
    for head, note in notes.items():
        metrics["heads"][head]["system"]["not_computable"] = note
