"""Dataset loaders against tiny fixtures written in each published layout."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.datasets.demo import SYSTEM_DESIGNS, designed_scores, write_demo_corpus
from qamro_pipe.errors import DataError, QamroError

SR = 16000
PREFIX = "audiomos2025-track1-"


def wav(path: Path, seconds: float = 0.2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * SR)) / SR
    sf.write(path, 0.1 * np.sin(2 * np.pi * 440 * t), SR, subtype="PCM_16")
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def raises_at(match_file: str, line: int | None, fn, *args, **kwargs) -> str:
    """Run fn, expect DataError naming the file (and the line), return the message."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert match_file in msg, msg
    if line is not None:
        assert f"line {line}" in msg, msg
    return msg


# ---------------------------------------------------------------- MusicEval

TRAIN = ["S002_P001,3.6,4.2", "S002_P002,2.0,2.4", "S006_P001,4.8,4.6", "S006_P003,3.0,3.2"]
DEV = ["S003_P001,1.4,1.0", "S003_P002,5.0,4.0"]
EVAL = ["S002_P003", "S003_P003"]


@pytest.fixture
def musiceval(tmp_path: Path) -> Path:
    root = tmp_path / "MusicEval-phase1"
    for lines, rel in ((TRAIN, "sets/train_mos_list.txt"), (DEV, "sets/dev_mos_list.txt")):
        out = []
        for line in lines:
            name, rest = line.split(",", 1)
            wav(root / "wav" / f"{PREFIX}{name}.wav")
            out.append(f"{PREFIX}{name}.wav,{rest}")
        write(root / rel, "\n".join(out) + "\n")
    # extra columns, text not in second place: columns are found by header name
    write(root / "prompt_info.txt", "source\tid\ttext\n"
          "a\tP001\tcalm piano in C major, slow tempo\n"
          "b\tP002\tbright synth arpeggio, fast\n"
          "c\tP003\tsad strings in A minor\n"
          "d\tP004\n")  # an incomplete row is ignored unless a clip needs it
    # per-clip prompts: one id with .wav, one without; S006_P003 falls back to prompt_info
    write(root / "demo_prompt_info.txt", "id\ttext\n"
          f"{PREFIX}S006_P001.wav\tdemo prompt one\n"
          f"{PREFIX}S002_P002\tnot used: S002 is not a per-clip system\n")
    write(root / "system_mos/system_mos_phase1.csv", "S002,2.8,3.3\nS006,3.9,3.9\nS003,3.2,2.5\n")
    for name in EVAL:
        wav(root / "DATA/wav" / f"{PREFIX}{name}.wav")
    write(root / "DATA/sets/eval_list.txt", "".join(f"{PREFIX}{n}\n" for n in EVAL))
    return root


def test_musiceval_records(musiceval: Path):
    r = load_dataset("musiceval", musiceval)
    assert r.name == "musiceval"
    assert r.label_names == ("overall", "textual")
    assert r.label_range == (1.0, 5.0)
    assert [c.id for c in r.clips] == [PREFIX + x.split(",")[0] for x in TRAIN + DEV]
    by_id = {c.id[len(PREFIX):]: c for c in r.clips}
    assert [c.split for c in r.clips] == ["train"] * 4 + ["dev"] * 2
    assert by_id["S002_P001"].system == "S002"
    assert by_id["S002_P001"].labels == (3.6, 4.2)
    assert by_id["S003_P001"].labels == (1.4, 1.0)
    assert by_id["S002_P001"].path == musiceval / "wav" / f"{PREFIX}S002_P001.wav"
    assert by_id["S002_P001"].text == "calm piano in C major, slow tempo"
    assert by_id["S002_P002"].text == "bright synth arpeggio, fast"  # per-prompt, not per-clip
    assert by_id["S006_P001"].text == "demo prompt one"  # per-clip table first
    assert by_id["S006_P003"].text == "sad strings in A minor"  # falls back to prompt_info
    assert r.system_mos == {"S002": (2.8, 3.3), "S006": (3.9, 3.9), "S003": (3.2, 2.5)}


