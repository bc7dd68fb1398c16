"""The `qamro-pipe` command: parse options, call one library function, print.

Options default to None, meaning "not given": defaults live in config.py and recipes only;
--help shows them (cli_options.py reads them from the dataclasses). Settings are checked by
the library (config.py's dataclasses) before any work; this module only reports.

Each command imports the library it calls inside its body, not at the top: those modules
import torch, h5py or scipy (seconds), which `--help` and a refused path or setting should
never wait for (precheck.py answers those first). The imports say so: `# on use`."""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Optional

import typer

from . import __version__
from .cli_options import (
    DATA,
    LOSS,
    MODEL,
    MODEL_CHECKPOINT,
    MODEL_DEVICE,
    MODEL_MEMBERS,
    MODEL_TOKENIZER,
    OUTPUT,
    RUN_OPTIONS,
    cfg_opt,
    default_of,
    opt,
    run_args,
    train_settings,
    with_options,
)
from .config import (
    DEFAULT_RECIPE,
    DEFAULT_TABLE,
    DEVICE_HELP,
    EXTRACT_BATCH,
    ExtractConfig,
    LossConfig,
    override,
)
from .errors import Interrupted, QamroError
from .loss_kinds import LOSS_KINDS, kinds_help
from .precheck import check_cache_file, check_run_folder, check_run_options
from .untrusted import os_problem, printable

HELP = ("QAMRO MOS prediction: extract embeddings once, train heads in seconds.\n\n"
        "Start here: `qamro-pipe extract` embeds a dataset into a cache; `qamro-pipe train` "
        "learns heads on it; `evaluate` and `predict` use the run. `make demo` does all of it "
        "offline.\n\nDefaults shown come from qamro_pipe/config.py and the recipe; "
        "`COMMAND -h` lists a command's options.")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP,
                  rich_markup_mode="markdown",  # paragraphs reflow to the terminal
                  context_settings={"help_option_names": ["-h", "--help"]})
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and join cache files.")

_state = {"debug": False}


def _echo(message: Any = "", err: bool = False, nl: bool = True) -> None:
    """Every line the command prints goes through here: names read from files (datasets,
    labels, systems, ids) cannot carry terminal escapes to the screen."""
    typer.echo(None if message is None else printable(message), err=err, nl=nl)


def _debug_switch(kw: dict[str, Any]) -> None:
    if kw.get("debug"):
        _state["debug"] = True


# commands are listed as a user meets them: panels in this order, commands in theirs
EMBED, TRAIN, USE, DEMO = ("1. Embed audio (start here)", "2. Train heads",
                           "3. Use a trained run", "Offline demo")


def command(group: typer.Typer = app, name: str | None = None,
            shared: dict[str, tuple[Any, Any]] | None = None, panel: str | None = None):
    """Register a command whose QamroError becomes one line on stderr and exit code 1. It
    takes --debug after its name too, and the `shared` options as one dict `opts`."""
    def deco(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except QamroError as e:
                if _state["debug"]:
                    raise
                # Ctrl-C is the user's choice, not an error: its message says what was kept
                _echo(str(e) if isinstance(e, Interrupted) else f"error: {e}", err=True)
                raise typer.Exit(130 if isinstance(e, Interrupted) else 1) from None
            except KeyboardInterrupt:
                _echo("interrupted", err=True)
                raise typer.Exit(130) from None
            except OSError as e:  # a full disk, a read-only folder: one line, as the OS says
                if _state["debug"]:
                    raise
                _echo(f"error: {os_problem(e)}", err=True)
                raise typer.Exit(1) from None
        typed = with_options(guarded, shared or {}, "opts" if shared else None, _debug_switch)
        return group.command(name, rich_help_panel=panel)(typed)
    return deco


def _version(value: bool) -> None:
    if value:
        _echo(f"qamro-pipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", metavar="",
                                     help="Show tracebacks on errors."),
          version: Optional[bool] = typer.Option(None, "--version", callback=_version, metavar="",
                                                 is_eager=True, help="Print the version.")):
    _state["debug"] = debug


def _note(text: str | None) -> None:
    if text:
        _echo(text, err=True)


def _warn_backbone(recipe, data) -> None:
    """A recipe names the backbone its heads were designed for; another one still trains."""
    used = data.meta.backbone.split("@")[0]
    if used != recipe.backbone:
        _echo(f"warning: recipe {recipe.name!r} is meant for {recipe.backbone} features; "
              f"{data.path} holds {data.meta.backbone}", err=True)


def _split_notes(metrics) -> None:
    """Where the figures come from, when that is not the split the user would assume."""
    if metrics.get("eval_holdout"):
        _note(f"note: {metrics['eval_holdout']['text']}")
    if metrics.get("pairs"):
        _note(f"note: {metrics['pairs']['note']}")
    for msg in metrics.get("warnings", []):
        _echo(f"warning: {msg}", err=True)


