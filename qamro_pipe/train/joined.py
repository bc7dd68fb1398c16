"""Features from several caches of one dataset, joined by clip id.

A head's feature is `NAME`, read from the run's cache (`--cache`, else the recipe's default),
or `CACHE:NAME`, read from another cache of the same dataset. CACHE is a path when it holds a
`/` or ends in `.h5` (relative to the working directory), else a name: CACHE.h5 beside the
run's cache, so `clap-music:text` is CACHE_ROOT/DATASET/clap-music.h5 next to the recipe's
default cache. Labels, splits, systems and system MOS come from the run's cache; a clip
skipped in any of the caches is unusable. The clip sets must be equal.

The join is a Cache like any other (train, evaluate and predict read it as they read one
cache): the run's cache with the other caches' features added under their `CACHE:NAME`
names, rows in the run's cache's order. Per-window features of one run come from caches with
the same windows (the heads of a run share their rows). How a head combines a per-window
feature with clip features is inputs.head_inputs' rule."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import CacheError, QamroError
from ..store.reader import Cache, read_cache
from .heads import HeadSpec

SEP = ":"
SHOWN = 5  # missing ids named in an error; the count says how many in all


def split_feature(feature: str) -> tuple[str | None, str]:
    """"clap-music:text" -> ("clap-music", "text"); "audio" -> (None, "audio")."""
    ref, sep, name = feature.rpartition(SEP)
    return (ref, name) if sep and ref else (None, feature)


def cache_refs(heads: Iterable[HeadSpec]) -> list[str]:
    """The other caches the heads read, in the order they first appear."""
    refs = [split_feature(f)[0] for h in heads for f in h.features]
    return list(dict.fromkeys(r for r in refs if r is not None))


def resolve_ref(ref: str, primary: str | Path) -> Path:
    """Where `ref` points: a path as given, a bare name as NAME.h5 beside the run's cache."""
    if "/" in ref or ref.endswith(".h5"):
        return Path(ref)
    return Path(primary).parent / f"{ref}.h5"


@dataclass(frozen=True)
class Source:
    """One other cache a run reads, as config.json records it."""

    name: str  # as the recipe names it: "clap-music", or a path
    path: str  # the file read
    backbone: str
    dataset: str
    key: dict[str, Any]  # the cache's key: what made its numbers
    config: dict[str, Any]  # the cache's config (its extract settings: predict reuses them)
    features: tuple[str, ...]  # what the heads read from it
    rows: str  # sha256 of its rows as read: ids, usable, window offsets, the features' bytes

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "backbone": self.backbone,
                "dataset": self.dataset, "key": self.key, "features": list(self.features),
                "rows": self.rows, "cache_config": self.config}


