"""Stage 1: run a frozen backbone over a dataset once and store its embeddings in the cache.

Decoding and resampling run in worker processes (a bounded queue ahead of the model, so
memory does not grow with the dataset); the model sees batches of windows; finished clips
are written and marked done batch by batch, so an interrupted run resumes where it stopped
and a finished one does nothing."""
from __future__ import annotations

import itertools
import mmap
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import audio
from .backbones import Backbone, get_backbone
from ..config import EXTRACT_BATCH, ExtractConfig, cache_root, check_label_range, to_jsonable
from .datasets import Clip, DatasetRecords
from ..errors import DataError, Interrupted, QamroError
from ..store.files import journal_path, writer_lock
from ..store.writer import CacheWriter, create_cache
from ..store.reader import read_meta, refuse_foreign
from .reuse import ReusePlan, clip_columns, clips_digest, dataset_level, make_plan

@dataclass
class ExtractSummary:
    path: Path
    total: int
    done_before: int
    written: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # decoding, model and writing, after the model has loaded
    load_seconds: float = 0.0  # loading the backbone
    status: str = "complete"  # "complete", "nothing to do", "rewritten" (nothing embedded)
    kept: int = 0  # rows carried over from the earlier cache into a new one
    changes: list[str] = field(default_factory=list)  # what differed from the earlier cache


def default_cache_path(dataset: str, backbone: str, cache_dir: str | Path | None = None,
                       audio_input: str = "resampled") -> Path:
    """CACHE_ROOT/DATASET/BACKBONE.h5; a cache of the published input (--clap-input
    published) is BACKBONE-published-input.h5, so it never takes the place of the other."""
    name = backbone if audio_input == "resampled" else f"{backbone}-{audio_input}-input"
    return Path(cache_dir or cache_root()) / dataset / f"{name}.h5"


def embeds_texts(records: DatasetRecords, bb: Backbone, texts: bool | None = None) -> bool:
    """Whether text features are made: when the backbone reads text and a clip has some
    (a clip without text has ""), or when the caller asks (`texts`). Audio-only extraction
    then needs nothing for text, such as CLAP's tokenizer files."""
    return bb.uses_text and (any(c.text for c in records.clips) if texts is None else texts)


def cache_key(records: DatasetRecords, bb: Backbone, texts: bool) -> dict[str, Any]:
    """What must match for an existing cache's rows to be kept at all: what made the numbers
    (the weights and, when texts are embedded, the tokenizer files, by their sha256: a
    downloaded release file too, resolved by bb.identity) and the dataset they belong to.
    Which rows are kept is decided clip by clip (reuse.py); whether text features are made
    is part of the cache's layout, which reuse.py compares."""
    return {"backbone": bb.key, **bb.identity(texts), "sample_rate": bb.sample_rate,
            "window_seconds": bb.window_seconds, "precision": bb.precision,
            "resampler": audio.RESAMPLERS[bb.resampler], "downmix": "mean",
            "dataset": records.name, **bb.input_key()}


_SHARED: np.ndarray | None = None  # in a decoding worker: the slots it writes clips into


def _worker_init(parent: int, shared: np.ndarray | None = None) -> None:
    """Workers leave Ctrl-C to the parent, which stops cleanly and says how to resume, and
    die with the parent (Linux): a worker orphaned by a SIGKILL would otherwise live on,
    blocked on its task queue. (Elsewhere one may; it holds no lock: store.writer_lock is a
    POSIX lock, which forked children do not inherit, and HDF5 files are opened unlocked.)"""
    global _SHARED
    _SHARED = shared
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


