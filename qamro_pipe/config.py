"""Every default of the project, once. The CLI reads these; it never restates one."""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import QamroError
from .loss_kinds import LOSS_KINDS, USED_SETTINGS, member_label

OPTIMIZERS = ("sgd", "adamw")
QUALITY_WEIGHTS = ("eq3", "interval-table")  # the paper's Eq. 3; the published track 2 table
INITS = ("random", "release")  # heads start from seeded random weights, or the release's
LABEL_STATS = ("train", "release")  # standardise by the train split's or the release's stats
TRAIN_WINDOWS = ("all", "one-per-clip")  # per-window features: every window a row, or one
# cached window per clip per epoch (the published track 2 code's one crop per clip)
CLAP_INPUTS = ("resampled", "published")  # CLAP's input: 48 kHz, or as the published code
DEFAULT_RECIPE = "musiceval"  # what `train` and `sweep` do when told nothing
DEFAULT_TABLE = "table1"  # what `table` builds when told nothing
DEFAULT_SEEDS = 1  # seeds per setting when neither the command nor a grid or table says
EXTRACT_BATCH = {"cuda": 64, "cpu": 16}  # windows per forward pass when none is asked for
DEVICE_HELP = "auto, cpu, cuda or cuda:N"  # the device names every stage accepts
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# the linear probe's ridge penalties, chosen among by RidgeCV's own leave-one-out (on
# standardised features, so one grid fits embeddings of any scale or width)
PROBE_ALPHAS = tuple(10.0 ** k for k in range(-3, 7))
CV_GROUPS = ("system", "prompt", "clip")  # what a cross-validation fold holds out whole
# (clip: plain K-fold, for clips with neither systems nor prompts)
BATCH_BY = ("random", "prompt", "system")  # what a training batch is made of (train/groups.py)
LOSS_WEIGHTINGS = ("fixed", "uncertainty")  # how a member's objective terms are weighted
POOLS = ("mean", "attention")  # how a clip's windows make its prediction (train/pooling.py)
OBJECTIVE_TERMS = ("regression", "ranking")  # the terms of a member's objective, in order
PAIR_WEIGHT = 1.0  # a member's pair_weight when --pairs is given and no weight is: the
# Bradley-Terry term weighs as the ranking term does (rank_weight 1; docs/beyond.md)


def cache_root() -> Path:
    """Where caches and runs live: $QAMRO_CACHE_DIR, else ./cache."""
    return Path(os.environ.get("QAMRO_CACHE_DIR", "cache"))


