"""Which rows of an existing cache an extraction may keep, and what it must redo.

A row is kept only while everything that made its numbers is unchanged: the embedding
configuration (the cache key: backbone, weights, preprocessing, dataset), the clip's audio,
and, for a backbone that embeds text, its text. Everything else the cache holds about a clip
(labels, system, split, text) or about the dataset (label names and scale, published system
MOS) is metadata: when only that changed, the cache is rewritten with the new values and
every row is kept, without re-embedding.

A clip's audio is identified by its file's resolved path (with "#t=start,end" for a part of
a file), size and modification time in nanoseconds, the check make and rsync use, rather
than by a content hash: it costs one stat per file, so a finished cache says "nothing to do"
at once even over 100 GB of audio, where hashing would read all of it on every run. It errs
toward re-embedding: a moved dataset folder, a copy that does not keep times, or `touch`
re-embeds; only a rewrite that keeps the size and the nanosecond mtime (`touch -r` after
editing, say) goes unseen.

Any change but a plain resume builds a new cache under a temporary name, copies the kept rows
into it and renames it into place (store.writer.create_cache), so a kill leaves the old cache
or the new one, and the rerun plans again from whichever it finds.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheError, DataError
from ..store.reader import CacheIndex, check_key, read_index
from ..store.writer import RowCopy
from . import audio
from .datasets import Clip, DatasetRecords


def clip_columns(records: DatasetRecords) -> dict[str, np.ndarray]:
    """Per-clip metadata by the cache dataset that holds it, [N, ...] each: what a changed
    manifest rewrites without re-embedding. (A new per-clip array is one more line here,
    besides its writing in create_cache.)"""
    clips = records.clips
    n = len(clips)
    ratings, raters = records.ratings_arrays()
    return {
        "systems": np.array([c.system for c in clips], dtype=object),
        "splits": np.array([c.split for c in clips], dtype=object),
        "texts": np.array([c.text for c in clips], dtype=object),
        "labels": np.array([c.labels for c in clips], np.float32).reshape(
            n, len(records.label_names)),
        # every label's, [N, 0] where it has none: a rating removed from the dataset is a
        # change too
        **{f"ratings/{name}": ratings.get(name, np.full((n, 0), np.nan, np.float32))
           for name in records.label_names},
        "rater_ids": raters if raters is not None else np.full((n, 0), "", dtype=object),
    }


def dataset_level(records: DatasetRecords, extra: dict[str, Any]) -> dict[str, str]:
    """Metadata about the whole dataset, each as canonical JSON (float32 like the cache)."""
    mos = {k: np.float32(v).tolist() for k, v in sorted(records.system_mos.items())}
    return _canonical(dataset=records.name, label_names=list(records.label_names),
                      label_range=list(records.label_range) if records.label_range else None,
                      system_mos=mos, shard=extra.get("shard"))


def _stored_level(old: CacheIndex) -> dict[str, str]:
    m = old.meta
    return _canonical(dataset=m.dataset, label_names=list(m.label_names),
                      label_range=m.config.get("label_range"),
                      system_mos={k: v.tolist() for k, v in sorted(old.system_mos.items())},
                      shard=m.config.get("shard"))


def _canonical(**values: Any) -> dict[str, str]:
    return {k: json.dumps(v, sort_keys=True) for k, v in values.items()}


def source_of(clip: Clip) -> str:
    """Where a clip's audio comes from: the resolved file path, "#t=start,end" for a part."""
    where = str(Path(clip.path).resolve())
    if clip.start is None and clip.end is None:
        return where
    start = "" if clip.start is None else repr(float(clip.start))
    return f"{where}#t={start}" + ("" if clip.end is None else f",{float(clip.end)!r}")