def rows_digest(cache: Cache, features: Iterable[str] = ()) -> str:
    """sha256 of what a run reads of a cache: its ids, which are usable, its windows and the
    named features' values (clip or window rows)."""
    h = hashlib.sha256("\n".join(map(str, cache.ids)).encode())
    h.update(np.ascontiguousarray(cache.usable).tobytes())
    if cache.window_offsets is not None:
        h.update(np.ascontiguousarray(cache.window_offsets, dtype=np.int64).tobytes())
    for f in features:
        v = cache.features[f] if f in cache.features else cache.windows[f]
        h.update(f.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def join(primary: Cache, heads: tuple[HeadSpec, ...],
         paths: dict[str, str | Path | Cache] | None = None) -> tuple[Cache, list[Source]]:
    """The run's cache with every `CACHE:NAME` feature the heads read added, and what was
    read. `paths` names a file for a cache (evaluate passes those of the run), or gives the
    Cache itself (the Scorer's, in memory); other names resolve beside the run's cache.
    Refused, before any work, with the file named: another dataset, another clip set, a
    missing feature, other windows."""
    refs = cache_refs(heads)
    if not refs:
        return primary, []
    joined = replace(primary, features=dict(primary.features), windows=dict(primary.windows),
                     usable=primary.usable.copy())
    window_from = primary.path if _reads_windows(primary, heads, None) else None
    sources = []
    for ref in refs:
        given = (paths or {}).get(ref)
        other = given if isinstance(given, Cache) else None
        path = other.path if other is not None else Path(given or resolve_ref(ref, primary.path))
        other = other if other is not None else _read(path, ref)
        if other.meta.dataset != primary.meta.dataset:
            raise CacheError(f"{path}: a cache of dataset {other.meta.dataset!r}; the run's "
                             f"cache {primary.path} is of {primary.meta.dataset!r}")
        rows = align(primary, other)
        names = tuple(dict.fromkeys(n for h in heads for r, n in map(split_feature, h.features)
                                    if r == ref))
        aligned = _aligned(other, rows, names, ref, heads)
        if aligned.window_offsets is not None and any(n in other.windows for n in names):
            window_from = _take_windows(joined, aligned, window_from)
        joined.features.update({f"{ref}{SEP}{n}": v for n, v in aligned.features.items()})
        joined.windows.update({f"{ref}{SEP}{n}": v for n, v in aligned.windows.items()})
        joined.usable &= aligned.usable
        sources.append(Source(ref, str(path), other.meta.backbone, other.meta.dataset,
                              other.meta.key, other.meta.config, names,
                              rows_digest(aligned, names)))
    return joined, sources


def _read(path: Path, ref: str) -> Cache:
    if not path.exists():
        raise CacheError(f"{path}: no such cache file (features {ref}{SEP}...: a bare name is "
                         f"NAME.h5 beside the run's cache; give a path with a / or .h5)")
    return read_cache(path)


def align(primary: Cache, other: Cache) -> np.ndarray:
    """[N] row of `other` holding each of the primary's clips; unequal clip sets are refused,
    with a few of the ids each side lacks and how many."""
    where = {cid: i for i, cid in enumerate(other.ids)}
    lacking = [c for c in primary.ids if c not in where]
    extra = sorted(set(other.ids) - set(primary.ids))
    if lacking or extra:
        parts = [f"{len(ids)} clips of {a} are not in {b} ({', '.join(map(str, ids[:SHOWN]))}"
                 f"{', ...' if len(ids) > SHOWN else ''})"
                 for ids, a, b in ((lacking, primary.path, other.path),
                                   (extra, other.path, primary.path)) if ids]
        raise CacheError(f"{other.path}: the caches hold different clips: " + "; ".join(parts)
                         + "; extract both from the same dataset list")
    return np.fromiter((where[c] for c in primary.ids), dtype=np.int64, count=len(primary.ids))


def _aligned(other: Cache, rows: np.ndarray, names: tuple[str, ...], ref: str,
             heads) -> Cache:
    """`other` cut to the named features, rows in the primary's order."""
    missing = [n for n in names if n not in other.features and n not in other.windows]
    if missing:
        have = [*other.features, *other.windows]
        who = next(h.name for h in heads if f"{ref}{SEP}{missing[0]}" in h.features)
        raise QamroError(f"{other.path}: head {who!r} reads {ref}{SEP}{missing[0]}, which this "
                         f"cache lacks (it has {', '.join(have) or 'none'})")
    out = replace(other, ids=other.ids[rows], usable=other.usable[rows],
                  features={n: other.features[n][rows] for n in names if n in other.features},
                  windows={})
    if other.window_offsets is not None:
        counts = np.diff(other.window_offsets)[rows]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # window rows of other, clip by clip in the primary's order
        take = (np.arange(offsets[-1]) + np.repeat(other.window_offsets[rows] - offsets[:-1],
                                                   counts)).astype(np.int64)
        out.window_offsets, out.window_weight = offsets, other.window_weight[take]
        out.windows = {n: other.windows[n][take] for n in names if n in other.windows}
    return out


def _reads_windows(cache: Cache, heads, ref: str | None) -> bool:
    return any(r == ref and n in cache.windows
               for h in heads for r, n in map(split_feature, h.features))


def _take_windows(joined: Cache, aligned: Cache, window_from: Path | None) -> Path:
    """The join's windows become `aligned`'s; a second source of windows must have the very
    same windows (the heads of a run share their rows)."""
    if window_from is None:
        joined.window_offsets, joined.window_weight = aligned.window_offsets, \
            aligned.window_weight
        joined.windows = {}  # the run's cache's own windows, which no head reads
        return aligned.path
    if not (np.array_equal(joined.window_offsets, aligned.window_offsets)
            and np.array_equal(joined.window_weight, aligned.window_weight)):
        raise QamroError(f"{aligned.path}: per-window features of one run must come from "
                         f"caches with the same windows; its windows differ from those of "
                         f"{window_from} ({int(aligned.window_offsets[-1])} vs "
                         f"{int(joined.window_offsets[-1])} windows)")
    return window_from
