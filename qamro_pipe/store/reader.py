"""The HDF5 embedding cache, schema version 1: layout, provenance, resumable writes, validation.

Layout (documented for users in cache/README.md):
  attrs   qamro_cache_version=1, backbone ("name@version"), dataset, label_names (JSON list),
          config (JSON: everything that produced the numbers), key (JSON: the part of config a
          reader or a resuming writer must match), created_by ("qamro-pipe X.Y.Z"), complete (bool)
  /ids [N] unique UTF-8; /systems [N]; /splits [N]; /texts [N] (optional)
  /labels [N, L] float32, NaN where unknown
  /ratings/<label> [N, R] float32      the individual ratings behind a label, where the dataset
                                       publishes them (optional; NaN-padded: clips have up to R)
  /rater_ids [N, R] UTF-8              who gave rating column j ("" = unknown; optional)
  /sources [N] UTF-8     where each clip's audio comes from: resolved path, "#t=start,end"
                         for a part of a file (optional: absent before per-clip identities)
  /source_stat [N, 2] int64   (size in bytes, mtime in ns) of that file when the clip was
                         embedded; with /sources, the identity extraction reuses a row by
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
  - /source_stat rows are raw bytes too, written with their clip's features (or its skip);
  - skipped clips go to a sidecar journal, CACHE.journal (one JSON line each, fsync'ed), not
    into the file: creating HDF5 objects rewrites metadata in many places at once;
  - reusing a cache for a changed dataset (extract: rows added or removed, labels, audio or
    texts changed) builds the new cache whole under a temporary name, copies the rows that
    are still valid into it and renames it into place: a kill leaves the old file or the new;
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
from typing import Any, Iterable, Mapping

import h5py
import numpy as np

from ..errors import CacheError
from ..untrusted import file_kind, printable
from .files import read_journal, writer_active
from .layout import check_layout

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
    # label -> [N, R] individual ratings, NaN-padded (only labels that have them)
    ratings: dict[str, np.ndarray] = field(default_factory=dict)
    rater_ids: np.ndarray | None = None  # [N, R] str, "" where unknown
    skipped: dict[str, str] = field(default_factory=dict)  # id -> reason
    usable: np.ndarray | None = None  # [N] bool: written and not skipped
    sources: np.ndarray | None = None  # [N] str: where each clip's audio comes from
    source_stat: np.ndarray | None = None  # [N, 2] int64: that file's (size, mtime_ns)

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


def _incomplete(meta: CacheMeta) -> str:
    if writer_active(meta.path):
        return "INCOMPLETE (being extracted by another process now)"
    return "INCOMPLETE (rerun the command that made it, extract or cache merge, to finish it)"


# -- reading --------------------------------------------------------------------------------
def _skipped_in_file(f: h5py.File) -> dict[str, str]:
    if "skipped" not in f:
        return {}
    return dict(zip(f["skipped/ids"].asstr()[()], f["skipped/reasons"].asstr()[()]))


def _open(path: Path, mode: str = "r") -> h5py.File:
    if not path.exists():
        raise CacheError(f"{printable(path)}: no such cache file")
    kind = file_kind(path)  # a FIFO would block the open forever
    if kind:
        raise CacheError(f"{printable(path)}: {kind}, not a cache file")
    try:
        # no HDF5 file lock: writers are kept to one by writer_lock, and nothing a reader
        # reads changes under it (module docstring), so `cache info` works mid-extraction
        f = h5py.File(path, mode, locking=False)
    except OSError as e:
        raise CacheError(f"{printable(path)}: not a readable HDF5 cache (truncated or another "
                         f"format): {' '.join(str(e).split())}") from None
    try:
        check_layout(f, path)  # before anything is read from it, or written through it
    except CacheError:
        f.close()
        raise
    except _DAMAGE as e:
        f.close()
        raise _damaged(path, e) from None
    return f


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


# UnicodeError is a ValueError; IndexError and AttributeError: a crafted file's scalar where
# a table belongs, a dataset where a group belongs
_DAMAGE = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError)


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
    for name, value in (("config", config), ("key", key)):
        if not isinstance(value, dict):
            raise CacheError(f"{printable(path)}: attribute {name!r} is a JSON "
                             f"{type(value).__name__}, expected an object")
    problem = label_names_problem(labels)
    if problem:
        raise CacheError(f"{printable(path)}: attribute 'label_names': {problem}")
    return CacheMeta(path=path, version=version, backbone=str(f.attrs["backbone"]),
                     dataset=str(f.attrs["dataset"]), label_names=tuple(labels), config=config,
                     key=key, created_by=str(f.attrs["created_by"]),
                     complete=bool(f.attrs.get("complete", True)))


def label_names_problem(names: object) -> str | None:
    """Why `names` cannot name a cache's labels, or None: they name heads, run-folder weights
    (`HEAD/mK/...`) and CSV columns, so each is a distinct non-empty string without '/'."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"expected a JSON list of names, found {printable(repr(names))[:80]}"
    for i, n in enumerate(names):
        if not n.strip() or "/" in n or printable(n) != n:
            return (f"label name {printable(repr(n))} is empty or holds '/' or a control "
                    f"character (names become run-folder paths); rename it")
        if n in names[:i]:
            return (f"label name {printable(repr(n))} appears twice (two heads would share "
                    f"one name)")
    return None


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
        if ids.ndim != 1:
            raise CacheError(f"{path}: /ids has shape {ids.shape}, expected [N]")
        for name, ds in f["features"].items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim < 1 or ds.shape[0] != n \
                    or ds.dtype not in FEATURE_DTYPES:
                raise CacheError(f"{path}: features/{name} is "
                                 f"{getattr(ds, 'dtype', 'a group')}{getattr(ds, 'shape', '')}, "
                                 f"expected float32 or float16 with {n} rows")
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
        cache.system_mos = _system_mos(f)
        for name, values in cache.system_mos.items():
            if np.isinf(values).any():
                raise CacheError(f"{path}: /system_mos/values holds inf (system "
                                 f"{printable(name)})")
            if len(values) != len(meta.label_names):
                raise CacheError(f"{path}: /system_mos/values has {len(values)} columns, "
                                 f"expected {len(meta.label_names)}")
        cache.ratings, cache.rater_ids = _read_ratings(f, path, n, meta.label_names)
        cache.sources, cache.source_stat = _sources(f, path, n)
        cache.skipped = _skipped_in_file(f)
        if not meta.complete:  # an extraction in progress keeps its skips in the journal
            cache.skipped.update(read_journal(path))
        done = f["done"][()].astype(bool) if "done" in f else np.ones(n, bool)
    cache.usable = done & ~np.isin(ids, list(cache.skipped))
    _check_finite(cache)
    return cache


