"""What the CLI checks before it imports torch and scipy (7-17 s on a loaded machine): the
paths a command is given and the settings' own rules, so a wrong path or a bad value is
answered in about a second. The library checks all of it again where it uses it (settings
that depend on a recipe, such as --release-checkpoint with the recipe's --init, are left to
it); this module only answers sooner. Light by design: pathlib, config.py, errors.py (and
h5py where a pairs file must join a named cache)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import LossConfig, TrainConfig, check_seeds
from .errors import QamroError
from .pairs_file import read_pairs

# TrainConfig checks that read another setting a recipe may give: left to the library
_NEEDS_RECIPE = ("release_checkpoint",)


def check_cache_file(path: str | Path | None, option: str = "--cache") -> None:
    """A cache file that is there (not a folder)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.h5"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise QamroError(f"{option} {path}: is a folder; name the cache's .h5 file{hint}")
    if not path.exists():
        raise QamroError(f"{option} {path}: no such cache file")


def check_run_folder(path: str | Path) -> None:
    """A run folder that is there, or whose replacement a kill interrupted (the library
    finishes that, runs.clean_stale)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise QamroError(f"{path}: a file, not a run folder")
        return
    beside = path.parent.glob(f".{path.name}.*") if path.parent.is_dir() else ()
    if not any(beside):
        raise QamroError(f"{path}: no such run folder")


def check_run_options(opts: dict[str, Any], train: dict[str, Any],
                      loss: dict[str, Any]) -> None:
    """`train`, `sweep`, `table`: --cache, --release-checkpoint, --pairs (there, readable,
    every pair labelled, some pair joining --cache's clips) and each setting's own rule."""
    check_cache_file(opts.get("cache"))
    checkpoint = train.get("release_checkpoint")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise QamroError(f"--release-checkpoint {checkpoint}: no such file")
    if train.get("pairs") is not None:  # the file read whole (json): each item checked
        read_pairs(train["pairs"], labelled=True)
        if opts.get("cache") is not None:  # and joined to the cache's clips (h5py, no torch)
            import numpy as np  # on use

            from .store.reader import read_index  # on use
            from .train.pairs_join import join_pairs  # on use

            index = read_index(opts["cache"])
            join_pairs(index, train["pairs"], np.arange(len(index.ids)))
    if opts.get("seeds") is not None:
        check_seeds(opts["seeds"])
    TrainConfig(**{k: v for k, v in train.items() if k not in _NEEDS_RECIPE})
    LossConfig(**{k: v for k, v in loss.items() if k != "label_range"})
