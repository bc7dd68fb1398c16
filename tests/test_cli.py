import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_synthetic_cache
from typer.testing import CliRunner

from qamro_pipe.cli import app

runner = CliRunner()
FAST = ["--max-epochs", "40"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_writes_a_complete_run(synthetic_cache, tmp_path):
    out = tmp_path / "run"
    r = invoke("train", "--cache", synthetic_cache, "--alpha", "0.2", "--beta", "7", "--out",
               out, *FAST)
    assert r.exit_code == 0, r.output
    assert "system-level" in r.output and "overall" in r.output
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.json", "predictions.csv",
                                                "heads.safetensors", "history.csv",
                                                "curves.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    sysm = metrics["heads"]["overall"]["system"]
    assert set(["mse", "lcc", "srcc", "ktau", "srcc_ci"]) <= set(sysm)
    assert "utterance" in metrics["heads"]["textual"]
    config = json.loads((out / "config.json").read_text())
    assert config["validation"].startswith("holdout")
    assert config["members"][0]["loss"]["beta"] == 7.0
    assert config["versions"]["torch"]
    # the loss of every epoch the member trained, and what the run cost
    history = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in history] == list(range(1, config["epochs_run"] + 1))
    assert list(history[0]) == ["member", "epoch", "train_loss", "val_loss", "train_rank",
                                "train_reg", "val_rank", "val_reg"]
    for r in history:
        assert float(r["train_loss"]) == pytest.approx(float(r["train_rank"])
                                                       + float(r["train_reg"]), rel=1e-4)
    best = metrics["members"][0]["best_epoch"]
    assert float(history[best - 1]["val_loss"]) == pytest.approx(
        metrics["members"][0]["best_val_loss"], rel=1e-5)
    assert config["cost"]["member_epochs"] == config["epochs_run"]
    assert config["cost"]["members"] == 1 and config["cost"]["seconds"] > 0
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "id,system,split,true_overall,pred_overall,true_textual,pred_textual"
    assert len(lines) == 241
    import torch
    from safetensors.torch import load_file

    heads = load_file(str(out / "heads.safetensors"))
    assert heads["overall/m0/0.weight"].shape == (256, 16)
    assert heads["textual/m0/0.weight"].shape == (256, 32)
    assert all(torch.isfinite(t).all() for t in heads.values())


def test_speed_options_are_recorded_or_refused_clearly(synthetic_cache, tmp_path):
    out = tmp_path / "run"
    r = invoke("train", "--cache", synthetic_cache, "--out", out, "--matmul-precision", "high",
               "--max-epochs", "3")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["train"]["matmul_precision"] == "high"
    r = invoke("sweep", "--cache", synthetic_cache, "--out", tmp_path / "s", "--beta", "1,7",
               "--pair-kernel", "triton", "--device", "cpu", "--max-epochs", "3")
    assert r.exit_code == 1 and "needs a CUDA device" in r.output
    assert not (tmp_path / "s").exists()
    r = invoke("train", "--cache", synthetic_cache, "--out", tmp_path / "t",
               "--matmul-precision", "fast")
    assert r.exit_code == 1 and "unknown matmul_precision 'fast'" in r.output


def test_existing_run_is_not_overwritten_without_force(synthetic_cache, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--cache", synthetic_cache, "--out", out, *FAST).exit_code == 0
    before = (out / "metrics.json").read_bytes()
    r = invoke("train", "--cache", synthetic_cache, "--out", out, "--beta", "3", *FAST)
    assert r.exit_code == 1 and "exists" in r.output and "--force" in r.output
    assert (out / "metrics.json").read_bytes() == before
    r = invoke("train", "--cache", synthetic_cache, "--out", out, "--beta", "3", "--force",
               *FAST)
    assert r.exit_code == 0
    assert json.loads((out / "config.json").read_text())["members"][0]["loss"]["beta"] == 3.0


def test_ablation_flags_and_seeds(synthetic_cache, tmp_path):
    r = invoke("train", "--cache", synthetic_cache, "--loss", "mr", "--margin", "0.1", "--seeds",
               "3", "--out", tmp_path / "mr", *FAST)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "mr" / "metrics.json").read_text())
    assert len(m["members"]) == 3 and m["heads"]["overall"]["system"]["n_members"] == 3
    assert m["members"][0]["loss"]["kind"] == "mr"


