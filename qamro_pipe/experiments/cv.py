"""Grouped K-fold cross-validation (`--cv K`): figures with a spread on data too small for one
held-out split, as UTMOSv2 reports them.

The pool is every labelled clip of the train split and of the eval split. sklearn's
GroupKFold cuts it into K folds so that a group (a system, or a prompt) lies in one fold
only. Fold f trains every member on the other K-1 folds' clips and reports on its own:
- early stopping uses a holdout of the fold's *training* clips (--val-split holdout, the
  default) or a split outside the pool; a pool split named by --val-split is refused, so no
  fold ever stops on the clips it reports on;
- each fold is an ordinary run of trainer.train on a view of the cache whose splits are
  relabelled (the fold's clips HELD_OUT, the rest of the pool "train"), so its saved state
  carries the relabelled splits in its fingerprint and is never resumed as another fold's.
  States live beside the run folder as .NAME.cvF-of-K.partial until the whole folder is
  written; an interrupted cross-validation reruns finished folds from their final state.
Folds combine two ways, both in metrics.json: `heads`, the mean ± sd over folds of each
fold's figures (its clips, the mean over members), and `pooled`, the figures of the pooled
out-of-fold predictions (every clip scored once, by the fold that did not see it) with their
95% bootstrap intervals. The folder holds config.json, metrics.json, predictions.csv (the
out-of-fold predictions, with each clip's fold) and fold-0 .. fold-(K-1), each a whole run."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import CVConfig, Member, TrainConfig, to_jsonable
from ..errors import QamroError
from ..metrics import FIGURES, TOP_FIGURES, mean_sd, system_level_problem
from ..store.reader import Cache
from ..train.groups import SINGLE, group_keys
from ..train.inputs import label_col
from ..train.resume import discard, fingerprint, partial_dir, training_state
from ..train.runs import check_out, head_metrics, json_text, staging, write_predictions
from ..train.trainer import train, usable_members
from .folder import (
    Job,
    Staged,
    base_config,
    cost,
    mark_system_level,
    stage_run,
    system_level_note,
    write_sweep_files,
)

HELD_OUT = "cv-held-out"  # the split name a fold's own clips carry in its view of the cache


@dataclass
class Folds:
    cfg: CVConfig
    splits: list[str]  # the splits pooled
    pool: np.ndarray  # cache rows cross-validated (sorted)
    held_out: list[np.ndarray]  # per fold, its cache rows (sorted)
    groups: list[list[str]]  # per fold, the groups it holds out
    ungrouped: list[int]  # per fold, its clips without a system (each a group of its own)

    def fold_of(self, n: int) -> np.ndarray:
        """[n] each cache row's fold, -1 outside the pool."""
        out = np.full(n, -1)
        for f, rows in enumerate(self.held_out):
            out[rows] = f
        return out

    def train_rows(self, f: int) -> np.ndarray:
        return np.setdiff1d(self.pool, self.held_out[f])


def make_folds(cache: Cache, heads, tcfg: TrainConfig, cv: CVConfig) -> Folds:
    """The K folds, checked before any training."""
    splits = list(dict.fromkeys(["train", tcfg.eval_split]))
    if tcfg.val_split != "holdout" and tcfg.val_split in splits:
        raise QamroError(f"--cv with --val-split {tcfg.val_split}: that split is cross-"
                         f"validated, so folds would early-stop on the clips they report on; "
                         f"use --val-split holdout (a share of each fold's training clips)")
    if HELD_OUT in set(cache.splits):
        raise QamroError(f"{cache.path}: a split is named {HELD_OUT!r}, the name "
                         f"cross-validation gives a fold's clips; rename it to use --cv")
    labelled = np.isfinite(cache.labels[:, [label_col(cache, h) for h in heads]]).any(axis=1)
    pool = np.sort(np.concatenate([cache.rows(s) for s in splits]))
    pool = pool[labelled[pool]]
    keys = group_keys(cache, pool, cv.group)
    n_groups = len(np.unique(keys))
    if n_groups < cv.folds:
        alone = " (a clip without a system counting as one)" if any(
            k.startswith(SINGLE) for k in keys) else ""
        raise QamroError(f"--cv {cv.folds}: the {len(pool)} labelled clips of "
                         f"{' and '.join(splits)} hold {n_groups} {cv.group}(s){alone}, and "
                         f"each fold needs one; use --cv {n_groups} or fewer")
    from sklearn.model_selection import GroupKFold  # on use: 0.4 s at import, every run

    held, groups, ungrouped = [], [], []
    for _, test in GroupKFold(n_splits=cv.folds).split(pool, groups=keys):
        held.append(np.sort(pool[test]))
        groups.append(sorted({k for k in keys[test] if not k.startswith(SINGLE)}))
        ungrouped.append(sum(k.startswith(SINGLE) for k in keys[test]))
    return Folds(cfg=cv, splits=splits, pool=pool, held_out=held, groups=groups,
                 ungrouped=ungrouped)