def _report_run(recipe, metrics, result, data) -> None:
    from .report.screen import metrics_table, pooled_table, system_level_line  # on use

    _warn_backbone(recipe, data)
    _split_notes(metrics)
    _echo(metrics_table(metrics))
    if "pooled" in metrics:
        _echo(pooled_table(metrics))
    _note(system_level_line(metrics))
    for msg in {**result.warnings, **result.failures}.values():
        _echo(f"warning: {msg}", err=True)


@contextlib.contextmanager
def _watch(opts: dict[str, Any], desc: str):
    """The training progress display for the run (None with --quiet), closed after it."""
    from .train.progress import TrainingProgress  # on use

    display = None if opts["quiet"] else TrainingProgress(desc)
    try:
        yield display
    finally:
        if display is not None:
            display.close()


def _kept(folder) -> None:
    """Where --force kept a replaced run that held more than a run writes (evaluations/)."""
    from .train.runs import kept_note  # torch: only once a run is written

    _note(kept_note(folder))


def _cost(result) -> str:
    """One line: what training cost."""
    rate = result.member_epochs / max(result.seconds, 1e-9)
    resumed = f", resumed from epoch {result.resumed_from}" if result.resumed_from else ""
    return (f"{len(result.members)} member(s), {result.epochs_run} epochs, "
            f"{result.member_epochs:,} member-epochs in {result.seconds:.1f} s on "
            f"{result.device} ({rate:.1f} member-epochs/s{resumed})")


_RECIPE_HELP = "Model recipe: a name in stages/ (shipped) or a .toml path (docs/recipes.md)."
_RECIPE_DEFAULT = (f"{DEFAULT_RECIPE}; a --cache of another dataset gets that dataset's recipe "
                   f"or one derived from the cache")