def test_musiceval_single_split_and_eval(musiceval: Path):
    dev = load_dataset("musiceval", musiceval, splits=("dev",))
    assert {c.split for c in dev.clips} == {"dev"} and len(dev.clips) == 2
    assert "S006" in dev.system_mos  # train list still names the system MOS file's systems

    r = load_dataset("musiceval", musiceval, splits=("train", "dev", "eval"))
    ev = [c for c in r.clips if c.split == "eval"]
    assert [c.id for c in ev] == [PREFIX + n for n in EVAL]
    assert all(math.isnan(v) for c in ev for v in c.labels) and len(ev[0].labels) == 2
    assert ev[0].path == musiceval / "DATA/wav" / f"{PREFIX}S002_P003.wav"
    assert ev[0].system == "S002" and ev[0].text == "sad strings in A minor"


def test_musiceval_system_mos_optional(musiceval: Path):
    assert load_dataset("musiceval", musiceval, system_mos=False).system_mos == {}
    (musiceval / "system_mos/system_mos_phase1.csv").unlink()
    assert load_dataset("musiceval", musiceval).system_mos == {}


@pytest.mark.parametrize("line, bad, fragment", [
    ("S002_P002,2.0", 2, "field"),
    ("S002_P002,2.0,4.0,1", 2, "field"),
    ("S002_P002,good,4.0", 2, "not a number"),
    ("S002_P002,2.0,7.5", 2, "outside"),
    ("S002P002,2.0,4.0", 2, "does not parse"),
    ("S002_P001,2.0,4.0", 2, "listed twice"),
])
def test_musiceval_bad_list_line(musiceval: Path, line, bad, fragment):
    lines = [f"{PREFIX}{x}.wav" if "," not in x else f"{PREFIX}{x.split(',', 1)[0]}.wav,"
             f"{x.split(',', 1)[1]}" for x in [TRAIN[0], line, *TRAIN[2:]]]
    write(musiceval / "sets/train_mos_list.txt", "\n".join(lines) + "\n")
    msg = raises_at("train_mos_list.txt", bad, load_dataset, "musiceval", musiceval)
    assert fragment in msg


def test_musiceval_missing_wavs(musiceval: Path):
    for name in ("S002_P001", "S003_P002"):
        (musiceval / "wav" / f"{PREFIX}{name}.wav").unlink()
    msg = raises_at("train_mos_list.txt", 1, load_dataset, "musiceval", musiceval)
    assert msg.startswith("2 ") and f"{PREFIX}S003_P002.wav" in msg
    assert "dev_mos_list.txt, line 2" in msg


def test_musiceval_unknown_system_in_system_mos(musiceval: Path):
    write(musiceval / "system_mos/system_mos_phase1.csv", "S002,2.8,3.3\nS099,3.0,3.0\n")
    msg = raises_at("system_mos_phase1.csv", 2, load_dataset, "musiceval", musiceval)
    assert "S099" in msg and "unknown system" in msg


def test_musiceval_bad_system_mos_line(musiceval: Path):
    write(musiceval / "system_mos/system_mos_phase1.csv", "S002,2.8,3.3\n\nS003,x,3.0\n")
    raises_at("system_mos_phase1.csv", 3, load_dataset, "musiceval", musiceval)


def test_musiceval_missing_prompt(musiceval: Path):
    write(musiceval / "prompt_info.txt", "id\ttext\nP001\tcalm piano\nP003\tsad strings\n")
    msg = raises_at("train_mos_list.txt", 2, load_dataset, "musiceval", musiceval)
    assert f"{PREFIX}S002_P002" in msg and "P002" in msg
    assert f"{PREFIX}S003_P002" in msg  # every clip without a prompt is counted


