"""Extraction past one process: --shard k/n + cache merge, and torchrun with 2 CPU ranks."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import ExtractConfig
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.datasets.demo import write_demo_corpus
from qamro_pipe.errors import CacheError
from qamro_pipe.extract.loop import extract, part_path
from qamro_pipe.extract.shards import merge_parts
from qamro_pipe.store.reader import read_cache

CFG = ExtractConfig(backbone="melstats", device="cpu", workers=0, batch_size=4)


def assert_same_cache(a, b):
    ca, cb = read_cache(a), read_cache(b)
    assert list(ca.ids) == list(cb.ids)
    assert list(ca.systems) == list(cb.systems) and list(ca.splits) == list(cb.splits)
    assert list(ca.texts) == list(cb.texts)
    np.testing.assert_array_equal(ca.labels, cb.labels)
    assert ca.features.keys() == cb.features.keys()
    for k in ca.features:
        np.testing.assert_array_equal(ca.features[k], cb.features[k])
    for k in ca.windows:
        np.testing.assert_array_equal(ca.windows[k], cb.windows[k])
    if ca.window_offsets is not None:
        np.testing.assert_array_equal(ca.window_offsets, cb.window_offsets)
        np.testing.assert_array_equal(ca.window_weight, cb.window_weight)
    assert ca.system_mos.keys() == cb.system_mos.keys()
    assert ca.meta.key == cb.meta.key and ca.meta.config == cb.meta.config
    assert ca.skipped == cb.skipped and np.array_equal(ca.usable, cb.usable)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("c") / "corpus", n_systems=3,
                             n_prompts=5, seconds=1.0)


def test_shards_merge_into_the_single_process_cache(corpus, tmp_path):
    recs = load_dataset("musiceval", corpus)
    extract(recs, CFG, tmp_path / "single.h5", progress=False)
    for k in range(3):
        s = extract(recs, CFG, tmp_path / "c.h5", progress=False, shard=(k, 3))
        assert s.path == part_path(tmp_path / "c.h5", k, 3) and s.written == 5
    parts = [part_path(tmp_path / "c.h5", k, 3) for k in (2, 0, 1)]  # any order
    r = CliRunner().invoke(app, ["cache", "merge", *map(str, parts), "--out",
                                 str(tmp_path / "c.h5")])
    assert r.exit_code == 0, r.output
    assert_same_cache(tmp_path / "single.h5", tmp_path / "c.h5")
    with pytest.raises(CacheError, match="shards 0..2 of 3 exactly once"):
        merge_parts(parts[:2], tmp_path / "x.h5")
    with pytest.raises(CacheError, match="not a shard"):
        merge_parts([tmp_path / "single.h5"], tmp_path / "x.h5")


def test_shards_with_windows_and_skipped_files(tmp_path):
    """Per-window features (offsets, weights) and --skip-bad survive the merge."""
    sr = 16000
    rows = []
    for i, seconds in enumerate((0.5, 2.5, 1.0, 3.5, 0.8)):
        x = 0.3 * np.sin(2 * np.pi * 200 * (i + 1) * np.arange(int(seconds * sr)) / sr)
        sf.write(tmp_path / f"a{i}.wav", x.astype(np.float32), sr)
        rows.append(f"a{i},a{i}.wav,s{i % 2},{i + 1}")
    (tmp_path / "a2.wav").write_bytes(b"not audio")
    (tmp_path / "m.csv").write_text("id,path,system,q\n" + "\n".join(rows) + "\n")
    recs = load_dataset("manifest", tmp_path / "m.csv")
    # melstats with 1 s windows, registered for this test only, to get several windows a clip
    from qamro_pipe.extract.backbones import melstats
    from qamro_pipe.extract.backbones.base import FeatureSpec

    class Windowed(melstats.MelStats):
        name, window_seconds, uses_text = "melstats-windows", 1.0, False

        def feature_specs(self):
            return {"frames": FeatureSpec((melstats.AUDIO_DIM,), per_window=True)}

        def _forward(self, windows):
            return {"frames": super()._forward(windows)["audio"]}

    import qamro_pipe.extract.loop as ex
    real = ex.get_backbone
    ex.get_backbone = lambda name, **kw: Windowed(**kw) if name == Windowed.name else real(
        name, **kw)
    try:
        cfg = ExtractConfig(backbone=Windowed.name, device="cpu", workers=0, skip_bad=True)
        extract(recs, cfg, tmp_path / "single.h5", progress=False)
        for k in range(2):
            extract(recs, cfg, tmp_path / "c.h5", progress=False, shard=(k, 2))
    finally:
        ex.get_backbone = real
    merge_parts([part_path(tmp_path / "c.h5", k, 2) for k in range(2)], tmp_path / "c.h5")
    single = read_cache(tmp_path / "single.h5")
    assert list(np.diff(single.window_offsets)) == [1, 3, 0, 4, 1]
    assert list(single.skipped) == ["a2"]
    assert_same_cache(tmp_path / "single.h5", tmp_path / "c.h5")


def test_torchrun_two_cpu_ranks_on_gloo(corpus, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    single = tmp_path / "single.h5"
    extract(load_dataset("musiceval", corpus), CFG, single, progress=False)
    out = tmp_path / "dist.h5"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "qamro_pipe",
           "extract", "--dataset", "musiceval", "--root", str(corpus), "--backbone", "melstats",
           "--workers", "0", "--batch-size", "4", "--device", "cpu", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"merged all shards into {out}" in p.stdout
    assert not list(tmp_path.glob("dist.part-*"))  # parts removed after the merge
    assert_same_cache(single, out)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout
