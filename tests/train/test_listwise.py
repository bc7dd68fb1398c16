"""Issue 15 item 1: the listwise losses (ListNet, ListMLE with tie groups, soft Spearman),
each against a literal clip-by-clip transcription of its formula (losses_reference.py), in
value and gradient, float64, on MOS-like batches with ties and unknown labels; then as
members of one batched run next to QAMRO, and through the CLI."""
import json

import numpy as np
import pytest
import torch

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.store.reader import read_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.listwise import listmle_loss, listnet_loss, soft_rank, spearman_loss
from qamro_pipe.train.losses_reference import (
    listmle_loss_literal,
    listnet_loss_literal,
    spearman_loss_literal,
)
from qamro_pipe.train.trainer import train

from kit.cli import invoke

NAN = float("nan")
PAIRS = [(lambda p, y: listnet_loss(p, y, 0.7), lambda p, y: listnet_loss_literal(p, y, 0.7)),
         (listmle_loss, listmle_loss_literal),
         (lambda p, y: spearman_loss(p, y, 0.3), lambda p, y: spearman_loss_literal(p, y, 0.3))]
IDS = ["listnet", "listmle", "spearman"]


def _batch(seed, b=24, unknown=4):
    """Predictions on a label-like scale, MOS-like labels on a 0.2 grid (many exact ties),
    `unknown` of them NaN."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, generator=g, dtype=torch.float64) + 3
    target = (torch.randint(5, 26, (b,), generator=g) / 5).double()
    target[torch.randperm(b, generator=g)[:unknown]] = NAN
    return pred, target


@pytest.mark.parametrize("fast,slow", PAIRS, ids=IDS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_the_literal_formula_in_value_and_gradient(fast, slow, seed):
    pred, target = _batch(seed)
    known = target[torch.isfinite(target)]
    assert len(set(known.tolist())) < len(known)  # the batch has ties
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    a, b = fast(p1, target), slow(p2, target)
    a.backward()
    b.backward()
    assert a.dim() == 0 and a.item() == pytest.approx(b.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-9, atol=1e-12)
    assert (p1.grad[~torch.isfinite(target)] == 0).all()  # unknown labels take no part


@pytest.mark.parametrize("fast,slow", PAIRS, ids=IDS)
def test_batched_members_equal_separate_calls(fast, slow):
    k = 4
    batches = [_batch(s) for s in range(k)]
    pred = torch.stack([p for p, _ in batches])  # [K, B]
    target = torch.stack([t for _, t in batches])
    out = fast(pred, target)
    assert out.shape == (k,)
    for i in range(k):
        assert out[i].item() == pytest.approx(slow(pred[i], target[i]).item(), rel=1e-10)
    shared = fast(pred, target[0])  # one target row for every member
    for i in range(k):
        assert shared[i].item() == pytest.approx(fast(pred[i], target[0]).item(), rel=1e-12)


def test_per_member_settings_are_each_members_own():
    pred = torch.stack([_batch(s)[0] for s in range(3)])
    target = _batch(9)[1]
    temps = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    taus = torch.tensor([0.05, 0.1, 1.0], dtype=torch.float64)
    net, sp = listnet_loss(pred, target, temps), spearman_loss(pred, target, taus)
    for i in range(3):
        assert net[i].item() == pytest.approx(
            listnet_loss_literal(pred[i], target, temps[i].item()).item(), rel=1e-10)
        assert sp[i].item() == pytest.approx(
            spearman_loss_literal(pred[i], target, taus[i].item()).item(), rel=1e-10)


@pytest.mark.parametrize("fast", [p[0] for p in PAIRS], ids=IDS)
def test_gradcheck_float64(fast):
    pred, target = _batch(3, b=10, unknown=2)
    assert torch.autograd.gradcheck(lambda p: fast(p, target), (pred.requires_grad_(),))
    rows = torch.stack([_batch(s, b=10, unknown=2)[0] for s in range(3)]).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: fast(p, target), (rows,))


def test_listmle_tied_clips_do_not_compete():
    """Swapping the predictions of two tied clips changes nothing; with no ties it is the
    Plackett-Luce likelihood of the one order the labels give."""
    pred = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    target = torch.tensor([3.0, 3.0, 4.0, 1.0], dtype=torch.float64)
    swapped = pred[[1, 0, 2, 3]]
    assert listmle_loss(pred, target).item() == pytest.approx(
        listmle_loss(swapped, target).item(), rel=1e-12)
    p = torch.tensor([1.0, 0.2, -0.5], dtype=torch.float64)  # labels order: 0 > 1 > 2
    pl = (torch.exp(p[0]) / torch.exp(p).sum()) * (torch.exp(p[1]) / torch.exp(p[1:]).sum())
    got = listmle_loss(p, torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    assert got.item() == pytest.approx(-torch.log(pl).item() / 3, rel=1e-12)


def test_no_order_gives_zero_and_finite_gradients():
    pred = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for fn in (listmle_loss, spearman_loss):
        loss = fn(pred, torch.full((6,), 3.0, dtype=torch.float64))
        loss.backward()
        assert loss.item() == 0 and torch.isfinite(pred.grad).all()
    for fn in (listnet_loss, listmle_loss, spearman_loss):
        none_known = fn(pred, torch.full((6,), NAN, dtype=torch.float64))
        assert none_known.item() == 0


def test_soft_rank_tends_to_the_rank_and_spearman_to_one_minus_srcc():
    from scipy.stats import spearmanr

    pred, target = _batch(5, unknown=0)
    r = soft_rank(pred[None], torch.ones(1, len(pred), dtype=torch.bool), 1e-4)[0]
    assert torch.allclose(r, torch.argsort(torch.argsort(pred)).double() + 1)
    rho = spearmanr(pred.numpy(), target.numpy())[0]
    assert spearman_loss(pred, target, 1e-4).item() == pytest.approx(1 - rho, abs=1e-6)


# -- in the batched trainer -----------------------------------------------------------------
HEADS = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
FAST = TrainConfig(max_epochs=40, bootstrap=0)
KINDS = [LossConfig(kind="listnet", temperature=0.5), LossConfig(kind="listmle"),
         LossConfig(kind="spearman", tau=0.2)]


def test_a_sweep_mixing_kinds_trains_and_members_do_not_depend_on_each_other(synthetic_cache):
    cache = read_cache(synthetic_cache)
    members = [Member(LossConfig(), 0), *(Member(loss, 0) for loss in KINDS),
               Member(LossConfig(kind="none"), 1)]
    mixed = train(cache, HEADS, members, FAST)
    p = mixed.predictions["overall"]
    assert np.isfinite(p).all() and not mixed.failures
    assert len({tuple(np.round(row, 6)) for row in p}) == len(members)  # all differ
    for i, m in enumerate(members):  # each member alone gives its numbers in the sweep
        alone = train(cache, HEADS, [m], FAST)
        for h in ("overall", "textual"):
            np.testing.assert_allclose(mixed.predictions[h][i], alone.predictions[h][0],
                                       rtol=1e-4, atol=1e-5)
        assert mixed.best_epoch[i] == alone.best_epoch[0]


def test_rank_weight_zero_is_the_regression_only_run(synthetic_cache):
    cache = read_cache(synthetic_cache)
    off = train(cache, HEADS, [Member(LossConfig(kind="listmle", rank_weight=0.0), 0)], FAST)
    none = train(cache, HEADS, [Member(LossConfig(kind="none"), 0)], FAST)
    assert np.array_equal(off.predictions["overall"], none.predictions["overall"])


@pytest.mark.parametrize("kind,extra", [("listnet", ["--temperature", "0.5"]),
                                        ("listmle", []), ("spearman", ["--tau", "0.2"])])
def test_cli_train_with_each_listwise_loss(synthetic_cache, tmp_path, kind, extra):
    out = tmp_path / "run"
    r = invoke("train", "--cache", synthetic_cache, "--loss", kind, *extra, "--max-epochs", 5,
               "--out", out)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert kind in json.dumps(config)
    assert (out / "predictions.csv").exists()
    ev = invoke("evaluate", out, "--split", "dev")
    assert ev.exit_code == 0, ev.output


def test_cli_sweep_mixing_kinds(synthetic_cache, tmp_path):
    out = tmp_path / "sweep"
    r = invoke("sweep", "--cache", synthetic_cache, "--loss", "qamro,listnet,listmle,spearman",
               "--beta", "1,7", "--temperature", "2", "--max-epochs", 5, "--out", out)
    assert r.exit_code == 0, r.output
    kinds = {line.split(",")[0] for line in (out / "sweep.csv").read_text().splitlines()[1:]}
    assert kinds == {"qamro", "listnet", "listmle", "spearman"}
    assert "listmle" in r.output and (out / "sweep.png").exists()


@pytest.mark.parametrize("args,msg", [
    (["train", "--loss", "listnet", "--temperature", "0"], "--temperature 0: must be greater than 0"),
    (["train", "--loss", "listnet", "--temperature", "-1"], "--temperature -1: must be greater"),
    (["train", "--loss", "spearman", "--tau", "0"], "--tau 0: must be greater than 0"),
    (["train", "--temperature", "2"],
     "--temperature is not used by --loss qamro; it applies to --loss listnet only"),
    (["train", "--loss", "listmle", "--tau", "0.1"], "--tau is not used by --loss listmle"),
    (["train", "--loss", "listnet", "--beta", "7"], "--beta is not used by --loss listnet"),
    (["sweep", "--loss", "qamro,mr", "--temperature", "2"], "--temperature is not used"),
    (["train", "--loss", "listwise"], "unknown loss 'listwise'"),
])
def test_listwise_settings_are_checked_before_any_work(synthetic_cache, tmp_path, args, msg):
    out = tmp_path / "run"
    r = invoke(*args, "--cache", synthetic_cache, "--out", out, "--max-epochs", 2)
    assert r.exit_code == 1, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    assert not out.exists()


def test_library_rules():
    with pytest.raises(QamroError, match="--temperature nan: must be a finite number"):
        LossConfig(kind="listnet", temperature=float("nan"))
    with pytest.raises(QamroError, match="--tau -0.1: must be greater than 0"):
        LossConfig(kind="spearman", tau=-0.1)
