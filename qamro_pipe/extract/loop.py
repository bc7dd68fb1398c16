"""Stage 1: run a frozen backbone over a dataset once and store its embeddings in the cache.

This module orchestrates a run: settings checked, the cache's key and plan (reuse.py), the
cache put in place, the decoding workers (decoding.py) and the batch pipeline (batches.py)
started, and a stop turned into a message that says how to resume. Decoding and resampling
run in worker processes (a bounded queue ahead of the model, so memory does not grow with the
dataset); the model sees batches of windows; finished clips are written and marked done batch
by batch, so an interrupted run resumes where it stopped and a finished one does nothing."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import EXTRACT_BATCH, ExtractConfig, cache_root, to_jsonable
from ..errors import DataError, Interrupted, QamroError
from ..store.files import journal_path, writer_lock
from ..store.reader import read_meta, refuse_foreign
from ..store.writer import CacheWriter, create_cache
from . import audio
from .backbones import Backbone, get_backbone
from .batches import BadFile, embed_batches
from .datasets import DatasetRecords
from .decoding import Decoder, decode_tasks
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
    # batch_size and workers were checked when cfg was made (ExtractConfig.__post_init__)
    device = extract_device(cfg.device)
    gpu = device.startswith("cuda")
    cfg = replace(cfg, batch_size=cfg.batch_size or EXTRACT_BATCH["cuda" if gpu else "cpu"],
                  workers=auto_workers(gpu) if cfg.workers is None else cfg.workers)
    bb = get_backbone(cfg.backbone, checkpoint=cfg.checkpoint, device=device,
                      precision=cfg.precision, offline=cfg.offline,
                      tokenizer_dir=cfg.tokenizer_dir, audio_input=cfg.clap_input,
                      keep_windows=cfg.keep_windows)
    if cfg.keep_windows and not any(not s.per_window and not s.text
                                     for s in bb.feature_specs().values()):
        raise QamroError(f"--keep-windows: the {bb.name} backbone's features are per window "
                         f"already; it keeps nothing more")
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


def extract_device(device: str) -> str:
    """The device extraction runs on: the named one, or for "auto" cuda where there is one."""
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
            {k: s.shape for k, s in specs.items() if k in bb.window_features()})


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
    tasks = decode_tasks(clips, plan.todo, bb)
    bar = tqdm(total=len(clips), initial=summary.done_before, unit="clip",
               desc=f"extract {bb.name}", disable=not progress, dynamic_ncols=True)
    # a whole batch may be decoding while the model has the last one: workers that wait
    # for the consumer to take finished clips would leave a fast GPU waiting in turn
    decoded = Decoder(tasks, cfg.workers, bb.window_samples,
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
        embed_batches(w, bb, records, cfg, plan, decoded, first, bar, summary, texts)
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
        if isinstance(e, BadFile):
            return DataError(f"{e.reason}; stopped before any clip was embedded, so no cache "
                             f"was kept: {_FIX}")
        if isinstance(e, KeyboardInterrupt):
            return Interrupted("interrupted before any clip was embedded; no cache was kept")
        return e
    if isinstance(e, BadFile):
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


