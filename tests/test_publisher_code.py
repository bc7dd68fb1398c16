"""Issue 19 part A: settings held to what the publishers' code does (the release heads'
statistics, AES-Natural without its eval package)."""
from dataclasses import replace

import numpy as np
import pytest
from release_fixtures import aes_cache, provenance_of, publisher_checkpoint
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import TrainConfig
from qamro_pipe.errors import QamroError


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(checkpoint built as the publisher builds it, a cache extracted with it, one without
    an eval split: the published train and dev lists alone)."""
    root = tmp_path_factory.mktemp("release19")
    ckpt = publisher_checkpoint(root / "checkpoint.pt")
    cache = aes_cache(root / "aes.h5", provenance_of(ckpt))
    no_eval = aes_cache(root / "no-eval.h5", provenance_of(ckpt), n_systems=0)
    return ckpt, cache, no_eval


def test_init_release_without_release_statistics_is_refused():
    """The released heads output scores standardised by the release's target transform; with
    the train split's mean and std they would not start where the release is."""
    with pytest.raises(QamroError, match="--init release needs --label-stats release"):
        TrainConfig(init="release", label_stats="train")
    assert TrainConfig(init="release", label_stats="release").init == "release"
    assert TrainConfig(label_stats="release").init == "random"  # the other way round is fine


def test_cli_refuses_init_release_with_train_statistics_in_one_line(release, tmp_path):
    _, cache, _ = release
    out = tmp_path / "run"
    r = invoke("train", "--recipe", "aes-natural", "--cache", cache, "--out", out,
               "--init", "release", "--max-epochs", "1")
    assert r.exit_code == 1 and "--label-stats release" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()
    r = invoke("train", "--recipe", "aes-natural-code", "--cache", cache, "--out", out,
               "--label-stats", "train", "--max-epochs", "1")
    assert r.exit_code == 1 and "--label-stats release" in r.output, r.output


def test_aes_natural_without_its_eval_package_names_eval_split_dev(release, tmp_path):
    """The published train and dev lists alone: the recipe's report split 'eval' is absent,
    and the refusal names the option that reports on dev (and the package that adds eval)."""
    _, _, no_eval = release
    out = tmp_path / "run"
    for recipe in ("aes-natural", "aes-natural-code"):
        r = invoke("train", "--recipe", recipe, "--cache", no_eval, "--out", out,
                   "--max-epochs", "1")
        assert r.exit_code == 1, r.output
        line = r.output.strip()
        assert len(line.splitlines()) == 1 and "eval split 'eval' has no rows" in line
        assert "--eval-split dev" in line and "audiomos2025-track2-eval-phase" in line
        assert not out.exists()
    r = invoke("train", "--recipe", "aes-natural", "--cache", no_eval, "--out", out,
               "--max-epochs", "1", "--eval-split", "dev")
    assert r.exit_code == 0, r.output
    assert (out / "metrics.json").is_file()
