"""Structured batches (--batch-by prompt|system): whole groups per batch, a counter-based
order per member (no generator state: a sweep member is batched as its single run, members
of one run may differ by it, and a resumed run equals the uninterrupted one), and the
refusals."""
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
from qamro_pipe.train.groups import epoch_order, group_keys, train_groups
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.shuffle import grouped_permutations, member_permutations
from qamro_pipe.train.trainer import train

from kit.caches import make_synthetic_cache
from kit.resume import stopped_then_resumed

HEADS = (HeadSpec("overall", "overall", ("audio",)),)
CFG = TrainConfig(max_epochs=40, patience=5, lr=0.02, bootstrap=0, checkpoint_seconds=0.0,
                  batch_size=32)


def prompt_cache(path, n_systems=6, n_prompts=10, seed=0):
    """MusicEval-style ids <prefix>-S<system>_P<prompt>: every system's clip of every prompt."""
    n = n_systems * n_prompts
    ids = [f"audiomos2025-track1-S{s:03d}_P{p:03d}" for s in range(n_systems)
           for p in range(n_prompts)]
    return make_synthetic_cache(path, n_systems=n_systems, per_system=n_prompts, seed=seed,
                                ids=ids, splits=np.array(["train"] * (n - 12) + ["dev"] * 12))


def test_grouped_permutation_keeps_groups_whole_and_is_per_member():
    groups = torch.tensor([3, 0, 1, 0, 2, 3, 1, 1, 2, 0, 3, 2], dtype=torch.int64)
    seeds = torch.tensor([5, 6, 5])
    p = grouped_permutations(seeds, 4, groups)
    for k in range(3):
        assert sorted(p[k].tolist()) == list(range(12))
        seq = groups[p[k]].tolist()
        runs = [g for i, g in enumerate(seq) if i == 0 or seq[i - 1] != g]
        assert sorted(runs) == [0, 1, 2, 3]  # each group one contiguous run
    assert torch.equal(p[0], p[2]) and not torch.equal(p[0], p[1])
    assert not torch.equal(p[0], grouped_permutations(seeds, 5, groups)[0])
    # inside a group, the rows keep the order the random shuffle gives them
    within = member_permutations(seeds, 4, 12)[0].tolist()
    for g in range(4):
        assert [r for r in p[0].tolist() if groups[r] == g] == \
               [r for r in within if groups[r] == g]


def test_group_order_varies_over_epochs():
    groups = torch.arange(20, dtype=torch.int64).repeat_interleave(3)
    seeds = torch.tensor([0])
    firsts = {int(groups[grouped_permutations(seeds, e, groups)[0, 0]]) for e in range(1, 30)}
    assert len(firsts) > 5


def test_each_member_gets_its_own_order():
    seeds = torch.tensor([1, 2, 3])
    groups = {"prompt": torch.arange(10).repeat(5), "system": torch.arange(5).repeat(10)}
    by = {"prompt": torch.tensor([False, True, False]),
          "system": torch.tensor([False, False, True])}
    order = epoch_order(seeds, 3, 50, groups, by)
    assert torch.equal(order[0], member_permutations(seeds, 3, 50)[0])  # random
    assert torch.equal(order[1], grouped_permutations(seeds, 3, groups["prompt"])[1])
    assert torch.equal(order[2], grouped_permutations(seeds, 3, groups["system"])[2])
    assert torch.equal(epoch_order(seeds, 3, 50, {}, {}), member_permutations(seeds, 3, 50))


