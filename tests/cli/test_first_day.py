"""What a new user met on a first day (issue 19, part B): each test reproduces one stumble
through the command line, in process, on manifests of generated audio embedded with the
weightless melstats backbone (the path a user without weights takes)."""
import csv
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

import qamro_pipe.demo as demo
import qamro_pipe.experiments.run as experiment
from qamro_pipe.cli import app
from qamro_pipe.errors import Interrupted
from qamro_pipe.report.screen import metrics_table
from qamro_pipe.store.reader import read_meta
from qamro_pipe.train.progress import TrainingProgress
from qamro_pipe.train.trainer import Progress

from kit.caches import make_synthetic_cache

runner = CliRunner()
QUICK = ["--max-epochs", "3", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_clips(folder, n_systems=4, per_system=6, seconds=0.5, sr=16000):
    """Noise clips whose loudness rises with the system number: {id: (path, system, score)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    clips = {}
    for s in range(n_systems):
        for c in range(per_system):
            cid = f"S{s}_c{c}"
            path = folder / f"{cid}.wav"
            sf.write(path, (0.05 + 0.2 * s) * rng.standard_normal(int(sr * seconds)), sr)
            clips[cid] = (path, f"S{s}", 1 + s + 0.1 * c)
    return clips


def write_manifest(path, clips, columns=("id", "path", "system", "split", "score"),
                   split=lambda i: "dev" if i % 4 == 0 else "train"):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for i, (cid, (audio, system, score)) in enumerate(clips.items()):
            values = {"id": cid, "path": audio.name, "system": system, "split": split(i)}
            w.writerow([values.get(c, f"{score:g}") for c in columns])
    return path


def extract(manifest, out):
    r = invoke("extract", "--manifest", manifest, "--backbone", "melstats", "--out", out,
               "--device", "cpu", "--workers", "0", "--quiet")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def trained(tmp_path):
    """A run trained on a labelled manifest's melstats cache, and the clips' folder."""
    clips = write_clips(tmp_path / "audio")
    cache = extract(write_manifest(tmp_path / "audio" / "m.csv", clips), tmp_path / "m.h5")
    run = tmp_path / "run"
    r = invoke("train", "--cache", cache, "--out", run, *QUICK)
    assert r.exit_code == 0, r.output
    return run, clips


# -- B1 --------------------------------------------------------------------------------------
def test_evaluate_scores_an_unlabelled_cache(trained, tmp_path):
    """docs/evaluation.md: an unlabelled set of new systems gets its intervals and matrix."""
    run, clips = trained
    cache = extract(write_manifest(tmp_path / "audio" / "new.csv", clips,
                                   columns=("id", "path", "system")), tmp_path / "new.h5")
    r = invoke("evaluate", run, "--cache", cache, "--split", "train")
    assert r.exit_code == 0, r.output
    assert "has no labels: predictions and systems' intervals only" in r.output
    assert "Traceback" not in r.output
    folder = next((run / "evaluations").iterdir())
    rows = list(csv.DictReader(open(folder / "predictions.csv")))
    assert len(rows) == len(clips) and all(row["true_score"] == "" for row in rows)
    assert all(np.isfinite(float(row["pred_score"])) for row in rows)
    systems = list(csv.DictReader(open(folder / "systems.csv")))
    assert len(systems) == 4 and all(s["true_mos"] == "" and s["ci_lo"] for s in systems)
    assert (folder / "rank-score.csv").is_file() and (folder / "rank-score.png").is_file()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["heads"]["score"]["labelled"] is False
    assert metrics["heads"]["score"]["utterance"]["srcc"] is None


def test_evaluate_refuses_a_cache_whose_labels_are_named_otherwise(trained, tmp_path):
    run, clips = trained
    cache = extract(write_manifest(tmp_path / "audio" / "other.csv", clips,
                                   columns=("id", "path", "system", "split", "mos")),
                    tmp_path / "other.h5")
    r = invoke("evaluate", run, "--cache", cache, "--split", "dev")
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "Traceback" not in r.output
    assert f"{cache}: its labels are mos; run {run} predicts score" in r.output


# -- B2 --------------------------------------------------------------------------------------
@pytest.fixture
def smallest(tmp_path):
    """The smallest manifest the README allows (id, path, score) and one with systems too,
    neither with a split column: every clip is "train"."""
    clips = write_clips(tmp_path / "audio")
    bare = extract(write_manifest(tmp_path / "audio" / "bare.csv", clips,
                                  columns=("id", "path", "score")), tmp_path / "bare.h5")
    sys_ = extract(write_manifest(tmp_path / "audio" / "sys.csv", clips,
                                  columns=("id", "path", "system", "score")), tmp_path / "sys.h5")
    return bare, sys_, clips


def test_a_manifest_without_splits_reports_on_a_seeded_holdout(smallest, tmp_path):
    bare, with_systems, clips = smallest
    run = tmp_path / "run"
    r = invoke("train", "--cache", with_systems, "--out", run, *QUICK)
    assert r.exit_code == 0, r.output
    assert "has no 'dev' split to report on: held out" in r.output
    held = json.loads((run / "config.json").read_text())["eval_holdout"]
    assert held["by"] == "systems" and held["split_seed"] == 0 and held["fraction"] == 0.2
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    out = {row["system"] for row in rows if row["split"] == "eval-holdout"}
    assert out and not out & {row["system"] for row in rows if row["split"] == "train"}
    assert sum(row["split"] == "eval-holdout" for row in rows) == held["clips"]
    assert json.loads((run / "metrics.json").read_text())["eval_split"] == "eval-holdout"
    r = invoke("evaluate", run)  # the same held-out clips, rebuilt from the run's cache
    assert r.exit_code == 0, r.output
    scored = list(csv.DictReader(open(next((run / "evaluations").iterdir())
                                      / "predictions.csv")))
    assert [s["id"] for s in scored] == [x["id"] for x in rows if x["split"] == "eval-holdout"]
    r = invoke("train", "--cache", bare, "--out", tmp_path / "bare-run", *QUICK)
    assert r.exit_code == 0, r.output
    assert "held out 5 clips (the clips have no systems)" in r.output


def test_every_refusal_on_the_smallest_manifest_names_its_fix(smallest, tmp_path):
    bare, _, clips = smallest
    r = invoke("train", "--cache", bare, "--out", tmp_path / "cv", "--cv", "3", *QUICK)
    assert r.exit_code == 1 and "use --cv-group clip" in r.output
    assert "group by prompt" not in r.output  # it has no prompts: no circle
    r = invoke("train", "--cache", bare, "--out", tmp_path / "cv", "--cv", "3",
               "--cv-group", "prompt", *QUICK)
    assert r.exit_code == 1 and "give the clips a text column, or use --cv-group clip" \
        in r.output and "group by system" not in r.output
    r = invoke("train", "--cache", bare, "--out", tmp_path / "cv", "--cv", "3",
               "--cv-group", "clip", *QUICK)
    assert r.exit_code == 0, r.output
    r = invoke("train", "--cache", bare, "--out", tmp_path / "t", "--eval-split", "test",
               *QUICK)
    assert r.exit_code == 1 and "(splits here: train); name one with --eval-split" in r.output
    r = invoke("train", "--cache", bare, "--out", tmp_path / "tr", "--eval-split", "train",
               *QUICK)
    assert r.exit_code == 0 and "warning: --eval-split train: the figures are on clips the " \
        "heads trained on" in r.output
    assert "not a held-out estimate" in json.loads(
        (tmp_path / "tr" / "metrics.json").read_text())["warnings"][0]
    unlabelled = extract(write_manifest(tmp_path / "audio" / "u.csv", clips,
                                        columns=("id", "path")), tmp_path / "u.h5")
    r = invoke("train", "--cache", unlabelled, "--out", tmp_path / "u", *QUICK)
    assert r.exit_code == 1 and "no labels to train on" in r.output \
        and "add a score column" in r.output


# -- B4 --------------------------------------------------------------------------------------
def test_force_keeps_what_evaluate_wrote_in_the_run_it_replaces(trained, tmp_path):
    """`make demo` reruns its runs with --force; the evaluations a user made are not lost."""
    run, _ = trained
    cache = json.loads((run / "config.json").read_text())["cache"]
    assert invoke("evaluate", run, "--split", "train").exit_code == 0
    made = sorted(p.name for p in (run / "evaluations").iterdir())
    r = invoke("train", "--cache", cache, "--out", run, "--force", *QUICK)
    assert r.exit_code == 0, r.output
    kept = tmp_path / "run.kept-1"
    assert f"held evaluations, which this run does not write; it was kept whole as {kept}" \
        in r.output
    assert sorted(p.name for p in (kept / "evaluations").iterdir()) == made
    assert not (run / "evaluations").exists()
    assert json.loads((run / "config.json").read_text())["replaced_run_kept"]["folder"] \
        == str(kept)
    r = invoke("train", "--cache", cache, "--out", run, "--force", *QUICK)  # nothing added
    assert r.exit_code == 0 and "kept" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == \
        ["run", "run.kept-1"]


# -- B5 --------------------------------------------------------------------------------------
def test_default_run_folders_carry_what_differs(tmp_path, monkeypatch):
    monkeypatch.setenv("QAMRO_CACHE_DIR", str(tmp_path))
    clap = make_synthetic_cache(tmp_path / "clap.h5", backbone="clap-music@1")
    mel = make_synthetic_cache(tmp_path / "mel.h5", backbone="melstats@1")
    for args in (["train", "--cache", clap], ["train", "--cache", clap, "--cv", "3"],
                 ["train", "--cache", mel], ["train", "--cache", clap, "--norm", "range"],
                 ["sweep", "--cache", clap, "--beta", "1,7"],
                 ["sweep", "--cache", clap, "--beta", "3,5"],
                 ["sweep", "--cache", clap, "--loss", "qamro,none"]):
        r = invoke(*args, "--max-epochs", "2", "--quiet")
        assert r.exit_code == 0, (args, r.output)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "musiceval-clap-music-qamro-a0.2-b7", "musiceval-clap-music-qamro-a0.2-b7-cv3-system",
        "musiceval-clap-music-qamro-a0.2-b7-norm-range",
        "musiceval-clap-music-sweep-qamro+baseline-a0.2-b7",
        "musiceval-clap-music-sweep-qamro-a0.2-b1,7",
        "musiceval-clap-music-sweep-qamro-a0.2-b3,5", "musiceval-melstats-qamro-a0.2-b7"]


def test_make_targets_take_out_and_force():
    """`make -n` prints the command a target runs: OUT= and FORCE=1 reach it."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    root = Path(__file__).resolve().parents[2]
    for target in ("sweep-beta", "table1", "table2", "table-losses"):
        r = subprocess.run(["make", "-n", "-o", ".venv/.installed", target, "OUT=x/y",
                            "FORCE=1"], cwd=root, capture_output=True, text=True)
        assert r.returncode == 0 and "--out x/y --force" in r.stdout, (target, r.stdout)


# -- B6 --------------------------------------------------------------------------------------
def test_a_manifests_scale_is_declared_and_checked_and_odd_splits_are_reported(tmp_path):
    clips = write_clips(tmp_path / "audio")
    first = next(iter(clips))
    clips[first] = (clips[first][0], clips[first][1], 99)
    manifest = write_manifest(tmp_path / "audio" / "m.csv", clips,
                              split=lambda i: "tran" if i == 3 else "train")
    args = ["extract", "--manifest", manifest, "--backbone", "melstats", "--device", "cpu",
            "--workers", "0", "--quiet"]
    r = invoke(*args, "--out", tmp_path / "a.h5", "--label-range", "1,5")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert f"{manifest}, line 2, column 'score': 99 is outside the scale [1, 5]" in r.output
    assert not (tmp_path / "a.h5").exists()
    r = invoke(*args, "--out", tmp_path / "b.h5")
    assert r.exit_code == 0, r.output
    assert "split 'tran' (1 clips) is none of train, dev, test, eval" in r.output
    assert "scores of 'score' span 1.1 to 99, unchecked; declare the scale with " \
           "--label-range" in r.output
    r = invoke(*args, "--out", tmp_path / "c.h5", "--label-range", "1-5")
    assert r.exit_code == 1 and "give the scale as two numbers LO,HI" in r.output
    r = invoke(*args, "--out", tmp_path / "c.h5", "--label-range", "5,1")
    assert r.exit_code == 1 and "--label-range [5, 1]: must be finite with lo < hi" in r.output
    clips[first] = (clips[first][0], clips[first][1], 2.5)
    write_manifest(manifest, clips)
    r = invoke(*args, "--out", tmp_path / "d.h5", "--label-range", "0,10")
    assert r.exit_code == 0, r.output
    assert read_meta(tmp_path / "d.h5").config["label_range"] == [0, 10]
    r = invoke("train", "--cache", tmp_path / "d.h5", "--out", tmp_path / "run", "--norm",
               "range", *QUICK)
    assert r.exit_code == 0, r.output  # the declared scale serves --norm range
    r = invoke("extract", "--dataset", "demo", "--label-range", "1,5")
    assert r.exit_code == 1 and "--label-range applies to --manifest" in r.output


# -- B7 --------------------------------------------------------------------------------------
def test_predict_says_what_it_does_with_what_it_is_given(tmp_path):
    clips = write_clips(tmp_path / "audio")
    manifest = write_manifest(tmp_path / "audio" / "m.csv", clips,
                              columns=("id", "path", "system", "split", "text", "score"))
    cache = extract(manifest, tmp_path / "m.h5")
    run = tmp_path / "run"
    assert invoke("train", "--cache", cache, "--out", run, *QUICK).exit_code == 0
    assert "text" in json.loads((run / "config.json").read_text())["heads"][0]["features"]
    one, other = clips["S0_c0"][0], clips["S1_c0"][0]
    (tmp_path / "x").mkdir()
    twin = tmp_path / "x" / one.name  # another file with the same name, in another folder
    twin.write_bytes(one.read_bytes())
    r = invoke("predict", run, one, other, twin)
    assert r.exit_code == 0, r.output
    ids = [line.split(",")[0] for line in r.stdout.splitlines()[1:]]
    assert ids == ["audio/S0_c0", "S1_c0", "x/S0_c0"]  # S1_c0 keeps its plain name
    assert "3 of 3 clip(s) have no prompt, and head(s) score read one: they are scored " \
        "with an empty text" in r.output
    r = invoke("predict", run, other, "--text", "calm piano")
    assert r.exit_code == 0 and "no prompt" not in r.output
    r = invoke("predict", run, one, "--manifest", manifest)
    assert r.exit_code == 1 and "give audio files or --manifest, not both" in r.output
    r = invoke("predict", run, tmp_path / "x")
    assert r.exit_code == 1 and f"{tmp_path / 'x'}: is a folder; give its audio files" \
        in r.output


# -- B8 --------------------------------------------------------------------------------------
LIGHT = ("import sys; from typer.testing import CliRunner; from qamro_pipe.cli import app; "
         "r = CliRunner().invoke(app, sys.argv[1:]); "
         "heavy = sorted(m for m in ('torch', 'scipy', 'sklearn') if m in sys.modules); "
         "print(r.exit_code, ','.join(heavy) or 'none'); print(r.output)")


@pytest.mark.parametrize("args, msg", [
    (["train", "--cache", "{tmp}/nope.h5"], "--cache {tmp}/nope.h5: no such cache file"),
    (["sweep", "--cache", "{tmp}"], "--cache {tmp}: is a folder; name the cache's .h5 file"),
    (["table", "--cache", "{tmp}/nope.h5"], "no such cache file"),
    (["train", "--lr", "-1"], "--lr -1: must be greater than 0"),
    (["sweep", "--patience", "0"], "--patience 0: must be at least 1"),
    (["train", "--release-checkpoint", "{tmp}/ckpt.pt", "--init", "release"],
     "--release-checkpoint {tmp}/ckpt.pt: no such file"),
    (["evaluate", "{tmp}/run"], "{tmp}/run: no such run folder"),
    (["predict", "{tmp}/run", "a.wav"], "{tmp}/run: no such run folder"),
    (["extract", "--manifest", "{tmp}/m.csv", "--out", "{tmp}"], "{tmp}: a folder, not a cache"),
    (["train", "--cache", "{tmp}/m.csv"], "{tmp}/m.csv: not a readable HDF5 cache"),
])
def test_wrong_paths_and_settings_are_answered_before_torch_is_imported(tmp_path, args, msg):
    """The process is the point: whether torch and scipy were imported at all."""
    (tmp_path / "m.csv").write_text("id,path,score\n")
    r = subprocess.run([sys.executable, "-c", LIGHT, *(a.format(tmp=tmp_path) for a in args)],
                       capture_output=True, text=True)
    first, output = r.stdout.split("\n", 1)
    assert first == "1 none", r.stdout + r.stderr
    assert msg.format(tmp=tmp_path) in output


# -- B9 --------------------------------------------------------------------------------------
def test_threads_is_a_training_option_that_changes_no_number(synthetic_cache, tmp_path):
    before = torch.get_num_threads()
    for n in (1, 2):
        r = invoke("train", "--cache", synthetic_cache, "--out", tmp_path / f"t{n}",
                   "--threads", n, *QUICK)
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / f"t{n}" / "config.json").read_text())["train"][
            "threads"] == n
    assert torch.get_num_threads() == before  # no global state outlives the run
    assert (tmp_path / "t1" / "predictions.csv").read_bytes() == \
        (tmp_path / "t2" / "predictions.csv").read_bytes()
    r = invoke("sweep", "--cache", synthetic_cache, "--out", tmp_path / "s", "--threads", "0")
    assert r.exit_code == 1 and "--threads 0: must be at least 1" in r.output
    for command in ("train", "sweep", "table"):
        r = invoke(command, "--help")
        assert "--threads" in r.output and "one per core" in r.output


