"""What the commands print: metrics and sweep tables as plain text (the CLI only echoes)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import FIGURES


def shown_level(metrics: dict[str, Any]) -> str:
    """System level, the headline, where it was computable; else utterance level."""
    return "system" if metrics.get("system_level", {}).get("computable", True) else "utterance"


def metrics_table(metrics: dict[str, Any], level: str | None = None) -> str:
    """One line per head: MSE, LCC, SRCC, KTAU at `level` (mean ± sd over members, or the
    figure with its 95% CI), headed by the split and the validation source."""
    level = level or shown_level(metrics)
    cv = metrics.get("cv")
    where = (f"{cv['folds']}-fold cross-validation grouped by {cv['group']} over "
             f"{metrics['eval_split']}, mean ± sd over folds" if cv
             else f"on {metrics['eval_split']!r}")
    lines = [f"{level}-level {where} (validation: {metrics['validation']})"]
    return "\n".join(lines + _figure_lines(metrics["heads"], level))


def pooled_table(metrics: dict[str, Any], level: str | None = None) -> str:
    """A cross-validation's pooled out-of-fold figures, each with its 95% CI."""
    level = level or shown_level(metrics)
    lines = [f"{level}-level of the pooled out-of-fold predictions (every clip scored by the "
             f"fold that did not train on it), 95% CI"]
    return "\n".join(lines + _figure_lines(metrics["pooled"], level))


CELL = 16  # a figure's column: fits "[-0.456,-0.012]" with a space before it; 4 + the head
# column stay within 80 characters


def _figure_lines(heads: dict[str, Any], level: str) -> list[str]:
    """The header, then per head a line of figures (or mean ± sd) and, where they have one, a
    line of their 95% intervals beneath: one figure per column, never glued to the next."""
    first = max([12] + [len(h) + 2 for h in heads])
    lines = [f"{'head':<{first}}" + "".join(f"{f.upper():>{CELL}}" for f in FIGURES)]
    for head, levels in heads.items():
        m = levels[level]
        cells, cis = [], []
        for f in FIGURES:
            v, sd, ci = m.get(f), m.get(f"{f}_std"), m.get(f"{f}_ci")
            cells.append("-" if v is None else f"{v:.3f} ± {sd:.3f}" if sd is not None
                         else f"{v:.3f}")
            cis.append(f"[{ci[0]:.3f},{ci[1]:.3f}]" if ci and v is not None and sd is None
                       else "")
        lines.append(f"{head:<{first}}" + "".join(f" {c:>{CELL - 1}}" for c in cells))
        if any(cis):
            lines.append((f"{'  95% CI':<{first}}"
                          + "".join(f" {c:>{CELL - 1}}" for c in cis)).rstrip())
    return lines


def system_level_line(metrics: dict[str, Any]) -> str | None:
    why = metrics.get("system_level", {}).get("why")
    return f"note: system level not computable: {why}" if why else None


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """Mean ± sd over seeds of SRCC per setting and head: system level where any row has
    it, else utterance level."""
    from ..train.sweep import setting_order

    level = "system" if any(r.get("level") == "system" and r.get("srcc") is not None
                            for r in rows) else "utterance"
    pts: dict[tuple, list] = {}
    for r in rows:
        if r.get("level") == level and r.get("srcc") is not None:
            pts.setdefault((r["loss"], r["alpha"], r["beta"], r["margin"], r["head"]),
                           []).append(r["srcc"])
    w = max([9] + [len(kind) + 2 for kind, *_ in pts])  # gaussian-kl is wider than "qamro"
    lines = [f"{'loss':<{w}}{'alpha':>7}{'beta':>6}{'margin':>8}  {'head':<10}"
             f"{level + ' SRCC (mean ± sd over seeds)':>36}"]

    def num(x):
        return "-" if x is None else f"{x:g}"

    def order(item):
        kind, a, b, m, head = item[0]
        return kind, *(setting_order(x) for x in (a, b, m)), head
    for (kind, a, b, m, head), v in sorted(pts.items(), key=order):
        sd = f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else ""
        lines.append(f"{kind:<{w}}{num(a):>7}{num(b):>6}{num(m):>8}  {head:<10}"
                     f"{np.mean(v):>28.3f}{sd} (n={len(v)})")
    return "\n".join(lines)


def systems_lines(metrics: dict[str, Any]) -> list[str]:
    """What `evaluate` says of the systems: per head the best and worst, how wide a
    system's interval typically is and how many neighbours in the ranking are told apart."""
    s = metrics.get("systems") or {}
    if not s.get("computable"):
        return []
    lines = []
    for head, e in s["heads"].items():
        line = f"{head}: {e['systems']} systems, highest {e['best']}, lowest {e['worst']}"
        if "matrix" in e:
            line += (f"; a system's predicted MOS ± {e['median_interval'] / 2:.3f} (median "
                     f"half-width of the 95% intervals); {e['separated_neighbours']} of "
                     f"{e['neighbours']} neighbours in the ranking ordered alike in >= 95% of "
                     f"{s['resamples']} resamples")
        lines.append(line)
    return lines
