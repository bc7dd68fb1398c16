"""A report split for a cache that has none: the smallest manifest (`id,path,score`) puts
every clip in "train", so there is no "dev" to report on. A seeded share of the train split
(TrainConfig.eval_fraction, chosen by split_seed) is held out instead, whole systems where
clips have them (so its figures are on systems the heads never saw), else single clips. The
run records what was held out (config.json's `eval_holdout`) and its clips carry the split
HELD_OUT in predictions.csv; `evaluate RUN` rebuilds the same split from the run's cache."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..store.reader import Cache

HELD_OUT = "eval-holdout"  # the split name the held-out clips carry


def needs_holdout(cache: Cache, tcfg: TrainConfig) -> bool:
    """The report split is the default one and the cache has no clip of it at all."""
    return (tcfg.eval_split == TrainConfig.eval_split and HELD_OUT not in set(cache.splits)
            and not len(cache.rows(tcfg.eval_split)) and len(cache.rows("train")) >= 2)


def holdout_rows(cache: Cache, fraction: float, seed: int) -> tuple[np.ndarray, str]:
    """The train rows held out (sorted) and what they are ("systems" or "clips")."""
    train = cache.rows("train")
    systems = cache.systems[train]
    named = np.unique(systems[systems != ""])
    rng = np.random.default_rng(seed)
    if len(named) >= 2:  # whole systems, in a seeded order, until the share is reached
        # and, where 4 or more systems leave 2 to train on, 2 held out: system-level figures
        # need 2 systems
        least, keep = (2, 2) if len(named) >= 4 else (1, 1)
        held, n = [], 0
        for s in rng.permutation(named):
            if (n >= fraction * len(train) and len(held) >= least) \
                    or len(held) == len(named) - keep:
                break
            held.append(s)
            n += int((systems == s).sum())
        return np.sort(train[np.isin(systems, held)]), "systems"
    n = min(len(train) - 1, max(1, int(round(fraction * len(train)))))
    return np.sort(rng.permutation(train)[:n]), "clips"


def holdout_view(cache: Cache, tcfg: TrainConfig) -> tuple[Cache, TrainConfig, dict[str, Any]]:
    """The cache with a share of train relabelled HELD_OUT, the settings reporting on it, and
    the record config.json keeps (with a sentence saying what was done)."""
    record = {"split": HELD_OUT, "from": "train", "fraction": tcfg.eval_fraction,
              "split_seed": tcfg.split_seed}
    view, rows, by = same_holdout(cache, record)
    n_sys = len(np.unique(cache.systems[rows]))
    what = f"{n_sys} whole system(s) ({len(rows)} clips)" if by == "systems" else \
        f"{len(rows)} clips (the clips have no systems)"
    share = (f"{tcfg.eval_fraction:.0%} of train" if by == "clips" else
             f"{tcfg.eval_fraction:.0%} of train, and 2 systems where 4 or more leave 2 to "
             f"train on")
    text = (f"{cache.path} has no {tcfg.eval_split!r} split to report on: held out "
            f"{what} of {len(cache.rows('train'))} ({share}; chosen by split_seed "
            f"{tcfg.split_seed}) as the report split {HELD_OUT!r} (give the clips a split "
            f"column with 'dev' rows to choose them yourself)")
    record.update(by=by, clips=int(len(rows)), text=text)
    return view, replace(tcfg, eval_split=HELD_OUT), record


def same_holdout(cache: Cache, record: dict[str, Any]) -> tuple[Cache, np.ndarray, str]:
    """The cache with the rows `record` holds out relabelled HELD_OUT (`evaluate` rebuilds a
    run's report split so), those rows, and what they are."""
    rows, by = holdout_rows(cache, record["fraction"], record["split_seed"])
    splits = cache.splits.astype(object)
    splits[rows] = HELD_OUT
    return replace(cache, splits=splits.astype(str)), rows, by


def eval_split_warning(tcfg: TrainConfig) -> str | None:
    """The report split is one the heads trained or early-stopped on (as `evaluate` warns)."""
    if tcfg.eval_split == "train":
        how = "trained on" + (" (and early-stopped on a holdout part of)"
                              if tcfg.val_split == "holdout" else "")
    elif tcfg.eval_split == tcfg.val_split:
        how = "early-stopped on (--val-split)"
    else:
        return None
    return (f"--eval-split {tcfg.eval_split}: the figures are on clips the heads {how}, not a "
            f"held-out estimate")