def _decode(task: tuple):
    """Worker: one clip -> (row, audio, None) or (row, None, reason). A task is (row, path,
    sample rate or None for the file's own, start, end[, max frames, resampler], slot). With a slot,
    audio that fits is written into that shared slot and only its length travels back (an
    int instead of a pickled copy of megabytes); otherwise the array itself does."""
    row, path, sr, start, end, *cut, slot = task
    try:
        x = audio.load_audio(path, sr, start, end, *cut)
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
    """Embed `records` into the cache at `cache_path`, keeping every row of an existing cache
    there that still holds (reuse.py). With shard=(k, n), only clips k, k+n, k+2n, ... go
    into NAME.part-k-of-n.h5, which `shards.merge_parts` joins with the others into the
    cache a single process would have written. Text features are made when a clip has
    text, or when `texts` says so (embeds_texts)."""
    run = _setup(records, cfg, cache_path, shard, texts)
    with writer_lock(run.path):
        plan = run.plan(force)
        if plan.nothing_to_do:
            n = len(run.records.clips)
            return ExtractSummary(run.path, n, n, status="nothing to do")
        make = None
        if plan.new_file:
            def make() -> None:
                _create(run.path, run.records, run.bb, run.cfg, run.key, run.extra, plan,
                        run.texts)
        return _fill(run.path, run.records, run.bb, run.cfg, progress, plan, make, force,
                     run.texts)


def plan_only(records: DatasetRecords, cfg: ExtractConfig, cache_path: str | Path,
              force: bool = False) -> ReusePlan:
    """What `extract` would do with the cache at `cache_path`, writing nothing."""
    return _setup(records, cfg, cache_path, None, None).plan(force)


@dataclass
class _Run:
    """An extraction with every setting checked and its target known; nothing written yet."""
    cfg: ExtractConfig  # batch size and workers resolved
    bb: Backbone
    path: Path
    records: DatasetRecords  # the shard's clips under --shard
    key: dict[str, Any]
    extra: dict[str, Any]  # more config: the shard's place in the whole
    seed: Path | None  # under --shard, the whole dataset's cache, whose rows a part may keep
    texts: bool  # whether text features are made (embeds_texts, for the whole dataset)

    def plan(self, force: bool) -> ReusePlan:
        clip_specs, win_specs = _specs(self.bb, self.texts)
        window = ((self.bb.sample_rate, self.bb.window_seconds, self.bb.resampler)
                  if win_specs else None)
        return make_plan(self.path, self.records, self.key, _layout(clip_specs, win_specs),
                         dataset_level(self.records, self.extra), force, self.cfg.skip_bad,
                         self.texts, window, self.seed)


def _setup(records: DatasetRecords, cfg: ExtractConfig, cache_path: str | Path | None,
           shard: tuple[int, int] | None, texts: bool | None) -> _Run:
    for what, value, least in (("--batch-size", cfg.batch_size, 1), ("--workers", cfg.workers, 0)):
        if value is not None and value < least:
            raise QamroError(f"{what} {value}: must be at least {least}")
    device = _device(cfg.device)
    gpu = device.startswith("cuda")
    cfg = replace(cfg, batch_size=cfg.batch_size or EXTRACT_BATCH["cuda" if gpu else "cpu"],
                  workers=auto_workers(gpu) if cfg.workers is None else cfg.workers)
    bb = get_backbone(cfg.backbone, checkpoint=cfg.checkpoint, device=device,
                      precision=cfg.precision, offline=cfg.offline,
                      tokenizer_dir=cfg.tokenizer_dir, audio_input=cfg.clap_input)
    path = Path(cache_path) if cache_path else default_cache_path(records.name, bb.name,
                                                                  audio_input=bb.audio_input)
    if path.is_symlink() and path.exists():
        path = path.resolve()  # write the cache the link names; the link stays
    if not records.clips:
        raise DataError(f"{records.name}: the dataset has no clips")
    full, seed = records, None
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise QamroError(f"--shard {k}/{n}: the index must be in 0..{n - 1}")
        records = replace(records, clips=records.clips[k::n])
        path, seed = part_path(path, k, n), path
    refuse_foreign(path)
    texts = embeds_texts(full, bb, texts)  # for the whole dataset: its shards must agree
    key = cache_key(full, bb, texts)
    extra: dict[str, Any] = {}
    if shard is not None:
        extra["shard"] = {"index": k, "count": n, "full_key": key,
                          "clips_sha256": clips_digest(full)}
        key = {**key, "shard": f"{k}/{n}"}
    return _Run(cfg, bb, path, records, key, extra, seed, texts)


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


