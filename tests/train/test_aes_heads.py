"""Track 2: layer-weighted heads on per-window features, and the release heads' equivalence."""
import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.store import read_cache
from qamro_pipe.train.aes_release import AXES, clip_scores, release_heads
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


def test_release_heads_from_the_cache_equal_the_original_model(aes, tmp_path):
    """Random-weight AesMultiOutput (the session's `aes`: uneven layer weights) saved as a
    release checkpoint: our extraction + the release heads read off the model give
    AesPredictor's own scores for the same audio."""
    from audiobox_aesthetics.infer import AesPredictor

    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract.backbones import get_backbone
    from qamro_pipe.extract.backbones.aesthetics import RELEASE_HEAD_CFG
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.loop import extract

    bb = aes
    transform = {a: {"mean": 5.0 + i, "std": 1.5 + 0.1 * i} for i, a in enumerate(AXES)}
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model_cfg": RELEASE_HEAD_CFG, "target_transform": transform,
                "state_dict": {f"model.{k}": v for k, v in bb.model.state_dict().items()}}, ckpt)

    rng = np.random.default_rng(1)
    sr = 16000
    rows, wavs = [], []
    for i, seconds in enumerate((3.0, 10.0, 13.5)):
        t = np.arange(int(seconds * sr)) / sr
        x = (0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)
             + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
        sf.write(tmp_path / f"clip{i}.wav", x, sr, subtype="FLOAT")
        wavs.append(x)
        rows.append(f"clip{i},clip{i}.wav,s{i},5,5,5,5")
    manifest = tmp_path / "clips.csv"
    manifest.write_text("id,path,system,PQ,PC,CE,CU\n" + "\n".join(rows) + "\n")
    cache_path = tmp_path / "aes.h5"
    extract(load_dataset("manifest", manifest),
            ExtractConfig(backbone="aesthetics", checkpoint=str(ckpt), device="cpu", workers=0),
            cache_path, progress=False)

    loaded = get_backbone("aesthetics", checkpoint=str(ckpt))
    loaded.load()
    ours = clip_scores(read_cache(cache_path), *release_heads(loaded.model))
    predictor = AesPredictor(checkpoint_pth=str(ckpt), precision="32")
    theirs = predictor.forward([{"path": torch.from_numpy(x)[None], "sample_rate": sr}
                                for x in wavs])
    for i, scores in enumerate(theirs):
        for axis in AXES:
            assert ours[axis][i] == pytest.approx(scores[axis], abs=1e-5), (i, axis)
