"""Stage 2: train K batched members of every head on cached features.

All data lives on the device as tensors; each epoch draws one permutation per member from a
counter-based hash of (member seed, epoch), so a member's numbers depend only on its own
config and seed. Each member early-stops on its own and keeps its best weights."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import LossConfig, Member, TrainConfig
from ..errors import QamroError
from .heads import HeadSpec, member_seed
from .inputs import (build_head, head_inputs, label_col, label_stats, predict_units,
                     units_for)
from .losses import LabelTerms, label_terms, pair_hinge, regression
from ..store.reader import Cache


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QamroError(f"--device {device}: no CUDA device is available")
    return torch.device(device)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic; logical shifts by masking)."""
    def shr(v, s):
        return (v >> s) & ((1 << (64 - s)) - 1)
    x = (x ^ shr(x, 30)) * -4658895280553007687  # 0xbf58476d1ce4e5b9 as signed
    x = (x ^ shr(x, 27)) * -7723592293110705685  # 0x94d049bb133111eb as signed
    return x ^ shr(x, 31)


def member_permutations(seeds: torch.Tensor, epoch: int, n: int) -> torch.Tensor:
    """[K] int64 seeds -> [K, n] permutations, identical on every device."""
    idx = torch.arange(n, device=seeds.device, dtype=torch.int64)
    keys = _mix(_mix(seeds[:, None] * 1_000_003 + epoch) + idx[None, :])
    return torch.argsort(keys, dim=1, stable=True)


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
    for what, rows in (("train", train), (f"validation ({source})", val)):
        if len(rows) == 0:
            raise QamroError(f"{cache.path}: the {what} split has no labelled rows "
                             f"(splits here: {', '.join(sorted(set(cache.splits)))})")
    if len(ev) == 0:
        raise QamroError(f"{cache.path}: eval split {cfg.eval_split!r} has no rows "
                         f"(splits here: {', '.join(sorted(set(cache.splits)))})")
    return Split(train=train, val=val, eval=ev, val_source=source)


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
    seconds: float
    epochs_run: int


