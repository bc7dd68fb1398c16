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


def units_for(cache: Cache, heads: tuple[HeadSpec, ...]) -> Units:
    levels = {any(f in cache.windows for f in h.features) for h in heads}
    if len(levels) > 1:
        raise QamroError(f"{cache.path}: heads of one run must all read clip features or all "
                         f"read window features")
    if not levels.pop():
        return Units(len(cache.ids))
    counts = np.diff(cache.window_offsets)
    return Units(len(cache.ids), np.repeat(np.arange(len(cache.ids)), counts),
                 cache.window_weight.astype(np.float64))


def head_inputs(cache: Cache, head: HeadSpec) -> np.ndarray:
    """[U, D] clip features concatenated, or for a per-window feature its rows [U, L, D] (or
    [U, D]). Clip features read with a per-window feature are repeated for each window of
    their clip and, for per-layer rows, on every layer, after the window feature's columns:
    [U, L, D + E]. Layer weights sum to 1, so a layer-weighted head sees the clip features
    unchanged beside the weighted layers, and L2-normalises the two together."""
    window = [f for f in head.features if f in cache.windows]
    clip = [f for f in head.features if f not in cache.windows]
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


def column_order(cache: Cache, features: tuple[str, ...]) -> tuple[str, ...]:
    """The features in the order their columns lie in head_inputs' rows: the per-window
    feature first, then the clip features as listed."""
    return tuple(sorted(features, key=lambda f: f not in cache.windows))


def input_width(cache: Cache, features: tuple[str, ...]) -> int:
    """The last dimension of head_inputs' rows for these features."""
    def width(f):
        if f in cache.windows:
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
               uses_bins=None, n_terms: int = 0) -> BatchedMLP:
    """The head's model; `bins` (centres in its output units) and `uses_bins` (per member)
    add a distribution output (distribution.py), `n_terms` the learned loss weights'
    log-variances (weighting_terms)."""
    layers = x_shape[1] if len(x_shape) == 3 else 0
    if layers and not head.layer_weights:
        raise QamroError(f"head {head.name!r} reads per-layer features [.., {layers}, "
                         f"{x_shape[-1]}]: set layer_weights = true in its recipe")
    return BatchedMLP(seeds, x_shape[-1], head.hidden or cfg.hidden,
                      head.activation or cfg.activation, head.name, head.layer_norm, layers,
                      init=init, bins=bins, uses_bins=uses_bins, n_terms=n_terms)


def weighting_terms(members) -> int:
    """How many log-variances every member's head carries: one per objective term when any
    member of the run learns its weights (the others keep theirs at 0, weight 1), else 0."""
    learned = any(m.loss.loss_weighting == "uncertainty" for m in members)
    return len(OBJECTIVE_TERMS) if learned else 0


@torch.no_grad()
def predict_units(model: BatchedMLP, x: torch.Tensor) -> np.ndarray:
    """[U, ...] -> [K, U] float64, in chunks (window-level inputs are large)."""
    step = 8192 if x.dim() == 2 else 512
    return torch.cat([model(x[i:i + step]) for i in range(0, len(x), step)], dim=1) \
        .float().cpu().numpy().astype(np.float64)