@dataclass(frozen=True)
class LossConfig:
    kind: str = "qamro"  # ranking term, a name of loss_kinds.KINDS: "qamro" (paper), "mr"
    # (fixed margin), listwise, distributional (docs/losses.md) or "none" (regression only)
    alpha: float = 0.2  # QAMRO margin scale: margin = alpha * |y_i - y_j|
    beta: float = 7.0  # quality preference: q_ij = 1 + (beta-1) max(ny_i, ny_j); 1 = no weighting
    margin: float = 0.1  # fixed margin of "mr" (the w/o-adaptive-margin ablation)
    norm: str = "batch"  # how ny is normalised: "batch" min/max (published code) or "range"
    quality_weight: str = "eq3"  # q_ij: "eq3" (paper, both tracks) or "interval-table" (the
    # published track 2 code: a hand-set value per MOS interval and axis, losses.py)
    label_range: tuple[float, float] | None = None  # (lo, hi) for norm="range"; None = the recipe's
    regression: str = "huber"  # regression term: "huber", "mse" or "mse+mae"
    huber_delta: float = 1.0  # torch's HuberLoss default, as the published code uses it
    rank_weight: float = 1.0  # weight of the ranking term (published: 1)
    regression_weight: float = 1.0  # weight of the regression term on MOS labels; 0 = none:
    # a member trained by its ranking part alone, e.g. preference pairs alone (--pair-weight)
    temperature: float = 1.0  # ListNet's softmax temperature T, in label units (> 0)
    tau: float = 0.1  # Spearman's soft-rank temperature, in label units (> 0): half the 0.2
    # step of a mean of 5 ratings: a clip predicted one step above another counts 0.88 of
    # it (a hard rank: 1) in its soft rank
    bins: int = 21  # gaussian-kl: score bins over the label range, ends included (1-5: a 0.2
    # grid, the grid of means of 5 ratings; 0-10: 0.5)
    sigma: float = 0.1  # gaussian-kl: the targets' Gaussian smoothing, as a share of the
    # label range (1-5: 0.4, 0-10: 1.0 in label units)
    system_weight: float = 0.0  # weight of the system-level soft Spearman (kind "system",
    # train/system_level.py) added beside any other kind's own term; 0 = none
    batch_by: str = "random"  # what the member's batches hold: "random" rows (paper), or
    # whole "prompt" or "system" groups (train/groups.py); members of one run may differ
    loss_weighting: str = "fixed"  # "fixed": regression + ranking term (paper); "uncertainty":
    # the two weighted by learned homoscedastic uncertainty, per head (train/objective.py)
    pool: str = "mean"  # per-window features: "mean" = train on windows, a clip's prediction
    # their length-weighted mean (paper, Audiobox-Aesthetics); "attention" = train on clips,
    # a learned attention over each clip's windows (train/pooling.py); members may differ
    pair_weight: float = 0.0  # weight of the Bradley-Terry term on preference pairs
    # (TrainConfig.pairs; train/pairs_term.py) beside the member's other terms; 0 = none

    def __post_init__(self):
        _choice("loss", self.kind, LOSS_KINDS)
        _choice("norm", self.norm, ("batch", "range"))
        _choice("quality_weight", self.quality_weight, QUALITY_WEIGHTS)
        _choice("regression", self.regression, ("huber", "mse", "mse+mae"))
        _at_least("alpha", self.alpha, 0)
        _at_least("margin", self.margin, 0)
        _above("beta", self.beta, 0)
        _above("huber_delta", self.huber_delta, 0)
        _at_least("rank_weight", self.rank_weight, 0)
        _at_least("regression_weight", self.regression_weight, 0)
        if self.regression_weight == 0:
            if self.kind == "none" and not self.system_weight and not self.pair_weight:
                raise QamroError("--regression-weight 0 leaves --loss none nothing to train "
                                 "on: add a ranking term, --system-weight or --pair-weight")
            if self.loss_weighting == "uncertainty":
                raise QamroError("--regression-weight 0 with --loss-weighting uncertainty: "
                                 "there is no regression term to weigh")
        _above("temperature", self.temperature, 0)
        _above("tau", self.tau, 0)
        _above("sigma", self.sigma, 0)
        _at_least("system_weight", self.system_weight, 0)
        _at_least("pair_weight", self.pair_weight, 0)
        _choice("batch-by", self.batch_by, BATCH_BY)
        _choice("loss-weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        _choice("pool", self.pool, POOLS)
        if self.pool == "attention" and self.kind == "gaussian-kl":
            raise QamroError("--pool attention pools the windows' predicted scores; "
                             "gaussian-kl trains a distribution per row, which it does not "
                             "pool: use --pool mean with it")
        if self.kind == "system" and self.system_weight:
            raise QamroError("--system-weight adds the system-level term beside another kind; "
                             "--loss system is that term alone")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int):
            raise QamroError(f"--bins {self.bins!r}: give a whole number of bins")
        _at_least("bins", self.bins, 2)
        check_label_range(self.label_range)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"  # "sgd" (paper; with momentum) or "adamw" (published track 2 code)
    lr: float = 5e-4  # learning rate (paper: SGD 5e-4; published track 2: AdamW 1e-5)
    momentum: float = 0.9  # SGD momentum (the published code adds 0.9)
    weight_decay: float = 0.0  # decoupled weight decay of AdamW (published track 2: 0.01)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (beta1, beta2): torch's defaults
    adam_eps: float = 1e-8  # AdamW's eps: torch's default
    batch_size: int = 256  # paper; rows per step: clips, or windows of per-window features
    # with train_windows "all"
    train_windows: str = "all"  # per-window features (AES-Natural): "all" = every cached
    # window is a training row with its clip's label (long clips weigh by their length);
    # "one-per-clip" = each epoch one window per clip, drawn per member (published track 2:
    # one random 10 s crop per clip per epoch), validated on one window per clip fixed by
    # split_seed. Clip-level features: the two are the same
    val_batch_size: int | None = None  # chunks of the validation loss; None = batch_size
    # (published code: 8; the ranking term is a mini-batch loss, so this changes its value)
    max_epochs: int = 1000  # paper
    patience: int = 20  # early stopping on validation loss (paper)
    val_split: str = "holdout"  # "holdout": a part of train; or a split name ("dev" =
    # published code)
    val_fraction: float = 0.1  # share of train held out when val_split="holdout"
    split_seed: int = 0  # which train rows are held out: fixed, so all members share them
    eval_split: str = "dev"  # the split metrics are reported on
    eval_fraction: float = 0.2  # where the cache has no eval_split "dev" at all (a manifest
    # without a split column): the share of train held out as the report split instead,
    # whole systems where clips have them (train/holdout.py), chosen by split_seed
    hidden: tuple[int, ...] = (256, 64)  # MLP widths before the output unit (paper: 256, 64, 1)
    activation: str = "relu"  # nonlinearity between layers ("relu", "gelu" or "none" = published)
    device: str = "auto"  # "auto" = cuda when present, else cpu
    threads: int | None = None  # torch's CPU threads while training; None = torch's own
    # choice (one per core). Changes no number (tested); on a CPU shared with other work,
    # 1 can be several times faster (README, "Speed and memory")
    bootstrap: int = 1000  # resamples of systems for the 95% confidence intervals
    top_tier: float = 4.0  # the top tier: label >= this (label units), for top-tier F1.
    # The song-aesthetics challenge's (ICASSP 2026) "Top-Tier Accuracy" splits top and
    # non-top songs at a threshold; the 2nd-placed team's evaluation code (HEAR) uses 4.0
    # for Overall Musicality on the same 1-5 MOS scale as MusicEval (docs/beyond.md). The
    # aes-natural recipes set 7.5: the same three quarters of their 0-10 range
    top_k: int = 5  # precision@k of the system ranking: the top 5 systems (a choice)
    check_every: int | None = None  # epochs between host syncs (progress, dropping members
    # that stopped, saving); None = 1 on the CPU, 10 on a GPU. Changes no member's numbers
    compact: bool = True  # drop members that stopped from the batch (False: they keep stepping)
    checkpoint_seconds: float = 10.0  # seconds between saves of the training state (resume)
    cuda_graph: bool = True  # on CUDA, capture one epoch as a graph and replay it
    matmul_precision: str = "highest"  # "highest" = fp32 matmuls; "high" = TF32 where the
    # GPU has it (several times faster; numbers move by ~1e-3, see tests/train/test_gpu.py)
    init: str = "random"  # "random": seeded per member; "release": every member starts from
    # the released Audiobox-Aesthetics heads (published track 2 code), seeds shuffle only
    label_stats: str = "train"  # heads that standardise use the train split's mean and std,
    # or "release": the released model's target_transform (published track 2 code)
    release_checkpoint: str | None = None  # the release file for init/label_stats "release";
    # None = the file the cache was extracted from (its provenance names it and its sha256)
    pairs: str | None = None  # a labelled pairs file (pairs_file.py) whose pairs of
    # training clips train the members with a pair_weight (train/pairs_term.py); its sha256,
    # not its place, is in the resume fingerprint
    pair_head: str | None = None  # the head the pairs train; None = every head

    def __post_init__(self):
        _choice("activation", self.activation, ("relu", "gelu", "none"))
        _choice("matmul_precision", self.matmul_precision, ("highest", "high"))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("init", self.init, INITS)
        _choice("label_stats", self.label_stats, LABEL_STATS)
        _choice("train_windows", self.train_windows, TRAIN_WINDOWS)
        if self.init == "release" and self.label_stats != "release":
            # the released heads output scores standardised by the release's target transform:
            # de-standardised by other statistics they do not start where the release is
            raise QamroError("--init release needs --label-stats release: the released heads "
                             "output scores standardised by the release's own mean and std")
        if self.release_checkpoint is not None and "release" not in (self.init,
                                                                     self.label_stats):
            raise QamroError("--release-checkpoint is read only with --init release or "
                             "--label-stats release")
        check_device(self.device)
        if self.threads is not None:
            if isinstance(self.threads, bool) or not isinstance(self.threads, int):
                raise QamroError(f"--threads {self.threads!r}: give a whole number")
            _at_least("threads", self.threads, 1)
        _above("lr", self.lr, 0)
        _at_most("lr", self.lr, FLOAT32_MAX)
        if not 0 <= self.momentum < 1:
            raise QamroError(f"momentum {self.momentum:g}: must be in [0, 1)")
        _at_least("batch_size", self.batch_size, 2)  # a ranking loss needs a pair
        for name in ("max_epochs", "patience"):
            _at_least(name, getattr(self, name), 1)
        if self.check_every is not None:
            _at_least("check_every", self.check_every, 1)
        if self.val_batch_size is not None:
            _at_least("val_batch_size", self.val_batch_size, 2)
        _at_least("weight_decay", self.weight_decay, 0)
        _at_most("weight_decay", self.weight_decay, FLOAT32_MAX)
        _at_least("checkpoint_seconds", self.checkpoint_seconds, 0)
        if not (all(0 <= b < 1 for b in self.adam_betas) and self.adam_eps > 0):
            raise QamroError(f"adam_betas {self.adam_betas} must be in [0, 1) and adam_eps "
                             f"{self.adam_eps:g} above 0")
        _at_least("bootstrap", self.bootstrap, 0)
        _number("top_tier", self.top_tier)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise QamroError(f"--top-k {self.top_k!r}: give a whole number of systems")
        _at_least("top_k", self.top_k, 1)
        for name in ("val_fraction", "eval_fraction"):
            if not 0 < _number(name, getattr(self, name)) < 1:
                raise QamroError(f"{name} {getattr(self, name):g}: must be in (0, 1)")
        if not self.hidden or any(int(w) != w or w < 1 for w in self.hidden):
            raise QamroError(f"hidden {list(self.hidden)}: layer widths must be whole numbers >= 1")
        for name in ("val_split", "eval_split"):
            if not getattr(self, name):
                raise QamroError(f"{_option(name)} is empty: name a split")


