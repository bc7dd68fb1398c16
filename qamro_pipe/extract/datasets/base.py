"""The record every dataset loader produces, and the loader registry."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...errors import DataError


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


@dataclass(frozen=True)
class DatasetRecords:
    """What a loader returns: the clips and what the cache needs beside them."""

    name: str  # dataset name recorded in the cache ("musiceval")
    label_names: tuple[str, ...]
    clips: list[Clip]
    # published true system MOS: system -> one value per label name (NaN where unknown)
    system_mos: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # declared label scale (lo, hi), used to reject labels outside it; None = unchecked
    label_range: tuple[float, float] | None = None

    def __post_init__(self):
        seen: set[str] = set()
        for c in self.clips:
            if c.id in seen:
                raise DataError(f"{self.name}: duplicate clip id {c.id!r}")
            seen.add(c.id)
            if len(c.labels) != len(self.label_names):
                raise DataError(f"{self.name}: clip {c.id!r} has {len(c.labels)} labels, "
                                f"expected {len(self.label_names)} ({', '.join(self.label_names)})")
            if self.label_range is not None:
                lo, hi = self.label_range
                for name, v in zip(self.label_names, c.labels):
                    if not math.isnan(v) and not lo <= v <= hi:
                        raise DataError(f"{self.name}: clip {c.id!r} label {name}={v} is outside "
                                        f"the declared scale [{lo}, {hi}]")


LOADERS: dict[str, Callable[..., DatasetRecords]] = {}


def register_dataset(name: str):
    """Register a loader `fn(root: Path, **options) -> DatasetRecords` under `name`."""

    def deco(fn):
        LOADERS[name] = fn
        return fn

    return deco


def load_dataset(name: str, root: str | Path, **options) -> DatasetRecords:
    from . import aes_natural, demo, manifest, musiceval  # noqa: F401  (registration)

    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[name](Path(root), **options)
