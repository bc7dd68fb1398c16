"""One training job from a recipe, a cache and a list of members to a finished run folder:
checked (`prepare`), trained and staged (`stage`), then published."""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from ..config import (
    PAIR_WEIGHT,
    CVConfig,
    LossConfig,
    Member,
    TrainConfig,
    cache_root,
    check_used,
    override,
    tuples,
)
from ..errors import QamroError
from ..loss_kinds import KINDS
from ..store.reader import Cache, read_cache
from ..train.aes_release import read_release
from ..train.holdout import eval_split_warning, holdout_view, needs_holdout
from ..train.joined import Source, join, split_feature
from ..train.losses import INTERVAL_TABLES
from ..train.pairs_join import join_pairs, training_clips, validation_pairs
from ..train.pairs_term import check_pairs_setting, uses_pairs
from ..train.recipes import Recipe, load_recipe
from ..train.resume import discard, fingerprint, training_state
from ..train.runs import check_out, clean_stale
from ..train.trainer import make_split, train
from .cv import stage_cv
from .folder import Job, Outcome, Staged, few_systems_warning, stage_run, system_level_note
from .naming import run_name


def recipe_configs(recipe: Recipe, train: dict[str, Any] | None = None,
                   loss: dict[str, Any] | None = None,
                   kinds: list[str] | None = None,
                   pair_default: bool = True) -> tuple[TrainConfig, LossConfig]:
    """Defaults (config.py) < recipe overrides < the user's options (None = not given).
    With a pairs file and no pair_weight given (`pair_default`), the members weigh the pairs
    by config.PAIR_WEIGHT (a table's rows say their own weight instead).

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
    if pair_default and tcfg.pairs and (loss or {}).get("pair_weight") is None \
            and "pair_weight" not in recipe.loss:
        lcfg = replace(lcfg, pair_weight=PAIR_WEIGHT)
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


def check_features(recipe: Recipe, data: Cache) -> None:
    """Every feature the recipe's heads read is in the cache; if not, say which backbone the
    recipe is written for (an aes-natural cache made by melstats has no `layers`)."""
    have = set(data.features) | set(data.windows)
    for h in recipe.heads:
        for f in h.features:
            if split_feature(f)[0] is None and f not in have:
                raise QamroError(
                    f"{data.path}: the {recipe.name} recipe's head {h.name!r} reads {f!r}, which "
                    f"the {recipe.backbone} backbone writes; this cache was made by "
                    f"{data.meta.backbone} (it has {', '.join(sorted(have)) or 'none'}). "
                    f"Extract with --backbone {recipe.backbone}, or give --recipe a recipe "
                    f"whose heads read these features (docs/recipes.md)")


def unconverged(result, tcfg: TrainConfig) -> str | None:
    """Members that --max-epochs stopped before early stopping could: still improving."""
    capped = [k for k, e in enumerate(result.stopped_epoch)
              if k not in result.failures and e >= tcfg.max_epochs]
    if not capped:
        return None
    return (f"{len(capped)} of {len(result.members)} member(s) reached --max-epochs "
            f"{tcfg.max_epochs} before early stopping (patience {tcfg.patience}) ended them: "
            f"their validation loss had improved within the last {tcfg.patience} epochs; raise "
            f"--max-epochs for converged heads")


def default_out(recipe: Recipe, members: list[Member], kind: str = "run",
                backbone: str | None = None, cv: CVConfig | None = None) -> Path:
    """CACHE_ROOT/runs/NAME, NAME carrying the backbone, loss settings and cv (naming.py)."""
    base = recipe_configs(recipe)[1]
    return cache_root() / "runs" / run_name(recipe.name, backbone or recipe.backbone, members,
                                            base, kind, cv)


def prepare(recipe: Recipe | str, members: list[Member], tcfg: TrainConfig,
            cache: str | Path | None = None, out: str | Path | None = None,
            force: bool = False, kind: str = "run", progress=None, resume: bool = False,
            cv: CVConfig | None = None) -> Job:
    """The job, checked before any work: the cache opened, the run folder ours to write,
    the release read (its file decides the numbers)."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    data, sources = open_cache(recipe, cache)
    check_features(recipe, data)
    out = Path(out) if out else default_out(recipe, members, kind, data.meta.backbone, cv)
    clean_stale(out)  # what a killed run left: removed, or an interrupted --force finished
    check_out(out, force, data.path)  # refuse before spending time training
    check_pairs_setting(members, tcfg, recipe.heads)
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
    data, tcfg, holdout = job.data, job.tcfg, None
    if needs_holdout(data, tcfg):  # no report split: hold out a seeded share of train
        data, tcfg, holdout = holdout_view(data, tcfg)
    report: dict[str, Any] = {"eval_holdout": holdout} if holdout else {}
    warnings = [w for w in [eval_split_warning(tcfg),
                            few_systems_warning(data, job.recipe.heads, tcfg)] if w]
    note = system_level_note(data, job.recipe.heads, tcfg)  # before training
    pairs = pairs_record(data, job.recipe.heads, job.members, tcfg)
    if pairs:
        report["pairs"] = pairs
    fp = fingerprint(data, job.recipe.heads, job.members, tcfg, job.label_range,
                     job.sources, job.release.sha256 if job.release else None)
    with training_state(job.out, fp, tcfg, job.force, job.resume) as checkpoint:
        result = train(data, job.recipe.heads, job.members, tcfg,
                       label_range=job.label_range, progress=job.progress,
                       checkpoint=checkpoint, release=job.release)
        warnings += [w for w in [unconverged(result, tcfg)] if w]
        if warnings:
            report["warnings"] = warnings
        more = {**({"eval_holdout": holdout} if holdout else {}),
                **({"pairs": pairs} if pairs else {})}
        staged = stage_run(job, result, job.out, note, data=data, tcfg=tcfg,
                           more_config=more or None, more_metrics=report)
        staged.after_publish.append(lambda: discard(job.out))
        try:
            yield staged
        except BaseException:
            staged.abandon()
            raise
        staged.publish()


def pairs_record(data: Cache, heads, members: list[Member], tcfg: TrainConfig
                 ) -> dict[str, Any] | None:
    """What config.json and metrics.json say of the preference pairs a run trains on (the
    file, its sha256, how many pairs train and how many were left out, and why), or None."""
    if not (tcfg.pairs and uses_pairs(members)):
        return None
    split = make_split(data, heads, tcfg)
    joined = join_pairs(data, tcfg.pairs, training_clips(data, split.val, split.eval))
    joined = validation_pairs(joined, tcfg.val_fraction, tcfg.split_seed)
    return {**joined.record(), "note": joined.note()}


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
