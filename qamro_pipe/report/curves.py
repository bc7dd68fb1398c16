"""curves.png: the loss of every member of a run against epoch, from its history.csv.

Up to PANEL_SETTINGS loss settings share one panel, one colour per setting (a setting's seeds
share it); larger sweeps get one panel per value of a setting, on shared axes."""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import DataError
from ..loss_kinds import setting_order
from .plots import KIND_ORDER, NOTE_CHARS_PER_INCH, colours, new_figure, setting_key, setting_label

HISTORY_COLUMNS = ("member", "epoch", "train_loss", "val_loss")  # what a plot needs of a row
CURVES_AXES = (6.4, 3.8)  # inches of the loss axes
LOG_Y_RANGE = 10  # log y once the largest loss is this many times the smallest
PANEL_SETTINGS = 10  # settings one panel of curves.png holds before it splits into several


def _loss(v) -> float:
    """A loss cell: "" (not measured) and inf become NaN, which leaves a gap in the line."""
    v = float(v) if v not in ("", None) else math.nan
    return v if math.isfinite(v) else math.nan


def history_by_member(rows: Iterable, n_members: int,
                      source: str = "history") -> dict[int, dict[str, np.ndarray]]:
    """{member: {"epoch", "train_loss", "val_loss"}: arrays sorted by epoch}. Errors name
    `source` and the line, counting rows as a CSV file with one header line."""
    per: dict[int, list] = {}
    for i, r in enumerate(rows):
        where = f"{source} line {i + 2}"
        try:
            k, epoch = int(float(r["member"])), int(float(r["epoch"]))
            losses = _loss(r["train_loss"]), _loss(r["val_loss"])
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise DataError(f"{where}: needs numbers in columns {', '.join(HISTORY_COLUMNS)} "
                            f"({type(e).__name__}: {e})") from None
        if not 0 <= k < n_members:
            raise DataError(f"{where}: member {k}, but the run has {n_members} members "
                            f"(0-{n_members - 1})")
        per.setdefault(k, []).append((epoch, *losses))
    out = {}
    for k, pts in per.items():
        a = np.array(sorted(pts), dtype=np.float64)  # [epochs, 3]
        out[k] = {"epoch": a[:, 0], "train_loss": a[:, 1], "val_loss": a[:, 2]}
    return out


def _decades(hist: dict) -> float:
    """How many powers of 10 the losses span; 0 when a log axis cannot show them."""
    vals = np.concatenate([h[c] for h in hist.values() for c in ("train_loss", "val_loss")])
    vals = vals[np.isfinite(vals)]
    if not len(vals) or vals.min() <= 0:
        return 0.0
    return float(np.log10(vals.max() / vals.min()))


def _draw_member(ax, h: dict, colour, best_epoch, many: bool) -> None:
    ax.plot(h["epoch"], h["train_loss"], color=colour, linewidth=0.8, alpha=0.3,
            linestyle="--")
    ax.plot(h["epoch"], h["val_loss"], color=colour, linewidth=1.2, alpha=0.6 if many else 0.9)
    at = np.flatnonzero(h["epoch"] == best_epoch) if best_epoch is not None else []
    if len(at):
        ax.scatter(h["epoch"][at], h["val_loss"][at], s=30, color=colour, edgecolors="white",
                   linewidths=0.8, zorder=3)


def curve_panels(keys: list[tuple]) -> tuple[str | None, list[tuple[str, list[tuple]]]]:
    """(split, [(panel title, settings)]). Up to PANEL_SETTINGS settings share one panel;
    more are split by the QAMRO setting with fewer values (one panel per alpha, say, the
    betas coloured alike in each), other loss kinds in a panel of their own."""
    if len(keys) <= PANEL_SETTINGS:
        return None, [("", keys)]
    qamro = [k for k in keys if k[0] == "qamro"]
    alphas, betas = {k[1] for k in qamro}, {k[2] for k in qamro}
    split = "alpha" if len(alphas) <= len(betas) else "beta"
    col = 1 if split == "alpha" else 2
    panels = [(setting_label("qamro", **{split: v}), [k for k in qamro if k[col] == v])
              for v in sorted(alphas if split == "alpha" else betas)]
    others = [k for k in keys if k[0] != "qamro"]
    return split, panels + ([("other losses", others)] if others else [])


def _legend_label(key: tuple, split: str | None) -> str:
    return setting_label(*key, skip=(split,) if key[0] == "qamro" else ())


def _style_entries() -> tuple[list, list[str]]:
    from matplotlib.lines import Line2D

    return ([Line2D([], [], color="0.5", linewidth=1.2),
             Line2D([], [], color="0.5", linewidth=0.8, alpha=0.4, linestyle="--"),
             Line2D([], [], color="0.5", marker="o", linestyle="none",
                    markeredgecolor="white")],
            ["validation loss", "training loss", "best epoch (weights kept)"])


def _set_loss_axis(ax, log: bool, decades: float) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:  # a decade or two of loss has too few powers of 10 to label: label 1, 2, 5...
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades > 1.5
                                              else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both" if log else "major")


def _curves_title(members: list, keys: list, key_of: dict) -> str:
    seeds = {sum(v == k for v in key_of.values()) for k in keys}
    n = f"{len(members)} member{'s' if len(members) > 1 else ''}"
    if len(seeds) == 1 and len(keys) > 1:
        return f"Loss per member: {n}, {len(keys)} settings x {seeds.pop()} seeds"
    return f"Loss per member: {n}" + (f", {len(keys)} settings" if len(keys) > 1 else "")


