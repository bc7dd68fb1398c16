"""What each head reads from a cache: its input rows (clips, or windows of clips), the label
of each row, its standardisation, and how row predictions become clip predictions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import OBJECTIVE_TERMS, TrainConfig
from ..errors import QamroError
from ..store.reader import Cache
from .heads import BatchedMLP, HeadSpec
from .pooling import pooled_clips


@dataclass
class Units:
    """The rows heads train on. Clip-level: one per clip (clip_of is None). Window-level: one
    per window, labelled with its clip's label; a clip's prediction is the weight-averaged
    window prediction (the original Audiobox-Aesthetics inference rule)."""

    n_clips: int
    clip_of: np.ndarray | None = None  # [U] clip row of each window
    weight: np.ndarray | None = None  # [U] window weight (its real length)

    @property
    def n(self) -> int:
        return self.n_clips if self.clip_of is None else len(self.clip_of)

    def of_clips(self, clip_rows: np.ndarray) -> np.ndarray:
        """Unit rows belonging to the given clip rows."""
        if self.clip_of is None:
            return np.asarray(clip_rows)
        return np.flatnonzero(np.isin(self.clip_of, clip_rows))

    def windows_of(self, clip_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first unit row, number of windows) of each given clip that has windows."""
        clip_rows = np.asarray(clip_rows)
        if self.clip_of is None:
            return clip_rows, np.ones(len(clip_rows), dtype=np.int64)
        count = np.bincount(self.clip_of, minlength=self.n_clips)[clip_rows]
        first = np.searchsorted(self.clip_of, clip_rows)
        return first[count > 0], count[count > 0]

    def fixed_windows(self, clip_rows: np.ndarray, seed: int) -> np.ndarray:
        """One unit row per given clip (that has windows), drawn once by `seed`: the rows a
        run validates on when it trains on one window per clip per epoch."""
        first, count = self.windows_of(clip_rows)
        return first + np.random.default_rng(seed).integers(0, count)

    def per_unit(self, values: np.ndarray) -> np.ndarray:
        return values if self.clip_of is None else values[self.clip_of]

    def to_clips(self, preds: np.ndarray) -> np.ndarray:
        """[K, U] -> [K, N]; clips without windows get NaN (they are never usable rows)."""
        if self.clip_of is None:
            return preds
        out = np.full((len(preds), self.n_clips), np.nan)
        den = np.bincount(self.clip_of, weights=self.weight, minlength=self.n_clips)
        for k, p in enumerate(preds):
            num = np.bincount(self.clip_of, weights=p * self.weight, minlength=self.n_clips)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[k] = num / den
        return out


def label_col(cache: Cache, head: HeadSpec) -> int:
    if head.label not in cache.label_names:
        raise QamroError(f"{cache.path}: head {head.name!r} needs label {head.label!r}; the cache "
                         f"has {', '.join(cache.label_names)}")
    return cache.label_names.index(head.label)


def reads_windows(cache: Cache, feature: str, pool: str = "mean") -> bool:
    """Whether a head reads a feature's window rows: a per-window feature's always; a clip
    feature whose windows the cache also kept (`extract --keep-windows`) only when it pools
    by attention (pooling.py); the mean pool reads the clip row extraction pooled."""
    return feature in cache.windows and (pool == "attention" or feature not in cache.features)


def units_for(cache: Cache, heads: tuple[HeadSpec, ...], pool: str = "mean") -> Units:
    """The rows heads train on under `pool`: clips, or windows of clips. Attention pooling
    reads windows (pooling.WindowIndex) and trains on clips: its units are the windows, whose
    predictions pooling.pool turns into clip predictions."""
    levels = {any(reads_windows(cache, f, pool) for f in h.features) for h in heads}
    if len(levels) > 1:
        raise QamroError(f"{cache.path}: heads of one run must all read clip features or all "
                         f"read window features")
    if not levels.pop():
        if pool == "attention":
            raise QamroError(f"{cache.path}: --pool attention pools a clip's windows, and "
                             f"the heads read no per-window feature (the cache keeps "
                             f"{', '.join(cache.windows) or 'none'}); extract with "
                             f"--keep-windows to keep each window's row")
        return Units(len(cache.ids))
    counts = np.diff(cache.window_offsets)
    return Units(len(cache.ids), np.repeat(np.arange(len(cache.ids)), counts),
                 cache.window_weight.astype(np.float64))


def head_inputs(cache: Cache, head: HeadSpec, pool: str = "mean") -> np.ndarray:
    """[U, D] clip features concatenated, or for a per-window feature its rows [U, L, D] (or
    [U, D]). Clip features read with a per-window feature are repeated for each window of
    their clip and, for per-layer rows, on every layer, after the window feature's columns:
    [U, L, D + E]. Layer weights sum to 1, so a layer-weighted head sees the clip features
    unchanged beside the weighted layers, and L2-normalises the two together."""
    window = [f for f in head.features if reads_windows(cache, f, pool)]
    clip = [f for f in head.features if f not in window]
    missing = [f for f in clip if f not in cache.features]
    if missing:
        have = [*cache.features, *cache.windows]
        raise QamroError(f"{cache.path}: head {head.name!r} reads {missing[0]!r}, which the "
                         f"cache lacks (it has {', '.join(have) or 'none'})")
    if len(window) > 1:
        raise QamroError(f"head {head.name!r} reads {len(window)} per-window features "
                         f"({', '.join(window)}); a head reads at most one")
    x = np.concatenate([cache.features[f].reshape(len(cache.ids), -1).astype(np.float32)
                        for f in clip], axis=1) if clip else None  # [N, E]
    if not window:
        return x
    w = cache.windows[window[0]].astype(np.float32)  # [M, L, D] or [M, D]
    if x is None:
        return w
    per_window = x[np.repeat(np.arange(len(cache.ids)), np.diff(cache.window_offsets))]
    if w.ndim == 3:
        per_window = np.broadcast_to(per_window[:, None, :], (*w.shape[:2], x.shape[1]))
    return np.concatenate([w, per_window], axis=-1)


