"""Stage 1: run a frozen backbone over a dataset once and store its embeddings in the cache.

Decoding and resampling run in worker processes (a bounded queue ahead of the model, so
memory does not grow with the dataset); the model sees batches of windows; finished clips
are written and marked done batch by batch, so an interrupted run resumes where it stopped
and a finished one does nothing."""
from __future__ import annotations

import hashlib
import itertools
import mmap
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import audio
from .backbones import Backbone, get_backbone
from ..config import ExtractConfig, cache_root, to_jsonable
from .datasets import Clip, DatasetRecords
from ..errors import CacheError, DataError, Interrupted, QamroError
from ..store.files import writer_lock
from ..store.writer import CacheWriter, create_cache
from ..store.reader import check_key, read_meta

@dataclass
class ExtractSummary:
    path: Path
    total: int
    done_before: int
    written: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # decoding, model and writing, after the model has loaded
    load_seconds: float = 0.0  # loading the backbone
    status: str = "complete"  # "complete", "nothing to do"


def default_cache_path(dataset: str, backbone: str, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or cache_root()) / dataset / f"{backbone}.h5"


def embeds_texts(records: DatasetRecords, bb: Backbone, texts: bool | None = None) -> bool:
    """Whether text features are made: when the backbone reads text and a clip has some
    (a clip without text has ""), or when the caller asks (`texts`). Audio-only extraction
    then needs nothing for text, such as CLAP's tokenizer files."""
    return bb.uses_text and (any(c.text for c in records.clips) if texts is None else texts)


def cache_key(records: DatasetRecords, bb: Backbone, texts: bool | None = None) -> dict[str, Any]:
    """What must match for an existing cache to be resumed or reused. The weights are named
    by their file's sha256, a downloaded release file's too (resolved, downloaded if need be,
    by bb.identity), and the files behind text features likewise."""
    texts = embeds_texts(records, bb, texts)
    ids = "\n".join(f"{c.id}\t{c.path.name}\t{c.start}\t{c.end}" for c in records.clips)
    return {"backbone": bb.key, **bb.identity(texts), "text_features": texts,
            "sample_rate": bb.sample_rate,
            "window_seconds": bb.window_seconds, "precision": bb.precision,
            "resampler": f"soxr {audio.RESAMPLE_QUALITY}", "downmix": "mean",
            "dataset": records.name, "label_names": list(records.label_names),
            "clips_sha256": hashlib.sha256(ids.encode()).hexdigest()}


_SHARED: np.ndarray | None = None  # in a decoding worker: the slots it writes clips into


def _worker_init(parent: int, shared: np.ndarray | None = None) -> None:
    """Workers leave Ctrl-C to the parent, which stops cleanly and says how to resume, and
    die with the parent (Linux): a worker orphaned by a SIGKILL would otherwise live on,
    blocked on its task queue. (Elsewhere one may; it holds no lock: store.writer_lock is a
    POSIX lock, which forked children do not inherit, and HDF5 files are opened unlocked.)"""
    global _SHARED
    _SHARED = shared
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _decode(task: tuple[int, str, int, float | None, float | None, int | None]):
    """Worker: one clip -> (row, audio, None) or (row, None, reason). With a slot, audio that
    fits is written into that shared slot and only its length travels back (an int instead
    of a pickled copy of megabytes); otherwise the array itself does."""
    row, path, sr, start, end, slot = task
    try:
        x = audio.load_audio(path, sr, start, end)
    except DataError as e:
        return row, None, str(e)
    if slot is not None and _SHARED is not None and len(x) <= _SHARED.shape[1]:
        _SHARED[slot, :len(x)] = x
        return row, len(x), None
    return row, x, None


def part_path(path: str | Path, index: int, count: int) -> Path:
    """Where shard index/count of cache `path` is written: NAME.part-K-of-N.h5."""
    path = Path(path)
    return path.with_name(f"{path.stem}.part-{index}-of-{count}{path.suffix}")


