"""MSE, LCC, SRCC and KTAU at utterance and system level, with bootstrap CIs over systems;
beside them the top tier: top-tier F1 at a threshold (both levels) and precision@k of the
system ranking (point figures, no interval).

Point figures come from scipy.stats. The bootstrap resamples systems with replacement and
recomputes the same statistics vectorised over resamples (Pearson of values, Pearson of
ranks for Spearman, tau-b from pair signs for Kendall); a test checks these against scipy."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from scipy import stats

from .errors import QamroError

FIGURES = ("mse", "lcc", "srcc", "ktau")
TOP_FIGURES = ("top_f1", "p_at_k")  # the top tier: F1 at a threshold, precision@k (systems)
LEVEL = 0.95  # every interval the tool reports


def mean_sd(values) -> tuple[float | None, float | None]:
    """(mean, sd) over seeds, members or folds, None left out: sd with ddof=1 (None for
    fewer than two values), the mean None for none."""
    vals = [v for v in values if v is not None]
    return (float(np.mean(vals)) if vals else None,
            float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """The central percentile interval [lo, hi] of resampled values."""
    q = (1 - level) / 2
    return [float(np.quantile(values, q)), float(np.quantile(values, 1 - q))]


def point_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    out = {"mse": float(np.mean((true - pred) ** 2)), "n": int(len(true))}
    constant = np.ptp(true) == 0 or np.ptp(pred) == 0
    if len(true) < 2 or constant:  # correlation undefined: say so rather than write NaN
        out.update(lcc=None, srcc=None, ktau=None)
        return out
    out["lcc"] = float(stats.pearsonr(true, pred)[0])
    out["srcc"] = float(stats.spearmanr(true, pred)[0])
    out["ktau"] = float(stats.kendalltau(true, pred)[0])  # tau-b
    return out


def top_tier_f1(true: np.ndarray, pred: np.ndarray, threshold: float) -> float | None:
    """F1 of telling the top tier (label >= threshold) from the rest by the same threshold
    on the prediction, the song-aesthetics challenge's "Top-Tier Accuracy": 2 TP / (2 TP +
    FP + FN). None when neither side has an item in the top tier (F1 is 0/0 there)."""
    t = np.asarray(true, np.float64) >= threshold
    p = np.asarray(pred, np.float64) >= threshold
    tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
    if tp + fp + fn == 0:
        return None
    return 2 * tp / (2 * tp + fp + fn)


def precision_at_k(true: np.ndarray, pred: np.ndarray, k: int) -> float | None:
    """Share of the k items predicted highest that are in the true top k (with ties at the
    k-th true value, every item tied with it counts as top). None when there are no more
    than k items (every item is then in the top k: the figure says nothing)."""
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    if len(true) <= k:
        return None
    kth = np.sort(true)[::-1][k - 1]
    picked = np.argsort(-pred, kind="stable")[:k]  # ties in prediction: the earlier item
    return float(np.mean(true[picked] >= kth))


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / den, np.nan)


def _tau_b_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sa = np.sign(a[:, :, None] - a[:, None, :])  # [R, S, S]
    sb = np.sign(b[:, :, None] - b[:, None, :])
    num = (sa * sb).sum((1, 2))
    den = np.sqrt((sa * sa).sum((1, 2)) * (sb * sb).sum((1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def bootstrap_rows(true: np.ndarray, pred: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every figure for each resample: idx [R, S] indexes systems."""
    a, b = true[idx], pred[idx]
    return {"mse": ((a - b) ** 2).mean(1), "lcc": _pearson_rows(a, b),
            "srcc": _pearson_rows(stats.rankdata(a, axis=1), stats.rankdata(b, axis=1)),
            "ktau": _tau_b_rows(a, b)}


def bootstrap_ci(true: np.ndarray, pred: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float] | None]:
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    if n_boot <= 0 or len(true) < 3:
        return {f: None for f in FIGURES}
    idx = np.random.default_rng(seed).integers(0, len(true), size=(n_boot, len(true)))
    out = {}
    for name, vals in bootstrap_rows(true, pred, idx).items():
        vals = vals[np.isfinite(vals)]  # resamples with a constant side have no correlation
        out[name] = None if len(vals) < n_boot // 2 else interval(vals, level)
    return out


