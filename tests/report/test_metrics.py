import numpy as np
import pytest
from scipy import stats

from qamro_pipe.errors import QamroError
from qamro_pipe.metrics import bootstrap_ci, bootstrap_rows, evaluate, point_metrics


def test_vectorised_bootstrap_statistics_equal_scipy():
    rng = np.random.default_rng(0)
    true = np.round(rng.uniform(1, 5, 15), 1)
    pred = true + rng.normal(0, 0.5, 15)
    idx = rng.integers(0, 15, size=(40, 15))
    rows = bootstrap_rows(true, pred, idx)
    for r in range(40):
        a, b = true[idx[r]], pred[idx[r]]
        assert rows["lcc"][r] == pytest.approx(stats.pearsonr(a, b)[0])
        assert rows["srcc"][r] == pytest.approx(stats.spearmanr(a, b)[0])
        assert rows["ktau"][r] == pytest.approx(stats.kendalltau(a, b)[0])
        assert rows["mse"][r] == pytest.approx(np.mean((a - b) ** 2))


def test_ci_contains_point_and_is_ordered():
    rng = np.random.default_rng(1)
    true = rng.uniform(1, 5, 30)
    pred = true + rng.normal(0, 0.4, 30)
    ci = bootstrap_ci(true, pred, n_boot=500)
    point = point_metrics(true, pred)
    for fig in ("lcc", "srcc", "ktau", "mse"):
        lo, hi = ci[fig]
        assert lo <= point[fig] <= hi
        assert lo < hi


def test_system_level_uses_published_mos_and_means():
    systems = np.array(["A", "A", "B", "B", "C", "C"])
    true = np.array([1.0, 2.0, 3.0, 3.0, 4.0, 5.0])
    pred = np.array([1.5, 1.5, 3.2, 2.8, 4.0, 4.0])
    res = evaluate(true, pred, systems, n_boot=0)
    assert res["system"]["true_source"] == "mean label"
    assert res["system"]["mse"] == pytest.approx(np.mean([0, 0, 0.5 ** 2]))
    assert res["system"]["srcc"] == pytest.approx(1.0)
    published = {"A": 5.0, "B": 3.0, "C": 1.0}
    res = evaluate(true, pred, systems, published, n_boot=0)
    assert res["system"]["true_source"] == "published system MOS"
    assert res["system"]["srcc"] == pytest.approx(-1.0)


def test_fewer_than_two_systems_gives_utterance_level_and_says_why():
    """AES-Natural's lists and a manifest without a system column give every clip one
    system (""): utterance level is reported, system level is marked not computable."""
    true, pred = np.array([1.0, 2.0, 3.5]), np.array([1.2, 2.5, 3.0])
    for systems in (np.array(["A", "A", "A"]), np.array(["", "", ""])):
        res = evaluate(true, pred, systems, n_boot=10, what="x.h5")
        assert res["utterance"]["srcc"] == pytest.approx(1.0) and res["utterance"]["n"] == 3
        assert all(res["system"][f] is None for f in ("mse", "lcc", "srcc", "ktau"))
        assert "at least 2 systems" in res["system"]["not_computable"]
        assert res["system"]["n"] == 1
    two = evaluate(true, pred, np.array(["A", "A", "B"]), n_boot=10)
    assert "not_computable" not in two["system"] and two["system"]["mse"] is not None


def test_nan_predictions_never_reach_metrics():
    with pytest.raises(QamroError, match="NaN"):
        evaluate(np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, 3.0]),
                 np.array(["A", "B", "C"]), what="x.h5")


def test_clips_without_a_system_are_left_out_of_system_level_among_named_ones():
    """A pool of system-less clips and clips of systems (AES-Natural's train clips with its
    eval systems, under --cv): the system level is over the named systems only; "" is no
    system. Before, the system-less clips were averaged into a system named ""."""
    systems = np.array(["A", "A", "B", "B", "C", "C", "", "", ""])
    true = np.array([1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 1.0, 5.0, 3.0])
    pred = np.array([1.5, 1.5, 3.2, 2.8, 4.0, 4.0, 4.0, 1.0, 2.0])
    mixed = evaluate(true, pred, systems, n_boot=0)
    named = evaluate(true[:6], pred[:6], systems[:6], n_boot=0)
    assert mixed["system"]["n"] == 3 and mixed["system"]["clips_without_system"] == 3
    for fig in ("mse", "lcc", "srcc", "ktau"):
        assert mixed["system"][fig] == pytest.approx(named["system"][fig])
    assert mixed["utterance"]["n"] == 9  # utterance level keeps every clip
    one = evaluate(true[4:], pred[4:], systems[4:], n_boot=0)  # C and the unnamed: 1 system
    assert "not_computable" in one["system"] and one["system"]["n"] == 1
