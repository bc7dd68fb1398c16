"""One training job from a recipe, a cache and a list of members to a finished run folder:
checked (`prepare`), trained and staged (`stage`), then published."""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from ..config import (CVConfig, LossConfig, Member, TrainConfig, cache_root, check_used,
                      override, tuples)
from ..errors import QamroError
from ..loss_kinds import KINDS, run_name
from ..store.reader import Cache, read_cache
from ..train.aes_release import read_release
from ..train.joined import Source, join
from ..train.losses import INTERVAL_TABLES
from ..train.recipes import Recipe, load_recipe
from ..train.resume import discard, fingerprint, training_state
from ..train.runs import check_out, clean_stale
from ..train.trainer import train
from .cv import stage_cv
from .folder import Job, Outcome, Staged, stage_run, system_level_note


def recipe_configs(recipe: Recipe, train: dict[str, Any] | None = None,
                   loss: dict[str, Any] | None = None,
                   kinds: list[str] | None = None) -> tuple[TrainConfig, LossConfig]:
    """Defaults (config.py) < recipe overrides < the user's options (None = not given).

    Every setting is checked here, before any work: the recipe's (errors name its file),
    then the user's, and a loss setting that none of the loss kinds to be trained (`kinds`,
    default the resolved kind) reads is refused."""
    try:
        tcfg = override(TrainConfig(), **tuples(recipe.train))
        lcfg = override(LossConfig(), **tuples(recipe.loss))
        if lcfg.label_range is None and recipe.label_range is not None:
            lcfg = replace(lcfg, label_range=tuple(recipe.label_range))
    except (QamroError, TypeError) as e:
        raise QamroError(f"{recipe.where()}: {e}") from None
    tcfg, lcfg = override(tcfg, **(train or {})), override(lcfg, **(loss or {}))
    given = [k for k, v in (loss or {}).items() if v is not None and k != "kind"]
    check_used(kinds if kinds is not None else [lcfg.kind], given)
    for kind in kinds or [lcfg.kind]:
        if KINDS[kind].needs_label_range and lcfg.label_range is None:
            raise QamroError(f"--loss {kind} needs the labels' scale for its bins: "
                             f"{recipe.where()} declares no label_range")
    if lcfg.norm == "range" and lcfg.label_range is None:
        raise QamroError(f"--norm range needs the labels' scale: {recipe.where()} declares no "
                         f"label_range")
    if lcfg.quality_weight == "interval-table":
        check_interval_tables(recipe, tcfg)
    return tcfg, lcfg


def check_interval_tables(recipe: Recipe, tcfg: TrainConfig) -> None:
    """The published track 2 tables exist for its four axes."""
    other = [f"{h.name!r} ({h.label})" for h in recipe.heads if h.label not in INTERVAL_TABLES]
    if other:
        raise QamroError(f"--quality-weight interval-table: the published tables are for the "
                         f"labels {', '.join(INTERVAL_TABLES)}; {recipe.where()} has heads "
                         f"{', '.join(other)}")


def read_release_for(data: Cache, recipe: Recipe, tcfg: TrainConfig):
    """The released heads the run starts from or takes its label statistics from (None when
    neither): read once, before anything is written, since its file decides the numbers."""
    if "release" not in (tcfg.init, tcfg.label_stats):
        return None
    release = read_release(data, tcfg.release_checkpoint)
    release.for_heads(recipe.heads)
    return release


def open_cache(recipe: Recipe, cache: str | Path | None) -> tuple[Cache, list[Source]]:
    """The run's cache (--cache, else the recipe's default) joined with every other cache its
    heads read features from (joined.py), and those others."""
    return join(read_cache(Path(cache) if cache else recipe.default_cache()), recipe.heads)


def default_out(recipe: Recipe, members: list[Member], kind: str = "run") -> Path:
    name = "sweep" if kind == "sweep" else run_name(members[0].loss)
    return cache_root() / "runs" / f"{recipe.name}-{name}"


def prepare(recipe: Recipe | str, members: list[Member], tcfg: TrainConfig,
            cache: str | Path | None = None, out: str | Path | None = None,
            force: bool = False, kind: str = "run", progress=None, resume: bool = False,
            cv: CVConfig | None = None) -> Job:
    """The job, checked before any work: the cache opened, the run folder ours to write,
    the release read (its file decides the numbers)."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    data, sources = open_cache(recipe, cache)
    out = Path(out) if out else default_out(recipe, members, kind)
    clean_stale(out)  # what a killed run left: removed, or an interrupted --force finished
    check_out(out, force, data.path)  # refuse before spending time training
    release = read_release_for(data, recipe, tcfg)
    return Job(recipe, data, sources, members, tcfg, out, force, kind, progress, resume, cv,
               release)


@contextlib.contextmanager
def stage(job: Job) -> Iterator[Staged]:
    """Train the job (or resume it from its saved state) and yield its run folder staged:
    the block adds files to `staged.folder`; when it ends the folder is published (renamed
    into place, whole) and the saved training state goes. An exception in the block leaves
    no folder and keeps the state, so the same command resumes."""
    if job.cv is not None:
        with stage_cv(job) as staged:
            yield staged
        return
    note = system_level_note(job.data, job.recipe.heads, job.tcfg)  # before training
    fp = fingerprint(job.data, job.recipe.heads, job.members, job.tcfg, job.label_range,
                     job.sources, job.release.sha256 if job.release else None)
    with training_state(job.out, fp, job.tcfg, job.force, job.resume) as checkpoint:
        result = train(job.data, job.recipe.heads, job.members, job.tcfg,
                       label_range=job.label_range, progress=job.progress,
                       checkpoint=checkpoint, release=job.release)
        staged = stage_run(job, result, job.out, note)
        staged.after_publish.append(lambda: discard(job.out))
        try:
            yield staged
        except BaseException:
            staged.abandon()
            raise
        staged.publish()


def run_experiment(recipe: Recipe | str, members: list[Member], tcfg: TrainConfig,
                   cache: str | Path | None = None, out: str | Path | None = None,
                   force: bool = False, kind: str = "run", progress=None, resume: bool = False,
                   cv: CVConfig | None = None) -> Outcome:
    """Train, evaluate, and write the run folder. An interrupted run with the same settings
    resumes from its saved state (train/resume.py); `cv` cross-validates instead (cv.py)."""
    job = prepare(recipe, members, tcfg, cache, out, force, kind, progress, resume, cv)
    with stage(job) as staged:
        pass
    return staged.outcome()
