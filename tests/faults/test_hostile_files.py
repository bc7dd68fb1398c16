"""Issue 20: hostile audio, checkpoints, manifests and names met through the command line
in-process: a header's claim is checked before memory is allocated for it, a FIFO never
blocks, an answer file cannot be forged by an id, and names are printed without their
terminal escapes."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import soundfile as sf
import torch

from qamro_pipe import checkpoints
from qamro_pipe.errors import QamroError

from kit.caches import make_synthetic_cache
from kit.children import extract_args
from kit.hostile import cli, one_line_error, peak_python_mb, within


@pytest.fixture(scope="module")
def demo_run(corpus, tmp_path_factory):
    """A run on the fault corpus's melstats cache: what predict scores new audio with."""
    root = tmp_path_factory.mktemp("hostile-run")
    cache, run = root / "melstats.h5", root / "run"
    assert cli(*extract_args(corpus, cache)).exit_code == 0
    r = cli("train", "--recipe", "demo", "--cache", cache, "--out", run, "--max-epochs", "3")
    assert r.exit_code == 0, r.output
    return cache, run


def _flac_claiming(path, frames: int):
    """A one-second FLAC whose STREAMINFO claims `frames` samples (the 36-bit total at bytes
    18-25, after "fLaC", the block header and four size fields; FLAC format spec)."""
    sf.write(path, np.zeros(16000, np.float32) + 0.1, 16000, format="FLAC")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    v = int.from_bytes(data[18:26], "big")
    v = (v & ~((1 << 36) - 1)) | frames
    data[18:26] = v.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    assert sf.info(str(path)).frames == frames
    return path


def test_audio_claiming_2_to_36_samples_is_refused_not_allocated(corpus, demo_run, tmp_path,
                                                                tally):
    """The 27 KB FLAC whose STREAMINFO claims 2^36 samples ended the run with MemoryError
    (256 GiB), --skip-bad or not, and in predict."""
    tally.fault = "FLAC header claiming 2^36 samples: extract --skip-bad, predict (memory)"
    tally.in_process = True
    bad = _flac_claiming(tmp_path / "huge.flac", (1 << 36) - 1)
    wav = sorted((corpus / "wav").iterdir())[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path,mos\ngood,{wav},3.0\nhuge,{bad},4.0\n")
    tally.runs += 1
    with peak_python_mb() as peak:
        r = cli("extract", "--manifest", manifest, "--backbone", "melstats", "--device", "cpu",
                "--quiet", "--skip-bad", "--out", tmp_path / "c.h5")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "at most 536,870,912 frames" in r.output and peak["mb"] < 500, (r.output, peak)
    tally.runs += 1
    r = cli("predict", demo_run[1], bad)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception
    assert "at most 536,870,912 frames" in r.stderr and "Traceback" not in r.output


def test_a_zip_checkpoint_that_inflates_is_refused_before_torch_reads_it(tmp_path, tally,
                                                                         monkeypatch):
    """A small .pt whose storage record is deflated 1000:1 used to be inflated whole (1.5 GB
    from 1.5 MB) before anything was refused. torch.save's own layout (archive/data.pkl,
    archive/data/0, ...) with one member recompressed, as any zip tool can."""
    tally.fault = "checkpoint zip member inflating 1000:1 (refused before torch.load)"
    tally.in_process = tally.runs = 1
    real = tmp_path / "real.pt"
    torch.save({"w": torch.zeros(4)}, real)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/0"):
                data = bytes(64 << 20)  # 64 MB of zeros: about 64 KB deflated
            dst.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 200_000
    checkpoints.read_checkpoint(real, "test")  # the real one loads

    def never(*a, **k):
        raise AssertionError("torch.load was reached")
    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(QamroError, match="at most 16 times its size"):
        checkpoints.read_checkpoint(bomb, "clap-music")


def test_fifos_named_as_inputs_are_refused_by_kind(corpus, demo_run, tmp_path, tally):
    tally.fault = "FIFO as manifest, audio file, checkpoint: no hang, one line"
    tally.in_process = True
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    tally.runs += 1
    one_line_error(within(20, lambda: cli("extract", "--manifest", fifo, "--backbone",
                                          "melstats", "--out", tmp_path / "c.h5"), fifo),
                   "a named pipe (FIFO), not a regular manifest")
    pt = tmp_path / "pipe.pt"
    os.mkfifo(pt)
    with pytest.raises(QamroError, match="a named pipe .FIFO., not a regular weights file"):
        within(20, lambda: checkpoints.read_checkpoint(pt, "clap-music"), pt)
    wav = tmp_path / "pipe.wav"
    os.mkfifo(wav)
    tally.runs += 1
    r = within(20, lambda: cli("predict", demo_run[1], wav), wav)
    assert r.exit_code == 1 and "a named pipe (FIFO), not an audio file" in r.stderr, r.output


@pytest.mark.parametrize("bad_id", ["x,9.99", "y\n9.9", 'q"uote'])
def test_answer_ids_that_would_forge_a_line_are_refused(bad_id, corpus, demo_run, tmp_path,
                                                        tally):
    """`x,9.99.wav` went into --answer as `x,9.99,0.764488`: clip x scored 9.99."""
    tally.fault = f"predict --answer with clip id {bad_id!r}"
    tally.in_process = tally.runs = 1
    wav = sorted((corpus / "wav").iterdir())[0]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": bad_id, "path": str(wav)}) + "\n"
                        + json.dumps({"id": "fine", "path": str(wav)}) + "\n")
    answer = tmp_path / "answer.txt"
    line = one_line_error(cli("predict", demo_run[1], "--manifest", manifest, "--answer",
                              answer), "--answer: 1 clip id(s)", "answer format")
    assert repr(bad_id) in line
    assert not answer.exists()