class _Losses:
    """Per-member loss settings as [H*K] tensors, so one call scores every head of every
    member: predictions of the H heads are stacked along the member axis."""

    def __init__(self, members: list[Member], stats: list[tuple[float, float]],
                 device: torch.device, label_range, kernel: str = "torch"):
        n_heads = len(stats)
        if kernel != "torch":
            from .fused import available

            problem = available(device)
            if problem:
                raise QamroError(problem)
        self.kernel = kernel
        first = members[0].loss
        for m in members:
            if (m.loss.norm, m.loss.regression, m.loss.huber_delta) != \
                    (first.norm, first.regression, first.huber_delta):
                raise QamroError("members of one run must share norm and regression loss")
        self.k, self.n_heads = len(members), n_heads

        def t(vals):
            return torch.tensor(vals * n_heads, dtype=torch.float32, device=device)
        self.alpha = t([m.loss.alpha if m.loss.kind == "qamro" else 0.0 for m in members])
        self.beta = t([m.loss.beta if m.loss.kind == "qamro" else 1.0 for m in members])
        self.margin = t([m.loss.margin if m.loss.kind == "mr" else 0.0 for m in members])
        self.weight = t([0.0 if m.loss.kind == "none" else m.loss.rank_weight for m in members])
        self.cfg: LossConfig = first
        # head outputs are standardised scores where a head standardises: the regression term
        # compares them with standardised labels, the ranking term sees the labels' own scale
        self.scaled = any(st != (0.0, 1.0) for st in stats)
        self.mean = torch.tensor([m for m, _ in stats], device=device).repeat_interleave(
            self.k)[:, None]  # [H*K, 1]
        self.std = torch.tensor([s for _, s in stats], device=device).repeat_interleave(
            self.k)[:, None]
        self.label_range = first.label_range or label_range
        if first.norm == "range" and self.label_range is None:
            raise QamroError("norm='range' needs a label range (the recipe's label_range)")

    def terms(self, ys: list[torch.Tensor], bs: int) -> LabelTerms:
        """Per head labels [K or 1, n], in the order the rows are visited, cut into chunks of
        bs (the last padded with unknown labels) -> the label terms of every chunk at once,
        fields [n_chunks, H*K, bs]: chunk c's are `.select((c, slice(None), slice(None, b)))`
        with b its real size (padding is unknown: it changes no count)."""
        n = ys[0].shape[-1]
        chunks = -(-n // bs)
        y = torch.cat([t.expand(self.k, n) for t in ys])  # [H*K, n]
        y = F.pad(y, (0, chunks * bs - n), value=math.nan)
        y = y.view(len(y), chunks, bs).transpose(0, 1).contiguous()
        t = label_terms(y, self.beta, self.cfg.norm, self.label_range, self.mean[:, 0],
                        self.std[:, 0])
        return t._replace(q=t.q * self.weight[:, None])  # the ranking term's weight, folded in

    def __call__(self, preds: list[torch.Tensor], t: LabelTerms) -> torch.Tensor:
        """Per head [K, b] predictions and the stacked batch's label terms ([H*K, b]) -> [K]
        objective summed over heads."""
        pred = torch.cat(preds)  # [H*K, b]
        raw = pred * self.std + self.mean if self.scaled else pred
        reg = regression(pred, t, self.cfg.regression, self.cfg.huber_delta)
        rank = pair_hinge(raw, t, self.alpha, self.margin, self.kernel)  # weight is in t.q
        return (reg + rank).view(self.n_heads, self.k).sum(0)


class _Engine:
    """All training state as device tensors updated in place, so one epoch is a fixed
    sequence of kernels: eager on CPU, captured once as a CUDA graph and replayed on GPU."""

    def __init__(self, models, heads, plan: "_Plan", Y, train_rows, val_rows, loss_fn,
                 cfg: TrainConfig, seeds: list[int], device: torch.device):
        k = len(seeds)
        self.models, self.heads, self.plan, self.Y = models, heads, plan, Y
        self.train_rows, self.val_rows, self.loss_fn, self.cfg = train_rows, val_rows, loss_fn, cfg
        # what SGD updates in place: every parameter of every head, contiguous [K, ...] views
        # of each head's buffer (detached: no autograd), and its momentum laid out alike
        self.params = [v for h in heads for v in models[h.name].views(models[h.name].flat.detach())]
        self.bufs = [v for h in heads for v in models[h.name].views(
            torch.zeros_like(models[h.name].flat.detach()))]
        self.best = [models[h.name].by_member().detach() for h in heads]  # [K, P] per head
        self.perm_seeds = torch.tensor([member_seed(s, "shuffle") >> 1 for s in seeds],
                                       device=device)
        bs, nv = cfg.batch_size, len(val_rows)
        self.val_sizes = torch.tensor([min(bs, nv - s) for s in range(0, nv, bs)],
                                      dtype=torch.float32, device=device)
        self.val_terms = loss_fn.terms([Y[h.name][val_rows][None] for h in heads], bs)
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)
        self.active = torch.ones(k, dtype=torch.bool, device=device)
        self.finite = torch.ones(k, dtype=torch.bool, device=device)
        self.best_val = torch.full((k,), math.inf, device=device)
        self.best_epoch = torch.zeros(k, dtype=torch.int64, device=device)
        self.stopped = torch.full((k,), cfg.max_epochs, dtype=torch.int64, device=device)
        self.bad = torch.zeros(k, dtype=torch.int64, device=device)

    def run_epoch(self) -> None:
        """One epoch: shuffled steps, then validation and early-stopping bookkeeping, all on
        the device. A member whose loss turns NaN or inf spoils only its own weights (every
        member has its own rows of every matmul); validation sees it and stops it."""
        cfg = self.cfg
        self.epoch.add_(1)
        n, bs = len(self.train_rows), cfg.batch_size
        perm = self.train_rows[member_permutations(self.perm_seeds, self.epoch, n)]  # [K, n]
        terms = self.loss_fn.terms([self.Y[h.name][perm] for h in self.heads], bs)
        for step, start in enumerate(range(0, n, bs)):
            idx = perm[:, start:start + bs]  # [K, b]
            views = {h.name: self.models[h.name].views() for h in self.heads}
            x = _gather(self.plan, idx)
            total = self.loss_fn([self.models[h.name](x[h.features], views[h.name])
                                  for h in self.heads],
                                 terms.select((step, slice(None), slice(None, idx.shape[1]))))
            grads = torch.autograd.grad(total.sum(), [v for h in self.heads
                                                      for v in views[h.name]])
            _sgd(self.params, grads, self.bufs, cfg)
        with torch.no_grad():
            val = _val_loss(self.models, self.heads, self.plan, self.val_rows, self.val_terms,
                            self.loss_fn, bs, self.val_sizes)  # [K]
            self.finite &= torch.isfinite(val) | ~self.active
            self.active &= self.finite
            improved = self.active & (val < self.best_val)
            self.best_val.copy_(torch.where(improved, val, self.best_val))
            self.best_epoch.copy_(torch.where(improved, self.epoch, self.best_epoch))
            self.bad.copy_(torch.where(improved, 0, self.bad + 1))
            for h, b in zip(self.heads, self.best):
                model = self.models[h.name]
                b.copy_(torch.where(improved[:, None], model.by_member(model.flat.detach()), b))
            newly = self.active & (self.bad >= cfg.patience)
            first_failure = ~self.finite & (self.stopped == cfg.max_epochs)
            self.stopped.copy_(torch.where(newly | first_failure, self.epoch, self.stopped))
            self.active &= ~newly

    def fit(self, progress=None) -> int:
        """Run epochs until every member stopped or max_epochs; returns epochs run."""
        cfg, device = self.cfg, self.epoch.device
        replay = self.run_epoch
        if device.type == "cuda" and cfg.cuda_graph:
            replay = self._capture()
        done = int(self.epoch)
        while done < cfg.max_epochs:
            replay()
            done += 1
            if done % cfg.check_every == 0 or done == cfg.max_epochs:
                if progress:
                    progress(done, self.active)
                if not bool(self.active.any()):
                    break
        return done

    def _capture(self):
        """Eager warm-up epochs on a side stream (they count), then one epoch as a graph."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(min(GRAPH_WARMUP, self.cfg.max_epochs)):
                self.run_epoch()
        torch.cuda.current_stream().wait_stream(side)
        if int(self.epoch) >= self.cfg.max_epochs:
            return self.run_epoch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run_epoch()
        return graph.replay


@contextlib.contextmanager
def _matmul_precision(value: str):
    """torch's float32 matmul precision for the duration of one training call only."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


