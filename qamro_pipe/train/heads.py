"""MLP heads whose parameters carry a leading K dimension: K configurations train as one model.

Member k's initial weights depend only on its seed and the head's name, never on which other
members share the batch, so a sweep point equals the single run with the same seed."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "none": lambda x: x}
LOG_VARS = "log_vars"  # the layout's name of the learned loss weights' log-variances
POOL_QUERY = "pool_query"  # the layout's name of attention pooling's query (train/pooling.py)
EXTRAS = (LOG_VARS, POOL_QUERY)  # parameters of a member's training, not of the released
# head shape: last in the layout, zero at the start


@dataclass(frozen=True)
class HeadSpec:
    """One prediction head, as a recipe declares it. None = the TrainConfig's value."""

    name: str  # "overall"
    label: str  # which label column it learns ("overall")
    features: tuple[str, ...]  # cached features concatenated as its input ("audio", "text");
    # a per-window feature ("layers", [M, 13, 768]) makes a window-level head
    hidden: tuple[int, ...] | None = None  # MLP widths before the output unit
    activation: str | None = None  # "relu", "gelu" or "none"
    layer_norm: bool = False  # LayerNorm after each hidden linear (Audiobox-Aesthetics heads)
    layer_weights: bool = False  # input [.., L, D]: softmax-weighted sum over L, then L2 norm
    standardize: bool = False  # regress on labels standardised by the train split's mean/std


