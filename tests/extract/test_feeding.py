"""Issue 22: the process that feeds the model. The decoding pool hands clips over through
shared rows, a batch's windows are written in runs, and the benchmarks' zero-cost backbones
take the real backbones' inputs; none of it may change a number in the cache."""
import os
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf

import qamro_pipe.extract.loop as ex
from qamro_pipe.config import ExtractConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.extract.backbones import get_backbone, melstats
from qamro_pipe.extract.backbones.base import FeatureSpec
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.datasets.demo import write_demo_corpus
from qamro_pipe.extract.decoding import Decoder
from qamro_pipe.extract.loop import extract
from qamro_pipe.store.writer import CacheWriter, create_cache

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _datasets(path):
    """Every dataset of an HDF5 file but the run's own config, by name."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset)
                     else None)
    return out


class Windowed(melstats.MelStats):
    """melstats with 1 s windows and a per-window feature: several windows a clip."""
    name, window_seconds, uses_text = "melstats-windows-feeding", 1.0, False

    def feature_specs(self):
        return {"audio": FeatureSpec((melstats.AUDIO_DIM,)),
                "frames": FeatureSpec((melstats.AUDIO_DIM,), per_window=True)}

    def _forward(self, windows):
        a = super()._forward(windows)["audio"]
        return {"audio": a, "frames": a}


@pytest.fixture
def clips_of_many_lengths(tmp_path, monkeypatch):
    """A manifest of clips from 0.3 s to 4.2 s (1 to 5 windows) and the windowed backbone."""
    real = ex.get_backbone
    monkeypatch.setattr(ex, "get_backbone", lambda name, **kw: Windowed(**kw)
                        if name == Windowed.name else real(name, **kw))
    rng = np.random.default_rng(0)
    rows = []
    for i, seconds in enumerate([0.3, 4.2, 1.0, 2.5, 0.7, 3.1, 1.9, 4.0, 0.5, 2.2, 1.4, 3.6]):
        sf.write(tmp_path / f"c{i}.wav", rng.uniform(-0.5, 0.5, int(22050 * seconds))
                 .astype(np.float32), 22050)
        rows.append(f"c{i},c{i}.wav,s{i % 3},{i % 5}")
    (tmp_path / "m.csv").write_text("id,path,system,q\n" + "\n".join(rows) + "\n")
    return load_dataset("manifest", tmp_path / "m.csv")


def test_decoding_workers_and_window_runs_give_the_in_process_cache_bit_for_bit(
        clips_of_many_lengths, tmp_path):
    """Clips through the shared rows (and, when too few rows are free, pickled), batches of
    several clips whose windows are written in runs: every byte of every dataset equals a
    run that decodes in this process with batches of one window."""
    one = ExtractConfig(backbone=Windowed.name, device="cpu", workers=0, batch_size=1)
    pool = ExtractConfig(backbone=Windowed.name, device="cpu", workers=2, batch_size=7)
    extract(clips_of_many_lengths, one, tmp_path / "one.h5", progress=False)
    extract(clips_of_many_lengths, pool, tmp_path / "pool.h5", progress=False)
    a, b = _datasets(tmp_path / "one.h5"), _datasets(tmp_path / "pool.h5")
    assert a.keys() == b.keys() and "windows/frames" in a
    assert len(a["windows/frames"]) == 31  # 1+5+1+3+1+4+2+4+1+3+2+4 windows
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_window_rows_written_in_runs_equal_rows_written_one_by_one(tmp_path):
    """CacheWriter.write puts a batch's windows in runs of clips that lie back to back;
    rows out of order, a gap, a clip of no window and one of three: same file contents."""
    counts = [2, 0, 3, 1, 2, 1]

    def make(p):
        create_cache(p, ids=[f"c{i}" for i in range(6)], systems=["s"] * 6,
                     splits=["train"] * 6, labels=np.ones((6, 1)), label_names=["q"],
                     backbone="b@1", dataset="d", config={}, feature_shapes={"a": (2,)},
                     window_shapes={"w": (2, 3)}, window_counts=counts)
        return p

    rng = np.random.default_rng(1)
    wins = [rng.normal(size=(c, 2, 3)) for c in counts]
    weights = [rng.uniform(1, 2, c) for c in counts]
    feats = rng.normal(size=(6, 2))
    order = [4, 0, 1, 2, 5]  # row 3 left out: a gap between runs
    with CacheWriter(make(tmp_path / "runs.h5")) as w:
        w.write(order, {"a": feats[order]}, {"w": [wins[i] for i in order]},
                [weights[i] for i in order])
    with CacheWriter(make(tmp_path / "single.h5")) as w:
        for i in order:
            w.write([i], {"a": feats[[i]]}, {"w": [wins[i]]}, [weights[i]])
    a, b = _datasets(tmp_path / "runs.h5"), _datasets(tmp_path / "single.h5")
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k
    assert a["done"].tolist() == [1, 1, 1, 0, 1, 1]


def test_a_decoding_worker_that_dies_stops_the_run_with_a_message(tmp_path):
    """Before, a ProcessPoolExecutor raised BrokenProcessPool; the pool must not wait for a
    clip that a dead worker will never send."""
    for i in range(6):
        sf.write(tmp_path / f"c{i}.wav", np.zeros(8000, np.float32), 8000)
    tasks = [(i, str(tmp_path / f"c{i}.wav"), 8000, None, None) for i in range(6)]
    dec = Decoder(tasks, 2, 8000, ahead=1, held=1)
    try:
        assert next(dec)[0] == 0
        os.kill(dec.procs[0].pid, signal.SIGKILL)
        dec.procs[0].join()
        with pytest.raises(QamroError, match=r"a decoding worker died \(exit code -9\)"):
            for row, _, _ in dec:
                dec.release([row])
    finally:
        dec.close()
    assert not dec.procs


def test_null_backbones_take_the_real_backbones_inputs_and_shapes(tmp_path):
    """The host ceiling's zero-cost backbones (benchmarks/null_backbone.py) window, pad and
    shape as clap-music and aesthetics do, and run through extract with workers."""
    sys.path.insert(0, str(BENCHMARKS))  # benchmarks/ is not a package: not offered to users
    try:
        import null_backbone  # noqa: F401  (registers them)
    finally:
        sys.path.remove(str(BENCHMARKS))
    for null, real in (("null-clap", "clap-music"), ("null-aesthetics", "aesthetics")):
        a, b = get_backbone(null, checkpoint="random"), get_backbone(real, checkpoint="random")
        assert (a.sample_rate, a.window_samples, a.uses_text, a.feature_specs()) == \
            (b.sample_rate, b.window_samples, b.uses_text, b.feature_specs())
        short = [np.ones(1000, np.float32), np.ones(a.window_samples, np.float32)]
        x = a.prepare_windows(short)
        x = x[0] if isinstance(x, tuple) else x
        assert x.device.type == "meta" and x.shape[0] == 2 and x.shape[-1] == a.window_samples
        out = a.embed_windows(short)
        assert {k: v.shape for k, v in out.items()} == {
            k: (2, *s.shape) for k, s in b.feature_specs().items() if not s.text}
    recs = load_dataset("musiceval", write_demo_corpus(tmp_path / "corpus", n_systems=2,
                                                       n_prompts=3, seconds=12.0))
    s = extract(recs, ExtractConfig(backbone="null-aesthetics", checkpoint="random",
                                    device="cpu", workers=2, batch_size=4),
                tmp_path / "c.h5", progress=False)
    d = _datasets(tmp_path / "c.h5")
    assert s.written == 6 and d["windows/layers"].shape == (12, 13, 768)  # 2 windows a clip
    assert not d["windows/layers"].any() and d["done"].all()
