"""Stopping a training run at an epoch, and two runs compared value for value."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from qamro_pipe.train.state import TrainState
from qamro_pipe.train.trainer import Checkpoint, train


class Stop(Exception):
    pass


def stop_at(epoch):
    def progress(p):
        if p.epoch >= epoch:
            raise Stop
    return progress


def assert_same_run(a, b):
    assert a.best_epoch == b.best_epoch and a.stopped_epoch == b.stopped_epoch
    assert a.epochs_run == b.epochs_run and a.member_epochs == b.member_epochs
    assert a.best_val_loss == b.best_val_loss
    for h in a.predictions:
        assert np.array_equal(a.predictions[h], b.predictions[h])
        for sa, sb in zip(a.states[h], b.states[h]):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert np.array_equal(a.history, b.history)


def stopped_then_resumed(cache, heads, members, cfg, path):
    """The run three ways: whole; stopped halfway with its state saved at every sync (to
    `path`); and resumed from that state. -> (whole, the epoch the state was saved at,
    resumed): the resumed run moves the state itself on."""
    whole = train(cache, heads, members, cfg)
    ckpt = Checkpoint(path, "fp", every=0.0)
    with pytest.raises(Stop):
        train(cache, heads, members, cfg, progress=stop_at(max(2, whole.epochs_run // 2)),
              checkpoint=ckpt)
    saved, _ = TrainState.load(ckpt.path)
    saved_at = saved.epoch
    resumed = train(cache, heads, members, cfg, checkpoint=replace(ckpt, resume=saved))
    return whole, saved_at, resumed