def system_scores(systems: np.ndarray, true: np.ndarray, pred: np.ndarray,
                  system_mos: Mapping[str, float] | None = None):
    """Mean prediction per system, against the published system MOS where there is one for
    every system, else the mean label of the system's clips."""
    names = np.unique(systems)
    mean_pred = np.array([pred[systems == s].mean() for s in names])
    published = system_mos is not None and all(
        s in system_mos and math.isfinite(system_mos[s]) for s in names)
    if published:
        mean_true = np.array([system_mos[s] for s in names], dtype=np.float64)
    else:
        mean_true = np.array([true[systems == s].mean() for s in names])
    return names, mean_true, mean_pred, ("published system MOS" if published else "mean label")


def named_systems(systems: np.ndarray) -> np.ndarray:
    """[N] bool: the rows system-level figures rest on. A clip without a system ("") is of
    no known system: where others have one (a cross-validation pooling AES-Natural's
    system-less train clips with its eval systems), it is left out, not made a system of
    its own; where none has one, all rows stay (and are one system: not computable)."""
    named = np.asarray(systems) != ""
    return named if named.any() else np.ones(len(named), dtype=bool)


FEW_SYSTEMS = 5  # below this many systems, a system-level correlation is a caution, not a
# figure: over 2 systems SRCC and KTAU are +1 or -1, over 4 they take a handful of values


def few_systems(systems: np.ndarray) -> str | None:
    """A caution where the system level rests on 2 to FEW_SYSTEMS - 1 systems, or None."""
    systems = np.asarray(systems)
    n = len(np.unique(systems[named_systems(systems)]))
    if not 2 <= n < FEW_SYSTEMS:
        return None
    return (f"the system-level figures rest on {n} systems: over so few, SRCC and KTAU take "
            f"only a few values ({'+1 or -1' if n == 2 else f'{n} systems'}); read them with "
            f"their intervals, or report on a split with more systems")


def system_level_problem(systems: np.ndarray) -> str | None:
    """Why system-level figures cannot be computed over these rows' systems, or None."""
    systems = np.asarray(systems)
    names = np.unique(systems[named_systems(systems)])
    if len(names) >= 2:
        return None
    shown = ", ".join(repr(str(s)) for s in names) or "none"
    return (f"system-level figures need clips of at least 2 systems; these rows have "
            f"{len(names)} ({shown}), so only utterance-level figures are reported "
            f"(give clips a system to get them)")


def evaluate(true: np.ndarray, pred: np.ndarray, systems: np.ndarray,
             system_mos: Mapping[str, float] | None = None, n_boot: int = 1000,
             what: str = "", top_tier: float | None = None,
             top_k: int | None = None) -> dict[str, dict]:
    """{"utterance": {...}, "system": {..., "<fig>_ci": [lo, hi]}} over rows with a label.
    With fewer than 2 systems the system figures are None and "not_computable" says why.
    `top_tier` (a label value) adds "top_f1" at both levels, `top_k` "p_at_k" at system
    level (TrainConfig's top_tier and top_k)."""
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    systems = np.asarray(systems)
    known = np.isfinite(true)
    if not known.any():
        raise QamroError(f"{what}: no labelled rows to evaluate")
    if not np.isfinite(pred[known]).all():
        raise QamroError(f"{what}: predictions contain NaN or inf; not writing metrics")
    true, pred, systems = true[known], pred[known], systems[known]
    out = {"utterance": point_metrics(true, pred)}
    if top_tier is not None:
        out["utterance"]["top_f1"] = top_tier_f1(true, pred, top_tier)
    problem = system_level_problem(systems)
    if problem:
        out["system"] = {**{f: None for f in FIGURES}, **{f"{f}_ci": None for f in FIGURES},
                         **_top(None, None, top_tier, top_k),
                         "n": len(np.unique(systems[named_systems(systems)])),
                         "not_computable": problem}
        return out
    keep = named_systems(systems)
    names, st, sp, source = system_scores(systems[keep], true[keep], pred[keep], system_mos)
    sys_m = point_metrics(st, sp)
    if not keep.all():
        sys_m["clips_without_system"] = int((~keep).sum())
    for fig, ci in bootstrap_ci(st, sp, n_boot).items():
        sys_m[f"{fig}_ci"] = ci
    sys_m.update(_top(st, sp, top_tier, top_k))
    sys_m["true_source"] = source
    out["system"] = sys_m
    return out


def _top(true, pred, top_tier: float | None, top_k: int | None) -> dict[str, Any]:
    """The system level's top-tier figures (None where the level is not computable), and
    the threshold and k they were computed at."""
    out: dict[str, Any] = {}
    if top_tier is not None:
        out["top_f1"] = None if true is None else top_tier_f1(true, pred, top_tier)
        out["top_tier"] = top_tier
    if top_k is not None:
        out["p_at_k"] = None if true is None else precision_at_k(true, pred, top_k)
        out["top_k"] = top_k
    return out
