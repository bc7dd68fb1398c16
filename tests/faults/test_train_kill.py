"""Issue 5.2: a training run or sweep killed at any point leaves its run folder whole or
absent, never half written; what a killed run leaves is recognisable and cleaned up by the
next run, which never mixes members of two runs."""
from __future__ import annotations

import csv
import json
import random
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qamro_pipe.errors import QamroError
from qamro_pipe.train.runs import RUN_FILES, load_run

from kit.caches import make_synthetic_cache
from kit.children import child_env, leftovers
from kit.cli import invoke

RECIPE = """name = "faults"
dataset = "musiceval"
backbone = "synthetic"
label_range = [1.0, 5.0]

[[heads]]
name = "overall"
label = "overall"
features = ["audio"]

[[heads]]
name = "textual"
label = "textual"
features = ["audio", "text"]

[train]
patience = 1000000  # never stop early: --max-epochs alone sets how long a run takes
bootstrap = 20
check_every = 50
"""
SHORT = ["--max-epochs", "40"]
LONG = ["--max-epochs", "1000000"]  # killed long before it ends


@pytest.fixture
def setup(tmp_path):
    recipe = tmp_path / "faults.toml"
    recipe.write_text(RECIPE)
    cache = make_synthetic_cache(tmp_path / "synthetic.h5")
    return recipe, cache, tmp_path / "runs"


