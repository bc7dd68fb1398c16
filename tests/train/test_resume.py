"""Interrupted training resumes from its saved state and ends with the numbers of an
uninterrupted run, value for value (CPU), members dropping out of the batch included."""
from dataclasses import replace

import pytest

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.store import read_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.resume import fingerprint, partial_dir, training_state
from qamro_pipe.train.state import TrainState
from qamro_pipe.train.trainer import Checkpoint, train

from kit.resume import Stop, assert_same_run, stop_at

HEADS = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
MEMBERS = [Member(LossConfig(beta=b), s) for b, s in ((1.0, 0), (7.0, 0), (7.0, 1))]
# members stop at different epochs, so the batch shrinks while the run goes on
CFG = TrainConfig(max_epochs=70, patience=6, lr=0.02, bootstrap=0, checkpoint_seconds=0.0)


@pytest.mark.parametrize("cfg", [CFG, replace(CFG, check_every=4),
                                 replace(CFG, optimizer="adamw", lr=0.002, weight_decay=0.01)],
                         ids=["every-epoch", "every-4", "adamw"])
@pytest.mark.parametrize("when", [0.15, 0.5, 0.9])
def test_resumed_run_equals_the_uninterrupted_one(synthetic_cache, tmp_path, cfg, when):
    cache = read_cache(synthetic_cache)
    whole = train(cache, HEADS, MEMBERS, cfg)
    assert len(set(whole.stopped_epoch)) > 1  # the batch shrinks during the run
    stop = max(2, int(when * whole.epochs_run))
    ckpt = Checkpoint(tmp_path / "state.safetensors", "fp", every=0.0)
    with pytest.raises(Stop):
        train(cache, HEADS, MEMBERS, cfg, progress=stop_at(stop), checkpoint=ckpt)
    saved, meta = TrainState.load(ckpt.path)
    at = saved.epoch
    assert 0 < at <= stop and at < whole.epochs_run
    resumed = train(cache, HEADS, MEMBERS, cfg, checkpoint=replace(ckpt, resume=saved))
    assert resumed.resumed_from == at
    assert_same_run(resumed, whole)


def test_state_of_another_run_is_refused_and_force_discards_it(synthetic_cache, tmp_path):
    cache = read_cache(synthetic_cache)
    out = tmp_path / "run"
    fp_a = fingerprint(cache, HEADS, MEMBERS, CFG, (1.0, 5.0))
    fp_b = fingerprint(cache, HEADS, MEMBERS[:1], CFG, (1.0, 5.0))
    assert fp_a != fp_b
    # a run's fingerprint ignores where it runs and how metrics are bootstrapped
    assert fp_a == fingerprint(cache, HEADS, MEMBERS, replace(CFG, device="cpu", bootstrap=9),
                               (1.0, 5.0))
    with training_state(out, fp_a, CFG) as ckpt:
        with pytest.raises(Stop):
            train(cache, HEADS, MEMBERS, CFG, progress=stop_at(5), checkpoint=ckpt)
    state_file = partial_dir(out) / "state.safetensors"
    assert state_file.exists()
    with pytest.raises(QamroError, match="different run .*pass --force to discard it"):
        with training_state(out, fp_b, CFG):
            pass
    with pytest.raises(QamroError, match="--resume: no saved training state"):
        with training_state(tmp_path / "other", fp_a, CFG, resume=True):
            pass
    with training_state(out, fp_a, CFG, resume=True) as ckpt:
        assert ckpt.resume is not None and ckpt.resume.epoch >= 4
    with training_state(out, fp_b, CFG, force=True) as ckpt:
        assert ckpt.resume is None and not state_file.exists()


def test_a_damaged_state_is_one_clear_error(tmp_path):
    bad = tmp_path / "state.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(QamroError, match="not a readable training state"):
        TrainState.load(bad)
