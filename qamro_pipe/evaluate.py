"""Re-score a finished run on a cache: its saved heads, any split, metrics with CIs."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig, to_jsonable
from .errors import CacheError, QamroError
from .heads import BatchedMLP, HeadSpec
from .inputs import build_head, head_inputs, label_col, predict_units, units_for
from .metrics import evaluate as figures
from .runs import load_run
from .store import Cache, read_cache

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
    heads = {}
    for h in tr.heads:
        col = label_col(data, h)
        mos = {s: float(v[col]) for s, v in data.system_mos.items()} or None
        heads[h.name] = figures(data.labels[rows, col], preds[h.name][:, rows].mean(0),
                                data.systems[rows], mos, n_boot,
                                what=f"{data.path} head {h.name!r} split {split!r}")
    metrics = {"run": str(tr.path), "cache": str(data.path), "eval_split": split,
               "validation": tr.config.get("validation"), "members": len(tr.members),
               "prediction": "mean over members" if len(tr.members) > 1 else "single member",
               "heads": heads}
    out = tr.path / "evaluations" / f"{data.path.stem}-{split}"
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2) + "\n")
    with open(tmp / "predictions.csv", "w") as f:
        f.write("id,system,split," + ",".join(f"true_{h.name},pred_{h.name}"
                                               for h in tr.heads) + "\n")
        for i in rows:
            cells = [data.ids[i], data.systems[i], data.splits[i]]
            for h in tr.heads:
                true = data.labels[i, label_col(data, h)]
                cells += ["" if np.isnan(true) else f"{true:.6g}",
                          f"{preds[h.name][:, i].mean():.6g}"]
            f.write(",".join(cells) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out, metrics

