"""An Audiobox-Aesthetics release checkpoint built the way its publisher builds it, and
AES-Natural-shaped caches that record it as the file they were extracted with.

The checkpoint: audiobox_aesthetics' own AesMultiOutput with random weights (release head
configuration), saved as the release checkpoint.pt is laid out: a Lightning checkpoint whose
"state_dict" keys carry the "model." prefix, with "model_cfg" and "target_transform" beside
it (what facebookresearch/audiobox-aesthetics src/audiobox_aesthetics/infer.py reads:
ckpt["state_dict"] with the prefix stripped, ckpt["model_cfg"][...], ckpt["target_transform"]).

The caches: per-layer window features [M, 13, 768] with a planted signal (layer 7's first
unit follows the clip's quality), the AES-Natural splits (train and dev without systems, a
labelled eval split of systems), labels on the raters' 0-10 scale, and the provenance our
extraction writes for that checkpoint (the aesthetics backbone's own `provenance()`)."""
from pathlib import Path

import numpy as np
import torch

from qamro_pipe.store import write_cache

AXES = ("PQ", "PC", "CE", "CU")
INFORMATIVE_LAYER = 7
# a target transform per axis, apart from any train split's statistics
TRANSFORM = {a: {"mean": 5.5 + 0.3 * i, "std": 1.6 + 0.2 * i} for i, a in enumerate(AXES)}


def publisher_checkpoint(path: Path, seed: int = 0) -> Path:
    """checkpoint.pt from AesMultiOutput with random weights, layer weights included."""
    from qamro_pipe.extract.backbones.aesthetics import RELEASE_HEAD_CFG, build_aes

    model = build_aes(RELEASE_HEAD_CFG, target_transform=TRANSFORM)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in model.layer_weights.values():
            w.copy_(torch.randn(w.shape, generator=g))
    torch.save({"model_cfg": dict(RELEASE_HEAD_CFG), "target_transform": TRANSFORM,
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def provenance_of(checkpoint: Path) -> dict:
    """What our extraction records for a cache made with `checkpoint` (its own code)."""
    from qamro_pipe.extract.backbones import get_backbone

    bb = get_backbone("aesthetics", checkpoint=str(checkpoint))
    bb.weights_path()
    return bb.provenance()


def aes_cache(path: Path, provenance: dict | None = None, n_systems: int = 6,
              per_system: int = 8, n_train: int = 120, n_dev: int = 24, dim: int = 768,
              seed: int = 0) -> Path:
    """train / dev (no systems) and eval (n_systems x per_system) clips of 1-2 windows."""
    rng = np.random.default_rng(seed)
    n_eval = n_systems * per_system
    n = n_train + n_dev + n_eval
    splits = np.array(["train"] * n_train + ["dev"] * n_dev + ["eval"] * n_eval)
    systems = np.array([""] * (n_train + n_dev)
                       + [f"sys{i:02d}" for i in np.repeat(np.arange(n_systems), per_system)])
    quality = rng.uniform(0.5, 9.8, n)  # the whole 0-10 scale, a few below 1
    quality[n_train + n_dev:] = np.repeat(np.linspace(2, 9, n_systems), per_system) \
        + rng.normal(0, 0.4, n_eval)
    counts = rng.integers(1, 3, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    clip_of = np.repeat(np.arange(n), counts)
    layers = rng.normal(size=(offsets[-1], 13, dim)).astype(np.float32)
    layers[:, INFORMATIVE_LAYER, 0] = (quality[clip_of] - 5) * 2
    labels = np.stack([np.round(np.clip(quality + rng.normal(0, 0.3, n) * s, 0, 10), 1)
                       for s in (1, 1.2, 1.4, 1.6)], 1).astype(np.float32)
    config = {"provenance": provenance} if provenance else {"made_by": "tests"}
    return write_cache(path, ids=[f"c{i:03d}" for i in range(n)], systems=systems,
                       splits=splits, labels=labels, label_names=list(AXES), features={},
                       backbone="aesthetics@2", dataset="aes-natural", config=config,
                       windows={"layers": layers}, window_offsets=offsets,
                       window_weight=rng.uniform(0.2, 1.0, offsets[-1]).astype(np.float32))
