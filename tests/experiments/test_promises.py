"""Issue 12 item 9: the README's promises, each held by a test that fails when the promise
breaks (a silent regression in any of them gives wrong numbers with no error)."""
import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.store.reader import read_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.inputs import label_stats
from qamro_pipe.train.losses import pairwise_ranking_loss
from qamro_pipe.train.losses_reference import qamro_loss_literal
from qamro_pipe.train.objective import Losses
from qamro_pipe.train.recipes import load_recipe
from qamro_pipe.train.trainer import make_split, train

from kit.caches import make_synthetic_cache, per_layer_cache

HEADS = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
FAST = TrainConfig(max_epochs=40, bootstrap=0, check_every=1)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- validation never touches the reported split ---------------------------------------------
@pytest.mark.parametrize("cfg", [TrainConfig(), TrainConfig(val_fraction=0.3, split_seed=5)])
def test_holdout_validation_is_inside_train_and_apart_from_eval(synthetic_cache, cfg):
    cache = read_cache(synthetic_cache)
    s = make_split(cache, HEADS, cfg)
    train_rows = set(cache.rows("train"))
    assert set(s.val) <= train_rows and set(s.train) <= train_rows
    assert not set(s.val) & set(s.eval)
    assert not set(s.train) & set(s.val) and not set(s.train) & set(s.eval)
    assert set(s.train) | set(s.val) == train_rows  # nothing of train is lost either
    assert len(s.val) == round(cfg.val_fraction * len(train_rows))
    assert set(s.eval) == set(cache.rows("dev"))


def _shuffled_eval_labels(path, out):
    """The same cache with the eval split's labels permuted among its rows."""
    cache = read_cache(path)
    labels = cache.labels.copy()
    dev = cache.rows("dev")
    labels[dev] = labels[np.random.default_rng(1).permutation(dev)]
    assert not np.array_equal(labels, cache.labels)
    return make_synthetic_cache(out, labels=labels)


def test_shuffling_the_eval_labels_changes_no_training_decision(tmp_path):
    """With the default holdout, the eval split's labels reach no training decision: the
    best epoch, the stop and every prediction stay the same. With --val-split dev (the
    published protocol) they do change, which shows the test can fail."""
    path = make_synthetic_cache(tmp_path / "c.h5")
    shuffled = _shuffled_eval_labels(path, tmp_path / "s.h5")
    members = [Member(LossConfig(), 0), Member(LossConfig(beta=1.0), 1)]
    cfg = TrainConfig(max_epochs=200, patience=5, lr=0.02, bootstrap=0, check_every=1)
    a = train(read_cache(path), HEADS, members, cfg)
    b = train(read_cache(shuffled), HEADS, members, cfg)
    assert a.best_epoch == b.best_epoch and a.stopped_epoch == b.stopped_epoch
    assert all(s < 200 for s in a.stopped_epoch)  # early stopping did decide something
    for h in a.predictions:
        assert np.array_equal(a.predictions[h], b.predictions[h])
    dev_cfg = TrainConfig(**{**cfg.__dict__, "val_split": "dev"})
    c = train(read_cache(path), HEADS, members, dev_cfg)
    d = train(read_cache(shuffled), HEADS, members, dev_cfg)
    assert c.best_epoch != d.best_epoch or not np.array_equal(c.predictions["overall"],
                                                              d.predictions["overall"])


# -- the loss the trainer runs, against the pair-by-pair oracle ------------------------------
def _batch(seed, b=32, lo=1.0, hi=5.0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randint(int(lo * 5), int(hi * 5) + 1, (b,), generator=g) / 5).double()
    return torch.randn(b, generator=g, dtype=torch.float64), y


def f32(x: float) -> float:
    """The trainer holds alpha, beta and margin as float32 tensors."""
    return float(torch.tensor(x, dtype=torch.float32))


