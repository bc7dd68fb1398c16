"""Real `qamro-pipe` child processes that are killed, interrupted or fed broken input, and exact
comparisons of what they leave on disk: the fault-injection suite's helpers, for any test where
a process is the point."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np

EXE = Path(sys.executable).with_name("qamro-pipe")
# the demo corpus in the MusicEval layout: 24 one-second clips, one window each, so
# --batch-size 2 writes two clips per batch, 12 batches
CORPUS = dict(n_systems=4, n_prompts=6, seconds=1.0)
N_CLIPS = 24
BATCH_CLIPS = 2
# A shell without job control starts background jobs (`make test &`) with SIGINT ignored, and
# an ignored signal stays ignored across exec: the Ctrl-C tests would then see the child shrug
# off SIGINT. Children start through this, which restores the default first.
WITH_DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; "
                       "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                       "os.execv(sys.argv[1], sys.argv[1:])"]


def child_env(**faults: float) -> dict[str, str]:
    """The environment of a child: offline, single-threaded BLAS, and the fault hooks given
    (WRITE=0.2 -> QAMRO_FAULT_SLEEP_IN_WRITE=0.2); none inherited from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAMRO_FAULT_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update({f"QAMRO_FAULT_SLEEP_IN_{k}": str(v) for k, v in faults.items()})
    return env


class Child:
    """A running `qamro-pipe` whose output lines are read as they come."""

    def __init__(self, args, env=None, cwd=None, preexec_fn=None):
        self.args = [str(a) for a in args]
        self.proc = subprocess.Popen([*WITH_DEFAULT_SIGINT, str(EXE), *self.args],
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd,
                                     env=env if env is not None else child_env(),
                                     preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        self.started = time.monotonic()
        self.maxrss_mb: float | None = None
        self.out: list[str] = []
        self.err: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(s, self.out, False),
                                          daemon=True) for s in [self.proc.stdout]]
        self._readers.append(threading.Thread(target=self._read,
                                              args=(self.proc.stderr, self.err, True),
                                              daemon=True))
        for t in self._readers:
            t.start()
        self._seen: dict[str, int] = {}

    def _read(self, stream, sink, notify):
        for line in stream:
            sink.append(line.rstrip("\n"))
            if notify:
                self._lines.put(line.rstrip("\n"))
        if notify:
            self._lines.put(None)

    def wait_line(self, prefix: str, n: int = 1, timeout: float = 300) -> str | None:
        """Block until the n-th stderr line starting with prefix; None if the child ended.
        The timeout only stops a child that hangs: generous, as a loaded machine (the suite
        runs on every core) can take a minute to get a child through the bad-audio battery."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r} #{n} within {timeout} s; "
                                     f"stderr so far: {self.err}") from None
            if line is None:
                return None
            if line.startswith(prefix):
                self._seen[prefix] = self._seen.get(prefix, 0) + 1
                if self._seen[prefix] >= n:
                    return line

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def peak_mb(self) -> float:
        """The running child's own peak memory (VmHWM of its address space since exec).
        Not ru_maxrss: Linux carries a parent's high-water mark across fork and exec, so a
        child of a test worker holding the session's backbones would report gigabytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmHWM for process {self.pid}")

    def finish(self, timeout: float = 120) -> int:
        """Reap the child (wait4, so its peak memory is known: self.maxrss_mb)."""
        deadline = time.monotonic() + timeout
        while self.proc.returncode is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.maxrss_mb = usage.ru_maxrss / 1024
            elif time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.args} did not end within {timeout} s")
            else:
                time.sleep(0.01)
        for t in self._readers:
            t.join(5)
        return self.proc.returncode

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.finish()

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)

    @property
    def stdout(self) -> str:
        return "\n".join(self.out)

    def rows_written(self) -> list[int]:
        """Rows the WRITE hook announced: written, maybe not yet marked done."""
        rows = []
        for line in self.err:
            if line.startswith("qamro-fault: write rows "):
                rows += [int(r) for r in line.split()[-1].split(",")]
        return rows


def run(args, env=None, timeout: float = 180) -> Child:
    c = Child(args, env)
    c.finish(timeout)
    return c


def extract_args(root: Path, out: Path, *extra, backbone: str = "melstats") -> list:
    return ["extract", "--dataset", "musiceval", "--root", root, "--backbone", backbone,
            "--workers", "0", "--batch-size", "2", "--device", "cpu", "--quiet", "--out", out,
            *extra]


def snapshot(path: Path) -> dict[str, object]:
    """Every attribute and dataset of an HDF5 file, by path."""
    out: dict[str, object] = {}
    with h5py.File(path, "r", locking=False) as f:
        for k, v in f.attrs.items():
            out[f"@{k}"] = v

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]
        f.visititems(visit)
    return out


def assert_same_file(a: Path, b: Path) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sorted(sa) == sorted(sb), (sorted(sa), sorted(sb))
    for k in sa:
        va, vb = np.asarray(sa[k]), np.asarray(sb[k])
        if va.dtype.kind == "f":
            assert np.array_equal(va, vb, equal_nan=True), k
        else:
            assert np.array_equal(va, vb), k


def done_rows(path: Path) -> set[int]:
    if not path.exists():
        return set()
    with h5py.File(path, "r", locking=False) as f:
        return set(np.flatnonzero(f["done"][()]).tolist())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name
                  or ".partial-" in p.name or ".replaced-" in p.name)