# -- stage 1 --------------------------------------------------------------------------------
@command(panel=EMBED)
def extract(
    dataset: Optional[str] = opt("Dataset layout: musiceval, aes-natural or demo (with --root); "
                                 "for your own clips use --manifest.", rich_help_panel=DATA),
    root: Optional[Path] = opt("The dataset's folder.", "CACHE_ROOT/demo-corpus for demo",
                               rich_help_panel=DATA),
    manifest: Optional[Path] = opt("A CSV/TSV/JSONL manifest (id, path; optional system, text, "
                                   "split, start, end; other columns are scores).",
                                   rich_help_panel=DATA),
    splits: Optional[str] = opt("Splits to read, comma-separated, e.g. train,dev,eval "
                                "(musiceval: also test).", "the dataset's, those present",
                                rich_help_panel=DATA),
    eval_dir: Optional[Path] = opt("The eval-phase package's DATA folder.",
                                   "found in or beside --root", rich_help_panel=DATA),
    lists: Optional[Path] = opt("aes-natural: the folder with the published lists, e.g. a "
                                "clone of audiobox-aesthetics.", "--root", rich_help_panel=DATA),
    label_range: Optional[str] = opt("--manifest: the scores' scale LO,HI (e.g. 1,5): a score "
                                     "outside it is refused with its file and line; recorded "
                                     "for --norm range and --loss gaussian-kl.", "unchecked",
                                     rich_help_panel=DATA),
    backbone: Optional[str] = cfg_opt(ExtractConfig, "backbone", "Frozen model: clap-music, "
                                      "aesthetics, muq or melstats (no download).", recipe=False,
                                      rich_help_panel=MODEL),
    checkpoint: Optional[str] = opt("Backbone weights file.", "the release file, downloaded "
                                    "once into ~/.cache/qamro-pipe", rich_help_panel=MODEL),
    tokenizer_dir: Optional[str] = opt("roberta-base tokenizer files (CLAP text, offline).",
                                       "downloaded when online", rich_help_panel=MODEL),
    cache_dir: Optional[Path] = opt("Cache root.", "$QAMRO_CACHE_DIR or ./cache",
                                    rich_help_panel=OUTPUT),
    out: Optional[Path] = opt("Exact cache file path.", "CACHE_ROOT/DATASET/BACKBONE.h5",
                              rich_help_panel=OUTPUT),
    device: Optional[str] = cfg_opt(ExtractConfig, "device", f"{DEVICE_HELP}.", recipe=False,
                                    rich_help_panel=MODEL),
    precision: Optional[str] = cfg_opt(ExtractConfig, "precision", "fp32, bf16 or fp16 "
                                       "(recorded in the cache).", recipe=False,
                                       rich_help_panel=MODEL),
    batch_size: Optional[int] = opt("Windows per forward pass (>= 1).", ", ".join(
        f"{n} on {d}" for d, n in EXTRACT_BATCH.items()), rich_help_panel=MODEL),
    workers: Optional[int] = opt("Decoding processes (0 = in this process).",
                                 "2 on a CPU, more on a GPU (extract.loop.auto_workers)",
                                 rich_help_panel=MODEL),
    offline: Optional[bool] = opt("Never touch the network.", "HF_HUB_OFFLINE or QAMRO_OFFLINE",
                                  "--offline/--online", metavar="", rich_help_panel=MODEL),
    skip_bad: Optional[bool] = opt("List bad files in the cache and go on instead of stopping.",
                                   "stop at the first", "--skip-bad", metavar="",
                                   rich_help_panel=MODEL),
    clap_input: Optional[str] = cfg_opt(ExtractConfig, "clap_input", "clap-music's input: "
                                        "resampled (48 kHz, 10 s windows) or published (the "
                                        "file's samples at its own rate, the first 480,000, "
                                        "read as 48 kHz: the published track 1 code and the "
                                        "MusicEval baseline); its own cache, "
                                        "BACKBONE-published-input.h5.", recipe=False,
                                        rich_help_panel=MODEL),
    keep_windows: Optional[bool] = opt(
        "Also keep each window's row of the audio features CLAP and melstats pool per clip "
        "(beside the pooled row): what train --pool attention reads.", "pooled rows only",
        "--keep-windows", metavar="", rich_help_panel=OUTPUT),
    shard: Optional[str] = opt("K/N, numbered from 0 (0/4 .. 3/4): extract clips K, K+N, ... "
                               "into NAME.part-K-of-N.h5; join them with `cache merge`.",
                               rich_help_panel=OUTPUT),
    force: bool = typer.Option(False, "--force", metavar="",
                               help="Re-embed every clip, replacing a "
                               "qamro-pipe cache (never anything else).",
                               rich_help_panel=OUTPUT),
    quiet: bool = typer.Option(False, "--quiet", metavar="", help="No progress bar."),
):
    """Start here: embed a dataset with a frozen backbone into one HDF5 cache.

    Resumable: rerun the same command after an interruption. Under torchrun, each rank
    extracts a shard and rank 0 merges them."""

    cfg = override(ExtractConfig(), backbone=backbone, checkpoint=checkpoint,
                   tokenizer_dir=tokenizer_dir, device=device, precision=precision,
                   batch_size=batch_size, workers=workers, offline=offline, skip_bad=skip_bad,
                   clap_input=clap_input, keep_windows=keep_windows)
    if out is not None and out.is_dir():  # before torch is imported (h5py only)
        from .store.reader import refuse_foreign  # on use

        refuse_foreign(out)
    from .extract.cli_glue import records_for, summary_text  # heavy: torch, h5py
    from .extract.loop import default_cache_path  # on use
    from .extract.loop import extract as run_extract  # on use
    from .extract.shards import extract_distributed, parse_shard, torchrun_rank  # on use

    part = parse_shard(shard) if shard else None
    records = records_for(dataset, root, manifest, splits, eval_dir, lists, label_range)
    for note in records.notes:
        _note(f"note: {note}")
    path = out or default_cache_path(records.name, cfg.backbone, cache_dir, cfg.clap_input)
    if shard is None and torchrun_rank():
        rank, summary = extract_distributed(records, cfg, path, force, progress=not quiet)
        if rank == 0:
            _echo(summary_text(summary) + f"\nmerged all shards into {path}")
        return
    summary = run_extract(records, cfg, path, force=force, progress=not quiet, shard=part)
    _echo(summary_text(summary))


app.add_typer(cache_app, name="cache", rich_help_panel=EMBED)


@command(cache_app, "info")
def cache_info(path: Path = typer.Argument(..., metavar="CACHE", help="A cache .h5 file.")):
    """What is in a cache: counts per split, features and shapes, provenance."""
    check_cache_file(path, "cache info")  # a folder, not an h5py dump
    from .store.reader import describe  # on use

    _echo(describe(path))


@command(cache_app, "merge")
def cache_merge(
    parts: list[Path] = typer.Argument(..., metavar="PARTS",
                                       help="NAME.part-K-of-N.h5 files, all N of them."),
    out: Path = typer.Option(..., help="The merged cache file."),
    force: bool = typer.Option(False, "--force", metavar="",
                               help="Replace an existing qamro-pipe cache "
                               "(never anything else)."),
):
    """Join the shards of an extraction into the cache one process would have written."""
    from .extract.shards import merge_parts  # on use

    _echo(f"merged {len(parts)} shards into {merge_parts(parts, out, force)}")


