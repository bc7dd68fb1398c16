"""A versus B: the Bradley-Terry link and its temperature, pairs files in the published field
names, `prefer` (answers, calibration recorded), `evaluate --pairs` (figures and diagram),
and the CMI-RewardBench adapter called as its harness calls a model."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from itertools import combinations  # noqa: E402
from typing import Any, Optional  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from qamro_pipe.cli import app  # noqa: E402
from qamro_pipe.errors import DataError, QamroError  # noqa: E402
from qamro_pipe.pairs import read_pairs  # noqa: E402
from qamro_pipe.preference import fit_temperature, p_a_over_b, spread_temperature  # noqa: E402
from qamro_pipe.report.pairs import evaluate_pairs  # noqa: E402

from kit.caches import small_demo_run


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- the link -----------------------------------------------------------------------------
def test_the_link_is_symmetric_and_the_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3, 1, 4000), rng.normal(3, 1, 4000)
    p = p_a_over_b(a, b, 0.5)
    np.testing.assert_allclose(p + p_a_over_b(b, a, 0.5), 1.0)
    assert ((p > 0.5) == (a > b)).all() and ((0 <= p) & (p <= 1)).all()
    won = rng.random(4000) < p  # people who choose as a Bradley-Terry model with T = 0.5
    assert fit_temperature(a - b, won) == pytest.approx(0.5, rel=0.1)
    with pytest.raises(QamroError, match="do not predict these labels"):
        fit_temperature(a - b, ~won)
    # the members' spread: sd_d = sqrt(sd_a^2 + sd_b^2), T = sd_d sqrt(3) / pi
    assert float(spread_temperature(0.3, 0.4, None)) == pytest.approx(0.5 * np.sqrt(3) / np.pi)
    assert float(spread_temperature(0.0, 0.0, 0.2)) == pytest.approx(
        np.sqrt(2) * 0.2 * np.sqrt(3) / np.pi)


def test_pair_figures_with_ties_apart():
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.5])
    winners = ["A", "A", "B", "B", "tie"]
    m = evaluate_pairs(p, winners, n_boot=200)
    assert m["decided"] == 4 and m["ties"] == {"count": 1, "mean_p_a_over_b": 0.5}
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["brier"] == pytest.approx(np.mean([0.01, 0.04, 0.09, 0.36]))
    # bins of 0.1: [0.9] -> |0.9-1|, [0.8] -> |0.8-1|, [0.3] -> 0.3, [0.6] -> 0.6; weights 1/4
    assert m["ece"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.6) / 4)
    for k in ("accuracy", "ece", "brier"):
        lo, hi = m[f"{k}_ci"]
        assert 0 <= lo <= m[k] <= hi <= 1


# -- pairs files ----------------------------------------------------------------------------
def test_pairs_files_in_the_published_field_names(tmp_path):
    """Field names as CMI-RewardBench's data files (Haiwen-Xia/CMI-RewardBench,
    inference_benchmark.py reads `audio-path`, `audio2`, `prompt`; evaluate_results.py reads
    `preference` as model_a / model_b / both) and Music Arena's battle records
    (gclef-cmu/music-arena music_arena/dataclass/arena.py: `uuid`, `prompt` {"prompt"},
    `a_audio_url`, `b_audio_url`, `vote` {"preference": A | B | TIE | BOTH_BAD}) name them."""
    (tmp_path / "clips").mkdir()
    lines = [
        {"id": "ours", "prompt": "calm piano", "audio_a": "clips/1.wav",
         "audio_b": "/abs/2.wav", "winner": "B"},
        {"prompt": "rock", "audio-path": "clips/3.wav", "audio2": "clips/4.wav",
         "preference": "model_a", "lyrics": "", "source": "cmi-arena-annotation"},
        {"prompt": "jazz", "audio-path": "clips/5.wav", "audio2": "clips/6.wav",
         "preference": "both"},
        {"uuid": "battle-7", "prompt": {"prompt": "lofi beat"}, "a_audio_url": "clips/7.mp3",
         "b_audio_url": "clips/8.mp3", "vote": {"preference": "BOTH_BAD"}},
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    pairs = read_pairs(f, labelled=True)
    assert [p.id for p in pairs] == ["ours", "2", "3", "battle-7"]
    assert [p.winner for p in pairs] == ["B", "A", "tie", "tie"]
    assert [p.prompt for p in pairs] == ["calm piano", "rock", "jazz", "lofi beat"]
    assert pairs[0].audio_a == tmp_path / "clips" / "1.wav"
    assert str(pairs[0].audio_b) == "/abs/2.wav"
    f.write_text(json.dumps({"id": 1, "audio_a": "a.wav", "audio_b": "b.wav"}) + "\n")
    assert read_pairs(f)[0].winner is None
    with pytest.raises(DataError, match="item 1: no winner"):
        read_pairs(f, labelled=True)
    for bad, msg in [({"id": 1, "audio_a": "a.wav"}, "item 1: no audio_b"),
                     ({"audio_a": "https://x.org/a.mp3", "audio_b": "b.wav"}, "is a URL"),
                     ({"audio_a": "a", "audio_b": "b", "winner": "C"}, "'C' is not a winner")]:
        f.write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=msg) as err:
            read_pairs(f)
        assert str(f) in str(err.value) and "\n" not in str(err.value)


# -- prefer, calibration and evaluation on the demo corpus ----------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A two-seed run on the demo corpus (melstats) and labelled pairs of its dev clips: two
    systems' clips of one prompt, the winner the one with the higher overall MOS."""
    root = tmp_path_factory.mktemp("demo")
    recs, _, run = small_demo_run(root, "--max-epochs", "30", "--seeds", "2", "--quiet")
    by_prompt: dict[str, list] = {}
    for c in recs.clips:
        by_prompt.setdefault(c.id.split("_")[-1], []).append(c)
    pairs = []
    for prompt, cs in sorted(by_prompt.items()):
        for a, b in combinations(cs, 2):
            winner = "tie" if a.labels[0] == b.labels[0] else "A" if a.labels[0] > b.labels[0] \
                else "B"
            pairs.append({"id": f"{a.id}-{b.id}", "prompt": a.text,
                          "audio_a": os.path.relpath(a.path, root),
                          "audio_b": os.path.relpath(b.path, root), "winner": winner})
    labelled = root / "pairs.jsonl"
    labelled.write_text("".join(json.dumps(p) + "\n" for p in pairs[::2]))
    held_out = root / "held-out.jsonl"
    held_out.write_text("".join(json.dumps(p) + "\n" for p in pairs[1::2]))
    return root, run, labelled, held_out


