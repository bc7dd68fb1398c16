"""sweep.png, a figure against the swept setting (the paper's Figure 1), and what the run
folder's pictures share (report/curves.py draws curves.png).

Figures are built on matplotlib's object API (a Figure with its own Agg canvas), so a call
neither picks a backend nor leaves pyplot state behind. Each function returns its Figure so
that tests can read what was drawn."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..loss_kinds import GRID_SETTINGS, KINDS, LOSS_KINDS, USED_SETTINGS, legend, setting_order
from ..metrics import mean_sd

CORRELATIONS = ("lcc", "srcc", "ktau")  # bounded by [-1, 1]: axis and bars are capped there
AXIS_NAMES = {"beta": "β (quality preference)", "alpha": "α (margin scale)",
              "margin": "margin of L_MR"}
SWEPT_ORDER = ("beta", "alpha", "margin")  # a tie goes to beta, the paper's Figure 1 axis
OWNER = {s: k.name for k in KINDS.values() for s in k.grid}  # the kind a grid setting is of
BASELINE_COLOUR = "black"  # regression only: no palette colour, so it matches no sweep line
CATEGORIES_FLAT = 4  # more categories than this get slanted tick labels
KIND_ORDER = {k: i for i, k in enumerate(LOSS_KINDS)}  # legends: QAMRO, L_MR, ..., none
DODGE = 0.012  # x shift between neighbouring lines, as a share of the grid's span
NBSP = "\u00a0"  # joins "n = 3" so that wrapping the footnote never splits it
EQ = f"{NBSP}={NBSP}"


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def palette(n: int) -> list:
    """n distinct colours: tab10, then tab20, then samples of a long perceptual map."""
    import matplotlib

    name = "tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"
    cmap = matplotlib.colormaps[name]
    return [cmap(i) for i in range(n)] if n <= 20 else [cmap(v) for v in np.linspace(0.05, 0.95, n)]


def setting_label(kind: str, alpha=None, beta=None, margin=None, skip: tuple = ()) -> str:
    """A loss setting as a legend reads it; `skip` leaves out the setting on the x axis."""
    return legend(kind, {"alpha": alpha, "beta": beta, "margin": margin}, skip)


def setting_key(loss: Mapping[str, Any]) -> tuple:
    """(kind, alpha, beta, margin) with the settings the kind ignores as None."""
    kind = loss["kind"] if "kind" in loss else loss["loss"]
    return (kind, *(loss.get(k) if k in USED_SETTINGS[kind] else None
                    for k in GRID_SETTINGS))


def swept_setting(rows: list[dict[str, Any]]) -> str | None:
    """The setting with the most distinct values (beta first on a tie); None if none varies."""
    counts = {name: len({r[name] for r in rows if r["loss"] == OWNER[name]})
              for name in SWEPT_ORDER}
    best = max(SWEPT_ORDER, key=lambda name: counts[name])  # max keeps the first on a tie
    return best if counts[best] > 1 else None


def seed_stats(values: list[float], metric: str) -> tuple[float, float, float, bool]:
    """(mean, low, high, clipped): mean ± 1 sd over seeds (ddof=1, as the tables), with
    correlations' bars clipped to [-1, 1]."""
    mean, sd = mean_sd(values)
    sd = sd or 0.0
    lo, hi = mean - sd, mean + sd
    if metric in CORRELATIONS:
        clipped = hi > 1 or lo < -1
        return mean, max(lo, -1.0), min(hi, 1.0), clipped
    return mean, lo, hi, False


# ---- sweep.png -------------------------------------------------------------------------


def _series_of(row: dict[str, Any], x: str | None) -> tuple[tuple, Any]:
    """(series, x value). A row of the swept kind is a point on a line ("line", its other
    settings); any other row is a level drawn across the axis ("ref"), or, when nothing is
    swept, a category of its own ("cat")."""
    key = setting_key(row)
    if x is not None and row["loss"] == OWNER[x]:
        i = 1 + GRID_SETTINGS.index(x)
        return ("line", key[:i] + (None,) + key[i + 1:]), row[x]
    return ("ref" if x else "cat", key), None


