"""The command line driven in-process: typer's runner on qamro_pipe.cli's app, as the console
script runs it (`qamro-pipe ARGS`), without a new process that imports torch (about 4 s of
CPU each). A child process (kit.children) only where the process is the point."""
from __future__ import annotations

import contextlib
import traceback

import torch
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from qamro_pipe.cli import app


class Ran:
    """A finished in-process `qamro-pipe`: exit_code (returncode), stdout, stderr and output
    (both, interleaved), as typer's Result has them; plus the face of a finished
    kit.children.Child (.proc.returncode, .finish(), .out, .err, .rows_written()), so a fault test reads
    either alike. An exception that escaped the app is put on stderr as the console script
    prints it, a traceback, so "no traceback" checks hold for both."""

    def __init__(self, result):
        self.result = result
        self.exception = result.exception
        self.exit_code = result.exit_code
        self.output = result.output
        err = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            err += "".join(traceback.format_exception(result.exception))
        # as Child joins its lines: no trailing newline
        self.stdout = result.stdout.rstrip("\n")
        self.stderr = err.rstrip("\n")
        self.out = self.stdout.split("\n") if self.stdout else []  # lines, as Child.out
        self.err = self.stderr.split("\n") if self.stderr else []
        self.proc = self

    @property
    def returncode(self) -> int:
        return self.exit_code

    def finish(self, timeout: float | None = None) -> int:
        return self.exit_code

    def rows_written(self) -> list[int]:
        """Rows the WRITE hook announced (see kit.children.Child.rows_written)."""
        rows = []
        for line in self.stderr.splitlines():
            if line.startswith("qamro-fault: write rows "):
                rows += [int(r) for r in line.split()[-1].split(",")]
        return rows


@contextlib.contextmanager
def thread_count(n: int | None):
    """torch's and the BLAS/OpenMP pools' threads at n for a while (None: as they are): what
    OMP_NUM_THREADS=n gives a child, so numbers compared with a child's are computed alike."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)


def invoke(*args, env: dict[str, str] | None = None, threads: int | None = None,
           **faults: float) -> Ran:
    """`qamro-pipe ARGS` in this process. env: variables set for the call only (the runner
    restores them); threads: thread pools' size for the call (thread_count); faults: the
    fault hooks (WRITE=0 -> QAMRO_FAULT_SLEEP_IN_WRITE=0)."""
    env = {**(env or {}), **{f"QAMRO_FAULT_SLEEP_IN_{k}": str(v) for k, v in faults.items()}}
    with thread_count(threads):
        return Ran(CliRunner().invoke(app, [str(a) for a in args], env=env or None))