def extract(records: DatasetRecords, cfg: ExtractConfig = ExtractConfig(),
            cache_path: str | Path | None = None, force: bool = False,
            progress: bool = True, shard: tuple[int, int] | None = None,
            texts: bool | None = None) -> ExtractSummary:
    """Embed `records` into the cache at `cache_path`. With shard=(k, n), only clips k, k+n,
    k+2n, ... go into NAME.part-k-of-n.h5, which `shards.merge_parts` joins with the others
    into the cache a single process would have written. Text features are made when a clip
    has text, or when `texts` says so (embeds_texts)."""
    for what, value, least in (("--batch-size", cfg.batch_size, 1), ("--workers", cfg.workers, 0)):
        if value is not None and value < least:
            raise QamroError(f"{what} {value}: must be at least {least}")
    device = _device(cfg.device)
    gpu = device.startswith("cuda")
    cfg = replace(cfg, batch_size=cfg.batch_size or (64 if gpu else 16),
                  workers=auto_workers(gpu) if cfg.workers is None else cfg.workers)
    bb = get_backbone(cfg.backbone, checkpoint=cfg.checkpoint, device=device,
                      precision=cfg.precision, offline=cfg.offline,
                      tokenizer_dir=cfg.tokenizer_dir)
    path = Path(cache_path) if cache_path else default_cache_path(records.name, bb.name)
    if not records.clips:
        raise DataError(f"{records.name}: the dataset has no clips")
    texts = embeds_texts(records, bb, texts)  # for the whole set: shards must agree
    key = cache_key(records, bb, texts)
    extra: dict[str, Any] = {}
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise QamroError(f"--shard {k}/{n}: the index must be in 0..{n - 1}")
        extra["shard"] = {"index": k, "count": n, "full_key": key}
        records = replace(records, clips=records.clips[k::n])
        key = {**cache_key(records, bb, texts), "shard": f"{k}/{n}"}
        path = part_path(path, k, n)
    with writer_lock(path):
        if path.exists():
            try:
                meta = read_meta(path)
                check_key(meta, key, "this extract")
            except CacheError as e:
                if not force:
                    raise CacheError(f"{e}; pass --force to replace it") from None
                path.unlink()
            else:
                if meta.complete:
                    return ExtractSummary(path, len(records.clips), len(records.clips),
                                          status="nothing to do")
        if not path.exists():
            _create(path, records, bb, cfg, key, extra, texts)
        return _fill(path, records, bb, cfg, progress, texts)


