"""Synthetic caches and the files around them, written with the package's own writer."""
import csv

import numpy as np

from qamro_pipe.config import ExtractConfig
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.loop import extract
from qamro_pipe.store import write_cache
from qamro_pipe.train.aes_release import AXES
from qamro_pipe.train.recipes import load_recipe

from .cli import invoke


def make_synthetic_cache(path, n_systems=12, per_system=20, dim=16, seed=0, signal=1.0,
                         system_mos=True, **overrides):
    """A MusicEval-shaped cache with a planted signal: labels follow a linear function of
    the audio features (overall) and of audio and text (textual), plus noise."""
    rng = np.random.default_rng(seed)
    n = n_systems * per_system
    systems = np.repeat([f"S{i:03d}" for i in range(n_systems)], per_system)
    quality = np.repeat(np.linspace(1.5, 4.5, n_systems), per_system)
    audio = rng.normal(size=(n, dim)).astype(np.float32)
    text = rng.normal(size=(n, dim)).astype(np.float32)
    audio[:, 0] = signal * (quality - 3) + 0.3 * rng.normal(size=n)
    text[:, 0] = audio[:, 0] + 0.3 * rng.normal(size=n)
    overall = np.clip(quality + 0.3 * rng.normal(size=n), 1, 5)
    textual = np.clip(quality * 0.8 + 0.6 + 0.3 * rng.normal(size=n), 1, 5)
    labels = np.stack([np.round(overall * 5) / 5, np.round(textual * 5) / 5], 1)
    splits = np.where(rng.random(n) < 0.25, "dev", "train")
    mos = None
    if system_mos:
        mos = {s: (float(labels[systems == s, 0].mean()), float(labels[systems == s, 1].mean()))
               for s in np.unique(systems)}
    kwargs = dict(ids=[f"clip{i:04d}" for i in range(n)], systems=systems, splits=splits,
                  labels=labels.astype(np.float32), label_names=["overall", "textual"],
                  features={"audio": audio, "text": text}, backbone="synthetic@1",
                  dataset="musiceval", config={"made_by": "tests"}, system_mos=mos)
    kwargs.update(overrides)
    return write_cache(path, **kwargs)


def write_clip_manifest(path, clips):
    """A manifest (id, path, text) of dataset clips, as `predict --manifest` reads one."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "text"])
        for c in clips:
            w.writerow([c.id, str(c.path), c.text])
    return path


INFORMATIVE_LAYER = 7


def per_layer_cache(path, n_systems=10, per_system=16, dim=16, seed=0):
    """Clips of 1-3 windows whose labels follow layer 7's first unit; other layers are noise."""
    rng = np.random.default_rng(seed)
    n = n_systems * per_system
    systems = np.repeat([f"sys{i}" for i in range(n_systems)], per_system)
    quality = np.repeat(np.linspace(2, 9, n_systems), per_system) + rng.normal(0, 0.5, n)
    counts = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    layers = rng.normal(size=(offsets[-1], 13, dim)).astype(np.float32)
    clip_of = np.repeat(np.arange(n), counts)
    layers[:, INFORMATIVE_LAYER, 0] = (quality[clip_of] - 5.5) * 1.5
    labels = np.stack([np.clip(quality + rng.normal(0, 0.3, n) * s, 1, 10)
                       for s in (1, 1.2, 1.4, 1.6)], 1).astype(np.float32)
    return write_cache(path, ids=[f"c{i}" for i in range(n)], systems=systems,
                       splits=np.where(rng.random(n) < 0.25, "dev", "train"), labels=labels,
                       label_names=list(AXES), features={}, backbone="synthetic-layers@1",
                       dataset="aes-natural", windows={"layers": layers}, window_offsets=offsets,
                       window_weight=rng.uniform(0.2, 1.0, offsets[-1]).astype(np.float32))


def pooled_cache(path, n_systems=10, per_system=16, dim=8, seed=0, keep_clip_rows=False):
    """Clips of 1-4 windows of which one, marked (unit 1 = +2, the others' -2), carries the
    clip's quality in unit 0; the other windows' unit 0 is noise. A clip's length-weighted
    mean window dilutes its quality by the other windows; attention pooling can find the
    marked one (train/pooling.py). keep_clip_rows: also the pooled rows under the same name,
    as extract --keep-windows writes a backbone's pooled feature."""
    rng = np.random.default_rng(seed)
    n = n_systems * per_system
    systems = np.repeat([f"S{i:03d}" for i in range(n_systems)], per_system)
    quality = np.repeat(np.linspace(1.5, 4.5, n_systems), per_system) + rng.normal(0, 0.3, n)
    counts = rng.integers(1, 5, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    emb = rng.normal(size=(offsets[-1], dim)).astype(np.float32)
    emb[:, 1] = -2.0
    marked = offsets[:-1] + rng.integers(0, counts)
    emb[marked, 0] = quality - 3.0
    emb[marked, 1] = 2.0
    weight = rng.uniform(0.3, 1.0, offsets[-1]).astype(np.float32)
    labels = np.round(np.clip(quality + rng.normal(0, 0.2, n), 1, 5) * 5)[:, None] / 5
    features = {}
    if keep_clip_rows:
        clip_of = np.repeat(np.arange(n), counts)
        den = np.bincount(clip_of, weights=weight)
        features["emb"] = np.stack([np.bincount(clip_of, weights=weight * emb[:, d]) / den
                                    for d in range(dim)], 1).astype(np.float32)
    return write_cache(path, ids=[f"clip{i:04d}" for i in range(n)], systems=systems,
                       splits=np.where(rng.random(n) < 0.25, "dev", "train"),
                       labels=labels.astype(np.float32), label_names=["overall"],
                       features=features, backbone="synthetic-windows@1", dataset="pooled",
                       windows={"emb": emb}, window_offsets=offsets, window_weight=weight,
                       config={"made_by": "tests"})


def small_recipe(tmp_path):
    lines = ['name = "aes-small"', 'dataset = "aes-natural"', 'backbone = "synthetic-layers"',
             "label_range = [1.0, 10.0]", "[loss]", 'regression = "mse+mae"']
    for axis in AXES:
        lines += ["[[heads]]", f'name = "{axis}"', 'features = ["layers"]',
                  "layer_weights = true", "layer_norm = true", 'activation = "gelu"',
                  "hidden = [16, 16]", "standardize = true"]
    path = tmp_path / "aes-small.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_recipe(path)


SMALL_DEMO = dict(n_systems=6, n_prompts=6, seconds=2.0)  # the demo corpus, small


def small_demo_run(root, *train_options):
    """A small demo corpus under root/corpus, its melstats cache (root/demo/melstats.h5) and
    a run trained on it with the demo recipe (root/run) through the CLI, in process.
    -> (records, cache, run)."""
    recs = load_dataset("demo", root / "corpus", **SMALL_DEMO)
    cache = root / "demo" / "melstats.h5"
    extract(recs, ExtractConfig(backbone="melstats", device="cpu", workers=0), cache,
            progress=False)
    run = root / "run"
    r = invoke("train", "--recipe", "demo", "--cache", cache, "--out", run, *train_options)
    assert r.exit_code == 0, r.output
    return recs, cache, run