def plot_curves(path: Path | None, history_rows: Iterable, members: list[dict[str, Any]],
                source: str = "history"):
    """Validation loss per member against epoch, one colour per loss setting (a setting's
    seeds share it), each member's best epoch marked, its training loss drawn faintly. Over
    PANEL_SETTINGS settings, one panel per value of a setting (curve_panels), on shared axes.

    history_rows: mappings with at least member, epoch, train_loss, val_loss (numbers or
    their text, as csv.DictReader gives history.csv; numpy structured-array records work
    too). `member` indexes `members`, metrics.json's "members" list (its "loss" and
    "best_epoch"; epochs counted as the trainer counts them). A member's rows may end early
    (it stopped); empty or infinite losses leave gaps. Writes `path` (if given) and returns
    the Figure."""
    hist = history_by_member(history_rows, len(members), source)
    key_of = {k: setting_key(m["loss"]) for k, m in enumerate(members)}
    keys = sorted(set(key_of.values()),
                  key=lambda key: (KIND_ORDER[key[0]], *map(setting_order, key[1:])))
    split, panels = curve_panels(keys)
    labels = list(dict.fromkeys(_legend_label(k, split) for k in keys))
    colour_of = colours(labels, kind_of=lambda lab: "none" if lab == setting_label("none")
                        else "other")
    fig = new_figure(1, 1)
    ncols = min(len(panels), 2)
    axes = fig.subplots(math.ceil(len(panels) / ncols), ncols, sharex=True, sharey=True,
                        squeeze=False).ravel()
    decades = _decades(hist) if hist else 0.0
    log = decades >= math.log10(LOG_Y_RANGE)
    for ax, (title, in_panel) in zip(axes, panels):
        for k in sorted(hist):
            if key_of[k] in in_panel:
                _draw_member(ax, hist[k], colour_of[_legend_label(key_of[k], split)],
                             members[k].get("best_epoch"), many=len(hist) > 10)
        ax.set_title(title, fontsize=10)
        _set_loss_axis(ax, log, decades)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if not hist:
        axes[0].text(0.5, 0.5, f"{source}: no epochs recorded", ha="center", va="center",
                     transform=axes[0].transAxes)
    from matplotlib.lines import Line2D

    legends = [([Line2D([], [], color=colour_of[lab], linewidth=2) for lab in labels], labels,
                "loss setting"), (*_style_entries(), "drawn")]
    _curves_layout(fig, axes, legends, _curves_title(members, keys, key_of), log,
                   several=len(keys) > 1)
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


LEGEND_ROW, LEGEND_TITLE = 0.2, 0.3  # inches per entry and per legend title, at 8 pt


def _curves_layout(fig, axes, legends: list, title: str, log: bool, several: bool) -> None:
    """Legends stacked to the right of the panels (never over a curve), footnote below."""
    note = "A line ends where its member stopped early."
    if several:
        note = ("Each setting minimises its own loss (α and β scale the ranking term), so loss "
                "levels differ between settings: compare shapes and best epochs. " + note)
    nrows, ncols = axes.reshape(-1, min(len(axes), 2)).shape
    pw, ph = CURVES_AXES if len(axes) == 1 else (4.2, 2.6)
    ncol = [1 if len(labels) <= 18 else 2 for _, labels, _ in legends]
    rows = [math.ceil(len(labels) / n) for (_, labels, _), n in zip(legends, ncol)]
    legend_w = max(n * (0.55 + 0.068 * max(len(lab) for lab in labels))
                   for (_, labels, _), n in zip(legends, ncol))
    left, gap, right, bottom, hgap = 0.85, 0.3, 0.1, 0.55, 0.45
    top = 0.45 if len(axes) == 1 else 0.65  # room for the panels' titles
    panels_w = ncols * pw + (ncols - 1) * gap
    width = left + panels_w + gap + legend_w + right
    lines = textwrap.wrap(note, int((width - 0.3) * NOTE_CHARS_PER_INCH))
    note_h = len(lines) * 0.16 + 0.15
    panels_h = nrows * ph + (nrows - 1) * hgap
    legends_h = sum(r * LEGEND_ROW + LEGEND_TITLE for r in rows)
    height = top + max(panels_h, legends_h) + bottom + note_h
    fig.set_size_inches(width, height)
    fig.subplots_adjust(left=left / width, right=(left + panels_w) / width,
                        top=1 - top / height, bottom=1 - (top + panels_h) / height,
                        wspace=gap / pw, hspace=hgap / ph)
    middle = (left + panels_w / 2) / width  # of the panels, not of panels and legend
    fig.suptitle(title, x=middle, y=1 - 0.1 / height, va="top")
    fig.supxlabel("epoch", x=middle, y=(note_h + 0.1) / height, va="bottom", fontsize=10)
    fig.supylabel("loss" + (" (log scale)" if log else ""), x=0.1 / width, ha="left",
                  fontsize=10)
    y = top
    for (handles, labels, name), n, r in zip(legends, ncol, rows):
        fig.legend(handles, labels, title=name, loc="upper left", fontsize=8, ncol=n,
                   title_fontsize=8, alignment="left", frameon=False,
                   bbox_to_anchor=((left + panels_w + gap) / width, 1 - y / height))
        y += r * LEGEND_ROW + LEGEND_TITLE
    fig.text(0.12 / width, 0.08 / height, "\n".join(lines), ha="left", va="bottom",
             fontsize=8, color="0.2")


def write_curves(folder: Path, members: list[dict[str, Any]]) -> Path:
    """curves.png from the run folder's history.csv."""
    src = Path(folder) / "history.csv"
    with open(src, newline="") as f:
        plot_curves(Path(folder) / "curves.png", csv.DictReader(f), members, source=str(src))
    return Path(folder) / "curves.png"