MANIFESTS = {
    "non-UTF-8 bytes": (b"id,path\nclip\xff\xfe,a.wav\n", "m.csv", "not UTF-8 text"),
    "5,000-digit integer": (b'{"id": "a", "path": "a.wav", "mos": ' + b"9" * 5000 + b"}\n",
                            "m.jsonl", "line 1: not a manifest record"),
    "deeply nested line": (b'{"id": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                           "m.jsonl", "line 1: not a manifest record"),
    "NUL in an id": (b"id,path\na\x00b,WAV\n", "m.csv", "NUL character"),
    "10,000-character path": (b"id,path\na," + b"d/" * 5000 + b"a.wav\n", "m.csv",
                              "File name too long"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_manifest_oddities_are_one_line(case, corpus, demo_run, tmp_path, tally):
    tally.fault = f"manifest: {case} (extract and predict)"
    tally.in_process = True
    data, name, expect = MANIFESTS[case]
    wav = sorted((corpus / "wav").iterdir())[0]
    manifest = tmp_path / name
    manifest.write_bytes(data.replace(b"WAV", str(wav).encode()))
    for args in (["extract", "--manifest", manifest, "--backbone", "melstats", "--device",
                  "cpu", "--quiet", "--out", tmp_path / "c.h5"],
                 ["predict", demo_run[1], "--manifest", manifest]):
        tally.runs += 1
        one_line_error(cli(*args), expect)
    assert not (tmp_path / "c.h5").exists()


def test_names_with_terminal_escapes_are_printed_escaped(tmp_path, tally):
    """Dataset, label, system and backbone names with an OSC title sequence and a
    clear-screen were printed raw by cache info and the run's tables."""
    tally.fault = "terminal escapes in dataset/system/backbone names (cache info, train)"
    tally.in_process = True
    evil = "\x1b]0;pwned\x07\x1b[2J"
    cache = make_synthetic_cache(tmp_path / "c.h5", n_systems=4, per_system=6, dim=8,
                                 dataset="d" + evil, backbone="b" + evil + "@1",
                                 systems=np.repeat([f"S{i}{evil}" for i in range(4)], 6))
    for args in (["cache", "info", cache],
                 ["train", "--cache", cache, "--out", tmp_path / "r", "--max-epochs", "2"]):
        tally.runs += 1
        r = cli(*args)
        assert r.exit_code == 0, (r.output, r.exception)
        assert "\x1b" not in r.output and "\x07" not in r.output, r.output
        assert "\\x1b]0;pwned\\x07" in r.output
