import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import ExtractConfig
from qamro_pipe.errors import CacheError, DataError, QamroError
from qamro_pipe.extract.datasets import load_dataset
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
    import qamro_pipe.extract.batches as ex

    real_launch, real_write, events = ex.launch, ex.write_batch, []

    def dies_launching_the_third_batch(*a, **k):
        events.append("launch")
        if events.count("launch") == 3:
            raise KeyboardInterrupt
        return real_launch(*a, **k)

    def write(*a, **k):
        events.append("write")
        return real_write(*a, **k)

    monkeypatch.setattr(ex, "launch", dies_launching_the_third_batch)
    monkeypatch.setattr(ex, "write_batch", write)
    # batch N+1 is launched before batch N is collected and written; when launching batch 3
    # is interrupted, batch 2 is already computed, and is written before the run stops
    with pytest.raises(Exception, match="interrupted: 8/24 clips.*rerun the same command"):
        extract(demo_records, CFG, tmp_path / "part.h5", progress=False)
    assert events == ["launch", "launch", "write", "launch", "write"]
    with pytest.raises(CacheError, match="did not finish"):
        read_cache(tmp_path / "part.h5")
    monkeypatch.setattr(ex, "launch", real_launch)
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
    assert "audio      24 files, identity (path, size, mtime) per clip" in r.output
    r = CliRunner().invoke(app, ["extract", "--dataset", "musiceval"])
    assert r.exit_code == 1 and "needs --root" in r.output


def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("QAMRO_CACHE_DIR", str(tmp_path))
    r = CliRunner().invoke(app, ["demo", "--quiet"])
    assert r.exit_code == 0, r.output
    runs = tmp_path / "runs"
    m = json.loads((runs / "demo-melstats-qamro-a0.2-b7" / "metrics.json").read_text())
    assert m["heads"]["overall"]["system"]["srcc"] > 0.5  # melstats carries real signal
    assert (runs / "demo-melstats-sweep-qamro+baseline-a0.2-b1-11x6" / "sweep.png").exists()
    assert "synthetic" in r.output.lower()  # the note says what the figures are
    # the losses table (issue 15 item 2) on the demo cache, as make table-losses runs it
    t = CliRunner().invoke(app, ["table", "--recipe", "table-losses", "--model", "demo",
                                 "--seeds", "1", "--max-epochs", "3", "--quiet"])
    assert t.exit_code == 0, t.output
    assert (tmp_path / "runs" / "table-losses-demo-melstats" / "compare.md").exists()
    assert "P(> QAMRO)" in t.output


def test_decoder_shared_memory_gives_the_pickled_audio(tmp_path):
    """Clips through shared rows equal clips decoded in-process, bit for bit: short ones, one
    of 3.5 windows (in four rows), a broken file, and more clips held by the consumer than
    there are free rows (those travel pickled)."""
    import soundfile as sf

    from qamro_pipe.extract.decoding import Decoder

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
        dec = Decoder(tasks, workers, win, ahead=2, held=1, share=share)
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
        pickled[(share, hold)] = dec.pickled
        return got

    pickled = {}

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
    # every good clip pickled without sharing; some when the consumer holds more than fits
    assert pickled[(False, 1)] == len(paths) - 1 and pickled[(True, 5)] > 0


# -- issue 12: --force replaces only a cache, a cache never serves stale contents, a failed
# -- start does not block its fix