@dataclass(frozen=True)
class Member:
    """One configuration of a batched run: a loss setting and a seed."""

    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0

    def label(self) -> str:
        return member_label(self.loss, self.seed)


@dataclass(frozen=True)
class CVConfig:
    """Grouped K-fold cross-validation (`--cv K`): sklearn's GroupKFold over the labelled
    clips of the train split and the eval split."""

    folds: int  # K >= 2: each fold trains on the other K-1 and reports on its own clips
    group: str = "system"  # held out whole: "system" (unseen systems), "prompt" (unseen
    # prompts: MusicEval's _P<n> in the clip id, else the clip's text) or "clip" (plain K-fold)

    def __post_init__(self):
        if isinstance(self.folds, bool) or not isinstance(self.folds, int):
            raise QamroError(f"--cv {self.folds!r}: give a whole number of folds")
        _at_least("cv", self.folds, 2)
        _choice("cv-group", self.group, CV_GROUPS)


@dataclass(frozen=True)
class ExtractConfig:
    backbone: str = "clap-music"  # registry name of the frozen model
    checkpoint: str | None = None  # weights file; None = the backbone's release (downloaded online)
    tokenizer_dir: str | None = None  # text tokenizer files for offline CLAP text embeddings
    device: str = "auto"  # "auto" = cuda when present, else cpu
    precision: str = "fp32"  # "fp32", or "bf16"/"fp16" on request (recorded in the cache)
    batch_size: int | None = None  # windows per forward pass; None = EXTRACT_BATCH by device
    workers: int | None = None  # processes decoding and resampling audio; None = by device
    # (extract.auto_workers); 0 = decode in the main process
    offline: bool | None = None  # None = from HF_HUB_OFFLINE / QAMRO_OFFLINE
    skip_bad: bool = False  # list undecodable files in /skipped instead of stopping
    clap_input: str = "resampled"  # clap-music's input: "resampled" to 48 kHz in 10 s windows,
    # or "published": the file's samples at its own rate, the first 480,000, read as 48 kHz
    # (the published track 1 code and the MusicEval baseline; a cache of its own)
    keep_windows: bool = False  # also write each window's row of the audio features a
    # backbone pools per clip (CLAP, melstats), beside the pooled row: what --pool attention
    # reads (train/pooling.py); mean-pooled runs read the pooled row as before

    def __post_init__(self):
        check_device(self.device)
        _choice("clap_input", self.clap_input, CLAP_INPUTS)
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.batch_size is not None:
            _at_least("batch_size", self.batch_size, 1)
        if self.workers is not None:
            _at_least("workers", self.workers, 0)