def _specs(bb: Backbone, texts: bool) -> tuple[dict[str, tuple[int, ...]],
                                                dict[str, tuple[int, ...]]]:
    """(per-clip, per-window) feature shapes of the cache this backbone writes (text
    features only when texts are embedded)."""
    specs = {k: s for k, s in bb.feature_specs().items() if texts or not s.text}
    return ({k: s.shape for k, s in specs.items() if not s.per_window},
            {k: s.shape for k, s in specs.items() if s.per_window})


def _layout(clip_specs, win_specs) -> dict[str, tuple[tuple[int, ...], str]]:
    """The datasets of features a cache holds: name -> (row shape, dtype)."""
    out = {f"features/{k}": (tuple(v), "float32") for k, v in clip_specs.items()}
    if win_specs:
        out["windows/weight"] = ((), "float32")
        out.update({f"windows/{k}": (tuple(v), "float32") for k, v in win_specs.items()})
    return out


def _create(path: Path, records: DatasetRecords, bb: Backbone, cfg: ExtractConfig,
            key: dict[str, Any], extra: dict[str, Any], plan: ReusePlan, texts: bool) -> None:
    """Put the new cache the plan asks for in place: every row allocated, kept rows copied
    from the old cache, skips carried over."""
    clip_specs, win_specs = _specs(bb, texts)
    provenance = bb.provenance()
    if not bb.loaded and plan.copy is not None:  # every row is kept: they say what made them
        provenance = read_meta(plan.copy.src).config.get("provenance", provenance)
    config = {"extract": to_jsonable(cfg), "provenance": provenance, "key": key,
              "label_range": records.label_range, **extra}
    cols = clip_columns(records)
    ratings, rater_ids = records.ratings_arrays()
    create_cache(path, ids=[c.id for c in records.clips], systems=cols["systems"],
                 splits=cols["splits"], labels=cols["labels"], texts=cols["texts"],
                 label_names=records.label_names, backbone=bb.key, dataset=records.name,
                 config=config, key=key, feature_shapes=clip_specs, window_shapes=win_specs,
                 window_counts=plan.counts, system_mos=records.system_mos or None,
                 ratings=ratings, rater_ids=rater_ids, sources=plan.sources,
                 source_stat=plan.stats, skipped=plan.skipped, copy_from=plan.copy)


def _fill(path: Path, records: DatasetRecords, bb: Backbone, cfg: ExtractConfig,
          progress: bool, plan: ReusePlan, make, force: bool, texts: bool) -> ExtractSummary:
    """Embed the plan's rows. The decoding workers start first (forked before the model
    loads), then the model loads, and only then does `make` put a new cache in place: a
    start that fails (no weights, say) leaves the earlier cache, or none, as it was."""
    from tqdm import tqdm

    clips = records.clips
    summary = ExtractSummary(path, len(clips), len(clips) - len(plan.todo), kept=plan.kept,
                             changes=list(plan.changes))
    tasks = [(r, str(clips[r].path), bb.decode_rate, clips[r].start, clips[r].end,
              bb.max_frames, bb.resampler) for r in plan.todo]
    bar = tqdm(total=len(clips), initial=summary.done_before, unit="clip",
               desc=f"extract {bb.name}", disable=not progress, dynamic_ncols=True)
    # a whole batch may be decoding while the model has the last one: workers that wait
    # for the consumer to take finished clips would leave a fast GPU waiting in turn
    decoded = _Decoder(tasks, cfg.workers, bb.window_samples,
                       ahead=max(8, 4 * cfg.workers, cfg.batch_size), held=cfg.batch_size)
    w: CacheWriter | None = None
    try:
        first = next(decoded, None)  # forks the decoding workers before the model loads
        t_load = time.perf_counter()
        if tasks and not bb.loaded:  # a resumed run with nothing left only finishes
            import torch  # noqa: F401  (every backbone runs under it: start-up, not work)

            bb.load()
        summary.load_seconds = time.perf_counter() - t_load
        if make is not None:
            make()
        w = CacheWriter(path)
        t_run = time.perf_counter()
        _embed(w, bb, records, cfg, plan, decoded, first, bar, summary, texts)
        summary.seconds = time.perf_counter() - t_run
        summary.skipped = dict(w.skipped)  # this run's and earlier runs'
        w.finish()
    except BaseException as e:
        raise _stopped(e, w, path, len(clips), make is not None, force) from None
    finally:
        bar.close()
        decoded.close()  # stops the decoding workers now, not at garbage collection
        if w is not None:
            w.close()
    if plan.copy is not None and not tasks:
        summary.status = "rewritten"
    return summary