GRAPH_WARMUP = 3  # eager epochs before capture (lazy cuBLAS/autograd set-up must not be captured)


def train(cache: Cache, heads: tuple[HeadSpec, ...], members: list[Member],
          cfg: TrainConfig = TrainConfig(), label_range=None, progress=None) -> TrainResult:
    """Train every member of every head on `cache`; returns best-weight predictions."""
    if not members:
        raise QamroError("nothing to train: no members")
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    split = make_split(cache, heads, cfg)
    k = len(members)
    seeds = [m.seed for m in members]
    for h in heads:
        if not np.isfinite(cache.labels[split.train, label_col(cache, h)]).any():
            raise QamroError(f"{cache.path}: labels of head {h.name!r} are all NaN in train")
    units = units_for(cache, heads)
    shared, plan = _inputs(cache, heads, device)
    X = {h.name: shared[h.features] for h in heads}
    Y = {h.name: torch.from_numpy(np.ascontiguousarray(
        units.per_unit(cache.labels[:, label_col(cache, h)]))).to(device) for h in heads}
    stats = {h.name: label_stats(cache, h, split.train) for h in heads}
    models = {h.name: build_head(h, seeds, tuple(X[h.name].shape), cfg).to(device)
              for h in heads}
    loss_fn = _Losses(members, [stats[h.name] for h in heads], device, label_range,
                      cfg.pair_kernel)
    engine = _Engine(models, heads, plan, Y,
                     torch.from_numpy(units.of_clips(split.train)).to(device),
                     torch.from_numpy(units.of_clips(split.val)).to(device), loss_fn, cfg, seeds,
                     device)
    with _matmul_precision(cfg.matmul_precision):
        epochs = engine.fit(progress)
        with torch.no_grad():
            for h, b in zip(heads, engine.best):
                models[h.name].set_by_member(b)
            preds = {h.name: units.to_clips(predict_units(models[h.name], X[h.name])
                                            * stats[h.name][1] + stats[h.name][0])
                     for h in heads}
    failures, warnings = {}, {}
    fin, be = engine.finite.cpu().numpy(), engine.best_epoch.cpu().numpy()
    stopped = engine.stopped.cpu().numpy()
    for i in np.flatnonzero(~fin):
        why = f"{members[i].label()}: loss became NaN or inf at epoch {int(stopped[i])}"
        if be[i] == 0:
            failures[int(i)] = why + " before any validation improvement; no model kept"
        else:
            warnings[int(i)] = why + f"; stopped, keeping the weights of epoch {int(be[i])}"
    states = {h.name: [models[h.name].member_state(i) for i in range(k)] for h in heads}
    return TrainResult(
        members=members, heads=heads, split=split, predictions=preds, states=states,
        best_epoch=be.tolist(), stopped_epoch=stopped.tolist(),
        best_val_loss=engine.best_val.cpu().tolist(), failures=failures, device=str(device),
        seconds=time.perf_counter() - t0, epochs_run=epochs, warnings=warnings,
        label_stats=stats)


