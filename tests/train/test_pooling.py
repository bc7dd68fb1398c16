"""Attention pooling over a clip's windows (--pool attention, issue 23 item 4): the pooled
prediction and its gradient against a literal window-by-window float64 transcription
(losses_reference.attention_pool_literal; ragged batches, padding, NaN and tied labels),
the zero query equal to the length-weighted mean, members of both pools independent in one
run, resume equal to a whole run, what it learns on a planted cache, evaluate equal to
training, and the refusals."""
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.experiments.naming import loss_part
from qamro_pipe.loss_kinds import member_label
from qamro_pipe.store import read_cache
from qamro_pipe.train.engine import forward
from qamro_pipe.train.heads import POOL_QUERY, BatchedMLP, HeadSpec
from qamro_pipe.train.inputs import Units, predict_units, units_for
from qamro_pipe.train.losses_reference import attention_pool_literal, qamro_loss_literal
from qamro_pipe.train.pooling import WindowIndex, pool, pooled_clips
from qamro_pipe.train.trainer import train

from kit.caches import make_synthetic_cache, pooled_cache
from kit.resume import stopped_then_resumed

HEADS = (HeadSpec("overall", "overall", ("emb",), hidden=(16, 8)),)
CFG = TrainConfig(max_epochs=30, patience=8, lr=0.02, bootstrap=0, checkpoint_seconds=0.0,
                  batch_size=32)
MEAN, ATT = LossConfig(), LossConfig(pool="attention")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return read_cache(pooled_cache(tmp_path_factory.mktemp("pool") / "p.h5"))


def _index(counts, lengths):
    off = np.concatenate([[0], np.cumsum(counts)])
    return WindowIndex(torch.from_numpy(off[:-1]), torch.from_numpy(np.asarray(counts)),
                       torch.log(torch.tensor(lengths, dtype=torch.float64)))


def test_expand_lists_each_members_windows_in_clip_order():
    counts = [2, 1, 3, 1]
    ix = _index(counts, [1.0] * 7)
    idx = torch.tensor([[2, 0], [1, 3]])
    rows, slot, valid = ix.expand(idx)
    assert rows.shape == (2, 5)  # the longest member's 3 + 2 windows
    assert rows[0].tolist() == [3, 4, 5, 0, 1] and slot[0].tolist() == [0, 0, 0, 1, 1]
    assert valid[0].all()
    assert rows[1, :2].tolist() == [2, 6] and slot[1, :2].tolist() == [0, 1]
    assert valid[1].tolist() == [True, True, False, False, False]
    rows1, slot1, valid1 = ix.expand(torch.tensor([3, 2]))  # validation: one list for all
    assert rows1.tolist() == [6, 3, 4, 5] and slot1.tolist() == [0, 1, 1, 1] and valid1.all()


def test_pooled_loss_equals_a_literal_transcription_in_value_and_gradient():
    """The engine's forward (expand, gather, the head, pool) in float64 against the same
    head run window by window and pooled by the literal softmax, under QAMRO + Huber over
    the pooled clip predictions with tied and NaN labels; gradients of every parameter,
    the query included."""
    rng = np.random.default_rng(3)
    counts = [1, 3, 2, 4, 1, 2]
    lengths = rng.uniform(0.2, 1.0, sum(counts)).tolist()
    x = torch.from_numpy(rng.normal(size=(sum(counts), 5)))
    model = BatchedMLP([0, 1], 5, (6, 4), pools=True).double()
    with torch.no_grad():
        model.named_views()[POOL_QUERY].normal_()  # a query away from 0
    ix = _index(counts, lengths)
    ctx = SimpleNamespace(windows=ix, heads=(HeadSpec("h", "h", ("x",)),),
                          plan={("x",): (x, ("x",), 5)})
    idx = torch.tensor([[0, 3, 1, 5, 2], [4, 2, 2, 0, 1]])  # a clip twice: ties
    y = torch.tensor([[3.0, 4.2, float("nan"), 3.0, 1.8], [2.0, 2.0, 2.0, 4.6, 1.0]],
                     dtype=torch.float64)
    huber = torch.nn.HuberLoss()

    def objective(pooled):
        out = 0.0
        for k in range(2):
            known = torch.isfinite(y[k])
            out = out + huber(pooled[k][known], y[k][known]) \
                + qamro_loss_literal(pooled[k][known], y[k][known])
        return out

    views = {"h": model.views()}
    fast = objective(forward(ctx, {"h": model}, idx, views)[0][0])
    g_fast = torch.autograd.grad(fast, views["h"])

    views = model.views()
    off = np.concatenate([[0], np.cumsum(counts)])
    pooled = []
    for k in range(2):
        row = []
        for c in idx[k].tolist():
            p, _, s = model(x[off[c]:off[c + 1]], views, scores=True)
            row.append(attention_pool_literal(p[k], s[k], lengths[off[c]:off[c + 1]]))
        pooled.append(torch.stack(row))
    slow = objective(torch.stack(pooled))
    g_slow = torch.autograd.grad(slow, views)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-12)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_fast[-1].abs().sum() > 0  # the query learns


