"""The device side of training: the members still training, as batched tensors updated in
place, so one epoch is a fixed sequence of kernels (eager on CPU, captured once as a CUDA
graph and replayed on GPU). An engine is built from a TrainState (state.py) for a subset of
its members and writes back into it; the trainer rebuilds it without the members that
stopped, so they cost nothing (trainer.py)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import Member, TrainConfig
from .distribution import OutputBins
from .groups import epoch_order
from .heads import LOG_VARS, BatchedMLP, HeadSpec, member_seed
from .inputs import Units, build_head, pools, weighting_terms
from .losses import LabelTerms
from .objective import Losses, uncertainty_objective
from .optim import make_optimizer
from .pairs_term import PairRows, PairTerm
from .pooling import WindowIndex, pool
from .shuffle import member_windows
from .state import HISTORY_COLUMNS, TrainState

GRAPH_WARMUP = 3  # eager epochs before capture (lazy cuBLAS/autograd set-up must not be captured)

# each distinct input -> (its matrix on the device, the input it is gathered from, its width)
InputPlan = dict[tuple[str, ...], tuple[torch.Tensor, tuple[str, ...], int]]


@dataclass
class Context:
    """What every engine of one run shares: the data on the device and the settings."""

    heads: tuple[HeadSpec, ...]
    members: list[Member]  # all of the run's members (the heads' layout is theirs)
    group: np.ndarray  # the members this context trains (those of one pool); an engine
    # holds a subset of them
    plan: InputPlan
    units: Units  # what the plan's rows are (clips, or windows of clips)
    x_shapes: dict[str, tuple[int, ...]]  # head -> its input's shape
    Y: dict[str, torch.Tensor]  # head -> [U] labels of every unit
    train_rows: torch.Tensor  # unit rows trained on; with train_windows, the first window of
    # each training clip
    val_rows: torch.Tensor  # unit rows validated on
    stats: list[tuple[float, float]]  # per head (mean, std) its outputs are scaled by
    label_range: tuple[float, float] | None
    cfg: TrainConfig
    device: torch.device
    bins: OutputBins | None = None  # the distribution output, when a member is gaussian-kl
    P: dict[str, torch.Tensor] | None = None  # head -> [U, n] its target distributions
    train_windows: torch.Tensor | None = None  # [C] windows of each training clip when each
    # epoch takes one per clip (TrainConfig.train_windows "one-per-clip"); None: every row
    train_groups: dict[str, torch.Tensor] = field(default_factory=dict)  # "prompt" or
    # "system" -> [len(train_rows)] group of each train row, for the members batched so
    # (groups.py); empty when every member's batches are random
    systems: torch.Tensor | None = None  # [U] system index of every unit (-1: none), for
    # the system-level term (system_level.py)
    n_systems: int = 0
    windows: WindowIndex | None = None  # attention pooling (pooling.py): the train and
    # validation rows and Y are clips, and their inputs the plan's window rows

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.train_rows) // self.cfg.batch_size)
    pairs: PairRows | None = None  # the training pairs, where a member has a pair_weight
    # (pairs_term.py)
    val_pairs: PairRows | None = None  # the pairs held out to validate on

    def bins_of(self, h: HeadSpec, members) -> dict:
        """build_head's distribution arguments for head h and these member rows."""
        if self.bins is None:
            return {}
        i = self.heads.index(h)
        return {"bins": self.bins.scaled(*self.stats[i]),
                "uses_bins": self.bins.subset(members).uses}

    @property
    def check_every(self) -> int:
        """Epochs between host syncs: every epoch on the CPU, where a sync is free; on a GPU
        fewer, since each one drains the queue of kernels."""
        if self.cfg.check_every is not None:
            return self.cfg.check_every
        return 10 if self.device.type == "cuda" else 1


