"""Issue 15 item 1: the gaussian-kl loss (the AudioMOS 2025 track-1 winner's distributional
loss, arXiv 2507.09904) against a literal bin-by-bin transcription (losses_reference.py) in
value and gradient, float64; heads with a distribution output in a batched run next to
scalar members; the predicted score is the distribution's mean everywhere a run is read."""
import csv
import json

import numpy as np
import pytest
import torch

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.report.evaluate import TrainedRun
from qamro_pipe.store.reader import read_cache
from qamro_pipe.train.distribution import gaussian_kl_loss, output_bins, smoothed_targets
from qamro_pipe.train.heads import BatchedMLP, HeadSpec
from qamro_pipe.train.losses_reference import gaussian_kl_loss_literal
from qamro_pipe.train.trainer import train

from kit.caches import make_synthetic_cache
from kit.cli import invoke

NAN = float("nan")


def _batch(seed, b=12, n=21, k=None):
    g = torch.Generator().manual_seed(seed)
    shape = (b, n) if k is None else (k, b, n)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64)
    target = (torch.randint(5, 26, shape[:-1], generator=g) / 5).double()  # 0.2 grid: ties
    target.view(-1)[torch.randperm(target.numel(), generator=g)[:3]] = NAN
    ratings = torch.randint(1, 6, (b, 5), generator=g).double()  # 5 raters, 1-5
    ratings[::3] = NAN  # clips without ratings: a Gaussian around the mean
    ratings[1, 3:] = NAN  # fewer raters (NaN-padded, as the cache stores them)
    return logits, target, ratings


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_ratings", [False, True])
def test_matches_the_literal_formula_in_value_and_gradient(seed, with_ratings):
    logits, target, ratings = _batch(seed)
    r = ratings if with_ratings else None
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast = gaussian_kl_loss(a, target, (1.0, 5.0), 0.1, r)
    slow = gaussian_kl_loss_literal(b, target, (1.0, 5.0), 0.1, r)
    fast.backward()
    slow.backward()
    assert fast.dim() == 0 and fast.item() == pytest.approx(slow.item(), rel=1e-10)
    assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    assert (a.grad[~torch.isfinite(target)] == 0).all()


def test_batched_members_and_gradcheck():
    logits, target, _ = _batch(4, b=8, n=6, k=3)
    out = gaussian_kl_loss(logits, target, (0.0, 10.0), 0.2)
    assert out.shape == (3,)
    for i in range(3):
        assert out[i].item() == pytest.approx(
            gaussian_kl_loss_literal(logits[i], target[i], (0.0, 10.0), 0.2).item(), rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda z: gaussian_kl_loss(z, target, (0.0, 10.0), 0.2), (logits.requires_grad_(),))


def test_targets_from_ratings_where_the_cache_has_them():
    centres = np.linspace(1, 5, 21)
    labels = np.array([3.0, 3.0, NAN])
    ratings = np.array([[1, 5, 5, 1, 3], [NAN] * 5, [2, 2, 2, 2, 2]], dtype=np.float32)
    t = smoothed_targets(labels, ratings, centres, 0.4)
    assert np.allclose(t[:2].sum(1), 1) and (t[2] == 0).all()  # unknown label: no target
    assert t[0][0] > t[0][10] < t[0][20]  # raters split: two modes, not one around 3
    assert t[1].argmax() == 10  # no ratings: a Gaussian around the mean 3.0
    assert np.allclose(t[1], t[1][::-1])


def test_a_loss_of_a_perfect_distribution_is_smallest():
    target = torch.tensor([2.0, 4.0], dtype=torch.float64)
    t = torch.from_numpy(smoothed_targets(target.numpy(), None, np.linspace(1, 5, 21), 0.4))
    exact = gaussian_kl_loss(torch.log(t), target, (1.0, 5.0), 0.1)
    assert exact.item() == pytest.approx(0, abs=1e-12)
    assert gaussian_kl_loss(torch.zeros(2, 21, dtype=torch.float64), target).item() > 0.1


def test_head_layout_keeps_the_scalar_members_initial_weights():
    plain = BatchedMLP([0, 1], 8, (16, 4), name="overall")
    dist = BatchedMLP([0, 1], 8, (16, 4), name="overall", bins=torch.linspace(1, 5, 21),
                      uses_bins=(False, True))
    n = plain.flat.numel()
    assert torch.equal(plain.flat.detach(), dist.flat.detach()[:n])
    x = torch.randn(5, 8)
    p, (q, z) = plain(x), dist(x, logits=True)
    assert torch.equal(p[0], q[0]) and z.shape == (2, 5, 21)
    assert torch.allclose(q[1], torch.softmax(z[1], -1) @ torch.linspace(1, 5, 21))
    assert set(dist.member_state(1)) - set(plain.member_state(1)) == {"dist.weight",
                                                                      "dist.bias"}