def fold_view(cache: Cache, folds: Folds, f: int) -> Cache:
    """The cache as fold f trains on it: its clips are HELD_OUT, the rest of the pool is
    "train", every other row keeps its split (features and labels are shared, not copied)."""
    splits = cache.splits.astype(object)
    splits[folds.pool] = "train"
    splits[folds.held_out[f]] = HELD_OUT
    return replace(cache, splits=splits.astype(str))


def fold_out(out: Path, f: int, k: int) -> Path:
    """Fold f's name for its training state (.NAME.cvF-of-K.partial beside the run)."""
    return out.with_name(f"{out.name}.cv{f}-of-{k}")


@dataclass
class CVResult:
    """What the K trainings cost together, read as a TrainResult is by the CLI."""

    members: list[Member]
    device: str = ""
    seconds: float = 0.0
    epochs_run: int = 0
    member_epochs: int = 0
    resumed_from: int = 0
    failures: dict[int, str] = field(default_factory=dict)
    warnings: dict[int, str] = field(default_factory=dict)

    def add(self, f: int, result) -> None:
        self.device = result.device
        self.seconds += result.seconds
        self.epochs_run += result.epochs_run
        self.member_epochs += result.member_epochs
        for mine, theirs in ((self.failures, result.failures),
                             (self.warnings, result.warnings)):
            for k, why in theirs.items():
                mine[k] = "; ".join(filter(None, [mine.get(k), f"fold {f}: {why}"]))


