"""Rows of a table compared with one of them (`compare = "QAMRO"` in a table recipe): each
row's figures with 95% intervals, and the paired bootstrap probability that its system SRCC
beats the reference row's.

A row is scored by its ensemble: per clip, the mean prediction over the row's seeds. One set
of resamples serves every row: a resample draws the eval split's systems with replacement
(metrics.bootstrap_rows, as the run's own system-level intervals). System level: the
statistics of the drawn systems' (true, predicted) MOS. Utterance level: of all the clips of
the drawn systems (a cluster bootstrap: clips of one system are not independent). Because
every row sees the same resamples, P(row > reference) is a paired comparison: the share of
resamples in which the row's system SRCC exceeds the reference's (ties count for neither).
With ~30 systems, rows 0.02 apart typically get P near 0.5-0.8: within resampling noise."""
from __future__ import annotations

import csv
from typing import Any

import numpy as np

from ..metrics import LEVEL, bootstrap_rows, interval, named_systems, point_metrics, system_scores
from .tables import layout


def _quantiles(vals: np.ndarray) -> list[float] | None:
    vals = vals[np.isfinite(vals)]
    return interval(vals, LEVEL) if len(vals) >= 2 else None


def _utterance_rows(true: np.ndarray, pred: np.ndarray, clips: list[np.ndarray],
                    idx: np.ndarray) -> dict[str, np.ndarray]:
    """LCC and SRCC of the clips of each resample's systems: idx [R, S] -> {fig: [R]}.

    A resample holds each clip as often as its system was drawn, so its figures are those
    of the clips weighted by that count: weighted Pearson of the values (LCC) and of their
    ranks in the weighted multiset, ties sharing the mean of their ranks (SRCC); equal to
    concatenating the drawn systems' clips (tests/report: a clip-by-clip loop)."""
    n, n_sys = len(true), len(clips)
    system_of = np.empty(n, dtype=np.int64)
    for s, rows in enumerate(clips):
        system_of[rows] = s
    drawn = np.zeros((len(idx), n_sys), dtype=np.int64)  # [R, S] draws of each system
    np.add.at(drawn, (np.arange(len(idx))[:, None], idx), 1)
    w = drawn[:, system_of].astype(np.float64)  # [R, N] each clip's count
    ra, rb = _weighted_ranks(true, w), _weighted_ranks(pred, w)
    present = w > 0
    flat = np.zeros(len(idx), bool)
    for v in (true, pred):  # a resample whose values are all equal has no correlation
        flat |= np.where(present, v, np.inf).min(1) == np.where(present, v, -np.inf).max(1)
    out = {"lcc": _weighted_pearson(np.broadcast_to(true, w.shape),
                                    np.broadcast_to(pred, w.shape), w),
           "srcc": _weighted_pearson(ra, rb, w)}
    for v in out.values():
        v[flat] = np.nan
    return out


