"""The Scorer's cost: Scorer.load (the backbone builds and loads, once), then the first and
the second `score` call on the same loaded scorer (no load in either), for melstats and for
clap-music with random weights (the real architecture, untrained: no download).

    python benchmarks/scorer_calls.py [--backbones melstats,clap-music] [--clips 8]

Each backbone gets a run of two heads trained for a few epochs on a synthetic cache keyed as
its own, so the scorer accepts its features; the clips are 5 s tones with noise at 44.1 kHz
stereo, resampled and downmixed as any file is."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402


def make_run(folder: Path, name: str) -> Path:
    from typer.testing import CliRunner

    from qamro_pipe.cli import app
    from qamro_pipe.config import ExtractConfig, to_jsonable
    from qamro_pipe.extract.backbones import get_backbone
    from qamro_pipe.extract.datasets import DatasetRecords
    from qamro_pipe.extract.loop import cache_key
    from qamro_pipe.store import write_cache

    bb = get_backbone(name, checkpoint="random" if name != "melstats" else None)
    cfg = ExtractConfig(backbone=name, checkpoint=bb.checkpoint, device="cpu", workers=0)
    key = cache_key(DatasetRecords(name="bench", label_names=(), clips=[]), bb, False)
    rng = np.random.default_rng(0)
    n, dim = 48, bb.feature_specs()["audio"].shape[0]
    cache = folder / f"{name}.h5"
    write_cache(cache, ids=[f"t{i}" for i in range(n)], systems=[f"S{i % 6}" for i in range(n)],
                splits=["dev" if i % 4 == 0 else "train" for i in range(n)],
                labels=rng.uniform(1, 5, (n, 2)).astype(np.float32),
                label_names=["overall", "other"],
                features={"audio": rng.normal(size=(n, dim)).astype(np.float32)},
                backbone=bb.key, dataset="bench", config={**key, "extract": to_jsonable(cfg)})
    recipe = folder / f"{name}.toml"
    recipe.write_text(f'name = "bench"\ndataset = "bench"\nbackbone = "{name}"\n'
                      '[[heads]]\nname = "overall"\nfeatures = ["audio"]\n'
                      '[[heads]]\nname = "other"\nfeatures = ["audio"]\n')
    run = folder / f"run-{name}"
    r = CliRunner().invoke(app, ["train", "--recipe", str(recipe), "--cache", str(cache),
                                 "--out", str(run), "--max-epochs", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", default="melstats,clap-music")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    import torch

    from qamro_pipe import Scorer

    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; "
          f"{args.clips} clips of {args.seconds:g} s, 44.1 kHz stereo")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(1)
        files = []
        for i in range(args.clips):
            t = np.arange(int(44100 * args.seconds)) / 44100
            x = 0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t) + 0.05 * rng.standard_normal(len(t))
            sf.write(tmp / f"c{i}.wav", np.stack([x, 0.8 * x], 1).astype(np.float32), 44100)
            files.append(tmp / f"c{i}.wav")
        for name in args.backbones.split(","):
            run = make_run(tmp, name)
            t0 = time.perf_counter()
            scorer = Scorer.load(run, device="cpu")
            t1 = time.perf_counter()
            first = scorer.score(files)
            t2 = time.perf_counter()
            second = scorer.score(files)
            t3 = time.perf_counter()
            assert first == second
            print(f"{name:12s} load {t1 - t0:7.2f} s   first score {t2 - t1:6.2f} s   "
                  f"second score {t3 - t2:6.2f} s   ({args.clips} clips)")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