# -- stage 2 --------------------------------------------------------------------------------
@command(shared=RUN_OPTIONS, panel=TRAIN)
def train(
    recipe: Optional[str] = opt(_RECIPE_HELP, _RECIPE_DEFAULT, rich_help_panel=DATA),
    dataset: Optional[str] = opt("Use the recipe named after this dataset.", rich_help_panel=DATA),
    backbone: Optional[str] = opt("Read CACHE_ROOT/DATASET/BACKBONE.h5 instead of the "
                                  "recipe's backbone's cache.", rich_help_panel=DATA),
    loss: Optional[str] = cfg_opt(LossConfig, "kind", f"Ranking term: {kinds_help()}; "
                                  f"docs/losses.md.", rich_help_panel=LOSS),
    alpha: Optional[float] = cfg_opt(LossConfig, "alpha", "QAMRO margin scale: margin = alpha "
                                     "|y_i - y_j| (>= 0).", rich_help_panel=LOSS),
    beta: Optional[float] = cfg_opt(LossConfig, "beta", "QAMRO quality preference: q_ij = 1 + "
                                    "(beta-1) max(ny_i, ny_j); 1 = no weighting (> 0).",
                                    rich_help_panel=LOSS),
    margin: Optional[float] = cfg_opt(LossConfig, "margin", "Fixed margin of --loss mr (>= 0).",
                                      rich_help_panel=LOSS),
    seed: Optional[int] = opt("Train this one seed instead of seeds 0..N-1 (not with --seeds).",
                              rich_help_panel=LOSS),
    opts: dict = None,
):
    """Train QAMRO heads on a cache and write a run folder.

    The folder holds config.json, metrics.json, predictions.csv and heads.safetensors. Without
    --recipe, a cache of a dataset with no recipe gets one head per label column."""
    if seed is not None and opts["seeds"] is not None:
        raise QamroError("--seed and --seeds: give one (--seed S trains seed S alone, "
                         "--seeds N trains seeds 0..N-1)")
    tsettings, lsettings = train_settings(opts)
    given = {k: v for k, v in dict(kind=loss, alpha=alpha, beta=beta, margin=margin).items()
             if v is not None}
    check_run_options(opts, tsettings, {**given, **lsettings})  # before torch is imported
    from .experiments.run import recipe_configs, run_experiment  # on use
    from .experiments.sweep import expand_grid  # on use
    from .train.recipes import select_recipe  # on use

    r = select_recipe(recipe, dataset, backbone, opts["cache"])
    _note(r.derived and f"note: {r.derived}")
    tcfg, lcfg = recipe_configs(r, tsettings, {**given, **lsettings})
    seeds = [seed] if seed is not None else opts["seeds"]
    members = expand_grid(lcfg, {} if seeds is None else {"seeds": seeds})
    with _watch(opts, "train") as watch:
        folder, metrics, result, data = run_experiment(r, members, tcfg, progress=watch,
                                                       **run_args(opts))
    _report_run(r, metrics, result, data)
    _echo(f"run written to {folder}  ({_cost(result)})")
    _kept(folder)


@command(shared=RUN_OPTIONS, panel=TRAIN)
def sweep(
    recipe: Optional[str] = opt(_RECIPE_HELP, _RECIPE_DEFAULT, rich_help_panel=DATA),
    dataset: Optional[str] = opt("Use the recipe named after this dataset.", rich_help_panel=DATA),
    backbone: Optional[str] = opt("Read CACHE_ROOT/DATASET/BACKBONE.h5 instead of the "
                                  "recipe's backbone's cache.", rich_help_panel=DATA),
    grid: Optional[str] = opt("A named grid of the recipe (its grids.NAME table; beta = Figure 1); "
                              "the lists given below replace its entries.",
                              rich_help_panel=LOSS),
    loss: Optional[str] = opt(f"Comma list of loss kinds: {', '.join(LOSS_KINDS)}.",
                              f"{default_of(LossConfig, 'kind')}, or the grid's",
                              rich_help_panel=LOSS),
    alpha: Optional[str] = opt("Comma list of QAMRO margin scales, e.g. 0.1,0.2.",
                               f"{default_of(LossConfig, 'alpha'):g}, or the grid's",
                               rich_help_panel=LOSS),
    beta: Optional[str] = opt("Comma list of QAMRO quality preferences, e.g. 1,3,5,7,9,11.",
                              f"{default_of(LossConfig, 'beta'):g}, or the grid's",
                              rich_help_panel=LOSS),
    margin: Optional[str] = opt("Comma list of fixed margins for --loss mr.",
                                f"{default_of(LossConfig, 'margin'):g}, or the grid's",
                                rich_help_panel=LOSS),
    opts: dict = None,
):
    """Train a grid of loss settings x seeds as one batched model.

    Writes the run folder with sweep.csv and sweep.png. Takes every option train takes but
    --seed (a sweep gives seeds with --seeds or its grid)."""
    check_run_options(opts, *train_settings(opts))  # before torch is imported
    from .experiments.run import recipe_configs, run_experiment  # on use
    from .experiments.sweep import expand_grid, named_grid, parse_list, sweep_rows  # on use
    from .report.screen import sweep_table, system_level_line  # on use
    from .train.recipes import select_recipe  # on use

    r = select_recipe(recipe, dataset, backbone, opts["cache"])
    _note(r.derived and f"note: {r.derived}")
    g = named_grid(r, grid)
    given = {"loss": parse_list(loss, str), "alpha": parse_list(alpha),
             "beta": parse_list(beta), "margin": parse_list(margin), "seeds": opts["seeds"]}
    g.update({k: v for k, v in given.items() if v is not None})
    tsettings, lsettings = train_settings(opts)
    tcfg, lcfg = recipe_configs(r, tsettings, lsettings, kinds=g.get("loss"))
    members = expand_grid(lcfg, g)
    with _watch(opts, "sweep") as watch:
        folder, metrics, result, data = run_experiment(r, members, tcfg, **run_args(opts),
                                                       kind="sweep", progress=watch)
    _warn_backbone(r, data)
    _split_notes(metrics)
    if "cv" in metrics:
        _echo(f"{metrics['cv']['folds']}-fold cross-validation: each member's figures "
              f"are those of its pooled out-of-fold predictions")
    _echo(sweep_table(sweep_rows(metrics)))
    _note(system_level_line(metrics))
    _echo(f"trained as one model: {_cost(result)}")
    _echo(f"wrote {folder / 'sweep.csv'} and {folder / 'sweep.png'}")
    _kept(folder)