def _sgd(params, grads, bufs, cfg: TrainConfig) -> None:
    """SGD with momentum, torch's rule (dampening 0; a zero buffer makes the first step's
    buffer the gradient, as torch.optim.SGD does), as torch.optim.SGD(fused=True) runs it:
    one multi-tensor kernel reads parameter, gradient and momentum once and writes parameter
    and momentum, for every parameter of every head. Members that stopped keep stepping
    (their rows of the batched matmuls cost the same either way): their kept weights are
    the best ones, copied aside at validation."""
    with torch.no_grad():
        torch._fused_sgd_(params, list(grads), bufs, weight_decay=0.0, momentum=cfg.momentum,
                          lr=cfg.lr, dampening=0.0, nesterov=False, maximize=False,
                          is_first_step=False)


def _val_loss(models, heads, plan, rows, terms: LabelTerms, loss_fn, bs, sizes) -> torch.Tensor:
    """Mean over heads of the training objective on the validation rows, in fixed chunks of
    the batch size (the ranking term is a mini-batch loss; chunks bound its memory)."""
    chunks = []
    for c, s in enumerate(range(0, len(rows), bs)):
        x = _gather(plan, rows[s:s + bs])
        b = len(rows[s:s + bs])
        chunks.append(loss_fn([models[h.name](x[h.features]) for h in heads],
                              terms.select((c, slice(None), slice(None, b)))))  # [K]
    return (torch.stack(chunks) * sizes[:, None]).sum(0) / sizes.sum() / len(heads)


# each distinct input -> (its matrix on the device, the input it is gathered from, its width)
_Plan = dict[tuple[str, ...], tuple[torch.Tensor, tuple[str, ...], int]]


def _inputs(cache: Cache, heads, device) -> tuple[dict[tuple[str, ...], torch.Tensor], _Plan]:
    """Each distinct input of the heads, on the device once: heads reading the same features
    share one matrix (the four AES axes: 4x less), and an input that is the first columns of
    another (the audio head's audio inside the textual head's audio + text) is a column view
    of it, so a step gathers its rows once, for both heads."""
    shared: dict[tuple[str, ...], torch.Tensor] = {}
    plan: _Plan = {}
    for h in sorted(heads, key=lambda h: -len(h.features)):
        if h.features in shared:
            continue
        wider = [f for f in shared if f[:len(h.features)] == h.features and shared[f].dim() == 2]
        if wider and all(f in cache.features for f in h.features):
            root = plan[wider[0]][1]
            width = sum(cache.features[f][0].size for f in h.features)
            shared[h.features] = shared[root][:, :width]
            plan[h.features] = (shared[h.features], root, width)
        else:
            shared[h.features] = torch.from_numpy(head_inputs(cache, h)).to(device)
            plan[h.features] = (shared[h.features], h.features, shared[h.features].shape[-1])
    return shared, plan


def _gather(plan: _Plan, idx: torch.Tensor) -> dict[tuple[str, ...], torch.Tensor]:
    """Each distinct input's rows [.., B, D], gathered once however many heads read it;
    prefix inputs are column views of the rows of the input they lie in."""
    out = {f: x[idx] for f, (x, root, _) in plan.items() if root == f}
    for f, (_, root, width) in plan.items():
        if root != f:
            out[f] = out[root][..., :width]
    return out
