"""The paper's tables as one batched job: every row (a loss setting) x N seeds trains as the
members of one model; the rows are then rendered (report/tables.py) in the paper's layout,
beside the published figures when the dataset is the real one, with a linear-probe row
first and, where the table names one, every row compared with its `compare` row."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LossConfig, Member, TrainConfig, cache_root, check_seeds, check_used, override
from ..errors import QamroError
from ..metrics import mean_sd
from ..report.compare import comparison, render_comparison
from ..report.tables import aggregate, aggregate_cv, render, write_table
from ..store.reader import read_meta
from ..train.aes_release import clip_scores, read_release
from ..train.inputs import units_for
from ..train.probe import PROBE_ROW, probe, probe_metrics, train_rows
from ..train.recipes import Recipe, TableRecipe, load_table, select_recipe
from ..train.runs import head_metrics
from .cv import make_folds
from .folder import Staged
from .run import prepare, recipe_configs, stage


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


def without_pair_rows(t: TableRecipe, tcfg: TrainConfig) -> tuple[TableRecipe, str | None]:
    """Without a pairs file (--pairs), the rows trained on preference pairs (a pair_weight)
    are left out, with a note naming them; the other rows are the table as before."""
    left = [row for row, settings in t.rows if settings.get("pair_weight")]
    if tcfg.pairs or not left:
        return t, None
    return (replace(t, rows=tuple((row, s) for row, s in t.rows if row not in left)),
            f"row(s) {', '.join(repr(r) for r in left)} train on preference pairs: left out "
            f"(give a pairs file with --pairs FILE; docs/beyond.md)")


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


@dataclass(frozen=True)
class TableResult:
    """A table trained and written: what the CLI prints of it."""

    folder: Path
    title: str
    text: str  # the table(s) as plain text, and the comparison where there is one
    reference_shown: bool  # the paper's published figures are among the rows
    compared: bool  # compare.md/.csv/.json were written
    metrics: dict[str, Any]
    result: Any
    recipe: Recipe
    notes: list[str]


def probe_rows(data, heads, tcfg, cv, table: TableRecipe, level: str):
    """The linear-probe row (train/probe.py) on the eval split; under --cv, fold by fold
    (mean ± sd over folds) and, second, of its pooled out-of-fold predictions (None
    without --cv). -> (row, pooled row, what probe.json records)."""
    if cv is None:
        fits = [(train_rows(data), data.rows(tcfg.eval_split))]
    else:
        folds = make_folds(data, heads, tcfg, cv)
        fits = [(folds.train_rows(f), folds.held_out[f]) for f in range(cv.folds)]
    per_fit, record = [], {"row": PROBE_ROW, "model": "StandardScaler + RidgeCV",
                           "fits": []}
    features: dict = {}
    oof = {h.name: np.full(len(data.ids), np.nan) for h in heads}
    for fit_rows, eval_rows in fits:
        fitted = probe(data, heads, fit_rows, features=features)
        figures = probe_metrics(data, heads, fitted, eval_rows,
                                tcfg.bootstrap if cv is None else 0, tcfg)
        for h in heads:
            oof[h.name][eval_rows] = fitted["predictions"][h.name][eval_rows]
        per_fit.append(figures)
        record["fits"].append({"fit_clips": len(fit_rows), "eval_clips": len(eval_rows),
                               "alpha": fitted["alpha"], "alpha_at_grid_edge": fitted["at_edge"],
                               "seconds": fitted["seconds"], "heads": figures})
    row = _probe_row(per_fit, heads, table, level)
    if cv is None:
        return row, None, record
    record["pooled"] = probe_metrics(data, heads, {"predictions": oof}, folds.pool,
                                     tcfg.bootstrap, tcfg)
    return row, _probe_row([record["pooled"]], heads, table, level), record


def _probe_row(per_fit: list[dict], heads, table: TableRecipe, level: str) -> dict[str, Any]:
    row: dict[str, Any] = {"row": PROBE_ROW, "n": len(per_fit)}
    for h in heads:
        for fig in table.figures:
            vals = [m[h.name][level].get(fig) for m in per_fit]
            row[(h.name, fig)] = mean_sd([v for v in vals if v is not None])
    return row


def compare_table(folder: Path, t: TableRecipe, metrics, data, recipe, members, row_of,
                  seeds: int, tcfg, level: str) -> str:
    """compare.md, .csv and .json: every row against the table's `compare` row, system-level
    paired bootstrap (report/compare.py). -> the text to print."""
    if level != "system":
        return f"(no comparison with {t.compare!r}: it needs system-level figures)"
    result = comparison(folder, data, recipe.heads, members, row_of, [r for r, _ in t.rows],
                        t.compare, metrics["eval_split"], tcfg.bootstrap or 1000)
    text, md, rows, footer = render_comparison(result, t.compare, seeds,
                                               metrics["eval_split"])
    title = f"{t.name}: every row against {t.compare!r}, system-level paired bootstrap"
    write_table(folder, md, [*rows, [footer]], title, stem="compare")
    (folder / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    return f"{title}\n{text}"


def table_name(table: str, recipe: Recipe, cache, cv) -> str:
    """TABLE-RECIPE-BACKBONE[-cvK-GROUP]: a table of another cache's backbone or of a
    cross-validation gets a folder of its own."""
    backbone = read_meta(Path(cache) if cache else recipe.default_cache()).backbone
    name = f"{table}-{recipe.name}-{backbone.split('@')[0]}"
    return name + (f"-cv{cv.folds}-{cv.group}" if cv is not None else "")


def run_table(table: str | Path, model: str | None = None, cache: str | Path | None = None,
              seeds: int | None = None, out: str | Path | None = None, force: bool = False,
              train: dict[str, Any] | None = None, loss: dict[str, Any] | None = None,
              preset: str | None = None, **run_opts) -> TableResult:
    """Train every row x seed as one batched run; write table.md, table.csv and probe.json
    into its folder before it is published. `train` and `loss` override the model recipe's
    settings for every row (loss: norm and regression, which all rows share); `run_opts` go
    to run.prepare as they are (`cv`: every row cross-validated). A linear-probe row
    (train/probe.py) on the same features comes first. Without a system column the table is
    utterance-level. A table with a `release_row` also scores the released model zero-shot,
    where the cache's checkpoint can be read (not under --cv: the release is not trained
    per fold)."""
    t = load_table(table)
    seeds = t.seeds if seeds is None else seeds  # 0 is refused, not read as "not given"
    recipe = select_recipe(model_of(t, model, preset), cache=cache, default=t.model)
    kinds = sorted({r.get("loss", recipe.loss.get("kind", LossConfig.kind)) for _, r in t.rows})
    tcfg, lcfg = recipe_configs(recipe, train, loss, kinds=kinds, pair_default=False)
    t, pair_note = without_pair_rows(t, tcfg)
    members, row_of = table_members(t, lcfg, seeds)
    cv = run_opts.get("cv")
    out = Path(out) if out else cache_root() / "runs" / table_name(t.name, recipe, cache, cv)
    job = prepare(recipe, members, tcfg, cache, out, force, **run_opts)
    t, members, left_out = servable_rows(t, job.data, recipe, members, row_of)
    left_out[:0] = [pair_note] if pair_note else []
    job = replace(job, members=members)
    with stage(job) as staged:
        made = write_table_files(staged, t, recipe, tcfg, job.cv, seeds, members, row_of,
                                 left_out)
    return made


def servable_rows(t: TableRecipe, data, recipe: Recipe, members: list[Member], row_of: dict
                  ) -> tuple[TableRecipe, list[Member], list[str]]:
    """The rows this cache can train: a row that pools windows by attention needs per-window
    features (a demo or CLAP cache extracted without --keep-windows has none); such a row
    is left out with a note saying why, rather than the whole table refused."""
    left, notes = set(), []
    for row, settings in t.rows:
        pool = settings.get("pool", LossConfig.pool)
        if pool == "mean":
            continue
        try:
            units_for(data, recipe.heads, pool)
        except QamroError as e:
            left.add(row)
            notes.append(f"row {row!r} left out: {e}")
    if not left:
        return t, members, notes
    if t.compare in left:
        raise QamroError(f"{t.path}: the row every other is compared with, {t.compare!r}, "
                         f"cannot be trained on {data.path}: {notes[0]}")
    kept = [m for m in members if row_of[m] not in left]
    return replace(t, rows=tuple(r for r in t.rows if r[0] not in left)), kept, notes


def write_table_files(staged: Staged, t: TableRecipe, recipe: Recipe, tcfg: TrainConfig, cv,
                      seeds: int, members: list[Member], row_of: dict,
                      left_out: list[str] = ()) -> TableResult:
    """table.md/.csv (and table-pooled under --cv), probe.json and compare.* into the staged
    run folder; `left_out` says which rows of the recipe are not in it, and why (table.md
    too)."""
    folder, metrics, data = staged.folder, staged.metrics, staged.data
    level = t.level if metrics["system_level"]["computable"] else "utterance"
    probe, pooled_probe, record = probe_rows(data, recipe.heads, tcfg, cv, t, level)
    heads = [h.name for h in recipe.heads]
    real = (t.reference.get("dataset") == data.meta.dataset
            and data.meta.backbone.split("@")[0] == recipe.backbone)  # the paper's setting
    if cv is None:
        rows = aggregate(t, metrics, members, row_of, level)
        spread = f"on {metrics['eval_split']!r}, mean ± sd over {seeds} seeds"
    else:  # per fold first; the pooled out-of-fold figures follow
        rows = aggregate_cv(t, metrics, members, row_of, level)
        spread = (f"{cv.folds}-fold cross-validation grouped by {cv.group} over "
                  f"{metrics['eval_split']}: mean ± sd over folds, each the mean of "
                  f"{seeds} seeds")
    title = (f"{t.name}: {recipe.name}, {level}-level {spread} (validation: "
             f"{metrics['validation']})")
    notes = list(left_out)
    if t.release_row and cv is None:
        row, note = zero_shot_row(t, recipe, data, tcfg, data.rows(tcfg.eval_split), level)
        rows[:0] = [row] if row else []
        notes += [note] if note else []
    shown = real and level == t.level and cv is None
    text, md, csv_rows = render(t, heads, [probe, *rows], show_reference=shown)
    md += "".join(f"\n\nNote: {n}" for n in left_out)
    write_table(folder, md, csv_rows, title)
    if cv is not None:  # per member, the figures of its pooled predictions
        title2 = (f"the same rows, {level}-level of the pooled out-of-fold predictions "
                  f"(every clip scored by the fold that did not train on it): mean ± sd "
                  f"over {seeds} seeds")
        text2, md2, csv2 = render(t, heads, [pooled_probe, *aggregate(
            t, metrics, members, row_of, level)], show_reference=False)
        write_table(folder, md2, csv2, title2, stem="table-pooled")
        text = f"{text}\n\n{title2}\n{text2}"
    (folder / "probe.json").write_text(json.dumps(record, indent=2) + "\n")
    compared = False
    if t.compare and cv is None:
        text += "\n\n" + compare_table(folder, t, metrics, data, recipe, members, row_of,
                                       seeds, tcfg, level)
        compared = (folder / "compare.md").exists()
    elif t.compare:
        text += f"\n\n(no comparison with {t.compare!r} under --cv: it resamples the eval " \
                f"split's systems)"
    return TableResult(staged.out, title, text, shown, compared, metrics, staged.result,
                       recipe, notes)


def zero_shot_row(table: TableRecipe, recipe, cache, tcfg, rows, level: str):
    """(the row of the released Audiobox-Aesthetics model scored zero-shot on `rows`, at
    `level`, or None; a note saying why there is none). The release is the checkpoint the
    cache was extracted with (or --release-checkpoint, the same file)."""
    try:
        rel = read_release(cache, tcfg.release_checkpoint)
        axis = rel.for_heads(recipe.heads)
    except QamroError as e:
        return None, f"no {table.release_row!r} row: {e}"
    scores = clip_scores(cache, {h: rel.heads[a] for h, a in axis.items()},
                         {h: rel.stats[a] for h, a in axis.items()})
    figures = head_metrics(cache, recipe.heads, scores, rows, tcfg.bootstrap,
                           " (released model)", tcfg)
    out: dict[str, Any] = {"row": table.release_row, "n": None}
    for h in recipe.heads:
        for fig in table.figures:
            out[(h.name, fig)] = (figures[h.name][level].get(fig), None)
    return out, None
