"""The decoding workers: processes that decode and resample clips ahead of the model and hand
them over in order, a bounded number ahead, through shared memory.

The process that feeds the model pays for every clip that crosses over, and on a GPU that
cost caps the whole extraction (docs/benchmarks.md, issue 22). So a clip crosses as little
as possible: the task list is inherited at the fork, a task is sent as its index (8 bytes on a
pipe), and the worker writes the clip's windows into free rows of one shared mapping and sends
back a few ints. No thread, no future, no pickled audio per clip (a ProcessPoolExecutor spent
about 0.75 ms of the feeding process's CPU per clip on that bookkeeping)."""
from __future__ import annotations

import contextlib
import math
import mmap
import multiprocessing as mp
import os
import select
import signal
import sys
from collections.abc import Sequence

import numpy as np

from ..errors import DataError, QamroError
from . import audio

LOCK_TIMEOUT_S = 60.0  # a worker holds the rows' lock for microseconds; longer: it died in it


def decode_tasks(clips, rows, bb) -> list[tuple]:
    """The decoding task of each row: (row, path, sample rate or None for the file's own,
    start, end, max frames, resampler)."""
    return [(r, str(clips[r].path), bb.decode_rate, clips[r].start, clips[r].end,
             bb.max_frames, bb.resampler) for r in rows]


def _worker_init(parent: int) -> None:
    """Workers leave Ctrl-C to the parent, which stops cleanly and says how to resume, and
    die with the parent (Linux): a worker orphaned by a SIGKILL would otherwise live on,
    blocked on its task pipe. (Elsewhere one may; it holds no lock: store.writer_lock is a
    POSIX lock, which forked children do not inherit, and HDF5 files are opened unlocked.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one thread each for torchaudio's resampling (aesthetics): the workers are the parallelism
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # imported before the fork: its pool is sized already
        sys.modules["torch"].set_num_threads(1)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)



def _decode(task: tuple) -> np.ndarray:
    """One clip's audio; DataError when it cannot be decoded. A task is (row, path, sample
    rate or None for the file's own, start, end[, max frames, resampler])."""
    _, path, sr, start, end, *cut = task
    return audio.load_audio(path, sr, start, end, *cut)


class SharedRows:
    """Window-sized rows of one anonymous shared mapping made before the fork (no /dev/shm
    size limit applies), and the stack of free ones, which workers take from and the consumer
    gives back to under one lock. A clip's windows need not lie in consecutive rows."""

    def __init__(self, n_rows: int, window_samples: int):
        # populated now, once: else the consumer pays a page fault per 4 KiB the first time
        # it reads each row (about 0.2 ms per 10 s clip at 48 kHz, for the first 2 * ahead)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_ANONYMOUS", 0) | getattr(
            mmap, "MAP_POPULATE", 0)
        self.data = np.frombuffer(mmap.mmap(-1, n_rows * window_samples * 4, flags=flags),
                                  dtype=np.float32).reshape(n_rows, window_samples)
        self.free = np.frombuffer(mmap.mmap(-1, (n_rows + 1) * 8), dtype=np.int64)
        self.free[0] = n_rows  # how many are free; they are free[1 : 1 + free[0]]
        self.free[1:] = np.arange(n_rows)
        self.lock = mp.get_context("fork").Lock()

    @contextlib.contextmanager
    def _locked(self):
        if not self.lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise QamroError("a decoding worker died holding the shared audio's lock; rerun "
                             "the same command to resume")
        try:
            yield
        finally:
            self.lock.release()

    def take(self, k: int) -> list[int] | None:
        """k free rows, or None when fewer are free (the clip then travels pickled: slower,
        never stuck waiting for rows the consumer holds until it gets this very clip)."""
        with self._locked():
            n = int(self.free[0])
            if n < k:
                return None
            self.free[0] = n - k
            return self.free[1 + n - k:1 + n].tolist()

    def give(self, rows: list[int]) -> None:
        if rows:
            with self._locked():
                n = int(self.free[0])
                self.free[1 + n:1 + n + len(rows)] = rows
                self.free[0] = n + len(rows)


def _work(parent: int, tasks: Sequence[tuple], shared: SharedRows | None, todo, todo_lock,
          done, done_lock) -> None:
    """A worker: take task indices from `todo` until a negative one; for each, send (index,
    (rows, samples), None, None) with the audio in those shared rows, (index, audio, None,
    None) with the audio itself, (index, None, reason, None) for a bad file, or (index, None,
    None, exception) for anything else."""
    _worker_init(parent)
    while True:
        with todo_lock:
            i = int.from_bytes(todo.recv_bytes(), "little", signed=True)
        if i < 0:
            return
        try:
            x = _decode(tasks[i])
            msg = (i, x, None, None)
            k = max(1, math.ceil(len(x) / shared.data.shape[1])) if shared else 0
            rows = shared.take(k) if shared else None
            if rows is not None:
                w = shared.data.shape[1]
                for j, r in enumerate(rows):
                    window = x[j * w:(j + 1) * w]
                    shared.data[r, :len(window)] = window
                msg = (i, (rows, len(x)), None, None)
        except DataError as e:
            msg = (i, None, str(e), None)
        except Exception as e:  # raised again in the consumer, which stops the run
            msg = (i, None, None, e)
        with done_lock:
            done.send(msg)


