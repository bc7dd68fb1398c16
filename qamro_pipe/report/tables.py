"""The paper's tables as one batched job: every row (a loss setting) x N seeds trains as the
members of one model, then each figure is printed as mean ± sd over seeds, in the paper's
layout, beside the published figures when the dataset is the real one."""
from __future__ import annotations

import csv
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LossConfig, Member, check_seeds, check_used, override
from ..errors import QamroError
from .metrics import FIGURES
from ..train.recipes import find_recipe


@dataclass(frozen=True)
class TableRecipe:
    name: str
    model: str  # the model recipe whose heads, dataset and backbone every row trains
    rows: tuple[tuple[str, dict[str, Any]], ...]  # (row name, LossConfig settings)
    seeds: int = 5  # seeds per row (the paper's tables average 5 runs)
    level: str = "system"  # the level the figures are read at (utterance without systems)
    figures: tuple[str, ...] = FIGURES  # the columns of each head
    reference: dict[str, Any] = field(default_factory=dict)  # published figures
    presets: dict[str, str] = field(default_factory=dict)  # --preset NAME -> model recipe
    release_row: str | None = None  # label of a row scoring the released Audiobox-Aesthetics
    # model zero-shot from the cache (Table II's baseline), beside the trained rows
    path: Path | None = None


def load_table(name_or_path: str | Path) -> TableRecipe:
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
        rows = tuple((r.pop("name"), r) for r in (dict(r) for r in data["rows"]))
        given = {k: data[k] for k in ("seeds", "level", "reference", "presets",
                                      "release_row") if k in data}
        if "figures" in data:
            given["figures"] = tuple(data["figures"])
        table = TableRecipe(name=data.get("name", path.stem), model=data["model"], rows=rows,
                            path=path, **given)
    except (KeyError, TypeError, tomllib.TOMLDecodeError) as e:
        raise QamroError(f"{path}: not a table recipe ({e})") from None
    if table.level not in ("system", "utterance") or not set(table.figures) <= set(FIGURES):
        raise QamroError(f"{path}: level must be system or utterance, figures among "
                         f"{', '.join(FIGURES)}")
    check_seeds(table.seeds)
    return table


def table_members(table: TableRecipe, base: LossConfig, seeds: int) -> tuple[list[Member], dict]:
    """Every row x seeds 0..N-1. A row that sets what its loss kind does not use is refused:
    rows must differ in the loss alone, and say so in their settings."""
    check_seeds(seeds)
    members, row_of = [], {}
    for row, settings in table.rows:
        settings = dict(settings)
        if "loss" in settings:  # the recipe's word for LossConfig.kind
            settings["kind"] = settings.pop("loss")
        try:
            check_used([settings.get("kind", base.kind)], [k for k in settings if k != "kind"])
            loss = override(base, **settings)
        except QamroError as e:
            raise QamroError(f"{table.path}: row {row!r}: {e}") from None
        for s in range(seeds):
            m = Member(loss, s)
            if m in row_of:
                raise QamroError(f"{table.path}: rows {row_of[m]!r} and {row!r} are the same")
            row_of[m] = row
            members.append(m)
    return members, row_of


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
                vals = [e["heads"][h][level].get(fig) for e in entries]
                vals = [v for v in vals if v is not None]
                rec[(h, fig)] = (float(np.mean(vals)) if vals else None,
                                 float(np.std(vals, ddof=1)) if len(vals) > 1 else None)
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
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths)))
                     for line in [header, *body])
    md = "\n".join(["| " + " | ".join(header) + " |",
                    "|" + "|".join("---" for _ in header) + "|",
                    *("| " + " | ".join(line) + " |" for line in body)])
    return text, md, [header, *body]


def write_table(folder: Path, md: str, csv_rows: list[list[str]], title: str) -> None:
    (folder / "table.md").write_text(f"# {title}\n\n{md}\n")
    with open(folder / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows)


