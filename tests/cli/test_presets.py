"""Track 1's presets (musiceval-paper, musiceval-code) through the real CLI on the planted
cache (tests/kit/caches.py): `make table1 PRESET=code` end to end, and each preset's settings
reaching the run as JSON-plain config. Track 2's presets: tests/train/test_release.py."""
import json

import pytest

from kit.caches import make_synthetic_cache
from kit.cli import invoke


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("planted") / "clap-music.h5")


# JethroWangSir/QAMRO track1/mos_track1.py: DataLoader batch 16 (train) and 8 (validation),
# nn.Linear layers with nothing between them, early stopping on the dev loader
CODE = {"batch_size": 16, "val_batch_size": 8, "activation": "none", "val_split": "dev",
        "optimizer": "sgd", "lr": 0.0005, "momentum": 0.9}
# the paper, Sec. III-B: batch 256, SGD at 5e-4 (momentum: the code's)
PAPER = {"batch_size": 256, "val_split": "holdout", "optimizer": "sgd", "lr": 0.0005,
         "momentum": 0.9, "activation": "relu"}


@pytest.mark.parametrize("preset,want", [("code", CODE), ("paper", PAPER)])
def test_table1_preset_trains_every_row_with_the_preset_s_settings(planted, tmp_path, preset,
                                                                   want):
    out = tmp_path / preset
    r = invoke("table", "--recipe", "table1", "--preset", preset, "--cache", planted,
               "--seeds", "1", "--max-epochs", "40", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert f"table1: musiceval-{preset}, system-level" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == f"musiceval-{preset}"
    assert {k: config["train"][k] for k in want} == want
    assert config["validation"] == ("dev" if preset == "code" else config["validation"])
    assert {m["loss"]["quality_weight"] for m in config["members"]} == {"eq3"}
    md = (out / "table.md").read_text()
    for row in ("baseline", "QAMRO", "w/o quality-aware weighting", "w/o adaptive margin"):
        assert f"| {row}" in md, row


def test_code_preset_learns_the_planted_signal(planted, tmp_path):
    """Batch 16 without activations still finds the planted order of the systems."""
    out = tmp_path / "run"
    r = invoke("train", "--recipe", "musiceval-code", "--cache", planted, "--out", out,
               "--max-epochs", "150", "--quiet")
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heads"]["overall"]["system"]["srcc"] > 0.8


def test_preset_and_model_together_are_refused(planted, tmp_path):
    r = invoke("table", "--recipe", "table1", "--preset", "code", "--model", "musiceval",
               "--cache", planted, "--out", tmp_path / "t")
    assert r.exit_code == 1 and "--model and --preset: give one" in r.output
    r = invoke("table", "--recipe", "table1", "--preset", "fast", "--cache", planted,
               "--out", tmp_path / "t")
    assert r.exit_code == 1 and "no preset 'fast' (it has: paper, code)" in r.output
    assert not (tmp_path / "t").exists()