# -- the checks behind every dataclass above: one line naming the setting and its rule ------
_NO_OPTION = ("momentum", "val_fraction", "eval_fraction", "check_every", "bootstrap",
              "huber_delta", "rank_weight", "checkpoint_seconds")  # settings only a recipe or
# library call sets


def _option(name: str) -> str:
    """How a user sets it: batch_size -> --batch-size; a recipe-only setting by its name."""
    return name if name in _NO_OPTION else "--" + name.replace("_", "-")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or math.isinf(value):
        raise QamroError(f"{_option(name)} {value!r}: must be a finite number")
    return value


FLOAT32_MAX = 3.4028234663852886e38  # the optimiser's settings meet float32 weights


def _at_most(name: str, value, most) -> None:
    if _number(name, value) > most:
        raise QamroError(f"{_option(name)} {value:g}: must be at most {most:.3g} (the "
                         f"largest float32, the weights' type)")


def _at_least(name: str, value, least) -> None:
    if _number(name, value) < least:
        raise QamroError(f"{_option(name)} {value:g}: must be at least {least:g}")


def _above(name: str, value, bound) -> None:
    if _number(name, value) <= bound:
        raise QamroError(f"{_option(name)} {value:g}: must be greater than {bound:g}")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise QamroError(f"unknown {name} {value!r}; use {', '.join(allowed)}")


