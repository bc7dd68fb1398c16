"""Track 2: layer-weighted heads on per-window features. (The release heads against the
original model: tests/extract/test_publisher_input.py.)"""
import csv
import json

import torch
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.store import read_cache
from qamro_pipe.train.aes_release import AXES
from qamro_pipe.train.runs import summarise
from qamro_pipe.train.trainer import train

from kit.caches import INFORMATIVE_LAYER, per_layer_cache, small_recipe


def test_layer_weighted_heads_learn_from_windows(tmp_path):
    cache = read_cache(per_layer_cache(tmp_path / "c.h5"))
    recipe = small_recipe(tmp_path)
    cfg = TrainConfig(max_epochs=300, batch_size=64, lr=0.01, bootstrap=0)
    res = train(cache, recipe.heads, [Member(LossConfig(regression="mse+mae"), 0)], cfg,
                label_range=(1.0, 10.0))
    assert res.predictions["PQ"].shape == (1, len(cache.ids))  # one score per clip
    m = summarise(cache, res, cfg)
    for axis in AXES:
        assert m["heads"][axis]["system"]["srcc"] > 0.9, axis
    # standardisation: stored stats are the train labels' mean and std
    mean, std = res.label_stats["PQ"]
    assert 4 < mean < 7 and std > 1
    # the learned softmax weights favour the informative layer
    w = torch.softmax(res.states["PQ"][0]["layer_weights"], -1)
    assert int(w.argmax()) == INFORMATIVE_LAYER


def test_train_cli_on_window_cache_and_clip_predictions(tmp_path):
    p = per_layer_cache(tmp_path / "c.h5")
    small_recipe(tmp_path)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--recipe", str(tmp_path / "aes-small.toml"),
                                 "--cache", str(p), "--out", str(out), "--max-epochs", "20",
                                 "--batch-size", "64"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 160 and {"pred_PQ", "pred_CU"} <= set(rows[0])
    config = json.loads((out / "config.json").read_text())
    assert set(config["label_stats"]) == set(AXES)
