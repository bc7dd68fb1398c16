"""Writing the cache (schema in reader.py): creation with every dataset allocated up front,
row-by-row resumable filling, skips through the journal, and finishing."""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from .. import __version__
from ..errors import CacheError
from .durable import fault_point, fsync_path
from .files import journal_path, read_journal
from .reader import _STR, SCHEMA_VERSION, _open, _skipped_in_file
from .space import cache_bytes, check_room


def _why(e: OSError) -> str:
    """One line for an OS error (HDF5's own messages span several)."""
    return os.strerror(e.errno) if e.errno else " ".join(str(e).split())


def _early(group: h5py.Group, name: str, shape: tuple[int, ...], dtype) -> None:
    """A contiguous dataset whose file space is allocated now, not at first write (reads as
    zeros; create_cache then reserves the disk blocks)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    space = h5py.h5s.create_simple(tuple(int(s) for s in shape))
    tid = h5py.h5t.py_create(np.dtype(dtype))
    h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)


def _put(ds: h5py.Dataset, rows: np.ndarray, values) -> None:
    """ds[rows] = values for increasing rows: as one slice when they are consecutive (the
    usual batch), which h5py writes as one block instead of selecting row by row."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        ds[int(rows[0]):int(rows[-1]) + 1] = values
    else:
        ds[rows] = values


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def _write_skipped(f: h5py.File, skipped: Mapping[str, str]) -> None:
    g = f.create_group("skipped")
    g.create_dataset("ids", data=_strings(list(skipped)), dtype=_STR)
    g.create_dataset("reasons", data=_strings(list(skipped.values())), dtype=_STR)


