"""The command line's options that several commands share, each defined once, and the help
text's defaults, read from config.py (an option is None when not given: the library applies
the default, the help only shows it).

`train`, `sweep` and `table` take RUN_OPTIONS; to give all three a new option, add it here
and read it in `run_args` or `train_settings`."""
from __future__ import annotations

import functools
import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from .config import (
    DEFAULT_SEEDS,
    DEVICE_HELP,
    PAIR_WEIGHT,
    CVConfig,
    ExtractConfig,
    LossConfig,
    TrainConfig,
    override,
)
from .errors import QamroError

DATA, LOSS, TRAINING, OUTPUT = "Recipe and data", "Loss", "Training", "Output"
MODEL = "Backbone and device"


def default_of(cls, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


def shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def opt(help: str, default: str | None = None, *decls: str, **kw) -> Any:
    """An option that is None when not given; `default` is what that resolves to, shown in
    --help only."""
    return typer.Option(None, *decls, help=help,
                        show_default=default if default is not None else False, **kw)


def cfg_opt(cls, name: str, help: str, recipe: bool = True, **kw) -> Any:
    """An option for a config.py setting, its default shown from the dataclass."""
    value = shown(default_of(cls, name))
    return opt(help, f"{value}, or the recipe's" if recipe else value, **kw)


# what the commands that load a model's backbone take (predict, prefer, calibrate-system)
MODEL_MEMBERS = opt("Use the members matching key=value,... (as evaluate --members).", "all")
MODEL_CHECKPOINT = opt("Backbone weights file.", "the run's cache's, else the release file")
MODEL_TOKENIZER = opt("roberta-base tokenizer files (CLAP text, offline).", "the run's cache's")
MODEL_DEVICE = cfg_opt(ExtractConfig, "device", f"{DEVICE_HELP}.", recipe=False)

T, L = TrainConfig, LossConfig
TRAIN_SETTINGS = ("val_split", "eval_split", "max_epochs", "patience", "optimizer", "lr",
                  "weight_decay", "batch_size", "val_batch_size", "activation", "device",
                  "threads", "matmul_precision", "top_tier", "top_k", "init", "label_stats",
                  "release_checkpoint", "train_windows", "pairs", "pair_head")
LOSS_SETTINGS = ("norm", "regression", "quality_weight", "temperature", "tau", "bins",
                 "sigma", "system_weight", "batch_by",
                 "loss_weighting", "pool", "pair_weight",
                 "regression_weight")  # one value for every member of one run

# name -> (type, option): what train, sweep and table all take
RUN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "cache": (Optional[Path], opt(
        "Cache file to train from.", "the recipe's, CACHE_ROOT/DATASET/BACKBONE.h5",
        rich_help_panel=DATA)),
    "seeds": (Optional[int], opt(
        "Train seeds 0..N-1 of every setting as batched members (>= 1).",
        f"{DEFAULT_SEEDS}, or the grid's or table's", rich_help_panel=LOSS)),
    "norm": (Optional[str], cfg_opt(
        L, "norm", "How q_ij scales labels to [0, 1]: batch (the batch's min and max, as the "
        "published code) or range (the recipe's label_range). QAMRO only.",
        rich_help_panel=LOSS)),
    "quality_weight": (Optional[str], cfg_opt(
        L, "quality_weight", "q_ij: eq3 (the paper, 1 + (beta-1) max(ny_i, ny_j)) or "
        "interval-table (the published track 2 code: a hand-set value per MOS interval, per "
        "axis PQ/PC/CE/CU; labels outside 1-10 in no pair). QAMRO only.",
        rich_help_panel=LOSS)),
    "regression": (Optional[str], cfg_opt(
        L, "regression", "Regression term: huber, mse or mse+mae (on standardised labels "
        "where a head standardises).", rich_help_panel=LOSS)),
    "temperature": (Optional[float], cfg_opt(
        L, "temperature", "ListNet's softmax temperature, in label units (> 0). --loss "
        "listnet only.", rich_help_panel=LOSS)),
    "tau": (Optional[float], cfg_opt(
        L, "tau", "Spearman's soft-rank temperature, in label units (> 0). --loss spearman "
        "or system, or --system-weight, only.", rich_help_panel=LOSS)),
    "bins": (Optional[int], cfg_opt(
        L, "bins", "Score bins of --loss gaussian-kl over the recipe's label_range, ends "
        "included (>= 2).", rich_help_panel=LOSS)),
    "sigma": (Optional[float], cfg_opt(
        L, "sigma", "Gaussian smoothing of --loss gaussian-kl's targets, as a share of the "
        "label range (> 0).", rich_help_panel=LOSS)),
    "system_weight": (Optional[float], cfg_opt(
        L, "system_weight", "Add the system-level soft Spearman (--loss system: each system's "
        "mean prediction against its mean label inside a batch) with this weight beside any "
        "other --loss (>= 0; 0 = none).", rich_help_panel=LOSS)),
    "pairs": (Optional[Path], opt(
        "Preference pairs (a pairs file: ours, CMI-RewardBench or Music Arena field names, "
        "winner or tie per pair; docs/preference.md) joined to the cache's training clips: a "
        "Bradley-Terry term trains the heads beside the MOS labels (docs/beyond.md). Pairs "
        "touching a validation or eval clip are left out.", rich_help_panel=LOSS)),
    "pair_weight": (Optional[float], opt(
        "Weight of the Bradley-Terry term on the --pairs (>= 0; 0 = none).",
        f"{PAIR_WEIGHT:g} with --pairs, else 0", rich_help_panel=LOSS)),
    "regression_weight": (Optional[float], cfg_opt(
        L, "regression_weight", "Weight of the regression term on the MOS labels (>= 0); 0 "
        "trains a member by its ranking part alone: with --pair-weight, on preference pairs "
        "alone (it early-stops on held-out pairs; its scores are on its own scale).",
        rich_help_panel=LOSS)),
    "pair_head": (Optional[str], opt(
        "The head the --pairs train.", "every head", rich_help_panel=LOSS)),
    "val_split": (Optional[str], cfg_opt(
        T, "val_split", "Early-stopping split: holdout (a share of train, never the reported "
        "split) or a split name (dev = the published code's protocol).",
        rich_help_panel=TRAINING)),
    "eval_split": (Optional[str], cfg_opt(
        T, "eval_split", "Split the metrics are reported on.", rich_help_panel=TRAINING)),
    "max_epochs": (Optional[int], cfg_opt(
        T, "max_epochs", "Most epochs per member (>= 1).", rich_help_panel=TRAINING)),
    "patience": (Optional[int], cfg_opt(
        T, "patience", "Stop a member after this many epochs without a better validation "
        "loss (>= 1).", rich_help_panel=TRAINING)),
    "optimizer": (Optional[str], cfg_opt(
        T, "optimizer", "sgd (the paper; momentum as config.py) or adamw (the published "
        "track 2 code).", rich_help_panel=TRAINING)),
    "lr": (Optional[float], cfg_opt(
        T, "lr", "Learning rate (> 0).", rich_help_panel=TRAINING)),
    "weight_decay": (Optional[float], cfg_opt(
        T, "weight_decay", "AdamW's decoupled weight decay (>= 0).", rich_help_panel=TRAINING)),
    "batch_size": (Optional[int], cfg_opt(
        T, "batch_size", "Rows per step and per ranking batch (>= 2): clips, but for "
        "per-window features (AES-Natural) windows unless --train-windows one-per-clip.",
        rich_help_panel=TRAINING)),
    "train_windows": (Optional[str], cfg_opt(
        T, "train_windows", "Per-window features: all (every cached window is a row with its "
        "clip's label; long clips weigh by their length) or one-per-clip (one window per clip "
        "per epoch, drawn per member, as the published track 2 code crops; validation on one "
        "fixed window per clip).", rich_help_panel=TRAINING)),
    "batch_by": (Optional[str], cfg_opt(
        L, "batch_by", "What a training batch holds: random rows, or whole prompt groups "
        "(every system's clip of a prompt) or whole systems, so the ranking terms compare "
        "clips that should be compared (a table's rows may differ by it).",
        rich_help_panel=TRAINING)),
    "loss_weighting": (Optional[str], cfg_opt(
        L, "loss_weighting", "fixed (regression + ranking term, the paper) or uncertainty: "
        "each member learns its terms' weights, exp(-s) per term with a log-variance s "
        "trained beside the head (Kendall et al. 2018).",
        rich_help_panel=TRAINING)),
    "pool": (Optional[str], cfg_opt(
        L, "pool", "Per-window features: mean (train on windows; a clip's score is their "
        "length-weighted mean) or attention (train on clips; a learned attention over each "
        "clip's windows). CLAP and melstats keep windows with extract --keep-windows.",
        rich_help_panel=TRAINING)),
    "val_batch_size": (Optional[int], opt(
        "Rows per validation batch: the ranking term is a mini-batch loss, so this shapes "
        "the early-stopping signal (the published code: 8).", "--batch-size",
        rich_help_panel=TRAINING)),
    "activation": (Optional[str], cfg_opt(
        T, "activation", "Between the heads' layers: relu, gelu or none (the published track "
        "1 code has none).", rich_help_panel=TRAINING)),
    "device": (Optional[str], cfg_opt(
        T, "device", f"Where to train: {DEVICE_HELP} (auto = cuda when present).",
        rich_help_panel=TRAINING)),
    "threads": (Optional[int], opt(
        "torch's CPU threads while training (>= 1); the numbers do not change. On a CPU "
        "shared with other work, 1 can be several times faster (README).",
        "torch's own: one per core", rich_help_panel=TRAINING)),
    "matmul_precision": (Optional[str], cfg_opt(
        T, "matmul_precision", "highest (fp32) or high (TF32 on GPUs that have it): faster, "
        "predictions move by ~1e-2; see docs/benchmarks.md.",
        rich_help_panel=TRAINING)),
    "init": (Optional[str], cfg_opt(
        T, "init", "Heads start from random (seeded per member) or release: the released "
        "Audiobox-Aesthetics heads for every member, as the published track 2 code (needs "
        "--label-stats release).",
        rich_help_panel=TRAINING)),
    "label_stats": (Optional[str], cfg_opt(
        T, "label_stats", "Standardise labels by the train split's mean and std, or by the "
        "release's (its target_transform, as the published track 2 code).",
        rich_help_panel=TRAINING)),
    "release_checkpoint": (Optional[Path], opt(
        "The Audiobox-Aesthetics checkpoint for --init/--label-stats release and Table II's "
        "zero-shot row; it must be the file the cache was extracted with (same sha256).",
        "the file the cache's provenance names", rich_help_panel=TRAINING)),
    "top_tier": (Optional[float], cfg_opt(
        T, "top_tier", "Top-tier F1's threshold in label units: a clip (system) is top tier "
        "when its label (mean label) is at least this, and predicted top tier likewise (the "
        "song-aesthetics challenge's Top-Tier Accuracy; docs/beyond.md).",
        rich_help_panel=TRAINING)),
    "top_k": (Optional[int], cfg_opt(
        T, "top_k", "Precision@k of the system ranking: the share of the k systems predicted "
        "highest that are in the true top k (>= 1).", rich_help_panel=TRAINING)),
    "cv": (Optional[int], opt(
        "Cross-validate instead of scoring one split: K folds (>= 2) of the labelled clips of "
        "the train and eval splits, a whole system (or prompt, --cv-group) in one fold only "
        "(sklearn GroupKFold); figures are mean ± sd over folds and of the pooled "
        "out-of-fold predictions.", rich_help_panel=TRAINING)),
    "cv_group": (Optional[str], cfg_opt(
        CVConfig, "group", "What a --cv fold holds out whole: system (new systems), prompt "
        "(new prompts: the _P044 ending a MusicEval clip id, else the clip's text) or clip "
        "(plain K-fold, for clips with neither).",
        recipe=False, rich_help_panel=TRAINING)),
    "out": (Optional[Path], opt(
        "Folder to write the run (sweep, table) to.",
        "CACHE_ROOT/runs/NAME: recipe, backbone, loss settings, cv",
        rich_help_panel=OUTPUT)),
    "force": (bool, typer.Option(
        False, "--force", metavar="",
        help="Replace a run folder qamro-pipe wrote (never anything else), "
        "or discard the saved state of a different interrupted run there.",
        rich_help_panel=OUTPUT)),
    "resume": (bool, typer.Option(
        False, "--resume", metavar="",
        help="Continue an interrupted run from its saved state (rerunning "
        "the same command does too); an error if there is none.", rich_help_panel=OUTPUT)),
    "quiet": (bool, typer.Option(
        False, "--quiet", metavar="",
        help="No progress display (on a terminal a bar; in a log a line "
        "every 30 s).", rich_help_panel=OUTPUT)),
}


