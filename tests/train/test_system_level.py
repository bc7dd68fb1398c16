"""The system-level objective (issue 23 item 2): a soft-rank Spearman of the systems' mean
predictions against their mean labels inside a batch, checked against a literal system-by-
system transcription (losses_reference.py) in value and gradient (float64, ties, NaN labels,
clips without a system, systems with too few clips), as a loss kind and beside another kind
(--system-weight) in one batched run, members independent, resume equal to a whole run."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.experiments.naming import loss_part
from qamro_pipe.loss_kinds import member_label
from qamro_pipe.store import read_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.losses_reference import system_spearman_loss_literal
from qamro_pipe.train.system_level import system_spearman_loss
from qamro_pipe.train.trainer import train

from kit.caches import make_synthetic_cache
from kit.resume import stopped_then_resumed

NAN = float("nan")
HEADS = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
CFG = TrainConfig(max_epochs=40, patience=5, lr=0.02, bootstrap=0, checkpoint_seconds=0.0,
                  batch_size=64)


def _batch(seed, b=60, n_systems=9):
    """MOS-like labels on a 0.2 grid (ties), some NaN; systems 0..n-1 and -1 (none); system
    means tie too (two systems share every label)."""
    g = torch.Generator().manual_seed(seed)
    systems = torch.randint(-1, n_systems, (b,), generator=g)
    quality = torch.linspace(1.5, 4.5, n_systems).double()
    quality[1] = quality[0]
    target = (torch.round((quality[systems.clamp_min(0)]
                           + 0.4 * torch.randn(b, generator=g, dtype=torch.float64)) * 5) / 5)
    target[torch.randperm(b, generator=g)[:6]] = NAN
    pred = target.nan_to_num(3.0) + torch.randn(b, generator=g, dtype=torch.float64)
    return pred, target, systems


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_matches_the_literal_formula_in_value_and_gradient(seed, tau):
    pred, target, systems = _batch(seed)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    a = system_spearman_loss(p1, target, systems, tau)
    b = system_spearman_loss_literal(p2, target, systems, tau)
    a.backward()
    b.backward()
    assert a.dim() == 0 and a.item() == pytest.approx(b.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-9, atol=1e-12)
    # clips with no label or no system take no part
    assert (p1.grad[~torch.isfinite(target) | (systems < 0)] == 0).all()
    assert 0 < a.item() < 2


def test_a_system_with_one_clip_takes_no_part():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 1.2, 3.0, 3.2, 0.0], dtype=torch.float64)
    systems = torch.tensor([0, 0, 1, 1, 2])
    loss = system_spearman_loss(pred, target, systems, 0.1)
    loss.backward()
    assert pred.grad[4] == 0
    assert loss.item() == pytest.approx(system_spearman_loss_literal(
        pred.detach(), target, systems, 0.1).item(), abs=1e-12)


def test_no_order_scores_zero_with_zero_gradient():
    pred = torch.randn(8, dtype=torch.float64, requires_grad=True)
    systems = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    tied = torch.tensor([3.0, 3.0, 2.0, 4.0, 3.0, 3.0, 3.4, 2.6], dtype=torch.float64)
    one = torch.tensor([3.0, 3.0] + [NAN] * 6, dtype=torch.float64)
    for target in (tied, one):  # all systems' means tie; a single system
        loss = system_spearman_loss(pred, target, systems)
        (g,) = torch.autograd.grad(loss, pred)
        assert loss.item() == 0 and (g == 0).all()


def test_batched_members_equal_separate_calls():
    batches = [_batch(s) for s in range(3)]
    pred = torch.stack([p for p, _, _ in batches])
    target = torch.stack([t for _, t, _ in batches])
    systems = batches[0][2]
    tau = torch.tensor([0.05, 0.1, 0.3], dtype=torch.float64)
    out = system_spearman_loss(pred, target, systems, tau)
    for k in range(3):
        assert out[k].item() == pytest.approx(
            system_spearman_loss(pred[k], target[k], systems, tau[k].item()).item(), abs=1e-12)


def test_labels_and_settings():
    assert member_label(LossConfig(kind="system", tau=0.2), 1) == "system tau=0.2 seed=1"
    mixed = LossConfig(system_weight=0.5)
    assert member_label(mixed, 0) == "qamro a=0.2 b=7 +system 0.5 seed=0"
    assert loss_part([Member(mixed, 0)], LossConfig()) == "qamro-a0.2-b7-sys0.5"
    assert loss_part([Member(LossConfig(), 0)], LossConfig()) == "qamro-a0.2-b7"
    with pytest.raises(QamroError, match="--loss system is that term alone"):
        LossConfig(kind="system", system_weight=1.0)
    with pytest.raises(QamroError, match="--system-weight -1: must be at least 0"):
        LossConfig(system_weight=-1.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return read_cache(make_synthetic_cache(tmp_path_factory.mktemp("sys") / "s.h5"))


def test_members_stay_independent_in_one_run(cache):
    members = [Member(LossConfig(), 0), Member(LossConfig(kind="system"), 0),
               Member(LossConfig(system_weight=2.0), 1), Member(LossConfig(kind="listmle"), 2)]
    together = train(cache, HEADS, members, CFG)
    for k, m in enumerate(members):
        alone = train(cache, HEADS, [m], CFG)
        assert together.best_epoch[k] == alone.best_epoch[0]
        for h in together.predictions:
            assert np.allclose(together.predictions[h][k], alone.predictions[h][0], atol=1e-5)
    # the added term changes training: QAMRO with it is not QAMRO without it (same seed)
    plain = train(cache, HEADS, [Member(LossConfig(), 1)], CFG)
    assert not np.allclose(plain.predictions["overall"][0], together.predictions["overall"][2],
                           atol=1e-4)


def test_the_term_needs_two_systems(cache):
    one = replace(cache, systems=np.full(len(cache.ids), "S0"))
    with pytest.raises(QamroError, match="at least 2 systems"):
        train(one, HEADS, [Member(LossConfig(kind="system"), 0)], CFG)


def test_resumed_run_equals_the_uninterrupted_one(cache, tmp_path):
    members = [Member(LossConfig(kind="system"), 0), Member(LossConfig(system_weight=1.0), 1)]
    whole, _, resumed = stopped_then_resumed(cache, HEADS, members, CFG,
                                             tmp_path / "state.safetensors")
    assert resumed.best_epoch == whole.best_epoch
    for h in whole.predictions:
        assert np.array_equal(resumed.predictions[h], whole.predictions[h])
    assert np.array_equal(resumed.history, whole.history)


def test_cli_mixes_the_term_beside_a_kind(tmp_path):
    path = make_synthetic_cache(tmp_path / "s.h5")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--cache", str(path), "--out", str(out), "--quiet",
                                 "--max-epochs", "5", "--system-weight", "0.5", "--tau", "0.05"])
    assert r.exit_code == 0, r.output
    members = json.loads((out / "metrics.json").read_text())["members"]
    assert members[0]["loss"]["system_weight"] == 0.5 and members[0]["loss"]["tau"] == 0.05
    assert "+system 0.5" in members[0]["member"]
    r = CliRunner().invoke(app, ["train", "--cache", str(path), "--out", str(tmp_path / "no"),
                                 "--quiet", "--loss", "qamro", "--tau", "0.05"])
    assert r.exit_code == 1 and "--tau is not used" in r.output
    r = CliRunner().invoke(app, ["train", "--cache", str(path), "--out", str(tmp_path / "no"),
                                 "--quiet", "--loss", "system", "--system-weight", "1"])
    assert r.exit_code == 1 and "is that term alone" in r.output
    assert not (tmp_path / "no").exists()