def test_prefer_answers_agree_with_the_scores_and_calibration_is_recorded(demo, tmp_path):
    import shutil

    root, run0, labelled, held_out = demo
    run = tmp_path / "run"
    shutil.copytree(run0, run)  # this test records a calibration in it
    out = tmp_path / "prefs.jsonl"
    r = invoke("prefer", run, held_out, "--out", out)
    assert r.exit_code == 0, r.output
    assert "uncalibrated: temperature from the members' spread" in r.output
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    n = len(held_out.read_text().splitlines())
    assert len(answers) == n and f"answered {n} pair(s), 0 failed" in r.output
    for a in answers:
        assert a["preferred"] == ("A" if a["overall_a"] > a["overall_b"] else "B")
        for h in ("overall", "textual"):
            assert 0 <= a[f"p_{h}"] <= 1
            assert (a[f"p_{h}"] > 0.5) == (a[f"{h}_a"] > a[f"{h}_b"])
    assert not (run / "preference.json").exists()
    # calibration on other labelled pairs: fitted, recorded, then used
    out2 = tmp_path / "prefs2.jsonl"
    r = invoke("prefer", run, held_out, "--calibrate", labelled, "--out", out2)
    assert r.exit_code == 0, r.output
    assert "temperature fitted on" in r.output
    record = json.loads((run / "preference.json").read_text())["by_members"]["all"]
    assert record["file"] == "pairs.jsonl" and record["pairs"] > 10
    temps = record["temperature"]
    assert set(temps) == {"overall", "textual"} and all(t > 0 for t in temps.values())
    again = [json.loads(line) for line in out2.read_text().splitlines()]
    for a in again:
        assert a["calibration"].startswith("temperature fitted on")
        d = a["overall_a"] - a["overall_b"]
        assert a["p_overall"] == pytest.approx(1 / (1 + np.exp(-d / temps["overall"])))
    # the Python face answers the same
    from qamro_pipe import Scorer

    scorer = Scorer.load(run, device="cpu")
    first = json.loads(held_out.read_text().splitlines()[0])
    got = scorer.prefer(root / first["audio_a"], root / first["audio_b"], text=first["prompt"])
    swapped = scorer.prefer(root / first["audio_b"], root / first["audio_a"],
                            text=first["prompt"])
    assert got[0]["p_overall"] == pytest.approx(again[0]["p_overall"], abs=1e-6)
    assert got[0]["p_overall"] + swapped[0]["p_overall"] == pytest.approx(1.0)
    # an export of the calibrated run carries its temperature
    r = invoke("export", run, tmp_path / "model")
    assert r.exit_code == 0, r.output
    exported = Scorer.load(tmp_path / "model", device="cpu")
    assert exported.prefer(root / first["audio_a"], root / first["audio_b"],
                           text=first["prompt"]) == got
    # refusals before any work
    r = invoke("prefer", run, held_out, "--out", out2)
    assert r.exit_code == 1 and "pass --force" in r.output
    r = invoke("prefer", run, held_out, "--calibrate", tmp_path / "nope.jsonl")
    assert r.exit_code == 1 and "no such pairs file" in r.output


