"""Issue 12 items 4 and 5: every setting is checked before any work, in config.py's
dataclasses (so library users get the rules too), and a bad one is one line naming the
setting, exit code 1, nothing written; inputs that gave tracebacks give one line."""
import json
import os
import re

import numpy as np
import pytest

from qamro_pipe.config import ExtractConfig, LossConfig, TrainConfig
from qamro_pipe.errors import CacheError, QamroError

from kit.caches import make_synthetic_cache
from kit.cli import invoke


@pytest.mark.parametrize("cls,kw,msg", [
    (LossConfig, dict(alpha=-1), "--alpha -1: must be at least 0"),
    (LossConfig, dict(margin=-1), "--margin -1: must be at least 0"),
    (LossConfig, dict(beta=0), "--beta 0: must be greater than 0"),
    (LossConfig, dict(beta=-3), "--beta -3: must be greater than 0"),
    (LossConfig, dict(beta=float("nan")), "--beta nan: must be a finite number"),
    (LossConfig, dict(label_range=(5.0, 1.0)), "label_range [5, 1]: must be finite with lo < hi"),
    (LossConfig, dict(label_range=(3.0, 3.0)), "lo < hi"),
    (TrainConfig, dict(lr=0), "--lr 0: must be greater than 0"),
    (TrainConfig, dict(lr=-1), "--lr -1: must be greater than 0"),
    (TrainConfig, dict(batch_size=1), "--batch-size 1: must be at least 2"),
    (TrainConfig, dict(max_epochs=0), "--max-epochs 0: must be at least 1"),
    (TrainConfig, dict(patience=0), "--patience 0: must be at least 1"),
    (TrainConfig, dict(device="gpu"), "unknown device 'gpu'"),
    (TrainConfig, dict(device="cuda:x"), "unknown device 'cuda:x'"),
    (TrainConfig, dict(momentum=1.0), "momentum 1: must be in [0, 1)"),
    (ExtractConfig, dict(device="gpu"), "unknown device 'gpu'"),
    (ExtractConfig, dict(precision="fp8"), "unknown precision 'fp8'"),
    (ExtractConfig, dict(batch_size=0), "--batch-size 0: must be at least 1"),
    (ExtractConfig, dict(workers=-1), "--workers -1: must be at least 0"),
])
def test_the_dataclasses_hold_the_rules(cls, kw, msg):
    with pytest.raises(QamroError) as e:
        cls(**kw)
    assert msg in str(e.value)


def test_valid_settings_pass():
    LossConfig(alpha=0, margin=0, beta=1e-3, label_range=(0.0, 10.0))
    TrainConfig(lr=1e-6, batch_size=2, max_epochs=1, patience=1, device="cuda:1")
    ExtractConfig(device="cpu", precision="bf16", batch_size=1, workers=0)


