"""Issue 5.3: a battery of broken and unusual audio files in one manifest. By default the run
stops at the first broken file with its path and the reason; with --skip-bad every good file
is extracted, every bad one is listed with its reason in the cache and the summary, and
training never sees them."""
from __future__ import annotations

import csv
import json

import numpy as np
import soundfile as sf

from qamro_pipe.store.files import journal_path
from qamro_pipe.store.reader import read_cache

from kit.children import child_env, leftovers

SR = 16000


def _tone(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def write_battery(folder):
    """-> {name: (file, expected reason or None for a good file)}"""
    folder.mkdir()
    files = {}

    def good(name, data, sr, **kw):
        sf.write(folder / name, data, sr, **kw)
        files[name] = None

    good("silence.wav", np.zeros(SR, np.float32), SR)
    good("rate8k.wav", _tone(1.0, 8000), 8000)
    good("rate44k.wav", _tone(1.0, 44100), 44100)
    good("rate96k.wav", _tone(1.0, 96000), 96000)
    good("six_channels.wav", _tone(1.0, 48000, channels=6), 48000)
    # an hour at 8 kHz, int16, written block by block (58 MB): 360 windows at 16 kHz
    with sf.SoundFile(folder / "one_hour.wav", "w", 8000, 1, "PCM_16") as f:
        block = (_tone(60.0, 8000)[:, 0] * 32767).astype(np.int16)
        for _ in range(60):
            f.write(block)
    files["one_hour.wav"] = None

    (folder / "empty.wav").write_bytes(b"")
    files["empty.wav"] = "empty file (0 bytes)"
    sf.write(folder / "zero_length.wav", np.zeros((0, 1), np.float32), SR)
    files["zero_length.wav"] = "holds no audio (0 samples)"
    sf.write(folder / "whole.wav", _tone(1.0, SR), SR, subtype="PCM_16")
    whole = (folder / "whole.wav").read_bytes()
    (folder / "whole.wav").unlink()
    (folder / "truncated_header.wav").write_bytes(whole[:30])
    files["truncated_header.wav"] = "cannot decode"
    (folder / "truncated_data.wav").write_bytes(whole[:len(whole) // 2])
    files["truncated_data.wav"] = "truncated: the header declares 32000 bytes"
    (folder / "random_bytes.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    files["random_bytes.wav"] = "cannot decode"
    for name, bad in (("nan_samples.wav", np.nan), ("inf_samples.wav", np.inf)):
        x = _tone(1.0, SR)
        x[100] = bad
        sf.write(folder / name, x, SR, subtype="FLOAT")
        files[name] = "NaN or infinite samples"
    sf.write(folder / "too_short.wav", _tone(0.05, SR), SR)
    files["too_short.wav"] = "at least 0.1 s is needed"
    (folder / "song.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    files["song.m4a"] = "unsupported file type '.m4a'"
    return files


def write_manifest(path, corpus, battery, files):
    """The demo corpus's labelled clips with the battery spliced in after the 4th clip, the
    empty file first: a default run stops there, before the hour-long file."""
    demo = []
    for split, name in (("train", "train_mos_list.txt"), ("dev", "dev_mos_list.txt")):
        for line in (corpus / "sets" / name).read_text().split():
            wav, overall, _ = line.split(",")
            demo.append((wav[:-4], corpus / "wav" / wav, wav.split("-")[-1][:4], split, overall))
    extra = [(name.split(".")[0], battery / name, "S001", "train", "3.0")
             for name in sorted(files, key=lambda n: n != "empty.wav")]
    rows = demo[:4] + extra + demo[4:]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "system", "split", "overall"])
        w.writerows(rows)
    return [r[0] for r in rows]


def test_bad_audio_stops_by_default_and_is_listed_with_skip_bad(corpus, tmp_path, tally):
    tally.fault = "bad audio battery (15 files): stop, --skip-bad (killed finishing), " \
                  "train"
    files = write_battery(tmp_path / "battery")
    manifest = tmp_path / "clips.csv"
    ids = write_manifest(manifest, corpus, tmp_path / "battery", files)
    out = tmp_path / "c.h5"
    args = ["extract", "--manifest", manifest, "--backbone", "melstats", "--workers", "0",
            "--batch-size", "2", "--device", "cpu", "--quiet", "--out", out]

    # default: stop at the first broken file (the empty one), one line, exit 1
    c = tally.invoke(args)
    assert c.proc.returncode == 1 and "Traceback" not in c.stderr
    [line] = [x for x in c.stderr.strip().splitlines() if not x.startswith("note: ")]
    assert line.startswith(f"error: {tmp_path / 'battery' / 'empty.wav'}: empty file (0 bytes)")
    assert "stopped with 4/" in line and "--skip-bad" in line

    # --skip-bad resumes and goes through everything; killed as it finishes, the skips
    # (kept in the journal until then) survive, and the rerun only finishes
    c = tally.child([*args, "--skip-bad"], child_env(FINISH=30))
    c.wait_line("qamro-fault: finish")
    peak_mb = c.peak_mb()  # the hour-long file went through in this run
    c.kill()
    assert journal_path(out).exists()
    c = tally.invoke([*args, "--skip-bad"], WRITE=0)
    assert c.proc.returncode == 0, c.stderr
    assert c.rows_written() == [] and " 0 clips extracted" in c.stdout
    assert not journal_path(out).exists() and leftovers(tmp_path) == []
    bad = {n.split(".")[0]: why for n, why in files.items() if why}
    assert f"skipped {len(bad)} bad file(s)" in c.stdout
    cache = read_cache(out)
    assert set(cache.skipped) == set(bad)
    for clip, why in bad.items():
        assert why in cache.skipped[clip], (clip, cache.skipped[clip])
        assert cache.skipped[clip].startswith(str(tmp_path / "battery"))
        assert why in c.stdout
    usable = {i for i, u in zip(cache.ids, cache.usable) if u}
    assert usable == set(ids) - set(bad)
    assert all(np.isfinite(cache.features["audio"][cache.usable]).all(axis=1))
    # the hour-long file went through in batches: memory stays bounded
    assert peak_mb < 1500, f"peak {peak_mb:.0f} MB"
    assert "one_hour" in usable

    # training reads only the usable rows
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "bad"\ndataset = "clips"\nbackbone = "melstats"\n'
                      'label_range = [1.0, 5.0]\n[[heads]]\nname = "overall"\n'
                      'label = "overall"\nfeatures = ["audio"]\n'
                      '[train]\nbootstrap = 0\nbatch_size = 8\n')
    c = tally.invoke(["train", "--recipe", recipe, "--cache", out, "--out", tmp_path / "run",
                   "--max-epochs", "5"])
    assert c.proc.returncode == 0, c.stderr
    with open(tmp_path / "run" / "predictions.csv") as f:
        predicted = {row["id"] for row in csv.DictReader(f)}
    assert predicted == usable
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    n_train = sum(1 for i, s, u in zip(cache.ids, cache.splits, cache.usable)
                  if u and s == "train")
    assert config["rows"]["train"] + config["rows"]["validation"] == n_train
