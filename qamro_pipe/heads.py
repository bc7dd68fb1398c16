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
    """K independent MLPs in_dim -> hidden... -> 1, evaluated as batched matmuls."""

    def __init__(self, seeds: list[int], in_dim: int, hidden: tuple[int, ...] = (256, 64),
                 activation: str = "relu", name: str = "head"):
        super().__init__()
        self.k, self.in_dim, self.hidden = len(seeds), in_dim, tuple(hidden)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        dims = [in_dim, *hidden, 1]
        ws, bs = [], []
        for i in range(len(dims) - 1):
            ws.append(torch.empty(self.k, dims[i], dims[i + 1]))
            bs.append(torch.empty(self.k, dims[i + 1]))
        for k, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(member_seed(seed, "init", name))
            for w, b in zip(ws, bs):
                bound = 1 / math.sqrt(w.shape[1])  # nn.Linear's default initialisation
                w[k].uniform_(-bound, bound, generator=g)
                b[k].uniform_(-bound, bound, generator=g)
        self.weights = nn.ParameterList([nn.Parameter(w) for w in ws])
        self.biases = nn.ParameterList([nn.Parameter(b) for b in bs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] (the same rows for every member) or [K, B, D] -> predictions [K, N|B]."""
        w0, b0 = self.weights[0], self.biases[0]
        if x.dim() == 2:  # one wide matmul for all members: [N, D] @ [D, K*H]
            h = (x @ w0.permute(1, 0, 2).reshape(self.in_dim, -1)).view(len(x), self.k, -1)
            h = h.transpose(0, 1) + b0[:, None, :]  # [K, N, H]
        else:
            h = torch.baddbmm(b0[:, None, :], x, w0)  # [K, B, H]
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = torch.baddbmm(b[:, None, :], self.act(h), w)
        return h.squeeze(-1)  # [K, B]

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights as an nn.Sequential-style state dict ('0.weight', ...)."""
        out = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"{2 * i}.weight"] = w[k].detach().T.contiguous().cpu()
            out[f"{2 * i}.bias"] = b[k].detach().contiguous().cpu()
        return out