def test_musiceval_prompt_table_without_header_columns(musiceval: Path):
    write(musiceval / "prompt_info.txt", "P001\tcalm piano\n")
    raises_at("prompt_info.txt", 1, load_dataset, "musiceval", musiceval)


def test_musiceval_eval_list_errors(musiceval: Path):
    write(musiceval / "DATA/sets/eval_list.txt", f"{PREFIX}S002_P003\nnot-a-clip-name\n")
    raises_at("eval_list.txt", 2, load_dataset, "musiceval", musiceval, splits=("eval",))
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("musiceval", musiceval, splits=("test",))


# ---------------------------------------------------------------- AES-Natural

AES_HEADER = ("sample_id,data_path,Production_Quality,Production_Complexity,"
              "Content_Enjoyment,Content_Usefulness")


@pytest.fixture
def aes(tmp_path: Path) -> Path:
    root = tmp_path / "aes"
    for name in ("a", "b", "c"):
        wav(root / "audio" / f"{name}.wav")
    write(root / "train.csv", f"{AES_HEADER}\na,audio/a.wav,7.5,3,6.25,8\n"
          "b,audio/b.wav,2,4,5,6\n")
    write(root / "dev.csv", f"{AES_HEADER}\nc,audio/c.wav,9,,1,10\n")
    return root


def test_aes_natural_records(aes: Path):
    r = load_dataset("aes-natural", aes)
    assert r.name == "aes-natural"
    assert r.label_names == ("PQ", "PC", "CE", "CU") and r.label_range == (1.0, 10.0)
    assert [(c.id, c.split, c.system, c.text) for c in r.clips] == [
        ("a", "train", "", ""), ("b", "train", "", ""), ("c", "dev", "", "")]
    assert r.clips[0].labels == (7.5, 3.0, 6.25, 8.0)
    assert r.clips[0].path == aes / "audio/a.wav"
    assert math.isnan(r.clips[2].labels[1])  # an empty cell is an unknown label
    assert r.system_mos == {}


def test_aes_natural_system_column_and_explicit_splits(aes: Path):
    write(aes / "lists/mine.csv", f"{AES_HEADER},system\na,audio/a.wav,7,3,6,8,tts-1\n")
    r = load_dataset("aes-natural", aes, splits={"eval": "lists/mine.csv"})
    assert [(c.id, c.split, c.system) for c in r.clips] == [("a", "eval", "tts-1")]
    raises_at("nothere.csv", None, load_dataset, "aes-natural", aes, splits={"dev": "nothere.csv"})


@pytest.mark.parametrize("row, fragment", [
    ("b,audio/b.wav,2,x,5,6", "not a number"),
    ("b,audio/b.wav,2,4,5,11", "outside"),
    ("b,audio/b.wav,2,4,5", "fields"),
    ("a,audio/b.wav,2,4,5,6", "duplicate"),
    ("b,audio/missing.wav,2,4,5,6", "missing"),
])
def test_aes_natural_bad_rows(aes: Path, row, fragment):
    write(aes / "train.csv", f"{AES_HEADER}\na,audio/a.wav,7.5,3,6.25,8\n{row}\n")
    msg = raises_at("train.csv", 3, load_dataset, "aes-natural", aes)
    assert fragment in msg


def test_aes_natural_missing_column_and_files(aes: Path, tmp_path: Path):
    write(aes / "dev.csv", "sample_id,data_path,Production_Quality\nc,audio/c.wav,9\n")
    msg = raises_at("dev.csv", 1, load_dataset, "aes-natural", aes)
    assert "Content_Usefulness" in msg
    with pytest.raises(DataError, match="train.csv"):
        load_dataset("aes-natural", tmp_path / "empty")


# ---------------------------------------------------------------- manifest

@pytest.fixture
def clips_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mine"
    for name in ("x", "y", "z"):
        wav(d / "audio" / f"{name}.wav")
    return d


