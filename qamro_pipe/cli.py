"""The `qamro-pipe` command: parse options, call one library function, print.

Options default to None, meaning "not given": defaults live in config.py and recipes only."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import typer

from .config import DEFAULT_RECIPE
from .errors import Interrupted, QamroError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="QAMRO MOS prediction: extract embeddings once, train heads in seconds.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and manage cache files.")
app.add_typer(cache_app, name="cache")

_state = {"debug": False}


def command(group: typer.Typer = app, name: str | None = None):
    """Register a command whose QamroError becomes one line on stderr and exit code 1."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except QamroError as e:
                if _state["debug"]:
                    raise
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(130 if isinstance(e, Interrupted) else 1) from None
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None
        return group.command(name)(wrapper)
    return deco


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


def _table(metrics: dict[str, Any], level: str = "system") -> str:
    figs = ("mse", "lcc", "srcc", "ktau")
    lines = [f"{level}-level on {metrics['eval_split']!r} (validation: {metrics['validation']})",
             f"{'head':<12}" + "".join(f"{f.upper():>21}" for f in figs)]
    for head, levels in metrics["heads"].items():
        m = levels[level]
        cells = []
        for f in figs:
            v = m.get(f)
            if v is None:
                cells.append(f"{'-':>21}")
            elif m.get(f"{f}_std") is not None:
                cells.append(f"{v:.3f} ± {m[f'{f}_std']:.3f}".rjust(21))
            elif m.get(f"{f}_ci"):
                lo, hi = m[f"{f}_ci"]
                cells.append(f"{v:.3f} [{lo:.3f},{hi:.3f}]".rjust(21))
            else:
                cells.append(f"{v:>21.3f}")
        lines.append(f"{head:<12}" + "".join(cells))
    return "\n".join(lines)


def _warn_backbone(recipe, data) -> None:
    """A recipe names the backbone its heads were designed for; another one still trains."""
    used = data.meta.backbone.split("@")[0]
    if used != recipe.backbone:
        typer.echo(f"warning: recipe {recipe.name!r} is meant for {recipe.backbone} features; "
                   f"{data.path} holds {data.meta.backbone}", err=True)


def _train_overrides(**opts) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if v is not None}


def _watch(quiet: bool, desc: str):
    """The training progress display (None with --quiet)."""
    from .train.progress import TrainingProgress

    return None if quiet else TrainingProgress(desc)


def _cost(result) -> str:
    """One line: what training cost."""
    rate = result.member_epochs / max(result.seconds, 1e-9)
    resumed = f", resumed from epoch {result.resumed_from}" if result.resumed_from else ""
    return (f"{len(result.members)} member(s), {result.epochs_run} epochs, "
            f"{result.member_epochs:,} member-epochs in {result.seconds:.1f} s on "
            f"{result.device} ({rate:.1f} member-epochs/s{resumed})")


QUIET = typer.Option(False, "--quiet", help="No progress display.")
RESUME = typer.Option(False, "--resume", help="Continue an interrupted run from its saved "
                      "state (rerunning the same command does too); an error if there is none.")


