"""The record every dataset loader produces, and the loader registry."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import DataError
from ...store.reader import label_names_problem


@dataclass(frozen=True)
class Clip:
    """One audio clip to embed and, where labelled, to learn from."""

    id: str  # unique within the dataset; the cache row key
    path: Path  # audio file on disk
    system: str  # generating system ("S002"); "" when unknown
    split: str  # "train", "dev", "eval", ...
    labels: tuple[float, ...]  # one per label name, NaN where unknown
    text: str = ""  # the prompt, "" when none
    start: float | None = None  # seconds into the file, None = from the start
    end: float | None = None  # seconds into the file, None = to the end
    # the individual ratings behind the labels, where the dataset publishes them: () = none,
    # else one tuple per label name, all of one length R (column j = the j-th rating as the
    # source lists it; NaN where that rating has no score for this label)
    ratings: tuple[tuple[float, ...], ...] = ()
    raters: tuple[str, ...] = ()  # rater id of each rating column, where published; () = unknown


@dataclass(frozen=True)
class DatasetRecords:
    """What a loader returns: the clips and what the cache needs beside them."""

    name: str  # dataset name recorded in the cache ("musiceval")
    label_names: tuple[str, ...]
    clips: list[Clip]
    # published true system MOS: system -> one value per label name (NaN where unknown)
    system_mos: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # declared label scale (lo, hi), used to reject labels (and ratings) outside it; None =
    # unchecked
    label_range: tuple[float, float] | None = None
    # what the loader noticed and went on with (ignored lines, disagreements): one line each,
    # for the CLI to print; never a reason to stop (those raise DataError)
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        problem = label_names_problem(list(self.label_names))
        if problem:
            raise DataError(f"{self.name}: {problem}")
        seen: set[str] = set()
        for c in self.clips:
            if c.id in seen:
                raise DataError(f"{self.name}: duplicate clip id {c.id!r}")
            if any("\x00" in v for v in (c.id, c.system, c.split, c.text or "")):
                raise DataError(f"{self.name}: clip {c.id!r} holds a NUL character in its id, "
                                f"system, split or text (HDF5 strings cannot hold one)")
            seen.add(c.id)
            if len(c.labels) != len(self.label_names):
                raise DataError(f"{self.name}: clip {c.id!r} has {len(c.labels)} labels, "
                                f"expected {len(self.label_names)} ({', '.join(self.label_names)})")
            if any(math.isinf(v) for v in c.labels):
                raise DataError(f"{self.name}: clip {c.id!r} has an infinite label "
                                f"{c.labels}; a label is a finite number (or NaN where unknown)")
            self._check_scale(c, "label", zip(self.label_names, c.labels))
            if c.ratings:
                self._check_ratings(c)

    def _check_scale(self, c: Clip, what: str, values) -> None:
        if self.label_range is None:
            return
        lo, hi = self.label_range
        for name, v in values:
            if not math.isnan(v) and not lo <= v <= hi:
                raise DataError(f"{self.name}: clip {c.id!r} {what} {name}={v} is outside "
                                f"the declared scale [{lo}, {hi}]")

    def _check_ratings(self, c: Clip) -> None:
        widths = {len(r) for r in c.ratings}
        if len(c.ratings) != len(self.label_names) or len(widths) != 1:
            raise DataError(f"{self.name}: clip {c.id!r} ratings must be one equally long tuple "
                            f"per label ({', '.join(self.label_names)})")
        if c.raters and len(c.raters) != widths.pop():
            raise DataError(f"{self.name}: clip {c.id!r} has {len(c.raters)} rater ids for "
                            f"{len(c.ratings[0])} ratings")
        self._check_scale(c, "rating", ((n, v) for n, r in zip(self.label_names, c.ratings)
                                        for v in r))

    def ratings_arrays(self) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The clips' ratings as the cache stores them: label -> [N, R] float32 (NaN-padded;
        only labels with a rating), and rater ids [N, R] ("" where unknown) or None."""
        width = max((len(c.ratings[0]) for c in self.clips if c.ratings), default=0)
        if width == 0:
            return {}, None
        n = len(self.clips)
        values = np.full((len(self.label_names), n, width), np.nan, dtype=np.float32)
        raters = np.full((n, width), "", dtype=object)
        for i, c in enumerate(self.clips):
            if c.ratings:
                values[:, i, :len(c.ratings[0])] = c.ratings
            raters[i, :len(c.raters)] = c.raters
        out = {name: v for name, v in zip(self.label_names, values) if not np.isnan(v).all()}
        return out, raters if any(c.raters for c in self.clips) else None


def split_names(dataset: str, splits: tuple[str, ...] | list[str] | str,
                known: tuple[str, ...]) -> tuple[str, ...]:
    """The splits asked of a loader (`--splits`), each one it has: at least one."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    unknown = [s for s in splits if s not in known]
    if unknown or not splits:
        raise DataError(f"{dataset}: unknown split(s) {', '.join(map(repr, unknown)) or '(none)'}"
                        f"; choose from {', '.join(known)}")
    return splits


LOADERS: dict[str, Callable[..., DatasetRecords]] = {}


def register_dataset(name: str):
    """Register a loader `fn(root: Path, **options) -> DatasetRecords` under `name`."""

    def deco(fn):
        LOADERS[name] = fn
        return fn

    return deco


def load_dataset(name: str, root: str | Path, **options) -> DatasetRecords:
    """A dataset by its loader's name (the package face, extract/datasets/__init__, registers
    every loader)."""
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[name](Path(root), **options)