def _across_folds(per: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's figures over folds: mean, sd (ddof=1) and how many folds had them."""
    out: dict[str, Any] = {}
    for fig in (*FIGURES, *TOP_FIGURES):
        out[fig], out[f"{fig}_std"] = mean_sd(p.get(fig) for p in per)
    out["n_folds"] = sum(p.get("srcc") is not None or p.get("mse") is not None for p in per)
    return out


def pool_note(cache: Cache, heads, folds: Folds) -> dict[str, str]:
    """head -> why the pooled predictions give it no system-level figures."""
    notes = {}
    for h in heads:
        rows = folds.pool[np.isfinite(cache.labels[folds.pool, label_col(cache, h)])]
        problem = system_level_problem(cache.systems[rows])
        if problem and len(rows):
            notes[h.name] = f"cross-validated clips: {problem}"
    return notes


def cv_metrics(cache: Cache, heads, members: list[Member], folds: Folds,
               per_fold: list[dict[str, Any]], oof: dict[str, np.ndarray],
               failed: set[int], tcfg: TrainConfig) -> dict[str, Any]:
    """metrics.json of a cross-validation (module docstring)."""
    ok = usable_members(len(members), failed)
    if not ok:
        raise QamroError("every member failed in some fold; nothing to report")
    member_entries = []
    for k, m in enumerate(members):
        entry = {"member": m.label(), "seed": m.seed, "loss": to_jsonable(m.loss),
                 "best_epoch": [fm["members"][k]["best_epoch"] for fm in per_fold],
                 "folds": [fm["members"][k].get("heads") for fm in per_fold]}
        if k in failed:
            entry["failed"] = "; ".join(f"fold {f}: {fm['members'][k]['failed']}"
                                        for f, fm in enumerate(per_fold)
                                        if "failed" in fm["members"][k])
        else:
            entry["heads"] = head_metrics(cache, heads, {h: p[k] for h, p in oof.items()},
                                          folds.pool, tcfg.bootstrap, what=" (out of fold)",
                                          cfg=tcfg)
        member_entries.append(entry)
    metrics = {
        "cv": cv_summary(folds), "eval_split": " + ".join(folds.splits),
        "validation": per_fold[0]["validation"].replace(" of train", " of each fold's "
                                                        "training clips"),
        "heads": {h.name: {level: _across_folds([fm["heads"][h.name][level]
                                                 for fm in per_fold])
                           for level in ("system", "utterance")} for h in heads},
        "pooled": head_metrics(cache, heads, {h: p[ok].mean(0) for h, p in oof.items()},
                               folds.pool, tcfg.bootstrap, what=" (out of fold)", cfg=tcfg),
        "folds": [{"fold": f, "clips": len(folds.held_out[f]), "groups": folds.groups[f],
                   "clips_without_system": folds.ungrouped[f],
                   "heads": fm["heads"], "system_level": fm["system_level"]}
                  for f, fm in enumerate(per_fold)],
        "members": member_entries}
    mark_system_level(metrics, pool_note(cache, heads, folds))
    return metrics


def cv_summary(folds: Folds) -> dict[str, Any]:
    return {"folds": folds.cfg.folds, "group": folds.cfg.group, "splits": folds.splits,
            "clips": len(folds.pool), "splitter": "sklearn.model_selection.GroupKFold",
            "combined": "heads: mean ± sd over folds of each fold's figures; pooled: the "
                        "out-of-fold predictions of every clip together"}


@contextlib.contextmanager
def stage_cv(job: Job) -> Iterator[Staged]:
    """Train the K folds (resuming those with a saved state) and yield the cross-validation
    folder staged (module docstring); published when the block ends, after which the folds'
    states go. `job.out` is already checked (run.prepare)."""
    cv = job.cv
    folds = make_folds(job.data, job.recipe.heads, job.tcfg, cv)  # refused before training
    states = [fold_out(job.out, f, cv.folds) for f in range(cv.folds)]
    if job.resume and not any(partial_dir(s).exists() for s in states):
        raise QamroError(f"--resume: no saved training state of a fold of {job.out} (looked "
                         f"for {partial_dir(states[0]).name} and the other folds')")
    tmp = staging(job.out)
    try:
        staged = _train_folds(job, folds, tmp)
        staged.after_publish += [lambda s=s: discard(s) for s in states]
        yield staged
        check_out(job.out, job.force)  # still ours to replace: nothing took the name meanwhile
    except BaseException:
        Staged(tmp, job.out, {}, None, job.data).abandon()
        raise
    staged.publish()


def _train_folds(job: Job, folds: Folds, tmp: Path) -> Staged:
    """Each fold trained (or resumed) and written to tmp/fold-F, then the top of the folder:
    config.json, metrics.json, the out-of-fold predictions."""
    data, heads, members = job.data, job.recipe.heads, job.members
    k = folds.cfg.folds
    fold_cfg = replace(job.tcfg, eval_split=HELD_OUT)
    oof = {h.name: np.full((len(members), len(data.ids)), np.nan) for h in heads}
    total, per_fold, failed = CVResult(members), [], set()
    for f in range(k):
        view = fold_view(data, folds, f)
        note = system_level_note(view, heads, fold_cfg)
        fp = fingerprint(view, heads, members, fold_cfg, job.label_range, job.sources,
                         job.release.sha256 if job.release else None)
        if hasattr(job.progress, "restart"):
            job.progress.restart(f"fold-{f} ({f + 1} of {k})")  # named as on disk
        with training_state(fold_out(job.out, f, k), fp, fold_cfg, job.force) as checkpoint:
            result = train(view, heads, members, fold_cfg, label_range=job.label_range,
                           progress=job.progress, checkpoint=checkpoint, release=job.release)
        where = {"cv_fold": {"fold": f, "folds": k, "group": folds.cfg.group,
                             "held_out": folds.groups[f], "clips": len(folds.held_out[f])}}
        fold = stage_run(job, result, tmp / f"fold-{f}", note, data=view, tcfg=fold_cfg,
                         kind="run", force=False, more_config=where)
        fold.publish()  # into the staged cross-validation folder, not yet published itself
        per_fold.append(fold.metrics)
        for h, p in result.predictions.items():
            oof[h][:, folds.held_out[f]] = p[:, folds.held_out[f]]
        failed |= set(result.failures)
        total.add(f, result)
        del result, fold  # a fold's weights are on disk now: one fold's are held at a time
    metrics = cv_metrics(data, heads, members, folds, per_fold, oof, failed, job.tcfg)
    _write_top(job, folds, metrics, oof, failed, total, tmp)
    return Staged(tmp, job.out, metrics, total, data)


def _write_top(job: Job, folds: Folds, metrics: dict[str, Any], oof: dict[str, np.ndarray],
               failed: set[int], total: CVResult, tmp: Path) -> None:
    data, heads, members = job.data, job.recipe.heads, job.members
    config = {**base_config(job), "cv": cv_summary(folds),
              "validation": metrics["validation"], "device": total.device,
              "seconds": round(total.seconds, 3), "epochs_run": total.epochs_run,
              "cost": cost(total), "failures": {str(k): v for k, v in total.failures.items()},
              "warnings": {str(k): v for k, v in total.warnings.items()}}
    (tmp / "config.json").write_text(json_text("config", config))
    (tmp / "metrics.json").write_text(json_text("metrics", metrics))
    ok = usable_members(len(members), failed)
    write_predictions(tmp / "predictions.csv", data, heads,
                      {h: p[ok] for h, p in oof.items()}, folds.pool, members=ok,
                      columns={"fold": folds.fold_of(len(data.ids))})
    if job.kind == "sweep":
        write_sweep_files(tmp, metrics, pool_note(data, heads, folds))
