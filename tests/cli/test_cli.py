import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qamro_pipe.cli import app

from kit.caches import make_synthetic_cache
from kit.cli import invoke

FAST = ["--max-epochs", "40"]


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
                                "train_reg", "val_rank", "val_reg", "weight_reg", "weight_rank"]
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
               "--matmul-precision", "medium", "--device", "cpu", "--max-epochs", "3")
    assert r.exit_code == 1 and "unknown matmul_precision 'medium'" in r.output  # removed
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
    assert r.exit_code == 1  # found the cache: its features are not Audiobox-Aesthetics' layers
    assert "aes-natural/other.h5" in r.output and "reads 'layers'" in r.output
    r = invoke("train", "--dataset", "musiceval", "--recipe", "demo", *FAST)
    assert r.exit_code == 1 and "is for dataset 'demo', not 'musiceval'" in r.output


# -- --help that answers (issue 13 item 5) ---------------------------------------------------
def _help(*args):
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())  # rich wraps lines: compare words


def test_help_shows_defaults_from_config_and_describes_every_option():
    from dataclasses import fields

    import click
    import typer.main

    from qamro_pipe.config import ExtractConfig, LossConfig, TrainConfig

    text = _help("train", "--help")
    for cls, name, flag in [(TrainConfig, "lr", "--lr"), (TrainConfig, "patience", "--patience"),
                            (TrainConfig, "batch_size", "--batch-size"),
                            (LossConfig, "beta", "--beta"), (LossConfig, "alpha", "--alpha"),
                            (TrainConfig, "max_epochs", "--max-epochs")]:
        value = next(f.default for f in fields(cls) if f.name == name)
        assert flag in text and f"default: ({value:g}, or the recipe's)" in text
    assert "default: (musiceval;" in _help("sweep", "-h")
    assert f"default: ({ExtractConfig().backbone})" in _help("extract", "-h")
    assert "default: (table1)" in _help("table", "-h")
    group = typer.main.get_command(app)
    for name, cmd in [*group.commands.items(), *group.commands["cache"].commands.items()]:
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name not in ("help",):
                assert p.help, f"{name} {p.opts} has no description"
        assert cmd.help, name


def test_sweep_and_table_take_the_options_train_has():
    import typer.main

    group = typer.main.get_command(app)
    opts = {n: {o for p in group.commands[n].params for o in p.opts}
            for n in ("train", "sweep", "table")}
    shared = {"--lr", "--batch-size", "--patience", "--max-epochs", "--val-split",
              "--eval-split", "--activation", "--regression", "--norm", "--device",
              "--matmul-precision", "--cache", "--out", "--force", "--seeds"}
    for name, have in opts.items():
        assert shared <= have, (name, shared - have)


def test_commands_in_the_order_a_user_meets_them_version_and_h():
    import re

    r = invoke("-h")
    listed = re.findall(r"^\W*(\w+)\s{2,}\S", r.output.split("Show this message")[1], re.M)
    assert listed == ["extract", "cache", "train", "sweep", "table", "evaluate", "predict",
                      "export", "prefer", "demo"]
    assert "Start here" in _help("-h") and "Start here" in _help("extract", "-h")
    from qamro_pipe import __version__

    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"qamro-pipe {__version__}"
    assert "0-based" in _help("extract", "-h") or "numbered from 0" in _help("extract", "-h")
    assert "manifest" in _help("extract", "-h").split("--dataset")[1][:200]


def test_debug_works_after_the_command_name(tmp_path):
    from qamro_pipe.errors import QamroError

    bad = tmp_path / "bad.h5"
    bad.write_text("nope")
    r = invoke("train", "--debug", "--cache", bad)
    assert isinstance(r.exception, QamroError)  # raised: the traceback is shown
    r = invoke("train", "--cache", bad)
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output
    r = invoke("cache", "info", bad, "--debug")  # --debug after the command's name too
    assert r.exit_code != 0 and isinstance(r.exception, QamroError)  # raised: a traceback


