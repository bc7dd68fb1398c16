"""The HDF5 embedding cache, schema version 1: layout, provenance, resumable writes, validation.

Layout (documented for users in cache/README.md):
  attrs   qamro_cache_version=1, backbone ("name@version"), dataset, label_names (JSON list),
          config (JSON: everything that produced the numbers), key (JSON: the part of config a
          reader or a resuming writer must match), created_by ("qamro-pipe X.Y.Z"), complete (bool)
  /ids [N] unique UTF-8; /systems [N]; /splits [N]; /texts [N] (optional)
  /labels [N, L] float32, NaN where unknown
  /features/<name> [N, ...] float32|float16            one row per clip
  /windows/offsets [N+1] int64, /windows/weight [M] float32, /windows/<name> [M, ...]
                                                        optional: rows per window (clip i owns
                                                        rows offsets[i]:offsets[i+1])
  /done [N] uint8          1 once a clip's rows are written (resume point; absent = all done)
  /skipped/ids, /skipped/reasons   clips left out with --skip-bad (optional)
  /system_mos/names [S], /system_mos/values [S, L]      published true system MOS (optional)

Crash safety (a SIGKILL, Ctrl-C or full disk at any instant loses at most the batch in flight
and never leaves an unreadable file; docs/guarantees.md):
  - a cache is created whole under a temporary name, its space reserved (posix_fallocate, so
    a full disk shows up now, not hours later), and renamed into place;
  - while extracting, nothing but raw bytes of preallocated contiguous datasets changes: a
    batch's rows are written and fsync'ed, then its /done entries flipped. HDF5's own metadata
    (object headers, B-trees, heaps, superblock) is never touched mid-run, so there is nothing
    a kill can tear. (Checked byte by byte in tests/faults.)
  - skipped clips go to a sidecar journal, CACHE.journal (one JSON line each, fsync'ed), not
    into the file: creating HDF5 objects rewrites metadata in many places at once;
  - finishing changes metadata once: with no skipped clips, the `complete` attribute is
    overwritten in place (one byte); with some, a copy gets /skipped and `complete` and is
    renamed over the file. Either way a kill leaves the old file or the new one, never a mix.
Readers open without HDF5 file locks (nothing they read changes under them), so `cache info`
works while an extraction runs; writers are kept to one by files.writer_lock(). Writing lives in
writer.py, which imports this module; this module never imports it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from .files import read_journal, writer_active
from ..errors import CacheError

SCHEMA_VERSION = 1
FEATURE_DTYPES = (np.dtype("float32"), np.dtype("float16"))
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class CacheMeta:
    path: Path
    version: int
    backbone: str
    dataset: str
    label_names: tuple[str, ...]
    config: dict[str, Any]
    key: dict[str, Any]
    created_by: str
    complete: bool


@dataclass
class Cache:
    """A validated cache read into memory (numpy arrays)."""

    meta: CacheMeta
    ids: np.ndarray  # [N] str
    systems: np.ndarray  # [N] str
    splits: np.ndarray  # [N] str
    labels: np.ndarray  # [N, L] float32
    features: dict[str, np.ndarray]  # name -> [N, ...]
    texts: np.ndarray | None = None
    window_offsets: np.ndarray | None = None  # [N+1]
    window_weight: np.ndarray | None = None  # [M]
    windows: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [M, ...]
    system_mos: dict[str, np.ndarray] = field(default_factory=dict)  # system -> [L]
    skipped: dict[str, str] = field(default_factory=dict)  # id -> reason
    usable: np.ndarray | None = None  # [N] bool: written and not skipped

    @property
    def path(self) -> Path:
        return self.meta.path

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.meta.label_names

    def rows(self, split: str) -> np.ndarray:
        """Indices of usable rows of one split."""
        mask = self.splits == split
        if self.usable is not None:
            mask &= self.usable
        return np.flatnonzero(mask)


def _incomplete(path: Path) -> str:
    if writer_active(path):
        return "INCOMPLETE (being extracted by another process now)"
    return "INCOMPLETE (rerun extract to resume)"


# -- reading --------------------------------------------------------------------------------
def _skipped_in_file(f: h5py.File) -> dict[str, str]:
    if "skipped" not in f:
        return {}
    return dict(zip(f["skipped/ids"].asstr()[()], f["skipped/reasons"].asstr()[()]))


def _open(path: Path, mode: str = "r") -> h5py.File:
    if not path.exists():
        raise CacheError(f"{path}: no such cache file")
    try:
        # no HDF5 file lock: writers are kept to one by writer_lock, and nothing a reader
        # reads changes under it (module docstring), so `cache info` works mid-extraction
        return h5py.File(path, mode, locking=False)
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 cache (truncated or another format): "
                         f"{e}") from None


def _json_attr(f: h5py.File, path: Path, name: str):
    try:
        return json.loads(f.attrs[name])
    except (KeyError, TypeError, ValueError):
        raise CacheError(f"{path}: attribute {name!r} is missing or not valid JSON") from None


def _damaged(path: Path, e: Exception) -> CacheError:
    """h5py meets damaged metadata bytes as OSError, RuntimeError, KeyError or a decoding
    error, depending on which structure the damage hit: all mean the same to a user."""
    return CacheError(f"{path}: damaged cache file, it cannot be read "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); "
                      f"re-extract it (extract --force)")


_DAMAGE = (OSError, RuntimeError, KeyError, ValueError, TypeError)  # UnicodeError is a ValueError


def read_meta(path: str | Path) -> CacheMeta:
    path = Path(path)
    with _open(path) as f:
        try:
            return _meta(f, path)
        except _DAMAGE as e:
            raise _damaged(path, e) from None


def _meta(f: h5py.File, path: Path) -> CacheMeta:
    if "qamro_cache_version" not in f.attrs:
        raise CacheError(f"{path}: not a qamro-pipe cache (no qamro_cache_version attribute)")
    version = int(f.attrs["qamro_cache_version"])
    if version != SCHEMA_VERSION:
        raise CacheError(f"{path}: cache schema version {version}, this qamro-pipe reads "
                         f"version {SCHEMA_VERSION}; re-extract or convert it")
    for name in ("backbone", "dataset", "created_by"):
        if name not in f.attrs:
            raise CacheError(f"{path}: attribute {name!r} is missing")
    labels = _json_attr(f, path, "label_names")
    config = _json_attr(f, path, "config")
    key = _json_attr(f, path, "key") if "key" in f.attrs else config
    return CacheMeta(path=path, version=version, backbone=str(f.attrs["backbone"]),
                     dataset=str(f.attrs["dataset"]), label_names=tuple(labels), config=config,
                     key=key, created_by=str(f.attrs["created_by"]),
                     complete=bool(f.attrs.get("complete", True)))


def check_key(meta: CacheMeta, key: Mapping[str, Any], what: str = "this run") -> None:
    """Refuse a cache made under another backbone, checkpoint or preprocessing."""
    diffs = [f"{k}: cache has {meta.key.get(k)!r}, {what} has {v!r}"
             for k, v in key.items() if meta.key.get(k) != v]
    if diffs:
        raise CacheError(f"{meta.path}: made under a different configuration ("
                         + "; ".join(diffs) + ")")


def read_cache(path: str | Path, require_complete: bool = True) -> Cache:
    path = Path(path)
    try:
        return _read_cache(path, require_complete)
    except _DAMAGE as e:
        raise _damaged(path, e) from None


def _read_cache(path: Path, require_complete: bool) -> Cache:
    with _open(path) as f:
        meta = _meta(f, path)
        if require_complete and not meta.complete:
            if writer_active(path):
                raise CacheError(f"{path}: extraction did not finish: another process is "
                                 f"writing this cache now; wait for it to finish")
            raise CacheError(f"{path}: extraction did not finish; rerun the same extract "
                             f"command to resume it")
        for name in ("ids", "systems", "splits", "labels", "features"):
            if name not in f:
                raise CacheError(f"{path}: /{name} is missing")
        ids = f["ids"].asstr()[()]
        n = len(ids)
        if len(set(ids)) != n:
            raise CacheError(f"{path}: /ids are not unique")
        cols = {k: f[k].asstr()[()] for k in ("systems", "splits", "texts") if k in f}
        for k, v in cols.items():
            if len(v) != n:
                raise CacheError(f"{path}: /{k} has {len(v)} rows, /ids has {n}")
        labels = f["labels"][()]
        if labels.ndim != 2 or labels.shape != (n, len(meta.label_names)):
            raise CacheError(f"{path}: /labels has shape {labels.shape}, expected "
                             f"({n}, {len(meta.label_names)}) for label_names {meta.label_names}")
        features = {}
        for name, ds in f["features"].items():
            if ds.shape[0] != n or ds.dtype not in FEATURE_DTYPES:
                raise CacheError(f"{path}: features/{name} is {ds.dtype}{ds.shape}, expected "
                                 f"float32 or float16 with {n} rows")
            features[name] = ds[()]
        cache = Cache(meta=meta, ids=ids, systems=cols["systems"], splits=cols["splits"],
                      labels=labels.astype(np.float32), features=features,
                      texts=cols.get("texts"))
        if "windows" in f:
            off = f["windows/offsets"][()]
            if len(off) != n + 1 or np.any(np.diff(off) < 0):
                raise CacheError(f"{path}: windows/offsets must be [N+1] non-decreasing")
            cache.window_offsets = off
            cache.window_weight = f["windows/weight"][()]
            cache.windows = {k: ds[()] for k, ds in f["windows"].items()
                             if k not in ("offsets", "weight")}
            for k, v in cache.windows.items():
                if len(v) != off[-1]:
                    raise CacheError(f"{path}: windows/{k} has {len(v)} rows, expected {off[-1]}")
        if "system_mos" in f:
            names = f["system_mos/names"].asstr()[()]
            values = f["system_mos/values"][()].reshape(len(names), -1)
            if values.shape[1] != len(meta.label_names):
                raise CacheError(f"{path}: /system_mos/values has {values.shape[1]} columns, "
                                 f"expected {len(meta.label_names)}")
            cache.system_mos = dict(zip(names, values.astype(np.float32)))
        cache.skipped = _skipped_in_file(f)
        if not meta.complete:  # an extraction in progress keeps its skips in the journal
            cache.skipped.update(read_journal(path))
        done = f["done"][()].astype(bool) if "done" in f else np.ones(n, bool)
    cache.usable = done & ~np.isin(ids, list(cache.skipped))
    _check_finite(cache)
    return cache


def _check_finite(cache: Cache) -> None:
    rows = cache.usable
    for name, v in cache.features.items():
        # explicit width: reshape(0, -1) fails, and a just-created cache has no usable row
        width = int(np.prod(v.shape[1:]))
        bad = ~np.isfinite(v[rows].reshape(int(rows.sum()), width)).all(axis=1)
        if bad.any():
            first = cache.ids[np.flatnonzero(rows)[np.argmax(bad)]]
            raise CacheError(f"{cache.path}: features/{name} has NaN or inf in {int(bad.sum())} "
                             f"rows (first: {first})")


def describe(path: str | Path) -> str:
    """A person-readable summary: counts per split, features and shapes, provenance."""
    cache = read_cache(path, require_complete=False)
    m = cache.meta
    lines = [f"cache      {m.path}", f"schema     v{m.version}  ({m.created_by})",
             f"backbone   {m.backbone}", f"dataset    {m.dataset}",
             f"labels     {', '.join(m.label_names)}",
             f"status     {'complete' if m.complete else _incomplete(m.path)}"
             f"  {int(cache.usable.sum())}/{len(cache.ids)} clips usable"]
    splits, counts = np.unique(cache.splits, return_counts=True)
    lines.append("splits     " + ", ".join(f"{s} {c}" for s, c in zip(splits, counts)))
    lines.append(f"systems    {len(set(cache.systems))}"
                 + (f"  (published system MOS for {len(cache.system_mos)})"
                    if cache.system_mos else ""))
    for name, v in cache.features.items():
        lines.append(f"feature    features/{name} {v.dtype} {list(v.shape)}")
    for name, v in cache.windows.items():
        lines.append(f"windows    windows/{name} {v.dtype} {list(v.shape)}")
    if cache.skipped:
        lines.append(f"skipped    {len(cache.skipped)} clips (see /skipped)")
    for k, v in sorted(m.config.items()):
        lines.append(f"config     {k} = {json.dumps(v)}")
    return "\n".join(lines)
