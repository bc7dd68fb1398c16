"""What --train-windows does on a synthetic cache of short and long clips (issue 19 A3).

Most clips are one 10 s window; 15% are long (20 windows: 200 s, like full songs among 10 s
clips). Every window's per-layer features carry its clip's quality plus window noise, the
same rule for short and long clips. Each choice trains 3 seeds (batch 120, AdamW 1e-3,
patience 20 (and 60 for one window per clip, whose epochs have fewer steps), at most 300
epochs, 10% of train held out for early stopping); the figures are
the eval clips' utterance SRCC (clip score: length-weighted mean of its windows), for short
and long clips apart, mean ± sd over seeds. Synthetic: it shows the mechanics, not what
AES-Natural's real clips would do.

    OMP_NUM_THREADS=1 python benchmarks/windows.py"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.store import read_cache, write_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.trainer import train

HEAD = HeadSpec(name="q", label="q", features=("layers",), hidden=(64,), activation="gelu",
                layer_weights=True, layer_norm=True, standardize=True)


def fixture(path: Path, n_short=340, n_long=60, long_windows=20, seed=0):
    rng = np.random.default_rng(seed)
    n = n_short + n_long
    counts = rng.permutation(np.r_[np.ones(n_short, int), np.full(n_long, long_windows)])
    quality = rng.uniform(1, 9, n)
    offsets = np.r_[0, np.cumsum(counts)]
    clip_of = np.repeat(np.arange(n), counts)
    layers = rng.normal(size=(offsets[-1], 13, 32)).astype(np.float32)
    layers[:, 5, :4] += ((quality[clip_of] - 5) / 3)[:, None] \
        + rng.normal(0, 0.8, (offsets[-1], 4))  # the window's own variation
    labels = (quality + rng.normal(0, 0.5, n)).astype(np.float32)[:, None]
    splits = np.where(rng.uniform(size=n) < 0.75, "train", "eval")
    write_cache(path, ids=[f"c{i:03d}" for i in range(n)], systems=[""] * n, splits=splits,
                labels=labels, label_names=["q"], features={}, backbone="synthetic@1",
                dataset="windows-bench", config={"made_by": "benchmarks/windows.py"},
                windows={"layers": layers}, window_offsets=offsets,
                window_weight=np.ones(offsets[-1], np.float32))
    return read_cache(path), counts


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache, counts = fixture(Path(tmp) / "w.h5")
        long = counts > 1
        ev = np.flatnonzero(cache.splits == "eval")
        print(f"clips {len(counts)} ({long.sum()} long of {counts.max()} windows, "
              f"{long.mean():.0%}); windows {counts.sum()}; long clips hold "
              f"{counts[long].sum() / counts.sum():.0%} of the windows")
        print("| --train-windows | patience | rows per epoch (long clips' share) | epochs run (mean) | "
              "seconds | eval SRCC, short clips | eval SRCC, long clips |")
        print("|---|---|---|---|---|---|---|")
        for choice, patience in (("all", 20), ("one-per-clip", 20), ("one-per-clip", 60)):
            cfg = TrainConfig(optimizer="adamw", lr=1e-3, batch_size=120, max_epochs=300,
                              patience=patience, eval_split="eval", bootstrap=0, device="cpu",
                              train_windows=choice)
            members = [Member(LossConfig(), s) for s in range(3)]
            t = time.perf_counter()
            res = train(cache, (HEAD,), members, cfg)
            sec = time.perf_counter() - t
            fit = np.zeros(len(counts), bool)
            fit[res.split.train] = True
            rows = counts[fit].sum() if choice == "all" else fit.sum()
            share = (counts[fit & long].sum() if choice == "all" else (fit & long).sum()) / rows
            y = cache.labels[:, 0]
            srcc = {g: [spearmanr(p[ev[m]], y[ev[m]])[0] for p in res.predictions["q"]]
                    for g, m in (("short", ~long[ev]), ("long", long[ev]))}
            print(f"| {choice} | {patience} | {rows} ({share:.0%}) | {np.mean(res.stopped_epoch):.0f} | "
                  f"{sec:.1f} | {np.mean(srcc['short']):.3f} ± {np.std(srcc['short'], ddof=1):.3f}"
                  f" | {np.mean(srcc['long']):.3f} ± {np.std(srcc['long'], ddof=1):.3f} |")


if __name__ == "__main__":
    main()