def _stopped(e: BaseException, w: "CacheWriter | None", path: Path, total: int, made: bool,
             force: bool) -> BaseException:
    """The error to raise when a run stops early. A cache this run put in place that holds
    no clip yet is removed: a failed start leaves no file behind."""
    done = 0 if w is None else int(w.done.sum())
    if made and w is not None and done == 0 and not w.skipped:
        w.close()
        path.unlink(missing_ok=True)
        journal_path(path).unlink(missing_ok=True)
        if isinstance(e, _BadFile):
            return DataError(f"{e.reason}; stopped before any clip was embedded, so no cache "
                             f"was kept: {_FIX}")
        if isinstance(e, KeyboardInterrupt):
            return Interrupted("interrupted before any clip was embedded; no cache was kept")
        return e
    if isinstance(e, _BadFile):
        return DataError(f"{e.reason}; stopped with {done}/{total} clips safely in {path}: "
                         f"{_FIX}")
    if isinstance(e, KeyboardInterrupt):
        if w is None:
            return Interrupted(f"interrupted before extraction began; {path} is as it was"
                               if path.exists() else "interrupted before extraction began")
        again = "the same command without --force" if force else "the same command"
        return Interrupted(f"interrupted: {done}/{total} clips are safely in {path}; rerun "
                           f"{again} to resume")
    return e


_FIX = ("fix the file (or drop its row from the dataset's list) and rerun, or rerun with "
        "--skip-bad to list bad files in the cache and go on")


class _BadFile(Exception):
    """A clip that cannot be decoded, without --skip-bad: stops the run (see _stopped)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _embed(w: CacheWriter, bb: Backbone, records: DatasetRecords, cfg: ExtractConfig,
           plan: ReusePlan, decoded: "_Decoder", first, bar, summary: ExtractSummary,
           texts: bool) -> None:
    """Decode, embed and write the plan's rows, batch by batch; launching batch N+1 before
    batch N is collected and written."""
    clips = records.clips
    pending: list[_Launched] = []  # at most one batch computing while the next forms

    def write_pending() -> None:
        while pending:
            job = pending.pop()  # taken first: a batch that fails is not retried
            summary.written += _write(w, bb, clips, job, plan.stats)
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
        batch: list[tuple[int, list[np.ndarray]]] = []
        n_windows = 0
        for row, wins, err in itertools.chain([first] if first else [], decoded):
            if err is not None:
                decoded.release([row])
                if not cfg.skip_bad:
                    raise _BadFile(err)
                w.skip({clips[row].id: err}, {clips[row].id: plan.stats[row]})
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
    except BaseException:
        write_pending()  # whatever stopped the run, the batch already computed is kept
        raise


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
            batch_size: int, texts: bool) -> _Launched:
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


def gather(bb: Backbone, job: _Launched) -> tuple[dict[str, np.ndarray],
                                                  dict[str, list[np.ndarray]], list[np.ndarray]]:
    """Wait for a launched batch's features and pool them per clip -> (clip features
    {name: [clips, ...]}, texts' included; per-window features {name: one [W, ...] per clip};
    each clip's window lengths). What extraction writes, and the Scorer keeps in memory."""
    results = [p.result() for p in job.parts]
    feats = {k: np.concatenate([r[k] for r in results]) for k in results[0]}  # [W_total, ...]
    specs = bb.feature_specs()
    clip_feats: dict[str, list[np.ndarray]] = {k: [] for k, s in specs.items()
                                                if not s.per_window and k in feats}
    win_feats: dict[str, list[np.ndarray]] = {k: [] for k, s in specs.items() if s.per_window}
    weights = []
    start = 0
    for count in job.counts:
        sl = slice(start, start + count)
        start += count
        for k in clip_feats:
            clip_feats[k].append(bb.pool(feats[k][sl], job.lengths[sl]))
        for k in win_feats:
            win_feats[k].append(feats[k][sl])
        weights.append(job.lengths[sl])
    out = {k: np.stack(v) for k, v in clip_feats.items()}
    if job.text is not None:
        out.update(job.text.result())
    return out, win_feats, weights


