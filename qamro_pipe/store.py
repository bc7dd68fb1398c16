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

Writes are crash-safe by construction: every dataset is allocated in full when the file is
created (contiguous, early allocation), so extraction afterwards only overwrites raw rows in
place and flips /done; a kill mid-batch leaves those rows not done, and they are redone.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from . import __version__
from .errors import CacheError

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


# -- writing --------------------------------------------------------------------------------
def _early(group: h5py.Group, name: str, shape: tuple[int, ...], dtype) -> None:
    """A contiguous dataset whose storage is allocated (zero-filled) now, not at first write."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    space = h5py.h5s.create_simple(tuple(int(s) for s in shape))
    tid = h5py.h5t.py_create(np.dtype(dtype))
    h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def create_cache(path: str | Path, *, ids: Sequence[str], systems: Sequence[str],
                 splits: Sequence[str], labels: np.ndarray, label_names: Sequence[str],
                 backbone: str, dataset: str, config: Mapping[str, Any],
                 key: Mapping[str, Any] | None = None,
                 feature_shapes: Mapping[str, tuple[int, ...]],
                 window_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 window_counts: Sequence[int] | None = None,
                 texts: Sequence[str] | None = None,
                 system_mos: Mapping[str, Sequence[float]] | None = None,
                 feature_dtype: str = "float32") -> Path:
    """Write a new, empty (nothing done) cache with all metadata and storage allocated.

    Written under a temporary name and renamed, so a kill leaves no half-made file."""
    path = Path(path)
    n = len(ids)
    labels = np.asarray(labels, dtype=np.float32).reshape(n, len(label_names))
    if len(set(ids)) != n:
        raise CacheError(f"{path}: ids are not unique")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({
                "qamro_cache_version": SCHEMA_VERSION, "backbone": backbone, "dataset": dataset,
                "label_names": json.dumps(list(label_names)),
                "config": json.dumps(config, sort_keys=True),
                "key": json.dumps(dict(key if key is not None else config), sort_keys=True),
                "created_by": f"qamro-pipe {__version__}", "complete": False})
            f.create_dataset("ids", data=_strings(ids), dtype=_STR)
            f.create_dataset("systems", data=_strings(systems), dtype=_STR)
            f.create_dataset("splits", data=_strings(splits), dtype=_STR)
            if texts is not None:
                f.create_dataset("texts", data=_strings(texts), dtype=_STR)
            f.create_dataset("labels", data=labels)
            g = f.create_group("features")
            for name, shape in feature_shapes.items():
                _early(g, name, (n, *shape), feature_dtype)
            if window_shapes:
                counts = np.asarray(window_counts, dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(counts)])
                w = f.create_group("windows")
                w.create_dataset("offsets", data=offsets)
                _early(w, "weight", (int(offsets[-1]),), "float32")
                for name, shape in window_shapes.items():
                    _early(w, name, (int(offsets[-1]), *shape), feature_dtype)
            _early(f, "done", (n,), "uint8")
            if system_mos:
                s = f.create_group("system_mos")
                names = sorted(system_mos)
                s.create_dataset("names", data=_strings(names), dtype=_STR)
                s.create_dataset("values", data=np.array(
                    [system_mos[k] for k in names], dtype=np.float32).reshape(len(names), -1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class CacheWriter:
    """Fills an existing cache row by row; `done` is flipped only after the data is flushed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f = _open(self.path, "r+")
        self.done = self.f["done"][()].astype(bool)
        self.offsets = self.f["windows/offsets"][()] if "windows" in self.f else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None

    def pending(self) -> np.ndarray:
        return np.flatnonzero(~self.done)

    def write(self, rows: Sequence[int], features: Mapping[str, np.ndarray],
              windows: Mapping[str, list[np.ndarray]] | None = None,
              window_weights: list[np.ndarray] | None = None) -> None:
        """Write clip rows (features [len(rows), ...]) and, per clip, its window rows."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)  # h5py fancy indexing wants increasing indices
        for name, values in features.items():
            self.f["features"][name][rows[order]] = np.asarray(values)[order]
        if windows:
            for i, row in enumerate(rows):
                a, b = int(self.offsets[row]), int(self.offsets[row + 1])
                self.f["windows/weight"][a:b] = window_weights[i]
                for name, values in windows.items():
                    self.f["windows"][name][a:b] = values[i]
        self.f.flush()
        self.f["done"][rows[order]] = 1
        self.f.flush()
        self.done[rows] = True

    def skip(self, reasons: Mapping[str, str]) -> None:
        """Record clips left out (id -> reason); they stay not done and are never trained on."""
        old = {}
        if "skipped" in self.f:
            old = dict(zip(self.f["skipped/ids"].asstr()[()], self.f["skipped/reasons"].asstr()[()]))
            del self.f["skipped"]
        old.update(reasons)
        g = self.f.create_group("skipped")
        g.create_dataset("ids", data=_strings(list(old)), dtype=_STR)
        g.create_dataset("reasons", data=_strings(list(old.values())), dtype=_STR)
        self.f.flush()

    def finish(self) -> None:
        skipped = set(self.f["skipped/ids"].asstr()[()]) if "skipped" in self.f else set()
        ids = self.f["ids"].asstr()[()]
        missing = [i for i, d in zip(ids, self.done) if not d and i not in skipped]
        if missing:
            raise CacheError(f"{self.path}: {len(missing)} clips not written yet "
                             f"(first: {missing[0]}); rerun extract to resume")
        self.f.attrs["complete"] = True
        self.f.flush()


def write_cache(path: str | Path, *, ids: Sequence[str], systems: Sequence[str],
                splits: Sequence[str], labels: np.ndarray, label_names: Sequence[str],
                features: Mapping[str, np.ndarray], backbone: str, dataset: str,
                config: Mapping[str, Any] | None = None, texts: Sequence[str] | None = None,
                system_mos: Mapping[str, Sequence[float]] | None = None,
                windows: Mapping[str, np.ndarray] | None = None,
                window_offsets: np.ndarray | None = None,
                window_weight: np.ndarray | None = None) -> Path:
    """Write a complete cache in one call: the public way to bring your own embeddings."""
    n = len(ids)
    for name, v in features.items():
        if len(v) != n:
            raise CacheError(f"{path}: features/{name} has {len(v)} rows, expected {n}")
    counts = None
    if windows:
        window_offsets = np.asarray(window_offsets, dtype=np.int64)
        counts = np.diff(window_offsets)
    dtype = str(np.result_type(*[np.asarray(v).dtype for v in features.values()]))
    create_cache(path, ids=ids, systems=systems, splits=splits, labels=labels,
                 label_names=label_names, backbone=backbone, dataset=dataset,
                 config=dict(config or {}), texts=texts, system_mos=system_mos,
                 feature_shapes={k: np.asarray(v).shape[1:] for k, v in features.items()},
                 window_shapes={k: np.asarray(v).shape[1:] for k, v in (windows or {}).items()},
                 window_counts=counts,
                 feature_dtype="float16" if dtype == "float16" else "float32")
    with CacheWriter(path) as w:
        with_windows = None
        if windows:
            with_windows = {k: [v[window_offsets[i]:window_offsets[i + 1]] for i in range(n)]
                            for k, v in windows.items()}
        w.write(np.arange(n), features, with_windows,
                None if windows is None else
                [window_weight[window_offsets[i]:window_offsets[i + 1]] for i in range(n)])
        w.finish()
    return Path(path)


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """One writer per cache: a second extract on the same file is refused, never interleaved."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"{path}: another process is writing this cache "
                             f"(lock {lock.name} is held); wait for it to finish") from None
        yield
    finally:
        os.close(fd)