def model_of(table: TableRecipe, model: str | None, preset: str | None) -> str | None:
    """The model recipe a table trains: --model, or the table's recipe for --preset NAME
    (paper, code), or None for the table's own `model`."""
    if preset is None:
        return model
    if model is not None:
        raise QamroError("--model and --preset: give one (a preset names a model recipe)")
    if preset not in table.presets:
        raise QamroError(f"{table.path}: no preset {preset!r} (it has: "
                         f"{', '.join(table.presets) or 'none'})")
    return table.presets[preset]


def run_table(table: str | Path, model: str | None = None, cache: str | Path | None = None,
              seeds: int | None = None, out: str | Path | None = None, force: bool = False,
              train: dict[str, Any] | None = None, loss: dict[str, Any] | None = None,
              preset: str | None = None, **run_opts) -> dict[str, Any]:
    """Train every row x seed as one batched run; write table.md and table.csv beside it.
    `train` and `loss` override the model recipe's settings for every row (loss: norm and
    regression, which all rows share); `run_opts` go to run_experiment as they are. Without a
    system column the table is utterance-level. A table with a `release_row` also scores
    the released model zero-shot, where the cache's checkpoint can be read."""
    from ..config import cache_root
    from ..train.experiment import recipe_configs, run_experiment
    from ..train.recipes import select_recipe

    t = load_table(table)
    seeds = t.seeds if seeds is None else seeds  # 0 is refused, not read as "not given"
    recipe = select_recipe(model_of(t, model, preset), cache=cache, default=t.model)
    kinds = sorted({r.get("loss", recipe.loss.get("kind", LossConfig.kind)) for _, r in t.rows})
    tcfg, lcfg = recipe_configs(recipe, train, loss, kinds=kinds)
    members, row_of = table_members(t, lcfg, seeds)
    out = Path(out) if out else cache_root() / "runs" / f"{t.name}-{recipe.name}"
    folder, metrics, result, data = run_experiment(recipe, members, tcfg, cache, out, force,
                                                   **run_opts)
    level = t.level if metrics["system_level"]["computable"] else "utterance"
    rows = aggregate(t, metrics, members, row_of, level)
    notes = []
    if t.release_row:
        row, note = release_row(t, recipe, data, tcfg, result.split.eval, level)
        rows[:0] = [row] if row else []
        notes += [note] if note else []
    heads = [h.name for h in recipe.heads]
    real = (t.reference.get("dataset") == data.meta.dataset
            and data.meta.backbone.split("@")[0] == recipe.backbone)  # the paper's setting
    text, md, csv_rows = render(t, heads, rows, show_reference=real and level == t.level)
    title = (f"{t.name}: {recipe.name}, {level}-level on {metrics['eval_split']!r}, "
             f"mean ± sd over {seeds} seeds (validation: {metrics['validation']})")
    write_table(folder, md, csv_rows, title)
    return {"folder": folder, "title": title, "text": text, "result": result,
            "reference_shown": real, "metrics": metrics, "recipe": recipe, "notes": notes}


def release_row(table: TableRecipe, recipe, cache, tcfg, rows, level: str):
    """(the row of the released Audiobox-Aesthetics model scored zero-shot on `rows`, at
    `level`, or None; a note saying why there is none). The release is the checkpoint the
    cache was extracted with (or --release-checkpoint, the same file)."""
    from ..train.aes_release import clip_scores, read_release
    from ..train.runs import head_metrics

    try:
        rel = read_release(cache, tcfg.release_checkpoint)
        axis = rel.for_heads(recipe.heads)
    except QamroError as e:
        return None, f"no {table.release_row!r} row: {e}"
    scores = clip_scores(cache, {h: rel.heads[a] for h, a in axis.items()},
                         {h: rel.stats[a] for h, a in axis.items()})
    figures = head_metrics(cache, recipe.heads, scores, rows, tcfg.bootstrap,
                           " (released model)")
    out: dict[str, Any] = {"row": table.release_row, "n": None}
    for h in recipe.heads:
        for fig in table.figures:
            out[(h.name, fig)] = (figures[h.name][level].get(fig), None)
    return out, None
