"""The linear-probe row: sklearn's RidgeCV on the heads' own cached features."""
import csv
import json

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qamro_pipe.config import PROBE_ALPHAS
from qamro_pipe.experiments.tables import run_table
from qamro_pipe.store import read_cache, write_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.probe import PROBE_ROW, clip_features, probe, probe_metrics, train_rows
from qamro_pipe.train.recipes import load_recipe

from kit.caches import make_synthetic_cache, per_layer_cache, small_recipe

HEAD = (HeadSpec("score", "score", ("audio",)),)


def planted_linear_cache(path, n=300, dim=24, seed=0):
    """Labels a linear function of the features plus a little noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)) * rng.uniform(0.1, 10, dim)  # dims of very unequal scale
    w = rng.normal(size=dim) / np.sqrt(dim)
    y = 3 + x / x.std(0) @ w * 0.5 + rng.normal(0, 0.05, n)
    return write_cache(path, ids=[f"c{i}" for i in range(n)],
                       systems=np.repeat([f"s{i}" for i in range(15)], n // 15),
                       splits=np.where(np.arange(n) % 4 == 0, "dev", "train"),
                       labels=y[:, None].astype(np.float32), label_names=["score"],
                       features={"audio": x.astype(np.float32)}, backbone="planted@1",
                       dataset="planted")


def test_probe_on_planted_linear_data_equals_ridgecv_called_directly(tmp_path):
    cache = read_cache(planted_linear_cache(tmp_path / "p.h5"))
    fitted = probe(cache, HEAD, train_rows(cache))
    x, y = cache.features["audio"], cache.labels[:, 0].astype(np.float64)
    tr, dev = cache.rows("train"), cache.rows("dev")
    direct = make_pipeline(StandardScaler(), RidgeCV(alphas=PROBE_ALPHAS)).fit(x[tr], y[tr])
    assert np.allclose(fitted["predictions"]["score"][dev], direct.predict(x[dev]), atol=1e-9)
    assert fitted["alpha"]["score"] == direct[-1].alpha_
    assert stats.spearmanr(fitted["predictions"]["score"][dev], y[dev])[0] > 0.97
    m = probe_metrics(cache, HEAD, fitted, dev, n_boot=0)
    assert m["score"]["utterance"]["srcc"] > 0.97 and m["score"]["utterance"]["n"] == len(dev)
    assert fitted["seconds"] < 30


def test_window_features_average_to_the_heads_inference_rule(tmp_path):
    """Per-window layers: a clip's row is its windows' length-weighted mean, flattened over
    layers; the probe's clip score then equals the length-weighted mean of its windows'
    scores, which is how the heads score a clip."""
    cache = read_cache(per_layer_cache(tmp_path / "w.h5"))
    head = small_recipe(tmp_path).heads[0]
    x = clip_features(cache, head)
    offsets, w = cache.window_offsets, cache.window_weight.astype(np.float64)
    layers = cache.windows["layers"].reshape(len(w), -1)
    for i in (0, 7, len(cache.ids) - 1):
        win = slice(offsets[i], offsets[i + 1])
        assert np.allclose(x[i], (layers[win] * w[win, None]).sum(0) / w[win].sum(), atol=1e-5)
    fitted = probe(cache, (head,), train_rows(cache))
    col = cache.label_names.index(head.label)
    direct = make_pipeline(StandardScaler(), RidgeCV(alphas=PROBE_ALPHAS)).fit(
        x[train_rows(cache)], cache.labels[train_rows(cache), col])
    window_scores = direct.predict(layers)
    for i in (0, 7, len(cache.ids) - 1):
        win = slice(offsets[i], offsets[i + 1])
        rule = (window_scores[win] * w[win]).sum() / w[win].sum()
        assert fitted["predictions"][head.name][i] == pytest.approx(rule, abs=1e-6)
    dev = cache.rows("dev")  # 13 x 16 features from ~120 clips: the planted unit still shows
    assert stats.spearmanr(fitted["predictions"][head.name][dev], cache.labels[dev, col])[0] > 0.5


def test_every_table_gets_the_probe_row_first(tmp_path):
    """table1 on the planted MusicEval-shaped cache: the probe row leads table.csv, its
    figures are the probe's own on the eval split, and probe.json says how it was fitted.
    Fails without the change: no such row."""
    cache = make_synthetic_cache(tmp_path / "s.h5")
    res = run_table("table1", "musiceval", cache=cache, seeds=1, out=tmp_path / "t",
                    train={"max_epochs": 3, "batch_size": 64})
    rows = list(csv.reader(open(res.folder / "table.csv")))
    assert rows[1][0] == f"{PROBE_ROW} (n=1)"
    assert [r[0].rsplit(" (n=", 1)[0] for r in rows[2:6]] == [
        "baseline (Huber only)", "QAMRO", "w/o quality-aware weighting", "w/o adaptive margin"]
    data = read_cache(cache)
    heads = load_recipe("musiceval").heads
    direct = probe_metrics(data, heads, probe(data, heads, data.rows("train")),
                           data.rows("dev"), n_boot=0)
    header = rows[0]
    for h in ("overall", "textual"):
        for fig in ("mse", "lcc", "srcc", "ktau"):
            cell = rows[1][header.index(f"{h} {fig.upper()}")]
            assert float(cell) == pytest.approx(direct[h]["system"][fig], abs=5e-4)
    record = json.loads((res.folder / "probe.json").read_text())
    assert record["fits"][0]["fit_clips"] == len(data.rows("train"))
    assert set(record["fits"][0]["alpha"]) == {"overall", "textual"}
    assert PROBE_ROW in res.text and PROBE_ROW in (res.folder / "table.md").read_text()