def _weighted_ranks(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[R, N] each value's average rank (1-based) in the multiset holding value i w[r, i]
    times (the ranks rankdata gives the concatenation)."""
    order = np.argsort(v, kind="stable")
    sv = v[order]
    starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])  # first of each tie group
    group = np.cumsum(np.r_[True, sv[1:] != sv[:-1]]) - 1  # [N] tie group of sorted i
    per = np.add.reduceat(w[:, order], starts, axis=1)  # [R, G] weight of each group
    rank = np.cumsum(per, axis=1) - per + (per + 1) / 2  # [R, G]
    out = np.empty_like(w)
    out[:, order] = rank[:, group]
    return out


def _weighted_pearson(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    tot = w.sum(1, keepdims=True)
    da = a - (w * a).sum(1, keepdims=True) / tot
    db = b - (w * b).sum(1, keepdims=True) / tot
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * da * db).sum(1) / np.sqrt((w * da * da).sum(1) * (w * db * db).sum(1))


def compare_rows(true: np.ndarray, systems: np.ndarray, preds: dict[str, np.ndarray],
                 reference: str, system_mos=None, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """true [N] labels (NaN unknown), systems [N], preds {row: [N] ensemble predictions} ->
    {"systems", "clips", "resamples", "rows": {row: {"system": {fig, fig_ci}, "utterance":
    {...}, "p_above": P(system SRCC > reference's) or None}}}."""
    keep = np.isfinite(true) & named_systems(systems)
    true, systems = true[keep], np.asarray(systems)[keep]
    names = np.unique(systems)
    clips = [np.flatnonzero(systems == s) for s in names]
    idx = np.random.default_rng(seed).integers(0, len(names), size=(n_boot, len(names)))
    boots, out = {}, {}
    for row, pred in preds.items():
        pred = pred[keep]
        _, st, sp, _ = system_scores(systems, true, pred, system_mos)
        sys_b = bootstrap_rows(st, sp, idx)
        utt_b = _utterance_rows(true, pred, clips, idx)
        boots[row] = sys_b["srcc"]
        out[row] = {"system": _with_ci(point_metrics(st, sp), sys_b),
                    "utterance": _with_ci(point_metrics(true, pred), utt_b)}
    for row, rec in out.items():
        rec["p_above"] = None if row == reference or reference not in boots else \
            _p_above(boots[row], boots[reference])
    return {"systems": len(names), "clips": int(keep.sum()), "resamples": n_boot,
            "reference": reference, "rows": out}


def _with_ci(point: dict[str, Any], boot: dict[str, np.ndarray]) -> dict[str, Any]:
    return {**point, **{f"{f}_ci": _quantiles(v) for f, v in boot.items()}}


def _p_above(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    return float((a[ok] > b[ok]).mean()) if ok.any() else None


# -- in a table run (tables.py) -----------------------------------------------------------
def row_ensembles(folder, data, heads, members, row_of, split: str) -> tuple[np.ndarray, dict]:
    """From the run's predictions.csv: (eval rows of the cache, {head: {row: [n] mean over
    the row's seeds}}). Members that failed have no column and are left out."""
    with open(folder / "predictions.csv", newline="") as f:
        lines = [r for r in csv.DictReader(f) if r["split"] == split]
    index = {c: i for i, c in enumerate(data.ids)}
    rows = np.array([index[r["id"]] for r in lines], dtype=np.int64)
    out: dict[str, dict[str, np.ndarray]] = {}
    for h in heads:
        by_row: dict[str, list[np.ndarray]] = {}
        for k, m in enumerate(members):
            col = f"pred_{h.name}_m{k}"
            if lines and col in lines[0]:
                by_row.setdefault(row_of[m], []).append(
                    np.array([float(r[col]) for r in lines]))
        out[h.name] = {row: np.mean(v, axis=0) for row, v in by_row.items()}
    return rows, out


def comparison(folder, data, heads, members, row_of, table_rows, reference: str, split: str,
               n_boot: int) -> dict[str, Any]:
    """{head: compare_rows(...)} over the eval split, rows in the table's order."""
    rows, ens = row_ensembles(folder, data, heads, members, row_of, split)
    out = {}
    for h in heads:
        col = data.label_names.index(h.label)
        mos = {s: float(v[col]) for s, v in data.system_mos.items()} or None
        preds = {r: ens[h.name][r] for r in table_rows if r in ens[h.name]}
        out[h.name] = compare_rows(data.labels[rows, col], data.systems[rows], preds,
                                   reference, mos, n_boot)
    return out


def _fig(rec: dict[str, Any], fig: str) -> str:
    v, ci = rec.get(fig), rec.get(f"{fig}_ci")
    if v is None:
        return "-"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def render_comparison(result: dict[str, Any], reference: str, seeds: int,
                      split: str) -> tuple[str, str, list[list[str]], str]:
    """(plain text, markdown, csv rows, footer) of the comparison."""
    heads = list(result)
    columns = ("system SRCC [95% CI]", f"P(> {reference})", "system LCC [95% CI]",
               "utterance SRCC [95% CI]", "utterance LCC [95% CI]")
    header = ["model"] + [f"{h} {c}" for h in heads for c in columns]
    cells = {h: {row: _cells(rec, row == reference) for row, rec in result[h]["rows"].items()}
             for h in heads}
    rows = list(result[heads[0]]["rows"])
    body = [[row, *(c for h in heads for c in cells[h][row])] for row in rows]
    first = result[heads[0]]
    footer = (f"n = {first['systems']} systems ({first['clips']} clips) of the {split!r} "
              f"split. Each row: the mean prediction of its {seeds} seeds. Intervals and "
              f"P(> {reference}) (the share of resamples in which the row's system SRCC "
              f"beats {reference}'s) come from {first['resamples']} resamples of these "
              f"systems, the same resamples for every row (utterance level: all clips of "
              f"the drawn systems). A P between 0.05 and 0.95 means the two rows are not "
              f"told apart on {first['systems']} systems.")
    _, md = layout(header, body)
    # on screen one block per head: all heads side by side would not fit a terminal
    text = "\n".join(f"{h}:\n" + layout(["model", *columns],
                                          [[row, *cells[h][row]] for row in rows])[0]
                     for h in heads)
    return f"{text}\n{footer}", f"{md}\n\n{footer}", [header, *body], footer


def _cells(rec: dict[str, Any], is_reference: bool) -> list[str]:
    p = rec["p_above"]
    return [_fig(rec["system"], "srcc"), "(reference)" if is_reference else
            "-" if p is None else f"{p:.2f}", _fig(rec["system"], "lcc"),
            _fig(rec["utterance"], "srcc"), _fig(rec["utterance"], "lcc")]