def test_groups_of_prompts_and_systems(tmp_path):
    cache = read_cache(prompt_cache(tmp_path / "p.h5"))
    rows = cache.rows("train")
    by_prompt = train_groups(cache, rows, None, "prompt")[rows]
    by_system = train_groups(cache, rows, None, "system")[rows]
    prompts = [i.rsplit("_", 1)[1] for i in cache.ids[rows]]
    # same group exactly when same prompt (system)
    same = np.equal.outer(by_prompt, by_prompt)
    assert np.array_equal(same, np.equal.outer(prompts, prompts))
    assert np.array_equal(np.equal.outer(by_system, by_system),
                          np.equal.outer(cache.systems[rows], cache.systems[rows]))
    assert train_groups(cache, rows, None, "random") is None
    # windows take their clip's group
    clip_of = np.repeat(np.arange(len(cache.ids)), 2)
    assert np.array_equal(train_groups(cache, rows, clip_of, "prompt"),
                          train_groups(cache, rows, None, "prompt")[clip_of])


def test_prompt_batches_without_prompts_are_refused(tmp_path):
    cache = read_cache(make_synthetic_cache(tmp_path / "s.h5"))
    with pytest.raises(QamroError, match="--batch-by prompt: .* have no prompt"):
        train_groups(cache, cache.rows("train"), None, "prompt")
    with pytest.raises(QamroError, match="--batch-by prompt"):
        train(cache, HEADS, [Member(LossConfig(batch_by="prompt"))], CFG)
    with pytest.raises(QamroError, match="--cv-group system: no clip to cross-validate"):
        group_keys(replace(cache, systems=np.full(len(cache.ids), "")), cache.rows("train"),
                   "system")


def test_unknown_batch_by_is_one_line(tmp_path):
    with pytest.raises(QamroError, match="unknown batch-by 'clip'"):
        LossConfig(batch_by="clip")
    cache = make_synthetic_cache(tmp_path / "s.h5")
    res = CliRunner().invoke(app, ["train", "--batch-by", "clip", "--cache", str(cache),
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and "unknown batch-by 'clip'" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "run").exists()


def test_labels_name_the_batches():
    assert member_label(LossConfig(batch_by="prompt"), 0) == "qamro a=0.2 b=7 batches=prompt seed=0"
    assert loss_part([Member(LossConfig(batch_by="system", system_weight=0.5), 0)],
                     LossConfig()) == "qamro-a0.2-b7-sys0.5-by-system"  # run-folder names
    assert member_label(LossConfig(), 0) == "qamro a=0.2 b=7 seed=0"


def test_structured_batches_change_training_and_members_stay_independent(tmp_path):
    cache = read_cache(prompt_cache(tmp_path / "p.h5"))
    members = [Member(LossConfig(batch_by=by, beta=b), s)
               for by, b, s in (("prompt", 7.0, 0), ("system", 1.0, 1), ("random", 7.0, 2),
                                ("system", 7.0, 0), ("random", 7.0, 0))]
    sweep = train(cache, HEADS, members, CFG)
    for k, m in enumerate(members):
        alone = train(cache, HEADS, [m], CFG)
        assert np.allclose(sweep.predictions["overall"][k], alone.predictions["overall"][0],
                           atol=1e-6)
        assert sweep.best_epoch[k] == alone.best_epoch[0]
    p = sweep.predictions["overall"]  # same seed and loss, other batches: other training
    assert not np.allclose(p[0], p[4], atol=1e-4) and not np.allclose(p[3], p[4], atol=1e-4)


def test_resumed_grouped_run_equals_the_uninterrupted_one(tmp_path):
    cache = read_cache(prompt_cache(tmp_path / "p.h5"))
    members = [Member(LossConfig(beta=b, batch_by=by), s)
               for b, s, by in ((7.0, 0, "prompt"), (1.0, 1, "system"), (7.0, 1, "random"))]
    cfg = CFG
    whole, saved_at, resumed = stopped_then_resumed(cache, HEADS, members, cfg,
                                                    tmp_path / "state.safetensors")
    assert 0 < saved_at < whole.epochs_run
    assert resumed.best_epoch == whole.best_epoch
    assert np.array_equal(resumed.predictions["overall"], whole.predictions["overall"])
    assert np.array_equal(resumed.history, whole.history)
