"""What a person watching training sees: a bar on a terminal, plain lines in a log."""
import io

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.store import read_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.progress import TrainingProgress
from qamro_pipe.train.trainer import train

HEADS = (HeadSpec("overall", "overall", ("audio",)),)


def watch(cache_path, **kw):
    stream = io.StringIO()
    display = TrainingProgress("sweep", stream=stream, **kw)
    members = [Member(LossConfig(beta=b), 0) for b in (1.0, 7.0)]
    res = train(read_cache(cache_path), HEADS, members,
                TrainConfig(max_epochs=30, patience=4, lr=0.05, bootstrap=0), progress=display)
    display.close()
    return stream.getvalue(), res


def test_a_log_gets_plain_lines_with_what_is_training(synthetic_cache):
    text, res = watch(synthetic_cache, terminal=False, every=0.0)
    lines = text.splitlines()
    assert len(lines) == res.epochs_run + 1  # one per sync (every epoch on the CPU) + the end
    assert "\r" not in text
    assert lines[0].startswith("sweep: epoch 1/30, 2/2 members training, best val ")
    last = lines[-1]
    assert last.startswith(f"sweep: epoch {res.epochs_run}/30, ")
    assert f"{sum(s == 30 for s in res.stopped_epoch)}/2 members training" in last
    assert "member-epochs/s" in last


def test_a_log_is_not_flooded(synthetic_cache):
    text, res = watch(synthetic_cache, terminal=False, every=3600.0)
    assert len(text.splitlines()) == 1  # only the closing line


def test_a_terminal_gets_a_bar(synthetic_cache):
    text, res = watch(synthetic_cache, terminal=True)
    assert "\r" in text and "epoch" in text and "members training" in text
    assert "/30 epochs [" in text and "at most" in text  # of max_epochs: an upper bound
