"""Issue 19 part A: settings held to what the publishers' code does (the release heads'
statistics, AES-Natural without its eval package)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import TrainConfig
from qamro_pipe.errors import QamroError

from kit.release import aes_cache, provenance_of


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def release(publisher_ckpt, tmp_path_factory):
    """(checkpoint built as the publisher builds it: tests/conftest.py's publisher_ckpt, a
    cache extracted with it, one without an eval split: the published train and dev lists
    alone)."""
    root = tmp_path_factory.mktemp("release19")
    ckpt = publisher_ckpt
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


def _save_release(path, model, cfg, transform):
    """A checkpoint laid out as the release's (release_fixtures.py names the source)."""
    import torch

    out = {"model_cfg": dict(cfg),
           "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    if transform is not None:
        out["target_transform"] = transform
    torch.save(out, path)
    return path


def test_release_heads_follow_its_model_cfg_and_a_release_without_statistics_is_refused(
        tmp_path):
    """The heads are read as the release's model_cfg builds them (a release with 3
    projection layers and no LayerNorm, built by audiobox_aesthetics' own AesMultiOutput,
    scores as that model's projection does); a release without target_transform, or with a
    model_cfg the cached features cannot reproduce, is refused in one line, not given
    (0, 1) or read as if it were the default."""
    import torch

    from qamro_pipe.extract.backbones.aesthetics import RELEASE_HEAD_CFG, build_aes
    from qamro_pipe.store.reader import read_cache
    from qamro_pipe.train.aes_release import read_release

    from kit.release import AXES, TRANSFORM

    cfg = {**RELEASE_HEAD_CFG, "proj_num_layer": 3, "proj_ln": False}
    model = build_aes(cfg, target_transform=TRANSFORM)
    ckpt = _save_release(tmp_path / "small.pt", model, cfg, TRANSFORM)
    rel = read_release(read_cache(aes_cache(tmp_path / "c.h5", provenance_of(ckpt))))
    layers = torch.randn(5, 13, 768)
    for axis in AXES:
        w = torch.softmax(model.layer_weights[axis].detach(), -1)
        emb = torch.nn.functional.normalize(torch.einsum("blc,l->bc", layers, w), dim=-1)
        want = torch.nn.Sequential(*model.proj_layer[axis])(emb).squeeze(-1)
        got = rel.heads[axis](layers)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert rel.stats[axis] == (TRANSFORM[axis]["mean"], TRANSFORM[axis]["std"])

    bare = _save_release(tmp_path / "bare.pt", model, cfg, None)
    with pytest.raises(QamroError, match="no target_transform mean and std for PQ"):
        read_release(read_cache(aes_cache(tmp_path / "b.h5", provenance_of(bare))))
    odd = _save_release(tmp_path / "odd.pt", model, {**cfg, "normalize_embed": False},
                        TRANSFORM)
    with pytest.raises(QamroError, match="model_cfg normalize_embed False"):
        read_release(read_cache(aes_cache(tmp_path / "o.h5", provenance_of(odd))))
