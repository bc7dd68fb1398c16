import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import ExtractConfig
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.errors import CacheError, DataError, QamroError
from qamro_pipe.extract.loop import extract
from qamro_pipe.store.files import writer_lock
from qamro_pipe.store.reader import read_cache

SMALL = dict(n_systems=4, n_prompts=6, seconds=1.0)
CFG = ExtractConfig(backbone="melstats", device="cpu", batch_size=4, workers=0)


@pytest.fixture
def demo_records(tmp_path):
    return load_dataset("demo", tmp_path / "corpus", **SMALL)


def _same(a, b):
    ca, cb = read_cache(a), read_cache(b)
    assert list(ca.ids) == list(cb.ids)
    for k in ca.features:
        assert np.array_equal(ca.features[k], cb.features[k]), k
    assert np.array_equal(ca.labels, cb.labels, equal_nan=True)


def test_extract_writes_a_complete_cache(demo_records, tmp_path):
    s = extract(demo_records, CFG, tmp_path / "c.h5", progress=False)
    assert s.written == 24 and s.status == "complete"
    c = read_cache(tmp_path / "c.h5")
    assert c.meta.backbone == "melstats@1" and c.meta.dataset == "demo"
    assert c.features["audio"].shape[0] == 24 and c.features["text"].shape == (24, 64)
    assert set(c.system_mos) == {"S001", "S002", "S003", "S004"}
    assert c.texts[0] and c.meta.config["key"]["sample_rate"] == 16000
    # a finished cache is not redone
    again = extract(demo_records, CFG, tmp_path / "c.h5", progress=False)
    assert again.status == "nothing to do"


def test_workers_give_the_same_numbers(demo_records, tmp_path):
    extract(demo_records, CFG, tmp_path / "a.h5", progress=False)
    cfg = ExtractConfig(backbone="melstats", device="cpu", batch_size=5, workers=2)
    extract(demo_records, cfg, tmp_path / "b.h5", progress=False)
    _same(tmp_path / "a.h5", tmp_path / "b.h5")


def test_unset_batch_and_workers_follow_the_device_and_are_recorded(demo_records, tmp_path,
                                                                     monkeypatch):
    from qamro_pipe.extract.loop import auto_workers
    from qamro_pipe.store.reader import read_meta

    extract(demo_records, ExtractConfig(backbone="melstats", device="cpu"), tmp_path / "a.h5",
            progress=False)
    saved = read_meta(tmp_path / "a.h5").config["extract"]
    assert (saved["batch_size"], saved["workers"]) == (16, 2)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert auto_workers(gpu=False) == 2 and auto_workers(gpu=True) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks share the machine's cores
    assert auto_workers(gpu=True) == 3
    for bad in (dict(batch_size=0), dict(workers=-1)):
        with pytest.raises(QamroError, match="must be at least"):
            extract(demo_records, ExtractConfig(backbone="melstats", device="cpu", **bad),
                    tmp_path / "b.h5", progress=False)
    assert not (tmp_path / "b.h5").exists()


def test_resume_after_interruption_equals_uninterrupted(demo_records, tmp_path, monkeypatch):
    extract(demo_records, CFG, tmp_path / "full.h5", progress=False)
    import qamro_pipe.extract.loop as ex

    real_launch, real_write, events = ex._launch, ex._write, []

    def dies_launching_the_third_batch(*a, **k):
        events.append("launch")
        if events.count("launch") == 3:
            raise KeyboardInterrupt
        return real_launch(*a, **k)

    def write(*a, **k):
        events.append("write")
        return real_write(*a, **k)

    monkeypatch.setattr(ex, "_launch", dies_launching_the_third_batch)
    monkeypatch.setattr(ex, "_write", write)
    # batch N+1 is launched before batch N is collected and written; when launching batch 3
    # is interrupted, batch 2 is already computed, and is written before the run stops
    with pytest.raises(Exception, match="interrupted: 8/24 clips.*rerun the same command"):
        extract(demo_records, CFG, tmp_path / "part.h5", progress=False)
    assert events == ["launch", "launch", "write", "launch", "write"]
    with pytest.raises(CacheError, match="did not finish"):
        read_cache(tmp_path / "part.h5")
    monkeypatch.setattr(ex, "_launch", real_launch)
    s = extract(demo_records, CFG, tmp_path / "part.h5", progress=False)
    assert s.done_before == 8 and s.written == 16
    _same(tmp_path / "full.h5", tmp_path / "part.h5")


def test_other_backbone_config_is_refused_unless_forced(demo_records, tmp_path):
    p = tmp_path / "c.h5"
    extract(demo_records, CFG, p, progress=False)
    bf16 = ExtractConfig(backbone="melstats", device="cpu", precision="bf16", workers=0)
    with pytest.raises(CacheError, match="precision.*--force"):
        extract(demo_records, bf16, p, progress=False)
    s = extract(demo_records, bf16, p, force=True, progress=False)
    assert s.written == 24
    assert read_cache(p).meta.key["precision"] == "bf16"


