"""Stage 2: train K batched members of every head on cached features.

All data lives on the device as tensors; each epoch draws one permutation per member from a
counter-based hash of (member seed, epoch), so a member's numbers depend only on its own
config and seed. Each member early-stops on its own and keeps its best weights; members that
stopped leave the batch (the engine is rebuilt without them), so they cost nothing. The whole
state can be saved every few seconds and resumed, value for value (state.py)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import POOLS, Member, TrainConfig
from ..errors import Interrupted, QamroError
from ..loss_kinds import uses_system_term
from ..store.reader import Cache
from .aes_release import ReleasedHeads, read_release
from .distribution import output_bins, smoothed_targets
from .engine import Context, Engine, InputPlan
from .groups import train_groups
from .heads import EXTRAS, BatchedMLP, HeadSpec
from .inputs import (
    Units,
    build_head,
    column_order,
    head_inputs,
    input_width,
    label_col,
    label_stats,
    pools,
    predict_clips,
    units_for,
    weighting_terms,
)
from .optim import optimizer_buffers
from .pairs_term import pair_context
from .pooling import WindowIndex
from .state import TrainState


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QamroError(f"--device {device}: no CUDA device is available")
    return torch.device(device)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """torch's CPU threads set to `n` for the block (None: left as they are), then restored:
    no global state outlives a training call."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _with_threads(fn):
    """Run `train` under its config's `threads` (cpu_threads)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        with cpu_threads(bound.arguments["cfg"].threads):
            return fn(*bound.args, **bound.kwargs)
    return wrapped


@dataclass
class Split:
    train: np.ndarray  # row indices into the cache
    val: np.ndarray
    eval: np.ndarray
    val_source: str  # "holdout (10% of train)" or a split name


def make_split(cache: Cache, heads: tuple[HeadSpec, ...], cfg: TrainConfig) -> Split:
    label_cols = [label_col(cache, h) for h in heads]
    labelled = np.isfinite(cache.labels[:, label_cols]).any(axis=1)
    train = np.intersect1d(cache.rows("train"), np.flatnonzero(labelled))
    if cfg.val_split == "holdout":
        rng = np.random.default_rng(cfg.split_seed)
        n_val = max(1, int(round(cfg.val_fraction * len(train))))
        val = np.sort(rng.permutation(train)[:n_val])
        train = np.setdiff1d(train, val)
        source = f"holdout ({cfg.val_fraction:.0%} of train, split_seed {cfg.split_seed})"
    else:
        val = np.intersect1d(cache.rows(cfg.val_split), np.flatnonzero(labelled))
        source = cfg.val_split
    ev = cache.rows(cfg.eval_split)
    here = ', '.join(sorted(set(cache.splits)))
    for what, rows, fix in (("train", train, "give clips the split 'train' and a score"),
                            (f"validation ({source})", val, "use --val-split holdout or a "
                             "split of those")):
        if len(rows) == 0:
            raise QamroError(f"{cache.path}: the {what} split has no labelled rows "
                             f"(splits here: {here}); {fix}")
    if len(ev) == 0:
        raise missing_eval_split(cache, cfg)
    return Split(train=train, val=val, eval=ev, val_source=source)


def missing_eval_split(cache: Cache, cfg: TrainConfig) -> QamroError:
    """The one-line refusal of a run whose report split is not in the cache, naming the option
    that reports on a split that is (AES-Natural without its eval package: the published
    train and dev lists alone have no eval split)."""
    here = sorted(set(cache.splits))
    other = [s for s in here if s != "train"]
    fix = (f"; report on another split with --eval-split {other[0]}" if other
           else "; name one with --eval-split")
    if other and other[0] == cfg.val_split:
        fix += " (it is also the validation split: its figures are optimistic)"
    if cache.meta.dataset == "aes-natural" and cfg.eval_split == "eval":
        fix += (", or extract the eval package (audiomos2025-track2-eval-phase/DATA/, "
                "--eval-dir) into the cache")
    return QamroError(f"{cache.path}: eval split {cfg.eval_split!r} has no rows (splits here: "
                      f"{', '.join(here)}){fix}")


@dataclass
class TrainResult:
    members: list[Member]
    heads: tuple[HeadSpec, ...]
    split: Split
    predictions: dict[str, np.ndarray]  # head -> [K, N] for every cache row
    states: dict[str, list[dict[str, torch.Tensor]]]  # head -> per member state dict
    best_epoch: list[int]
    stopped_epoch: list[int]
    best_val_loss: list[float]
    failures: dict[int, str]  # member index -> why it has no usable model
    warnings: dict[int, str]  # member index -> why it stopped early but kept a model
    label_stats: dict[str, tuple[float, float]]  # head -> (mean, std) its outputs are scaled by
    device: str
    seconds: float  # training time, earlier processes' included when resumed
    epochs_run: int
    member_epochs: int = 0  # epochs computed, summed over members (members that stopped
    # early cost none after their stop)
    history: np.ndarray = field(default_factory=lambda: np.zeros((0, 8)))  # state.py's rows
    resumed_from: int = 0  # the epoch a resumed run started from (0: from scratch)
    release: dict | None = None  # the release checkpoint read (file, sha256, what for)

    @property
    def usable(self) -> list[int]:
        return usable_members(len(self.members), self.failures)


def usable_members(n: int, failed) -> list[int]:
    """The indices of n members less those that failed (a set or dict of indices): the
    members whose predictions and weights are written and scored."""
    return [k for k in range(n) if k not in failed]


@dataclass(frozen=True)
class Progress:
    """What a progress display is told after each sync with the device."""

    epoch: int
    max_epochs: int
    training: int  # members still training
    members: int
    best_val: float  # lowest best validation loss among all members so far
    member_epochs: int  # epochs computed so far, summed over members
    rate: float  # member-epochs per second in this process


@dataclass
class Checkpoint:
    """Where and how often to save the training state, and the state to resume from."""

    path: Path  # the state file (inside the run's partial folder)
    fingerprint: str  # what the run is; a state with another one is never resumed
    every: float = 10.0  # seconds between saves
    resume: TrainState | None = None


@_with_threads
def train(cache: Cache, heads: tuple[HeadSpec, ...], members: list[Member],
          cfg: TrainConfig = TrainConfig(), label_range=None,
          progress: Callable[[Progress], None] | None = None,
          checkpoint: Checkpoint | None = None,
          release: ReleasedHeads | None = None) -> TrainResult:
    """Train every member of every head on `cache`; returns best-weight predictions.
    `release`: the released heads for cfg.init / cfg.label_stats "release" (read from the
    cache's checkpoint when not given)."""
    if not members:
        raise QamroError("nothing to train: no members")
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    split = make_split(cache, heads, cfg)
    seeds = [m.seed for m in members]
    for h in heads:
        if not np.isfinite(cache.labels[split.train, label_col(cache, h)]).any():
            raise QamroError(f"{cache.path}: labels of head {h.name!r} are all NaN in train")
    uses_release = [w for w, v in (("init", cfg.init), ("label_stats", cfg.label_stats))
                    if v == "release"]
    if uses_release and release is None:
        release = read_release(cache, cfg.release_checkpoint)
    axis = release.for_heads(heads) if uses_release else {}
    stats = {h.name: label_stats(cache, h, split.train) for h in heads}
    if cfg.label_stats == "release":  # the published track 2 code's (mean, std)
        stats = {h.name: release.stats[axis[h.name]] if h.standardize else (0.0, 1.0)
                 for h in heads}
    member_pools = [m.loss.pool for m in members]
    # one context per pool the members ask for: the mean pool's units are windows (or
    # clips), attention's are clips read through their windows (pooling.py)
    ctxs = {pool: _context(cache, heads, members, cfg, split, stats, label_range, device, pool)
            for pool in dict.fromkeys(sorted(member_pools, key=POOLS.index))}
    first = next(iter(ctxs.values()))
    models = {h.name: build_head(h, seeds, first.x_shapes[h.name], cfg,
                                 n_terms=weighting_terms(members), pools=pools(members),
                                 **first.bins_of(h, range(len(members)))) for h in heads}
    state = checkpoint.resume if checkpoint and checkpoint.resume else TrainState.fresh(
        initial_weights(models, release if cfg.init == "release" else None, axis),
        optimizer_buffers(cfg), cfg.max_epochs)
    resumed_from, spent = state.epoch, state.seconds
    with _matmul_precision(cfg.matmul_precision):
        _fit(ctxs, state, progress, checkpoint)
        with torch.no_grad():
            preds = {}
            for h in heads:
                model = models[h.name].to(device)
                model.set_by_member(state.best[h.name].to(device))
                preds[h.name] = predict_clips(
                    model, {pool: (ctx.plan[h.features][0], ctx.units)
                            for pool, ctx in ctxs.items()}, member_pools, stats[h.name])
    failures, warnings = _outcomes(members, state)
    return TrainResult(
        members=members, heads=heads, split=split, predictions=preds,
        states={h.name: [models[h.name].member_state(i) for i in range(len(members))]
                for h in heads},
        best_epoch=state.best_epoch.tolist(), stopped_epoch=state.stopped.tolist(),
        best_val_loss=state.best_val.tolist(), failures=failures, warnings=warnings,
        label_stats=stats, device=str(device), epochs_run=state.epoch,
        seconds=spent + time.perf_counter() - t0,
        member_epochs=state.member_epochs, history=state.history_array(),
        resumed_from=resumed_from,
        release=release.record(uses_release) if uses_release else None)


def _context(cache: Cache, heads, members: list[Member], cfg: TrainConfig, split: Split,
             stats: dict, label_range, device, pool: str) -> Context:
    """What the engines of the members that pool by `pool` share. Every context holds all
    of the run's members (the heads' layout is the run's) and `group`, the members it
    trains. Attention pooling trains on clips (that have windows), and reads their windows
    through `windows` (pooling.WindowIndex)."""
    units = units_for(cache, heads, pool)
    plan = _inputs(cache, heads, device, pool)
    group = [i for i, m in enumerate(members) if m.loss.pool == pool]
    mine = [members[i] for i in group]
    rows = units
    extra: dict = {}
    if pool == "attention":
        rows = Units(len(cache.ids))  # clips; only those with windows are trained on
        has = np.diff(cache.window_offsets) > 0
        split = replace(split, train=split.train[has[split.train]], val=split.val[has[split.val]])
        extra["windows"] = WindowIndex.of(cache, device)
    dist = distribution_targets(cache, heads, rows, members, label_range, device)
    if dist and not any(m.loss.kind == "gaussian-kl" for m in mine):
        dist["P"] = None  # the bins shape every head of the run; no member here reads them
    return Context(
        heads=heads, members=list(members), group=np.asarray(group, dtype=np.int64),
        plan=plan, units=units,
        x_shapes={h.name: tuple(plan[h.features][0].shape) for h in heads},
        Y={h.name: torch.from_numpy(np.ascontiguousarray(rows.per_unit(
            cache.labels[:, label_col(cache, h)]))).to(device) for h in heads},
        **_rows(rows, split, cfg, device),
        stats=[stats[h.name] for h in heads], label_range=label_range, cfg=cfg, device=device,
        train_groups=_groups(cache, split.train, rows, mine, cfg, device),
        **_systems(cache, split.train, rows, mine, device),
        **pair_context(cache, split, rows, heads, mine, cfg, device), **dist, **extra)


def _rows(units: Units, split: Split, cfg: TrainConfig, device) -> dict[str, torch.Tensor]:
    """Context's training and validation rows: every unit of the clips, or with
    train_windows "one-per-clip" (per-window features) each training clip's first window
    and its window count (the engine draws one per member per epoch) and one window per
    validation clip, fixed by split_seed."""
    if not one_per_clip(cfg, units):
        return {"train_rows": torch.from_numpy(units.of_clips(split.train)).to(device),
                "val_rows": torch.from_numpy(units.of_clips(split.val)).to(device)}
    first, count = units.windows_of(split.train)
    return {"train_rows": torch.from_numpy(first).to(device),
            "train_windows": torch.from_numpy(count.astype(np.int64)).to(device),
            "val_rows": torch.from_numpy(units.fixed_windows(split.val, cfg.split_seed))
            .to(device)}


def _groups(cache: Cache, train_clips: np.ndarray, units, members, cfg: TrainConfig,
            device) -> dict:
    """"prompt"/"system" -> [n] group of each training unit, on the device, for each way of
    batching some member asks for (the training rows _rows gives: every unit of the train
    clips, or each clip's first window when an epoch draws one window per clip)."""
    rows = (units.windows_of(train_clips)[0] if one_per_clip(cfg, units)
            else units.of_clips(train_clips))
    return {by: torch.from_numpy(train_groups(cache, train_clips, units.clip_of, by)[rows])
            .to(device)
            for by in sorted({m.loss.batch_by for m in members} - {"random"})}


def _systems(cache: Cache, train_clips: np.ndarray, units, members, device) -> dict:
    """Context's systems and n_systems where a member uses the system-level term: each
    unit's system index (-1: a clip without a system), numbered over the training clips'
    systems (a system seen only outside training has no use in a training batch)."""
    if not any(uses_system_term(m.loss) for m in members):
        return {}
    names = np.unique(cache.systems[train_clips])
    names = names[names != ""]
    index = {s: i for i, s in enumerate(names)}
    per_clip = np.array([index.get(s, -1) for s in cache.systems], dtype=np.int64)
    return {"systems": torch.from_numpy(units.per_unit(per_clip)).to(device),
            "n_systems": len(names)}


def one_per_clip(cfg: TrainConfig, units: Units) -> bool:
    """Whether an epoch draws one window per training clip (per-window features only)."""
    return cfg.train_windows != "all" and units.clip_of is not None


def initial_weights(models: dict[str, BatchedMLP], release: ReleasedHeads | None,
                    axis: dict[str, str]) -> dict[str, torch.Tensor]:
    """head -> [K, P] weights training starts from: each member's own seeded ones, or with
    `release` the released head of the head's axis for every member (seeds then decide only
    the shuffling), refused when the head is not shaped like the release's."""
    if release is None:
        return {h: m.by_member().detach() for h, m in models.items()}
    out = {}
    for h, m in models.items():
        theirs = release.heads[axis[h]]
        core = [e for e in m.layout if e[0] not in EXTRAS]  # loss weights, pooling: ours
        if core != theirs.layout or m.activation != theirs.activation:
            raise QamroError(f"--init release: head {h!r} is not shaped like the released "
                             f"{axis[h]} head (ours: {_shape(m)}; the release's: "
                             f"{_shape(theirs)}); give it the release's shape, as the "
                             f"aes-natural recipe does")
        rows = theirs.by_member().detach().expand(m.k, -1)
        extra = m.by_member().detach()[:, rows.shape[1]:]  # EXTRAS, last: start at 0
        out[h] = torch.cat([rows, extra], dim=1)
    return out


def _shape(m: BatchedMLP) -> str:
    dims = [m.in_dim, *m.hidden, 1]
    return (f"{m.n_layers} layers x " if m.n_layers else "") + " -> ".join(map(str, dims)) + \
        (", LayerNorm" if m.layer_norm else "") + f", {m.activation}"


def distribution_targets(cache: Cache, heads, units, members, label_range, device) -> dict:
    """Context's `bins` and `P` (per head [U, n] target distributions) when a member is
    gaussian-kl (distribution.py), else {}."""
    bins = output_bins(members, label_range)
    if bins is None:
        return {}
    centres = np.asarray(bins.centres)
    P = {}
    for h in heads:
        labels = cache.labels[:, label_col(cache, h)]
        ratings = cache.ratings.get(h.label)
        t = smoothed_targets(labels, ratings, centres, bins.sigma)  # [N, n]
        P[h.name] = torch.from_numpy(units.per_unit(t).astype(np.float32)).to(device)
    return {"bins": bins, "P": P}


def _outcomes(members: list[Member], state: TrainState) -> tuple[dict, dict]:
    """Members whose loss turned NaN or inf: failed (no model) or warned (kept a model)."""
    failures, warnings = {}, {}
    fin, be, stopped = state.finite.numpy(), state.best_epoch.numpy(), state.stopped.numpy()
    for i in np.flatnonzero(~fin):
        why = f"{members[i].label()}: loss became NaN or inf at epoch {int(stopped[i])}"
        if be[i] == 0:
            failures[int(i)] = why + " before any validation improvement; no model kept"
        else:
            warnings[int(i)] = why + f"; stopped, keeping the weights of epoch {int(be[i])}"
    return failures, warnings


def _fit(ctxs: dict[str, Context], state: TrainState, progress,
         checkpoint: Checkpoint | None) -> None:
    """Epochs until every member stopped or max_epochs, in chunks of check_every between
    syncs; each context's engine (one per pool the members ask for) runs the chunk's epochs
    for its members, and is rebuilt without members that stopped; the state is saved every
    `checkpoint.every` seconds. A first Ctrl-C finishes the epoch, saves and stops."""
    first = next(iter(ctxs.values()))
    cfg, check = first.cfg, first.check_every
    engines: dict[str, Engine | None] = dict.fromkeys(ctxs)
    t0, spent, done0 = time.perf_counter(), state.seconds, state.member_epochs
    last_save = t0
    with _deferred_sigint() as stop:
        while state.epoch < cfg.max_epochs and bool(state.active.any()):
            epoch = state.epoch
            n = min(check - epoch % check, cfg.max_epochs - epoch)
            for pool, ctx in ctxs.items():
                state.epoch = epoch  # every pool's engine runs the same epochs
                engine = engines[pool]
                subset = _members_to_run(ctx, state, engine)
                if engine is None or not np.array_equal(engine.subset, subset):
                    if engine is not None:
                        engine.store(state)
                    engine = engines[pool] = Engine(ctx, state, subset) if len(subset) \
                        else None
                if engine is None:  # every member of this pool stopped
                    continue
                engine.run(n)
                engine.sync(state, n)
            state.epoch = epoch + n
            now = time.perf_counter()
            state.seconds = spent + now - t0
            if progress:
                progress(Progress(state.epoch, cfg.max_epochs, int(state.active.sum()),
                                  state.k, float(state.best_val.min()), state.member_epochs,
                                  (state.member_epochs - done0) / max(now - t0, 1e-9)))
            if checkpoint and (stop.is_set() or now - last_save >= checkpoint.every):
                _store(engines, state)
                state.save(checkpoint.path, checkpoint.fingerprint)
                last_save = time.perf_counter()
            if stop.is_set():
                raise Interrupted(
                    f"interrupted at epoch {state.epoch}: "
                    + (f"the training state is saved in {checkpoint.path.parent}; rerun the "
                       f"same command to resume" if checkpoint else "nothing was saved"))
        _store(engines, state)
        if checkpoint and any(engines.values()):  # trained: a kill while writing redoes nothing
            state.save(checkpoint.path, checkpoint.fingerprint)


def _store(engines: dict[str, Engine | None], state: TrainState) -> None:
    for engine in engines.values():
        if engine is not None:
            engine.store(state)


def _members_to_run(ctx: Context, state: TrainState, engine: Engine | None) -> np.ndarray:
    """The members the next engine computes. Members that stopped are dropped, so a sweep
    costs the epochs its members actually train. On the CPU at once (an epoch costs in
    proportion to members; rebuilding, a few milliseconds); on a GPU once half of the
    engine's members have stopped (an epoch there is launch-bound, and a rebuild costs a new
    graph capture). compact=False keeps every member stepping (their best weights are kept
    aside either way)."""
    everyone = ctx.group
    if not ctx.cfg.compact:
        return everyone
    active = everyone[state.active.numpy()[everyone]]
    if engine is None or ctx.device.type != "cuda":
        return active
    stopped = len(engine.subset) - np.isin(engine.subset, active).sum()
    return active if 2 * stopped >= len(engine.subset) else engine.subset


@contextlib.contextmanager
def _deferred_sigint():
    """While training: the first Ctrl-C sets the event (the trainer finishes its epoch, saves
    and stops with Interrupted); a second one interrupts at once. Only where Python's own
    handler is installed, in the main thread; elsewhere Ctrl-C behaves as it did."""
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _matmul_precision(value: str):
    """torch's float32 matmul precision for the duration of one training call only."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _inputs(cache: Cache, heads, device, pool: str = "mean") -> InputPlan:
    """Each distinct input of the heads, on the device once: heads reading the same features
    share one matrix (the four AES axes: 4x less), and an input whose columns are the first
    columns of another (the audio head's audio inside the textual head's audio + text; a
    window feature inside that feature + clip features, [U, L, D] in [U, L, D + E]) is a
    view of it, so a step gathers its rows once, for both heads."""
    plan: InputPlan = {}
    for h in sorted(heads, key=lambda h: -len(h.features)):
        if h.features in plan:
            continue
        cols = column_order(cache, h.features, pool)
        # a prefix of columns is also a prefix of rows: the per-window feature comes first
        wider = [f for f in plan if column_order(cache, f, pool)[:len(cols)] == cols]
        if wider:
            root = plan[wider[0]][1]
            width = input_width(cache, h.features, pool)
            plan[h.features] = (plan[root][0][..., :width], root, width)
        else:
            x = torch.from_numpy(head_inputs(cache, h, pool)).to(device)
            plan[h.features] = (x, h.features, x.shape[-1])
    return plan

