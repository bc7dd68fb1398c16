"""evaluate, predict and table on the demo pipeline (melstats, synthetic corpus)."""
import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.extract.datasets import load_dataset

from kit.caches import make_synthetic_cache, small_demo_run, write_clip_manifest


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    _, cache, run = small_demo_run(root, "--max-epochs", "30")
    return root, cache, run


def test_evaluate_reproduces_training_metrics(demo_run):
    root, cache, run = demo_run
    r = invoke("evaluate", run)
    assert r.exit_code == 0, r.output
    assert "utterance-level" in r.output and "system-level" in r.output
    ev_dir = only(run.glob("evaluations/melstats-*-dev"))
    ev = json.loads((ev_dir / "metrics.json").read_text())
    assert ev["scored"]["text"] == "the predictions of its one member (qamro a=0.2 b=7 seed=0)"
    assert "scoring the predictions of its one member" in r.output
    tr = json.loads((run / "metrics.json").read_text())
    for head in ("overall", "textual"):
        for fig in ("mse", "lcc", "srcc", "ktau"):
            assert ev["heads"][head]["system"][fig] == pytest.approx(
                tr["heads"][head]["system"][fig], abs=1e-6)
        assert ev["heads"][head]["system"]["srcc_ci"] is not None
    r = invoke("evaluate", run, "--split", "train")
    assert r.exit_code == 0 and only(run.glob("evaluations/melstats-*-train")).is_dir()


def only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def test_evaluations_of_caches_with_the_same_name_do_not_collide(demo_run, tmp_path):
    """Before: `evaluate --cache other/melstats.h5` overwrote the evaluation of the run's
    own cache/demo/melstats.h5 (same file name)."""
    import shutil

    root, cache, run = demo_run
    other = tmp_path / "other" / "melstats.h5"
    other.parent.mkdir()
    shutil.copy(cache, other)
    for c in (cache, other):
        r = invoke("evaluate", run, "--cache", c)
        assert r.exit_code == 0, r.output
    found = {json.loads((p / "metrics.json").read_text())["cache"]: p
             for p in run.glob("evaluations/melstats-*-dev")}
    assert set(found) == {str(cache), str(other)} and len(set(found.values())) == 2


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
    manifest = write_clip_manifest(tmp_path / "m.csv", dev)
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
    # rows differ in the loss alone, and the run's config says so
    members = json.loads((out / "config.json").read_text())["members"]
    losses = {(m["loss"]["kind"], m["loss"]["alpha"] if m["loss"]["kind"] == "qamro" else None,
               m["loss"]["beta"] if m["loss"]["kind"] == "qamro" else None,
               m["loss"]["margin"] if m["loss"]["kind"] == "mr" else None) for m in members}
    assert losses == {("none", None, None, None), ("qamro", 0.2, 7.0, None),
                      ("qamro", 0.2, 1.0, None), ("mr", None, None, 0.1)}
    assert len({json.dumps({k: v for k, v in m["loss"].items()
                            if k not in ("kind", "alpha", "beta", "margin")}, sort_keys=True)
                for m in members}) == 1
    md = (out / "table.md").read_text()
    assert md.count("\n|") >= 5 and " ± " in md
    assert (out / "table.csv").read_text().startswith("model,overall MSE")


def test_answer_file_holds_every_score_in_head_order(demo_run, tmp_path):
    """--answer (AudioMOS 2025 submission: `id,overall,textual`, no header): every value
    equals the score it came from, in the recipe's head order; and the end-to-end scores
    equal the run's own predictions of the same clips."""
    import csv

    root, cache, run = demo_run
    recs = load_dataset("musiceval", root / "corpus")
    dev = [c for c in recs.clips if c.split == "dev"][:6]
    manifest = write_clip_manifest(tmp_path / "m.csv", dev)
    out, answer = tmp_path / "s.jsonl", tmp_path / "answer.txt"
    r = invoke("predict", run, "--manifest", manifest, "--out", out, "--answer", answer)
    assert r.exit_code == 0, r.output
    scores = {s["id"]: s for s in map(json.loads, out.read_text().splitlines())}
    pred = {row["id"]: row for row in csv.DictReader(open(run / "predictions.csv"))}
    lines = answer.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [c.id for c in dev]
    heads = json.loads((run / "config.json").read_text())["heads"]
    assert [h["name"] for h in heads] == ["overall", "textual"]
    for line in lines:
        cid, *values = line.split(",")
        assert len(values) == len(heads)
        for h, v in zip(heads, values):
            assert float(v) == pytest.approx(scores[cid][h["name"]], abs=5e-7)
            assert float(v) == pytest.approx(float(pred[cid][f"pred_{h['name']}"]), abs=1e-4)
    assert len({line.split(",")[1] for line in lines}) > 1  # not one constant


