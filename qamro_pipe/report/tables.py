"""A table's rows as the paper lays them out: each figure the mean ± sd over seeds (or
folds), as plain text, markdown and CSV, beside the published figures when asked. Reading
and drawing only: experiments/tables.py trains the rows."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Member
from ..metrics import mean_sd
from ..train.recipes import TableRecipe


def aggregate(table: TableRecipe, metrics: dict[str, Any], members: list[Member],
              row_of: dict[Member, str], level: str | None = None) -> list[dict[str, Any]]:
    """One dict per row: {"row", "n", (head, figure): (mean, sd)} at `level` (the table's)."""
    level = level or table.level
    out = []
    for row, _ in table.rows:
        entries = [e for m, e in zip(members, metrics["members"])
                   if row_of[m] == row and "heads" in e]
        rec: dict[str, Any] = {"row": row, "n": len(entries)}
        heads = list(metrics["heads"])
        for h in heads:
            for fig in table.figures:
                rec[(h, fig)] = mean_sd(e["heads"][h][level].get(fig) for e in entries)
        out.append(rec)
    return out


def _cell(mean_sd) -> str:
    mean, sd = mean_sd
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def render(table: TableRecipe, heads: list[str], rows: list[dict[str, Any]],
           show_reference: bool) -> tuple[str, str, list[list[str]]]:
    """(plain text, markdown, csv rows) in the paper's layout: figures grouped by head."""
    header = ["model"] + [f"{h} {f.upper()}" for h in heads for f in table.figures]
    body = [[r["row"] + (f" (n={r['n']})" if r["n"] is not None else "")]
            + [_cell(r[(h, f)]) for h in heads for f in table.figures] for r in rows]
    if show_reference:
        for name, ref in table.reference.get("rows", {}).items():
            body.append([f"{name} [paper]"] + [
                f"{ref[h][f]:.3f}" if h in ref and f in ref[h] else "-"
                for h in heads for f in table.figures])
    text, md = layout(header, body)
    return text, md, [header, *body]


def layout(header: list[str], body: list[list[str]], align: str | None = None
           ) -> tuple[str, str]:
    """(aligned plain text, markdown) of a table: every text table the tool prints or writes.
    `align`: "l" or "r" per column; default the first column left, the others right."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                               for c, w, a in zip(line, widths, align)).rstrip()
                     for line in [header, *body])
    md = "\n".join(["| " + " | ".join(header) + " |",
                    "|" + "|".join("---" for _ in header) + "|",
                    *("| " + " | ".join(line) + " |" for line in body)])
    return text, md


def write_table(folder: Path, md: str, csv_rows: list[list[str]], title: str,
                stem: str = "table") -> None:
    (folder / f"{stem}.md").write_text(f"# {title}\n\n{md}\n")
    with open(folder / f"{stem}.csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows)


def aggregate_cv(table: TableRecipe, metrics: dict[str, Any], members: list[Member],
                 row_of: dict[Member, str], level: str) -> list[dict[str, Any]]:
    """Cross-validated rows: per fold, the mean over the row's seeds of their figures on the
    fold's clips; then mean ± sd over folds ("n" counts folds)."""
    out = []
    for row, _ in table.rows:
        ks = [k for k, m in enumerate(members) if row_of[m] == row]
        rec: dict[str, Any] = {"row": row, "n": metrics["cv"]["folds"]}
        for h in metrics["heads"]:
            for fig in table.figures:
                per_fold = []
                for f in range(metrics["cv"]["folds"]):
                    vals = [metrics["members"][k]["folds"][f][h][level].get(fig) for k in ks
                            if metrics["members"][k]["folds"][f] is not None]
                    vals = [v for v in vals if v is not None]
                    if vals:
                        per_fold.append(float(np.mean(vals)))
                rec[(h, fig)] = mean_sd(per_fold)
        out.append(rec)
    return out
