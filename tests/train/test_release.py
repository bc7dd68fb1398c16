"""Issue 14: training from the released Audiobox-Aesthetics heads (--init release), with the
release's label statistics (--label-stats release), and Table II's zero-shot row, on a
checkpoint built the way its publisher builds it (tests/kit/release.py names the source)."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.store.reader import read_cache
from qamro_pipe.train.aes_release import clip_scores, read_release, release_heads
from qamro_pipe.train.recipes import load_recipe
from qamro_pipe.train.state import TrainState
from qamro_pipe.train.trainer import Checkpoint, train

from kit.cli import invoke
from kit.release import AXES, TRANSFORM, aes_cache, provenance_of
from kit.resume import Stop, assert_same_run, stop_at

HEADS = load_recipe("aes-natural-code").heads
FAST = TrainConfig(max_epochs=3, batch_size=120, bootstrap=0, optimizer="adamw", lr=1e-4,
                   init="release", label_stats="release", val_split="dev", eval_split="eval")


@pytest.fixture(scope="module")
def release(publisher_ckpt, tmp_path_factory):
    """(checkpoint, cache extracted with it, cache whose provenance names no checkpoint);
    the checkpoint: tests/conftest.py's publisher_ckpt."""
    root = tmp_path_factory.mktemp("release")
    ckpt = publisher_ckpt
    cache = aes_cache(root / "aes.h5", provenance_of(ckpt))
    bare = aes_cache(root / "bare.h5")
    return ckpt, cache, bare


def test_release_heads_read_from_the_file_equal_those_of_the_model(release):
    """Read as data from checkpoint.pt, the heads and target transform are the model's."""
    from qamro_pipe.extract.backbones import get_backbone

    ckpt, cache, _ = release
    rel = read_release(read_cache(cache))
    bb = get_backbone("aesthetics", checkpoint=str(ckpt))
    bb.load()
    theirs, stats = release_heads(bb.model)
    assert set(rel.heads) == set(AXES) and rel.stats == stats == {
        a: (TRANSFORM[a]["mean"], TRANSFORM[a]["std"]) for a in AXES}
    for a in AXES:
        assert torch.equal(rel.heads[a].by_member(), theirs[a].by_member())


def test_every_member_starts_from_the_release_and_scores_as_it(release):
    """With a learning rate too small to move a weight (by 1e-30 x its gradient: only a
    weight of 0 moves, and not measurably), every member's weights are the released head's,
    whatever its seed, and the run's predictions are the released model's own scores: the
    init hook, the release statistics and the heads' mapping are all the release's."""
    _, cache, _ = release
    data = read_cache(cache)
    members = [Member(LossConfig(quality_weight="interval-table"), s) for s in (0, 1)]
    res = train(data, HEADS, members, replace(FAST, max_epochs=1, optimizer="sgd", lr=1e-30))
    rel = read_release(data)
    for h in HEADS:
        want = rel.heads[h.label].member_state(0)
        for k in range(2):
            got = res.states[h.name][k]
            assert all(torch.allclose(got[n], want[n], rtol=0, atol=1e-20) for n in want), \
                (h.name, k)
    scores = clip_scores(data, rel.heads, rel.stats)
    for h in HEADS:
        np.testing.assert_allclose(res.predictions[h.name], np.stack([scores[h.label]] * 2),
                                   rtol=1e-6, atol=1e-5)
        assert res.label_stats[h.name] == rel.stats[h.label]
    assert res.release == {"file": str(rel.path), "sha256": rel.sha256,
                           "used_for": ["init", "label_stats"]}


def test_seeds_then_change_only_the_shuffling(release):
    """Two seeds start from the same weights (above) and end apart: they saw the batches in
    another order. Random init with the same seeds starts them apart."""
    _, cache, _ = release
    data = read_cache(cache)
    members = [Member(LossConfig(), 0), Member(LossConfig(), 1)]
    res = train(data, HEADS, members, replace(FAST, max_epochs=2))
    assert not np.allclose(res.predictions["PQ"][0], res.predictions["PQ"][1])
    fresh = train(data, HEADS, members, replace(FAST, init="random", max_epochs=1,
                                                optimizer="sgd", lr=1e-30))
    a, b = fresh.states["PQ"]
    assert not torch.equal(a["0.weight"], b["0.weight"])