@pytest.mark.parametrize("args,msg", [
    (["train", "--alpha", "-1"], "--alpha -1: must be at least 0"),
    (["train", "--beta", "0"], "--beta 0: must be greater than 0"),
    (["train", "--beta", "-3"], "--beta -3: must be greater than 0"),
    (["train", "--lr", "0"], "--lr 0: must be greater than 0"),
    (["train", "--lr", "-1"], "--lr -1: must be greater than 0"),
    (["train", "--patience", "0"], "--patience 0: must be at least 1"),
    (["train", "--loss", "mr", "--margin", "-1"], "--margin -1: must be at least 0"),
    (["train", "--max-epochs", "0"], "--max-epochs 0: must be at least 1"),
    (["train", "--batch-size", "0"], "--batch-size 0: must be at least 2"),
    (["train", "--device", "gpu"], "unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
    (["train", "--seeds", "0"], "--seeds 0: must be at least 1"),
    (["train", "--seed", "3", "--seeds", "2"], "--seed and --seeds: give one"),
    (["train", "--loss", "none", "--alpha", "0.3"],
     "--alpha is not used by --loss none; it applies to --loss qamro only"),
    (["train", "--loss", "mr", "--beta", "7"], "--beta is not used by --loss mr"),
    (["train", "--alpha", "0.2", "--margin", "0.3"], "--margin is not used by --loss qamro"),
    (["train", "--loss", "mr", "--norm", "range"], "--norm is not used by --loss mr"),
    (["train", "--val-split", ""], "--val-split is empty"),
    (["sweep", "--loss", "mr", "--beta", "1,7"],
     "--beta is not used by --loss mr; it applies to --loss qamro only"),
    (["sweep", "--loss", "none", "--margin", "0.1,0.2"], "--margin is not used by --loss none"),
    (["sweep", "--grid", "beta", "--loss", "mr"], "--alpha is not used by --loss mr"),
    (["sweep", "--beta", "1,0"], "--beta 0: must be greater than 0"),
    (["sweep", "--beta", ","], "give a non-empty list"),
    (["sweep", "--seeds", "0"], "--seeds 0: must be at least 1"),
    (["sweep", "--lr", "0", "--beta", "1,7"], "--lr 0: must be greater than 0"),
    (["sweep", "--batch-size", "1"], "--batch-size 1: must be at least 2"),
    (["table", "--seeds", "0"], "--seeds 0: must be at least 1"),
    (["table", "--max-epochs", "0"], "--max-epochs 0: must be at least 1"),
    (["table", "--device", "gpu"], "unknown device 'gpu'"),
    (["table", "--norm", "range", "--lr", "-1"], "--lr -1: must be greater than 0"),
])
def test_bad_settings_are_one_line_before_any_work(synthetic_cache, tmp_path, args, msg):
    """Each was accepted with exit 0 (or crashed after training) before: issue 12 item 4."""
    out = tmp_path / "run"
    if args[0] == "table":
        args = [*args, "--model", "musiceval", *([] if "--seeds" in args else ["--seeds", "1"])]
    if "--max-epochs" not in args:  # a check that fails to refuse then fails fast
        args = [*args, "--max-epochs", "2"]
    r = invoke(*args, "--cache", synthetic_cache, "--out", out)
    assert r.exit_code == 1, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.h5"]


def test_recipe_label_range_and_unknown_keys_name_the_file(synthetic_cache, tmp_path):
    base = (tmp_path / "r.toml")
    heads = '[[heads]]\nname = "overall"\nfeatures = ["audio"]\n'
    base.write_text(f'dataset = "musiceval"\nbackbone = "synthetic"\nlabel_range = [5, 1]\n{heads}')
    r = invoke("train", "--recipe", base, "--cache", synthetic_cache, "--out", tmp_path / "o")
    assert r.exit_code == 1 and f"{base}: label_range [5, 1]: must be finite with lo < hi" \
        in r.output
    base.write_text(f'dataset = "musiceval"\nbackbone = "synthetic"\n[train]\nlr = 0\n{heads}')
    r = invoke("train", "--recipe", base, "--cache", synthetic_cache, "--out", tmp_path / "o")
    assert r.exit_code == 1 and f"{base}: --lr 0: must be greater than 0" in r.output
    base.write_text(f'dataset = "musiceval"\nbackbone = "x"\nlabel_rnage = [1, 5]\n{heads}')
    r = invoke("train", "--recipe", base, "--cache", synthetic_cache, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "unknown recipe key(s) label_rnage" in r.output
    assert not (tmp_path / "o").exists()


def test_norm_range_needs_a_label_range(synthetic_cache, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('dataset = "musiceval"\nbackbone = "synthetic"\n'
                      '[[heads]]\nname = "overall"\nfeatures = ["audio"]\n')
    r = invoke("train", "--recipe", recipe, "--cache", synthetic_cache, "--norm", "range",
               "--out", tmp_path / "o")
    assert r.exit_code == 1 and "--norm range needs the labels' scale" in r.output


@pytest.mark.parametrize("args,msg", [
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--workers", "-2"], "--workers -2: must be at least 0"),
    (["--shard", "4/4"], "--shard 4/4: need 0 <= K < N"),
])
def test_extract_settings_are_checked_before_reading_the_dataset(tmp_path, args, msg):
    out = tmp_path / "c.h5"
    r = invoke("extract", "--manifest", tmp_path / "missing.csv", "--backbone", "melstats",
               "--out", out, *args)
    assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output
    assert "missing.csv" not in r.output  # checked before the manifest is even read
    assert not out.exists()


def _damaged_copies(path, tmp_path):
    """Copies of a cache with 8 bytes overwritten at offsets across its metadata (the
    superblock, object headers, B-trees, heaps, attributes): what a bad disk or a copy
    cut short leaves."""
    data = path.read_bytes()
    for off in range(0, 6000, 37):
        d = bytearray(data)
        d[off:off + 8] = b"\xff\x13\x77\x00\xab\xcd\xef\x01"
        p = tmp_path / f"damaged-{off}.h5"
        p.write_bytes(bytes(d))
        yield p


def test_damaged_metadata_is_a_cache_error_never_a_raw_one(tmp_path):
    """Before: OSError, RuntimeError, KeyError or UnicodeDecodeError, by where the damage
    hit (issue 12 item 5)."""
    from qamro_pipe.store.reader import describe, read_cache

    good = make_synthetic_cache(tmp_path / "good.h5")
    refused = 0
    for p in _damaged_copies(good, tmp_path):
        for read in (read_cache, describe):
            try:
                read(p)
            except CacheError as e:
                refused += 1
                assert str(p) in str(e)
        p.unlink()
    assert refused > 100  # most offsets do hit something a reader needs


def test_damaged_cache_through_train_and_cache_info(tmp_path):
    from qamro_pipe.store.reader import read_cache

    good = make_synthetic_cache(tmp_path / "good.h5")
    kinds = {}
    for p in _damaged_copies(good, tmp_path):
        try:
            read_cache(p)
        except CacheError as e:
            m = re.search(r"damaged cache file, it cannot be read \((\w+):", str(e))
            if m:  # h5py's own error type, now named in one line
                kinds.setdefault(m[1], p)
    assert len(kinds) >= 3  # several of h5py's error types, each met below
    for p in kinds.values():
        for args in (["train", "--cache", p, "--out", tmp_path / "r"], ["cache", "info", p]):
            r = invoke(*args)
            assert r.exit_code == 1, r.output
            assert r.output.startswith(f"error: {p}: damaged cache file")
            assert "Traceback" not in r.output and len(r.output.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_out_dot_and_out_the_cache_are_one_line(synthetic_cache, tmp_path, monkeypatch):
    """`train --out .` (with or without --force) gave a traceback; the lead's --force rule
    refuses foreign folders, this only makes sure nothing reaches the user raw."""
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra in ([], ["--force"]):
        for out in (".", "..", str(tmp_path)):
            r = invoke("train", "--cache", synthetic_cache, "--out", out, "--max-epochs", "2",
                       *extra)
            assert r.exit_code == 1 and "Traceback" not in r.output
            assert "that is the working directory or a folder holding it" in r.output
        r = invoke("train", "--cache", synthetic_cache, "--out", synthetic_cache, *extra)
        assert r.exit_code == 1 and "that is the cache this run trains from" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "afile").write_text("x")
    r = invoke("train", "--cache", synthetic_cache, "--out", tmp_path / "afile" / "run")
    assert r.exit_code == 1 and "is a file, not a folder" in r.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_is_refused_before_training(synthetic_cache, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        r = invoke("train", "--cache", synthetic_cache, "--out", locked / "run")
        assert r.exit_code == 1 and "permission denied" in r.output
        assert "s on" not in r.output  # refused before training, not after
    finally:
        locked.chmod(0o700)


def test_a_grid_with_a_setting_no_kind_uses_is_refused():
    from qamro_pipe.experiments.sweep import expand_grid

    with pytest.raises(QamroError, match="--beta is not used by --loss mr"):
        expand_grid(LossConfig(), {"loss": ["mr"], "beta": [1, 7]})
    with pytest.raises(QamroError, match="the values must be numbers"):
        expand_grid(LossConfig(), {"beta": ["x"]})
    # beta for the qamro rows, margin for the mr rows: each used by one kind
    members = expand_grid(LossConfig(), {"loss": ["qamro", "mr"], "beta": [1, 7],
                                         "margin": [0.1]})
    assert [m.loss.kind for m in members] == ["qamro", "qamro", "mr"]


def test_library_users_get_the_same_rules(synthetic_cache):
    """The checks live in config.py and the library, not in the CLI."""
    from qamro_pipe.experiments.run import recipe_configs
    from qamro_pipe.train.recipes import load_recipe

    r = load_recipe("musiceval")
    with pytest.raises(QamroError, match="--alpha is not used by --loss none"):
        recipe_configs(r, {}, {"kind": "none", "alpha": 0.3})
    with pytest.raises(QamroError, match="--batch-size 0"):
        recipe_configs(r, {"batch_size": 0})
    tcfg, lcfg = recipe_configs(r, {"lr": 0.01}, {"kind": "mr", "margin": 0.2})
    assert tcfg.lr == 0.01 and lcfg.margin == 0.2 and json.dumps(lcfg.label_range)
    assert np.isfinite(lcfg.beta)
