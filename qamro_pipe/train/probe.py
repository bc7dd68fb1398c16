"""The linear probe: sklearn's RidgeCV on the very features each head reads, the baseline that
embedding benchmarks (HEAR, fadtk users) report. It shows what the MLP heads and the ranking
loss add over the embedding alone, and fits in seconds.

Per head, one row per clip:
- clip features (`audio`, `[audio ; text]`): the head's input as it is;
- window features (`layers` [windows, L, D]): the L x D values of each window, flattened (a
  linear model on all layers can weight them as the heads' softmax does), averaged over the
  clip's windows by their lengths. For a linear model this is exactly the heads' inference
  rule, since the score of the length-weighted mean window is the length-weighted mean of the
  windows' scores; each clip then counts once in the fit, as it does in the metrics.
Features are standardised on the fitted clips (StandardScaler); RidgeCV picks the penalty
among config.PROBE_ALPHAS by its own efficient leave-one-out. The probe fits on the labelled
clips of the train split (all of them: it has no early stopping to hold clips out for) and is
scored on the eval split with the same metrics (metrics.evaluate) as the heads."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..config import PROBE_ALPHAS
from ..store.reader import Cache
from .heads import HeadSpec
from .inputs import head_inputs, label_col, units_for
from .runs import head_metrics

PROBE_ROW = "linear probe (RidgeCV)"


def clip_features(cache: Cache, head: HeadSpec) -> np.ndarray:
    """[N, F]: the head's input per clip (window features: length-weighted mean window)."""
    x = head_inputs(cache, head)
    x = x.reshape(len(x), -1)
    units = units_for(cache, (head,))
    if units.clip_of is None:
        return x
    from scipy import sparse

    n = len(cache.ids)
    weight = sparse.csr_matrix((units.weight.astype(np.float32),  # float32 like x: AES
                                (units.clip_of, np.arange(len(x)))), shape=(n, len(x)))
    total = np.bincount(units.clip_of, weights=units.weight, minlength=n).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):  # no windows: never a usable row
        return np.asarray(weight @ x) / total[:, None]


def fit_probe(x: np.ndarray, y: np.ndarray, alphas=PROBE_ALPHAS):
    """StandardScaler + RidgeCV fitted on rows x [n, F], labels y [n]."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=alphas)).fit(x, y)


def probe(cache: Cache, heads: tuple[HeadSpec, ...], fit_rows: np.ndarray,
          alphas=PROBE_ALPHAS, features: dict | None = None) -> dict[str, Any]:
    """Fit one probe per head on `fit_rows` (those with the head's label) and score every
    clip. -> {"predictions": {head: [N]}, "alpha": {head: chosen penalty}, "at_edge": heads
    whose penalty is an end of the grid (the best may lie beyond it), "seconds"}.
    `features` keeps the clip features between calls (the folds of a cross-validation)."""
    t0 = time.perf_counter()
    features = {} if features is None else features  # heads reading one input share it
    preds, chosen, edge = {}, {}, []
    for h in heads:
        if h.features not in features:
            features[h.features] = clip_features(cache, h)
        x = features[h.features]
        y = cache.labels[:, label_col(cache, h)].astype(np.float64)
        rows = fit_rows[np.isfinite(y[fit_rows])]
        model = fit_probe(x[rows], y[rows], alphas)
        alpha = float(model[-1].alpha_)
        chosen[h.name] = alpha
        if alpha in (min(alphas), max(alphas)):
            edge.append(h.name)
        pred = np.full(len(y), np.nan)
        ok = np.isfinite(x).all(axis=1)
        pred[ok] = model.predict(x[ok])
        preds[h.name] = pred
    return {"predictions": preds, "alpha": chosen, "at_edge": edge,
            "seconds": round(time.perf_counter() - t0, 3)}


def train_rows(cache: Cache) -> np.ndarray:
    """The clips a probe fits on outside cross-validation: the usable train split."""
    return cache.rows("train")


def probe_metrics(cache: Cache, heads, fitted: dict[str, Any], eval_rows: np.ndarray,
                  n_boot: int, cfg=None) -> dict[str, Any]:
    """Per head, the probe's figures on `eval_rows` (as the heads': runs.head_metrics, the
    top tier at `cfg`'s settings)."""
    return head_metrics(cache, heads, fitted["predictions"], eval_rows, n_boot,
                        what=" (linear probe)", cfg=cfg)
