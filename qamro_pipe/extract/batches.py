"""The batch pipeline of an extraction: decoded clips -> batches of windows -> the backbone ->
features pooled per clip, checked, and written with their rows marked done, batch N+1
launched before batch N is collected and written."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ExtractConfig
from ..errors import DataError
from ..store.writer import CacheWriter
from .backbones import Backbone
from .datasets import Clip, DatasetRecords
from .decoding import Decoder
from .reuse import ReusePlan

if TYPE_CHECKING:  # the summary is loop.py's, which imports this module
    from .loop import ExtractSummary


class BadFile(Exception):
    """A clip that cannot be decoded, without --skip-bad: stops the run (see loop._stopped)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def embed_batches(w: CacheWriter, bb: Backbone, records: DatasetRecords, cfg: ExtractConfig,
           plan: ReusePlan, decoded: "Decoder", first, bar, summary: ExtractSummary,
           texts: bool) -> None:
    """Decode, embed and write the plan's rows, batch by batch; launching batch N+1 before
    batch N is collected and written."""
    clips = records.clips
    pending: list[Launched] = []  # at most one batch computing while the next forms

    def write_pending() -> None:
        while pending:
            job = pending.pop()  # taken first: a batch that fails is not retried
            summary.written += write_batch(w, bb, clips, job, plan.stats)
            bar.update(len(job.rows))

    def start(batch) -> None:
        """Batch N+1 starts before batch N is collected and written, so on a GPU the
        host prepares and writes while the device computes."""
        try:
            job = launch(bb, clips, batch, cfg.batch_size, texts)
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
                    raise BadFile(err)
                w.skip({clips[row].id: err}, {clips[row].id: plan.stats[row]})
                summary.skipped[clips[row].id] = err
                bar.update(1)
                continue
            batch.append((row, wins))
            n_windows += len(wins)
            if n_windows >= cfg.batch_size:
                start(batch)
                batch, n_windows = [], 0
        if batch:
            start(batch)
        write_pending()
    except BaseException:
        write_pending()  # whatever stopped the run, the batch already computed is kept
        raise


@dataclass
class Launched:
    """A batch whose features are being computed: its rows, window counts and lengths (not
    its audio, whose memory the decoder may already reuse) and the backbone's pending work."""
    rows: list[int]
    counts: list[int]  # windows per clip
    lengths: np.ndarray  # samples per window, float32 [W_total]
    parts: list[Any]  # backbones.base.Pending, one per forward pass
    text: Any  # Pending or None


def launch(bb: Backbone, clips: list[Clip], batch: list[tuple[int, list[np.ndarray]]],
            batch_size: int, texts: bool) -> Launched:
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
    return Launched(rows, [len(wins) for _, wins in batch],
                     np.array([len(x) for x in flat], dtype=np.float32), parts, text)


def gather(bb: Backbone, job: Launched) -> tuple[dict[str, np.ndarray],
                                                 dict[str, list[np.ndarray]], list[np.ndarray]]:
    """Wait for a launched batch's features and pool them per clip -> (clip features
    {name: [clips, ...]}, texts' included; per-window features {name: one [W, ...] per clip};
    each clip's window lengths). What extraction writes, and the Scorer keeps in memory."""
    results = [p.result() for p in job.parts]
    feats = {k: np.concatenate([r[k] for r in results]) for k in results[0]}  # [W_total, ...]
    specs = bb.feature_specs()
    clip_feats: dict[str, list[np.ndarray]] = {k: [] for k, s in specs.items()
                                                if not s.per_window and k in feats}
    win_feats: dict[str, list[np.ndarray]] = {k: [] for k in bb.window_features()}
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


def write_batch(w: CacheWriter, bb: Backbone, clips: list[Clip], job: Launched,
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