# -- B3 --------------------------------------------------------------------------------------
def test_the_demo_shows_training_progress_and_each_result_as_it_comes(tmp_path, monkeypatch):
    """`make demo` printed nothing through 2-3 minutes of training, then everything."""
    configs = demo.recipe_configs
    monkeypatch.setattr(demo, "recipe_configs", lambda r: (
        replace(configs(r)[0], max_epochs=3), configs(r)[1]))  # the order, not the figures
    monkeypatch.setenv("QAMRO_CACHE_DIR", str(tmp_path))
    r = invoke("demo")
    assert r.exit_code == 0, r.output
    order = ["clips extracted", "training one QAMRO run", "demo run: epoch 3/3",
             "One QAMRO run", "run written to", "demo sweep: epoch 3/3", "Figure 1",
             "sweep written to", "SYNTHETIC"]
    at = [r.output.find(s) for s in order]
    assert -1 not in at and at == sorted(at), list(zip(order, at))
    r = invoke("demo", "--quiet")
    assert r.exit_code == 0 and "demo run: epoch" not in r.output


# -- B11 -------------------------------------------------------------------------------------
def test_small_stumbles_of_a_first_day(synthetic_cache, tmp_path, monkeypatch):
    # a folder is said to be one, not dumped by h5py; "systems none" when no clip has one
    r = invoke("cache", "info", tmp_path)
    assert r.exit_code == 1 and f"cache info {tmp_path}: is a folder" in r.output
    bare = make_synthetic_cache(tmp_path / "bare.h5", systems=np.full(240, ""),
                                system_mos=False)
    assert "systems    none" in invoke("cache", "info", bare).output
    assert "systems    12  (published" in invoke("cache", "info", synthetic_cache).output
    # a refused run leaves no .NAME.partial behind
    r = invoke("train", "--cache", synthetic_cache, "--out", tmp_path / "r", "--eval-split",
               "nope", *QUICK)
    assert r.exit_code == 1 and not list(tmp_path.glob(".r*"))
    # members stopped by --max-epochs are said to be unconverged; heads follow the umask
    r = invoke("train", "--cache", synthetic_cache, "--out", tmp_path / "run", *QUICK)
    assert "1 of 1 member(s) reached --max-epochs 3 before early stopping" in r.output
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "run").iterdir()}
    assert modes["heads.safetensors"] == modes["config.json"], modes
    # Ctrl-C is not an error

    def interrupted(*a, **k):
        raise Interrupted("interrupted: the training state is saved; rerun to resume")
    monkeypatch.setattr(experiment, "run_experiment", interrupted)
    r = invoke("train", "--cache", synthetic_cache, "--out", tmp_path / "i", *QUICK)
    assert r.exit_code == 130 and r.output.startswith("interrupted: the training state")


