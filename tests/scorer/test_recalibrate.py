"""Per-system anchor recalibration (issue 23 item 6): a new system's score offset fitted from
labelled pairs against known systems by Bradley-Terry maximum likelihood (the form of
TuneJury's anchor calibration, yonghyunk1m/TuneJury applications/anchor_calibration/fit.py,
one system at a time), with a bootstrap interval; recorded beside preference.json without
overwriting anything; applied by Scorer.score(..., system=NAME); the CLI form.

The model is a small demo run (melstats, random-free backbone); the pairs compare one demo
system's clips with the other systems' clips, in docs/preference.md's layout with
system_a/system_b, their outcomes drawn from P(new over anchor) = sigmoid((s_new + b -
s_anchor) / T) with a planted offset b and the model's recorded temperature T."""
import json

import numpy as np
import pytest

from qamro_pipe.errors import QamroError
from qamro_pipe.preference import write_calibration
from qamro_pipe.recalibrate import OFFSETS_FILE, fit_offset, offset_with_interval
from qamro_pipe.scorer import Scorer

from kit.caches import small_demo_run
from kit.cli import invoke

PLANTED, T = 0.8, 0.3


def test_fit_offset_in_closed_cases():
    # one tie at difference d: equal odds where s_new + b = s_anchor, b = -d
    assert fit_offset(np.array([0.4]), np.array([0.5]), np.array([1.0]), 10) == \
        pytest.approx(-0.4, abs=1e-5)
    # k wins of n at one difference: sigmoid((d + b)/T) = k/n
    d, k, n = 0.2, 3, 4
    b = fit_offset(np.full(n, d), np.array([1.0] * k + [0.0] * (n - k)), np.full(n, T), 10)
    assert b == pytest.approx(T * np.log(k / (n - k)) - d, abs=1e-5)
    rng = np.random.default_rng(0)
    diff = rng.normal(0, 0.5, 300)
    won = (rng.random(300) < 1 / (1 + np.exp(-(diff + PLANTED) / T))).astype(float)
    fit = offset_with_interval(diff, won, np.full(300, T), n_boot=200)
    lo, hi = fit["interval"]
    assert lo < PLANTED < hi and lo < fit["offset"] < hi and hi - lo < 0.5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("recal")
    recs, _, run = small_demo_run(root, "--quiet", "--max-epochs", "30")
    scorer = Scorer.load(run, device="cpu")
    write_calibration(run, None, {"temperature": {h: T for h in scorer.heads}, "pairs": 100,
                                  "file": "x.jsonl", "sha256": "0" * 64})
    rows = scorer.score([c.path for c in recs.clips])
    return recs, run, scorer, {c.path: r for c, r in zip(recs.clips, rows)}


def _pairs_file(path, recs, scores, new="S002", n=120, seed=0):
    rng = np.random.default_rng(seed)
    mine = [c for c in recs.clips if c.system == new]
    others = [c for c in recs.clips if c.system != new]
    lines = []
    for i in range(n):
        a, b = mine[rng.integers(len(mine))], others[rng.integers(len(others))]
        d = scores[a.path]["overall"] + PLANTED - scores[b.path]["overall"]
        new_won = rng.random() < 1 / (1 + np.exp(-d / T))
        if rng.random() < 0.5:  # the new system's clip on either side
            item = {"audio_a": str(a.path), "audio_b": str(b.path), "system_a": a.system,
                    "system_b": b.system, "winner": "A" if new_won else "B"}
        else:
            item = {"audio_a": str(b.path), "audio_b": str(a.path), "system_a": b.system,
                    "system_b": a.system, "winner": "B" if new_won else "A"}
        lines.append({"id": f"r{i}", "prompt": a.text, **item})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_recovers_a_planted_offset_and_applies_it(model, tmp_path):
    recs, run, scorer, scores = model
    pairs = _pairs_file(tmp_path / "anchors.jsonl", recs, scores)
    result = scorer.recalibrate(pairs, "S002", n_boot=300)
    e = result["overall"]
    lo, hi = e["interval"]
    assert lo < PLANTED < hi and abs(e["offset"] - PLANTED) < 0.3, e
    assert e["pairs"] == 120 and "fitted" in e["temperature"]
    recorded = json.loads((run / OFFSETS_FILE).read_text())
    assert recorded["by_members"]["all"]["S002"]["overall"]["offset"] == e["offset"]
    clip = next(c for c in recs.clips if c.system == "S002")
    plain, shifted = scorer.score(clip.path)[0], scorer.score(clip.path, system="S002")[0]
    assert shifted["overall"] == pytest.approx(plain["overall"] + e["offset"])
    with pytest.raises(QamroError, match="system 'S099': no offset recorded"):
        scorer.score(clip.path, system="S099")
    # refitting keeps the earlier file whole
    before = (run / OFFSETS_FILE).read_text()
    scorer.recalibrate(pairs, "S002", n_boot=10)
    assert (run / f"{OFFSETS_FILE}.kept-1").read_text() == before


def test_bad_pairs_and_foreign_files_are_refused(model, tmp_path):
    recs, run, scorer, scores = model
    f = _pairs_file(tmp_path / "p.jsonl", recs, scores, n=20)
    items = [json.loads(x) for x in f.read_text().splitlines()]
    for x in items:
        x.pop("system_a")
    g = tmp_path / "nosys.jsonl"
    g.write_text("".join(json.dumps(x) + "\n" for x in items))
    with pytest.raises(QamroError, match="needs each clip's system"):
        scorer.recalibrate(g, "S002")
    with pytest.raises(QamroError, match="0 pair\\(s\\) compare system 'S077'"):
        scorer.recalibrate(f, "S077")
    other = tmp_path / "model"
    other.mkdir()
    (other / OFFSETS_FILE).write_text('{"mine": true}\n')
    from qamro_pipe.recalibrate import write_offsets
    with pytest.raises(QamroError, match="not a system offsets file of this tool"):
        write_offsets(other, None, "S002", {})
    assert (other / OFFSETS_FILE).read_text() == '{"mine": true}\n'


def test_cli_calibrate_system(model, tmp_path):
    recs, run, scorer, scores = model
    f = _pairs_file(tmp_path / "p.jsonl", recs, scores, new="S003", n=60, seed=1)
    r = invoke("calibrate-system", run, f, "--system", "S003", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "overall: offset" in r.output and "from 60 pairs" in r.output
    assert "S003" in json.loads((run / OFFSETS_FILE).read_text())["by_members"]["all"]
    r = invoke("calibrate-system", run, f, "--system", "S077")
    assert r.exit_code == 1 and "compare system 'S077'" in r.output
    assert "Traceback" not in r.output
    # predict --system adds the recorded offset; a system without one is refused
    clip = next(c for c in recs.clips if c.system == "S003")
    offset = json.loads((run / OFFSETS_FILE).read_text())["by_members"]["all"]["S003"]
    plain = invoke("predict", run, clip.path, "--device", "cpu", "--out", tmp_path / "a.jsonl")
    shifted = invoke("predict", run, clip.path, "--device", "cpu", "--system", "S003",
                     "--out", tmp_path / "b.jsonl")
    assert plain.exit_code == 0 and shifted.exit_code == 0, shifted.output
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.jsonl", "b.jsonl"))
    for h in scorer.heads:
        assert b[h] == pytest.approx(a[h] + offset[h]["offset"], abs=1e-9)
    r = invoke("predict", run, clip.path, "--system", "S099", "--out", tmp_path / "c.jsonl")
    assert r.exit_code == 1 and "system 'S099': no offset recorded" in r.output
    assert not (tmp_path / "c.jsonl").exists()