def _series_order(series: tuple) -> tuple:
    role, key = series
    return (role == "ref", KIND_ORDER[key[0]], *(setting_order(v) for v in key[1:]))


def _series_label(series: tuple, x: str | None) -> str:
    role, key = series
    return setting_label(*key, skip=(x,) if role == "line" else ())


def colours(keys: list, kind_of=lambda key: key[0]) -> dict:
    """One colour per setting, in the order given; regression only is black."""
    others = [k for k in keys if kind_of(k) != "none"]
    out = dict(zip(others, palette(len(others))))
    out.update({k: BASELINE_COLOUR for k in keys if kind_of(k) == "none"})
    return out


def _collect(rows: list[dict[str, Any]], x: str | None, metric: str):
    """{head: {series: {x value: [metric per seed]}}}, heads in the order rows give them."""
    out: dict[str, dict] = {}
    for r in rows:
        series, xv = _series_of(r, x)
        out.setdefault(r["head"], {}).setdefault(series, {}).setdefault(xv, []).append(r[metric])
    return out


def _count_text(n_systems, level: str) -> str | None:
    if not n_systems:  # not given, or a metrics.json without counts
        return None
    unit = "clips" if level == "utterance" else "systems"
    if isinstance(n_systems, Mapping):
        if len(set(n_systems.values())) == 1:
            return f"n{EQ}{next(iter(n_systems.values()))}{NBSP}{unit} per head"
        return f"n{EQ}" + ", ".join(f"{n}{NBSP}{unit} ({h})" for h, n in n_systems.items())
    return f"n{EQ}{n_systems}{NBSP}{unit}"


def sweep_note(seed_counts: set[int], clipped: bool, has_refs: bool, metric: str,
               level: str, n_systems=None, split: str | None = None) -> str:
    """The footnote: what a point and a bar are, and how much data they rest on."""
    lo, hi = min(seed_counts), max(seed_counts)
    seeds = f"{lo}{NBSP}seeds" if lo == hi else f"{lo}-{hi}{NBSP}seeds"
    if hi == 1:
        spread = f"Points: one seed per setting (n{EQ}1{NBSP}seed), so no spread is shown."
    else:
        spread = (f"Points: mean over n{EQ}{seeds} per setting; bars"
                  + (" and shaded bands" if has_refs else "") + f": ±{NBSP}1{NBSP}sd over seeds"
                  + (" (clipped at 1, the largest possible value)" if clipped else "") + ".")
    data = f"{level.capitalize()}-level {metric.upper()}"
    if split:
        data += f" on the {split!r} split"
    counts = _count_text(n_systems, level)
    return f"{spread} {data}" + (f", {counts}." if counts else ".")


def _dodges(lines: list[tuple], values: list[float], log: bool) -> dict[tuple, Any]:
    """Per line, a small x shift, so that bars of several lines at one x stand side by side
    rather than on top of each other. The ticks stay at the grid's values."""
    if len(lines) < 2 or len(values) < 2:
        return {}
    span = math.log10(values[-1] / values[0]) if log else values[-1] - values[0]
    out = {}
    for i, series in enumerate(lines):
        step = (i - (len(lines) - 1) / 2) * DODGE * span
        out[series] = (lambda v, s=step: v * 10 ** s) if log else (lambda v, s=step: v + s)
    return out