def _write(w: CacheWriter, bb: Backbone, clips: list[Clip], job: _Launched,
           stats: np.ndarray) -> int:
    """Wait for a launched batch's features, pool them per clip, check them, write them."""
    out, win_feats, weights = gather(bb, job)
    for k, wins in win_feats.items():
        for row, got in zip(job.rows, wins):
            expected = int(w.offsets[row + 1] - w.offsets[row])
            if len(got) != expected:
                raise DataError(f"{clips[row].path}: decoded into {len(got)} windows but its "
                                f"header promised {expected} (inconsistent file header)")
    for k, v in out.items():
        if not np.isfinite(v).all():
            bad = clips[job.rows[int(np.argmax(~np.isfinite(v.reshape(len(v), -1)).all(1)))]]
            raise DataError(f"{bad.path}: the backbone produced NaN or inf features ({k})")
    w.write(job.rows, out, win_feats or None, weights if win_feats else None,
            stats[job.rows])
    return len(job.rows)


def records_for(dataset: str | None, root: str | Path | None, manifest: str | Path | None,
                splits: str | None = None, eval_dir: str | Path | None = None,
                lists: str | Path | None = None,
                label_range: str | None = None) -> DatasetRecords:
    """The CLI's dataset choice -> records. `label_range` "LO,HI": a manifest's scale."""
    from .datasets import load_dataset

    if label_range is not None and not manifest:
        raise QamroError("--label-range applies to --manifest (the published data sets "
                         "declare their own scale)")
    if manifest:
        return load_dataset("manifest", manifest,
                            label_range=parse_label_range(label_range))
    if not dataset:
        raise QamroError("say what to extract: --dataset NAME --root DIR, or --manifest FILE")
    if dataset == "demo":
        return load_dataset("demo", root or (cache_root() / "demo-corpus"))
    if root is None:
        raise QamroError(f"--dataset {dataset} needs --root (the dataset's folder)")
    opts: dict[str, Any] = {}
    for flag, name, value, takes in (("--splits", "splits", splits, ("musiceval", "aes-natural")),
                                     ("--eval-dir", "eval_dir", eval_dir,
                                      ("musiceval", "aes-natural")),
                                     ("--lists", "lists", lists, ("aes-natural",))):
        if value is not None and dataset not in takes:
            raise QamroError(f"{flag} applies to --dataset {' or '.join(takes)}")
        if value is not None:
            opts[name] = tuple(value.split(",")) if name == "splits" else value
    return load_dataset(dataset, root, **opts)


def parse_label_range(text: str | None) -> tuple[float, float] | None:
    """--label-range "LO,HI" -> (lo, hi), checked; None when not given."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise QamroError(f"--label-range {text!r}: give the scale as two numbers LO,HI, "
                         f"e.g. 1,5") from None
    check_label_range((lo, hi), "--label-range")
    return lo, hi


def summary_text(s: ExtractSummary) -> str:
    if s.status == "nothing to do":
        return f"{s.path}: already complete ({s.total} clips); nothing to do"
    update = "; ".join(([f"kept {s.kept} clips of the earlier cache"] if s.kept else [])
                       + s.changes)
    if s.status == "rewritten":
        text = f"{s.path}: nothing to embed ({s.total} clips); {update}"
    else:
        rate = s.written / s.seconds if s.seconds else 0.0
        text = (f"{s.path}: {s.written} clips extracted in {s.seconds:.1f} s ({rate:.1f} "
                f"clips/s; model load {s.load_seconds:.1f} s)"
                + (f", {s.done_before} were already done" if s.done_before else "")
                + (f"\n{update}" if update else ""))
    if s.skipped:
        text += f"\nskipped {len(s.skipped)} bad file(s):\n" + "\n".join(
            f"  {v}" for v in s.skipped.values())
    return text
