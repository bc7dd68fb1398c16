"""Re-score a finished run on a cache: its saved heads, any split, metrics with CIs."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig, to_jsonable
from ..errors import CacheError, QamroError
from ..train.heads import BatchedMLP, HeadSpec
from ..train.inputs import build_head, head_inputs, predict_units, units_for
from ..train.runs import head_metrics, load_run, write_predictions
from ..store.reader import Cache, read_cache

# key fields of the cache that decide what the features mean (not which clips are in it)
FEATURE_KEY = ("backbone", "weights", "sample_rate", "window_seconds", "precision",
               "resampler", "downmix")


class TrainedRun:
    """A run folder's heads, ready to score any cache made the same way."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config, tensors = load_run(self.path)
        self.heads = tuple(HeadSpec(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in h.items()}) for h in self.config["heads"])
        train_cfg = {k: tuple(v) if isinstance(v, list) else v
                     for k, v in self.config["train"].items()}
        self.train_cfg = TrainConfig(**train_cfg)
        self.stats = {h: tuple(v) for h, v in self.config.get("label_stats", {}).items()}
        self.members = sorted({int(k.split("/")[1][1:]) for k in tensors})
        self.models: dict[str, BatchedMLP] = {}
        self._tensors = tensors

    @property
    def backbone(self) -> str:
        return self.config["backbone"]

    def check_cache(self, cache: Cache) -> None:
        if cache.meta.backbone != self.backbone:
            raise CacheError(f"{cache.path}: made with backbone {cache.meta.backbone}, but run "
                             f"{self.path} was trained on {self.backbone} features")
        theirs = self.config.get("cache_key", {})
        diffs = [f"{k}: cache {cache.meta.key.get(k)!r}, run {theirs.get(k)!r}"
                 for k in FEATURE_KEY if k in theirs and cache.meta.key.get(k) != theirs.get(k)]
        if diffs:
            raise CacheError(f"{cache.path}: features made differently from run {self.path}'s ("
                             + "; ".join(diffs) + ")")

    def _model(self, head: HeadSpec, x_shape: tuple[int, ...]) -> BatchedMLP:
        if head.name not in self.models:
            model = build_head(head, [0] * len(self.members), x_shape, self.train_cfg)
            for i, k in enumerate(self.members):
                prefix = f"{head.name}/m{k}/"
                model.load_member(i, {n[len(prefix):]: t for n, t in self._tensors.items()
                                      if n.startswith(prefix)})
            self.models[head.name] = model.eval()
        return self.models[head.name]

    def predict(self, cache: Cache) -> dict[str, np.ndarray]:
        """head -> [members, clips] scores on the labels' scale."""
        self.check_cache(cache)
        units = units_for(cache, self.heads)
        out = {}
        for h in self.heads:
            x = torch.from_numpy(head_inputs(cache, h))
            mean, std = self.stats.get(h.name, (0.0, 1.0))
            out[h.name] = units.to_clips(predict_units(self._model(h, tuple(x.shape)), x)
                                         * std + mean)
        return out


def evaluate_run(run: str | Path, split: str = "dev", cache: str | Path | None = None,
                 n_boot: int = 1000) -> tuple[Path, dict[str, Any]]:
    """Score a run's heads on `split` of a cache (default: the one it trained on); writes
    RUN/evaluations/<cache>-<split>/metrics.json and predictions.csv."""
    tr = TrainedRun(run)
    data = read_cache(cache or tr.config["cache"])
    preds = tr.predict(data)
    rows = data.rows(split)
    if len(rows) == 0:
        raise QamroError(f"{data.path}: split {split!r} has no usable rows (splits here: "
                         f"{', '.join(sorted(set(data.splits)))})")
    means = {h: p.mean(0) for h, p in preds.items()}  # the run's score: mean over members
    heads = head_metrics(data, tr.heads, means, rows, n_boot, what=f" split {split!r}")
    metrics = {"run": str(tr.path), "cache": str(data.path), "eval_split": split,
               "validation": tr.config.get("validation"), "members": len(tr.members),
               "prediction": "mean over members" if len(tr.members) > 1 else "single member",
               "heads": heads}
    out = tr.path / "evaluations" / f"{data.path.stem}-{split}"
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2) + "\n")
    write_predictions(tmp / "predictions.csv", data, tr.heads,
                      {h: m[None] for h, m in means.items()}, rows)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out, metrics