def test_sweep_writes_table_csv_and_plot(synthetic_cache, tmp_path):
    out = tmp_path / "sweep"
    r = invoke("sweep", "--cache", synthetic_cache, "--beta", "1,3,7", "--seeds", "2",
               "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    assert "trained as one model: 6 member(s)" in r.output
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("loss,alpha,beta,margin,seed,head,level,mse,lcc,srcc,ktau")
    assert len(rows) == 1 + 6 * 2 * 2  # points x heads x levels
    assert (out / "sweep.png").stat().st_size > 10_000


def test_sweep_over_loss_kinds_shows_only_the_settings_each_uses(synthetic_cache, tmp_path):
    out = tmp_path / "kinds"
    r = invoke("sweep", "--cache", synthetic_cache, "--loss", "qamro,mr,none", "--beta", "1,7",
               "--margin", "0.1,0.3", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    table = [line.split() for line in r.output.splitlines()
             if line.split()[:1] in (["qamro"], ["mr"], ["none"])]
    assert {tuple(t[:4]) for t in table} == {
        ("qamro", "0.2", "1", "-"), ("qamro", "0.2", "7", "-"), ("mr", "-", "-", "0.1"),
        ("mr", "-", "-", "0.3"), ("none", "-", "-", "-")}
    rows = (out / "sweep.csv").read_text().splitlines()
    assert any(r.startswith("mr,,,0.1,0,") for r in rows)
    assert any(r.startswith("qamro,0.2,1.0,,0,") for r in rows)
    assert (out / "sweep.png").stat().st_size > 10_000


def test_named_grid(synthetic_cache, tmp_path):
    r = invoke("sweep", "--grid", "smoke", "--cache", synthetic_cache, "--out", tmp_path / "s",
               *FAST)
    assert r.exit_code == 0, r.output
    r = invoke("sweep", "--grid", "nosuch", "--cache", synthetic_cache)
    assert r.exit_code == 1 and "no grid 'nosuch'" in r.output


@pytest.mark.parametrize("args,msg", [
    (["--cache", "missing.h5"], "missing.h5: no such cache file"),
    (["--loss", "foo"], "unknown loss 'foo'"),
    (["--eval-split", "eval"], "eval split 'eval' has no rows"),
])
def test_bad_input_is_one_clear_line(synthetic_cache, tmp_path, args, msg):
    if "--cache" not in args:
        args = ["--cache", synthetic_cache, *args]
    r = invoke("train", *args, "--out", tmp_path / "r", *FAST)
    assert r.exit_code == 1
    assert msg in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("qamro-pipe")
    assert exe.exists(), "the console script is installed by `make install`"
    bad = tmp_path / "bad.h5"
    bad.write_text("nope")
    p = subprocess.run([exe, "train", "--cache", bad], capture_output=True, text=True,
                       env={**os.environ, "QAMRO_CACHE_DIR": str(tmp_path)})
    assert p.returncode == 1
    assert "bad.h5" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([exe, "--debug", "train", "--cache", bad], capture_output=True,
                       text=True)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_cache_info(tmp_path):
    p = make_synthetic_cache(tmp_path / "c.h5")
    r = invoke("cache", "info", p)
    assert r.exit_code == 0 and "splits     dev" in r.output and "complete" in r.output


def test_dataset_and_backbone_choose_recipe_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QAMRO_CACHE_DIR", str(tmp_path))
    make_synthetic_cache(tmp_path / "aes-natural" / "other.h5")  # where --backbone other looks
    r = invoke("train", "--dataset", "aes-natural", "--backbone", "other", *FAST)
    assert r.exit_code == 1  # found the cache: its labels are MusicEval's, not the four axes
    assert "aes-natural/other.h5" in r.output and "needs label 'PQ'" in r.output
    r = invoke("train", "--dataset", "musiceval", "--recipe", "demo", *FAST)
    assert r.exit_code == 1 and "is for dataset 'demo', not 'musiceval'" in r.output
