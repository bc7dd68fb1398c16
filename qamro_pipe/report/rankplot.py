"""rank-HEAD.png: the matrix P(system A ranks above system B) as a picture.

Systems run down and across in the order of their predicted MOS, best at the top left, so
the upper triangle holds P(better-ranked > worse-ranked) and a reader finds at a glance
which neighbours the data cannot tell apart (pale cells near the diagonal). Readable for
about 40 systems: the cells carry their numbers while there is room for them."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from .plots import NBSP, NOTE_CHARS_PER_INCH, new_figure
from .systems import SystemScores

CELL = 0.24  # inches per system, across and down
NUMBERED_CELL = 0.36  # the same while the cells carry their numbers
NUMBERS_UP_TO = 16  # systems: beyond this the numbers no longer fit in a cell
COLOURMAP = "RdBu"  # 0 red, 0.5 white (a coin flip), 1 blue


def _row_label(s: SystemScores, i: int) -> str:
    ci = "" if not np.isfinite(s.lo[i]) else f" [{s.lo[i]:.2f}, {s.hi[i]:.2f}]"
    return f"{s.names[i]}  {s.mos[i]:.2f}{ci}"


def rank_note(s: SystemScores, split: str | None) -> str:
    members = (f" and of the run's {s.members}{NBSP}members" if s.members > 1 else "")
    where = f" on the {split!r} split" if split else ""
    return (f"Each cell: the share of R{NBSP}={NBSP}{s.resamples} bootstrap resamples (of "
            f"each system's clips{members}) in which the row's system has the higher mean "
            f"predicted score{where}; ties count for neither. Rows: predicted MOS "
            f"[{s.level:.0%} interval]. Saturated cells: the order holds in almost every "
            f"resample; pale ones: the data cannot tell the two apart.")


def plot_rank_matrix(path: Path | None, s: SystemScores, head: str, split: str | None = None):
    """Draw `s.above`; writes `path` (if given) and returns the Figure."""
    import matplotlib

    n = len(s.names)
    label_w = 0.075 * max(len(_row_label(s, i)) for i in range(n)) + 0.2
    col_h = 0.065 * max(len(str(x)) for x in s.names) + 0.2
    side = max(n * (NUMBERED_CELL if n <= NUMBERS_UP_TO else CELL), 2.5)
    width = label_w + side + 1.3  # + colour bar and its label
    note = textwrap.wrap(rank_note(s, split), int((width - 0.3) * NOTE_CHARS_PER_INCH))
    note_h = 0.16 * len(note) + 0.2
    top = 0.7
    height = top + side + col_h + note_h
    fig = new_figure(width, height)
    ax = fig.add_axes((label_w / width, (col_h + note_h) / height, side / width,
                       side / height))
    cmap = matplotlib.colormaps[COLOURMAP].with_extremes(bad="0.85")  # the diagonal
    image = ax.imshow(np.ma.masked_invalid(s.above), cmap=cmap, vmin=0, vmax=1,
                      interpolation="nearest", aspect="equal")
    ax.set_yticks(range(n), [_row_label(s, i) for i in range(n)], fontsize=7)
    ax.set_xticks(range(n), [str(x) for x in s.names], fontsize=7, rotation=90)
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    if n <= NUMBERS_UP_TO:
        for i, j in np.ndindex(n, n):
            v = s.above[i, j]
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if abs(v - 0.5) > 0.35 else "black")
    cax = fig.add_axes(((label_w + side + 0.25) / width, (col_h + note_h) / height,
                        0.15 / width, side / height))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("P(row system ranks above column system)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"{head}: which system ranks above which ({n} systems, R = {s.resamples})",
                 y=1 - 0.12 / height, va="top", fontsize=10)
    fig.text(0.12 / width, 0.08 / height, "\n".join(note), ha="left", va="bottom", fontsize=8,
             color="0.2")
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig
