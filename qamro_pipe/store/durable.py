"""Files that survive kills: fsync, liveness of the process that left a file, and the
fault-injection hook tests/faults uses to stop a process at an exact point."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FAULT_ENV = "QAMRO_FAULT_SLEEP_IN_"  # + WHERE: see fault_point


def fault_point(where: str, detail: str = "") -> None:
    """Test hook for tests/faults, inert unless $QAMRO_FAULT_SLEEP_IN_<WHERE> is set to a
    number of seconds: then say `qamro-fault: <where> <detail>` on stderr and sleep, so a test
    can kill the process at exactly this point. WHERE: CREATE (new cache written, not yet
    renamed), MIGRATE (a run of rows copied from an earlier cache into a new one, not yet
    renamed), WRITE (a batch's rows on disk, /done not yet flipped), FINISH (every row done,
    not yet marked complete), SAVE (run folder half written), SWAP (--force: old run moved
    aside, new one not yet in place)."""
    seconds = os.environ.get(FAULT_ENV + where)
    if seconds is not None:
        print(f"qamro-fault: {where.lower()} {detail}".rstrip(), file=sys.stderr, flush=True)
        time.sleep(float(seconds))


def fsync_path(path: Path) -> None:
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
