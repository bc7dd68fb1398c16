"""--loss-weighting uncertainty (issue 23 item 3): each member learns its terms' weights by
homoscedastic uncertainty, sum_t exp(-s_t) L_t + s_t with s a parameter of the member's
head: checked against a literal float64 transcription in value and gradient, members
independent in one run, the log-variances trained, saved and resumed with the head, the
weights in history.csv, and a run re-scored by `evaluate`."""
import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.store import read_cache
from qamro_pipe.train.aes_release import read_release
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.objective import uncertainty_objective
from qamro_pipe.train.recipes import load_recipe
from qamro_pipe.train.trainer import train

from kit.caches import make_synthetic_cache
from kit.release import aes_cache, provenance_of
from kit.resume import stopped_then_resumed

HEADS = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
CFG = TrainConfig(max_epochs=40, patience=5, lr=0.02, bootstrap=0, checkpoint_seconds=0.0,
                  batch_size=64)
U = "uncertainty"


def objective_literal(parts, log_vars, has_rank, learned=None):
    """Term by term, head by head, member by member; a member not learning its weights
    adds its terms as they are."""
    total = parts.sum() * 0.0
    n_terms, n_heads, k = parts.shape
    for h in range(n_heads):
        for m in range(k):
            for t in range(n_terms):
                if learned is not None and not learned[m]:
                    total = total + parts[t, h, m]
                    continue
                if t == 1 and not has_rank[m]:
                    continue
                s = log_vars[h, m, t]
                total = total + torch.exp(-s) * parts[t, h, m] + s
    return total


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("learned", [None, (True, True, False, True)])
def test_matches_the_literal_in_value_and_gradient(seed, learned):
    g = torch.Generator().manual_seed(seed)
    parts = torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 3
    log_vars = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    has_rank = torch.tensor([True, False, True, True])
    learned = None if learned is None else torch.tensor(learned)
    a_in = [parts.clone().requires_grad_(), log_vars.clone().requires_grad_()]
    b_in = [parts.clone().requires_grad_(), log_vars.clone().requires_grad_()]
    a = uncertainty_objective(*a_in, has_rank, learned)
    b = objective_literal(*b_in, has_rank, learned)
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    for x, y in zip(a_in, b_in):
        assert torch.allclose(x.grad, y.grad, rtol=1e-12, atol=1e-14)
    assert (a_in[1].grad[:, 1, 1] == 0).all()  # no ranking term: its log-variance untouched
    if learned is not None:
        assert (a_in[1].grad[:, 2] == 0).all()  # fixed weights: no gradient to its s
    # the weight's optimum: d/ds (exp(-s) L + s) = 0 at s = log L
    L = torch.tensor([[[2.5]], [[0.4]]], dtype=torch.float64)
    s = torch.log(L).reshape(1, 1, 2).clone().requires_grad_()
    (grad,) = torch.autograd.grad(uncertainty_objective(L, s, torch.tensor([True])), s)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-12)


def test_at_zero_log_variance_it_is_the_fixed_objective():
    parts = torch.rand(2, 2, 3, dtype=torch.float64)
    has_rank = torch.tensor([True, True, True])
    assert uncertainty_objective(parts, torch.zeros(2, 3, 2, dtype=torch.float64),
                                 has_rank).item() == pytest.approx(parts.sum().item())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return read_cache(make_synthetic_cache(tmp_path_factory.mktemp("lw") / "s.h5"))


MEMBERS = [Member(LossConfig(loss_weighting=U), 0),
           Member(LossConfig(kind="listmle", loss_weighting=U), 1),
           Member(LossConfig(kind="none", loss_weighting=U), 2),
           Member(LossConfig(system_weight=1.0, loss_weighting=U), 3),
           Member(LossConfig(), 0)]  # fixed weights, beside the others


def test_members_stay_independent_and_weights_are_learned(cache):
    together = train(cache, HEADS, MEMBERS, CFG)
    for k, m in enumerate(MEMBERS):
        alone = train(cache, HEADS, [m], CFG)
        assert together.best_epoch[k] == alone.best_epoch[0]
        for h in together.predictions:
            assert np.allclose(together.predictions[h][k], alone.predictions[h][0], atol=1e-5)
    fixed = train(cache, HEADS, MEMBERS[4:], CFG)  # alone: a head without log-variances
    assert not np.allclose(fixed.predictions["overall"][0], together.predictions["overall"][0],
                           atol=1e-4)  # the same loss and seed, learned weights or not
    # the log-variances are saved with each member's head
    for h in ("overall", "textual"):
        s = [together.states[h][k]["loss.log_vars"] for k in range(len(MEMBERS))]
        assert all(v.shape == (2,) for v in s)
        assert all(v[0] != 0 for v in s[:4])  # the regression weight moved where learned
        assert s[2][1] == 0  # regression only: no ranking weight to learn
        assert (s[4] == 0).all()  # fixed weights: the log-variances stay 0
        assert "loss.log_vars" not in fixed.states[h][0]
    hist = together.history  # member, epoch, HISTORY_COLUMNS...
    weights = hist[:, -2:]
    assert (weights > 0).all() and not np.allclose(weights[:, 0], 1.0)
    assert np.allclose(hist[hist[:, 0] == 2][:, -1], 1.0)
    assert np.allclose(hist[hist[:, 0] == 4][:, -2:], 1.0)
    assert np.allclose(fixed.history[:, -2:], 1.0)


