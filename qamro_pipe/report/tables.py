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
from ..store.reader import read_meta


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
    compare: str | None = None  # a row the others are compared with (report/compare.py)
    path: Path | None = None


def load_table(name_or_path: str | Path) -> TableRecipe:
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
        rows = tuple((r.pop("name"), r) for r in (dict(r) for r in data["rows"]))
        given = {k: data[k] for k in ("seeds", "level", "reference", "presets",
                                      "release_row", "compare") if k in data}
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
    if table.compare is not None and table.compare not in [r for r, _ in table.rows]:
        raise QamroError(f"{path}: compare = {table.compare!r} names no row")
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
    text, md = layout(header, body)
    return text, md, [header, *body]


def layout(header: list[str], body: list[list[str]]) -> tuple[str, str]:
    """(aligned plain text, markdown) of a table: the first column left, the others right."""
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths)))
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
                rec[(h, fig)] = _mean_sd(per_fold)
        out.append(rec)
    return out


def _mean_sd(vals: list[float]) -> tuple[float | None, float | None]:
    return (float(np.mean(vals)) if vals else None,
            float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def probe_rows(data, heads, tcfg, cv, table: TableRecipe, level: str):
    """The linear-probe row (train/probe.py) on the eval split; under --cv, fold by fold
    (mean ± sd over folds) and, second, of its pooled out-of-fold predictions (None
    without --cv). -> (row, pooled row, what probe.json records)."""
    from ..train.probe import PROBE_ROW, probe, probe_metrics, train_rows

    if cv is None:
        fits = [(train_rows(data), data.rows(tcfg.eval_split))]
    else:
        from ..train.cv import make_folds

        folds = make_folds(data, heads, tcfg, cv)
        fits = [(folds.train_rows(f), folds.held_out[f]) for f in range(cv.folds)]
    per_fit, record = [], {"row": PROBE_ROW, "model": "StandardScaler + RidgeCV",
                           "fits": []}
    features: dict = {}
    oof = {h.name: np.full(len(data.ids), np.nan) for h in heads}
    for fit_rows, eval_rows in fits:
        fitted = probe(data, heads, fit_rows, features=features)
        figures = probe_metrics(data, heads, fitted, eval_rows,
                                tcfg.bootstrap if cv is None else 0)
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
                                     tcfg.bootstrap)
    return row, _probe_row([record["pooled"]], heads, table, level), record


def _probe_row(per_fit: list[dict], heads, table: TableRecipe, level: str) -> dict[str, Any]:
    from ..train.probe import PROBE_ROW

    row: dict[str, Any] = {"row": PROBE_ROW, "n": len(per_fit)}
    for h in heads:
        for fig in table.figures:
            vals = [m[h.name][level].get(fig) for m in per_fit]
            row[(h.name, fig)] = _mean_sd([v for v in vals if v is not None])
    return row


def compare_table(folder: Path, t: TableRecipe, metrics, data, recipe, members, row_of,
                  seeds: int, tcfg, level: str) -> str:
    """compare.md, .csv and .json: every row against the table's `compare` row, system-level
    paired bootstrap (report/compare.py). -> the text to print."""
    import json

    from .compare import comparison, render_comparison

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


def table_name(table: str, recipe, cache, cv) -> str:
    """TABLE-RECIPE-BACKBONE[-cvK-GROUP]: a table of another cache's backbone or of a
    cross-validation gets a folder of its own."""
    backbone = read_meta(Path(cache) if cache else recipe.default_cache()).backbone
    name = f"{table}-{recipe.name}-{backbone.split('@')[0]}"
    return name + (f"-cv{cv.folds}-{cv.group}" if cv is not None else "")


def run_table(table: str | Path, model: str | None = None, cache: str | Path | None = None,
              seeds: int | None = None, out: str | Path | None = None, force: bool = False,
              train: dict[str, Any] | None = None, loss: dict[str, Any] | None = None,
              preset: str | None = None, **run_opts) -> dict[str, Any]:
    """Train every row x seed as one batched run; write table.md, table.csv and probe.json
    into its folder. `train` and `loss` override the model recipe's settings for every row
    (loss: norm and regression, which all rows share); `run_opts` go to run_experiment as
    they are (`cv`: every row cross-validated). A linear-probe row (train/probe.py) on the
    same features comes first. Without a system column the table is utterance-level. A table
    with a `release_row` also scores the released model zero-shot, where the cache's
    checkpoint can be read (not under --cv: the release is not trained per fold)."""
    import json

    from ..config import cache_root
    from ..train.experiment import recipe_configs, run_experiment
    from ..train.recipes import select_recipe

    t = load_table(table)
    seeds = t.seeds if seeds is None else seeds  # 0 is refused, not read as "not given"
    recipe = select_recipe(model_of(t, model, preset), cache=cache, default=t.model)
    kinds = sorted({r.get("loss", recipe.loss.get("kind", LossConfig.kind)) for _, r in t.rows})
    tcfg, lcfg = recipe_configs(recipe, train, loss, kinds=kinds)
    members, row_of = table_members(t, lcfg, seeds)
    cv = run_opts.get("cv")
    out = Path(out) if out else cache_root() / "runs" / table_name(t.name, recipe, cache, cv)
    made: dict[str, Any] = {}

    def write(folder: Path, metrics: dict[str, Any], data) -> None:  # before the rename
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
        notes = []
        if t.release_row and cv is None:
            row, note = release_row(t, recipe, data, tcfg, data.rows(tcfg.eval_split),
                                    level)
            rows[:0] = [row] if row else []
            notes += [note] if note else []
        text, md, csv_rows = render(t, heads, [probe, *rows],
                                    show_reference=real and level == t.level and cv is None)
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
        if t.compare and cv is None:
            text += "\n\n" + compare_table(folder, t, metrics, data, recipe, members, row_of,
                                           seeds, tcfg, level)
        elif t.compare:
            text += f"\n\n(no comparison with {t.compare!r} under --cv: it resamples the eval " \
                    f"split's systems)"
        made.update(title=title, text=text, shown=real and level == t.level and cv is None,
                    notes=notes)

    folder, metrics, result, data = run_experiment(recipe, members, tcfg, cache, out, force,
                                                   extra=write, **run_opts)
    return {"folder": folder, "title": made["title"], "text": made["text"], "result": result,
            "reference_shown": made["shown"], "metrics": metrics, "recipe": recipe,
            "notes": made["notes"]}


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
