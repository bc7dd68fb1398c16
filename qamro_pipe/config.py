"""Every default of the project, once. The CLI reads these; it never restates one."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import QamroError

LOSS_KINDS = ("qamro", "mr", "none")
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_RECIPE = "musiceval"  # what `train` and `sweep` do when told nothing


def cache_root() -> Path:
    """Where caches and runs live: $QAMRO_CACHE_DIR, else ./cache."""
    return Path(os.environ.get("QAMRO_CACHE_DIR", "cache"))


@dataclass(frozen=True)
class LossConfig:
    kind: str = "qamro"  # ranking term: "qamro" (paper), "mr" (fixed margin), "none" (regression only)
    alpha: float = 0.2  # QAMRO margin scale: margin = alpha * |y_i - y_j|
    beta: float = 7.0  # quality preference: q_ij = 1 + (beta-1) max(ny_i, ny_j); 1 = no weighting
    margin: float = 0.1  # fixed margin of "mr" (the w/o-adaptive-margin ablation)
    norm: str = "batch"  # how ny is normalised: "batch" min/max (published code) or "range"
    label_range: tuple[float, float] | None = None  # (lo, hi) for norm="range"; None = the recipe's
    regression: str = "huber"  # regression term: "huber", "mse" or "mse+mae"
    huber_delta: float = 1.0  # torch's HuberLoss default, as the published code uses it
    rank_weight: float = 1.0  # weight of the ranking term (published: 1)

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise QamroError(f"unknown loss {self.kind!r}; use one of {', '.join(LOSS_KINDS)}")
        if self.norm not in ("batch", "range"):
            raise QamroError(f"unknown norm {self.norm!r}; use batch or range")
        if self.regression not in ("huber", "mse", "mse+mae"):
            raise QamroError(f"unknown regression loss {self.regression!r}")


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"  # "sgd" (paper; with momentum) or "adamw" (published track 2 code)
    lr: float = 5e-4  # learning rate (paper: SGD 5e-4; published track 2: AdamW 1e-5)
    momentum: float = 0.9  # SGD momentum (the published code adds 0.9)
    weight_decay: float = 0.0  # decoupled weight decay of AdamW (published track 2: 0.01)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (beta1, beta2): torch's defaults
    adam_eps: float = 1e-8  # AdamW's eps: torch's default
    batch_size: int = 256  # paper
    val_batch_size: int | None = None  # chunks of the validation loss; None = batch_size
    # (published code: 8; the ranking term is a mini-batch loss, so this changes its value)
    max_epochs: int = 1000  # paper
    patience: int = 20  # early stopping on validation loss (paper)
    val_split: str = "holdout"  # "holdout": a part of train; or a split name ("dev" = published code)
    val_fraction: float = 0.1  # share of train held out when val_split="holdout"
    split_seed: int = 0  # which train rows are held out: fixed, so all members share them
    eval_split: str = "dev"  # the split metrics are reported on
    hidden: tuple[int, ...] = (256, 64)  # MLP widths before the output unit (paper: 256, 64, 1)
    activation: str = "relu"  # nonlinearity between layers ("relu", "gelu" or "none" = published)
    device: str = "auto"  # "auto" = cuda when present, else cpu
    bootstrap: int = 1000  # resamples of systems for the 95% confidence intervals
    check_every: int | None = None  # epochs between host syncs (progress, dropping members
    # that stopped, saving); None = 1 on the CPU, 10 on a GPU. Changes no member's numbers
    compact: bool = True  # drop members that stopped from the batch (False: they keep stepping)
    checkpoint_seconds: float = 10.0  # seconds between saves of the training state (resume)
    cuda_graph: bool = True  # on CUDA, capture one epoch as a graph and replay it
    matmul_precision: str = "highest"  # "highest" = fp32 matmuls; "high" = TF32 where the
    # GPU has it (several times faster; numbers move by ~1e-3, see tests/test_gpu.py)
    pair_kernel: str = "torch"  # "triton": the pair loss as one fused kernel (CUDA; opt-in
    # until measured faster on a GPU, see docs/benchmarks.md)

    def __post_init__(self):
        if self.activation not in ("relu", "gelu", "none"):
            raise QamroError(f"unknown activation {self.activation!r}; use relu, gelu or none")
        if self.matmul_precision not in ("highest", "high", "medium"):
            raise QamroError(f"unknown matmul_precision {self.matmul_precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise QamroError(f"unknown optimizer {self.optimizer!r}; use {' or '.join(OPTIMIZERS)}")
        if self.pair_kernel not in ("torch", "triton"):
            raise QamroError(f"unknown pair_kernel {self.pair_kernel!r}; use torch or triton")
        if not 0 < self.val_fraction < 1:
            raise QamroError("val_fraction must be in (0, 1)")


@dataclass(frozen=True)
class Member:
    """One configuration of a batched run: a loss setting and a seed."""

    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0

    def label(self) -> str:
        loss = self.loss
        if loss.kind == "qamro":
            return f"qamro a={loss.alpha:g} b={loss.beta:g} seed={self.seed}"
        if loss.kind == "mr":
            return f"mr m={loss.margin:g} seed={self.seed}"
        return f"none seed={self.seed}"


@dataclass(frozen=True)
class ExtractConfig:
    backbone: str = "clap-music"  # registry name of the frozen model
    checkpoint: str | None = None  # weights file; None = the backbone's release (downloaded online)
    tokenizer_dir: str | None = None  # text tokenizer files for offline CLAP text embeddings
    device: str = "auto"  # "auto" = cuda when present, else cpu
    precision: str = "fp32"  # "fp32", or "bf16"/"fp16" on request (recorded in the cache)
    batch_size: int | None = None  # windows per forward pass; None = 64 on a GPU, 16 on CPU
    workers: int | None = None  # processes decoding and resampling audio; None = by device
    # (extract.auto_workers); 0 = decode in the main process
    offline: bool | None = None  # None = from HF_HUB_OFFLINE / QAMRO_OFFLINE
    skip_bad: bool = False  # list undecodable files in /skipped instead of stopping


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


def override(cfg, **changes):
    """`replace` that ignores None (an option the user did not give) and unknown keys fail."""
    names = {f.name for f in fields(cfg)}
    unknown = set(changes) - names
    if unknown:
        raise QamroError(f"unknown {type(cfg).__name__} settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in changes.items() if v is not None}
    return replace(cfg, **given) if given else cfg