def test_a_recipe_in_the_working_directory_serves_a_derived_dataset(tmp_path, monkeypatch):
    cache = make_synthetic_cache(tmp_path / "tts.h5", dataset="tts")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "tts.toml").write_text(
        'name = "tts"\ndataset = "tts"\nbackbone = "synthetic"\n'
        '[[heads]]\nname = "quality"\nlabel = "overall"\nfeatures = ["audio"]\n')
    monkeypatch.chdir(tmp_path)
    r = invoke("train", "--cache", cache, "--out", tmp_path / "run", *QUICK)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe_path"] \
        == "stages/tts.toml"


def test_a_cache_of_another_backbone_is_told_which_backbone_the_recipe_reads(tmp_path):
    rng = np.random.default_rng(0)
    cache = make_synthetic_cache(tmp_path / "aes.h5", backbone="melstats@1",
                                 dataset="aes-natural", label_names=["PQ", "PC", "CE", "CU"],
                                 labels=rng.uniform(0, 10, (240, 4)).astype(np.float32),
                                 system_mos=False)
    r = invoke("train", "--cache", cache, "--out", tmp_path / "run", "--eval-split", "dev",
               *QUICK)
    assert r.exit_code == 1 and "reads 'layers', which the aesthetics backbone writes; this " \
        "cache was made by melstats@1" in r.output and "--backbone aesthetics" in r.output