class Decoder:
    """Decoded clips in task order, (row, windows, None) or (row, None, reason), at most
    `ahead` clips ahead of the consumer, so memory does not grow with the dataset.

    Workers write a clip's windows into free rows of a SharedRows (2 * (ahead + held) rows:
    every clip in flight and a batch of `held` clips kept by the consumer, at two windows a
    clip); the windows handed out are views of those rows until the consumer `release`s the
    clip. A clip that finds too few free rows travels pickled. share=False sends every clip
    that way (benchmarks); workers=0 decodes in this process."""

    def __init__(self, tasks: Sequence[tuple], workers: int, window_samples: int, ahead: int,
                 held: int, share: bool = True):
        self.tasks, self.workers, self.window_samples = list(tasks), workers, window_samples
        self.ahead = max(1, ahead)
        self.shared = (SharedRows(2 * (self.ahead + held), window_samples)
                       if workers > 0 and share else None)
        self.rows_of: dict[int, list[int]] = {}  # task row -> its shared rows, until released
        self.procs: list = []
        self.sent = self.next = 0  # tasks sent to the workers; the next one to hand out
        self.ready: dict[int, tuple] = {}  # results that came before their turn
        self.pickled = 0  # clips that found too few free rows (benchmarks report it)

    def __iter__(self):
        return self

    def _start(self) -> None:
        """Fork the workers (before the model loads: they need numpy, soundfile, soxr)."""
        ctx = mp.get_context("fork")
        self.todo_r, self.todo_w = ctx.Pipe(duplex=False)
        self.done_r, self.done_w = ctx.Pipe(duplex=False)
        locks = ctx.Lock(), ctx.Lock()
        for _ in range(self.workers):
            p = ctx.Process(target=_work, daemon=True, args=(
                os.getpid(), self.tasks, self.shared, self.todo_r, locks[0], self.done_w,
                locks[1]))
            p.start()
            self.procs.append(p)
        # one poller for the run: multiprocessing's wait() builds a selector per call, ~30 us
        self.poller = select.poll()
        for fd in (self.done_r.fileno(), *(p.sentinel for p in self.procs)):
            self.poller.register(fd, select.POLLIN)
        while self.sent < min(self.ahead, len(self.tasks)):
            self._send()

    def _send(self) -> None:
        self.todo_w.send_bytes(self.sent.to_bytes(8, "little", signed=True))
        self.sent += 1

    def _result(self, i: int) -> tuple:
        """Task i's message, reading the workers' messages as they come."""
        while i not in self.ready:
            ready = {fd for fd, _ in self.poller.poll()}
            if self.done_r.fileno() in ready:
                msg = self.done_r.recv()
                self.ready[msg[0]] = msg
                continue
            dead = next(p for p in self.procs if p.sentinel in ready)
            raise QamroError(f"a decoding worker died (exit code {dead.exitcode}); rerun the "
                             f"same command to resume")
        return self.ready.pop(i)

    def __next__(self):
        if self.next >= len(self.tasks):
            raise StopIteration
        i, row = self.next, self.tasks[self.next][0]
        self.next += 1
        if self.workers <= 0:
            try:
                return row, audio.windows(_decode(self.tasks[i]), self.window_samples), None
            except DataError as e:
                return row, None, str(e)
        if not self.procs:
            self._start()
        _, x, err, exc = self._result(i)
        if self.sent < len(self.tasks):
            self._send()
        if exc is not None:
            raise exc
        if x is None:
            return row, None, err
        if isinstance(x, tuple):  # the clip's windows are in these shared rows
            rows, n = self.rows_of[row] = x
            w = self.window_samples
            wins = [self.shared.data[r, :min(w, n - j * w)] for j, r in enumerate(rows)]
            return row, wins, None
        self.pickled += 1
        return row, audio.windows(x, self.window_samples), None

    def release(self, rows) -> None:
        """The consumer is done with these clips' audio: their shared rows may be reused."""
        if self.shared is not None:
            self.shared.give([r for row in rows for r in self.rows_of.pop(row, ((), 0))[0]])

    def close(self) -> None:
        """Stop the workers now (not at garbage collection), dropping queued decodes."""
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join()
        if self.procs:
            for c in (self.todo_r, self.todo_w, self.done_r, self.done_w):
                c.close()
        self.procs = []
        self.shared = None  # a worker stopped inside the rows' lock may have left it held
