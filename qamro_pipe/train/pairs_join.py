"""Preference pairs joined to a cache's clips, for training (pairs_term.py).

A pair names two audio files (pairs_file.py). Each is matched to the clip the cache was
extracted from: first by the cache's record of each clip's source (`Cache.sources`, the
resolved path), then by file stem = clip id (a cache made without sources, or audio moved
since). Only pairs whose two clips are both **training clips** train: clips of the cache's
train split (labelled or not: a pair orders clips no one gave a MOS) that are neither
validation nor report (eval) clips. A pair touching a validation or eval clip is left out,
so no held-out clip's preference leaks into training; the counts say how many."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, QamroError
from ..pairs_file import read_pairs
from ..store.reader import Cache

OUTCOME = {"A": 1.0, "B": 0.0, "tie": 0.5}  # o: how much of the pair clip A won


@dataclass(frozen=True)
class PairSet:
    """A pairs file joined to a cache: the training pairs and what was left out."""

    file: str
    sha256: str
    first: np.ndarray  # [P] cache row of clip A of each training pair
    second: np.ndarray  # [P] cache row of clip B
    outcome: np.ndarray  # [P] float64: 1 A won, 0 B won, 0.5 a tie
    total: int  # pairs in the file
    not_in_cache: int  # pairs with a clip the cache does not hold
    held_out: int  # pairs with a validation or eval clip (or one outside the train split)
    val: np.ndarray | None = None  # [V] indices into first/second/outcome: the pairs held
    # out of training to validate on (validation_pairs); None: all train

    @property
    def train(self) -> np.ndarray:
        """Indices of the pairs that train (all but the validation pairs)."""
        keep = np.ones(len(self.outcome), bool)
        if self.val is not None:
            keep[self.val] = False
        return np.flatnonzero(keep)

    def record(self) -> dict[str, Any]:
        """What config.json says of the pairs a run trained on."""
        return {"file": self.file, "sha256": self.sha256, "pairs": self.total,
                "training_pairs": len(self.train),
                "validation_pairs": 0 if self.val is None else len(self.val),
                "ties": int(np.sum(self.outcome == 0.5)),
                "left_out_not_in_cache": self.not_in_cache,
                "left_out_held_out_clips": self.held_out}

    def note(self) -> str:
        val = 0 if self.val is None else len(self.val)
        return (f"{len(self.train)} of {self.total} pairs of {Path(self.file).name} train, "
                f"{val} more validate ({self.held_out} left out: a clip not in training "
                f"(validation or eval); {self.not_in_cache} left out: a clip not in the cache)")


def validation_pairs(joined: PairSet, fraction: float, seed: int) -> PairSet:
    """The joined pairs with a seeded share (`fraction`, the run's val_fraction; at least
    one where two or more pairs join) held out of training to validate on: what a member's
    early stopping reads of its pair term (pairs_term.py). Fixed by the split seed, so every
    member of a run, and every run of one file and split, holds out the same pairs."""
    n = len(joined.outcome)
    n_val = min(n - 1, max(1, int(round(fraction * n)))) if n >= 2 else 0
    rng = np.random.default_rng([seed, 0x9A125])  # not the clip holdout's draw
    return replace(joined, val=np.sort(rng.permutation(n)[:n_val]))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def training_clips(cache: Cache, val: np.ndarray, eval_rows: np.ndarray) -> np.ndarray:
    """The rows a pair may train on: the train split's usable clips, labelled or not, less
    the validation and eval rows."""
    return np.setdiff1d(cache.rows("train"), np.union1d(val, eval_rows))


def clip_index(cache: Cache) -> tuple[dict[str, int], dict[str, int]]:
    """(resolved source path -> row, clip id -> row); parts of a file (#t=) are matched by
    id only."""
    by_source = {}
    if cache.sources is not None:
        by_source = {s: i for i, s in enumerate(cache.sources) if s and "#t=" not in s}
    return by_source, {str(c): i for i, c in enumerate(cache.ids)}


def _row(path: Path, by_source: dict[str, int], by_id: dict[str, int]) -> int | None:
    row = by_source.get(str(Path(os.path.abspath(path)).resolve()))
    return row if row is not None else by_id.get(path.stem)


def join_pairs(cache: Cache, path: str | Path, train_rows: np.ndarray) -> PairSet:
    """The labelled pairs of `path` whose two clips are both in `train_rows`; refused (one
    line) when no pair joins the cache at all, or a pair's two files are one clip. `cache`:
    a Cache, or the CacheIndex of one (ids and sources are all it reads)."""
    path = Path(path)
    pairs = read_pairs(path, labelled=True)
    by_source, by_id = clip_index(cache)
    allowed = np.zeros(len(cache.ids), bool)
    allowed[train_rows] = True
    first, second, outcome = [], [], []
    missing = held = 0
    for p in pairs:
        a, b = _row(p.audio_a, by_source, by_id), _row(p.audio_b, by_source, by_id)
        if a is None or b is None:
            missing += 1
            continue
        if a == b:
            raise DataError(f"{path} pair {p.id}: {p.audio_a.name} and {p.audio_b.name} are "
                            f"the same clip of the cache ({cache.ids[a]}); a clip compared "
                            f"with itself says nothing about an order")
        if not (allowed[a] and allowed[b]):
            held += 1
            continue
        first.append(a)
        second.append(b)
        outcome.append(OUTCOME[p.winner])
    if missing == len(pairs):
        raise QamroError(f"{path}: none of its {len(pairs)} pairs joins the cache "
                         f"{cache.meta.path} (a pair's clips are matched by the audio file the "
                         f"cache was extracted from, else by file stem = clip id; e.g. "
                         f"{pairs[0].audio_a.name})")
    return PairSet(str(path), file_sha256(path), np.array(first, np.int64),
                   np.array(second, np.int64), np.array(outcome, np.float64), len(pairs),
                   missing, held)