def test_screens_fit_80_columns_and_say_what_they_count(synthetic_cache, tmp_path):
    m = {"utterance": {}, "system": {"mse": 12.5, "mse_ci": [8.25, 17.5], "lcc": -0.25,
                                     "lcc_ci": [-0.612, -0.011], "srcc": -0.3,
                                     "srcc_ci": [-0.7, -0.02], "ktau": None}}
    text = metrics_table({"eval_split": "dev", "validation": "holdout",
                          "heads": {"overall": m, "textual": m}}, "system")
    assert max(len(line) for line in text.splitlines()[1:]) <= 80, text
    ci = next(line for line in text.splitlines() if "95% CI" in line)
    assert ci.split()[2:5] == ["[8.250,17.500]", "[-0.612,-0.011]", "[-0.700,-0.020]"]  # never
    # glued together: each interval a column of its own
    stream = io.StringIO()
    bar = TrainingProgress("train", stream=stream, terminal=True)
    bar(Progress(epoch=5, max_epochs=1000, training=2, members=2, best_val=0.5,
                 member_epochs=10, rate=3.0))
    bar.close()
    assert "at most" in stream.getvalue() and "left" in stream.getvalue()
    r = invoke("train", "--cache", synthetic_cache, "--out", tmp_path / "cv", "--cv", "3",
               "--max-epochs", "2")
    assert r.exit_code == 0 and "fold-0 (1 of 3)" in r.output and "fold 1/3" not in r.output
    for command in ("train", "sweep", "evaluate", "predict", "extract"):
        help_text = invoke(command, "--help").output
        assert help_text.count("<bool>") <= 1 and "{run}" not in help_text, command
    assert "--seed" in " ".join(invoke("sweep", "--help").output.split())


