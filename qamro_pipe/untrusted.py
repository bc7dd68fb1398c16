"""What a file qamro-pipe did not write may hold, met before it can do harm: a path that is
not a regular file (a FIFO blocks a reader forever), names carrying terminal escapes, ids
that a comma-separated answer file cannot carry. The ground floor: no heavy imports."""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Iterable

from .errors import QamroError

# C0 controls but tab and newline, DEL, C1 controls (a lone 0x9b is CSI on some terminals),
# and the bidirectional overrides that make a printed name read as another
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                      "\u2066-\u2069]")
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))
# what the challenges' answer files (`id,score,...` lines, no quoting) cannot carry in an id
ANSWER_FORBIDDEN = re.compile(r"[,\"'\r\n\t\x00-\x1f\x7f]")


def printable(text: object) -> str:
    """`text` safe for a terminal: every control character but newline and tab shown escaped
    (ESC as `\\x1b`), so a name cannot retitle, clear or recolour the screen."""
    return _CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), str(text))


def file_kind(path: str | Path) -> str | None:
    """What is at `path` when it exists and is not a regular file (a symbolic link is
    followed): "a folder", "a named pipe (FIFO)", ...; None for a regular file or nothing.
    stat() never blocks, where open() on a FIFO waits for a writer forever."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def require_regular_file(path: str | Path, what: str = "file") -> None:
    """Refuse, before opening it, a path that is there but not a regular file."""
    kind = file_kind(path)
    if kind:
        raise QamroError(f"{printable(path)}: {kind}, not a regular {what}")


def answer_ids_problem(ids: Iterable[str]) -> str | None:
    """Why these ids cannot go into an `id,score` answer file, naming up to five, or None."""
    bad = [i for i in ids if ANSWER_FORBIDDEN.search(i) or i != i.strip() or not i]
    if not bad:
        return None
    shown = ", ".join(printable(repr(i)) for i in bad[:5])
    return (f"{len(bad)} clip id(s) hold a comma, quote, control character or edge space, which "
            f"the answer format (id,score per line, unquoted) cannot carry: {shown}"
            + (" ..." if len(bad) > 5 else ""))


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def os_problem(e: OSError) -> str:
    """An OSError the commands did not foresee (a disk filling up, a folder turning read-only)
    as one line: the file, what the OS said, what to do. Work already finished was written
    whole before (temporary names, renames), so the same command can simply be rerun."""
    where = f"{printable(e.filename)}: " if e.filename else ""
    why = e.strerror or " ".join(str(e).split()) or type(e).__name__
    if e.errno in _FULL:
        return (f"{where}{why} (is the disk full?); what finished before is kept: free space "
                f"and rerun the same command")
    if e.errno in _NOT_WRITABLE:
        return f"{where}{why}: choose a writable output and rerun the same command"
    return f"{where}{why}"