# -- no system column: utterance level, not a crash (issue 11 item 5) ------------------------
def test_no_system_column_reports_utterance_level_and_says_why(tmp_path):
    """Before: train, sweep and table failed after training ("system-level metrics need
    at least 2 systems"). A manifest without a system column gives every clip ""."""
    cache = make_synthetic_cache(tmp_path / "nosys.h5", system_mos=False)
    import h5py

    with h5py.File(cache, "r+") as f:  # the manifest loader writes "" when there is none
        f["systems"][...] = np.array([""] * len(f["systems"]), dtype=object)
    out = tmp_path / "run"
    r = invoke("train", "--cache", cache, "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    assert "utterance-level on 'dev'" in r.output
    assert "note: system level not computable: eval split 'dev': system-level figures need " \
           "clips of at least 2 systems; these rows have 1 ('')" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["system_level"]["computable"] is False and "at least 2" in m["system_level"]["why"]
    for head in ("overall", "textual"):
        assert m["heads"][head]["utterance"]["srcc"] > 0.5
        assert m["heads"][head]["system"]["srcc"] is None
        assert "at least 2 systems" in m["heads"][head]["system"]["not_computable"]
    r = invoke("sweep", "--cache", cache, "--beta", "1,7", "--seeds", "2", "--out",
               tmp_path / "sweep", *FAST)
    assert r.exit_code == 0, r.output
    assert "utterance SRCC" in r.output and "system level not computable" in r.output
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    r = invoke("table", "--cache", cache, "--model", "musiceval", "--seeds", "1", "--out",
               tmp_path / "table", *FAST)
    assert r.exit_code == 0, r.output
    assert "utterance-level on 'dev'" in r.output and "system level not computable" in r.output
    assert "0." in (tmp_path / "table" / "table.csv").read_text()
    r = invoke("evaluate", out)
    assert r.exit_code == 0 and "utterance-level" in r.output
    assert "system level not computable" in r.output


def test_two_systems_in_eval_give_system_level(tmp_path):
    cache = make_synthetic_cache(tmp_path / "two.h5", n_systems=2, per_system=60)
    r = invoke("train", "--cache", cache, "--out", tmp_path / "r", *FAST)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["system_level"]["computable"] and m["heads"]["overall"]["system"]["n"] == 2


# -- a sweep's evaluation says what it scores (issue 12 item 6) -------------------------------
def test_evaluate_a_sweep_names_its_mean_and_picks_members(synthetic_cache, tmp_path):
    import csv

    out = tmp_path / "sw"
    r = invoke("sweep", "--cache", synthetic_cache, "--beta", "1,7", "--seeds", "2", "--out",
               out, *FAST)
    assert r.exit_code == 0, r.output
    r = invoke("evaluate", out)
    assert r.exit_code == 0, r.output
    assert "scoring the mean of the predictions of 4 members over 2 setting(s): qamro a=0.2 " \
           "b=1; qamro a=0.2 b=7" in r.output
    digest_dirs = list((out / "evaluations").iterdir())
    assert len(digest_dirs) == 1
    all_m = json.loads((digest_dirs[0] / "metrics.json").read_text())
    assert all_m["members"] == 4 and len(all_m["scored"]["settings"]) == 2
    r = invoke("evaluate", out, "--members", "beta=7")
    assert r.exit_code == 0, r.output
    assert "2 members over 1 setting(s): qamro a=0.2 b=7" in r.output
    sel = next(p for p in (out / "evaluations").iterdir() if p.name.endswith("-dev-beta=7"))
    config = json.loads((out / "config.json").read_text())
    k7 = [k for k, m in enumerate(config["members"]) if m["loss"]["beta"] == 7.0]
    train_rows = {r["id"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    for row in csv.DictReader(open(sel / "predictions.csv")):
        want = np.mean([float(train_rows[row["id"]][f"pred_overall_m{k}"]) for k in k7])
        assert float(row["pred_overall"]) == pytest.approx(want, abs=2e-5)
    r = invoke("evaluate", out, "--members", "loss=mr")
    assert r.exit_code == 1 and "no member of this run matches" in r.output
    r = invoke("evaluate", out, "--members", "gamma=1")
    assert r.exit_code == 1 and "use key=value pairs" in r.output
    r = invoke("evaluate", out, "--split", "train")
    assert r.exit_code == 0 and "warning: split 'train' is one this run trained on" in r.output
    ev = json.loads(next(p for p in (out / "evaluations").iterdir()
                         if p.name.endswith("-train")).joinpath("metrics.json").read_text())
    assert ev["warnings"] and "not a held-out estimate" in ev["warnings"][0]


# -- training without a recipe (issue 11 item 6) ----------------------------------------------
def _manifest_cache(tmp_path, with_text):
    """A user's manifest (id, path, system, split, [text], two score columns) extracted
    with melstats, as `extract --manifest` does."""
    import soundfile as sf

    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.loop import extract

    rng = np.random.default_rng(0)
    rows = ["id,path,system,split," + ("text," if with_text else "") + "naturalness,clarity"]
    for i in range(48):
        q = 1 + 4 * (i % 6) / 5
        x = (0.3 * np.sin(2 * np.pi * 220 * np.arange(8000) / 8000)
             + (5.5 - q) * 0.05 * rng.normal(size=8000)).astype(np.float32)
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, x, 8000)
        text = f"a calm voice number {i}," if with_text else ""
        rows.append(f"c{i},{path},sys{i % 6},{'dev' if i % 4 == 0 else 'train'},"
                    + (f'"{text}",' if with_text else "") + f"{q:.1f},{6 - q:.1f}")
    manifest = tmp_path / "speech.csv"
    manifest.write_text("\n".join(rows) + "\n")
    cache = tmp_path / "speech.h5"
    extract(load_dataset("manifest", manifest),
            ExtractConfig(backbone="melstats", device="cpu", workers=0), cache, progress=False)
    return cache


@pytest.mark.parametrize("with_text,features", [(True, ["audio", "text"]), (False, ["audio"])])
def test_a_manifest_cache_trains_without_a_recipe(tmp_path, with_text, features):
    cache = _manifest_cache(tmp_path, with_text)
    out = tmp_path / "run"
    r = invoke("train", "--cache", cache, "--out", out, "--batch-size", "16", *FAST)
    assert r.exit_code == 0, r.output
    assert "note: no recipe for dataset 'speech': one head per label (naturalness, clarity) " \
           f"on {' + '.join(features)}" in r.output
    config = json.loads((out / "config.json").read_text())
    assert [h["name"] for h in config["heads"]] == ["naturalness", "clarity"]
    assert all(h["features"] == features and h["label"] == h["name"] for h in config["heads"])
    assert config["recipe_derived"].startswith("no recipe for dataset 'speech'")
    assert json.loads((out / "metrics.json").read_text())["heads"]["clarity"]["system"]["srcc"]
    r = invoke("evaluate", out)
    assert r.exit_code == 0, r.output


def test_the_documented_recipe_example_trains(tmp_path):
    """docs/recipes.md's complete example is a working recipe (its TOML block, as is)."""
    import re

    from qamro_pipe.train.recipes import load_recipe

    doc = (Path(__file__).parents[2] / "docs" / "recipes.md").read_text()
    block = re.search(r"```toml\n(.*?)```", doc, re.S)[1]
    path = tmp_path / "tts.toml"
    path.write_text(block)
    r = load_recipe(path)
    assert [(h.name, h.features) for h in r.heads] == [("naturalness", ("audio",)),
                                                       ("clarity", ("audio", "text"))]
    cache = _manifest_cache(tmp_path, with_text=True)
    out = tmp_path / "run"
    res = invoke("sweep", "--recipe", path, "--grid", "ablation", "--seeds", "1", "--cache",
                 cache, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["batch_size"] == 64 and config["train"]["patience"] == 30
    assert {m["loss"]["regression"] for m in config["members"]} == {"mse"}
    assert len(config["members"]) == 4  # none, qamro b=1, qamro b=7, mr


def test_system_level_is_reported_for_every_head_that_has_it(tmp_path):
    """One head's labelled eval rows all from one system, the other's from twelve."""
    import h5py

    cache = make_synthetic_cache(tmp_path / "c.h5", system_mos=False)
    with h5py.File(cache, "r+") as f:
        labels, systems = f["labels"][()], f["systems"].asstr()[()]
        dev = f["splits"].asstr()[()] == "dev"
        labels[dev & (systems != "S000"), 1] = np.nan
        f["labels"][...] = labels
    out = tmp_path / "r"
    r = invoke("train", "--cache", cache, "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["heads"]["overall"]["system"]["srcc"] is not None
    assert "not_computable" not in m["heads"]["overall"]["system"]
    assert m["heads"]["textual"]["system"]["srcc"] is None
    assert "1 ('S000')" in m["heads"]["textual"]["system"]["not_computable"]
    assert m["system_level"]["why"].startswith("heads textual: eval split 'dev'")
