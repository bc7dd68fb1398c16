from dataclasses import replace

import numpy as np
import pytest
import torch

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.store.reader import read_cache
from qamro_pipe.train.heads import BatchedMLP, HeadSpec
from qamro_pipe.train.shuffle import member_permutations
from qamro_pipe.train.trainer import train

from kit.caches import make_synthetic_cache

HEADS = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
FAST = TrainConfig(max_epochs=60, bootstrap=0)


def test_batched_mlp_equals_per_member_sequential():
    mlp = BatchedMLP([0, 1, 2], in_dim=8, hidden=(16, 4), name="h").double()
    x = torch.randn(10, 8, dtype=torch.float64)
    out = mlp(x)
    assert out.shape == (3, 10)
    for k in range(3):
        seq = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4),
                                  torch.nn.ReLU(), torch.nn.Linear(4, 1)).double()
        seq.load_state_dict(mlp.member_state(k))
        assert torch.allclose(seq(x).squeeze(-1), out[k])
    # the gathered [K, B, D] path equals the shared [N, D] path
    assert torch.allclose(mlp(x.expand(3, 10, 8)), out)


def test_member_init_depends_only_on_seed():
    a = BatchedMLP([5, 7], 8, name="h")
    b = BatchedMLP([7], 8, name="h")
    assert torch.equal(a.weights[0][1], b.weights[0][0])


def test_permutations_are_per_member_and_stable():
    seeds = torch.tensor([1, 2, 1])
    p = member_permutations(seeds, 3, 50)
    assert sorted(p[0].tolist()) == list(range(50))
    assert torch.equal(p[0], p[2]) and not torch.equal(p[0], p[1])
    assert not torch.equal(p[0], member_permutations(seeds, 4, 50)[0])


def test_planted_signal_reaches_high_system_srcc(synthetic_cache):
    from qamro_pipe.train.runs import summarise

    cache = read_cache(synthetic_cache)
    res = train(cache, HEADS, [Member(LossConfig(), 0)], TrainConfig(max_epochs=300, bootstrap=0))
    m = summarise(cache, res, TrainConfig(bootstrap=0))
    assert m["heads"]["overall"]["system"]["srcc"] > 0.9
    assert m["heads"]["textual"]["system"]["srcc"] > 0.8


def test_same_seed_same_numbers_and_sweep_member_equals_single_run(synthetic_cache):
    cache = read_cache(synthetic_cache)
    members = [Member(LossConfig(beta=b), s) for b in (1.0, 7.0) for s in (0, 1)]
    sweep = train(cache, HEADS, members, FAST)
    single = train(cache, HEADS, [members[3]], FAST)
    again = train(cache, HEADS, [members[3]], FAST)
    for h in ("overall", "textual"):
        assert np.array_equal(single.predictions[h], again.predictions[h])
        np.testing.assert_allclose(sweep.predictions[h][3], single.predictions[h][0],
                                   rtol=1e-4, atol=1e-5)
    assert sweep.best_epoch[3] == single.best_epoch[0]
    assert not np.allclose(sweep.predictions["overall"][0], sweep.predictions["overall"][1])


def test_members_stop_early_on_their_own(synthetic_cache):
    cache = read_cache(synthetic_cache)
    cfg = TrainConfig(max_epochs=400, patience=5, bootstrap=0, lr=0.05, check_every=1)
    res = train(cache, HEADS, [Member(LossConfig(), s) for s in range(3)], cfg)
    assert all(s < 400 for s in res.stopped_epoch)
    assert all(b <= s for b, s in zip(res.best_epoch, res.stopped_epoch))
    assert all(s - b == 5 for b, s in zip(res.best_epoch, res.stopped_epoch))
    assert res.epochs_run == max(res.stopped_epoch)
    # checking for "all stopped" less often only adds idle epochs: same members, same numbers
    keep = TrainConfig(max_epochs=400, patience=5, bootstrap=0, lr=0.05, check_every=1,
                       compact=False)
    lazy_keep = replace(keep, check_every=7)
    kept, lazy = (train(cache, HEADS, [Member(LossConfig(), s) for s in range(3)], c)
                  for c in (keep, lazy_keep))
    assert lazy.stopped_epoch == kept.stopped_epoch == res.stopped_epoch
    assert lazy.epochs_run % 7 == 0
    for h in res.predictions:
        assert np.array_equal(lazy.predictions[h], kept.predictions[h])
        # members that stopped leave the batch: the others' numbers move by rounding only
        np.testing.assert_allclose(res.predictions[h], kept.predictions[h], rtol=1e-5,
                                   atol=1e-6)
    # ... and cost nothing after their stop
    assert res.member_epochs == sum(res.stopped_epoch)
    assert kept.member_epochs == 3 * kept.epochs_run > res.member_epochs


def test_loss_kinds_in_one_run(synthetic_cache):
    cache = read_cache(synthetic_cache)
    members = [Member(LossConfig(kind=k), 0) for k in ("qamro", "mr", "none")]
    res = train(cache, HEADS, members, FAST)
    p = res.predictions["overall"]
    assert not np.allclose(p[0], p[1]) and not np.allclose(p[1], p[2])