def auto_workers(gpu: bool) -> int:
    """Decoding processes when none are asked for. On the CPU 2: the model needs the cores.
    On a GPU enough to keep it fed (a 10 s clip takes a few ms of one core to decode and
    resample; CLAP in bf16 on an H100 embeds one in ~0.6 ms), up to 8, leaving two cores to
    the process that feeds the model and sharing the rest with other ranks on this machine
    (torchrun's LOCAL_WORLD_SIZE)."""
    if not gpu:
        return 2
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(2, min(8, ((os.cpu_count() or 4) - 2) // ranks))


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _create(path: Path, records: DatasetRecords, bb: Backbone, cfg: ExtractConfig,
            key: dict[str, Any], extra: dict[str, Any] | None = None,
            texts: bool = True) -> None:
    specs = {k: s for k, s in bb.feature_specs().items() if texts or not s.text}
    clip_specs = {k: s.shape for k, s in specs.items() if not s.per_window}
    win_specs = {k: s.shape for k, s in specs.items() if s.per_window}
    counts = None
    bad: dict[str, str] = {}
    if win_specs:  # window rows are allocated up front: count them from the headers
        counts = []
        for c in records.clips:
            try:
                counts.append(audio.window_count(c.path, bb.sample_rate, bb.window_seconds,
                                                 c.start, c.end))
            except DataError as e:
                if not cfg.skip_bad:
                    raise
                bad[c.id] = str(e)
                counts.append(0)
    config = {"extract": to_jsonable(cfg), "provenance": bb.provenance(), "key": key,
              "label_range": records.label_range, **(extra or {})}
    create_cache(path, ids=[c.id for c in records.clips],
                 systems=[c.system for c in records.clips],
                 splits=[c.split for c in records.clips],
                 labels=np.array([c.labels for c in records.clips], dtype=np.float32),
                 label_names=records.label_names, backbone=bb.key, dataset=records.name,
                 config=config, key=key, feature_shapes=clip_specs, window_shapes=win_specs,
                 window_counts=counts, texts=[c.text for c in records.clips],
                 system_mos=records.system_mos or None)
    if bad:
        with CacheWriter(path) as w:
            w.skip(bad)


def _fill(path: Path, records: DatasetRecords, bb: Backbone, cfg: ExtractConfig,
          progress: bool, texts: bool = True) -> ExtractSummary:
    from tqdm import tqdm

    clips = records.clips
    with CacheWriter(path) as w:
        todo = [int(r) for r in w.pending() if clips[r].id not in w.skipped]
        summary = ExtractSummary(path, len(clips), len(clips) - len(todo))
        tasks = [(r, str(clips[r].path), bb.sample_rate, clips[r].start, clips[r].end)
                 for r in todo]
        bar = tqdm(total=len(clips), initial=summary.done_before, unit="clip",
                   desc=f"extract {bb.name}", disable=not progress, dynamic_ncols=True)
        # a whole batch may be decoding while the model has the last one: workers that wait
        # for the consumer to take finished clips would leave a fast GPU waiting in turn
        decoded = _Decoder(tasks, cfg.workers, bb.window_samples,
                           ahead=max(8, 4 * cfg.workers, cfg.batch_size), held=cfg.batch_size)
        pending: list[_Launched] = []  # at most one batch computing while the next forms

        def write_pending() -> None:
            while pending:
                job = pending.pop()  # taken first: a batch that fails is not retried
                summary.written += _write(w, bb, clips, job)
                bar.update(len(job.rows))

        def launch(batch) -> None:
            """Batch N+1 starts before batch N is collected and written, so on a GPU the
            host prepares and writes while the device computes."""
            try:
                job = _launch(bb, clips, batch, cfg.batch_size, texts)
            finally:
                decoded.release([r for r, _ in batch])  # their audio was copied
                write_pending()  # also when launching failed: finished work is kept
            pending.append(job)

        try:
            first = next(decoded, None)  # forks the decoding workers before the model loads
            t_load = time.perf_counter()
            if tasks and not bb.loaded:  # a resumed run with nothing left only finishes
                import torch  # noqa: F401  (every backbone runs under it: start-up, not work)

                bb.load()
                bb.loaded = True
            summary.load_seconds = time.perf_counter() - t_load
            t_run = time.perf_counter()
            batch: list[tuple[int, list[np.ndarray]]] = []
            n_windows = 0
            for row, wins, err in itertools.chain([first] if first else [], decoded):
                if err is not None:
                    decoded.release([row])
                    if not cfg.skip_bad:
                        write_pending()
                        raise DataError(
                            f"{err}; stopped with {int(w.done.sum())}/{len(clips)} clips safely "
                            f"in {path}: fix or remove the file and rerun, or rerun with "
                            f"--skip-bad to list bad files in the cache and go on")
                    w.skip({clips[row].id: err})
                    summary.skipped[clips[row].id] = err
                    bar.update(1)
                    continue
                batch.append((row, wins))
                n_windows += len(wins)
                if n_windows >= cfg.batch_size:
                    launch(batch)
                    batch, n_windows = [], 0
            if batch:
                launch(batch)
            write_pending()
        except BaseException as e:
            write_pending()  # whatever stopped the run, the batch already computed is kept
            bar.close()
            if isinstance(e, KeyboardInterrupt):
                done = int(w.done.sum())
                raise Interrupted(f"interrupted: {done}/{len(clips)} clips are safely in "
                                  f"{path}; rerun the same command to resume") from None
            raise
        finally:
            bar.close()
            decoded.close()  # stops the decoding workers now, not at garbage collection
        summary.skipped = dict(w.skipped)  # this run's and earlier runs'
        w.finish()
    summary.seconds = time.perf_counter() - t_run
    return summary


class _Decoder:
    """Decoded clips in order, (row, windows, None) or (row, None, reason), at most `ahead`
    clips ahead of the consumer, so memory does not grow with the dataset.

    Workers write each clip's audio into a slot of one shared anonymous mapping made before
    the fork (no /dev/shm size limit applies), so a result crosses the process boundary as
    an int; the clip's windows are views of its slot until the consumer `release`s the row.
    There are `ahead + held` slots of two windows each: enough for every clip in flight and
    a batch held by the consumer. A clip that does not fit, or finds no free slot, travels
    pickled: slower, never stuck. share=False sends every clip that way (benchmarks)."""

    def __init__(self, tasks, workers: int, window_samples: int, ahead: int, held: int,
                 share: bool = True):
        self.tasks, self.workers, self.window_samples = iter(tasks), workers, window_samples
        self.ahead = ahead
        self.slot_of: dict[int, int] = {}  # row -> its slot, until released
        self.pool = None
        self.queue: deque = deque()
        self.shared, self.free = None, deque()
        if workers > 0 and share:
            n_slots, capacity = ahead + held, 2 * window_samples
            self.shared = np.frombuffer(mmap.mmap(-1, n_slots * capacity * 4),
                                        dtype=np.float32).reshape(n_slots, capacity)
            self.free = deque(range(n_slots))

    def __iter__(self):
        return self

    def _submit(self, task) -> None:
        slot = self.free.popleft() if self.free else None
        if slot is not None:
            self.slot_of[task[0]] = slot
        self.queue.append(self.pool.submit(_decode, (*task, slot)))

    def __next__(self):
        if self.workers <= 0:
            row, x, err = _decode((*next(self.tasks), None))
            return row, None if x is None else audio.windows(x, self.window_samples), err
        if self.pool is None:  # fork before the model loads: workers need numpy, sf, soxr
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context("fork"), initializer=_worker_init,
                initargs=(os.getpid(), self.shared))
            for task in itertools.islice(self.tasks, self.ahead):
                self._submit(task)
        if not self.queue:
            raise StopIteration
        row, x, err = self.queue.popleft().result()
        nxt = next(self.tasks, None)
        if nxt is not None:
            self._submit(nxt)
        if isinstance(x, int):  # in the row's slot
            x = self.shared[self.slot_of[row], :x]
        return row, None if x is None else audio.windows(x, self.window_samples), err

    def release(self, rows) -> None:
        """The consumer is done with these rows' audio: their slots may be reused."""
        for r in rows:
            slot = self.slot_of.pop(r, None)
            if slot is not None:
                self.free.append(slot)

    def close(self) -> None:
        """Stop the workers now (not at garbage collection), dropping queued decodes."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


@dataclass
class _Launched:
    """A batch whose features are being computed: its rows, window counts and lengths (not
    its audio, whose memory the decoder may already reuse) and the backbone's pending work."""
    rows: list[int]
    counts: list[int]  # windows per clip
    lengths: np.ndarray  # samples per window, float32 [W_total]
    parts: list[Any]  # backbones.base.Pending, one per forward pass
    text: Any  # Pending or None


def _launch(bb: Backbone, clips: list[Clip], batch: list[tuple[int, list[np.ndarray]]],
            batch_size: int, texts: bool = True) -> _Launched:
    """Start the backbone on a batch of clips. On a GPU this returns once the work is queued:
    the windows are copied into the model's input, and the host can go on.

    The order matters there: the first forward's input is prepared on the host (while the
    device still runs the previous batch), then the texts are embedded, then the audio
    forward is queued. The text tower waits for the device (transformers checks its
    attention mask on the host), and at that point only the previous batch is queued."""
    flat = [x for _, wins in batch for x in wins]
    rows = [r for r, _ in batch]
    # at most batch_size windows per forward pass: one long clip (an hour is 360 windows)
    # must not become one giant batch
    chunks = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    first = bb.prepare_windows(chunks[0])
    text = bb.embed_texts_async([clips[r].text for r in rows]) if texts else None
    parts = [bb.forward_prepared(first)] + [bb.embed_windows_async(c) for c in chunks[1:]]
    return _Launched(rows, [len(wins) for _, wins in batch],
                     np.array([len(x) for x in flat], dtype=np.float32), parts, text)


def _write(w: CacheWriter, bb: Backbone, clips: list[Clip], job: _Launched) -> int:
    """Wait for a launched batch's features, pool them per clip, check them, write them."""
    results = [p.result() for p in job.parts]
    feats = {k: np.concatenate([r[k] for r in results]) for k in results[0]}  # [W_total, ...]
    specs = bb.feature_specs()
    clip_feats: dict[str, list[np.ndarray]] = {k: [] for k, s in specs.items()
                                                if not s.per_window and k in feats}
    win_feats: dict[str, list[np.ndarray]] = {k: [] for k, s in specs.items() if s.per_window}
    weights = []
    start = 0
    for row, count in zip(job.rows, job.counts):
        sl = slice(start, start + count)
        start += count
        for k in clip_feats:
            clip_feats[k].append(bb.pool(feats[k][sl], job.lengths[sl]))
        for k in win_feats:
            got = feats[k][sl]
            expected = int(w.offsets[row + 1] - w.offsets[row])
            if len(got) != expected:
                raise DataError(f"{clips[row].path}: decoded into {len(got)} windows but its "
                                f"header promised {expected} (inconsistent file header)")
            win_feats[k].append(got)
        weights.append(job.lengths[sl])
    out = {k: np.stack(v) for k, v in clip_feats.items()}
    if job.text is not None:
        out.update(job.text.result())
    for k, v in out.items():
        if not np.isfinite(v).all():
            bad = clips[job.rows[int(np.argmax(~np.isfinite(v.reshape(len(v), -1)).all(1)))]]
            raise DataError(f"{bad.path}: the backbone produced NaN or inf features ({k})")
    w.write(job.rows, out, win_feats or None, weights if win_feats else None)
    return len(job.rows)


def records_for(dataset: str | None, root: str | Path | None, manifest: str | Path | None,
                splits: str | None = None) -> DatasetRecords:
    """The CLI's dataset choice -> records."""
    from .datasets import load_dataset

    if manifest:
        return load_dataset("manifest", manifest)
    if not dataset:
        raise QamroError("say what to extract: --dataset NAME --root DIR, or --manifest FILE")
    if dataset == "demo":
        return load_dataset("demo", root or (cache_root() / "demo-corpus"))
    if root is None:
        raise QamroError(f"--dataset {dataset} needs --root (the dataset's folder)")
    opts = {"splits": tuple(splits.split(","))} if splits and dataset == "musiceval" else {}
    return load_dataset(dataset, root, **opts)


def summary_text(s: ExtractSummary) -> str:
    if s.status == "nothing to do":
        return f"{s.path}: already complete ({s.total} clips); nothing to do"
    rate = s.written / s.seconds if s.seconds else 0.0
    text = (f"{s.path}: {s.written} clips extracted in {s.seconds:.1f} s ({rate:.1f} clips/s; "
            f"model load {s.load_seconds:.1f} s)"
            + (f", {s.done_before} were already done" if s.done_before else ""))
    if s.skipped:
        text += f"\nskipped {len(s.skipped)} bad file(s):\n" + "\n".join(
            f"  {v}" for v in s.skipped.values())
    return text