class Engine:
    """One subset of a run's members on the device, their state as tensors updated in place."""

    def __init__(self, ctx: Context, state: TrainState, subset: np.ndarray):
        cfg, device = ctx.cfg, ctx.device
        self.ctx, self.cfg, self.subset = ctx, cfg, np.asarray(subset)
        members = [ctx.members[i] for i in self.subset]
        k, rows = len(members), torch.from_numpy(self.subset)
        seeds = [m.seed for m in members]
        self.models: dict[str, BatchedMLP] = {}
        for h in ctx.heads:
            model = build_head(h, seeds, ctx.x_shapes[h.name], cfg, init=False,
                               n_terms=weighting_terms(ctx.members), pools=pools(ctx.members),
                               **ctx.bins_of(h, self.subset)).to(device)
            with torch.no_grad():
                model.flat.copy_(model.flat_of(state.weights[h.name][rows].to(device)))
            self.models[h.name] = model
        # what the optimiser updates in place: every parameter of every head, contiguous
        # [K, ...] views of each head's buffer (detached: no autograd), buffers laid out alike
        self.params = [v for h in ctx.heads for v in self._model(h).views(self._flat(h))]
        self.buffers = {b: [self._model(h).flat_of(per_head[h.name][rows].to(device))
                            for h in ctx.heads] for b, per_head in state.buffers.items()}
        self.buffer_views = {b: [v for h, f in zip(ctx.heads, flats)
                                 for v in self._model(h).views(f)]
                             for b, flats in self.buffers.items()}
        self.best = [state.best[h.name][rows].to(device) for h in ctx.heads]  # [K, P] per head
        self.loss_fn = Losses(members, ctx.stats, device, ctx.label_range,
                              [h.label for h in ctx.heads], ctx.n_systems)
        self.perm_seeds = torch.tensor([member_seed(s, "shuffle") >> 1 for s in seeds],
                                       device=device)
        self.window_seeds = torch.tensor([member_seed(s, "windows") >> 1 for s in seeds],
                                         device=device)
        self.batched_by = {by: torch.tensor([m.loss.batch_by == by for m in members],
                                            device=device) for by in ctx.train_groups}
        bs, nv = cfg.val_batch_size or cfg.batch_size, len(ctx.val_rows)
        self.val_sizes = torch.tensor([min(bs, nv - s) for s in range(0, nv, bs)],
                                      dtype=torch.float32, device=device)
        self.val_terms = self.loss_fn.terms([ctx.Y[h.name][ctx.val_rows][None]
                                             for h in ctx.heads], bs)

        def dev(t):
            return t[rows].to(device)
        self.epoch = torch.tensor(state.epoch, dtype=torch.int64, device=device)
        # every epoch takes steps_per_epoch steps: the count is the epoch's (the engines of
        # a run's two pools step differently, over one saved state)
        steps = state.epoch * ctx.steps_per_epoch
        self.steps = torch.tensor(steps, dtype=torch.int64, device=device)
        self.step = make_optimizer(cfg, self.params, self.buffer_views, steps, device)
        self.active, self.finite = dev(state.active), dev(state.finite)
        self.best_val, self.best_epoch = dev(state.best_val), dev(state.best_epoch)
        self.stopped, self.bad = dev(state.stopped), dev(state.bad)
        # per epoch, per member: HISTORY_COLUMNS, kept on the device until the next sync
        self.hist = torch.zeros(ctx.check_every, len(HISTORY_COLUMNS), k, device=device)
        self.acc = torch.zeros(2, k, device=device)  # the epoch's (reg, rank) training sums
        # whether the run's heads carry log-variances (then every engine's objective reads
        # them, even one whose members all keep fixed weights: autograd needs every view in
        # the graph), and which of these members learn their weights
        self.log_vars = weighting_terms(ctx.members) > 0
        self.log_var_at = {h.name: self.models[h.name].index(LOG_VARS)
                           for h in ctx.heads} if self.log_vars else {}
        self.learned = torch.tensor([m.loss.loss_weighting == "uncertainty" for m in members],
                                    device=device)
        self.pair_term = None if ctx.pairs is None else PairTerm(
            ctx.pairs, members, ctx.steps_per_epoch, device)
        self.graph = None
        self.eager_epochs = 0

    def _model(self, h: HeadSpec) -> BatchedMLP:
        return self.models[h.name]

    def _flat(self, h: HeadSpec) -> torch.Tensor:
        return self.models[h.name].flat.detach()

    # -- one epoch ------------------------------------------------------------------------
    def run_epoch(self) -> None:
        """Shuffled steps, then validation, early stopping and the history row, all on the
        device. A member whose loss turns NaN or inf spoils only its own weights (every member
        has its own rows of every matmul); validation sees it and stops it."""
        ctx, cfg = self.ctx, self.cfg
        self.epoch.add_(1)
        n, bs = len(ctx.train_rows), cfg.batch_size
        order = epoch_order(self.perm_seeds, self.epoch, n, ctx.train_groups,
                            self.batched_by)  # [K, n]
        if ctx.train_windows is None:
            perm = ctx.train_rows[order]
        else:  # one window per clip: each member's draw for this epoch, then its order
            rows = ctx.train_rows + member_windows(self.window_seeds, self.epoch,
                                                   ctx.train_windows)  # [K, n]
            perm = rows.gather(1, order)
        terms = self.loss_fn.terms([ctx.Y[h.name][perm] for h in ctx.heads], bs)
        self.acc.zero_()
        for step, start in enumerate(range(0, n, bs)):
            idx = perm[:, start:start + bs]  # [K, b]
            views = {h.name: self._model(h).views() for h in ctx.heads}
            outs = forward(ctx, self.models, idx, views)
            per_head = self.loss_fn([o[0] for o in outs],
                                    terms.select((step, slice(None), slice(None, idx.shape[1]))),
                                    dist_pairs(ctx, outs, idx), systems_of(ctx, idx),
                                    per_head=True)  # [2, H, K]
            if self.pair_term is not None:  # preference pairs: in the ranking part
                per_head = per_head + self.pair_term(self.epoch, step,
                                                     functools.partial(self._outputs, views))
            objective = per_head.sum() if not self.log_vars else uncertainty_objective(
                per_head, self._log_vars(views), self.loss_fn.has_rank, self.learned)
            parts = per_head.sum(1)  # [2, K]
            flat = [v for h in ctx.heads for v in views[h.name]]
            # a run with attention members gives every head a query; mean members' objective
            # does not read it: a zero gradient, as fixed-weight members' log-variances get
            grads = [torch.zeros_like(v) if g is None else g for v, g in zip(
                flat, torch.autograd.grad(objective, flat, allow_unused=True))]
            self.steps.add_(1)
            self.step(grads)
            self.acc.add_(parts.detach(), alpha=idx.shape[1])
        with torch.no_grad():
            val_parts = val_loss(self.models, ctx, self.val_terms, self.loss_fn,
                                 cfg.val_batch_size or bs, self.val_sizes)
            if self.pair_term is not None and ctx.val_pairs is not None:  # in the ranking part
                val_parts[1] += self.pair_term.validate(
                    ctx.val_pairs, lambda rows: [o for o, _ in forward(ctx, self.models, rows)])
            val = val_parts.sum(0)
            self._early_stopping(val)
            train_parts = self.acc / (n * len(ctx.heads))  # per unit, mean over heads
            row = torch.cat([torch.stack([train_parts.sum(0), val, train_parts[1],
                                          train_parts[0], val_parts[1], val_parts[0]]),
                             self._term_weights()])  # [C, K] in HISTORY_COLUMNS order
            slot = torch.remainder(self.epoch - 1, len(self.hist)).view(1)
            self.hist.index_copy_(0, slot, row[None])

    def _outputs(self, views, rows: torch.Tensor) -> list[torch.Tensor]:
        """Each head's [K, R] outputs for unit rows [K, R] (the pairs' clips; pooled from
        their windows under attention pooling)."""
        return [out for out, _ in forward(self.ctx, self.models, rows, views)]

    def _log_vars(self, views) -> torch.Tensor:
        """[H, K, 2] each head's learned log-variances (its layout's LOG_VARS view)."""
        return torch.stack([views[h.name][self.log_var_at[h.name]] for h in self.ctx.heads])

    def _term_weights(self) -> torch.Tensor:
        """[2, K] the terms' weights exp(-s), mean over heads (1 under fixed weighting: no
        log-variances, or ones that stay 0, having no gradient)."""
        if not self.log_vars:
            return torch.ones(2, len(self.subset), device=self.ctx.device)
        s = self._log_vars({h.name: self._model(h).views(self._flat(h)) for h in self.ctx.heads})
        return torch.exp(-s).mean(0).T

    def _early_stopping(self, val: torch.Tensor) -> None:
        cfg = self.cfg
        self.finite &= torch.isfinite(val) | ~self.active
        self.active &= self.finite
        improved = self.active & (val < self.best_val)
        self.best_val.copy_(torch.where(improved, val, self.best_val))
        self.best_epoch.copy_(torch.where(improved, self.epoch, self.best_epoch))
        self.bad.copy_(torch.where(improved, 0, self.bad + 1))
        for h, b in zip(self.ctx.heads, self.best):
            model = self._model(h)
            b.copy_(torch.where(improved[:, None], model.by_member(self._flat(h)), b))
        newly = self.active & (self.bad >= cfg.patience)
        first_failure = ~self.finite & (self.stopped == cfg.max_epochs)
        self.stopped.copy_(torch.where(newly | first_failure, self.epoch, self.stopped))
        self.active &= ~newly

    def run(self, n: int) -> None:
        """n epochs: eager, or on CUDA replays of one captured epoch after eager warm-up."""
        for _ in range(n):
            # attention pooling's batches hold a varying number of windows (a host sync per
            # step), which a captured graph cannot replay
            if self.ctx.device.type != "cuda" or not self.cfg.cuda_graph \
                    or self.ctx.windows is not None:
                self.run_epoch()
            elif self.graph is not None:
                self.graph.replay()
            elif self.eager_epochs < GRAPH_WARMUP:
                self._warm_up()
            else:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):  # records, runs nothing
                    self.run_epoch()
                self.graph.replay()

    def _warm_up(self) -> None:
        """An eager epoch on a side stream (it counts): lazy set-up must not be captured."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.run_epoch()
        torch.cuda.current_stream().wait_stream(side)
        self.eager_epochs += 1

    # -- back to the host -------------------------------------------------------------------
    def sync(self, state: TrainState, epochs: int) -> None:
        """The counters, flags and the last `epochs` history rows into `state` (small)."""
        rows = torch.from_numpy(self.subset)
        state.epoch, state.steps = int(self.epoch), int(self.steps)
        for name in ("active", "finite", "best_val", "best_epoch", "stopped", "bad"):
            getattr(state, name)[rows] = getattr(self, name).cpu()
        hist = self.hist.cpu().numpy()  # [check_every, C, K]
        first = state.epoch - epochs + 1
        chunk = []
        for e in range(first, state.epoch + 1):
            vals = hist[(e - 1) % len(hist)].T  # [K, C]
            chunk.append(np.column_stack([self.subset, np.full(len(self.subset), e), vals]))
        if chunk:
            state.history.append(np.concatenate(chunk))
        state.member_epochs += epochs * len(self.subset)

    def store(self, state: TrainState) -> None:
        """Everything, weights and buffers included, into `state` (before this engine is
        dropped, saved, or the run ends)."""
        rows = torch.from_numpy(self.subset)
        for i, h in enumerate(self.ctx.heads):
            model = self._model(h)
            state.weights[h.name][rows] = model.by_member(self._flat(h)).cpu()
            state.best[h.name][rows] = self.best[i].cpu()
            for b, flats in self.buffers.items():
                state.buffers[b][h.name][rows] = model.by_member(flats[i]).cpu()


def val_loss(models, ctx: Context, terms: LabelTerms, loss_fn, bs, sizes) -> torch.Tensor:
    """[2, K]: the regression and ranking terms on the validation rows, mean over heads, in
    fixed chunks of the batch size (the ranking term is a mini-batch loss; chunks bound its
    memory)."""
    chunks, rows, heads = [], ctx.val_rows, ctx.heads
    for c, s in enumerate(range(0, len(rows), bs)):
        b = len(rows[s:s + bs])
        outs = forward(ctx, models, rows[s:s + bs])
        chunks.append(loss_fn([o[0] for o in outs], terms.select((c, slice(None),
                                                                   slice(None, b))),
                              dist_pairs(ctx, outs, rows[s:s + bs]),
                              systems_of(ctx, rows[s:s + bs])))  # [2, K]
    return (torch.stack(chunks) * sizes[:, None, None]).sum(0) / sizes.sum() / len(heads)


def forward(ctx: Context, models: dict[str, BatchedMLP], idx: torch.Tensor,
            views: dict[str, list[torch.Tensor]] | None = None) -> list[tuple]:
    """Per head (predictions [K, b], distribution logits or None) of rows idx ([K, b] or
    [b]); under attention pooling idx are clips, each predicted from all its windows."""
    if ctx.windows is None:
        x = gather(ctx.plan, idx)
        return [models[h.name](x[h.features], views and views[h.name], logits=True)
                for h in ctx.heads]
    rows, slot, valid = ctx.windows.expand(idx)
    x, log_w = gather(ctx.plan, rows), ctx.windows.log_w[rows]
    out = []
    for h in ctx.heads:
        p, _, s = models[h.name](x[h.features], views and views[h.name], scores=True)
        out.append((pool(p, s, log_w, slot, valid, idx.shape[-1]), None))
    return out


def dist_pairs(ctx: Context, outs, idx: torch.Tensor):
    """Per head (logits, target distributions of rows idx [K, b] or [b]), or None."""
    if ctx.P is None:
        return None
    return [(z, ctx.P[h.name][idx]) for h, (_, z) in zip(ctx.heads, outs)]


def systems_of(ctx: Context, idx: torch.Tensor) -> torch.Tensor | None:
    """The system index of rows idx ([K, b] or [b]), or None when no member needs it."""
    return None if ctx.systems is None else ctx.systems[idx]


def gather(plan: InputPlan, idx: torch.Tensor) -> dict[tuple[str, ...], torch.Tensor]:
    """Each distinct input's rows [.., B, D], gathered once however many heads read it;
    prefix inputs are column views of the rows of the input they lie in."""
    out = {f: x[idx] for f, (x, root, _) in plan.items() if root == f}
    for f, (_, root, width) in plan.items():
        if root != f:
            out[f] = out[root][..., :width]
    return out