def _read_ratings(f: h5py.File, path: Path, n: int, label_names: tuple[str, ...]):
    """The optional per-clip ratings, checked: known labels, [N, R] with one R, no inf."""
    group = f["ratings"] if "ratings" in f else {}
    for k in group:
        if k not in label_names:
            raise CacheError(f"{path}: /ratings/{k} is not one of the labels {label_names}")
    ratings = {k: group[k][()].astype(np.float32) for k in label_names if k in group}
    ids = f["rater_ids"].asstr()[()] if "rater_ids" in f else None
    shapes = {v.shape for v in ratings.values()} | ({ids.shape} if ids is not None else set())
    if len(shapes) > 1 or any(len(s) != 2 or s[0] != n for s in shapes):
        raise CacheError(f"{path}: /ratings and /rater_ids must all be [{n}, R] with one R "
                         f"(found {sorted(shapes)})")
    for k, v in ratings.items():
        if np.isinf(v).any():
            raise CacheError(f"{path}: /ratings/{k} holds inf")
    return ratings, ids


def _system_mos(f: h5py.File) -> dict[str, np.ndarray]:
    if "system_mos" not in f:
        return {}
    names = f["system_mos/names"].asstr()[()]
    values = f["system_mos/values"][()].reshape(len(names), -1)
    return dict(zip(names, values.astype(np.float32)))