def assert_whole_run(run: Path, members: int, sweep: bool = False) -> None:
    """Every file there, and all of them from one run with `members` members."""
    names = {p.name for p in run.iterdir()}
    assert set(RUN_FILES) <= names, names
    if sweep:
        assert {"sweep.csv", "sweep.png"} <= names, names
    config, heads = load_run(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(config["members"]) == len(metrics["members"]) == members
    assert {k.split("/")[1] for k in heads} == {f"m{k}" for k in range(members)}
    assert load_file(str(run / "heads.safetensors")).keys() == heads.keys()
    with open(run / "predictions.csv") as f:
        header = next(csv.reader(f))
    assert sum(h.startswith("pred_overall") for h in header) == (1 if members == 1
                                                                  else members + 1)


def kill_while_training(c, at: float) -> None:
    time.sleep(at)
    assert c.proc.poll() is None, f"the run ended before the kill: {c.stderr}"
    assert c.kill() == -signal.SIGKILL


def test_killed_training_leaves_whole_or_no_run_and_reruns_cleanly(setup, tally):
    tally.fault = "SIGKILL during train (training, writing the folder, --force swap)"
    recipe, cache, runs = setup
    out = runs / "r"
    base = ["train", "--recipe", recipe, "--cache", cache, "--out", out]
    rng = random.Random(2)

    # killed while the run folder is being written: only the partial folder exists
    c = tally.child([*base, "--seeds", "2", *SHORT], child_env(SAVE=30))
    c.wait_line("qamro-fault: save")
    c.kill()
    assert not out.exists()
    assert leftovers(runs) == [f".r.partial-{c.pid}"]
    with pytest.raises(QamroError, match="no such run folder"):
        load_run(out)
    with pytest.raises(QamroError, match=f"unfinished run folder left by process {c.pid}"):
        load_run(runs / f".r.partial-{c.pid}")

    # a rerun with other members is refused while the killed run's saved state is there (it
    # would resume with the killed run's own command) ...
    c = tally.invoke([*base, "--seeds", "3", *SHORT])
    assert c.proc.returncode == 1 and "pass --force to discard it" in c.stderr, c.stderr
    assert (runs / ".r.partial").is_dir() and not out.exists()
    # ... and with --force runs from scratch: whole, none of the killed run's members
    c = tally.invoke([*base, "--seeds", "3", "--force", *SHORT])
    assert c.proc.returncode == 0, c.stderr
    assert not (runs / ".r.partial").exists()  # a whole run keeps no training state
    assert_whole_run(out, 3)
    assert leftovers(runs) == []
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # --force killed while training: the old run is untouched
    c = tally.child([*base, "--seeds", "1", "--force", *LONG])
    kill_while_training(c, rng.uniform(2.5, 3.5))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # --force killed between moving the old run aside and renaming the new one in
    c = tally.child([*base, "--seeds", "1", "--force", *SHORT], child_env(SWAP=30))
    c.wait_line("qamro-fault: swap")
    c.kill()
    assert not out.exists()
    assert leftovers(runs) == [f".r.partial-{c.pid}", f".r.replaced-{c.pid}"]
    load_run(out)  # reading it finishes the swap
    assert_whole_run(out, 1)  # the new run, whole
    assert leftovers(runs) == []

    c = tally.invoke([*base, "--seeds", "2", "--force", *SHORT])
    assert c.proc.returncode == 0, c.stderr
    assert_whole_run(out, 2)
    assert leftovers(runs) == []


def test_killed_sweep_leaves_whole_or_no_folder(setup, tally):
    tally.fault = "SIGKILL during sweep (training, right as the folder appears)"
    recipe, cache, runs = setup
    out = runs / "s"
    base = ["sweep", "--recipe", recipe, "--cache", cache, "--out", out, "--beta", "1,7"]

    c = tally.child([*base, *LONG])
    kill_while_training(c, random.Random(3).uniform(2.5, 3.5))
    assert not out.exists()

    # killed the instant the folder appears: it must already hold the table and the plot
    c = tally.child([*base, *SHORT])
    while not out.exists() and c.proc.poll() is None:
        time.sleep(0.002)
    c.kill()
    assert out.exists(), c.stderr
    assert_whole_run(out, 2, sweep=True)

    c = tally.invoke([*base, "--seeds", "2", "--force", *SHORT])
    assert c.proc.returncode == 0, c.stderr
    assert_whole_run(out, 4, sweep=True)
    assert leftovers(runs) == []


# the state is saved at every sync, so a run makes about 70 saves however fast the machine
# is: saved every 0.05 s, a quiet machine made 9, fewer than the three kills below wait for
# (4 + 5 + 2 saves), and the third run ended before its kill
RESUMABLE = RECIPE.replace("patience = 1000000  # never stop early: --max-epochs alone sets how long a run takes",
                           "patience = 40  # members stop at different epochs: the batch shrinks").replace(
    "check_every = 50", "lr = 0.05\ncheckpoint_seconds = 0.0  # save the state at every sync")
SWEEP = ["sweep", "--beta", "1,7", "--seeds", "2", "--max-epochs", "3000", "--quiet"]


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A recipe whose members stop at different epochs, and one uninterrupted sweep of it."""
    tmp = tmp_path_factory.mktemp("resume")
    recipe = tmp / "resumable.toml"
    recipe.write_text(RESUMABLE)
    cache = make_synthetic_cache(tmp / "synthetic.h5")
    base = [*SWEEP, "--recipe", recipe, "--cache", cache]
    ref = tmp / "runs" / "reference"
    c = invoke(*base, "--out", ref, threads=1)  # in-process, one thread as the children
    assert c.proc.returncode == 0, c.stderr
    return base, ref, tmp / "runs"


def assert_same_results(a: Path, b: Path) -> None:
    """Value for value: weights, predictions, metrics, history and the sweep table."""
    ha, hb = load_file(str(a / "heads.safetensors")), load_file(str(b / "heads.safetensors"))
    assert ha.keys() == hb.keys()
    for k in ha:
        assert (ha[k] == hb[k]).all(), k
    for name in ("predictions.csv", "metrics.json", "history.csv", "sweep.csv"):
        assert (a / name).read_text() == (b / name).read_text(), name
    stopped = [m["stopped_epoch"] for m in json.loads((a / "metrics.json").read_text())["members"]]
    assert len(set(stopped)) > 1  # members left the batch during the run


def test_killed_training_resumes_to_the_uninterrupted_numbers(resumable, tally):
    tally.fault = "SIGKILL while training (3 times, some mid-save), rerun the same command"
    base, ref, runs = resumable
    out = runs / "killed"
    rng = random.Random(7)
    for attempt in range(3):
        env = child_env(STATE=0.3) if attempt == 1 else child_env(STATE=0)  # 1: mid-save
        c = tally.child([*base, "--out", out], env)
        line = c.wait_line("qamro-fault: state", n=rng.randint(2, 6), timeout=120)
        assert line is not None, c.stderr
        time.sleep(rng.uniform(0.0, 0.1))
        assert c.kill() == -signal.SIGKILL
        assert not out.exists() and (runs / ".killed.partial").is_dir()
    c = tally.invoke([*base, "--out", out])
    assert c.proc.returncode == 0, c.stderr
    assert "resumed from epoch" in c.stdout
    assert_same_results(ref, out)
    assert not (runs / ".killed.partial").exists() and leftovers(runs) == []


def test_ctrl_c_saves_the_state_and_the_rerun_resumes(resumable, tally):
    tally.fault = "Ctrl-C while training, rerun the same command"
    base, ref, runs = resumable
    out = runs / "interrupted"
    c = tally.child([*base, "--out", out], child_env(STATE=0))
    assert c.wait_line("qamro-fault: state", n=3, timeout=120) is not None, c.stderr
    c.signal(signal.SIGINT)
    assert c.finish() == 130, c.stderr
    assert "rerun the same command to resume" in c.stderr
    assert "Traceback" not in c.stderr
    c = tally.invoke([*base, "--out", out, "--resume"])
    assert c.proc.returncode == 0, c.stderr
    assert "resumed from epoch" in c.stdout
    assert_same_results(ref, out)