def check_device(device: str) -> None:
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise QamroError(f"unknown device {device!r}; use {DEVICE_HELP}")


def check_label_range(label_range, where: str = "label_range") -> None:
    """A declared label scale (lo, hi): two finite numbers, lo < hi; None = not declared."""
    if label_range is None:
        return
    try:
        lo, hi = (float(v) for v in label_range)
    except (TypeError, ValueError):
        raise QamroError(f"{where} {label_range!r}: must be two numbers [lo, hi]") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise QamroError(f"{where} [{lo:g}, {hi:g}]: must be finite with lo < hi")


def check_used(kinds, given) -> None:
    """Refuse loss settings that none of the chosen loss kinds reads (`--loss mr --beta 7`
    would silently train without beta). `given` names the settings the user gave."""
    kinds = [k for k in kinds if k in USED_SETTINGS]
    # the system-level term that --system-weight adds beside any kind reads its settings too
    readers = [*kinds, "system"] if "system_weight" in given else kinds
    for name in given:
        users = [k for k, used in USED_SETTINGS.items() if name in used]
        if users and not any(k in users for k in readers):
            raise QamroError(f"{_option(name)} is not used by --loss {','.join(kinds)}; it "
                             f"applies to --loss {' or '.join(users)} only")


def check_seeds(seeds) -> None:
    """A seed count (>= 1) or an explicit list of seeds (at least one, no repeats)."""
    if isinstance(seeds, bool):
        raise QamroError(f"--seeds {seeds!r}: give a count or a list of seeds")
    if isinstance(seeds, int):
        _at_least("seeds", seeds, 1)
        return
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or \
            any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise QamroError(f"--seeds {seeds!r}: give a count or a list of distinct whole numbers")


def to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def tuples(data: dict[str, Any]) -> dict[str, Any]:
    """JSON or TOML values as the frozen dataclasses hold them: lists become tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def from_jsonable(cls, data: dict[str, Any]):
    """The dataclass `cls` from what to_jsonable wrote (config.json, a recipe's table)."""
    return cls(**tuples(data))


def member_from_jsonable(data: dict[str, Any]) -> Member:
    """A member as config.json records it: {"loss": {...}, "seed": N}."""
    return Member(from_jsonable(LossConfig, data["loss"]), data["seed"])


def override(cfg, **changes):
    """`replace` that ignores None (an option the user did not give) and unknown keys fail."""
    names = {f.name for f in fields(cfg)}
    unknown = set(changes) - names
    if unknown:
        raise QamroError(f"unknown {type(cfg).__name__} settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in changes.items() if v is not None}
    return replace(cfg, **given) if given else cfg
