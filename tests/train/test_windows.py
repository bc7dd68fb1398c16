"""Issue 19 A3: per-window features trained on one cached window per clip per epoch (the
published track 2 code, JethroWangSir/QAMRO track2/mos_track2.py, takes one random 10 s crop
of each clip per epoch), against every window as a row (long clips weigh by their length)."""
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

import qamro_pipe.train.engine as engine
import qamro_pipe.train.shuffle as shuffle
from qamro_pipe.cli import app
from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.store import read_cache, write_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.recipes import load_recipe
from qamro_pipe.train.state import TrainState
from qamro_pipe.train.trainer import Checkpoint, train

from kit.resume import Stop, assert_same_run, stop_at

HEAD = HeadSpec(name="q", label="q", features=("layers",), hidden=(16,), activation="gelu",
                layer_weights=True, standardize=True)
CFG = TrainConfig(max_epochs=3, batch_size=16, bootstrap=0, train_windows="one-per-clip",
                  eval_split="eval")


def windowed_cache(path, n_short=60, n_long=12, long_windows=18, seed=0):
    """train / eval clips, most of one window, a few long ones of many windows (full songs
    beside 10 s clips); per-window per-layer features [M, 13, 8] that follow the label."""
    rng = np.random.default_rng(seed)
    n = n_short + n_long
    counts = np.r_[np.ones(n_short, int), np.full(n_long, long_windows)]
    order = rng.permutation(n)  # long clips spread among the short ones
    counts = counts[order]
    quality = rng.uniform(1, 9, n)
    offsets = np.r_[0, np.cumsum(counts)]
    clip_of = np.repeat(np.arange(n), counts)
    layers = rng.normal(size=(offsets[-1], 13, 8)).astype(np.float32)
    layers[:, 5, 0] += (quality[clip_of] - 5) / 2
    splits = np.where(np.arange(n) < int(0.75 * n), "train", "eval")
    return write_cache(path, ids=[f"c{i:03d}" for i in range(n)], systems=[""] * n,
                       splits=splits, labels=quality[:, None].astype(np.float32),
                       label_names=["q"], features={}, backbone="aesthetics@2",
                       dataset="windows", config={"made_by": "tests"},
                       windows={"layers": layers}, window_offsets=offsets,
                       window_weight=np.ones(offsets[-1], np.float32))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return read_cache(windowed_cache(tmp_path_factory.mktemp("win") / "w.h5"))


def rows_seen(monkeypatch, cache, cfg, members):
    """Every batch's unit rows [K, b], by call: training steps and validation chunks."""
    seen = []
    real = engine.gather

    def spy(plan, idx):
        seen.append(idx.clone())
        return real(plan, idx)
    monkeypatch.setattr(engine, "gather", spy)
    train(cache, (HEAD,), members, cfg)
    return seen


def test_each_epoch_takes_one_window_of_each_training_clip(cache, monkeypatch):
    members = [Member(LossConfig(), 0), Member(LossConfig(), 1)]
    seen = rows_seen(monkeypatch, cache, CFG, members)
    clip_of = np.repeat(np.arange(len(cache.ids)), np.diff(cache.window_offsets))
    train_clips = np.flatnonzero(cache.splits == "train")
    n_val = max(1, round(0.1 * len(train_clips)))
    n_fit = len(train_clips) - n_val
    steps = -(-n_fit // CFG.batch_size)  # a batch counts clips
    val_chunks = -(-n_val // CFG.batch_size)
    assert len(seen) == CFG.max_epochs * (steps + val_chunks)
    per_epoch = steps + val_chunks
    draws = []
    for e in range(CFG.max_epochs):
        rows = np.concatenate([s.numpy() for s in seen[e * per_epoch:e * per_epoch + steps]],
                              axis=1)  # [K, n_fit]
        assert rows.shape == (2, n_fit)
        for k in range(2):
            clips = clip_of[rows[k]]
            assert len(set(clips)) == n_fit and set(clips) <= set(train_clips)
        val = [s.numpy() for s in seen[e * per_epoch + steps:(e + 1) * per_epoch]]
        val = np.concatenate(val)
        assert len(val) == n_val and len(set(clip_of[val])) == n_val  # one window per clip
        draws.append(np.sort(rows, axis=1))
    # the draws move from epoch to epoch and differ between members (own seeds)
    assert not np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0][0], draws[0][1])
    # validation is on the same windows every epoch
    assert all(np.array_equal(seen[steps].numpy(), seen[e * per_epoch + steps].numpy())
               for e in range(CFG.max_epochs))


def test_windows_are_drawn_uniformly_from_each_clip():
    import torch

    counts = torch.tensor([1, 2, 5, 18])
    seeds = torch.tensor([3, 4])
    got = torch.stack([shuffle.member_windows(seeds, e, counts) for e in range(4000)])
    assert (got >= 0).all() and (got < counts).all() and (got[..., 0] == 0).all()
    share = (got[:, 0, 3] == 7).float().mean().item()
    assert abs(share - 1 / 18) < 0.02
    # a seed is a member's own: the same seed draws the same, whichever members share the run
    assert torch.equal(shuffle.member_windows(seeds[1:], 9, counts)[0],
                       shuffle.member_windows(seeds, 9, counts)[1])


def test_all_windows_is_the_default_and_trains_every_window(cache, monkeypatch):
    seen = rows_seen(monkeypatch, cache, replace(CFG, train_windows="all", max_epochs=1),
                     [Member(LossConfig(), 0)])
    clip_of = np.repeat(np.arange(len(cache.ids)), np.diff(cache.window_offsets))
    rows = np.concatenate([s.numpy().ravel() for s in seen])
    train_clips = np.flatnonzero(cache.splits == "train")
    assert len(rows) == np.isin(clip_of, train_clips).sum()  # train + validation windows
    assert TrainConfig().train_windows == "all"


def test_resumed_one_window_run_equals_the_uninterrupted_one(cache, tmp_path):
    cfg = replace(CFG, max_epochs=6, patience=2, checkpoint_seconds=0.0)
    members = [Member(LossConfig(), 0), Member(LossConfig(kind="mr"), 1)]
    whole = train(cache, (HEAD,), members, cfg)
    ckpt = Checkpoint(tmp_path / "state.safetensors", "fp", every=0.0)
    with pytest.raises(Stop):
        train(cache, (HEAD,), members, cfg, progress=stop_at(3), checkpoint=ckpt)
    saved, _ = TrainState.load(ckpt.path)
    at = saved.epoch  # the resumed run moves the state on
    resumed = train(cache, (HEAD,), members, cfg, checkpoint=replace(ckpt, resume=saved))
    assert resumed.resumed_from == at > 0
    assert_same_run(resumed, whole)


def test_the_code_preset_takes_one_window_per_clip_and_the_help_says_what_a_batch_counts():
    assert load_recipe("aes-natural-code").train["train_windows"] == "one-per-clip"
    assert "train_windows" not in load_recipe("aes-natural-paper").train
    with pytest.raises(QamroError, match="train_windows"):
        TrainConfig(train_windows="some")
    out = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert "--train-windows" in out and "one-per-clip" in out
    assert "Rows per step" in out and "windows unless" in out