# -- B10 -------------------------------------------------------------------------------------
def test_make_demo_installs_only_what_the_demo_needs(tmp_path):
    """`make -n` prints what a fresh checkout would run: the demo takes a CPU-only torch and
    the package without its backbones; `make test` still installs everything tests need."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    root = Path(__file__).resolve().parents[2]

    def plan(target):
        r = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=root,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    demo = plan("demo")
    assert "pip install -q torch==2.13.0" in demo and "pip install -q -e .\n" in demo
    assert "backbones" not in demo and "torchvision" not in demo
    test = plan("test")
    assert 'pip install -q -e ".[backbones,dev]"' in test and "torchvision==" in test


def test_system_figures_over_few_systems_come_with_a_caution(synthetic_cache, tmp_path):
    """A report split whose clips come from 2 systems gives system SRCC +1 or -1: the run
    says so on screen and in metrics.json's warnings; a split of many systems does not."""
    n_systems, per = 12, 10
    splits = np.array(["train"] * (n_systems * per))
    splits[:per] = "dev"
    splits[per:per + 4] = "dev"  # the dev clips: system S000's and four of S001's
    few = make_synthetic_cache(tmp_path / "few.h5", n_systems=n_systems, per_system=per,
                               splits=splits)
    r = invoke("train", "--cache", few, "--out", tmp_path / "few", *QUICK)
    assert r.exit_code == 0, r.output
    said = "the system-level figures rest on 2 systems"
    assert said in r.output and "+1 or -1" in r.output
    warnings = json.loads((tmp_path / "few" / "metrics.json").read_text())["warnings"]
    assert any(said in w for w in warnings)
    r = invoke("train", "--cache", synthetic_cache, "--out", tmp_path / "many", *QUICK)
    assert r.exit_code == 0, r.output
    assert "rest on" not in r.output


@pytest.mark.parametrize("option", ["--pool", "--batch-by", "--loss-weighting"])
def test_a_members_setting_given_two_values_says_where_they_may_differ(synthetic_cache,
                                                                        tmp_path, option):
    """`sweep --pool mean,attention` (a new user's guess): one line naming the option, that
    every member gets its one value, and where members may differ by it."""
    r = invoke("sweep", "--cache", synthetic_cache, option, "a,b", "--out", tmp_path / "s")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"{option} a,b: one value" in r.output and "table recipe" in r.output
    assert not (tmp_path / "s").exists()