HEADS = (HeadSpec("overall", "overall", ("audio",), standardize=True),
         HeadSpec("textual", "textual", ("audio", "text")))
FAST = TrainConfig(max_epochs=40, bootstrap=0, lr=0.02)
GKL = LossConfig(kind="gaussian-kl", label_range=(1.0, 5.0))


def test_mixed_with_scalar_members_each_member_as_alone(synthetic_cache):
    cache = read_cache(synthetic_cache)
    members = [Member(LossConfig(), 0), Member(GKL, 0), Member(LossConfig(kind="listmle"), 1),
               Member(GKL, 1)]
    mixed = train(cache, HEADS, members, FAST)
    assert not mixed.failures
    for i, m in enumerate(members):
        alone = train(cache, HEADS, [m], FAST)
        for h in ("overall", "textual"):
            np.testing.assert_allclose(mixed.predictions[h][i], alone.predictions[h][0],
                                       rtol=1e-4, atol=1e-5)
    p = mixed.predictions["overall"][1]  # a distribution's mean: inside the bins' range
    assert np.isfinite(p).all() and p.min() >= 1 and p.max() <= 5
    y = cache.labels[:, 0]
    assert np.corrcoef(p, y)[0, 1] > 0.5  # it learns the planted signal


def test_members_must_share_bins_and_need_a_scale():
    with pytest.raises(QamroError, match="share bins"):
        output_bins([Member(GKL, 0), Member(LossConfig(kind="gaussian-kl", bins=11,
                                                       label_range=(1.0, 5.0)), 0)])
    with pytest.raises(QamroError, match="needs the labels' scale"):
        output_bins([Member(LossConfig(kind="gaussian-kl"), 0)])
    assert output_bins([Member(LossConfig(), 0)]) is None


def test_cli_train_evaluate_predict_read_the_distribution_mean(tmp_path):
    cache = make_synthetic_cache(tmp_path / "synthetic.h5")
    out = tmp_path / "run"
    r = invoke("train", "--cache", cache, "--loss", "gaussian-kl", "--bins", 11, "--sigma",
               0.15, "--max-epochs", 8, "--seeds", 2, "--out", out)
    assert r.exit_code == 0, r.output
    members = json.loads((out / "config.json").read_text())["members"]
    assert {m["loss"]["bins"] for m in members} == {11}
    run = TrainedRun(out)
    preds = run.predict(read_cache(cache))
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    index = {c: i for i, c in enumerate(read_cache(cache).ids)}
    at = [index[row["id"]] for row in rows]
    for h in ("overall", "textual"):
        for k in (0, 1):  # what training wrote is what the saved heads predict
            written = np.array([float(row[f"pred_{h}_m{k}"]) for row in rows])
            np.testing.assert_allclose(written, preds[h][k][at], rtol=1e-4, atol=1e-4)
        assert (preds[h] >= 1).all() and (preds[h] <= 5).all()  # means of 1-5 bins
    ev = invoke("evaluate", out, "--split", "dev")
    assert ev.exit_code == 0, ev.output


@pytest.mark.parametrize("args,msg", [
    (["--loss", "gaussian-kl", "--bins", "1"], "--bins 1: must be at least 2"),
    (["--loss", "gaussian-kl", "--sigma", "0"], "--sigma 0: must be greater than 0"),
    (["--sigma", "0.2"], "--sigma is not used by --loss qamro; it applies to --loss "
                         "gaussian-kl only"),
    (["--loss", "listnet", "--bins", "5"], "--bins is not used by --loss listnet"),
])
def test_settings_are_checked_before_any_work(synthetic_cache, tmp_path, args, msg):
    out = tmp_path / "run"
    r = invoke("train", *args, "--cache", synthetic_cache, "--out", out, "--max-epochs", 2)
    assert r.exit_code == 1, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    assert not out.exists()


def test_sweep_table_columns_line_up_with_the_widest_loss_name():
    """`sweep` prints one row per setting and head; "gaussian-kl" is longer than the loss
    column once was, and every row's figures must still sit under their headers."""
    from qamro_pipe.report.screen import sweep_table

    rows = [{"loss": k, "alpha": a, "beta": b, "margin": None, "head": "overall",
             "level": "system", "srcc": s}
            for k, a, b, s in (("qamro", 0.2, 7.0, 0.9), ("gaussian-kl", None, None, 0.8),
                               ("none", None, None, 0.7))]
    header, *lines = sweep_table(rows).splitlines()
    for name in ("alpha", "beta", "margin"):
        end = header.index(name) + len(name)
        assert {line[end - 1] for line in lines} <= set("0123456789-"), name
    assert len({len(line) for line in lines}) == 1