@command(shared=RUN_OPTIONS, panel=TRAIN)
def table(
    recipe: Optional[str] = opt("A table recipe (a name in stages/, e.g. table1 or "
                                "table2, or a .toml path).", DEFAULT_TABLE, rich_help_panel=DATA),
    model: Optional[str] = opt("Model recipe every row trains.", "the table's",
                               rich_help_panel=DATA),
    preset: Optional[str] = opt("The table's model recipe for a preset: paper (the paper's "
                                "text) or code (the published code); see the README's "
                                "\"Paper, published code, this tool\".", "the table's model",
                                rich_help_panel=DATA),
    opts: dict = None,
):
    """The paper's ablation rows (Table I, II) as one batched job.

    Rows differ in the loss alone; printed in the paper's layout, as table.md and table.csv."""
    check_run_options(opts, *train_settings(opts))  # before torch is imported
    from .experiments.tables import run_table  # on use
    from .report.screen import system_level_line  # on use

    tsettings, lsettings = train_settings(opts)
    with _watch(opts, "table") as watch:
        res = run_table(recipe or DEFAULT_TABLE, model, seeds=opts["seeds"], train=tsettings,
                        loss=lsettings, preset=preset, progress=watch, **run_args(opts))
    _note(res.recipe.derived and f"note: {res.recipe.derived}")
    for note in res.notes:
        _note(f"note: {note}")
    _split_notes(res.metrics)
    _echo(res.title)
    _echo(res.text)
    _note(system_level_line(res.metrics))
    if not res.reference_shown:
        _echo("(the paper's figures are shown only for its dataset, backbone and level, "
                   "without --cv)")
    pooled = ", table-pooled.md and .csv" if "cv" in res.metrics else ""
    compared = ", compare.md, .csv and .json" if res.compared else ""
    _echo(f"wrote {res.folder / 'table.md'} and table.csv{pooled}{compared}, "
               f"probe.json ({_cost(res.result)})")
    _kept(res.folder)