def test_a_zero_query_is_the_length_weighted_mean():
    rng = np.random.default_rng(0)
    counts = np.array([1, 3, 0, 2])
    weight = rng.uniform(0.2, 1.0, counts.sum())
    units = Units(4, np.repeat(np.arange(4), counts), weight)
    p = rng.normal(size=(2, counts.sum()))
    got = pooled_clips(p, np.zeros_like(p), units.clip_of, weight, 4)
    want = units.to_clips(p)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isnan(got[:, 2]).all()  # a clip without windows, as to_clips gives it
    # and a large score puts the weight on its window
    s = np.zeros_like(p)
    s[:, 1] = 50.0
    assert pooled_clips(p, s, units.clip_of, weight, 4)[:, 1] == pytest.approx(p[:, 1])
    assert math.isclose(float(pool(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2),
                                   torch.log(torch.tensor([1.0, 3.0])),
                                   torch.tensor([0, 0]), None, 1)), 2.5)


def test_members_of_both_pools_are_independent_in_one_run(cache):
    members = [Member(MEAN, 0), Member(ATT, 0), Member(ATT, 1)]
    both = train(cache, HEADS, members, CFG)
    for i, m in enumerate(members):
        alone = train(cache, HEADS, [m], CFG)
        # equal to float32 rounding: the members' batches pad to the longest member's
        # windows, and a matmul of another shape rounds differently (members of one pool
        # already differ so when trained together or alone: test_system_level's 1e-5)
        assert both.best_epoch[i] == alone.best_epoch[0]
        np.testing.assert_allclose(both.predictions["overall"][i],
                                   alone.predictions["overall"][0], atol=1e-5)
        for name, t in alone.states["overall"][0].items():
            torch.testing.assert_close(both.states["overall"][i][name], t, rtol=0, atol=1e-5)
    # the mean member is the run without attention members, weights and all: its query
    # stays 0 and every other number is as before
    assert both.states["overall"][0]["pool.query"].abs().sum() == 0
    assert both.states["overall"][1]["pool.query"].abs().sum() > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_equals_an_uninterrupted_run(cache, tmp_path, optimizer):
    """Both pools' engines over one saved state; AdamW's step count (its bias correction)
    is each engine's own, from the epoch."""
    members = [Member(MEAN, 0), Member(ATT, 0)]
    cfg = replace(CFG, optimizer=optimizer, lr=0.02 if optimizer == "sgd" else 0.005)
    whole, saved_at, resumed = stopped_then_resumed(cache, HEADS, members, cfg,
                                                    tmp_path / "state.pt")
    assert 0 < saved_at < whole.epochs_run
    np.testing.assert_array_equal(whole.predictions["overall"], resumed.predictions["overall"])
    assert whole.best_epoch == resumed.best_epoch


def test_attention_finds_the_marked_window(cache):
    """On the planted cache the marked window holds the clip's quality: pooled by
    attention the clips' predictions are closer to their labels than the mean's, and the
    learned weights favour the marked windows."""
    cfg = TrainConfig(max_epochs=150, patience=30, lr=0.02, bootstrap=0, batch_size=32)
    res = train(cache, HEADS, [Member(MEAN, 0), Member(ATT, 0)], cfg)
    ev = res.split.eval
    y = cache.labels[ev, 0]
    mse = [float(np.mean((res.predictions["overall"][k][ev] - y) ** 2)) for k in range(2)]
    print("eval MSE mean, attention", mse)
    assert mse[1] < 0.5 * mse[0], mse
    # the attention weights of the trained member on the eval clips
    model = BatchedMLP([0], 8, (16, 8), pools=True)
    model.load_member(0, res.states["overall"][1])
    units = units_for(cache, HEADS, "attention")
    p, s = predict_units(model, torch.from_numpy(cache.windows["emb"]), scores=True)
    logit = s[0] + np.log(units.weight)
    marked = cache.windows["emb"][:, 1] > 0
    share = []
    for c in ev:
        rows = np.flatnonzero(units.clip_of == c)
        if len(rows) > 1:
            w = np.exp(logit[rows] - logit[rows].max())
            share.append(float((w / w.sum())[marked[rows]].sum()))
    print("attention share of the marked windows", np.mean(share))
    assert np.mean(share) > 0.8, np.mean(share)


