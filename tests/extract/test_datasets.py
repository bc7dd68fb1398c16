"""Dataset loaders against tiny fixtures written in each published layout."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.errors import DataError, QamroError
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.datasets.demo import SYSTEM_DESIGNS, designed_scores, write_demo_corpus
from qamro_pipe.store import read_cache

from kit.mp3 import MP3_SUPPORT, lame_mp3

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
    """The MusicEval layout as its publishers' and participants' code reads it: lists of
    "audiomos2025-track1-S002_P044.wav,overall,textual" (NKU-HLT/MusicEval-baseline
    code/mos_track1.py), prompt tables read by pandas with sep='\\t' and columns id, text
    (code/utils.py), "S002,overall,textual" system MOS lines (code/predict.py), and the eval
    package's DATA/wav and DATA/sets/eval_list.txt of ids without .wav (JethroWangSir/QAMRO
    track1/evaluate.py), linked into the root as DATA/ (how it had to be placed before)."""
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


def test_musiceval_system_mos_systems_without_clips_are_ignored_with_a_note(musiceval: Path):
    write(musiceval / "system_mos/system_mos_phase1.csv", "S002,2.8,3.3\nS099,3.0,3.0\n"
          "S003,3.2,2.5\nS100,1.0,1.0\n")
    r = load_dataset("musiceval", musiceval)
    assert r.system_mos == {"S002": (2.8, 3.3), "S003": (3.2, 2.5)}
    assert len(r.notes) == 1 and "system_mos_phase1.csv: ignored 2 system(s) with no listed " \
        "clip: S099 (line 2), S100 (line 4)" in r.notes[0]


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
        load_dataset("musiceval", musiceval, splits=("valid",))
    with pytest.raises(DataError, match="test_mos_list.txt"):
        load_dataset("musiceval", musiceval, splits=("test",))


def test_musiceval_eval_package_as_shipped(musiceval: Path, tmp_path: Path):
    """The eval phase ships as its own audiomos2025-track1-eval-phase/DATA/ (the path
    JethroWangSir/QAMRO track1/evaluate.py and other participants' code read): found beside
    the root, or named with eval_dir; its own prompt tables come first."""
    package = tmp_path / "audiomos2025-track1-eval-phase" / "DATA"
    package.parent.mkdir()
    (musiceval / "DATA").rename(package)
    write(package / "prompt_info.txt", "id\ttext\nP003\teval-phase prompt\n")
    r = load_dataset("musiceval", musiceval, splits=("eval",))
    assert [c.path for c in r.clips] == [package / "wav" / f"{PREFIX}{n}.wav" for n in EVAL]
    assert r.clips[0].text == "eval-phase prompt"
    moved = shutil.move(str(package.parent), tmp_path / "elsewhere")
    with pytest.raises(DataError, match="eval-phase package was not found.*--eval-dir"):
        load_dataset("musiceval", musiceval, splits=("eval",))
    r = load_dataset("musiceval", musiceval, splits=("eval",), eval_dir=Path(moved) / "DATA")
    assert len(r.clips) == 2
    raises_at("eval_list.txt", None, load_dataset, "musiceval", musiceval, splits=("eval",),
              eval_dir=tmp_path)


TEST = ["S002_P004,3.4,3.8", "S003_P004,1.8,2.2"]


def test_musiceval_labelled_test_split(musiceval: Path):
    """The later labelled release keeps sets/test_mos_list.txt in the train/dev line format
    (as JethroWangSir/ASTAR-NTU-AUDIOMOS2025-TRACK1 run_best_single_model.sh passes it); it is
    read as a `test` split, by default when present."""
    write(musiceval / "prompt_info.txt", "id\ttext\nP001\ta\nP002\tb\nP003\tc\nP004\td\n")
    lines = []
    for line in TEST:
        name, rest = line.split(",", 1)
        wav(musiceval / "wav" / f"{PREFIX}{name}.wav")
        lines.append(f"{PREFIX}{name}.wav,{rest}")
    write(musiceval / "sets/test_mos_list.txt", "\n".join(lines) + "\n")
    r = load_dataset("musiceval", musiceval)
    test = [c for c in r.clips if c.split == "test"]
    assert [(c.id, c.system, c.labels, c.text) for c in test] == [
        (f"{PREFIX}S002_P004", "S002", (3.4, 3.8), "d"),
        (f"{PREFIX}S003_P004", "S003", (1.8, 2.2), "d")]
    assert test[0].path == musiceval / "wav" / f"{PREFIX}S002_P004.wav"
    assert [c.split for c in load_dataset("musiceval", musiceval, splits="test").clips] == [
        "test"] * 2


def person_mos(lines: list[str]) -> str:
    """person_mos/<split>_person_mos.txt as ASTAR-NTU's dataset/dataset_mos.py reads it:
    no header, wavname,rater_id,overall,textual, one line per rating (no real file seen)."""
    return "".join(f"{PREFIX}{line}\n" for line in lines)


def test_musiceval_individual_ratings(musiceval: Path):
    write(musiceval / "person_mos/train_person_mos.txt", person_mos([
        "S002_P001.wav,R03,4,4", "S002_P001.wav,R07,3,5", "S002_P001.wav,R01,4,4",
        "S002_P001.wav,R11,3,4", "S002_P001.wav,R02,4,4",  # means 3.6, 4.2: the list's MOS
        "S006_P001.wav,R03,5,5", "S006_P001.wav,R07,5,4",  # means 5.0, 4.5: list 4.8, 4.6
        "S009_P001.wav,R03,5,5"]))  # no such clip in the train list
    r = load_dataset("musiceval", musiceval)
    by_id = {c.id[len(PREFIX):]: c for c in r.clips}
    assert by_id["S002_P001"].ratings == ((4, 3, 4, 3, 4), (4, 5, 4, 4, 4))
    assert by_id["S002_P001"].raters == ("R03", "R07", "R01", "R11", "R02")
    assert by_id["S002_P001"].labels == (3.6, 4.2)  # the label stays the list's MOS
    assert by_id["S006_P001"].ratings == ((5, 5), (5, 4))
    assert not by_id["S002_P002"].ratings and not by_id["S003_P001"].ratings  # dev: no file
    notes = "\n".join(r.notes)
    assert "ignored 1 line(s) naming clips not in the train list (first: " \
        f"{PREFIX}S009_P001, line 8)" in notes
    assert "no individual ratings for 2 of the 4 train clips" in notes
    assert f"mean rating differs from the list's MOS by more than 0.05 (the list's MOS is the " \
        f"label): {PREFIX}S006_P001 (means 5.00,4.50, list 4.8,4.6)" in notes
    ratings, raters = r.ratings_arrays()
    assert ratings["overall"].shape == (6, 5) and np.isnan(ratings["overall"][1]).all()
    assert raters[0].tolist() == ["R03", "R07", "R01", "R11", "R02"] and raters[2, 2] == ""


@pytest.mark.parametrize("line, fragment", [
    ("S002_P001.wav,R03,4", "fields"), ("S002_P001.wav,R03,4,x", "not a number"),
    ("S002_P001.wav,R03,4,6", "outside"),
])
def test_musiceval_bad_person_mos_line(musiceval: Path, line, fragment):
    write(musiceval / "person_mos/dev_person_mos.txt", person_mos(["S003_P001.wav,R1,1,1", line]))
    assert fragment in raises_at("dev_person_mos.txt", 2, load_dataset, "musiceval", musiceval)


# ---------------------------------------------------------------- AES-Natural

AES_REPO = Path(__file__).parents[1] / "fixtures" / "audiobox-aesthetics"  # see its README.md
TRACK2 = AES_REPO / "audiomos2025_track2"
ANNOTATIONS = TRACK2 / "audiomos2025_track2_human_annotations.jsonl"
AXES = ("Production_Quality", "Production_Complexity", "Content_Enjoyment", "Content_Usefulness")


def aes_rows(split: str) -> list[dict[str, str]]:
    with open(TRACK2 / f"audiomos2025-track2-{split}_list.csv", newline="") as f:
        return list(csv.DictReader(f))


def audio_at(path: Path, seconds: float = 0.3) -> Path:
    """A tone in the file's own format: flac and wav by libsndfile, mp3 by LAME."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (0.1 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * SR)) / SR)).astype(np.float32)
    if path.suffix == ".mp3":
        return lame_mp3(path, x, SR, lame_tag=False, tags=True)
    sf.write(path, x, SR)
    return path


@pytest.fixture
def aes(tmp_path: Path) -> Path:
    """The folder standing for the lists' /your_path/, holding audio at every path the real
    list excerpts name (tests/fixtures/audiobox-aesthetics, copied from facebookresearch/
    audiobox-aesthetics audiomos2025_track2/), and beside it the eval package laid out as
    JethroWangSir/QAMRO track2/evaluate.py reads it: DATA/wav/<id>.wav, DATA/sets/eval_list.txt
    with one id a line. Its ids are the annotation file's (no eval_list.txt was seen)."""
    if not MP3_SUPPORT:
        pytest.skip("this libsndfile has no MP3 support (the lists name Common Voice mp3s)")
    root = tmp_path / "your_path"
    for split in ("train", "dev"):
        for row in aes_rows(split):
            audio_at(root / row["data_path"].removeprefix("/your_path/"))
    package = tmp_path / "audiomos2025-track2-eval-phase" / "DATA"
    ids = [json.loads(line)["data_path"] for line in ANNOTATIONS.read_text().splitlines()]
    for clip_id in ids:
        audio_at(package / "wav" / f"{clip_id}.wav")
    write(package / "sets/eval_list.txt", "".join(f"{i}\n" for i in ids))
    return root


def test_aes_natural_as_published(aes: Path):
    """The published lists (quoted MUSDB18 rows, /your_path/ paths, flac/mp3/wav, means below
    1), the eval annotations and the ratings behind the train/dev means, read from a copy of
    the repository's folders (tests/fixtures/audiobox-aesthetics)."""
    r = load_dataset("aes-natural", aes, lists=AES_REPO)
    assert r.name == "aes-natural" and r.notes == ()
    assert r.label_names == ("PQ", "PC", "CE", "CU") and r.label_range == (0.0, 10.0)
    assert [c.split for c in r.clips] == ["train"] * 5 + ["dev"] * 4 + ["eval"] * 4
    by_id = {c.id: c for c in r.clips}
    for split in ("train", "dev"):
        for row in aes_rows(split):
            c = by_id[row["sample_id"]]
            assert c.path == aes / row["data_path"].removeprefix("/your_path/")
            assert c.labels == tuple(float(row[a]) for a in AXES) and c.system == ""
            assert len(c.ratings) == 4 and all(len(x) == 10 for x in c.ratings)
            assert [round(np.mean(x), 1) for x in c.ratings] == list(c.labels)
    bass = by_id["audiomos2025-track2-music-MUSDB18_train_Jokers,_Jacks_&_Kings_-_Sea_Of_Leaves_"
                 "bass"]
    assert bass.path == aes / "MUSDB18/train/Jokers, Jacks & Kings - Sea Of Leaves/bass.wav"
    ears = by_id["audiomos2025-track2-speech-EARS_p025_emo_cuteness_sentences"]
    assert ears.labels[1] == 0.9 and 0.0 in ears.ratings[1]  # single ratings reach 0
    vocals = by_id["audiomos2025-track2-music-MUSDB18_train_AvaLuna_-_Waterduct_vocals"]
    assert vocals.split == "dev" and vocals.labels[2] == 0.7
    assert any(c.path.suffix == ".mp3" for c in r.clips)

    annotated = [json.loads(line) for line in ANNOTATIONS.read_text().splitlines()]
    ev = [c for c in r.clips if c.split == "eval"]
    assert [c.id for c in ev] == [a["data_path"] for a in annotated]
    assert [c.system for c in ev] == ["sys0v1wm", "sys0v1wm", "sysw48qy", "sysw48qy"]
    for c, a in zip(ev, annotated):
        assert c.ratings == tuple(tuple(a[x]) for x in AXES)
        assert c.labels == pytest.approx([np.mean(a[x]) for x in AXES])
        assert c.path == aes.parent / "audiomos2025-track2-eval-phase/DATA/wav" / f"{c.id}.wav"


def test_aes_natural_lists_in_the_root_and_without_ratings(aes: Path):
    """The lists copied into --root (here without evaluation_data/): found there, no
    individual ratings for train/dev; the eval package may be named explicitly."""
    for name in ("audiomos2025-track2-train_list.csv", "audiomos2025-track2-dev_list.csv"):
        shutil.copy(TRACK2 / name, aes / name)
    package = aes.parent / "audiomos2025-track2-eval-phase/DATA"
    r = load_dataset("aes-natural", aes, splits=("train", "dev", "eval"), eval_dir=package)
    assert len(r.clips) == 13 and all(not c.ratings for c in r.clips if c.split != "eval")
    ev = [c for c in r.clips if c.split == "eval"]  # no annotation file here: unlabelled
    assert all(math.isnan(v) for c in ev for v in c.labels) and not ev[0].ratings
    assert len(r.notes) == 1 and "4 of 4 eval clips have no labels" in r.notes[0]
    assert [c.split for c in load_dataset("aes-natural", aes, splits="dev").clips] == ["dev"] * 4


def test_aes_natural_paths_other_than_the_placeholder(aes: Path, tmp_path: Path):
    """data_path under /your_path/ is read under --root; a relative one too; any other
    absolute path is used as it is (lists edited to point at the files)."""
    elsewhere = audio_at(tmp_path / "elsewhere" / "x.flac")
    audio_at(aes / "mine" / "y.wav")
    header = ",".join(["sample_id", "data_path", *AXES])
    write(aes / "audiomos2025-track2-train_list.csv",
          f"{header}\nx,{elsewhere},1,2,3,4\ny,mine/y.wav,5,6,7,8\n")
    r = load_dataset("aes-natural", aes, splits="train")
    assert [c.path for c in r.clips] == [elsewhere, aes / "mine" / "y.wav"]


def _train_list_with(aes: Path, row: str) -> Path:
    header = ",".join(["sample_id", "data_path", *AXES])
    flac = "/your_path/unbalanced_train_segments/audio/-6FLs0P1KaQ_30000_40000.flac"
    return write(aes / "audiomos2025-track2-train_list.csv",
                 f"{header}\na,{flac},7.5,3,6.25,8\n{row}\n")


@pytest.mark.parametrize("row, fragment", [
    ("b,/your_path/musiccaps/0hw_BB4QN34.wav,2,x,5,6", "not a number"),
    ("b,/your_path/musiccaps/0hw_BB4QN34.wav,2,4,5,10.5", "outside"),
    ("b,/your_path/musiccaps/0hw_BB4QN34.wav,2,4,5", "fields"),
    ("a,/your_path/musiccaps/0hw_BB4QN34.wav,2,4,5,6", "duplicate"),
    ("b,/your_path/musiccaps/missing.wav,2,4,5,6", "missing"),
])
def test_aes_natural_bad_rows(aes: Path, row, fragment):
    _train_list_with(aes, row)
    msg = raises_at("audiomos2025-track2-train_list.csv", 3, load_dataset, "aes-natural", aes,
                    splits="train")
    assert fragment in msg


def test_aes_natural_ratings_that_do_not_match_the_list_are_refused(aes: Path, tmp_path: Path):
    """A ratings file whose means disagree with the list (here one rating of the real
    AES_natural_sound.jsonl changed) is not this list's: refused, naming file and line."""
    repo = shutil.copytree(AES_REPO, tmp_path / "repo")
    sound = repo / "evaluation_data" / "AES_natural_sound.jsonl"
    lines = sound.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["Production_Quality"][0] = 10 - rec["Production_Quality"][0]  # still on the scale
    sound.write_text("\n".join([lines[0], json.dumps(rec), *lines[2:]]) + "\n")
    msg = raises_at("AES_natural_sound.jsonl", 2, load_dataset, "aes-natural", aes, lists=repo)
    assert "Production_Quality" in msg and "audiomos2025-track2-dev_list.csv, line 2" in msg


def test_aes_natural_eval_errors(aes: Path, tmp_path: Path):
    repo = shutil.copytree(AES_REPO, tmp_path / "repo")
    package = aes.parent / "audiomos2025-track2-eval-phase" / "DATA"
    ids = (package / "sets/eval_list.txt").read_text().splitlines()
    write(package / "sets/eval_list.txt", "\n".join(ids[:3]) + "\n")  # one annotated clip fewer
    msg = raises_at("human_annotations.jsonl", 4, load_dataset, "aes-natural", aes, lists=repo)
    assert ids[3] in msg and "eval_list.txt" in msg
    write(package / "sets/eval_list.txt", "\n".join([*ids, "audiomos2025-track2-nosystem"]))
    raises_at("eval_list.txt", 5, load_dataset, "aes-natural", aes, lists=repo)
    annotations = repo / "audiomos2025_track2" / ANNOTATIONS.name
    write(package / "sets/eval_list.txt", "\n".join(ids) + "\n")
    write(annotations, ANNOTATIONS.read_text().replace("[3.0,4.0,7.0", "[3.0,4.0,17.0", 1))
    raises_at(ANNOTATIONS.name, 1, load_dataset, "aes-natural", aes, lists=repo)
    shutil.rmtree(package.parent)
    with pytest.raises(DataError, match="eval-phase package was not found.*--eval-dir"):
        load_dataset("aes-natural", aes, lists=repo, splits=("eval",))
    assert {c.split for c in load_dataset("aes-natural", aes, lists=repo).clips} == {
        "train", "dev"}  # by default only what is there
    with pytest.raises(DataError, match="audiomos2025-track2-train_list.csv.*--lists"):
        load_dataset("aes-natural", tmp_path / "empty")


def test_aes_natural_explicit_csv_with_a_system_column(aes: Path):
    header = ",".join(["sample_id", "data_path", *AXES, "system"])
    write(aes / "lists/mine.csv", f"{header}\na,/your_path/musiccaps/0hw_BB4QN34.wav,7,3,6,8,"
          "tts-1\n")
    r = load_dataset("aes-natural", aes, splits={"eval": "lists/mine.csv"})
    assert [(c.id, c.split, c.system) for c in r.clips] == [("a", "eval", "tts-1")]
    raises_at("nothere.csv", None, load_dataset, "aes-natural", aes, splits={"dev": "nothere.csv"})
    msg = raises_at("mine.csv", 1, load_dataset, "aes-natural", aes, splits={
        "dev": write(aes / "lists/mine.csv", "sample_id,data_path,Production_Quality\n")})
    assert "Content_Usefulness" in msg


def _extract(*args: str):
    return CliRunner().invoke(app, ["extract", *args, "--backbone", "melstats", "--workers",
                                    "0", "--quiet"])


def test_aes_natural_extracts_with_ratings_and_eval_systems(aes: Path, tmp_path: Path):
    """From the published layout to a cache through the CLI: ratings and the eval systems
    are kept, `cache info` shows them, and shards merge into the same thing."""
    out = tmp_path / "aes.h5"
    r = _extract("--dataset", "aes-natural", "--root", str(aes), "--lists", str(AES_REPO),
                 "--out", str(out))
    assert r.exit_code == 0, r.output
    c = read_cache(out)
    ratings, raters = load_dataset("aes-natural", aes, lists=AES_REPO).ratings_arrays()
    assert set(c.ratings) == {"PQ", "PC", "CE", "CU"} and c.rater_ids is None is raters
    for k, v in ratings.items():
        np.testing.assert_array_equal(c.ratings[k], v)
    assert sorted(set(c.systems[c.splits == "eval"])) == ["sys0v1wm", "sysw48qy"]
    info = CliRunner().invoke(app, ["cache", "info", str(out)]).output
    assert "ratings    PQ, PC, CE, CU: individual ratings for 13 clips, up to 10 each" in info
    assert "splits     dev 4, eval 4, train 5" in info
    parts = []
    for k in range(2):
        r = _extract("--dataset", "aes-natural", "--root", str(aes), "--lists", str(AES_REPO),
                     "--out", str(tmp_path / "p.h5"), "--shard", f"{k}/2")
        assert r.exit_code == 0, r.output
        parts.append(str(tmp_path / f"p.part-{k}-of-2.h5"))
    r = CliRunner().invoke(app, ["cache", "merge", *parts, "--out", str(tmp_path / "m.h5")])
    assert r.exit_code == 0, r.output
    merged = read_cache(tmp_path / "m.h5")
    for k, v in ratings.items():
        np.testing.assert_array_equal(merged.ratings[k], v)
    r = _extract("--dataset", "musiceval", "--root", str(aes), "--lists", str(AES_REPO))
    assert r.exit_code == 1 and "--lists applies to --dataset aes-natural" in r.output


def test_musiceval_extract_prints_notes_and_keeps_raters(musiceval: Path, tmp_path: Path):
    write(musiceval / "system_mos/system_mos_phase1.csv", "S002,2.8,3.3\nS099,3.0,3.0\n")
    write(musiceval / "person_mos/dev_person_mos.txt", person_mos([
        "S003_P001.wav,R1,1,1", "S003_P001.wav,R2,2,1", "S003_P002.wav,R1,5,4"]))
    out = tmp_path / "me.h5"
    r = _extract("--dataset", "musiceval", "--root", str(musiceval), "--out", str(out),
                 "--splits", "train,dev,eval")
    assert r.exit_code == 0, r.output
    assert "note: " in r.output and "S099 (line 2)" in r.output
    c = read_cache(out)
    dev = list(c.ids).index(f"{PREFIX}S003_P001")
    assert c.ratings["overall"][dev].tolist() == [1, 2] and c.rater_ids[dev].tolist() == [
        "R1", "R2"]
    assert np.isnan(c.ratings["textual"][c.splits == "train"]).all()


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


def test_manifest_tsv(clips_dir: Path):
    """Tab-separated, by the .tsv ending: prompts keep their commas, quoting still works."""
    m = write(clips_dir / "my_clips.tsv", "id\tpath\ttext\tmos\n"
              "x\taudio/x.wav\tcalm piano, slow\t4.5\n"
              'y\taudio/y.wav\t"a ""tab\there"" prompt"\t\n')
    r = load_dataset("manifest", m)
    assert r.name == "my_clips" and r.label_names == ("mos",)
    assert [(c.id, c.text) for c in r.clips] == [("x", "calm piano, slow"),
                                                  ("y", 'a "tab\there" prompt')]
    assert r.clips[0].labels == (4.5,) and math.isnan(r.clips[1].labels[0])
    raises_at("bad.tsv", 2, load_dataset, "manifest",
              write(clips_dir / "bad.tsv", "id\tpath\tmos\nx\taudio/x.wav\n"))
    msg = raises_at("tabs.csv", 1, load_dataset, "manifest",
                    write(clips_dir / "tabs.csv", "id\tpath\tmos\nx\taudio/x.wav\t4\n"))
    assert ".tsv" in msg


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


def test_changed_ratings_rewrite_the_cache_without_re_embedding(musiceval: Path, tmp_path):
    """Individual ratings are per-clip metadata like the labels: adding, changing or removing
    a person_mos file rewrites them in the cache, keeps every embedded row, and never serves
    the old ratings."""
    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract.loop import extract

    cfg = ExtractConfig(backbone="melstats", device="cpu", workers=0)
    out = tmp_path / "c.h5"
    extract(load_dataset("musiceval", musiceval), cfg, out, progress=False)
    assert read_cache(out).ratings == {}
    ratings = musiceval / "person_mos/train_person_mos.txt"
    write(ratings, person_mos(["S002_P001.wav,R03,4,4", "S002_P001.wav,R07,3,5"]))
    s = extract(load_dataset("musiceval", musiceval), cfg, out, progress=False)
    assert s.written == 0 and "ratings/overall added" in "; ".join(s.changes)
    first = read_cache(out)
    row = list(first.ids).index(f"{PREFIX}S002_P001")
    assert first.ratings["overall"][row].tolist() == [4, 3]
    write(ratings, person_mos(["S002_P001.wav,R03,2,4", "S002_P001.wav,R07,3,5"]))
    s = extract(load_dataset("musiceval", musiceval), cfg, out, progress=False)
    assert s.written == 0 and read_cache(out).ratings["overall"][row].tolist() == [2, 3]
    ratings.unlink()
    s = extract(load_dataset("musiceval", musiceval), cfg, out, progress=False)
    assert s.written == 0 and read_cache(out).ratings == {}
    assert np.array_equal(read_cache(out).features["audio"], first.features["audio"])