# -- using a run ----------------------------------------------------------------------------
@command(panel=USE)
def evaluate(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder."),
    split: Optional[str] = opt("Split to score.", "the run's eval split"),
    cache: Optional[Path] = opt("Cache to score (made with the run's backbone).",
                                "the run's own"),
    members: Optional[str] = opt("Score only the members matching key=value,... over loss, "
                                 "alpha, beta, margin, seed (e.g. beta=7 for one setting of a "
                                 "sweep).", "all: the mean of every member's predictions"),
    pairs: Optional[Path] = opt("Labelled pairs (JSON lines with winner) to answer A versus "
                                "B instead: accuracy, ECE with a reliability diagram, Brier "
                                "(docs/preference.md). RUN may be an exported model folder."),
    device: Optional[str] = cfg_opt(ExtractConfig, "device", f"{DEVICE_HELP} (--pairs: the "
                                    "backbone's).", recipe=False),
    top_tier: Optional[float] = opt("Top-tier F1's threshold, in label units.",
                                    "the run's top_tier"),
    top_k: Optional[int] = opt("Precision@k of the system ranking: k (>= 1).",
                               "the run's top_k"),
):
    """Re-score a trained run on a cache split: utterance and system level, 95% CIs.

    It scores the mean of the members' predictions (for a sweep: over all its settings,
    unless --members picks some). RUN/evaluations/CACHE-DIGEST-SPLIT/ holds the
    result. With --pairs, RUN/evaluations/pairs-FILE-DIGEST/ holds the pairs' figures."""
    check_run_folder(run)  # before torch is imported
    check_cache_file(cache)
    from .report.evaluate import evaluate_run  # on use
    from .report.screen import metrics_table, system_level_line, systems_lines  # on use

    if pairs is not None:
        return _evaluate_pairs(run, pairs, members, device, split, cache)
    folder, metrics = evaluate_run(run, split, cache, members=members, top_tier=top_tier,
                                   top_k=top_k)
    _echo(f"scoring {metrics['scored']['text']}")
    for w in metrics["warnings"]:
        _echo(f"warning: {w}", err=True)
    labelled = {h: m for h, m in metrics["heads"].items() if m.get("labelled", True)}
    for h, m in metrics["heads"].items():
        if h not in labelled:
            _note(f"note: head {h!r}: {m['why']}: predictions and systems' intervals only")
    for level in ("utterance", "system") if labelled else ():
        if level == "system" and not metrics["system_level"]["computable"]:
            continue
        _echo(metrics_table({**metrics, "heads": {h: {level: m[level]}
                                                       for h, m in labelled.items()}},
                                 level))
    _note(labelled and system_level_line(metrics))
    for line in systems_lines(metrics):
        _echo(line)
    systems = metrics["systems"]
    matrix = any("matrix" in e for e in systems.get("heads", {}).values())
    parts = ["metrics.json", "predictions.csv"]
    if systems.get("computable"):
        parts.append("systems.csv (each system's predicted MOS"
                     + (" with its 95% interval)" if matrix else ")"))
    if matrix:
        parts.append("rank-HEAD.csv and .png (P(system A ranks above system B))")
    _echo(f"wrote {folder}/: {', '.join(parts)}")


def _evaluate_pairs(run: Path, pairs: Path, members, device, split, cache) -> None:
    from .model_folder import looks_like_repo  # on use
    from .pairs import evaluate_pairs_file, read_pairs  # on use
    from .scorer import Scorer  # on use

    if split is not None or cache is not None:
        raise QamroError("--pairs scores the pairs' audio: --split and --cache do not apply")
    if looks_like_repo(str(run)):
        raise QamroError(f"--pairs writes into the model folder; {run} is a Hugging Face "
                         f"cache entry: download it into a folder of your own and pass that")
    read_pairs(pairs, labelled=True)  # checked before the backbone loads
    folder, metrics = evaluate_pairs_file(Scorer.load(run, device=device, members=members),
                                          pairs)
    _echo(f"{metrics['calibration']}")
    for w in metrics["warnings"]:
        _echo(f"warning: {w}", err=True)
    for h, m in metrics["heads"].items():
        if "accuracy" not in m:
            _echo(f"{h}: {m['why']}")
            continue
        figs = "  ".join(f"{k} {m[k]:.3f} [{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}]"
                         for k in ("accuracy", "ece", "brier"))
        _echo(f"{h}: {m['decided']} decided pairs  {figs}  (ties apart: "
                   f"{m['ties']['count']})")
    _echo(f"wrote {folder}/: metrics.json, answers.jsonl, reliability-HEAD.png")


@command(panel=USE)
def predict(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder."),
    audio: Optional[list[Path]] = typer.Argument(None, metavar="AUDIO",
                                                 help="Audio files to score."),
    manifest: Optional[Path] = opt("CSV, TSV or JSONL manifest of the clips (id, path, "
                                   "text), instead of files."),
    text: Optional[str] = opt("Prompt for every file (textual heads).", "the manifest's, else "
                              "none"),
    out: Optional[Path] = opt("Write scores to .csv or .jsonl (folders are created).",
                              "print CSV", rich_help_panel=OUTPUT),
    answer: Optional[Path] = opt("Write the AudioMOS submission format (id,score,... in the "
                                 "heads' order, no header).", rich_help_panel=OUTPUT),
    members: Optional[str] = opt("Score with the members matching key=value,... over loss, "
                                 "alpha, beta, margin, seed (as evaluate --members).",
                                 "all: the mean of every member's predictions"),
    checkpoint: Optional[str] = opt("Backbone weights file.", "the run's cache's"),
    tokenizer_dir: Optional[str] = MODEL_TOKENIZER,
    device: Optional[str] = MODEL_DEVICE,
    system: Optional[str] = opt("The clips are this system's: add the score offset "
                                "calibrate-system recorded for it.", "none"),
    force: bool = typer.Option(False, "--force", metavar="",
                               help="Replace existing --out/--answer files.",
                               rich_help_panel=OUTPUT),
):
    """Score new audio end to end with a run's backbone and heads.

    A file's score is the mean of the run's members' predictions; with several members,
    HEAD_sd beside it is their sd. --answer holds the scores alone."""
    check_run_folder(run)  # before torch is imported
    from .predict import check_outputs, scores_csv, write_answer, write_scores  # on use
    from .predict import predict as run_predict  # on use

    check_outputs(out, answer, force=force)  # before scoring: no scores lost to a bad path
    notes: list[str] = []
    heads, rows, failures = run_predict(run, audio, manifest, text, members=members,
                                        answer=answer is not None,
                                        checkpoint=checkpoint, tokenizer_dir=tokenizer_dir,
                                        device=device, notes=notes, system=system)
    for why in failures.values():
        _echo(f"error: {why}", err=True)
    if out:
        write_scores(out, heads, rows)
    if answer:
        write_answer(answer, heads, rows)
    if not out and not answer:
        _echo(scores_csv(heads, rows, digits=4), nl=False)
    for line in notes:
        _note(f"note: {line}")
    _echo(f"scored {len(rows)} file(s), {len(failures)} failed", err=True)
    if failures:
        raise typer.Exit(1)