def test_resumed_release_run_equals_the_uninterrupted_one(release, tmp_path):
    """As tests/train/test_resume.py checks it: stopped halfway, saved, resumed -> the same run."""
    _, cache, _ = release
    data = read_cache(cache)
    cfg = replace(FAST, max_epochs=6, patience=2, checkpoint_seconds=0.0)
    members = [Member(LossConfig(quality_weight="interval-table"), 0),
               Member(LossConfig(kind="mr", quality_weight="interval-table"), 1)]
    whole = train(data, HEADS, members, cfg)
    stop = max(2, whole.epochs_run // 2)
    ckpt = Checkpoint(tmp_path / "state.safetensors", "fp", every=0.0)
    with pytest.raises(Stop):
        train(data, HEADS, members, cfg, progress=stop_at(stop), checkpoint=ckpt)
    saved, _ = TrainState.load(ckpt.path)
    at = saved.epoch
    resumed = train(data, HEADS, members, cfg, checkpoint=replace(ckpt, resume=saved))
    assert resumed.resumed_from == at > 0
    assert_same_run(resumed, whole)


def test_cli_records_the_release_and_its_sha256(release, tmp_path):
    ckpt, cache, _ = release
    out = tmp_path / "run"
    r = invoke("train", "--recipe", "aes-natural-code", "--cache", cache, "--out", out,
               "--max-epochs", "2")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    rel = read_release(read_cache(cache))
    assert config["release"] == {"file": str(ckpt.resolve()), "sha256": rel.sha256,
                                 "used_for": ["init", "label_stats"]}
    assert config["train"]["init"] == "release" and config["train"]["label_stats"] == "release"
    assert config["label_stats"]["CU"] == [TRANSFORM["CU"]["mean"], TRANSFORM["CU"]["std"]]
    assert config["members"][0]["loss"]["quality_weight"] == "interval-table"


def test_the_release_file_is_found_checked_and_refused_clearly(release, tmp_path):
    ckpt, cache, bare = release
    data = read_cache(cache)
    # another copy of the same file is accepted, by its sha256
    copy = shutil.copy(ckpt, tmp_path / "elsewhere.pt")
    assert read_release(data, copy).sha256 == read_release(data).sha256
    other = tmp_path / "other.pt"  # any other file: its sha256 is compared before reading
    torch.save({"state_dict": {}}, other)
    with pytest.raises(QamroError, match="was extracted with .*another encoder's features"):
        read_release(data, other)
    with pytest.raises(QamroError, match="--release-checkpoint .*: no such file"):
        read_release(data, tmp_path / "missing.pt")
    with pytest.raises(QamroError, match="records no checkpoint it was extracted with"):
        read_release(read_cache(bare))
    moved = aes_cache(tmp_path / "moved.h5", {**provenance_of(ckpt),
                                              "checkpoint_path": str(tmp_path / "gone.pt")})
    r = invoke("train", "--recipe", "aes-natural-code", "--cache", moved, "--out",
               tmp_path / "r", "--max-epochs", "1")
    assert r.exit_code == 1 and "not there now; pass --release-checkpoint PATH" in r.output
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r*"))  # nothing written
    r = invoke("train", "--recipe", "aes-natural-code", "--cache", moved, "--out",
               tmp_path / "r", "--max-epochs", "1", "--release-checkpoint", ckpt)
    assert r.exit_code == 0, r.output


def test_heads_not_shaped_like_the_release_are_refused(release, tmp_path):
    _, cache, _ = release
    small = [replace(h, hidden=(32, 32)) for h in HEADS]
    with pytest.raises(QamroError, match="head 'PQ' is not shaped like the released PQ head"):
        train(read_cache(cache), tuple(small), [Member()], FAST)
    other = (replace(HEADS[0], name="loud", label="loudness"),)
    with pytest.raises(QamroError, match="has heads for PQ, PC, CE, CU, not for 'loud'"):
        read_release(read_cache(cache)).for_heads(other)
    with pytest.raises(QamroError, match="--release-checkpoint is read only with"):
        TrainConfig(release_checkpoint="x.pt")


def test_table2_code_preset_with_the_zero_shot_release_row(release, tmp_path):
    """`make table2 PRESET=code` through the real CLI on a fixture cache: the trained rows
    and, first, the released model scored zero-shot, system level on the eval split."""
    from qamro_pipe.metrics import evaluate

    _, cache, _ = release
    out = tmp_path / "t2"
    r = invoke("table", "--recipe", "table2", "--preset", "code", "--cache", cache,
               "--seeds", "1", "--max-epochs", "2", "--out", out)
    assert r.exit_code == 0, r.output
    assert "table2: aes-natural-code, system-level on 'eval'" in r.output
    lines = [line for line in r.output.splitlines() if line.startswith(
        "Audiobox-Aesthetics release (zero-shot)")]
    assert len(lines) == 1
    data = read_cache(cache)
    rel = read_release(data)
    scores = clip_scores(data, rel.heads, rel.stats)
    rows = data.rows("eval")
    for axis, cell in zip(AXES, lines[0].split()[-4:]):
        col = data.label_names.index(axis)
        want = evaluate(data.labels[rows, col], scores[axis][rows], data.systems[rows], None,
                        0)["system"]["srcc"]
        assert float(cell) == pytest.approx(want, abs=5e-4)
    for row in ("baseline (MSE+MAE only) (n=1)", "QAMRO (n=1)", "w/o adaptive margin (n=1)"):
        assert row in r.output
    md = (out / "table.md").read_text()
    assert "| Audiobox-Aesthetics release (zero-shot) |" in md
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "aes-natural-code" and config["train"]["init"] == "release"


def test_table2_without_a_release_file_says_why_it_has_no_release_row(release, tmp_path):
    _, _, bare = release
    r = invoke("table", "--recipe", "table2", "--preset", "paper", "--cache", bare,
               "--seeds", "1", "--max-epochs", "2", "--out", tmp_path / "t")
    assert r.exit_code == 0, r.output
    assert "note: no 'Audiobox-Aesthetics release (zero-shot)' row:" in r.output
    assert "records no checkpoint" in r.output and "QAMRO (n=1)" in r.output
