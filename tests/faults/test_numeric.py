"""Issue 5.7: NaN or inf never reaches a metrics file. The store refuses non-finite features,
training stops a member whose loss is not finite, metrics refuse NaN predictions; end to end
through the command line."""
from __future__ import annotations

import csv
import json
import math

import h5py
import numpy as np
import pytest

from qamro_pipe.errors import CacheError, QamroError
from qamro_pipe.metrics import evaluate
from qamro_pipe.store.writer import CacheWriter, create_cache

from kit.caches import make_synthetic_cache


def _strict_json(path):
    def refuse(const):
        raise AssertionError(f"{path} holds {const}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _finite_cells(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k, v in row.items():
            if k.startswith("pred_"):
                assert math.isfinite(float(v)), (path, k, v)
    return rows


def test_non_finite_features_and_diverging_members_never_reach_metrics(tmp_path, tally):
    tally.fault = "inf feature in a cache; members diverging (--lr 1e6, alpha 1e38)"
    bad = make_synthetic_cache(tmp_path / "bad.h5")
    with h5py.File(bad, "r+", locking=False) as f:
        f["features/audio"][3, 5] = np.inf
    good = make_synthetic_cache(tmp_path / "good.h5")
    fast = ["--max-epochs", "30"]
    # in this process (kit.cli): what the console script says, without three processes
    # importing torch; the process is not the point here
    runs = {
        "inf": tally.invoke(["train", "--cache", bad, "--out", tmp_path / "inf", *fast]),
        "lr": tally.invoke(["train", "--cache", good, "--out", tmp_path / "lr", "--lr", "1e6",
                            "--seeds", "2", *fast]),
        "alpha": tally.invoke(["sweep", "--cache", good, "--out", tmp_path / "alpha",
                               "--alpha", "0.2,1e38", *fast]),
    }
    c = runs["inf"]
    assert c.finish() == 1 and "Traceback" not in c.stderr
    assert c.stderr.strip() == (f"error: {bad}: features/audio has NaN or inf in 1 rows "
                                f"(first: clip0003)")
    assert not (tmp_path / "inf").exists()

    c = runs["lr"]  # every member blows up after epoch 1: stopped, best weights kept
    assert c.finish() == 0, c.stderr
    assert "loss became NaN or inf" in c.stderr
    metrics = _strict_json(tmp_path / "lr" / "metrics.json")
    assert all("warning" in m or "failed" in m for m in metrics["members"])
    _finite_cells(tmp_path / "lr" / "predictions.csv")

    c = runs["alpha"]  # one member's loss is inf from the start: it fails, the other is fine
    assert c.finish() == 0, c.stderr
    metrics = _strict_json(tmp_path / "alpha" / "metrics.json")
    failed = [m for m in metrics["members"] if "failed" in m]
    assert len(failed) == 1 and "no model kept" in failed[0]["failed"]
    assert metrics["heads"]["overall"]["system"]["srcc"] is not None
    _finite_cells(tmp_path / "alpha" / "predictions.csv")
    assert "nan" not in (tmp_path / "alpha" / "sweep.csv").read_text().lower().replace(
        "nan or inf", "")


def test_store_and_metrics_refuse_non_finite_values(tmp_path, tally):
    tally.fault = "store and metrics given NaN/inf (float16 overflow included)"
    tally.in_process, tally.runs = True, 3
    with pytest.raises(CacheError, match="refusing to store NaN or inf in features/audio "
                                         "for clip 'clip0007'"):
        make_synthetic_cache(tmp_path / "nan.h5", features={
            "audio": np.where(np.arange(240)[:, None] == 7, np.nan, 1.0).astype(np.float32)
            * np.ones((1, 4), np.float32)})
    assert not (tmp_path / "nan.h5").exists()
    create_cache(tmp_path / "h.h5", ids=["a", "b"], systems=["s", "t"], splits=["train"] * 2,
                 labels=np.ones((2, 1)), label_names=["q"], backbone="b@1", dataset="d",
                 config={}, feature_shapes={"audio": (2,)}, feature_dtype="float16")
    with CacheWriter(tmp_path / "h.h5") as w:
        with pytest.raises(CacheError, match="clip 'b' \\(as float16\\)"):
            w.write([0, 1], {"audio": np.array([[1.0, 2.0], [1e5, 0.0]], np.float32)})
        assert not w.done.any()
    with pytest.raises(QamroError, match="predictions contain NaN or inf; not writing"):
        evaluate(np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, 2.0]),
                 np.array(["a", "b", "c"]), what="x")