@command(panel=USE)
def export(
    run: Path = typer.Argument(..., help="A run folder or sweep."),
    out: Path = typer.Argument(..., help="The model folder to write (new, or empty)."),
    members: Optional[str] = opt("Export only the members matching key=value,... over loss, "
                                 "alpha, beta, margin, seed (as evaluate --members).",
                                 "all"),
    force: bool = typer.Option(False, "--force", help="Replace a model folder this tool "
                               "exported (never anything else)."),
):
    """A model folder that needs nothing else: config.json, model.safetensors, README.md.

    The layout of a Hugging Face model repository: `Scorer.load(OUT)` and `predict OUT` read
    it offline, `Scorer.load("owner/name")` once it is uploaded."""
    from .export import check_target, export_model, written_note  # on use

    check_target(out, force)  # before reading the run
    folder, _ = export_model(run, out, members, force)
    _echo(written_note(folder))


@command(panel=USE)
def prefer(
    model: str = typer.Argument(..., help="A run folder, exported model folder, or owner/name "
                                "on Hugging Face."),
    pairs: Path = typer.Argument(..., help="JSON lines: id, prompt, audio_a, audio_b (paths "
                                 "relative to this file); CMI-RewardBench and Music Arena "
                                 "field names are read too (docs/preference.md)."),
    out: Optional[Path] = opt("Write the answers (JSON lines).", "print them",
                              rich_help_panel=OUTPUT),
    calibrate: Optional[Path] = opt("Labelled pairs (with winner) to fit each head's "
                                    "temperature on first; recorded in MODEL/preference.json.",
                                    "the recorded one, else the members' spread"),
    head: Optional[str] = opt("The head whose score decides `preferred`.", "the first"),
    members: Optional[str] = MODEL_MEMBERS,
    checkpoint: Optional[str] = MODEL_CHECKPOINT,
    tokenizer_dir: Optional[str] = MODEL_TOKENIZER,
    device: Optional[str] = MODEL_DEVICE,
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file.",
                               rich_help_panel=OUTPUT),
):
    """Which of two clips people prefer: P(A over B) per head from the score difference.

    Each output line: id, preferred (A or B), p_HEAD, the two scores, and how the temperature
    was set (fitted with --calibrate, or the members' spread)."""
    from .model_folder import looks_like_repo  # on use
    from .pairs import answer_lines, read_pairs, score_pairs  # on use
    from .pairs import calibrate as fit  # on use
    from .predict import _write_text, check_outputs  # on use
    from .scorer import Scorer  # on use

    check_outputs(out, force=force)
    todo = read_pairs(pairs)
    if calibrate is not None:
        read_pairs(calibrate, labelled=True)
        if looks_like_repo(model):
            raise QamroError(f"--calibrate records the temperature in the model folder; "
                             f"{model} is a Hugging Face cache entry: download it into a "
                             f"folder of your own and pass that")
    scorer = Scorer.load(model, device=device, members=members, checkpoint=checkpoint,
                         tokenizer_dir=tokenizer_dir)
    if calibrate is not None:
        entry = fit(scorer, calibrate, head)
        temps = ", ".join(f"{h} {t:.4g}" for h, t in entry["temperature"].items())
        _echo(f"temperature fitted on {entry['pairs']} labelled pairs of {calibrate} "
                   f"({entry['ties_left_out']} ties left out): {temps}; recorded in "
                   f"{scorer.folder / 'preference.json'}", err=True)
    answers, bad = score_pairs(scorer, todo, head)
    for why in bad.values():
        _echo(f"error: {why}", err=True)
    text = answer_lines(answers)
    if out:
        _write_text(out, text)
    else:
        _echo(text, nl=False)
    if answers:
        _note(f"note: {answers[0][1]['calibration']}")
    _echo(f"answered {len(answers)} pair(s), {len(bad)} failed", err=True)
    if bad:
        raise typer.Exit(1)