def _write_clips(folder, n=8, seed=0):
    """n one-second clips (tones in noise), each different."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    for i in range(n):
        x = 0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t) + 0.02 * rng.normal(size=t.size)
        sf.write(folder / f"c{i}.wav", x.astype(np.float32), 16000)


def _manifest(folder, rows=None, n=8):
    """Our own manifest format (qamro_pipe/extract/datasets/manifest.py): id, path, system,
    split, text, one score column. rows: {i: {column: value}} overrides; "drop" leaves the
    row out."""
    lines = ["id,path,system,split,text,mos"]
    for i in range(n):
        r = {"id": f"c{i}", "path": f"c{i}.wav", "system": f"S{i % 3}",
             "split": "dev" if i % 4 == 3 else "train", "text": f"tone {i}",
             "mos": f"{1 + (i % 5) * 0.5}"}
        r.update((rows or {}).get(i, {}))
        if not r.get("drop"):
            lines.append(",".join(r[k] for k in ("id", "path", "system", "split", "text",
                                                 "mos")))
    p = folder / "clips.csv"
    p.write_text("\n".join(lines) + "\n")
    return load_dataset("manifest", p)


def _count_launches(monkeypatch) -> list:
    import qamro_pipe.extract.batches as ex

    real, rows = ex.launch, []

    def launch(bb, clips, batch, *rest):
        rows.extend(r for r, _ in batch)
        return real(bb, clips, batch, *rest)

    monkeypatch.setattr(ex, "launch", launch)
    return rows


def _equal_files(a, b):
    """Every attribute and dataset of two caches equal (the fault suite's exact compare)."""
    from kit.children import assert_same_file

    assert_same_file(a, b)


def test_changed_labels_systems_splits_are_rewritten_not_served(tmp_path, monkeypatch):
    """Before: "already complete; nothing to do" kept the old values, --force too."""
    from qamro_pipe.extract.cli_glue import summary_text

    _write_clips(tmp_path / "d")
    p = tmp_path / "c.h5"
    extract(_manifest(tmp_path / "d"), CFG, p, progress=False)
    before = read_cache(p)
    recs = _manifest(tmp_path / "d", {1: {"mos": "4.5"}, 2: {"system": "S9"},
                                      5: {"split": "dev"}})
    embedded = _count_launches(monkeypatch)
    s = extract(recs, CFG, p, progress=False)
    assert embedded == [] and s.status == "rewritten" and s.written == 0
    text = summary_text(s)
    assert ("kept 8 clips of the earlier cache; metadata rewritten without re-embedding: "
            "systems of 1 clip, splits of 1 clip, labels of 1 clip") in text, text
    after = read_cache(p)
    assert after.labels[1, 0] == 4.5 and after.systems[2] == "S9" and after.splits[5] == "dev"
    for k in before.features:  # the very rows, not re-embedded
        assert np.array_equal(before.features[k], after.features[k]), k
    extract(recs, CFG, tmp_path / "fresh.h5", progress=False)
    _equal_files(p, tmp_path / "fresh.h5")
    assert extract(recs, CFG, p, progress=False).status == "nothing to do"
    embedded.clear()
    s = extract(recs, CFG, p, force=True, progress=False)  # --force always rebuilds
    assert s.written == 8 and sorted(embedded) == list(range(8))
    _equal_files(p, tmp_path / "fresh.h5")


def test_changed_audio_under_the_same_name_is_re_embedded(tmp_path, monkeypatch):
    """Before: the old embeddings were served for a replaced file, and for the same manifest
    in another folder holding other audio."""
    import soundfile as sf

    _write_clips(tmp_path / "d")
    p = tmp_path / "c.h5"
    recs = _manifest(tmp_path / "d")
    extract(recs, CFG, p, progress=False)
    x, sr = sf.read(tmp_path / "d" / "c4.wav")
    sf.write(tmp_path / "d" / "c4.wav", (0.5 * x).astype(np.float32), sr)  # replaced
    embedded = _count_launches(monkeypatch)
    s = extract(recs, CFG, p, progress=False)
    assert embedded == [4] and s.kept == 7 and "1 re-embedded (audio changed)" in s.changes
    extract(recs, CFG, tmp_path / "fresh.h5", progress=False)
    _equal_files(p, tmp_path / "fresh.h5")
    # the same manifest in another folder, whose files hold other audio
    _write_clips(tmp_path / "e", seed=1)
    other = _manifest(tmp_path / "e")
    embedded.clear()
    s = extract(other, CFG, p, progress=False)
    assert sorted(embedded) == list(range(8)) and s.kept == 0
    extract(other, CFG, tmp_path / "fresh-e.h5", progress=False)
    _equal_files(p, tmp_path / "fresh-e.h5")
    assert read_cache(p).sources[0] == str((tmp_path / "e" / "c0.wav").resolve())


def test_changed_text_is_re_embedded_by_a_backbone_that_reads_text(tmp_path, monkeypatch):
    _write_clips(tmp_path / "d")
    p = tmp_path / "c.h5"
    extract(_manifest(tmp_path / "d"), CFG, p, progress=False)
    embedded = _count_launches(monkeypatch)
    recs = _manifest(tmp_path / "d", {6: {"text": "a new prompt"}})
    s = extract(recs, CFG, p, progress=False)  # melstats embeds the text too
    assert embedded == [6] and "1 re-embedded (text changed)" in s.changes
    extract(recs, CFG, tmp_path / "fresh.h5", progress=False)
    _equal_files(p, tmp_path / "fresh.h5")


def test_rows_added_and_removed_keep_the_clips_already_embedded(tmp_path, monkeypatch):
    """Before: any change of the clip list demanded --force, which re-extracted everything."""
    _write_clips(tmp_path / "d", n=10)
    p = tmp_path / "c.h5"
    extract(_manifest(tmp_path / "d", {8: {"drop": "1"}, 9: {"drop": "1"}}, n=10), CFG, p,
            progress=False)
    embedded = _count_launches(monkeypatch)
    recs = _manifest(tmp_path / "d", {2: {"drop": "1"}}, n=10)  # c2 out, c8 and c9 in
    s = extract(recs, CFG, p, progress=False)
    assert [recs.clips[r].id for r in embedded] == ["c8", "c9"]
    assert s.kept == 7 and s.changes == ["2 new", "1 removed"]
    extract(recs, CFG, tmp_path / "fresh.h5", progress=False)
    _equal_files(p, tmp_path / "fresh.h5")


def test_fix_or_remove_the_bad_file_and_rerun_works(tmp_path, monkeypatch):
    """The advice after a bad file: both of its ways now end in a finished cache."""
    _write_clips(tmp_path / "d")
    good = (tmp_path / "d" / "c5.wav").read_bytes()
    (tmp_path / "d" / "c5.wav").write_bytes(b"RIFF\x00\x00garbage")
    p = tmp_path / "c.h5"
    with pytest.raises(DataError, match=r"c5.wav.*stopped with 4/8 clips safely") as stop:
        extract(_manifest(tmp_path / "d"), CFG, p, progress=False)
    # drop its row: the clips done are kept (before: refused, "pass --force")
    embedded = _count_launches(monkeypatch)
    recs = _manifest(tmp_path / "d", {5: {"drop": "1"}})
    s = extract(recs, CFG, p, progress=False)
    assert s.kept == 4 and [recs.clips[r].id for r in embedded] == ["c4", "c6", "c7"]
    assert "fix the file (or drop its row from the dataset's list) and rerun" in str(stop.value)
    # or fix the file: a clip skipped as bad is retried once its file changed
    cfg = replace_cfg(skip_bad=True)
    s = extract(_manifest(tmp_path / "d"), cfg, p, progress=False)
    assert list(s.skipped) == ["c5"]
    (tmp_path / "d" / "c5.wav").write_bytes(good)
    embedded.clear()
    s = extract(_manifest(tmp_path / "d"), cfg, p, progress=False)
    assert embedded == [5] and not s.skipped and "1 retried (skipped before; file changed)" \
        in s.changes
    extract(_manifest(tmp_path / "d"), CFG, tmp_path / "fresh.h5", progress=False)
    _same(p, tmp_path / "fresh.h5")


def replace_cfg(**kw):
    from dataclasses import replace

    return replace(CFG, **kw)


def test_force_replaces_only_a_cache_the_tool_made(demo_records, tmp_path):
    """Before: `extract --out DIR --force` gave IsADirectoryError; a text file was deleted."""
    import h5py

    folder = tmp_path / "runs"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    text = tmp_path / "notes.h5"
    text.write_text("not a cache")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    for path, what in ((folder, "a folder"), (text, "a file that is not HDF5"),
                       (other, "an HDF5 file that is not a qamro-pipe cache"),
                       (empty, "an empty file")):
        before = sorted((q.name, q.read_bytes() if q.is_file() else b"")
                        for q in [path, *path.rglob("*")])
        for force in (False, True):
            with pytest.raises(CacheError, match=rf"{path.name}: {what}, not a cache "
                                                 r"qamro-pipe wrote, so it is left alone"):
                extract(demo_records, CFG, path, force=force, progress=False)
        assert sorted((q.name, q.read_bytes() if q.is_file() else b"")
                      for q in [path, *path.rglob("*")]) == before
    assert not list(tmp_path.glob("*.lock"))  # refused before anything was written
    _write_clips(tmp_path / "d")
    _manifest(tmp_path / "d")
    r = CliRunner().invoke(app, ["extract", "--manifest", str(tmp_path / "d" / "clips.csv"),
                                 "--backbone", "melstats", "--quiet", "--out", str(folder),
                                 "--force"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "a folder, not a cache qamro-pipe wrote" in r.output


def test_a_cache_with_no_clip_yet_pins_no_configuration(demo_records, tmp_path):
    """Before: a start that failed left an empty cache, and the rerun with the fix was
    refused: "made under a different configuration... pass --force"."""
    from qamro_pipe.extract.backbones import get_backbone
    from qamro_pipe.extract.loop import cache_key
    from qamro_pipe.store.writer import create_cache

    p = tmp_path / "c.h5"
    n = len(demo_records.clips)
    bb = get_backbone("melstats", precision="bf16")  # made under another precision
    create_cache(p, ids=[c.id for c in demo_records.clips], systems=[""] * n,
                 splits=["train"] * n, labels=np.zeros((n, 2)), label_names=["a", "b"],
                 backbone=bb.key, dataset="demo", config={}, key=cache_key(demo_records, bb, True),
                 feature_shapes={"audio": (3,)})
    s = extract(demo_records, CFG, p, progress=False)
    assert s.written == n and "replaced a cache that held no clip yet" in s.changes[0]
    _same(p, _fresh_demo(demo_records, tmp_path))


def _fresh_demo(records, tmp_path):
    extract(records, CFG, tmp_path / "fresh.h5", progress=False)
    return tmp_path / "fresh.h5"


def test_a_start_without_weights_leaves_no_cache_and_names_melstats(demo_records, tmp_path,
                                                                    monkeypatch):
    """Before: the failed start left an empty cache reserving its full size."""
    monkeypatch.setenv("QAMRO_HOME", str(tmp_path / "weights"))  # nothing downloaded here
    cfg = ExtractConfig(backbone="clap-music", device="cpu", workers=0, offline=True)
    with pytest.raises(QamroError, match="pass --checkpoint PATH.*--backbone melstats"):
        extract(demo_records, cfg, tmp_path / "c.h5", progress=False)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["corpus"]  # not even a lock file


def test_a_cache_without_per_clip_identities_is_refused_not_trusted(demo_records, tmp_path):
    """A cache written before /sources existed cannot show which audio its rows came from:
    it is not served as current; --force re-embeds it."""
    import h5py

    p = tmp_path / "c.h5"
    extract(demo_records, CFG, p, progress=False)
    with h5py.File(p, "r+") as f:  # what earlier versions wrote: no identities
        del f["sources"], f["source_stat"]
    with pytest.raises(CacheError, match="did not record which audio.*pass --force"):
        extract(demo_records, CFG, p, progress=False)
    assert read_cache(p).usable.all()  # training still reads it
    assert extract(demo_records, CFG, p, force=True, progress=False).written == 24
    assert read_cache(p).sources is not None


def test_an_interrupted_rebuild_resumes_without_force_and_an_empty_start_leaves_nothing(
        demo_records, tmp_path, monkeypatch):
    import qamro_pipe.extract.batches as ex
    from qamro_pipe.errors import Interrupted

    p = tmp_path / "c.h5"
    extract(demo_records, CFG, p, progress=False)
    real, calls = ex.launch, []

    def launch(*a, **k):
        calls.append(1)
        if len(calls) in (3, 4):  # the 3rd batch of the --force run, the 1st of the next
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex, "launch", launch)
    with pytest.raises(Interrupted, match=r"8/24 clips are safely in .*c.h5; rerun the same "
                                          r"command without --force to resume"):
        extract(demo_records, CFG, p, force=True, progress=False)
    with pytest.raises(Interrupted, match="before any clip was embedded; no cache was kept"):
        extract(demo_records, CFG, tmp_path / "new.h5", progress=False)
    assert not (tmp_path / "new.h5").exists()
    monkeypatch.setattr(ex, "launch", real)
    s = extract(demo_records, CFG, p, progress=False)
    assert s.done_before == 8 and s.written == 16