def _draw_panel(ax, data: dict, x: str | None, metric: str, colour_of: dict,
                categories: list, dodge: dict) -> tuple[list, set, bool]:
    """One head's panel. Returns (every bar end drawn, seed counts, clipped?)."""
    ends, counts, clipped = [], set(), False
    for series in sorted(data, key=_series_order):
        role, colour = series[0], colour_of[series]
        label = _series_label(series, x)
        pts = sorted(data[series].items(), key=lambda kv: setting_order(kv[0]))
        stats = [seed_stats(v, metric) for _, v in pts]
        counts |= {len(v) for _, v in pts}
        clipped |= any(s[3] for s in stats)
        mean, lo, hi = (np.array([s[i] for s in stats]) for i in range(3))
        ends += [*lo, *hi]
        if role == "ref":  # a setting off the swept axis: its level, spread as a band
            ax.axhline(mean[0], color=colour, linestyle="--", linewidth=1.5, label=label)
            ax.axhspan(lo[0], hi[0], color=colour, alpha=0.07, linewidth=0)
            for edge in (lo[0], hi[0]):  # edges drawn, so overlapping bands stay apart
                ax.axhline(edge, color=colour, linestyle=":", linewidth=0.8)
            continue
        shift = dodge.get(series, lambda v: v)
        xs = [categories.index(series)] if role == "cat" else [shift(xv) for xv, _ in pts]
        bars = ax.errorbar(xs, mean, yerr=np.vstack([mean - lo, hi - mean]), color=colour,
                           marker="o", markersize=5, capsize=3, linewidth=1.8, label=label)
        for artist in bars.get_children():  # a cap clipped at 1 sits on the frame: show it
            artist.set_clip_on(False)
    return ends, counts, clipped


def grid_values(rows: list[dict[str, Any]], x: str) -> list[float]:
    return sorted({r[x] for r in rows if r["loss"] == OWNER[x]})


def log_x(values: list[float]) -> bool:
    return values[0] > 0 and values[-1] / values[0] >= 20  # a grid spread over decades


def _set_x_axis(ax, x: str | None, rows: list[dict[str, Any]], categories: list) -> None:
    from matplotlib.ticker import NullLocator

    if x is None:  # nothing swept: one category per setting, named on the axis
        many = len(categories) > CATEGORIES_FLAT
        ax.set_xticks(range(len(categories)),
                      [_series_label(c, None).replace(" ", "\n", 1) for c in categories],
                      rotation=30 if many else 0, ha="right" if many else "center")
        ax.set_xlim(-0.6, len(categories) - 0.4)
        return
    values = grid_values(rows, x)
    if log_x(values):
        ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(AXIS_NAMES[x])


def _set_y_range(ax, ends: list[float], metric: str) -> None:
    lo, hi = min(ends), max(ends)
    pad = 0.08 * (hi - lo) if hi > lo else 0.05
    lo, hi = lo - pad, hi + pad
    if metric in CORRELATIONS:
        lo, hi = max(lo, -1.0), min(hi, 1.0)
    elif metric == "mse":
        lo = max(lo, 0.0)
    ax.set_ylim(lo, hi)


def plot_sweep(path: Path | None, rows: list[dict[str, Any]], metric: str = "srcc",
               level: str = "system", n_systems: int | Mapping[str, int] | None = None,
               split: str | None = None):
    """`metric` against the swept setting, one panel per head on a shared y scale.

    rows: what experiments.sweep.sweep_rows gives. The swept setting (beta, alpha or margin:
    whichever takes the most values) is the x axis, with a tick at each value; a QAMRO grid
    over both alpha and beta draws one line per value of the other. Settings off that axis
    (regression only, L_MR beside a QAMRO sweep) are dashed levels with a shaded ± sd band;
    with nothing swept, each setting is a category. n_systems: the eval split's systems
    (clips for level="utterance"), one number or {head: number}. Writes `path` (if given)
    and returns the Figure."""
    rows = [r for r in rows if r.get("level") == level and r.get(metric) is not None]
    x = swept_setting(rows) if rows else None
    by_head = _collect(rows, x, metric)
    series = sorted({s for d in by_head.values() for s in d}, key=_series_order)
    categories = [s for s in series if s[0] == "cat"]
    colour_of = colours(series, kind_of=lambda s: s[1][0])  # the same in every panel
    fig = new_figure(1, 1)
    n = max(1, len(by_head))
    ncols = math.ceil(n / math.ceil(n / 3))  # at most 3 across: 4 heads as 2 x 2
    grid = fig.subplots(math.ceil(n / ncols), ncols, sharey=True, squeeze=False)
    axes = grid.ravel()[:n]
    for ax in grid.ravel()[n:]:
        ax.set_visible(False)
    lines = [s for s in series if s[0] == "line"]
    dodge = _dodges(lines, grid_values(rows, x), log_x(grid_values(rows, x))) if x else {}
    ends, counts, clipped = [], set(), False
    for ax, (head, data) in zip(axes, by_head.items()):
        e, c, cl = _draw_panel(ax, data, x, metric, colour_of, categories, dodge)
        ends, counts, clipped = ends + e, counts | c, clipped or cl
        _set_x_axis(ax, x, rows, categories)
        ax.set_title(head)
        ax.grid(alpha=0.3)
    for ax in grid[:, 0]:
        ax.set_ylabel(f"{level}-level {metric.upper()}")
    if not rows:
        axes[0].text(0.5, 0.5, f"no {level}-level {metric.upper()} to plot",
                     ha="center", va="center", transform=axes[0].transAxes)
        note = ""
    else:
        _set_y_range(axes[0], ends, metric)
        note = sweep_note(counts, clipped, any(s[0] == "ref" for s in series), metric,
                          level, n_systems, split)
    title = f"{level.capitalize()}-level {metric.upper()} " + (
        f"against {AXIS_NAMES[x].split(' (')[0]}" if x else "by loss setting")
    legend = [s for s in series if s[0] != "cat"] if len(series) > 1 else []
    if len(series) == 1 and x:  # no legend: the title names the settings held fixed
        title += f", {_series_label(series[0], x)}"
    _layout(fig, grid, title,
            legend_labels=[_series_label(s, x) for s in legend], note=note,
            tick_room=0.0 if x else 0.9 if len(categories) > CATEGORIES_FLAT else 0.3)
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


