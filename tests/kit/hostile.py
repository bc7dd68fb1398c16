"""Helpers for the hostile-input tests (issue 20): the command line run in-process, the
"one line, exit 1, no traceback" check, and crafted copies of valid files."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import h5py

from .cli import invoke


def cli(*args):
    """In-process, as every test drives the CLI (kit.cli.invoke)."""
    return invoke(*args)


def one_line_error(r, *expect: str) -> str:
    """The command failed with exit code 1 and one `error: ` line holding each of `expect`,
    no traceback, nothing that a terminal would act on."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # not an escaped exception
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output and "\x1b" not in r.output, r.output
    for e in expect:
        assert e in lines[0], (e, lines[0])
    return lines[0]


def crafted(base: Path, path: Path, mutate: Callable[[h5py.File], None]) -> Path:
    """A copy of the cache `base` at `path`, changed by `mutate` (h5py, read-write)."""
    if Path(base) != Path(path):
        shutil.copy(base, path)
    with h5py.File(path, "r+", locking=False) as f:
        mutate(f)
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every regular file under `root`, by relative path: what a command changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@contextmanager
def peak_python_mb():
    """Peak memory allocated through Python's and numpy's allocators inside the block, in MB
    (numpy reports its array buffers to tracemalloc): out["mb"] once the block ends."""
    out = {}
    tracemalloc.start()
    try:
        yield out
    finally:
        out["mb"] = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()



def within(seconds: float, fn, *fifos: Path):
    """fn(), which must end within `seconds`. Opening a FIFO waits for a writer forever (and
    h5py waits holding the GIL, so no thread of this process can help): a watchdog process
    opens the FIFOs for writing after `seconds`, releasing such a wait, and the test fails."""
    code = ("import os, sys, time; time.sleep(float(sys.argv[1]))\n"
            "for p in sys.argv[2:]:\n"
            "    try: os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))\n"
            "    except OSError: pass")
    dog = subprocess.Popen([sys.executable, "-c", code, str(seconds), *map(str, fifos)])
    t0 = time.monotonic()
    try:
        out = fn()
    finally:
        dog.kill()
        dog.wait()
    assert time.monotonic() - t0 < seconds, f"blocked for {seconds} s or more"
    return out