def test_nonfinite_loss_stops_member_without_nan_weights(synthetic_cache):
    cache = read_cache(synthetic_cache)
    cfg = TrainConfig(max_epochs=30, bootstrap=0, lr=1e6)  # diverges to inf/NaN
    res = train(cache, HEADS, [Member(LossConfig(), 0)], cfg)
    assert res.failures or res.warnings
    for h in ("overall", "textual"):
        for state in res.states[h]:
            assert all(torch.isfinite(t).all() for t in state.values())


def test_val_split_dev_and_errors(tmp_path):
    p = make_synthetic_cache(tmp_path / "c.h5")
    cache = read_cache(p)
    res = train(cache, HEADS, [Member()], TrainConfig(max_epochs=5, val_split="dev", bootstrap=0))
    assert res.split.val_source == "dev"
    assert np.array_equal(res.split.val, res.split.eval)
    with pytest.raises(QamroError, match="no labelled rows"):
        train(cache, HEADS, [Member()], TrainConfig(max_epochs=5, val_split="nosuch"))
    with pytest.raises(QamroError, match="eval split 'eval' has no rows"):
        train(cache, HEADS, [Member()], TrainConfig(max_epochs=5, eval_split="eval"))
    labels = cache.labels.copy()
    labels[:, 1] = np.nan
    p2 = make_synthetic_cache(tmp_path / "nan.h5", labels=labels)
    with pytest.raises(QamroError, match="'textual' are all NaN"):
        train(read_cache(p2), HEADS, [Member()], FAST)


def test_a_diverging_member_leaves_the_others_untouched(synthetic_cache):
    """Steps are not masked: a member whose loss turns inf or NaN must still spoil only its
    own rows of the batched matmuls."""
    cache = read_cache(synthetic_cache)
    healthy = Member(LossConfig(), 0)
    both = train(cache, HEADS, [healthy, Member(LossConfig(beta=1e38), 0)], FAST)
    alone = train(cache, HEADS, [healthy], FAST)
    assert 1 in both.failures or 1 in both.warnings
    assert 0 not in both.failures and 0 not in both.warnings
    for h in ("overall", "textual"):
        np.testing.assert_allclose(both.predictions[h][0], alone.predictions[h][0],
                                   rtol=1e-4, atol=1e-5)
    assert both.best_epoch[0] == alone.best_epoch[0]


def test_an_input_inside_another_is_gathered_once_as_its_first_columns(synthetic_cache):
    """The audio head's input is the first columns of the textual head's: one matrix on the
    device, one gather per step, and each head still sees exactly its own features."""
    from qamro_pipe.train.engine import gather as _gather
    from qamro_pipe.train.inputs import head_inputs
    from qamro_pipe.train.trainer import _inputs

    cache = read_cache(synthetic_cache)
    plan = _inputs(cache, HEADS, torch.device("cpu"))
    shared = {f: x for f, (x, _, _) in plan.items()}
    audio, both = shared[("audio",)], shared[("audio", "text")]
    assert audio.data_ptr() == both.data_ptr() and plan[("audio",)][1] == ("audio", "text")
    idx = torch.tensor([[3, 0, 7], [5, 5, 1]])
    rows = _gather(plan, idx)
    assert rows[("audio",)].data_ptr() == rows[("audio", "text")].data_ptr()
    for h in HEADS:
        expected = torch.from_numpy(head_inputs(cache, h))[idx]
        assert torch.equal(rows[h.features], expected)
        assert torch.equal(shared[h.features], torch.from_numpy(head_inputs(cache, h)))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_steps_equal_torch_optim(name):
    """The trainer's in-place update is torch.optim's own rule: SGD(momentum=0.9) and
    AdamW(weight_decay=0.01), step for step, also after a restart from saved buffers."""
    from qamro_pipe.train.optim import make_optimizer, optimizer_buffers

    cfg = TrainConfig(optimizer=name, lr=0.01, weight_decay=0.01 if name == "adamw" else 0.0)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 5, generator=g)]
    ref = [p.clone().requires_grad_() for p in params]
    opt = (torch.optim.SGD(ref, lr=cfg.lr, momentum=cfg.momentum) if name == "sgd" else
           torch.optim.AdamW(ref, lr=cfg.lr, weight_decay=cfg.weight_decay))
    buffers = {b: [torch.zeros_like(p) for p in params] for b in optimizer_buffers(cfg)}
    step = make_optimizer(cfg, params, buffers, 0, torch.device("cpu"))
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(6)]
    for i, gs in enumerate(grads):
        if i == 3:  # a resumed run: the same buffers, and the number of steps taken
            step = make_optimizer(cfg, params, buffers, 3, torch.device("cpu"))
        step(gs)
        for r, gr in zip(ref, gs):
            r.grad = gr.clone()
        opt.step()
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r.detach(), rtol=1e-6, atol=1e-7)

