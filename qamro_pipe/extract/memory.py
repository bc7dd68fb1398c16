"""Extraction into memory: clips (files, or samples a caller holds) embedded by a loaded
backbone into a Cache object that never touches the disk, through extraction's own steps
(decoding and resampling as `audio.load_audio`, windows, `batches.launch` and `batches.gather`:
the same batches of windows, pooling and texts), so heads score it as they score a cache
`extract` wrote of the same clips."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import DataError
from ..store.reader import SCHEMA_VERSION, Cache, CacheMeta
from . import audio
from .backbones import Backbone
from .batches import gather, launch
from .datasets import Clip, DatasetRecords
from .loop import cache_key


@dataclass(frozen=True)
class Item:
    """One clip to embed: a file (or a segment of one), or samples in memory at `sr`."""
    id: str
    path: Path | None = None
    samples: np.ndarray | None = None  # [samples] or [channels, samples]
    sr: int | None = None
    start: float | None = None  # seconds of the file
    end: float | None = None
    text: str = ""

    def decode(self, bb: Backbone) -> np.ndarray:
        """Mono float32 at the backbone's input rate, as extraction decodes a file."""
        if self.path is not None:
            return audio.load_audio(self.path, bb.decode_rate, self.start, self.end,
                                    bb.max_frames, bb.resampler)
        return audio.from_samples(self.samples, self.sr, bb.decode_rate, bb.max_frames,
                                  what=self.id, resampler=bb.resampler)


def embed_items(bb: Backbone, items: list[Item], batch_size: int, texts: bool,
                dataset: str = "predict") -> tuple[Cache, dict[str, str]]:
    """-> (a Cache with a row per item, in their order; {id: why} of the items that did not
    decode, whose rows are unusable and hold no windows, as a skipped clip's in a cache).
    Clips are gathered into batches of at least `batch_size` windows and each batch cut into
    forward passes of at most `batch_size`, as `extract` does."""
    failures: dict[str, str] = {}
    clips = [Clip(id=i.id, path=i.path or Path(i.id), system="", split=dataset, labels=(),
                  text=i.text) for i in items]
    batches: list[list[tuple[int, list[np.ndarray]]]] = [[]]
    n_windows = 0
    for row, item in enumerate(items):
        try:
            x = item.decode(bb)
        except DataError as e:
            failures[item.id] = str(e)
            continue
        wins = audio.windows(x, bb.window_samples)
        batches[-1].append((row, wins))
        n_windows += len(wins)
        if n_windows >= batch_size:
            batches.append([])
            n_windows = 0
    specs = {k: s for k, s in bb.feature_specs().items() if texts or not s.text}
    n = len(items)
    features = {k: np.zeros((n, *s.shape), np.float32) for k, s in specs.items()
                if not s.per_window}
    per_clip: dict[str, list[np.ndarray]] = {k: [np.zeros((0, *s.shape), np.float32)] * n
                                             for k, s in specs.items()
                                             if k in bb.window_features()}
    weights = [np.zeros(0, np.float32)] * n
    for batch in batches:
        if not batch:
            continue
        rows = [r for r, _ in batch]
        out, wins, lengths = gather(bb, launch(bb, clips, batch, batch_size, texts))
        for k, v in out.items():
            features[k][rows] = v
        for k, v in wins.items():
            for r, w in zip(rows, v):
                per_clip[k][r] = w
        for r, w in zip(rows, lengths):
            weights[r] = w
    records = DatasetRecords(name=dataset, label_names=(), clips=clips)
    cache = _cache(bb, records, texts, features, per_clip, weights)
    cache.usable = np.array([c.id not in failures for c in clips], bool)
    return cache, failures


def _cache(bb: Backbone, records: DatasetRecords, texts: bool, features: dict[str, np.ndarray],
           per_clip: dict[str, list[np.ndarray]], weights: list[np.ndarray]) -> Cache:
    """The Cache `extract` would have written for these clips, held in memory."""
    n = len(records.clips)
    key = cache_key(records, bb, texts)
    config: dict[str, Any] = {"provenance": bb.provenance(), "key": key}
    meta = CacheMeta(path=Path(f"<memory: {bb.key}>"), version=SCHEMA_VERSION,
                     backbone=bb.key, dataset=records.name, label_names=(), config=config,
                     key=key, created_by=f"qamro-pipe {__version__}", complete=True)
    cache = Cache(meta=meta, ids=np.array([c.id for c in records.clips], dtype=object),
                  systems=np.array([""] * n, dtype=object),
                  splits=np.array([records.name] * n, dtype=object),
                  labels=np.zeros((n, 0), np.float32), features=features,
                  texts=np.array([c.text for c in records.clips], dtype=object))
    if per_clip:
        cache.window_offsets = np.concatenate(
            [[0], np.cumsum([len(w) for w in weights])]).astype(np.int64)
        cache.window_weight = np.concatenate(weights).astype(np.float32)
        cache.windows = {k: np.concatenate(v) for k, v in per_clip.items()}
    return cache
