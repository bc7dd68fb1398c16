"""Extraction past one process: shards and their merge.

`extract --shard k/n` (a scheduler's job array) writes clips k, k+n, ... of the dataset into
NAME.part-k-of-n.h5; `cache merge` joins the n parts into NAME.h5, row for row the cache one
process would have written. Under `torchrun`, each rank extracts its shard and rank 0 merges."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheError, QamroError
from ..store.files import writer_lock
from ..store.reader import Cache, read_cache, read_meta, refuse_foreign
from ..store.writer import CacheWriter, create_cache


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise QamroError(f"--shard {text!r}: write it as K/N, e.g. 0/4") from None
    if n < 1 or not 0 <= k < n:
        raise QamroError(f"--shard {text}: need 0 <= K < N")
    return k, n


def _check_parts(parts: list[Cache]) -> tuple[int, dict[str, Any]]:
    infos = []
    for c in parts:
        info = c.meta.config.get("shard")
        if not info:
            raise CacheError(f"{c.path}: not a shard (made without --shard)")
        if not isinstance(info, dict) or not all(
                isinstance(info.get(k), int) and not isinstance(info.get(k), bool)
                for k in ("index", "count")):
            raise CacheError(f"{c.path}: its 'shard' config is not a table with whole "
                             f"numbers 'index' and 'count' (found {info!r:.80})")
        infos.append(info)
    n = infos[0]["count"]
    if sorted(i["index"] for i in infos) != list(range(n)) or any(i["count"] != n
                                                                  for i in infos):
        have = ", ".join(f"{i['index']}/{i['count']}" for i in infos)
        raise CacheError(f"merging needs shards 0..{n - 1} of {n} exactly once; got {have}")
    first = parts[0].meta
    for c in parts[1:]:
        same = (c.meta.backbone, c.meta.dataset, c.meta.label_names) == \
            (first.backbone, first.dataset, first.label_names)
        info = c.meta.config["shard"]
        if not same or any(info.get(k) != infos[0].get(k) for k in ("full_key", "clips_sha256")):
            raise CacheError(f"{c.path}: not a shard of the same extraction as "
                             f"{parts[0].path} (backbone, dataset, clips or settings differ)")
        if _layout(c) != _layout(parts[0]):
            raise CacheError(f"{c.path}: its features ({_layout(c)}) differ from those of "
                             f"{parts[0].path} ({_layout(parts[0])}): not shards of one "
                             f"extraction")
    if not isinstance(infos[0].get("full_key"), dict):
        raise CacheError(f"{parts[0].path}: its 'shard' config has no 'full_key' table")
    return n, infos[0]["full_key"]


def _layout(c: Cache) -> str:
    return ", ".join(f"{k} {v.dtype}{list(v.shape[1:])}"
                     for k, v in sorted({**c.features, **c.windows}.items()))


def _unfinished_merge(out: Path, full_key: dict[str, Any]) -> bool:
    """Whether `out` is what a killed merge of these shards left: an unfinished cache with
    their key. Such a file is rebuilt by the same command, no --force needed."""
    try:
        meta = read_meta(out)
    except CacheError:
        return False
    return not meta.complete and meta.key == full_key


def merge_parts(paths: list[str | Path], out: str | Path, force: bool = False) -> Path:
    """Join finished shards into one cache, in the dataset's row order. `force` replaces a
    cache at `out`, never anything else."""
    out = Path(out)
    refuse_foreign(out)
    for p in paths:
        if Path(p).exists() and out.exists() and Path(p).samefile(out):
            raise QamroError(f"--out {out} is one of the shards being merged; choose another")
    parts = [read_cache(p) for p in paths]
    n, full_key = _check_parts(parts)
    parts.sort(key=lambda c: c.meta.config["shard"]["index"])
    if out.exists() and not force and not _unfinished_merge(out, full_key):
        raise QamroError(f"{out}: exists; pass --force to replace it")
    sizes = [len(c.ids) for c in parts]
    total = sum(sizes)
    order = [(r % n, r // n) for r in range(total)]  # full row -> (part, row in part)
    if [sum(1 for p, _ in order if p == k) for k in range(n)] != sizes:
        raise CacheError("the shards' sizes do not interleave into one dataset")

    def column(get):
        return [get(parts[p])[i] for p, i in order]

    p0 = parts[0]
    config = {k: v for k, v in p0.meta.config.items() if k != "shard"}
    config["key"] = full_key
    counts = None
    if p0.window_offsets is not None:
        counts = column(lambda c: np.diff(c.window_offsets))
    sourced = all(c.sources is not None for c in parts)
    with writer_lock(out):
        refuse_foreign(out)  # (checked again now that no other writer can be at work)
        create_cache(out, ids=column(lambda c: c.ids), systems=column(lambda c: c.systems),
                     splits=column(lambda c: c.splits),
                     labels=np.array(column(lambda c: c.labels), dtype=np.float32),
                     label_names=p0.label_names, backbone=p0.meta.backbone,
                     dataset=p0.meta.dataset, config=config, key=full_key,
                     feature_shapes={k: v.shape[1:] for k, v in p0.features.items()},
                     window_shapes={k: v.shape[1:] for k, v in p0.windows.items()} or None,
                     window_counts=counts,
                     texts=column(lambda c: c.texts) if p0.texts is not None else None,
                     system_mos=p0.system_mos or None, **_merged_ratings(parts, order),
                     feature_dtype=str(next(iter(p0.features.values())).dtype)
                     if p0.features else "float32",
                     sources=column(lambda c: c.sources) if sourced else None,
                     source_stat=np.array(column(lambda c: c.source_stat)) if sourced else None)
        with CacheWriter(out) as w:
            for k, c in enumerate(parts):
                rows = np.flatnonzero(c.usable)
                full = k + rows * n
                wins = weights = None
                if c.window_offsets is not None:
                    off = c.window_offsets
                    wins = {name: [v[off[i]:off[i + 1]] for i in rows]
                            for name, v in c.windows.items()}
                    weights = [c.window_weight[off[i]:off[i + 1]] for i in rows]
                w.write(full, {name: v[rows] for name, v in c.features.items()}, wins, weights)
                if c.skipped:
                    w.skip(c.skipped)
            w.finish()
    return out


def _merged_ratings(parts, order) -> dict:
    """The parts' /ratings and /rater_ids in full row order, padded to the widest part."""
    width = max((v.shape[1] for c in parts for v in c.ratings.values()), default=0)
    width = max([width] + [c.rater_ids.shape[1] for c in parts if c.rater_ids is not None])
    if width == 0:
        return {}
    names = list(dict.fromkeys(k for c in parts for k in c.ratings))
    ratings = {k: np.full((len(order), width), np.nan, np.float32) for k in names}
    ids = np.full((len(order), width), "", dtype=object)
    for row, (p, i) in enumerate(order):
        for k, v in parts[p].ratings.items():
            ratings[k][row, :v.shape[1]] = v[i]
        if parts[p].rater_ids is not None:
            ids[row, :parts[p].rater_ids.shape[1]] = parts[p].rater_ids[i]
    has_ids = any(c.rater_ids is not None for c in parts)
    return {"ratings": ratings, "rater_ids": ids if has_ids else None}


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def extract_distributed(records, cfg, path: str | Path, force: bool = False,
                        progress: bool = True):
    """Under torchrun: every rank extracts its shard (on its own GPU where there are GPUs);
    rank 0 then merges the parts into `path` and removes them. A gloo group only carries the
    barriers, so it works the same across nodes and on CPU."""
    import torch
    import torch.distributed as dist

    from ..config import override
    from .loop import ExtractSummary, extract, part_path, plan_only

    rank, world, local = torchrun_rank()
    refuse_foreign(path)
    if Path(path).exists() and not force and not plan_only(records, cfg, path).todo:
        # nothing to embed: rank 0 alone rewrites what changed (if anything), in place
        if rank == 0:
            return rank, extract(records, cfg, path, progress=progress)
        n = len(records.clips)
        return rank, ExtractSummary(Path(path), n, n, status="nothing to do")
    if cfg.device == "auto" and torch.cuda.is_available():
        cfg = override(cfg, device=f"cuda:{local % torch.cuda.device_count()}")
    dist.init_process_group("gloo", timeout=timedelta(days=7))  # ranks may finish hours apart
    try:
        summary = extract(records, cfg, path, force, progress and rank == 0,
                          shard=(rank, world))
        dist.barrier()
        if rank == 0:
            parts = [part_path(path, k, world) for k in range(world)]
            merge_parts(parts, path, force=True)
            for p in parts:  # the part and its sidecar lock file
                p.unlink()
                p.with_name(p.name + ".lock").unlink(missing_ok=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return rank, summary
