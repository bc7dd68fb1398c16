import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qamro_pipe.store import write_cache  # noqa: E402


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
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "text"])
        for c in clips:
            w.writerow([c.id, str(c.path), c.text])
    return path


@pytest.fixture
def synthetic_cache(tmp_path):
    return make_synthetic_cache(tmp_path / "synthetic.h5")