def test_manifest_csv(clips_dir: Path):
    m = write(clips_dir / "my_clips.csv",
              "id,path,quality,system,naturalness,text,split,start,end\n"
              "x,audio/x.wav,4.5,sysA,3,a prompt,dev,0.5,1.5\n"
              f"y,{clips_dir / 'audio/y.wav'},,sysB,2,,,,\n")
    r = load_dataset("manifest", m, label_range=(1, 5))
    assert r.name == "my_clips" and r.label_names == ("quality", "naturalness")
    assert r.label_range == (1.0, 5.0)
    x, y = r.clips
    assert (x.id, x.path, x.system, x.text, x.split, x.start, x.end, x.labels) == (
        "x", clips_dir / "audio/x.wav", "sysA", "a prompt", "dev", 0.5, 1.5, (4.5, 3.0))
    assert y.split == "train" and y.start is None and y.end is None and y.text == ""
    assert math.isnan(y.labels[0]) and y.labels[1] == 2.0


def test_manifest_jsonl(clips_dir: Path):
    rows = [{"id": "x", "path": "audio/x.wav", "mos": 3.2, "system": "s1"},
            {"id": "y", "path": "audio/y.wav", "mos": None, "extra": "4", "split": "dev"},
            {"id": "z", "path": "audio/z.wav", "start": 0.0, "end": 0.1}]
    m = write(clips_dir / "clips.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    r = load_dataset("manifest", m)
    assert r.label_names == ("mos", "extra")
    assert [c.split for c in r.clips] == ["train", "dev", "train"]
    assert r.clips[0].labels[0] == 3.2 and math.isnan(r.clips[0].labels[1])
    assert math.isnan(r.clips[1].labels[0]) and r.clips[1].labels[1] == 4.0
    assert (r.clips[2].start, r.clips[2].end) == (0.0, 0.1)


@pytest.mark.parametrize("body, line, fragment", [
    ("path,mos\naudio/x.wav,3\n", 1, "'id'"),
    ("id,mos\nx,3\n", 1, "'path'"),
    ("id,path,mos\nx,audio/x.wav,3\nx,audio/y.wav,4\n", 3, "duplicate"),
    ("id,path,mos\nx,audio/x.wav,3\ny,audio/y.wav,good\n", 3, "not a number"),
    ("id,path,start,end\nx,audio/x.wav,0,1\ny,audio/y.wav,1.0,0.5\n", 3, "not before"),
    ("id,path,start,end\nx,audio/x.wav,0,1\ny,audio/y.wav,1.0,1.0\n", 3, "not before"),
    ("id,path,mos\nx,audio/x.wav,3\n\ny,audio/nope.wav,4\n", 4, "missing"),
    ("id,path,mos\nx,audio/x.wav,9\n", 2, "outside"),
])
def test_manifest_csv_errors(clips_dir: Path, body, line, fragment):
    m = write(clips_dir / "bad.csv", body)
    msg = raises_at("bad.csv", line, load_dataset, "manifest", m, label_range=(1, 5))
    assert fragment in msg


def test_manifest_jsonl_errors(clips_dir: Path):
    m = write(clips_dir / "bad.jsonl", '{"id": "x", "path": "audio/x.wav", "mos": 1}\n'
              '{"id": "y", "path": "audio/y.wav", "mos": "high"}\n')
    raises_at("bad.jsonl", 2, load_dataset, "manifest", m)
    m = write(clips_dir / "bad.jsonl", '{"id": "x", "path": "audio/x.wav"}\n{"id": "y"\n')
    raises_at("bad.jsonl", 2, load_dataset, "manifest", m)
    with pytest.raises(DataError, match="folder"):
        load_dataset("manifest", clips_dir)
    with pytest.raises(DataError, match="format"):
        load_dataset("manifest", write(clips_dir / "clips.txt", "id,path\n"))


# ---------------------------------------------------------------- demo corpus

def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_corpus_deterministic(tmp_path: Path):
    small = dict(n_systems=4, n_prompts=5, seconds=1.0)
    a = tree_digest(write_demo_corpus(tmp_path / "a", seed=3, **small))
    b = tree_digest(write_demo_corpus(tmp_path / "b", seed=3, **small))
    c = tree_digest(write_demo_corpus(tmp_path / "c", seed=4, **small))
    assert a == b
    assert a != c
    assert len([k for k in a if k.startswith("wav/")]) == 20
    # rewriting a demo corpus in place gives the same bytes again
    assert tree_digest(write_demo_corpus(tmp_path / "a", seed=3, **small)) == a


def test_demo_corpus_layout_and_designed_order(tmp_path: Path):
    root = write_demo_corpus(tmp_path / "demo", n_systems=10, n_prompts=12)
    r = load_dataset("musiceval", root)
    assert len(r.clips) == 10 * 12 and r.label_range == (1.0, 5.0)
    systems = sorted({c.system for c in r.clips})
    assert systems == [f"S{i:03d}" for i in range(1, 11)]
    for s in systems:  # every system in both splits, about 80/20
        splits = [c.split for c in r.clips if c.system == s]
        assert splits.count("dev") == 2 and splits.count("train") == 10
    for c in r.clips:  # means of 5 integer ratings
        assert all(1 <= v <= 5 and abs(v * 5 - round(v * 5)) < 1e-9 for v in c.labels)
    info = sf.info(str(r.clips[0].path))
    assert (info.samplerate, info.frames, info.subtype) == (16000, 48000, "PCM_16")

    # texts: S001 reads its reworded per-clip prompts, the others the shared prompt table
    s001 = [c for c in r.clips if c.system == "S001"]
    s002 = {c.id.split("_")[-1]: c.text for c in r.clips if c.system == "S002"}
    assert all(c.text and c.text != s002[c.id.split("_")[-1]] for c in s001)
    s006 = [c for c in r.clips if c.system == "S006"]  # per-clip system without entries
    assert all(c.text == s002[c.id.split("_")[-1]] for c in s006)

    mos = r.system_mos
    assert sorted(mos) == systems
    for s in systems:  # the system MOS file is each system's mean label
        labels = np.array([c.labels for c in r.clips if c.system == s])
        assert np.allclose(labels.mean(axis=0), mos[s], atol=1e-4)
    overall = np.array([mos[s][0] for s in systems])
    textual = np.array([mos[s][1] for s in systems])
    designed = np.array([designed_scores(d) for d in SYSTEM_DESIGNS[:10]])
    assert overall.argmax() == 0  # the clean reference
    off_prompt = [i for i, d in enumerate(SYSTEM_DESIGNS[:10]) if d.off_prompt]
    assert textual.argmin() in off_prompt
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(overall), rank(designed[:, 0]))[0, 1] > 0.8


def test_demo_loader_idempotent_and_guarded(tmp_path: Path):
    small = dict(n_systems=3, n_prompts=4, seconds=0.5)
    root = tmp_path / "demo"
    r = load_dataset("demo", root, **small)
    assert r.name == "demo" and len(r.clips) == 12 and r.system_mos
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = load_dataset("demo", root, **small)
    assert again == r
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing rewritten
    assert load_dataset("demo", root, splits=("dev",), **small).clips[0].split == "dev"
    with pytest.raises(DataError, match="demo_corpus.json"):
        load_dataset("demo", root, seed=1, **small)
    (tmp_path / "real").mkdir()
    write(tmp_path / "real/prompt_info.txt", "id\ttext\n")
    with pytest.raises(DataError, match="not a demo corpus"):
        load_dataset("demo", tmp_path / "real")
    with pytest.raises(QamroError, match="n_systems"):
        write_demo_corpus(tmp_path / "x", n_systems=99)