def member_seed(seed: int, *salt: str) -> int:
    """A 63-bit seed from a member seed and names (stable across runs, unlike hash())."""
    digest = hashlib.sha256(("/".join([str(seed), *salt])).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BatchedMLP(nn.Module):
    """K independent heads evaluated as batched matmuls: optional softmax layer weighting and
    L2 normalisation (the Audiobox-Aesthetics head), then an MLP in_dim -> hidden... -> 1.

    All parameters live in one buffer `flat`, parameter by parameter, each as a contiguous
    [K, *shape] block; every parameter is a view into it. Gradients taken with respect to the
    views are contiguous too, so one fused multi-tensor SGD kernel updates them all in place
    with no copy into a flat gradient first (optim._sgd)."""

    def __init__(self, seeds: list[int], in_dim: int, hidden: tuple[int, ...] = (256, 64),
                 activation: str = "relu", name: str = "head", layer_norm: bool = False,
                 n_layers: int = 0, init: bool = True, bins: torch.Tensor | None = None,
                 uses_bins=None, n_terms: int = 0, pools: bool = False):
        super().__init__()
        self.k, self.in_dim, self.hidden = len(seeds), in_dim, tuple(hidden)
        self.activation, self.layer_norm, self.n_layers = activation, layer_norm, n_layers
        self.act = ACTIVATIONS[activation]
        dims = [in_dim, *hidden, 1]
        self.layout: list[tuple[str, tuple[int, ...]]] = []
        if n_layers:
            self.layout.append(("layer_weights", (n_layers,)))
        for i in range(len(dims) - 1):
            self.layout += [(f"w{i}", (dims[i], dims[i + 1])), (f"b{i}", (dims[i + 1],))]
            if layer_norm and i < len(dims) - 2:
                self.layout += [(f"g{i}", (dims[i + 1],)), (f"beta{i}", (dims[i + 1],))]
        # a distribution head (distribution.py): n more output units after the last hidden
        # layer, last in the layout, so the other parameters are drawn as without them
        self.register_buffer("bins", bins, persistent=False)  # [n] centres, output units
        self.register_buffer("uses_bins", None if bins is None else torch.tensor(
            list(uses_bins), dtype=torch.bool), persistent=False)  # [K]
        if bins is not None:
            self.layout += [("wd", (dims[-2], len(bins))), ("bd", (len(bins),))]
        # --loss-weighting uncertainty: each member's log-variance of each objective term
        # (objective.uncertainty_objective), the very last, trained, saved and resumed with
        # the head; it plays no part in a prediction
        if n_terms:
            self.layout.append((LOG_VARS, (n_terms,)))
        # --pool attention: each member's query over its last layer's input (pooling.py);
        # zero = the length-weighted mean of the window predictions. Members that pool by
        # the mean keep it at 0 (no gradient reaches it)
        self.pools = pools
        if pools:
            self.layout.append((POOL_QUERY, (dims[-2],)))
        self.flat = nn.Parameter(torch.empty(self.k * sum(math.prod(s) for _, s in self.layout)))
        if init:  # init=False: the caller sets every weight (a resumed or rebuilt run)
            self._initialise(seeds, name, n_layers)

    def _initialise(self, seeds: list[int], name: str, n_layers: int) -> None:
        with torch.no_grad():
            views = self.named_views()
            for k, seed in enumerate(seeds):
                g = torch.Generator().manual_seed(member_seed(seed, "init", name))
                for pname, t in views.items():
                    if pname == "layer_weights":
                        t[k].fill_(1.0 / n_layers)  # uniform softmax, as the original
                    elif pname.startswith("w"):
                        bound = 1 / math.sqrt(t.shape[1])  # nn.Linear's initialisation
                        t[k].uniform_(-bound, bound, generator=g)
                        views["b" + pname[1:]][k].uniform_(-bound, bound, generator=g)
                    elif pname.startswith("g"):
                        t[k].fill_(1.0)
                    elif pname.startswith("beta") or pname in EXTRAS:
                        t[k].fill_(0.0)  # log-variance 0: every term starts at weight 1;
                        # query 0: pooling starts as the length-weighted mean

    def views(self, flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every parameter as a contiguous [K, *shape] view of `flat` (or of a buffer laid out
        like it: momentum), in storage order. A training step takes gradients with respect
        to these, not `flat`, whose slice gradients would each zero-fill the whole buffer."""
        flat = self.flat if flat is None else flat
        out, off = [], 0
        for _, shape in self.layout:
            n = self.k * math.prod(shape)
            out.append(flat[off:off + n].view(self.k, *shape))
            off += n
        return out

    def index(self, name: str) -> int:
        """The position of parameter `name` in the layout (and in views())."""
        return [n for n, _ in self.layout].index(name)

    def named_views(self, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return dict(zip((n for n, _ in self.layout), self.views(flat)))

    def by_member(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of the parameters as [K, P], member k's all in row k (for keeping the best
        weights of each member with one masked copy)."""
        return torch.cat([v.reshape(self.k, -1) for v in self.views(flat)], dim=1)

    def flat_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of by_member: a [K, P] tensor -> a new buffer laid out like `flat`."""
        out = torch.empty_like(self.flat.detach())
        off = 0
        for v in self.views(out):
            n = v[0].numel()
            v.copy_(rows[:, off:off + n].view_as(v))
            off += n
        return out

    def set_by_member(self, rows: torch.Tensor) -> None:
        """Set every parameter from a [K, P] tensor (by_member's layout)."""
        with torch.no_grad():
            self.flat.copy_(self.flat_of(rows))

    @property
    def weights(self) -> list[torch.Tensor]:
        v = self.named_views()
        return [v[f"w{i}"] for i in range(len(self.hidden) + 1)]

    def forward(self, x: torch.Tensor, views: list[torch.Tensor] | None = None,
                logits: bool = False, scores: bool = False):
        """x [N, D] (the same rows for every member) or [K, B, D] -> predictions [K, N|B];
        with layer weighting x is [N, L, D] or [K, B, L, D]. A distribution head's members
        that use it predict their distribution's mean; logits=True -> (predictions, the
        distribution's logits [K, N|B, n] or None); scores=True (a pooling head) -> (...,
        each row's attention score [K, N|B]: the query times the last layer's input)."""
        p = dict(zip((n for n, _ in self.layout), self.views() if views is None else views))
        if self.n_layers:
            w = torch.softmax(p["layer_weights"], dim=-1)  # [K, L]
            eq = "nld,kl->knd" if x.dim() == 3 else "kbld,kl->kbd"
            x = F.normalize(torch.einsum(eq, x, w), dim=-1)  # [K, B, D]
        if x.dim() == 2:  # one wide matmul for all members: [N, D] @ [D, K*H]
            h = (x @ p["w0"].permute(1, 0, 2).reshape(self.in_dim, -1)).view(len(x), self.k, -1)
            h = h.transpose(0, 1) + p["b0"][:, None, :]  # [K, N, H]
        else:
            h = torch.baddbmm(p["b0"][:, None, :], x, p["w0"])  # [K, B, H]
        last = x  # the last layer's input
        for i in range(1, len(self.hidden) + 1):
            if self.layer_norm:
                h = F.layer_norm(h, h.shape[-1:]) * p[f"g{i - 1}"][:, None, :] \
                    + p[f"beta{i - 1}"][:, None, :]
            last = self.act(h)
            h = torch.baddbmm(p[f"b{i}"][:, None, :], last, p[f"w{i}"])
        out = h.squeeze(-1)  # [K, B]
        z = None
        if self.bins is not None:
            last_k = last.expand(self.k, *last.shape) if last.dim() == 2 else last
            z = torch.baddbmm(p["bd"][:, None, :], last_k, p["wd"])  # [K, B, n]
            out = torch.where(self.uses_bins[:, None], torch.softmax(z, dim=-1) @ self.bins,
                              out)
        if scores:
            q = p[POOL_QUERY]  # [K, H]
            s = last @ q.T if last.dim() == 2 else torch.bmm(last, q[:, :, None])[..., 0]
            return out, z, (s.T if last.dim() == 2 else s)  # [K, B]
        return (out, z) if logits else out

    def _sequential_names(self) -> dict[str, str]:
        """Our parameter names -> nn.Sequential names (Linear[, LayerNorm], act, ...)."""
        step = 3 if self.layer_norm else 2
        names = {"layer_weights": "layer_weights"}
        for i in range(len(self.hidden) + 1):
            names[f"w{i}"], names[f"b{i}"] = f"{step * i}.weight", f"{step * i}.bias"
            names[f"g{i}"], names[f"beta{i}"] = f"{step * i + 1}.weight", f"{step * i + 1}.bias"
        names["wd"], names["bd"] = "dist.weight", "dist.bias"  # the distribution output
        names[LOG_VARS] = "loss.log_vars"
        names[POOL_QUERY] = "pool.query"
        return names

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights with nn.Sequential-style names ('0.weight', ...; Linear weights
        as [out, in]), plus 'layer_weights' (pre-softmax) for layer-weighted heads."""
        names = self._sequential_names()
        out = {}
        for n, t in self.named_views(self.flat.detach()).items():
            v = t[k].T if n.startswith("w") else t[k]
            out[names[n]] = v.contiguous().cpu()
        return out

    def load_member(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """The inverse of member_state: set member k from nn.Sequential-style tensors."""
        names = self._sequential_names()
        with torch.no_grad():
            for n, t in self.named_views().items():
                v = state[names[n]]
                t[k].copy_(v.T if n.startswith("w") else v)