def _trainer_loss(members, stats, label_range, preds, ys):
    """The objective of one batch exactly as the trainer builds it (objective.Losses), in
    float64 so that it can be compared with the oracle to 1e-9."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fn = Losses(members, stats, torch.device("cpu"), label_range)
    finally:
        torch.set_default_dtype(before)
    b = ys[0].shape[-1]
    terms = fn.terms([y[None] for y in ys], b).select((0, slice(None), slice(None, b)))
    return fn([p[None].expand(len(members), b) for p in preds], terms).sum(0)  # reg + rank


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha,beta", [(0.2, 7.0), (0.5, 3.0)])
def test_norm_range_equals_the_oracle_with_a_fixed_range(seed, alpha, beta):
    """--norm range: q_ij from the dataset's scale (1-5), not the batch's min and max."""
    pred, y = _batch(seed, lo=2.0, hi=4.0)  # the batch spans less than the range
    rng = (1.0, 5.0)
    oracle = qamro_loss_literal(pred, y, alpha, beta, label_range=rng)
    assert pairwise_ranking_loss(pred, y, alpha, beta, norm="range",
                                 label_range=rng).item() == pytest.approx(oracle.item(), rel=1e-10)
    assert oracle.item() != pytest.approx(qamro_loss_literal(pred, y, alpha, beta).item())
    member = Member(LossConfig(alpha=alpha, beta=beta, norm="range"))
    got = _trainer_loss([member], [(0.0, 1.0)], rng, [pred], [y])
    huber = torch.nn.functional.huber_loss(pred, y)
    oracle32 = qamro_loss_literal(pred, y, f32(alpha), f32(beta), label_range=rng)
    assert got.item() == pytest.approx((huber + oracle32).item(), rel=1e-12)


def test_label_scales_on_aes_shaped_heads_equal_the_oracle(tmp_path):
    """Track 2 (AES-Natural): MSE+MAE sees labels standardised by the train split, QAMRO
    the labels' own 1-10 scale (the head's output mapped back by the same mean and std).
    Both terms of one batch of every head, against the literal losses."""
    cache = read_cache(per_layer_cache(tmp_path / "aes.h5"))
    recipe = load_recipe("aes-natural")  # the real recipe's heads: standardize = true
    assert all(h.standardize for h in recipe.heads)
    split = make_split(cache, recipe.heads, TrainConfig())
    stats = [label_stats(cache, h, split.train) for h in recipe.heads]
    assert all(abs(s - 1) > 0.3 for _, s in stats)  # standardising does change the scale
    rows = split.train[:40]
    ys = [torch.from_numpy(cache.labels[rows, cache.label_names.index(h.label)]).double()
          for h in recipe.heads]
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(len(rows), generator=g, dtype=torch.float64) for _ in recipe.heads]
    member = Member(LossConfig(regression="mse+mae", alpha=0.2, beta=7.0))
    got = _trainer_loss([member], stats, recipe.label_range, preds, ys)
    want = 0.0
    for p, y, (mean, std) in zip(preds, ys, stats):
        z = (y - mean) / std
        want += ((p - z) ** 2 + (p - z).abs()).mean() + qamro_loss_literal(
            p * std + mean, y, f32(0.2), f32(7.0))
    assert got.item() == pytest.approx(float(want), rel=1e-12)
    wrong = sum(qamro_loss_literal(p, (y - m) / s, 0.2, 7.0) for p, y, (m, s)
                in zip(preds, ys, stats))  # QAMRO on standardised labels: not what runs
    assert float(wrong) != pytest.approx(float(want - sum(
        (((p - (y - m) / s) ** 2 + (p - (y - m) / s).abs()).mean()
         for p, y, (m, s) in zip(preds, ys, stats)))), rel=1e-3)


# -- options from the command line reach the run ---------------------------------------------
def test_activation_none_trains_affine_heads(synthetic_cache, tmp_path):
    from qamro_pipe.report.evaluate import TrainedRun

    out = tmp_path / "lin"
    r = invoke("train", "--cache", synthetic_cache, "--activation", "none", "--max-epochs", "20",
               "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["train"]["activation"] == "none"
    tr = TrainedRun(out)
    g = torch.Generator().manual_seed(0)
    for h in tr.heads:
        width = 16 * len(h.features)
        model = tr._model(h, (1, width))
        a, b = torch.randn(5, width, generator=g), torch.randn(5, width, generator=g)
        with torch.no_grad():
            mid = model(0.3 * a + 0.7 * b)
            assert torch.allclose(mid, 0.3 * model(a) + 0.7 * model(b), atol=1e-5)
    relu = tmp_path / "relu"
    assert invoke("train", "--cache", synthetic_cache, "--max-epochs", "20", "--out",
                  relu).exit_code == 0
    model = TrainedRun(relu)._model(tr.heads[0], (1, 16))
    with torch.no_grad():
        assert not torch.allclose(model(0.3 * a[:, :16] + 0.7 * b[:, :16]),
                                  0.3 * model(a[:, :16]) + 0.7 * model(b[:, :16]), atol=1e-5)


def test_regression_option_changes_the_objective(synthetic_cache, tmp_path):
    runs = {}
    for kind in ("mse", "huber"):
        out = tmp_path / kind
        r = invoke("train", "--cache", synthetic_cache, "--regression", kind, "--max-epochs",
                   "20", "--out", out)
        assert r.exit_code == 0, r.output
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["members"][0]["loss"]["regression"] == kind
        runs[kind] = [row["pred_overall"] for row in csv.DictReader(open(out / "predictions.csv"))]
    assert runs["mse"] != runs["huber"]


def test_patience_stops_each_member_that_many_epochs_after_its_best(synthetic_cache, tmp_path):
    out = tmp_path / "p"
    r = invoke("train", "--cache", synthetic_cache, "--patience", "3", "--lr", "0.05",
               "--max-epochs", "300", "--seeds", "2", "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["train"]["patience"] == 3
    for m in json.loads((out / "metrics.json").read_text())["members"]:
        assert m["stopped_epoch"] < 300 and m["stopped_epoch"] - m["best_epoch"] == 3


def test_val_split_dev_early_stops_on_dev_and_evaluate_warns(synthetic_cache, tmp_path):
    out = tmp_path / "dev"
    r = invoke("train", "--cache", synthetic_cache, "--val-split", "dev", "--max-epochs", "20",
               "--out", out)
    assert r.exit_code == 0, r.output
    assert "validation: dev" in r.output
    cfg = json.loads((out / "config.json").read_text())
    cache = read_cache(synthetic_cache)
    assert cfg["validation"] == "dev" and cfg["train"]["val_split"] == "dev"
    assert cfg["rows"] == {"train": len(cache.rows("train")), "validation": len(
        cache.rows("dev")), "eval": len(cache.rows("dev"))}
    r = invoke("evaluate", out)
    assert r.exit_code == 0 and "warning: split 'dev' is one this run early-stopped on" in r.output
    r = invoke("train", "--cache", synthetic_cache, "--max-epochs", "20", "--out", tmp_path / "h")
    assert r.exit_code == 0 and "validation: holdout (10% of train" in r.output


def test_sweep_grid_beta_has_the_rows_of_figure_1(synthetic_cache, tmp_path):
    """The musiceval recipe's `beta` grid: qamro, alpha 0.2, beta 1..11 x seeds 0-2."""
    out = tmp_path / "beta"
    r = invoke("sweep", "--grid", "beta", "--cache", synthetic_cache, "--max-epochs", "5",
               "--out", out)
    assert r.exit_code == 0, r.output
    grid = load_recipe("musiceval").grids["beta"]
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 6 * 3 * 2 * 2  # betas x seeds x heads x levels
    assert {(float(r["beta"]), int(r["seed"])) for r in rows} == {
        (float(b), s) for b in grid["beta"] for s in range(grid["seeds"])}
    assert {r["loss"] for r in rows} == {"qamro"} and {r["alpha"] for r in rows} == {"0.2"}
    assert {r["margin"] for r in rows} == {""} and {r["head"] for r in rows} == {"overall",
                                                                                 "textual"}
    assert all(r["srcc"] not in ("", "nan") for r in rows)
    members = json.loads((out / "config.json").read_text())["members"]
    assert [(m["loss"]["beta"], m["seed"]) for m in members] == [
        (float(b), s) for b in grid["beta"] for s in range(3)]
    printed = [line.split() for line in r.output.splitlines() if line.startswith("qamro")]
    assert len(printed) == 12 and all(line[-1] == "(n=3)" for line in printed)
    assert sorted({float(line[2]) for line in printed}) == [1, 3, 5, 7, 9, 11]


