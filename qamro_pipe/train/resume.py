"""Resuming interrupted training. While a run trains, its state is saved every few seconds in
`.NAME.partial/state.safetensors` beside the run folder NAME (state.py); rerunning the same
command, or passing --resume, continues from there and finishes with the numbers of an
uninterrupted run. What the run is, is its fingerprint: the cache's contents, the heads, the
training settings and the members. A saved state with another fingerprint is never resumed,
and never silently discarded."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import __version__
from ..config import Member, TrainConfig, to_jsonable
from ..errors import QamroError
from ..store.files import writer_lock
from ..store.reader import Cache
from .heads import HeadSpec
from .pairs_join import file_sha256
from .state import TrainState, read_fingerprint
from .trainer import Checkpoint

STATE_FILE = "state.safetensors"
# settings that change no number a member computes: a run resumes across them (the release
# file's place is one: its sha256 is in the fingerprint)
NOT_IN_FINGERPRINT = ("device", "bootstrap", "checkpoint_seconds", "release_checkpoint",
                      "threads", "top_tier", "top_k", "pairs")  # pairs: by its sha256


def partial_dir(out: Path) -> Path:
    """Where run `out` keeps its training state until it is whole."""
    return out.with_name(f".{out.name}.partial")


def fingerprint(cache: Cache, heads: tuple[HeadSpec, ...], members: list[Member],
                cfg: TrainConfig, label_range, sources=(),
                release_sha256: str | None = None) -> str:
    """sha256 of everything that decides a run's numbers; `sources`, the other caches the
    heads read features from (joined.Source), by their key and the digest of their rows;
    `release_sha256`, the release checkpoint the heads start from or take their label
    statistics from."""
    h = hashlib.sha256()
    for arr in (cache.ids, cache.splits, cache.systems):
        h.update("\n".join(map(str, arr)).encode())
    for arr in (cache.labels, cache.usable):
        h.update(np.ascontiguousarray(arr).tobytes())
    train = {k: v for k, v in to_jsonable(cfg).items() if k not in NOT_IN_FINGERPRINT}
    what: dict[str, Any] = {"cache_key": cache.meta.key, "cache_rows": h.hexdigest(),
                            "heads": to_jsonable(heads), "members": to_jsonable(members),
                            "train": train, "label_range": label_range,
                            "qamro_pipe": __version__}
    if release_sha256:
        what["release_sha256"] = release_sha256
    if cfg.pairs:  # the preference pairs' contents decide the numbers, not the file's place
        what["pairs_sha256"] = file_sha256(cfg.pairs)
    if sources:  # only then: a run reading one cache keeps the fingerprint it had
        what["feature_caches"] = [{"name": s.name, "key": s.key, "rows": s.rows}
                                  for s in sources]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def training_state(out: Path, fp: str, cfg: TrainConfig, force: bool = False,
                   resume: bool = False) -> Iterator[Checkpoint]:
    """The checkpoint of run `out` (a saved state to resume, if its fingerprint matches),
    held under a lock so two processes never train into one run. A state of another run is
    refused unless `force` discards it; `resume` insists that there is one to resume."""
    folder = partial_dir(out)
    path = folder / STATE_FILE
    folder.mkdir(parents=True, exist_ok=True)
    locked = False
    try:
        with writer_lock(path):
            locked = True
            yield _checkpoint(out, path, fp, cfg, force, resume)
    finally:
        if locked and not path.exists():  # refused or failed before any state was saved:
            shutil.rmtree(folder, ignore_errors=True)  # leave no empty .NAME.partial/


def _checkpoint(out: Path, path: Path, fp: str, cfg: TrainConfig, force: bool,
                resume: bool) -> Checkpoint:
    """The state to resume from `path`, or none; refused as training_state says."""
    state = None
    if path.exists():
        found, epoch = read_fingerprint(path)
        if found == fp:
            state = TrainState.load(path)[0]
        elif force and not resume:
            path.unlink()
        else:
            what = (f"the saved state of a different run (epoch {epoch})" if found
                    else "a training state that cannot be read")
            raise QamroError(f"{path.parent} holds {what}; rerun that run's own command to "
                             f"resume it, pass --force to discard it, or choose another "
                             f"--out")
    elif resume:
        raise QamroError(f"--resume: no saved training state for {out} (looked in "
                         f"{path.parent})")
    return Checkpoint(path=path, fingerprint=fp, every=cfg.checkpoint_seconds, resume=state)


def discard(out: Path) -> None:
    """Remove the saved state of run `out` once the run folder is whole."""
    shutil.rmtree(partial_dir(out), ignore_errors=True)
