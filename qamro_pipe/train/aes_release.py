"""The released Audiobox-Aesthetics heads as qamro-pipe heads.

`release_heads` copies an `AesMultiOutput`'s per-axis layer weights and MLPs into batched
heads (one member each) with the model's own target transform, so scores computed from a
cache of per-layer window features equal the original model's scores for the same audio."""
from __future__ import annotations

import numpy as np
import torch

from .heads import BatchedMLP, HeadSpec
from .inputs import Units, head_inputs, units_for
from ..store.reader import Cache

AXES = ("PQ", "PC", "CE", "CU")  # the order of the paper's Table II
N_LAYERS, WIDTH = 13, 768


def release_head_spec(axis: str) -> HeadSpec:
    """The head shape of the release checkpoint (5 projection layers, LayerNorm, GELU)."""
    return HeadSpec(name=axis, label=axis, features=("layers",), hidden=(WIDTH,) * 4,
                    activation="gelu", layer_norm=True, layer_weights=True, standardize=True)


def release_heads(model) -> tuple[dict[str, BatchedMLP], dict[str, tuple[float, float]]]:
    """AesMultiOutput -> ({axis: head}, {axis: (mean, std)}) with identical numbers."""
    heads, stats = {}, {}
    for axis in model.axes_name:
        seq = model.proj_layer[axis]
        n_linear = sum(isinstance(m, torch.nn.Linear) for m in seq)
        layer_norm = any(isinstance(m, torch.nn.LayerNorm) for m in seq)
        head = BatchedMLP([0], WIDTH, (WIDTH,) * (n_linear - 1), "gelu", axis, layer_norm,
                          N_LAYERS)
        state = {k: v.detach().float() for k, v in seq.state_dict().items()}
        state["layer_weights"] = model.layer_weights[axis].detach().float()
        head.load_member(0, state)
        heads[axis] = head
        tt = (model.target_transform or {}).get(axis, {"mean": 0.0, "std": 1.0})
        stats[axis] = (float(tt["mean"]), float(tt["std"]))
    return heads, stats


@torch.no_grad()
def clip_scores(cache: Cache, heads: dict[str, BatchedMLP],
                stats: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Per axis, one score per cache clip: window scores, de-standardised, weight-averaged."""
    spec = release_head_spec(next(iter(heads)))
    units: Units = units_for(cache, (spec,))
    x = torch.from_numpy(head_inputs(cache, spec))
    out = {}
    for axis, head in heads.items():
        mean, std = stats[axis]
        z = head(x).double().numpy()  # [1, U]
        out[axis] = units.to_clips(z * std + mean)[0]
    return out
