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
from .untrusted import file_kind, printable

# TrainConfig checks that read another setting a recipe may give: left to the library
_NEEDS_RECIPE = ("release_checkpoint",)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the superblock's, at byte 0 or 512 * 2^n


def is_hdf5(path: Path) -> bool:
    """Whether the file holds an HDF5 signature where the format puts one (8 bytes read at
    each of 0, 512, 1024, ... up to its end)."""
    with open(path, "rb") as f:
        at = 0
        while True:
            f.seek(at)
            head = f.read(8)
            if head == HDF5_SIGNATURE:
                return True
            if len(head) < 8:
                return False
            at = 512 if at == 0 else 2 * at


def check_cache_file(path: str | Path | None, option: str = "--cache") -> None:
    """A cache file that is there (not a folder) and is an HDF5 file at all."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.h5"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise QamroError(f"{option} {path}: is a folder; name the cache's .h5 file{hint}")
    if not path.exists():
        raise QamroError(f"{option} {path}: no such cache file")
    kind = file_kind(path)  # before opening it: a FIFO would block the read forever
    if kind:
        raise QamroError(f"{printable(path)}: {kind}, not a cache file")
    try:
        hdf5 = is_hdf5(path)
    except OSError as e:
        raise QamroError(f"{option} {path}: cannot be read ({e.strerror or e})") from None
    if not hdf5:
        raise QamroError(f"{printable(path)}: not a readable HDF5 cache (truncated or another "
                         f"format): no HDF5 signature")  # the reader's words


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
