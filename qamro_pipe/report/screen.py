"""What the commands print: metrics and sweep tables as plain text (the CLI only echoes)."""
from __future__ import annotations

from typing import Any

from ..loss_kinds import setting_order
from ..metrics import FIGURES, TOP_FIGURES, mean_sd
from .tables import layout

TOP_NAMES = {"top_f1": "TOP-F1", "p_at_k": "P@K"}  # the top tier's column names


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
    return (f"{level}-level {where} (validation: {metrics['validation']})\n"
            + _figures(metrics["heads"], level))


def pooled_table(metrics: dict[str, Any], level: str | None = None) -> str:
    """A cross-validation's pooled out-of-fold figures, each with its 95% CI."""
    level = level or shown_level(metrics)
    return (f"{level}-level of the pooled out-of-fold predictions (every clip scored by the "
            f"fold that did not train on it), 95% CI\n" + _figures(metrics["pooled"], level))


def _figures(heads: dict[str, Any], level: str) -> str:
    """A line of figures per head (or mean ± sd) and, where they have one, a line of their
    95% intervals beneath: one figure per column. The top tier's figures follow where the
    metrics have them (runs written before it have not): TOP_F1 at the threshold, P@K of
    the system ranking."""
    figs = [*FIGURES, *(f for f in TOP_FIGURES
                        if any(f in levels[level] for levels in heads.values()))]
    body = []
    for head, levels in heads.items():
        m = levels[level]
        body.append([head, *(_figure(m, f) for f in figs)])
        cis = [_interval(m, f) for f in figs]
        if any(cis):
            body.append(["  95% CI", *cis])
    return layout(["head", *(TOP_NAMES.get(f, f.upper()) for f in figs)], body)[0]


def _figure(m: dict[str, Any], f: str) -> str:
    """A figure as the screen shows it: with its sd over members or folds where it has one."""
    v, sd = m.get(f), m.get(f"{f}_std")
    if v is None:
        return "-"
    return f"{v:.3f} ± {sd:.3f}" if sd is not None else f"{v:.3f}"


def _interval(m: dict[str, Any], f: str) -> str:
    ci = m.get(f"{f}_ci")
    return f"[{ci[0]:.3f},{ci[1]:.3f}]" if ci and m.get(f) is not None \
        and m.get(f"{f}_std") is None else ""


def system_level_line(metrics: dict[str, Any]) -> str | None:
    why = metrics.get("system_level", {}).get("why")
    return f"note: system level not computable: {why}" if why else None


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """Mean ± sd over seeds of SRCC per setting and head: system level where any row has
    it, else utterance level."""
    level = "system" if any(r.get("level") == "system" and r.get("srcc") is not None
                            for r in rows) else "utterance"
    pts: dict[tuple, list] = {}
    for r in rows:
        if r.get("level") == level and r.get("srcc") is not None:
            pts.setdefault((r["loss"], r["alpha"], r["beta"], r["margin"], r["head"]),
                           []).append(r["srcc"])

    def num(x):
        return "-" if x is None else f"{x:g}"

    def order(item):
        kind, a, b, m, head = item[0]
        return kind, *(setting_order(x) for x in (a, b, m)), head
    body = []
    for (kind, a, b, m, head), v in sorted(pts.items(), key=order):
        mean, sd = mean_sd(v)
        body.append([kind, num(a), num(b), num(m), head,
                     f"{mean:.3f}{f' ± {sd:.3f}' if sd is not None else ''} (n={len(v)})"])
    return layout(["loss", "alpha", "beta", "margin", "head",
                   f"{level} SRCC (mean ± sd over seeds)"], body, "lrrrlr")[0]


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
