"""Stopping a training run at an epoch, and two runs compared value for value."""
import numpy as np
import torch


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