def stat_of(path: str | Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file; (-1, -1) when it cannot be read (decoding says why)."""
    try:
        st = Path(path).stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def clips_digest(records: DatasetRecords) -> str:
    """Digest of a dataset's clips and their metadata: shards of one extraction share it."""
    h = hashlib.sha256()
    for c in records.clips:
        h.update(json.dumps([c.id, c.path.name, c.start, c.end, c.system, c.split, c.text,
                             np.float32(c.labels).tolist()]).encode() + b"\n")
    return h.hexdigest()


@dataclass
class ReusePlan:
    """What an extraction does with the file at its path."""

    new_file: bool  # build a new cache (from scratch, or keeping `copy`'s rows) before embedding
    todo: list[int]  # rows to embed
    sources: list[str]  # [N] source_of each clip
    stats: np.ndarray  # [N, 2] int64 stat_of each clip's file, now
    complete: bool = False  # resuming a complete cache: nothing to do
    copy: RowCopy | None = None
    counts: list[int] | None = None  # windows per clip in a new file with per-window features
    skipped: dict[str, str] = field(default_factory=dict)  # skips the new file starts with
    changes: list[str] = field(default_factory=list)  # what changed, said in the summary

    @property
    def nothing_to_do(self) -> bool:
        return self.complete and not self.new_file and not self.todo

    @property
    def kept(self) -> int:
        return 0 if self.copy is None else len(self.copy.new)


def make_plan(path: Path, records: DatasetRecords, key: dict[str, Any],
              layout: dict[str, tuple[tuple[int, ...], str]], level: dict[str, str],
              force: bool, skip_bad: bool, embeds_text: bool,
              window: tuple[int, float, str] | None, seed: Path | None = None) -> ReusePlan:
    """Decide, before any work, what to keep of the cache at `path` (if any). `layout` is the
    new cache's "features/NAME" and "windows/NAME" -> (row shape, dtype); `window` the
    backbone's (sample rate, window seconds, resampler) when it writes per-window rows. A shard's first
    run keeps what it can of `seed`, the whole dataset's cache."""
    clips = records.clips
    sources = [source_of(c) for c in clips]
    stats = np.array([stat_of(c.path) for c in clips], np.int64).reshape(len(clips), 2)
    plan = ReusePlan(new_file=True, todo=[], sources=sources, stats=stats)
    old = _read_old(path, tuple(clip_columns(records)), force)
    seeded = False
    if old is None and seed is not None and not force:
        old = _seed(seed, tuple(clip_columns(records)), key)  # never a plain resume: its
        seeded = old is not None  # dataset metadata lacks the shard's
    kept_counts: dict[int, int] = {}
    if old is not None and not (force or seeded or old.holds_clips or _resumable(old, key)):
        old = None  # a cache with no clip yet pins no configuration
        plan.changes.append("replaced a cache that held no clip yet, made differently")
    if old is None or force:
        if force and path.exists():
            plan.changes.append("rebuilt from scratch (--force)")
    else:
        if not seeded:
            check_key_or_force(old, key)
        if old.sources is None or old.source_stat is None:
            raise CacheError(f"{path}: made by an earlier qamro-pipe that did not record which "
                             f"audio each clip was embedded from, so its rows cannot be checked "
                             f"against the files now; pass --force to re-embed it (training "
                             f"reads it as it is)")
        if seeded:  # the other shards' rows and the shard's own place are no change
            level = {**level, "shard": _stored_level(old)["shard"]}
        keep = _match(plan, old, records, layout, level, embeds_text, window is not None)
        if seeded:
            plan.changes = [c for c in plan.changes if not c.endswith(" removed")]
        if keep is None:
            return plan  # a plain resume in place
        if len(keep[0]):
            plan.copy = RowCopy(old.meta.path, *keep)
            if old.window_counts is not None:
                kept_counts = dict(zip(keep[1].tolist(), old.window_counts[keep[0]].tolist()))
    kept = set() if plan.copy is None else set(plan.copy.new.tolist())
    plan.todo = [i for i, c in enumerate(clips) if i not in kept and c.id not in plan.skipped]
    if window is not None:
        plan.counts = _window_counts(clips, plan, kept_counts, window, skip_bad)
    return plan


def _read_old(path: Path, columns: tuple[str, ...], force: bool) -> CacheIndex | None:
    if not path.exists():
        return None
    try:
        return read_index(path, columns)
    except CacheError as e:
        if force:
            return None
        raise CacheError(f"{e}; pass --force to replace it") from None


def _seed(path: Path, columns: tuple[str, ...], key: dict[str, Any]) -> CacheIndex | None:
    """The whole dataset's cache, when a shard may keep rows of it (same key but the shard)."""
    try:
        old = read_index(path, columns) if path.is_file() else None
    except CacheError:
        return None
    if old is None or not _resumable(old, {k: v for k, v in key.items() if k != "shard"}):
        return None
    return old


def _resumable(old: CacheIndex, key: dict[str, Any]) -> bool:
    try:
        check_key(old.meta, key)
    except CacheError:
        return False
    return old.sources is not None and old.source_stat is not None


def check_key_or_force(old: CacheIndex, key: dict[str, Any]) -> None:
    try:
        check_key(old.meta, key, "this extract")
    except CacheError as e:
        raise CacheError(f"{e}; pass --force to replace it") from None


def _match(plan: ReusePlan, old: CacheIndex, records: DatasetRecords,
           layout: dict[str, tuple[tuple[int, ...], str]], level: dict[str, str],
           embeds_text: bool, windowed: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Compare `old` with the dataset now. None for a plain resume in place (plan filled:
    nothing but pending rows to embed); else (old rows, new rows) to keep, with plan.skipped
    and plan.changes set."""
    clips, sources, stats = records.clips, plan.sources, plan.stats
    row_of = {cid: j for j, cid in enumerate(old.ids)}
    old_texts = old.columns.get("texts")
    same_layout = {k: (tuple(s), d) for k, (s, d) in old.layout.items()} == layout
    keep_old, keep_new = [], []
    audio_changed = text_changed = retried = added = 0
    stale_pending = False
    for i, c in enumerate(clips):
        j = row_of.get(c.id)
        if j is None:
            added += 1
            continue
        same_audio = old.sources[j] == sources[i] and bool((old.source_stat[j] == stats[i]).all())
        if c.id in old.skipped:
            if same_audio:
                plan.skipped[c.id] = old.skipped[c.id]
            else:
                retried += 1
        elif not old.done[j]:
            stale_pending |= not same_audio
        elif not same_audio:
            audio_changed += 1
        elif embeds_text and (old_texts is None or old_texts[j] != c.text):
            text_changed += 1
        elif same_layout:
            keep_old.append(j)
            keep_new.append(i)
    removed = len(old.ids) - (len(clips) - added)
    meta_changes = _metadata_changes(old, records, level, row_of)
    plain = (same_layout and not (audio_changed or text_changed or retried or added or removed)
             and not meta_changes and list(old.ids) == [c.id for c in clips]
             and list(old.sources) == sources and not (windowed and stale_pending))
    if plain:
        plan.new_file = False
        plan.complete = old.meta.complete
        plan.skipped = dict(old.skipped)
        plan.todo = [i for i in np.flatnonzero(~old.done).tolist()
                     if old.ids[i] not in old.skipped]
        return None
    said = [f"{n} {what}" for n, what in ((audio_changed, "re-embedded (audio changed)"),
                                          (text_changed, "re-embedded (text changed)"),
                                          (retried, "retried (skipped before; file changed)"),
                                          (added, "new"), (removed, "removed"))
            if n]
    if not same_layout:
        said.append("the features' layout changed: every clip embedded again")
    if meta_changes:
        said.append("metadata rewritten without re-embedding: " + ", ".join(meta_changes))
    plan.changes += said
    return np.array(keep_old, np.int64), np.array(keep_new, np.int64)


def _metadata_changes(old: CacheIndex, records: DatasetRecords, level: dict[str, str],
                      row_of: dict[str, int]) -> list[str]:
    """What differs in per-clip metadata (over the clips in both) and dataset metadata."""
    pairs = [(row_of[c.id], i) for i, c in enumerate(records.clips) if c.id in row_of]
    j = np.array([p[0] for p in pairs], np.int64)
    i = np.array([p[1] for p in pairs], np.int64)
    out = []
    for name, new in clip_columns(records).items():
        stored = old.columns.get(name)
        if stored is None:
            if new.size:  # [N, 0]: an optional column the dataset does not have either
                out.append(f"{name} added")
            continue
        n = _rows_differing(stored, new, j, i)
        if n:
            out.append(f"{name} of {n} clip{'s' * (n != 1)}")
    stored_level = _stored_level(old)
    out += [name.replace("_", " ") for name, v in level.items() if stored_level.get(name) != v]
    return out


def _rows_differing(stored: np.ndarray, new: np.ndarray, j: np.ndarray, i: np.ndarray) -> int:
    try:
        a, b = stored[j], new[i]
    except IndexError:  # a column of another length than /ids: all of it is rewritten
        return len(i)
    if a.shape != b.shape:
        return len(i)
    a, b = a.reshape(len(i), -1), b.reshape(len(i), -1)
    same = a == b
    if a.dtype.kind == "f":
        same |= np.isnan(a) & np.isnan(b)
    return int((~same.all(axis=1)).sum())


def _window_counts(clips: list[Clip], plan: ReusePlan, old_counts: dict[int, int],
                   window: tuple[int, float, str], skip_bad: bool) -> list[int]:
    """Windows per clip of a new cache (allocated up front): a kept row keeps its count, a
    skipped one gets none, the others are counted from their files' headers."""
    sr, seconds, resampler = window
    counts = []
    for i, c in enumerate(clips):
        if i in old_counts:
            counts.append(int(old_counts[i]))
            continue
        if c.id in plan.skipped:
            counts.append(0)
            continue
        try:
            counts.append(audio.window_count(c.path, sr, seconds, c.start, c.end, resampler))
        except DataError as e:
            if not skip_bad:
                raise
            plan.skipped[c.id] = str(e)
            plan.todo.remove(i)
            counts.append(0)
    return counts