PANEL = (4.4, 3.1)  # inches of one head's axes
NOTE_CHARS_PER_INCH = 17  # at the footnote's 8 pt, for wrapping it to the figure's width


def _legend_handles(axes, labels: list[str]) -> list:
    found: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            found.setdefault(lab, h)
    return [found[lab] for lab in labels]


def _layout(fig, grid, title: str, legend_labels: list[str], note: str,
            tick_room: float) -> None:
    """Size the figure around the panels so that nothing overlaps: title on top, then the
    panels, their x labels, the legend (below the panels, never over data), the footnote."""
    nrows, ncols = grid.shape
    left, right, gap, top = 0.85, 0.25, 0.3, 0.75
    xlabel = 0.55 + tick_room  # inches below a row of panels for its ticks and label
    hgap = xlabel + 0.4  # between rows: ticks, x label and the next row's titles
    width = left + right + ncols * PANEL[0] + (ncols - 1) * gap
    widest = max((len(lab) for lab in legend_labels), default=0)
    ncol = max(1, min(len(legend_labels), int((width - 0.4) // (0.6 + 0.075 * widest))))
    rows = math.ceil(len(legend_labels) / ncol) if legend_labels else 0
    legend_h = rows * 0.24 + (0.15 if rows else 0)
    lines = textwrap.wrap(note, int((width - 0.3) * NOTE_CHARS_PER_INCH)) if note else []
    note_h = len(lines) * 0.16 + 0.15
    height = top + nrows * PANEL[1] + (nrows - 1) * hgap + xlabel + legend_h + note_h
    fig.set_size_inches(width, height)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=(xlabel + legend_h + note_h) / height, wspace=gap / PANEL[0],
                        hspace=hgap / PANEL[1])
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    if legend_labels:
        fig.legend(_legend_handles(grid.ravel(), legend_labels), legend_labels,
                   loc="upper center", bbox_to_anchor=(0.5, (legend_h + note_h) / height),
                   ncol=ncol, frameon=False, fontsize=9)
    if lines:
        fig.text(0.12 / width, 0.08 / height, "\n".join(lines), ha="left", va="bottom",
                 fontsize=8, color="0.2")


def eval_counts(metrics: dict[str, Any], level: str = "system") -> dict[str, int]:
    """{head: n} from metrics.json: the systems (or clips) the figures of `level` rest on,
    read off the first member that trained (all members share the eval split)."""
    for entry in metrics["members"]:
        if "heads" in entry:
            return {h: levels[level]["n"] for h, levels in entry["heads"].items()
                    if "n" in levels.get(level, {})}
    return {}
