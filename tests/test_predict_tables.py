"""evaluate, predict and table on the demo pipeline (melstats, synthetic corpus)."""
import json

import numpy as np
import pytest
import soundfile as sf
from conftest import make_synthetic_cache
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import ExtractConfig
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.loop import extract

SMALL = dict(n_systems=6, n_prompts=6, seconds=2.0)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    recs = load_dataset("demo", root / "corpus", **SMALL)
    cache = root / "demo" / "melstats.h5"
    extract(recs, ExtractConfig(backbone="melstats", device="cpu", workers=0), cache,
            progress=False)
    run = root / "run"
    r = invoke("train", "--recipe", "demo", "--cache", cache, "--out", run, "--max-epochs", "30")
    assert r.exit_code == 0, r.output
    return root, cache, run


def test_evaluate_reproduces_training_metrics(demo_run):
    root, cache, run = demo_run
    r = invoke("evaluate", run)
    assert r.exit_code == 0, r.output
    assert "utterance-level" in r.output and "system-level" in r.output
    ev = json.loads((run / "evaluations" / "melstats-dev" / "metrics.json").read_text())
    tr = json.loads((run / "metrics.json").read_text())
    for head in ("overall", "textual"):
        for fig in ("mse", "lcc", "srcc", "ktau"):
            assert ev["heads"][head]["system"][fig] == pytest.approx(
                tr["heads"][head]["system"][fig], abs=1e-6)
        assert ev["heads"][head]["system"]["srcc_ci"] is not None
    r = invoke("evaluate", run, "--split", "train")
    assert r.exit_code == 0 and (run / "evaluations" / "melstats-train").is_dir()


def test_evaluate_refuses_other_backbone_and_old_runs(demo_run, tmp_path):
    root, cache, run = demo_run
    other = make_synthetic_cache(tmp_path / "other.h5")
    r = invoke("evaluate", run, "--cache", other)
    assert r.exit_code == 1 and "backbone synthetic@1" in r.output and "melstats@1" in r.output
    old = tmp_path / "old-run"
    import shutil
    shutil.copytree(run, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["qamro_run_version"] = 0
    (old / "config.json").write_text(json.dumps(cfg))
    r = invoke("evaluate", old)
    assert r.exit_code == 1 and "run folder version 0" in r.output


def _tone(sr, seconds, channels=1, noise=0.0):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.4 * np.sin(2 * np.pi * 330 * t) + noise * np.random.default_rng(0).normal(size=len(t))
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def test_predict_many_formats_and_bad_files(demo_run, tmp_path):
    root, cache, run = demo_run
    good = {"a.wav": (8000, 1), "b.flac": (44100, 2), "c.wav": (48000, 6), "d.flac": (16000, 1)}
    for name, (sr, ch) in good.items():
        sf.write(tmp_path / name, _tone(sr, 1.5, ch, noise=0.05), sr)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    (tmp_path / "empty.wav").write_bytes(b"")
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp_path / "short.wav", _tone(16000, 0.05), 16000)
    files = [tmp_path / n for n in [*good, "broken.wav", "empty.wav", "silent.wav", "short.wav"]]
    out = tmp_path / "scores.jsonl"
    answer = tmp_path / "answer.txt"
    r = invoke("predict", run, *files, "--text", "calm piano", "--out", out, "--answer", answer)
    assert r.exit_code == 1  # some files failed
    for bad in ("broken.wav", "empty.wav", "short.wav"):
        assert bad in r.output
    assert "silent.wav" not in r.output  # silence is audio: extract embeds it, predict scores it
    assert "scored 5 file(s), 3 failed" in r.output
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["id"] for s in scores] == ["a", "b", "c", "d", "silent"]
    assert all(1 <= s["overall"] <= 5.5 and np.isfinite(s["textual"]) for s in scores[:4])
    assert np.isfinite(scores[4]["overall"]) and np.isfinite(scores[4]["textual"])
    lines = answer.read_text().splitlines()
    assert len(lines) == 5 and all(len(line.split(",")) == 3 for line in lines)
    assert lines[0].split(",")[0] == "a"
    # all good: exit 0, CSV to stdout
    r = invoke("predict", run, tmp_path / "a.wav")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "id,overall,textual"


def test_predict_manifest_matches_evaluate_on_the_same_clips(demo_run, tmp_path):
    """Scoring the corpus's own files end to end gives the cache-based predictions."""
    import csv

    root, cache, run = demo_run
    recs = load_dataset("musiceval", root / "corpus")
    dev = [c for c in recs.clips if c.split == "dev"][:5]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "text"])
        for c in dev:
            w.writerow([c.id, str(c.path), c.text])
    out = tmp_path / "s.csv"
    r = invoke("predict", run, "--manifest", manifest, "--out", out)
    assert r.exit_code == 0, r.output
    got = {row["id"]: float(row["overall"]) for row in csv.DictReader(open(out))}
    pred = {row["id"]: float(row["pred_overall"])
            for row in csv.DictReader(open(run / "predictions.csv"))}
    for c in dev:
        assert got[c.id] == pytest.approx(pred[c.id], abs=1e-4)


def test_table_on_demo_with_two_seeds(demo_run, tmp_path):
    root, cache, run = demo_run
    out = tmp_path / "t1"
    r = invoke("table", "--recipe", "table1", "--model", "demo", "--cache", cache, "--seeds", "2",
               "--max-epochs", "15", "--out", out)
    assert r.exit_code == 0, r.output
    for row in ("baseline (Huber only) (n=2)", "QAMRO (n=2)", "w/o quality-aware weighting",
                "w/o adaptive margin"):
        assert row in r.output
    assert "overall SRCC" in r.output and "[paper]" not in r.output  # demo is not MusicEval
    md = (out / "table.md").read_text()
    assert md.count("\n|") >= 5 and " ± " in md
    assert (out / "table.csv").read_text().startswith("model,overall MSE")