def test_evaluate_scores_a_run_as_training_did(tmp_path):
    """The run folder's heads, read back by evaluate's TrainedRun, give every member the
    predictions training wrote for it (predictions.csv), each by its own pool, on a cache
    that keeps both the pooled rows and the windows (as extract --keep-windows writes)."""
    import csv

    from qamro_pipe.experiments.run import run_experiment
    from qamro_pipe.report.evaluate import TrainedRun
    from qamro_pipe.train.recipes import load_recipe

    path = pooled_cache(tmp_path / "kept.h5", keep_clip_rows=True)
    recipe = tmp_path / "pooled.toml"
    recipe.write_text('name = "pooled"\ndataset = "pooled"\nbackbone = "synthetic-windows"\n'
                      '[[heads]]\nname = "overall"\nlabel = "overall"\nfeatures = ["emb"]\n'
                      'hidden = [16, 8]\n')
    out = tmp_path / "run"
    run_experiment(load_recipe(recipe), [Member(MEAN, 0), Member(ATT, 0)], CFG, cache=path,
                   out=out)
    data = read_cache(path)
    got = TrainedRun(out).predict(data)["overall"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    at = {c: i for i, c in enumerate(data.ids)}
    idx = [at[r["id"]] for r in rows]
    for k in range(2):
        written = np.array([float(r[f"pred_overall_m{k}"]) for r in rows])
        np.testing.assert_allclose(got[k][idx], written, atol=1e-5)
    # the mean member read the pooled rows, the attention member the windows: they differ
    assert np.abs(got[0] - got[1]).max() > 1e-3
    mean_only = units_for(data, HEADS, "mean")
    assert mean_only.clip_of is None  # the pooled row, as before --keep-windows


def test_refusals(tmp_path):
    with pytest.raises(QamroError, match="gaussian-kl"):
        LossConfig(kind="gaussian-kl", pool="attention")
    with pytest.raises(QamroError, match="unknown pool"):
        LossConfig(pool="max")
    clip_only = read_cache(make_synthetic_cache(tmp_path / "c.h5"))
    with pytest.raises(QamroError, match="--keep-windows"):
        train(clip_only, (HeadSpec("overall", "overall", ("audio",)),), [Member(ATT, 0)], CFG)


def test_names_say_the_pool():
    assert member_label(ATT, 0) == "qamro a=0.2 b=7 pool=attention seed=0"
    assert "pool-attention" in loss_part([Member(MEAN, 0), Member(ATT, 0)], LossConfig())


def test_attention_mixes_with_the_other_member_settings(cache):
    """Attention members beside a gaussian-kl member (which pools by the mean), with
    learned term weights, the system term, system batches and a listwise kind: every member
    trains and scores every clip; the learned weights move (their log-variances are found
    by name, not by place: the query follows them in the layout)."""
    members = [Member(LossConfig(kind="gaussian-kl"), 0),
               Member(LossConfig(pool="attention", loss_weighting="uncertainty"), 0),
               Member(LossConfig(pool="attention", system_weight=0.5, batch_by="system"), 0),
               Member(LossConfig(pool="attention", kind="listmle"), 0)]
    res = train(cache, HEADS, members, CFG, label_range=(1.0, 5.0))
    assert not res.failures
    assert np.isfinite(res.predictions["overall"][:, res.split.eval]).all()
    hist = res.history[res.history[:, 0] == 1]  # member 1's rows: member, epoch, ...
    assert not np.allclose(hist[-1, -2:], 1.0)  # weight_reg, weight_rank moved from 1
    assert np.allclose(res.history[res.history[:, 0] == 2][:, -2:], 1.0)  # fixed: 1


def test_preference_pairs_train_attention_members(cache, tmp_path):
    """A pair orders clips: a mean member on windows is refused it, an attention member
    (clips, its windows pooled) trains on it; the term moves its numbers."""
    import json

    rng = np.random.default_rng(0)
    ids = list(cache.ids)
    label = dict(zip(ids, cache.labels[:, 0]))
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for _ in range(300):
            a, b = rng.choice(ids, 2, replace=False)  # the file stem is the clip id
            f.write(json.dumps({"audio_a": f"{a}.wav", "audio_b": f"{b}.wav",
                                "winner": "A" if label[a] >= label[b] else "B"}) + "\n")
    cfg = TrainConfig(max_epochs=10, patience=5, lr=0.02, bootstrap=0, batch_size=32,
                      pairs=str(pairs))
    res = train(cache, HEADS, [Member(LossConfig(pool="attention", pair_weight=1.0), 0),
                               Member(ATT, 0)], cfg)
    assert not res.failures
    assert np.abs(res.predictions["overall"][0] - res.predictions["overall"][1]).max() > 1e-3
    with pytest.raises(QamroError, match="with --pool attention"):
        train(cache, HEADS, [Member(LossConfig(pair_weight=1.0), 0)], cfg)


def test_attention_over_per_layer_windows(tmp_path):
    """Audiobox-Aesthetics-shaped caches ([windows, 13 layers, D], the AES heads' layer
    weights, LayerNorm, GELU, standardised labels): attention members train beside mean
    members, and score every clip as they would alone."""
    from kit.caches import per_layer_cache, small_recipe

    data = read_cache(per_layer_cache(tmp_path / "layers.h5"))
    heads = small_recipe(tmp_path).heads[:2]
    cfg = TrainConfig(max_epochs=6, patience=3, lr=0.01, bootstrap=0, batch_size=32)
    both = train(data, heads, [Member(MEAN, 0), Member(ATT, 0)], cfg, label_range=(1.0, 10.0))
    alone = train(data, heads, [Member(ATT, 0)], cfg, label_range=(1.0, 10.0))
    for h in heads:
        p = both.predictions[h.name]
        assert np.isfinite(p[:, both.split.eval]).all()
        np.testing.assert_allclose(p[1], alone.predictions[h.name][0], atol=1e-5)
        assert np.abs(p[0] - p[1]).max() > 1e-4