def train_settings(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """RUN_OPTIONS -> (TrainConfig overrides, LossConfig overrides), None = not given."""
    for k in LOSS_SETTINGS:  # a sweep grids --loss and the kinds' numbers; these are one
        if isinstance(opts[k], str) and "," in opts[k]:
            raise QamroError(f"--{k.replace('_', '-')} {opts[k]}: one value, every member of "
                             f"the run gets it; members that differ by it are rows of a "
                             f"table recipe (stages/table-beyond.toml: `{k} = ...` per row)")
    return ({k: opts[k] for k in TRAIN_SETTINGS if opts[k] is not None},
            {k: opts[k] for k in LOSS_SETTINGS if opts[k] is not None})


def run_args(opts: dict[str, Any]) -> dict[str, Any]:
    """RUN_OPTIONS -> run_experiment's keyword arguments."""
    return {"cache": opts["cache"], "out": opts["out"], "force": opts["force"],
            "resume": opts["resume"], "cv": cv_config(opts)}


def cv_config(opts: dict[str, Any]) -> CVConfig | None:
    """--cv K [--cv-group G] -> CVConfig (checked now, before any work); None without --cv."""
    if opts["cv"] is None:
        if opts["cv_group"] is not None:
            raise QamroError("--cv-group applies to cross-validation: add --cv K")
        return None
    return override(CVConfig(opts["cv"]), group=opts["cv_group"])


DEBUG = typer.Option(False, "--debug", metavar="", help="Show tracebacks on errors.")


def with_options(fn: Callable, shared: dict[str, tuple[Any, Any]], collect: str | None,
                 before: Callable[[dict[str, Any]], None]) -> Callable:
    """`fn` with the `shared` options (and --debug) added to its signature, for typer to
    read; their values reach `fn` as one dict in its parameter `collect`. `before(kw)` sees
    every value first (the --debug switch)."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != collect]
    extra = {**shared, "debug": (bool, DEBUG)}
    added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=t)
             for n, (t, info) in extra.items()]

    @functools.wraps(fn)
    def wrapper(**kw):
        before(kw)
        kw.pop("debug", None)
        opts = {n: kw.pop(n) for n in shared}
        if collect:
            kw[collect] = opts
        return fn(**kw)

    wrapper.__signature__ = sig.replace(parameters=[*own, *added])
    wrapper.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != collect},
                               **{n: t for n, (t, _) in extra.items()}}
    return wrapper