def test_predict_outputs_are_checked_before_scoring(demo_run, tmp_path):
    """Before: `--out out/pred.csv` into a missing folder failed after scoring every file."""
    root, cache, run = demo_run
    wav = tmp_path / "a.wav"
    sf.write(wav, _tone(16000, 1.5, noise=0.05), 16000)
    out = tmp_path / "new" / "deeper" / "pred.csv"
    answer = tmp_path / "other" / "answer.txt"
    r = invoke("predict", run, wav, "--out", out, "--answer", answer)
    assert r.exit_code == 0, r.output
    assert out.read_text().startswith("id,overall,textual") and answer.read_text().count(",") == 2
    before = out.read_bytes()
    for args, msg in [(["--out", out], "exists; choose another file or pass --force"),
                      (["--out", tmp_path], "is a folder; name a file"),
                      (["--out", tmp_path / "x.csv", "--answer", tmp_path / "x.csv"],
                       "name the same file"),
                      (["--out", tmp_path / "x.csv", "--device", "gpu"], "unknown device 'gpu'"),
                      (["--answer", wav / "answer.txt"], "cannot create its folder")]:
        r = invoke("predict", run, wav, *args)
        assert r.exit_code == 1 and msg in r.output, r.output
        assert "scored" not in r.output and "Traceback" not in r.output  # refused first
    assert out.read_bytes() == before and not (tmp_path / "x.csv").exists()
    r = invoke("predict", run, wav, "--out", out, "--force")
    assert r.exit_code == 0 and out.read_text().startswith("id,overall,textual")
    assert not list(out.parent.glob(".*partial*"))


def test_predict_gives_the_spread_over_members_beside_each_score(demo_run, tmp_path):
    """With several members, each score has HEAD_sd beside it: the sd (ddof=1) of the members'
    own scores, which `--members seed=K` gives one by one. The answer file keeps the
    submission format (scores alone). Fails without the change: no sd, no --members."""
    import csv

    root, cache, _ = demo_run
    run = tmp_path / "two-seeds"
    r = invoke("train", "--recipe", "demo", "--cache", cache, "--out", run, "--seeds", "2",
               "--max-epochs", "10", "--quiet")
    assert r.exit_code == 0, r.output
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, _tone(16000, 1.5, noise=0.05 if name == "a.wav" else 0.3),
                 16000)
    wavs = [tmp_path / "a.wav", tmp_path / "b.wav"]
    out, answer = tmp_path / "both.csv", tmp_path / "answer.txt"
    r = invoke("predict", run, *wavs, "--text", "calm piano", "--out", out, "--answer", answer)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["id", "overall", "overall_sd", "textual", "textual_sd"]
    single = {}
    for seed in (0, 1):
        one = tmp_path / f"seed{seed}.jsonl"
        r = invoke("predict", run, *wavs, "--text", "calm piano", "--out", one,
                   "--members", f"seed={seed}")
        assert r.exit_code == 0, r.output
        single[seed] = [json.loads(line) for line in one.read_text().splitlines()]
        assert "overall_sd" not in single[seed][0]  # one member: no spread to report
    for i, row in enumerate(rows):
        for h in ("overall", "textual"):
            pair = np.array([single[0][i][h], single[1][i][h]])
            assert float(row[h]) == pytest.approx(pair.mean(), abs=2e-6)
            assert float(row[f"{h}_sd"]) == pytest.approx(pair.std(ddof=1), abs=2e-6)
    assert all(len(line.split(",")) == 3 for line in answer.read_text().splitlines())
    r = invoke("predict", run, wavs[0], "--members", "seed=7")
    assert r.exit_code == 1 and "no member of this run matches" in r.output
