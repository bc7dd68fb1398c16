"""What an HDF5 file must not do to be read as a cache: keep bytes outside itself or declare
more data than it can hold.

HDF5 lets a dataset keep its bytes in another file (external storage) or assemble them from
other files (a virtual dataset), and a link name another file (an external link) or a path
(a soft link). A cache read through any of them shows other files' bytes as its features, and
a cache resumed through external storage has extraction write its rows into that other file.
A small file can also declare a dataset of any size (left unallocated, or gzip-compressed
zeros), which reading would then allocate whole. A cache qamro-pipe writes has none of this:
hard links only, every dataset's bytes inside the file, and no dataset larger than the file.
Every opening of a cache (reading, resuming, merging) checks it first."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from ..untrusted import printable

# A dataset may declare at most this many times the file's size (plus SLACK_BYTES): what a
# file compressed by h5repack can hold; the caches qamro-pipe writes declare at most 1 time.
MAX_INFLATION = 16
SLACK_BYTES = 1 << 20  # tiny caches: HDF5's own overhead makes the ratio meaningless


def check_layout(f: h5py.File, path: Path) -> None:
    """Refuse, in one line, a file with a link that is not a hard link, a dataset whose bytes
    are not inside the file, or a dataset (or one chunk) declaring more bytes than the limit."""
    size = path.stat().st_size
    limit = MAX_INFLATION * size + SLACK_BYTES
    problems: list[str] = []

    def visit(name: str, obj) -> None:
        if problems:
            return
        if isinstance(obj, h5py.Group):
            problems.extend(_links(obj, name))
        elif isinstance(obj, h5py.Dataset):
            problem = _dataset(obj, limit, size)
            if problem:
                problems.append(f"/{name} {problem}")

    visit("", f)
    if not problems:
        f.visititems(visit)  # hard links only (H5Ovisit), each object once, cycles included
    if problems:
        raise CacheError(f"{printable(path)}: refused: {printable(problems[0])}")


def _links(group: h5py.Group, name: str) -> list[str]:
    out = []
    for key in group:
        link = group.get(key, getlink=True)
        where = f"{name}/{key}" if name else key
        if isinstance(link, h5py.ExternalLink):
            out.append(f"/{where} is an external link to {link.filename}:{link.path}; a cache "
                       f"keeps everything inside its own file")
        elif isinstance(link, h5py.SoftLink):
            out.append(f"/{where} is a soft link to {link.path}; a cache holds hard links only")
    return out


def _dataset(ds: h5py.Dataset, limit: int, size: int) -> str | None:
    dcpl = ds.id.get_create_plist()
    if dcpl.get_layout() == h5py.h5d.VIRTUAL:
        return "is a virtual dataset (its bytes come from other files); a cache keeps its " \
               "data inside its own file"
    if dcpl.get_external_count() > 0:
        other = dcpl.get_external(0)[0].decode(errors="replace")
        return (f"keeps its bytes in another file ({other}: HDF5 external storage); a cache "
                f"keeps its data inside its own file")
    itemsize = ds.id.get_type().get_size()  # stored size; variable-length: the reference's
    declared = int(np.prod(ds.shape, dtype=np.float64)) * itemsize if ds.shape else itemsize
    chunk = int(np.prod(ds.chunks, dtype=np.float64)) * itemsize if ds.chunks else 0
    if max(declared, chunk) > limit:
        what = "declares" if declared > limit else "has chunks of"
        return (f"{what} {max(declared, chunk) / 1e6:,.1f} MB ({ds.dtype} {ds.shape}) in a file "
                f"of {size / 1e6:,.3f} MB; a cache may declare at most {MAX_INFLATION} times its "
                f"file's size (+{SLACK_BYTES >> 20} MB), so it cannot make a reader allocate "
                f"more than its file holds")
    return None
