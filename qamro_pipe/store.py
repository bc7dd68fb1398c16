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
works while an extraction runs; writers are kept to one by writer_lock().
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import time
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
JOURNAL_SUFFIX = ".journal"  # CACHE.journal: skipped clips of an unfinished extraction
FAULT_ENV = "QAMRO_FAULT_SLEEP_IN_"  # + WHERE: see fault_point


def fault_point(where: str, detail: str = "") -> None:
    """Test hook for tests/faults, inert unless $QAMRO_FAULT_SLEEP_IN_<WHERE> is set to a
    number of seconds: then say `qamro-fault: <where> <detail>` on stderr and sleep, so a test
    can kill the process at exactly this point. WHERE: CREATE (new cache written, not yet
    renamed), WRITE (a batch's rows on disk, /done not yet flipped), FINISH (every row done,
    not yet marked complete), SAVE (run folder half written), SWAP (--force: old run moved
    aside, new one not yet in place)."""
    seconds = os.environ.get(FAULT_ENV + where)
    if seconds is not None:
        print(f"qamro-fault: {where.lower()} {detail}".rstrip(), file=sys.stderr, flush=True)
        time.sleep(float(seconds))


def journal_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + JOURNAL_SUFFIX)


def read_journal(path: str | Path) -> dict[str, str]:
    """Skipped clips (id -> reason) recorded by an unfinished extraction of cache `path`.
    A torn last line (power loss mid-append) is ignored: that clip is simply retried."""
    out: dict[str, str] = {}
    try:
        text = journal_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            out[str(entry["skip"])] = str(entry["reason"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _why(e: OSError) -> str:
    """One line for an OS error (HDF5's own messages span several)."""
    return os.strerror(e.errno) if e.errno else " ".join(str(e).split())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` files a killed process left beside cache `path` (PID dead)."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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
    """A contiguous dataset whose file space is allocated now, not at first write (reads as
    zeros; create_cache then reserves the disk blocks)."""
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

    Written under a temporary name, its disk space reserved, and renamed, so a kill leaves no
    half-made file and a disk too small for it is reported now, not hours into a run. A
    journal left by an earlier cache of the same path is removed: it described that file."""
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
        _reserve(tmp)
        fault_point("CREATE", str(path))
        journal_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
    except OSError as e:
        raise CacheError(f"{path}: could not create the cache ({_why(e)}); is the disk "
                         f"full?") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _reserve(path: Path) -> None:
    """Back every byte of the (sparse) new file with disk blocks, then fsync: later raw
    writes cannot meet a full disk, and a disk too small fails here, before any work."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise CacheError(f"not enough disk space for the cache: it needs "
                                 f"{size / 1e6:.1f} MB at {path.parent} ({e.strerror})") from None
            # EOPNOTSUPP and the like: the file system cannot reserve; the writes will tell
        os.fsync(fd)
    finally:
        os.close(fd)


class CacheWriter:
    """Fills an existing cache row by row. Only raw bytes of preallocated datasets change until
    finish(): a batch's rows are written and fsync'ed before its `done` entries flip, and
    skipped clips go to the journal (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f = _open(self.path, "r+")
        self.ids = self.f["ids"].asstr()[()]
        self.done = self.f["done"][()].astype(bool)
        self.offsets = self.f["windows/offsets"][()] if "windows" in self.f else None
        self.skipped = _skipped_in_file(self.f)  # id -> reason
        if bool(self.f.attrs.get("complete", False)):
            journal_path(self.path).unlink(missing_ok=True)  # folded in by an earlier finish
        else:
            self.skipped.update(read_journal(self.path))

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
        """Write clip rows (features [len(rows), ...]) and, per clip, its window rows.
        Refuses NaN or inf (also what overflows float16 on the way in)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)  # h5py fancy indexing wants increasing indices
        with np.errstate(over="ignore"):  # an overflow to inf is refused just below
            feats = {k: np.asarray(v).astype(self.f["features"][k].dtype)
                     for k, v in features.items()}
            wins = {k: [np.asarray(v).astype(self.f["windows"][k].dtype) for v in per_clip]
                    for k, per_clip in (windows or {}).items()}
        for name, values in feats.items():
            self._check_finite(f"features/{name}", values, rows)
        for name in wins:
            for row, v in zip(rows, wins[name]):
                self._check_finite(f"windows/{name}", v[None], [row])
        try:
            for name, values in feats.items():
                self.f["features"][name][rows[order]] = values[order]
            for i, row in enumerate(rows):
                if not wins:
                    break
                a, b = int(self.offsets[row]), int(self.offsets[row + 1])
                self.f["windows/weight"][a:b] = window_weights[i]
                for name, values in wins.items():
                    self.f["windows"][name][a:b] = values[i]
            self._sync()  # the rows are on disk before anything says they are done
            fault_point("WRITE", "rows " + ",".join(map(str, rows.tolist())))
            self.f["done"][rows[order]] = 1
            self._sync()
        except OSError as e:
            raise CacheError(f"{self.path}: writing rows failed ({_why(e)}); is the disk "
                             f"full? The {int(self.done.sum())} clips marked done are safe: "
                             f"free space and rerun the same command to resume") from None
        self.done[rows] = True

    def _check_finite(self, what: str, values: np.ndarray, rows) -> None:
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            row = int(np.asarray(rows)[np.argmax(bad)])
            raise CacheError(f"{self.path}: refusing to store NaN or inf in {what} for clip "
                             f"{self.ids[row]!r} (as {values.dtype})")

    def _sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.id.get_vfd_handle())

    def skip(self, reasons: Mapping[str, str]) -> None:
        """Record clips left out (id -> reason); they stay not done and are never trained on.
        Appended to the journal, fsync'ed; finish() moves them into /skipped."""
        if not reasons:
            return
        lines = "".join(json.dumps({"skip": str(k), "reason": str(v)}) + "\n"
                        for k, v in reasons.items())
        with open(journal_path(self.path), "a", encoding="utf-8") as j:
            j.write(lines)
            j.flush()
            os.fsync(j.fileno())
        self.skipped.update(reasons)

    def finish(self) -> None:
        """Mark the cache complete: in place when /skipped needs no change, else on a copy
        renamed over the file. Ends the writer."""
        missing = [i for i, d in zip(self.ids, self.done) if not d and i not in self.skipped]
        if missing:
            raise CacheError(f"{self.path}: {len(missing)} clips not written yet "
                             f"(first: {missing[0]}); rerun extract to resume")
        fault_point("FINISH", str(self.path))
        if self.skipped == _skipped_in_file(self.f):
            self.f.attrs.modify("complete", True)  # one byte, rewritten in place
            self._sync()
            self.close()
        else:
            self.close()
            self._finish_on_copy()
        journal_path(self.path).unlink(missing_ok=True)

    def _finish_on_copy(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "r+", locking=False) as f:
                if "skipped" in f:
                    del f["skipped"]
                g = f.create_group("skipped")
                g.create_dataset("ids", data=_strings(list(self.skipped)), dtype=_STR)
                g.create_dataset("reasons", data=_strings(list(self.skipped.values())),
                                 dtype=_STR)
                f.attrs.modify("complete", True)
            _fsync(tmp)
            os.replace(tmp, self.path)
            _fsync(self.path.parent)
        except OSError as e:
            raise CacheError(f"{self.path}: could not finish ({_why(e)}); is the disk full? "
                             f"Every clip is safely written: free space for one copy of the "
                             f"file and rerun the same command") from None
        finally:
            tmp.unlink(missing_ok=True)


def _skipped_in_file(f: h5py.File) -> dict[str, str]:
    if "skipped" not in f:
        return {}
    return dict(zip(f["skipped/ids"].asstr()[()], f["skipped/reasons"].asstr()[()]))


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
    arrays = [*features.values(), *(windows or {}).values()]
    dtype = str(np.result_type(*[np.asarray(v).dtype for v in arrays])) if arrays else "float32"
    create_cache(path, ids=ids, systems=systems, splits=splits, labels=labels,
                 label_names=label_names, backbone=backbone, dataset=dataset,
                 config=dict(config or {}), texts=texts, system_mos=system_mos,
                 feature_shapes={k: np.asarray(v).shape[1:] for k, v in features.items()},
                 window_shapes={k: np.asarray(v).shape[1:] for k, v in (windows or {}).items()},
                 window_counts=counts,
                 feature_dtype="float16" if dtype == "float16" else "float32")
    try:
        with CacheWriter(path) as w:
            with_windows = None
            if windows:
                with_windows = {k: [v[window_offsets[i]:window_offsets[i + 1]]
                                    for i in range(n)] for k, v in windows.items()}
            w.write(np.arange(n), features, with_windows,
                    None if windows is None else
                    [window_weight[window_offsets[i]:window_offsets[i + 1]] for i in range(n)])
            w.finish()
    except CacheError:  # e.g. NaN in the features: leave no half-made cache behind
        Path(path).unlink(missing_ok=True)
        raise
    return Path(path)


_LOCKS_HELD: set[str] = set()  # lock files this process holds (POSIX locks are per process)


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """One writer per cache: a second extract on the same file is refused, never interleaved.

    A POSIX record lock (lockf) on CACHE.lock: the kernel drops it when the process dies, even
    by SIGKILL, and, unlike flock, forked decoding workers do not inherit it, so an orphaned
    worker can never keep a cache locked. Such locks are per process, so a second writer in
    this same process is refused by _LOCKS_HELD. Holding it, stale temporaries are cleared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    busy = CacheError(f"{path}: another process is writing this cache (lock {lock.name} is "
                      f"held); wait for it to finish")
    key = str(lock.resolve())
    if key in _LOCKS_HELD:
        raise busy
    fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise busy from None
        _LOCKS_HELD.add(key)
        try:
            remove_stale_temporaries(path)
            yield
        finally:
            _LOCKS_HELD.discard(key)
    finally:
        os.close(fd)  # releases the lock


def writer_active(path: str | Path) -> bool:
    """Whether another process holds the writer lock of cache `path` right now."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    if not lock.exists() or str(lock.resolve()) in _LOCKS_HELD:
        return False
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the probe lock, if it was taken
    return False


def _incomplete(path: Path) -> str:
    if writer_active(path):
        return "INCOMPLETE (being extracted by another process now)"
    return "INCOMPLETE (rerun extract to resume)"


# -- reading --------------------------------------------------------------------------------
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
