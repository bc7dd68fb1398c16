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


@dataclass(frozen=True)
class HeadSpec:
    """One prediction head, as a recipe declares it."""

    name: str  # "overall"
    label: str  # which label column it learns ("overall")
    features: tuple[str, ...]  # cached features concatenated as its input ("audio", "text")


def member_seed(seed: int, *salt: str) -> int:
    """A 63-bit seed from a member seed and names (stable across runs, unlike hash())."""
    digest = hashlib.sha256(("/".join([str(seed), *salt])).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BatchedMLP(nn.Module):
    """K independent MLPs in_dim -> hidden... -> 1, evaluated as batched matmuls.

    All parameters of member k live in one row of `flat` [K, P]; the layer weights are views
    into it, so an optimiser step is a handful of kernels over one tensor, not one per layer."""

    def __init__(self, seeds: list[int], in_dim: int, hidden: tuple[int, ...] = (256, 64),
                 activation: str = "relu", name: str = "head"):
        super().__init__()
        self.k, self.in_dim, self.hidden = len(seeds), in_dim, tuple(hidden)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        dims = [in_dim, *hidden, 1]
        self.shapes = [((dims[i], dims[i + 1]), (dims[i + 1],)) for i in range(len(dims) - 1)]
        size = sum(a * b + b for (a, b), _ in self.shapes)
        flat = torch.empty(self.k, size)
        self.flat = nn.Parameter(flat)
        for k, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(member_seed(seed, "init", name))
            for w, b in zip(*self._views(flat)):
                bound = 1 / math.sqrt(w.shape[1])  # nn.Linear's default initialisation
                w[k].uniform_(-bound, bound, generator=g)
                b[k].uniform_(-bound, bound, generator=g)

    def views(self, flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[w0, b0, w1, b1, ...] as views of `flat`, in its storage order. A training step
        takes gradients with respect to these (not `flat`, whose slice gradients would each
        zero-fill a whole [K, P] buffer) and concatenates them: `flat_grad`."""
        flat = self.flat if flat is None else flat
        out, off = [], 0
        for (a, b), _ in self.shapes:
            out.append(flat[:, off:off + a * b].view(self.k, a, b))
            off += a * b
            out.append(flat[:, off:off + b])
            off += b
        return out

    def _views(self, flat: torch.Tensor):
        v = self.views(flat)
        return v[0::2], v[1::2]

    def flat_grad(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Gradients of `views()` -> the gradient of `flat` [K, P]."""
        return torch.cat([g.reshape(self.k, -1) for g in grads], dim=1)

    @property
    def weights(self) -> list[torch.Tensor]:
        return self._views(self.flat)[0]

    @property
    def biases(self) -> list[torch.Tensor]:
        return self._views(self.flat)[1]

    def forward(self, x: torch.Tensor, views: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, D] (the same rows for every member) or [K, B, D] -> predictions [K, N|B]."""
        v = self.views() if views is None else views
        ws, bs = v[0::2], v[1::2]
        if x.dim() == 2:  # one wide matmul for all members: [N, D] @ [D, K*H]
            h = (x @ ws[0].permute(1, 0, 2).reshape(self.in_dim, -1)).view(len(x), self.k, -1)
            h = h.transpose(0, 1) + bs[0][:, None, :]  # [K, N, H]
        else:
            h = torch.baddbmm(bs[0][:, None, :], x, ws[0])  # [K, B, H]
        for w, b in zip(ws[1:], bs[1:]):
            h = torch.baddbmm(b[:, None, :], self.act(h), w)
        return h.squeeze(-1)  # [K, B]

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights as an nn.Sequential-style state dict ('0.weight', ...)."""
        out = {}
        for i, (w, b) in enumerate(zip(*self._views(self.flat.detach()))):
            out[f"{2 * i}.weight"] = w[k].T.contiguous().cpu()
            out[f"{2 * i}.bias"] = b[k].contiguous().cpu()
        return out
