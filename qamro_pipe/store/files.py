"""A cache's sidecar files: CACHE.lock (one writer at a time), CACHE.journal (clips skipped
by an unfinished extraction) and temporaries left by killed processes."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

from ..errors import CacheError
from ..untrusted import file_kind
from .durable import pid_alive

JOURNAL_SUFFIX = ".journal"  # CACHE.journal: skipped clips of an unfinished extraction


def journal_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + JOURNAL_SUFFIX)


def read_journal(path: str | Path) -> dict[str, str]:
    """Skipped clips (id -> reason) recorded by an unfinished extraction of cache `path`.
    A torn last line (power loss mid-append) is ignored: that clip is simply retried."""
    out: dict[str, str] = {}
    kind = file_kind(journal_path(path))  # a FIFO blocks, a device (/dev/zero) never ends
    if kind:
        raise CacheError(f"{journal_path(path)}: {kind}, not a journal of skipped clips")
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