# -- reading --------------------------------------------------------------------------------
def _open(path: Path, mode: str = "r") -> h5py.File:
    if not path.exists():
        raise CacheError(f"{path}: no such cache file")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 cache (truncated or another format): "
                         f"{e}") from None


def _json_attr(f: h5py.File, path: Path, name: str):
    try:
        return json.loads(f.attrs[name])
    except (KeyError, TypeError, ValueError):
        raise CacheError(f"{path}: attribute {name!r} is missing or not valid JSON") from None


def read_meta(path: str | Path) -> CacheMeta:
    path = Path(path)
    with _open(path) as f:
        return _meta(f, path)


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
    with _open(path) as f:
        meta = _meta(f, path)
        if require_complete and not meta.complete:
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
        if "skipped" in f:
            cache.skipped = dict(zip(f["skipped/ids"].asstr()[()],
                                     f["skipped/reasons"].asstr()[()]))
        done = f["done"][()].astype(bool) if "done" in f else np.ones(n, bool)
    cache.usable = done & ~np.isin(ids, list(cache.skipped))
    _check_finite(cache)
    return cache


def _check_finite(cache: Cache) -> None:
    rows = cache.usable
    for name, v in cache.features.items():
        bad = ~np.isfinite(v[rows].reshape(int(rows.sum()), -1)).all(axis=1)
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
             f"status     {'complete' if m.complete else 'INCOMPLETE (rerun extract to resume)'}"
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