def column_order(cache: Cache, features: tuple[str, ...], pool: str = "mean"
                 ) -> tuple[str, ...]:
    """The features in the order their columns lie in head_inputs' rows: the per-window
    feature first, then the clip features as listed."""
    return tuple(sorted(features, key=lambda f: not reads_windows(cache, f, pool)))


def input_width(cache: Cache, features: tuple[str, ...], pool: str = "mean") -> int:
    """The last dimension of head_inputs' rows for these features."""
    def width(f):
        if reads_windows(cache, f, pool):
            v = cache.windows[f]
            return v.shape[-1] if v.ndim == 3 else int(np.prod(v.shape[1:]))
        return int(np.prod(cache.features[f].shape[1:]))
    return sum(width(f) for f in features)


def label_stats(cache: Cache, head: HeadSpec, train_clips: np.ndarray) -> tuple[float, float]:
    """(mean, std) of the head's train labels when it standardises, else (0, 1)."""
    if not head.standardize:
        return 0.0, 1.0
    y = cache.labels[train_clips, label_col(cache, head)]
    y = y[np.isfinite(y)]
    std = float(y.std()) if len(y) > 1 else 1.0
    return float(y.mean()), std if std > 0 else 1.0


def build_head(head: HeadSpec, seeds: list[int], x_shape: tuple[int, ...],
               cfg: TrainConfig, init: bool = True, bins: torch.Tensor | None = None,
               uses_bins=None, n_terms: int = 0, pools: bool = False) -> BatchedMLP:
    """The head's model; `bins` (centres in its output units) and `uses_bins` (per member)
    add a distribution output (distribution.py), `n_terms` the learned loss weights'
    log-variances (weighting_terms), `pools` the attention pooling's query (pools)."""
    layers = x_shape[1] if len(x_shape) == 3 else 0
    if layers and not head.layer_weights:
        raise QamroError(f"head {head.name!r} reads per-layer features [.., {layers}, "
                         f"{x_shape[-1]}]: set layer_weights = true in its recipe")
    return BatchedMLP(seeds, x_shape[-1], head.hidden or cfg.hidden,
                      head.activation or cfg.activation, head.name, head.layer_norm, layers,
                      init=init, bins=bins, uses_bins=uses_bins, n_terms=n_terms,
                      pools=pools)


def weighting_terms(members) -> int:
    """How many log-variances every member's head carries: one per objective term when any
    member of the run learns its weights (the others keep theirs at 0, weight 1), else 0."""
    learned = any(m.loss.loss_weighting == "uncertainty" for m in members)
    return len(OBJECTIVE_TERMS) if learned else 0


def pools(members) -> bool:
    """Whether every member's head carries an attention query: when any member of the run
    pools by attention (the others keep theirs at 0)."""
    return any(m.loss.pool == "attention" for m in members)


@torch.no_grad()
def predict_units(model: BatchedMLP, x: torch.Tensor, scores: bool = False) -> np.ndarray:
    """[U, ...] -> [K, U] float64, in chunks (window-level inputs are large); scores=True
    (a pooling head) -> [2, K, U]: the predictions and the attention scores."""
    step = 8192 if x.dim() == 2 else 512

    def run(chunk):
        if not scores:
            return model(chunk)
        out, _, s = model(chunk, scores=True)
        return torch.stack([out, s])
    return torch.cat([run(x[i:i + step]) for i in range(0, len(x), step)], dim=-1) \
        .float().cpu().numpy().astype(np.float64)


@torch.no_grad()
def predict_clips(model: BatchedMLP, inputs: dict[str, tuple[torch.Tensor, Units]],
                  member_pools: list[str], stats: tuple[float, float]) -> np.ndarray:
    """[K, N] float64 clip predictions on the labels' scale (the head's outputs times std
    plus mean, `stats`): each member's by its own pool, from `inputs` (pool -> the head's
    input rows under that pool and their Units): the mean pool as Units.to_clips, attention
    as pooling.pooled_clips."""
    mean, std = stats
    out = None
    for pool, (x, units) in inputs.items():
        rows = [k for k, p in enumerate(member_pools) if p == pool]
        if not rows:
            continue
        if pool == "mean":
            got = units.to_clips(predict_units(model, x) * std + mean)
        else:
            both = predict_units(model, x, scores=True)  # [2, K, M]
            got = pooled_clips(both[0] * std + mean, both[1], units.clip_of, units.weight,
                               units.n_clips)
        if out is None:
            out = np.full((len(member_pools), got.shape[1]), np.nan)
        out[rows] = got[rows]
    return out