SOME = [*MEMBERS[:2], MEMBERS[4]]  # two learning their weights, one not


def test_resumed_run_equals_the_uninterrupted_one(cache, tmp_path):
    for optimizer in ("sgd", "adamw"):
        cfg = replace(CFG, optimizer=optimizer, lr=0.02 if optimizer == "sgd" else 0.002,
                      weight_decay=0.0 if optimizer == "sgd" else 0.01)
        whole, _, resumed = stopped_then_resumed(cache, HEADS, SOME, cfg,
                                                 tmp_path / f"{optimizer}.safetensors")
        assert resumed.best_epoch == whole.best_epoch
        for h in whole.predictions:
            assert np.array_equal(resumed.predictions[h], whole.predictions[h])
            for a, b in zip(resumed.states[h], whole.states[h]):
                assert torch.equal(a["loss.log_vars"], b["loss.log_vars"])
        assert np.array_equal(resumed.history, whole.history)
        for h in whole.states:  # AdamW's weight decay keeps a fixed member's s at 0 too
            assert (whole.states[h][2]["loss.log_vars"] == 0).all()


def test_cli_history_and_evaluate(tmp_path):
    path = make_synthetic_cache(tmp_path / "s.h5")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--cache", str(path), "--out", str(out), "--quiet",
                                 "--max-epochs", "8", "--lr", "0.02",
                                 "--loss-weighting", "uncertainty"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert len(rows) >= 1 and all(math.isfinite(float(r["weight_reg"])) for r in rows)
    assert float(rows[-1]["weight_reg"]) != 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["members"][0]["loss"]["loss_weighting"] == "uncertainty"
    assert "weights=uncertainty" in json.loads((out / "metrics.json").read_text())[
        "members"][0]["member"]
    r = CliRunner().invoke(app, ["evaluate", str(out)])  # the head rebuilt with its weights
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train", "--cache", str(path), "--out", str(tmp_path / "x"),
                                 "--loss-weighting", "learned"])
    assert r.exit_code == 1 and "unknown loss-weighting 'learned'" in r.output
    with pytest.raises(QamroError, match="unknown loss-weighting"):
        LossConfig(loss_weighting="learned")


def test_fixed_members_train_on_after_the_learning_ones_stop(cache):
    """The batch shrinks to members that all keep fixed weights while the heads still carry
    log-variances (a regression: autograd refused the unused ones)."""
    heads = HEADS[:1]
    members = [Member(LossConfig(loss_weighting=U), s) for s in range(3)] + \
        [Member(LossConfig(), s) for s in range(3)]
    cfg = replace(CFG, max_epochs=60)
    run = train(cache, heads, members, cfg)
    assert max(run.stopped_epoch[:3]) < max(run.stopped_epoch[3:])  # fixed ones train alone
    for k in (3, 5):
        alone = train(cache, heads, [members[k]], cfg)
        assert run.best_epoch[k] == alone.best_epoch[0]
        assert np.allclose(run.predictions["overall"][k], alone.predictions["overall"][0],
                           atol=1e-5)


def test_release_init_keeps_the_release_weights_and_adds_log_variances(publisher_ckpt,
                                                                        tmp_path):
    """--init release with a member learning its weights: the release's heads (built as
    release_fixtures.py says its publisher builds them: tests/conftest.py's publisher_ckpt),
    then log-variances at 0."""
    heads = load_recipe("aes-natural-code").heads
    cache = read_cache(aes_cache(tmp_path / "aes.h5", provenance_of(publisher_ckpt)))
    cfg = TrainConfig(max_epochs=1, batch_size=120, bootstrap=0, optimizer="sgd", lr=1e-30,
                      init="release", label_stats="release", val_split="dev",
                      eval_split="eval")
    members = [Member(LossConfig(quality_weight="interval-table", loss_weighting=U), 0)]
    res = train(cache, heads, members, cfg)
    rel = read_release(cache)
    for h in heads:
        want, got = rel.heads[h.label].member_state(0), res.states[h.name][0]
        assert set(got) == set(want) | {"loss.log_vars"}
        assert all(torch.allclose(got[n], want[n], rtol=0, atol=1e-20) for n in want)
        assert torch.allclose(got["loss.log_vars"], torch.zeros(2), atol=1e-20)
