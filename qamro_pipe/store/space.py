"""Room for a new cache, checked before HDF5 writes a byte of it. HDF5 meets a full disk
while writing its metadata by failing the file's close too, and the process then dies at exit
(six "Exception ignored" traces and a segmentation fault, seen with `cache merge` onto a full
disk); so the room is checked first: free space on the file system and the process's file
size limit (RLIMIT_FSIZE: a job scheduler's, or `ulimit -f`)."""
from __future__ import annotations

import resource
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import CacheError

OVERHEAD = 256 << 10  # HDF5's own structures (object headers, heaps, B-trees): ample for ours


def cache_bytes(n: int, feature_shapes: Mapping[str, tuple[int, ...]],
                window_shapes: Mapping[str, tuple[int, ...]] | None,
                window_counts: Sequence[int] | None, feature_dtype: str, n_labels: int,
                strings: Iterable[Sequence[str] | None]) -> int:
    """An upper estimate of a new cache's size in bytes."""
    item = np.dtype(feature_dtype).itemsize
    total = sum(n * int(np.prod(s, dtype=np.int64)) * item for s in feature_shapes.values())
    if window_shapes:
        m = int(np.sum(window_counts, dtype=np.int64))
        total += m * (4 + sum(int(np.prod(s, dtype=np.int64)) * item
                              for s in window_shapes.values())) + 8 * (n + 1)
    total += n * (4 * n_labels + 1 + 16)  # labels, done, source_stat
    for column in strings:
        if column is not None:
            total += sum(len(str(s).encode()) + 32 for s in column)
    return total + OVERHEAD


def check_room(path: Path, need: int) -> None:
    """Refuse, before the file is made, a cache that the disk or the file size limit cannot
    hold, in one line naming both figures."""
    free = shutil.disk_usage(path.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if need > free:
        raise CacheError(f"not enough disk space for the cache: it needs about "
                         f"{_size(need)} at {path.parent}, {_size(free)} are free")
    if limit != resource.RLIM_INFINITY and need > limit:
        raise CacheError(f"not enough disk space for the cache: it needs about "
                         f"{_size(need)} at {path.parent}, and files may not grow past "
                         f"{_size(limit)} here (file size limit, ulimit -f)")


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} KB"