def test_evaluate_pairs_writes_figures_and_a_reliability_diagram(demo, tmp_path):
    root, run, labelled, held_out = demo
    r = invoke("evaluate", run, "--pairs", held_out)
    assert r.exit_code == 0, r.output
    folder = next((run / "evaluations").glob("pairs-held-out-*"))
    m = json.loads((folder / "metrics.json").read_text())
    answers = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
    decided = [a for a in answers if a["winner"] != "tie"]
    for h in ("overall", "textual"):
        f = m["heads"][h]
        assert f["decided"] == len(decided) and f["ties"]["count"] == len(answers) - len(decided)
        right = np.mean([(a[f"p_{h}"] >= 0.5) == (a["winner"] == "A") for a in decided])
        assert f["accuracy"] == pytest.approx(right)
        assert f["brier"] == pytest.approx(np.mean([(a[f"p_{h}"] - (a["winner"] == "A")) ** 2
                                                    for a in decided]))
        assert 0 <= f["ece"] <= 1 and f["accuracy_ci"][0] <= f["accuracy"]
        png = folder / f["picture"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m["heads"]["overall"]["accuracy"] > 0.6  # the demo's planted quality is learnt
    assert f"accuracy {m['heads']['overall']['accuracy']:.3f}" in r.output
    r = invoke("evaluate", run, "--pairs", held_out, "--split", "dev")
    assert r.exit_code == 1 and "do not apply" in r.output


# -- CMI-RewardBench --------------------------------------------------------------------------
@dataclass
class BenchmarkBatchInput:
    """The harness's input record, as Haiwen-Xia/CMI-RewardBench core/model_abc.py defines
    it (audio: a path, or a waveform tensor at the model's `sr` where the file is missing)."""
    audio: Any
    text: str = ""
    lyrics: str = ""
    ref_audio: Optional[Any] = None

    def to_dict(self):
        return {"audio": self.audio, "text": self.text, "lyrics": self.lyrics,
                "ref_audio": self.ref_audio}


def test_cmi_rewardbench_adapter_called_as_its_harness_calls_a_model(demo):
    """inference_benchmark.py: _load_custom_model_class checks `sr` and a callable
    `score_batch`; _build_model calls CLASS(checkpoint=..., device=...); _predict_side sends
    a batch and reads scores[j, 0] (alignment) and scores[j, 1] (musicality)."""
    import importlib

    import torch

    from qamro_pipe import Scorer

    root, run, _, held_out = demo
    module, name = "qamro_pipe.cmi_rewardbench:QamroRewardModel".rsplit(":", 1)
    cls = getattr(importlib.import_module(module), name)
    assert hasattr(cls, "sr") and callable(getattr(cls, "score_batch", None))
    model = cls(**{"checkpoint": str(run), "device": "cpu"})
    first = json.loads(held_out.read_text().splitlines()[0])
    inputs = [BenchmarkBatchInput(audio=str(root / first["audio_a"]), text=first["prompt"]),
              BenchmarkBatchInput(audio=str(root / first["audio_b"]), text=first["prompt"]),
              BenchmarkBatchInput(audio=torch.zeros(model.sr), text="missing file")]
    scores = model.score_batch(inputs=inputs, batch_size=len(inputs), max_dur=120.0)
    assert isinstance(scores, np.ndarray) and scores.shape == (3, 2)
    want = Scorer.load(run, device="cpu").score([root / first["audio_a"],
                                                 root / first["audio_b"]], text=first["prompt"])
    for j in range(2):
        assert float(scores[j, 0]) == pytest.approx(want[j]["textual"], abs=1e-6)
        assert float(scores[j, 1]) == pytest.approx(want[j]["overall"], abs=1e-6)
    assert np.isfinite(scores[2]).all()  # silence is scored, as predict scores it
    cut = model.score_batch(inputs=inputs[:1], batch_size=1, max_dur=1.0)
    assert cut[0, 1] != pytest.approx(scores[0, 1], abs=1e-9)  # only the first second