def test_second_writer_refused(demo_records, tmp_path):
    p = tmp_path / "c.h5"
    with writer_lock(p):
        with pytest.raises(CacheError, match="another process is writing"):
            extract(demo_records, CFG, p, progress=False)


def test_bad_file_stops_or_is_skipped(demo_records, tmp_path):
    bad = demo_records.clips[5].path
    bad.write_bytes(b"RIFF\x00\x00garbage")
    # the first batch (rows 0-3) is still computing when row 5 fails: it is written first
    with pytest.raises(DataError, match=rf"{bad.name}.*stopped with 4/24 clips safely"):
        extract(demo_records, CFG, tmp_path / "c.h5", progress=False)
    cfg = ExtractConfig(backbone="melstats", device="cpu", workers=0, skip_bad=True)
    s = extract(demo_records, cfg, tmp_path / "c.h5", progress=False)
    assert list(s.skipped) == [demo_records.clips[5].id]
    c = read_cache(tmp_path / "c.h5")
    assert not c.usable[5] and c.usable.sum() == 23
    assert demo_records.clips[5].id in c.skipped


def test_extract_cli_and_cache_info(tmp_path, monkeypatch):
    monkeypatch.setenv("QAMRO_CACHE_DIR", str(tmp_path / "cache"))
    from qamro_pipe.extract.datasets.demo import write_demo_corpus

    root = write_demo_corpus(tmp_path / "corpus", **SMALL)  # the MusicEval layout
    r = CliRunner().invoke(app, ["extract", "--dataset", "musiceval", "--root", str(root),
                                 "--backbone", "melstats", "--quiet", "--workers", "0"])
    assert r.exit_code == 0, r.output
    path = tmp_path / "cache" / "musiceval" / "melstats.h5"
    assert "24 clips extracted" in r.output and path.exists()
    r = CliRunner().invoke(app, ["cache", "info", str(path)])
    assert "backbone   melstats@1" in r.output and "features/audio float32 [24, 134]" in r.output
    r = CliRunner().invoke(app, ["extract", "--dataset", "musiceval"])
    assert r.exit_code == 1 and "needs --root" in r.output


def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("QAMRO_CACHE_DIR", str(tmp_path))
    r = CliRunner().invoke(app, ["demo", "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "runs" / "demo-qamro-a0.2-b7" / "metrics.json").read_text())
    assert m["heads"]["overall"]["system"]["srcc"] > 0.5  # melstats carries real signal
    assert (tmp_path / "runs" / "demo-sweep" / "sweep.png").exists()
    assert "synthetic" in r.output


def test_decoder_shared_memory_gives_the_pickled_audio(tmp_path):
    """Clips through shared slots equal clips decoded in-process, bit for bit: ones that fit,
    one too long for a slot (3.5 windows), a broken file, and more clips held by the
    consumer than there are slots (those travel pickled)."""
    import soundfile as sf

    from qamro_pipe.extract.loop import _Decoder

    sr, win = 8000, 8000  # 1 s windows; slots hold 2
    rng = np.random.default_rng(0)
    paths = []
    for i, seconds in enumerate([1.0, 0.4, 3.5, 2.0, 1.7, 0.9, 1.2]):
        p = tmp_path / f"c{i}.wav"
        sf.write(p, rng.uniform(-0.9, 0.9, int(11025 * seconds)).astype(np.float32), 11025)
        paths.append(p)
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    paths.insert(4, tmp_path / "bad.wav")
    tasks = [(i, str(p), sr, None, None) for i, p in enumerate(paths)]

    def run(workers, share, hold):
        dec = _Decoder(tasks, workers, win, ahead=2, held=1, share=share)
        got, held = {}, {}
        try:
            for row, wins, err in dec:
                assert err or all(len(w) <= win for w in wins)
                held[row] = err or wins
                if len(held) >= hold:  # the consumer reads up to `hold` rows' audio late:
                    for r, v in held.items():  # a slot reused too early would show here
                        got[r] = v if isinstance(v, str) else np.concatenate(v).copy()
                    dec.release(list(held))
                    held = {}
            for r, v in held.items():
                got[r] = v if isinstance(v, str) else np.concatenate(v).copy()
        finally:
            dec.close()
        return got

    inline = run(0, False, 1)
    assert isinstance(inline[4], str) and len(inline) == len(paths)
    for share, hold in ((True, 1), (True, 5), (False, 1)):
        got = run(2, share, hold)
        assert got.keys() == inline.keys()
        for row, x in inline.items():
            if isinstance(x, str):
                assert got[row] == x
            else:
                assert np.array_equal(got[row], x), (share, hold, row)