@command()
def train(
    recipe: Optional[str] = typer.Option(None, help="Recipe name (qamro_pipe/stages/) or a .toml path "
                                         f"(default: {DEFAULT_RECIPE})."),
    dataset: Optional[str] = typer.Option(None, help="Use this dataset's recipe."),
    backbone: Optional[str] = typer.Option(None, help="Read cache/<dataset>/<backbone>.h5."),
    cache: Optional[Path] = typer.Option(None, help="Cache file (default: the recipe's)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: under the cache root)."),
    loss: Optional[str] = typer.Option(None, help="Ranking term: qamro, mr or none."),
    alpha: Optional[float] = typer.Option(None, help="QAMRO margin scale."),
    beta: Optional[float] = typer.Option(None, help="QAMRO quality preference (1 = off)."),
    margin: Optional[float] = typer.Option(None, help="Fixed margin of --loss mr."),
    norm: Optional[str] = typer.Option(None, help="Label normalisation for q: batch or range."),
    regression: Optional[str] = typer.Option(None, help="huber, mse or mse+mae."),
    seeds: Optional[int] = typer.Option(None, help="Train seeds 0..N-1 as batched members."),
    seed: Optional[int] = typer.Option(None, help="A single seed (instead of --seeds)."),
    val_split: Optional[str] = typer.Option(None, help="'holdout' or a split name ('dev' = "
                                            "the published code's protocol)."),
    eval_split: Optional[str] = typer.Option(None, help="Split the metrics are reported on."),
    max_epochs: Optional[int] = typer.Option(None),
    patience: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    activation: Optional[str] = typer.Option(None, help="relu, gelu or none (published)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    matmul_precision: Optional[str] = typer.Option(
        None, help="highest (fp32, default) or high (TF32 on GPUs that have it: faster, "
        "predictions move by ~1e-2; see docs/benchmarks.md)."),
    pair_kernel: Optional[str] = typer.Option(
        None, help="torch (default) or triton: the pair loss as one fused CUDA kernel."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
    quiet: bool = QUIET,
    resume: bool = RESUME,
):
    """Train QAMRO heads on a cache and write a run folder."""
    from .train.experiment import recipe_configs, run_experiment
    from .train.recipes import select_recipe
    from .train.sweep import expand_grid

    r = select_recipe(recipe, dataset, backbone)
    tcfg, lcfg = recipe_configs(
        r, _train_overrides(val_split=val_split, eval_split=eval_split, max_epochs=max_epochs,
                            patience=patience, lr=lr, batch_size=batch_size,
                            activation=activation, device=device,
                            matmul_precision=matmul_precision, pair_kernel=pair_kernel),
        _train_overrides(kind=loss, alpha=alpha, beta=beta, margin=margin, norm=norm,
                         regression=regression))
    seed_list = [seed] if seed is not None else (seeds if seeds is not None else 1)
    members = expand_grid(lcfg, {"seeds": seed_list})
    watch = _watch(quiet, "train")
    try:
        folder, metrics, result, data = run_experiment(r, members, tcfg, cache, out, force,
                                                       progress=watch, resume=resume)
    finally:
        watch and watch.close()
    _warn_backbone(r, data)
    typer.echo(_table(metrics))
    for msg in {**result.warnings, **result.failures}.values():
        typer.echo(f"warning: {msg}", err=True)
    typer.echo(f"run written to {folder}  ({_cost(result)})")


@command()
def sweep(
    recipe: Optional[str] = typer.Option(None, help="Recipe name (qamro_pipe/stages/) or a .toml path "
                                         f"(default: {DEFAULT_RECIPE})."),
    dataset: Optional[str] = typer.Option(None, help="Use this dataset's recipe."),
    backbone: Optional[str] = typer.Option(None, help="Read cache/<dataset>/<backbone>.h5."),
    grid: Optional[str] = typer.Option(None, help="A named grid of the recipe (e.g. beta)."),
    cache: Optional[Path] = typer.Option(None, help="Cache file (default: the recipe's)."),
    out: Optional[Path] = typer.Option(None, help="Sweep folder (default: under cache root)."),
    loss: Optional[str] = typer.Option(None, help="Comma list of qamro, mr, none."),
    alpha: Optional[str] = typer.Option(None, help="Comma list, e.g. 0.1,0.2."),
    beta: Optional[str] = typer.Option(None, help="Comma list, e.g. 1,3,5,7,9,11."),
    margin: Optional[str] = typer.Option(None, help="Comma list of fixed margins for mr."),
    seeds: Optional[int] = typer.Option(None, help="Seeds 0..N-1 per point."),
    val_split: Optional[str] = typer.Option(None),
    eval_split: Optional[str] = typer.Option(None),
    max_epochs: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    matmul_precision: Optional[str] = typer.Option(
        None, help="highest (fp32, default) or high (TF32 on GPUs that have it: faster, "
        "predictions move by ~1e-2; see docs/benchmarks.md)."),
    pair_kernel: Optional[str] = typer.Option(
        None, help="torch (default) or triton: the pair loss as one fused CUDA kernel."),
    force: bool = typer.Option(False, "--force", help="Replace an existing sweep folder."),
    quiet: bool = QUIET,
    resume: bool = RESUME,
):
    """Train a grid over (loss, alpha, beta, seed) as one batched model; table and plot."""
    from .train.experiment import recipe_configs, run_experiment
    from .train.recipes import select_recipe
    from .train.sweep import expand_grid, parse_list, sweep_rows

    r = select_recipe(recipe, dataset, backbone)
    tcfg, lcfg = recipe_configs(r, _train_overrides(
        val_split=val_split, eval_split=eval_split, max_epochs=max_epochs, device=device,
        matmul_precision=matmul_precision, pair_kernel=pair_kernel))
    g: dict[str, Any] = {}
    if grid:
        if grid not in r.grids:
            raise QamroError(f"recipe {r.name!r} has no grid {grid!r} "
                             f"(it has: {', '.join(r.grids) or 'none'})")
        g.update(r.grids[grid])
    given = {"loss": parse_list(loss, str), "alpha": parse_list(alpha),
             "beta": parse_list(beta), "margin": parse_list(margin), "seeds": seeds}
    g.update({k: v for k, v in given.items() if v is not None})
    members = expand_grid(lcfg, g)
    watch = _watch(quiet, "sweep")
    try:
        folder, metrics, result, data = run_experiment(r, members, tcfg, cache, out, force,
                                                       kind="sweep", progress=watch,
                                                       resume=resume)
    finally:
        watch and watch.close()
    _warn_backbone(r, data)
    rows = sweep_rows(metrics)
    typer.echo(_sweep_table(rows))
    typer.echo(f"trained as one model: {_cost(result)}")
    typer.echo(f"wrote {folder / 'sweep.csv'} and {folder / 'sweep.png'}")


def _sweep_table(rows: list[dict[str, Any]]) -> str:
    import numpy as np

    from .train.sweep import setting_order

    pts: dict[tuple, list] = {}
    for r in rows:
        if r.get("level") == "system" and r.get("srcc") is not None:
            pts.setdefault((r["loss"], r["alpha"], r["beta"], r["margin"], r["head"]),
                           []).append(r["srcc"])
    lines = [f"{'loss':<6}{'alpha':>7}{'beta':>6}{'margin':>8}  {'head':<10}"
             f"{'system SRCC (mean ± sd over seeds)':>36}"]
    def num(x):
        return "-" if x is None else f"{x:g}"

    def order(item):
        kind, a, b, m, head = item[0]
        return kind, *(setting_order(x) for x in (a, b, m)), head
    for (kind, a, b, m, head), v in sorted(pts.items(), key=order):
        sd = f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else ""
        lines.append(f"{kind:<6}{num(a):>7}{num(b):>6}{num(m):>8}  {head:<10}"
                     f"{np.mean(v):>28.3f}{sd} (n={len(v)})")
    return "\n".join(lines)


@command()
def extract(
    dataset: Optional[str] = typer.Option(None, help="musiceval, aes-natural or demo."),
    root: Optional[Path] = typer.Option(None, help="The dataset's folder."),
    manifest: Optional[Path] = typer.Option(None, help="A CSV/TSV/JSONL manifest instead."),
    splits: Optional[str] = typer.Option(None, help="Splits to read, e.g. train,dev,eval "
                                         "(musiceval: also test)."),
    eval_dir: Optional[Path] = typer.Option(None, help="The eval-phase package's DATA folder "
                                            "(default: found in or beside --root)."),
    lists: Optional[Path] = typer.Option(None, help="aes-natural: folder with the published "
                                         "lists, e.g. a clone of audiobox-aesthetics "
                                         "(default: --root)."),
    backbone: Optional[str] = typer.Option(None, help="clap-music, aesthetics or melstats."),
    checkpoint: Optional[str] = typer.Option(None, help="Backbone weights file."),
    tokenizer_dir: Optional[str] = typer.Option(None, help="Tokenizer files (offline CLAP)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (default: $QAMRO_CACHE_DIR "
                                             "or ./cache)."),
    out: Optional[Path] = typer.Option(None, help="Exact cache file path."),
    device: Optional[str] = typer.Option(None),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 or fp16."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes (0 = in-process)."),
    offline: Optional[bool] = typer.Option(None, "--offline/--online",
                                           help="Never touch the network."),
    skip_bad: Optional[bool] = typer.Option(None, "--skip-bad", help="List bad files in the "
                                            "cache and go on instead of stopping."),
    shard: Optional[str] = typer.Option(None, help="K/N: extract clips K, K+N, ... into "
                                        "NAME.part-K-of-N.h5 (join with `cache merge`)."),
    force: bool = typer.Option(False, "--force", help="Re-embed every clip, replacing a "
                               "qamro-pipe cache (never anything else)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Embed a dataset with a frozen backbone into one HDF5 cache (resumable). Under
    torchrun, each rank extracts a shard and rank 0 merges them."""
    from .config import ExtractConfig, override
    from .extract.loop import default_cache_path, extract as run_extract, records_for, summary_text

    cfg = override(ExtractConfig(), backbone=backbone, checkpoint=checkpoint,
                   tokenizer_dir=tokenizer_dir, device=device, precision=precision,
                   batch_size=batch_size, workers=workers, offline=offline, skip_bad=skip_bad)
    from .extract.shards import extract_distributed, parse_shard, torchrun_rank

    records = records_for(dataset, root, manifest, splits, eval_dir, lists)
    for note in records.notes:
        typer.echo(f"note: {note}", err=True)
    path = out or default_cache_path(records.name, cfg.backbone, cache_dir)
    if shard is None and torchrun_rank():
        rank, summary = extract_distributed(records, cfg, path, force, progress=not quiet)
        if rank == 0:
            typer.echo(summary_text(summary) + f"\nmerged all shards into {path}")
        return
    summary = run_extract(records, cfg, path, force=force, progress=not quiet,
                          shard=parse_shard(shard) if shard else None)
    typer.echo(summary_text(summary))


@command()
def demo(quiet: bool = typer.Option(False, "--quiet", help="No progress bar.")):
    """Offline demo: synthetic corpus -> melstats cache -> QAMRO run -> beta sweep."""
    from .demo import run_demo
    from .extract.loop import summary_text

    out = run_demo(progress=not quiet)
    typer.echo(summary_text(out["extract"]))
    folder, metrics, result, _ = out["run"]
    typer.echo(_table(metrics))
    typer.echo(f"run written to {folder}  ({result.seconds:.1f} s)")
    typer.echo(_sweep_table(out["sweep_rows"]))
    typer.echo(f"sweep written to {out['sweep'][0]} (sweep.csv, sweep.png)")
    typer.echo("note: the demo corpus and its scores are synthetic (designed degradations "
               "plus simulated raters), not human ratings.")


@command()
def evaluate(
    run: Path = typer.Argument(..., help="A run folder."),
    split: Optional[str] = typer.Option(None, help="Split to score (default: the run's "
                                        "eval split)."),
    cache: Optional[Path] = typer.Option(None, help="Cache (default: the run's own)."),
):
    """Re-score a trained run on a cache split: utterance and system level, 95% CIs."""
    from .report.evaluate import TrainedRun, evaluate_run

    split = split or TrainedRun(run).train_cfg.eval_split
    folder, metrics = evaluate_run(run, split, cache)
    for level in ("utterance", "system"):
        typer.echo(_table({**metrics, "heads": {h: {level: m[level]}
                                                for h, m in metrics["heads"].items()}}, level))
    typer.echo(f"wrote {folder / 'metrics.json'}")


@command()
def predict(
    run: Path = typer.Argument(..., help="A run folder."),
    audio: Optional[list[Path]] = typer.Argument(None, help="Audio files to score."),
    manifest: Optional[Path] = typer.Option(None, help="CSV/JSONL manifest (id, path, text)."),
    text: Optional[str] = typer.Option(None, help="Prompt for every file (textual heads)."),
    out: Optional[Path] = typer.Option(None, help="Write scores to .csv or .jsonl."),
    answer: Optional[Path] = typer.Option(None, help="Write the AudioMOS submission format."),
    checkpoint: Optional[str] = typer.Option(None, help="Backbone weights (default: the "
                                             "run's)."),
    tokenizer_dir: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
):
    """Score new audio end to end with a run's backbone and heads."""
    from .predict import predict as run_predict, write_answer, write_scores

    heads, rows, failures = run_predict(run, audio, manifest, text, checkpoint=checkpoint,
                                        tokenizer_dir=tokenizer_dir, device=device)
    for why in failures.values():
        typer.echo(f"error: {why}", err=True)
    if out:
        write_scores(out, heads, rows)
    if answer:
        write_answer(answer, heads, rows)
    if not out and not answer:
        typer.echo(",".join(["id", *heads]))
        for r in rows:
            typer.echo(",".join([r["id"], *(f"{r[h]:.4f}" for h in heads)]))
    typer.echo(f"scored {len(rows)} file(s), {len(failures)} failed", err=True)
    if failures:
        raise typer.Exit(1)


@command()
def table(
    recipe: str = typer.Option("table1", help="A table recipe name (table1, table2) or .toml path."),
    model: Optional[str] = typer.Option(None, help="Model recipe (default: the table's)."),
    cache: Optional[Path] = typer.Option(None),
    seeds: Optional[int] = typer.Option(None, help="Seeds per row (default: the table's)."),
    out: Optional[Path] = typer.Option(None),
    max_epochs: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    force: bool = typer.Option(False, "--force", help="Replace an existing table folder."),
    quiet: bool = QUIET,
    resume: bool = RESUME,
):
    """The paper's ablation rows as one batched job, printed in the paper's layout."""
    from .report.tables import run_table

    watch = _watch(quiet, "table")
    try:
        res = run_table(recipe, model, cache, seeds, out, force,
                        _train_overrides(max_epochs=max_epochs, device=device), progress=watch,
                        resume=resume)
    finally:
        watch and watch.close()
    typer.echo(res["title"])
    typer.echo(res["text"])
    if not res["reference_shown"]:
        typer.echo("(the paper's figures are shown only for its dataset and backbone)")
    typer.echo(f"wrote {res['folder'] / 'table.md'} and table.csv ({_cost(res['result'])})")


@command(cache_app, "info")
def cache_info(path: Path = typer.Argument(..., help="A cache .h5 file.")):
    """What is in a cache: counts per split, features and shapes, provenance."""
    from .store.reader import describe

    typer.echo(describe(path))


@command(cache_app, "merge")
def cache_merge(
    parts: list[Path] = typer.Argument(..., help="NAME.part-K-of-N.h5 files, all N of them."),
    out: Path = typer.Option(..., help="The merged cache file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing qamro-pipe cache "
                               "(never anything else)."),
):
    """Join the shards of an extraction into the cache one process would have written."""
    from .extract.shards import merge_parts

    typer.echo(f"merged {len(parts)} shards into {merge_parts(parts, out, force)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
