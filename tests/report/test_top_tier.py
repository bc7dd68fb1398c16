"""The top tier (issue 23): top-tier F1 at a threshold, the song-aesthetics challenge's "Top-
Tier Accuracy" (a clip or system is top tier when its label is at least the threshold; its
prediction is read by the same threshold; F1 of the top class, as the challenge's 2nd-placed
team computes it in Eps-Acoustic-Revolution-Lab/EAR_HEAR utils.py), and precision@k of the
system ranking: in metrics.json, on screen, in tables and in `evaluate`."""
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.metrics import evaluate, precision_at_k, top_tier_f1

from kit.caches import make_synthetic_cache


def f1_literal(true, pred, threshold):
    """Precision and recall of the top class, then their harmonic mean (float64)."""
    tp = fp = fn = 0
    for t, p in zip(true, pred):
        tt, pp = float(t) >= threshold, float(p) >= threshold
        tp += tt and pp
        fp += pp and not tt
        fn += tt and not pp
    if tp + fp + fn == 0:
        return None
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def p_at_k_literal(true, pred, k):
    """Walk the systems from the highest prediction down; count those whose true MOS is at
    least the k-th highest true MOS (a tie with it is top too)."""
    if len(true) <= k:
        return None
    kth = sorted(true, reverse=True)[k - 1]
    order = sorted(range(len(pred)), key=lambda i: (-pred[i], i))
    return sum(true[i] >= kth for i in order[:k]) / k


@pytest.mark.parametrize("seed", range(20))
def test_top_tier_f1_matches_the_literal_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    true = np.round(rng.uniform(1, 5, 40) * 5) / 5  # a 0.2 grid: labels tie with 4.0 itself
    pred = true + rng.normal(0, 0.6, 40)
    got, want = top_tier_f1(true, pred, 4.0), f1_literal(true, pred, 4.0)
    assert got == pytest.approx(want, abs=1e-12)
    if want is not None:
        assert got == pytest.approx(f1_score(true >= 4.0, pred >= 4.0), abs=1e-12)


def test_top_tier_edges():
    assert top_tier_f1([4.0, 3.0], [4.0, 3.9], 4.0) == 1.0  # at the threshold: top
    assert top_tier_f1([3.0, 3.5], [3.9, 3.0], 4.0) is None  # no top on either side: 0/0
    assert top_tier_f1([3.0, 3.5], [4.1, 3.0], 4.0) == 0.0  # a false alarm only
    assert top_tier_f1([4.5, 3.5], [3.0, 3.0], 4.0) == 0.0  # a miss only


@pytest.mark.parametrize("seed", range(20))
def test_precision_at_k_matches_the_literal(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 30))
    true = np.round(rng.uniform(1, 5, n), 1)  # ties at the k-th value happen
    pred = np.round(true + rng.normal(0, 0.5, n), 1)  # and ties in prediction
    for k in (1, 3, 5):
        assert precision_at_k(true, pred, k) == pytest.approx(
            p_at_k_literal(list(true), list(pred), k), abs=1e-12)
    assert precision_at_k(true, pred, n) is None
    assert precision_at_k(true, true, 3) == 1.0 and precision_at_k(true, -true, 1) == 0.0


def test_evaluate_reports_the_top_tier_at_both_levels():
    rng = np.random.default_rng(0)
    systems = np.repeat([f"S{i}" for i in range(8)], 10)
    true = np.repeat(np.linspace(2, 4.8, 8), 10) + rng.normal(0, 0.3, 80)
    pred = true + rng.normal(0, 0.4, 80)
    m = evaluate(true, pred, systems, n_boot=0, top_tier=4.0, top_k=3)
    assert m["utterance"]["top_f1"] == pytest.approx(f1_literal(true, pred, 4.0))
    st = np.array([true[systems == s].mean() for s in np.unique(systems)])
    sp = np.array([pred[systems == s].mean() for s in np.unique(systems)])
    assert m["system"]["top_f1"] == pytest.approx(f1_literal(st, sp, 4.0))
    assert m["system"]["p_at_k"] == pytest.approx(p_at_k_literal(list(st), list(sp), 3))
    assert (m["system"]["top_tier"], m["system"]["top_k"]) == (4.0, 3)
    one = evaluate(true, pred, np.full(80, "S0"), n_boot=0, top_tier=4.0, top_k=3)
    assert one["system"]["top_f1"] is None and one["system"]["p_at_k"] is None
    assert "top_f1" not in evaluate(true, pred, systems, n_boot=0)["utterance"]


def test_settings_are_checked():
    with pytest.raises(QamroError, match="--top-k 0: must be at least 1"):
        TrainConfig(top_k=0)
    with pytest.raises(QamroError, match="--top-tier nan: must be a finite number"):
        TrainConfig(top_tier=float("nan"))


def test_run_metrics_screen_and_evaluate(tmp_path):
    cache = make_synthetic_cache(tmp_path / "s.h5")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--cache", str(cache), "--out", str(out),
                                 "--max-epochs", "30", "--lr", "0.02", "--quiet",
                                 "--top-tier", "3.5", "--top-k", "4"])
    assert r.exit_code == 0, r.output
    assert "TOP-F1" in r.output and "P@K" in r.output
    metrics = json.loads((out / "metrics.json").read_text())
    sys_m = metrics["heads"]["overall"]["system"]
    assert sys_m["top_tier"] == 3.5 and sys_m["top_k"] == 4
    assert 0 <= sys_m["top_f1"] <= 1 and 0 <= sys_m["p_at_k"] <= 1
    assert 0 <= metrics["heads"]["overall"]["utterance"]["top_f1"] <= 1
    # evaluate re-reads the run's settings, or takes new ones
    r = CliRunner().invoke(app, ["evaluate", str(out)])
    assert r.exit_code == 0, r.output
    assert "TOP-F1" in r.output
    folder = next((out / "evaluations").iterdir())
    again = json.loads((folder / "metrics.json").read_text())["heads"]["overall"]["system"]
    assert again["top_tier"] == 3.5 and again["top_k"] == 4
    r = CliRunner().invoke(app, ["evaluate", str(out), "--top-tier", "1.0", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    moved = json.loads((folder / "metrics.json").read_text())["heads"]["overall"]["system"]
    assert moved["top_tier"] == 1.0 and moved["top_k"] == 2
    assert moved["top_f1"] == 1.0  # every system's mean is above 1: all top, all predicted
    r = CliRunner().invoke(app, ["evaluate", str(out), "--top-k", "0"])
    assert r.exit_code == 1 and "--top-k 0" in r.output and "Traceback" not in r.output