@pytest.mark.parametrize("name,regression", [("table1", "huber"), ("table2", "mse+mae")])
def test_table_rows_differ_in_the_loss_alone(name, regression):
    """The configs say it: baseline = no ranking term; QAMRO alpha 0.2 beta 7; w/o quality
    weighting = the same with beta 1; w/o adaptive margin = L_MR with its margin. Every
    other loss setting (regression, norm, label scale, ...) is the same in every row."""
    from qamro_pipe.experiments.run import recipe_configs
    from qamro_pipe.experiments.tables import table_members
    from qamro_pipe.train.recipes import load_table

    t = load_table(name)
    _, lcfg = recipe_configs(load_recipe(t.model))
    members, row_of = table_members(t, lcfg, 2)
    by_row = {row: [m for m in members if row_of[m] == row] for row, _ in t.rows}
    loss = {row: ms[0].loss for row, ms in by_row.items()}
    assert all([m.seed for m in ms] == [0, 1] and len({m.loss for m in ms}) == 1
               for ms in by_row.values())
    rows = list(by_row)
    assert loss[rows[0]].kind == "none"
    assert (loss[rows[1]].kind, loss[rows[1]].alpha, loss[rows[1]].beta) == ("qamro", 0.2, 7.0)
    assert (loss[rows[2]].kind, loss[rows[2]].alpha, loss[rows[2]].beta) == ("qamro", 0.2, 1.0)
    assert (loss[rows[3]].kind, loss[rows[3]].margin) == ("mr", 0.1)
    shared = {k: v for k, v in loss[rows[0]].__dict__.items()
              if k not in ("kind", "alpha", "beta", "margin")}
    assert shared["regression"] == regression
    for lc in loss.values():
        assert {k: v for k, v in lc.__dict__.items() if k in shared} == shared