def create_cache(path: str | Path, *, ids: Sequence[str], systems: Sequence[str],
                 splits: Sequence[str], labels: np.ndarray, label_names: Sequence[str],
                 backbone: str, dataset: str, config: Mapping[str, Any],
                 key: Mapping[str, Any] | None = None,
                 feature_shapes: Mapping[str, tuple[int, ...]],
                 window_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 window_counts: Sequence[int] | None = None,
                 texts: Sequence[str] | None = None,
                 system_mos: Mapping[str, Sequence[float]] | None = None,
                 ratings: Mapping[str, np.ndarray] | None = None,
                 rater_ids: np.ndarray | Sequence[Sequence[str]] | None = None,
                 feature_dtype: str = "float32",
                 sources: Sequence[str] | None = None,
                 source_stat: np.ndarray | None = None,
                 skipped: Mapping[str, str] | None = None,
                 copy_from: "RowCopy | None" = None) -> Path:
    """Write a new cache with all metadata and storage allocated, nothing done but the rows
    `copy_from` copies from an earlier cache (and the clips `skipped` lists).

    Written under a temporary name, its disk space reserved, rows copied, and renamed, so a
    kill leaves the old file or the new one, never a half-made one, and a disk too small for
    it is reported now, not hours into a run. A journal left by an earlier cache of the same
    path is removed: it described that file. `sources` [N] and `source_stat` [N, 2] (size,
    mtime_ns) say which audio each row comes from (see reader.py). ratings: label -> [N, R]
    individual ratings (NaN-padded), rater_ids [N, R] (optional)."""
    path = Path(path)
    n = len(ids)
    labels = np.asarray(labels, dtype=np.float32).reshape(n, len(label_names))
    if len(set(ids)) != n:
        raise CacheError(f"{path}: ids are not unique")
    ratings, rater_ids = _check_ratings(path, n, label_names, ratings, rater_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_room(path, cache_bytes(n, feature_shapes, window_shapes, window_counts, feature_dtype,
                                 len(label_names), (ids, systems, splits, texts, sources)))
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
            # written before the big datasets' space is allocated, so their bytes lie near
            # the start: a disk too small fails in _reserve, not in HDF5 (which then cannot
            # close the file)
            if sources is not None:
                f.create_dataset("sources", data=_strings(sources), dtype=_STR)
            if skipped:
                _write_skipped(f, skipped)
            f.create_dataset("labels", data=labels)
            if ratings:
                r = f.create_group("ratings")
                for name, values in ratings.items():
                    r.create_dataset(name, data=values)
            if rater_ids is not None:
                f.create_dataset("rater_ids", data=rater_ids, dtype=_STR)
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
            if sources is not None:
                _early(f, "source_stat", (n, 2), "int64")  # rewritten in place with each row
            if system_mos:
                s = f.create_group("system_mos")
                names = sorted(system_mos)
                s.create_dataset("names", data=_strings(names), dtype=_STR)
                s.create_dataset("values", data=np.array(
                    [system_mos[k] for k in names], dtype=np.float32).reshape(len(names), -1))
        _reserve(tmp)  # before the rows' data is written: a disk too small fails here
        if sources is not None:
            with h5py.File(tmp, "r+", locking=False) as f:
                f["source_stat"][:] = np.asarray(source_stat, np.int64).reshape(n, 2)
        if copy_from is not None:
            copy_from.into(tmp)
        fault_point("CREATE", str(path))
        journal_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        raise CacheError(f"{path}: could not create the cache ({_why(e)}); is the disk "
                         f"full?") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_ratings(path: Path, n: int, label_names: Sequence[str],
                   ratings: Mapping[str, np.ndarray] | None, rater_ids) -> tuple[dict, Any]:
    """Ratings as stored: float32 [N, R], one R for all labels, no inf; ids as strings."""
    out = {k: np.asarray(v, dtype=np.float32) for k, v in (ratings or {}).items()}
    widths = {v.shape[1] if v.ndim == 2 and v.shape[0] == n else -1 for v in out.values()}
    if rater_ids is not None:
        rater_ids = np.array([[str(x) for x in row] for row in rater_ids], dtype=object
                             ).reshape(n, -1)
        widths.add(rater_ids.shape[1])
    unknown = [k for k in out if k not in label_names or "/" in k]
    if unknown or len(widths) > 1 or -1 in widths:
        raise CacheError(f"{path}: ratings must be [N={n}, R] arrays with one R, for known "
                         f"labels (got {({k: v.shape for k, v in out.items()})}"
                         + (f", rater_ids {rater_ids.shape}" if rater_ids is not None else "")
                         + (f"; unknown labels {unknown}" if unknown else "") + ")")
    for k, v in out.items():
        if np.isinf(v).any():
            raise CacheError(f"{path}: ratings/{k} holds inf (NaN marks a missing rating)")
    return out, rater_ids


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


COPY_BYTES = 64 << 20  # at most this much of a dataset in memory at once while copying rows
COPY_ROWS = 4096  # clips per run of copied rows: a kill test can stop between two runs


@dataclass(frozen=True)
class RowCopy:
    """Finished rows to carry from the cache at `src` into a new cache: old row i -> new row
    j for each (i, j) of zip(old, new). Their features, window rows and window weights are
    copied and marked done; each clip must own as many window rows in both files."""

    src: Path
    old: np.ndarray  # [R] int64
    new: np.ndarray  # [R] int64, increasing

    def into(self, dst_path: Path) -> None:
        with _open(self.src) as src, h5py.File(dst_path, "r+", locking=False) as dst:
            windowed = "windows" in dst
            src_off = src["windows/offsets"][()] if windowed else None
            dst_off = dst["windows/offsets"][()] if windowed else None
            for a, b, c in self.runs():  # old rows a:b -> new rows c:c + b - a
                for name, ds in dst["features"].items():
                    _copy(src["features"][name], ds, a, b, c)
                if windowed:
                    if not np.array_equal(np.diff(src_off[a:b + 1]),
                                          np.diff(dst_off[c:c + b - a + 1])):
                        raise CacheError(f"{self.src}: rows {a}-{b - 1} own other window "
                                         f"counts than in the new cache")
                    for name, ds in dst["windows"].items():
                        if name != "offsets":
                            _copy(src["windows"][name], ds, int(src_off[a]), int(src_off[b]),
                                  int(dst_off[c]))
                dst["done"][c:c + b - a] = 1
                fault_point("MIGRATE", f"rows {c}-{c + b - a - 1}")
            dst.flush()
        fsync_path(dst_path)

    def runs(self):
        """(a, b, c): old rows a:b go to new rows c:c + b - a, in runs of consecutive rows."""
        old, new = np.asarray(self.old, np.int64), np.asarray(self.new, np.int64)
        start = 0
        for i in range(1, len(old) + 1):
            if (i == len(old) or old[i] != old[i - 1] + 1 or new[i] != new[i - 1] + 1
                    or i - start >= COPY_ROWS):
                yield int(old[start]), int(old[i - 1]) + 1, int(new[start])
                start = i


def _copy(src: h5py.Dataset, dst: h5py.Dataset, a: int, b: int, c: int) -> None:
    """src[a:b] -> dst[c:c + b - a], a bounded slice at a time."""
    row = max(1, int(np.prod(src.shape[1:])) * src.dtype.itemsize)
    step = max(1, COPY_BYTES // row)
    for i in range(a, b, step):
        j = min(b, i + step)
        dst[c + i - a:c + j - a] = src[i:j]


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
              window_weights: list[np.ndarray] | None = None,
              stats: np.ndarray | None = None) -> None:
        """Write clip rows (features [len(rows), ...]) and, per clip, its window rows, and
        with `stats` [len(rows), 2] the (size, mtime_ns) of the audio they were made from.
        Refuses NaN or inf (also what overflows float16 on the way in)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)  # h5py fancy indexing wants increasing indices
        with np.errstate(over="ignore"):  # an overflow to inf is refused just below
            feats = {k: np.asarray(v).astype(self.f["features"][k].dtype, copy=False)
                     for k, v in features.items()}
            wins = {k: [np.asarray(v).astype(dtype, copy=False) for v in per_clip]
                    for k, per_clip in (windows or {}).items()
                    for dtype in (self.f["windows"][k].dtype,)}
        for name, values in feats.items():
            self._check_finite(f"features/{name}", values, rows)
        for name in wins:
            if not all(np.isfinite(v).all() for v in wins[name]):  # then say which clip
                for row, v in zip(rows, wins[name]):
                    self._check_finite(f"windows/{name}", v[None], [row])
        try:
            for name, values in feats.items():
                _put(self.f["features"][name], rows[order], values[order])
            self._write_stats(rows, stats)
            if wins:
                self._write_windows(rows[order], {"weight": [window_weights[i] for i in order],
                                                  **{k: [v[i] for i in order]
                                                     for k, v in wins.items()}})
            self._sync()  # the rows are on disk before anything says they are done
            fault_point("WRITE", "rows " + ",".join(map(str, rows.tolist())))
            _put(self.f["done"], rows[order], 1)
            self._sync()
        except OSError as e:
            raise CacheError(f"{self.path}: writing rows failed ({_why(e)}); is the disk "
                             f"full? The {int(self.done.sum())} clips marked done are safe: "
                             f"free space and rerun the same command to resume") from None
        self.done[rows] = True

    def _write_windows(self, rows: np.ndarray, per_clip: Mapping[str, list[np.ndarray]]
                       ) -> None:
        """Each clip's window rows (`rows` increasing, `per_clip` in their order) into
        /windows: one write per run of clips whose windows lie back to back in the file (the
        rows of a batch are usually consecutive), not one per clip and dataset."""
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]):
            a, b = int(starts[lo]), int(ends[hi - 1])
            for name, values in per_clip.items():
                self.f["windows"][name][a:b] = (values[lo] if hi - lo == 1
                                                else np.concatenate(values[lo:hi]))

    def _check_finite(self, what: str, values: np.ndarray, rows) -> None:
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            row = int(np.asarray(rows)[np.argmax(bad)])
            raise CacheError(f"{self.path}: refusing to store NaN or inf in {what} for clip "
                             f"{self.ids[row]!r} (as {values.dtype})")

    def _sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.id.get_vfd_handle())

    def _write_stats(self, rows: np.ndarray, stats: np.ndarray | None) -> None:
        if stats is not None and "source_stat" in self.f:
            order = np.argsort(rows)
            _put(self.f["source_stat"], rows[order], np.asarray(stats, np.int64)[order])

    def skip(self, reasons: Mapping[str, str], stats: Mapping[str, Sequence[int]] | None = None,
             ) -> None:
        """Record clips left out (id -> reason); they stay not done and are never trained on.
        Appended to the journal, fsync'ed; finish() moves them into /skipped. `stats` (id ->
        (size, mtime_ns)) records which audio failed, so a fixed file is retried."""
        if not reasons:
            return
        if stats:
            row_of = {cid: i for i, cid in enumerate(self.ids)}
            rows = np.array([row_of[k] for k in stats], np.int64)
            try:
                self._write_stats(rows, np.array(list(stats.values()), np.int64))
                self._sync()
            except OSError as e:
                raise CacheError(f"{self.path}: writing failed ({_why(e)}); is the disk "
                                 f"full?") from None
        lines = "".join(json.dumps({"skip": str(k), "reason": str(v)}) + "\n"
                        for k, v in reasons.items())
        try:
            with open(journal_path(self.path), "a", encoding="utf-8") as j:
                j.write(lines)
                j.flush()
                os.fsync(j.fileno())
        except OSError as e:
            raise CacheError(f"{journal_path(self.path)}: writing the skipped clips failed "
                             f"({_why(e)}); is the disk full? Every clip written so far is "
                             f"kept: free space and rerun the same command") from None
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
                _write_skipped(f, self.skipped)
                f.attrs.modify("complete", True)
            fsync_path(tmp)
            os.replace(tmp, self.path)
            fsync_path(self.path.parent)
        except OSError as e:
            raise CacheError(f"{self.path}: could not finish ({_why(e)}); is the disk full? "
                             f"Every clip is safely written: free space for one copy of the "
                             f"file and rerun the same command") from None
        finally:
            tmp.unlink(missing_ok=True)



def write_cache(path: str | Path, *, ids: Sequence[str], systems: Sequence[str],
                splits: Sequence[str], labels: np.ndarray, label_names: Sequence[str],
                features: Mapping[str, np.ndarray], backbone: str, dataset: str,
                config: Mapping[str, Any] | None = None, texts: Sequence[str] | None = None,
                system_mos: Mapping[str, Sequence[float]] | None = None,
                windows: Mapping[str, np.ndarray] | None = None,
                window_offsets: np.ndarray | None = None,
                window_weight: np.ndarray | None = None,
                ratings: Mapping[str, np.ndarray] | None = None,
                rater_ids: np.ndarray | Sequence[Sequence[str]] | None = None) -> Path:
    """Write a complete cache in one call: the public way to bring your own embeddings.
    ratings (optional): label -> [N, R] individual ratings, NaN-padded; rater_ids [N, R]."""
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
                 ratings=ratings, rater_ids=rater_ids,
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