@command(name="calibrate-system", panel=USE)
def calibrate_system(
    model: str = typer.Argument(..., help="A run folder or exported model folder (the offsets "
                                "are recorded in it)."),
    pairs: Path = typer.Argument(..., help="Labelled pairs (winner or tie) comparing the "
                                 "system's clips with clips of systems the model knows, each "
                                 "with system_a and system_b (docs/preference.md)."),
    system: str = typer.Option(..., help="The system whose score offset to fit."),
    members: Optional[str] = MODEL_MEMBERS,
    checkpoint: Optional[str] = MODEL_CHECKPOINT,
    tokenizer_dir: Optional[str] = MODEL_TOKENIZER,
    device: Optional[str] = MODEL_DEVICE,
):
    """Fit a new system's score offset per head from ~100 labelled pairs against known systems.

    Bradley-Terry maximum likelihood with a bootstrap 95% interval, recorded in
    MODEL/system_offsets.json; Scorer.score(..., system=NAME) then adds it."""
    from .model_folder import looks_like_repo  # on use
    from .pairs_file import read_pairs  # light, but with the others: one place
    from .recalibrate import system_pairs  # on use
    from .scorer import Scorer  # on use

    system_pairs(read_pairs(pairs, labelled=True), system, pairs)  # before the model loads
    if looks_like_repo(model):
        raise QamroError(f"calibrate-system records the offsets in the model folder; {model} "
                         f"is a Hugging Face cache entry: download it into a folder of your "
                         f"own and pass that")
    scorer = Scorer.load(model, device=device, members=members, checkpoint=checkpoint,
                         tokenizer_dir=tokenizer_dir)
    kept_before = set(scorer.folder.glob("system_offsets.json.kept-*"))
    result = scorer.recalibrate(pairs, system)
    for h, e in result.items():
        lo, hi = e["interval"]
        _echo(f"{h}: offset {e['offset']:+.3f} [{lo:+.3f}, {hi:+.3f}] (95%, {e['resamples']} "
              f"resamples) from {e['pairs']} pairs ({e['won']} won, {e['ties']} ties)")
    _note(f"note: {next(iter(result.values()))['temperature']}")
    _echo(f"recorded in {scorer.folder / 'system_offsets.json'}", err=True)
    for kept in sorted(set(scorer.folder.glob("system_offsets.json.kept-*")) - kept_before):
        _note(f"note: {system} had offsets recorded already; the earlier file is kept as "
              f"{kept}")


@command(panel=DEMO)
def demo(quiet: bool = typer.Option(False, "--quiet", metavar="", help="No progress bar.")):
    """Offline demo: synthetic corpus -> melstats cache -> QAMRO run -> beta sweep."""
    from .demo import run_demo  # on use

    run_demo(progress=not quiet, watch=lambda what: _watch({"quiet": quiet}, what),
             done=_demo_stage)


def _demo_stage(stage: str, result) -> None:
    """Print each stage of the demo as it finishes (the next one's progress follows)."""
    from .extract.cli_glue import summary_text  # on use
    from .report.screen import metrics_table, sweep_table  # on use

    if stage == "extract":
        _echo(summary_text(result))
        _echo("training one QAMRO run, then the beta sweep (3 seeds per setting)...")
        return
    if stage == "run":
        folder, metrics, run, _ = result
        _echo("\nOne QAMRO run (alpha 0.2, beta 7) on the demo corpus:")
        _echo(metrics_table(metrics))
        _echo(f"run written to {folder}  ({_cost(run)})")
        _kept(folder)
        return
    sweep_folder, sweep_metrics, sweep_result, _ = result["sweep"]
    first = sweep_metrics["members"][0]["heads"]
    n_sys = next(iter(first.values()))["system"].get("n")
    _echo(f"\nFigure 1 on the demo corpus: system-level SRCC on "
               f"{sweep_metrics['eval_split']!r} ({n_sys} systems) of QAMRO at alpha 0.2 "
               f"against beta, and of the same heads trained with the regression loss alone "
               f"(loss none); mean ± sd over seeds:")
    _echo(sweep_table(result["sweep_rows"]))
    _echo(f"sweep written to {sweep_folder} (sweep.csv, sweep.png, curves.png; "
               f"{_cost(sweep_result)})")
    _kept(sweep_folder)
    _echo("note: the demo corpus and its scores are SYNTHETIC (designed degradations "
               "plus simulated raters), not human ratings: these figures show that the "
               "pipeline works, not how QAMRO does on real data.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
