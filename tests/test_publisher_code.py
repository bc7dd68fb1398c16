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


def test_interval_lookup_sees_the_labels_after_the_published_float32_round_trip():
    """track2/mos_track2.py standardises labels in float32 with (std + 1e-9) and its loss
    de-standardises them before loss.py's interval lookup: a label of exactly 1.0 can come
    back below 1 and leave every pair; one of 5.0 can fall into [4, 5)."""
    import torch

    from qamro_pipe.train.losses import interval_table, label_terms, published_labels

    y = torch.tensor([1.0, 3.3, 5.0, 6.1, 7.2], dtype=torch.float32)
    # statistics under which the round trip moves 1.0 below 1 (found by search: common)
    mean, std = next((m, s) for m in np.arange(4.0, 7.0, 0.01) for s in (1.3, 1.6, 1.9, 2.2)
                     if published_labels(torch.tensor([1.0]), m, s).item() < 1.0)
    by_hand = ((torch.tensor([1.0]) - mean) / (torch.tensor(std) + 1e-9)) * std + mean
    assert published_labels(torch.tensor([1.0]), mean, std).item() == by_hand.item() < 1.0
    t = label_terms(y, beta=7.0, mean=mean, std=std, table=interval_table("PC"))
    assert torch.isnan(t.yn[0]) and torch.isfinite(t.yn[1:]).all()  # 1.0 is in no pair
    plain = label_terms(y, beta=7.0, table=interval_table("PC"))  # (0, 1): unchanged
    assert torch.isfinite(plain.yn).all()
