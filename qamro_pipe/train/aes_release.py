"""The released Audiobox-Aesthetics heads as qamro-pipe heads.

`release_heads` copies an `AesMultiOutput`'s per-axis layer weights and MLPs into batched
heads (one member each) with the model's own target transform, so scores computed from a
cache of per-layer window features equal the original model's scores for the same audio.

`read_release` does the same from the checkpoint file the cache was extracted from, read as
data only: for `--init release` (every member starts from the released heads, as the
published track 2 code does), `--label-stats release` (the heads standardise labels by the
release's target mean and std) and Table II's zero-shot row (`clip_scores`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import AES_HEAD_CFG_KEYS, read_aes_checkpoint, sha256_file
from ..errors import QamroError
from ..store.reader import Cache
from .heads import BatchedMLP, HeadSpec
from .inputs import Units, head_inputs, units_for

AXES = ("PQ", "PC", "CE", "CU")  # the order of the paper's Table II
N_LAYERS, WIDTH = 13, 768


def release_head_spec(axis: str) -> HeadSpec:
    """The head shape of the release checkpoint (5 projection layers, LayerNorm, GELU)."""
    return HeadSpec(name=axis, label=axis, features=("layers",), hidden=(WIDTH,) * 4,
                    activation="gelu", layer_norm=True, layer_weights=True, standardize=True)


def release_heads(model) -> tuple[dict[str, BatchedMLP], dict[str, tuple[float, float]]]:
    """AesMultiOutput -> ({axis: head}, {axis: (mean, std)}) with identical numbers."""
    cfg = {k: getattr(model, k) for k in AES_HEAD_CFG_KEYS}
    return heads_from_state(model.state_dict(), model.target_transform, cfg)


def check_release_cfg(where, cfg: dict, target_transform, axes=AXES) -> None:
    """Refuse, in one line, a release whose heads the cached features and our heads cannot
    reproduce (its model_cfg is read, not assumed), or whose target_transform, the mean and
    std its scores are de-standardised by, is missing."""
    want = {"nth_layer": N_LAYERS, "use_weighted_layer_sum": True, "normalize_embed": True,
            "output_dim": 1, "proj_act_fn": "gelu"}
    wrong = [f"{k} {cfg.get(k)!r} (this tool: {v!r})" for k, v in want.items()
             if cfg.get(k) != v]
    if wrong:
        raise QamroError(f"{where}: a released model the cached {N_LAYERS}-layer features "
                         f"cannot reproduce: model_cfg {', '.join(wrong)}")
    tt = target_transform if isinstance(target_transform, dict) else {}
    lacking = [a for a in axes if not (isinstance(tt.get(a), dict)
                                       and {"mean", "std"} <= set(tt[a]))]
    if lacking:
        raise QamroError(f"{where}: no target_transform mean and std for "
                         f"{', '.join(lacking)}: the released heads' scores cannot be "
                         f"de-standardised without them")


def heads_from_state(state: dict[str, torch.Tensor], target_transform, cfg: dict,
                     where: str = "the released model") \
        -> tuple[dict[str, BatchedMLP], dict[str, tuple[float, float]]]:
    """An AesMultiOutput state dict ("layer_weights.PQ", "proj_layer.PQ.0.weight", ...) and
    its model_cfg -> ({axis: head}, {axis: (mean, std)}). The projection's modules are told
    apart by their weights (a Linear's is 2-d, a LayerNorm's 1-d; GELU and Dropout have
    none), so the release's module numbering need not be ours; their number and the
    LayerNorms are checked against model_cfg (proj_num_layer, proj_ln)."""
    axes = [a for a in AXES if f"layer_weights.{a}" in state]
    check_release_cfg(where, cfg, target_transform, axes)
    heads, stats = {}, {}
    for axis in axes:
        prefix = f"proj_layer.{axis}."
        modules = sorted({int(k[len(prefix):].split(".")[0]) for k in state
                          if k.startswith(prefix)})
        linear = [i for i in modules if state[f"{prefix}{i}.weight"].dim() == 2]
        layer_norm = len(modules) > len(linear)
        if (len(linear), layer_norm) != (cfg["proj_num_layer"], bool(cfg["proj_ln"])):
            raise QamroError(f"{where}: the {axis} head holds {len(linear)} linear layers"
                             f"{' with' if layer_norm else ' without'} LayerNorm; its model_cfg "
                             f"says proj_num_layer {cfg['proj_num_layer']}, proj_ln "
                             f"{cfg['proj_ln']}")
        step = 3 if layer_norm else 2  # our nn.Sequential numbering (heads._sequential_names)
        ours = {"layer_weights": state[f"layer_weights.{axis}"]}
        for n, i in enumerate(linear):
            norm = i + 1 if layer_norm and i + 1 in modules and i + 1 not in linear else None
            for part in ("weight", "bias"):
                ours[f"{step * n}.{part}"] = state[f"{prefix}{i}.{part}"]
                if norm is not None:  # the LayerNorm after a hidden Linear
                    ours[f"{step * n + 1}.{part}"] = state[f"{prefix}{norm}.{part}"]
        head = BatchedMLP([0], WIDTH, (WIDTH,) * (len(linear) - 1), "gelu", axis, layer_norm,
                          N_LAYERS, init=False)
        head.load_member(0, {k: v.detach().float() for k, v in ours.items()})
        heads[axis] = head
        tt = target_transform[axis]
        stats[axis] = (float(tt["mean"]), float(tt["std"]))
    return heads, stats


@dataclass
class ReleasedHeads:
    """The released heads read from one checkpoint file, by axis."""

    path: Path
    sha256: str
    heads: dict[str, BatchedMLP]  # axis -> head (one member)
    stats: dict[str, tuple[float, float]]  # axis -> (mean, std) of its target transform

    def record(self, used_for: list[str]) -> dict[str, Any]:
        return {"file": str(self.path), "sha256": self.sha256, "used_for": used_for}

    def for_heads(self, heads: tuple[HeadSpec, ...]) -> dict[str, str]:
        """head name -> the release axis it takes (its label); one error for a head whose
        label the release has no head for."""
        missing = [f"{h.name!r} ({h.label})" for h in heads if h.label not in self.heads]
        if missing:
            raise QamroError(f"{self.path}: the released model has heads for "
                             f"{', '.join(self.heads)}, not for {', '.join(missing)}")
        return {h.name: h.label for h in heads}


def release_file(cache: Cache, given: str | Path | None = None) -> tuple[Path, str]:
    """(path, sha256) of the release checkpoint for `cache`: `given`, else the file its
    provenance names; either way it must be the file the cache's features were extracted
    with (the same sha256), or the released heads would read another encoder's features."""
    prov = (cache.meta.config or {}).get("provenance") or {}
    want = prov.get("checkpoint_sha256")
    if not want:
        raise QamroError(f"{cache.path}: records no checkpoint it was extracted with (backbone "
                         f"{cache.meta.backbone}, checkpoint {prov.get('checkpoint')!r}), so "
                         f"the released Audiobox-Aesthetics heads cannot be matched with its "
                         f"features")
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise QamroError(f"--release-checkpoint {path}: no such file")
    else:
        where = prov.get("checkpoint_path")
        path = Path(where) if where else None
        if path is None or not path.is_file():
            raise QamroError(f"{cache.path} was extracted with {where or prov.get('checkpoint')}"
                             f", which is not there now; pass --release-checkpoint PATH (the "
                             f"file with sha256 {want})")
    sha = sha256_file(path)
    if sha != want:
        raise QamroError(f"{path}: sha256 {sha}, but {cache.path} was extracted with {want}: "
                         f"the released heads would read another encoder's features")
    return path, sha


def read_release(cache: Cache, given: str | Path | None = None) -> ReleasedHeads:
    """The released heads and target transform of `cache`'s checkpoint (`release_file`)."""
    path, sha = release_file(cache, given)
    cfg, transform, state = read_aes_checkpoint(path)
    heads, stats = heads_from_state(state, transform, cfg, str(path))
    if not heads:
        raise QamroError(f"{path}: holds no Audiobox-Aesthetics heads (no layer_weights.PQ, "
                         f"...)")
    return ReleasedHeads(path, sha, heads, stats)


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