def _sources(f: h5py.File, path: Path, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """/sources and /source_stat, or (None, None) in a cache made without them."""
    if "sources" not in f or "source_stat" not in f:
        return None, None
    sources, stat = f["sources"].asstr()[()], f["source_stat"][()]
    if len(sources) != n or stat.shape != (n, 2):
        raise CacheError(f"{path}: /sources {sources.shape} and /source_stat {stat.shape} "
                         f"must have {n} rows (and 2 columns)")
    return sources, stat


def _check_finite(cache: Cache) -> None:
    rows = cache.usable
    inf = np.isinf(cache.labels).any(axis=1)
    if inf.any():  # NaN marks an unknown label; inf is no score
        raise CacheError(f"{cache.path}: /labels holds inf for {int(inf.sum())} clip(s) "
                         f"(first: {printable(cache.ids[np.argmax(inf)])}); a label is a finite "
                         f"number, or NaN where unknown")
    for name, v in cache.features.items():
        # explicit width: reshape(0, -1) fails, and a just-created cache has no usable row
        width = int(np.prod(v.shape[1:]))
        bad = ~np.isfinite(v[rows].reshape(int(rows.sum()), width)).all(axis=1)
        if bad.any():
            first = cache.ids[np.flatnonzero(rows)[np.argmax(bad)]]
            raise CacheError(f"{cache.path}: features/{name} has NaN or inf in {int(bad.sum())} "
                             f"rows (first: {first})")


# -- what extraction reads before reusing a cache ---------------------------------------------
@dataclass
class CacheIndex:
    """Everything in a cache but its features' values: what extraction needs to decide which
    rows it may keep."""

    meta: CacheMeta
    ids: np.ndarray  # [N] str
    done: np.ndarray  # [N] bool
    skipped: dict[str, str]  # id -> reason, from the file and the journal
    sources: np.ndarray | None  # [N] str, None in a cache made without per-clip identities
    source_stat: np.ndarray | None  # [N, 2] int64
    columns: dict[str, np.ndarray]  # per-clip metadata by dataset name: those asked, if present
    system_mos: dict[str, np.ndarray]
    layout: dict[str, tuple[tuple[int, ...], str]]  # "features/audio" -> (row shape, dtype)
    window_counts: np.ndarray | None  # [N] windows per clip

    @property
    def holds_clips(self) -> bool:
        """Whether any clip was embedded or listed as skipped yet."""
        return bool(self.done.any() or self.skipped)


def read_index(path: str | Path, columns: Iterable[str] = ()) -> CacheIndex:
    path = Path(path)
    with _open(path) as f:
        meta = _meta(f, path)
        try:
            ids = f["ids"].asstr()[()]
            done = f["done"][()].astype(bool) if "done" in f else np.ones(len(ids), bool)
            cols = {name: (f[name].asstr()[()] if h5py.check_string_dtype(f[name].dtype)
                           else f[name][()]) for name in columns if name in f}
            layout = {f"features/{k}": (ds.shape[1:], str(ds.dtype))
                      for k, ds in f["features"].items()}
            counts = None
            if "windows" in f:
                counts = np.diff(f["windows/offsets"][()])
                layout.update({f"windows/{k}": (ds.shape[1:], str(ds.dtype))
                               for k, ds in f["windows"].items() if k != "offsets"})
            system_mos = _system_mos(f)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{path}: damaged cache ({e})") from None
        sources, stat = _sources(f, path, len(ids))
        skipped = _skipped_in_file(f)
    if not meta.complete:
        skipped.update(read_journal(path))
    return CacheIndex(meta, ids, done, skipped, sources, stat, cols, system_mos, layout, counts)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0 of every file h5py writes without a user block
_OURS = b"qamro_cache_version"  # the root attribute's name, stored near the start of the file


def foreign(path: str | Path) -> str | None:
    """What is at `path` when it is something qamro-pipe did not write, in a few words ("a
    folder", "a file that is not HDF5", ...); None when nothing is there or a qamro-pipe cache
    (a damaged one included: a file with HDF5's signature whose first megabyte names our
    attribute), the only thing --force may replace."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            return "a symbolic link to nothing"
        above = next(p for p in path.parents if p.exists() or p == p.parent)
        return f"inside {above}, which is a file" if above.is_file() else None
    if path.is_dir():
        return "a folder"
    if not path.is_file():
        return "not a regular file"
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    if not head.startswith(HDF5_SIGNATURE):
        return "an empty file" if not head else "a file that is not HDF5"
    try:
        with h5py.File(path, "r", locking=False) as f:
            ours = "qamro_cache_version" in f.attrs
    except OSError:
        ours = _OURS in head
    return None if ours else "an HDF5 file that is not a qamro-pipe cache"


def refuse_foreign(path: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, to write where something qamro-pipe did not make is."""
    what = foreign(path)
    if what and what.startswith("inside"):
        raise CacheError(f"{path}: cannot be made {what}: choose another {option}")
    if what:
        raise CacheError(f"{path}: {what}, not a cache qamro-pipe wrote, so it is left alone "
                         f"(--force replaces only qamro-pipe caches): choose another {option} "
                         f"or move it away")


def describe(path: str | Path) -> str:
    """A person-readable summary: counts per split, features and shapes, provenance."""
    cache = read_cache(path, require_complete=False)
    m = cache.meta
    lines = [f"cache      {m.path}", f"schema     v{m.version}  ({m.created_by})",
             f"backbone   {m.backbone}", f"dataset    {m.dataset}",
             f"labels     {', '.join(m.label_names)}",
             f"status     {'complete' if m.complete else _incomplete(m)}"
             f"  {int(cache.usable.sum())}/{len(cache.ids)} clips usable"]
    splits, counts = np.unique(cache.splits, return_counts=True)
    lines.append("splits     " + ", ".join(f"{s} {c}" for s, c in zip(splits, counts)))
    named = set(cache.systems) - {""}  # "" is a clip without a system, not a system
    without = int((cache.systems == "").sum())
    lines.append(f"systems    {len(named) or 'none'}"
                 + (f" ({without} clips without one)" if named and without else "")
                 + (f"  (published system MOS for {len(cache.system_mos)})"
                    if cache.system_mos else ""))
    if cache.ratings:
        some = next(iter(cache.ratings.values()))
        counts = np.isfinite(some).sum(axis=1)
        lines.append(f"ratings    {', '.join(cache.ratings)}: individual ratings for "
                     f"{int((counts > 0).sum())} clips, up to {some.shape[1]} each"
                     + (f", from {len(set(cache.rater_ids.ravel()) - {''})} raters"
                        if cache.rater_ids is not None else ""))
    for name, v in cache.features.items():
        lines.append(f"feature    features/{name} {v.dtype} {list(v.shape)}")
    for name, v in cache.windows.items():
        lines.append(f"windows    windows/{name} {v.dtype} {list(v.shape)}")
    if cache.skipped:
        lines.append(f"skipped    {len(cache.skipped)} clips (see /skipped)")
    lines.append(f"audio      {len(set(cache.sources))} files, identity (path, size, mtime) per "
                 f"clip in /sources, /source_stat" if cache.sources is not None else
                 "audio      no per-clip identity (written before they were recorded, or by "
                 "write_cache)")
    for k, v in sorted(m.config.items()):
        lines.append(f"config     {k} = {json.dumps(v)}")
    return "\n".join(lines)
