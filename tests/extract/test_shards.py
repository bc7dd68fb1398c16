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
from qamro_pipe.errors import CacheError
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.datasets.demo import write_demo_corpus
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


@pytest.fixture
def windowed(monkeypatch):
    """melstats with 1 s windows, registered for one test, to get several windows a clip."""
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
    monkeypatch.setattr(ex, "get_backbone", lambda name, **kw: Windowed(**kw)
                        if name == Windowed.name else real(name, **kw))
    return ExtractConfig(backbone=Windowed.name, device="cpu", workers=0, skip_bad=True)


def _windowed_manifest(folder, lengths, bad=(2,)):
    sr = 16000
    rows = []
    for i, seconds in enumerate(lengths):
        x = 0.3 * np.sin(2 * np.pi * 200 * (i + 1) * np.arange(int(seconds * sr)) / sr)
        sf.write(folder / f"a{i}.wav", x.astype(np.float32), sr)
        rows.append(f"a{i},a{i}.wav,s{i % 2},{i + 1}")
    for i in bad:
        (folder / f"a{i}.wav").write_bytes(b"not audio")
    (folder / "m.csv").write_text("id,path,system,q\n" + "\n".join(rows) + "\n")
    return load_dataset("manifest", folder / "m.csv")


def test_shards_with_windows_and_skipped_files(tmp_path, windowed):
    """Per-window features (offsets, weights) and --skip-bad survive the merge."""
    recs = _windowed_manifest(tmp_path, (0.5, 2.5, 1.0, 3.5, 0.8))
    extract(recs, windowed, tmp_path / "single.h5", progress=False)
    for k in range(2):
        extract(recs, windowed, tmp_path / "c.h5", progress=False, shard=(k, 2))
    merge_parts([part_path(tmp_path / "c.h5", k, 2) for k in range(2)], tmp_path / "c.h5")
    single = read_cache(tmp_path / "single.h5")
    assert list(np.diff(single.window_offsets)) == [1, 3, 0, 4, 1]
    assert list(single.skipped) == ["a2"]
    assert_same_cache(tmp_path / "single.h5", tmp_path / "c.h5")


def test_a_changed_dataset_keeps_window_rows_of_unchanged_clips(tmp_path, windowed):
    """Rows added and removed, a clip's audio now longer (more windows), a bad file fixed:
    the new cache keeps the other clips' window rows and equals a fresh extraction."""
    recs = _windowed_manifest(tmp_path, (0.5, 2.5, 1.0, 3.5, 0.8))
    p = tmp_path / "c.h5"
    extract(recs, windowed, p, progress=False)
    sr = 16000
    for i, seconds in ((1, 4.2), (2, 1.0), (5, 1.5)):  # longer, fixed, new
        x = 0.2 * np.sin(2 * np.pi * 150 * (i + 1) * np.arange(int(seconds * sr)) / sr)
        sf.write(tmp_path / f"a{i}.wav", x.astype(np.float32), sr)
    lines = (tmp_path / "m.csv").read_text().splitlines() + ["a5,a5.wav,s1,6"]
    (tmp_path / "m.csv").write_text("\n".join(x for x in lines if not x.startswith("a3,"))
                                    + "\n")
    recs = load_dataset("manifest", tmp_path / "m.csv")
    s = extract(recs, windowed, p, progress=False)
    # a0 and a4 kept; a1 re-embedded (longer), a2 retried (fixed), a5 new, a3 removed
    assert s.kept == 2 and s.written == 3, s
    assert s.changes[:4] == ["1 re-embedded (audio changed)",
                             "1 retried (skipped before; file changed)", "1 new", "1 removed"]
    extract(recs, windowed, tmp_path / "fresh.h5", progress=False)
    assert_same_cache(p, tmp_path / "fresh.h5")
    assert list(np.diff(read_cache(p).window_offsets)) == [1, 5, 1, 1, 2]


def test_shards_keep_rows_of_the_whole_cache_and_merge_refuses_what_it_did_not_make(
        corpus, tmp_path, monkeypatch):
    """A shard's first run keeps the rows of NAME.h5 that still hold, so a job array (or
    torchrun) over a changed dataset re-embeds only what changed. `cache merge --out X
    --force` replaces a cache, never a folder, another file or one of its own shards."""
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    recs = load_dataset("musiceval", root)
    extract(recs, CFG, tmp_path / "c.h5", progress=False)
    lines = (root / "sets" / "train_mos_list.txt").read_text().splitlines()
    name, _, textual = lines[0].split(",")
    lines[0] = f"{name},1.2,{textual}"
    (root / "sets" / "train_mos_list.txt").write_text("\n".join(lines) + "\n")
    x, sr = sf.read(recs.clips[4].path)
    sf.write(recs.clips[4].path, (0.5 * x).astype(np.float32), sr)
    recs = load_dataset("musiceval", root)
    written = sum(extract(recs, CFG, tmp_path / "c.h5", progress=False, shard=(k, 3)).written
                  for k in range(3))
    assert written == 1  # clip 4 alone
    parts = [str(part_path(tmp_path / "c.h5", k, 3)) for k in range(3)]
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    text = tmp_path / "notes.txt"
    text.write_text("mine")
    for out, what in ((folder, "a folder"), (text, "a file that is not HDF5"),
                      (parts[1], "one of the shards being merged")):
        r = CliRunner().invoke(app, ["cache", "merge", *parts, "--out", str(out), "--force"])
        assert r.exit_code == 1 and what in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert (folder / "sub").is_dir() and text.read_text() == "mine"
    r = CliRunner().invoke(app, ["cache", "merge", *parts, "--out", str(tmp_path / "c.h5"),
                                 "--force"])
    assert r.exit_code == 0, r.output
    extract(recs, CFG, tmp_path / "fresh.h5", progress=False)
    assert_same_cache(tmp_path / "c.h5", tmp_path / "fresh.h5")
    assert read_cache(tmp_path / "c.h5").labels[0, 0] == np.float32(1.2)


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


def test_torchrun_over_a_changed_dataset_redoes_only_what_changed(corpus, tmp_path):
    """Labels alone changed: rank 0 rewrites them, nothing is embedded. Audio changed: each
    rank's part keeps the rows of the whole cache that still hold."""
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    out = tmp_path / "dist.h5"
    extract(load_dataset("musiceval", root), CFG, out, progress=False)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "qamro_pipe",
           "extract", "--dataset", "musiceval", "--root", str(root), "--backbone", "melstats",
           "--workers", "0", "--batch-size", "4", "--device", "cpu", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lines = (root / "sets" / "dev_mos_list.txt").read_text().splitlines()
    name, _, textual = lines[0].split(",")
    (root / "sets" / "dev_mos_list.txt").write_text(
        "\n".join([f"{name},2.2,{textual}", *lines[1:]]) + "\n")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nothing to embed (15 clips); kept 15 clips of the earlier cache; metadata " \
           "rewritten without re-embedding: labels of 1 clip" in p.stdout, p.stdout
    recs = load_dataset("musiceval", root)
    extract(recs, CFG, tmp_path / "single.h5", progress=False)
    assert_same_cache(tmp_path / "single.h5", out)
    x, sr = sf.read(recs.clips[6].path)
    sf.write(recs.clips[6].path, (0.5 * x).astype(np.float32), sr)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "kept 7 clips of the earlier cache" in p.stdout, p.stdout  # rank 0: 8 rows, 1 new
    extract(recs, CFG, tmp_path / "single2.h5", progress=False)
    assert_same_cache(tmp_path / "single2.h5", out)
